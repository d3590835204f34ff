"""Hypothesis strategy of residual networks written the way real code writes them.

``networks()`` draws a ``NetSpec``: a stem, a sequence of residual blocks and a
head, each block a branch of ops from a wide vocabulary (conv variants and
padding modes, every norm, in-place and out-of-place activations, SE/ECA/CBAM
gates, token attention, channel shuffles/flips/chunks, stride-2 + upsample,
nested residuals, in-place statements, no_grad/detach regions, spectral and
weight norm, parametrizations), joined to its shortcut by one of the add
spellings people use, with layer scale, dropout/drop-path, mode-dependent
code, weight tying, frozen parts, stateful forwards, several output
containers, a keyword argument, 1-D or 2-D, and every option of ``convert``.

``build(spec)`` makes the float64 model; ``spec.truth()`` is the ground truth
that can be stated (how many residual adds analysis must find, which are
identity and which projection shortcuts); ``spec.call_inputs()`` the inputs.

Families of ops can be switched off or selected (to bisect a failure) with
``networks(families=...)`` or the environment:
``REVCOMPILE_ADV_FAMILIES=conv,norm`` keeps only those families (plus the
plain base vocabulary) and ``REVCOMPILE_ADV_EXCLUDE=state,pyrandom`` drops some.
"""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from checks import Subject
from hypothesis import strategies as st
from torch import nn

from revcompile.options import DEFAULT_LEFTOVER, DEFAULT_SPLIT

FAMILIES = (
    "conv",  # groups, depthwise, dilation, padding modes, bias on/off
    "norm",  # BN, GN, LN channels-last via permute, InstanceNorm, LayerNorm2d, none
    "act",  # GELU, SiLU, Hardswish, PReLU, LeakyReLU, ELU, Tanh
    "inplace",  # ReLU(inplace=True), F.relu(inplace=True), x.relu_(), mul_/sub_ statements
    "gate",  # SE, ECA, CBAM-like
    "attention",  # a MultiheadAttention token block
    "shuffle",  # channel shuffle, flip, chunk+cat, Res2Net-like split
    "resample",  # stride-2 projection blocks, stride-2 conv + upsample inside a branch
    "nested",  # residuals inside a branch
    "spelling",  # + += torch.add .add .add_ alpha= sum([...]) reversed operands
    "scale",  # layer scale, nn.Dropout, DropPath / StochasticDepth modules
    "tying",  # one block applied twice, shared PReLU, shared layer-scale parameter
    "frozen",  # requires_grad_(False), torch.no_grad() regions, .detach()
    "mode",  # F.dropout(h, p, self.training), `if self.training:` stochastic depth, eval convert
    "pyrandom",  # Python-level randomness in forward
    "state",  # counters, attributes set in forward, spectral/weight norm, parametrize, prune
    "container",  # tuple, list, dict, OrderedDict outputs
    "kwargs",  # forward(x, scale=1.0) called with scale=2.0
    "dim1",  # 1-D networks (Conv1d, BatchNorm1d, ...)
    "options",  # policy, leftover, split, example_inputs omitted
    "misc",  # torch._assert on branch values, noise, FrozenBatchNorm2d, unmovable post-ops
)


def enabled_families(families: frozenset[str] | None = None) -> frozenset[str]:
    """``families`` or the environment's selection (see the module docstring)."""
    if families is None:
        chosen = os.environ.get("REVCOMPILE_ADV_FAMILIES", "")
        families = frozenset(f for f in chosen.split(",") if f) or frozenset(FAMILIES)
    excluded = {f for f in os.environ.get("REVCOMPILE_ADV_EXCLUDE", "").split(",") if f}
    unknown = (set(families) | excluded) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown op families {sorted(unknown)}; known: {', '.join(FAMILIES)}")
    return frozenset(families) - excluded


@dataclass(frozen=True)
class Op:
    """One layer of a branch: ``kind`` and its hashable arguments."""

    kind: str
    args: tuple = ()

    def __str__(self) -> str:
        return self.kind + (f"{self.args}" if self.args else "")


