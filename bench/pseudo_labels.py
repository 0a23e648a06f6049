"""Benchmarks of the pseudo-labelling stage: overhead, scaling, label-restricted CRF, streaming memory.

Run it inside a loopback-only network namespace (it starts Ray; see bench/README.md):

    unshare -n sh -c 'ip link set lo up; RAY_AUTH_MODE=disabled .venv/bin/python bench/pseudo_labels.py'

Four ratios, each printed with the absolute numbers behind it:

1. stage overhead — per-image time of the stage's CPU path (``refine_and_write`` as Ray Data map tasks on a
   1-CPU cluster, fed rows shaped like ``CamActor`` output) vs raw pydensecrf calls on precomputed unaries in
   this process. Goal <= 1.15x.
2. scaling — the same stage on a 2-CPU vs a 1-CPU cluster, images/s. Goal >= 1.8x.
3. label-restricted CRF — ``refine_cams`` over background + tags vs a CRF over all 21 VOC labels. Goal >= 1.7x
   faster, and the share of identical pixels.
4. streaming memory — peak RSS of driver + Ray processes for the whole ``generate_pseudo_labels`` stage on
   2,000 vs 500 small images. Goal <= 1.10x.

The machine may be shared, so the two sides of every ratio are measured in the same run, interleaved where
the measurement allows it, and medians are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F

from wsss_ray.core import storage
from wsss_ray.core.config_base import CrfConfig
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.data.classes import VOC_CLASSES
from wsss_ray.data.image_io import encode_label_png, read_image, read_label
from wsss_ray.data.toy import make_toy_dataset
from wsss_ray.data.voc import VocReader
from wsss_ray.maths.crf import cams_to_probs, crf_inference, refine_cams, threshold_cams
from wsss_ray.maths.metrics import ConfusionMatrix
from wsss_ray.methods.cam.config import ImageCamGeneratorConfig
from wsss_ray.methods.registry import build_classifier
from wsss_ray.pipeline_config import ClassifierTrainConfig, PseudoLabelConfig
from wsss_ray.stages.pseudo_labels import generate_pseudo_labels, images_per_task, refine_and_write

# psutil is not installed on its own: Ray vendors it (ray/thirdparty_files) and puts it on sys.path when `ray`
# is imported, so it is imported here, after `ray`, rather than in the import block that sorting reorders.
psutil = importlib.import_module("psutil")

NUM_CLASSES = len(VOC_CLASSES)  # 21: background + 20
CAM_STRIDE = 16  # output stride of the CAM classifier's backbone
BG_SCORE = 0.15  # the generator's default
# Set in the driver's environment before ray.init: every process of *our* cluster inherits it, so the memory
# sampler can tell our `ray::` workers from those of other Ray sessions on the same machine.
MARKER_VAR = "WSSS_BENCH_SESSION"


# --------------------------------------------------------------------------------------------- helpers


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def start_ray(num_cpus: int, temp_dir: str) -> None:
    # A fresh local cluster per configuration (address="local" never joins a leftover one); no dashboard, so
    # nothing but the cluster itself is measured.
    for attempt in range(3):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir,
                     log_to_driver=False, logging_level=logging.WARNING)
            break
        except Exception as error:  # an overloaded machine can make the raylet miss its start-up deadline
            if attempt == 2:
                raise
            log(f"ray.init failed ({error}); retrying")
            ray.shutdown()
            time.sleep(5.0)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def stop_ray() -> None:
    ray.shutdown()
    # Let the shut-down cluster's processes exit before the next one starts (their CPU use would count).
    time.sleep(1.0)


@dataclass
class Result:
    name: str
    measured: float
    goal: float | None  # None: reported, no target
    higher_is_better: bool
    unit: str = "x"
    detail: str = ""

    @property
    def met(self) -> str:
        if self.goal is None:
            return "n/a"
        ok = self.measured >= self.goal if self.higher_is_better else self.measured <= self.goal
        return "yes" if ok else "NO"


# ----------------------------------------------------------------------------- VOC-sized data and rows


@dataclass
class CrfImage:
    """One VOC-sized test image with everything both sides of a comparison need, precomputed once."""

    record: dict[str, Any]
    image: np.ndarray  # decoded RGB, for the in-process sides
    labels: list[int]
    low_cams: np.ndarray  # (K, H/16, W/16) float32: what the classifier produces
    cams: np.ndarray  # (K, H, W) float32 in [0, 1]: what the CAM actor ships (upsampled, max-normalised)
    row: dict[str, Any] = field(default_factory=dict)  # CamActor-shaped output row
    unary: np.ndarray | None = None  # (K+1, H*W) float32: the direct side's precomputed unaries


def synthetic_low_res_cams(mask: np.ndarray, labels: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Stride-16 CAMs that look like a classifier's: blurry blobs on the objects plus noise.

    The cost being measured is the CRF's, not the model's, so the CAMs are derived from the ground truth
    (area-averaged to the CAM grid, noised) rather than from a trained network; that keeps the CRF's job —
    snapping coarse blobs to edges — realistic for the label-agreement comparison.
    """
    h, w = mask.shape
    gh, gw = h // CAM_STRIDE, w // CAM_STRIDE
    cams = []
    for label in labels:
        inside = (mask[: gh * CAM_STRIDE, : gw * CAM_STRIDE] == label).astype(np.float32)
        coarse = inside.reshape(gh, CAM_STRIDE, gw, CAM_STRIDE).mean(axis=(1, 3))
        cams.append(np.clip(coarse + rng.normal(0.0, 0.15, coarse.shape), 0.0, None) * rng.uniform(2.0, 8.0))
    return np.stack(cams).astype(np.float32)


