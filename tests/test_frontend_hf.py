"""The second frontend (passes/trace_shapes.py) and GraphModule inputs.

Models plain torch.fx cannot trace: Hugging Face transformers' ResNet,
ConvNeXt and ViT (small random configs, no downloads; skipped without
transformers), and hand-written models with shape-dependent control flow,
iteration over shapes, item assignment and a decorated ``forward``. Each is
checked in float64 against ``reference_mode()`` where it converts and against
the original where no block converts or ``preserve_function=True``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from equivalence import compare_with_reference
from original_function import assert_same_function, assert_state_unchanged, state_snapshot
from revcompile.passes.trace_shapes import trace_with_shapes
from torch import nn

import revcompile
from revcompile.errors import ConversionError, PythonRandomnessError, UntraceableError

try:
    import transformers
except ImportError:  # the hf extra is not installed: the Hugging Face tests skip
    transformers = None

needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers not installed")

# ---------------------------------------------------------------- hand-written models


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.bn(self.conv1(x))))


class ShapeChecked(nn.Module):
    """What transformers' ResNet and ViT embeddings do: a Python check on the
    input's channels, unpacking of ``x.shape``, a size-dependent branch, and a
    shape used as data (``view(b, c, -1)``)."""

    def __init__(self, c: int = 8, blocks: int = 2) -> None:
        super().__init__()
        self.num_channels = 3
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(c) for _ in range(blocks)])
        self.head = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.num_channels:
            raise ValueError("wrong number of channels")
        b, _, h, w = x.shape
        if h % 2 == 1:
            x = F.pad(x, (0, 0, 0, 1))
        h = self.blocks(self.stem(x))
        return self.head(h.view(b, h.shape[1], -1).mean(-1))


class Unrolled(nn.Module):
    """Iterates over a shape and a tensor's first dimension, assigns into a
    tensor, and converts a size with ``int()``/``range``."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-2], -1)
        out = torch.zeros_like(x)
        for i in range(int(x.shape[1])):
            out[:, i] = x[:, i] * (i + 1)
        rows = [row.sum() for row in self.conv(out)]
        return out.view(shape).sum(-1) + torch.stack(rows)[:, None]


