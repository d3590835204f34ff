"""Channel partitioning of residual branches (DESIGN.md §5, passes/partition.py).

The exact check: for F (reads the high half, writes the low half) the built
branch applied to ``x[:, C//2:]`` equals the original branch ``b`` restricted
to its low output half, ``b'(x)[:, :C//2]``, where ``b'`` is ``b`` with the
dropped input channels of its first mixing layers zeroed (for branches that
start with a mixing layer that is ``b`` on an input whose low half is zero).
Same for G with the halves swapped. Norm layers get random statistics so that
a wrong slice shows.
"""

from __future__ import annotations

import copy
import operator
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from revcompile.passes.ir import ResidualBlock
from revcompile.passes.partition import (
    PartitionError,
    build_branch,
    partition_branch,
    unsupported_reason,
)
from torch import nn
from torch.fx import GraphModule, Node, symbolic_trace
from torch.fx.passes.shape_prop import ShapeProp

C = 8


def halves(width: int) -> list[tuple[slice, slice]]:
    """(reads, writes) of F and of G for a branch of ``width`` channels."""
    low, high = slice(0, width // 2), slice(width // 2, width)
    return [(high, low), (low, high)]


def zero_unread(x: torch.Tensor, reads: slice) -> torch.Tensor:
    """x with every channel outside ``reads`` zeroed."""
    out = torch.zeros_like(x)
    out[:, reads] = x[:, reads]
    return out


ADDS = (operator.add, operator.iadd, torch.add)


# --------------------------------------------------------------------------- helpers


def build(
    gm: GraphModule,
    block: ResidualBlock,
    *,
    pre_op: Node | None,
    reads: slice | None,
    writes: slice | None,
) -> GraphModule:
    """The branch of ``block`` built from its partition record."""
    part = partition_branch(gm, block, pre_op=pre_op)
    return build_branch(gm, part, pre_op=pre_op, reads=reads, writes=writes)


def make_block(gm: GraphModule, join: Node, fork: Node, branch_out: Node) -> ResidualBlock:
    """A ResidualBlock record: region = nodes between fork and join on a fork->join path."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    reach, stack = set(), [fork]
    while stack:
        for user in stack.pop().users:
            if user not in reach and order[user] < order[join]:
                reach.add(user)
                stack.append(user)
    back, stack = set(), [join]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg not in back and order[arg] > order[fork]:
                back.add(arg)
                stack.append(arg)
    region = [n for n in gm.graph.nodes if n in reach and n in back]
    shortcut_out = next(a for a in join.all_input_nodes if a is not branch_out)
    kind = "identity" if shortcut_out is fork else "projection"
    return ResidualBlock(str(join.name), fork, join, branch_out, shortcut_out, region, kind)


def residual(gm: GraphModule) -> ResidualBlock:
    """The block of a traced ``x + branch(x)`` module (the last add of the graph)."""
    join = [n for n in gm.graph.nodes if n.target in ADDS][-1]
    fork = next(n for n in gm.graph.nodes if n.op == "placeholder")
    branch_out = next(a for a in join.all_input_nodes if a is not fork)
    return make_block(gm, join, fork, branch_out)


def torchvision_blocks(gm: GraphModule) -> dict[str, ResidualBlock]:
    """Every residual block of a traced torchvision ResNet, keyed ``layer1.1``."""
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    blocks = {}
    for join in gm.graph.nodes:
        if join.target in ADDS:
            branch_out = join.args[0]
            prefix = branch_out.target.rsplit(".", 1)[0]
            fork = nodes[f"{prefix}.conv1"].args[0]
            blocks[prefix] = make_block(gm, join, fork, branch_out)
    return blocks


def randomize(model: nn.Module) -> nn.Module:
    """Random affine parameters and running statistics for every norm layer."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen))
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=gen))
                mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
    return model


class Residual(nn.Module):
    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


def traced(branch: nn.Module) -> tuple[nn.Module, GraphModule, ResidualBlock]:
    """The (randomized, float64, eval) branch, the traced ``x + branch(x)`` and its block."""
    model = randomize(Residual(branch)).double().eval()
    gm = symbolic_trace(model)
    return model.branch, gm, residual(gm)


def zero_dropped_inputs(branch: nn.Module, first: list[str], reads: slice) -> nn.Module:
    """b': a copy of the branch whose first mixing layers ignore the unread channels."""
    ref = copy.deepcopy(branch)
    keep = torch.zeros(C, dtype=torch.bool)
    keep[reads] = True
    with torch.no_grad():
        for name in first:
            ref.get_submodule(name).weight[:, ~keep] = 0
    return ref


