"""OuT pseudo-mask correction: each strategy on hand-made probabilities, and the EMA teacher's arithmetic.

Every expected value is worked out by hand in the test (no gradcheck: the correction outputs labels, no loss).
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from wsss_ray.methods.out_correction.correction import EmaTeacher, correct_pseudo_masks, correction_stats

IGNORE = 255


def _probs(*pixels: list[float]) -> torch.Tensor:
    """(1, C, 1, W) probabilities from one C-vector per pixel, left to right."""
    return torch.tensor(pixels, dtype=torch.float32).t().reshape(1, len(pixels[0]), 1, len(pixels))


def _row(*labels: int) -> torch.Tensor:
    return torch.tensor([[list(labels)]], dtype=torch.int64)


def _valid(*flags: bool) -> torch.Tensor:
    return torch.tensor([[list(flags)]], dtype=torch.bool)


# --------------------------------------------------------------------------------------------- strategies


def test_replace_takes_confident_teacher_labels_also_on_ignored_pixels() -> None:
    probs = _probs(
        [0.1, 0.8, 0.1],    # confident (0.8 ≥ 0.7), disagrees with 0 → 1
        [0.5, 0.3, 0.2],    # unsure (0.5) → pseudo 2 kept
        [0.05, 0.15, 0.8],  # was 255, confident → 2
        [0.6, 0.3, 0.1],    # was 255, unsure → stays 255
        [0.9, 0.05, 0.05],  # padding → 255 although confident
    )
    pseudo = _row(0, 2, IGNORE, IGNORE, 1)
    valid = _valid(True, True, True, True, False)
    out = correct_pseudo_masks(pseudo, probs, valid, "replace", confidence=0.7)
    assert out.dtype == torch.int64
    assert out.tolist() == [[[1, 2, 2, IGNORE, IGNORE]]]


def test_replace_threshold_is_inclusive() -> None:
    # 0.75 and 0.25 are exact in float32: max p = confidence must replace, just below must not.
    probs = _probs([0.25, 0.75], [0.2578125, 0.7421875])
    out = correct_pseudo_masks(_row(0, 0), probs, _valid(True, True), "replace", confidence=0.75)
    assert out.tolist() == [[[1, 0]]]


def test_ema_update_flips_only_when_teacher_margin_beats_momentum() -> None:
    # v_m = 0.3: a labelled pixel y flips to c only where 0.7·(P_c − P_y) > 0.3, i.e. P_c − P_y > 3/7 ≈ 0.4286.
    probs = _probs(
        [0.2, 0.7, 0.1],    # y=0: M = [0.3+0.14, 0.49, 0.07] = [0.44, 0.49, 0.07] → 1
        [0.3, 0.7, 0.0],    # y=0: M = [0.3+0.21, 0.49, 0] = [0.51, 0.49, 0] → stays 0 (replace would flip)
        [0.1, 0.1, 0.8],    # was 255, max 0.8 ≥ 0.7 → 2
        [0.6, 0.3, 0.1],    # was 255, max 0.6 < 0.7 → 255
        [0.0, 0.0, 1.0],    # padding → 255
    )
    pseudo = _row(0, 0, IGNORE, IGNORE, 0)
    valid = _valid(True, True, True, True, False)
    out = correct_pseudo_masks(pseudo, probs, valid, "ema", confidence=0.7, mask_momentum=0.3)
    assert out.tolist() == [[[1, 0, 2, IGNORE, IGNORE]]]
    assert 0.7 - 0.2 > 0.3 / 0.7 > 0.7 - 0.3  # the first two pixels' margins straddle 3/7


def test_ema_update_with_momentum_at_least_half_never_changes_a_label() -> None:
    # v_m = 0.6: even a certain teacher gives M_y = 0.6 > M_c = 0.4·1 = 0.4.
    probs = _probs([0.0, 1.0, 0.0], [1.0, 0.0, 0.0])
    out = correct_pseudo_masks(_row(0, 2), probs, _valid(True, True), "ema", mask_momentum=0.6)
    assert out.tolist() == [[[0, 2]]]


def test_ema_update_tie_keeps_the_pseudo_label() -> None:
    # v_m = 0.5, y = 2, P = [0, 1, 0]: M = [0, 0.5, 0.5]; a plain argmax would pick class 1.
    out = correct_pseudo_masks(_row(2), _probs([0.0, 1.0, 0.0]), _valid(True), "ema", mask_momentum=0.5)
    assert out.tolist() == [[[2]]]


def test_ema_update_with_zero_momentum_is_teacher_argmax_on_labelled_pixels() -> None:
    # v_m = 0: M = P, so a labelled pixel takes argmax P even when the teacher is unsure (0.5 < 0.7).
    probs = _probs([0.5, 0.3, 0.2])
    out = correct_pseudo_masks(_row(2), probs, _valid(True), "ema", mask_momentum=0.0)
    assert out.tolist() == [[[0]]]


def test_nnss_keeps_only_confident_agreement() -> None:
    probs = _probs(
        [0.1, 0.8, 0.1],    # y=1 agrees, 0.8 ≥ 0.7 → keep 1
        [0.2, 0.6, 0.2],    # y=1 agrees, 0.6 < 0.7 → 255
        [0.1, 0.8, 0.1],    # y=0 disagrees → 255
        [0.9, 0.05, 0.05],  # was 255 → stays 255
        [0.0, 0.0, 1.0],    # y=2 agrees but padding → 255
    )
    pseudo = _row(1, 1, 0, IGNORE, 2)
    valid = _valid(True, True, True, True, False)
    out = correct_pseudo_masks(pseudo, probs, valid, "nnss", confidence=0.7)
    assert out.tolist() == [[[1, IGNORE, IGNORE, IGNORE, IGNORE]]]


def test_batched_2x2_masks_are_corrected_per_sample() -> None:
    # N = 2, C = 2, 2×2: sample 0 teacher says class 1 everywhere at 0.9, sample 1 says class 0 at 0.6.
    probs = torch.empty(2, 2, 2, 2)
    probs[0, 0], probs[0, 1] = 0.1, 0.9
    probs[1, 0], probs[1, 1] = 0.6, 0.4
    pseudo = torch.tensor([[[0, 1], [IGNORE, 1]], [[0, 1], [IGNORE, 0]]])
    valid = torch.tensor([[[True, True], [True, False]], [[True, True], [True, True]]])
    replace = correct_pseudo_masks(pseudo, probs, valid, "replace")
    assert replace.tolist() == [[[1, 1], [1, IGNORE]], [[0, 1], [IGNORE, 0]]]
    nnss = correct_pseudo_masks(pseudo, probs, valid, "nnss")
    assert nnss.tolist() == [[[IGNORE, 1], [IGNORE, IGNORE]], [[IGNORE] * 2, [IGNORE] * 2]]


@pytest.mark.parametrize("strategy", ["replace", "ema", "nnss"])
def test_padding_stays_ignored_whatever_the_strategy(strategy: str) -> None:
    probs = torch.zeros(1, 3, 2, 2)
    probs[:, 1] = 1.0  # a certain teacher that agrees with every label
    pseudo = torch.ones(1, 2, 2, dtype=torch.int64)
    valid = torch.zeros(1, 2, 2, dtype=torch.bool)
    assert correct_pseudo_masks(pseudo, probs, valid, strategy, mask_momentum=0.0).tolist() == [[[IGNORE] * 2] * 2]


@pytest.mark.parametrize("strategy", ["replace", "ema", "nnss"])
def test_all_ignored_unsure_teacher_stays_ignored(strategy: str) -> None:
    probs = torch.full((1, 2, 1, 3), 0.5)  # max 0.5 < 0.7: nothing to add anywhere
    pseudo = torch.full((1, 1, 3), IGNORE, dtype=torch.int64)
    out = correct_pseudo_masks(pseudo, probs, torch.ones(1, 1, 3, dtype=torch.bool), strategy)
    assert out.tolist() == [[[IGNORE] * 3]]


def test_uint8_pseudo_and_bf16_probabilities_are_accepted() -> None:
    probs = _probs([0.125, 0.875]).bfloat16()  # exact in bf16
    out = correct_pseudo_masks(_row(0).to(torch.uint8), probs, _valid(True), "replace")
    assert out.dtype == torch.int64 and out.tolist() == [[[1]]]


def test_input_errors_name_the_problem() -> None:
    probs = torch.full((1, 2, 2, 2), 0.5)
    pseudo = torch.zeros(1, 2, 2, dtype=torch.int64)
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="'median'"):
        correct_pseudo_masks(pseudo, probs, valid, "median")
    with pytest.raises(ValueError, match=r"pseudo shape \(1, 2, 3\).*teacher_probs shape \(1, 2, 2, 2\)"):
        correct_pseudo_masks(torch.zeros(1, 2, 3, dtype=torch.int64), probs, valid, "nnss")
    with pytest.raises(ValueError, match=r"valid shape \(1, 2, 1\)"):
        correct_pseudo_masks(pseudo, probs, valid[..., :1], "nnss")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        correct_pseudo_masks(pseudo, probs[0], valid, "nnss")
    with pytest.raises(ValueError, match="outside"):
        correct_pseudo_masks(torch.full((1, 2, 2), 2, dtype=torch.int64), probs, valid, "ema")
    with pytest.raises(ValueError, match="integer"):
        correct_pseudo_masks(pseudo.float(), probs, valid, "nnss")


# ------------------------------------------------------------------------------------------------- stats


def test_correction_stats_fractions_over_valid_pixels() -> None:
    before = torch.tensor([[[0, 1, IGNORE, 2, 1]]])
    after = torch.tensor([[[0, IGNORE, 1, 3, 0]]])
    # first four valid: 0→0 same, 1→255 newly ignored, 255→1 newly labelled, 2→3 changed; last is padding.
    valid = torch.tensor([[[True, True, True, True, False]]])
    stats = correction_stats(before, after, valid)
    assert stats == pytest.approx({"changed": 1 / 4, "newly_ignored": 1 / 4, "newly_labelled": 1 / 4,
                                   "labelled_before": 3 / 4, "labelled_after": 3 / 4})
    # Without a valid mask all 5 pixels count, and the last (1 → 0) is a change too.
    assert correction_stats(before, after)["changed"] == pytest.approx(2 / 5)
    empty = correction_stats(before, after, torch.zeros_like(valid))
    assert all(value == 0.0 for value in empty.values())


# ------------------------------------------------------------------------------------------- EMA teacher


class _OneWeight(nn.Module):
    """One parameter w and a BatchNorm with buffers only (running_mean/var, num_batches_tracked)."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w]))
        self.bn = nn.BatchNorm1d(1, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x * self.w)


