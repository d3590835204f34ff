"""state_keys: the original's state_dict keys outside the stages survive conversion
(DESIGN.md §9: the keys of unused submodules and of tied tensors are no part of the rewrite)."""

from __future__ import annotations

import pytest
import torch
from models import cifar_resnet
from revcompile.passes.state_keys import original_key
from torch import nn

import revcompile

C = 8
X = torch.randn(2, C, 8, 8, dtype=torch.float64)


class Block(nn.Module):
    def __init__(self, gamma: nn.Parameter | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(C, C, 3, padding=1)
        self.conv2 = nn.Conv2d(C, C, 3, padding=1)
        self.gamma = gamma if gamma is not None else nn.Parameter(torch.full((C, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.conv2(torch.relu(self.conv1(x)))


class WithAuxHead(nn.Module):
    """An auxiliary head that forward never calls, kept for its checkpoint keys."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(C, C, 1)
        self.blocks = nn.Sequential(Block(), Block())
        self.aux = nn.Sequential(nn.Flatten(), nn.Linear(C * 64, 3))
        self.head = nn.Conv2d(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class TiedKept(nn.Module):
    """A layer scale shared by two blocks; the blocks stay (policy="store", one
    projection in between keeps them apart; leftover="store"), so both keys must stay."""

    def __init__(self) -> None:
        super().__init__()
        gamma = nn.Parameter(torch.full((C, 1, 1), 0.5))
        self.first = Block(gamma)
        self.mix = nn.Conv2d(C, C, 1)
        self.second = Block(gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.mix(self.first(x)))


@pytest.mark.parametrize("policy", ["checkpoint", "store"])
@pytest.mark.parametrize("split", ["halve", "duplicate"])
def test_unused_submodule_keeps_its_keys_type_and_values(policy: str, split: str) -> None:
    model = WithAuxHead().double()
    gm = revcompile.convert(model, X, policy=policy, split=split)
    assert revcompile.report(gm).stages
    assert isinstance(gm.get_submodule("aux.1"), nn.Linear)
    for key in ("aux.1.weight", "aux.1.bias"):
        assert torch.equal(gm.state_dict()[key], model.state_dict()[key])
    assert gm.get_parameter("aux.1.weight") is not model.aux[1].weight  # gm owns its copy
    report = revcompile.report(gm)
    assert report.params_after == sum(p.numel() for p in gm.parameters())


def test_tied_tensor_keeps_both_names_and_stays_tied() -> None:
    model = TiedKept().double()
    gm = revcompile.convert(model, X, policy="store", leftover="store")
    state = gm.state_dict(keep_vars=True)
    assert state["first.gamma"] is state["second.gamma"]
    assert state["first.gamma"] is not model.first.gamma


class TiedAcrossAStage(nn.Module):
    """One layer scale in three blocks: two become a stage under split="duplicate",
    the third (after a projection-free mixing layer) stays."""

    def __init__(self) -> None:
        super().__init__()
        gamma = nn.Parameter(torch.full((C, 1, 1), 0.5))
        self.b0, self.b1 = Block(gamma), Block(gamma)
        self.mix = nn.Conv2d(C, C, 1)
        self.b2 = Block(gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b2(self.mix(self.b1(self.b0(x))))


@pytest.mark.parametrize("policy", ["checkpoint", "store"])
def test_tied_name_outside_a_stage_follows_the_stage_copy(policy: str) -> None:
    model = TiedAcrossAStage().double()
    gm = revcompile.convert(model, X, split="duplicate", policy=policy, leftover="store")
    fates = {b.name: b.fate for b in revcompile.report(gm).blocks}
    assert fates["b0"] != "kept" and fates["b2"] == "kept"
    gammas = {id(t) for k, t in gm.state_dict(keep_vars=True).items() if k.endswith("gamma")}
    names = {original_key(gm, k) for k in gm.state_dict()}
    assert {"b0.gamma", "b1.gamma", "b2.gamma"} <= names
    assert len(gammas) == 1  # still one tensor


@pytest.mark.parametrize("policy", ["checkpoint", "store"])
def test_every_original_key_outside_the_stages_is_there(policy: str) -> None:
    model = WithAuxHead().double()
    gm = revcompile.convert(model, X, policy=policy)
    outside = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")}
    if policy == "store":  # the keys load by name
        assert gm.load_state_dict(outside, strict=False).unexpected_keys == []
    # policy="checkpoint" keeps the stem and head under <segment>.body. (README)
    assert set(outside) <= {original_key(gm, k) for k in gm.state_dict()}


def test_converted_blocks_leave_no_dead_original_behind() -> None:
    model = cifar_resnet(14).double()
    gm = revcompile.convert(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    stage_keys = {k for k in gm.state_dict() if ".couplings." in k}
    assert stage_keys
    # Each converted key lives once, in its stage; none reappears under its own name.
    assert not {original_key(gm, k) for k in stage_keys} & set(gm.state_dict())


def test_original_key_strips_stage_and_segment_prefixes() -> None:
    model = cifar_resnet(14).double()
    gm = revcompile.convert(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    names = {original_key(gm, k) for k in gm.state_dict()}
    assert names <= set(model.state_dict())
