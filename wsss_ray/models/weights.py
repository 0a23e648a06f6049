"""Loading trained weights (``model.pt`` of a training stage) into a model, from any storage URI."""

from __future__ import annotations

import io

import torch

from wsss_ray.core import storage


def load_weights(model: torch.nn.Module, uri: str) -> torch.nn.Module:
    model.load_state_dict(torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True))
    return model
