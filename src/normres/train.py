"""Training one run of the study: seeded, resumable, writing model, history and run record.

Skeleton after torchvision's reference ``train.py``: :func:`train_one_epoch` and :func:`train_run`
(evaluation is :mod:`normres.evaluate`, model files :mod:`normres.models`). The data stay uint8
tensors on the training device for the whole run; every epoch draws its batch order and augmentation
from a generator seeded by (seed, epoch), so an epoch is the same whether the run started fresh or
resumed from a checkpoint.

The loop keeps its per-step overhead small, which matters at small batch sizes (a batch-2 step of
ResNet-14 is a few milliseconds of arithmetic): the optimizer updates all parameters in one
multi-tensor call, batch-instance gates are collected once, and the loss is checked on the host
only every :func:`divergence_check_interval` steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normres import registry as R
from normres.augment import Augmentation
from normres.columns import HISTORY_COLUMNS
from normres.config import OptimizerSettings, RunSettings, ScheduleSettings
from normres.datasets import RunData, batches, load_run_data
from normres.device import autocast, configure_torch, keep_triton_out, select_device, synchronize
from normres.evaluate import evaluate
from normres.io import git_commit, hardware, load_torch, package_versions, save_torch, write_csv, write_json
from normres.models import build_model, count_parameters, save_model
from normres.norms import clamp_gates_, gate_parameters

CHECKPOINT_FORMAT = "normres-checkpoint/2"



class Diverged(RuntimeError):
    """The training loss became NaN or infinite (the model was put back to its last finite state)."""


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The RNG of one epoch: a pure function of (seed, epoch), so resuming changes nothing."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + epoch)
    return g


def divergence_check_interval(device: torch.device) -> int:
    """Training steps between checks of the loss for NaN/inf. Reading a GPU tensor on the host
    waits for every queued kernel, so a check per step would keep the GPU from running ahead of
    Python; there a check every 32 steps (and at the epoch's end) finds divergence all the same.
    On CPUs a check is free, so the run stops at the first bad step."""
    return 32 if device.type == "cuda" else 1


def cross_entropy(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of float32 ``logits`` (N, K). On CUDA written as logsumexp minus the gathered
    logit: torch's CUDA ``nll_loss`` has no deterministic implementation."""
    if logits.device.type != "cuda":
        return F.cross_entropy(logits, labels, reduction=reduction)
    per_sample = torch.logsumexp(logits, 1) - logits.gather(1, labels[:, None]).squeeze(1)  # (N,)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


# ---------------------------------------------------------------------------------------------
# Optimisation


def lr_at(epoch: int, base_lr: float, schedule: ScheduleSettings, epochs: int) -> float:
    """Learning rate of 0-based ``epoch``: multistep (x gamma after each milestone), cosine, constant."""
    if schedule.name == "constant":
        return base_lr
    if schedule.name == "multistep":
        return base_lr * schedule.gamma ** sum(1 for m in schedule.milestones if epoch >= m)
    if schedule.name == "cosine":
        return 0.5 * base_lr * (1 + math.cos(math.pi * epoch / epochs))
    raise ValueError(f"unknown schedule {schedule.name!r} (choose from: constant, cosine, multistep)")


def make_optimizer(model: nn.Module, opt: OptimizerSettings) -> torch.optim.Optimizer:
    """SGD/Adam with batch-instance gates in their own group: lr x gate_lr_mult, no weight decay.

    The multi-tensor (``foreach``) implementation updates every parameter in a few calls instead
    of a Python loop over them: at batch 2 the loop was a tenth of a CPU step.
    """
    gates = gate_parameters(model)
    ids = {id(p) for p in gates}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids], "lr_mult": 1.0,
               "weight_decay": opt.weight_decay}]  # fmt: skip
    if gates:
        groups.append({"params": gates, "lr_mult": opt.gate_lr_mult, "weight_decay": 0.0})
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov, foreach=True)
    if opt.name == "adam":
        return torch.optim.Adam(groups, lr=opt.lr, foreach=True)
    raise ValueError(f"unknown optimizer {opt.name!r} (choose from: adam, sgd)")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def l1_penalty(model: nn.Module) -> Tensor:
    return sum(p.abs().sum() for p in model.parameters())  # type: ignore[return-value]


