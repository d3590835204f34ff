"""A converted model trained under ``torch.autocast``, against reference_mode().

Contract (README, "Mixed precision"): F and G run in the autocast dtype, but the
trunk -- the coupling halves x1, x2, y1, y2 -- stays float32, because the
coupling adds promote ``x1 + F(x2)`` to float32. The reconstruction
``x2 = y2 - G(y1)`` is then exact up to float32 rounding (2**-24 relative),
and the recomputed ``G(y1)``, ``F(x2)`` cast their inputs to the autocast dtype,
which gives the very same low-precision values except for an input that lies
within float32 rounding of a low-precision rounding boundary (about one element
in 2**16 for bfloat16), where one element moves by one bfloat16 ulp (2**-8).

Tolerance: every parameter gradient within 1e-2 of the largest entry of its
reference gradient (a few one-ulp bfloat16 flips, not a systematic error) and
cosine similarity >= 0.9999 per tensor. A trunk kept in bfloat16 instead
reconstructs with bfloat16 rounding and misses this by an order of magnitude
(about 15% on the worst tensor of a CIFAR ResNet-20).
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import cifar_resnet
from torch import nn

import revcompile
from revcompile.runtime import ReversibleSequence

TOLERANCE = 1e-2
MIN_COSINE = 0.9999


def _step(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, *, reference: bool):
    """One autocast training step on a copy of ``model``: output, grads, buffers,
    and the dtypes of every reversible stage's output (the trunk)."""
    model = copy.deepcopy(model)
    trunk: list[torch.dtype] = []
    for module in model.modules():
        if isinstance(module, ReversibleSequence):
            module.register_forward_hook(lambda _m, _i, out: trunk.append(out.dtype))
    weights = torch.randn(2, 10, generator=torch.Generator().manual_seed(1)).to(x.device)
    with torch.autocast(x.device.type, dtype=dtype):
        if reference:
            with revcompile.reference_mode():
                out = model(x)
        else:
            out = model(x)
        loss = (out.float() * weights).sum()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    return out, grads, [b.clone() for b in model.buffers()], trunk


def _check(device: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, device=device)
    gm = revcompile.convert(cifar_resnet(20), x.cpu()).to(device)
    out, grads, buffers, trunk = _step(gm, x, dtype, reference=False)
    ref_out, ref_grads, ref_buffers, _ = _step(gm, x, dtype, reference=True)

    assert out.dtype == dtype  # the head's Linear runs in the autocast dtype
    assert torch.equal(out, ref_out)
    assert len(trunk) == 3 and set(trunk) == {torch.float32}, trunk
    for b, ref in zip(buffers, ref_buffers):
        assert torch.equal(b, ref)  # BatchNorm statistics updated once, identically
    for g, ref in zip(grads, ref_grads):
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        err = (g - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
        cosine = nn.functional.cosine_similarity(g.flatten(), ref.flatten(), dim=0).item()
        assert err <= TOLERANCE and cosine >= MIN_COSINE, (err, cosine)


def test_bfloat16_cpu_matches_reference_mode() -> None:
    _check("cpu", torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 autocast needs CUDA")
def test_float16_cuda_matches_reference_mode() -> None:
    _check("cuda", torch.float16)
