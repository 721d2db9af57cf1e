"""The UniIR losses: in-batch contrastive (by hand, with hard negatives, across 2 gloo ranks) and the
momentum-queue loss of the BLIP models."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from uniir_lite.losses import MomentumQueueLoss, did_ids, inbatch_contrastive_loss


def test_inbatch_loss_matches_a_hand_computed_example():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalised inside: [1,0], [0,1]
    c = torch.tensor([[3.0, 0.0], [1.0, 1.0]])  # [1,0], [1,1]/sqrt2
    s = 1 / math.sqrt(2)
    # logits = 10 * q @ c^T = [[10, 10 s], [0, 10 s]]; targets 0, 1
    loss_0 = -math.log(math.exp(10) / (math.exp(10) + math.exp(10 * s)))
    loss_1 = -math.log(math.exp(10 * s) / (math.exp(0) + math.exp(10 * s)))
    out = inbatch_contrastive_loss(q, c, 10.0)
    assert out["loss"].item() == pytest.approx((loss_0 + loss_1) / 2, rel=1e-6)
    assert out["accuracy"].item() == 1.0


def test_inbatch_loss_is_one_directional_and_scaled():
    torch.manual_seed(0)
    q, c = torch.randn(6, 4), torch.randn(6, 4)
    expected = F.cross_entropy(3.0 * F.normalize(q, dim=-1) @ F.normalize(c, dim=-1).T, torch.arange(6))
    assert torch.allclose(inbatch_contrastive_loss(q, c, 3.0)["loss"], expected)
    # swapping queries and candidates changes it: no candidate -> query term
    assert not torch.allclose(inbatch_contrastive_loss(c, q, 3.0)["loss"], expected)


def test_hard_negatives_are_extra_columns():
    torch.manual_seed(1)
    q, c, neg = torch.randn(4, 8), torch.randn(4, 8), torch.randn(3, 8)
    logits = 5.0 * F.normalize(q, dim=-1) @ torch.cat([F.normalize(c, dim=-1), F.normalize(neg, dim=-1)]).T  # [4, 7]
    expected = F.cross_entropy(logits, torch.arange(4))
    out = inbatch_contrastive_loss(q, c, 5.0, neg)
    assert torch.allclose(out["loss"], expected)
    # a negative identical to a query's positive, scored as high, raises the loss
    harder = inbatch_contrastive_loss(q, c, 5.0, c[:1].clone())
    assert harder["loss"] > inbatch_contrastive_loss(q, c, 5.0)["loss"]


def test_logit_scale_gets_a_gradient():
    torch.manual_seed(2)
    scale = torch.tensor(2.0, requires_grad=True)
    inbatch_contrastive_loss(torch.randn(5, 4), torch.randn(5, 4), scale)["loss"].backward()
    assert scale.grad is not None and scale.grad.abs() > 0


# --- two gloo ranks vs one process on the concatenated batch ------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encoders(seed: int = 0) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(seed)
    return nn.Linear(6, 4), nn.Linear(6, 4)


def _data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        enc_q, enc_c = _encoders()
        xq, xc = _data()
        bs = xq.shape[0] // world
        rows = slice(rank * bs, (rank + 1) * bs)
        out = inbatch_contrastive_loss(enc_q(xq[rows]), enc_c(xc[rows]), 4.0)
        out["loss"].backward()
        # DDP averages gradients over ranks; the loss of the global batch is the mean of the ranks'
        loss = out["loss"].detach().clone()
        dist.all_reduce(loss)
        grads = []
        for p in [*enc_q.parameters(), *enc_c.parameters()]:
            dist.all_reduce(p.grad)
            grads.append(p.grad / world)
        torch.save({"loss": loss / world, "grads": grads, "accuracy": out["accuracy"]}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    enc_q, enc_c = _encoders()
    xq, xc = _data()
    single = inbatch_contrastive_loss(enc_q(xq), enc_c(xc), 4.0)["loss"]
    single.backward()
    expected = [p.grad for p in [*enc_q.parameters(), *enc_c.parameters()]]
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(got["loss"], single.detach(), atol=1e-6)
        for g, e in zip(got["grads"], expected, strict=True):
            assert torch.allclose(g, e, atol=1e-6)
    # and without the gather, the ranks would see only half the negatives: a different loss
    half = (inbatch_contrastive_loss(enc_q(xq[:4]), enc_c(xc[:4]), 4.0)["loss"]
            + inbatch_contrastive_loss(enc_q(xq[4:]), enc_c(xc[4:]), 4.0)["loss"]) / 2
    assert not torch.allclose(half, single)


# --- momentum queue ---------------------------------------------------------------------------

class _TinyDual(nn.Module):
    """A stand-in UniIR model: linear encoders over a 'txt' feature tensor, BLIP's temperature."""

    embed_dim = 4

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(6, 4)
        self.c = nn.Linear(6, 4)
        self.temp = nn.Parameter(torch.tensor(0.07))

    def encode_query(self, side):
        return F.normalize(self.q(side["txt"]), dim=-1)

    def encode_candidate(self, side):
        return F.normalize(self.c(side["txt"]), dim=-1)