def compile_model(model: nn.Module, example: Tensor, labels: Tensor, bf16: bool = False) -> tuple[Callable[[Tensor], Tensor], float]:
    """``torch.compile(model)``, with its forward and backward compiled now on one training batch.

    Returns the compiled callable and the seconds compilation took (the device synchronised, so
    that no queued kernel of the warm-up counts in epoch 1). The warm-up step leaves the model as
    it found it: parameters, gradients and running statistics are restored. (A last, smaller batch
    of an epoch still recompiles once.)
    """
    state = {k: v.clone() for k, v in model.state_dict().items()}
    step = torch.compile(model)
    synchronize(example.device)
    t0 = time.perf_counter()
    model.train()
    with autocast(example.device, bf16):
        logits = step(example)
    cross_entropy(logits.float(), labels).backward()
    synchronize(example.device)
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    return step, seconds


# ---------------------------------------------------------------------------------------------
# One epoch


class _LastFinite:
    """A copy of the model's parameters and buffers, taken whenever the losses so far were finite:
    a diverging run is put back to it, so that no NaN/inf update survives into the saved model
    (on a GPU up to ``check_every - 1`` updates happen between two checks)."""

    def __init__(self, model: nn.Module) -> None:
        # detached aliases, made once: the optimizer and the norms update these tensors in place
        self.live = [t.detach() for t in model.state_dict(keep_vars=True).values()]  # counters too
        self.copy = [t.clone() for t in self.live]
        self.step = 0

    @torch.no_grad()
    def take(self, step: int) -> None:
        torch._foreach_copy_(self.copy, self.live)
        self.step = step

    @torch.no_grad()
    def restore(self) -> None:
        torch._foreach_copy_(self.live, self.copy)


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    augment: Callable[[Tensor, torch.Generator], Tensor],
    generator: torch.Generator,
    l1: float = 0.0,
    step: Callable[[Tensor], Tensor] | None = None,
    bf16: bool = False,
    check_every: int | None = None,
) -> EpochStats:
    """One pass over (x uint8, y); raises :class:`Diverged` on a non-finite loss, with the model
    put back to its state at the last check whose losses were all finite.

    The loss is checked every ``check_every`` steps (default: :func:`divergence_check_interval`)
    and after the last one; a bad loss between checks is remembered on the device.
    """
    model.train()
    forward = model if step is None else step  # (a compiled module refuses bool())
    device = x.device
    check_every = check_every or divergence_check_interval(device)
    gates = gate_parameters(model)
    last_finite = _LastFinite(model)
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    finite = torch.ones((), device=device, dtype=torch.bool)  # every loss since the last check
    seen = 0
    for i, idx in enumerate(batches(len(x), batch_size, generator, shuffle=True)):
        xb = augment(x[idx], generator)  # (B, C, H, W) float32, normalised
        yb = y[idx]
        with autocast(device, bf16):
            logits = forward(xb)
        loss = cross_entropy(logits.float(), yb)
        finite &= torch.isfinite(loss)
        if (i + 1) % check_every == 0:
            if not finite:
                last_finite.restore()
                raise Diverged(f"training loss became non-finite by image {seen + len(idx)} "
                               f"(weights restored to step {last_finite.step})")  # fmt: skip
            last_finite.take(i)
        objective = loss + l1 * l1_penalty(model) if l1 else loss
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        if gates:
            clamp_gates_(gates)
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(1) == yb).sum()
        seen += len(idx)
    if not finite:  # waits for the device: the epoch's timing includes its queued work
        last_finite.restore()
        raise Diverged(f"training loss became non-finite by image {seen} (weights restored to step {last_finite.step})")
    loss_value, accuracy = loss_sum.item() / seen, correct.item() / seen  # (synchronises)
    return EpochStats(loss_value, accuracy, seen, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# The run


def model_for(settings: RunSettings, data: RunData) -> nn.Module:
    """The run's model; a user layer's registry entry is rebuilt from the settings' reference and
    hash (which came from the user's config), so SLURM jobs need nothing else."""
    if settings.norm_class is not None:
        norm = R.user_norm(settings.norm, settings.norm_class, settings.norm_sha256)
    else:
        norm = R.get_norm(settings.norm)
    return build_model(settings.model, norm, settings.depth, data.dataset.channels, data.dataset.num_classes,
                       settings.norm_options)  # fmt: skip


def _checkpoint(path: Path, model, optimizer, epoch: int, history: list[dict], settings: RunSettings,
                device: torch.device, extra: dict) -> None:  # fmt: skip
    save_torch(
        {
            "format": CHECKPOINT_FORMAT,
            "settings": settings.to_dict(),
            "device_type": device.type,  # the random streams differ between CPU and CUDA
            "epoch": epoch,  # epochs completed
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "history": history,
            "rng": torch.get_rng_state(),
            "extra": extra,
        },
        path,
    )


def _resume(path: Path, settings: RunSettings, device: torch.device, model, optimizer, log) -> tuple[int, list[dict], dict]:
    """Restore a checkpoint of the same settings; any other checkpoint is set aside, never trusted.

    A checkpoint written on another device type is kept and the job stops: resuming there would
    continue with another random stream (Philox on CUDA, Mersenne Twister on the CPU).
    """
    if not path.exists():
        return 0, [], {}
    try:
        ck = load_torch(path, what="checkpoint")
        if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT or ck.get("settings") != settings.to_dict():
            raise ValueError("it was written for other settings")
        if ck.get("device_type") != device.type:
            raise _OtherDevice(
                f"{path} was written by this run on {ck.get('device_type')}, but this job runs on {device.type}, "
                f"where batch order and augmentation would come from another random stream: rerun it on "
                f"{ck.get('device_type')} to resume, or delete the checkpoint to start over"
            )
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
    except _OtherDevice:
        raise
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        aside = path.with_suffix(".stale.pt")
        path.replace(aside)
        log(f"not resuming from {path}: {exc}; moved it to {aside.name} and starting fresh")
        return 0, [], {}
    log(f"resuming from {path} after epoch {ck['epoch']}")
    return ck["epoch"], list(ck["history"]), dict(ck.get("extra", {}))


class _OtherDevice(ValueError):
    pass


def _progress(out_dir: Path, settings: RunSettings, row: dict, started: datetime, device: torch.device) -> None:
    """``progress.json``: where a running job stands, for ``normres status`` (read-only there)."""
    write_json(
        {
            "epoch": row["epoch"],
            "epochs": settings.epochs,
            "val_accuracy": row["val_accuracy"],
            "train_loss": row["train_loss"],
            "epoch_seconds": row["seconds"],
            "images_per_s": row["images_per_s"],
            "device": str(device),
            "started_at": started.isoformat(timespec="seconds"),
            "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        out_dir / "progress.json",
    )


def train_run(
    settings: RunSettings,
    data_path: str | Path,
    out_dir: str | Path,
    threads: int = 1,
    device: str | None = None,
    log: Callable[[str], None] = print,
    standalone: bool = False,
) -> dict[str, Any]:
    """Train one run and write ``model.pt``, ``history.csv`` and ``run.json`` into ``out_dir``.

    A ``checkpoint.pt`` of the same settings left by a killed job is resumed from; it is written
    atomically after every epoch and removed when the run ends. Returns the run record.
    ``standalone``: the process exists for this run alone (a training job), so a CPU run without
    ``compile`` keeps triton out of it (:func:`normres.device.keep_triton_out`).
    """
    started = datetime.now(timezone.utc)
    wall0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(".*.tmp"):  # half-written files of a killed job
        leftover.unlink()
    dev = select_device(device)
    if standalone and dev.type == "cpu" and not settings.compile:
        keep_triton_out()
    runtime = configure_torch(threads, dev, settings.deterministic, settings.tf32, compiling=settings.compile)
    data = load_run_data(data_path, settings, dev)
    torch.manual_seed(settings.seed)
    model = model_for(settings, data).to(dev)  # channels_last (see normres.models)
    optimizer = make_optimizer(model, settings.optimizer)
    ck_path = out_dir / "checkpoint.pt"
    start_epoch, history, extra = _resume(ck_path, settings, dev, model, optimizer, log)
    resumed = extra.get("resumed_at", []) + ([start_epoch] if start_epoch else [])

    augment = Augmentation.from_settings(settings.augment, data.mean, data.std)
    step = None
    compile_seconds = extra.get("compile_seconds", 0.0)
    if settings.compile:
        example = augment(data.train_x[: settings.batch_size], torch.Generator(device=dev).manual_seed(0))
        step, seconds = compile_model(model, example, data.train_y[: settings.batch_size], settings.bf16)
        compile_seconds += seconds

    status = "completed"
    epochs = settings.epochs
    log(f"training {settings.model} norm={settings.norm} depth={settings.depth} batch={settings.batch_size} "
        f"seed={settings.seed} on {dev} with {torch.get_num_threads()} threads ({len(data.train_y)} train / "
        f"{len(data.val_y)} val images, epochs {start_epoch + 1}..{epochs})")  # fmt: skip
    for epoch in range(start_epoch, epochs):
        lr = lr_at(epoch, settings.optimizer.lr, settings.schedule, epochs)
        set_lr(optimizer, lr)
        t0 = time.perf_counter()
        try:
            tr = train_one_epoch(model, optimizer, data.train_x, data.train_y, settings.batch_size, augment,
                                 epoch_generator(settings.seed, epoch, dev), settings.l1, step, settings.bf16)  # fmt: skip
        except Diverged as exc:
            log(f"epoch {epoch + 1}: diverged: {exc}")
            status = "diverged"
            history.append({"epoch": epoch + 1, "lr": lr, "train_loss": math.nan})
            break
        val = evaluate(model, data.val_x, data.val_y, data.normalize, with_features=True)
        test = evaluate(model, data.test_x, data.test_y, data.normalize) if settings.eval_test_every_epoch else None
        p1, p20, p80, p99 = val.feature_quantiles
        row = {
            "epoch": epoch + 1, "lr": lr, "train_loss": tr.loss, "train_accuracy": tr.accuracy,
            "val_loss": val.loss, "val_accuracy": val.accuracy,
            "test_loss": test.loss if test else math.nan, "test_accuracy": test.accuracy if test else math.nan,
            "feat_p1": p1, "feat_p20": p20, "feat_p80": p80, "feat_p99": p99,
            "seconds": time.perf_counter() - t0, "images_per_s": tr.images / tr.seconds,
        }  # fmt: skip
        history.append(row)
        log(f"epoch {epoch + 1}/{epochs} lr {lr:.4g} train loss {tr.loss:.4f} acc {tr.accuracy:.4f} "
            f"val loss {val.loss:.4f} acc {val.accuracy:.4f} ({row['seconds']:.1f}s, {row['images_per_s']:.0f} img/s)")  # fmt: skip
        if not math.isfinite(val.loss):
            status = "diverged"
            log(f"epoch {epoch + 1}: diverged: validation loss is {val.loss}")
            break
        _checkpoint(ck_path, model, optimizer, epoch + 1, history, settings, dev,
                    {"resumed_at": resumed, "compile_seconds": compile_seconds})  # fmt: skip
        _progress(out_dir, settings, row, started, dev)

    save_model(model, settings.dataset, data.classes, data.mean, data.std, out_dir / "model.pt")
    write_csv(pd.DataFrame(history, columns=HISTORY_COLUMNS), out_dir / "history.csv")
    done = [h for h in history if math.isfinite(h.get("train_loss", math.nan))]
    record = {
        "run": {k: getattr(settings, k) for k in ("study", "norm", "depth", "batch_size", "seed")},
        "dataset": settings.dataset,
        "model": settings.model,
        "status": status,
        "epochs_completed": len(done),
        "settings": settings.to_dict(),
        "parameters": count_parameters(model),
        "train_images": len(data.train_y),
        "val_images": len(data.val_y),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "hardware": hardware(dev),
        "runtime": runtime,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": time.perf_counter() - wall0,
        "train_seconds": sum(h.get("seconds", 0.0) for h in done),
        "compile_seconds": compile_seconds,
        "resumed_at_epochs": resumed,
    }
    write_json(record, out_dir / "run.json")
    ck_path.unlink(missing_ok=True)
    (out_dir / "progress.json").unlink(missing_ok=True)
    return record
