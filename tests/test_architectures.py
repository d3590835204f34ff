"""Modern architectures (issue 8): inverted residuals, SE, ConvNeXt, ViT, Swin, timm.

Every model is converted at random init and its reversible training step is
compared in float64 with the same GraphModule under ``reference_mode()``
(DESIGN.md §8), at a reduced input size. The report checks pin down how many
blocks each model has, how many become reversible with which split, and why
the others are kept. Also here: the two-stream ``duplicate`` runtime.

Runs single-threaded: on a shared 2-core machine, intra-op threads contending
with other processes make float64 CPU steps tens of times slower.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import torch
import torchvision
from equivalence import compare_with_reference
from torch import nn

import revcompile
from revcompile import AdditiveCoupling, ReversibleSequence, reference_mode
from revcompile.conversion_report import ConversionReport, KeptReason
from revcompile.memory import saved_activation_bytes

HAS_TIMM = importlib.util.find_spec("timm") is not None
needs_timm = pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed (pip install timm)")
ODD = KeptReason.ODD_LEFTOVER.value
PROJECTION = KeptReason.PROJECTION.value
NOT_HALVABLE = KeptReason.NOT_HALVABLE.value


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def timm_model(name: str, **kwargs) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return make


def small_vit_b_16() -> nn.Module:
    """vit_b_16's widths (patch 16, 12 heads, 768 / 3072) with 2 layers, 32x32 input."""
    return torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=16,
        num_layers=2,
        num_heads=12,
        hidden_dim=768,
        mlp_dim=3072,
        dropout=0.1,
        attention_dropout=0.1,
    )


@dataclass
class Case:
    """A model, its input resolution, and what conversion with ``split`` must report."""

    make: Callable[[], nn.Module]
    size: int
    blocks: int
    splits: dict[str, int]  # split -> blocks converted into stages of that split
    kept: dict[str, int] = field(default_factory=dict)  # KeptReason code -> count
    split: str = "auto"
    leftover: str = "store"
    marks: tuple = ()


CASES: dict[str, Case] = {
    "mobilenet_v2": Case(torchvision.models.mobilenet_v2, 32, 10, {"halve": 8}, {ODD: 2}),
    # 64x64: at 32x32 block4 sees 1x1 maps, where train-mode BatchNorm over a
    # batch of 2 makes the float64 reconstruction ill-conditioned (error 4e-9).
    "regnet_y_400mf": Case(
        torchvision.models.regnet_y_400mf, 64, 16, {"halve": 10}, {PROJECTION: 4, ODD: 2}
    ),
    "efficientnet_b0": Case(torchvision.models.efficientnet_b0, 32, 9, {"halve": 6}, {ODD: 3}),
    "efficientnet_b0_half": Case(
        torchvision.models.efficientnet_b0, 32, 9, {"halve": 9}, leftover="half"
    ),
    "convnext_tiny": Case(torchvision.models.convnext_tiny, 32, 18, {"halve": 14}, {ODD: 4}),
    "vit_b_16": Case(small_vit_b_16, 32, 4, {"duplicate": 4}),
    "swin_t": Case(torchvision.models.swin_t, 32, 24, {"duplicate": 24}),
    "resnet50d": Case(
        timm_model("resnet50d"), 32, 16, {"halve": 10}, {PROJECTION: 4, ODD: 2}, marks=(needs_timm,)
    ),
    "resnetv2_50": Case(
        timm_model("resnetv2_50"),
        32,
        16,
        {"halve": 10},
        {PROJECTION: 4, ODD: 2},
        marks=(needs_timm,),
    ),
    "convnext_nano": Case(timm_model("convnext_nano"), 32, 14, {"halve": 14}, marks=(needs_timm,)),
    "vit_small_patch16_224": Case(
        timm_model("vit_small_patch16_224", img_size=32, drop_path_rate=0.1),
        32,
        24,
        {"duplicate": 24},
        marks=(needs_timm,),
    ),
    "resnet50d_duplicate": Case(
        timm_model("resnet50d"),
        32,
        16,
        {"duplicate": 10},
        {PROJECTION: 4, ODD: 2},
        split="duplicate",
        marks=(needs_timm,),
    ),
}


