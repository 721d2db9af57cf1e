"""Speed and memory benchmarks: embedding, training and exact search, each measured beside UniIR's
recipe and beside the hardware's matmul rate, in one run on one device.

`benchmarks/run.py` (and `make bench`) calls `run_all` and writes `benchmarks/results/<device>.json`;
`uniir_lite.kit.readme` renders the performance tables of benchmarks/README.md from those files. Every result is
`{name, unit, better, kit, uniir_recipe, limit, ratio_vs_recipe, fraction_of_limit, note, details}`:

- `kit`: the kit's default path, called through the kit's own code (`encode_image`/`encode_text`
  of a `build_clip` model as `encode_images` and `evaluation.embed_dataset` run it, `train.fit`,
  `retrieval.search`); `uniir_recipe`: UniIR's settings measured in the same run (fp32 weights
  under fp16 autocast, batch 2048 for embedding; fp16 autocast + GradScaler + plain AdamW for
  training; fp32 flat search). fp16 autocast is CUDA-only: on CPU the recipe runs in fp32 and the
  result's `note` says so.
- `limit`: what the work would take at the bf16 matmul rate measured in the same run (FLOPs
  counted with `torch.utils.flop_counter`), in the result's unit.
- `ratio_vs_recipe` and `fraction_of_limit` are oriented so that larger is better: kit / recipe
  and kit / limit for throughputs, recipe / kit and limit / kit for times.
- `details.variants`: candidate settings (bf16 weights, fused AdamW, gradient checkpointing,
  torch.compile) measured to decide what the kit's defaults should be.

Sizes: `ci` (seconds, tiny towers), `small` (CPU, a few minutes), `full` (the issue's sizes, for
one GPU: ViT-B/32 and ViT-L/14 at 224 px, CLIP_SF ViT-L/14 at batch 105 and the largest batch
that fits, search of 190k queries in a 5.6M-candidate pool).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import gc
import itertools
import json
import os
import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

RESULTS_DIR = Path("benchmarks") / "results"
SCHEMA_KEYS = ("name", "unit", "better", "kit", "uniir_recipe", "limit", "ratio_vs_recipe", "fraction_of_limit")
RECIPE_EMBED_BATCH = 2048  # UniIR's embedder (CLIP models)
RECIPE_TRAIN_BATCH = 105  # UniIR's per-GPU batch for CLIP_SF Large
FLOP_COUNT_BATCH = 4  # FLOPs are counted on a few items and scaled: they grow linearly with the batch
TRAIN_BATCH_LADDER = (105, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 1024, 1536, 2048)


@dataclasses.dataclass(frozen=True)
class EmbedCase:
    arch: str
    image_size: int
    batch: int
    iters: int


@dataclasses.dataclass(frozen=True)
class TrainCase:
    arch: str
    image_size: int
    batches: tuple[int, ...]  # fixed batches; `find_max_batch` adds the largest that fits
    steps: int
    find_max_batch: bool = False


@dataclasses.dataclass(frozen=True)
class SearchCase:
    n_queries: int
    n_candidates: int
    dim: int
    k: int = 10


@dataclasses.dataclass(frozen=True)
class BenchSize:
    name: str
    matmul_n: int
    embed: tuple[EmbedCase, ...]
    train: TrainCase
    search: SearchCase
    skipped: tuple[tuple[str, str], ...] = ()  # (benchmark, why) left out at this size
    compile: bool = False  # also measure torch.compile variants (minutes of compilation on a GPU)


SIZES = {
    "ci": BenchSize(
        "ci", 512, (EmbedCase("uniir-clip-tiny", 32, 16, 2),), TrainCase("uniir-clip-tiny", 32, (8, 16), 2),
        SearchCase(256, 20_000, 768),
    ),
    "small": BenchSize(
        "small", 2048, (EmbedCase("ViT-B-32", 224, 16, 2),), TrainCase("uniir-clip-tiny", 32, (32, 64), 4),
        SearchCase(2048, 100_000, 768),
        skipped=(("embed ViT-L-14 224px", "about 160 GFLOP per image: minutes per batch on 2 CPU cores"),
                 ("train CLIP_SF ViT-L-14", "a real-size tower trains at seconds per sample on CPU; "
                                            "the tiny towers stand in")),
    ),
    "full": BenchSize(
        "full", 8192,
        (EmbedCase("ViT-B-32", 224, RECIPE_EMBED_BATCH, 5), EmbedCase("ViT-L-14", 224, RECIPE_EMBED_BATCH, 3)),
        TrainCase("ViT-L-14", 224, (RECIPE_TRAIN_BATCH,), 5, find_max_batch=True),
        SearchCase(190_000, 5_600_000, 768), compile=True,
    ),
}


# ---------------------------------------------------------------------------------------------
# Device: slug, synchronisation, peak memory, timing
# ---------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", text, re.M).group(1).strip()
    except (OSError, AttributeError):
        import platform

        model = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    return f"{model} ({threads} thread{'s' if threads != 1 else ''})"


def device_slug(device: torch.device) -> str:
    """File name of a device's results: `nvidia-h100-80gb-hbm3`, `cpu-amd-epyc`."""
    name = device_name(device)
    if device.type == "cpu":
        name = "cpu " + re.sub(r"\(.*?\)|\b\d+-core processor\b", "", name, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_peak_bytes() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def reset_peak_memory(device: torch.device) -> None:
    """From here on `peak_memory` reports the peak: GPU memory allocated by torch, or on CPU the
    process's peak resident set (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return _rss_peak_bytes()


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> tuple[float, Any]:
    """(seconds of the fastest of `repeats` calls, last result) of `fn` after `warmup` untimed calls.
    The fastest call is the estimate least disturbed by other work on a shared machine."""
    out, best = None, float("inf")
    for _ in range(warmup):
        out = fn()
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def profile_table(fn: Callable[[], Any], device: torch.device, path: Path, rows: int = 25) -> None:
    """Where the time of one call goes: the profiler's operators (and CUDA kernels) by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=rows) + "\n")


# ---------------------------------------------------------------------------------------------
# The limit: a large bf16 matmul, and FLOP counting
# ---------------------------------------------------------------------------------------------


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype = torch.bfloat16, iters: int | None = None) -> dict:
    """FLOP/s of an n x n x n matmul in `dtype`: the measured ceiling that results are compared to."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    iters = iters or (20 if device.type == "cuda" else 5)
    seconds, _ = timed(lambda: a @ b, device, iters, warmup=2)
    return {"dtype": str(dtype).removeprefix("torch."), "n": n, "flops_per_s": 2 * n**3 / seconds}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of `fn()` by torch's flop counter. Gradients stay enabled, since without them
    nn.MultiheadAttention takes a fused inference path the counter does not see (a third of a ViT's
    FLOPs), and attention runs as the math kernel, whose matmuls the counter sees on every device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def result(name: str, unit: str, kit: float | None, recipe: float | None, limit: float | None,
           better: str = "higher", note: str = "", **details: Any) -> dict:
    """One row of the results file; ratios are None where a side is missing."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    higher = better == "higher"
    return {
        "name": name, "unit": unit, "better": better, "kit": kit, "uniir_recipe": recipe, "limit": limit,
        "ratio_vs_recipe": ratio(kit, recipe) if higher else ratio(recipe, kit),
        "fraction_of_limit": ratio(kit, limit) if higher else ratio(limit, kit),
        "note": note, "details": details,
    }