def upsample_cams(low: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """What ``multiscale_cams`` does after the forward pass (one scale): bilinear to full size, max-normalise."""
    full = F.interpolate(torch.from_numpy(low)[None], size=size, mode="bilinear", align_corners=False)[0]
    peak = full.flatten(1).max(dim=1).values.clamp_min(1e-5)
    return (full / peak[:, None, None]).numpy().astype(np.float32)


def camactor_row(record: dict[str, Any], labels: list[int], cams: np.ndarray) -> dict[str, Any]:
    """A row exactly as ``CamActor.__call__`` emits it (float16 npz of the full-size CAMs)."""
    buffer = io.BytesIO()
    np.savez(buffer, cams=cams.astype(np.float16))
    return {**record, "labels": labels, "arrays": buffer.getvalue(), "error": None, "model_seconds": 0.0}


def make_voc_sized_images(root: str, count: int, size: int, seed: int) -> list[CrfImage]:
    """``count`` toy images of ``size``² with 2-3 present classes (generated squares; VOC's are ~500x375)."""
    from pydensecrf.utils import unary_from_softmax

    make_toy_dataset(root, fmt="voc", num_train=count * 2 + 4, num_val=1, image_size=size, num_classes=20,
                     max_objects=3, seed=seed)
    reader = VocReader(root)
    rng = np.random.default_rng(seed)
    images: list[CrfImage] = []
    for item in reader.items("train"):
        record = reader.parse(item)
        labels = sorted(int(t) for t in record["tags"])
        if not 2 <= len(labels) <= 3:
            continue
        low = synthetic_low_res_cams(read_label(record["mask_uri"]), labels, rng)
        # The stage's CRF task sees float16-rounded CAMs; give the in-process sides the very same values.
        cams = upsample_cams(low, (size, size)).astype(np.float16).astype(np.float32)
        img = CrfImage(record=record, image=read_image(record["image_uri"]), labels=labels, low_cams=low,
                       cams=cams)
        img.row = camactor_row(record, labels, cams)
        probs = cams_to_probs(cams, BG_SCORE)
        img.unary = np.ascontiguousarray(unary_from_softmax(np.clip(probs, 1e-5, 1.0)), dtype=np.float32)
        images.append(img)
        if len(images) == count:
            break
    if len(images) < count:
        log(f"only {len(images)} of {count} generated images have 2-3 classes; using those")
    return images


# ------------------------------------------------------------------------- this session's processes


class SessionProcesses:
    """This driver's process tree (the local cluster it started) plus this session's ``ray::`` processes."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.driver = psutil.Process()
        self._ours: dict[int, bool] = {}  # pid -> does it belong to this session (checked once per pid)

    def _belongs(self, proc: psutil.Process) -> bool:
        if proc.pid not in self._ours:
            try:
                self._ours[proc.pid] = proc.environ().get(MARKER_VAR) == self.marker
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                self._ours[proc.pid] = False
        return self._ours[proc.pid]

    def processes(self) -> list[psutil.Process]:
        procs = {self.driver.pid: self.driver}
        try:
            procs.update({p.pid: p for p in self.driver.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
        # Workers re-parented away from our raylet still count; other sessions' workers (the PID namespace is
        # shared: other jobs may run Ray on this machine) do not.
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if proc.pid not in procs and cmdline and cmdline[0].startswith("ray::") and self._belongs(proc):
                procs[proc.pid] = proc
        return list(procs.values())

    def group(self, proc: psutil.Process) -> str:
        if proc.pid == self.driver.pid:
            return "driver"
        cmdline = proc.cmdline()
        if cmdline and cmdline[0].startswith("ray::"):
            return "workers (ray::)"
        return os.path.basename(cmdline[0]) if cmdline else proc.name()

    def cpu_seconds(self) -> dict[int, tuple[str, float]]:
        """User + system CPU seconds so far of each process, with its group."""
        out = {}
        for proc in self.processes():
            try:
                times = proc.cpu_times()
                out[proc.pid] = (self.group(proc), times.user + times.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return out


def cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent between two ``cpu_seconds`` snapshots, per group and in ``"all"``."""
    out: dict[str, float] = {"all": 0.0}
    for pid, (group, seconds) in after.items():
        spent = seconds - before.get(pid, (group, 0.0))[1]
        out[group] = out.get(group, 0.0) + spent
        out["all"] += spent
    return out


# -------------------------------------------------------------------------------- 1 + 2: overhead, scaling


def direct_crf(img: CrfImage, params: CrfConfig) -> np.ndarray:
    """The baseline: raw pydensecrf calls on precomputed unaries, then the argmax (a label map is the output)."""
    from pydensecrf.densecrf import DenseCRF2D

    assert img.unary is not None
    h, w = img.image.shape[:2]
    crf = DenseCRF2D(w, h, img.unary.shape[0])
    crf.setUnaryEnergy(img.unary)
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=img.image,
                             compat=params.bilateral_compat)
    posterior = np.asarray(crf.inference(params.iterations), dtype=np.float32)
    return posterior.reshape(-1, h, w).argmax(axis=0).astype(np.uint8)