class _Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the network sits in ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def _set_student(student: _OneWeight, w: float, mean: float, var: float, tracked: int) -> None:
    with torch.no_grad():
        student.w.fill_(w)
        student.bn.running_mean.fill_(mean)
        student.bn.running_var.fill_(var)
        student.bn.num_batches_tracked.fill_(tracked)


def test_ema_teacher_two_updates_by_hand() -> None:
    student = _OneWeight(2.0)
    teacher = EmaTeacher(student, decay=0.5, buffers="copy")  # the copy reading (option); default: next test
    assert not teacher.model.training and not teacher.model.w.requires_grad
    assert teacher.model.w is not student.w

    _set_student(student, w=4.0, mean=1.0, var=3.0, tracked=3)
    assert teacher.model.w.item() == 2.0  # a copy: the student's change does not leak before an update
    teacher.update(student)
    # w = 0.5·2 + 0.5·4 = 3; buffers copied, not averaged.
    assert teacher.model.w.item() == 3.0
    assert teacher.model.bn.running_mean.item() == 1.0 and teacher.model.bn.running_var.item() == 3.0
    assert teacher.model.bn.num_batches_tracked.item() == 3

    _set_student(student, w=1.0, mean=5.0, var=2.0, tracked=7)
    teacher.update(student)
    # w = 0.5·3 + 0.5·1 = 2.
    assert teacher.model.w.item() == 2.0
    assert teacher.model.bn.running_mean.item() == 5.0 and teacher.model.bn.running_var.item() == 2.0
    assert teacher.model.bn.num_batches_tracked.item() == 7
    assert teacher.step == 2
    assert student.w.item() == 1.0 and student.w.requires_grad  # the student is untouched

    # Eval mode uses the copied running stats: (x·w − mean)/sqrt(var + eps) = (4·2 − 5)/sqrt(2 + 1e-5).
    out = teacher.model(torch.tensor([[4.0]]))
    assert out.item() == pytest.approx(3.0 / math.sqrt(2.0 + 1e-5), rel=1e-6)


