"""Model sources, and saving / loading converted models.

Model sources (what ``revcompile convert SRC`` accepts), see :func:`load_source`:

* ``package.module:factory`` -- a callable that returns an ``nn.Module``
  (``torchvision.models:resnet50``), called with keyword arguments, optionally
  followed by loading a ``state_dict`` file with ``torch.load(weights_only=True)``
  (tensors only, no code runs);
* a file holding a whole pickled ``nn.Module`` (``torch.save(model, path)`` or
  ``pickle.dump``). Unpickling runs code named in the file, so such a file is
  loaded only with ``trust_pickle=True``.

Converted models, see :func:`save` and :func:`load`: a revcompile file is a
``torch.save`` archive of a dict with a format tag, the converted
``torch.fx.GraphModule`` (its generated Python code, submodules, parameters and
buffers) and the conversion report as plain data. **Loading a revcompile file
unpickles it: the file's code runs.** Load only files you wrote yourself or
otherwise trust, exactly as with ``torch.load(weights_only=False)``.

Every bad input raises :class:`SourceError` (for model sources) or
:class:`RevcompileFileError` (for ``load``) with a one-sentence message naming
the problem and what to do.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import pickle
import pickletools
import re
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from revcompile._version import __version__
from revcompile.conversion_report import ConversionReport
from revcompile.errors import RevcompileFileError, SourceError
from revcompile.report_builder import attach_report, report

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "RevcompileFileError",
    "SourceError",
    "atomic_write",
    "load",
    "load_source",
    "probe_writable",
    "save",
]

#: Format tag stored in every revcompile file.
FORMAT = "revcompile.GraphModule"
#: Version of the file layout; ``load`` refuses newer versions.
FORMAT_VERSION = 1

_SPEC = re.compile(
    r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.\w+)*)$"
)
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80


# --------------------------------------------------------------------------
# Model sources
# --------------------------------------------------------------------------


def is_factory_spec(spec: str) -> bool:
    """True if ``spec`` reads as ``package.module:factory`` and is not an existing path."""
    return not os.path.exists(spec) and _SPEC.match(spec) is not None


def load_source(
    spec: str | os.PathLike[str],
    *,
    kwargs: Mapping[str, Any] | None = None,
    weights: str | os.PathLike[str] | None = None,
    trust_pickle: bool = False,
) -> nn.Module:
    """Build or load the ``nn.Module`` that ``spec`` names.

    Args:
        spec: ``"package.module:factory"`` (``factory`` may be a dotted attribute
            path such as ``Class.build``) or the path of a file holding a whole
            pickled ``nn.Module``. An existing path always wins.
        kwargs: keyword arguments for the factory (factory sources only).
        weights: a ``state_dict`` file loaded with ``torch.load(weights_only=True)``
            (no code runs) and applied with ``load_state_dict(strict=True)``
            (factory sources only).
        trust_pickle: allow unpickling a whole-module file. Unpickling imports
            and calls whatever the file names, so pass it only for files you trust.

    Returns:
        The module, on CPU, in the mode the factory or file left it in.

    Raises:
        SourceError: for every bad input (missing or empty file, a directory, a
            truncated or corrupt file, an untrusted pickle, a pickle that is not
            an ``nn.Module``, a ``state_dict`` given as the model, an unknown
            module or factory, a factory that raises or returns something else,
            weights that do not fit the model).
    """
    text = os.fspath(spec)
    if is_factory_spec(text):
        model = _from_factory(text, dict(kwargs or {}))
        if weights is not None:
            _load_weights(model, weights)
        return model
    if kwargs or weights is not None:
        raise SourceError(
            f"{text}: --kwargs and --weights apply only to a factory source "
            "(package.module:factory); a model file already holds its weights"
        )
    return _from_file(text, trust_pickle=trust_pickle)


def _check_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        looks_like_spec = ":" in path and not os.path.dirname(path)
        hint = (
            "; a factory is written package.module:factory (a Python import path)"
            if looks_like_spec
            else "; check the path, or give a factory as package.module:factory"
        )
        raise SourceError(f"{what} {path} does not exist{hint}")
    if os.path.isdir(path):
        raise SourceError(f"{what} {path} is a directory; give the file inside it")
    if os.path.getsize(path) == 0:
        raise SourceError(f"{what} {path} is an empty file (an interrupted save?); save it again")


def _corrupt(path: str, what: str, error: BaseException | None = None) -> SourceError:
    detail = f" ({type(error).__name__}: {_first_line(error)})" if error is not None else ""
    return SourceError(
        f"{what} {path} is truncated or corrupt{detail}; save it again with torch.save"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _from_file(path: str, *, trust_pickle: bool) -> nn.Module:
    what = "model file"
    _check_file(path, what)
    with open(path, "rb") as f:
        head = f.read(4)
    if head == _ZIP_MAGIC and not zipfile.is_zipfile(path):
        raise SourceError(
            f"{what} {path} is a truncated PyTorch archive (its zip directory is missing, "
            "as after an interrupted save); save it again with torch.save"
        )
    if head != _ZIP_MAGIC and head[0] != _PICKLE_PROTO:
        raise SourceError(
            f"{what} {path} is neither a torch.save archive nor a pickle; give a file written "
            "with torch.save(model, path), or a factory as package.module:factory"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise SourceError(
                f"{what} {path} holds pickled Python objects (a whole model), and unpickling "
                "runs code named in the file; pass --trust-pickle (trust_pickle=True) only if "
                "you trust its origin, or save model.state_dict() and give a factory with "
                "--weights"
            ) from None
        obj = _unpickle(path, what)
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as error:
        raise _corrupt(path, what, error) from error
    if isinstance(obj, nn.Module):
        obj.cpu()
        return obj
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        raise SourceError(
            f"{what} {path} is already a revcompile file; load it with revcompile.load() "
            "instead of converting it again"
        )
    if _is_state_dict(obj):
        raise SourceError(
            f"{what} {path} holds a state_dict (parameter tensors), not a model; give the "
            "model's factory as SRC (package.module:factory) and this file with --weights"
        )
    raise SourceError(
        f"{what} {path} holds a {type(obj).__module__}.{type(obj).__qualname__}, not an "
        "nn.Module; save the model itself with torch.save(model, path)"
    )


def _unpickle(path: str, what: str) -> Any:
    """Full unpickling (code runs): torch.save archives, legacy torch files, plain pickles."""
    if zipfile.is_zipfile(path) or _is_legacy_torch_file(path):
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
            raise _corrupt(path, what, e) from e
        except (AttributeError, ImportError) as error:
            raise _missing_class(path, what, error) from error
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except (AttributeError, ImportError) as error:
        raise _missing_class(path, what, error) from error
    except Exception as error:
        raise _corrupt(path, what, error) from error


def _is_legacy_torch_file(path: str) -> bool:
    """True if ``path`` starts with torch's pre-zip magic number, read without unpickling
    (a plain ``pickle.dump`` starts with the object itself)."""
    with open(path, "rb") as f:
        try:
            for opcode, arg, _ in pickletools.genops(f):
                if opcode.name != "PROTO":
                    return arg == torch.serialization.MAGIC_NUMBER
        except ValueError:  # not a pickle opcode stream
            return False
    return False


def _missing_class(path: str, what: str, error: BaseException) -> SourceError:
    return SourceError(
        f"{what} {path} names a class or module that cannot be imported "
        f"({type(error).__name__}: {_first_line(error)}); make the model's code importable "
        "(install it or add it to PYTHONPATH)"
    )


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _from_factory(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    module_name, attr_path = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise SourceError(
                f"no module named {missing!r} (from source {spec}); check the spelling, "
                "install the package, or add its directory to PYTHONPATH"
            ) from None
        raise SourceError(
            f"importing {module_name} failed: it needs module {missing!r}, which is not "
            "installed; install it"
        ) from error
    except Exception as error:
        raise SourceError(
            f"importing {module_name} raised {type(error).__name__}: {_first_line(error)}; "
            "fix the module or choose another source"
        ) from error
    factory: Any = module
    for part in attr_path.split("."):
        if not hasattr(factory, part):
            names = [n for n in dir(factory) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise SourceError(
                f"{module_name} has no attribute {attr_path!r} (source {spec}){hint}"
                + ("" if close else "; check the factory name")
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise SourceError(
            f"{spec} is a {type(factory).__name__}, not a callable; name a function or class "
            "that returns an nn.Module"
        )
    try:
        model = factory(**kwargs)
    except Exception as error:
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise SourceError(
            f"{spec}({args}) raised {type(error).__name__}: {_first_line(error)}; "
            "check --kwargs against the factory's signature"
        ) from error
    if not isinstance(model, nn.Module):
        raise SourceError(
            f"{spec} returned a {type(model).__qualname__}, not an nn.Module; name a factory "
            "that builds the model"
        )
    return model


def _load_weights(model: nn.Module, weights: str | os.PathLike[str]) -> None:
    path = os.fspath(weights)
    what = "weights file"
    _check_file(path, what)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SourceError(
            f"{what} {path} holds Python objects, not just tensors; save model.state_dict() "
            "with torch.save and pass that file"
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as error:
        raise _corrupt(path, what, error) from error
    if not _is_state_dict(state):
        nested = (
            [k for k, v in state.items() if _is_state_dict(v)] if isinstance(state, Mapping) else []
        )
        hint = (
            f"; it contains a state_dict under key {nested[0]!r}: save that one alone"
            if nested
            else "; save model.state_dict() with torch.save and pass that file"
        )
        raise SourceError(f"{what} {path} is not a state_dict{hint}")
    result = model.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[0]})")
    if result.unexpected_keys:
        problems.append(
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[0]})"
        )
    if problems:
        raise SourceError(
            f"{what} {path} does not fit the model: {', '.join(problems)}; check the factory "
            "and --kwargs (e.g. num_classes) it was trained with"
        )


# --------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------


def probe_writable(path: str | os.PathLike[str]) -> None:
    """Check that a file can be created at ``path``, by creating (and removing) a
    temporary file next to it. Root ignores permission bits, so ``os.access``
    cannot answer this.

    Raises:
        FileNotFoundError: the directory of ``path`` does not exist.
        NotADirectoryError: a parent of ``path`` is not a directory.
        IsADirectoryError: ``path`` is a directory.
        PermissionError / OSError: the directory is not writable.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory")
    directory = target.parent
    if not directory.exists():
        raise FileNotFoundError(f"directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".probe")
    os.close(fd)
    os.unlink(tmp)


def atomic_write(path: str | os.PathLike[str], write: Any) -> None:
    """Write a file atomically: ``write(f)`` fills a temporary file in the same
    directory, which is flushed to disk and renamed over ``path`` with
    ``os.replace``. If anything fails or the process is interrupted before the
    rename, ``path`` is untouched (old content or absent) and the temporary file
    is removed (only a killed process can leave a hidden ``.NAME.*.tmp`` file,
    never a broken ``path``).
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory")
    mode = _new_file_mode(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _new_file_mode(target: Path) -> int:
    """Permissions for the written file: those of the file it replaces, else the
    usual ``0o666 & ~umask`` (``mkstemp`` creates 0o600)."""
    if target.exists():
        return target.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# --------------------------------------------------------------------------
# Converted models
# --------------------------------------------------------------------------


def save(gm: GraphModule, path: str | os.PathLike[str]) -> None:
    """Write the converted model ``gm`` (from ``revcompile.convert``) to ``path``.

    The file is a ``torch.save`` archive of ``{"format", "format_version",
    "revcompile_version", "torch_version", "module": gm, "report":
    report(gm).to_dict()}``, written atomically (:func:`atomic_write`): an
    interrupted save never leaves a broken ``path``. ``load(path)`` gives back a
    GraphModule with the same code, parameters, buffers, training mode and
    report.

    Raises:
        ValueError: ``gm`` has no revcompile report (was not made by ``convert``).
        OSError: the directory is missing or not writable.
    """
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "revcompile_version": __version__,
        "torch_version": torch.__version__,
        "module": gm,
        "report": report(gm).to_dict(),
    }
    atomic_write(path, lambda f: torch.save(payload, f))


def load(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> GraphModule:
    """Load a converted model written by :func:`save` (or ``revcompile convert``).

    **This unpickles the file** (``torch.load(weights_only=False)``): the
    GraphModule's generated code is executed and the classes the file names
    are imported. Load only files you trust.

    The report is attached again, so ``revcompile.report(gm)`` works.

    Raises:
        FileNotFoundError / IsADirectoryError: ``path`` is missing or a directory.
        RevcompileFileError: the file is empty, truncated, not a revcompile file,
            or written by a newer revcompile.
    """
    target = Path(path)
    if not target.exists():
        raise FileNotFoundError(f"{target} does not exist")
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory, not a revcompile file")
    if target.stat().st_size == 0 or not zipfile.is_zipfile(target):
        raise RevcompileFileError(
            f"{target} is not a revcompile file (empty, truncated or another format); "
            "write it with revcompile.save or `revcompile convert`"
        )
    try:
        payload = torch.load(target, map_location=map_location, weights_only=False)
    except (AttributeError, ImportError) as error:
        raise RevcompileFileError(
            f"{target} names code that cannot be imported ({type(error).__name__}: "
            f"{_first_line(error)}); install the packages of the original model"
        ) from error
    except Exception as error:
        raise RevcompileFileError(
            f"{target} cannot be read ({type(error).__name__}: {_first_line(error)})"
        ) from error
    if not (isinstance(payload, Mapping) and payload.get("format") == FORMAT):
        raise RevcompileFileError(
            f"{target} is a PyTorch file but not a revcompile file; convert the model with "
            "`revcompile convert` first"
        )
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise RevcompileFileError(
            f"{target} was written by revcompile {payload.get('revcompile_version')} (file "
            f"format {payload['format_version']}); upgrade revcompile to load it"
        )
    gm = payload["module"]
    attach_report(gm, ConversionReport.from_dict(payload["report"]))
    return gm
