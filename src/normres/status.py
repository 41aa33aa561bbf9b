"""Where is my study? The state of every run, read from files only, and a report of what has finished.

``normres status`` runs in the study's directory (on a login node, while jobs run elsewhere) and
reads, per run: ``run.json`` (finished: completed or diverged), ``progress.json`` (written atomically
by the training job after every epoch: epoch, validation accuracy, images/s), the job's log file
(an ``error:`` line or a traceback after its last start means it failed) and Snakemake's lock folder
(whether a workflow is running at all). It never opens a file for writing and never touches a
running job's outputs.

States: ``pending`` (nothing yet), ``running`` (training, with epoch k of E and an ETA),
``interrupted`` (trained part-way, but no workflow is running: rerun to resume from its checkpoint),
``failed`` (read the log named), ``completed``, ``diverged``.

``normres report --partial`` renders the report from the runs finished so far into its own folder
(``results/partial/`` by default), listing the pending ones; the workflow's outputs stay untouched.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from normres.config import Config, RunSpec

__all__ = ["RunStatus", "partial_report", "run_status", "show_status", "study_status"]

STATES = ("completed", "diverged", "running", "interrupted", "failed", "pending")


@dataclass
class RunStatus:
    spec: RunSpec
    state: str
    epoch: int = 0
    epochs: int = 0
    val_accuracy: float = math.nan
    images_per_s: float = math.nan
    epoch_seconds: float = math.nan
    eta_seconds: float = math.nan
    log: Path | None = None
    detail: str = ""


def _read_json(path: Path) -> dict | None:
    """A JSON file as a dict, or None when missing or unreadable (it may be replaced right now)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _history(path: Path) -> tuple[float, float]:
    """(last validation accuracy, mean epoch seconds) of a finished run's history.csv, or NaNs."""
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("val_accuracy")]
        seconds = [float(r["seconds"]) for r in rows if r.get("seconds")]
        return float(rows[-1]["val_accuracy"]), sum(seconds) / len(seconds)
    except (OSError, ValueError, KeyError, IndexError, ZeroDivisionError, csv.Error):
        return math.nan, math.nan


def _log_of(spec: RunSpec, logs: Path, rule: str = "train") -> Path:
    return logs / rule / spec.study / spec.norm / f"n{spec.depth}_b{spec.batch_size}" / f"seed{spec.seed}.log"


def _log_error(path: Path) -> str | None:
    """The error of the log's last attempt (after its last 'training ...' line), if it ended in one."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    starts = [i for i, line in enumerate(lines) if "] training " in line]
    tail = lines[starts[-1] + 1 :] if starts else lines
    for line in tail:
        if line.startswith("error:") or line.startswith("Traceback"):
            return line.removeprefix("error:").strip() or line
    return None


def workflow_running(root: Path = Path(".")) -> bool:
    """Whether a Snakemake process holds this directory (its lock files exist while it runs)."""
    locks = root / ".snakemake" / "locks"
    return locks.is_dir() and any(locks.iterdir())


def run_status(spec: RunSpec, epochs: int, logs: Path, running: bool) -> RunStatus:
    """The state of one run from its files."""
    out = spec.run_dir
    log = _log_of(spec, logs)
    record = _read_json(out / "run.json")
    if record is not None and (out / "model.pt").exists():
        state = str(record.get("status", "completed"))
        done = int(record.get("epochs_completed", epochs))
        detail = "" if (out / "metrics.csv").exists() else "trained; evaluation pending"
        val_accuracy, seconds = _history(out / "history.csv")
        return RunStatus(spec, state, done, epochs, val_accuracy, epoch_seconds=seconds, log=log, detail=detail)
    progress = _read_json(out / "progress.json")
    error = _log_error(log) if log.exists() else None
    if error is not None:
        epoch = int(progress["epoch"]) if progress else 0
        return RunStatus(spec, "failed", epoch, epochs, log=log, detail=error)
    if progress is None:
        if log.exists() and running:
            return RunStatus(spec, "running", 0, epochs, log=log, detail="starting")
        return RunStatus(spec, "pending", 0, epochs)
    epoch = int(progress.get("epoch", 0))
    seconds = float(progress.get("epoch_seconds", math.nan))
    status = RunStatus(spec, "running" if running else "interrupted", epoch, int(progress.get("epochs", epochs)),
                       float(progress.get("val_accuracy", math.nan)), float(progress.get("images_per_s", math.nan)),
                       seconds, (epochs - epoch) * seconds, log)  # fmt: skip
    if not running:
        status.detail = "no workflow is running: rerun it to resume from the checkpoint"
    return status


def study_status(config: Config, logs: Path = Path("logs")) -> list[RunStatus]:
    running = workflow_running()
    return [run_status(spec, config.study(spec.study)["epochs"], logs, running) for spec in config.runs()]


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "–"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = int(round(seconds / 60))
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


def estimate(statuses: list[RunStatus]) -> tuple[float, int]:
    """Seconds until every run has finished, and the parallelism assumed: the runs running now
    (at least one). A pending run is estimated from the epoch time of its study's runs at its batch
    size (else its study's, else all runs')."""
    known: dict[tuple, list[float]] = {}
    for s in statuses:
        if math.isfinite(s.epoch_seconds):
            for key in ((s.spec.study, s.spec.batch_size), (s.spec.study,), ()):
                known.setdefault(key, []).append(s.epoch_seconds)
    left = 0.0
    for s in statuses:
        if s.state == "running" and math.isfinite(s.eta_seconds):
            left += s.eta_seconds
        elif s.state in ("pending", "interrupted", "failed") or (s.state == "running" and not math.isfinite(s.eta_seconds)):
            per_epoch = next((known[k] for k in ((s.spec.study, s.spec.batch_size), (s.spec.study,), ()) if k in known), None)
            if per_epoch is None:
                return math.nan, 0
            left += (s.epochs - s.epoch) * sum(per_epoch) / len(per_epoch)
    parallel = max(1, sum(s.state == "running" for s in statuses))
    return left / parallel, parallel


def format_status(statuses: list[RunStatus], config_path: str = "") -> str:
    counts = Counter(s.state for s in statuses)
    head = ", ".join(f"{counts[state]} {state}" for state in STATES if counts[state])
    lines = [f"normres status{f' of {config_path}' if config_path else ''}: {len(statuses)} runs: {head}", ""]
    header = ("study", "norm", "depth", "batch", "seed", "state", "epoch", "val acc", "img/s", "ETA")
    rows = []
    for s in statuses:
        r = s.spec
        epoch = f"{s.epoch}/{s.epochs}" if s.state != "pending" else "–"
        rows.append((r.study, r.norm, str(r.depth), str(r.batch_size), str(r.seed), s.state, epoch,
                     f"{s.val_accuracy:.3f}" if math.isfinite(s.val_accuracy) else "–",
                     f"{s.images_per_s:.0f}" if math.isfinite(s.images_per_s) else "–",
                     _hms(s.eta_seconds) if s.state == "running" else ""))  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)] if rows else [len(h) for h in header]
    for row in (header, *rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for s in statuses:
        if s.state == "failed":
            lines.append(f"failed: {s.spec.run_dir}: {s.detail} (read {s.log})")
        elif s.detail and s.state in ("interrupted", "completed", "diverged"):
            lines.append(f"{s.state}: {s.spec.run_dir}: {s.detail}")
    eta, parallel = estimate(statuses)
    unfinished = sum(s.state not in ("completed", "diverged") for s in statuses)
    lines.append("")
    if not unfinished:
        lines.append("every run has ended")
    elif math.isfinite(eta):
        lines.append(f"study ETA: {_hms(eta)} for {unfinished} unfinished runs at {parallel} in parallel")
    else:
        lines.append(f"study ETA: unknown until a run has finished an epoch ({unfinished} unfinished runs)")
    return "\n".join(lines)


def show_status(config: Config, watch: float | None = None, logs: Path = Path("logs"), config_path: str = "") -> None:
    """Print the study's status; with ``watch``, redraw every ``watch`` seconds until every run has ended."""
    while True:
        statuses = study_status(config, logs)
        text = format_status(statuses, config_path)
        if watch and sys.stdout.isatty():
            print("\033[2J\033[H", end="")
        print(text, flush=True)
        if not watch or all(s.state in ("completed", "diverged", "failed") for s in statuses):
            return
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return
        print(flush=True)


