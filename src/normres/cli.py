"""The ``normres`` command: the pipeline's stages one at a time, outside Snakemake.

    normres validate config.yaml --list       check a config, list its runs
    normres norms                             the normalization layers (with --config: yours too)
    normres prepare fashion_mnist             fetch, verify and prepare a dataset
    normres train --config config.yaml --study mnist --norm gn --seed 0     one run of a study
    normres train --dataset fashion_mnist --norm gn --out runs/gn           the earlier study's protocol
    normres test runs/gn                      metrics.csv and predictions.csv for a trained run
    normres predict runs/gn/model.pt pixels.csv labels.csv
    normres aggregate runs/*/seed*            runs.csv, summary.csv, histories.csv
    normres status [--watch]                  where a running study stands
    normres report --partial                  a report of the runs finished so far
"""

from __future__ import annotations

import argparse
import copy
import inspect
import sys
from pathlib import Path
from typing import Any

import yaml

from normres import __version__
from normres import registry as R

EARLIER = "earlier"  # the protocol the training flags' defaults come from (normres/published.yaml)


def _config(path: str | None):
    from normres.config import load_config

    return load_config(path or "config.yaml")


def _user_norms(args: argparse.Namespace) -> dict[str, R.NormDef]:
    """User layers named on the command line (--config's `norms:`, --norm-class name=ref)."""
    norms: dict[str, R.NormDef] = {}
    if getattr(args, "config", None):
        norms |= _config(args.config).user_norms
    for item in getattr(args, "norm_class", None) or []:
        name, sep, ref = item.partition("=")
        if not sep or not name or not ref:
            raise ValueError(f"--norm-class {item!r}: expected NAME=path/to/file.py:Class")
        from normres.config import validate_config

        config = validate_config({"norms": {name: {"class": ref}}, "studies": {"probe": {
            "dataset": next(iter(R.DATASETS)), "model": next(iter(R.MODELS)), "seeds": [0], "epochs": 1,
            "grid": [{"norm": [name], "depth": [1], "batch_size": [2]}]}}})  # fmt: skip
        norms |= config.user_norms
    return norms


# ---------------------------------------------------------------------------------------------
# commands


def _validate(args: argparse.Namespace) -> None:
    config = _config(args.config)
    runs = config.runs()
    print(f"{args.config}: valid, {len(config.studies)} studies, {len(runs)} runs")
    if args.list:
        for r in runs:
            print(r.run_dir)


def _norms(args: argparse.Namespace) -> None:
    norms = _config(args.config).norms if args.config else R.NORMS
    for name, norm in norms.items():
        options = []
        if norm.user is None:
            signature = inspect.signature(R.load_object(norm.factory))
            for option in norm.options:
                default = signature.parameters[option.name].default if option.name in signature.parameters else "?"
                options.append(f"{option.name}={default!r}")
        else:
            signature = inspect.signature(__import__("normres.norms.user", fromlist=["layer_class"]).layer_class(norm))
            options = [f"{p.name}={p.default!r}" for p in list(signature.parameters.values())[1:]
                       if p.default is not inspect.Parameter.empty]  # fmt: skip
        print(f"{name}: {norm.title}\n  {norm.description}")
        print(f"  normalizes over {norm.normalizes_over}; batch-dependent: {'yes' if norm.batch_dependent else 'no'}; "
              f"running statistics: {'yes' if norm.running_stats else 'no'}"
              + ("; includes its activation" if norm.includes_activation else ""))  # fmt: skip
        print(f"  options: {', '.join(options) or 'none'}")
        print(f"  {norm.citation}" if norm.user is None else f"  class: {norm.user} (sha256 {norm.sha256[:12]}…)")


def _prepare(args: argparse.Namespace) -> None:
    from normres.datasets import prepare_dataset

    root = Path(args.resources) / args.dataset
    out = prepare_dataset(args.dataset, root / "raw", root / "data.pt", mirrors=args.mirror, download=not args.no_download)
    print(f"prepared {out}")