def time_loop(images: Sequence[CrfImage], fn: Callable[[CrfImage], object]) -> float:
    """Per-image seconds of ``fn`` over ``images`` in this process (wall time / images)."""
    start = time.perf_counter()
    for img in images:
        fn(img)
    return (time.perf_counter() - start) / len(images)


@dataclass
class StageRun:
    per_image: float  # wall time from the start of iteration to the last row / images
    images_per_task: int  # what the stage's ``images_per_task`` chose for this many images and CPUs
    task_seconds: float  # median time spent inside refine_and_write, as the stats row reports it
    cpu_workers: float  # CPU seconds per image of the ray:: worker processes
    cpu_all: float  # CPU seconds per image of every process of the session (driver, raylet, GCS, workers)


@ray.remote(num_cpus=1)
def _import_stage() -> int:
    importlib.import_module("wsss_ray.stages.pseudo_labels")
    time.sleep(0.5)  # hold the CPU, so that each warm-up task lands on its own worker
    return os.getpid()


def warm_workers(num_cpus: int) -> None:
    """Make every CPU's worker import the stage's modules (~1.5 s, torch included) before anything is timed.

    A worker pays that once per cluster; a short run would otherwise count it against the later-started
    workers only, i.e. against the 2-CPU side.
    """
    pids = ray.get([_import_stage.remote() for _ in range(num_cpus)])
    if len(set(pids)) != num_cpus:
        log(f"warm-up reached {len(set(pids))} of {num_cpus} workers")


