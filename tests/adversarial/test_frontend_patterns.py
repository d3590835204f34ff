"""Real-world frontend patterns: the converted module against the ORIGINAL model.

Issue 12, DESIGN.md §9: what tracing would silently change (Python randomness,
train/eval-dependent code, grad-mode regions, forward keywords, output
containers, the user's own checkpoints, FrozenBatchNorm2d's state_dict keys,
state written by ``forward``, error messages) is preserved or refused.

Each pattern is written the way torchvision, timm, HF or papers write it. A
model without a residual chain is converted without any stage, so the converted
module must compute exactly the original function: eval outputs bit for bit,
train-step gradients to 1e-10 (float64), the same parameters with gradients,
the same state_dict keys, and the original unchanged by convert and training.
"""

from __future__ import annotations

import collections
import random
import re
from collections.abc import Callable
from typing import NamedTuple

import numpy
import pytest
import torch
import torch.nn.functional as F
import torchvision
from equivalence import compare_with_reference
from models import BufferCounter as Counter
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.checkpoint import checkpoint, checkpoint_sequential
from torchvision.ops.misc import FrozenBatchNorm2d

import revcompile
from revcompile.errors import ConversionError

C = 4
X = torch.randn(2, C, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------- helpers


def original_state(model: nn.Module) -> dict:
    """Everything about ``model`` that convert and training the result must not change."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": {
            name: (m.training, sorted(m.__dict__), dict(m._forward_hooks), type(m))
            for name, m in model.named_modules()
        },
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["modules"] == after["modules"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key


def leaves(output: object) -> list[torch.Tensor]:
    flat, _ = torch.utils._pytree.tree_flatten(output)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def train_step(module: nn.Module, *inputs: torch.Tensor, seed: int = 0) -> dict:
    module.train()
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = module(*inputs)
    loss = sum((t * (i + 1)).square().sum() for i, t in enumerate(leaves(out)))
    loss.backward()
    return {name: p.grad for name, p in module.named_parameters()}


def assert_grads_equal(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    assert {k for k, g in expected.items() if g is not None} == {
        k for k, g in actual.items() if g is not None
    }
    for name, grad in expected.items():
        if grad is not None:
            scale = max(grad.abs().max().item(), 1e-12)
            assert (actual[name] - grad).abs().max().item() / scale <= 1e-10, name


def assert_same_structure(expected: object, actual: object) -> None:
    assert type(actual) is type(expected), (type(expected), type(actual))
    if isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            assert_same_structure(expected[key], actual[key])
    elif isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected)
        for e, a in zip(expected, actual):
            assert_same_structure(e, a)


def check_stage_free(
    factory: Callable[[], nn.Module], *inputs: torch.Tensor, **options: str
) -> None:
    """Convert a model in which no block becomes reversible; it must be the original."""
    torch.manual_seed(0)
    model = factory().double()
    before = original_state(model)
    gm = revcompile.convert(model, inputs, **options)
    assert_same_state(before, original_state(model))
    assert revcompile.report(gm).stages == []
    assert gm.state_dict().keys() == model.state_dict().keys()

    model.eval()
    gm.eval()
    with torch.no_grad():
        torch.manual_seed(2)
        expected = model(*inputs)
        torch.manual_seed(2)
        actual = gm(*inputs)
    assert_same_structure(expected, actual)
    for e, a in zip(leaves(expected), leaves(actual)):
        assert torch.equal(e, a)

    reference = factory().double()
    reference.load_state_dict(model.state_dict())
    expected_grads = train_step(reference, *inputs)
    after_convert = original_state(model)
    assert_grads_equal(expected_grads, train_step(gm, *inputs))
    assert_same_state(after_convert, original_state(model))
    assert {k: v for k, v in gm.state_dict().items()}.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(gm.state_dict()[key], value), key


# ------------------------------------------------- 1. Python randomness


class RandomDropPath(nn.Module):
    """A paper's drop-path: the decision is a Python random number."""

    def __init__(self, draw: Callable[[], bool]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.draw = draw

    def forward(self, x):
        if self.draw():
            return x
        return x + self.conv(x)


class Wrapper(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(C, C, 1)
        self.body = body

    def forward(self, x):
        return self.body(self.stem(x))


RANDOM_DRAWS = {
    "random.random": (lambda: random.random() < 0.2, "random.random"),
    "random.uniform": (lambda: random.uniform(0, 1) < 0.2, "random.uniform"),
    "random.choice": (lambda: random.choice([True, False, False]), "random.choice"),
    "numpy.random.rand": (lambda: numpy.random.rand() < 0.2, "rand"),
    "numpy.random.default_rng": (lambda: numpy.random.default_rng().random() < 0.2, "random"),
}


@pytest.mark.parametrize("name", RANDOM_DRAWS)
def test_python_randomness_is_refused_naming_the_construct(name: str) -> None:
    draw, construct = RANDOM_DRAWS[name]
    model = Wrapper(RandomDropPath(draw))
    before = original_state(model)
    with pytest.raises(ConversionError) as error:
        revcompile.convert(model, X.float())
    message = str(error.value)
    assert construct in message
    assert "test_frontend_patterns.py:" in message
    assert "body (RandomDropPath)" in message
    assert_same_state(before, original_state(model))


class TorchDropPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        keep = (torch.rand_like(x[:, :1, :1, :1]) > 0.3).to(x.dtype)
        return x + F.dropout(self.conv(x), 0.25, True) * keep


def test_torch_randomness_is_kept() -> None:
    # split="halve" keeps the block (x[:, :1] cannot be halved): the original function
    check_stage_free(lambda: Wrapper(TorchDropPath()), X, split="halve")
    # the default duplicates it: the same draws in the reversible backward's recomputation
    torch.manual_seed(0)
    gm = revcompile.convert(Wrapper(TorchDropPath()).double(), X)
    assert [s.split for s in revcompile.report(gm).stages] == ["duplicate"]
    compare_with_reference(gm.train(), X)


# ------------------------------------------------- 2. train/eval-dependent code


class FunctionalDropout(nn.Module):
    """``F.dropout(h, p, self.training)`` (papers) in a block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        return F.dropout(torch.relu(self.conv(x)), 0.5, self.training)


class TrainingStochasticDepth(nn.Module):
    """Custom ``if self.training:`` stochastic depth."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        out = self.conv(x)
        if self.training:
            keep = (torch.rand_like(x[:, :1, :1, :1]) > 0.5).to(x.dtype)
            out = out * keep / 0.5
        return out


class EvalShortcut(nn.Module):
    """``if not self.training: return x``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)

    def forward(self, x):
        if not self.training:
            return x
        return F.dropout(self.conv(x), 0.5, True)


class TimmHead(nn.Module):
    """timm's ``forward_head``: dropout at the root with ``training=self.training``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.drop_rate = 0.5
        self.fc = nn.Linear(C, 3)

    def forward(self, x):
        x = self.body(x).mean((2, 3))
        x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.fc(x)


MODE_DEPENDENT = {
    "functional_dropout": lambda: Wrapper(FunctionalDropout()),
    "if_training_stochastic_depth": lambda: Wrapper(TrainingStochasticDepth()),
    "if_not_training_return": lambda: Wrapper(EvalShortcut()),
    "timm_head": lambda: TimmHead(nn.Conv2d(C, C, 1)),
}


@pytest.mark.parametrize("training", [True, False], ids=["converted_in_train", "in_eval"])
@pytest.mark.parametrize("name", MODE_DEPENDENT)
def test_mode_dependent_code_follows_train_and_eval(name: str, training: bool) -> None:
    torch.manual_seed(0)
    model = MODE_DEPENDENT[name]().double().train(training)
    gm = revcompile.convert(model, X)
    for mode in (True, False, True):
        model.train(mode)
        gm.train(mode)
        with torch.no_grad():
            torch.manual_seed(3)
            expected = model(X)
            torch.manual_seed(3)
            actual = gm(X)
        assert torch.equal(expected, actual), f"mode {'train' if mode else 'eval'}"
    check_stage_free(MODE_DEPENDENT[name], X)


class MixedFlags(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(self.conv(x)))


def test_per_submodule_training_flags_are_kept() -> None:
    """A BatchNorm kept in eval() inside a model in train()."""
    model = MixedFlags().double().train()
    model.bn.eval()
    gm = revcompile.convert(model, X)
    flags = {name: m.training for name, m in model.named_modules()}
    assert {name: m.training for name, m in gm.named_modules() if name in flags} == {
        name: flag for name, flag in flags.items() if name in dict(gm.named_modules())
    }
    torch.manual_seed(1)
    expected = model(X)
    torch.manual_seed(1)
    assert torch.equal(gm(X), expected)


# ------------------------------------------------- 3. grad-mode regions


class FrozenStem(nn.Module):
    def __init__(self, region: Callable[[], object]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(C, C, 3, padding=1)
        self.head = nn.Conv2d(C, C, 1)
        self.region = region

    def forward(self, x):
        with self.region():
            h = torch.relu(self.stem(x))
        return self.head(h)


class ReenabledHead(nn.Module):
    """``torch.enable_grad()`` inside a region run under no_grad."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(C, C, 3, padding=1)
        self.head = nn.Conv2d(C, C, 1)

    def forward(self, x):
        with torch.no_grad():
            h = self.stem(x)
            with torch.enable_grad():
                h = self.head(h)
        return h + 1


class DetachedStem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(C, C, 3, padding=1)
        self.head = nn.Conv2d(C, C, 1)

    def forward(self, x):
        return self.head(self.stem(x).detach())


GRAD_MODES = {
    "no_grad": lambda: FrozenStem(torch.no_grad),
    "set_grad_enabled_false": lambda: FrozenStem(lambda: torch.set_grad_enabled(False)),
    "enable_grad_inside_no_grad": ReenabledHead,
    "detach": DetachedStem,
}


@pytest.mark.parametrize("name", GRAD_MODES)
def test_grad_mode_regions_are_kept(name: str) -> None:
    check_stage_free(GRAD_MODES[name], X)


def test_inference_mode_region_gets_no_gradient() -> None:
    """``torch.inference_mode()`` acts as no_grad (the original cannot even be
    trained: its inference tensors cannot be saved for backward)."""
    model = FrozenStem(torch.inference_mode).double().eval()
    gm = revcompile.convert(model, X)
    with torch.no_grad():
        assert torch.equal(gm(X), model(X))
    gm.train()(X).sum().backward()
    assert gm.stem.weight.grad is None and gm.head.weight.grad is not None


def test_grad_mode_is_restored_to_the_callers_mode() -> None:
    """Leaving a region restores the mode the caller had, not the trace-time mode."""
    gm = revcompile.convert(FrozenStem(torch.no_grad).double(), X)
    with torch.no_grad():
        out = gm(X)
        assert not torch.is_grad_enabled(), "leaving the region enabled grad"
    assert not out.requires_grad
    assert gm(X).requires_grad and torch.is_grad_enabled()


# ------------------------------------------------- 4. forward keywords


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x, scale=1.0):
        return self.conv(x) * scale


class Masked(nn.Module):
    """timm ViT style: ``attn_mask=None`` decides control flow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)

    def forward(self, x, attn_mask=None):
        h = self.conv(x)
        if attn_mask is not None:
            h = h.masked_fill(attn_mask, 0.0)
        return h


def test_forward_keyword_stays_a_parameter() -> None:
    model = Scaled().double()
    gm = revcompile.convert(model, X)
    assert torch.equal(gm(X, scale=2.0), model(X, scale=2.0))
    assert torch.equal(gm(X, 3.0), model(X, 3.0))
    assert torch.equal(gm(X), model(X))
    check_stage_free(Scaled, X)


def test_keyword_fixed_for_control_flow_rejects_other_values() -> None:
    model = Masked().double()
    gm = revcompile.convert(model, X)
    assert torch.equal(gm(X), model(X))
    mask = torch.zeros(2, C, 6, 6, dtype=torch.bool)
    with pytest.raises(AssertionError, match="attn_mask has been specialized"):
        gm(X, attn_mask=mask)


# ------------------------------------------------- 5. output containers


class Pair(NamedTuple):
    out: torch.Tensor
    aux: torch.Tensor


class Containers(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.a = nn.Conv2d(C, C, 1)
        self.b = nn.Conv2d(C, C, 3, padding=1)
        self.kind = kind

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.kind == "ordered_dict":
            return collections.OrderedDict([("out", a), ("aux", b)])
        if self.kind == "namedtuple":
            return Pair(a, b)
        if self.kind == "list":
            return [a, (b, a)]
        return {"out": a, "nested": collections.OrderedDict(aux=b)}


@pytest.mark.parametrize("kind", ["ordered_dict", "namedtuple", "list", "dict_of_ordered_dict"])
def test_output_container_types_are_kept(kind: str) -> None:
    check_stage_free(lambda: Containers(kind), X)


def test_feature_pyramid_network_returns_an_ordered_dict() -> None:
    from torchvision.ops import FeaturePyramidNetwork

    class Features(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c2 = nn.Conv2d(C, 8, 3, padding=1)
            self.c3 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.fpn = FeaturePyramidNetwork([8, 8], 4)

        def forward(self, x):
            c2 = self.c2(x)
            return self.fpn(collections.OrderedDict([("p2", c2), ("p3", self.c3(c2))]))

    check_stage_free(Features, X)


@pytest.mark.parametrize("factory", ["fcn_resnet50", "deeplabv3_resnet50"])
def test_segmentation_models_return_an_ordered_dict(factory: str) -> None:
    torch.manual_seed(0)
    build = getattr(torchvision.models.segmentation, factory)
    model = build(weights=None, weights_backbone=None, num_classes=3, aux_loss=True).eval()
    x = torch.randn(1, 3, 64, 64)
    gm = revcompile.convert(model, x)
    with torch.no_grad():
        out = gm.eval()(x)
    assert type(out) is collections.OrderedDict and list(out) == ["out", "aux"]


# ------------------------------------------------- 6. the user's checkpoints


class UserCheckpoint(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(C, C, 1)
        self.body = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.ReLU(), nn.Conv2d(C, C, 1))
        self.how = how

    def forward(self, x):
        h = self.stem(x)
        if self.how == "reentrant":
            h = checkpoint(self.body, h, use_reentrant=True)
        elif self.how == "non_reentrant":
            h = torch.utils.checkpoint.checkpoint(self.body, h, use_reentrant=False)
        elif self.how == "method":
            h = checkpoint(self.body.forward, h, use_reentrant=False)
        else:
            h = checkpoint_sequential(self.body, 2, h, use_reentrant=False)
        return h


@pytest.mark.parametrize("how", ["reentrant", "non_reentrant", "method", "sequential"])
def test_user_checkpoints_are_kept(how: str) -> None:
    x = X.clone().requires_grad_(how == "reentrant")
    check_stage_free(lambda: UserCheckpoint(how), x)
    model = UserCheckpoint(how).double()
    gm = revcompile.convert(model, X)
    calls: dict[str, int] = {"original": 0, "converted": 0}
    for name, module in (("original", model), ("converted", gm)):

        def count(*_, name=name):
            calls[name] += 1

        module.get_submodule("body.0").register_forward_hook(count)
        module(X.clone().requires_grad_()).sum().backward()
    assert calls["converted"] == calls["original"]
    if how != "sequential":
        assert calls["original"] == 2, "the checkpointed body is recomputed in backward"


# ------------------------------------------------- 7. state_dict keys


class FrozenBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.bn = FrozenBatchNorm2d(C)
        self.register_buffer("offset", torch.full((1, C, 1, 1), 0.5))

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) + self.offset


def test_frozen_batchnorm_keeps_its_state_dict_keys() -> None:
    check_stage_free(FrozenBackbone, X)


def test_resnet_fpn_backbone_keeps_keys_and_ordered_dict() -> None:
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    model = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)
    x = torch.randn(1, 3, 64, 64)
    gm = revcompile.convert(model.eval(), x, policy="store")
    kept = set(gm.state_dict())
    assert not [k for k in kept if "_tensor_constant" in k]
    stages = {stage.name for stage in revcompile.report(gm).stages}
    assert stages  # FrozenBatchNorm2d then ReLU(inplace=True): the blocks are found
    for key in kept:  # a stage's keys are <stage>.couplings.<i>.<F|G>.<original key>
        stage, _, rest = key.partition(".")
        original = re.sub(r"^couplings\.\d+\.[FG]\.", "", rest) if stage in stages else key
        assert original in model.state_dict(), key
    with torch.no_grad():
        out = gm.eval()(x)
    assert type(out) is collections.OrderedDict and list(out) == list(model(x))


# ------------------------------------------------- 8. the original is not modified


def test_buffer_update_in_forward_runs_in_the_converted_module_only() -> None:
    model = Wrapper(Counter()).double()
    gm = revcompile.convert(model, X)
    assert model.body.calls.item() == 0
    gm(X)
    gm(X)
    assert gm.get_buffer("body.calls").item() == 2
    assert model.body.calls.item() == 0
    check_stage_free(lambda: Wrapper(Counter()), X)


class KeepsLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)

    def forward(self, x):
        self.last = self.conv(x)
        return self.last


class CountsCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)
        self.counter = 0

    def forward(self, x):
        self.counter += 1
        return self.conv(x)


@pytest.mark.parametrize(
    ("factory", "attribute"), [(KeepsLast, "body.last"), (CountsCalls, "body.counter")]
)
def test_attribute_writes_are_refused_and_undone(factory, attribute: str) -> None:
    model = Wrapper(factory())
    before = original_state(model)
    with pytest.raises(ConversionError, match=re.escape(attribute)):
        revcompile.convert(model, X.float())
    assert_same_state(before, original_state(model))
    assert not hasattr(model.body, "last")
    assert getattr(model.body, "counter", 0) == 0


# ------------------------------------------------- 9. untraceable submodule


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)

    def forward(self, x):
        h = self.conv(x)
        if h.sum() > 0:
            return h
        return -h