def default_milestones(epochs: int) -> list[int]:
    """The earlier study's 75/95 of 100 epochs, scaled to ``epochs``."""
    return sorted({m for m in (round(0.75 * epochs), round(0.95 * epochs)) if 1 <= m < epochs})


def _set(study: dict[str, Any], assignment: str) -> None:
    """Apply ``key.sub=value`` (value in YAML) to a study's settings."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {assignment!r}: expected KEY=VALUE, e.g. epochs=5 or optimizer.lr=0.01")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"--set {assignment!r}: {text!r} is not a YAML value ({exc})") from None
    target = study
    *parents, leaf = key.split(".")
    for part in parents:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ValueError(f"--set {assignment!r}: {part!r} is not a group of settings")
    target[leaf] = value


def _shorthand_study(args: argparse.Namespace) -> dict[str, Any]:
    """One run of the earlier CIFAR study's protocol, with the flags given replacing its settings."""
    from normres.config import protocols

    base = copy.deepcopy(protocols()[EARLIER]["settings"])
    study: dict[str, Any] = {k: v for k, v in base.items() if k != "norm_options"}
    study["norm_options"] = {args.norm: base.get("norm_options", {}).get(args.norm, {})} if args.norm in base.get("norm_options", {}) else {}
    flags = {"dataset": "dataset", "model": "model", "epochs": "epochs", "val_size": "val_size",
             "train_subset": "train_subset", "test_subset": "test_subset"}  # fmt: skip
    for flag, key in flags.items():
        if getattr(args, flag) is not None:
            study[key] = getattr(args, flag)
    for flag, key in (("lr", "lr"), ("momentum", "momentum"), ("weight_decay", "weight_decay")):
        if getattr(args, flag) is not None:
            study["optimizer"][key] = getattr(args, flag)
    if args.epochs is not None:
        study["schedule"]["milestones"] = default_milestones(args.epochs)
    if args.milestones is not None:
        study["schedule"]["milestones"] = args.milestones
    for flag in ("crop_pad", "flip", "rotation", "brightness", "contrast"):
        if getattr(args, flag) is not None:
            study["augment"][flag] = getattr(args, flag)
    if args.groups is not None:
        study["norm_options"] = {args.norm: {"groups": args.groups}}
    if args.l1:
        study["l1"] = {args.norm: args.l1}
    if args.eval_test:
        study["eval_test_every_epoch"] = True
    depth = 1 if R.get_model(study["model"]).fixed_depth else (args.depth or 2)
    study.update(grid=[{"norm": [args.norm], "depth": [depth], "batch_size": [args.batch_size or 128]}],
                 seeds=[args.seed or 0])  # fmt: skip
    return study


def _train(args: argparse.Namespace) -> None:
    from normres.config import RunSpec, validate_config
    from normres.train import train_run

    if args.config:
        if not args.study or not args.norm:
            raise ValueError("--config needs --study and --norm (and --seed, --depth, --batch-size where the study has several)")
        raw = yaml.safe_load(Path(args.config).read_text())
        config = _config(args.config)  # validates the file as it is, user layers included
        if args.set:
            raw = copy.deepcopy(raw)
            config.study(args.study)
            for assignment in args.set:
                _set(raw["studies"][args.study], assignment)
            config = validate_config(raw, Path(args.config).parent)
        spec = _pick_run(config, args)
        settings = config.run_settings(spec)
        out = Path(args.out) if args.out else spec.run_dir
    else:
        if args.set or args.study:
            raise ValueError("--study and --set need --config (without it, the flags describe the run)")
        if args.norm not in R.NORMS:
            what = f"unknown norm {args.norm!r}" if args.norm else "--norm is required"
            raise ValueError(f"{what} (choose from: {', '.join(R.NORMS)}; a config's own layers need --config)")
        study = _shorthand_study(args)
        config = validate_config({"studies": {"cli": study}})
        grid = study["grid"][0]
        spec = RunSpec("cli", args.norm, grid["depth"][0], grid["batch_size"][0], study["seeds"][0])
        settings = config.run_settings(spec)
        if not args.out:
            raise ValueError("--out is required without --config")
        out = Path(args.out)
    data = Path(args.resources) / settings.dataset / "data.pt"
    if not data.exists():
        raise ValueError(f"{data} does not exist: run 'normres prepare {settings.dataset}' first")
    train_run(settings, data, out, threads=args.threads, device=args.device, standalone=True)
    print(f"wrote {out}/model.pt, history.csv, run.json")


