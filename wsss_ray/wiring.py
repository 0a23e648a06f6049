"""One wiring: each stage's folder and inputs, built from the config and the stages finished before it.

The pipeline (``pipeline.py``), the sweeps (``tuning/sweep.py``) and the benchmarks that read a run's stages
(``bench/sweep_asha.py``) ask one :class:`StageWiring` for a stage's folder and inputs instead of each assembling
them: which manifest rows a stage reads, which trained weights, which pseudo-label folder, which class names.
(Benchmarks that run one stage on inputs of their own, outside any run, call the stage's function directly.) It holds the config, the stage folders
(keyed by their config, everything upstream and the weights they consume), the class names, the manifest (read
once) and the finished stages' results (their ``_SUCCESS.json`` summaries, handed out as the typed records of
``core/results.py``).

A stage's inputs are a frozen record of data (:class:`ClassifierInputs`, :class:`PseudoLabelInputs`,
:class:`SegmentationInputs`, :class:`EvaluationInputs`); it runs them with a config, the pipeline's or a sweep
trial's, so a trial reuses the shared inputs with its own settings. Building inputs needs no Ray: only storage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wsss_ray.core.config_base import DatasetConfig, key_dump
from wsss_ray.core.records import ManifestRecord, TrainingRecord
from wsss_ray.core.results import (
    EvaluationResult,
    FinishedStages,
    IngestResult,
    PseudoLabelResult,
    ReportedRun,
    TrainingResult,
)
from wsss_ray.core.stage_dir import StageDir
from wsss_ray.data.classes import class_names as dataset_class_names
from wsss_ray.pipeline_config import PipelineConfig, config_hash

STAGES = ("ingest", "train_cls", "pseudo_labels", "train_seg", "evaluate")
# Stages whose trained weights key the stages after them: the folders are re-keyed once one finishes.
TRAINING_STAGES = ("train_cls", "train_seg")


# ------------------------------------------------------------------------------------------------- stage folders


def _without_workers(section: Any) -> dict[str, Any]:
    # The worker count and the speed options change speed, not results: a run resumed on another cluster size
    # (or with torch.compile on) keeps its outputs.
    return key_dump(section, exclude={"workers", "speed"})


def _model_sha(stage: StageDir, summary: Mapping[str, Any] | None) -> str | None:
    """The trained weights' hash: from ``summary`` when the caller holds it, else from the finished folder."""
    if summary is not None:
        return summary.get("model_sha256")
    return stage.summary().get("model_sha256") if stage.is_complete() else None


def ingest_key(dataset: DatasetConfig) -> str:
    """The ingest stage's key: the dataset section without the toy generator's settings (they made the data, the
    data is what counts). ``val_ground_truth`` counts where it changes the manifest: on VOC with ``official``;
    ``aug`` reproduces the manifests made before the field existed, so it keeps their keys."""
    exclude = {"generate"}
    if dataset.format == "coco" or dataset.val_ground_truth == "aug":
        exclude.add("val_ground_truth")
    return config_hash(key_dump(dataset, exclude=exclude))


def stage_dirs(config: PipelineConfig,
               summaries: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, StageDir]:
    """Stage directories keyed by their config, everything upstream, and the checkpoints they consume.

    A stage after a training stage is keyed by the trained weights' hash once that training is complete, so
    retrained weights never meet outputs made with other ones. Call again after a training stage finishes.
    ``summaries``: the finished stages' summaries where the caller holds them (not read again from storage).
    """
    held = summaries or {}
    out = config.output
    dirs = {"ingest": StageDir.create(out, "ingest", ingest_key(config.dataset))}
    dirs["train_cls"] = StageDir.create(out, "train_cls", config_hash(
        dirs["ingest"].key, _without_workers(config.train_cls), config.dataset.supervision))
    dirs["pseudo_labels"] = StageDir.create(out, "pseudo_labels", config_hash(
        dirs["train_cls"].key, config.pseudo_labels.generator, _model_sha(dirs["train_cls"], held.get("train_cls"))))
    dirs["train_seg"] = StageDir.create(out, "train_seg", config_hash(
        dirs["pseudo_labels"].key, _without_workers(config.train_seg)))
    # use_gpu changes speed, not results (like the training stages' workers)
    dirs["evaluate"] = StageDir.create(out, "evaluate", config_hash(
        dirs["train_seg"].key, key_dump(config.evaluate, exclude={"use_gpu"}),
        _model_sha(dirs["train_seg"], held.get("train_seg"))))
    return dirs


# ------------------------------------------------------------------------------------------------- stage inputs


