"""Every registry line's declarations hold together (read from the classes, without training anything): what a
component reads is produced by what it requires, names are unique, requirements are mutual where they pair."""

from __future__ import annotations

from typing import Any

import pytest

from wsss_ray.core.registry import REQUIREMENT_KEYS, Component, Registry
from wsss_ray.methods.base import ClassifierHead, ClassifierObjective, Generator, SegmentationObjective
from wsss_ray.methods.registry import (
    CLASSIFIER_HEADS,
    CLASSIFIER_OBJECTIVES,
    CORRECTORS,
    GENERATORS,
    SEGMENTATION_OBJECTIVES,
    map_padding,
)
from wsss_ray.training.hooks import TrainHook

REGISTRIES: list[tuple[Registry[Any], type]] = [
    (CLASSIFIER_HEADS, ClassifierHead), (CLASSIFIER_OBJECTIVES, ClassifierObjective), (GENERATORS, Generator),
    (SEGMENTATION_OBJECTIVES, SegmentationObjective), (CORRECTORS, TrainHook)]
# The maps every experiment's training rows carry without a generator declaring them: the pseudo-mask ``label``
# (the generator's ``pseudo``), and the dataset's ``scribble`` (with scribble supervision).
DATASET_MAPS = {"scribble": "scribbles"}


def _supervision(component: Component) -> str | None:
    """The supervision a component needs, directly or through the generator it requires."""
    if "supervision" in component.requires:
        return component.requires["supervision"]
    if "generator" in component.requires:
        return GENERATORS[component.requires["generator"]].requires.get("supervision")
    return None


@pytest.mark.parametrize(("registry", "base"), REGISTRIES, ids=[r.field for r, _ in REGISTRIES])
def test_every_component_keeps_its_kinds_contract(registry: Registry[Any], base: type) -> None:
    assert registry.base is base and registry.default in registry
    for component in registry.components():
        assert issubclass(component.build, base), component.name
        assert component.config.model_fields["name"].default == component.name
        assert set(component.requires) <= set(REQUIREMENT_KEYS), component.name
        assert component.config().name == component.name  # every setting has a default (the paper's)


# A family's files say what they hold (docs/methods.md "Adding a method"): each kind's implementations in the module
# named for the kind, every component config in config.py.
KIND_MODULES = {"train_cls.head": "head", "train_cls.loss": "objective", "pseudo_labels.generator": "generator",
                "train_seg.loss": "objective", "train_seg.corrector": "hook"}


@pytest.mark.parametrize(("registry", "base"), REGISTRIES, ids=[r.field for r, _ in REGISTRIES])
def test_a_family_names_its_modules_by_kind(registry: Registry[Any], base: type) -> None:
    for component in registry.components():
        family = component.build.__module__.split(".")
        assert family[:2] == ["wsss_ray", "methods"] and len(family) == 4, component.build.__module__
        assert family[3] == KIND_MODULES[registry.field], (component.name, component.build.__module__)
        assert component.config.__module__ == ".".join([*family[:3], "config"]), (component.name,
                                                                                   component.config.__module__)


@pytest.mark.parametrize("name", list(SEGMENTATION_OBJECTIVES))
def test_the_maps_an_objective_reads_are_produced_by_what_it_requires(name: str) -> None:
    component = SEGMENTATION_OBJECTIVES[name]
    objective = component.build
    generator = component.requires.get("generator")
    outputs = set(GENERATORS.implementation(generator).outputs) - {"pseudo"} if generator else set()
    for read in objective.maps:
        if read == "label":
            continue
        if read in DATASET_MAPS:
            assert _supervision(component) == DATASET_MAPS[read], f"{name} reads {read!r}"
        else:
            assert read in outputs, f"{name} reads {read!r}, which generator {generator!r} does not write"
    assert objective.model_classifier in ("conv", "cosine")
    assert set(objective.maps) <= set(map_padding())


def test_generator_outputs_are_unique_and_titles_name_outputs() -> None:
    owner: dict[str, str] = {}
    for component in GENERATORS.components():
        generator = component.build
        assert "pseudo" in generator.outputs and set(generator.titles) <= set(generator.outputs), component.name
        assert generator.labels == tuple(o for o in generator.outputs if o in generator.titles)
        for output in generator.outputs:
            if output == "pseudo":
                continue
            assert output not in owner and output not in ("label", *DATASET_MAPS), \
                f"{component.name} writes {output!r}, already {owner.get(output, 'a dataset map')}'s"
            owner[output] = component.name


