"""Reductions, channel-less values and functional GroupNorm in halved branches (issue 14).

Hand-written branches in the shape timm writes them (squeeze-excitation with
``mean``, ConvNeXt-V2's GlobalResponseNorm, GroupNorm1 through ``F.group_norm``)
must become couplings under the default ``split="halve"`` and pass the float64
check against ``reference_mode()``; where halving changes what an op computes
(a reduction over the channel axis at the branch boundary sees the kept half)
the halved branch is checked against that formula. Uses of a reduction that
slicing would break (broadcasts that depend on the channel count) are refused.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from equivalence import compare_with_reference
from revcompile.passes.find_residuals import find_residuals
from revcompile.passes.partition import build_branch, partition_branch
from revcompile.passes.shape_prop import propagate_shapes
from revcompile.passes.trace import trace
from torch import nn

import revcompile

C = 8
HAS_TIMM = importlib.util.find_spec("timm") is not None
needs_timm = pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed (pip install timm)")


def randomize(model: nn.Module) -> nn.Module:
    """Random norm and GRN parameters and statistics, so that a wrong slice shows
    (GRN starts at zero, which would hide it)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d | GRN):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    tensor = getattr(mod, name, None)
                    if tensor is None:
                        continue
                    tensor.copy_(torch.rand(tensor.shape, generator=gen, dtype=tensor.dtype) + 0.5)
            if isinstance(mod, GroupNormMlp):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen))
    return model


# --------------------------------------------------------------------------- branches


class SqueezeExcite(nn.Module):
    """timm's ``SqueezeExcite`` (EfficientNet, MobileNetV3) and ``SEModule``:
    ``x.mean((2, 3), keepdim=True)``, two 1x1 convs, a sigmoid gate."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(width, width // 4, 1)
        self.conv_expand = nn.Conv2d(width // 4, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv_expand(F.relu(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * s.sigmoid()


class LinearSqueezeExcite(nn.Module):
    """SE with ``keepdim=False``: ``(N, C)`` through Linear layers, unsqueezed back."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width // 4), nn.Linear(width // 4, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(torch.mean(x, dim=[2, 3])))))
        return x * s.unsqueeze(-1).unsqueeze(-1)


class EcaModule(nn.Module):
    """timm's ``EcaModule`` (layers/eca.py): the channel means as a sequence
    ``(N, 1, C)`` through a one-channel Conv1d, a gate viewed back to ``(N, C, 1, 1)``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean((2, 3)).view(x.shape[0], 1, -1)
        y = torch.sigmoid(self.conv(y)).view(x.shape[0], -1, 1, 1)
        return x * y.expand_as(x)


class Bottleneck(nn.Module):
    """1x1 C -> 2C -> C with an SE on the inner width or on the output (SE-ResNeXt)."""

    def __init__(self, se: type[nn.Module], where: str) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(C, 2 * C, 1), nn.BatchNorm2d(2 * C)
        self.conv2, self.bn2 = nn.Conv2d(2 * C, C, 3, padding=1), nn.BatchNorm2d(C)
        self.se_inner = se(2 * C) if where == "inner" else nn.Identity()
        self.se_out = se(C) if where == "out" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.se_inner(F.relu(self.bn1(self.conv1(x))))
        return x + self.se_out(self.bn2(self.conv2(h)))


class GRN(nn.Module):
    """ConvNeXt-V2's GlobalResponseNorm as timm writes it (layers/grn.py)."""

    def __init__(self, dim: int, channels_last: bool) -> None:
        super().__init__()
        self.spatial_dim, self.channel_dim = ((1, 2), -1) if channels_last else ((2, 3), 1)
        self.wb_shape = (1, 1, 1, -1) if channels_last else (1, -1, 1, 1)
        self.weight, self.bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_g = x.norm(p=2, dim=self.spatial_dim, keepdim=True)
        x_n = x_g / (x_g.mean(dim=self.channel_dim, keepdim=True) + 1e-6)
        w, b = self.weight.view(self.wb_shape), self.bias.view(self.wb_shape)
        return x + torch.addcmul(b, w, x * x_n)


