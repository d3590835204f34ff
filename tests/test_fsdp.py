"""A converted model under FSDP2 (``fully_shard``), 2 processes, gloo, CPU.

Recommended wrapping: ``fully_shard`` on each ``ReversibleSequence`` and then
on the root. A stage's parameters are inputs of its autograd Function, so the
Function sees the unsharded parameters FSDP2 gathered for the forward; with
``reshard_after_forward=True`` FSDP2 gathers them again before the stage's
backward (its pre-backward hook on the stage output), where the reversible
backward recomputes F and G with them. After one step the reduce-scattered
gradients, gathered back to full tensors, must equal the mean over the shards
of the ``reference_mode()`` gradients, to 1e-10 relative in float64.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models import cifar_resnet
from test_distributed import SHARD, WORLD, _loss_weights

import revcompile
from revcompile.runtime import ReversibleSequence

fsdp = pytest.importorskip("torch.distributed.fsdp")


def spawn_gloo(worker: Callable[..., None], workdir: Path, *args: object) -> None:
    """Run ``worker(rank, workdir, *args)`` in ``WORLD`` processes joined in a gloo group.

    The group is initialised through a file store in ``workdir`` and
    destroyed when ``worker`` returns or raises.
    """
    mp.spawn(_in_group, args=(worker, str(workdir), args), nprocs=WORLD, join=True)


def _in_group(rank: int, worker: Callable[..., None], workdir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=WORLD
    )
    try:
        worker(rank, Path(workdir), *args)
    finally:
        dist.destroy_process_group()


def _fsdp_worker(rank: int, workdir: Path, reshard_after_forward: bool) -> None:
    """Shard every stage and the root, one step on this rank's shard, save full grads."""
    model = revcompile.load(workdir / "model.pt")
    for stage in [m for m in model.modules() if isinstance(m, ReversibleSequence)]:
        fsdp.fully_shard(stage, reshard_after_forward=reshard_after_forward)
    fsdp.fully_shard(model, reshard_after_forward=reshard_after_forward)
    x = torch.load(workdir / "data.pt")[rank * SHARD : (rank + 1) * SHARD]
    out = model(x)
    (out * _loss_weights(out.shape)).sum().backward()
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    torch.save(grads, workdir / f"grads{rank}.pt")


@pytest.mark.parametrize("reshard_after_forward", [True, False])
def test_fsdp2_gradients_match_reference_mean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reshard_after_forward: bool
) -> None:
    torch.manual_seed(0)
    x = torch.randn(WORLD * SHARD, 3, 32, 32, dtype=torch.float64)
    gm = revcompile.convert(cifar_resnet(20).double(), x[:SHARD])
    assert sum(isinstance(m, ReversibleSequence) for m in gm.modules()) == 3
    revcompile.save(gm, tmp_path / "model.pt")
    torch.save(x, tmp_path / "data.pt")

    expected: dict[str, torch.Tensor] = {}
    for rank in range(WORLD):
        reference = copy.deepcopy(gm)
        with revcompile.reference_mode():
            out = reference(x[rank * SHARD : (rank + 1) * SHARD])
        (out * _loss_weights(out.shape)).sum().backward()
        for name, p in reference.named_parameters():
            expected[name] = expected.get(name, 0) + p.grad / WORLD

    # The spawned processes inherit the environment: keep gloo on 127.0.0.1.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    spawn_gloo(_fsdp_worker, tmp_path, reshard_after_forward)

    per_rank = [torch.load(tmp_path / f"grads{rank}.pt") for rank in range(WORLD)]
    assert sorted(per_rank[0]) == sorted(expected)
    scale = max(e.abs().max().item() for e in expected.values())
    for name, want in expected.items():
        got = per_rank[0][name]
        assert torch.equal(got, per_rank[1][name]), name  # reduced: identical on every rank
        # Relative to the largest gradient entry: gradients that are zero in exact
        # arithmetic (biases before BatchNorm) are rounding noise on both sides.
        err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-3 * scale)
        assert err <= 1e-10, f"{name}: relative gradient error {err:.2e}"