def check_halves(
    gm: GraphModule,
    block: ResidualBlock,
    reference: Callable[[torch.Tensor, slice], torch.Tensor],
    *,
    pre_op: Node | None = None,
    width: int = C,
) -> None:
    """For F and G: built(x[:, reads]) == reference(x, reads)[:, writes]."""
    x = torch.randn(2, width, 6, 6, dtype=torch.float64)
    for reads, writes in halves(width):
        half = build(gm, block, pre_op=pre_op, reads=reads, writes=writes)
        xin = x[:, reads].clone()
        out = half(xin)
        assert out.shape == (2, width // 2, 6, 6)
        torch.testing.assert_close(out, reference(x, reads)[:, writes], rtol=1e-10, atol=1e-10)
        assert torch.equal(xin, x[:, reads]), "branch wrote its input"


# --------------------------------------------------------------------------- small branches


def basic() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(C, C, 3, padding=1, bias=False),
        nn.BatchNorm2d(C),
        nn.ReLU(inplace=True),
        nn.Conv2d(C, C, 3, padding=1, bias=False),
        nn.BatchNorm2d(C),
    )


def bottleneck() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(C, 3, 1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, C, 1),
        nn.BatchNorm2d(C),
    )


def preact() -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(C),
        nn.ReLU(inplace=True),
        nn.Conv2d(C, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(inplace=True),
        nn.Conv2d(12, C, 3, padding=1),
    )


def groupnorm() -> nn.Sequential:
    return nn.Sequential(
        nn.GroupNorm(4, C),
        nn.SiLU(),
        nn.Conv2d(C, 6, 3, padding=1),
        nn.GroupNorm(3, 6),  # inner: an odd group count is fine
        nn.SiLU(),
        nn.Conv2d(6, C, 3, padding=1),
        nn.GroupNorm(2, C),
    )


def depthwise() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(C, C, 3, padding=1, groups=C),
        nn.BatchNorm2d(C),
        nn.Conv2d(C, 16, 1),
        nn.GELU(),
        nn.Dropout(0.5),
        nn.Conv2d(16, C, 1),
        nn.Conv2d(C, C, 3, padding=1, groups=C),
    )


SMALL = {
    "basic": (basic, ["0"]),
    "bottleneck": (bottleneck, ["0"]),
    "preact": (preact, ["2"]),
    "groupnorm": (groupnorm, ["2"]),
    "depthwise": (depthwise, ["2"]),
}


@pytest.mark.parametrize("name", SMALL)
def test_small_branches(name: str) -> None:
    make, first = SMALL[name]
    branch, gm, block = traced(make())
    assert unsupported_reason(gm, block) is None

    def reference(x: torch.Tensor, reads: slice) -> torch.Tensor:
        return zero_dropped_inputs(branch, first, reads)(x)

    check_halves(gm, block, reference)


def test_halves_exact_in_train_mode() -> None:
    branch, gm, block = traced(groupnorm())
    gm.train()
    check_halves(gm, block, lambda x, reads: zero_dropped_inputs(branch, ["2"], reads)(x))
    branch, gm, block = traced(basic())
    gm.train()
    check_halves(gm, block, lambda x, reads: branch(zero_unread(x, reads)))


def test_sliced_shapes() -> None:
    branch, gm, block = traced(groupnorm())
    reads, writes = halves(C)[0]
    f = build(gm, block, pre_op=None, reads=reads, writes=writes)
    gn_in, conv_in, gn_inner, conv_out, gn_out = (
        f.get_submodule(f"branch.{i}") for i in (0, 2, 3, 5, 6)
    )
    assert (gn_in.num_groups, gn_in.num_channels) == (2, 4)
    assert conv_in.weight.shape == (6, 4, 3, 3) and conv_in.in_channels == 4
    assert (gn_inner.num_groups, gn_inner.num_channels) == (3, 6)
    assert conv_out.weight.shape == (4, 6, 3, 3) and conv_out.bias.shape == (4,)
    assert (gn_out.num_groups, gn_out.num_channels) == (1, 4)
    torch.testing.assert_close(gn_in.weight, branch[0].weight[4:])
    torch.testing.assert_close(gn_out.bias, branch[6].bias[:4])