@dataclass(frozen=True)
class BlockSpec:
    branch: tuple[Op, ...]
    shortcut: str  # identity | projection | down (stride-2 projection)
    spelling: str
    scale: str  # none | layerscale | shared_layerscale
    drop: str  # none | dropout | droppath | f_dropout | sd_training | pyrandom
    post: str  # none | relu | relu_inplace | prelu | prelu_shared | gelu | selu | softsign
    repeat: bool  # the same block module applied twice in a row (weight tying)
    frozen: bool
    out_width: int

    def __str__(self) -> str:
        extras = [
            f"{name}={value}"
            for name, value in (
                ("scale", self.scale),
                ("drop", self.drop),
                ("post", self.post),
            )
            if value != "none"
        ]
        extras += [flag for flag, on in (("repeat", self.repeat), ("frozen", self.frozen)) if on]
        ops = ",".join(map(str, self.branch))
        return f"{self.shortcut}[{ops}]{self.spelling}->{self.out_width} " + " ".join(extras)


@dataclass(frozen=True)
class ConvertOptions:
    """Options of ``convert``; the defaults are convert's own."""

    policy: str = "checkpoint"
    leftover: str = DEFAULT_LEFTOVER
    split: str = DEFAULT_SPLIT
    pass_inputs: bool = True

    def kwargs(self) -> dict[str, str]:
        return {"policy": self.policy, "leftover": self.leftover, "split": self.split}


@dataclass(frozen=True)
class Truth:
    """What analysis must find: every residual add, with its shortcut kind."""

    adds: int
    identity: int
    projection: int


@dataclass(frozen=True)
class NetSpec:
    dim: int
    in_channels: int
    width: int
    size: int
    batch: int
    stem: str  # plain | no_grad | frozen | detach
    stem_norm: str
    blocks: tuple[BlockSpec, ...]
    head: str  # map | pooled | tuple | list | dict | ordereddict
    kwarg: bool
    state: str  # none | counter | attribute | spectral_stem | schedule
    train_at_convert: bool
    options: ConvertOptions = field(default_factory=ConvertOptions)

    def describe(self) -> str:
        lines = [
            f"{self.dim}-D in={self.in_channels} width={self.width} size={self.size} "
            f"batch={self.batch} stem={self.stem}/{self.stem_norm} head={self.head} "
            f"kwarg={self.kwarg} state={self.state} train={self.train_at_convert} "
            f"convert({self.options})"
        ]
        lines += [f"  blocks.{i}: {block}" for i, block in enumerate(self.blocks)]
        return "\n".join(lines)

    def truth(self) -> Truth:
        identity = projection = 0
        for block in self.blocks:
            calls = 2 if block.repeat else 1
            nested = sum(op.kind == "nested" for op in block.branch)
            identity += calls * nested
            if block.shortcut == "identity":
                identity += calls
            else:
                projection += calls
        return Truth(identity + projection, identity, projection)

    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, self.in_channels) + (self.size,) * self.dim

    def call_inputs(self, seed: int = 0) -> tuple[tuple[torch.Tensor, ...], dict[str, float]]:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(self.input_shape(), dtype=torch.float64, generator=generator)
        return (x,), ({"scale": 2.0} if self.kwarg else {})


# --------------------------------------------------------------------------- strategies

_CONV_ARGS = {  # (kernel, groups, dilation, padding_mode, bias)
    "base": [(3, 1, 1, "zeros", True), (3, 1, 1, "zeros", False)],
    "conv": [
        (1, 1, 1, "zeros", True),
        (3, 2, 1, "zeros", False),
        (3, "dw", 1, "zeros", True),
        (3, 1, 2, "zeros", False),
        (3, 1, 1, "reflect", True),
        (3, 1, 1, "replicate", False),
        (3, 1, 1, "circular", True),
        (3, "dw", 1, "reflect", False),
    ],
}
_NORMS = {"base": ["bn"], "norm": ["gn", "ln_perm", "in", "in_affine", "ln2d", "none"]}
_ACTS = {
    "base": ["relu"],
    "act": ["gelu", "silu", "hardswish", "prelu", "leaky", "elu", "tanh"],
}
_INPLACE_ACTS = ["relu_mod_inplace", "relu_f_inplace", "relu_method_inplace"]
_INPLACE_STATEMENTS = ["mul_stmt", "sub_mul_stmt"]
_SPELLINGS = {
    "base": ["plus"],
    "spelling": ["plus_rev", "torch_add", "method_add", "alpha", "method_alpha", "sum", "sum_rev"],
    "inplace": ["iadd", "add_", "add_stmt"],
}
# Ops after which an in-place op is safe in eager autograd (their backward does not
# read their output).
_INPLACE_SAFE_AFTER = {"conv", "norm", "gate", "attn"}


