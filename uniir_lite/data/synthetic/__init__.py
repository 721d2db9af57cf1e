"""The synthetic benchmark: ten M-BEIR-like datasets written in the exact M-BEIR layout.

Taught in notebook 00. `write_benchmark` draws every image (`scenes`) and text (`texts`,
`encyclopedia`) and writes queries, local and global candidate pools, qrels, instructions and
images with M-BEIR's names and record format (`writer`), so the readers of `mbeir` serve both.
Each dataset plays the role of its M-BEIR namesake (same dataset id, same tasks; `datasets`,
`composed`), and the content is built to show the paper's phenomena with tiny models: text
candidates that repeat or paraphrase text queries (the modality lure of the global pool), composed
queries that need both image and text, entities recognisable from their pictures for the knowledge
tasks, and one shared visual and verbal vocabulary so training on some datasets partly transfers
to held-out ones.

The modules, in the order a reader meets them:
- `scenes`: visual primitives, scenes, garments and their drawing (`render`, `jpeg_bytes`);
- `texts`: the word vocabulary, captions, headlines, modification texts and the instructions;
- `encyclopedia`: the named entities behind WebQA, OVEN and InfoSeek and their texts;
- `writer`: sizes, random streams, the M-BEIR-layout writer and the union files;
- `datasets`, `composed`: one builder per dataset;
- `benchmark`: the manifest, `write_benchmark`, `ensure_benchmark` and `uniir-lite data synth`.
"""

from __future__ import annotations

from uniir_lite.data.synthetic.benchmark import (
    GENERATOR, GENERATOR_VERSION, MANIFEST, ensure_benchmark, synth_command, write_benchmark,
)
from uniir_lite.data.synthetic.writer import SIZES, UPSAMPLED, SynthSize

__all__ = [
    "GENERATOR", "GENERATOR_VERSION", "MANIFEST", "SIZES", "UPSAMPLED", "SynthSize", "ensure_benchmark",
    "synth_command", "write_benchmark",
]