class ConvNeXtV2Block(nn.Module):
    """Depthwise conv, norm, MLP with GRN on the expanded width: NCHW (1x1 convs) or
    channels-last (permute, LayerNorm, Linear), as timm's ``convnextv2_*``."""

    def __init__(self, channels_last: bool) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.dw = nn.Conv2d(C, C, 7, padding=3, groups=C)
        if channels_last:
            self.norm, self.fc1, self.fc2 = (
                nn.LayerNorm(C),
                nn.Linear(C, 4 * C),
                nn.Linear(4 * C, C),
            )
        else:
            self.norm = nn.BatchNorm2d(C)
            self.fc1, self.fc2 = nn.Conv2d(C, 4 * C, 1), nn.Conv2d(4 * C, C, 1)
        self.grn = GRN(4 * C, channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(x)
        if self.channels_last:
            h = h.permute(0, 2, 3, 1)
        h = self.fc2(self.grn(F.gelu(self.fc1(self.norm(h)))))
        if self.channels_last:
            h = h.permute(0, 3, 1, 2)
        return x + h


class GroupNormMlp(nn.Module):
    """PoolFormer's MLP block: ``F.group_norm`` pre-norm (timm's GroupNorm1 with
    ``groups=1``), 1x1 conv MLP, layer scale read as ``scale.view(C, 1, 1)``."""

    def __init__(self, groups: int, width: int = C) -> None:
        super().__init__()
        self.groups, self.width = groups, width
        self.weight, self.bias = nn.Parameter(torch.ones(width)), nn.Parameter(torch.zeros(width))
        self.fc1, self.fc2 = nn.Conv2d(width, 2 * width, 1), nn.Conv2d(2 * width, width, 1)
        self.scale = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.group_norm(x, self.groups, self.weight, self.bias, 1e-5)
        h = self.fc2(F.gelu(self.fc1(h)))
        return x + h * self.scale.view(self.width, 1, 1)


class InputMeanToOutput(nn.Module):
    """The channel mean of the block INPUT added to the branch OUTPUT: halved, F adds
    the mean over the channels it reads (``x2.mean(1)``) to the ones it writes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(x)))
        return x + (h + x.mean(1, keepdim=True))


class SpatialGate(nn.Module):
    """Gates from reductions over the channel axis with ``keepdim=False``: of the block
    input (``amax``, a boundary space) and of the inner width (``sum``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(C, 2 * C, 3, padding=1), nn.Conv2d(2 * C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x * torch.sigmoid(x.amax(1)).unsqueeze(1))
        h = h * torch.sigmoid(torch.sum(h, 1).unsqueeze(1) / 16)
        return x + self.conv2(F.relu(h))


class TokenGate(nn.Module):
    """Tokens ``(B, T, C)``: a gate from the token mean (``mean(1)`` drops a dim before
    the channel axis) through Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)
        self.gate = nn.Linear(2 * C, 2 * C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x))
        h = h * torch.sigmoid(self.gate(h.mean(1))).unsqueeze(1)
        return x + self.fc2(h)


def image_net(block: type[nn.Module] | object, *args: object) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, C, 3, padding=1), block(*args), block(*args))


BRANCHES = {
    "se mean on the inner width": lambda: image_net(Bottleneck, SqueezeExcite, "inner"),
    "se mean on the output": lambda: image_net(Bottleneck, SqueezeExcite, "out"),
    "se keepdim=False, Linear": lambda: image_net(Bottleneck, LinearSqueezeExcite, "inner"),
    "se keepdim=False on the output": lambda: image_net(Bottleneck, LinearSqueezeExcite, "out"),
    "eca on the inner width": lambda: image_net(Bottleneck, EcaModule, "inner"),
    "eca on the output": lambda: image_net(Bottleneck, EcaModule, "out"),
    "grn nchw": lambda: image_net(ConvNeXtV2Block, False),
    "grn channels-last": lambda: image_net(ConvNeXtV2Block, True),
    "group_norm one group": lambda: image_net(GroupNormMlp, 1),
    "group_norm four groups": lambda: image_net(GroupNormMlp, 4),
    "input channel mean to output": lambda: image_net(InputMeanToOutput),
    "channel reductions keepdim=False": lambda: image_net(SpatialGate),
}


def blocks_of(gm: nn.Module) -> list[revcompile.BlockReport]:
    return revcompile.report(gm).blocks


@pytest.mark.parametrize("name", BRANCHES)
def test_branch_becomes_a_coupling_and_is_exact(name: str) -> None:
    torch.manual_seed(0)
    model = randomize(BRANCHES[name]()).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    gm = revcompile.convert(model, x, split="halve")
    fates = [(b.fate, b.code, b.reason) for b in blocks_of(gm) if b.code != "inside_block"]
    assert [fate for fate, _, _ in fates] == ["F", "G"], fates
    compare_with_reference(gm, x, rtol=1e-10)


def test_token_gate_becomes_a_coupling_and_is_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, C), TokenGate(), TokenGate()).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    gm = revcompile.convert(model, x, split="halve")
    assert [b.fate for b in blocks_of(gm)] == ["F", "G"]
    compare_with_reference(gm, x, rtol=1e-10)


# --------------------------------------------------------------------------- halved formulas


def traced_block(block: nn.Module, x: torch.Tensor):
    """The traced ``block`` (a module computing ``x + branch(x)``) and its partition."""
    gm = trace(block)
    propagate_shapes(gm, (x,))
    blocks, _ = find_residuals(gm)  # the outer block is the last (``h + mean`` may be one)
    return gm, partition_branch(gm, blocks[-1])


def halved(block: nn.Module, x: torch.Tensor, reads: slice, writes: slice) -> torch.Tensor:
    """The branch of ``block`` built at half width, applied to ``x[:, reads]``."""
    gm, part = traced_block(block, x)
    assert part.roles is not None, part.reason
    return build_branch(gm, part, pre_op=None, reads=reads, writes=writes)(x[:, reads])


LOW, HIGH = slice(0, C // 2), slice(C // 2, C)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_functional_group_norm_is_rewritten_with_the_kept_groups(groups: int) -> None:
    """An even group count halves (each kept group normalises the channels it did);
    one group normalises over the kept half (as LayerNorm over the channel axis)."""
    torch.manual_seed(0)
    mlp = randomize(GroupNormMlp(groups)).double()
    x = torch.randn(2, C, 5, 5, dtype=torch.float64)
    for reads, writes in ((HIGH, LOW), (LOW, HIGH)):
        w, b = mlp.weight[reads], mlp.bias[reads]
        if groups == 1:
            h = F.group_norm(x[:, reads], 1, w, b, 1e-5)
        else:  # whole groups: the full-width norm restricted to the kept channels
            h = F.group_norm(x, groups, mlp.weight, mlp.bias, 1e-5)[:, reads]
        h = F.gelu(F.conv2d(h, mlp.fc1.weight[:, reads], mlp.fc1.bias))
        h = F.conv2d(h, mlp.fc2.weight[writes], mlp.fc2.bias[writes])
        expected = h * mlp.scale[writes].view(-1, 1, 1)
        got = halved(mlp, x, reads, writes)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_group_norm_module_of_one_group_normalises_the_kept_half() -> None:
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.conv = nn.GroupNorm(1, C), nn.Conv2d(C, C, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.conv(self.norm(x))

    block = Block().double()
    with torch.no_grad():
        block.norm.weight.copy_(torch.rand(C) + 0.5)
        block.norm.bias.copy_(torch.randn(C))
    x = torch.randn(2, C, 4, 4, dtype=torch.float64)
    for reads, writes in ((HIGH, LOW), (LOW, HIGH)):
        norm = block.norm
        h = F.group_norm(x[:, reads], 1, norm.weight[reads], norm.bias[reads], norm.eps)
        expected = F.conv2d(h, block.conv.weight[writes][:, reads], block.conv.bias[writes])
        torch.testing.assert_close(halved(block, x, reads, writes), expected)


def test_odd_group_count_other_than_one_is_refused_at_the_boundary() -> None:
    _, part = traced_block(GroupNormMlp(3, width=6), torch.randn(2, 6, 4, 4))
    assert part.reason == "GroupNorm with odd group count"


def test_input_channel_mean_added_to_output_is_the_mean_of_the_read_half() -> None:
    """The adversarial case: the mean is taken over the block input, whose channels
    are sliced to the half F reads, and broadcast into the half it writes. Halved,
    it is the mean of the read half: a function of that half alone (what a coupling
    needs), not of the dropped channels."""
    torch.manual_seed(0)
    mod = InputMeanToOutput().double()
    x = torch.randn(2, C, 5, 5, dtype=torch.float64)
    for reads, writes in ((HIGH, LOW), (LOW, HIGH)):
        h = F.relu(F.conv2d(x[:, reads], mod.conv1.weight[:, reads], mod.conv1.bias, padding=1))
        h = F.conv2d(h, mod.conv2.weight[writes], mod.conv2.bias[writes], padding=1)
        expected = h + x[:, reads].mean(1, keepdim=True)
        torch.testing.assert_close(halved(mod, x, reads, writes), expected)


def test_channel_sum_at_the_boundary_is_the_restriction_with_dropped_channels_zeroed() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(C, C, 1).double()

    def branch(x: torch.Tensor) -> torch.Tensor:
        return conv(x) * x.norm(dim=1, keepdim=True) + x.sum(1, keepdim=True)

    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = conv

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + branch(x)

    x = torch.randn(2, C, 4, 4, dtype=torch.float64)
    for reads, writes in ((HIGH, LOW), (LOW, HIGH)):
        zeroed = torch.zeros_like(x)
        zeroed[:, reads] = x[:, reads]
        expected = branch(zeroed)[:, writes]
        torch.testing.assert_close(halved(Branch(), x, reads, writes), expected)


def test_eca_on_the_output_runs_its_conv_over_the_written_half() -> None:
    """The Conv1d along the channels is copied whole; halved, it slides over the
    written half's channel means, zero-padded at the ends of the half."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.eca = nn.Conv2d(C, C, 3, padding=1), EcaModule(C)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.eca(self.conv(x))

    block = Block().double()
    x = torch.randn(2, C, 5, 5, dtype=torch.float64)
    for reads, writes in ((HIGH, LOW), (LOW, HIGH)):
        w, b = block.conv.weight[writes][:, reads], block.conv.bias[writes]
        h = F.conv2d(x[:, reads], w, b, padding=1)
        y = F.conv1d(h.mean((2, 3)).unsqueeze(1), block.eca.conv.weight, padding=1)
        expected = h * torch.sigmoid(y).view(2, -1, 1, 1)
        torch.testing.assert_close(halved(block, x, reads, writes), expected)


# --------------------------------------------------------------------------- refused


class Gamma(nn.Module):
    def __init__(self, forward) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.spatial = nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Linear(C, C)
        self.gamma = nn.Parameter(torch.rand(C))
        self.body = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self, x)


REFUSED = {
    # (N, H, W) against (N, C, H, W) lines N up with C: runs only while N == C
    "keepdim=False reaching the channel axis": (
        lambda m, x: x + m.conv(x) * x.sum(1),
        (C, C, 4, 4),
        "operator.mul broadcasts across the channel dim",
    ),
    # tokens (B, T, C) against (B, T): T lines up with C, which halving changes
    "tokens mean(-1) against channels": (
        lambda m, x: x + m.fc(x) * x.mean(-1),
        (1, C, C),
        "operator.mul broadcasts across the channel dim",
    ),
    "a layer reading the remnant as channels": (
        lambda m, x: x + m.conv(x) * torch.sigmoid(m.spatial(x.mean(1, keepdim=True))),
        (2, C, 4, 4),
        "Conv2d applied to a reduction over the channel dim",
    ),
    "branch output is channel-less": (
        lambda m, x: x + m.conv(x).amin(1, keepdim=True),
        (2, C, 4, 4),
        "branch output is a reduction over the channel dim",
    ),
    "per-channel parameter onto a channel reduction": (
        lambda m, x: x + (m.conv(x) + m.gamma.view(1, -1, 1, 1) * x.mean(1, keepdim=True)),
        (2, C, 4, 4),
        "parameter gamma broadcast onto a channel reduction",
    ),
    # a view that reads the channel count would reshape by the full width's number
    "view reading the channel count": (
        lambda m, x: x + m.conv(x).view(x.shape[0], x.shape[1], -1).view(x.shape),
        (2, C, 4, 4),
        "Tensor.view reads the channel count in branch",
    ),
    # a channel shuffle's view splits the channel dim: groups change with halving
    "view splitting the channels": (
        lambda m, x: x + m.conv(x).view(2, 2, -1, 4, 4).transpose(1, 2).reshape(x.shape),
        (2, C, 4, 4),
        "Tensor.view does not keep the channel dim whole",
    ),
    "view flattening the channels": (
        lambda m, x: x + (m.conv(x).view(2, -1) * 2).view(x.shape),
        (2, C, 4, 4),
        "Tensor.view does not keep the channel dim whole",
    ),
}


@pytest.mark.parametrize("name", REFUSED)
def test_uses_that_halving_would_break_are_kept_with_the_reason(name: str) -> None:
    body, shape, reason = REFUSED[name]
    model = Gamma(body).double()
    x = torch.randn(*shape, dtype=torch.float64)
    _, part = traced_block(model, x)
    assert part.roles is None and part.reason == reason
    net = nn.Sequential(model, Gamma(body)).double()
    expected = net(x)  # the original runs at this shape
    gm = revcompile.convert(net, x, split="halve")
    # find_residuals may refuse it first (a channel-less output is a ``broadcast`` add)
    assert {b.fate for b in blocks_of(gm) if b.shortcut == "identity"} == {"kept"}
    assert torch.equal(gm(x), expected)


# --------------------------------------------------------------------------- timm models


def timm_model(name: str) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).double()


TIMM = {
    # model: (input size, the reason its identity blocks may still be kept with, if any)
    "efficientnet_b0": (32, None),
    "convnextv2_atto": (32, None),
    "ecaresnet26t": (32, None),
    # the token mixer ``pool(norm(x)) - norm(x)`` has no channel-mixing layer
    "poolformer_s12": (32, "branch has no channel-mixing layer"),
}


@needs_timm
@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM)
def test_timm_blocks_with_reductions_and_group_norm_become_couplings(name: str) -> None:
    size, allowed = TIMM[name]
    model = timm_model(name)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    gm = revcompile.convert(model, x, split="halve")
    blocks = [b for b in blocks_of(gm) if b.shortcut == "identity" and b.code != "inside_block"]
    kept = [b for b in blocks if b.fate == "kept"]
    assert all(allowed is not None and b.detail == allowed for b in kept), kept
    assert len(kept) <= len(blocks) // 2 and len(blocks) > len(kept)
    compare_with_reference(gm, x, rtol=1e-9)
