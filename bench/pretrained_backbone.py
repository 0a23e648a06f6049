"""A backbone pretrained on a synthetic classification task disjoint from the toy segmentation classes.

The papers start every classifier and segmenter from ImageNet weights; the fidelity benchmarks start from these,
so their runs spend the budget on the method rather than on learning edges and textures from nothing.

The pretraining task shares no class, shape or texture with :mod:`wsss_ray.data.toy` (which draws discs, squares,
stars … filled with stripes, checkers, dots, rings and waves on smooth backgrounds). Here every image holds one
or two of eight pattern classes — spirals, hexagon outlines, zig-zag bands, concentric squares, Gabor blobs,
cross-hatching, sparse speckle and radial spokes — on a noise background, and the network learns their
multi-label tags. Training is deterministic at a fixed seed; the weights are cached outside the repository under
``$WSSS_BENCH_CACHE`` (default ``~/.cache/wsss-ray/bench``), keyed by every setting, in the torchvision naming that
``backbone.weights`` loads.

    .venv/bin/python bench/pretrained_backbone.py          # trains once (~5 min on 2 cores), prints the path
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsss_ray.models.resnet import build_backbone

PATTERNS = ("spiral", "hexagon", "zigzag", "nested_squares", "gabor", "crosshatch", "speckle", "spokes")
DEFAULTS = {"backbone": "resnet_tiny", "size": 96, "steps": 1500, "batch": 32, "lr": 0.05, "seed": 0, "version": 1}


def _pattern(kind: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A pattern's mask in its own frame (u, v ∈ [-1, 1]); the randomness is the pattern's own parameters."""
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    if kind == "spiral":
        turns = rng.uniform(2.0, 3.5)
        return (r <= 1.0) & (np.cos(theta - 2 * np.pi * turns * r) > 0.4)
    if kind == "hexagon":
        hexa = np.max([np.abs(u * np.cos(a) + v * np.sin(a)) for a in np.arange(6) * np.pi / 3], axis=0)
        return (hexa <= 0.9) & (hexa >= 0.7)
    if kind == "zigzag":
        return np.abs(v - 0.35 * np.abs(((u * 3) % 2) - 1) + 0.17) <= 0.18
    if kind == "nested_squares":
        box = np.maximum(np.abs(u), np.abs(v))
        return (box <= 1.0) & (np.floor(box * 5) % 2 == 0)
    if kind == "gabor":
        angle = rng.uniform(0, np.pi)
        return (r <= 1.0) & (np.cos(9 * (u * np.cos(angle) + v * np.sin(angle))) * np.exp(-2 * r * r) > 0.25)
    if kind == "crosshatch":
        return (r <= 1.0) & ((np.abs(np.sin(7 * (u + v))) < 0.35) | (np.abs(np.sin(7 * (u - v))) < 0.35))
    if kind == "speckle":
        return (r <= 1.0) & (rng.random(u.shape) < 0.18)
    if kind == "spokes":
        return (r <= 1.0) & (r >= 0.15) & (np.cos(rng.integers(5, 9) * theta) > 0.55)
    raise ValueError(f"unknown pattern {kind!r}")


def render(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (3, size, size) float image in [0, 1] and its multi-hot (len(PATTERNS),) target."""
    image = rng.normal(0.5, 0.12, (1, size, size)) + rng.uniform(-0.2, 0.2, (3, 1, 1))
    target = np.zeros(len(PATTERNS), np.float32)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    for k in rng.choice(len(PATTERNS), size=int(rng.integers(1, 3)), replace=False):
        radius = rng.uniform(0.2, 0.45) * size
        cy, cx = rng.uniform(radius, size - radius, 2)
        mask = _pattern(PATTERNS[k], (xx - cx) / radius, (yy - cy) / radius, rng)
        colour = rng.uniform(0.0, 1.0, (3, 1))
        image[:, mask] = 0.3 * image[:, mask] + 0.7 * colour
        target[k] = 1.0
    return np.clip(image, 0.0, 1.0).astype(np.float32), target


class _Tagger(nn.Module):
    def __init__(self, backbone: nn.Module, classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.out_channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x).mean(dim=(2, 3)))


def cache_path(settings: dict[str, object]) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(os.environ.get("WSSS_BENCH_CACHE", Path.home() / ".cache" / "wsss-ray" / "bench"))
    return root / f"{settings['backbone']}-patterns-{key}.pt"


def pretrained_backbone(**overrides: object) -> str:
    """The cached weights' path, training them first if they are not there yet."""
    settings = {**DEFAULTS, **overrides}
    path = cache_path(settings)
    if path.exists():
        return str(path)
    torch.manual_seed(int(settings["seed"]))
    rng = np.random.default_rng(int(settings["seed"]))
    model = _Tagger(build_backbone(str(settings["backbone"]), output_stride=32), len(PATTERNS))
    steps, batch = int(settings["steps"]), int(settings["batch"])
    optimizer = torch.optim.SGD(model.parameters(), lr=float(settings["lr"]), momentum=0.9, weight_decay=1e-4)
    # ImageNet-style normalisation of the [0, 1] images (the pipeline normalises its inputs the same way).
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    started, correct, seen = time.perf_counter(), 0.0, 0
    for step in range(steps):
        pairs = [render(rng, int(settings["size"])) for _ in range(batch)]
        x = (torch.from_numpy(np.stack([p[0] for p in pairs])) - mean) / std
        y = torch.from_numpy(np.stack([p[1] for p in pairs]))
        for group in optimizer.param_groups:
            group["lr"] = float(settings["lr"]) * (1 - step / steps) ** 0.9
        logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= steps - 100:  # the last 100 steps' exact-match tag accuracy, on fresh (never seen) images
            correct += float(((logits > 0) == (y > 0.5)).all(dim=1).float().sum())
            seen += batch
        if step % 250 == 0 or step == steps - 1:
            print(f"  pretraining {step + 1}/{steps}: loss {float(loss):.3f} "
                  f"({(step + 1) * batch / (time.perf_counter() - started):.0f} images/s)", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.backbone.state_dict(), tmp)
    tmp.replace(path)  # atomic: a killed run leaves no half-written cache
    path.with_suffix(".json").write_text(json.dumps({**settings, "final_exact_match": correct / max(seen, 1)}))
    print(f"  pretrained backbone: exact-match tag accuracy {correct / max(seen, 1):.3f} on its last 100 batches")
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=type(value), default=value)
    settings = vars(parser.parse_args())
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(pretrained_backbone(**settings))


if __name__ == "__main__":
    main()
