"""InstructBLIP: the instruction-aware Q-Former, instruction templates, held-in vs held-out tasks.

BLIP-2's Q-Former reads a frozen image encoder through a fixed number of learned queries, whatever
the question. InstructBLIP ([Dai et al., 2023](https://arxiv.org/abs/2305.06500)) also feeds the
instruction's tokens into the Q-Former's self-attention, next to the queries, so the queries read the
image with the instruction in mind. Taught in notebook 04:

- question tasks drawn from the synthetic scenes' attributes, several instruction templates per
  task, and a held-in / held-out split (`TASKS`, `scene_images`, `make_examples`);
- `InstructQFormer`: learned queries and transformers' `InstructBlipQFormerModel` over the tokens of a
  frozen CLIP vision tower; `instruction_aware=False` is the same model given an empty instruction;
- `AnswerHead`: a one-layer transformer that stands in for InstructBLIP's language model: it reads
  the projected query features and the instruction and scores the answers. Unlike InstructBLIP's
  LLM, which stays frozen while only the Q-Former (and its projection) trains, the head is trained
  with the Q-Former, and it knows only the answer words it was trained on;
- training both variants on the held-in tasks is in `uniir_lite.recipes.instructblip`;
- `build_instructblip(cfg)`: the whole `InstructBlipForConditionalGeneration`, tiny (random init),
  real-size (random init, `gpu`) or Salesforce's weights (`full`), and `check_image_tokens`, the guard
  against the missing image tokens that make the language model silently ignore the image.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from uniir_lite.config import Config
from uniir_lite.data.synthetic.scenes import BACKGROUNDS, CELLS, COLOURS, OBJECT_SIZES, PATTERNS, SHAPES

PRETRAINED_NAME = "Salesforce/instructblip-flan-t5-xl"  # or "Salesforce/instructblip-vicuna-7b"
SCENE_DATASETS = ("MSCOCO", "VisualNews")  # the sets whose images are drawn scenes of shapes
MAX_INSTRUCTION_TOKENS = 16  # the longest instruction of `TASKS` has 14 WordPiece tokens

# ---------------------------------------------------------------------------------------------
# Tasks: questions about the drawn scenes, several instruction templates each
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuestionTask:
    """One kind of question. `refers` tasks ask about one object the instruction names (by its
    colour and/or shape); the others ask about the whole image."""

    name: str
    answers: tuple[str, ...]
    templates: tuple[str, ...]
    held_in: bool
    refers: bool


# The answer vocabularies are the ones the synthetic images are drawn from (same order).
_COLOURS = tuple(COLOURS)
_SHAPES = SHAPES

TASKS: dict[str, QuestionTask] = {t.name: t for t in (
    QuestionTask("colour", _COLOURS, (
        "What colour is the {shape}?",
        "Which colour does the {shape} have?",
        "Tell me the colour of the {shape}.",
        "The {shape} is painted in what colour?",
    ), held_in=True, refers=True),
    QuestionTask("shape", _SHAPES, (
        "What shape is the {colour} object?",
        "Which shape is drawn in {colour}?",
        "Name the shape of the {colour} thing.",
        "The {colour} object has what shape?",
    ), held_in=True, refers=True),
    QuestionTask("pattern", PATTERNS, (
        "What pattern does the {colour} {shape} have?",
        "Is the {colour} {shape} plain, striped or dotted?",
        "Describe the texture of the {colour} {shape}.",
        "How is the {colour} {shape} filled?",
    ), held_in=True, refers=True),
    QuestionTask("background", tuple(BACKGROUNDS), (
        "What is the background of the picture?",
        "Where was this picture taken?",
        "What is behind the shapes?",
        "Name the setting of this image.",
    ), held_in=True, refers=False),
    QuestionTask("position", tuple(CELLS), (
        "Where is the {colour} {shape}?",
        "In which part of the image is the {colour} {shape}?",
        "Locate the {colour} {shape}.",
        "Where in the picture do you see the {colour} {shape}?",
    ), held_in=False, refers=True),
    QuestionTask("size", tuple(OBJECT_SIZES), (
        "How big is the {colour} {shape}?",
        "Is the {colour} {shape} small, medium or large?",
        "What size is the {colour} {shape}?",
        "Tell me how large the {colour} {shape} is.",
    ), held_in=False, refers=True),
    QuestionTask("count", ("one", "two", "three", "four"), (
        "How many objects are in the picture?",
        "Count the shapes in this image.",
        "What is the number of things drawn here?",
        "How many items can you see?",
    ), held_in=False, refers=False),
)}
# Instruction tuning reads the first three templates of a task; the fourth is kept for a zero-shot
# test of a new wording (the task is known, the phrasing is not).
TRAIN_TEMPLATES = (0, 1, 2)
HELD_OUT_TEMPLATES = (3,)
HELD_IN = tuple(name for name, t in TASKS.items() if t.held_in)
HELD_OUT = tuple(name for name, t in TASKS.items() if not t.held_in)
# One answer vocabulary for every task (no answer word is shared between tasks).
ANSWERS: tuple[str, ...] = tuple(a for t in TASKS.values() for a in t.answers)
ANSWER_INDEX = {a: i for i, a in enumerate(ANSWERS)}
assert len(ANSWER_INDEX) == len(ANSWERS), "answer words must be distinct across tasks"


def answer_ids(task: str) -> list[int]:
    """Positions of `task`'s answers in `ANSWERS` (an answer is ranked among its task's answers only)."""
    return [ANSWER_INDEX[a] for a in TASKS[task].answers]


def scene_questions(attrs: dict, task: str) -> list[tuple[dict[str, str], str]]:
    """Every (slots, answer) that `task` can ask about one scene (`src_content` attributes).

    A question must have one right answer: `colour` names a shape that only one group has, `shape` a
    colour that only one group has, `position` a group of a single object."""
    groups = attrs["groups"]
    shape_count: dict[str, int] = {}
    colour_count: dict[str, int] = {}
    for g in groups:
        shape_count[g["shape"]] = shape_count.get(g["shape"], 0) + 1
        colour_count[g["colour"]] = colour_count.get(g["colour"], 0) + 1
    out = []
    if task == "background":
        out.append(({}, attrs["background"]))
    elif task == "count":
        out.append(({}, TASKS["count"].answers[attrs["count"] - 1]))
    else:
        for g in groups:
            slots = {"shape": g["shape"], "colour": g["colour"]}
            if task == "colour" and shape_count[g["shape"]] == 1:
                out.append((slots, g["colour"]))
            elif task == "shape" and colour_count[g["colour"]] == 1:
                out.append((slots, g["shape"]))
            elif task == "pattern":
                out.append((slots, g["pattern"]))
            elif task == "size":
                out.append((slots, g["size"]))
            elif task == "position" and g["count"] == 1:
                out.append((slots, g["positions"][0]))
    return out


def scene_images(root: str | Path, split: str) -> list[tuple[str, dict]]:
    """Distinct drawn scenes `(img_path, attributes)` of the MSCOCO- and VisualNews-like sets of `split`.

    Training images come from the training queries; evaluation images also from the MSCOCO-like
    local pool and the VisualNews-like image queries, which hold more scenes."""
    from uniir_lite.data import mbeir
    from uniir_lite.data.pairs import image_caption_pairs

    found: dict[str, dict] = {}

    def add(img_path: str | None, src: str | None) -> None:
        if img_path and src and img_path not in found:
            attrs = json.loads(src)
            if "groups" in attrs:
                found[img_path] = attrs

    for p in image_caption_pairs(root, split, datasets=SCENE_DATASETS):
        add(p.img_path, p.src_content)
    if split != "train":
        for q in mbeir.read_queries(mbeir.query_path(root, split, "visualnews_task3")):
            add(q.img_path, q.src_content)
        pool = mbeir.read_pool(mbeir.local_pool_path(root, "mscoco_task0", split))
        for img_path, src in zip(pool["img_path"], pool["src_content"]):
            add(img_path, src)
    return list(found.items())


@dataclasses.dataclass
class Examples:
    """Question-answer examples over a list of images, as tensors (one row per question)."""

    img_idx: torch.Tensor  # [n] row of the image in the image list
    task_idx: torch.Tensor  # [n] position of the task in `TASKS`
    answer: torch.Tensor  # [n] position of the answer in `ANSWERS`
    input_ids: torch.Tensor  # [n, L] the instruction, WordPiece ids
    attention_mask: torch.Tensor  # [n, L]
    questions: list[str]

    def __len__(self) -> int:
        return len(self.questions)

    def subset(self, rows: torch.Tensor | Sequence[int]) -> "Examples":
        rows = torch.as_tensor(rows, dtype=torch.long)
        return Examples(self.img_idx[rows], self.task_idx[rows], self.answer[rows], self.input_ids[rows],
                        self.attention_mask[rows], [self.questions[i] for i in rows.tolist()])

    def of_task(self, task: str) -> "Examples":
        return self.subset(torch.nonzero(self.task_idx == list(TASKS).index(task)).flatten())

    def table(self, n: int = 8) -> pd.DataFrame:
        names = list(TASKS)
        return pd.DataFrame({"image": self.img_idx[:n].tolist(), "task": [names[i] for i in self.task_idx[:n].tolist()],
                             "instruction": self.questions[:n], "answer": [ANSWERS[i] for i in self.answer[:n].tolist()]})


def tokenize_instructions(questions: Sequence[str], max_length: int = MAX_INSTRUCTION_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, L] ids, [n, L] mask) with bert-base-uncased's WordPiece, InstructBLIP's Q-Former tokenizer."""
    from uniir_lite.models.tokenizers import bert_tokenizer

    enc = bert_tokenizer()(list(questions), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def make_examples(scenes: Sequence[tuple[str, dict]], tasks: Sequence[str], seed: int,
                  templates: Sequence[int] | None = None) -> Examples:
    """Every question `tasks` can ask about every scene, each in a template drawn at random (as
    InstructBLIP samples one of a task's templates for every training example).

    `templates` keeps only those positions of each task's templates (None: all of them): training on
    `TRAIN_TEMPLATES` leaves `HELD_OUT_TEMPLATES`, wordings the model never read, for a zero-shot test."""
    rng = np.random.default_rng(seed)
    names = list(TASKS)
    img_idx, task_idx, answer, questions = [], [], [], []
    for i, (_, attrs) in enumerate(scenes):
        for task in tasks:
            phrasings = TASKS[task].templates
            phrasings = phrasings if templates is None else [phrasings[j] for j in templates]
            for slots, ans in scene_questions(attrs, task):
                questions.append(phrasings[int(rng.integers(len(phrasings)))].format(**slots))
                img_idx.append(i)
                task_idx.append(names.index(task))
                answer.append(ANSWER_INDEX[ans])
    input_ids, attention_mask = tokenize_instructions(questions)
    return Examples(torch.tensor(img_idx), torch.tensor(task_idx), torch.tensor(answer), input_ids, attention_mask, questions)


def majority_accuracy(train: Examples, test: Examples, task: str) -> float:
    """Chance level of `task`: the accuracy of always giving its most frequent training answer."""
    tr, te = train.of_task(task), test.of_task(task)
    most = int(torch.mode(tr.answer).values) if len(tr) else answer_ids(task)[0]
    return float((te.answer == most).float().mean()) if len(te) else float("nan")


# ---------------------------------------------------------------------------------------------
# The frozen image encoder: CLIP's vision tower, all its output tokens
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def image_tokens(visual: nn.Module, images: torch.Tensor, layer: int = -2) -> torch.Tensor:
    """[n, 1 + patches, width]: the class token and every patch token of an open_clip ViT at block
    `layer`, through its final LayerNorm. As BLIP-2 and InstructBLIP, we read the second-to-last
    block (`layer=-2`): in a ViT pooled from its class token, the last block's patch outputs feed
    nothing and are never trained."""
    index = len(visual.transformer.resblocks) + layer if layer < 0 else layer
    out = visual.forward_intermediates(images, indices=[index], normalize_intermediates=True, output_fmt="NLC",
                                       output_extra_tokens=True, intermediates_only=True)
    return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)