def _pool(families: frozenset[str], table: dict[str, list]) -> list:
    return [
        item
        for family, items in table.items()
        if family == "base" or family in families
        for item in items
    ]


@st.composite
def _branch(draw, families: frozenset[str], width: int, size: int, dim: int, depth: int = 0):
    convs = _pool(families, _CONV_ARGS)
    norms = _pool(families, _NORMS)
    acts = _pool(families, _ACTS)
    middle: list[st.SearchStrategy[Op]] = [
        st.sampled_from(convs).map(lambda a: Op("conv", a)),
        st.sampled_from(norms).map(lambda a: Op("norm", (a,))),
        st.sampled_from(acts).map(lambda a: Op("act", (a,))),
    ]
    if "inplace" in families:
        middle.append(st.sampled_from(_INPLACE_ACTS).map(lambda a: Op("act", (a,))))
        middle.append(st.sampled_from(_INPLACE_STATEMENTS).map(lambda a: Op("stmt", (a,))))
    if "gate" in families:
        middle.append(
            st.sampled_from(["se", "eca"] + (["cbam"] if dim == 2 else [])).map(
                lambda a: Op("gate", (a,))
            )
        )
    if "attention" in families:
        middle.append(st.sampled_from([1, 2]).map(lambda h: Op("attn", (h,))))
    if "shuffle" in families:
        middle.append(
            st.sampled_from(["shuffle", "flip", "chunk_swap", "res2net"]).map(
                lambda a: Op("shuffle", (a,))
            )
        )
    if "resample" in families and size % 2 == 0 and size >= 4:
        middle.append(
            st.sampled_from(["conv_s2_up", "pool_up"]).map(lambda a: Op("resample", (a,)))
        )
    if "nested" in families and depth == 0:
        middle.append(
            _branch(families, width, size, dim, depth + 1).map(lambda ops: Op("nested", ops))
        )
    if "frozen" in families:
        middle.append(
            st.sampled_from(["no_grad_gate", "detach_gate"]).map(lambda a: Op("frozen", (a,)))
        )
    if "mode" in families:
        middle.append(st.just(Op("dropout", ("f_dropout",))))
    if "scale" in families:
        middle.append(st.sampled_from(["dropout", "dropout2d"]).map(lambda a: Op("dropout", (a,))))
    if "state" in families:
        middle.append(
            st.sampled_from(
                ["spectral", "weight_norm", "p_weight_norm", "p_spectral", "prune"]
            ).map(lambda a: Op("wconv", (a,)))
        )
    if "misc" in families:
        middle.append(st.sampled_from(["assert", "noise"]).map(lambda a: Op("misc", (a,))))
    first = draw(st.sampled_from(convs + [None]))
    ops = (
        [Op("conv", first)] if first is not None else [Op("norm", (draw(st.sampled_from(norms)),))]
    )
    ops += draw(st.lists(st.one_of(middle), max_size=4 if depth == 0 else 2))
    ops.append(Op("conv", draw(st.sampled_from(convs))))
    if draw(st.booleans()):
        ops.append(Op("norm", (draw(st.sampled_from(norms)),)))
    return tuple(_make_inplace_safe(ops))


def _make_inplace_safe(ops: list[Op]) -> list[Op]:
    """Insert a 1x1 conv before an in-place op whose predecessor's backward reads its output
    (ReLU, Tanh): the original model must train in eager mode."""
    safe: list[Op] = []
    for op in ops:
        if _is_inplace(op) and safe[-1].kind not in _INPLACE_SAFE_AFTER:
            safe.append(Op("conv", (1, 1, 1, "zeros", False)))
        safe.append(op)
    return safe


