"""The ``normres`` command: the pipeline's stages one at a time, outside Snakemake.

    normres validate config.yaml             check a config, list its runs
    normres prepare fashion_mnist            fetch, verify and prepare a dataset
    normres train --dataset fashion_mnist --norm gn --out runs/gn
    normres test runs/gn                     metrics.csv and predictions.csv for a trained run
    normres predict runs/gn/model.pt pixels.csv labels.csv
    normres aggregate runs/*/seed*           runs.csv, summary.csv, histories.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from normres import __version__
from normres.norms import NORMS


def _validate(args: argparse.Namespace) -> None:
    from normres.config import expand_runs, load_config

    config = load_config(args.config)
    runs = expand_runs(config)
    print(f"{args.config}: valid, {len(config['studies'])} studies, {len(runs)} runs")
    if args.list:
        for r in runs:
            print(r.run_dir)


def _prepare(args: argparse.Namespace) -> None:
    from normres.data import prepare_dataset

    root = Path(args.resources) / args.dataset
    out = prepare_dataset(args.dataset, root / "raw", root / "data.pt", mirrors=args.mirror, download=not args.no_download)
    print(f"prepared {out}")


def default_milestones(epochs: int) -> list[int]:
    """The CIFAR study's 75/95 of 100 epochs, scaled to ``epochs``."""
    return sorted({m for m in (round(0.75 * epochs), round(0.95 * epochs)) if 1 <= m < epochs})


def _train(args: argparse.Namespace) -> None:
    from normres.config import RunSpec, run_settings, validate_config
    from normres.train import train_run

    study = {
        "dataset": args.dataset,
        "model": args.model,
        "grid": [{"norm": [args.norm], "depth": [args.depth], "batch_size": [args.batch_size]}],
        "seeds": [args.seed],
        "epochs": args.epochs,
        "val_size": args.val_size,
        "train_subset": args.train_subset,
        "test_subset": args.test_subset,
        "optimizer": {"lr": args.lr, "weight_decay": args.weight_decay},
        "schedule": {"milestones": args.milestones if args.milestones is not None else default_milestones(args.epochs)},
        "augment": {"crop_pad": args.crop_pad, "flip": args.flip, "rotation": args.rotation},
        "norm_options": {"gn": {"groups": args.groups}} if args.norm == "gn" else {},
        "l1": {args.norm: args.l1} if args.l1 else {},
        "eval_test_every_epoch": args.eval_test,
    }
    config = validate_config({"studies": {"cli": study}})
    settings = run_settings(config, RunSpec("cli", args.norm, args.depth, args.batch_size, args.seed))
    data = Path(args.resources) / args.dataset / "data.pt"
    if not data.exists():
        sys.exit(f"{data} does not exist: run 'normres prepare {args.dataset}' first")
    train_run(settings, data, args.out, threads=args.threads, device=args.device)
    print(f"wrote {args.out}/model.pt, history.csv, run.json")


def _test(args: argparse.Namespace) -> None:
    from normres.evaluate import evaluate_run
    from normres.io import read_json

    run = Path(args.run_dir)
    dataset = read_json(run / "run.json")["dataset"]
    data = Path(args.resources) / dataset / "data.pt"
    metrics = evaluate_run(run / "model.pt", run / "run.json", data, run / "predictions.csv", run / "metrics.csv",
                       threads=args.threads, device=args.device)  # fmt: skip
    print(metrics.to_string(index=False))


def _predict(args: argparse.Namespace) -> None:
    from normres.evaluate import predict_csv

    out = predict_csv(args.model, args.csv, args.out)
    print(f"labelled {len(out)} rows into {args.out}")


