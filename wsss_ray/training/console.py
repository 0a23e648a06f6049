"""One console line per epoch, printed by the driver: ``[train_seg] epoch 3/12: loss 0.57, val mIoU 27.4, ...``.

Ray Train V2 calls a :class:`ray.train.UserCallback`'s ``after_report`` in its controller actor, not in the
driver, and with ``log_to_driver=False`` (the default console, see ``core.ray_utils.init_ray``) an actor's prints
stay in Ray's log files. So the callback puts its line on a :class:`ray.util.queue.Queue` and a driver thread
prints what arrives while ``trainer.fit()`` blocks.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

import ray
import ray.train
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from wsss_ray.core.progress import format_duration, log


def epoch_line(metrics: dict[str, Any], epochs: int, epochs_run: int, elapsed: float) -> str:
    """``epoch 3/12: loss 0.57, val mIoU 27.4, 8.0 images/s, ETA 2m10s``; the ETA is the time per epoch so far
    (this run's: a resumed run counts from its first new epoch) times the epochs left. An input-bound epoch says
    so (``…, 8.0 images/s, 35% waiting on input, …``)."""
    epoch = int(metrics["epoch"])
    parts = [f"loss {metrics['loss']:.3g}"] if "loss" in metrics else []
    if metrics.get("val_miou") is not None:
        parts.append(f"val mIoU {100 * metrics['val_miou']:.1f}")
    if "images_per_s" in metrics:
        parts.append(f"{metrics['images_per_s']:.1f} images/s")
    if metrics.get("data_wait", 0.0) >= 0.1:  # the model waited on its input for a tenth of the epoch or more
        parts.append(f"{100 * metrics['data_wait']:.0f}% waiting on input")
    left = epochs - epoch
    parts.append(f"ETA {format_duration(elapsed / max(epochs_run, 1) * left)}" if left else "last epoch")
    return f"epoch {epoch}/{epochs}: {', '.join(parts)}"


class EpochConsole(ray.train.UserCallback):
    """Runs in Ray Train's controller: rank 0's metrics of each epoch → a line on the driver's queue."""

    def __init__(self, epochs: int, queue: Queue) -> None:
        self.epochs = epochs
        self.queue: Queue | None = queue  # None once the queue is gone
        self.started = time.time()  # wall clock: the controller is another process on the driver's node
        self.epochs_run = 0

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not metrics or "epoch" not in metrics[0]:
            return
        self.epochs_run += 1
        if self.queue is None:
            return
        try:
            self.queue.put(epoch_line(metrics[0], self.epochs, self.epochs_run, time.time() - self.started))
        except Exception:  # noqa: BLE001 - the queue's node was lost: a console line must never fail training
            self.queue = None


class EpochLines:
    """``with EpochLines("train_seg", epochs) as lines: fit(..., callbacks=[lines.callback])``."""

    def __init__(self, stage: str, epochs: int) -> None:
        self.stage = stage
        # num_cpus=0: the queue must not take a CPU the training workers wait for. On the driver's node: the
        # driver reads it, and a worker node may be lost mid-run (spot, scale-down) with the queue on it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.callback = EpochConsole(epochs, self.queue)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)

    def __enter__(self) -> EpochLines:  # noqa: PYI034 - a final class
        self._thread.start()
        return self

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                log(self.stage, self.queue.get(timeout=1.0))
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue's actor went away (Ray shut down): nothing more to print
                return

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        try:
            for line in self.queue.get_nowait_batch(self.queue.qsize()):
                log(self.stage, line)
            self.queue.shutdown()
        except Exception as problem:  # noqa: BLE001 - only console lines are lost
            log(self.stage, f"(epoch lines lost: {problem})")