@pytest.mark.parametrize(("buffers", "mean", "var"), [
    # ema (default): b ← v·b_teacher + (1 − v)·b_student with v = 0.999: mean 0.999·0 + 0.001·1 = 0.001,
    # var 0.999·1 + 0.001·3 = 1.002. copy: the student's 1 and 3.
    ("ema", 0.001, 1.002),
    ("copy", 1.0, 3.0),
])
def test_ema_teacher_batchnorm_buffers(buffers: str, mean: float, var: float) -> None:
    student = nn.Sequential(nn.BatchNorm2d(1))
    teacher = EmaTeacher(student, buffers=buffers) if buffers != "ema" else EmaTeacher(student)
    with torch.no_grad():
        student[0].running_mean.fill_(1.0)
        student[0].running_var.fill_(3.0)
        student[0].num_batches_tracked.fill_(5)
        student[0].weight.fill_(2.0)
    teacher.update(student)
    bn = teacher.model[0]
    assert bn.running_mean.item() == pytest.approx(mean, abs=1e-7)
    assert bn.running_var.item() == pytest.approx(var, abs=1e-7)
    assert bn.num_batches_tracked.item() == 5  # an integer buffer is copied in both readings
    assert bn.weight.item() == pytest.approx(0.999 * 1.0 + 0.001 * 2.0, abs=1e-7)  # parameters: Eq. 1 either way
    assert student[0].running_mean.item() == 1.0  # the student is untouched