def run_refine_stage(rows: list[dict[str, Any]], generator: ImageCamGeneratorConfig, out_uri: str,
                     num_cpus: int, session: SessionProcesses) -> StageRun:
    """``refine_and_write`` over ``rows`` as Ray Data map tasks, exactly as ``generate_pseudo_labels`` maps it.

    The rows are cut into blocks the way the stage cuts its input (``images_per_task``): the CAM actor keeps
    the blocks, so each CRF task gets one.
    """
    per_task = images_per_task(len(rows), num_cpus)
    ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / per_task))
    ds = ds.map(refine_and_write, fn_kwargs={"generator": generator, "out_uri": out_uri,
                                             "num_classes": NUM_CLASSES}, num_cpus=1)
    seconds: list[float] = []
    # CPU time is what a loaded machine does not distort much: wall time includes waiting for other jobs.
    cpu_before = session.cpu_seconds()
    start = time.perf_counter()
    for stats in ds.iter_rows():
        if stats["error"] is not None:
            raise RuntimeError(f"stage failed on {stats['image_id']}: {stats['error']}")
        seconds.append(stats["seconds"])
    wall = time.perf_counter() - start
    cpu = cpu_delta(cpu_before, session.cpu_seconds())
    return StageRun(wall / len(seconds), per_task, median(seconds),
                    cpu.get("workers (ray::)", 0.0) / len(rows), cpu["all"] / len(rows))


