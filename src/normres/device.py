"""Where a job computes, and how: device choice, threads, determinism, TF32, autocast.

A job uses CUDA when it was given a GPU and the CPU otherwise. "Given a GPU" means a scheduler or
the user made one visible (``CUDA_VISIBLE_DEVICES`` naming a device, as SLURM does for ``--gpus``,
or SLURM's own GPU variables) or the machine has NVIDIA device files. If such a job finds CUDA
unusable (no or too old a driver, a GPU this torch build was not compiled for), it stops with a
message naming the problem instead of training for hours on the CPU. ``NORMRES_DEVICE=cpu`` (or
``--device cpu``) asks for the CPU on purpose.

torch is imported by the functions that need it: the Snakefile asks :func:`local_gpus` on every
invocation, dry runs included.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from normres.errors import DeviceError

if TYPE_CHECKING:
    import torch

__all__ = ["autocast", "configure_torch", "gpu_allotted", "keep_triton_out", "local_gpus", "select_device", "synchronize"]

# cuBLAS needs one of its deterministic workspace configurations for reproducible matmuls; it must
# be in the environment before the first cuBLAS call (PyTorch's "Reproducibility" notes).
CUBLAS_WORKSPACE = ":4096:8"
_SLURM_GPU_VARIABLES = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE")


def gpu_allotted() -> str | None:
    """Why this job counts as given a GPU (the variable or device file), or None."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        # "" or "-1" (or NoDevFiles, SLURM's word for none) hide every GPU on purpose
        if visible.strip() not in ("", "-1", "NoDevFiles"):
            return f"CUDA_VISIBLE_DEVICES={visible}"
        return None
    for name in _SLURM_GPU_VARIABLES:
        if os.environ.get(name, "").strip() not in ("", "0"):
            return f"{name}={os.environ[name]}"
    if Path("/dev/nvidia0").exists():
        return "/dev/nvidia0 exists"
    return None


def local_gpus() -> int:
    """NVIDIA GPUs of this machine (device files), without starting CUDA: the Snakefile's train rule
    asks for one of them per job."""
    return len(list(Path("/dev").glob("nvidia[0-9]*")))


def keep_triton_out() -> None:
    """In a process that trains one run on the CPU without ``torch.compile``: keep torch from
    importing triton (unless something already did).

    An optimizer's first use imports ``torch._dynamo``, which imports triton (installed with torch's
    CUDA wheels) only to learn whether it is there: 100 MB of resident libraries in a CPU job that
    never compiles. A CIFAR-shaped training job peaked at 1.41-1.51 GB with them and 1.34-1.37 GB
    without. Marked absent, triton is what torch takes it for on a CPU-only install. Not for a
    process that may still compile, or train on a GPU, later.
    """
    sys.modules.setdefault("triton", None)  # type: ignore[arg-type]  # import triton -> ImportError


def _cuda_problem() -> str | None:
    """What keeps CUDA from working here, in words, or None when it works."""
    import torch
    if not torch.backends.cuda.is_built():
        return f"this torch build ({torch.__version__}) has no CUDA support"
    try:
        torch.cuda.init()
    except Exception as exc:  # no driver, driver too old, no device: torch says which
        return f"CUDA cannot start: {str(exc).strip().splitlines()[0]}"
    if torch.cuda.device_count() == 0:
        return "CUDA found no device"
    major, minor = torch.cuda.get_device_capability(0)
    arches = torch.cuda.get_arch_list()
    supported = {a for a in arches if a.startswith("sm_")}
    ptx = [a for a in arches if a.startswith("compute_")]
    if supported and f"sm_{major}{minor}" not in supported and not any(
        int(a.split("_")[1]) <= major * 10 + minor for a in ptx
    ):
        return (
            f"{torch.cuda.get_device_name(0)} has compute capability {major}.{minor}, which this torch "
            f"build ({torch.__version__}, CUDA {torch.version.cuda}) was not compiled for "
            f"(it supports {', '.join(sorted(supported))})"
        )
    return None


def select_device(requested: str | None = None) -> torch.device:
    """The job's device: ``requested`` (``cpu``, ``cuda``, ``cuda:1``), else ``NORMRES_DEVICE``,
    else CUDA when a GPU was given to the job, else the CPU.

    :class:`DeviceError` when CUDA is asked for, or a GPU was given, but CUDA cannot be used.
    """
    import torch
    choice = requested or os.environ.get("NORMRES_DEVICE") or None
    if choice is not None:
        device = torch.device(choice)
        if device.type == "cuda" and (problem := _cuda_problem()):
            raise DeviceError(f"device {choice!r} was asked for, but {problem}")
        return device
    reason = gpu_allotted()
    if reason is None:
        return torch.device("cpu")
    if problem := _cuda_problem():
        raise DeviceError(
            f"this job was given a GPU ({reason}), but {problem}. Fix the driver or the torch build, "
            f"or train on the CPU on purpose with NORMRES_DEVICE=cpu (or --device cpu)"
        )
    return torch.device("cuda")


def configure_torch(threads: int, device: torch.device, deterministic: bool = True, tf32: bool = False,
                    compiling: bool = False) -> dict[str, object]:  # fmt: skip
    """Follow the job's thread allowance exactly, and make results reproducible where asked.

    Deterministic mode: ATen's deterministic algorithms (errors, not warnings, where an op has
    none), and on CUDA cuBLAS's deterministic workspace and cuDNN's deterministic, non-benchmarked
    convolutions. ``torch.use_deterministic_algorithms`` also sets a flag of torch's compiler, and
    importing the compiler costs a job ~4 s and ~150 MB; without ``torch.compile`` only ATen's flag
    matters, so that one is set directly.

    Deterministic mode also fills every new tensor with NaN by default, a debugging aid against
    reading uninitialised memory that changes no result; it cost 10% of a ResNet-14 train step
    here (30 ms of ``fill_`` a step), so it is turned off.

    TF32: off unless asked for, so float32 means float32 on Ampere and later GPUs too. Returns the
    choices as recorded in ``run.json``.
    """
    import torch
    torch.set_num_threads(max(1, int(threads)))
    if device.type == "cuda" and deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    set_aten_flag = getattr(torch._C, "_set_deterministic_algorithms", None)
    if compiling or set_aten_flag is None:
        torch.use_deterministic_algorithms(deterministic)
    else:
        set_aten_flag(deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "deterministic": deterministic,
        "tf32": tf32,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG") if device.type == "cuda" else None,
    }


def autocast(device: torch.device, bf16: bool) -> torch.autocast:
    """bfloat16 autocast when asked for on CUDA; a no-op context elsewhere."""
    import torch
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings must not end before the kernels do)."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
