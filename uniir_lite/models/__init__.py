"""Towers and models, one module per family. Each family has one builder that decides from the profile
whether the model is tiny (random init from a config), real-size (random init, `gpu`) or pretrained
(`full`):

- `clip`: open_clip CLIP (notebook 01)
- `blip`: transformers BLIP, ITC / ITM / captioning (notebook 02)
- `blip2`: the Q-Former, from scratch and through transformers (notebook 03)
- `instructblip`: the instruction-aware Q-Former (notebook 04)
- `tokenizers`: tokenizers that work offline, with their vocabulary sizes checked
"""