@dataclass(frozen=True)
class ClassifierInputs:
    """What ``train_cls`` is given: the usable training images of the manifest."""

    records: list[ManifestRecord]
    class_names: list[str]

    def train(self, stage: StageDir, config: PipelineConfig) -> dict[str, Any]:
        from wsss_ray.stages.train_cls import train_classifier

        return train_classifier(self.records, stage, config.train_cls, len(self.class_names),
                                config.dataset.supervision)


@dataclass(frozen=True)
class SegmentationInputs:
    """What ``train_seg`` is given: one row per training image with a pseudo-mask (and the generator's other
    maps), and the val images that measure val mIoU during training."""

    records: list[TrainingRecord]
    val_records: list[ManifestRecord]
    class_names: list[str]

    def train(self, stage: StageDir, config: PipelineConfig, callbacks: list[Any] | None = None,
              model_card: bool = True) -> dict[str, Any]:
        """Train ``config.train_seg`` into ``stage``; ``model_card`` writes ``model.json`` beside the weights."""
        from wsss_ray.stages.train_seg import train_segmentation

        return train_segmentation(self.records, stage, config.train_seg, len(self.class_names), self.val_records,
                                  callbacks=callbacks, class_names=self.class_names if model_card else None)


@dataclass(frozen=True)
class PseudoLabelInputs:
    """What ``pseudo_labels`` is given: the training images and the trained classifier."""

    records: list[ManifestRecord]
    classifier: TrainingResult
    class_names: list[str]

    def generate(self, stage: StageDir, config: PipelineConfig) -> dict[str, Any]:
        """Label ``records`` into ``stage`` with ``config``'s generator (and its classifier section)."""
        from wsss_ray.stages.pseudo_labels import generate_pseudo_labels

        return generate_pseudo_labels(
            self.records, stage, model_uri=self.classifier.model_uri, cls_config=config.train_cls,
            config=config.pseudo_labels, num_classes=len(self.class_names), supervision=config.dataset.supervision,
            class_names=self.class_names)

    def segmentation_inputs(self, pseudo: StageDir, config: PipelineConfig,
                            val_records: list[ManifestRecord]) -> SegmentationInputs:
        """``train_seg``'s inputs once these images are labelled into ``pseudo`` (with ``config``'s generator)."""
        from wsss_ray.stages.pseudo_labels import segmentation_records

        return SegmentationInputs(segmentation_records(self.records, pseudo, config), val_records, self.class_names)


@dataclass(frozen=True)
class EvaluationInputs:
    """What ``evaluate`` is given: the val images, the training images shown in the report (with ground truth and
    a pseudo-mask), the trained segmenter and the results of the stages before."""

    val_records: list[ManifestRecord]
    samples: list[ManifestRecord]
    segmenter: TrainingResult
    finished: FinishedStages
    class_names: list[str]

    def evaluate(self, stage: StageDir, config: PipelineConfig) -> EvaluationResult:
        """Predict val (and the samples, for the report) with the segmenter; score val."""
        from wsss_ray.stages.evaluate import evaluate_segmentation

        summary = evaluate_segmentation(
            self.val_records + self.samples, stage, model_uri=self.segmenter.model_uri,
            model_config=config.train_seg.model, config=config.evaluate, num_classes=len(self.class_names),
            class_names=self.class_names, score_split=config.dataset.val_split, use_gpu=config.evaluate.use_gpu)
        return EvaluationResult.from_summary(summary)


# ------------------------------------------------------------------------------------------------- the wiring