# ---------------------------------------------------------------------------------------------
# 1. Embedding throughput
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Precision:
    """How a model is run: its weights' dtype, an autocast dtype (None: none), torch.compile."""

    weights: torch.dtype = torch.float32
    autocast: torch.dtype | None = None
    compile: bool = False

    def context(self, device: torch.device):
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)


def recipe_embed_precision(device: torch.device) -> Precision:
    """UniIR embeds with fp32 weights under fp16 autocast, which exists on CUDA only."""
    return Precision(autocast=torch.float16) if device.type == "cuda" else Precision()


def _clip_config(arch: str, image_size: int, device: torch.device):
    import open_clip

    from uniir_lite.config import resolve
    from uniir_lite.models.clip import TINY_ARCH, register_configs

    register_configs()
    if arch == TINY_ARCH:
        return resolve("tiny", DEVICE=str(device))
    embed_dim = open_clip.get_model_config(arch)["embed_dim"]
    return resolve("gpu", DEVICE=str(device), EMBED_DIM=embed_dim, IMAGE_SIZE=image_size)


def build_tower(arch: str, image_size: int, device: torch.device, seed: int = 0):
    """A random-init open_clip CLIP of `arch` through the kit's `build_clip`, in eval mode."""
    from uniir_lite.models.clip import build_clip

    torch.manual_seed(seed)
    model, _ = build_clip(_clip_config(arch, image_size, device), arch=arch)
    return model