@torch.no_grad()
def encode_image_tokens(visual: nn.Module, loader, img_paths: Sequence[str], batch_size: int = 256, layer: int = -2) -> torch.Tensor:
    """`image_tokens` of many images, batch by batch, on the CPU: [n, T, width]."""
    device, out = next(visual.parameters()).device, []
    for i in range(0, len(img_paths), batch_size):
        images = torch.stack([loader(p) for p in img_paths[i : i + batch_size]]).to(device)  # [b, 3, S, S]
        out.append(image_tokens(visual, images, layer).float().cpu())
    return torch.cat(out)


def vision_width(visual: nn.Module) -> int:
    """Width of an open_clip ViT's tokens (the Q-Former's `encoder_hidden_size`)."""
    return int(visual.transformer.width)


# ---------------------------------------------------------------------------------------------
# The instruction-aware Q-Former and the answer head
# ---------------------------------------------------------------------------------------------


def qformer_config(profile: str, encoder_hidden_size: int):
    """A tiny Q-Former (width 64, 2 layers, each with cross-attention) for `tiny`, InstructBLIP's
    real size (BERT-base: 768 wide, 12 layers, cross-attention every 2nd) otherwise."""
    from transformers import InstructBlipQFormerConfig

    if profile == "tiny":
        return InstructBlipQFormerConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                                         max_position_embeddings=64, cross_attention_frequency=1, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0, encoder_hidden_size=encoder_hidden_size)
    return InstructBlipQFormerConfig(encoder_hidden_size=encoder_hidden_size)


