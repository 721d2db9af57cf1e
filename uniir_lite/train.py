"""One trainer for every notebook (and, later, the command line).

A model enters as `loss_fn(model, batch) -> {"loss": tensor, ...}`: the trainer does the rest
(AdamW with UniIR's no-decay groups, cosine schedule, bf16 autocast on GPU, gradient clipping, a
progress bar, a metrics log, periodic safetensors checkpoints). The loop itself is written out in notebook 01; from notebook 02 on the
notebooks call `fit`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable, Iterator

import pandas as pd
import torch
from tqdm.auto import tqdm

from uniir_lite.checkpoints import save_checkpoint

LossFn = Callable[[torch.nn.Module, Any], dict[str, torch.Tensor]]


@dataclasses.dataclass
class TrainConfig:
    max_steps: int
    lr: float = 1e-3
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)  # CLIP's and UniIR's
    eps: float = 1e-6
    warmup_steps: int = 0
    precision: str = "fp32"  # "bf16": autocast on CUDA (ignored on CPU)
    grad_clip: float | None = 1.0
    fused: bool = True  # fused AdamW: one kernel for every parameter instead of a loop of small ones
    log_every: int = 10
    progress: bool = True
    checkpoint_dir: str | None = None  # saved there every `checkpoint_every` steps and at the end
    checkpoint_every: int = 0
    model_config: dict[str, Any] = dataclasses.field(default_factory=dict)  # stored beside the weights


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """UniIR's rule: no weight decay on gains, biases and the temperature."""
    return param.ndim < 2 or "bias" in name or "norm" in name or "ln" in name or "logit_scale" in name or "temp" in name


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (rest if no_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def cosine_schedule(step: int, max_steps: int, warmup_steps: int = 0) -> float:
    """Multiplier of the learning rate: linear warm-up, then cosine to zero (UniIR: no warm-up)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor of a (nested) batch to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _forever(batches: Iterable) -> Iterator:
    """Iterate again when exhausted (a DataLoader reshuffles on each pass: one pass = one epoch)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("the training data yielded no batch")


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (dict values in any order)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 0
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        n = _batch_size(value)
        if n:
            return n
    return 0


def fit(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: Iterable,
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Train for `cfg.max_steps` steps; returns the log (step, lr, loss and whatever `loss_fn` adds,
    averaged over each `log_every` window, plus samples/s). Samples/s counts `batch_size` samples a
    step when given, else the first dimension of the batch's first tensor."""
    device = torch.device(device)
    model.to(device).train()
    # fused: one kernel over all parameters (CPU and CUDA); its rounding differs slightly from the loop
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  fused=cfg.fused and device.type in ("cpu", "cuda"))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_schedule(step, cfg.max_steps, cfg.warmup_steps)
    )
    autocast = cfg.precision == "bf16" and device.type == "cuda"
    history, window, samples, t0 = [], {}, 0, time.perf_counter()
    data = _forever(batches)
    bar = tqdm(range(cfg.max_steps), disable=not cfg.progress, desc="train", leave=False)
    for step in bar:
        batch = to_device(next(data), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = loss_fn(model, batch)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss.item()}; lower the learning rate")
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        samples += batch_size if batch_size is not None else _batch_size(batch)
        for name, value in out.items():
            window.setdefault(name, []).append(float(value.detach() if isinstance(value, torch.Tensor) else value))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            elapsed = time.perf_counter() - t0
            row = {"step": step + 1, "lr": schedule.get_last_lr()[0]}
            row.update({name: sum(v) / len(v) for name, v in window.items()})
            row["samples_per_s"] = samples / elapsed if elapsed > 0 else float("nan")
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            window, samples, t0 = {}, 0, time.perf_counter()
        last = step + 1 == cfg.max_steps
        if cfg.checkpoint_dir and (last or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)):
            save_checkpoint(cfg.checkpoint_dir, model, {**cfg.model_config, "step": step + 1})
    model.eval()
    return pd.DataFrame(history)
