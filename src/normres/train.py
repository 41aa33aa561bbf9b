"""Training one run of the study: seeded, resumable, writing model, history and run record.

Skeleton after torchvision's reference ``train.py``: :func:`train_one_epoch`, :func:`evaluate`,
:func:`train_run`. The data stay uint8 tensors on the training device for the whole run; every epoch
draws its batch order and augmentation from a generator seeded by (seed, epoch), so an epoch is the
same whether the run started fresh or resumed from a checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normres import data as D
from normres.io import (
    git_commit,
    hardware,
    load_torch,
    package_versions,
    save_torch,
    write_csv,
    write_json,
)
from normres.models import build_model, count_parameters, feature_quantiles
from normres.norms import clamp_gates_, gate_parameters

MODEL_FORMAT = "normres-model/1"
CHECKPOINT_FORMAT = "normres-checkpoint/1"
HISTORY_COLUMNS = [
    "epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss",
    "test_accuracy", "feat_p1", "feat_p20", "feat_p80", "feat_p99", "seconds", "images_per_s",
]  # fmt: skip


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------------
# Device, threads, determinism


def select_device(requested: str | None = None) -> torch.device:
    """CUDA when available (or when asked for), else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def configure_torch(threads: int, deterministic: bool = True, compiling: bool = False) -> None:
    """Follow the job's thread allowance exactly, and make results reproducible.

    ``torch.use_deterministic_algorithms`` also sets a flag of torch's compiler, and importing the
    compiler to do so costs a job ~4 s and ~150 MB of memory; without ``torch.compile`` only
    ATen's flag matters, so that one is set directly.

    Deterministic mode also fills every new tensor with NaN by default, a debugging aid against
    reading uninitialised memory that changes no result; it cost 10% of a ResNet-14 train step
    here (30 ms of ``fill_`` a step), so it is turned off.
    """
    torch.set_num_threads(max(1, int(threads)))
    set_aten_flag = getattr(torch._C, "_set_deterministic_algorithms", None)
    if compiling or set_aten_flag is None:
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
    else:
        set_aten_flag(deterministic, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


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


def eval_batch_size(device: torch.device) -> int:
    """Images per evaluation batch. On CPUs batches of ~128 keep feature maps in cache: batches
    of 1000 evaluate at half the speed and add 0.5 GB to a CIFAR job's peak memory. GPUs want
    large batches."""
    return 1000 if device.type == "cuda" else 128


# ---------------------------------------------------------------------------------------------
# Optimisation


def lr_at(epoch: int, base_lr: float, schedule: Mapping[str, Any], epochs: int) -> float:
    """Learning rate of 0-based ``epoch``: multistep (x gamma after each milestone), cosine, constant."""
    name = schedule.get("name", "multistep")
    if name == "constant":
        return base_lr
    if name == "multistep":
        passed = sum(1 for m in schedule.get("milestones", []) if epoch >= m)
        return base_lr * schedule.get("gamma", 0.1) ** passed
    if name == "cosine":
        return 0.5 * base_lr * (1 + math.cos(math.pi * epoch / epochs))
    raise ValueError(f"unknown schedule '{name}' (choose from: constant, cosine, multistep)")


def make_optimizer(model: nn.Module, opt: Mapping[str, Any]) -> torch.optim.Optimizer:
    """SGD/Adam with batch-instance gates in their own group: lr x gate_lr_mult, no weight decay."""
    gates = {id(p) for p in gate_parameters(model)}
    rest = [p for p in model.parameters() if id(p) not in gates]
    groups = [{"params": rest, "lr_mult": 1.0, "weight_decay": opt.get("weight_decay", 0.0)}]
    if gates:
        groups.append(
            {"params": list(gate_parameters(model)), "lr_mult": opt.get("gate_lr_mult", 1.0), "weight_decay": 0.0}
        )
    name = opt.get("name", "sgd")
    if name == "sgd":
        return torch.optim.SGD(
            groups, lr=opt["lr"], momentum=opt.get("momentum", 0.9), nesterov=opt.get("nesterov", False)
        )
    if name == "adam":
        return torch.optim.Adam(groups, lr=opt["lr"])
    raise ValueError(f"unknown optimizer '{name}' (choose from: adam, sgd)")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def l1_penalty(model: nn.Module) -> Tensor:
    return sum(p.abs().sum() for p in model.parameters())  # type: ignore[return-value]


def autocast(device: torch.device, bf16: bool) -> torch.autocast:
    """bfloat16 autocast when asked for on CUDA; a no-op context elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def compile_model(
    model: nn.Module, example: Tensor, labels: Tensor, bf16: bool = False
) -> tuple[Callable[[Tensor], Tensor], float]:
    """``torch.compile(model)``, with its forward and backward compiled now on one training batch.

    Returns the compiled callable and the seconds compilation took, so that epoch timings measure
    training alone. The warm-up step leaves the model as it found it: parameters, gradients and
    running statistics are restored. (A last, smaller batch of an epoch still recompiles once.)
    """
    state = {k: v.clone() for k, v in model.state_dict().items()}
    step = torch.compile(model)
    t0 = time.perf_counter()
    model.train()
    with autocast(example.device, bf16):
        logits = step(example)
    F.cross_entropy(logits.float(), labels).backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    return step, seconds


# ---------------------------------------------------------------------------------------------
# One epoch, one evaluation


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
    """One pass over (x uint8, y); raises :class:`Diverged` on a non-finite loss.

    The loss is checked every ``check_every`` steps (default: :func:`divergence_check_interval`)
    and after the last one; a bad loss between checks is remembered on the device.
    """
    model.train()
    forward = model if step is None else step  # (a compiled module refuses bool())
    check_every = check_every or divergence_check_interval(x.device)
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    finite = torch.ones((), device=x.device, dtype=torch.bool)  # every loss so far
    seen = 0
    for i, idx in enumerate(D.batches(len(x), batch_size, generator, shuffle=True)):
        xb = augment(x[idx], generator)  # (B, C, H, W) float32, normalised
        yb = y[idx]
        with autocast(x.device, bf16):
            logits = forward(xb)
            loss = F.cross_entropy(logits.float(), yb)
        objective = loss + l1 * l1_penalty(model) if l1 else loss
        finite &= torch.isfinite(loss)
        if (i + 1) % check_every == 0 and not finite:
            raise Diverged(f"training loss became non-finite (last: {loss.item()}) by image {seen + len(idx)}")
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        clamp_gates_(model)
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(1) == yb).sum()
        seen += len(idx)
    if not finite:  # waits for the device: the epoch's timing includes its queued work
        raise Diverged(f"training loss became non-finite (last: {loss.item()}) by image {seen}")
    return EpochStats(loss_sum.item() / seen, correct.item() / seen, seen, time.perf_counter() - t0)


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    predictions: Tensor  # (N,) int64
    confidence: Tensor  # (N,) float32, softmax probability of the prediction
    feature_quantiles: list[float] | None = None


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    normalize: Callable[[Tensor], Tensor],
    with_features: bool = False,
    batch_size: int | None = None,
) -> EvalResult:
    """Loss, accuracy and predictions of ``model`` on uint8 images ``x`` in eval mode."""
    model.eval()
    batch_size = batch_size or eval_batch_size(x.device)
    losses, preds, confs, feats = [], [], [], []
    for start in range(0, len(x), batch_size):
        xb = normalize(x[start : start + batch_size])
        f = model.features(xb)  # (B, F)
        logits = model.head(f).float()
        losses.append(F.cross_entropy(logits, y[start : start + batch_size], reduction="sum"))
        prob = logits.softmax(1)
        conf, pred = prob.max(1)
        preds.append(pred)
        confs.append(conf)
        if with_features:
            feats.append(f.float())
    n = max(len(x), 1)
    pred = torch.cat(preds).cpu()
    return EvalResult(
        loss=torch.stack(losses).sum().item() / n,
        accuracy=(pred == y.cpu()).float().mean().item(),
        predictions=pred,
        confidence=torch.cat(confs).float().cpu(),
        feature_quantiles=feature_quantiles(torch.cat(feats)) if with_features else None,
    )


# ---------------------------------------------------------------------------------------------
# Data for one run


@dataclass
class RunData:
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    spec: D.DatasetSpec

    def normalize(self, x: Tensor) -> Tensor:
        return D.normalize(x, self.spec.mean, self.spec.std)


def load_run_data(data_path: str | Path, settings: Mapping[str, Any], device: torch.device) -> RunData:
    """The prepared dataset split as the run's settings say, moved to ``device`` once."""
    prepared = D.load_prepared(Path(data_path))
    if prepared.name != settings["dataset"]:
        raise ValueError(
            f"{data_path} holds dataset '{prepared.name}', but the run asks for '{settings['dataset']}'"
        )
    train_idx, val_idx = D.split_indices(
        len(prepared.train_y), settings["val_size"], settings["split_seed"], subset=settings.get("train_subset")
    )
    n_test = settings.get("test_subset") or len(prepared.test_y)
    if n_test > len(prepared.test_y):
        raise ValueError(
            f"test_subset {n_test} exceeds the {len(prepared.test_y)} test images of {prepared.name} ({data_path})"
        )
    return RunData(
        train_x=prepared.train_x[train_idx].to(device),
        train_y=prepared.train_y[train_idx].to(device),
        val_x=prepared.train_x[val_idx].to(device),
        val_y=prepared.train_y[val_idx].to(device),
        test_x=prepared.test_x[:n_test].to(device),
        test_y=prepared.test_y[:n_test].to(device),
        classes=list(prepared.classes),
        spec=D.DATASETS[settings["dataset"]],
    )


def model_for(settings: Mapping[str, Any], spec: D.DatasetSpec) -> nn.Module:
    return build_model(
        settings["model"], settings["norm"], settings["depth"], spec.channels, spec.num_classes,
        settings.get("norm_options", {}),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Model files


def save_model(model: nn.Module, settings: Mapping[str, Any], classes: list[str], path: str | Path) -> Path:
    """Weights plus everything needed to rebuild the model; loadable with ``weights_only=True``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_torch(
        {
            "format": MODEL_FORMAT,
            "model": model.config.to_dict(),
            "dataset": settings["dataset"],
            "classes": list(classes),
            "state_dict": state,
        },
        path,
    )


def load_model(path: str | Path, expect: Mapping[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a normres model file without executing anything stored in it.

    ``expect`` (e.g. ``{"norm": "gn", "depth": 2}``) makes a file of another architecture or norm an
    error that says which field differs.
    """
    blob = load_torch(path, what="model file")
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not a normres model file (expected format '{MODEL_FORMAT}')")
    arch = blob["model"]
    for key, want in (expect or {}).items():
        if key in arch and arch[key] != want:
            raise ValueError(
                f"{path} holds a model with {key}={arch[key]!r}, but {key}={want!r} was expected "
                f"(file: {arch['model']} norm={arch['norm']} depth={arch['depth']})"
            )
    model = build_model(
        arch["model"], arch["norm"], arch["depth"], arch["in_channels"], arch["num_classes"], arch["norm_options"]
    )
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit a {arch['model']} with norm={arch['norm']}: {exc}") from None
    model.eval()
    return model, blob


# ---------------------------------------------------------------------------------------------
# The run


def _checkpoint(path: Path, model, optimizer, epoch: int, history: list[dict], settings, extra) -> None:
    save_torch(
        {
            "format": CHECKPOINT_FORMAT,
            "settings": dict(settings),
            "epoch": epoch,  # epochs completed
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "history": history,
            "rng": torch.get_rng_state(),
            "extra": extra,
        },
        path,
    )


def _resume(path: Path, settings: Mapping[str, Any], model, optimizer, log) -> tuple[int, list[dict], dict]:
    """Restore a checkpoint of the same settings; any other checkpoint is set aside, never trusted."""
    if not path.exists():
        return 0, [], {}
    try:
        ck = load_torch(path, what="checkpoint")
        if ck.get("format") != CHECKPOINT_FORMAT or ck.get("settings") != dict(settings):
            raise ValueError("it was written for other settings")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
    except (ValueError, KeyError, RuntimeError) as exc:
        aside = path.with_suffix(".stale.pt")
        path.replace(aside)
        log(f"not resuming from {path}: {exc}; moved it to {aside.name} and starting fresh")
        return 0, [], {}
    log(f"resuming from {path} after epoch {ck['epoch']}")
    return ck["epoch"], list(ck["history"]), dict(ck.get("extra", {}))


def train_run(
    settings: Mapping[str, Any],
    data_path: str | Path,
    out_dir: str | Path,
    threads: int = 1,
    device: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train one run and write ``model.pt``, ``history.csv`` and ``run.json`` into ``out_dir``.

    A ``checkpoint.pt`` of the same settings left by a killed job is resumed from; it is written
    atomically after every epoch and removed when the run ends. Returns the run record.
    """
    started = datetime.now(timezone.utc)
    wall0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(".*.tmp"):  # half-written files of a killed job
        leftover.unlink()
    configure_torch(threads, compiling=bool(settings.get("compile")))
    dev = select_device(device)
    seed = int(settings["seed"])

    data = load_run_data(data_path, settings, dev)
    torch.manual_seed(seed)
    model = model_for(settings, data.spec).to(dev)  # channels_last (see normres.models)
    optimizer = make_optimizer(model, settings["optimizer"])
    ck_path = out_dir / "checkpoint.pt"
    start_epoch, history, extra = _resume(ck_path, settings, model, optimizer, log)
    resumed = extra.get("resumed_at", []) + ([start_epoch] if start_epoch else [])

    augment = D.Augmentation.from_options(settings["augment"], data.spec)
    step = None
    compile_seconds = extra.get("compile_seconds", 0.0)
    if settings.get("compile"):
        example = augment(data.train_x[: settings["batch_size"]], torch.Generator(device=dev).manual_seed(0))
        step, seconds = compile_model(model, example, data.train_y[: settings["batch_size"]], settings.get("bf16", False))
        compile_seconds += seconds

    status = "completed"
    epochs = int(settings["epochs"])
    log(f"training {settings['model']} norm={settings['norm']} n={settings['depth']} "
        f"batch={settings['batch_size']} seed={seed} on {dev} with {torch.get_num_threads()} threads "
        f"({len(data.train_y)} train / {len(data.val_y)} val images, epochs {start_epoch + 1}..{epochs})")  # fmt: skip
    for epoch in range(start_epoch, epochs):
        lr = lr_at(epoch, settings["optimizer"]["lr"], settings["schedule"], epochs)
        set_lr(optimizer, lr)
        t0 = time.perf_counter()
        try:
            tr = train_one_epoch(
                model, optimizer, data.train_x, data.train_y, settings["batch_size"], augment,
                epoch_generator(seed, epoch, dev), settings.get("l1", 0.0), step, settings.get("bf16", False),
            )  # fmt: skip
        except Diverged as exc:
            log(f"epoch {epoch + 1}: diverged: {exc}")
            status = "diverged"
            history.append({"epoch": epoch + 1, "lr": lr, "train_loss": math.nan})
            break
        val = evaluate(model, data.val_x, data.val_y, data.normalize, with_features=True)
        test = evaluate(model, data.test_x, data.test_y, data.normalize) if settings.get("eval_test_every_epoch") else None
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
        _checkpoint(ck_path, model, optimizer, epoch + 1, history,
                    settings, {"resumed_at": resumed, "compile_seconds": compile_seconds})  # fmt: skip

    return _finish(settings, model, data, history, status, out_dir, ck_path, dev, started, wall0, resumed, compile_seconds)


def _finish(settings, model, data, history, status, out_dir, ck_path, dev, started, wall0, resumed, compile_seconds):
    save_model(model, settings, data.classes, out_dir / "model.pt")
    write_csv(pd.DataFrame(history, columns=HISTORY_COLUMNS), out_dir / "history.csv")
    done = [h for h in history if math.isfinite(h.get("train_loss", math.nan))]
    record = {
        "run": {k: settings[k] for k in ("study", "norm", "depth", "batch_size", "seed")},
        "dataset": settings["dataset"],
        "model": settings["model"],
        "status": status,
        "epochs_completed": len(done),
        "settings": dict(settings),
        "parameters": count_parameters(model),
        "train_images": len(data.train_y),
        "val_images": len(data.val_y),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "hardware": hardware(dev),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": time.perf_counter() - wall0,
        "train_seconds": sum(h.get("seconds", 0.0) for h in done),
        "compile_seconds": compile_seconds,
        "resumed_at_epochs": resumed,
    }
    write_json(record, out_dir / "run.json")
    ck_path.unlink(missing_ok=True)
    return record
