"""``wsss-ray export``: a trained segmentation model as TorchScript and ONNX, with a JSON of how to feed it.

The exported graph is the network alone, in eval mode: it takes a normalised float batch and returns logits at
the input size. ``model.json`` beside it says how to get there (the classes, the palette, mean/std and the
input layout), so the files are usable without wsss-ray:

    x = (rgb_uint8 / 255 - mean) / std          # per channel, H×W×3 → 1×3×H×W float32
    labels = model(x).argmax(1)                  # 1×H×W class indices into ``classes``
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from wsss_ray.core import storage
from wsss_ray.core.progress import log
from wsss_ray.models.card import resolve_model

TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
CARD_FILE = "model.json"
# The traced example's size; any H, W works afterwards (the resize to the input size is traced as a shape op).
EXAMPLE_SIZE = (2, 3, 96, 128)


class LogitsOnly(torch.nn.Module):
    """The model's ``forward(images)`` → logits, without the training-only ``with_features`` switch."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def input_spec(card: dict[str, Any]) -> dict[str, Any]:
    norm = card["normalization"]
    return {
        "name": "images", "layout": "NCHW", "dtype": "float32", "channels": "RGB",
        "value_range": f"(pixel / 255 - mean) / std per channel, pixel in 0..255; mean {norm['mean']}, "
                       f"std {norm['std']}",
        "batch": "dynamic", "height": "dynamic", "width": "dynamic",
    }


def export_model(model: str, out: str, *, onnx: bool = True) -> dict[str, Any]:
    """Write ``model.torchscript.pt``, ``model.onnx`` (when the ``onnx`` packages are installed) and
    ``model.json`` below ``out``; returns what was written."""
    trained = resolve_model(model)
    net = LogitsOnly(trained.build("cpu")).eval()
    example = torch.randn(*EXAMPLE_SIZE)
    written: dict[str, Any] = {}
    buffer = io.BytesIO()
    with torch.no_grad(), quiet_exporters():
        traced = torch.jit.trace(net, example)
        torch.jit.save(traced, buffer)
    storage.write_bytes(storage.join(out, TORCHSCRIPT_FILE), buffer.getvalue())
    written["torchscript"] = storage.join(out, TORCHSCRIPT_FILE)

    onnx_note = "not requested (--no-onnx)"
    if onnx:
        try:
            import onnx as _onnx  # noqa: F401 - only checks that the exporter's dependencies are there
            import onnxscript  # noqa: F401
        except ImportError as error:
            onnx_note = f"skipped: {error.name} is not installed (pip install onnx onnxscript -c constraints.txt)"
        else:
            written["onnx"] = storage.join(out, ONNX_FILE)
            storage.write_bytes(written["onnx"], _onnx_bytes(net, example))
            onnx_note = "written"
    card = {**trained.card, "source_weights": trained.weights_uri, "input": input_spec(trained.card),
            "output": {"name": "logits", "layout": "NCHW", "dtype": "float32",
                       "meaning": "class scores at the input's size; argmax over C gives the label map"},
            "files": {"torchscript": TORCHSCRIPT_FILE, "onnx": ONNX_FILE if "onnx" in written else None},
            "onnx": onnx_note}
    storage.write_json(storage.join(out, CARD_FILE), card)
    written["card"] = storage.join(out, CARD_FILE)
    log("export", f"{', '.join(sorted(written))} → {out} (onnx: {onnx_note})")
    return written


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """Silence the exporters' own chatter (~20 lines: torch.jit's deprecation warnings, the ONNX exporter's
    progress prints and its "torchvision is not installed" log lines); a failure still raises with its message."""
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_logger.setLevel(level)


def _onnx_bytes(net: torch.nn.Module, example: torch.Tensor) -> bytes:
    batch, height, width = torch.export.Dim("batch"), torch.export.Dim("height"), torch.export.Dim("width")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), quiet_exporters():
        path = os.path.join(tmp, ONNX_FILE)
        torch.onnx.export(net, (example,), path, input_names=["images"], output_names=["logits"],
                          dynamic_shapes={"images": {0: batch, 2: height, 3: width}}, dynamo=True,
                          external_data=False, verbose=False)
        with open(path, "rb") as f:
            return f.read()