def _is_inplace(op: Op) -> bool:
    return op.kind == "stmt" or (op.kind == "act" and op.args[0] in _INPLACE_ACTS)


@st.composite
def _block(draw, families, width: int, size: int, dim: int, allow_down: bool):
    shortcuts = ["identity", "identity", "projection"]
    if "resample" in families and allow_down:
        shortcuts.append("down")
    shortcut = draw(st.sampled_from(shortcuts))
    out_width = width
    if shortcut != "identity" and width <= 4:
        out_width = draw(st.sampled_from([width, 2 * width]))
    branch = draw(_branch(families, width, size, dim))
    if shortcut != "identity" and not any(op.kind == "act" for op in branch):
        # analysis takes the operand without a nonlinearity as the projection shortcut: a
        # linear branch next to a projection is an Inception-style join, not a residual.
        branch = tuple(_make_inplace_safe([branch[0], Op("act", ("relu",)), *branch[1:]]))
    spelling = draw(st.sampled_from(_pool(families, _SPELLINGS)))
    scales = ["none"] + (["layerscale"] if "scale" in families else [])
    scales += ["shared_layerscale"] if "tying" in families and shortcut == "identity" else []
    drops = ["none"] + (["dropout", "droppath"] if "scale" in families else [])
    drops += ["f_dropout", "sd_training"] if "mode" in families else []
    drops += ["pyrandom"] if "pyrandom" in families else []
    posts = ["none", "relu"] + (["relu_inplace"] if "inplace" in families else [])
    posts += ["prelu", "gelu"] if "act" in families else []
    posts += ["prelu_shared"] if "tying" in families else []
    posts += ["selu", "softsign"] if "misc" in families else []
    repeat = "tying" in families and shortcut == "identity" and draw(st.booleans())
    frozen = "frozen" in families and draw(st.integers(0, 4)) == 0
    return BlockSpec(
        branch=branch,
        shortcut=shortcut,
        spelling=spelling,
        scale=draw(st.sampled_from(scales)),
        drop=draw(st.sampled_from(drops)),
        post=draw(st.sampled_from(posts)),
        repeat=repeat,
        frozen=frozen,
        out_width=out_width,
    )


_SPLITS = ["halve", "duplicate", "auto"]


@st.composite
def networks(draw, families: frozenset[str] | None = None, max_blocks: int = 5):
    """A ``NetSpec`` drawn from the enabled ``families`` (see ``enabled_families``)."""
    families = enabled_families(families)
    dim = 1 if "dim1" in families and draw(st.booleans()) else 2
    size = 8 if dim == 2 else 16
    width = draw(st.sampled_from([4, 8]))
    n_blocks = draw(st.integers(1, max_blocks))
    blocks = []
    current, spatial, downs = width, size, 0
    for _ in range(n_blocks):
        block = draw(_block(families, current, spatial, dim, allow_down=downs == 0))
        if block.shortcut == "down":
            downs += 1
            spatial //= 2
        current = block.out_width
        blocks.append(block)
    options = ConvertOptions()
    if "options" in families:
        options = ConvertOptions(
            policy=draw(st.sampled_from(["checkpoint", "store"])),
            leftover=draw(st.sampled_from(["store", "half", "single"])),
            split=draw(st.sampled_from(_SPLITS)),
            pass_inputs=draw(st.integers(0, 4)) > 0,
        )
    stems = ["plain"] + (["no_grad", "frozen", "detach"] if "frozen" in families else [])
    stem_norms = ["bn"] + (["frozen_bn"] if "misc" in families and dim == 2 else [])
    stem_norms += ["gn", "none"] if "norm" in families else []
    heads = ["map", "pooled"]
    heads += ["tuple", "list", "dict", "ordereddict"] if "container" in families else []
    states = ["none"]
    states += ["counter", "attribute", "spectral_stem", "schedule"] if "state" in families else []
    return NetSpec(
        dim=dim,
        in_channels=draw(st.sampled_from([1, 3])),
        width=width,
        size=size,
        batch=draw(st.sampled_from([2, 3])),
        stem=draw(st.sampled_from(stems)),
        stem_norm=draw(st.sampled_from(stem_norms)),
        blocks=tuple(blocks),
        head=draw(st.sampled_from(heads)),
        kwarg="kwargs" in families and draw(st.booleans()),
        state=draw(st.sampled_from(states)),
        train_at_convert="mode" not in families or draw(st.booleans()),
        options=options,
    )


