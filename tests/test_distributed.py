"""A converted model under DistributedDataParallel (2 processes, gloo, CPU).

The reversible stages pass their parameters to their autograd Function as
inputs, so DDP's per-parameter gradient hooks fire when the Function's backward
returns the gradients: DDP works with ``find_unused_parameters=False`` and
without ``static_graph``. After one training step the all-reduced (averaged)
gradients must equal the mean over the shards of the gradients of the same
network in ``reference_mode()`` (plain autograd), to 1e-10 relative in float64.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models import cifar_resnet
from torch.nn.parallel import DistributedDataParallel

import revcompile
from revcompile.runtime import ReversibleSequence

WORLD = 2
SHARD = 2  # samples per process


def _loss_weights(shape: torch.Size) -> torch.Tensor:
    """A fixed weighting of the outputs, so every logit gets a different gradient."""
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _worker(rank: int, workdir: str) -> None:
    """One DDP process: load the converted model, one step on its shard, save the grads."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=WORLD
    )
    try:
        model = revcompile.load(Path(workdir) / "model.pt")
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        x = torch.load(Path(workdir) / "data.pt")[rank * SHARD : (rank + 1) * SHARD]
        out = ddp(x)
        (out * _loss_weights(out.shape)).sum().backward()
        grads = [p.grad for p in model.parameters()]
        torch.save(grads, Path(workdir) / f"grads{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_match_reference_mean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    x = torch.randn(WORLD * SHARD, 3, 32, 32, dtype=torch.float64)
    gm = revcompile.convert(cifar_resnet(20).double(), x[:SHARD])
    assert sum(isinstance(m, ReversibleSequence) for m in gm.modules()) == 3
    revcompile.save(gm, tmp_path / "model.pt")
    torch.save(x, tmp_path / "data.pt")

    expected = None
    for rank in range(WORLD):
        reference = copy.deepcopy(gm)
        with revcompile.reference_mode():
            out = reference(x[rank * SHARD : (rank + 1) * SHARD])
        (out * _loss_weights(out.shape)).sum().backward()
        grads = [p.grad / WORLD for p in reference.parameters()]
        expected = grads if expected is None else [e + g for e, g in zip(expected, grads)]

    # The spawned processes inherit the environment: keep gloo on 127.0.0.1.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)

    per_rank = [torch.load(tmp_path / f"grads{rank}.pt") for rank in range(WORLD)]
    assert len(per_rank[0]) == len(expected)
    scale = max(e.abs().max().item() for e in expected)
    for got0, got1, want in zip(*per_rank, expected):
        assert torch.equal(got0, got1)  # all-reduced: identical on every rank
        # Relative to the largest gradient entry: gradients that are zero in exact
        # arithmetic (biases before BatchNorm) are rounding noise on both sides.
        err = (got0 - want).abs().max().item() / max(want.abs().max().item(), 1e-3 * scale)
        assert err <= 1e-10, f"relative gradient error {err:.2e}"