def _variant_model(model: torch.nn.Module, precision: Precision) -> torch.nn.Module:
    return model if precision.weights == torch.float32 else copy.deepcopy(model).to(precision.weights)


def bench_embedding(case: EmbedCase, device: torch.device, size: BenchSize, limit_flops: float,
                    profile_dir: Path | None = None) -> list[dict]:
    """Images/s and texts/s of the kit's path (the model as built: fp32 weights, no autocast) and
    UniIR's (fp32 weights, fp16 autocast), at `case.batch`, and of candidate settings; the limit
    is `limit_flops` (FLOP/s) over the counted FLOPs per item."""
    model = build_tower(case.arch, case.image_size, device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(case.batch, 3, case.image_size, case.image_size, generator=gen).to(device)  # [b, 3, S, S]
    vocab = model.vocab_size
    texts = torch.randint(1, vocab - 1, (case.batch, model.context_length), generator=gen).to(device)  # [b, L]
    texts[:, -1] = vocab - 1  # the end-of-text token (the highest id) is where open_clip pools
    variants = {"bf16 weights": Precision(weights=torch.bfloat16)}
    if size.compile:
        variants["bf16 weights + torch.compile"] = Precision(weights=torch.bfloat16, compile=True)
    recipe = recipe_embed_precision(device)
    out = []
    for what, inputs, encode_name, unit in (("images", images, "encode_image", "images/s"),
                                            ("texts", texts, "encode_text", "texts/s")):
        def run(m: torch.nn.Module, p: Precision) -> Callable[[], torch.Tensor]:
            x = inputs.to(p.weights) if inputs.is_floating_point() else inputs
            encode = getattr(m, encode_name)
            encode = torch.compile(encode) if p.compile else encode

            @torch.no_grad()
            def call() -> torch.Tensor:
                with p.context(device):
                    y = encode(x)
                    y = y[0] if isinstance(y, tuple) else y
                    return F.normalize(y.float(), dim=-1)  # [b, d]
            return call

        def measure(m: torch.nn.Module, p: Precision) -> dict:
            free_memory(device)
            reset_peak_memory(device)
            seconds, emb = timed(run(m, p), device, case.iters, warmup=1 if not p.compile else 2)  # s per batch
            return {"items_per_s": case.batch / seconds, "peak_memory_bytes": peak_memory(device), "emb": emb}

        n = min(case.batch, FLOP_COUNT_BATCH)  # FLOPs per item do not depend on the batch
        flops = count_flops(lambda: getattr(model, encode_name)(inputs[:n])) / n
        kit = measure(model, Precision())
        if recipe == Precision():
            rec, note = kit, "on CPU UniIR's fp16 autocast does not exist: its recipe is the kit's fp32 path, measured once"
        else:
            rec, note = measure(model, recipe), ""
        measured = {}
        for name, p in variants.items():
            try:
                v = measure(_variant_model(model, p), p)
            except Exception as e:  # a candidate that fails (e.g. no compiler here) is reported, not fatal
                measured[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                continue
            cos = (v.pop("emb") * kit["emb"]).sum(-1).min().item()
            measured[name] = {**v, "min_cos_vs_fp32": cos, "tflops": v["items_per_s"] * flops / 1e12}
        if profile_dir is not None:
            profile_table(run(model, Precision()), device, profile_dir / f"embed-{what}-{case.arch}.txt")
        for m in (kit, rec):
            m.pop("emb", None)
        limit = limit_flops / flops
        out.append(result(
            f"embed {what} {case.arch} {case.image_size}px", unit, kit["items_per_s"], rec["items_per_s"], limit,
            note=note, batch=case.batch, flops_per_item=flops, kit_tflops=kit["items_per_s"] * flops / 1e12,
            recipe_tflops=rec["items_per_s"] * flops / 1e12, kit_peak_memory_bytes=kit["peak_memory_bytes"],
            recipe_peak_memory_bytes=rec["peak_memory_bytes"], variants=measured,
        ))
    return out  # the towers are freed on return; each measurement starts with free_memory


# ---------------------------------------------------------------------------------------------
# 2. Training throughput (CLIP_SF)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainSetting:
    """One training configuration of the bench loop (the kit's own `fit` is measured as is)."""

    autocast: torch.dtype | None = None
    grad_scaler: bool = False
    fused_adamw: bool = False
    grad_clip: float | None = None
    grad_checkpointing: bool = False


def recipe_train_setting(device: torch.device) -> TrainSetting:
    """UniIR: fp32 weights, fp16 autocast with GradScaler (CUDA only), plain AdamW, no clipping."""
    cuda = device.type == "cuda"
    return TrainSetting(autocast=torch.float16 if cuda else None, grad_scaler=cuda)


def kit_candidate_setting(device: torch.device, **changes: Any) -> TrainSetting:
    """`train.fit`'s settings (bf16 autocast on CUDA, gradient clipping at 1.0) with `changes`."""
    base = TrainSetting(autocast=torch.bfloat16 if device.type == "cuda" else None, grad_clip=1.0)
    return dataclasses.replace(base, **changes)


def build_clip_sf(arch: str, image_size: int, device: torch.device, seed: int = 0):
    """CLIP_SF (the kit's `ClipSF`) on a random-init CLIP of `arch`; `fusion.build_uniir` builds the
    profile's default tower, so the tower is built here and wrapped."""
    from uniir_lite.fusion.score import ClipSF
    from uniir_lite.models.clip import build_clip

    torch.manual_seed(seed)
    clip, tokenizer = build_clip(_clip_config(arch, image_size, device), arch=arch)
    return ClipSF(clip, tokenizer).to(device)


def train_batch(model, batch: int, device: torch.device, seed: int = 0) -> dict:
    """A CLIP_SF training batch where every query and candidate has an image and a text: 2 images
    and 2 texts per sample, what UniIR's CLIP_SF encodes whatever the modalities."""
    gen = torch.Generator().manual_seed(seed)
    size, length, vocab = model.image_size, model.clip.context_length, model.clip.vocab_size

    def side() -> dict:
        txt = torch.randint(1, vocab - 1, (batch, length), generator=gen)
        txt[:, -1] = vocab - 1
        return {"txt": txt.to(device), "img": torch.randn(batch, 3, size, size, generator=gen).to(device),
                "txt_mask": torch.ones(batch, device=device), "img_mask": torch.ones(batch, device=device)}

    return {"query": side(), "pos": side()}


def _train_loop(model, batch: dict, setting: TrainSetting, steps: int, device: torch.device) -> Callable[[], float]:
    """A closure running `steps` optimizer steps with `setting`; returns the last loss."""
    from uniir_lite.train import param_groups
    from uniir_lite.multitask import inbatch_loss_fn

    model.train()
    model.clip.set_grad_checkpointing(setting.grad_checkpointing)
    kwargs = {"fused": True} if setting.fused_adamw else {}
    optimizer = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, **kwargs)
    scaler = torch.amp.GradScaler(device.type, enabled=setting.grad_scaler)

    def run() -> float:
        loss_value = float("nan")
        for _ in range(steps):
            with torch.autocast(device.type, dtype=setting.autocast) if setting.autocast else nullcontext():
                loss = inbatch_loss_fn(model, batch)["loss"]
            scaler.scale(loss).backward()
            if setting.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), setting.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            loss_value = loss.item()  # UniIR and `fit` log the loss every step
        return loss_value

    return run


