"""``revcompile.inline``: a converted model flattened into a plain GraphModule.

The inlined module must compute bit for bit what the converted one computes
under ``reference_mode()`` -- outputs, gradients and BatchNorm statistics, in
eval and in training mode -- keep the converted model's parameter and buffer
names, and be loadable where revcompile cannot be imported.
"""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from models import cifar_resnet
from torch import fx

import revcompile
from revcompile.runtime import CheckpointedSegment, ReversibleSequence

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = [
    {"policy": "checkpoint", "split": "halve", "leftover": "store"},
    {"policy": "store", "split": "halve", "leftover": "store"},
    {"policy": "checkpoint", "split": "duplicate", "leftover": "store"},
    {"policy": "store", "split": "duplicate", "leftover": "half"},
    {"policy": "checkpoint", "split": "halve", "leftover": "half"},
]
MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64)),
    "cifar_resnet20": (lambda: cifar_resnet(20), (2, 3, 32, 32)),
}


def _config_id(config: dict[str, str]) -> str:
    return "-".join(config.values())


def _converted(model_name: str, config: dict[str, str]) -> tuple[fx.GraphModule, torch.Tensor]:
    factory, shape = MODELS[model_name]
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    gm = revcompile.convert(factory().double(), x, **config)
    assert any(isinstance(m, ReversibleSequence) for m in gm.modules())
    return gm, x


def _revcompile_modules(module: torch.nn.Module) -> list[str]:
    return [
        name
        for name, m in module.named_modules()
        if type(m).__module__.startswith("revcompile")
        or isinstance(m, ReversibleSequence | CheckpointedSegment)
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_same_function_in_eval_and_training(model_name: str, config: dict[str, str]) -> None:
    gm, x = _converted(model_name, config)
    flat = revcompile.inline(gm)
    assert isinstance(flat, fx.GraphModule)
    assert _revcompile_modules(flat) == []
    assert sorted(flat.state_dict()) == sorted(gm.state_dict())  # in graph order

    gm.eval()
    flat.eval()
    with torch.no_grad(), revcompile.reference_mode():
        assert torch.equal(flat(x), gm(x))

    gm.train()
    flat.train()
    for _ in range(2):  # the second step sees the updated running statistics
        with revcompile.reference_mode():
            want = gm(x)
        got = flat(x)
        assert torch.equal(got, want)
        want.square().sum().backward()
        got.square().sum().backward()
    grads = dict(flat.named_parameters())
    for name, p in gm.named_parameters():
        assert torch.equal(grads[name].grad, p.grad), name
    state = flat.state_dict()
    for name, want_t in gm.state_dict().items():
        assert torch.equal(state[name], want_t), name


def test_the_copy_is_independent_and_keeps_the_mode() -> None:
    gm, x = _converted("cifar_resnet20", CONFIGS[0])
    gm.eval()
    flat = revcompile.inline(gm)
    assert not flat.training
    before = copy.deepcopy(gm.state_dict())
    flat.train()
    flat(x).sum().backward()
    with torch.no_grad():
        for p in flat.parameters():
            p.add_(1.0)
    for name, t in gm.state_dict().items():
        assert torch.equal(t, before[name]), name


_LOAD_WITHOUT_REVCOMPILE = """
import pickle, sys
sys.modules["revcompile"] = None  # any import of revcompile now raises ImportError
sys.path.insert(0, sys.argv[2])
import torch
with open(sys.argv[1], "rb") as f:
    flat, x, want = pickle.load(f)
assert not any(type(m).__module__.startswith("revcompile") for m in flat.modules())
flat.eval()
with torch.no_grad():
    assert torch.equal(flat(x), want)
print("ok")
"""


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_loads_and_runs_where_revcompile_is_not_importable(model_name: str, tmp_path: Path) -> None:
    gm, x = _converted(model_name, CONFIGS[0])
    gm.eval()
    with torch.no_grad():
        want = gm(x)
    path = tmp_path / "flat.pkl"
    path.write_bytes(pickle.dumps((revcompile.inline(gm), x, want)))
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_REVCOMPILE, str(path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