def keep_signature(forward):
    """A decorator like transformers' ``can_return_tuple``: ``(*args, **kwargs)``."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        kwargs.pop("return_dict", None)
        return forward(self, *args, **kwargs)

    return wrapper


class Decorated(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.blocks = nn.Sequential(Block(c), Block(c))

    @keep_signature
    def forward(self, x: torch.Tensor, scale: float = 1.0, **kwargs) -> torch.Tensor:
        return self.blocks(self.stem(x)) * scale


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def _double(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return model.double()


def test_shape_control_flow_converts_and_checks_gradients():
    model = _double(ShapeChecked())
    x = _x(2, 3, 8, 8)
    before = state_snapshot(model)
    with pytest.raises(UntraceableError):
        revcompile.convert(model, x, frontend="fx")
    gm = revcompile.convert(model, x)
    assert revcompile.report(gm).stages
    compare_with_reference(gm, x)
    assert_state_unchanged(model, before)
    # the shape used as data stays symbolic: another batch size runs
    assert gm(_x(5, 3, 8, 8)).shape == (5, 5)


def test_resolved_branch_is_guarded():
    model = _double(ShapeChecked())
    gm = revcompile.convert(model, _x(2, 3, 8, 8))
    assert gm(_x(2, 3, 10, 6)).shape == (2, 5)  # h % 2 == 0 again: same branch
    with pytest.raises(AssertionError, match=r"revcompile traced .*x.shape\[2\]"):
        gm(_x(2, 3, 9, 8))  # the original pads here; the graph took the other branch
    with pytest.raises(AssertionError, match=r"x.shape\[1\] != 3|x.shape\[1\] == 3"):
        gm(_x(2, 4, 8, 8))


class BatchOfOne(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return x * 2
        return x


def test_size_one_example_dimension_is_guarded():
    gm = revcompile.convert(BatchOfOne(), torch.randn(1, 3))
    with pytest.raises(AssertionError, match=r"x.shape\[0\] == 1"):
        gm(torch.randn(2, 3))  # the original returns x here, not 2 * x


class FloatDecision(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] / 2 > 3:  # a true division: no fx node writes it, the size is pinned
            return x * 2
        return x


def test_unwritable_condition_pins_the_sizes_it_reads():
    gm = revcompile.convert(FloatDecision(), torch.randn(2, 3, 8))
    assert torch.equal(gm(torch.ones(5, 3, 8)), torch.full((5, 3, 8), 2.0))
    with pytest.raises(AssertionError, match=r"x.shape\[2\] == 8"):
        gm(torch.randn(2, 3, 10))  # the original also doubles here: stricter, never looser


def test_no_conversion_keeps_the_function():
    model = _double(ShapeChecked())
    x = _x(2, 3, 8, 8)
    gm = revcompile.convert(model, x, preserve_function=True)
    assert not revcompile.report(gm).stages
    assert_same_function(model, gm, x)


def test_iteration_item_assignment_and_int():
    model = _double(Unrolled())
    x = _x(3, 4, 5, 5)
    before = state_snapshot(model)
    gm = revcompile.convert(model, x)
    assert_same_function(model, gm, x)
    assert_state_unchanged(model, before)
    with pytest.raises(AssertionError, match="revcompile traced"):
        gm(_x(4, 4, 5, 5))  # the loop over the batch was unrolled for 3 rows


def test_decorated_forward_keeps_its_signature():
    model = _double(Decorated())
    x = _x(2, 3, 6, 6)
    gm = revcompile.convert(model, x)
    assert revcompile.report(gm).stages
    compare_with_reference(gm, x)
    converted = copy.deepcopy(gm).eval()
    original = copy.deepcopy(model).eval()
    assert converted(x, scale=2.0).shape == original(x, scale=2.0).shape


class ModeDependent(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.dropout(self.conv(x), 0.5, self.training)


class ShapeAndMode(ShapeChecked):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(ModeDependent(), ModeDependent())


def test_train_eval_behaviour_follows_the_mode():
    model = _double(ShapeAndMode())
    x = _x(2, 3, 8, 8)
    gm = revcompile.convert(model, x)
    gm.eval()
    assert torch.equal(gm(x), gm(x))
    assert torch.equal(gm(x), copy.deepcopy(model).eval()(x))
    gm.train()
    assert not torch.equal(gm(x), gm(x))


def test_batchnorm_state_untouched_by_tracing_in_train_mode():
    model = _double(ShapeChecked()).train()
    before = state_snapshot(model)
    versions = [b._version for b in model.buffers()]
    revcompile.analyze(model, _x(2, 3, 8, 8), frontend="shapes")
    assert_state_unchanged(model, before)
    assert [b._version for b in model.buffers()] == versions


def test_data_dependent_control_flow_still_refused():
    with pytest.raises(UntraceableError, match="tracing with the example inputs' shapes"):
        revcompile.convert(DataDependent(), torch.randn(2, 3))


def test_python_randomness_still_refused():
    import random

    class Noisy(ShapeChecked):
        def forward(self, x):
            b = x.shape[0]
            if b > 1 and random.random() < 0.5:
                return self.stem(x)
            return super().forward(x)

    with pytest.raises(PythonRandomnessError, match="random.random"):
        revcompile.convert(Noisy(), torch.randn(2, 3, 8, 8))


def test_frontend_option_errors():
    model = ShapeChecked()
    with pytest.raises(ValueError, match="frontend must be one of"):
        revcompile.convert(model, torch.randn(2, 3, 8, 8), frontend="export")
    with pytest.raises(ConversionError, match="needs example_inputs"):
        revcompile.convert(model, frontend="shapes")
    with pytest.raises(UntraceableError, match="pass example_inputs"):
        revcompile.convert(model)


# ---------------------------------------------------------------- GraphModule input


class LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        return isinstance(m, Block) or super().is_leaf_module(m, name)


class Plain(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.blocks = nn.Sequential(Block(c), Block(c), Block(c), Block(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x)).mean((2, 3))


def test_graph_module_keeps_its_graph():
    model = _double(Plain())
    x = _x(2, 3, 6, 6)
    user_gm = torch.fx.GraphModule(model, LeafTracer().trace(model))
    gm = revcompile.convert(user_gm, x)
    # the user's leaves stay calls: nothing inside them is a block
    assert not revcompile.report(gm).stages
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"][1:] == [
        f"blocks.{i}" for i in range(4)
    ]
    assert_same_function(user_gm, gm, x)


def test_symbolically_traced_graph_module_converts():
    model = _double(Plain())
    x = _x(2, 3, 6, 6)
    user_gm = torch.fx.symbolic_trace(model)
    before = state_snapshot(user_gm)
    gm = revcompile.convert(user_gm, x)
    assert len(revcompile.report(gm).stages) == 1
    compare_with_reference(gm, x)
    assert_state_unchanged(user_gm, before)


# ---------------------------------------------------------------- Hugging Face models


class Field(nn.Module):
    """One field of a ``ModelOutput``, so the tensor checks apply."""

    def __init__(self, model: nn.Module, field: str) -> None:
        super().__init__()
        self.model = model
        self.field = field

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(x), self.field)


def _resnet():
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], num_labels=3
    )
    return transformers.ResNetForImageClassification(config), "logits"


def _resnet_model():
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[3, 2], layer_type="basic"
    )
    return transformers.ResNetModel(config), "last_hidden_state"


def _convnext():
    config = transformers.ConvNextConfig(
        num_stages=2, hidden_sizes=[8, 16], depths=[2, 2], num_labels=3
    )
    return transformers.ConvNextForImageClassification(config), "logits"


def _vit():
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(config), "logits"


HF_MODELS = {  # factory, split, stages expected (odd leftovers: half-couplings), input size
    "resnet": (_resnet, "halve", 2, 16),
    "resnet_model": (_resnet_model, "halve", 2, 16),
    "convnext": (_convnext, "halve", 2, 16),
    "vit": (_vit, "auto", 1, 32),
}


@needs_transformers
@pytest.mark.parametrize("name", HF_MODELS)
def test_hugging_face_model_converts(name):
    factory, split, stages, size = HF_MODELS[name]
    torch.manual_seed(0)
    model, field = factory()
    model = model.double()
    x = _x(2, 3, size, size)
    before = state_snapshot(model)
    with pytest.raises(UntraceableError):
        revcompile.convert(model, x, frontend="fx")
    gm = revcompile.convert(model, x, split=split)
    assert len(revcompile.report(gm).stages) == stages
    assert type(gm(x)) is type(copy.deepcopy(model)(x))  # the ModelOutput dataclass
    compare_with_reference(Field(gm, field), x)
    assert_state_unchanged(model, before)
    assert gm(_x(3, 3, size, size)) is not None  # another batch size


@needs_transformers
@pytest.mark.parametrize("name", HF_MODELS)
def test_hugging_face_trace_keeps_the_function(name):
    factory, _, _, size = HF_MODELS[name]
    torch.manual_seed(0)
    model, field = factory()
    model = model.double()
    x = _x(2, 3, size, size)
    traced = trace_with_shapes(model, (x,))
    assert_same_function(Field(model, field), Field(traced, field), x)
    assert traced.state_dict().keys() == model.state_dict().keys()


@needs_transformers
def test_hugging_face_model_without_stage_is_the_original():
    torch.manual_seed(0)
    model, field = _vit()
    model = model.double()
    x = _x(2, 3, 32, 32)
    # split="halve": attention cannot be halved; leftover="store": nor the MLP blocks alone
    gm = revcompile.convert(model, x, leftover="store", split="halve")
    assert not revcompile.report(gm).stages
    assert_same_function(Field(model, field), Field(gm, field), x)
    with pytest.raises(AssertionError, match=r"pixel_values.shape\[2\] == 32"):
        gm(_x(2, 3, 40, 32))  # the original raises too: no interpolate_pos_encoding