def _fit_runner(model, batch: dict, steps: int, device: torch.device) -> Callable[[], float]:
    """The kit's trainer as the notebooks call it (`precision="bf16"`, as the gpu and full profiles)."""
    from uniir_lite.train import TrainConfig, fit
    from uniir_lite.multitask import inbatch_loss_fn

    def run() -> float:
        log = fit(model, inbatch_loss_fn, itertools.repeat(batch), TrainConfig(
            max_steps=steps, lr=1e-5, log_every=steps, precision="bf16", progress=False), device)
        return float(log["loss"].iloc[-1])

    return run


def _measure_train(make_runner: Callable[[], Callable[[], float]], batch_size: int, steps: int,
                   device: torch.device) -> dict:
    """Samples/s, peak memory and last loss of `steps` steps after `steps` warm-up steps; an
    out-of-memory error is reported as {"error": "out of memory"} with null numbers."""
    free_memory(device)
    reset_peak_memory(device)
    try:
        seconds, loss = timed(make_runner(), device, repeats=2, warmup=1)  # each call: `steps` steps
    except RuntimeError as e:
        if not is_oom(e):
            raise
        seconds = None
    if seconds is None:
        free_memory(device)
        return {"samples_per_s": None, "peak_memory_bytes": None, "loss": None, "error": "out of memory"}
    return {"samples_per_s": batch_size * steps / seconds, "peak_memory_bytes": peak_memory(device), "loss": loss}


