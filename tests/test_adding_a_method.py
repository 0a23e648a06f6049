"""docs/methods.md's promise, kept: a method is its folder plus one registry line.

A copy of the package gets a new family folder (a segmentation loss and the pseudo-label generator whose extra
output it reads) and one line in each of two tables of ``methods/registry.py`` (with the imports of the names the
lines use); no other file changes. A driver running that copy joins the session's Ray cluster (its workers import
the copy through the job's runtime env) and runs the real stages: the new generator writes masks, the new loss
trains one step on them.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wsss_ray"

FAMILY = {
    "__init__.py": '"""A toy family, written by tests/test_adding_a_method.py."""\n',
    "config.py": '''"""Configs of the toy loss and generator."""

from __future__ import annotations

from typing import Literal

from wsss_ray.core.config_base import Fraction, StrictModel


class ToyWeightedLossConfig(StrictModel):
    name: Literal["toy_weighted_ce"] = "toy_weighted_ce"


class ToyCamGeneratorConfig(StrictModel):
    name: Literal["toy_cam"] = "toy_cam"
    bg_score: Fraction = 0.2
''',
    "generator.py": '''"""Single-scale CAMs thresholded, and a weight map: 1 where the mask has a label."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from wsss_ray.maths.crf import threshold_cams
from wsss_ray.maths.inference import multiscale_cams
from wsss_ray.core.labels import IGNORE_LABEL
from wsss_ray.methods.base import Generator
from wsss_ray.methods.toy.config import ToyCamGeneratorConfig


class ToyCamGenerator(Generator[ToyCamGeneratorConfig]):
    outputs: ClassVar[dict[str, int]] = {"pseudo": IGNORE_LABEL, "toy_weight": 0}
    titles: ClassVar[dict[str, str]] = {"pseudo": "pseudo-mask"}

    def model_step(self, model: torch.nn.Module, image: np.ndarray, record: dict[str, Any], labels: list[int],
                   device: str) -> dict[str, np.ndarray]:
        return {"cams": multiscale_cams(model, image, labels, [1.0], False, device)}

    def refine_step(self, image: np.ndarray, arrays: dict[str, np.ndarray], record: dict[str, Any],
                    labels: list[int]) -> dict[str, np.ndarray]:
        pseudo = threshold_cams(arrays["cams"].astype(np.float32), labels, self.config.bg_score)
        return {"pseudo": pseudo, "toy_weight": (pseudo != IGNORE_LABEL).astype(np.uint8)}
