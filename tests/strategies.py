"""Hypothesis strategy for small residual networks, with their ground truth.

``residual_nets()`` draws a ``NetSpec`` (1-4 stages of 1-6 blocks; basic,
bottleneck or pre-activation blocks; BatchNorm, GroupNorm or no norm; optional
dropout and post-add ReLU; identity or projection first blocks; even widths
4-16; 8x8 inputs) and returns a ``GeneratedNet``: the spec plus the analysis
it must produce (``GroundTruth``). ``build_model(spec)`` builds the network,
so later tests (gradients, memory) can reuse the same specs.

Blocks are named ``stages.<i>.<j>``. Identity blocks chain across stage
boundaries when a stage starts with an identity block (same width, stride 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from hypothesis import strategies as st
from torch import nn

BlockKind = Literal["basic", "bottleneck", "preact"]
NormKind = Literal["batch", "group", "none"]


@dataclass(frozen=True)
class StageSpec:
    width: int
    blocks: int
    first: Literal["identity", "projection"]
    stride: int


@dataclass(frozen=True)
class NetSpec:
    stages: tuple[StageSpec, ...]
    block: BlockKind
    norm: NormKind
    dropout: bool
    post_relu: bool
    stem_width: int
    in_channels: int = 3
    image_size: int = 8
    batch: int = 2

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.in_channels, self.image_size, self.image_size)


@dataclass(frozen=True)
class GroundTruth:
    """What analysis must report (with ``leftover="store"``).

    ``shortcuts`` maps block name to ``identity``/``projection`` in graph order;
    ``chains`` are the maximal runs of consecutive identity blocks; ``fates``
    maps block name to ``F``/``G``/``kept``; ``stages`` lists the blocks of each
    planned stage (chains of 2 or more blocks, an odd last block excluded).
    """

    shortcuts: dict[str, str]
    chains: list[list[str]]
    fates: dict[str, str]
    stages: list[list[str]]


@dataclass(frozen=True)
class GeneratedNet:
    spec: NetSpec
    truth: GroundTruth

    def build(self) -> nn.Module:
        return build_model(self.spec)


def _norm(kind: NormKind, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(2, channels)
    return nn.Identity()


class GeneratedBlock(nn.Module):
    """One residual block of a generated network."""

    def __init__(
        self, spec: NetSpec, in_width: int, width: int, stride: int, projection: bool
    ) -> None:
        super().__init__()
        self.preact = spec.block == "preact"
        inner = max(2, width // 4 * 2) if spec.block == "bottleneck" else width
        norm = spec.norm
        layers: list[nn.Module] = []
        if self.preact:
            self.pre = nn.Sequential(_norm(norm, in_width), nn.ReLU())
            layers += [nn.Conv2d(in_width, width, 3, stride, 1), _norm(norm, width), nn.ReLU()]
            if spec.dropout:
                layers.append(nn.Dropout(0.1))
            layers.append(nn.Conv2d(width, width, 3, 1, 1))
        elif spec.block == "basic":
            layers += [nn.Conv2d(in_width, width, 3, stride, 1), _norm(norm, width), nn.ReLU()]
            if spec.dropout:
                layers.append(nn.Dropout(0.1))
            layers += [nn.Conv2d(width, width, 3, 1, 1), _norm(norm, width)]
        else:
            layers += [nn.Conv2d(in_width, inner, 1), _norm(norm, inner), nn.ReLU()]
            layers += [nn.Conv2d(inner, inner, 3, stride, 1), _norm(norm, inner), nn.ReLU()]
            if spec.dropout:
                layers.append(nn.Dropout(0.1))
            layers += [nn.Conv2d(inner, width, 1), _norm(norm, width)]
        self.branch = nn.Sequential(*layers)
        self.projection = (
            nn.Sequential(nn.Conv2d(in_width, width, 1, stride), _norm(norm, width))
            if projection
            else None
        )
        self.post = nn.ReLU() if spec.post_relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            x_act = self.pre(x)
            shortcut = self.projection(x_act) if self.projection is not None else x
            out = self.branch(x_act) + shortcut
        else:
            shortcut = self.projection(x) if self.projection is not None else x
            out = self.branch(x) + shortcut
        return self.post(out) if self.post is not None else out


class GeneratedNetModule(nn.Module):
    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.stem = nn.Conv2d(spec.in_channels, spec.stem_width, 3, padding=1)
        stages = []
        in_width = spec.stem_width
        for stage in spec.stages:
            blocks = []
            for index in range(stage.blocks):
                first = index == 0
                blocks.append(
                    GeneratedBlock(
                        spec,
                        in_width,
                        stage.width,
                        stage.stride if first else 1,
                        projection=first and stage.first == "projection",
                    )
                )
                in_width = stage.width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(in_width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(x))
        return self.head(out.mean((2, 3)))


def build_model(spec: NetSpec) -> nn.Module:
    """The network described by ``spec`` (random init, float32, train mode)."""
    return GeneratedNetModule(spec)


def ground_truth(spec: NetSpec) -> GroundTruth:
    shortcuts: dict[str, str] = {}
    chains: list[list[str]] = []
    current: list[str] = []
    for i, stage in enumerate(spec.stages):
        for j in range(stage.blocks):
            name = f"stages.{i}.{j}"
            kind = stage.first if j == 0 else "identity"
            shortcuts[name] = kind
            if kind == "projection":
                if current:
                    chains.append(current)
                current = []
            else:
                current.append(name)
    if current:
        chains.append(current)
    fates = {name: "kept" for name in shortcuts}
    stages = []
    for chain in chains:
        paired = chain[: len(chain) // 2 * 2]
        for index, name in enumerate(paired):
            fates[name] = "FG"[index % 2]
        if paired:
            stages.append(paired)
    return GroundTruth(shortcuts, chains, fates, stages)


@st.composite
def residual_nets(draw: st.DrawFn) -> GeneratedNet:
    """A small residual network spec and its ground truth."""
    widths = st.integers(2, 8).map(lambda half: 2 * half)
    stem_width = draw(widths)
    n_stages = draw(st.integers(1, 4))
    stages = []
    previous_width = stem_width
    for index in range(n_stages):
        first = draw(st.sampled_from(["identity", "projection"]))
        if first == "identity":
            width, stride = previous_width, 1
        else:
            width = draw(widths)
            stride = 2 if index > 0 and draw(st.booleans()) else 1
        stages.append(StageSpec(width, draw(st.integers(1, 6)), first, stride))
        previous_width = width
    spec = NetSpec(
        stages=tuple(stages),
        block=draw(st.sampled_from(["basic", "bottleneck", "preact"])),
        norm=draw(st.sampled_from(["batch", "group", "none"])),
        dropout=draw(st.booleans()),
        post_relu=draw(st.booleans()),
        stem_width=stem_width,
    )
    return GeneratedNet(spec, ground_truth(spec))
