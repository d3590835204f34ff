"""The coverage zoo: third-party and hand-written residual networks, random init.

Every entry builds a fresh, randomly initialised model for an input size
(``make(size)``; models with a fixed token grid, such as ViTs, are built for that
size) and names the input it takes (``input_shape(size)``, batch included).
Nothing is downloaded: torchvision models get ``weights=None`` (and
``weights_backbone=None``), timm models ``pretrained=False``, and the
transformers models are built from small configs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

BATCH = 2


@dataclass(frozen=True)
class ZooModel:
    """One model of the coverage list.

    ``make(size)`` builds it for square ``size x size`` inputs (``size`` is the
    sequence length of 1-D models); ``input_shape(size)`` is the shape of the
    example input at that size; the float64 gradient check runs at
    ``check_size``, the saved-bytes measurement at ``memory_size``.
    """

    name: str
    source: str
    task: str
    make: Callable[[int], nn.Module]
    check_size: int = 32
    memory_size: int = 224
    input_shape: Callable[[int], tuple[int, ...]] = lambda size: (BATCH, 3, size, size)


def _torchvision(name: str, sized: bool = False, **kwargs) -> Callable[[int], nn.Module]:
    def make(size: int) -> nn.Module:
        import torchvision

        extra = {"image_size": size} if sized else {}
        return torchvision.models.get_model(name, weights=None, **kwargs, **extra)

    return make


def _timm(name: str, sized: bool = False, **kwargs) -> Callable[[int], nn.Module]:
    def make(size: int) -> nn.Module:
        import timm

        extra = {"img_size": size} if sized else {}
        return timm.create_model(name, pretrained=False, **kwargs, **extra)

    return make


def _fpn_backbone(size: int) -> nn.Module:
    """torchvision's detection backbone: ResNet-50 with FPN taps on layers 1-4 (FrozenBN)."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    return resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5)


def _video_shape(size: int) -> tuple[int, ...]:
    # 16 frames at 112x112 as in the paper's clips; 4 frames for the small check.
    return (BATCH, 3, 16 if size >= 112 else 4, size, size)


def _hf(kind: str) -> Callable[[int], nn.Module]:
    """A transformers image classifier from a small random config: resnet, convnext or vit."""

    def make(size: int) -> nn.Module:
        import transformers as hf

        if kind == "resnet":
            config = hf.ResNetConfig(
                embedding_size=16,
                hidden_sizes=[16, 32, 64, 128],
                depths=[2, 2, 2, 2],
                layer_type="basic",
                num_labels=10,
            )
            return hf.ResNetForImageClassification(config)
        if kind == "convnext":
            config = hf.ConvNextConfig(
                hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 4, 2], num_labels=10
            )
            return hf.ConvNextForImageClassification(config)
        config = hf.ViTConfig(
            image_size=size,
            patch_size=8,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=128,
            num_labels=10,
        )
        return hf.ViTForImageClassification(config)

    return make