class StageWiring:
    """The one place that says what each stage of a run is given (see the module's docstring).

    ``finish(stage, summary)`` records a finished stage (and re-keys the folders after a training stage);
    ``inputs(stage)`` builds a stage's inputs from the stages finished before it.
    """

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.class_names = dataset_class_names(config.dataset.format)
        self.dirs = stage_dirs(config)
        # The finished stages' summaries as their _SUCCESS.json holds them, in pipeline order.
        self.summaries: dict[str, dict[str, Any]] = {}
        self._manifest: list[ManifestRecord] | None = None
        self._segmentation: SegmentationInputs | None = None

    @classmethod
    def finished(cls, config: PipelineConfig, until: str) -> StageWiring:
        """The wiring of a run whose stages up to ``until`` are complete, read from their folders: what a sweep or
        a benchmark starts from. A stage that has not finished is an error naming its folder."""
        wiring = cls(config)
        for name in stages_until(until):
            stage = wiring.dirs[name]
            if not stage.is_complete():
                raise RuntimeError(f"stage {name} has not finished in {stage.uri}: run the pipeline with --until "
                                   f"{until} first")
            wiring.finish(name, stage.summary())
        return wiring

    def finish(self, stage: str, summary: Mapping[str, Any]) -> None:
        """Record ``stage``'s summary; after a training stage the later folders are keyed by its weights."""
        self.summaries[stage] = dict(summary)
        if stage in TRAINING_STAGES:
            self.dirs = stage_dirs(self.config, self.summaries)

    # ----------------------------------------------------------------------------------------- typed results

    def _summary(self, stage: str) -> Mapping[str, Any]:
        if stage not in self.summaries:
            raise RuntimeError(f"stage {stage} has not finished ({self.dirs[stage].uri}): the stages after it need "
                               "its results")
        return self.summaries[stage]

    def ingested(self) -> IngestResult:
        return IngestResult.from_summary(self._summary("ingest"))

    def trained(self, stage: str) -> TrainingResult:
        """The result of a training stage, ``train_cls`` or ``train_seg``."""
        if stage not in TRAINING_STAGES:
            raise ValueError(f"{stage!r} is not a training stage; expected one of {TRAINING_STAGES}")
        return TrainingResult.from_summary(self._summary(stage))

    def pseudo_labelled(self) -> PseudoLabelResult:
        return PseudoLabelResult.from_summary(self._summary("pseudo_labels"))

    def reported(self) -> ReportedRun:
        return ReportedRun.from_summary(self._summary("evaluate"))

    def finished_stages(self) -> FinishedStages:
        return FinishedStages(self.ingested(), self.trained("train_cls"), self.pseudo_labelled(),
                              self.trained("train_seg"))

    # ----------------------------------------------------------------------------------------- manifests

    def manifest(self, split: str | None = None) -> list[ManifestRecord]:
        """The ingest stage's manifest rows (of ``split``, or all), read once."""
        if self._manifest is None:
            from wsss_ray.stages.ingest import load_manifest

            self._summary("ingest")
            self._manifest = load_manifest(self.dirs["ingest"])
        return [r for r in self._manifest if split is None or r["split"] == split]

    def train_records(self) -> list[ManifestRecord]:
        """The usable training images; none is an error naming the dataset, the split and the failures table."""
        ds = self.config.dataset
        records = self.manifest(ds.train_split)
        if not records:
            raise RuntimeError(f"no usable training images in {ds.root} split {ds.train_split!r} "
                               f"(failures: {self.ingested().failures_uri})")
        return records

    def val_records(self) -> list[ManifestRecord]:
        return self.manifest(self.config.dataset.val_split)

    # ----------------------------------------------------------------------------------------- inputs

    def classifier_inputs(self) -> ClassifierInputs:
        return ClassifierInputs(self.train_records(), self.class_names)

    def pseudo_label_inputs(self, max_images: int | None = None) -> PseudoLabelInputs:
        """``pseudo_labels``' inputs; ``max_images`` keeps the first so many training images (a sweep's limit)."""
        records = self.train_records()
        return PseudoLabelInputs(records[:max_images] if max_images else records, self.trained("train_cls"),
                                 self.class_names)

    def segmentation_inputs(self) -> SegmentationInputs:
        """``train_seg``'s inputs from the pipeline's pseudo-label folder (built once: it lists the masks)."""
        if self._segmentation is None:
            self.pseudo_labelled()
            self._segmentation = self.pseudo_label_inputs().segmentation_inputs(
                self.dirs["pseudo_labels"], self.config, self.val_records())
        return self._segmentation

    def evaluation_inputs(self) -> EvaluationInputs:
        """``evaluate``'s inputs; the report's samples are the first ``evaluate.num_samples`` training images that
        have ground truth and a pseudo-mask."""
        have_mask = {r["image_id"] for r in self.segmentation_inputs().records}
        samples = [r for r in self.train_records() if r["mask_uri"] and r["image_id"] in have_mask]
        return EvaluationInputs(self.val_records(), samples[: self.config.evaluate.num_samples],
                                self.trained("train_seg"), self.finished_stages(), self.class_names)

    def inputs(self, stage: str) -> ClassifierInputs | PseudoLabelInputs | SegmentationInputs | EvaluationInputs:
        """The inputs of ``stage`` (any stage after ``ingest``, whose input is the config's dataset section)."""
        builders = {"train_cls": self.classifier_inputs, "pseudo_labels": self.pseudo_label_inputs,
                    "train_seg": self.segmentation_inputs, "evaluate": self.evaluation_inputs}
        if stage not in builders:
            raise ValueError(f"no inputs for stage {stage!r}; expected one of {tuple(builders)}")
        return builders[stage]()


def stages_until(until: str) -> tuple[str, ...]:
    """The stages from the first up to ``until``, in order; an unknown name is an error listing the stages."""
    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; expected one of {STAGES}")
    return STAGES[: STAGES.index(until) + 1]
