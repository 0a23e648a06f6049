"""``model.json``: what a trained ``model.pt`` needs beside it to be used without its pipeline config.

The train_seg stage writes it into its folder before ``_SUCCESS.json`` (a file beside the weights: the stage key
and ``model_sha256`` are unchanged); ``wsss-ray predict`` and ``wsss-ray export`` read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from wsss_ray.core import storage
from wsss_ray.core.config_base import SegModelConfig
from wsss_ray.data.classes import voc_palette
from wsss_ray.maths.inference import IMAGENET_MEAN, IMAGENET_STD
from wsss_ray.models.deeplab import build_segmentation_model
from wsss_ray.models.weights import load_weights

MODEL_FILE = "model.pt"
MODEL_CARD = "model.json"
CARD_FORMAT = "wsss-ray-model/1"


def model_card(model_config: SegModelConfig, class_names: list[str]) -> dict[str, Any]:
    """What a trained ``model.pt`` needs beside it to be used without its pipeline config."""
    return {
        "format": CARD_FORMAT,
        "weights": MODEL_FILE,
        "model": model_config.model_dump(mode="json"),
        "num_classes": len(class_names),
        "classes": list(class_names),
        # index i's colour is palette[3i : 3i + 3]; the masks are palette PNGs with these colours.
        "palette": voc_palette()[: 3 * len(class_names)],
        "normalization": {"scale": 1.0 / 255.0, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    }


def ensure_model_card(stage_uri: str, model_config: SegModelConfig, class_names: list[str], *,
                      overwrite: bool = False) -> str:
    """Write ``<stage>/model.json`` unless it exists; returns its URI (train_seg writes it before its ``_SUCCESS.json``;
    the pipeline backfills stage folders trained before that)."""
    uri = storage.join(stage_uri, MODEL_CARD)
    if overwrite or not storage.exists(uri):
        storage.write_json(uri, model_card(model_config, class_names))
    return uri


@dataclass(frozen=True)
class TrainedModel:
    weights_uri: str
    card: dict[str, Any]

    @property
    def config(self) -> SegModelConfig:
        return SegModelConfig.model_validate(self.card["model"])

    def build(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        # The trained weights replace every tensor: the ImageNet weights the card names are not read (they may
        # not be reachable where the model is used).
        config = self.config
        config = config.model_copy(update={"backbone": config.backbone.model_copy(update={"weights": None})})
        model = build_segmentation_model(config, int(self.card["num_classes"]))
        return load_weights(model, self.weights_uri).to(device).eval()


def resolve_model(uri: str) -> TrainedModel:
    """A ``train_seg-*`` stage folder or its ``model.pt``, with the ``model.json`` card beside it."""
    uri = uri.rstrip("/")
    weights = uri if uri.endswith(".pt") else storage.join(uri, MODEL_FILE)
    folder = weights.rsplit("/", 1)[0]
    card_uri = storage.join(folder, MODEL_CARD)
    if not storage.exists(weights):
        raise FileNotFoundError(f"--model {uri}: no weights at {weights} (expected a train_seg-* stage folder or "
                                "its model.pt)")
    if not storage.exists(card_uri):
        raise FileNotFoundError(f"--model {uri}: {card_uri} is missing; it names the architecture and classes. "
                                "Running the pipeline's train-seg command again with the same config writes it "
                                "(the finished training is skipped).")
    card = storage.read_json(card_uri)
    if card.get("format") != CARD_FORMAT:
        raise ValueError(f"{card_uri}: format: expected {CARD_FORMAT!r}, got {card.get('format')!r}")
    for field in ("model", "num_classes", "classes"):
        if field not in card:
            raise ValueError(f"{card_uri}: {field}: missing")
    return TrainedModel(weights, card)