class InstructQFormer(nn.Module):
    """Learned queries + `InstructBlipQFormerModel`: `[queries; instruction]` share self-attention, and
    the queries alone cross-attend to the frozen image tokens. The outputs at the query positions are
    the visual features. With `instruction_aware=False` the instruction is left out (BLIP-2's Q-Former)."""

    def __init__(self, config, num_query_tokens: int, instruction_aware: bool = True):
        from transformers import InstructBlipQFormerModel

        super().__init__()
        self.instruction_aware = instruction_aware
        self.num_query_tokens = num_query_tokens
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, config.hidden_size) * config.initializer_range)
        self.qformer = InstructBlipQFormerModel(config)

    def forward(self, image_embeds: torch.Tensor, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, output_attentions: bool = False):
        """[b, K, hidden] query features (and the model output when `output_attentions`)."""
        b, k = image_embeds.shape[0], self.num_query_tokens
        query_tokens = self.query_tokens.expand(b, -1, -1)  # [b, K, hidden]
        mask = torch.ones(b, k, dtype=torch.long, device=image_embeds.device)  # [b, K]
        if not self.instruction_aware:
            input_ids = None
        if input_ids is not None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            mask = torch.cat([mask, attention_mask.to(mask.dtype)], dim=1)  # [b, K + L]
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)  # [b, T]
        out = self.qformer(input_ids=input_ids, attention_mask=mask, query_embeds=query_tokens,
                           encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
                           output_attentions=output_attentions)
        features = out.last_hidden_state[:, :k]  # [b, K, hidden]
        return (features, out) if output_attentions else features


