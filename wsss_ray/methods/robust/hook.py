"""Robust early-learning (Xia et al., ICLR 2021; OuT Eq. 3): a training hook that edits the gradients between
``backward()`` and ``optimizer.step()``."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from wsss_ray.training.hooks import TrainHook


class EarlyLearning(TrainHook):
    """Robust early-learning (Xia et al., ICLR 2021, "Robust early-learning: hindering the memorization of noisy
    labels"; OuT Eq. 3): only the critical parameters learn from the loss, the rest decay to zero.

    Importance of parameter w_i: ``g_i = |∇L(w_i) ⊙ w_i|`` (OuT Eq. 3). The top ``K = key_fraction`` of
    parameters by g are *critical* and keep their loss gradient; the others have it set to zero, so SGD's weight
    decay is the only force left on them and "pushes them to zero". Call :meth:`apply` after ``loss.backward()``
    and before ``optimizer.step()`` (after the last backward of a gradient-accumulation window; under DDP the
    gradients are already all-reduced then, so every rank keeps the same set).

    Selection scope — per tensor, here. Each parameter tensor keeps its own top ``max(1, floor(K·numel))``
    entries, so every layer (biases and norm layers included) keeps learning something. This is *not* what the
    references do: OuT says "we sort all parameters according to the g_i and select the top K", and the authors'
    code (xiaoboxia/CDR, ``train_one_step``) thresholds one global top-K over the concatenation of all 2-D/4-D
    weights, leaves biases and norm parameters untouched, and also multiplies the kept gradients by that same
    fraction. Per tensor is our reading for segmentation, where a deep backbone's tensors differ in gradient scale
    by orders of magnitude and a global cut could freeze whole layers (the new decoder head, say). To get the
    authors' treatment of biases, pass only the weight tensors (``p.dim() in (2, 4)``).

    Other readings: with momentum, a non-key parameter still moves by its momentum buffer for a few steps (the
    optimizer is not touched); ties at the cut are broken by ``torch.topk``; parameters whose ``.grad`` is None
    are skipped (frozen layers, unused branches). Gradient scaling (AMP) does not change the ranking.

    As a training hook, ``after_backward`` applies it to every parameter of the train step (model and objective)
    and logs the kept fraction as ``key_fraction``.
    """

    def __init__(self, key_fraction: float = 0.4) -> None:
        if not 0.0 < key_fraction <= 1.0:
            raise ValueError(f"key_fraction must be in (0, 1], got {key_fraction}")
        self.key_fraction = key_fraction

    def after_backward(self, step: nn.Module) -> dict[str, float]:
        return {"key_fraction": self.apply(step.parameters())}

    def num_kept(self, numel: int) -> int:
        """How many entries of a tensor with ``numel`` elements stay critical: max(1, floor(K·numel))."""
        # The 1e-9 absorbs float error in K·numel: 0.29·100 evaluates to 28.999999999999996, which floors to 28, not 29.
        return min(numel, max(1, math.floor(self.key_fraction * numel + 1e-9)))

    @torch.no_grad()
    def apply(self, parameters: Iterable[nn.Parameter]) -> float:
        """Zero the loss gradient of every non-critical entry in place; return the fraction of entries kept.

        ``g = |grad ⊙ w|`` is computed in float32 per tensor; the ``num_kept(numel)`` largest entries keep their
        gradient, the others get 0. The returned fraction is over all entries that had a gradient (1.0 when
        none had).
        """
        kept = 0
        total = 0
        for param in parameters:
            grad = param.grad
            if grad is None:
                continue
            numel = grad.numel()
            if numel == 0:
                continue
            k = self.num_kept(numel)
            if k < numel:
                importance = (grad.float() * param.float()).abs().flatten()
                critical = torch.zeros(numel, dtype=torch.bool, device=grad.device)
                critical[importance.topk(k, sorted=False).indices] = True
                grad.masked_fill_(~critical.view(grad.shape), 0)
            kept += k
            total += numel
        return kept / total if total else 1.0
