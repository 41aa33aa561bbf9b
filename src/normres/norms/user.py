"""A researcher's own normalization layer, named in the config's ``norms:`` section.

    norms:
      rms: {class: "examples/norms.py:RMSNorm2d", options: {eps: 1.0e-6}}

The reference is ``path/to/file.py:Class`` (relative to the config file) or ``package.module:Class``
of an installed package. The contract is timm's: ``Class(num_channels, **options)`` returns an
``nn.Module`` whose forward keeps the input's shape and memory format. Before any job starts,
:func:`load_user_norms` imports each layer and probes it on a small batch in train and eval mode, in
both memory layouts, forward and backward; every way a layer can break the contract is one
:class:`~normres.errors.ConfigError` naming the config key.

A hash of the layer's source file goes into each run's settings (editing the file reruns exactly
the runs that use it) and into its model file. Code is only ever imported from a reference the user
gave (config or command line); a model file's record is checked against it, never imported.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from normres import registry as R
from normres.errors import ConfigError

__all__ = ["layer_class", "load_user_norms", "probe", "resolve_reference"]


def _is_file_reference(module: str) -> bool:
    return module.endswith(".py") or "/" in module or os.sep in module


def resolve_reference(ref: str, base_dir: Path) -> tuple[str, Path | None]:
    """``(reference, source file)``: a file path made relative to the working directory (absolute
    when it lies outside), a module reference as it is (its file is found by importing it)."""
    module, sep, attribute = ref.rpartition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"{ref!r} is not of the form 'path/to/file.py:Class' or 'package.module:Class'")
    if not _is_file_reference(module):
        return ref, None
    path = (base_dir / module).resolve()
    if not path.is_file():
        raise ValueError(f"{ref!r}: file {path} does not exist")
    rel = os.path.relpath(path, Path.cwd())
    shown = Path(rel) if not rel.startswith("..") else path
    return f"{shown.as_posix()}:{attribute}", path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.cache
def _import_file(path: Path, sha256: str) -> Any:
    """The module of a user's file, imported once per content (the hash is in the module name)."""
    name = f"normres_user_layers.{path.stem}_{sha256[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import(ref: str) -> tuple[type, str]:
    """The class named by a resolved reference and the sha256 of its source file."""
    module_name, _, attribute = ref.rpartition(":")
    try:
        if _is_file_reference(module_name):
            path = Path(module_name)
            sha = _sha256(path)
            module = _import_file(path.resolve(), sha)
        else:
            module = importlib.import_module(module_name)
            source = inspect.getsourcefile(module)
            if source is None:
                raise ValueError(f"module {module_name!r} has no Python source file to hash")
            sha = _sha256(Path(source))
    except (ValueError, OSError) as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:  # the user's module failed while importing: say how, not where in normres
        raise ValueError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if isinstance(v, type) and not n.startswith("_"))
            raise ValueError(f"{module_name!r} has no class {attribute!r} (it defines: {', '.join(names) or 'no classes'})")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ValueError(f"{ref!r} is not an nn.Module class (got {type(obj).__name__})")
    return obj, sha


def _float32_forward(cls: type) -> type:
    """A subclass of the user's class whose forward runs with autocast off on a float32 input and
    returns the input's dtype: the layer's statistics are float32 however it computes them (as the
    built-in layers'), and its parameters and state-dict keys stay the user's."""

    def forward(self: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not (x.is_floating_point() and x.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type)):
            return cls.forward(self, x, *args, **kwargs)
        with torch.autocast(x.device.type, enabled=False):
            return cls.forward(self, x.float(), *args, **kwargs).to(x.dtype)

    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})  # fmt: skip


@functools.cache
def _layer_class(ref: str, sha256: str) -> type:
    cls, sha = _import(ref)
    if sha != sha256:
        raise ValueError(
            f"the source of {ref} changed since the config was validated (sha256 {sha[:12]}…, expected "
            f"{sha256[:12]}…)"
        )
    return _float32_forward(cls)


def layer_class(norm: R.NormDef) -> type:
    """The (autocast-safe) class of a user layer's registry entry, imported from its reference."""
    assert norm.user is not None and norm.sha256 is not None
    return _layer_class(norm.user, norm.sha256)


# ---------------------------------------------------------------------------------------------
# Probing


