"""An exact-mode converted model under DistributedDataParallel (2 processes, gloo, CPU).

``convert(..., exact=True)`` makes the reversible backward reconstruct every
stage input bit for bit (DESIGN.md §10), so under DDP the gradients are not
merely close to ``reference_mode()``'s: in float32, each rank's local gradients
(captured by a communication hook before the all-reduce) are ``torch.equal`` to
the gradients of the same network in ``reference_mode()`` on that rank's
shard, and the all-reduced gradients are ``torch.equal`` to their mean.
"""

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models import cifar_resnet
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import revcompile
from revcompile.runtime import ReversibleSequence

WORLD = 2
SHARD = 2  # samples per process


def _loss(out: torch.Tensor) -> torch.Tensor:
    """A fixed weighting of the outputs, so every logit gets a different gradient."""
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    return (out * weights).sum()


def _shard(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x[rank * SHARD : (rank + 1) * SHARD]


def _capture_local_grads(model: nn.Module, local: dict[int, torch.Tensor]):
    """A DDP comm hook: record each parameter's local gradient, then all-reduce (mean)."""
    index = {id(p): i for i, p in enumerate(model.parameters())}

    # No postponed annotations in this module: DDP checks the hook's annotations at runtime.
    def hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True):
            local[index[id(p)]] = g.clone()
        return default_hooks.allreduce_hook(state, bucket)

    return hook


def _worker(rank: int, workdir: str) -> None:
    """One DDP process: load the converted model, one step on its shard, save the grads."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=WORLD
    )
    try:
        model = revcompile.load(Path(workdir) / "model.pt")
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        local: dict[int, torch.Tensor] = {}
        ddp.register_comm_hook(None, _capture_local_grads(model, local))
        _loss(ddp(_shard(torch.load(Path(workdir) / "data.pt"), rank))).backward()
        reduced = [p.grad for p in model.parameters()]
        torch.save((reduced, [local[i] for i in range(len(reduced))]), Path(workdir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_exact_ddp_gradients_equal_reference_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    x = torch.randn(WORLD * SHARD, 3, 32, 32)
    gm = revcompile.convert(cifar_resnet(44), x[:SHARD], exact=True)
    stages = [m for m in gm.modules() if isinstance(m, ReversibleSequence)]
    assert len(stages) == 3 and all(stage.exact for stage in stages)
    revcompile.save(gm, tmp_path / "model.pt")
    torch.save(x, tmp_path / "data.pt")

    # The workers run single-threaded, and a conv weight gradient's float32 sum depends on
    # the thread count: the references run with the same thread count.
    references = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for rank in range(WORLD):
            reference = copy.deepcopy(gm)
            with revcompile.reference_mode():
                _loss(reference(_shard(x, rank))).backward()
            references.append([p.grad for p in reference.parameters()])
    finally:
        torch.set_num_threads(threads)
    # DDP's mean: each rank's gradient divided by the world size, then summed (both exact
    # in this order for two ranks: halving is exact, and a + b == b + a).
    mean = [a / WORLD + b / WORLD for a, b in zip(*references, strict=True)]

    # The spawned processes inherit the environment: keep gloo on 127.0.0.1.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)

    for rank in range(WORLD):
        reduced, local = torch.load(tmp_path / f"{rank}.pt")
        assert len(local) == len(references[rank])
        for i, (got, want) in enumerate(zip(local, references[rank], strict=True)):
            assert torch.equal(got, want), f"rank {rank}, parameter {i}: local gradient differs"
        for i, (got, want) in enumerate(zip(reduced, mean, strict=True)):
            assert torch.equal(got, want), f"rank {rank}, parameter {i}: reduced gradient differs"
