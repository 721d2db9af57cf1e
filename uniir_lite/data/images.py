"""Loading M-BEIR images as normalised tensors, with CLIP's normalisation (UniIR uses it for BLIP too).

Taught in notebook 01.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageLoader:
    """`loader(img_path) -> [3, size, size]` float tensor for paths relative to the M-BEIR root.

    Bicubic resize to a square (UniIR's evaluation transform for BLIP; CLIP's centre crop is the same
    on square images). With `cache` (default: for images of at most 64 px, the tiny towers') decoded
    tensors stay in memory, shared by every loader of the same root and size in this process: the tiny
    benchmark's images fit in a few tens of MB and are read many times by training and by each
    evaluation.
    """

    _shared: dict[tuple[str, int], dict[str, tuple[int, torch.Tensor]]] = {}  # path -> (mtime_ns, tensor)

    def __init__(self, root: str | Path, image_size: int, cache: bool | None = None):
        self.root = Path(root)
        self.image_size = image_size
        key = (str(self.root.resolve()), image_size)
        cache = image_size <= 64 if cache is None else cache
        self._cache = self._shared.setdefault(key, {}) if cache else None
        self._mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self._std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def __call__(self, img_path: str) -> torch.Tensor:
        path = self.root / img_path
        try:
            mtime = path.stat().st_mtime_ns  # a rewritten image (new data in the same folder) is read again
            if self._cache is not None and self._cache.get(img_path, (None,))[0] == mtime:
                return self._cache[img_path][1]
            img = Image.open(path).convert("RGB")
        except (FileNotFoundError, OSError) as e:
            raise FileNotFoundError(f"{path}: cannot read image ({e})") from None
        img = img.resize((self.image_size, self.image_size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3, S, S]
        x = (x - self._mean) / self._std
        if self._cache is not None:
            self._cache[img_path] = (mtime, x)
        return x

    def batch(self, img_paths: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack images; a missing one (`None`) is a zero image with `img_mask` 0, as UniIR pads."""
        zeros = torch.zeros(3, self.image_size, self.image_size)
        imgs = torch.stack([self(p) if p else zeros for p in img_paths])  # [n, 3, S, S]
        img_mask = torch.tensor([1.0 if p else 0.0 for p in img_paths])  # [n]
        return imgs, img_mask