def test_head_and_loss_requirements_pair_up() -> None:
    for heads, losses, key, other in ((CLASSIFIER_HEADS, CLASSIFIER_OBJECTIVES, "loss", "head"),
                                      (CLASSIFIER_OBJECTIVES, CLASSIFIER_HEADS, "head", "loss")):
        for component in heads.components():
            if key in component.requires:
                assert losses[component.requires[key]].requires.get(other) == component.name, component.name


def test_the_curriculum_default_inflection_is_outs() -> None:
    from wsss_ray.methods.out_correction.config import OutCorrectorConfig
    from wsss_ray.methods.robust.objective import OUT_INFLECTION_EPOCH

    assert OUT_INFLECTION_EPOCH == OutCorrectorConfig().inflection_epoch


def test_a_slip_in_a_registry_line_fails_when_it_is_built() -> None:
    from wsss_ray.methods.cam.config import GapHeadConfig
    from wsss_ray.methods.cam.head import GapHead
    from wsss_ray.methods.robust.objective import CrossEntropyObjective

    with pytest.raises(TypeError, match="not a subclass of ClassifierHead"):
        Registry("train_cls.head", "gap", [Component("gap", GapHeadConfig, CrossEntropyObjective)], ClassifierHead)
    with pytest.raises(ValueError, match=r"requires \['supervison'\]"):
        Registry("train_cls.head", "gap", [Component("gap", GapHeadConfig, GapHead, {"supervison": "boxes"})],
                 ClassifierHead)
    with pytest.raises(ValueError, match="has a config named 'gap'"):
        Registry("train_cls.head", "gapp", [Component("gapp", GapHeadConfig, GapHead)], ClassifierHead)


@pytest.mark.parametrize(("sections", "expected"), [
    # the box generator reads the box annotations: a tags experiment must not validate with it
    ({"pseudo_labels": {"generator": {"name": "box"}}},
     "pseudo_labels.generator 'box' reads the box annotations: needs dataset.supervision boxes"),
    ({"dataset": {"supervision": "scribbles"}, "pseudo_labels": {"generator": {"name": "box"}}},
     "needs dataset.supervision boxes"),
    # an objective's own check (MSPN's agreement counts the generator's seeds)
    ({"pseudo_labels": {"generator": {"name": "multi_seed", "seeds": [[0.1, 1.0], [0.2, 1.0]], "agreement": 2}},
      "train_seg": {"loss": {"name": "mspn", "agreement": 3}}}, "exceeds the generator's 2 seeds"),
])
def test_every_declared_requirement_is_checked(sections: dict[str, Any], expected: str) -> None:
    from wsss_ray.pipeline_config import ConfigError, parse_config

    data = {"output": "out", "dataset": {"root": "data", **sections.pop("dataset", {})}, **sections}
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        parse_config(data, source="cfg.yaml")


def test_a_generator_output_name_taken_twice_fails_at_import() -> None:
    from wsss_ray.methods.base import Generator
    from wsss_ray.methods.cam.config import ImageCamGeneratorConfig
    from wsss_ray.methods.mspn.config import MultiSeedGeneratorConfig
    from wsss_ray.methods.registry import check_generator_outputs

    class Writes(Generator[Any]):
        outputs = {"pseudo": 255, "majority": 255}  # noqa: RUF012 - a declaration

    class AlsoWrites(Generator[Any]):
        outputs = {"pseudo": 255, "majority": 0}  # noqa: RUF012 - a declaration

    class WritesLabel(Generator[Any]):
        outputs = {"pseudo": 255, "label": 255}  # noqa: RUF012 - a declaration

    field = "pseudo_labels.generator"
    with pytest.raises(ValueError, match="'multi_seed' writes 'majority', a name already taken by 'image_cam'"):
        check_generator_outputs(Registry(field, "image_cam", [Component("image_cam", ImageCamGeneratorConfig, Writes),
                                                             Component("multi_seed", MultiSeedGeneratorConfig,
                                                                       AlsoWrites)], Generator))
    with pytest.raises(ValueError, match="writes 'label', a name already taken by every experiment"):
        check_generator_outputs(Registry(field, "image_cam", [Component("image_cam", ImageCamGeneratorConfig,
                                                                        WritesLabel)], Generator))
