"""What a method may add to the training loop without a branch in it: a :class:`TrainHook`.

The loop calls every hook at fixed points of a step, in the order the stage built them, and logs the scalar
terms they return with the step's loss terms (so their order in the epoch line is the hooks' order). OuT's
online corrector edits the batch before the forward and updates its EMA teacher after ``optimizer.step()``;
robust early-learning edits the gradients between ``backward()`` and ``optimizer.step()``.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class TrainHook:
    """A no-op at every point; subclasses override what they need."""

    def checkpoint_state(self) -> dict[str, Any]:
        """File name → object with ``state_dict``/``load_state_dict``, saved beside the model in every checkpoint
        and restored from it (OuT: its teacher as ``teacher.pt``)."""
        return {}

    def on_start(self, start_epoch: int, rank: int) -> None:
        """Once per worker, after the checkpoint (if any) was restored; ``start_epoch`` 0 is a fresh run."""

    def before_step(self, batch: dict[str, Any], epoch: int) -> dict[str, float]:
        """Before the forward pass; may edit ``batch`` in place. Returns scalar terms to log."""
        return {}

    def after_backward(self, step: nn.Module) -> dict[str, float]:
        """Between ``loss.backward()`` and ``optimizer.step()`` (gradients already all-reduced by DDP); ``step`` is
        the unwrapped :class:`~wsss_ray.training.step.TrainStep`. Returns scalar terms to log."""
        return {}

    def after_step(self, model: nn.Module) -> None:
        """After ``optimizer.step()``, with the (unwrapped) model just updated."""
