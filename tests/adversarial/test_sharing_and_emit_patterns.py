"""Real-world patterns that planning and emit must handle exactly (issue 12).

Each case converts a float64 model, checks that ``analyze`` and ``convert``
agree on every block's fate, and compares a training step with the same
converted network under ``reference_mode()``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from equivalence import compare_with_reference
from torch import nn

import revcompile
from revcompile.api import pipeline
from revcompile.runtime import ReversibleSequence

C = 8


def conv_branch(width: int = C, inner: int = C) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(width, inner, 3, padding=1),
        nn.BatchNorm2d(inner),
        nn.ReLU(),
        nn.Conv2d(inner, width, 3, padding=1),
    )


class Block(nn.Module):
    """``post(x + branch(x))`` (post optional)."""

    def __init__(self, branch: nn.Module | None = None, post: nn.Module | None = None) -> None:
        super().__init__()
        self.branch = conv_branch() if branch is None else branch
        self.post = post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x + self.branch(x)
        return out if self.post is None else self.post(out)


class Net(nn.Module):
    """stem conv -> blocks -> tail -> head conv."""

    def __init__(self, blocks: list[nn.Module], tail: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.blocks = nn.Sequential(*blocks)
        self.tail = nn.Identity() if tail is None else tail
        self.head = nn.Conv2d(C, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tail(self.blocks(self.stem(x))))


def x_input() -> torch.Tensor:
    return torch.randn(2, 3, C, C, dtype=torch.float64)


def convert_checked(model: nn.Module, **options: str) -> torch.fx.GraphModule:
    """Convert (float64, train mode); analyze agrees; one step is exact vs reference."""
    torch.manual_seed(0)
    model = model.double()
    x = x_input()
    split = options.get("split", "halve")
    planned = pipeline(model, x, rewrite=False, split=split).report
    gm = revcompile.convert(model, x, **options)
    got = revcompile.report(gm)
    assert [(b.name, b.fate, b.code) for b in got.blocks] == [
        (b.name, b.fate, b.code) for b in planned.blocks
    ]
    compare_with_reference(gm, x)
    return gm


# --------------------------------------------------------------------------- issue 12 B.2

POST_OPS = {
    "RReLU": lambda: nn.RReLU(),
    "Threshold": lambda: nn.Threshold(0.1, 0.0),
    "LogSigmoid": lambda: nn.LogSigmoid(),
    "Softsign": lambda: nn.Softsign(),
    "Tanhshrink": lambda: nn.Tanhshrink(),
}


class SeluBlock(Block):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.selu(x + self.branch(x))


@pytest.mark.parametrize("name", [*POST_OPS, "torch.selu"])
def test_post_ops_plan_and_convert_agree(name: str) -> None:
    if name == "torch.selu":
        blocks = [SeluBlock() for _ in range(4)]
    else:
        blocks = [Block(post=POST_OPS[name]()) for _ in range(4)]
    model = Net(blocks).eval() if name == "RReLU" else Net(blocks)
    gm = convert_checked(model)
    assert [b.fate for b in revcompile.report(gm).blocks] == ["F", "G", "F", "G"]


# --------------------------------------------------------------------------- issue 12 B.3


class WidthMix(nn.Module):
    """``x + fc(x)`` with a Linear on the last dim: halves only along dim -1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


def test_blocks_halving_on_different_axes_get_separate_stages() -> None:
    gm = convert_checked(Net([WidthMix(), WidthMix(), Block(), Block()]))
    stages = [m for m in gm.modules() if isinstance(m, ReversibleSequence)]
    assert sorted(stage.dim for stage in stages) == [-1, 1]


# --------------------------------------------------------------------------- issue 12 B.5


class ScaleAfterChain(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mul_(2.0))