# --------------------------------------------------------------------------- building


def _conv(
    dim: int,
    cin: int,
    cout: int,
    k: int = 3,
    stride: int = 1,
    groups: int = 1,
    dilation: int = 1,
    padding_mode: str = "zeros",
    bias: bool = True,
) -> nn.Module:
    cls = nn.Conv1d if dim == 1 else nn.Conv2d
    pad = dilation * (k // 2)
    return cls(cin, cout, k, stride, pad, dilation, groups, bias, padding_mode)


class ChannelsLastLayerNorm(nn.Module):
    """LayerNorm over channels via permute (ConvNeXt reference code)."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.dim = dim

    def forward(self, x):
        if self.dim == 1:
            return self.norm(x.transpose(1, 2)).transpose(1, 2)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: F.layer_norm on channels-last, then back."""

    def forward(self, x):
        moved = x.movedim(1, -1)
        return F.layer_norm(moved, self.normalized_shape, self.weight, self.bias, self.eps).movedim(
            -1, 1
        )


def _norm(kind: str, channels: int, dim: int) -> nn.Module:
    if kind == "bn":
        return (nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d)(channels)
    if kind == "frozen_bn":
        from torchvision.ops import FrozenBatchNorm2d

        norm = FrozenBatchNorm2d(channels)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.running_mean.uniform_(-0.1, 0.1)
        return norm
    if kind == "gn":
        return nn.GroupNorm(2, channels)
    if kind == "ln_perm":
        return ChannelsLastLayerNorm(channels, dim)
    if kind in ("in", "in_affine"):
        cls = nn.InstanceNorm1d if dim == 1 else nn.InstanceNorm2d
        return cls(channels, affine=kind == "in_affine")
    if kind == "ln2d":
        return LayerNorm2d(channels)
    return nn.Identity()


class FunctionalAct(nn.Module):
    """Activations written as function calls inside forward."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "relu_f_inplace":
            return F.relu(x, inplace=True)
        return x.relu_()


def _act(kind: str, channels: int) -> nn.Module:
    simple = {
        "relu": lambda: nn.ReLU(),
        "relu_mod_inplace": lambda: nn.ReLU(inplace=True),
        "gelu": lambda: nn.GELU(),
        "silu": lambda: nn.SiLU(),
        "hardswish": lambda: nn.Hardswish(),
        "prelu": lambda: nn.PReLU(channels, init=0.2),
        "leaky": lambda: nn.LeakyReLU(0.1),
        "elu": lambda: nn.ELU(),
        "tanh": lambda: nn.Tanh(),
    }
    if kind in simple:
        return simple[kind]()
    return FunctionalAct(kind)


class Statement(nn.Module):
    """An in-place statement whose result is not used: ``h.mul_(0.5)``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, h):
        if self.kind == "mul_stmt":
            h.mul_(0.5)
        else:
            h.sub_(0.1).mul_(2.0)
        return h


class Gate(nn.Module):
    """SE (torchvision/timm), ECA (paper code) or CBAM-like channel + spatial gate."""

    def __init__(self, kind: str, channels: int, dim: int) -> None:
        super().__init__()
        self.kind, self.dim = kind, dim
        mid = max(channels // 4, 2)
        if kind == "se":
            self.fc1 = _conv(dim, channels, mid, 1)
            self.fc2 = _conv(dim, mid, channels, 1)
        elif kind == "eca":
            self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        else:
            self.mlp = nn.Sequential(nn.Linear(channels, mid), nn.ReLU(), nn.Linear(mid, channels))
            self.spatial = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x):
        dims = tuple(range(2, 2 + self.dim))  # static: fx cannot range over x.dim()
        pooled = x.mean(dims, keepdim=True)
        if self.kind == "se":
            return x * torch.sigmoid(self.fc2(F.relu(self.fc1(pooled))))
        if self.kind == "eca":
            y = self.conv(pooled.flatten(2).transpose(1, 2)).transpose(1, 2)
            return x * torch.sigmoid(y).view(pooled.shape)
        channel = torch.sigmoid(self.mlp(x.amax(dims)) + self.mlp(pooled.flatten(1)))
        x = x * channel[:, :, None, None]
        stats = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(stats))


