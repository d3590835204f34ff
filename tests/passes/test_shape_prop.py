"""passes.shape_prop with forward parameters that have defaults."""

from __future__ import annotations

import torch
from revcompile.passes.shape_prop import guess_example_inputs, propagate_guessed_shapes
from revcompile.passes.trace import trace
from torch import nn


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x, scale=1.0, attn_mask=None):
        return self.conv(x) * scale


def test_parameters_with_defaults_need_no_guess() -> None:
    gm = trace(Scaled())
    assert [tuple(x.shape) for (x,) in guess_example_inputs(gm)] == [
        (2, 3, 224, 224),
        (2, 3, 32, 32),
    ]
    assert propagate_guessed_shapes(gm)
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert tuple(output.meta["tensor_meta"].shape) == (2, 8, 224, 224)


def test_guess_needs_exactly_one_input_without_default() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x, y):
            return self.conv(x) + y

    assert guess_example_inputs(trace(Two())) == []
    assert torch.is_grad_enabled()