class ReluOnInput(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.relu_()
        return self.head(self.blocks(self.stem(x)))


IN_PLACE_ON_SAVED = {
    "Dropout2d(inplace) after chain": lambda: Net([Block(), Block()], nn.Dropout2d(inplace=True)),
    "Tensor.mul_ after chain": lambda: ScaleAfterChain([Block(), Block()]),
    "x.relu_() on the input": lambda: ReluOnInput([Block(), Block()]),
}


def _assert_fails_like_the_original(model: nn.Module) -> None:
    """``x.relu_()`` on an input that requires grad is an error of the original model
    itself (an in-place write of a leaf); under ``policy="store"`` nothing saves the
    input, so the converted module keeps the write and fails the same way, and it
    writes the caller's tensor as the original does otherwise."""
    model = model.double()
    gm = revcompile.convert(model, x_input(), policy="store")
    for module in (model, gm):
        with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
            module(x_input().requires_grad_())
    a = x_input()
    b = a.clone()
    gm(a), model(b)
    assert torch.equal(a, b) and torch.equal(a, a.relu())


@pytest.mark.parametrize("policy", ["checkpoint", "store"])
@pytest.mark.parametrize("name", IN_PLACE_ON_SAVED)
def test_in_place_writes_of_saved_values_become_out_of_place(name: str, policy: str) -> None:
    if name == "x.relu_() on the input" and policy == "store":
        _assert_fails_like_the_original(IN_PLACE_ON_SAVED[name]())
        return
    model = IN_PLACE_ON_SAVED[name]()
    gm = convert_checked(model, policy=policy)
    # The model input is saved only as a checkpointed segment's input.
    saved = policy == "checkpoint" or "input" not in name
    changes = revcompile.report(gm).changes
    assert any("made out-of-place" in change for change in changes) == saved


# --------------------------------------------------------------------------- issue 12 B.4


class BranchAssert(nn.Module):
    """Checks the width of a branch value (16: the inner width) and of the trunk."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(C, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, C, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.shape[1] == C, "trunk width")
        h = self.conv1(x)
        torch._assert(h.shape[1] == 16, "branch width")
        return x + self.conv2(F.relu(h))


class TrunkAssert(Block):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.dim() == 4, "trunk rank")
        return x + self.branch(x)


def test_shape_reads_of_branch_values_keep_the_block() -> None:
    gm = convert_checked(Net([BranchAssert(), BranchAssert(), TrunkAssert(), TrunkAssert()]))
    blocks = revcompile.report(gm).blocks
    # The assert on a branch value is a side effect read outside the branch:
    # normalize makes it feed the sink, so find_residuals already sees the block
    # as tapped before the planner's shape-read rule would apply. Either way the
    # block is kept and the assert sees the original width.
    assert [b.fate for b in blocks] == ["kept", "kept", "F", "G"]
    assert {b.code for b in blocks[:2]} <= {"tapped", "shape_read"}


# --------------------------------------------------------------------------- issue 12 B.1


def unique_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Twice(nn.Module):
    """One block applied twice: ``block(block(x))``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.block = Block()
        self.head = nn.Conv2d(C, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.block(self.stem(x))))


def test_a_block_applied_twice_stays_tied() -> None:
    gm = convert_checked(Twice())
    report = revcompile.report(gm)
    assert [(b.fate, b.code) for b in report.blocks] == [("kept", "shares_weights")] * 2
    assert report.params_after == unique_params(gm) == unique_params(Twice())
    # At full width both branches use the block unsliced: one shared copy.
    gm = convert_checked(Twice(), split="duplicate")
    assert [b.fate for b in revcompile.report(gm).blocks] == ["F", "G"]
    assert revcompile.report(gm).params_after == unique_params(gm) == unique_params(Twice())


def test_a_shared_prelu_post_op_stays_one_module() -> None:
    act = nn.PReLU()
    gm = convert_checked(Net([Block(post=act) for _ in range(4)]))
    prelus = {id(m) for m in gm.modules() if isinstance(m, nn.PReLU)}
    assert len(prelus) == 1
    assert revcompile.report(gm).params_after == unique_params(gm)


class ScaledBlock(Block):
    def __init__(self, gamma: nn.Parameter) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.branch(x)


class SharedScale(Net):
    """A layer scale on the root, used by the blocks in ``users``."""

    def __init__(self, users: tuple[int, ...]) -> None:
        self_gamma = nn.Parameter(torch.rand(C, 1, 1) + 0.5)
        blocks = [ScaledBlock(self_gamma) if i in users else Block() for i in range(4)]
        super().__init__(blocks)


def test_a_shared_layer_scale_cut_alike_is_one_copy_and_no_dead_original() -> None:
    model = SharedScale(users=(0, 2))  # both F: the same half of gamma
    gm = convert_checked(model)
    assert [b.fate for b in revcompile.report(gm).blocks] == ["F", "G", "F", "G"]
    gammas = {id(p) for n, p in gm.named_parameters(remove_duplicate=False) if "gamma" in n}
    assert len(gammas) == 1
    assert not any(k.endswith("gamma") and "rev" not in k for k in gm.state_dict())
    assert revcompile.report(gm).params_after == unique_params(gm)


