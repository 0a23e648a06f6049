"""``wsss-ray``: the command line. Every stage is also a library function (see ``wsss_ray.pipeline``)."""

from __future__ import annotations

import argparse
import json
import re
import sys

from wsss_ray.core.storage import StorageError
from wsss_ray.pipeline_config import ConfigError, PipelineConfig, load_config

STAGE_COMMANDS = {"ingest": "ingest", "train-cls": "train_cls", "pseudo-labels": "pseudo_labels",
                  "train-seg": "train_seg", "evaluate": "evaluate"}


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="pipeline YAML (see jobs/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train_seg.epochs=2 (repeatable)")


def _add_predict_args(predict: argparse.ArgumentParser) -> None:
    predict.add_argument("--model", required=True, help="train_seg-* stage folder or its model.pt (local or s3://)")
    predict.add_argument("--input", required=True,
                         help="folder, bucket prefix, glob ('s3://b/x/*.jpg') or .txt file of image URIs")
    predict.add_argument("--out", default=None, help="output folder (default: predict-<hash> beside the model)")
    predict.add_argument("--crf", action="store_true", help="DenseCRF post-processing (default parameters)")
    predict.add_argument("--scales", type=float, nargs="+", default=[1.0], help="multi-scale inference scales")
    predict.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    predict.add_argument("--overlay", action="store_true", help="also write overlays/<name>.jpg")
    predict.add_argument("--max-side", type=int, default=1024, help="longest side the network sees (pixels)")
    predict.add_argument("--min-size", type=int, default=64, help="shortest side the network sees (pixels)")
    predict.add_argument("--max-actors", type=int, default=4, help="model actors at most")
    predict.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto",
                         help="run the model on GPUs (auto: when the cluster has any)")
    predict.add_argument("--overwrite", action="store_true",
                         help="--out holds masks of another model or other options: delete them and start clean")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsss-ray", description="Weakly supervised segmentation on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("config", help="config utilities").add_subparsers(dest="action", required=True)
    check_parser = check.add_parser("check", help="validate a config file and check what it points at (data, "
                                    "weights, output), without running anything")
    check_parser.add_argument("file")
    check_parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    check_parser.add_argument("--print", action="store_true", help="print the config with all defaults filled in")
    check_parser.add_argument("--offline", action="store_true",
                              help="skip the pre-flight checks that need the network (S3)")

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
    _add_predict_args(sub.add_parser("predict", help="segment images with a trained model (a train_seg-* folder)"))
    export = sub.add_parser("export", help="export a trained model as TorchScript and ONNX, with model.json")
    export.add_argument("--model", required=True, help="train_seg-* stage folder or its model.pt (local or s3://)")
    export.add_argument("--out", required=True, help="output folder (local or s3://)")
    export.add_argument("--no-onnx", dest="onnx", action="store_false", help="TorchScript only")
    for command in sub.choices.values():
        if command.prog.split()[-1] not in ("config", "make-toy-dataset", "export"):
            command.add_argument("--verbose", action="store_true",
                                 help="show Ray's own logs (workers' output, Ray Data plans) on the console")
    return parser