@torch.no_grad()
def cross_attention_weights(qformer: InstructQFormer, image_embeds: torch.Tensor, input_ids: torch.Tensor | None = None,
                            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[b, cross-attention layers, heads, K, T]: how much each query reads each image token.

    The weights need eager attention (PyTorch's fused `sdpa` kernel returns none); the model is
    switched for this call only."""
    previous = qformer.qformer.config._attn_implementation
    qformer.qformer.set_attn_implementation("eager")
    try:
        _, out = qformer(image_embeds, input_ids, attention_mask, output_attentions=True)
    finally:
        qformer.qformer.set_attn_implementation(previous)
    return torch.stack(out.cross_attentions, dim=1)


@torch.no_grad()
def patch_attention(qformer: InstructQFormer, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """[b, patches]: the last layer's cross-attention, averaged over heads and queries, class token
    dropped, renormalised to sum to 1 over the patches: where the features come from."""
    w = cross_attention_weights(qformer, image_embeds, input_ids, attention_mask)[:, -1].mean(dim=(1, 2))[:, 1:]  # [b, patches]
    return w / w.sum(1, keepdim=True)


def patch_region(cell: str, grid: int, radius: float = 0.2) -> torch.Tensor:
    """[grid * grid] 1.0 on the patches whose centre lies within `radius` (image widths) of the centre
    of `cell` (a key of the scenes' `CELLS`), row-major as the ViT's patch tokens."""
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    y, x = torch.meshgrid(centres, centres, indexing="ij")  # [grid, grid] each
    x0, y0 = CELLS[cell]
    return (((x - x0) ** 2 + (y - y0) ** 2) < radius**2).float().flatten()


def instruction_vocabulary() -> list[int]:
    """The WordPiece ids that the instructions of `TASKS` can contain (every template, every slot word)."""
    from uniir_lite.models.tokenizers import bert_tokenizer

    texts = [t for task in TASKS.values() for t in task.templates] + list(_COLOURS) + list(_SHAPES)
    ids = {i for text in texts for i in bert_tokenizer()(text.replace("{", " ").replace("}", " "))["input_ids"]}
    return sorted(ids)


class AnswerHead(nn.Module):
    """The language model's stand-in: one transformer layer over `[projected query features;
    instruction tokens]`, mean-pooled, scored against every answer of `ANSWERS`. Like InstructBLIP's
    LLM, it reads the instruction in both variants; only the Q-Former differs. Its word embeddings
    cover only `instruction_vocabulary()` (other ids share one row), as a small LM would."""

    def __init__(self, qformer_hidden: int, width: int, n_answers: int = len(ANSWERS), vocab_size: int = 30522,
                 max_length: int = MAX_INSTRUCTION_TOKENS, heads: int = 2, layers: int = 1):
        super().__init__()
        known = instruction_vocabulary()
        row = torch.ones(vocab_size, dtype=torch.long)  # row 1: any other word
        row[0] = 0  # [PAD]
        row[torch.tensor(known)] = torch.arange(2, len(known) + 2)
        self.register_buffer("vocab_row", row, persistent=False)
        self.language_projection = nn.Linear(qformer_hidden, width)  # as InstructBLIP's
        self.word_embeddings = nn.Embedding(len(known) + 2, width, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_length, width)
        self.type_embeddings = nn.Embedding(2, width)  # 0: visual token, 1: instruction token
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.answer_proj = nn.Linear(width, n_answers)

    def hidden(self, query_features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[b, width]: the pooled state the answer is read from."""
        b, k = query_features.shape[:2]
        visual = self.language_projection(query_features) + self.type_embeddings.weight[0]  # [b, K, w]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        text = self.word_embeddings(self.vocab_row[input_ids]) + self.position_embeddings(positions) + self.type_embeddings.weight[1]  # [b, L, w]
        keep = torch.cat([torch.ones(b, k, device=input_ids.device), attention_mask.float()], dim=1)  # [b, K + L]
        x = self.encoder(torch.cat([visual, text], dim=1), src_key_padding_mask=keep == 0)  # [b, K + L, w]
        pooled = (x * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)  # [b, w]
        return self.norm(pooled)

    def forward(self, query_features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.answer_proj(self.hidden(query_features, input_ids, attention_mask))  # [b, answers]


class InstructVQA(nn.Module):
    """Q-Former + answer head: image tokens and an instruction in, answer logits out."""

    def __init__(self, qformer_cfg, num_query_tokens: int, head_width: int, instruction_aware: bool = True):
        super().__init__()
        self.qformer = InstructQFormer(qformer_cfg, num_query_tokens, instruction_aware)
        self.head = AnswerHead(qformer_cfg.hidden_size, head_width)

    @property
    def instruction_aware(self) -> bool:
        return self.qformer.instruction_aware

    def forward(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        query_features = self.qformer(image_embeds, input_ids, attention_mask)  # [b, K, hidden]
        return self.head(query_features, input_ids, attention_mask)  # [b, answers]

    def hidden(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head.hidden(self.qformer(image_embeds, input_ids, attention_mask), input_ids, attention_mask)


def vqa_loss_fn(model: InstructVQA, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loss `uniir_lite.train.fit` calls: cross-entropy of the right answer among all answers."""
    logits = model(batch["image_embeds"], batch["input_ids"], batch["attention_mask"])  # [b, answers]
    loss = F.cross_entropy(logits, batch["answer"])
    return {"loss": loss, "batch_acc": (logits.argmax(-1) == batch["answer"]).float().mean().detach()}


class ExampleBatches:
    """Shuffled training batches `{"image_embeds", "input_ids", "attention_mask", "answer"}`; every pass
    is one epoch in a new order, drawn from a seeded generator."""

    def __init__(self, examples: Examples, image_embeds: torch.Tensor, batch_size: int, seed: int):
        self.examples, self.image_embeds, self.batch_size = examples, image_embeds, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.randperm(len(self.examples), generator=self.generator)
        for i in range(0, len(order) - self.batch_size + 1, self.batch_size):
            rows = order[i : i + self.batch_size]
            ex = self.examples
            yield {"image_embeds": self.image_embeds[ex.img_idx[rows]], "input_ids": ex.input_ids[rows],
                   "attention_mask": ex.attention_mask[rows], "answer": ex.answer[rows]}


# ---------------------------------------------------------------------------------------------
# Evaluation: answer ranking and the linear probe
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _batched(fn, examples: Examples, image_embeds: torch.Tensor, device, batch_size: int = 512) -> torch.Tensor:
    out = []
    for i in range(0, len(examples), batch_size):
        rows = torch.arange(i, min(i + batch_size, len(examples)))
        ex = examples.subset(rows)
        out.append(fn(image_embeds[ex.img_idx].to(device), ex.input_ids.to(device), ex.attention_mask.to(device)).float().cpu())
    return torch.cat(out)


def answer_hits(model: InstructVQA, examples: Examples, image_embeds: torch.Tensor, task: str) -> torch.Tensor:
    """[n] 1.0 where the model answers `task`'s question right, its answer ranked among the task's
    answers only (InstructBLIP's vocabulary ranking for classification tasks). No training on the
    task is needed: a held-in task read in a new wording is scored zero-shot the same way."""
    ex = examples.of_task(task)
    device = next(model.parameters()).device
    logits = _batched(model.eval(), ex, image_embeds, device)[:, answer_ids(task)]  # [n, task answers]
    truth = torch.tensor([answer_ids(task).index(a) for a in ex.answer.tolist()], dtype=torch.long)
    return (logits.argmax(-1) == truth).float()


def hidden_states(model: InstructVQA, examples: Examples, image_embeds: torch.Tensor) -> torch.Tensor:
    """[n, width] pooled answer-head states of every example (frozen model)."""
    device = next(model.parameters()).device
    return _batched(model.eval().hidden, examples, image_embeds, device)


def linear_probe_hits(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                      n_classes: int, steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-3, seed: int = 0) -> torch.Tensor:
    """[n_test] 1.0 where a softmax classifier, trained full batch on frozen (standardised) features,
    is right on the test features: its mean is the probe's accuracy, its spread gives an interval."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    g = torch.Generator().manual_seed(seed)
    w = nn.Linear(train_x.shape[1], n_classes)
    with torch.no_grad():
        w.weight.copy_(torch.randn(w.weight.shape, generator=g) * 0.01)
        w.bias.zero_()
    opt = torch.optim.Adam(w.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(w(train_x), train_y).backward()
        opt.step()
    with torch.no_grad():
        return (w(test_x).argmax(-1) == test_y).float()


def probe_hits(model: InstructVQA, train: Examples, test: Examples, train_embeds: torch.Tensor,
               test_embeds: torch.Tensor, task: str, seed: int = 0) -> torch.Tensor:
    """[n_test] hits of a linear probe on a held-out task: freeze the instruction-tuned model, fit
    only a new answer readout on its pooled answer-head state with `task`'s *training labels*, and
    score the test questions. This measures what the frozen features hold about the task; it is not
    zero-shot (the readout learns from the task's labels), unlike InstructBLIP's held-out evaluation."""
    tr, te = train.of_task(task), test.of_task(task)
    local = {a: i for i, a in enumerate(answer_ids(task))}
    ytr = torch.tensor([local[a] for a in tr.answer.tolist()])
    yte = torch.tensor([local[a] for a in te.answer.tolist()])
    xtr, xte = hidden_states(model, tr, train_embeds), hidden_states(model, te, test_embeds)
    return linear_probe_hits(xtr, ytr, xte, yte, len(local), seed=seed)


# ---------------------------------------------------------------------------------------------
# The whole InstructBLIP, and the image-token pitfall of its language model
# ---------------------------------------------------------------------------------------------


def tiny_instructblip_config(image_size: int = 32, num_query_tokens: int = 8, vocab_size: int = 30522):
    """A tiny `InstructBlipConfig` (vision, Q-Former and OPT language model of width 64, 2 layers).

    The language model's vocabulary is bert-base-uncased's plus one `<image>` token at its end:
    `image_token_index = vocab_size`; BOS / EOS / PAD are [CLS] / [SEP] / [PAD], inside the vocab."""
    from transformers import InstructBlipConfig, InstructBlipQFormerConfig, InstructBlipVisionConfig, OPTConfig

    vision = InstructBlipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=image_size, patch_size=8, initializer_range=0.02)
    qformer = InstructBlipQFormerConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                        max_position_embeddings=64, cross_attention_frequency=1)
    text = OPTConfig(vocab_size=vocab_size + 1, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, ffn_dim=128,
                     max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=101,
                     eos_token_id=102)
    return InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                              num_query_tokens=num_query_tokens, image_token_index=vocab_size)


def real_size_instructblip_config():
    """InstructBLIP's shapes (ViT-g/14 image encoder, BERT-base Q-Former with 32 queries) and
    transformers' default OPT language model, for random-init runs on a GPU (`gpu` profile)."""
    from transformers import InstructBlipConfig

    config = InstructBlipConfig()
    config.image_token_index = config.text_config.vocab_size - 1  # a reserved id of OPT's padded vocab
    return config


def build_instructblip(cfg: Config, pretrained: str | Path | None = None):
    """`InstructBlipForConditionalGeneration` for the profile of `cfg`, in eval mode on `cfg.device`.

    `pretrained=None` follows the profile: Salesforce's weights (`PRETRAINED_NAME`) when
    `cfg.pretrained`, else a tiny (`tiny`) or real-size (`gpu`) random init. `pretrained` may also be a
    hub name or a folder written by `save_pretrained`."""
    from transformers import InstructBlipForConditionalGeneration

    if pretrained is None and cfg.pretrained:
        pretrained = PRETRAINED_NAME
    if pretrained is not None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        dtype = torch.bfloat16 if cfg.precision == "bf16" and str(cfg.device).startswith("cuda") else torch.float32
        model = InstructBlipForConditionalGeneration.from_pretrained(str(pretrained), dtype=dtype)
    else:
        config = tiny_instructblip_config(cfg.image_size) if cfg.profile == "tiny" else real_size_instructblip_config()
        model = InstructBlipForConditionalGeneration(config)
    return model.to(cfg.device).eval()


def build_instructblip_processor(name: str | Path = PRETRAINED_NAME):
    """The processor of a pretrained InstructBLIP: it inserts the `num_query_tokens` image tokens."""
    from transformers import InstructBlipProcessor

    return InstructBlipProcessor.from_pretrained(str(name))


class MissingImageTokens(ValueError):
    """The language model's prompt lacks the image placeholders: the image would be ignored."""


def check_image_tokens(input_ids: torch.Tensor, config) -> None:
    """Raise unless every row of the language model's `input_ids` holds exactly `num_query_tokens`
    copies of `config.image_token_index`.

    `InstructBlipForConditionalGeneration` writes the projected query features into the embeddings of
    those positions (`masked_scatter`). A prompt without them runs without any error, and the
    language model never sees the image."""
    k, token = config.num_query_tokens, config.image_token_index
    if token is None:
        raise MissingImageTokens("config.image_token_index is None: the model cannot place the image in the prompt; "
                                 "set it to the id of the tokenizer's <image> token")
    input_ids = torch.as_tensor(input_ids)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    counts = (input_ids == token).sum(dim=-1)  # [b]
    bad = torch.nonzero(counts != k).flatten().tolist()
    if bad:
        row = bad[0]
        raise MissingImageTokens(
            f"input_ids row {row} holds {int(counts[row])} copies of image_token_index={token}, expected "
            f"num_query_tokens={k} ({len(bad)} of {len(counts)} rows are wrong). Without them the language model "
            "runs but ignores the image. Build the prompt with InstructBlipProcessor (it inserts them) or "
            "prepend them with `add_image_tokens`.")


def add_image_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend `num_query_tokens` image tokens to every row, as `InstructBlipProcessor` does."""
    b = input_ids.shape[0]
    image = torch.full((b, config.num_query_tokens), config.image_token_index, dtype=input_ids.dtype, device=input_ids.device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return torch.cat([image, input_ids], dim=1), torch.cat([torch.ones_like(image), attention_mask], dim=1)
