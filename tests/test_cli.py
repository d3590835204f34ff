"""The ``revcompile`` command line, run as separate processes, and revcompile.io.

Every bad input of issue 6 goes through a real process: one genuine
``python -m revcompile.cli`` run (torchvision ResNet-18, the happy path) and
one batch of forked ``python -m revcompile.cli`` equivalents sharing a single
torch import (``tests/cli_runner.py``), because importing torch costs seconds
per process. For each case: exit code (2 usage, 1 conversion failure), a
single ``revcompile: error:`` line on stderr with the key phrase, no traceback,
and the pre-existing OUT, SRC and the output directory left exactly as they were.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import cli_factories
import models
import pytest
import torch

import revcompile
from revcompile import io as rio
from revcompile.api import convert, report

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
INPUT = "2,3,32,32"
SENTINEL = b"previous content of OUT, must survive every failed run\n"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(directory: Path) -> dict[str, str]:
    return {p.name: _digest(p) for p in sorted(directory.iterdir()) if p.is_file()}


def _readonly_dir(base: Path) -> Path | None:
    """A directory this process cannot create files in: chmod 555 for a normal
    user; root ignores permission bits, so fall back to sysfs, which refuses
    new files."""
    ro = base / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    for candidate in (ro, Path("/sys")):
        try:
            rio.probe_writable(candidate / "probe.pt")
        except OSError:
            return candidate
    return None


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Inputs of every case, in ``src/``; outputs go to ``out/``."""
    base = tmp_path_factory.mktemp("cli")
    src, out = base / "src", base / "out"
    src.mkdir()
    out.mkdir()
    torch.manual_seed(0)
    model = cli_factories.small_resnet()
    paths = {
        "base": base,
        "src": src,
        "out": out,
        "model": src / "model.pt",
        "state_dict": src / "state_dict.pt",
        "not_module": src / "not_module.pt",
        "empty": src / "empty.pt",
        "truncated": src / "truncated.pt",
        "truncated_pickle": src / "truncated.pkl",
        "wrong_weights": src / "wrong_weights.pt",
        "directory": src / "a_directory",
        "sentinel": out / "existing.pt",
        "resnet18_weights": base / "resnet18_sd.pt",
    }
    torch.save(model, paths["model"])
    torch.save(model.state_dict(), paths["state_dict"])
    torch.save({"epoch": 3, "lr": [0.1, 0.01]}, paths["not_module"])
    paths["empty"].touch()
    whole = paths["model"].read_bytes()
    paths["truncated"].write_bytes(whole[: len(whole) // 2])
    pickled = pickle.dumps(model)
    paths["truncated_pickle"].write_bytes(pickled[: len(pickled) // 2])
    torch.save(torch.nn.Linear(3, 3).state_dict(), paths["wrong_weights"])
    paths["directory"].mkdir()
    paths["sentinel"].write_bytes(SENTINEL)
    paths["readonly"] = _readonly_dir(base)
    return paths


FACTORY = "cli_factories:small_resnet"

#: name -> (argv with {placeholders} for the paths of ``files``, exit code,
#: phrases the one error line must contain). OUT is a pre-existing file that must
#: survive every case byte for byte.
BAD_CASES: dict[str, tuple[list[str], int, list[str]]] = {
    "missing path": (["convert", "{src}/nope.pt", "-o", "{sentinel}"], 2, ["does not exist"]),
    "directory": (["convert", "{directory}", "-o", "{sentinel}"], 2, ["is a directory"]),
    "empty file": (["convert", "{empty}", "-o", "{sentinel}"], 2, ["empty file"]),
    "truncated archive": (
        ["convert", "{truncated}", "-o", "{sentinel}", "--trust-pickle"],
        2,
        ["truncated"],
    ),
    "truncated pickle": (
        ["convert", "{truncated_pickle}", "-o", "{sentinel}", "--trust-pickle"],
        2,
        ["truncated or corrupt"],
    ),
    "pickle of a non-module": (
        ["convert", "{not_module}", "-o", "{sentinel}", "--trust-pickle"],
        2,
        ["not an nn.Module"],
    ),
    "whole module without --trust-pickle": (
        ["convert", "{model}", "-o", "{sentinel}"],
        2,
        ["runs code", "--trust-pickle"],
    ),
    "state_dict as SRC": (
        ["convert", "{state_dict}", "-o", "{sentinel}", "--trust-pickle"],
        2,
        ["state_dict", "--weights"],
    ),
    "unknown module": (
        ["convert", "no_such_package.models:resnet", "-o", "{sentinel}"],
        2,
        ["no module named 'no_such_package'"],
    ),
    "unknown factory": (
        ["convert", "cli_factories:small_resnett", "-o", "{sentinel}"],
        2,
        ["has no attribute", "did you mean small_resnet"],
    ),
    "factory not callable": (
        ["convert", "cli_factories:NOT_CALLABLE", "-o", "{sentinel}"],
        2,
        ["not a callable"],
    ),
    "factory returns a non-module": (
        ["convert", "cli_factories:not_a_module", "-o", "{sentinel}"],
        2,
        ["not an nn.Module"],
    ),
    "factory raises": (
        ["convert", "cli_factories:broken", "-o", "{sentinel}"],
        2,
        ["raised RuntimeError", "simulated failure"],
    ),
    "factory rejects --kwargs": (
        ["convert", FACTORY, "-o", "{sentinel}", "--kwargs", '{{"depth": 3}}'],
        2,
        ["unexpected keyword", "--kwargs"],
    ),
    "model fx cannot trace": (
        ["convert", "cli_factories:untraceable", "-o", "{sentinel}"],
        1,
        ["cannot trace DataDependentNet"],
    ),
    "malformed --input-shape": (
        ["convert", FACTORY, "-o", "{sentinel}", "--input-shape", "2,3,x,32"],
        2,
        ["malformed --input-shape"],
    ),
    "malformed --kwargs": (
        ["convert", FACTORY, "-o", "{sentinel}", "--kwargs", "{{num_classes: 3}}"],
        2,
        ["malformed --kwargs"],
    ),
    "--kwargs not an object": (
        ["convert", FACTORY, "-o", "{sentinel}", "--kwargs", "[3]"],
        2,
        ["JSON object"],
    ),
    "input shape the model rejects": (
        ["convert", FACTORY, "-o", "{sentinel}", "--input-shape", "2,5,32,32"],
        1,
        ["rejects example inputs", "--input-shape"],
    ),
    "OUT equal to SRC": (
        ["convert", "{model}", "-o", "{model}", "--trust-pickle"],
        2,
        ["same file as SRC"],
    ),
    "OUT in a missing directory": (
        ["convert", FACTORY, "-o", "{out}/missing/model.pt"],
        2,
        ["does not exist", "mkdir"],
    ),
    "OUT in a read-only directory": (
        ["convert", FACTORY, "-o", "{readonly}/model.pt"],
        2,
        ["cannot write"],
    ),
    "OUT is a directory": (["convert", FACTORY, "-o", "{out}"], 2, ["is a directory"]),
    "weights that do not fit": (
        ["convert", FACTORY, "-o", "{sentinel}", "--weights", "{wrong_weights}"],
        2,
        ["does not fit the model", "missing keys"],
    ),
    "--report equal to --weights": (
        ["convert", FACTORY, "-o", "{sentinel}", "--weights", "{state_dict}"]
        + ["--report", "{state_dict}"],
        2,
        ["same file as --weights"],
    ),
    "malformed --budget": (
        ["inspect", FACTORY, "--input-shape", INPUT, "--budget", "12XB"],
        2,
        ["malformed --budget"],
    ),
    "--budget without --input-shape": (
        ["inspect", FACTORY, "--budget", "1GB"],
        2,
        ["--budget needs --input-shape"],
    ),
}

GOOD_CASES: dict[str, list[str]] = {
    "convert pickled module": (
        ["convert", "{model}", "--trust-pickle", "-o", "{out}/from_pickle.pt"]
        + ["--input-shape", INPUT]
    ),
    "convert factory with weights": (
        ["convert", FACTORY, "--weights", "{state_dict}", "-o", "{out}/from_factory.pt"]
        + ["--policy", "store", "--leftover", "half", "--report", "{out}/report.json"]
        + ["--split", "halve", "--frontend", "shapes", "--input-shape", INPUT]
    ),
    "inspect --json": ["inspect", FACTORY, "--input-shape", INPUT, "--budget", "1GiB", "--json"],
    "inspect": ["inspect", FACTORY, "--input-shape", INPUT, "--budget", "24GB"],
    "inspect without shape": ["inspect", FACTORY],
    "debug traceback": ["convert", "cli_factories:untraceable", "-o", "{sentinel}", "--debug"],
}


def _argv(template: list[str], files: dict[str, Path]) -> list[str]:
    return [part.format(**files) for part in template]


@pytest.fixture(scope="module")
def src_digests(files: dict[str, Path]) -> dict[str, str]:
    """Digests of the input files before any case runs."""
    return _snapshot(files["src"])


@pytest.fixture(scope="module")
def runs(
    files: dict[str, Path], src_digests: dict[str, str]
) -> dict[str, subprocess.CompletedProcess[str]]:
    """All cases: ResNet-18 through a genuine ``python -m revcompile.cli`` process,
    started first so that it overlaps with the batch of the other cases."""
    torch.manual_seed(0)
    resnet18 = pytest.importorskip("torchvision").models.resnet18()
    torch.save(resnet18.state_dict(), files["resnet18_weights"])
    resnet18_argv = [
        "convert",
        "torchvision.models:resnet18",
        "--weights",
        str(files["resnet18_weights"]),
        "--input-shape",
        "2,3,64,64",
        "-o",
        str(files["base"] / "resnet18_rev.pt"),
    ]
    genuine = subprocess.Popen(
        [sys.executable, "-m", "revcompile.cli", *resnet18_argv],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    cases = {
        name: _argv(argv, files)
        for name, (argv, _, _) in BAD_CASES.items()
        if files["readonly"] is not None or "{readonly}" not in " ".join(argv)
    }
    cases.update({name: _argv(argv, files) for name, argv in GOOD_CASES.items()})
    batch = subprocess.run(
        [sys.executable, str(TESTS / "cli_runner.py")],
        input=json.dumps(list(cases.values())),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert batch.returncode == 0, batch.stderr
    results = {
        name: subprocess.CompletedProcess(argv, r["returncode"], r["stdout"], r["stderr"])
        for (name, argv), r in zip(cases.items(), json.loads(batch.stdout))
    }
    stdout, stderr = genuine.communicate(timeout=300)
    results["resnet18"] = subprocess.CompletedProcess(
        resnet18_argv, genuine.returncode, stdout, stderr
    )
    return results


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_bad_input(name: str, runs: dict, files: dict[str, Path]) -> None:
    if name not in runs:
        pytest.skip("no directory this process cannot write to")
    _, code, phrases = BAD_CASES[name]
    result = runs[name]
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("revcompile"), result.stderr
    assert "error:" in lines[0] and "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def test_failed_runs_change_no_file(runs: dict, files: dict[str, Path], src_digests: dict) -> None:
    """OUT (pre-existing), every SRC and the output directory are untouched by
    the failing cases: no partial OUT, no leftover temporary file."""
    assert files["sentinel"].read_bytes() == SENTINEL
    assert _snapshot(files["src"]) == src_digests
    produced = {"existing.pt", "from_pickle.pt", "from_factory.pt", "report.json"}
    assert {p.name for p in files["out"].iterdir()} == produced
    assert not (files["out"] / "missing").exists()


def test_debug_prints_traceback(runs: dict) -> None:
    result = runs["debug traceback"]
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("revcompile: error: cannot convert")


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    for training in (False, True):
        a2, b2 = copy.deepcopy(a).train(training), copy.deepcopy(b).train(training)
        assert torch.equal(a2(x), b2(x))


def test_convert_resnet18_then_load(runs: dict, files: dict[str, Path]) -> None:
    """Genuine ``python -m revcompile.cli`` run: the file loads back into the
    converted model, same weights, same report, identical outputs to an
    in-memory ``convert``."""
    torchvision = pytest.importorskip("torchvision")
    result = runs["resnet18"]
    assert result.returncode == 0, result.stderr
    assert "parameters: 11,689,512 before" in result.stdout
    assert "saved activations at input 2x3x64x64" in result.stdout
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(files["resnet18_weights"], weights_only=True))
    x = torch.randn(2, 3, 64, 64)
    expected = convert(model, x)
    loaded = revcompile.load(files["base"] / "resnet18_rev.pt")
    assert isinstance(loaded, torch.fx.GraphModule)
    assert report(loaded) == report(expected)
    assert str(report(loaded)) in result.stdout
    _same_outputs(loaded, expected, x)


def test_convert_pickled_module_and_factory(runs: dict, files: dict[str, Path]) -> None:
    for name in ("convert pickled module", "convert factory with weights"):
        assert runs[name].returncode == 0, runs[name].stderr
        assert runs[name].stderr == ""
    model = torch.load(files["model"], weights_only=False)
    x = torch.randn(2, 3, 32, 32)
    _same_outputs(revcompile.load(files["out"] / "from_pickle.pt"), convert(model, x), x)
    expected = convert(model, x, policy="store", leftover="half", split="halve", frontend="shapes")
    loaded = revcompile.load(files["out"] / "from_factory.pt")
    _same_outputs(loaded, expected, x)
    written = json.loads((files["out"] / "report.json").read_text())
    assert written == report(expected).to_dict() == report(loaded).to_dict()
    assert any(stage["half"] for stage in written["stages"])


def test_inspect(runs: dict) -> None:
    data = json.loads(runs["inspect --json"].stdout)
    assert runs["inspect --json"].returncode == 0
    memory = data["memory"]
    assert memory["symbols"] == ["B", "H", "W"] and memory["budget_bytes"] == 2**30
    before, after = memory["before"], memory["after"]
    assert before["formula"] and after["formula"]
    assert 0 < after["bytes"] < before["bytes"]
    assert 0 < before["max_batch"] < after["max_batch"]
    assert data["report"]["params_after"] < data["report"]["params_before"]
    text = runs["inspect"].stdout
    assert runs["inspect"].returncode == 0
    assert "largest batch within 22.4 GiB (input 3x32x32)" in text
    assert "before:" in text and "after:" in text
    assert "pass --input-shape" in runs["inspect without shape"].stdout


def test_interrupted_save_leaves_out_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupt in the middle of writing leaves the old OUT and no temp file."""
    x = torch.randn(1, 3, 8, 8)
    gm = convert(models.AddAssignNet(), x)
    out = tmp_path / "model.pt"
    out.write_bytes(SENTINEL)
    real_save = torch.save

    def interrupted(obj: object, f: object) -> None:
        f.write(b"PK\x03\x04 half an archive")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rio.save(gm, out)
    assert out.read_bytes() == SENTINEL
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    monkeypatch.setattr(torch, "save", real_save)
    rio.save(gm, out)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    _same_outputs(rio.load(out), gm, x)


def test_load_rejects_other_files(tmp_path: Path) -> None:
    state = tmp_path / "sd.pt"
    torch.save({"w": torch.zeros(1)}, state)
    (tmp_path / "empty.pt").touch()
    with pytest.raises(rio.RevcompileFileError, match="not a revcompile file"):
        rio.load(state)
    with pytest.raises(rio.RevcompileFileError, match="empty, truncated"):
        rio.load(tmp_path / "empty.pt")
    with pytest.raises(FileNotFoundError):
        rio.load(tmp_path / "nope.pt")
    with pytest.raises(rio.SourceError, match="--weights apply only to a factory"):
        rio.load_source(str(state), weights=state)


UNPICKLED: list[str] = []


class CountedNet(models.PlainNet):
    """Records every unpickling: code named in a pickle runs each time it is loaded."""

    def __setstate__(self, state: dict) -> None:
        UNPICKLED.append(type(self).__name__)
        super().__setstate__(state)


def test_plain_pickle_is_unpickled_once_and_legacy_torch_files_load(tmp_path: Path) -> None:
    plain, legacy = tmp_path / "plain.pkl", tmp_path / "legacy.pt"
    with open(plain, "wb") as f:
        pickle.dump(CountedNet(), f)
    torch.save(models.PlainNet(), legacy, _use_new_zipfile_serialization=False)
    UNPICKLED.clear()
    assert isinstance(rio.load_source(str(plain), trust_pickle=True), CountedNet)
    assert UNPICKLED == ["CountedNet"]
    assert isinstance(rio.load_source(str(legacy), trust_pickle=True), models.PlainNet)


def test_cli_errors_belong_to_the_hierarchy() -> None:
    from revcompile.cli import UsageError, WriteError

    assert issubclass(UsageError, revcompile.RevcompileError)
    assert issubclass(WriteError, revcompile.RevcompileError)