class LayerScaled(nn.Module):
    """Depthwise conv, per-channel layer scale (a get_attr) and in-place ops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(C, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, C, 1)
        self.gamma = nn.Parameter(torch.randn(C, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(x, inplace=True)
        h = self.conv1(h)
        h.relu_()
        h = torch.sigmoid_(self.conv2(h))
        h += 1.0
        return x + self.gamma * h


def test_layer_scale_and_inplace_ops() -> None:
    gm = symbolic_trace(LayerScaled().double())
    block = residual(gm)
    assert unsupported_reason(gm, block) is None
    for reads, writes in halves(C):
        half = build(gm, block, pre_op=None, reads=reads, writes=writes)
        assert half.gamma.shape == (C // 2, 1, 1)
        assert ".relu_(" not in half.code and "sigmoid_(" not in half.code
        assert "inplace = True" not in half.code and "+=" not in half.code

    def reference(x: torch.Tensor, reads: slice) -> torch.Tensor:
        mod = zero_dropped_inputs(gm, ["conv1"], reads)
        x = x.clone()
        return mod(x) - x  # the add of the module computes x + branch(x)

    check_halves(gm, block, reference)


def test_pre_op_is_applied_first_and_out_of_place() -> None:
    gm = symbolic_trace(randomize(torchvision.models.resnet18()).double().eval())
    block = torchvision_blocks(gm)["layer1.1"]
    assert block.fork.target == "layer1.0.relu"
    blk = gm.get_submodule("layer1.1")

    def reference(x: torch.Tensor, reads: slice) -> torch.Tensor:
        h = zero_unread(F.relu(x), reads)
        return blk.bn2(blk.conv2(F.relu(blk.bn1(blk.conv1(h)))))

    check_halves(gm, block, reference, pre_op=block.fork, width=64)
    half = build(gm, block, pre_op=block.fork, reads=slice(4, 8), writes=slice(0, 4))
    assert "inplace=True" not in repr(half)
    assert gm.get_submodule("layer1.0.relu").inplace  # the original is untouched


def test_convnext_block_channels_last() -> None:
    """Depthwise conv, permutes, LayerNorm and Linear on the last dim, layer scale."""
    blk = torchvision.models.convnext.CNBlock(C, layer_scale=0.5, stochastic_depth_prob=0.1)
    blk = randomize(blk).double().eval()
    with torch.no_grad():
        blk.layer_scale.uniform_(0.5, 1.5)
    gm = symbolic_trace(blk)
    block = residual(gm)
    assert unsupported_reason(gm, block) is None
    dw, _, ln, fc1, _, fc2, _ = blk.block
    x = torch.randn(2, C, 6, 6, dtype=torch.float64)
    for reads, writes in halves(C):
        half = build(gm, block, pre_op=None, reads=reads, writes=writes)
        h = F.conv2d(x[:, reads], dw.weight[reads], dw.bias[reads], padding=3, groups=C // 2)
        h = F.layer_norm(h.permute(0, 2, 3, 1), (C // 2,), ln.weight[reads], ln.bias[reads], ln.eps)
        h = F.linear(F.gelu(F.linear(h, fc1.weight[:, reads], fc1.bias)), fc2.weight[writes])
        expected = blk.layer_scale[writes] * (h + fc2.bias[writes]).permute(0, 3, 1, 2)
        torch.testing.assert_close(half(x[:, reads]), expected, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- torchvision


@pytest.fixture(scope="module")
def resnets() -> dict[str, GraphModule]:
    torch.manual_seed(0)
    return {
        name: symbolic_trace(randomize(getattr(torchvision.models, name)()).double().eval())
        for name in ("resnet18", "resnet50", "resnext50_32x4d")
    }


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_torchvision_layer1_1(resnets: dict[str, GraphModule], name: str) -> None:
    gm = resnets[name]
    block = torchvision_blocks(gm)["layer1.1"]
    assert block.shortcut == "identity"
    assert unsupported_reason(gm, block) is None
    blk = gm.get_submodule("layer1.1")
    width = blk.conv1.in_channels
    x = torch.randn(2, width, 6, 6, dtype=torch.float64)
    for reads, writes in halves(width):
        half = build(gm, block, pre_op=None, reads=reads, writes=writes)
        full = blk.bn2(blk.conv2(blk.relu(blk.bn1(blk.conv1(zero_unread(x, reads))))))
        if name != "resnet18":
            full = blk.bn3(blk.conv3(blk.relu(full)))
        torch.testing.assert_close(half(x[:, reads]), full[:, writes], rtol=1e-10, atol=1e-10)
        assert "layer1.1.conv1" in dict(half.named_modules())
    if name == "resnext50_32x4d":
        assert half.get_submodule("layer1.1.conv2").weight.shape == blk.conv2.weight.shape


def test_duplicate_mode_is_the_original_branch(resnets: dict[str, GraphModule]) -> None:
    gm = resnets["resnet50"]
    block = torchvision_blocks(gm)["layer1.1"]
    blk = gm.get_submodule("layer1.1")
    dup = build(gm, block, pre_op=None, reads=None, writes=None)
    x = torch.randn(2, 256, 5, 5, dtype=torch.float64)
    expected = blk.bn3(blk.conv3(blk.relu(blk.bn2(blk.conv2(blk.relu(blk.bn1(blk.conv1(x))))))))
    assert torch.equal(dup(x), expected)
    assert "inplace=True" not in repr(dup)


def test_no_aliasing_and_original_untouched(resnets: dict[str, GraphModule]) -> None:
    gm = resnets["resnet18"]
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    ptrs = {t.data_ptr() for t in [*gm.parameters(), *gm.buffers()]}
    block = torchvision_blocks(gm)["layer1.1"]
    for reads, writes in [*halves(64), (None, None)]:
        branch = build(gm, block, pre_op=block.fork, reads=reads, writes=writes)
        tensors = [*branch.parameters(), *branch.buffers()]
        assert tensors and not ptrs & {t.data_ptr() for t in tensors}
        branch.train()
        loss = branch(torch.randn(2, 64 if reads is None else 32, 4, 4, dtype=torch.float64))
        loss.sum().backward()
        with torch.no_grad():
            for p in branch.parameters():
                p.add_(1.0)
    after = gm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in gm.parameters())


# --------------------------------------------------------------------------- unsupported


class Flattening(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.flatten(self.conv(x), 2).view(2, C, 4, 4)


class Viewing(Flattening):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x).view(2, C, 4, 4)


class Outside(Flattening):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) * y


class Shared(Flattening):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(F.relu(self.conv(x)))


UNSUPPORTED = {
    "outside": (Outside, "branch reads y from outside the block"),
    "shared": (Shared, "conv is shared by layers with different channel roles"),
    "flatten": (Flattening, "unsupported op torch.flatten in branch"),
    "view": (Viewing, "unsupported op Tensor.view in branch"),
    "no mixing": (
        lambda: Residual(nn.Sequential(nn.BatchNorm2d(C), nn.ReLU())),
        "branch has no channel-mixing layer",
    ),
    "odd channels": (lambda: Residual(nn.Conv2d(7, 7, 1)), "odd channel count"),
    "odd groups": (
        lambda: Residual(nn.Sequential(nn.GroupNorm(3, 6), nn.Conv2d(6, 6, 1))),
        "GroupNorm with odd group count",
    ),
    "grouped boundary": (
        lambda: Residual(nn.Conv2d(C, C, 3, padding=1, groups=2)),
        "grouped conv (groups=2) at the branch boundary",
    ),
    "linear on width": (
        lambda: Residual(nn.Sequential(nn.Conv2d(C, C, 1), nn.Linear(4, 4))),
        "Linear not applied to the channel dim",
    ),
}


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_reasons(name: str) -> None:
    make, reason = UNSUPPORTED[name]
    gm = symbolic_trace(make())
    block = residual(gm)
    if name == "linear on width":  # needs the rank: ShapeProp metadata
        ShapeProp(gm).propagate(torch.randn(2, C, 4, 4))
    assert unsupported_reason(gm, block) == reason
    with pytest.raises(PartitionError) as info:
        build(gm, block, pre_op=None, reads=slice(0, 1), writes=slice(1, 2))
    assert info.value.reason == reason


def test_resnet152_analysis_time() -> None:
    gm = symbolic_trace(torchvision.models.resnet152())
    blocks = torchvision_blocks(gm)
    assert len(blocks) == 50
    start = time.perf_counter()
    reasons = {name: unsupported_reason(gm, block) for name, block in blocks.items()}
    elapsed = time.perf_counter() - start
    print(f"unsupported_reason over 50 resnet152 blocks: {elapsed * 1e3:.2f} ms")
    assert elapsed < 0.5
    for name, block in blocks.items():
        if block.shortcut == "identity":
            assert reasons[name] is None, name
        else:
            assert reasons[name].startswith("branch changes the channel count"), name


class _FrozenLeafTracer(torch.fx.Tracer):
    """Keeps FrozenBatchNorm2d a leaf, as revcompile's tracer does."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        frozen = isinstance(m, torchvision.ops.misc.FrozenBatchNorm2d)
        return frozen or super().is_leaf_module(m, module_qualified_name)


def test_frozen_batchnorm_leaf_is_halved_like_batchnorm() -> None:
    frozen = torchvision.ops.misc.FrozenBatchNorm2d(C)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, name).copy_(torch.rand(C) + 0.5)
    model = Residual(nn.Sequential(nn.Conv2d(C, C, 3, padding=1), frozen)).double().eval()
    gm = GraphModule(model, _FrozenLeafTracer().trace(model))
    block = residual(gm)
    assert unsupported_reason(gm, block) is None
    check_halves(gm, block, lambda x, reads: model.branch(zero_unread(x, reads)))
