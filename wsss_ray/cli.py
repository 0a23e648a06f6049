"""``wsss-ray``: the command line. Every stage is also a library function (see ``wsss_ray.pipeline``)."""

from __future__ import annotations

import argparse
import json
import sys

from wsss_ray.config import ConfigError, load_config

STAGE_COMMANDS = {"ingest": "ingest", "train-cls": "train_cls", "pseudo-labels": "pseudo_labels",
                  "train-seg": "train_seg", "evaluate": "evaluate"}


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="pipeline YAML (see jobs/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train_seg.epochs=2 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsss-ray", description="Weakly supervised segmentation on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("config", help="config utilities").add_subparsers(dest="action", required=True)
    check_parser = check.add_parser("check", help="validate a config file without running anything")
    check_parser.add_argument("file")
    check_parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    check_parser.add_argument("--print", action="store_true", help="print the config with all defaults filled in")

    toy = sub.add_parser("make-toy-dataset", help="generate the seeded VOC- or COCO-format dataset")
    toy.add_argument("--format", choices=["voc", "coco"], default="voc")
    toy.add_argument("--out", required=True, help="output directory")
    toy.add_argument("--num-train", type=int, default=64)
    toy.add_argument("--num-val", type=int, default=16)
    toy.add_argument("--image-size", type=int, default=128)
    toy.add_argument("--num-classes", type=int, default=4)
    toy.add_argument("--max-objects", type=int, default=3)
    toy.add_argument("--seed", type=int, default=0)

    run = sub.add_parser("run", help="run (or resume) the whole pipeline")
    _add_config_args(run)
    run.add_argument("--until", choices=list(STAGE_COMMANDS.values()), default="evaluate",
                     help="stop after this stage")
    for command, stage in STAGE_COMMANDS.items():
        stage_parser = sub.add_parser(command, help=f"run the pipeline up to and including {stage}")
        _add_config_args(stage_parser)

    sweep = sub.add_parser("sweep", help="run (or resume) a Ray Tune sweep over a search space (see tuning/)")
    sweep.add_argument("--space", required=True, help="search-space YAML, e.g. tuning/label_smoothing.yaml")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field of the space's base config (repeatable)")
    sweep.add_argument("--no-resume", dest="resume", action="store_false",
                       help="delete an earlier sweep of the same name and start over")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config":
            config = load_config(args.file, args.overrides)
            if args.print:
                print(json.dumps(config.model_dump(mode="json"), indent=2))
            print(f"{args.file}: OK", file=sys.stderr)
            return 0
        if args.command == "make-toy-dataset":
            from wsss_ray.data.toy import make_toy_dataset

            summary = make_toy_dataset(args.out, fmt=args.format, num_train=args.num_train, num_val=args.num_val,
                                       image_size=args.image_size, num_classes=args.num_classes,
                                       max_objects=args.max_objects, seed=args.seed)
            print(json.dumps(summary, indent=2, default=str))
            return 0
        if args.command == "sweep":
            from wsss_ray.tuning.space import load_space

            load_space(args.space, args.overrides)  # fail on a bad space before Ray starts
        else:
            config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"config error:\n{error}", file=sys.stderr)
        return 2
    if args.command == "sweep":
        from wsss_ray.tuning.sweep import run_sweep

        run_sweep(args.space, args.overrides, resume=args.resume)
        return 0
    from wsss_ray.pipeline import run_pipeline

    until = args.until if args.command == "run" else STAGE_COMMANDS[args.command]
    run_pipeline(config, until=until)
    return 0


if __name__ == "__main__":
    sys.exit(main())
