"""The report agrees with the plan and with the converted module (issue 13).

The report is built once, from the Plan and emit's rewrite records; these tests
check it against what ``analyze`` says and against the module ``convert``
returns, on a table of models.
"""

from __future__ import annotations

import models
import torch
from torch import nn

import revcompile


class TiedHead(nn.Module):
    """A CIFAR ResNet whose two head layers are distinct Parameters viewing one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.net = models.cifar_resnet(14)
        self.extra = nn.Linear(10, 10)
        self.tied = nn.Linear(10, 10, bias=False)
        self.tied.weight = nn.Parameter(self.extra.weight)  # same memory, another Parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tied(self.extra(self.net(x)))


def test_params_count_tensors_sharing_memory_once() -> None:
    model = TiedHead()
    gm = revcompile.convert(model, torch.randn(models.CIFAR_INPUT))
    report = revcompile.report(gm)
    tied = model.tied.weight.numel()
    assert report.params_before == sum(p.numel() for p in model.parameters()) - tied
    addresses = [p.data_ptr() for p in gm.parameters()]
    assert len(addresses) == len(set(addresses)) + 1  # the converted module keeps the tie
    assert report.params_after == sum(p.numel() for p in gm.parameters()) - tied