def test_untraceable_model_error_names_the_submodule() -> None:
    model = nn.Sequential(nn.Conv2d(C, C, 1), nn.Sequential(nn.ReLU(), DataDependent()))
    with pytest.raises(ConversionError, match=re.escape("1.1 (DataDependent)")) as error:
        revcompile.convert(model, X.float())
    assert "leaf module" in str(error.value) and "concrete_args" in str(error.value)


# ------------------------------------------------- with stages, every option


class ResidualBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


class FrontendNet(nn.Module):
    """A no_grad stem, a residual chain, a timm-style dropout head, an OrderedDict."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(C, C, 3, padding=1)
        self.blocks = nn.Sequential(*[ResidualBlock() for _ in range(4)])
        self.head = TimmHead(nn.Identity())

    def forward(self, x, scale=1.0):
        with torch.no_grad():
            x = torch.relu(self.stem(x))
        h = self.blocks(x) * scale
        return collections.OrderedDict(logits=self.head(h), features=h)


@pytest.mark.parametrize("policy", ["checkpoint", "store"])
@pytest.mark.parametrize("split", ["halve", "duplicate", "auto"])
def test_frontend_semantics_survive_stages(policy: str, split: str) -> None:
    torch.manual_seed(0)
    model = FrontendNet().double()
    before = original_state(model)
    gm = revcompile.convert(model, X, policy=policy, split=split)
    assert revcompile.report(gm).stages
    # policy="checkpoint" outlines the stem and head into CheckpointedSegments
    # (emit), which prefixes their keys: ``stem_2.body.stem.weight``.
    params = {
        re.sub(r"^(stem|head)(_\d+)?\.body\.", "", name): p for name, p in gm.named_parameters()
    }
    assert {"stem.weight", "stem.bias", "head.fc.weight"} <= set(params)
    if policy == "store":
        assert {"stem.weight", "stem.bias", "head.fc.weight"} <= set(gm.state_dict())

    out = gm(X, scale=2.0)
    assert type(out) is collections.OrderedDict and list(out) == ["logits", "features"]
    sum(t.square().sum() for t in out.values()).backward()
    assert params["stem.weight"].grad is None, "the no_grad stem got a gradient"
    assert params["head.fc.weight"].grad is not None
    assert_same_state(before, original_state(model))

    gm.eval()
    with torch.no_grad():
        assert torch.equal(gm(X)["logits"], gm(X)["logits"]), "eval must be deterministic"
    gm.train()
    with torch.no_grad():
        assert not torch.equal(gm(X)["logits"], gm(X)["logits"]), "train dropout lost"


# ------------------------------------------------- hooks


class ConvBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(x)))


class Blocks(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(C, C, 1)
        self.blocks = nn.Sequential(*(ConvBlock() for _ in range(n)))

    def forward(self, x):
        return self.blocks(self.stem(x))


def _hooked(n: int, record: list) -> nn.Module:
    """Feature extraction on block 0 (a forward hook), an input rescale on block 1 (a
    pre-hook that changes the function) and a backward hook on block 0's branch conv."""
    model = Blocks(n)
    model.blocks[0].register_forward_hook(lambda m, i, out: record.append(out))
    model.blocks[1].register_forward_pre_hook(lambda m, args: (2 * args[0],))
    model.blocks[0].conv2.register_full_backward_hook(lambda m, gi, go: record.append("bwd"))
    return model