def test_ema_teacher_rejects_an_unknown_buffer_mode() -> None:
    with pytest.raises(ValueError, match="buffers"):
        EmaTeacher(nn.ReLU(), buffers="average")


def test_ema_teacher_default_decay_is_the_papers() -> None:
    student = _OneWeight(0.0)
    teacher = EmaTeacher(student)
    _set_student(student, w=1000.0, mean=0.0, var=1.0, tracked=0)
    teacher.update(student)
    assert teacher.model.w.item() == pytest.approx(0.999 * 0.0 + 0.001 * 1000.0)  # = 1.0


def test_ema_teacher_warmup_ramps_the_decay() -> None:
    student = _OneWeight(0.0)
    teacher = EmaTeacher(student, decay=0.999, warmup=True)
    _set_student(student, w=10.0, mean=0.0, var=1.0, tracked=0)
    assert teacher.current_decay() == pytest.approx(1 / 10)  # min(0.999, (1+0)/(10+0))
    teacher.update(student)
    assert teacher.model.w.item() == pytest.approx(0.1 * 0.0 + 0.9 * 10.0)  # 9
    assert teacher.current_decay() == pytest.approx(2 / 11)  # step 1
    teacher.update(student)
    assert teacher.model.w.item() == pytest.approx(2 / 11 * 9.0 + 9 / 11 * 10.0)  # 9.8181…


def test_ema_teacher_unwraps_a_ddp_style_wrapper() -> None:
    student = _OneWeight(2.0)
    teacher = EmaTeacher(_Wrapper(student), decay=0.5)
    assert not hasattr(teacher.model, "module") and [n for n, _ in teacher.model.named_parameters()] == ["w"]
    _set_student(student, w=6.0, mean=0.0, var=1.0, tracked=1)
    teacher.update(_Wrapper(student))
    assert teacher.model.w.item() == 4.0  # 0.5·2 + 0.5·6


def test_ema_teacher_rejects_a_different_network() -> None:
    teacher = EmaTeacher(_OneWeight(1.0))
    with pytest.raises(ValueError, match="differ"):
        teacher.update(nn.Linear(1, 1))


def test_ema_teacher_of_a_parameter_free_network_still_counts_steps() -> None:
    teacher = EmaTeacher(nn.ReLU())
    teacher.update(nn.ReLU())
    assert teacher.step == 1


def test_ema_teacher_state_dict_round_trip() -> None:
    student = _OneWeight(2.0)
    teacher = EmaTeacher(student, decay=0.5, buffers="copy")
    _set_student(student, w=4.0, mean=1.5, var=2.5, tracked=9)
    teacher.update(student)

    buffer = io.BytesIO()
    torch.save(teacher.state_dict(), buffer)  # as a checkpoint would, and read back with weights_only
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = EmaTeacher(_OneWeight(0.0), decay=0.5)
    resumed.load_state_dict(state)
    assert resumed.step == 1
    assert resumed.model.w.item() == 3.0 and resumed.model.bn.running_mean.item() == 1.5
    assert resumed.model.bn.num_batches_tracked.item() == 9
    # The resumed teacher continues the same average: 0.5·3 + 0.5·4 = 3.5.
    resumed.update(student)
    assert resumed.model.w.item() == 3.5 and resumed.step == 2


