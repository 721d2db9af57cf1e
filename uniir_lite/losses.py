"""UniIR's training losses: the in-batch contrastive loss (CLIP models) and BLIP's momentum-queue loss.

Taught in notebook 05 (in-batch; the gather across GPUs is tested on CPU ranks). Both take L2-normalised query and candidate
embeddings from a `uniir_lite.fusion.UniIRModel`.

- `inbatch_contrastive_loss`: one-directional (query -> candidate) InfoNCE. Candidates are gathered
  from every rank WITH gradients when torch.distributed is initialised, so each query sees the
  candidates of the global batch as negatives; its positive is column `rank * bs + i`. Optional
  hard negatives are extra candidate columns shared by all queries.
- `MomentumQueueLoss`: ALBEF/BLIP's image-text contrastive loss as UniIR's BLIP_SF / BLIP_FF use it:
  a momentum copy of the model, queues of past momentum query and candidate features with the ids
  of their positives (every queue entry with the same positive id is a positive too), soft targets
  mixing the momentum model's similarities (distillation weight `alpha`), a symmetric loss and a
  temperature clamped to [0.001, 0.5].
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from uniir_lite.data.mbeir import hash_did


def distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[world * n, ...]: `x` of every rank, in rank order; gradients flow back to each rank's `x`
    (UniIR's `torch.distributed.nn.all_gather`). The identity outside a process group."""
    if not distributed():
        return x
    from torch.distributed.nn import all_gather

    return torch.cat(all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """[world * n, ...] without gradients (for the queues)."""
    if not distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def inbatch_contrastive_loss(
    q_emb: torch.Tensor,
    c_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    neg_emb: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """UniIR's `compute_inbatch_contrastive_loss`, with optional hard negatives.

    q_emb [bs, d], c_emb [bs, d] (row i is query i's positive), neg_emb [n_neg, d] or None; all are
    L2-normalised here. Returns {"loss", "accuracy"} (accuracy: the positive scores highest).

        score = logit_scale * q @ [c_all ; neg_all]^T,   target_i = rank * bs + i
    """
    rank, _ = rank_and_world()
    q_emb = F.normalize(q_emb, dim=-1)  # [bs, d]
    all_c = gather_with_grad(F.normalize(c_emb, dim=-1))  # [world * bs, d]
    if neg_emb is not None and neg_emb.shape[0] > 0:
        all_c = torch.cat([all_c, gather_with_grad(F.normalize(neg_emb, dim=-1))])  # [world * (bs + n_neg), d]
    logits = logit_scale * q_emb @ all_c.T  # [bs, world * bs (+ negatives)]
    targets = rank * q_emb.shape[0] + torch.arange(q_emb.shape[0], device=q_emb.device)  # [bs]
    loss = F.cross_entropy(logits, targets)
    accuracy = (logits.detach().argmax(dim=1) == targets).float().mean()
    return {"loss": loss, "accuracy": accuracy}


def did_ids(dids: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
    """UniIR's integer ids of candidates (`hash_did`), [n]: what the queue stores."""
    return torch.tensor([hash_did(d) for d in dids], dtype=torch.long, device=device)


class MomentumQueueLoss(nn.Module):
    """BLIP_SF / BLIP_FF's `compute_contrastive_loss` as a loss function for `train.fit`.

    Holds a frozen momentum copy of `model` (updated as `m = momentum * m + (1 - momentum) * p`
    before each step) and three queues: momentum query features, momentum candidate features
    [queue_size, d] and the ids of the positives [queue_size] (-100: empty slot, never a positive).
    `queue_size` must be a multiple of the global batch, as UniIR asserts. `alpha` is the
    distillation weight, ramped linearly from 0 over `alpha_ramp_steps` (UniIR: over epoch 0).
    Call it as `loss_fn(model, batch)`; `batch` is an `MBEIRCollator` training batch.
    """

    def __init__(self, model: nn.Module, queue_size: int, momentum: float = 0.995, alpha: float = 0.4,
                 alpha_ramp_steps: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.model_m = copy.deepcopy(model)
        for param in self.model_m.parameters():
            param.requires_grad_(False)
        self.queue_size, self.momentum, self.alpha, self.alpha_ramp_steps = queue_size, momentum, alpha, alpha_ramp_steps
        d = model.embed_dim
        g = torch.Generator().manual_seed(seed)
        # UniIR starts the queues with random unit vectors
        self.register_buffer("query_queue", F.normalize(torch.randn(queue_size, d, generator=g), dim=-1))
        self.register_buffer("cand_queue", F.normalize(torch.randn(queue_size, d, generator=g), dim=-1))
        self.register_buffer("idx_queue", torch.full((queue_size,), -100, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self, model: nn.Module) -> None:
        for param, param_m in zip(model.parameters(), self.model_m.parameters(), strict=True):
            param_m.mul_(self.momentum).add_(param.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, q_feat_m: torch.Tensor, c_feat_m: torch.Tensor, idx: torch.Tensor) -> None:
        q_feat_m, c_feat_m, idx = gather_no_grad(q_feat_m), gather_no_grad(c_feat_m), gather_no_grad(idx)
        n, ptr = q_feat_m.shape[0], int(self.ptr)
        if self.queue_size % n:
            raise ValueError(f"queue_size {self.queue_size} must be a multiple of the global batch {n}")
        self.query_queue[ptr:ptr + n] = q_feat_m
        self.cand_queue[ptr:ptr + n] = c_feat_m
        self.idx_queue[ptr:ptr + n] = idx
        self.ptr.fill_((ptr + n) % self.queue_size)

    def current_alpha(self) -> float:
        if self.alpha_ramp_steps <= 0:
            return self.alpha
        return self.alpha * min(1.0, (int(self.step) + 1) / self.alpha_ramp_steps)

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            model.temp.clamp_(0.001, 0.5)
        temp = model.temp
        alpha = self.current_alpha()
        q_side, c_side, n_side = batch["query"], batch["pos"], batch.get("neg")
        q_feat = F.normalize(model.encode_query(q_side), dim=-1)  # [bs, d]
        c_feat = F.normalize(model.encode_candidate(c_side), dim=-1)  # [bs, d]
        idx = did_ids(c_side["ids"], q_feat.device)  # [bs]

        neg_idx = did_ids(n_side["ids"], q_feat.device) if n_side is not None else idx[:0]  # [n_neg]
        # candidate columns: this batch's positives, its hard negatives, then the queue
        idx_all = torch.cat([idx, neg_idx, self.idx_queue])  # [bs + n_neg + queue]
        pos_mask = (idx[:, None] == idx_all[None, :]).float()  # [bs, bs + n_neg + queue]
        sim_targets = pos_mask / pos_mask.sum(dim=1, keepdim=True)
        q_idx_all = torch.cat([idx, self.idx_queue])  # queries are identified by their positive
        q_pos_mask = (idx[:, None] == q_idx_all[None, :]).float()  # [bs, bs + queue]
        q_sim_targets = q_pos_mask / q_pos_mask.sum(dim=1, keepdim=True)

        with torch.no_grad():
            self.momentum_update(model)
            q_feat_m = F.normalize(self.model_m.encode_query(q_side), dim=-1)  # [bs, d]
            c_feat_m = F.normalize(self.model_m.encode_candidate(c_side), dim=-1)  # [bs, d]
            parts = [c_feat_m]
            if n_side is not None:
                parts.append(F.normalize(self.model_m.encode_candidate(n_side), dim=-1))  # [n_neg, d]
            c_feat_m_all = torch.cat(parts + [self.cand_queue.clone()])  # [bs + n_neg + queue, d]
            q_feat_m_all = torch.cat([q_feat_m, self.query_queue.clone()])  # [bs + queue, d]
            sim_q2c_m = q_feat_m @ c_feat_m_all.T / temp
            sim_c2q_m = c_feat_m @ q_feat_m_all.T / temp
            q2c_targets = alpha * F.softmax(sim_q2c_m, dim=1) + (1 - alpha) * sim_targets
            c2q_targets = alpha * F.softmax(sim_c2q_m, dim=1) + (1 - alpha) * q_sim_targets

        sim_q2c = q_feat @ c_feat_m_all.T / temp  # [bs, bs + n_neg + queue]
        sim_c2q = c_feat @ q_feat_m_all.T / temp  # [bs, bs + queue]
        loss_q2c = -(F.log_softmax(sim_q2c, dim=1) * q2c_targets).sum(dim=1).mean()
        loss_c2q = -(F.log_softmax(sim_c2q, dim=1) * c2q_targets).sum(dim=1).mean()
        loss = (loss_q2c + loss_c2q) / 2

        self.enqueue(q_feat_m, c_feat_m, idx)
        self.step += 1
        accuracy = pos_mask.gather(1, sim_q2c.detach().argmax(dim=1, keepdim=True)).mean()
        return {"loss": loss, "accuracy": accuracy, "temperature": temp.detach(), "alpha": torch.tensor(alpha)}


__all__ = ["MomentumQueueLoss", "did_ids", "distributed", "gather_no_grad", "gather_with_grad",
           "inbatch_contrastive_loss", "rank_and_world"]
