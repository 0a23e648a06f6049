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

    Selection scope, ``ranking``:

    * ``global`` (default): OuT "sort[s] all parameters according to the g_i and select the top K", and the
      authors' code (xiaoboxia/CDR, ``train_one_step``) takes one threshold, the ``int(K·n)``-th largest g over
      the n entries of all conv/linear weights (2-D and 4-D tensors), keeps every weight entry with g at or above
      it (ties included) and leaves the gradients of biases and norm parameters untouched. The CDR code also
      multiplies the kept gradients by a clip factor; the paper's update has no such factor, so we do not.
    * ``per_tensor`` (our earlier reading): each tensor, biases and norm layers included, keeps its own top
      ``max(1, floor(K·numel))`` entries (``torch.topk``), so no layer is frozen whole.

    Other readings: with momentum, a non-key parameter still moves by its momentum buffer for a few steps (the
    optimizer is not touched); parameters whose ``.grad`` is None are skipped (frozen layers, unused branches).
    Gradient scaling (AMP) does not change the ranking.

    As a training hook, ``after_backward`` applies it to every parameter of the train step (model and objective)
    and logs the kept fraction of the ranked entries as ``key_fraction``.
    """

    def __init__(self, key_fraction: float = 0.4, ranking: str = "global") -> None:
        if not 0.0 < key_fraction <= 1.0:
            raise ValueError(f"key_fraction must be in (0, 1], got {key_fraction}")
        if ranking not in ("global", "per_tensor"):
            raise ValueError(f"ranking must be 'global' or 'per_tensor', got {ranking!r}")
        self.key_fraction = key_fraction
        self.ranking = ranking

    def after_backward(self, step: nn.Module) -> dict[str, float]:
        return {"key_fraction": self.apply(step.parameters())}

    def num_kept(self, numel: int) -> int:
        """How many entries of a tensor with ``numel`` elements stay critical: max(1, floor(K·numel))."""
        # The 1e-9 absorbs float error in K·numel: 0.29·100 evaluates to 28.999999999999996, which floors to 28, not 29.
        return min(numel, max(1, math.floor(self.key_fraction * numel + 1e-9)))

    @torch.no_grad()
    def apply(self, parameters: Iterable[nn.Parameter]) -> float:
        """Zero the loss gradient of every non-critical entry in place; return the fraction of the ranked entries
        kept (1.0 when none was ranked). ``g = |grad ⊙ w|`` is computed in float32."""
        with_grad = [p for p in parameters if p.grad is not None and p.grad.numel() > 0]
        if self.ranking == "per_tensor":
            return self._per_tensor(with_grad)
        return self._global([p for p in with_grad if p.dim() in (2, 4)])

    def _per_tensor(self, parameters: list[nn.Parameter]) -> float:
        kept = total = 0
        for param in parameters:
            grad, numel = param.grad, param.grad.numel()
            k = self.num_kept(numel)
            if k < numel:
                importance = (grad.float() * param.float()).abs().flatten()
                critical = torch.zeros(numel, dtype=torch.bool, device=grad.device)
                critical[importance.topk(k, sorted=False).indices] = True
                grad.masked_fill_(~critical.view(grad.shape), 0)
            kept += k
            total += numel
        return kept / total if total else 1.0

    def _global(self, weights: list[nn.Parameter]) -> float:
        if not weights:
            return 1.0
        # g of every weight in one float32 vector (one copy of the weights, viewed per tensor below).
        every = torch.cat([(p.grad.float() * p.float()).abs().flatten() for p in weights])
        # The k-th largest g over all weights, k = int(K·n) (at least 1): the (n − k + 1)-th smallest, which
        # kthvalue finds without sorting a top-k of tens of millions of entries.
        threshold = every.kthvalue(every.numel() - self.num_kept(every.numel()) + 1).values
        kept = torch.zeros((), dtype=torch.long, device=every.device)
        for param, g in zip(weights, every.split([p.numel() for p in weights]), strict=True):
            critical = (g >= threshold).view(param.grad.shape)
            param.grad.masked_fill_(~critical, 0)
            kept += critical.sum()
        return int(kept) / every.numel()  # one host sync per step, not one per tensor
