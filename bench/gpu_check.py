"""GPU readiness in one unattended run (≤ 5 minutes on one CUDA GPU with 16 CPUs): one line per row as it ends,
then the table.

    unshare -n sh -c 'ip link set lo up; RAY_AUTH_MODE=disabled .venv/bin/python bench/gpu_check.py'
    # on the lent GPU machine (see ../shared/gpu/README.md): WITH_CRF=1 bash .gpu/run.sh python3 bench/gpu_check.py

Each row runs in its own process with its own time limit (``--budget`` seconds for the whole script, 295 by
default: a row gets the smaller of its own limit and what is left). A row that fails is a FAIL line with the
error; a row cut short by its limit is a FAIL line with what it had finished (every row prints its partial
figures as it goes); the others still run. Every row's full detail is printed the moment the row ends, so a run
stopped from outside still shows every finished row. Rows (``gpu_rows.py``, ``gpu_perf.py``):

- ``stage``: the real ``train_seg`` on a local Ray cluster, ``num_workers: max(2, GPUs)`` with ``use_gpu: auto``
  (on one GPU the group is sized down to one worker: what ``make demo`` needs), NCCL, bf16 autocast, 2 epochs;
  epoch 1's and the last epoch's input-wait shares.
- ``autocast``: one DeepLab step under the loop's autocast: every convolution runs in bf16, the loss is finite
  and every parameter gets a finite gradient (the logits' dtype is reported, not required: the final bilinear
  upsampling may run in fp32 under CUDA autocast).
- ``sync_bn``: the stage with ``sync_bn: true`` on every GPU (SKIP on one GPU: SyncBatchNorm needs two).
- ``teacher``: OuT's corrected step against the plain step (bf16 EMA teacher), ratio of medians.
- ``paper_steps``: paper-size steps (bf16, model + objective + SGD): ours DeepLab-v2 R101 os8 321² b10, v3 R101
  os16 321² b10, v3+ R101 os16 465² b8, and torchvision's ``deeplabv3_resnet101`` (os8) in a plain loop;
  images/s, ms/step, TFLOP/step (torch's FLOP counter) and the share of the GPU's bf16 peak.
- ``pseudo_labels``: CAM images/s on the GPU, CRF images/s on one CPU core, and the stage's images/s with its
  CAM-actor / CRF-task split (which side bounds it, and how much of the stage's time is start-up).
- ``evaluate``: the evaluate stage on the GPU (the ``stage`` row's model), images/s.
- ``speed``: each ``train_seg.speed`` option on and off on the v2 R101 step, side by side (which wins), the
  compiled step's loss curve against the eager one on the same seed and batches, and a torch profiler summary
  of the eager step: what sets ``SpeedConfig``'s CUDA defaults.
- ``plain_loop``: the ``stage`` row's last epoch against a plain torch DDP loop (same model, crops, DataLoader).

``--dry-run`` runs every row on the CPU at toy sizes (gloo, no autocast; rows that need a GPU run their code at
toy sizes where they can, else SKIP), to check the script on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (key, title, seconds on a GPU, seconds in a dry run): the order they run in, most wanted first.
ROWS: list[tuple[str, str, int, int]] = [
    ("stage", "train_seg on Ray Train (NCCL, bf16)", 75, 240),
    ("autocast", "bf16 autocast step", 20, 60),
    ("sync_bn", "SyncBN training path", 60, 150),
    ("teacher", "OuT teacher cost ratio", 25, 60),
    ("paper_steps", "paper-size steps vs torchvision", 50, 120),
    ("pseudo_labels", "pseudo-labels on the GPU", 40, 150),
    ("evaluate", "evaluate on the GPU", 30, 120),
    # last but one: torch.compile of R101 may take most of its limit; its other options report first
    ("speed", "speed options (train_seg.speed)", 110, 150),
    ("plain_loop", "train_seg vs plain torch loop", 40, 150),
]
RESULT = "ROW_RESULT "
PARTIAL = "ROW_PARTIAL "


def run_row(key: str, args: argparse.Namespace) -> None:
    """In the row's own process: run it, print its result line (the parent reads it)."""
    import gpu_perf
    import gpu_rows

    rows = {**gpu_rows.ROWS, **gpu_perf.ROWS}
    status, detail = rows[key](args)
    print(RESULT + json.dumps({"status": status, "detail": detail}), flush=True)


def spawn(key: str, limit: float, args: argparse.Namespace, log: Path) -> tuple[str, str]:
    """Run row ``key`` in a child process for at most ``limit`` seconds; (status, detail)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--row", key, "--root", str(args.root),
               *(["--dry-run"] if args.dry_run else []), "--peak-tflops", str(args.peak_tflops or 0)]
    with log.open("w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            child.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # the row and the Ray cluster it started
            child.wait()
    lines = log.read_text(errors="replace").splitlines()
    partial = "; ".join(line.removeprefix(PARTIAL) for line in lines if line.startswith(PARTIAL))
    results = [json.loads(line.removeprefix(RESULT)) for line in lines if line.startswith(RESULT)]
    if results:
        return results[-1]["status"], results[-1]["detail"]
    if child.returncode == -signal.SIGKILL:
        return "FAIL", f"time limit {limit:.0f} s reached; finished: {partial or 'nothing'}"
    tail = " | ".join(line.strip() for line in lines[-6:])[-600:]
    return "FAIL", f"exit {child.returncode}: {tail}" + (f"; finished: {partial}" if partial else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU only, toy sizes (checks the script)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole script (295; dry run 1500)")
    parser.add_argument("--only", nargs="*", default=None, help="run these rows only (keys: " +
                        ", ".join(k for k, *_ in ROWS) + ")")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak for the share-of-peak figures (H200: 790 by default)")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    if args.row:
        run_row(args.row, args)
        return
    import torch

    gpus = 0 if args.dry_run else torch.cuda.device_count()
    if not args.dry_run and not gpus:
        sys.exit("no CUDA GPU found; run with --dry-run to check the script on the CPU")
    device = torch.cuda.get_device_name(0) if gpus else "CPU (dry run)"
    if args.peak_tflops is None and "H200" in device:
        args.peak_tflops = 790.0
    budget = args.budget or (1500.0 if args.dry_run else 295.0)
    args.root = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    print(f"GPU check on {device} × {gpus}, torch {torch.__version__}; budget {budget:.0f} s; logs {args.root}",
          flush=True)
    start, table = time.monotonic(), []
    for key, title, gpu_limit, dry_limit in ROWS:
        if args.only is not None and key not in args.only:
            continue
        left = budget - (time.monotonic() - start)
        limit = min(dry_limit if args.dry_run else gpu_limit, left - 2)
        row_start = time.monotonic()
        if limit < 8:
            status, detail = "SKIP", f"no time left in the {budget:.0f} s budget"
        else:
            status, detail = spawn(key, limit, args, args.root / f"{key}.log")
        seconds = time.monotonic() - row_start
        table.append((title, status, seconds, detail))
        print(f"[gpu_check] {title}: {status} ({seconds:.0f} s) {detail}", flush=True)
    print(f"\nGPU check on {device} × {gpus}, torch {torch.__version__}, {time.monotonic() - start:.0f} s in all")
    print(f"| {'check':36} | {'result':6} | {'s':>4} | detail")
    for title, status, seconds, detail in table:
        print(f"| {title:36} | {status:6} | {seconds:4.0f} | {detail}")


if __name__ == "__main__":
    main()