def _pick_run(config, args: argparse.Namespace):
    """The study's run of --norm/--seed/--depth/--batch-size; the ones not given must be unique."""
    runs = [r for r in config.runs(args.study) if r.norm == args.norm]
    if not runs:
        raise ValueError(f"study {args.study!r} has no runs of norm {args.norm!r} (its norms: {', '.join(config.study_norms(args.study))})")
    for key, value in (("seed", args.seed), ("depth", args.depth), ("batch_size", args.batch_size)):
        if value is not None:
            runs = [r for r in runs if getattr(r, key) == value]
            if not runs:
                raise ValueError(f"study {args.study!r} has no run of {args.norm} with {key} {value}")
    for key in ("seed", "depth", "batch_size"):
        values = sorted({getattr(r, key) for r in runs})
        if len(values) > 1:
            raise ValueError(f"study {args.study!r} runs {args.norm} at several {key} values "
                             f"({', '.join(map(str, values))}): choose one with --{key.replace('_', '-')}")  # fmt: skip
    return runs[0]


def _checked_settings(run: Path, args: argparse.Namespace):
    """A run folder's settings; a user layer only with the user's own entry for it."""
    from normres.config import RunSettings
    from normres.io import read_json

    record = read_json(run / "run.json")
    try:
        settings = RunSettings.from_dict(record["settings"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{run / 'run.json'} is not a run record of this normres version ({exc})") from None
    if settings.norm_class is not None:
        given = _user_norms(args).get(settings.norm)
        if given is None:
            raise ValueError(
                f"{run} was trained with the user layer {settings.norm!r} ({settings.norm_class}); normres never "
                f"imports code named in a run's files: name it with --config CONFIG or --norm-class {settings.norm}=FILE:CLASS"
            )
        if given.sha256 != settings.norm_sha256:
            raise ValueError(f"{settings.norm} = {given.user} is not the layer {run} was trained with (source hashes differ)")
        settings = settings.with_changes(norm_class=given.user)
    return settings


def _test(args: argparse.Namespace) -> None:
    from normres.config import BnStatisticsSettings
    from normres.evaluate import evaluate_run

    run = Path(args.run_dir)
    settings = _checked_settings(run, args)
    data = Path(args.resources) / settings.dataset / "data.pt"
    bn = BnStatisticsSettings(args.precise_images, args.stats_batch_size or settings.batch_size) if args.bn_statistics else None
    metrics = evaluate_run(settings, run / "model.pt", data, run / "predictions.csv", run / "metrics.csv",
                           bn_statistics=bn, threads=args.threads, device=args.device)  # fmt: skip
    print(metrics.to_string(index=False))


def _predict(args: argparse.Namespace) -> None:
    from normres.evaluate import predict_csv

    out = predict_csv(args.model, args.csv, args.out, user_norms=_user_norms(args))
    print(f"labelled {len(out)} rows into {args.out}")


def _aggregate(args: argparse.Namespace) -> None:
    from normres.aggregate import write_tables

    out = Path(args.out)
    runs = write_tables(args.run_dirs, out / "runs.csv", out / "summary.csv", out / "histories.csv", out / "robustness.csv")
    print(f"aggregated {len(runs)} runs into {out}")


def _status(args: argparse.Namespace) -> None:
    from normres.status import show_status

    show_status(_config(args.config), watch=args.watch, logs=Path(args.logs))


def _report(args: argparse.Namespace) -> None:
    from normres.status import partial_report

    if not args.partial:
        raise ValueError("the full report is the workflow's target (snakemake results/report.html); "
                         "--partial renders one from the runs finished so far")  # fmt: skip
    out = partial_report(_config(args.config), Path(args.out))
    print(f"wrote {out}")


# ---------------------------------------------------------------------------------------------
# the parser


def _protocol_default(key: str) -> str:
    from normres.config import protocols

    settings = protocols()[EARLIER]["settings"]
    value: Any = settings
    for part in key.split("."):
        value = value[part]
    return f"{value}, the earlier study's"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="normres", description="Normalization layers in deep CNNs: the study's stages.")
    p.add_argument("--version", action="version", version=f"normres {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("validate", help="check a config file and count its runs")
    s.add_argument("config", help="YAML config file")
    s.add_argument("--list", action="store_true", help="print every run directory")
    s.set_defaults(func=_validate)

    s = sub.add_parser("norms", help="list the normalization layers: what they normalize over, options, papers")
    s.add_argument("--config", help="also list the user layers of this config file")
    s.set_defaults(func=_norms)

    s = sub.add_parser("prepare", help="fetch, verify and prepare a dataset as uint8 tensors")
    s.add_argument("dataset", choices=list(R.DATASETS), help="dataset name")
    s.add_argument("--resources", default="resources", help="folder of prepared datasets (default: resources)")
    s.add_argument("--mirror", action="append", default=[], help="folder holding the original files (repeatable)")
    s.add_argument("--no-download", action="store_true", help="never download; use mirrors only")
    s.set_defaults(func=_prepare)

    s = sub.add_parser(
        "train",
        help="train one run: of a study in a config (--config), or of the earlier CIFAR study's protocol (flags)",
        description="With --config, --study and --norm: exactly the workflow's run of that study (same settings, "
        "same numbers), written to its run folder unless --out says otherwise; --set KEY=VALUE changes a "
        "study setting first. Without --config, the flags describe one run of the earlier CIFAR study's "
        "protocol (normres/published.yaml), each flag replacing that setting.",
    )
    s.add_argument("--config", help="config file whose study to run")
    s.add_argument("--study", help="study of --config")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="change a study setting (YAML value), e.g. epochs=5, optimizer.lr=0.01 (repeatable)")
    s.add_argument("--norm", default=None, metavar="NORM",  # no choices: a config may add its own layers
                   help=f"normalization layer ({', '.join(R.NORMS)}; a config's own layers with --config)")
    s.add_argument("--seed", type=int, help="random seed (default: the study's only seed; 0 without --config)")
    s.add_argument("--depth", type=int, help="ResNet n, 6n+2 layers (default: the study's only depth; 2 without --config)")
    s.add_argument("--batch-size", type=int, help="training batch size (default: the study's only one; 128 without --config)")
    flags = s.add_argument_group("the earlier study's protocol (without --config)")
    flags.add_argument("--dataset", choices=list(R.DATASETS), help=f"dataset (default: {_protocol_default('dataset')})")
    flags.add_argument("--model", choices=list(R.MODELS), help=f"architecture (default: {_protocol_default('model')})")
    flags.add_argument("--epochs", type=int, help=f"training epochs (default: {_protocol_default('epochs')})")
    flags.add_argument("--lr", type=float, help=f"initial learning rate (default: {_protocol_default('optimizer.lr')})")
    flags.add_argument("--momentum", type=float, help=f"SGD momentum (default: {_protocol_default('optimizer.momentum')})")
    flags.add_argument("--weight-decay", type=float, help=f"L2 weight decay (default: {_protocol_default('optimizer.weight_decay')})")
    flags.add_argument("--milestones", type=int, nargs="*",
                       help="epochs after which lr is divided by 10 (default: 75%% and 95%% of --epochs, 75 95 of 100)")
    flags.add_argument("--l1", type=float, default=0.0, help="L1 penalty on all weights (default: 0)")
    flags.add_argument("--groups", type=int, help="group norm's group count (default: 4 channels per group, the earlier study's)")
    flags.add_argument("--crop-pad", type=int, help=f"random-crop padding, 0 = off (default: {_protocol_default('augment.crop_pad')})")
    flags.add_argument("--flip", action=argparse.BooleanOptionalAction, help=f"random horizontal flip (default: {_protocol_default('augment.flip')})")
    flags.add_argument("--rotation", type=float, help=f"random rotation in +- degrees (default: {_protocol_default('augment.rotation')})")
    flags.add_argument("--brightness", type=float, help=f"colour jitter brightness (default: {_protocol_default('augment.brightness')})")
    flags.add_argument("--contrast", type=float, help=f"colour jitter contrast (default: {_protocol_default('augment.contrast')})")
    flags.add_argument("--val-size", type=int, help=f"validation images held out (default: {_protocol_default('val_size')})")
    flags.add_argument("--train-subset", type=int, help="train on only this many images (default: all)")
    flags.add_argument("--test-subset", type=int, help="test on only the first this many test images (default: all)")
    flags.add_argument("--eval-test", action="store_true", help="evaluate the test split every epoch")
    s.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1, as the workflow's jobs)")
    s.add_argument("--device", help="cpu or cuda (default: cuda when the job was given a GPU; NORMRES_DEVICE)")
    s.add_argument("--resources", default="resources", help="folder of prepared datasets (default: resources)")
    s.add_argument("--out", help="output folder for model.pt, history.csv, run.json (default with --config: the run's folder)")
    s.set_defaults(func=_train)

    for name, text in (("test", "metrics.csv and predictions.csv for a trained run folder"),
                       ("predict", "label a CSV of raw pixel rows (0-255, one image a row)")):  # fmt: skip
        s = sub.add_parser(name, help=text)
        if name == "test":
            s.add_argument("run_dir", help="folder holding model.pt and run.json")
            s.add_argument("--resources", default="resources", help="folder of prepared datasets (default: resources)")
            s.add_argument("--bn-statistics", action="store_true", help="also score PreciseBN and test-batch statistics")
            s.add_argument("--precise-images", type=int, default=10000, help="training images for PreciseBN (default: 10000)")
            s.add_argument("--stats-batch-size", type=int, help="batch size of the test-batch statistics (default: the run's)")
            s.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
            s.add_argument("--device", help="cpu or cuda (default: cuda when the job was given a GPU)")
            s.set_defaults(func=_test)
        else:
            s.add_argument("model", help="model.pt written by training")
            s.add_argument("csv", help="input CSV, C*H*W values a row (header optional)")
            s.add_argument("out", help="output CSV: row, prediction, class, confidence")
            s.set_defaults(func=_predict)
        s.add_argument("--config", help="config whose `norms:` names the user layer the model was trained with")
        s.add_argument("--norm-class", action="append", metavar="NAME=FILE:CLASS", help="a user layer, e.g. rms=examples/norms.py:RMSNorm2d")

    s = sub.add_parser("aggregate", help="runs.csv, summary.csv, histories.csv and robustness.csv from run folders")
    s.add_argument("run_dirs", nargs="+", help="run folders (each with run.json, metrics.csv, history.csv)")
    s.add_argument("--out", default="results", help="output folder (default: results)")
    s.set_defaults(func=_aggregate)

    s = sub.add_parser("status", help="where the study stands: every run pending, running, completed, diverged or failed")
    s.add_argument("--config", default="config.yaml", help="the study's config file (default: config.yaml)")
    s.add_argument("--logs", default="logs", help="the workflow's log folder (default: logs)")
    s.add_argument("--watch", type=float, nargs="?", const=30.0, metavar="SECONDS",
                   help="redraw every SECONDS (default 30) until every run has ended; Ctrl-C stops")
    s.set_defaults(func=_status)

    s = sub.add_parser("report", help="the report of the runs finished so far (--partial)")
    s.add_argument("--partial", action="store_true", help="render from the finished runs and list the pending ones")
    s.add_argument("--config", default="config.yaml", help="the study's config file (default: config.yaml)")
    s.add_argument("--out", default="results/partial", help="folder for report.html, its tables and figures (default: results/partial)")
    s.set_defaults(func=_report)
    return p


def main(argv: list[str] | None = None) -> int:
    from normres.errors import USER_ERRORS

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as exc:  # bad input: one clear line, no traceback
        print(f"normres {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"normres {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