def _fits(model_fn, batch_size: int, device: torch.device, setting: TrainSetting | None) -> bool:
    """Whether one training step at `batch_size` fits in memory (kit's `fit` when `setting` is None)."""
    model, batch, fits = model_fn(), None, True
    try:
        batch = train_batch(model, batch_size, device)
        (_fit_runner(model, batch, 1, device) if setting is None else _train_loop(model, batch, setting, 1, device))()
    except RuntimeError as e:
        if not is_oom(e):
            raise
        fits = False
    del model, batch  # (after the except block, whose traceback holds the step's tensors)
    free_memory(device)
    return fits


def largest_batch(model_fn, device: torch.device, setting: TrainSetting | None = None) -> int | None:
    """The largest batch of `TRAIN_BATCH_LADDER` whose training step fits (None if not even 105)."""
    best = None
    for b in TRAIN_BATCH_LADDER:
        if not _fits(model_fn, b, device, setting):
            break
        best = b
    return best


def bench_training(case: TrainCase, device: torch.device, limit_flops: float, profile_dir: Path | None = None) -> list[dict]:
    """Samples/s and peak memory of CLIP_SF training: the kit's `fit` vs UniIR's recipe at each
    batch (and at the largest batch the kit fits), plus candidate settings; the limit is
    `limit_flops` (FLOP/s) over the counted forward + backward FLOPs per sample."""
    initial = build_clip_sf(case.arch, case.image_size, device).cpu()  # every run starts from the same weights

    def model_fn():
        return copy.deepcopy(initial).to(device)

    batches = list(case.batches)
    max_batch_note = {}
    if case.find_max_batch:
        kit_max = largest_batch(model_fn, device)
        ckpt_max = largest_batch(model_fn, device, kit_candidate_setting(device, grad_checkpointing=True, fused_adamw=True))
        max_batch_note = {"kit_largest_batch": kit_max, "largest_batch_with_grad_checkpointing": ckpt_max}
        if kit_max and kit_max not in batches:
            batches.append(kit_max)
    candidates = {"fused AdamW": kit_candidate_setting(device, fused_adamw=True)}
    if max_batch_note.get("largest_batch_with_grad_checkpointing"):
        candidates["fused AdamW + grad checkpointing"] = kit_candidate_setting(
            device, fused_adamw=True, grad_checkpointing=True)
    recipe = recipe_train_setting(device)
    out = []
    for b in batches:
        probe, n = model_fn(), min(b, FLOP_COUNT_BATCH)
        flops = count_flops(_train_loop(probe, train_batch(probe, n, device), TrainSetting(), 1, device)) / n  # fwd + bwd
        del probe
        batch = train_batch(initial, b, device)
        kit = _measure_train(lambda: _fit_runner(model_fn(), batch, case.steps, device), b, case.steps, device)
        rec = _measure_train(lambda: _train_loop(model_fn(), batch, recipe, case.steps, device), b, case.steps, device)
        variants = {name: _measure_train(lambda: _train_loop(model_fn(), batch, setting, case.steps, device),
                                         b, case.steps, device)
                    for name, setting in candidates.items()}
        if profile_dir is not None:
            profile_table(_fit_runner(model_fn(), batch, 1, device), device, profile_dir / f"train-{case.arch}-b{b}.txt")
        del batch
        free_memory(device)
        note = "" if device.type == "cuda" else (
            "on CPU `fit` and UniIR's recipe both train in fp32 (autocast and GradScaler are CUDA-only here)")
        label = "largest kit batch " if case.find_max_batch and b == max_batch_note.get("kit_largest_batch") else ""
        out.append(result(
            f"train CLIP_SF {case.arch} {label}batch {b}", "samples/s", kit["samples_per_s"], rec["samples_per_s"],
            limit_flops / flops, note=note, batch=b, steps=case.steps, flops_per_sample=flops,
            kit_peak_memory_bytes=kit["peak_memory_bytes"], recipe_peak_memory_bytes=rec["peak_memory_bytes"],
            kit_loss=kit["loss"], recipe_loss=rec["loss"], variants=variants, **max_batch_note,
        ))
    ckpt_max = max_batch_note.get("largest_batch_with_grad_checkpointing")
    if ckpt_max and ckpt_max not in batches:  # the larger batch that checkpointing buys
        batch = train_batch(initial, ckpt_max, device)
        setting = candidates["fused AdamW + grad checkpointing"]
        out[-1]["details"]["variants"][f"fused AdamW + grad checkpointing, batch {ckpt_max}"] = _measure_train(
            lambda: _train_loop(model_fn(), batch, setting, case.steps, device), ckpt_max, case.steps, device)
    return out