def test_hooked_blocks_stay_modules_whose_hooks_run_at_run_time() -> None:
    record: list = []
    check_stage_free(lambda: _hooked(2, record), X)
    assert not any(isinstance(r, torch.fx.Proxy | FakeTensor) for r in record)


def test_hooks_run_per_call_next_to_reversible_stages() -> None:
    record: list = []
    torch.manual_seed(0)
    model = _hooked(4, record).double()
    gm = revcompile.convert(model, X)
    assert record == []  # convert calls no hook (not on Proxies, not on fake tensors)
    report = revcompile.report(gm)
    assert [s.blocks for s in report.stages] == [["blocks.2", "blocks.3"]]
    assert {b.name: b.code for b in report.blocks}["blocks.0.add"] == "kept_whole"
    compare_with_reference(gm, X)
    record.clear()
    gm.train()
    gm(X).sum().backward()
    assert len(record) == 2 and record[1] == "bwd"
    assert record[0].shape == X.shape and not isinstance(record[0], torch.fx.Proxy)


def test_hooks_on_the_root_are_refused() -> None:
    model = Blocks(4).double()
    model.register_forward_hook(lambda m, i, out: None)
    with pytest.raises(ConversionError, match="hooks of its own"):
        revcompile.convert(model, X)


def test_a_hooked_layer_inside_a_branch_keeps_its_block() -> None:
    record: list = []
    torch.manual_seed(0)
    model = Blocks(4).double()
    model.blocks[3].conv1.register_forward_hook(lambda m, i, out: record.append(out.shape))
    gm = revcompile.convert(model, X)
    assert {b.name: b.code for b in revcompile.report(gm).blocks}["blocks.3"] == "hooked"
    record.clear()
    gm(X).sum().backward()
    assert record == [X.shape]  # once, full width: not a sliced copy, not recomputed


# ------------------------------------------------- torchvision / timm specifics


def test_frozen_batchnorm_resnet_blocks_are_found_and_convert() -> None:
    """Detection backbones: FrozenBatchNorm2d then ReLU(inplace=True) (it allocates)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d, num_classes=3).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    gm = revcompile.convert(model, x)
    report = revcompile.report(gm)
    assert len(report.blocks) == 8 and report.stages
    compare_with_reference(gm, x)


class CachedBias(nn.Module):
    """timm LeViT's attention bias: computed in training, cached per device in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(C, 1, 1))
        self.cache: dict = {}

    def get_bias(self, device: torch.device) -> torch.Tensor:
        if self.training:
            return self.bias * 2
        key = str(device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        return self.cache[key]

    def forward(self, x):
        return x + torch.tanh(x) + self.get_bias(x.device)


def test_a_cache_filled_by_an_eval_forward_is_left_as_it_was() -> None:
    model = Wrapper(CachedBias()).double().eval()
    gm = revcompile.convert(model, X)
    assert model.body.cache == {}  # no fx Proxy left in the original's cache
    with torch.no_grad():
        assert torch.equal(gm(X), model(X))