def _aggregate(args: argparse.Namespace) -> None:
    from normres.aggregate import write_tables

    out = Path(args.out)
    runs = write_tables(args.run_dirs, out / "runs.csv", out / "summary.csv", out / "histories.csv")
    print(f"aggregated {len(runs)} runs into {out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="normres", description="Normalization layers in deep CNNs: the study's stages.")
    p.add_argument("--version", action="version", version=f"normres {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = argparse.ArgumentDefaultsHelpFormatter

    s = sub.add_parser("validate", help="check a config file and count its runs", formatter_class=d)
    s.add_argument("config", help="YAML config file")
    s.add_argument("--list", action="store_true", help="print every run directory")
    s.set_defaults(func=_validate)

    s = sub.add_parser("prepare", help="fetch, verify and prepare a dataset as uint8 tensors", formatter_class=d)
    s.add_argument("dataset", choices=["cifar10", "mnist", "fashion_mnist"], help="dataset name")
    s.add_argument("--resources", default="resources", help="folder of prepared datasets")
    s.add_argument("--mirror", action="append", default=[], help="folder holding the original files (repeatable)")
    s.add_argument("--no-download", action="store_true", help="never download; use mirrors only")
    s.set_defaults(func=_prepare)

    s = sub.add_parser("train", help="train one model (the CIFAR study's train script)", formatter_class=d)
    s.add_argument("--dataset", default="cifar10", choices=["cifar10", "mnist", "fashion_mnist"], help="dataset")
    s.add_argument("--model", default="resnet", choices=["resnet", "cnn"], help="architecture")
    s.add_argument("--norm", default="torch_bn", choices=sorted(NORMS), help="normalization layer")
    s.add_argument("--depth", type=int, default=2, help="ResNet n (6n+2 layers); 1 for the cnn")
    s.add_argument("--epochs", type=int, default=100, help="training epochs")
    s.add_argument("--batch-size", type=int, default=128, help="training batch size")
    s.add_argument("--lr", type=float, default=0.1, help="initial learning rate")
    s.add_argument("--milestones", type=int, nargs="*", default=None,
                   help="epochs after which lr is divided by 10 (default: 75%% and 95%% of --epochs, i.e. 75 95 for 100)")
    s.add_argument("--weight-decay", type=float, default=1e-4, help="L2 weight decay")
    s.add_argument("--l1", type=float, default=0.0, help="L1 penalty on all weights")
    s.add_argument("--groups", type=int, default=8, help="group norm's group count")
    s.add_argument("--crop-pad", type=int, default=4, help="random-crop padding (0 = off)")
    s.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flip")
    s.add_argument("--rotation", type=float, default=0.0, help="random rotation in +- degrees")
    s.add_argument("--val-size", type=int, default=10000, help="validation images held out of the training set")
    s.add_argument("--train-subset", type=int, default=None, help="train on only this many images")
    s.add_argument("--test-subset", type=int, default=None, help="test on only the first this many test images")
    s.add_argument("--eval-test", action="store_true", help="evaluate the test split every epoch")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--resources", default="resources", help="folder of prepared datasets")
    s.add_argument("--out", required=True, help="output folder for model.pt, history.csv, run.json")
    s.set_defaults(func=_train)

    s = sub.add_parser("test", help="metrics.csv and predictions.csv for a trained run folder", formatter_class=d)
    s.add_argument("run_dir", help="folder holding model.pt and run.json")
    s.add_argument("--resources", default="resources", help="folder of prepared datasets")
    s.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.set_defaults(func=_test)

    s = sub.add_parser("predict", help="label a CSV of raw pixel rows (0-255, one image a row)", formatter_class=d)
    s.add_argument("model", help="model.pt written by training")
    s.add_argument("csv", help="input CSV, C*H*W values a row (header optional)")
    s.add_argument("out", help="output CSV: row, prediction, class, confidence")
    s.set_defaults(func=_predict)

    s = sub.add_parser("aggregate", help="runs.csv, summary.csv and histories.csv from run folders", formatter_class=d)
    s.add_argument("run_dirs", nargs="+", help="run folders (each with run.json, metrics.csv, history.csv)")
    s.add_argument("--out", default="results", help="output folder")
    s.set_defaults(func=_aggregate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: one clear line, no traceback
        print(f"normres {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
