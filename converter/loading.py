"""Load a model from a ``file.py:factory`` / ``package.module:factory`` spec and a weights file."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pathlib
import sys
from collections.abc import Mapping

import torch
from torch import nn

from tinyrt.errors import ConversionError

WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")
_LISTED = 10


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def _import_file(path: pathlib.Path) -> object:
    """Import a Python file as a module; its directory is on sys.path while it runs."""
    if not path.is_file():
        raise ConversionError(f"model file {str(path)!r} does not exist")
    name = f"_tinyrt_model_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ConversionError(f"importing model file {str(path)!r} failed: {exc!r}") from exc
    finally:
        sys.path.remove(str(path.resolve().parent))
    return module


def _import_module(name: str) -> object:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise ConversionError(
                f"cannot find module {name!r} (is it installed, or on PYTHONPATH?)"
            ) from exc
        raise ConversionError(f"importing module {name!r} failed: {exc!r}") from exc
    except Exception as exc:
        raise ConversionError(f"importing module {name!r} failed: {exc!r}") from exc


def load_model(model_spec: str) -> nn.Module:
    """Build the model named by ``path/to/file.py:factory`` or ``package.module:factory``.

    ``factory`` is a class or function called with no arguments; it must return an nn.Module.
    """
    location, sep, attribute = model_spec.rpartition(":")
    if not sep or not location or not attribute:
        raise ConversionError(
            f"model spec {model_spec!r} must look like path/to/file.py:Factory or "
            "package.module:Factory"
        )
    if location.endswith(".py"):
        module = _import_file(pathlib.Path(location))
    else:
        module = _import_module(location)
    if not hasattr(module, attribute):
        defined = sorted(
            k
            for k, v in vars(module).items()
            if callable(v)
            and not k.startswith("_")
            and getattr(v, "__module__", None) == module.__name__
        )
        raise ConversionError(
            f"{location!r} has no attribute {attribute!r}; it defines: {_listing(defined)}"
        )
    factory = getattr(module, attribute)
    try:
        model = factory()
    except Exception as exc:
        raise ConversionError(
            f"calling {model_spec}() failed: {exc!r}; the factory must take no arguments"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ConversionError(
            f"{model_spec}() returned {type(model).__name__}, expected a torch.nn.Module"
        )
    return model


def load_weights(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a state dict from ``.pt``/``.pth`` (``torch.load(weights_only=True)``: no arbitrary
    unpickling) or ``.safetensors``; return it and its provenance (file name and sha256)."""
    file = pathlib.Path(path)
    if file.suffix not in WEIGHT_SUFFIXES:
        raise ConversionError(
            f"weights file {path!r} has an unknown extension {file.suffix!r}; expected "
            f"{', '.join(WEIGHT_SUFFIXES)}"
        )
    if not file.is_file():
        raise ConversionError(f"weights file {path!r} does not exist")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = next(
            (line.strip() for line in str(exc).splitlines() if "WeightsUnpickler" in line), exc
        )
        raise ConversionError(
            f"cannot load weights file {path!r}: {reason}\n(.pt/.pth files are read with "
            "torch.load(weights_only=True), which refuses pickled objects other than tensors "
            "and plain containers; save model.state_dict())"
        ) from exc
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ConversionError(
            f"weights file {path!r} does not hold a state dict (a mapping of names to tensors); "
            "save it with torch.save(model.state_dict(), path)"
        )
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    return dict(state), {"file": file.name, "sha256": digest}


def apply_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state, strict=True)``, with mismatches explained by key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {list(state[k].shape)}, model {list(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = [
        f"{label} ({len(keys)}): {_listing(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        raise ConversionError(
            f"the weights in {source} do not match the model {type(model).__name__}:\n"
            + "\n".join(problems)
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConversionError(f"loading the weights in {source} failed: {exc}") from exc