class TokenAttention(nn.Module):
    """Feature map -> tokens -> MultiheadAttention -> feature map (no residual inside)."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)
        out, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return out.transpose(1, 2).reshape(x.shape)


class Shuffle(nn.Module):
    def __init__(self, kind: str, channels: int, dim: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "res2net":
            self.conv = _conv(dim, channels // 2, channels // 2, 3)

    def forward(self, x):
        if self.kind == "shuffle":  # ShuffleNet
            return x.unflatten(1, (2, -1)).transpose(1, 2).flatten(1, 2)
        if self.kind == "flip":
            return torch.flip(x, dims=[1])
        a, b = x.chunk(2, dim=1)
        if self.kind == "chunk_swap":
            return torch.cat([b, a], dim=1)
        return torch.cat([a, self.conv(b) * torch.sigmoid(a)], dim=1)  # Res2Net-like split


class Resample(nn.Module):
    """Stride-2 then back up (U-Net / HRNet style), shape preserving."""

    def __init__(self, kind: str, channels: int, dim: int) -> None:
        super().__init__()
        self.kind, self.dim = kind, dim
        if kind == "conv_s2_up":
            self.down = _conv(dim, channels, channels, 3, stride=2)

    def forward(self, x):
        if self.kind == "conv_s2_up":
            return F.interpolate(self.down(x), scale_factor=2, mode="nearest")
        pool = F.avg_pool1d if self.dim == 1 else F.avg_pool2d
        mode = "linear" if self.dim == 1 else "bilinear"
        return F.interpolate(pool(x, 2), size=x.shape[2:], mode=mode, align_corners=False)


class Nested(nn.Module):
    """A residual inside a branch: ``h + inner(h)``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, h):
        return h + self.inner(h)


class FrozenGate(nn.Module):
    """A gate computed under ``torch.no_grad()`` or from ``h.detach()``."""

    def __init__(self, kind: str, channels: int, dim: int) -> None:
        super().__init__()
        self.kind = kind
        self.conv = _conv(dim, channels, channels, 1)

    def forward(self, h):
        if self.kind == "no_grad_gate":
            with torch.no_grad():
                s = self.conv(h)
        else:
            s = self.conv(h.detach())
        return h * torch.sigmoid(s)


class FunctionalDropout(nn.Module):
    def forward(self, h):
        return F.dropout(h, 0.2, self.training)


def _dropout(kind: str, dim: int) -> nn.Module:
    if kind == "f_dropout":
        return FunctionalDropout()
    if kind == "dropout2d" and dim == 2:
        return nn.Dropout2d(0.2)
    return nn.Dropout(0.2)


def _weighted_conv(kind: str, channels: int, dim: int) -> nn.Module:
    conv = _conv(dim, channels, channels, 3)
    utils = nn.utils
    if kind == "spectral":
        return utils.spectral_norm(conv)
    if kind == "weight_norm":
        return utils.weight_norm(conv)
    if kind == "p_weight_norm":
        return utils.parametrizations.weight_norm(conv)
    if kind == "p_spectral":
        return utils.parametrizations.spectral_norm(conv)
    utils.prune.l1_unstructured(conv, "weight", amount=0.3)
    return conv


class Misc(nn.Module):
    def __init__(self, kind: str, channels: int) -> None:
        super().__init__()
        self.kind, self.channels = kind, channels

    def forward(self, h):
        if self.kind == "assert":
            torch._assert(h.shape[1] == self.channels, "channel count changed")
            return h
        return h + 0.1 * torch.randn_like(h)