def stage_breakdown(images: Sequence[CrfImage], generator: ImageCamGeneratorConfig, out_dir: str) -> dict[str, float]:
    """Median per-image seconds of each step ``refine_and_write`` takes, replayed in this process."""
    params = generator.crf
    steps: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def step(name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        steps.setdefault(name, []).append(time.perf_counter() - start)

    for img in images:
        row = img.row
        with step("read + decode JPEG"):
            image = read_image(row["image_uri"])
        with step("load CAM npz (float16->32)"):
            cams = _load_cams(row["arrays"])
        with step("threshold_cams (cam mask)"):
            cam_mask = threshold_cams(cams, img.labels, BG_SCORE)
        with step("cams_to_probs"):
            probs = cams_to_probs(cams, BG_SCORE)
        with step("DenseCRF (unary+pairwise+10 it)"):
            crf_mask = _crf_from_probs(image, probs, params)
        masks = [cam_mask, crf_mask]
        with step("encode 2 PNGs"):
            pngs = [encode_label_png(m) for m in masks]
        with step("atomic write 2 PNGs"):
            for i, png in enumerate(pngs):
                storage.write_bytes(os.path.join(out_dir, f"{i}.png"), png)
        with step("read GT + confusion/precision x2"):
            _score(row["mask_uri"], masks)
        with step("(actor side) upsample stride-16 CAMs"):
            upsample_cams(img.low_cams, img.image.shape[:2])
    return {name: median(values) for name, values in steps.items()}


def _load_cams(data: bytes) -> np.ndarray:
    with np.load(io.BytesIO(data)) as arrays:
        return arrays["cams"].astype(np.float32)


def _crf_from_probs(image: np.ndarray, probs: np.ndarray, params: CrfConfig) -> np.ndarray:
    return crf_inference(image, probs, params).argmax(axis=0).astype(np.uint8)


def _score(mask_uri: str, masks: list[np.ndarray]) -> None:
    target = read_label(mask_uri)
    for mask in masks:
        ConfusionMatrix(NUM_CLASSES).update(target, mask)
        committed = (target != 255) & (mask != 255)
        int((committed & (target == mask)).sum())


def bench_overhead_and_scaling(images: list[CrfImage], reps: int, work: str) -> tuple[Result, Result, Result]:
    generator = ImageCamGeneratorConfig(bg_score=BG_SCORE)
    params = generator.crf
    rows = [img.row for img in images]
    out_uri = os.path.join(work, "stage-out")
    warmup = rows[: min(2, len(rows))]  # one per CPU of the larger cluster
    direct, inproc, one, two = [], [], [], []
    direct_cpu, inproc_cpu = [], []
    ray_dir = os.path.join(work, "ray")
    session = SessionProcesses(os.environ[MARKER_VAR])

    def in_process() -> None:
        # The two in-process sides alternate image by image, so load drift hits both alike.
        sides = {"direct": 0.0, "inproc": 0.0}
        cpu = {"direct": 0.0, "inproc": 0.0}
        for i, img in enumerate(images):
            for side in (("direct", "inproc") if i % 2 == 0 else ("inproc", "direct")):
                start, start_cpu = time.perf_counter(), time.thread_time()
                if side == "direct":
                    direct_crf(img, params)
                else:
                    refine_and_write(img.row, generator, out_uri, NUM_CLASSES)
                sides[side] += time.perf_counter() - start
                cpu[side] += time.thread_time() - start_cpu
        direct.append(sides["direct"] / len(images))
        inproc.append(sides["inproc"] / len(images))
        direct_cpu.append(cpu["direct"] / len(images))
        inproc_cpu.append(cpu["inproc"] / len(images))

    def on_cluster(num_cpus: int, runs: list[StageRun], also: Callable[[], None] | None = None,
                   also_first: bool = False) -> None:
        start_ray(num_cpus, ray_dir)
        try:
            warm_workers(num_cpus)
            run_refine_stage(warmup, generator, out_uri, num_cpus, session)  # starts workers, imports the stage's modules
            if also is not None and also_first:
                also()
            runs.append(run_refine_stage(rows, generator, out_uri, num_cpus, session))
            if also is not None and not also_first:
                also()
        finally:
            stop_ray()

    for rep in range(reps):
        # Orders alternate between reps (1 CPU or 2 CPUs first; stage or in-process sides first) so that a
        # drift in machine load does not favour one side. The in-process sides always run beside the idle
        # 1-CPU cluster, as the machine is then in the same state as during the 1-CPU stage run.
        even = rep % 2 == 0
        if not even:
            on_cluster(2, two)
        on_cluster(1, one, in_process, also_first=not even)
        if even:
            on_cluster(2, two)
        log(f"rep {rep + 1}/{reps}: direct {direct[-1] * 1e3:.0f} ms, refine_and_write in-process "
            f"{inproc[-1] * 1e3:.0f} ms, stage 1 CPU {one[-1].per_image * 1e3:.0f} ms, "
            f"stage 2 CPUs {two[-1].per_image * 1e3:.0f} ms per image; load {os.getloadavg()[0]:.1f}")

    breakdown = stage_breakdown(images, generator, os.path.join(work, "breakdown"))
    h, w = images[0].image.shape[:2]
    def ms(values: Sequence[float]) -> str:
        return f"{median(values) * 1e3:7.1f} ms"

    steady1 = [o.per_image for o in one]
    steady2 = [t.per_image for t in two]
    overhead = median([o / d for o, d in zip(steady1, direct)])
    overhead_cpu = median([o.cpu_all / d for o, d in zip(one, direct_cpu)])
    scaling = median([o / t for o, t in zip(steady1, steady2)])
    print(f"\n== 1. stage overhead ({len(images)} images {w}x{h}, 2-3 labels, {reps} interleaved reps, medians)")
    print("  per image                                          wall        CPU")
    print(f"  direct pydensecrf on precomputed unaries        {ms(direct)} {ms(direct_cpu)} (this thread)")
    print(f"  refine_and_write called in-process (no Ray)     {ms(inproc)} {ms(inproc_cpu)} (this thread), "
          f"{median([i / d for i, d in zip(inproc, direct)]):.3f}x direct wall")
    print(f"  stage, 1-CPU Ray cluster ({one[0].images_per_task:2d} images/task)      {ms(steady1)} {ms([o.cpu_all for o in one])} "
          f"(all session processes), {overhead:.3f}x direct wall, {overhead_cpu:.3f}x direct CPU")
    print(f"  ... of which ray:: worker processes                        {ms([o.cpu_workers for o in one])}")
    print(f"  inside refine_and_write per task (stats rows)   {ms([o.task_seconds for o in one])}")
    print(f"  per-rep wall ratios: {', '.join(f'{o / d:.3f}' for o, d in zip(steady1, direct))}")
    print("  refine_and_write's steps replayed in-process (medians):")
    for name, seconds in breakdown.items():
        print(f"    {name:38s} {seconds * 1e3:7.1f} ms")
    print(f"\n== 2. scaling (same stage and images, {reps} interleaved reps, medians)")
    for label, runs, steady in (("1 CPU ", one, steady1), ("2 CPUs", two, steady2)):
        print(f"  {label} ({runs[0].images_per_task:2d} images/task): {ms(steady)}/image = {median([1 / s for s in steady]):5.2f} images/s; inside a task "
              f"{ms([r.task_seconds for r in runs])}; CPU/image: workers {ms([r.cpu_workers for r in runs])}, "
              f"all {ms([r.cpu_all for r in runs])}")
    print(f"  speed-up {scaling:.2f}x; per rep: {', '.join(f'{o / t:.2f}' for o, t in zip(steady1, steady2))}")
    return (Result("1. stage overhead, wall (stage / direct CRF)", overhead, 1.15, False,
                   detail=f"{median(steady1) * 1e3:.0f} vs {median(direct) * 1e3:.0f} ms/img"),
            Result("1b. stage overhead, CPU time (all processes / direct)", overhead_cpu, 1.15, False,
                   detail=f"{median([o.cpu_all for o in one]) * 1e3:.0f} vs {median(direct_cpu) * 1e3:.0f} ms/img"),
            Result("2. scaling (2 CPUs / 1 CPU images/s)", scaling, 1.8, True,
                   detail=f"{median([1 / s for s in steady2]):.2f} vs {median([1 / s for s in steady1]):.2f} img/s"))


# ------------------------------------------------------------------------------ 3: label-restricted CRF


def bench_label_restricted(images: list[CrfImage]) -> tuple[Result, Result]:
    params = CrfConfig()
    restricted, full, ratios, cpu_ratios = [], [], [], []
    same = total = 0
    worst = 1.0
    for i, img in enumerate(images):
        # All 20 foreground channels; absent classes are exactly 0 (the CRF floors them at 1e-5).
        all_cams = np.zeros((NUM_CLASSES - 1, *img.cams.shape[1:]), np.float32)
        all_cams[np.asarray(img.labels) - 1] = img.cams
        sides: dict[str, tuple[float, np.ndarray]] = {}
        cpu: dict[str, float] = {}
        # Alternate which side goes first so a drift in machine load does not favour one of them.
        order = ("restricted", "full") if i % 2 == 0 else ("full", "restricted")
        for side in order:
            start, start_cpu = time.perf_counter(), time.thread_time()
            if side == "restricted":
                mask = refine_cams(img.image, img.cams, img.labels, params, BG_SCORE)
            else:
                mask = refine_cams(img.image, all_cams, list(range(1, NUM_CLASSES)), params, BG_SCORE)
            sides[side] = (time.perf_counter() - start, mask)
            cpu[side] = time.thread_time() - start_cpu
        restricted.append(sides["restricted"][0])
        full.append(sides["full"][0])
        ratios.append(full[-1] / restricted[-1])
        cpu_ratios.append(cpu["full"] / cpu["restricted"])
        equal = int((sides["restricted"][1] == sides["full"][1]).sum())
        same += equal
        total += sides["full"][1].size
        worst = min(worst, equal / sides["full"][1].size)
    agreement = 100.0 * same / total
    ratio = median(ratios)
    print(f"\n== 3. label-restricted CRF ({len(images)} images, 2-3 labels, interleaved, medians)")
    print(f"  refine_cams over bg + tags : {median(restricted) * 1e3:7.1f} ms/image")
    print(f"  same over all 21 labels    : {median(full) * 1e3:7.1f} ms/image")
    print(f"  speed-up {ratio:.2f}x wall, {median(cpu_ratios):.2f}x CPU time; identical pixels {agreement:.3f}% (worst image {100 * worst:.3f}%)")
    return (Result("3a. label-restricted CRF speed-up", ratio, 1.7, True,
                   detail=f"{median(restricted) * 1e3:.0f} vs {median(full) * 1e3:.0f} ms/img"),
            Result("3b. label agreement (identical pixels)", agreement, None, True, unit="%",
                   detail=f"worst image {100 * worst:.2f}%"))


# ---------------------------------------------------------------------------------- 4: streaming memory


class MemorySampler(threading.Thread):
    """Sums the RSS of this session's processes (see ``SessionProcesses``) every ``interval`` seconds."""

    def __init__(self, marker: str, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.session = SessionProcesses(marker)
        self.interval = interval
        self._done = threading.Event()
        self.samples: list[int] = []
        self.peak = 0
        self.peak_parts: dict[str, int] = {}

    def sample(self) -> tuple[int, dict[str, int]]:
        total, parts = 0, {}
        for proc in self.session.processes():
            try:
                rss = proc.memory_info().rss
                name = self.session.group(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            total += rss
            parts[name] = parts.get(name, 0) + rss
        return total, parts

    def run(self) -> None:
        while not self._done.is_set():
            total, parts = self.sample()
            self.samples.append(total)
            if total > self.peak:
                self.peak, self.peak_parts = total, parts
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


def idle_baseline(marker: str, seconds: float = 2.0) -> int:
    """Median summed RSS of the idle cluster (after it settled), the zero point for growth."""
    sampler = MemorySampler(marker)
    values = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        values.append(sampler.sample()[0])
        time.sleep(0.2)
    return int(statistics.median(values))


def bench_memory(sizes: tuple[int, int], work: str) -> Result:
    small, large = sizes
    root = os.path.join(work, "toy64")
    start = time.perf_counter()
    make_toy_dataset(root, fmt="voc", num_train=large, num_val=1, image_size=64, num_classes=20, max_objects=3,
                     seed=11)
    reader = VocReader(root)
    records = [reader.parse(item) for item in reader.items("train")]
    log(f"memory bench data: {len(records)} 64x64 images in {time.perf_counter() - start:.0f}s")
    # A tiny untrained classifier, saved to a file as train_cls exports it: the stage loads it by URI.
    cls_config = ClassifierTrainConfig.model_validate({"backbone": {"name": "resnet_tiny", "output_stride": 16}})
    torch.manual_seed(0)
    model_uri = os.path.join(work, "model.pt")
    torch.save(build_classifier(cls_config, NUM_CLASSES - 1).state_dict(), model_uri)
    config = PseudoLabelConfig.model_validate({"generator": {"scales": [1.0], "flip": False, "bg_score": 0.2},
                                               "use_gpu": False})
    marker = os.environ[MARKER_VAR]
    results: dict[int, dict[str, Any]] = {}
    for n in (small, large):
        start_ray(2, os.path.join(work, "ray"))
        time.sleep(3.0)  # let the cluster's start-up (worker prestart) settle before taking the baseline
        baseline = idle_baseline(marker)
        sampler = MemorySampler(marker)
        sampler.start()
        start = time.perf_counter()
        summary = generate_pseudo_labels(
            records[:n], StageDir.create(os.path.join(work, "mem"), "pseudo_labels", f"n{n}"),
            model_uri=model_uri, cls_config=cls_config, config=config, num_classes=NUM_CLASSES,
            supervision="tags", class_names=list(VOC_CLASSES))
        seconds = time.perf_counter() - start
        sampler.stop()
        stop_ray()
        if summary["written"] != n:
            raise RuntimeError(f"memory bench: {summary['written']} of {n} images written ({summary['failed']} failed)")
        results[n] = {"baseline": baseline, "peak": sampler.peak, "parts": sampler.peak_parts, "seconds": seconds,
                      "samples": len(sampler.samples)}
        log(f"memory: {n} images in {seconds:.0f}s, peak {sampler.peak / 2**20:.0f} MiB")

    def mib(value: float) -> str:
        return f"{value / 2**20:7.0f} MiB"

    print("\n== 4. streaming memory (whole generate_pseudo_labels, 64x64 images, 2-CPU cluster, one run each)")
    for n, r in results.items():
        growth = r["peak"] - r["baseline"]
        print(f"  {n:5d} images: idle baseline {mib(r['baseline'])}, peak {mib(r['peak'])}, growth {mib(growth)}, "
              f"{r['seconds']:.0f}s ({n / r['seconds']:.0f} images/s, {r['samples']} samples)")
        print("      at peak: " + ", ".join(f"{k} {v / 2**20:.0f} MiB"
                                            for k, v in sorted(r["parts"].items(), key=lambda kv: -kv[1])))
    growth_small = results[small]["peak"] - results[small]["baseline"]
    growth_large = results[large]["peak"] - results[large]["baseline"]
    total_ratio = results[large]["peak"] / results[small]["peak"]
    growth_ratio = growth_large / max(growth_small, 1)
    print(f"  peak total ratio {large}/{small}: {total_ratio:.3f}x; growth-above-idle ratio: {growth_ratio:.3f}x")
    return Result(f"4. peak RSS {large} / {small} images (total)", total_ratio, 1.10, False,
                  detail=f"growth ratio {growth_ratio:.2f}x ({growth_large / 2**20:.0f} vs "
                         f"{growth_small / 2**20:.0f} MiB above idle)")


# ------------------------------------------------------------------------------------------------ main


def print_table(results: list[Result]) -> None:
    print("\n| benchmark | measured | goal | met? | detail |")
    print("|---|---|---|---|---|")
    for r in results:
        sign = ">=" if r.higher_is_better else "<="
        value = f"{r.measured:.2f}{r.unit}" if r.unit == "x" else f"{r.measured:.3f} {r.unit}"
        goal = "(reported)" if r.goal is None else f"{sign} {r.goal:.2f}{r.unit}"
        print(f"| {r.name} | {value} | {goal} | {r.met} | {r.detail} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: a few images, one repetition")
    parser.add_argument("--images", type=int, help="VOC-sized images for benches 1-3 (default 96, quick 8)")
    parser.add_argument("--image-size", type=int, default=448, help="side of the square test images (default 448)")
    parser.add_argument("--reps", type=int, help="interleaved repetitions of benches 1-2 (default 3, quick 1)")
    parser.add_argument("--memory-sizes", type=int, nargs=2, metavar=("SMALL", "LARGE"),
                        help="image counts of bench 4 (default 500 2000, quick 100 400)")
    parser.add_argument("--only", nargs="+", choices=["overhead", "labels", "memory"],
                        help="run only these benches (overhead = 1 and 2)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)
    count = args.images or (8 if args.quick else 96)
    reps = args.reps or (1 if args.quick else 3)
    sizes = tuple(args.memory_sizes or ((100, 400) if args.quick else (500, 2000)))
    only = set(args.only or ["overhead", "labels", "memory"])

    # Short path: Ray's socket paths under the temp dir must stay below the 107-character limit.
    work = tempfile.mkdtemp(prefix="wb-", dir="/tmp")
    os.environ[MARKER_VAR] = uuid.uuid4().hex
    load = os.getloadavg()
    print(f"pseudo-labelling benchmarks: {psutil.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f} at start, {'quick' if args.quick else 'full'} mode, work dir {work}")
    start = time.perf_counter()
    results: list[Result] = []
    try:
        if only & {"overhead", "labels"}:
            images = make_voc_sized_images(os.path.join(work, "voc"), count, args.image_size, seed=5)
            log(f"{len(images)} images of {args.image_size}x{args.image_size} ready")
            if "overhead" in only:
                results += bench_overhead_and_scaling(images, reps, work)
            if "labels" in only:
                results += bench_label_restricted(images)
        if "memory" in only:
            results.append(bench_memory(sizes, work))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    print(f"\ntotal {time.perf_counter() - start:.0f}s; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at end")
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