def test_a_shared_layer_scale_cut_differently_keeps_the_blocks() -> None:
    gm = convert_checked(SharedScale(users=(0, 1)))  # F and G: different halves
    fates = [(b.fate, b.code) for b in revcompile.report(gm).blocks]
    assert fates[:2] == [("kept", "shares_weights")] * 2
    assert revcompile.report(gm).params_after == unique_params(gm)


class SharedActivation(Net):
    """One PReLU with a learned slope after the stem and before the head."""

    def __init__(self) -> None:
        super().__init__([Block(), Block()])
        self.act = nn.PReLU(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.blocks(self.act(self.stem(x)))))


@pytest.mark.parametrize("policy", ["checkpoint", "store"])
def test_a_module_shared_by_stem_and_head_stays_one(policy: str) -> None:
    gm = convert_checked(SharedActivation(), policy=policy)
    prelus = {id(m) for m in gm.modules() if isinstance(m, nn.PReLU)}
    assert len(prelus) == 1
    assert revcompile.report(gm).params_after == unique_params(gm)


class BufferScaledBlock(nn.Module):
    """``x + scale * branch(x)``, ``scale`` passed in (a buffer of the caller) or its own."""

    def __init__(self, own_scale: float | None = None) -> None:
        super().__init__()
        self.branch = conv_branch()
        if own_scale is not None:
            self.register_buffer("scale", torch.tensor(own_scale))

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        return x + (self.scale if scale is None else scale) * self.branch(x)


class WriteBetweenBlocks(nn.Module):
    """A buffer the blocks read (a copy: autograd saves it), halved in place after
    ``write_after`` of them (a schedule, a warm-up factor): blocks after the write must
    see the new value."""

    def __init__(self, write_after: int, blocks: int = 4) -> None:
        super().__init__()
        self.write_after = write_after
        self.register_buffer("scale", torch.ones(()))
        self.blocks = nn.ModuleList(BufferScaledBlock() for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, self.scale.clone())
            if i + 1 == self.write_after:
                self.scale.mul_(0.5)
        return x


@pytest.mark.parametrize("write_after", [1, 2, 3])
def test_a_state_write_after_blocks_that_read_it_keeps_them(write_after: int) -> None:
    """Blocks that read the buffer before the write are kept (a recomputation would read
    the new value); those after it convert. Independent truth: the first blocks run as
    the original does, then the conversion of the rest with the scale fixed."""
    torch.manual_seed(0)
    model = WriteBetweenBlocks(write_after).double().train()
    head = copy.deepcopy(model.blocks[:write_after])
    tail = nn.Sequential(*(BufferScaledBlock(0.5) for _ in model.blocks[write_after:])).double()
    for block, fixed in zip(model.blocks[write_after:], tail):
        fixed.branch.load_state_dict(block.branch.state_dict())
    x = torch.randn(2, C, 6, 6, dtype=torch.float64)
    gm = revcompile.convert(model, x, split="duplicate")
    codes = {b.name: b.code for b in revcompile.report(gm).blocks}
    assert all(codes[f"blocks.{i}"] == "state_written_later" for i in range(write_after))
    want = revcompile.convert(tail, x, split="duplicate")
    h = x
    for block in head:
        h = block(h, torch.ones((), dtype=torch.float64))
    torch.testing.assert_close(gm(x), want(h), rtol=1e-12, atol=1e-12)
    assert float(gm.scale) == 0.5
    gm.scale.fill_(1.0)
    compare_with_reference(gm, x)
    model(x).sum().backward()  # the original trains too


class StemReadsStateWrittenAfterTheStage(nn.Module):
    """The stem scales by a buffer that the head halves after the reversible blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(()))
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.blocks = nn.Sequential(Block(), Block())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(torch.tanh(self.stem(x)) * self.scale.clone())
        self.scale.mul_(0.5)
        return h


def test_a_segment_reading_state_written_after_it_is_stored_not_checkpointed() -> None:
    """A checkpointed stem would recompute with the halved scale: wrong stem gradients."""
    torch.manual_seed(0)
    model = StemReadsStateWrittenAfterTheStage().double().train()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    gm = revcompile.convert(model, x)
    assert len(revcompile.report(gm).stages) == 1
    compare_with_reference(gm, x)
    assert float(gm.scale) < 1.0