def _predict(args: argparse.Namespace) -> int:
    from wsss_ray.core.config_base import CrfConfig, RayConfig
    from wsss_ray.core.ray_utils import init_ray
    from wsss_ray.stages.predict import PredictOptions, predict_images

    if args.max_side < args.min_size or args.min_size < 1:
        print(f"--max-side ({args.max_side}) must be at least --min-size ({args.min_size}) ≥ 1", file=sys.stderr)
        return 2
    if any(s <= 0 for s in args.scales):
        print(f"--scales: every scale must be > 0, got {args.scales}", file=sys.stderr)
        return 2
    options = PredictOptions(scales=tuple(args.scales), flip=args.flip, crf=CrfConfig() if args.crf else None,
                             overlay=args.overlay, max_side=args.max_side, min_size=args.min_size)
    from wsss_ray.preflight import PreflightReport, format_report
    from wsss_ray.preflight.gpus import predict_gpu_problems
    from wsss_ray.preflight.predict import predict_problems

    gpu = {"auto": "auto", "yes": True, "no": False}[args.gpu]
    report = PreflightReport(predict_problems(args.model, args.input, args.out, options, args.overwrite)
                             + predict_gpu_problems(args.max_actors, gpu))
    if not report.ok:
        print(format_report(report, "predict"), file=sys.stderr)
        return 2
    init_ray(RayConfig(), verbose=args.verbose)
    summary = predict_images(args.model, args.input, args.out, options=options, max_actors=args.max_actors,
                             use_gpu=gpu, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0


def _use_model(args: argparse.Namespace) -> int:
    try:
        if args.command == "predict":
            return _predict(args)
        from wsss_ray.export import export_model

        print(json.dumps(export_model(args.model, args.out, onnx=args.onnx), indent=2))
        return 0
    except (FileNotFoundError, ValueError) as error:  # a bad --model or --input: its message names the file
        print(f"{args.command}: {error}", file=sys.stderr)
        return 2


def _preflight(config: PipelineConfig, source: str, offline: bool = False) -> bool:
    """Run the pre-flight checks; print what they found; True when the run may start."""
    from wsss_ray.preflight import format_report, preflight

    report = preflight(config, offline=offline)
    text = format_report(report, source)
    if text:
        print(text, file=sys.stderr)
    return report.ok


def _run(args: argparse.Namespace) -> int:
    """Every command that reads a pipeline config: validate, pre-flight, then (except ``config``) run."""
    try:
        if args.command == "config":
            config = load_config(args.file, args.overrides)
        elif args.command == "sweep":
            from wsss_ray.tuning.space import load_space

            _, config = load_space(args.space, args.overrides)  # fail on a bad space before Ray starts
        else:
            config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"config error:\n{error}", file=sys.stderr)
        return 2
    source = getattr(args, "file", None) or getattr(args, "config", None) or args.space
    if args.command == "config":
        if args.print:
            print(json.dumps(config.model_dump(mode="json"), indent=2))
        if not _preflight(config, source, offline=args.offline):
            return 2
        print(f"{args.file}: OK", file=sys.stderr)
        return 0
    if not _preflight(config, source):
        return 2
    if args.command == "sweep":
        from wsss_ray.tuning.sweep import run_sweep

        run_sweep(args.space, args.overrides, resume=args.resume, verbose=args.verbose)
        return 0
    from wsss_ray.pipeline import run_pipeline

    until = args.until if args.command == "run" else STAGE_COMMANDS[args.command]
    try:
        run_pipeline(config, until=until, verbose=args.verbose)
    except ConfigError as error:  # found once the cluster is known: e.g. use_gpu: true with too few GPUs
        print(f"config error:\n{error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("predict", "export"):
            return _use_model(args)
        if args.command == "make-toy-dataset":
            from wsss_ray.data.toy import make_toy_dataset

            summary = make_toy_dataset(args.out, fmt=args.format, num_train=args.num_train, num_val=args.num_val,
                                       image_size=args.image_size, num_classes=args.num_classes,
                                       max_objects=args.max_objects, seed=args.seed)
            print(json.dumps(summary, indent=2, default=str))
            return 0
        return _run(args)
    except Exception as error:
        # A store that stopped answering mid-run: one line, no traceback (--verbose keeps it); a rerun resumes.
        failure = storage_failure(error)
        if failure is None or getattr(args, "verbose", False):
            raise
        hint = " (--verbose shows the traceback)" if hasattr(args, "verbose") else ""
        print(f"{args.command}: storage error: {failure}\nFinished work is kept; a rerun resumes{hint}.",
              file=sys.stderr)
        return 1


def storage_failure(error: BaseException) -> str | None:
    """The :class:`StorageError` message behind ``error`` (itself, its causes, or Ray's wrappers of a worker's
    error), as one line; None when the error is not a storage failure."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        inner = getattr(current, "cause", None)  # Ray's RayTaskError: the worker's own error
        if isinstance(inner, BaseException):
            pending.append(inner)
        elif isinstance(current, StorageError):
            return str(current).splitlines()[0]
        else:
            pending += [current.__cause__, current.__context__]
    # Ray Train reports a worker's error as text (TrainingFailedError): the StorageError line is in it.
    match = re.search(r"StorageError: (.+)", str(error))
    return match.group(1).strip() if match else None


if __name__ == "__main__":
    sys.exit(main())