def partial_report(config: Config, out: Path, logs: Path = Path("logs")) -> Path:
    """The report of the runs finished so far (trained and tested), in ``out`` with its own tables
    and figures; the pending and running ones are listed."""
    from normres.aggregate import write_tables
    from normres.plots import Tables, draw_figures
    from normres.registry import figures_for
    from normres.report import report_from_files
    from normres.significance import write_comparisons

    statuses = study_status(config, logs)
    finished = [s.spec for s in statuses if s.state in ("completed", "diverged") and (s.spec.run_dir / "metrics.csv").exists()]
    if not finished:
        raise ValueError("no run has finished training and testing yet: nothing to report (normres status shows where they stand)")
    pending = [f"{s.spec.run_dir} ({s.state}{f', epoch {s.epoch}/{s.epochs}' if s.epoch else ''})"
               for s in statuses if s.spec not in finished]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    runs = write_tables([s.run_dir for s in finished], out / "runs.csv", out / "summary.csv", out / "histories.csv",
                        out / "robustness.csv")  # fmt: skip
    studies = set(runs["study"])
    write_comparisons(runs, {s: config.reference_norm(s) for s in studies}, out / "comparisons.csv", norm_order=list(config.norms))
    figures_dir = out / "figures"
    if figures_dir.exists():
        shutil.rmtree(figures_dir)  # figures of an earlier partial report may no longer apply
    wanted = [(f.name, study, figures_dir / name)
              for f, study, name in figures_for({s: config.study(s) for s in sorted(studies)}, config.norms)]  # fmt: skip

    class _Paths:
        pass

    paths = _Paths()
    for name in ("runs", "summary", "histories", "robustness", "comparisons"):
        setattr(paths, name, out / f"{name}.csv")
    written = draw_figures(Tables.read(paths, list(config.norms)), wanted)
    used = dict.fromkeys(n for s in studies for n in config.study_norms(s))
    norms = {n: {k: getattr(config.norms[n], k) for k in ("title", "normalizes_over", "description", "citation",
                                                           "batch_dependent", "running_stats")} for n in used}  # fmt: skip
    stamp = datetime.now(timezone.utc).isoformat(timespec="minutes")
    return report_from_files(
        runs=out / "runs.csv", summary=out / "summary.csv", comparisons=out / "comparisons.csv",
        records=[s.run_dir / "run.json" for s in finished], figures=list(written.values()),
        config={"studies": {s: config.study(s) for s in sorted(studies)}}, norms=norms, out=out / "report.html",
        figures_root=figures_dir, pending=pending,
        title=f"normres (partial, {len(finished)} of {len(statuses)} runs, {stamp})",
    )  # fmt: skip
