"""Worker groups and model actor pools sized to the cluster's GPUs (issue #22).

The rule is one pure function per kind (``wsss_ray.core.resources``), driven here through every case; then one
real Ray cluster that declares a GPU (``ray.init(num_gpus=1)`` on this CPU machine, in a separate process: the
session ``ray_cluster`` fixture owns this process's driver) checks that what the rule plans is placed at once
and that an impossible request fails at once instead of waiting forever.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wsss_ray.core.config_base import ConfigError
from wsss_ray.core.resources import plan_actor_pool, plan_workers

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_workers_when_asked_or_when_auto_sees_no_gpu() -> None:
    assert plan_workers("train_cls.workers", 2, False, 4, False).use_gpu is False
    plan = plan_workers("train_cls.workers", 2, "auto", 0, False, batch_size=32)
    assert (plan.num_workers, plan.use_gpu) == (2, False)
    assert "0 GPUs" in plan.reason


def test_auto_uses_as_many_gpus_as_the_cluster_has_up_to_num_workers() -> None:
    # make demo's config on a one-GPU workstation: 2 workers asked, 1 placed, the global batch kept
    plan = plan_workers("train_cls.workers", 2, "auto", 1, False, batch_size=32)
    assert (plan.num_workers, plan.use_gpu) == (1, True)
    assert "1 GPU worker(s) of the 2 in train_cls.workers.num_workers" in plan.reason
    assert "global batch 32 stays, 32 per worker" in plan.reason
    # voc.yaml's classifier (4 workers, batch 16) on 3 GPUs: 3 does not divide 16, so 2 workers of 8
    assert plan_workers("train_cls.workers", 4, "auto", 3, False, batch_size=16).num_workers == 2
    assert plan_workers("train_cls.workers", 4, "auto", 8, False, batch_size=16).num_workers == 4
    assert plan_workers("train_cls.workers", 4, "auto", 1.5, False, batch_size=16).num_workers == 1


def test_auto_with_an_autoscaler_asks_for_every_worker() -> None:
    plan = plan_workers("train_seg.workers", 2, "auto", 0, True, batch_size=10)
    assert (plan.num_workers, plan.use_gpu) == (2, True)
    assert "autoscaler" in plan.reason


def test_use_gpu_true_with_too_few_gpus_fails_naming_the_field_and_the_gpus() -> None:
    with pytest.raises(ConfigError) as error:
        plan_workers("train_seg.workers", 2, True, 1, False, batch_size=10)
    message = str(error.value)
    assert "train_seg.workers.use_gpu: true" in message and "the cluster has 1 GPU " in message
    assert "train_seg.workers.num_workers: 2" in message
    assert plan_workers("train_seg.workers", 2, True, 2, False).num_workers == 2
    assert plan_workers("train_seg.workers", 2, True, 1, True).num_workers == 2  # the autoscaler adds a node


def test_elastic_group_is_capped_to_the_gpus() -> None:
    plan = plan_workers("train_seg.workers", 4, "auto", 2, False, batch_size=8, min_workers=3)
    assert (plan.min_workers, plan.num_workers) == (2, 2)
    assert plan_workers("train_seg.workers", 4, "auto", 8, False, batch_size=8, min_workers=3).min_workers == 3


def test_actor_pools_follow_the_same_rule() -> None:
    assert plan_actor_pool("pseudo_labels", 4, "auto", 1, 16, False).max_actors == 1
    assert plan_actor_pool("pseudo_labels", 4, "auto", 8, 16, False).max_actors == 4
    cpu = plan_actor_pool("evaluate", 4, "auto", 0, 2, False)
    assert (cpu.max_actors, cpu.use_gpu) == (1, False)  # one CPU left for the read tasks
    assert plan_actor_pool("evaluate", 4, False, 2, 8, False).use_gpu is False
    assert plan_actor_pool("evaluate", 4, True, 0, 8, True).max_actors == 4
    with pytest.raises(ConfigError, match=r"evaluate.use_gpu: true needs a GPU but the cluster has 0 GPUs"):
        plan_actor_pool("evaluate", 4, True, 0, 8, False)


PROBE = """
import json, sys, tempfile, time
import ray, ray.train
from ray.train import ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from wsss_ray.core.config_base import ConfigError, OptimizerConfig, WorkersConfig
from wsss_ray.core.ray_utils import model_actor_pool, plan_model_pool
from wsss_ray.core.resources import plan_workers
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.training.ingest import RowSource
from wsss_ray.training.loop import TrainSpec, fit

ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
         _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
ray.data.DataContext.get_current().enable_progress_bars = False
out = {}
# use_gpu: true with 2 workers on 1 GPU: the real fit() refuses before submitting anything
spec = TrainSpec(epochs=1, batch_size=2, seed=0, optimizer=OptimizerConfig(), head_lr_multiplier=1.0,
                 build_model=dict, build_objective=dict, train=RowSource([], dict), where="train_cls")
start = time.monotonic()
try:
    fit(spec, WorkersConfig(num_workers=2, use_gpu=True), StageDir.create(tempfile.mkdtemp(), "train_cls", "x"))
except ConfigError as error:
    out["true_error"], out["true_seconds"] = str(error), time.monotonic() - start

# use_gpu: auto with 2 workers on 1 GPU: the planned group is placed and runs (gloo: no CUDA on this machine)
plan = plan_workers("train_cls.workers", 2, "auto", ray.cluster_resources().get("GPU", 0), False, batch_size=32)

def report(config):
    ctx = ray.train.get_context()  # Ray Train V2 keeps metrics only with a checkpoint: a file instead
    with open(config["out"], "w") as f:
        json.dump({"world": ctx.get_world_size(), "gpus": len(ray.get_gpu_ids())}, f)

seen = tempfile.mktemp()
TorchTrainer(report, train_loop_config={"out": seen}, torch_config=TorchConfig(backend="gloo"),
                      scaling_config=ScalingConfig(num_workers=plan.num_workers, use_gpu=plan.use_gpu,
                                                   resources_per_worker={"CPU": 0.5, "GPU": 1})).fit()
out["auto_trained"] = json.load(open(seen))

# the model actor pool with use_gpu: true and max_actors 4 on 1 GPU: one GPU actor, and it runs
pool = plan_model_pool("pseudo_labels", 4, True)

class Gpus:
    def __call__(self, row):
        return {"gpus": len(ray.get_gpu_ids())}

rows = ray.data.range(4).map(Gpus, compute=model_actor_pool(pool), num_cpus=0, num_gpus=1).take_all()
out["pool"] = {"max_actors": pool.max_actors, "gpus_per_row": sorted({r["gpus"] for r in rows}), "rows": len(rows)}
print("RESULT " + json.dumps(out), flush=True)
ray.shutdown()
"""


def test_planned_groups_and_pools_run_on_a_cluster_with_fewer_gpus_than_asked(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "WSSS_AUTOSCALING": "0"}
    done = subprocess.run([sys.executable, "-c", PROBE], check=False, capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    assert "train_cls.workers.use_gpu: true" in out["true_error"] and "the cluster has 1 GPU " in out["true_error"]
    assert out["true_seconds"] < 5
    assert (out["auto_trained"]["world"], out["auto_trained"]["gpus"]) == (1, 1)
    assert out["pool"] == {"max_actors": 1, "gpus_per_row": [1], "rows": 4}