def randomize_zero_weights(model: nn.Module) -> nn.Module:
    """Zero-initialised heads (torchvision's ViT) make the output zero, which
    leaves nothing to compare; give them small random weights."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                param.normal_(std=0.02)
    return model


def converted_blocks(report: ConversionReport) -> Counter[str]:
    split_of = {stage.name: stage.split for stage in report.stages}
    return Counter(split_of[b.stage] for b in report.blocks if b.fate != "kept")


def kept_reasons(report: ConversionReport) -> Counter[str]:
    return Counter(block.code for block in report.kept)


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=case.marks) for name, case in CASES.items()]
)
def test_architecture_converts_with_exact_gradients(name: str) -> None:
    case = CASES[name]
    torch.manual_seed(0)
    model = randomize_zero_weights(case.make())
    x = torch.randn(2, 3, case.size, case.size, dtype=torch.float64)
    gm = revcompile.convert(model, x.float(), split=case.split, leftover=case.leftover)
    report = revcompile.report(gm)
    assert len(report.blocks) == case.blocks, report
    assert converted_blocks(report) == Counter(case.splits), report
    assert kept_reasons(report) == Counter(case.kept), report
    assert all(stage.split in case.splits for stage in report.stages)
    # Duplicate stages keep every weight once; halving slices them.
    assert report.params_after <= report.params_before
    stages = [m for m in gm.modules() if isinstance(m, ReversibleSequence)]
    assert [m.split for m in stages] == [s.split for s in report.stages]
    compare_with_reference(gm.double().train(), x, rtol=1e-9)


def test_halve_keeps_attention_blocks_with_a_reason_naming_duplicate() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    vit = revcompile.analyze(small_vit_b_16(), x, split="halve")
    attention = [b for b in vit.blocks if "MultiheadAttention" in (b.detail or "")]
    assert len(attention) == 2
    assert {b.code for b in attention} == {NOT_HALVABLE}
    swin = revcompile.analyze(torchvision.models.swin_t(), x, split="halve")
    # ShiftedWindowAttention passes training=self.training to its functional body:
    # it is kept as a leaf module so that it reads its flag at run time.
    assert Counter(b.code for b in swin.kept) == {NOT_HALVABLE: 12}
    assert Counter(b.fate for b in swin.blocks) == {"kept": 12, "half": 12}  # the MLP blocks
    assert all("ShiftedWindowAttention" in b.detail for b in swin.kept if b.code == NOT_HALVABLE)


def test_halve_finds_the_channels_last_axis_of_token_mlps() -> None:
    """Token MLP blocks (B, T, C): LayerNorm and Linear over the last dim halve."""

    class TokenMixer(nn.Module):
        def __init__(self, width: int = 8, depth: int = 4) -> None:
            super().__init__()
            self.mlps = nn.ModuleList(
                nn.Sequential(
                    nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Dropout(0.1),
                    nn.Linear(2 * width, width),
                )
                for _ in range(depth)
            )  # fmt: skip

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for mlp in self.mlps:
                x = x + mlp(x)
            return x

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    gm = revcompile.convert(TokenMixer(), x.float(), split="halve")
    (stage,) = [m for m in gm.modules() if isinstance(m, ReversibleSequence)]
    assert (stage.split, stage.dim, len(stage.couplings)) == ("halve", -1, 2)
    assert stage.couplings[0].F.get_submodule("mlps.0.1").in_features == 4
    compare_with_reference(gm.double().train(), x, rtol=1e-9)


def test_split_must_be_known() -> None:
    with pytest.raises(ValueError, match="split"):
        revcompile.convert(torchvision.models.resnet18(), torch.randn(2, 3, 32, 32), split="x")


# --------------------------------------------------------------------------- runtime


def token_mlp(width: int = 8, p: float = 0.2) -> nn.Module:
    return nn.Sequential(
        nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Dropout(p),
        nn.Linear(2 * width, width),
    )  # fmt: skip


def conv_bn(width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())


def duplicate_stage(make: Callable[[], nn.Module], couplings: int, half: bool = False):
    blocks = [AdditiveCoupling(make(), make()) for _ in range(couplings)]
    if half:
        blocks.append(AdditiveCoupling(make()))
    return ReversibleSequence(blocks, dim=-1, split="duplicate")


@pytest.mark.parametrize("half", [False, True])
def test_duplicate_stage_matches_reference(half: bool) -> None:
    torch.manual_seed(0)
    tokens = duplicate_stage(token_mlp, 3, half).double().train()
    compare_with_reference(tokens, torch.randn(2, 5, 8, dtype=torch.float64))
    convs = duplicate_stage(conv_bn, 2, half).double().train()
    compare_with_reference(convs, torch.randn(2, 4, 6, 6, dtype=torch.float64))


def test_duplicate_stage_plain_forward_is_the_same_function() -> None:
    torch.manual_seed(0)
    stage = duplicate_stage(token_mlp, 2).double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    x1 = x2 = x
    for coupling in stage.couplings:
        x1, x2 = coupling(x1, x2)
    with torch.no_grad():
        assert torch.allclose(stage(x), (x1 + x2) / 2)
    with reference_mode():
        assert torch.allclose(stage(x), (x1 + x2) / 2)


def test_duplicate_stage_saves_two_streams_whatever_its_depth() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 16, 8, requires_grad=True)
    shallow = saved_activation_bytes(duplicate_stage(lambda: token_mlp(p=0.0), 1), x)
    deep = saved_activation_bytes(duplicate_stage(lambda: token_mlp(p=0.0), 6), x)
    assert shallow == deep == 2 * x.numel() * x.element_size()


def test_duplicate_stage_refuses_double_backward() -> None:
    stage = duplicate_stage(token_mlp, 1)
    x = torch.randn(2, 3, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(stage(x).sum(), x, create_graph=False)
    assert grad.shape == x.shape
    with pytest.raises(RuntimeError, match="higher-order"):
        torch.autograd.grad(stage(x).sum(), x, create_graph=True)


def test_video_resnet_with_torchvision_conv3d_subclass_halves() -> None:
    """r3d_18's layers (``Conv3DSimple(nn.Conv3d)``, BasicBlock, BasicStem): the
    Conv3d subclass is a layer like Conv3d, so its blocks halve."""
    from torchvision.models.video.resnet import BasicBlock, BasicStem, Conv3DSimple, VideoResNet

    torch.manual_seed(0)
    model = VideoResNet(BasicBlock, [Conv3DSimple] * 4, [2, 1, 1, 1], BasicStem)
    x = torch.randn(2, 3, 4, 16, 16, dtype=torch.float64)
    gm = revcompile.convert(model, x.float())
    report = revcompile.report(gm)
    assert converted_blocks(report) == Counter({"halve": 2}), report
    assert kept_reasons(report) == Counter({PROJECTION: 3}), report
    compare_with_reference(gm.double().train(), x, rtol=1e-9)
