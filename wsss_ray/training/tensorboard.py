"""Per-epoch scalars as TensorBoard event files."""

from __future__ import annotations

import math
import tempfile
from typing import Any

from wsss_ray.core import storage


class TensorBoardLog:
    """Per-epoch scalars as TensorBoard event files in ``<stage>/tensorboard`` (rank 0 only).

    tensorboardX writes to a local folder; for object storage the folder is uploaded after each epoch, so
    ``tensorboard --logdir <stage>/tensorboard`` (or an s3:// logdir) shows the curves while training runs.
    """

    def __init__(self, uri: str) -> None:
        from tensorboardX import SummaryWriter

        self.uri = uri
        local = storage.local_path_or_none(uri)
        self.local_dir = local or tempfile.mkdtemp(prefix="wsss-tb-")
        self.writer = SummaryWriter(self.local_dir)

    def write(self, epoch: int, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, epoch)
        self.writer.flush()
        if storage.local_path_or_none(self.uri) is None:
            storage.upload_dir(self.local_dir, self.uri)