''',
    "objective.py": '''"""Cross-entropy on the pseudo-mask, weighted per pixel by the generator's ``toy_weight``."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from wsss_ray.core.labels import IGNORE_LABEL
from wsss_ray.methods.base import SegmentationObjective
from wsss_ray.methods.toy.config import ToyWeightedLossConfig


class ToyWeightedObjective(SegmentationObjective):
    maps: ClassVar[tuple[str, ...]] = ("label", "toy_weight")

    def __init__(self, config: ToyWeightedLossConfig, num_classes: int, feature_channels: int = 0) -> None:
        super().__init__()

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["image"]).float()
        pixel = F.cross_entropy(logits, batch["label"].long(), ignore_index=IGNORE_LABEL, reduction="none")
        weight = batch["toy_weight"].float()
        loss = (pixel * weight).sum() / weight.sum().clamp_min(1.0)
        return loss, {"toy_weighted": loss.detach()}
''',
}

IMPORTS = ("from wsss_ray.methods.toy.config import ToyCamGeneratorConfig, ToyWeightedLossConfig\n"
           "from wsss_ray.methods.toy.generator import ToyCamGenerator\n"
           "from wsss_ray.methods.toy.objective import ToyWeightedObjective\n")
LINES = {"], Generator)": '    Component("toy_cam", ToyCamGeneratorConfig, ToyCamGenerator),\n',
         "], SegmentationObjective)": '    Component("toy_weighted_ce", ToyWeightedLossConfig, ToyWeightedObjective, '
                                      '{"generator": "toy_cam"}),\n'}

DRIVER = '''
import json, sys
import ray
import wsss_ray
assert wsss_ray.__file__.startswith(sys.argv[2]), wsss_ray.__file__  # the copy, not the checkout
ray.init(address=sys.argv[1], runtime_env={"env_vars": {"PYTHONPATH": sys.argv[2]}}, log_to_driver=False)
from wsss_ray.pipeline_config import parse_config
from wsss_ray.pipeline import run_pipeline
summaries = run_pipeline(parse_config(json.loads(sys.argv[3]), source="toy method"), until="train_seg")
print("SUMMARIES " + json.dumps(summaries, default=str))
'''


def _add_family(root: Path) -> Path:
    """A copy of the package with the toy family: its folder plus one line in each of two registry tables."""
    package = root / "wsss_ray"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    for name, text in FAMILY.items():
        (package / "methods" / "toy").mkdir(exist_ok=True)
        (package / "methods" / "toy" / name).write_text(text)
    registry = package / "methods" / "registry.py"
    text = registry.read_text()
    anchor = "from wsss_ray.models.classifier import"
    text = text.replace(anchor, IMPORTS + anchor, 1)
    for end, line in LINES.items():
        assert text.count(end) == 1, end
        text = text.replace(end, line + end)
    registry.write_text(text)
    return package


def _changed(left: Path, right: Path) -> list[str]:
    """Files that differ or exist on one side only (relative to ``right``), ignoring bytecode."""
    found: list[str] = []

    def walk(cmp: filecmp.dircmp, prefix: str) -> None:
        found.extend(prefix + n for n in cmp.diff_files + cmp.left_only + cmp.right_only if n != "__pycache__")
        for name, sub in cmp.subdirs.items():
            if name != "__pycache__":
                walk(sub, f"{prefix}{name}/")

    walk(filecmp.dircmp(left, right), "")
    return sorted(found)


@pytest.mark.usefixtures("ray_cluster")
def test_a_new_loss_and_generator_are_a_folder_and_one_registry_line(tmp_path: Path) -> None:
    import ray

    from wsss_ray.data.toy import make_toy_dataset

    package = _add_family(tmp_path / "pkg")
    assert _changed(PACKAGE, package) == ["methods/registry.py", "methods/toy"]
    data = tmp_path / "data"
    make_toy_dataset(str(data), fmt="voc", num_train=4, num_val=2, image_size=48, num_classes=3, seed=5)
    backbone = {"name": "resnet_tiny", "output_stride": 16}
    workers = {"num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 0}
    augment = {"crop_size": 48, "scale_min": 1.0, "scale_max": 1.0}
    sections = {
        "name": "toy-method", "output": str(tmp_path / "out"),
        "dataset": {"format": "voc", "root": str(data), "train_split": "train", "val_split": "val"},
        "train_cls": {"backbone": backbone, "epochs": 1, "batch_size": 4, "workers": workers, "augment": augment},
        "pseudo_labels": {"generator": {"name": "toy_cam"}, "max_actors": 1},
        "train_seg": {"model": {"backbone": backbone, "aspp_channels": 16}, "loss": {"name": "toy_weighted_ce"},
                      "epochs": 1, "batch_size": 4, "val_every": 0, "workers": workers, "augment": augment},
    }
    env = {**os.environ, "PYTHONPATH": str(package.parent)}
    run = subprocess.run([sys.executable, "-c", DRIVER, ray.get_runtime_context().gcs_address,
                          str(package.parent), json.dumps(sections)],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summaries = json.loads(run.stdout.split("SUMMARIES ", 1)[1])
    pseudo = next((tmp_path / "out").glob("pseudo_labels-*"))
    assert summaries["pseudo_labels"]["written"] >= 1
    assert {p.name for p in pseudo.iterdir()} >= {"pseudo", "toy_weight"}
    assert list((pseudo / "toy_weight").glob("*.png")) and list((pseudo / "pseudo").glob("*.png"))
    history = summaries["train_seg"]["history"]
    assert len(history) == 1 and "toy_weighted" in json.dumps(history)
