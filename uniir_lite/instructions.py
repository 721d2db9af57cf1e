"""Query instructions: the table, the choice of one prompt, and the instructed query text.

Taught in notebook 07; used from notebook 05 on. UniIR prefixes each query with one of four
human-written instructions for its (dataset, query modality, target modality) and picks it with
`random.choice` on every access, so the instruction a query gets at evaluation depends on the seed,
the number of GPUs and of data-loader workers. The "fixed" policy here derives the choice from the
qid alone, so every run, process count and call order gives the same prompt.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from uniir_lite.data.mbeir import (
    DATASET_NAMES,
    InstructionKey,
    PathLike,
    format_string,
    instructions_path,
    read_instructions,
)

POLICIES: tuple[str, ...] = ("random", "fixed")


@dataclass(frozen=True)
class InstructionTable:
    """The prompts of instructions/query_instructions.tsv, keyed (dataset_id, q_mod, c_mod)."""

    table: dict[InstructionKey, list[str]]
    path: str = "<in memory>"

    @classmethod
    def from_tsv(cls, path: PathLike) -> InstructionTable:
        """Read the table with UniIR's rules (see `read_instructions`)."""
        return cls(read_instructions(path), str(path))

    @classmethod
    def from_root(cls, root: PathLike) -> InstructionTable:
        """The table of the M-BEIR directory `root` (`instructions/query_instructions.tsv`)."""
        return cls.from_tsv(instructions_path(root))

    def prompts(self, dataset_id: int, query_modality: str, cand_modality: str) -> list[str]:
        """The raw prompts for one (dataset, query modality, candidate modality)."""
        key = (dataset_id, query_modality, cand_modality)
        if key not in self.table:
            name = DATASET_NAMES.get(dataset_id, "unknown dataset")
            raise KeyError(
                f"no instructions for dataset {dataset_id} ({name}), {query_modality} -> "
                f"{cand_modality} in {self.path}; it has {sorted(self.table)}"
            )
        return self.table[key]


def choose(prompts: Sequence[str], qid: str, policy: str, rng: random.Random | None = None) -> str:
    """Pick one prompt for the query `qid`.

    "random": UniIR's `random.choice`, drawn from the `rng` passed in (a new draw on every call).
    "fixed": `crc32(qid) % len(prompts)`, a stable hash, never Python's per-process salted `hash`,
    so the choice is the same in every process and independent of call order.
    """
    if not prompts:
        raise ValueError(f"no prompts to choose from for query {qid}")
    if policy == "random":
        if rng is None:
            raise ValueError("policy 'random' needs an rng, e.g. random.Random(seed)")
        return rng.choice(list(prompts))
    if policy == "fixed":
        return prompts[zlib.crc32(qid.encode("utf-8")) % len(prompts)]
    raise ValueError(f"unknown instruction policy {policy!r}; choose one of {POLICIES}")


def instruct_query(query_txt: str | None, prompt: str) -> str:
    """The instructed query text, exactly as UniIR builds it.

    UniIR format_string's the prompt when it picks it, then formats `"<prompt> <query text>"` again,
    so an image-only query (no text) becomes the formatted prompt alone.
    """
    return format_string(f"{format_string(prompt)} {query_txt or ''}")
