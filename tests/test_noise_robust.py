"""Noise-robust losses (OuT SCE / curriculum / early-learning, BANA NAL, MSPN hybrid) on hand-worked pixels.

Logits are chosen as logs of small integers so every softmax is a simple fraction: logits [0, log 3] give
p = [1/4, 3/4]. Expected values are worked out here with math.log, never by calling the implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss_ray.methods.bana.losses import noise_aware_loss
from wsss_ray.methods.mspn.losses import decode_proposed, mspn_hybrid_loss
from wsss_ray.methods.robust.config import EarlyLearningConfig
from wsss_ray.methods.robust.hook import EarlyLearning
from wsss_ray.methods.robust.losses import curriculum_cross_entropy, symmetric_cross_entropy

L2, L3 = math.log(2.0), math.log(3.0)


def _pixels(rows: list[list[float]]) -> torch.Tensor:
    """Logits (1, C, 1, P) from one row of C scores per pixel."""
    return torch.tensor(rows, dtype=torch.float32).T.reshape(1, len(rows[0]), 1, len(rows))


def _labels(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).reshape(1, 1, len(values))


def _assert_zero_with_gradient(loss: torch.Tensor, logits: torch.Tensor) -> None:
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


# --- symmetric cross-entropy -------------------------------------------------------------------------------------

def test_sce_hand_computed_over_a_batch_with_an_ignored_pixel() -> None:
    # Three 1×1 images, C = 2. Image 0: p = [1/4, 3/4], target 1. Image 1: ignored (huge logits must not count).
    # Image 2: p = [1/2, 1/2], target 0.
    logits = torch.tensor([[0.0, L3], [50.0, -50.0], [0.0, 0.0]]).reshape(3, 2, 1, 1)
    target = torch.tensor([1, 255, 0]).reshape(3, 1, 1)
    ce = (math.log(4 / 3) + L2) / 2  # −log(3/4), −log(1/2)
    rce = (4 * (1 - 3 / 4) + 4 * (1 - 1 / 2)) / 2  # −A·(1 − p_t) with A = −4
    loss = symmetric_cross_entropy(logits, target)
    assert loss.item() == pytest.approx(0.1 * ce + 1.0 * rce, rel=1e-6)
    # α, β and the clip value A enter linearly: A = −2 halves RCE.
    loss = symmetric_cross_entropy(logits, target, alpha=1.0, beta=0.5, log_clip=-2.0)
    assert loss.item() == pytest.approx(ce + 0.5 * rce / 2, rel=1e-6)


def test_sce_all_ignored_is_zero_with_a_gradient_path() -> None:
    logits = torch.randn(2, 3, 2, 2, requires_grad=True)
    loss = symmetric_cross_entropy(logits, torch.full((2, 2, 2), 255))
    _assert_zero_with_gradient(loss, logits)


def test_sce_gradcheck() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[0, 1], [2, 255]], [[255, 2], [1, 1]]])
    assert torch.autograd.gradcheck(lambda x: symmetric_cross_entropy(x, target), (logits,))


def test_losses_run_in_float32_for_bf16_logits() -> None:
    logits = torch.zeros(1, 2, 1, 2, dtype=torch.bfloat16)
    target = _labels([0, 1])
    assert symmetric_cross_entropy(logits, target).dtype == torch.float32
    assert curriculum_cross_entropy(logits, target).item() == pytest.approx(L2, rel=1e-6)


def test_shape_mismatch_names_the_argument() -> None:
    with pytest.raises(ValueError, match="target"):
        symmetric_cross_entropy(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 4, dtype=torch.int64))


# --- noise-pruned curriculum loss --------------------------------------------------------------------------------

def _curriculum_batch() -> tuple[torch.Tensor, torch.Tensor]:
    # C = 2, target 0 everywhere labelled; logits [0, log a] give loss log(1 + a).
    # Image 0: losses log 10 (a = 9) and log 2 (a = 1); image 1: log 3 (a = 2), log 4 (a = 3) and an ignored pixel
    # whose loss would be ~100.
    image0 = [[0.0, math.log(9)], [0.0, 0.0], [0.0, 0.0]]
    image1 = [[0.0, L2], [0.0, L3], [0.0, 100.0]]
    logits = torch.cat([_pixels(image0), _pixels(image1)])
    target = torch.cat([_labels([0, 0, 255]), _labels([0, 0, 255])])
    return logits.requires_grad_(True), target


def test_curriculum_drops_exactly_the_largest_loss_pixels_batch_wide() -> None:
    logits, target = _curriculum_batch()
    # n = 4 labelled, ϵ = 0.25 → floor(1) = 1 dropped: log 10, which is in image 0. Per-image ranking would drop
    # nothing (floor(0.25·2) = 0), so this also pins the batch-wide reading.
    loss = curriculum_cross_entropy(logits, target, epsilon=0.25)
    assert loss.item() == pytest.approx((L2 + L3 + math.log(4)) / 3, rel=1e-6)
    loss.backward()
    grad_norm = logits.grad.abs().sum(dim=1).flatten().tolist()  # pixels: [a=9, a=1, ign, a=2, a=3, ign]
    assert grad_norm[0] == 0.0 and grad_norm[2] == 0.0 and grad_norm[5] == 0.0
    assert all(g > 0 for g in (grad_norm[1], grad_norm[3], grad_norm[4]))


@pytest.mark.parametrize(("epsilon", "expected"), [
    (0.0, (math.log(10) + L2 + L3 + math.log(4)) / 4),
    (0.3, (L2 + L3 + math.log(4)) / 3),  # floor(1.2) = 1
    (0.5, (L2 + L3) / 2),  # drops log 10 and log 4
    (0.75, L2),
])
def test_curriculum_fraction(epsilon: float, expected: float) -> None:
    logits, target = _curriculum_batch()
    assert curriculum_cross_entropy(logits, target, epsilon=epsilon).item() == pytest.approx(expected, rel=1e-6)


def test_curriculum_empty_selections_are_zero_with_a_gradient_path() -> None:
    logits, target = _curriculum_batch()
    _assert_zero_with_gradient(curriculum_cross_entropy(logits, target, epsilon=1.0), logits)
    logits = torch.randn(1, 2, 2, 2, requires_grad=True)
    _assert_zero_with_gradient(curriculum_cross_entropy(logits, torch.full((1, 2, 2), 255)), logits)
    with pytest.raises(ValueError, match="epsilon"):
        curriculum_cross_entropy(logits, torch.zeros(1, 2, 2, dtype=torch.int64), epsilon=1.5)


def _losses_batch(labels: list[int], losses: list[float], num_classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """One image of 1×P pixels whose CE losses are exactly ``losses``: logit 0 on the label and
    a = log((e^ℓ − 1)/(C − 1)) on the others, so p_label = 1/(1 + (C − 1)e^a) = e^−ℓ."""
    rows = []
    for label, loss in zip(labels, losses, strict=True):
        a = math.log((math.exp(loss) - 1.0) / (num_classes - 1))
        rows.append([0.0 if c == label else a for c in range(num_classes)])
    logits = torch.tensor(rows, dtype=torch.float64).T.reshape(1, num_classes, 1, len(rows))
    return logits.requires_grad_(True), _labels(labels)


# The spec's example: labels [0,0,0,0,0,1,1,2], losses [0.1 … 0.5, 2.0, 1.5, 3.0], ϵ = 0.25.
SPEC_LABELS = [0, 0, 0, 0, 0, 1, 1, 2, 255]
SPEC_LOSSES = [0.1, 0.2, 0.3, 0.4, 0.5, 2.0, 1.5, 3.0, 9.0]  # the last pixel is ignored


def test_curriculum_batch_rank_drops_the_foreground() -> None:
    logits, target = _losses_batch(SPEC_LABELS, SPEC_LOSSES)
    # n = 8 → floor(2) = 2 dropped batch-wide: 3.0 (class 2) and 2.0 (class 1); mean (0.1+…+0.5+1.5)/6 = 0.5.
    assert curriculum_cross_entropy(logits, target, 0.25, "batch").item() == pytest.approx(0.5, rel=1e-9)


def test_curriculum_class_rank_drops_within_each_class() -> None:
    logits, target = _losses_batch(SPEC_LABELS, SPEC_LOSSES)
    # Class 0: floor(0.25·5) = 1 → drops 0.5; classes 1 (n = 2) and 2 (n = 1): floor < 1, nothing dropped.
    loss = curriculum_cross_entropy(logits, target, 0.25, "class")
    assert loss.item() == pytest.approx((0.1 + 0.2 + 0.3 + 0.4 + 2.0 + 1.5 + 3.0) / 7, rel=1e-9)  # 1.0714286
    loss.backward()
    got = logits.grad.abs().sum(dim=1).flatten().tolist()
    assert got[4] == 0.0 and got[8] == 0.0  # the dropped 0.5 and the ignored pixel
    assert all(g > 0 for i, g in enumerate(got) if i not in (4, 8))
    # ϵ = 0.5: class 0 drops floor(2.5) = 2 (0.5, 0.4), class 1 drops 1 (2.0), class 2 floor(0.5) = 0.
    loss = curriculum_cross_entropy(logits, target, 0.5, "class")
    assert loss.item() == pytest.approx((0.1 + 0.2 + 0.3 + 1.5 + 3.0) / 5, rel=1e-9)
    with pytest.raises(ValueError, match="rank"):
        curriculum_cross_entropy(logits, target, 0.25, "image")


def test_curriculum_objective_starts_at_its_epoch() -> None:
    from wsss_ray.methods.robust.config import CurriculumConfig
    from wsss_ray.methods.robust.objective import CurriculumObjective

    logits, target = _losses_batch(SPEC_LABELS, SPEC_LOSSES)
    batch = {"image": logits.detach(), "label": target}  # the objective runs the maths in float32
    objective = CurriculumObjective(CurriculumConfig(start_epoch=4))
    identity = nn.Identity()
    with pytest.raises(RuntimeError, match="set_epoch"):
        objective(identity, batch)
    objective.set_epoch(3)  # before the start: the plain CE mean over the 8 labelled pixels = 8.0/8
    assert objective(identity, batch)[0].item() == pytest.approx(1.0, rel=1e-6)
    objective.set_epoch(4)
    assert objective(identity, batch)[0].item() == pytest.approx(0.5, rel=1e-6)
    # The paper's default: pruning from the first step, no set_epoch needed.
    assert CurriculumObjective(CurriculumConfig())(identity, batch)[0].item() == pytest.approx(0.5, rel=1e-6)
    per_class = CurriculumObjective(CurriculumConfig(rank="class"))
    assert per_class(identity, batch)[0].item() == pytest.approx(7.5 / 7, rel=1e-6)
    with pytest.raises(ValueError, match="inflection"):
        CurriculumObjective(CurriculumConfig(start_epoch="inflection"))


def test_curriculum_inflection_start_follows_the_corrector() -> None:
    from wsss_ray.methods.registry import resolved_segmentation_loss
    from wsss_ray.pipeline_config import SegTrainConfig

    def start(config: SegTrainConfig) -> int:
        return resolved_segmentation_loss(config.loss, config.corrector).start_epoch

    loss = {"name": "curriculum", "start_epoch": "inflection"}
    assert start(SegTrainConfig(loss=loss)) == 4  # OuT's inflection epoch
    assert start(SegTrainConfig(loss=loss, corrector={"name": "out", "inflection_epoch": 2})) == 2
    assert start(SegTrainConfig(loss={"name": "curriculum", "start_epoch": 7})) == 7


# --- robust early-learning ---------------------------------------------------------------------------------------

def _toy_model() -> tuple[nn.Linear, nn.Parameter]:
    """A 2-tensor model (weight 2×3, bias 2) with hand-set values and gradients, plus a parameter without grad."""
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0, 0.0], [-3.0, 0.5, 4.0]]))
        model.bias.copy_(torch.tensor([1.0, -1.0]))
    # |grad ⊙ w| = [[0.5, 2, 0], [0.3, 1.5, 1]] for the weight; entry (0, 2) has the largest |grad| but w = 0.
    model.weight.grad = torch.tensor([[0.5, -1.0, 10.0], [0.1, 3.0, -0.25]])
    model.bias.grad = torch.tensor([0.2, 0.1])  # |grad ⊙ b| = [0.2, 0.1]
    return model, nn.Parameter(torch.ones(4))


def test_early_learning_keeps_the_top_fraction_of_each_tensor() -> None:
    model, no_grad = _toy_model()
    kept = EarlyLearning(key_fraction=0.4, ranking="per_tensor").apply([model.weight, model.bias, no_grad])
    # weight: floor(0.4·6) = 2 kept → g = 2 at (0, 1) and 1.5 at (1, 1). bias: floor(0.8) = 0 → at least 1 → 0.2.
    # A global top-K (floor(0.4·8) = 3 → 2, 1.5, 1) would have kept no bias entry.
    assert torch.equal(model.weight.grad, torch.tensor([[0.0, -1.0, 0.0], [0.0, 3.0, 0.0]]))
    assert torch.equal(model.bias.grad, torch.tensor([0.2, 0.0]))
    assert no_grad.grad is None
    assert kept == pytest.approx(3 / 8)


def test_early_learning_non_key_parameters_only_decay() -> None:
    model, _ = _toy_model()
    EarlyLearning(key_fraction=0.4, ranking="per_tensor").apply(model.parameters())
    torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01).step()
    # Non-key: w ← w − lr·wd·w. Key: w ← w − lr·(grad + wd·w).
    expected = torch.tensor([[1 * (1 - 0.001), 2 - 0.1 * (-1 + 0.02), 0.0],
                             [-3 * (1 - 0.001), 0.5 - 0.1 * (3 + 0.005), 4 * (1 - 0.001)]])
    assert torch.allclose(model.weight.detach(), expected, atol=1e-6)
    assert torch.allclose(model.bias.detach(), torch.tensor([1 - 0.1 * (0.2 + 0.01), -1 * (1 - 0.001)]), atol=1e-6)


def test_early_learning_global_threshold_over_all_weights_by_hand() -> None:
    """The default (paper, CDR code): one cut over all conv/linear weights together; biases keep their gradient."""
    assert EarlyLearningConfig().ranking == "global"
    model, no_grad = _toy_model()
    second = nn.Linear(2, 1)
    with torch.no_grad():
        second.weight.copy_(torch.tensor([[2.0, -1.0]]))
    second.weight.grad = torch.tensor([[0.1, -0.9]])  # |grad ⊙ w| = [0.2, 0.9]
    second.bias.grad = torch.tensor([5.0])
    kept = EarlyLearning(key_fraction=0.4).apply([model.weight, model.bias, second.weight, second.bias, no_grad])
    # The 8 weight entries' g, sorted: 2, 1.5, 1, 0.9, 0.5, 0.3, 0.2, 0. int(0.4·8) = 3 → threshold g = 1:
    # kept (0, 1) = 2, (1, 1) = 1.5, (1, 2) = 1 of the first layer; the whole second layer is cut (0.9 < 1),
    # where a per-tensor cut would have kept its 0.9 entry. Biases are not ranked: their gradients stay.
    assert torch.equal(model.weight.grad, torch.tensor([[0.0, -1.0, 0.0], [0.0, 3.0, -0.25]]))
    assert torch.equal(second.weight.grad, torch.tensor([[0.0, 0.0]]))
    assert torch.equal(model.bias.grad, torch.tensor([0.2, 0.1])) and torch.equal(second.bias.grad, torch.tensor([5.0]))
    assert no_grad.grad is None
    assert kept == pytest.approx(3 / 8)
    # Ties at the threshold are all kept (CDR: g >= threshold): two entries of g = 1 with K·n = 1.
    tied = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        tied.weight.copy_(torch.tensor([[1.0, 1.0]]))
    tied.weight.grad = torch.tensor([[1.0, -1.0]])
    assert EarlyLearning(key_fraction=0.5).apply(tied.parameters()) == 1.0
    assert torch.equal(tied.weight.grad, torch.tensor([[1.0, -1.0]]))


def test_early_learning_ranking_reaches_the_hook_from_the_config() -> None:
    from wsss_ray.methods.registry import build_training_hooks
    from wsss_ray.pipeline_config import SegTrainConfig

    for ranking in ("global", "per_tensor"):
        config = SegTrainConfig(early_learning={"ranking": ranking})
        (hook,) = build_training_hooks(config, nn.Linear(1, 1), "unused")
        assert isinstance(hook, EarlyLearning) and hook.ranking == ranking
    with pytest.raises(ValueError, match="ranking"):
        EarlyLearning(ranking="per_layer")


def test_early_learning_full_fraction_and_validation() -> None:
    model, _ = _toy_model()
    before = model.weight.grad.clone()
    assert EarlyLearning(key_fraction=1.0).apply(model.parameters()) == 1.0
    assert torch.equal(model.weight.grad, before)
    with pytest.raises(ValueError, match="key_fraction"):
        EarlyLearning(key_fraction=0.0)


# --- BANA noise-aware loss ---------------------------------------------------------------------------------------

def test_nal_hand_computed_same_resolution() -> None:
    # C = 2, D = 2. W_0 ∥ (1, 0), W_1 ∥ (0, 1) (scaled: cosine must not care). Two 1×2 images.
    weight = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    features = torch.tensor([[[[3.0, 1.0]], [[0.0, 0.0]]],   # image 0: φ = (3, 0), (1, 0)
                             [[[1.0, 7.0]], [[0.0, 7.0]]]])  # image 1: φ = (1, 0), (7, 7)
    logits = torch.cat([_pixels([[L3, 0.0], [0.0, 0.0]]), _pixels([[0.0, L3], [30.0, -30.0]])])
    y_crf = torch.cat([_labels([0, 1]), _labels([0, 255])])
    y_ret = torch.cat([_labels([0, 0]), _labels([1, 0])])
    # Pixel 0 ∈ S: H_0 = 3/4. Pixel 1 ∈ ~S: D = [2, 1], c* = 1 → σ = (1/2)^γ, −log H_1 = log 2.
    # Pixel 2 ∈ ~S: D = [2, 1], c* = 0 → σ = 1, −log H_0 = −log(1/4). Pixel 3: y_crf ignored.
    for gamma in (7.0, 1.0):
        loss, terms = noise_aware_loss(logits, features, weight, y_crf, y_ret, gamma=gamma, lambda_wce=0.1)
        s1 = 0.5 ** gamma
        wce = (s1 * L2 + 1.0 * math.log(4)) / (s1 + 1.0)
        assert terms["ce"].item() == pytest.approx(math.log(4 / 3), rel=1e-6)
        assert terms["wce"].item() == pytest.approx(wce, rel=1e-6)
        assert terms["agree_fraction"].item() == pytest.approx(1 / 3)
        assert loss.item() == pytest.approx(math.log(4 / 3) + 0.1 * wce, rel=1e-6)


def test_nal_upsamples_the_cosine_map_not_the_features() -> None:
    # φ (1×2): (1, 0) then (0, 1). cos maps [1, 0] (class 0) and [0, 1] (class 1), upsampled bilinearly
    # (align_corners=False) to 1×4: class 0 → [1, 3/4, 1/4, 0], class 1 → [0, 1/4, 3/4, 1].
    features = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    weight = torch.eye(2)
    # Every pixel ∈ ~S with c* = 0; logits [0, log a] → −log H_0 = log(1 + a).
    a = [1.0, 2.0, 3.0, 4.0]
    logits = _pixels([[0.0, math.log(v)] for v in a])
    y_crf, y_ret = _labels([0, 0, 0, 0]), _labels([1, 1, 1, 1])
    # D_0 / max D with γ = 2: 2/2, 1.75/1.75, (1.25/1.75)², (1/2)² → σ = [1, 1, 25/49, 1/4].
    # (Normalising upsampled features instead would give σ_2 = (1.316/1.949)² ≈ 0.456.)
    sigma = [1.0, 1.0, 25 / 49, 1 / 4]
    wce = sum(s * math.log(1 + v) for s, v in zip(sigma, a)) / sum(sigma)
    loss, terms = noise_aware_loss(logits, features, weight, y_crf, y_ret, gamma=2.0, lambda_wce=0.1)
    assert terms["wce"].item() == pytest.approx(wce, rel=1e-6)
    assert terms["ce"].item() == 0.0 and terms["agree_fraction"].item() == 0.0  # empty S → 0, not NaN
    assert loss.item() == pytest.approx(0.1 * wce, rel=1e-6)


def test_nal_detach_sigma_option_and_gradcheck() -> None:
    # detach_sigma=True: our earlier reading (the authors' code does not detach σ; see test_nal_cosine_head).
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    features = torch.randn(1, 5, 2, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y_crf = torch.randint(0, 3, (1, 4, 4))
    y_crf[0, 0, :2] = 255
    y_ret = torch.where(torch.rand(1, 4, 4) < 0.5, y_crf, (y_crf + 1) % 3)
    loss, _ = noise_aware_loss(logits, features, weight, y_crf, y_ret, detach_sigma=True)
    loss.backward()
    assert features.grad is None and weight.grad is None  # σ is a weight: no gradient reaches φ or W through it
    assert torch.autograd.gradcheck(
        lambda x: noise_aware_loss(x, features.detach(), weight.detach(), y_crf, y_ret, detach_sigma=True)[0],
        (logits,))


def _nal_reference(phi: list[torch.Tensor], weight: list[list[float]], y_crf: list[int], y_ret: list[int],
                   tau: float = 20.0, gamma: float = 7.0, lam: float = 0.1) -> torch.Tensor:
    """BANA Eqs. 10-14 with a cosine classifier, pixel by pixel (plain loops; σ keeps its gradient)."""
    rows = [torch.tensor(w, dtype=torch.float64) for w in weight]
    ce_terms, weighted, sigmas = [], [], []
    for p, crf, ret in zip(phi, y_crf, y_ret, strict=True):
        cos = [torch.dot(p, w) / (torch.sqrt(torch.dot(p, p)) * math.sqrt(float(torch.dot(w, w)))) for w in rows]
        logits = [tau * c for c in cos]
        log_z = torch.log(sum(torch.exp(v) for v in logits))
        ce = log_z - logits[crf]
        if crf == ret:
            ce_terms.append(ce)
        else:
            d = [1 + c for c in cos]
            sigma = (d[crf] / max(d, key=lambda t: t.detach().item())) ** gamma
            weighted.append(sigma * ce)
            sigmas.append(sigma)
    return sum(ce_terms) / len(ce_terms) + lam * sum(weighted) / sum(sigmas)


def test_nal_cosine_head() -> None:
    # Spec issue 14, 4.4: D = 2, C = 3, τ = 20, W0 = (1, 0), W1 = (0, 2), W2 = (−1, 1).
    weight = [[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]]
    points = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
    y_crf, y_ret = [0, 0, 1], [0, 1, 2]  # p1 ∈ S, p2 and p3 ∈ ~S

    def loss_of(detach: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        phi = torch.tensor(points, dtype=torch.float64).T.reshape(1, 2, 1, 3).requires_grad_(True)
        w = torch.tensor(weight, dtype=torch.float64)
        logits = 20.0 * torch.einsum("ndhw,cd->nchw", F.normalize(phi, dim=1), F.normalize(w, dim=1))
        loss, terms = noise_aware_loss(logits, phi, w, torch.tensor([[y_crf]]), torch.tensor([[y_ret]]),
                                       detach_sigma=detach)
        loss.backward()
        assert phi.grad is not None
        return loss, phi.grad, terms

    loss, grad, terms = loss_of(False)
    # σ(p2) = (1.6/1.8)^7 = 0.4384624, σ(p3) = 1; CE(p2) = 4.0181518, CE(p3) = 0.0028533
    assert terms["ce"].item() == pytest.approx(2.0612e-9, rel=1e-3)
    wce = (0.4384624 * 4.0181518 + 0.0028533) / 1.4384624
    assert terms["wce"].item() == pytest.approx(wce, rel=1e-6) and wce == pytest.approx(1.2267694, rel=1e-6)
    assert loss.item() == pytest.approx(0.1226769, rel=1e-6)
    phis = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in points]
    reference = _nal_reference(phis, weight, y_crf, y_ret)
    reference.backward()
    expected = torch.stack([p.grad for p in phis], dim=1).reshape(1, 2, 1, 3)
    assert reference.item() == pytest.approx(loss.item(), rel=1e-9)
    assert torch.allclose(grad, expected, atol=1e-10)  # the σ path is in the gradient
    detached_loss, detached_grad, _ = loss_of(True)
    assert detached_loss.item() == pytest.approx(loss.item(), rel=1e-12)
    assert not torch.allclose(detached_grad, grad, atol=1e-6)


def test_nal_pixel_without_retrieval_label_is_in_the_weighted_set() -> None:
    # y_crf = 0, y_ret = 255: ~S (Y_ret does not confirm it), so it enters L_wce with σ = 1 (φ ∥ W_0), not L_ce.
    logits = _pixels([[0.0, L3]])  # H_0 = 1/4
    loss, terms = noise_aware_loss(logits, torch.tensor([[[[1.0]], [[0.0]]]]), torch.eye(2), _labels([0]),
                                   _labels([255]))
    assert terms["ce"].item() == 0.0
    assert terms["wce"].item() == pytest.approx(math.log(4), rel=1e-6)
    assert loss.item() == pytest.approx(0.1 * math.log(4), rel=1e-6)


def test_nal_all_ignored_is_zero_with_a_gradient_path() -> None:
    logits = torch.randn(1, 2, 2, 2, requires_grad=True)
    ignored = torch.full((1, 2, 2), 255)
    loss, terms = noise_aware_loss(logits, torch.randn(1, 4, 1, 1), torch.randn(2, 4), ignored, torch.zeros_like(ignored))
    assert terms["wce"].item() == 0.0 and terms["agree_fraction"].item() == 0.0
    _assert_zero_with_gradient(loss, logits)


# --- MSPN positive-negative hybrid loss --------------------------------------------------------------------------

def _mspn_example() -> tuple[torch.Tensor, ...]:
    """C = 3, present = {0, 1} (class 2 is not among the image's labels), four pixels in a 1×4 image."""
    logits = _pixels([
        [0.0, L2, 0.0],        # pixel 0: clean (majority 1, 5 votes); p = [1/4, 1/2, 1/4]
        [0.0, 0.0, L2],        # pixel 1: noisy (2 votes), proposed {0}; p = [1/4, 1/4, 1/2]
        [80.0, -80.0, 40.0],   # pixel 2: unknown (majority 255, 0 votes, nothing proposed)
        [L2, 0.0, 0.0],        # pixel 3: noisy (3 votes), proposed {0, 1}; p = [1/2, 1/4, 1/4]
    ]).requires_grad_(True)
    majority = _labels([1, 0, 255, 1])
    agreement = _labels([5, 2, 0, 3])
    proposed = torch.tensor([[True, True, False, True],
                             [True, False, False, True],
                             [False, False, False, False]]).reshape(1, 3, 1, 4)
    present = torch.tensor([[True, True, False]])
    return logits, majority, agreement, proposed, present


def test_mspn_each_term_hand_computed() -> None:
    logits, majority, agreement, proposed, present = _mspn_example()
    # negative_labels="excluded_tags": the old reading, which these numbers pin (now an option).
    loss, terms = mspn_hybrid_loss(logits, majority, agreement, proposed, present, agreement_threshold=4,
                                   negative_labels="excluded_tags")
    pos = L2  # −log p_1 at pixel 0
    neg = (L2 + math.log(4 / 3)) / 2  # class 2 at pixels 1, 3: −log(1 − 1/2), −log(1 − 1/4)
    ind = math.log(4 / 3)  # pixel 1: class 1 present, not proposed: −log(1 − 1/4); pixel 3: none
    pc = -1.5 * L2  # Σ p log p = 2·(1/4)·log(1/4) + (1/2)·log(1/2) at both noisy pixels
    assert terms["pos"].item() == pytest.approx(pos, rel=1e-6)
    assert terms["neg"].item() == pytest.approx(neg, rel=1e-6)
    assert terms["indirect"].item() == pytest.approx(ind, rel=1e-6)
    assert terms["constraint"].item() == pytest.approx(pc, rel=1e-6)
    assert terms["clean_fraction"].item() == pytest.approx(1 / 3)
    assert loss.item() == pytest.approx(pos + neg + ind + 0.1 * pc, rel=1e-6)
    loss.backward()
    assert torch.equal(logits.grad[..., 2], torch.zeros(1, 3, 1))  # the unknown pixel is in no term


def test_mspn_terms_over_the_labelled_pixels() -> None:
    """term_mean=labelled_pixels: every term's sum over its set, divided by the 3 labelled pixels (0, 1, 3)."""
    logits, majority, agreement, proposed, present = _mspn_example()
    loss, terms = mspn_hybrid_loss(logits, majority, agreement, proposed, present, agreement_threshold=4,
                                   negative_labels="excluded_tags", term_mean="labelled_pixels")
    pos = L2 / 3  # −log p_1 at pixel 0, the only clean one
    neg = (L2 + math.log(4 / 3)) / 3  # class 2 at pixels 1 and 3
    ind = math.log(4 / 3) / 3  # class 1 at pixel 1
    pc = 2 * (-1.5 * L2) / 3  # Σ p log p at the two noisy pixels
    assert terms["pos"].item() == pytest.approx(pos, rel=1e-6)
    assert terms["neg"].item() == pytest.approx(neg, rel=1e-6)
    assert terms["indirect"].item() == pytest.approx(ind, rel=1e-6)
    assert terms["constraint"].item() == pytest.approx(pc, rel=1e-6)
    assert loss.item() == pytest.approx(pos + neg + ind + 0.1 * pc, rel=1e-6)
    with pytest.raises(ValueError, match="term_mean"):
        mspn_hybrid_loss(logits, majority, agreement, proposed, present, term_mean="pixels")


def test_mspn_threshold_and_weights() -> None:
    logits, majority, agreement, proposed, present = _mspn_example()
    # t = 3 makes pixel 3 clean: pos = (−log 1/2 − log 1/4)/2; only pixel 1 stays noisy.
    loss, terms = mspn_hybrid_loss(logits, majority, agreement, proposed, present, agreement_threshold=3,
                                   negative_weight=2.0, indirect_weight=0.5, constraint_weight=1.0,
                                   negative_labels="excluded_tags")
    pos, neg, ind, pc = (L2 + math.log(4)) / 2, L2, math.log(4 / 3), -1.5 * L2
    assert terms["pos"].item() == pytest.approx(pos, rel=1e-6)
    assert terms["neg"].item() == pytest.approx(neg, rel=1e-6)
    assert terms["clean_fraction"].item() == pytest.approx(2 / 3)
    assert loss.item() == pytest.approx(pos + 2.0 * neg + 0.5 * ind + pc, rel=1e-6)


def test_mspn_confident_wrong_class_is_clamped_not_infinite() -> None:
    # Noisy pixel predicting class 2 (not present) with p ≈ 1: −log(1 − p) is capped at −log(1e-6).
    logits = _pixels([[0.0, 0.0, 200.0]])
    proposed = torch.zeros(1, 3, 1, 1, dtype=torch.bool)
    proposed[0, 0] = True
    _, terms = mspn_hybrid_loss(logits, _labels([0]), _labels([1]), proposed, torch.tensor([[True, True, False]]),
                                negative_labels="excluded_tags")
    assert terms["neg"].item() == pytest.approx(-math.log(1e-6), rel=1e-4)


def test_mspn_abstained_majority_with_a_proposal_is_noisy_not_unknown() -> None:
    # Pixel 0: majority 255, 0 votes, but label 1 proposed → noisy. Pixel 1: nothing at all → unknown.
    logits = _pixels([[0.0, 0.0, L2], [0.0, 40.0, -40.0]])  # pixel 0: p = [1/4, 1/4, 1/2]
    proposed = torch.zeros(1, 3, 1, 2, dtype=torch.bool)
    proposed[0, 1, 0, 0] = True
    _, terms = mspn_hybrid_loss(logits, _labels([255, 255]), _labels([0, 0]), proposed,
                                torch.tensor([[True, True, False]]), negative_labels="excluded_tags")
    assert terms["pos"].item() == 0.0 and terms["clean_fraction"].item() == 0.0
    assert terms["neg"].item() == pytest.approx(L2, rel=1e-6)  # class 2: −log(1 − 1/2)
    assert terms["indirect"].item() == pytest.approx(math.log(4 / 3), rel=1e-6)  # class 0: −log(1 − 1/4)
    assert terms["constraint"].item() == pytest.approx(-1.5 * L2, rel=1e-6)


def _mspn_sets_by_loops(logits: list[float], votes: list[int], tags: set[int], t: int) -> dict[str, float]:
    """MSPN's terms at one pixel written out with plain floats: p = softmax(logits), the seeds' votes."""
    exps = [math.exp(v) for v in logits]
    p = [e / sum(exps) for e in exps]
    counts = {c: votes.count(c) for c in set(votes)}
    majority = min(c for c in counts if counts[c] == max(counts.values()))  # ties: the smaller id
    assert counts[majority] < t  # a noisy pixel
    proposed = set(counts)
    present = {0} | tags
    classes = range(len(logits))

    def mean_nl(labels: set[int]) -> float:
        return sum(-math.log(1 - p[c]) for c in labels) / len(labels)

    return {"minority": mean_nl(proposed - {majority}),
            "proposed_below_t": mean_nl({c for c in proposed if counts[c] < t}),
            "excluded_tags": mean_nl(set(classes) - present),
            "present_unproposed": mean_nl(present - proposed),
            "all_unproposed": mean_nl(set(classes) - proposed),
            "constraint": sum(v * math.log(v) for v in p)}


def test_mspn_negative_sets() -> None:
    # Spec 7.4: C = 6, tags {2, 3, 5}; seed votes 0, 0, 3, 3, 3, 5 → majority 3 with 3 votes < t = 4.
    values = [1.0, -1.0, 0.0, 2.0, -2.0, 0.5]
    expected = _mspn_sets_by_loops(values, [0, 0, 3, 3, 3, 5], {2, 3, 5}, 4)
    assert expected["minority"] == pytest.approx(0.1811042, abs=1e-6)
    assert expected["proposed_below_t"] == pytest.approx(0.3923380, abs=1e-6)
    assert expected["excluded_tags"] == pytest.approx(0.0191983, abs=1e-6)
    logits = torch.tensor(values).reshape(1, 6, 1, 1)
    proposed = torch.tensor([True, False, False, True, False, True]).reshape(1, 6, 1, 1)
    present = torch.tensor([[True, False, True, True, False, True]])
    for negative in ("minority", "proposed_below_t", "excluded_tags"):
        for indirect in ("present_unproposed", "all_unproposed"):
            _, terms = mspn_hybrid_loss(logits, _labels([3]), _labels([3]), proposed, present, agreement_threshold=4,
                                        negative_labels=negative, indirect_labels=indirect)
            assert terms["neg"].item() == pytest.approx(expected[negative], rel=1e-5), negative
            assert terms["indirect"].item() == pytest.approx(expected[indirect], rel=1e-5), indirect
            assert terms["constraint"].item() == pytest.approx(expected["constraint"], rel=1e-5)
    # The default is the minority reading.
    _, terms = mspn_hybrid_loss(logits, _labels([3]), _labels([3]), proposed, present, agreement_threshold=4)
    assert terms["neg"].item() == pytest.approx(expected["minority"], rel=1e-5)


def test_mspn_minority_leaves_the_majority_free_and_skips_unlisted_labels() -> None:
    # dL_neg/d(majority logit) < 0 under "minority": descent raises the majority's logit (its rivals' p fall).
    # "proposed_below_t" has the majority in its set and pushes it down instead.
    logits = torch.tensor([1.0, -1.0, 0.0, 2.0, -2.0, 0.5]).reshape(1, 6, 1, 1)
    proposed = torch.tensor([True, False, False, True, False, True]).reshape(1, 6, 1, 1)
    present = torch.tensor([[True, False, True, True, False, True]])
    grads = {}
    for negative in ("minority", "proposed_below_t"):
        x = logits.clone().requires_grad_(True)
        loss = mspn_hybrid_loss(x, _labels([3]), _labels([3]), proposed, present, negative_labels=negative,
                                negative_weight=1.0, indirect_weight=0.0, constraint_weight=0.0)[0]
        loss.backward()
        grads[negative] = x.grad[0, 3, 0, 0].item()
    assert grads["minority"] < 0 < grads["proposed_below_t"]
    # Class 5 without a proposal bit (unlisted) is in neither set: minority = {0} only.
    _, terms = mspn_hybrid_loss(logits, _labels([3]), _labels([3]), proposed, present,
                                unlisted=torch.tensor([[False, False, False, False, False, True]]))
    p0 = torch.softmax(logits.flatten(), 0)[0].item()
    assert terms["neg"].item() == pytest.approx(-math.log(1 - p0), rel=1e-5)


def test_mspn_empty_selections() -> None:
    logits, majority, agreement, proposed, present = _mspn_example()
    # No noisy pixel (t = 2 makes pixels 1 and 3 clean): the negative terms are 0, not NaN.
    _, terms = mspn_hybrid_loss(logits, majority, agreement, proposed, present, agreement_threshold=2)
    assert terms["neg"].item() == 0.0 and terms["indirect"].item() == 0.0 and terms["constraint"].item() == 0.0
    # Every pixel unknown: finite 0 with a gradient path.
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss, terms = mspn_hybrid_loss(logits, torch.full((1, 2, 2), 255), torch.zeros(1, 2, 2, dtype=torch.int64),
                                   torch.zeros(1, 3, 2, 2, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool))
    assert terms["clean_fraction"].item() == 0.0
    _assert_zero_with_gradient(loss, logits)


def test_mspn_gradcheck() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    majority = torch.tensor([[[0, 1], [255, 2]], [[1, 1], [0, 255]]])
    agreement = torch.tensor([[[6, 2], [0, 4]], [[1, 5], [3, 0]]])
    proposed = torch.rand(2, 3, 2, 2) < 0.5
    proposed[1, :, 1, 1] = False  # (1, 1, 1) unknown; (0, 1, 0) noisy with majority 255 if anything is proposed
    present = torch.tensor([[True, True, False], [True, False, True]])
    assert torch.autograd.gradcheck(
        lambda x: mspn_hybrid_loss(x, majority, agreement, proposed, present)[0], (logits,))


def test_mspn_row_fields_pad_the_label_list_and_mark_the_label_set() -> None:
    """The per-image fields MSPN's loss reads, added to each training sample (and only to MSPN's)."""
    from wsss_ray.methods.mspn.config import MspnLossConfig
    from wsss_ray.methods.registry import segmentation_row_fields
    from wsss_ray.methods.robust.config import CrossEntropyConfig

    fields = segmentation_row_fields(MspnLossConfig())
    assert fields is not None and segmentation_row_fields(CrossEntropyConfig()) is None
    out = fields({"label_list": [0, 3, 5]}, 6)
    assert out["label_list"].tolist() == [0, 3, 5, -1, -1, -1, -1, -1]  # the 8 bits of ``proposed``
    assert out["present"].tolist() == [True, False, False, True, False, True]
    many = fields({"label_list": list(range(10))}, 12)  # labels past the eighth have no bit, but are present
    assert many["label_list"].tolist() == list(range(8))
    assert many["present"].tolist() == [True] * 10 + [False] * 2


def test_decode_proposed() -> None:
    # Image 0's list: bit 0 → class 0, bit 1 → 7, bit 2 → 3, rest padding. Image 1: bit 0 → 0, bit 1 → 5.
    label_lists = torch.tensor([[0, 7, 3, -1, -1, -1, -1, -1], [0, 5, -1, -1, -1, -1, -1, -1]])
    bits = torch.tensor([[[0b101, 0b010, 0]], [[0b11, 0b1000, 0b1]]], dtype=torch.uint8)
    proposed = decode_proposed(bits, label_lists, num_classes=8)
    assert proposed.shape == (2, 8, 1, 3) and proposed.dtype == torch.bool
    expected = [[{0, 3}, {7}, set()], [{0, 5}, set(), {0}]]  # bit 3 of image 1 is a padded slot: ignored
    for n in range(2):
        for x in range(3):
            assert {c for c in range(8) if proposed[n, c, 0, x]} == expected[n][x]
    assert torch.equal(decode_proposed(bits.long(), label_lists, 8), proposed)
    with pytest.raises(ValueError, match="label_lists"):
        decode_proposed(bits, torch.tensor([[0, 9], [0, 1]]), num_classes=8)
