"""Ray Tune sweeps: space validation, an end-to-end sweep on the loopback S3, and resuming (also after a kill);
pseudo_labels trials and relabel_train_seg trials (relabel, then train) on the same tiny data.

The sweeps share one tiny base config (resnet_tiny, 64 px toy data, 2 epochs) whose pipeline inputs are the
session's reference run (conftest), made once; each sweep is a different space name below the same output, so
only its trials run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from wsss_ray.core import storage
from wsss_ray.pipeline_config import ConfigError
from wsss_ray.tuning.space import TRIAL_METRICS, load_space

REPO = Path(__file__).resolve().parents[1]


def tiny_base(reference: dict[str, Any]) -> dict[str, Any]:
    """The reference run's dataset, classifier, pseudo-label sections and output (conftest), so the sweeps' shared
    inputs are its finished stages; the trial section (train_seg) is the sweeps' own."""
    sections = reference["sections"]
    small_backbone = {"name": "resnet_tiny", "output_stride": 16}
    return {
        **{key: sections[key] for key in ("output", "dataset", "train_cls", "pseudo_labels")},
        "name": "tiny-sweep",
        # One 0.5-CPU worker: with the trial driver's share, one CPU stays free for Ray Data's ingest.
        "train_seg": {"model": {"backbone": small_backbone, "aspp_channels": 16}, "epochs": 2, "batch_size": 4,
                      "optimizer": {"lr": 0.02}, "augment": sections["train_seg"]["augment"],
                      "workers": {"num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 1}},
    }


def write_space(directory: Path, base: Path, **fields: Any) -> Path:
    space = {"base_config": str(base), "trial": "train_seg", "metric": "val_miou", **fields}
    path = directory / f"{fields['name']}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.fixture(scope="module")
def base_config(tmp_path_factory: pytest.TempPathFactory, reference_pipeline: dict[str, Any]) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "base.yaml"
    path.write_text(yaml.safe_dump(tiny_base(reference_pipeline)))
    return path


# ------------------------------------------------------------------------------------------------ validation


def test_unknown_param_path_names_file_and_field(base_config: Path, tmp_path: Path) -> None:
    space = write_space(tmp_path, base_config, name="typo", params={"train_seg.loss.smoothing": {"grid": [0.1]}})
    with pytest.raises(ConfigError) as error:
        load_space(space)
    assert f"{space}: params.train_seg.loss.smoothing.grid: unknown field" in str(error.value)


def test_out_of_range_value_names_file_and_field(base_config: Path, tmp_path: Path) -> None:
    space = write_space(tmp_path, base_config, name="range",
                        params={"train_seg.loss.label_smoothing": {"grid": [0.1, 1.5]}})
    with pytest.raises(ConfigError, match=rf"{space}: params.train_seg.loss.label_smoothing.grid: "
                                          r"Input should be less than 1, got 1.5"):
        load_space(space)


@pytest.mark.parametrize(("spec", "message"), [
    ({"normal": [0, 1]}, "params.train_seg.optimizer.lr.normal: unknown field"),
    ({"grid": [0.1], "choice": [0.2]}, "give exactly one of"),
    ({"loguniform": [0.0, 0.1]}, "bounds must be positive"),
    ({"uniform": [0.5, 0.1]}, "lower bound 0.5 must be below upper bound 0.1"),
])
def test_bad_distribution_names_file_and_field(base_config: Path, tmp_path: Path, spec: dict[str, Any],
                                               message: str) -> None:
    space = write_space(tmp_path, base_config, name="dist", params={"train_seg.optimizer.lr": spec})
    with pytest.raises(ConfigError) as error:
        load_space(space)
    assert str(space) in str(error.value) and message in str(error.value)
    assert "params.train_seg.optimizer.lr" in str(error.value)


def test_metric_must_match_trial_kind(base_config: Path, tmp_path: Path) -> None:
    space = write_space(tmp_path, base_config, name="metric", trial="pseudo_labels",
                        params={"pseudo_labels.generator.bg_score": {"grid": [0.1]}})
    with pytest.raises(ConfigError, match=rf"{space}: <root>: .*val_miou.* is not reported by pseudo_labels"):
        load_space(space)


def test_param_outside_the_trials_sections_is_refused(base_config: Path, tmp_path: Path) -> None:
    # train_seg trials train on the shared pseudo-masks: a generator value would validate and then do nothing.
    space = write_space(tmp_path, base_config, name="noop",
                        params={"pseudo_labels.generator.bg_score": {"grid": [0.1, 0.3]}})
    with pytest.raises(ConfigError, match=rf"{space}: params.pseudo_labels.generator.bg_score: train_seg trials "
                                          r"only run train_seg.*use trial: relabel_train_seg"):
        load_space(space)
    # pseudo_labels trials do not train
    space = write_space(tmp_path, base_config, name="noop2", trial="pseudo_labels", metric="pseudo_miou",
                        params={"train_seg.optimizer.lr": {"grid": [0.1]}})
    with pytest.raises(ConfigError, match=r"params.train_seg.optimizer.lr: pseudo_labels trials only run"):
        load_space(space)
    # relabel_train_seg trials take both sections, and max_images
    space = write_space(tmp_path, base_config, name="both", trial="relabel_train_seg", max_images=4,
                        params={"pseudo_labels.generator.bg_score": {"grid": [0.1]},
                                "train_seg.optimizer.lr": {"grid": [0.1]}})
    assert load_space(space)[0].trial == "relabel_train_seg"
    space = write_space(tmp_path, base_config, name="max", max_images=4, params={"train_seg.seed": {"grid": [1]}})
    with pytest.raises(ConfigError, match="max_images applies to pseudo_labels and relabel_train_seg trials only"):
        load_space(space)


def test_local_sweep_without_dashboard_is_refused(base_config: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from wsss_ray.tuning.sweep import run_sweep

    # Without the state API Ray Train never frees an early-stopped trial's CPUs: the sweep would stall.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    space = write_space(tmp_path, base_config, name="nodash", overrides=["ray.include_dashboard=false"],
                        params={"train_seg.optimizer.lr": {"grid": [0.1]}})
    with pytest.raises(ConfigError, match=rf"{space}: base config ray.include_dashboard: .*set it to true"):
        run_sweep(space)  # refused before any Ray work starts


SHIPPED_SPACES = sorted((REPO / "tuning").glob("*.yaml"))


def test_every_paper_ablation_has_a_space() -> None:
    names = {path.stem for path in SHIPPED_SPACES}
    assert {"out_inflection", "curriculum", "sce", "early_learning", "nal", "cdsp", "mspn_seeds",
            "mspn_agreement", "crf", "cam_threshold", "label_smoothing", "lr"} <= names, names


@pytest.mark.parametrize("path", SHIPPED_SPACES, ids=lambda p: p.stem)
def test_shipped_spaces_validate(path: Path) -> None:
    space, base = load_space(path)
    assert space.name == path.stem and base.name.startswith("demo")
    assert space.metric in TRIAL_METRICS[space.trial]
    # the header comment cites the paper the space reproduces
    assert path.read_text().startswith("# ")


# ------------------------------------------------------------------------------------------------ sweeps


@pytest.fixture(scope="module")
def sweep_run(ray_cluster: None, base_config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from wsss_ray.tuning.sweep import run_sweep

    space = write_space(tmp_path_factory.mktemp("spaces"), base_config, name="ls", scheduler="fifo",
                        params={"train_seg.loss.label_smoothing": {"grid": [0.0, 0.2]}})
    start = time.monotonic()
    results = run_sweep(space)
    return {"space": space, "results": results, "seconds": time.monotonic() - start}


def test_sweep_results_on_s3(sweep_run: dict[str, Any], s3_server: Any) -> None:
    results = sweep_run["results"]
    sweep_uri = results["experiment_uri"]
    assert sweep_uri == f"s3://{s3_server.bucket}/runs/tiny/sweeps/ls"  # the reference run's output
    stored = storage.read_json(storage.join(sweep_uri, "results.json"))
    assert len(stored["trials"]) == 2
    assert sorted(t["params"]["train_seg.loss.label_smoothing"] for t in stored["trials"]) == [0.0, 0.2]
    for trial in stored["trials"]:
        assert trial["status"] == "TERMINATED" and trial["epochs"] == 2, trial
        assert 0.0 <= trial["metric"] <= 1.0
        assert [row["epoch"] for row in trial["history"]] == [1, 2]
        # each trial's own Ray Train run and exported model live in its folder
        assert storage.exists(storage.join(trial["uri"], "model.pt"))
    assert stored["best"]["overrides"][0].startswith("train_seg.loss.label_smoothing=")
    report_dir = storage.join(sweep_uri, "report")
    html = storage.read_text(storage.join(report_dir, "report.html"))
    assert "Best config" in html and all(t["id"] in html for t in stored["trials"])
    pngs = storage.list_files(report_dir, suffix=".png")
    assert any("metric_vs_train_seg.loss.label_smoothing" in uri for uri in pngs), pngs
    assert any(uri.endswith("trial_curves.png") for uri in pngs)


def test_tensorboard_event_files_per_trial(sweep_run: dict[str, Any]) -> None:
    results = sweep_run["results"]
    # Tune's own logs (the trials' Ray Train runs also log to trials/<id>/tensorboard)
    events = [uri for uri in storage.list_files(results["experiment_uri"])
              if "events.out.tfevents" in uri and "/trials/" not in uri]
    trial_dirs = {uri.rsplit("/", 2)[-2] for uri in events}
    assert len(trial_dirs) == len(results["trials"]), events
    # the event files hold the reported metric (readable by TensorBoard's own reader)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    local = Path(storage.copy_to_local(events[0], str(Path(sweep_run["space"]).parent / "ev")))
    accumulator = EventAccumulator(str(local))
    accumulator.Reload()
    assert any(tag.endswith("val_miou") for tag in accumulator.Tags()["scalars"])


def test_rerun_restores_finished_trials(sweep_run: dict[str, Any]) -> None:
    from wsss_ray.tuning.sweep import run_sweep

    before = sweep_run["results"]
    finished = {t["id"]: storage.read_json(storage.join(t["uri"], "summary.json"))["finished_at"]
                for t in before["trials"]}
    start = time.monotonic()
    again = run_sweep(sweep_run["space"])
    assert time.monotonic() - start < sweep_run["seconds"] / 2
    assert [(t["id"], t["metric"], t["epochs"]) for t in again["trials"]] == \
        [(t["id"], t["metric"], t["epochs"]) for t in before["trials"]]
    # no trial ran again: their summaries were written once, by the first run
    for trial in again["trials"]:
        assert storage.read_json(storage.join(trial["uri"], "summary.json"))["finished_at"] == finished[trial["id"]]


_CHILD = """
import sys
import ray
ray.init(address=sys.argv[2])
from wsss_ray.tuning.sweep import run_sweep
run_sweep(sys.argv[1])
"""


def _checkpoints(sweep_uri: str) -> dict[str, set[str]]:
    """Ray Train checkpoint folders per trial id (``trials/<id>/ray_train/<run>/checkpoint_*``)."""
    found: dict[str, set[str]] = {}
    for uri in storage.list_files(storage.join(sweep_uri, "trials")):
        parts = uri.split("/")
        names = [p for p in parts if p.startswith("checkpoint_") and not p.endswith(".json")]
        if names:
            found.setdefault(parts[parts.index("trials") + 1], set()).add(names[0])
    return found


def test_killed_sweep_resumes(sweep_run: dict[str, Any], tmp_path: Path) -> None:
    """Kill a sweep's driver process after its first Ray Train checkpoint, then resume it here.

    The interrupted trial must continue from a checkpoint: its run keeps the old checkpoint folders and adds at
    most one (a run started over would write two new ones next to the orphans). At most, not exactly: the kill
    can land after an epoch's checkpoint folder was uploaded but before Ray Train's snapshot recorded it.
    """
    from wsss_ray.tuning.sweep import run_sweep

    space = write_space(tmp_path, Path(yaml.safe_load(Path(sweep_run["space"]).read_text())["base_config"]),
                        name="killed", scheduler="fifo", params={"train_seg.optimizer.lr": {"grid": [0.01, 0.02]}})
    output = sweep_run["results"]["experiment_uri"].rsplit("/", 1)[0]
    sweep_uri = storage.join(output, "killed")
    address = ray.get_runtime_context().gcs_address
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(space), address], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        # Experiment state uploaded and one epoch recorded by Ray Train (checkpoint + its manager's snapshot):
        # a kill now loses a running trial mid-way.
        while time.monotonic() < deadline and child.poll() is None:
            files = storage.list_files(sweep_uri)
            if any("/experiment_state-" in f for f in files) and \
                    any(f.endswith("/checkpoint_manager_snapshot.json") for f in files) and _checkpoints(sweep_uri):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no trial checkpoint seen (240 s, or the sweep ended first: exit code {child.poll()})")
        assert child.poll() is None, "the sweep finished before it could be interrupted"
        os.killpg(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert not storage.exists(storage.join(sweep_uri, "results.json"))
    # The dead driver's trial actors, and so their Ray Train workers, are ended by Ray shortly after it, not with
    # it: a worker can still upload its next epoch's checkpoint meanwhile (seen once, 1.4 s after the kill). The
    # interrupted state is what is stored once no worker of the killed sweep is left.
    from ray.util.state import list_actors

    deadline = time.monotonic() + 60
    while list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]):
        assert time.monotonic() < deadline, "the killed sweep's training workers outlived its driver by 60 s"
        time.sleep(0.5)
    ((interrupted, at_kill),) = _checkpoints(sweep_uri).items()

    results = run_sweep(space)
    assert len(results["trials"]) == 2
    for trial in results["trials"]:
        assert trial["status"] == "TERMINATED" and trial["epochs"] == 2, trial
        assert trial["metric"] is not None
    after = _checkpoints(sweep_uri)[interrupted]
    assert at_kill <= after and len(after - at_kill) <= 1, (at_kill, after)
    stored = json.loads(storage.read_text(storage.join(sweep_uri, "results.json")))
    assert {t["id"] for t in stored["trials"]} == {t["id"] for t in results["trials"]}


def test_pseudo_label_sweep(ray_cluster: None, base_config: Path, tmp_path: Path) -> None:
    """pseudo_labels trials relabel the first ``max_images`` training images and report the scores once."""
    from wsss_ray.tuning.sweep import run_sweep

    space = write_space(tmp_path, base_config, name="bg", trial="pseudo_labels", metric="pseudo_miou", max_images=4,
                        params={"pseudo_labels.generator.bg_score": {"grid": [0.15, 0.4]}})
    results = run_sweep(space)
    assert results["scheduler"] == "fifo" and len(results["trials"]) == 2
    for trial in results["trials"]:
        assert trial["status"] == "TERMINATED" and trial["epochs"] == 1, trial
        assert 0.0 <= trial["metric"] <= 1.0
        assert len(storage.list_files(storage.join(trial["uri"], "pseudo"), suffix=".png")) == 4
    report_dir = storage.join(results["experiment_uri"], "report")
    assert storage.exists(storage.join(report_dir, "metric_vs_pseudo_labels.generator.bg_score.png"))


def test_relabel_train_seg_sweep(ray_cluster: None, base_config: Path, tmp_path: Path) -> None:
    """relabel_train_seg trials relabel with their own generator settings into their folder, then train on those
    masks reporting val_miou every epoch, under ASHA (which may stop the second trial at its epoch-1 rung)."""
    from wsss_ray.tuning.sweep import run_sweep

    space = write_space(tmp_path, base_config, name="relabel", trial="relabel_train_seg", max_images=4,
                        scheduler="asha", grace_period=1, reduction_factor=2,
                        params={"pseudo_labels.generator.bg_score": {"grid": [0.15, 0.4]}})
    results = run_sweep(space)
    assert results["scheduler"] == "asha" and results["max_epochs"] == 2 and len(results["trials"]) == 2
    for trial in results["trials"]:
        assert trial["status"] == "TERMINATED" and trial["epochs"] >= 1, trial
        assert trial["stopped_early"] == (trial["epochs"] < 2)
        assert [row["epoch"] for row in trial["history"]] == list(range(1, trial["epochs"] + 1))
        assert all(0.0 <= row["val_miou"] <= 1.0 for row in trial["history"]), trial["history"]
        # the trial's own pseudo-masks, made with its own bg_score, are what it trained on
        assert len(storage.list_files(storage.join(trial["uri"], "pseudo"), suffix=".png")) == 4
        generator = storage.read_json(storage.join(trial["uri"], "generator.json"))["generator"]
        assert generator["bg_score"] == trial["params"]["pseudo_labels.generator.bg_score"]
        # ASHA ends a trial right after its last report (also at the last epoch): the sweep exports its weights
        # and summary from the trial's latest checkpoint
        assert storage.exists(storage.join(trial["uri"], "model.pt"))
        summary = storage.read_json(storage.join(trial["uri"], "summary.json"))
        assert summary["pseudo_labels"]["written"] == 4 and len(summary["history"]) == trial["epochs"]
    # ASHA lets the first trial to reach a rung through, so at least one ran all epochs
    assert max(t["epochs"] for t in results["trials"]) == 2
    assert storage.exists(storage.join(results["experiment_uri"], "report", "trial_curves.png"))
