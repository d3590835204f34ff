"""opaque: residual blocks inside modules the trace keeps whole are reported as kept."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from revcompile.passes.opaque import find_opaque_blocks
from revcompile.passes.trace import trace
from torch import nn

import revcompile

C = 4


class ModeBlock(nn.Module):
    """``x + F.dropout(f(x), p, self.training)``: the flag makes it a leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.dropout(self.conv(x), 0.1, self.training)


class Outer(nn.Module):
    """A mode-dependent module holding a plain residual block and a mode-dependent one."""

    def __init__(self) -> None:
        super().__init__()
        self.plain = nn.Conv2d(C, C, 1)
        self.inner = ModeBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.plain(x)
        if self.training:
            h = h * 0.5
        return self.inner(h)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(C, C, 1)
        self.blocks = nn.Sequential(ModeBlock(), Outer())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


def test_blocks_inside_mode_dependent_modules_are_found() -> None:
    opaque = find_opaque_blocks(trace(Net()))
    assert [(b.name, b.module, b.shortcut) for b in opaque] == [
        ("blocks.0.add", "blocks.0", "identity"),
        ("blocks.1.plain", "blocks.1", "identity"),
        ("blocks.1.inner", "blocks.1", "identity"),
    ]
    assert {b.why for b in opaque} == {"its forward reads self.training"}


def test_the_report_lists_them_as_kept_and_the_model_is_unchanged() -> None:
    model = Net().double()
    x = torch.randn(2, C, 6, 6, dtype=torch.float64)
    flags = [m.training for m in model.modules()]
    the_report = revcompile.report(revcompile.convert(model, x))
    kept = [b for b in the_report.blocks if b.code == "kept_whole"]
    assert len(kept) == 3 and all(b.fate == "kept" for b in kept)
    assert "blocks.0: its forward reads self.training" in kept[0].reason
    assert [m.training for m in model.modules()] == flags
