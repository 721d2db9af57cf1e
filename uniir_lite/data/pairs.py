"""Image–caption pairs out of the M-BEIR files, for the pre-training notebooks (CLIP, BLIP, BLIP-2).

M-BEIR's text -> image queries (task 0) are captions whose positive is their image, and its image ->
text queries (task 3) are images whose positives are their captions: both give (image, caption) pairs,
for the real benchmark and the synthetic one alike. Taught in
notebook 01.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from uniir_lite.data.mbeir import DATASET_IDS, DATASET_STEMS, global_pool_path, local_pool_path, query_path, read_pool, read_queries

CAPTION_DATASETS = ("MSCOCO", "VisualNews", "Fashion200K")


@dataclasses.dataclass(frozen=True)
class ImageCaption:
    img_path: str  # relative to the M-BEIR root
    caption: str
    src_content: str | None  # the query's; on the synthetic benchmark, the drawing's attributes (JSON)
    dataset: str


def image_caption_pairs(root: str | Path, split: str = "train", datasets: tuple[str, ...] = CAPTION_DATASETS) -> list[ImageCaption]:
    """(image, caption) pairs of the task-0 and task-3 queries of `datasets`, in file order.

    For val/test only task 0 is read (each pair once; the task-3 files hold the same images)."""
    pairs = []
    for name in datasets:
        stem = DATASET_STEMS[name]
        if split == "train":
            files = [(query_path(root, "train", stem), global_pool_path(root, "train"))]
        else:
            files = [(query_path(root, split, f"{stem}_task0"), local_pool_path(root, f"{stem}_task0", split))]
        for qfile, pool_file in files:
            pool = read_pool(pool_file)
            row_of = {did: i for i, did in enumerate(pool["did"])}
            for q in read_queries(qfile):
                if q.dataset_id != DATASET_IDS[name]:
                    continue
                if q.task_id == 0:
                    pairs.append(ImageCaption(pool[row_of[q.pos[0]]]["img_path"], q.txt, q.src_content, name))
                elif q.task_id == 3:
                    pairs += [ImageCaption(q.img_path, pool[row_of[did]]["txt"], q.src_content, name) for did in q.pos]
    return pairs