# ---------------------------------------------------------------------------------------------
# 3. Exact search
# ---------------------------------------------------------------------------------------------


def random_unit_vectors(n: int, dim: int, device: torch.device, dtype: torch.dtype, seed: int,
                        chunk: int = 1 << 20) -> torch.Tensor:
    """[n, dim] random L2-normalised vectors, drawn in chunks (a 5.6M x 768 pool is 8.6 GB in fp16)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(n, dim, dtype=dtype, device=device)
    for s in range(0, n, chunk):
        rows = min(chunk, n - s)
        out[s : s + rows] = F.normalize(torch.randn(rows, dim, device=device, generator=gen), dim=-1).to(dtype)
    return out


@torch.no_grad()
def flat_search_fp32(q: torch.Tensor, c: torch.Tensor, k: int, query_chunk: int, cand_chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """A plain fp32 flat inner-product search on q's device, as faiss' GpuIndexFlatIP computes it: an
    fp32 GEMM (no TF32) and a top-k merge per chunk, after UniIR's `normalize_L2` in fp32."""
    from uniir_lite.retrieval import _ieee_matmuls

    best_s = torch.empty(q.shape[0], 0, device=q.device)
    best_i = torch.empty(q.shape[0], 0, dtype=torch.int64, device=q.device)
    with _ieee_matmuls(q.device):
        for c_start in range(0, c.shape[0], cand_chunk):
            c32 = F.normalize(c[c_start : c_start + cand_chunk].float(), dim=-1)  # [cb, d]
            new_s, new_i = [], []
            for q_start in range(0, q.shape[0], query_chunk):
                rows = slice(q_start, q_start + query_chunk)
                q32 = F.normalize(q[rows].float(), dim=-1)  # [qb, d]
                top = (q32 @ c32.T).topk(min(k, c32.shape[0]), dim=1)  # [qb, k]
                s = torch.cat([best_s[rows], top.values], dim=1)
                i = torch.cat([best_i[rows], top.indices + c_start], dim=1)
                keep = s.topk(min(k, s.shape[1]), dim=1)
                new_s.append(keep.values)
                new_i.append(i.gather(1, keep.indices))
            best_s, best_i = torch.cat(new_s), torch.cat(new_i)
    return best_s.cpu().numpy(), best_i.cpu().numpy()


def faiss_flat_search(q: torch.Tensor, c: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """UniIR's index: fp32 copies through `faiss.normalize_L2`, an `IndexFlatIP` over the candidates,
    then one search of all queries."""
    import faiss

    q32, c32 = q.float().cpu().numpy().copy(), c.float().cpu().numpy().copy()
    faiss.normalize_L2(q32)
    faiss.normalize_L2(c32)
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c32)
    return index.search(q32, k)


