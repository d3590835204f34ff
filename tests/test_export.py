"""Deployment and ``torch.func`` on a converted model (issue 16).

``gm.eval()`` must export with ``torch.jit.trace``, ``torch.onnx.export``
(legacy and dynamo) and ``torch.export``, computing ``gm.eval()``'s outputs;
``torch.func.vmap`` must map it in eval mode; ``torch.func.functional_call``
must give gradients to the tensors passed in, computed with those tensors
(DESIGN.md §9: "the backward uses the tensors the forward used").

Several of these need the runtime patches in RUNTIME_PATCHES.md; see there
for which test shows which patch.
"""

from __future__ import annotations

import io

import pytest
import torch
import torchvision
from models import cifar_resnet

import revcompile
from revcompile.runtime import ReversibleSequence


def _eval_model(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    gm = revcompile.convert(torchvision.models.resnet18(num_classes=10).to(dtype), x)
    assert any(isinstance(m, ReversibleSequence) for m in gm.modules())
    return gm.eval(), x


def test_torch_jit_trace() -> None:
    gm, x = _eval_model()
    traced = torch.jit.trace(gm, (x,))
    with torch.no_grad():
        assert torch.equal(traced(x), gm(x))


def test_torch_export() -> None:
    gm, x = _eval_model()
    exported = torch.export.export(gm, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), gm(x), rtol=0, atol=0)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_torch_onnx_export_runs_in_onnxruntime(dynamo: bool) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    gm, x = _eval_model()
    buffer = io.BytesIO()
    if dynamo:
        program = torch.onnx.export(gm, (x,), dynamo=True)
        buffer.write(program.model_proto.SerializeToString())
    else:
        torch.onnx.export(gm, (x,), buffer, dynamo=False)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = gm(x)
    # onnxruntime's float32 kernels round differently from torch's.
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


def test_vmap_in_eval_mode() -> None:
    gm, x = _eval_model(torch.float64)
    xs = torch.stack([x, 2 * x, -x])
    got = torch.func.vmap(gm)(xs)
    with torch.no_grad():
        want = torch.stack([gm(xi) for xi in xs])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("policy", ["checkpoint", "store"])
def test_functional_call_gradients_go_to_the_passed_tensors(policy: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    gm = revcompile.convert(cifar_resnet(20).double(), x, policy=policy)
    # Tensors that differ from the module's own: a backward that looked the
    # parameters up on the module again would recompute with the wrong values.
    generator = torch.Generator().manual_seed(1)
    tensors = {
        name: (p.detach() + 0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        for name, p in gm.named_parameters()
    }
    buffers = {name: b.clone() for name, b in gm.named_buffers()}

    def grads(reference: bool) -> dict[str, torch.Tensor]:
        leaves = {name: t.clone().requires_grad_() for name, t in tensors.items()}
        state = {**leaves, **{name: b.clone() for name, b in buffers.items()}}
        if reference:
            with revcompile.reference_mode():
                out = torch.func.functional_call(gm, state, (x,))
        else:
            out = torch.func.functional_call(gm, state, (x,))
        names = list(leaves)
        found = torch.autograd.grad(out.square().sum(), [leaves[n] for n in names])
        return dict(zip(names, found))

    want, got = grads(reference=True), grads(reference=False)
    assert all(p.grad is None for p in gm.parameters())
    scale = max(w.abs().max().item() for w in want.values())
    for name, w in want.items():
        err = (got[name] - w).abs().max().item() / max(w.abs().max().item(), 1e-3 * scale)
        assert err <= 1e-10, f"{name}: relative gradient error {err:.2e}"
