"""Checkpoints of a Ray Train run: what each epoch saves, resuming from the latest, exporting the final weights.

A checkpoint folder holds ``model.pt``, ``optimizer.pt`` and ``state.json`` (last epoch + history), the objective's
own parameters as ``objective.pt`` when it has any (LoRM), and what the hooks name in ``checkpoint_state`` (OuT's
EMA teacher as ``teacher.pt``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import ray
import ray.train
import torch

from wsss_ray.core import storage
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.core.torch_helpers import unwrap
from wsss_ray.training.tensorboard import TensorBoardLog

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.pt", "optimizer.pt", "state.json"
# The objective's own parameters (LoRM), saved beside the model when present.
OBJECTIVE_FILE = "objective.pt"


def latest_state() -> dict[str, Any] | None:
    """The run's latest checkpoint's ``state.json`` (``epoch``: the last one trained, 0-based; ``history``), or None.

    ``epoch + 1`` is the first epoch to run, what ``restore`` returns.
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    # Only ``state.json``, read straight from the checkpoint's storage: ``as_directory()`` shares one download per
    # node, which another worker may be restarting meanwhile (ray-project/ray#48726, as in ``restore``).
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path.rstrip('/')}/{STATE_FILE}") as f:
        return json.loads(f.read())


def restore(step: torch.nn.Module, optimizer: torch.optim.Optimizer,
            extras: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    """Load the run's latest checkpoint if there is one; returns (first epoch to run, history so far).

    ``step`` is the :class:`~wsss_ray.training.step.TrainStep` (model + objective); ``extras`` maps file
    names to objects with ``load_state_dict`` saved beside it (the hooks' ``checkpoint_state``).
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    # Each worker downloads its own copy: ``as_directory()`` shares one download per node, which a second worker
    # can start again while the first is reading it (ray-project/ray#48726: a torn optimizer.pt in a 2-worker
    # resume here).
    with tempfile.TemporaryDirectory(prefix="restore-") as directory:
        checkpoint.to_directory(directory)

        def load(name: str) -> Any:
            return torch.load(os.path.join(directory, name), map_location="cpu", weights_only=True)

        step.model.load_state_dict(load(MODEL_FILE))
        if os.path.exists(os.path.join(directory, OBJECTIVE_FILE)):
            step.objective.load_state_dict(load(OBJECTIVE_FILE))
        optimizer.load_state_dict(load(OPTIMIZER_FILE))
        for name, target in extras.items():
            if os.path.exists(os.path.join(directory, name)):
                target.load_state_dict(load(name))
        with open(os.path.join(directory, STATE_FILE)) as f:
            state = json.load(f)
    if ray.train.get_context().get_world_rank() == 0:
        print(f"resuming from epoch {state['epoch'] + 1} ({checkpoint.path})", flush=True)
    return state["epoch"] + 1, state["history"]


def _save(directory: str, step: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
          history: list[dict[str, Any]], extras: dict[str, Any]) -> None:
    step = unwrap(step)
    torch.save(step.model.state_dict(), os.path.join(directory, MODEL_FILE))
    if step.objective.state_dict():
        torch.save(step.objective.state_dict(), os.path.join(directory, OBJECTIVE_FILE))
    torch.save(optimizer.state_dict(), os.path.join(directory, OPTIMIZER_FILE))
    for name, source in extras.items():
        torch.save(source.state_dict(), os.path.join(directory, name))
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump({"epoch": epoch, "history": history}, f)


def report_epoch(step: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                 history: list[dict[str, Any]], metrics: dict[str, Any], extras: dict[str, Any],
                 tensorboard: TensorBoardLog | None) -> None:
    """Append the epoch's metrics, checkpoint (rank 0 writes; every rank reports, as Ray Train requires)."""
    history.append({"epoch": epoch + 1, **metrics})
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            _save(directory, step, optimizer, epoch, history, extras)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
            line = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            print(f"epoch {epoch + 1}: {line}", flush=True)
            if tensorboard is not None:
                tensorboard.write(epoch + 1, metrics)
        ray.train.report({"epoch": epoch + 1, **metrics}, checkpoint=checkpoint)


def export_model(result: ray.train.Result, stage: StageDir) -> dict[str, Any]:
    """Copy the final weights out of the run's last checkpoint to ``<stage>/model.pt``.

    Returns the stage summary part: the model's URI, its SHA-256 (downstream stages key their outputs by it,
    so retrained weights never reuse stale pseudo-labels) and the per-epoch history.
    """
    if result.checkpoint is None:
        raise RuntimeError(f"{stage.name}: training finished without a checkpoint ({stage.uri})")
    return export_checkpoint(result.checkpoint, stage.uri)


def export_checkpoint(checkpoint: ray.train.Checkpoint, stage_uri: str) -> dict[str, Any]:
    """``export_model`` for a given checkpoint: its weights to ``<stage_uri>/model.pt``, its history beside them."""
    with checkpoint.as_directory() as directory:
        with open(os.path.join(directory, MODEL_FILE), "rb") as f:
            weights = f.read()
        with open(os.path.join(directory, STATE_FILE)) as f:
            history = json.load(f)["history"]
    model_uri = storage.join(stage_uri, MODEL_FILE)
    storage.write_bytes(model_uri, weights)
    storage.write_json(storage.join(stage_uri, "history.json"), history)
    return {"model_uri": model_uri, "model_sha256": hashlib.sha256(weights).hexdigest(), "history": history}