def probe(cls: type, options: Mapping[str, Any], channels: list[int], where: str) -> tuple[bool, bool]:
    """Check the contract for every channel count; return whether the layer keeps running statistics
    and whether its training-mode output for one sample depends on the other samples of the batch.

    ConfigError at ``where`` for: a signature that does not take ``(num_channels, **options)``, a
    constructor that fails or returns something else, a forward that fails, changes the shape or
    the memory format, or gives non-finite values, in train or eval mode, and a backward that fails
    or gives non-finite gradients.
    """
    name = cls.__qualname__
    call = f"{name}(num_channels" + "".join(f", {k}={v!r}" for k, v in options.items()) + ")"
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        signature = None
    running = batch_dependent = False
    for c in channels:
        if signature is not None:
            try:
                signature.bind(c, **options)
            except TypeError as exc:
                raise ConfigError(f"{where}: {call} does not match {name}{signature}: {exc}") from None
        try:
            layer = cls(c, **options)
        except TypeError as exc:
            raise ConfigError(f"{where}: {call} with num_channels={c} rejects its arguments (unknown option?): {exc}") from None
        except Exception as exc:
            raise ConfigError(f"{where}: {call} with num_channels={c} failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(layer, nn.Module):
            raise ConfigError(f"{where}: {call} returned {type(layer).__name__}, not an nn.Module")
        x = torch.randn(4, c, 6, 5, generator=torch.Generator().manual_seed(c)) * 2 + 1  # (N, C, H, W)
        for mode in ("train", "eval"):
            layer.train(mode == "train")
            for layout, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
                _probe_once(layer, x.contiguous(memory_format=fmt), fmt, f"{where}: {name}({c}) in {mode} mode, {layout} input", mode == "train")
        running = running or _keeps_running_stats(layer)
        batch_dependent = batch_dependent or _depends_on_the_batch(layer, x)
    return running, batch_dependent


@torch.no_grad()
def _depends_on_the_batch(layer: nn.Module, x: Tensor) -> bool:
    """Whether sample 0's training-mode output changes when the other samples change (on a copy:
    running statistics are not touched)."""
    import copy

    layer = copy.deepcopy(layer).train()
    other = x.clone()
    other[1:] = other[1:] * 3 + 2
    return not torch.allclose(layer(x)[0], layer(other)[0], rtol=1e-5, atol=1e-6)


def _probe_once(layer: nn.Module, x: Tensor, fmt: torch.memory_format, what: str, backward: bool) -> None:
    x = x.detach().requires_grad_(backward)
    try:
        y = layer(x)
    except Exception as exc:
        raise ConfigError(f"{what}: forward failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(y, Tensor):
        raise ConfigError(f"{what}: forward returned {type(y).__name__}, not a tensor")
    if y.shape != x.shape:
        raise ConfigError(f"{what}: output shape {tuple(y.shape)} differs from the input's {tuple(x.shape)}")
    if not y.is_contiguous(memory_format=fmt):
        raise ConfigError(
            f"{what}: the output is not in the input's memory format (layers must keep NCHW and "
            f"channels_last inputs as they are; avoid .view/.reshape round trips, or return "
            f"y.contiguous(memory_format=...))"
        )
    if not torch.isfinite(y).all():
        raise ConfigError(f"{what}: the output has non-finite values")
    if backward:
        try:
            (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        except Exception as exc:
            raise ConfigError(f"{what}: backward failed: {type(exc).__name__}: {exc}") from None
        grads = [x.grad, *(p.grad for p in layer.parameters() if p.grad is not None)]
        if any(g is not None and not torch.isfinite(g).all() for g in grads):
            raise ConfigError(f"{what}: backward gave non-finite gradients")
        layer.zero_grad(set_to_none=True)


def _keeps_running_stats(layer: nn.Module) -> bool:
    from normres.norms import running_stat_layers

    return any(m is layer for m in running_stat_layers(layer))


def load_user_norms(cfg: Mapping[str, Any], base_dir: Path) -> dict[str, R.NormDef]:
    """Import and probe every layer of a config's ``norms:`` section; their registry entries.

    Each layer is probed with the options and channel counts of every study that uses it.
    """
    out: dict[str, R.NormDef] = {}
    for name, entry in cfg["norms"].items():
        where = f"config error at norms.{name}.class"
        try:
            ref, _ = resolve_reference(entry["class"], base_dir)
            cls, sha = _import(ref)
            norm = R.user_norm(name, ref, sha)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        running = batch_dependent = False
        probes = [(f"config error at norms.{name}", dict(entry["options"]), (16,))]
        for study_name, study in cfg["studies"].items():
            depths = {d for g in study["grid"] if name in g["norm"] for d in g["depth"]}
            options = {**entry["options"], **study["norm_options"].get(name, {})}
            key = f"config error at studies.{study_name}.norm_options.{name}" if name in study["norm_options"] else f"config error at norms.{name}"
            for depth in depths:
                channels = tuple(R.get_model(study["model"]).norm_channels(depth))
                probes.append((key, options, channels))
        for key, options, channels in {repr(p[1:]): p for p in probes}.values():  # each distinct probe once
            found = probe(cls, options, list(channels), key)
            running, batch_dependent = running or found[0], batch_dependent or found[1]
        doc = inspect.getdoc(cls)
        summary = " ".join(doc.split("\n\n")[0].replace("``", "").split()) if doc else None
        out[name] = R.with_probe(norm, running_stats=running, batch_dependent=batch_dependent,
                                 title=f"{cls.__name__} (your layer)", description=summary)  # fmt: skip
    return out