def _op(op: Op, channels: int, dim: int) -> nn.Module:
    if op.kind == "conv":
        k, groups, dilation, padding_mode, bias = op.args
        groups = channels if groups == "dw" else groups
        return _conv(dim, channels, channels, k, 1, groups, dilation, padding_mode, bias)
    if op.kind == "norm":
        return _norm(op.args[0], channels, dim)
    if op.kind == "act":
        return _act(op.args[0], channels)
    if op.kind == "stmt":
        return Statement(op.args[0])
    if op.kind == "gate":
        return Gate(op.args[0], channels, dim)
    if op.kind == "attn":
        return TokenAttention(channels, op.args[0])
    if op.kind == "shuffle":
        return Shuffle(op.args[0], channels, dim)
    if op.kind == "resample":
        return Resample(op.args[0], channels, dim)
    if op.kind == "nested":
        return Nested(nn.Sequential(*(_op(inner, channels, dim) for inner in op.args)))
    if op.kind == "frozen":
        return FrozenGate(op.args[0], channels, dim)
    if op.kind == "dropout":
        return _dropout(op.args[0], dim)
    if op.kind == "wconv":
        return _weighted_conv(op.args[0], channels, dim)
    if op.kind == "misc":
        return Misc(op.args[0], channels)
    raise ValueError(f"unknown op {op}")


def _drop_module(kind: str) -> nn.Module | None:
    if kind == "dropout":
        return nn.Dropout(0.2)
    if kind == "droppath":
        from torchvision.ops import StochasticDepth

        return StochasticDepth(0.2, "row")
    return None


class Block(nn.Module):
    """One generated residual block; ``forward`` spells the add as ``spec.spelling``."""

    def __init__(self, spec: BlockSpec, width: int, dim: int, shared: dict) -> None:
        super().__init__()
        self.spec = spec
        stride = 2 if spec.shortcut == "down" else 1
        self.enter = (
            _conv(dim, width, spec.out_width, 3, stride=stride, bias=False)
            if spec.shortcut != "identity"
            else None
        )
        inner = spec.out_width
        self.branch = nn.Sequential(*(_op(op, inner, dim) for op in spec.branch))
        self.projection = (
            nn.Sequential(
                _conv(dim, width, spec.out_width, 1, stride=stride, bias=False),
                _norm("bn", spec.out_width, dim),
            )
            if spec.shortcut != "identity"
            else None
        )
        shape = (inner,) + (1,) * dim
        if spec.scale == "layerscale":
            self.gamma = nn.Parameter(torch.full(shape, 0.5, dtype=torch.float64))
        elif spec.scale == "shared_layerscale":
            key = ("gamma", inner)
            shared.setdefault(key, nn.Parameter(torch.full(shape, 0.5, dtype=torch.float64)))
            self.gamma = shared[key]
        self.drop = _drop_module(spec.drop)
        self.ones = (1,) * (dim + 1)  # the stochastic-depth mask's trailing dims (static)
        if spec.post == "prelu_shared":
            self.post = shared.setdefault(("prelu",), nn.PReLU(init=0.1))
        else:
            self.post = {
                "none": None,
                "relu": nn.ReLU(),
                "relu_inplace": nn.ReLU(inplace=True),
                "prelu": nn.PReLU(init=0.1),
                "gelu": nn.GELU(),
                "selu": None,
                "softsign": nn.Softsign(),
            }[spec.post]
        if spec.frozen:
            self.requires_grad_(False)

    def forward(self, x):
        spec = self.spec
        h = self.branch(x if self.enter is None else self.enter(x))
        if spec.scale != "none":
            h = self.gamma * h
        if self.drop is not None:
            h = self.drop(h)
        elif spec.drop == "f_dropout":
            h = F.dropout(h, 0.2, self.training)
        elif spec.drop == "sd_training":
            if self.training:
                keep = h.new_empty(h.shape[0], *self.ones).bernoulli_(0.8)
                h = h * keep / 0.8
        elif spec.drop == "pyrandom" and random.random() < 0.2:  # Python RNG, frozen by fx
            h = h * 0.0
        s = x if self.projection is None else self.projection(x)
        out = _add(spec.spelling, s, h)
        if spec.post == "selu":
            return torch.selu(out)
        return out if self.post is None else self.post(out)