class BasicBlock1d(nn.Module):
    """ResNet basic block over sequences (as in 1-D ResNets for ECG / time series)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cout, 7, stride, 3, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = nn.Conv1d(cout, cout, 7, 1, 3, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv1d(cin, cout, 1, stride, bias=False), nn.BatchNorm1d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet1d(nn.Module):
    """A 1-D ResNet-34 layout (3, 4, 6, 3 blocks), 12 input leads, 5 classes."""

    def __init__(self, leads: int = 12, classes: int = 5, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv1d(leads, width, 15, 2, 7, bias=False), nn.BatchNorm1d(width), nn.ReLU()
        )
        layers, cin = [], width
        for index, depth in enumerate((3, 4, 6, 3)):
            cout = width * 2**index
            for block in range(depth):
                layers.append(BasicBlock1d(cin, cout, 2 if block == 0 and index > 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)).mean(dim=-1))


class ResBlock2d(nn.Module):
    """Pre-activation residual block (GroupNorm, as in diffusion / segmentation U-Nets)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResUNet(nn.Module):
    """A U-Net whose levels are chains of residual blocks, with skip concatenations."""

    def __init__(self, channels: int = 3, classes: int = 2, width: int = 16, levels: int = 3):
        super().__init__()
        widths = [width * 2**i for i in range(levels)]
        self.stem = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.encoder = nn.ModuleList()
        for index, w in enumerate(widths):
            self.encoder.append(nn.Sequential(ResBlock2d(w), ResBlock2d(w)))
            if index + 1 < levels:
                self.down.append(nn.Conv2d(w, widths[index + 1], 3, stride=2, padding=1))
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for w_low, w in zip(widths[::-1], widths[-2::-1]):
            self.up.append(nn.ConvTranspose2d(w_low, w, 2, stride=2))
            self.merge.append(nn.Conv2d(2 * w, w, 1))
            self.decoder.append(nn.Sequential(ResBlock2d(w), ResBlock2d(w)))
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        skips = []
        for index, level in enumerate(self.encoder):
            h = level(h)
            if index < len(self.down):
                skips.append(h)
                h = self.down[index](h)
        for up, merge, level in zip(self.up, self.merge, self.decoder):
            h = level(merge(torch.cat([up(h), skips.pop()], dim=1)))
        return self.head(h)


def _hand(cls: type[nn.Module]) -> Callable[[int], nn.Module]:
    return lambda size: cls()


TV, TIMM, HF, HAND = "torchvision", "timm", "transformers", "hand-written"
CLS = "classification"

