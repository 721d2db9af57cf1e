"""Training BLIP's MED of notebook 02 (ITC + ITM + LM on the image-caption pairs) and
`train_or_load_blip`, which notebooks 05 and 06 call for a trained BLIP. Taught in notebook 02."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from uniir_lite.checkpoints import train_or_load
from uniir_lite.config import Config
from uniir_lite.models.blip import PRESETS, BlipMED, CaptionData, blip_loss, build_blip, caption_shortlist, preset_name
from uniir_lite.train import TrainConfig, fit

CHECKPOINT_NAME = "02_blip"


def itm_hardness(cfg) -> float:
    """The `hardness` of the ITM's negatives: BLIP's in-batch hard negatives (1) with real-size towers,
    random in-batch negatives (0) with the tiny ones. Trained from scratch for a CPU budget, the tiny ITM
    cannot tell ITC's look-alike negatives from the positives: fed those, it answers the share of
    positives in its batch (1/3) for every pair and rejects nothing. Random negatives it learns to
    reject. Taught in notebook 02."""
    return 0.0 if preset_name(cfg) == "tiny" else 1.0


def train_config(cfg, steps: int | None = None):
    """BLIP's pre-training optimiser (AdamW, weight decay 0.05, cosine) at a learning rate for tiny towers."""
    lr = 2e-3 if preset_name(cfg) == "tiny" else 3e-4
    steps = steps or cfg.max_steps
    return TrainConfig(max_steps=steps, lr=lr, weight_decay=0.05, betas=(0.9, 0.999), warmup_steps=max(1, steps // 20),
                       precision=cfg.precision, log_every=10, progress=False)


def use_shortlist(cfg) -> bool:
    """The LM scores a vocabulary shortlist with tiny towers (CPU), the whole vocabulary otherwise."""
    return preset_name(cfg) == "tiny"


def train_or_load_blip(cfg: Config, root: str | Path, steps: int | None = None, force: bool = False,
                       hardness: float | None = None):
    """The trained MED of notebook 02, loaded from `cfg.checkpoint_dir / "02_blip"` if present, else
    trained on the synthetic image–caption pairs (ITC + ITM + LM) and saved (`force`: trained anyway).
    Returns `(model, log)`, the training log as a DataFrame (kept in the checkpoint). `steps` and the
    ITM negatives' `hardness` default to `cfg.max_steps` and `itm_hardness(cfg)`. In the `full` profile: the pretrained
    Salesforce models and an empty log."""
    from uniir_lite.data.images import ImageLoader
    from uniir_lite.data.pairs import image_caption_pairs

    if cfg.pretrained:
        return build_blip(cfg, head="med").to(cfg.device), pd.DataFrame()
    directory = Path(cfg.checkpoint_dir) / CHECKPOINT_NAME
    tcfg = train_config(cfg, steps)
    hardness = itm_hardness(cfg) if hardness is None else float(hardness)
    recipe = {"preset": preset_name(cfg), "patch": PRESETS[preset_name(cfg)]["patch"], "image_size": cfg.image_size,
              "embed_dim": cfg.embed_dim, "seed": cfg.seed, "steps": tcfg.max_steps, "batch_size": cfg.batch_size,
              "lr": tcfg.lr, "shortlist": use_shortlist(cfg), "itm_hardness": hardness}
    model = build_blip(cfg, head="med")

    def train(model: BlipMED) -> pd.DataFrame:
        data = CaptionData(image_caption_pairs(root, "train"), ImageLoader(root, cfg.image_size))
        model.lm_shortlist = caption_shortlist(data.input_ids) if recipe["shortlist"] else None
        generator = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return fit(model, lambda m, b: blip_loss(m, b, generator, hardness), data.batches(cfg.batch_size, cfg.seed),
                       tcfg, cfg.device)

    def shortlist(model: BlipMED) -> dict:
        return {"lm_shortlist": None if model.lm_shortlist is None else model.lm_shortlist.tolist()}

    trained = train_or_load(directory, recipe, lambda: model, train, cfg.device, force, extra=shortlist, data=root)
    if trained.saved.get("lm_shortlist") is not None:
        model.lm_shortlist = torch.tensor(trained.saved["lm_shortlist"])
    return trained.model, trained.log
