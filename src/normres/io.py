"""Atomic file writing, safe model loading and provenance: the pieces every stage shares.

Every file normres writes goes through :func:`atomic_path`: it is written under a temporary name in
the same directory and renamed into place only when complete, so a killed job never leaves a
half-written CSV, model or report that a later rule or a person could take for a finished one.
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from normres.errors import UnsafeFileError


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; finished files get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def write_json(obj: Any, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


def save_torch(obj: Any, path: str | Path) -> Path:
    import torch  # here, not at the top: plots and report write files too and never need torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_torch(path: str | Path, what: str = "file") -> Any:
    """Load a torch file as weights only: code inside the file is never executed.

    A file carrying a pickle payload (anything but tensors, numbers, strings and containers) is
    refused with a clear error rather than run.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc) and _starts_as_zip(path):
            raise UnsafeFileError(
                f"refusing to load {what} {path}: it is not a plain weights file (it carries objects "
                f"that would run code when unpickled: {_first_reason(exc)})"
            ) from None
        raise UnsafeFileError(f"{what} {path} is not a torch file written by normres ({_first_reason(exc)})") from None
    except Exception as exc:  # text, truncated archives, other formats: torch raises many kinds
        kind = "truncated or not a torch file" if _starts_as_zip(path) else "not a torch file (no zip archive)"
        raise UnsafeFileError(f"{what} {path} is {kind}: {type(exc).__name__}: {exc}") from None


def _starts_as_zip(path: Path) -> bool:
    """Whether the file begins like the zip archive torch.save writes (a truncated one too)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _first_reason(exc: BaseException) -> str:
    """The line of torch's long weights-only message that says what was refused."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("WeightsUnpickler error", "Unsupported", "GLOBAL")):
            return line
    return lines[0] if lines else type(exc).__name__


def package_versions() -> dict[str, str]:
    names = ["normres", "torch", "torchvision", "numpy", "pandas", "matplotlib"]
    out = {"python": platform.python_version()}
    for name in names:
        # A loaded module's own version names its build too (torch '2.14.1+cu130').
        version = getattr(sys.modules.get(name), "__version__", None)
        try:
            out[name] = str(version) if version else metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit(cwd: str | Path = ".") -> str:
    """The checkout's commit, with '-dirty' if tracked files changed; 'unknown' outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def hardware(device: Any = "cpu") -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def read_json(path: str | Path) -> Mapping[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


@contextmanager
def log_to(path: str | Path) -> Iterator[Any]:
    """Send a workflow script's stdout, stderr and any error to its log file.

    Yields a ``log(message)`` function that writes a timestamped, flushed line. An error of the
    user's input (:data:`normres.errors.USER_ERRORS`: a bad file, an unusable GPU) is one line
    ``error: ...`` and exit status 1, which Snakemake reports with the log; anything else is a bug
    and keeps its traceback.
    """
    from normres.errors import USER_ERRORS

    import sys
    import time
    import traceback

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as fh:
        old = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = fh

        def log(message: str) -> None:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", file=fh, flush=True)

        try:
            yield log
        except USER_ERRORS as exc:
            print(f"error: {exc}", file=fh, flush=True)
            sys.stdout, sys.stderr = old
            raise SystemExit(1) from None
        except BaseException:
            traceback.print_exc(file=fh)
            raise
        finally:
            sys.stdout, sys.stderr = old