def explain_misses(q: torch.Tensor, c: torch.Tensor, kit_idx: np.ndarray, ref_idx: np.ndarray) -> dict:
    """Recall@k of the kit's top-k against the fp32 reference, and why each miss happened, judged by
    float64 scores: the reference's own rounding (the kit's pick scores at least as high), a tie
    within float32 rounding of a dot product (2 d 2^-24), or unexplained."""
    k, dim = ref_idx.shape[1], c.shape[1]
    hits = np.array([len(set(a) & set(b)) for a, b in zip(kit_idx.tolist(), ref_idx.tolist())])
    counts = {"reference_rounding": 0, "within_fp32_rounding": 0, "unexplained": 0}
    tol = 2 * dim * 2.0**-24
    for row in np.nonzero(hits < k)[0]:
        qv = F.normalize(q[row].double().cpu(), dim=-1)

        def score(ids: list[int]) -> np.ndarray:  # cosine in float64
            return (F.normalize(c[torch.as_tensor(ids, device=c.device)].double().cpu(), dim=-1) @ qv).numpy()

        missed = sorted(set(ref_idx[row].tolist()) - set(kit_idx[row].tolist()))
        extra = sorted(set(kit_idx[row].tolist()) - set(ref_idx[row].tolist()))
        gap = score(missed).max() - score(extra).min()  # > 0: the kit dropped a better candidate
        kind = "reference_rounding" if gap <= 0 else "within_fp32_rounding" if gap <= tol else "unexplained"
        counts[kind] += len(missed)
    return {"recall_at_k": float(hits.mean() / k), "misses": int((k - hits).sum()), **{f"misses_{n}": v for n, v in counts.items()}}