ZOO: list[ZooModel] = [
    # torchvision classification
    ZooModel("resnet18", TV, CLS, _torchvision("resnet18")),
    ZooModel("resnet34", TV, CLS, _torchvision("resnet34")),
    ZooModel("resnet50", TV, CLS, _torchvision("resnet50")),
    ZooModel("resnext50_32x4d", TV, CLS, _torchvision("resnext50_32x4d")),
    ZooModel("mobilenet_v2", TV, CLS, _torchvision("mobilenet_v2")),
    ZooModel("mobilenet_v3_large", TV, CLS, _torchvision("mobilenet_v3_large")),
    ZooModel("mnasnet1_0", TV, CLS, _torchvision("mnasnet1_0")),
    ZooModel("efficientnet_b0", TV, CLS, _torchvision("efficientnet_b0")),
    # A 1x1 last stage at 32x32 makes train-mode BatchNorm over 2 samples ill-conditioned
    # (efficientnet_v2_s there: one rounding of the stage inputs moves the reference's
    # gradients by 2.5e-7; at 64x64 by 1.8e-13).
    ZooModel("efficientnet_v2_s", TV, CLS, _torchvision("efficientnet_v2_s"), check_size=64),
    ZooModel("regnet_y_400mf", TV, CLS, _torchvision("regnet_y_400mf"), check_size=64),
    ZooModel("regnet_x_400mf", TV, CLS, _torchvision("regnet_x_400mf"), check_size=64),
    ZooModel("convnext_tiny", TV, CLS, _torchvision("convnext_tiny")),
    ZooModel("vit_b_16", TV, CLS, _torchvision("vit_b_16", sized=True)),
    ZooModel("swin_t", TV, CLS, _torchvision("swin_t")),
    ZooModel("densenet121", TV, CLS, _torchvision("densenet121")),
    # torchvision video, segmentation, detection backbone
    ZooModel("r3d_18", TV, "video", _torchvision("r3d_18"), 32, 112, _video_shape),
    ZooModel("r2plus1d_18", TV, "video", _torchvision("r2plus1d_18"), 32, 112, _video_shape),
    ZooModel(
        "fcn_resnet50", TV, "segmentation", _torchvision("fcn_resnet50", weights_backbone=None)
    ),
    ZooModel(
        "deeplabv3_resnet50",
        TV,
        "segmentation",
        _torchvision("deeplabv3_resnet50", weights_backbone=None),
    ),
    ZooModel("resnet50_fpn_backbone", TV, "detection backbone", _fpn_backbone),
    # timm classification
    ZooModel("resnet26t", TIMM, CLS, _timm("resnet26t")),
    ZooModel("resnet50d", TIMM, CLS, _timm("resnet50d")),
    ZooModel("resnetv2_50", TIMM, CLS, _timm("resnetv2_50")),
    ZooModel("ecaresnet26t", TIMM, CLS, _timm("ecaresnet26t")),
    ZooModel("seresnext26d_32x4d", TIMM, CLS, _timm("seresnext26d_32x4d")),
    ZooModel("skresnet18", TIMM, CLS, _timm("skresnet18")),
    ZooModel("resnest14d", TIMM, CLS, _timm("resnest14d")),
    ZooModel("res2net50_26w_4s", TIMM, CLS, _timm("res2net50_26w_4s")),
    ZooModel("dla34", TIMM, CLS, _timm("dla34")),
    ZooModel("cspresnet50", TIMM, CLS, _timm("cspresnet50")),
    ZooModel("hrnet_w18_small", TIMM, CLS, _timm("hrnet_w18_small"), check_size=64),
    ZooModel("nf_resnet26", TIMM, CLS, _timm("nf_resnet26")),
    ZooModel("nfnet_l0", TIMM, CLS, _timm("nfnet_l0")),
    ZooModel("rexnet_100", TIMM, CLS, _timm("rexnet_100")),
    ZooModel("regnetx_002", TIMM, CLS, _timm("regnetx_002"), check_size=64),
    ZooModel("mobilenetv3_large_100", TIMM, CLS, _timm("mobilenetv3_large_100")),
    ZooModel("efficientnet_b0_timm", TIMM, CLS, _timm("efficientnet_b0")),
    ZooModel("ghostnetv2_100", TIMM, CLS, _timm("ghostnetv2_100"), check_size=64),
    ZooModel("repvgg_a0", TIMM, CLS, _timm("repvgg_a0")),
    ZooModel("convnext_nano", TIMM, CLS, _timm("convnext_nano")),
    ZooModel("convnextv2_atto", TIMM, CLS, _timm("convnextv2_atto")),
    ZooModel("poolformer_s12", TIMM, CLS, _timm("poolformer_s12")),
    ZooModel("edgenext_xx_small", TIMM, CLS, _timm("edgenext_xx_small"), check_size=64),
    ZooModel("mobilevit_xxs", TIMM, CLS, _timm("mobilevit_xxs"), check_size=64),
    ZooModel("vit_small_patch16_224", TIMM, CLS, _timm("vit_small_patch16_224", sized=True)),
    ZooModel("deit_tiny_patch16_224", TIMM, CLS, _timm("deit_tiny_patch16_224", sized=True)),
    ZooModel("mixer_s16_224", TIMM, CLS, _timm("mixer_s16_224", sized=True)),
    ZooModel("coat_lite_tiny", TIMM, CLS, _timm("coat_lite_tiny", sized=True)),
    ZooModel("twins_svt_small", TIMM, CLS, _timm("twins_svt_small", sized=True)),
    ZooModel("levit_128s", TIMM, CLS, _timm("levit_128s", sized=True), check_size=64),
    # transformers, from small random configs
    ZooModel("ResNetForImageClassification", HF, CLS, _hf("resnet")),
    ZooModel("ConvNextForImageClassification", HF, CLS, _hf("convnext")),
    ZooModel("ViTForImageClassification", HF, CLS, _hf("vit")),
    # hand-written
    ZooModel(
        "resnet1d_34",
        HAND,
        "1-D (12-lead signals)",
        _hand(ResNet1d),
        256,
        2048,
        lambda size: (BATCH, 12, size),
    ),
    ZooModel("res_unet", HAND, "segmentation", _hand(ResUNet), 32, 128),
]