class _Logits(nn.Module):
    """Logits = s·images (one parameter s), so the teacher's softmax can be worked out by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(1.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.s


def test_probabilities_are_float32_softmax_without_grad() -> None:
    teacher = EmaTeacher(_Logits())
    # Pixel logits [0, ln 3] → softmax [1/4, 3/4]; [ln 2, 0] → [2/3, 1/3].
    images = torch.tensor([[[[0.0, math.log(2.0)]], [[math.log(3.0), 0.0]]]])  # (1, 2, 1, 2)
    probs = teacher.probabilities(images)
    assert probs.shape == (1, 2, 1, 2) and probs.dtype == torch.float32 and not probs.requires_grad
    assert torch.allclose(probs, torch.tensor([[[[0.25, 2 / 3]], [[0.75, 1 / 3]]]]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = teacher.probabilities(images.bfloat16())
    assert auto.dtype == torch.float32
    assert torch.allclose(auto, probs, atol=1e-2)
    # Teacher probabilities feed the correction directly: 3/4 ≥ 0.7 at pixel 0 only.
    out = correct_pseudo_masks(torch.tensor([[[0, 0]]]), probs, torch.ones(1, 1, 2, dtype=torch.bool), "replace")
    assert out.tolist() == [[[1, 0]]]


def test_teacher_precision_picks_bf16_only_where_asked_or_native() -> None:
    from wsss_ray.methods.out_correction.hook import native_bf16, teacher_dtype

    cpu = torch.device("cpu")
    assert teacher_dtype("float32", cpu) == torch.float32
    assert teacher_dtype("bfloat16", cpu) == torch.bfloat16
    assert teacher_dtype("auto", cpu) == (torch.bfloat16 if native_bf16(cpu) else torch.float32)


def test_bf16_teacher_at_half_scale_matches_float32_teacher() -> None:
    from wsss_ray.methods.out_correction.hook import teacher_probabilities

    torch.manual_seed(0)
    # A 3x3 conv with well-separated logits: the bf16 forward must give the same classes, float32 probabilities.
    net = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        net.weight.mul_(8.0)
    fp32, bf16 = EmaTeacher(net), EmaTeacher(net)
    bf16.model.to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 16, 20)
    for scale in (1.0, 0.5):
        reference = teacher_probabilities(fp32, images, scale)
        probs = teacher_probabilities(bf16, images, scale, torch.bfloat16)
        assert probs.shape == (2, 4, 16, 20) and probs.dtype == torch.float32 and probs.is_contiguous()
        assert torch.allclose(probs.sum(1), torch.ones(2, 16, 20), atol=1e-5)
        assert (probs - reference).abs().max() < 0.05
        assert (probs.argmax(1) == reference.argmax(1)).float().mean() > 0.97
    # The EMA update averages into a channels-last teacher exactly as into a contiguous one.
    with torch.no_grad():
        net.weight.add_(1.0)
    fp32.update(net)
    bf16.update(net)
    assert torch.allclose(fp32.model.weight, bf16.model.weight)
    assert bf16.model.weight.is_contiguous(memory_format=torch.channels_last)


def test_online_corrector_resolves_teacher_precision() -> None:
    from wsss_ray.methods.out_correction.config import OutCorrectorConfig
    from wsss_ray.methods.out_correction.hook import OnlineCorrector

    net = nn.Conv2d(3, 4, 3, padding=1)
    assert OnlineCorrector(OutCorrectorConfig(teacher_precision="float32"), net, "/unused").dtype == torch.float32
    corrector = OnlineCorrector(OutCorrectorConfig(teacher_precision="bfloat16"), net, "/unused")
    assert corrector.dtype == torch.bfloat16
    assert corrector.teacher.model.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="teacher_precision"):
        OutCorrectorConfig(teacher_precision="fp8")


def test_inflection_epoch_counts_completed_epochs() -> None:
    from wsss_ray.methods.out_correction.config import OutCorrectorConfig
    from wsss_ray.methods.out_correction.hook import OnlineCorrector

    corrector = OnlineCorrector(OutCorrectorConfig(), nn.Conv2d(3, 4, 1), "/unused")
    # 0-based epochs: 4 epochs (0..3) on the raw pseudo-masks, corrections from epoch 4 (the 5th counted from 1).
    assert [corrector.active(epoch) for epoch in range(6)] == [False, False, False, False, True, True]
    # VOC train_aug (10,582 images) at batch 10: floor(10582/10) = 1058 steps per epoch, so the first corrected
    # step is 4·1058 = 4232, by which the teacher keeps 0.999^4232 ≈ 1.45% of its initial weights.
    steps = 10582 // 10
    first = next(i for i in range(10 * steps) if corrector.active(i // steps))
    assert first == 4232
    assert 0.999 ** first == pytest.approx(0.01449, abs=1e-4)


def test_online_corrector_passes_the_buffer_mode() -> None:
    from wsss_ray.methods.out_correction.config import OutCorrectorConfig
    from wsss_ray.methods.out_correction.hook import OnlineCorrector

    net = nn.BatchNorm2d(1)
    assert OnlineCorrector(OutCorrectorConfig(), net, "/unused").teacher.buffers == "ema"
    assert OnlineCorrector(OutCorrectorConfig(teacher_buffers="copy"), net, "/unused").teacher.buffers == "copy"