def bench_search(case: SearchCase, device: torch.device, limit_flops: float, profile_dir: Path | None = None) -> list[dict]:
    """Seconds of the kit's exact `search` vs UniIR's fp32 flat search (faiss `IndexFlatIP` on CPU;
    an fp32 GEMM + top-k on GPU, where faiss-gpu is not in the lock), recall@k of the kit against
    it, peak memory, and the bf16 matmul time of the same FLOPs."""
    from uniir_lite.retrieval import search

    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32  # UniIR's embeddings are fp16 on disk
    q = random_unit_vectors(case.n_queries, case.dim, device, dtype, seed=1)
    c = random_unit_vectors(case.n_candidates, case.dim, device, dtype, seed=2)
    stats: dict = {}

    def kit_run():
        return search(q, c, case.k, device=device, stats=stats)

    free_memory(device)
    reset_peak_memory(device)
    repeats = 1 if cuda else 2  # one global-pool search on a GPU takes seconds to minutes
    kit_s, (_, kit_idx) = timed(kit_run, device, repeats, warmup=0)
    kit_mem = peak_memory(device)
    reset_peak_memory(device)
    if cuda:
        rec_s, (_, ref_idx) = timed(lambda: flat_search_fp32(q, c, case.k, 4096, 65536), device, repeats, warmup=0)
        note = "recipe: fp32 GEMM + top-k in torch (faiss-gpu's GpuIndexFlatIP computes the same; it is not in the lock)"
    else:
        rec_s, (_, ref_idx) = timed(lambda: faiss_flat_search(q, c, case.k), device, repeats, warmup=0)
        note = "recipe: faiss IndexFlatIP (index.add + index.search), fp32 on CPU"
    rec_mem = peak_memory(device)
    flops = 2 * case.n_queries * case.n_candidates * case.dim
    misses = explain_misses(q, c, kit_idx, ref_idx)
    if profile_dir is not None:
        profile_table(kit_run, device, profile_dir / "search.txt")
    return [result(
        f"search {case.n_queries}x{case.n_candidates}x{case.dim} top-{case.k}", "s", kit_s, rec_s,
        flops / limit_flops, better="lower", note=note, flops=flops, input_dtype=str(dtype).removeprefix("torch."),
        kit_peak_memory_bytes=kit_mem, recipe_peak_memory_bytes=rec_mem, kit_search_stats=stats, **misses,
    )]


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def versions() -> dict:
    from uniir_lite.env import environment

    env = environment()
    env["faiss"] = _faiss_version()
    env["threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        env["cuda_runtime"] = torch.version.cuda
    return env


def _faiss_version() -> str | None:
    try:
        import faiss

        return faiss.__version__
    except ImportError:  # pragma: no cover - part of the pinned stack
        return None


def run_all(size: str | BenchSize, device: str | torch.device = "auto", parts: tuple[str, ...] = ("embed", "train", "search"),
            profile_dir: str | Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Run the benchmarks of `size` on `device` and return the results document (not yet written)."""
    from uniir_lite.env import pick_device

    device = pick_device(str(device))
    if isinstance(size, str):
        size = SIZES["full" if device.type == "cuda" else "small"] if size == "auto" else SIZES[size]
    profile_dir = Path(profile_dir) if profile_dir else None
    load_before = os.getloadavg()
    start = time.perf_counter()
    limit = matmul_rate(device, size.matmul_n)
    rate = limit["flops_per_s"]
    log(f"bench | {device_name(device)} | size {size.name} | bf16 matmul {limit['flops_per_s'] / 1e12:.3g} TFLOP/s")
    results: list[dict] = []
    steps = {
        "embed": lambda: [r for case in size.embed for r in bench_embedding(case, device, size, rate, profile_dir)],
        "train": lambda: bench_training(size.train, device, rate, profile_dir),
        "search": lambda: bench_search(size.search, device, rate, profile_dir),
    }
    for part in parts:
        t0 = time.perf_counter()
        rows = steps[part]()
        results += rows
        for r in rows:
            log(f"  {r['name']}: kit {_fmt(r['kit'])} {r['unit']}, recipe {_fmt(r['uniir_recipe'])}, "
                f"x{_fmt(r['ratio_vs_recipe'])} vs recipe, {_fmt(r['fraction_of_limit'])} of limit")
        log(f"  ({part}: {time.perf_counter() - t0:.0f} s)")
    return {
        "device": device_slug(device),
        "device_name": device_name(device),
        "date": datetime.date.today().isoformat(),
        "size": size.name,
        "versions": versions(),
        "load": {"loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
                 "seconds": time.perf_counter() - start},
        "matmul_limit": {"dtype": limit["dtype"], "n": limit["n"], "tflops": limit["flops_per_s"] / 1e12},
        "skipped": [{"name": n, "why": why} for n, why in size.skipped],
        "results": results,
    }


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def write_results(doc: dict, out_dir: str | Path = RESULTS_DIR) -> Path:
    from uniir_lite.io import write_json_atomic

    path = Path(out_dir) / f"{doc['device']}.json"
    write_json_atomic(path, doc)
    return path


def planned_results(size: str = "full") -> list[tuple[str, str]]:
    """(name prefix, unit) of the results a run of `size` writes, for "not yet measured" rows."""
    spec = SIZES[size]
    rows = [(f"embed {what} {c.arch} {c.image_size}px", unit) for c in spec.embed
            for what, unit in (("images", "images/s"), ("texts", "texts/s"))]
    t = spec.train
    rows += [(f"train CLIP_SF {t.arch} batch {b}", "samples/s") for b in t.batches]
    if t.find_max_batch:
        rows.append((f"train CLIP_SF {t.arch} largest kit batch", "samples/s"))
    q = spec.search
    rows.append((f"search {q.n_queries}x{q.n_candidates}x{q.dim} top-{q.k}", "s"))
    return rows


def load_results(results_dir: str | Path) -> list[dict]:
    """Every results file of `results_dir`, sorted by device (CPU files first)."""
    docs = [json.loads(p.read_text()) for p in sorted(Path(results_dir).glob("*.json"))]
    return sorted(docs, key=lambda d: (not d["device"].startswith("cpu"), d["device"]))


def check_results(doc: dict) -> None:
    """Raise ValueError if `doc` does not have the results-file schema."""
    for key in ("device", "date", "versions", "results"):
        if key not in doc:
            raise ValueError(f"results file lacks {key!r}")
    for r in doc["results"]:
        missing = [k for k in SCHEMA_KEYS if k not in r]
        if missing:
            raise ValueError(f"result {r.get('name')!r} lacks {missing}")
        if r["better"] not in ("higher", "lower"):
            raise ValueError(f"result {r['name']!r}: better must be 'higher' or 'lower'")


__all__ = ["SIZES", "BenchSize", "EmbedCase", "SearchCase", "TrainCase", "bench_embedding", "bench_search",
           "bench_training", "check_results", "device_slug", "explain_misses", "load_results", "matmul_rate", "planned_results",
           "run_all", "write_results"]