def _add(spelling: str, s, h):
    if spelling == "plus":
        return s + h
    if spelling == "plus_rev":
        return h + s
    if spelling == "iadd":
        h += s
        return h
    if spelling == "torch_add":
        return torch.add(s, h)
    if spelling == "method_add":
        return s.add(h)
    if spelling == "alpha":
        return torch.add(s, h, alpha=0.5)
    if spelling == "method_alpha":
        return s.add(h, alpha=0.5)
    if spelling == "sum":
        return sum([s, h])
    if spelling == "sum_rev":
        return sum([h, s])
    if spelling == "add_":
        return h.add_(s)
    h.add_(s)  # "add_stmt": the result of add_ is not used
    return h


class GeneratedNet(nn.Module):
    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        dim, width = spec.dim, spec.width
        shared: dict = {}
        self.stem_conv = _conv(dim, spec.in_channels, width, 3, bias=spec.stem_norm == "none")
        if spec.state == "spectral_stem":
            self.stem_conv = nn.utils.spectral_norm(self.stem_conv)
        self.stem_norm = _norm(spec.stem_norm, width, dim)
        self.blocks = nn.ModuleList()
        for block_spec in spec.blocks:
            self.blocks.append(Block(block_spec, width, dim, shared))
            width = block_spec.out_width
        # Only when used: fx drops unused submodules (a separate, hand-written case).
        self.head = nn.Linear(width, 5) if spec.head != "map" else None
        if spec.stem == "frozen":
            self.stem_conv.requires_grad_(False)
            self.stem_norm.requires_grad_(False)
        if spec.state == "counter":
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        if spec.state == "schedule":  # a warm-up factor the forward reads, then updates
            self.register_buffer("warmup", torch.ones(()))

    def _stem(self, x):
        return F.relu(self.stem_norm(self.stem_conv(x)))

    def forward(self, x, scale: float = 1.0):
        if self.spec.stem == "no_grad":
            with torch.no_grad():
                h = self._stem(x)
        elif self.spec.stem == "detach":
            h = self._stem(x).detach()
        else:
            h = self._stem(x)
        if self.spec.state == "counter":
            self.calls.add_(1)
        if self.spec.state == "schedule":
            h = h * self.warmup.clone()
        for i, (block, block_spec) in enumerate(zip(self.blocks, self.spec.blocks)):
            h = block(h)
            if block_spec.repeat:
                h = block(h)
            if self.spec.state == "schedule" and i == len(self.blocks) // 2:
                self.warmup.mul_(0.5)  # between blocks: after it, blocks see the new value
        if self.spec.state == "attribute":
            self.last = h
        if self.spec.kwarg:
            h = h * scale
        head = self.spec.head
        if head == "map":
            return h
        pooled = h.mean(tuple(range(2, 2 + self.spec.dim)))
        logits = self.head(pooled)
        if head == "pooled":
            return logits
        if head == "tuple":
            return logits, h
        if head == "list":
            return [h, logits]
        if head == "dict":
            return {"out": logits, "features": h}
        return OrderedDict([("features", h), ("out", logits)])


def build(spec: NetSpec, seed: int = 0) -> nn.Module:
    """The float64 model of ``spec``, in train mode unless ``spec.train_at_convert`` is False;
    parameters and BN statistics drawn from ``seed`` so that every layer matters."""
    torch.manual_seed(seed)
    model = GeneratedNet(spec).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.train(spec.train_at_convert)


def subject(spec: NetSpec, seed: int = 0) -> Subject:
    """The ``checks.Subject`` of ``spec``: its model factory, inputs, options, truth."""
    args, kwargs = spec.call_inputs(seed)
    noisy = any(op.args == ("noise",) for block in spec.blocks for op in _all_ops(block.branch))
    return Subject(
        description=spec.describe(),
        build=lambda: build(spec, seed),
        args=args,
        kwargs=kwargs,
        options=spec.options.kwargs(),
        pass_inputs=spec.options.pass_inputs,
        # `h + 0.1 * randn_like(h)` may or may not count as a residual add: no truth then.
        truth=None if noisy else spec.truth(),
    )


def _all_ops(ops: tuple[Op, ...]):
    for op in ops:
        yield op
        if op.kind == "nested":
            yield from _all_ops(op.args)
