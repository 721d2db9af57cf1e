"""How the towers of notebooks 01-04 are trained: one module per model family.

Each module holds the family's recipe (a dataclass: everything a run depends on), its training
function over `uniir_lite.train.fit`, and its `train_or_load_*`, a few lines over
`uniir_lite.checkpoints.train_or_load`: a checkpoint is reused when its recipe is equal, else the
model is trained and saved. `models` defines the architectures and their losses and never trains;
`fusion` wraps these trained towers; `uniir_lite.multitask` trains the fused models (UniIR's recipe).

- `recipes.clip`: the CLIP of notebook 01 (`train_clip`, `train_or_load_clip`).
- `recipes.blip`: BLIP's MED of notebook 02 (`train_or_load_blip`).
- `recipes.blip2`: the Q-Former's stage 1, the frozen caption LM and stage 2 of notebook 03.
- `recipes.instructblip`: the instruction-aware and -blind Q-Former pair of notebook 04.
"""
