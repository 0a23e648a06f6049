"""Objectives wired to batch columns, and the config rules that tie losses to their pseudo-label generators."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from wsss_ray.core.config_base import SegModelConfig
from wsss_ray.methods.mspn.objective import MspnObjective
from wsss_ray.methods.registry import (
    SEGMENTATION_OBJECTIVES,
    build_classifier,
    build_classifier_objective,
    segmentation_maps,
)
from wsss_ray.models.deeplab import build_segmentation_model
from wsss_ray.pipeline_config import ClassifierTrainConfig, ConfigError, SegTrainConfig, parse_config
from wsss_ray.training.optim import set_warmup_cosine_lr
from wsss_ray.training.step import TrainStep

NUM_CLASSES = 5


def tiny_segmenter(name: str = "deeplab_v3") -> torch.nn.Module:
    config = SegModelConfig.model_validate({"name": name, "backbone": {"name": "resnet_tiny"}, "aspp_channels": 8})
    return build_segmentation_model(config, NUM_CLASSES)


def seg_batch(n: int = 2, size: int = 32) -> dict[str, Any]:
    torch.manual_seed(0)
    label = torch.randint(0, 3, (n, size, size))
    label[:, :4] = 255
    return {"image": torch.randn(n, 3, size, size), "label": label, "retrieved": label.clone(),
            "scribble": torch.full((n, size, size), 255), "dist_scribble": torch.randint(0, 256, (n, size, size)),
            "dist_boundary": torch.randint(0, 256, (n, size, size)), "majority": label.clone(),
            "agreement": torch.full((n, size, size), 6), "proposed": torch.ones(n, size, size, dtype=torch.long),
            "label_list": torch.tensor([[0, 1, -1, -1, -1, -1, -1, -1]] * n),
            "present": torch.tensor([[True, True, False, False, False]] * n)}


@pytest.mark.parametrize("loss", [{"name": "cross_entropy"}, {"name": "sce"}, {"name": "curriculum"},
                                  {"name": "nal"}, {"name": "cdsp", "lorm_channels": 4}, {"name": "mspn"}])
def test_every_segmentation_objective_runs_one_step(loss: dict[str, Any]) -> None:
    config = SegTrainConfig.model_validate({"loss": loss})
    model = tiny_segmenter()
    # CDSP's LoRM reads the backbone's last map (issue 14 point 5), the others φ's width (unused).
    width = model.backbone.out_channels if loss["name"] == "cdsp" else model.classifier_weight().shape[1]
    objective = SEGMENTATION_OBJECTIVES.build(config.loss, NUM_CLASSES, width)
    step = TrainStep(model, objective)
    value, terms = step(seg_batch())
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert model.backbone.conv1.weight.grad is not None
    assert all(t.requires_grad is False for t in terms.values() if isinstance(t, torch.Tensor))
    assert set(segmentation_maps(config.loss)) <= set(seg_batch())


def test_cross_entropy_objective_is_plain_cross_entropy() -> None:
    model = tiny_segmenter().eval()
    batch = seg_batch()
    objective = SEGMENTATION_OBJECTIVES.build(SegTrainConfig().loss, NUM_CLASSES, 0)
    value, _ = objective(model, batch)
    assert torch.allclose(value, F.cross_entropy(model(batch["image"]), batch["label"], ignore_index=255))


def test_lorm_parameters_train_with_the_head() -> None:
    model = tiny_segmenter()
    objective = SEGMENTATION_OBJECTIVES.build(SegTrainConfig.model_validate(
        {"loss": {"name": "cdsp", "lorm_channels": 4}}).loss, NUM_CLASSES, model.classifier_weight().shape[1])
    backbone, head = TrainStep(model, objective).parameter_groups()
    lorm = set(map(id, objective.parameters()))
    assert lorm and lorm <= set(map(id, head)) and not lorm & set(map(id, backbone))


@pytest.mark.parametrize(("features", "expected"), [("backbone", "backbone"), ("head", "phi")])
def test_cdsp_objective_width_and_input_follow_lorm_features(features: str, expected: str) -> None:
    # stages/train_seg builds the objective with the backbone's width (default) or φ's; LoRM then reads that map.
    from wsss_ray.stages.train_seg import _objective

    model_config = {"name": "deeplab_v3", "backbone": {"name": "resnet_tiny"}, "aspp_channels": 8}
    config = SegTrainConfig.model_validate({"model": model_config, "loss": {"name": "cdsp",
                                                                            "lorm_features": features}})
    objective = _objective(config, NUM_CLASSES)
    model = tiny_segmenter().eval()  # eval: φ of v3 passes ASPP's dropout in training mode
    width = {"backbone": model.backbone.out_channels, "phi": model.classifier_weight().shape[1]}[expected]
    assert objective.lorm.query.in_channels == width and objective.lorm.query.out_channels == width
    seen: dict[str, torch.Tensor] = {}
    original = objective.lorm.forward

    def spy(feats: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
        seen["features"] = feats
        return original(feats, foreground)

    objective.lorm.forward = spy  # type: ignore[method-assign]
    batch = seg_batch()
    objective(model, batch)
    with torch.no_grad():
        out = model(batch["image"], with_features=True)
    assert torch.allclose(seen["features"], out["backbone" if expected == "backbone" else "features"], atol=1e-5)


def test_objective_builder_leaves_the_rng_alone_without_lorm() -> None:
    from wsss_ray.stages.train_seg import _objective

    torch.manual_seed(3)
    _objective(SegTrainConfig.model_validate({"loss": {"name": "cross_entropy"}}), NUM_CLASSES)
    after = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(3))


def test_mspn_counts_labels_beyond_the_bitmask_as_proposed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two image labels listed (bits 0, 1); label 3 is present but has no bit: it must not get indirect NL.
    objective = MspnObjective(SegTrainConfig.model_validate({"loss": {"name": "mspn", "agreement": 6}}).loss, 4)
    captured: dict[str, torch.Tensor] = {}

    class Probe(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return torch.zeros(1, 4, 1, 1, requires_grad=True)

    from wsss_ray.methods.mspn import objective as objectives

    original = objectives.mspn_hybrid_loss

    def spy(logits: torch.Tensor, majority: torch.Tensor, agreement: torch.Tensor, proposed: torch.Tensor,
            present: torch.Tensor, **kwargs: Any) -> Any:
        captured["proposed"] = proposed
        return original(logits, majority, agreement, proposed, present, **kwargs)

    monkeypatch.setattr(objectives, "mspn_hybrid_loss", spy)
    objective(Probe(), {"image": torch.zeros(1, 3, 1, 1), "majority": torch.tensor([[[1]]]),
                        "agreement": torch.tensor([[[2]]]), "proposed": torch.tensor([[[0b01]]]),
                        "label_list": torch.tensor([[0, 1, -1, -1, -1, -1, -1, -1]]),
                        "present": torch.tensor([[True, True, False, True]])})
    # bit 0 → label 0 proposed; label 1 listed but not proposed; label 3 unlisted → proposed; label 2 absent.
    assert captured["proposed"][0, :, 0, 0].tolist() == [True, False, False, True]


@pytest.mark.parametrize("head", ["gap", "ktse", "bap"])
def test_classifier_objectives_match_their_heads(head: str) -> None:
    # 40 epochs: KTSE's schedule, which its default warm-up of 10 epochs needs.
    config = ClassifierTrainConfig.model_validate({"backbone": {"name": "resnet_tiny"}, "head": {"name": head},
                                                   "loss": {"name": "multilabel_soft_margin" if head == "gap"
                                                            else head}, "epochs": 40})
    model = build_classifier(config, NUM_CLASSES - 1)
    batch = {"image": torch.randn(2, 3, 32, 32), "target": torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 1.0, 0]]),
             "boxes": torch.tensor([[[1, 0, 0, 16, 16]] + [[-1] * 5] * 2, [[2, 8, 8, 30, 30], [3, 0, 0, 8, 8],
                                                                             [-1] * 5]], dtype=torch.float32)}
    value, _ = TrainStep(model, build_classifier_objective(config))(batch)
    value.backward()
    assert torch.isfinite(value) and model.backbone.conv1.weight.grad is not None


def pipeline(**sections: Any) -> Any:
    return parse_config({"output": "out", "dataset": {"root": "data", **sections.pop("dataset", {})}, **sections},
                        source="cfg.yaml")


@pytest.mark.parametrize(("sections", "message"), [
    ({"train_seg": {"loss": {"name": "nal"}}}, "reads the outputs of the 'box' pseudo-label generator"),
    ({"train_seg": {"loss": {"name": "mspn"}}}, "'multi_seed' pseudo-label generator"),
    ({"pseudo_labels": {"generator": {"name": "multi_seed", "seeds": [[0.1, 1.0]], "agreement": 1}},
      "train_seg": {"loss": {"name": "mspn", "agreement": 3}}}, "agreement \\(3\\) exceeds the generator's 1 seeds"),
    ({"train_cls": {"head": {"name": "bap"}, "loss": {"name": "bap"}}}, "needs dataset.supervision boxes"),
    ({"train_cls": {"head": {"name": "ktse"}}}, "loss 'multilabel_soft_margin' and head 'ktse' do not go"),
    ({"train_seg": {"loss": {"name": "focal"}}}, "train_seg.loss.name: unknown 'focal'"),
    ({"train_seg": {"workers": {"num_workers": 2, "min_workers": 3}}}, "min_workers \\(3\\) must not exceed"),
    ({"train_seg": {"corrector": {"strategy": "vote"}}}, "train_seg.corrector.strategy"),
])
def test_mismatched_methods_are_config_errors(sections: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        pipeline(**sections)


def test_method_sections_take_paper_defaults() -> None:
    config = pipeline(dataset={"supervision": "boxes"}, pseudo_labels={"generator": {"name": "box"}},
                      train_seg={"loss": {"name": "nal"}, "corrector": {}, "early_learning": {}})
    seg = config.train_seg
    assert (seg.loss.gamma, seg.loss.lambda_wce) == (7.0, 0.1)  # type: ignore[union-attr]
    assert seg.corrector is not None and (seg.corrector.inflection_epoch, seg.corrector.ema_decay,
                                          seg.corrector.confidence, seg.corrector.strategy) == (4, 0.999, 0.7, "nnss")
    assert seg.early_learning is not None and seg.early_learning.key_fraction == 0.4
    # A loss section without a name is still the cross-entropy of older configs.
    assert pipeline(train_seg={"loss": {"label_smoothing": 0.2}}).train_seg.loss.name == "cross_entropy"


def test_warmup_cosine_schedule_by_hand() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    optimizer.param_groups[0]["initial_lr"] = 1.0
    # 4 warm-up steps of 12: (s+1)/4, then 0.5·(1 + cos(π·(s−4)/8)).
    assert [round(set_warmup_cosine_lr(optimizer, s, 12, 4), 4) for s in (0, 3, 4, 8, 12)] == [0.25, 1.0, 1.0, 0.5,
                                                                                              0.0]