def _batch(dids, seed):
    g = torch.Generator().manual_seed(seed)
    n = len(dids)
    return {"query": {"txt": torch.randn(n, 6, generator=g)},
            "pos": {"ids": list(dids), "txt": torch.randn(n, 6, generator=g)}, "neg": None}


def test_momentum_queue_first_step_without_distillation_is_in_batch_infonce():
    """With alpha = 0, all-different positives and a queue of only empty slots scored like random
    vectors, the q->c term is InfoNCE over batch + queue columns; we check it by hand."""
    model = _TinyDual()
    loss = MomentumQueueLoss(model, queue_size=8, momentum=0.5, alpha=0.0)
    batch = _batch(["1:1", "1:2", "1:3", "1:4"], seed=0)
    queue_c, queue_q = loss.cand_queue.clone(), loss.query_queue.clone()
    out = loss(model, batch)
    # on the first step the momentum copy equals the model
    q = model.encode_query(batch["query"])
    c = model.encode_candidate(batch["pos"])
    sim_q2c = q @ torch.cat([c, queue_c]).T / 0.07
    sim_c2q = c @ torch.cat([q, queue_q]).T / 0.07
    expected = (F.cross_entropy(sim_q2c, torch.arange(4)) + F.cross_entropy(sim_c2q, torch.arange(4))) / 2
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    # the batch went into the queue with its ids
    assert loss.idx_queue[:4].tolist() == did_ids(batch["pos"]["ids"]).tolist()
    assert int(loss.ptr) == 4


def test_momentum_queue_counts_queued_duplicates_as_positives_and_updates_the_copy():
    model = _TinyDual()
    loss = MomentumQueueLoss(model, queue_size=8, momentum=0.5, alpha=0.0)
    loss(model, _batch(["1:1", "1:2", "1:3", "1:4"], seed=0))
    with torch.no_grad():
        model.q.weight.add_(1.0)  # the model moves; the copy follows by half of the gap
    before = loss.model_m.q.weight.clone()
    queue_c, queue_q = loss.cand_queue.clone(), loss.query_queue.clone()
    batch = _batch(["1:1", "1:5", "1:6", "1:7"], seed=1)
    out = loss(model, batch)
    assert torch.allclose(loss.model_m.q.weight, 0.5 * before + 0.5 * model.q.weight)
    # query 0's positive "1:1" is column 0 of the batch AND queue slot 0: two targets of 1/2
    targets = torch.zeros(4, 12)
    targets[torch.arange(4), torch.arange(4)] = 1.0
    targets[0, 4] = 1.0
    targets = targets / targets.sum(1, keepdim=True)
    with torch.no_grad():
        q_m = loss.model_m.encode_query(batch["query"])
        c_m = loss.model_m.encode_candidate(batch["pos"])
    q, c = model.encode_query(batch["query"]), model.encode_candidate(batch["pos"])
    loss_q2c = -(F.log_softmax(q @ torch.cat([c_m, queue_c]).T / 0.07, 1) * targets).sum(1).mean()
    loss_c2q = -(F.log_softmax(c @ torch.cat([q_m, queue_q]).T / 0.07, 1) * targets).sum(1).mean()
    assert torch.allclose(out["loss"], (loss_q2c + loss_c2q) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the global batch"):
        MomentumQueueLoss(model, queue_size=6)(model, batch)


def test_momentum_queue_temperature_is_clamped_and_learned():
    model = _TinyDual()
    with torch.no_grad():
        model.temp.fill_(0.9)
    loss = MomentumQueueLoss(model, queue_size=8)
    out = loss(model, _batch(["1:1", "1:2", "1:3", "1:4"], seed=0))
    assert model.temp.item() == pytest.approx(0.5)
    out["loss"].backward()
    assert model.temp.grad is not None and model.q.weight.grad is not None
    assert all(p.grad is None for p in loss.model_m.parameters())
