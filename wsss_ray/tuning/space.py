"""Search spaces: one YAML per sweep, validated into a typed :class:`SearchSpace`.

A space names the pipeline config it varies (``base_config``), what one trial runs (``trial``), the metric Tune
optimises, the scheduler, and ``params``: dotted config paths, each with one distribution. Every path is checked
against :class:`~wsss_ray.pipeline_config.PipelineConfig` by applying sample values to the base config, so a typo or an
out-of-range value fails before any trial starts, with an error that names the space file and the field, e.g.
``tuning/lr.yaml: params.train_seg.optimiser.lr: unknown field``. A path must also lie in a config section the
trial runs (``TRIAL_SECTIONS``): a ``train_seg`` trial trains on the shared pseudo-masks, so a
``pseudo_labels.*`` value would silently change nothing there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from wsss_ray.core.config_base import ConfigError, PositiveInt, StrictModel, format_errors
from wsss_ray.pipeline_config import PipelineConfig, load_config, parse_config

REPO_ROOT = Path(__file__).resolve().parents[2]

# What one trial runs: train the segmenter on the pipeline's shared pseudo-masks (train_seg), relabel the training
# images (pseudo_labels), or relabel them and train on the trial's own masks (relabel_train_seg: for values the
# pseudo-label stage turns into training inputs, e.g. CDSP's distance maps).
TrialKind = Literal["train_seg", "pseudo_labels", "relabel_train_seg"]
# What each trial kind reports (``metric`` must be one of them): train_seg and relabel_train_seg trials forward
# Ray Train's epoch metrics, pseudo_labels trials report the pseudo-mask scores against the training ground truth
# once.
TRIAL_METRICS: dict[str, tuple[str, ...]] = {
    "train_seg": ("val_miou", "loss"),
    "pseudo_labels": ("pseudo_miou", "pseudo_precision", "pseudo_coverage", "cam_miou"),
    "relabel_train_seg": ("val_miou", "loss"),
}
# The config sections a trial's values can change. Everything else is made once from the base config and shared
# by all trials (the ingested data, the classifier, and for train_seg trials the pseudo-masks), so a value
# elsewhere would be validated, logged, and then have no effect.
TRIAL_SECTIONS: dict[str, tuple[str, ...]] = {
    "train_seg": ("train_seg",),
    "pseudo_labels": ("pseudo_labels",),
    "relabel_train_seg": ("pseudo_labels", "train_seg"),
}
# Trial kinds that train the segmenter (report per epoch, so ASHA can stop them at its rungs).
EPOCH_TRIALS = ("train_seg", "relabel_train_seg")
# Trial kinds that relabel the training images (``max_images`` applies to them).
RELABEL_TRIALS = ("pseudo_labels", "relabel_train_seg")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")


class ParamSpec(StrictModel):
    """One hyperparameter: exactly one of the distribution keys."""

    grid: Annotated[list[Any], Field(min_length=1)] | None = None
    choice: Annotated[list[Any], Field(min_length=1)] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    # Upper bound exclusive, as ``tune.randint``.
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_distribution(self) -> ParamSpec:
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)} (got {', '.join(given) or 'none'})")
        for name in ("uniform", "loguniform", "randint"):
            bounds = getattr(self, name)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{name}: lower bound {bounds[0]} must be below upper bound {bounds[1]}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: bounds must be positive, got {self.loguniform[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in DISTRIBUTIONS if getattr(self, name) is not None)

    def samples(self) -> list[Any]:
        """Values that stand for the whole distribution when validating its path (every listed value, bounds)."""
        if self.grid is not None:
            return list(self.grid)
        if self.choice is not None:
            return list(self.choice)
        if self.randint is not None:
            return [self.randint[0], self.randint[1] - 1]
        bounds = self.uniform if self.uniform is not None else self.loguniform
        assert bounds is not None
        return list(bounds)

    def to_tune(self) -> Any:
        """The matching ``ray.tune`` search-space object."""
        from ray import tune

        if self.grid is not None:
            return tune.grid_search(list(self.grid))
        if self.choice is not None:
            return tune.choice(list(self.choice))
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        assert self.randint is not None
        return tune.randint(*self.randint)


class SearchSpace(StrictModel):
    """A sweep: the base config, what a trial runs, the metric and scheduler, and the hyperparameters."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    # Pipeline YAML the trials vary; relative paths are taken from the repository root.
    base_config: str
    # ``key.path=value`` applied to the base config before the trial's own values (e.g. fewer epochs).
    overrides: list[str] = Field(default_factory=list)
    trial: TrialKind
    metric: str
    mode: Literal["max", "min"] = "max"
    # ``pseudo_labels`` trials report once, so they always run FIFO.
    scheduler: Literal["asha", "fifo"] = "asha"
    # ASHA (Li et al. 2020): rungs at grace_period · reduction_factor^k epochs (below train_seg.epochs); at each,
    # a trial goes on only if its metric reaches the (1 − 1/reduction_factor) quantile of the trials that reached
    # it before (Ray's defaults: 1 and 4).
    grace_period: PositiveInt = 1
    reduction_factor: Annotated[float, Field(gt=1.0)] = 4.0
    # Repeats of the grid (or samples of the random distributions).
    num_samples: PositiveInt = 1
    # Upper bound on trials at once; None = as many as the cluster's CPUs/GPUs hold.
    max_concurrent_trials: PositiveInt | None = None
    # pseudo_labels trials: label only the first N training images (a quicker, noisier estimate);
    # relabel_train_seg trials: label, and then train on, only those.
    max_images: PositiveInt | None = None
    params: Annotated[dict[str, ParamSpec], Field(min_length=1)]

    @model_validator(mode="after")
    def _metric_matches_trial(self) -> SearchSpace:
        allowed = TRIAL_METRICS[self.trial]
        if self.metric not in allowed:
            raise ValueError(f"metric {self.metric!r} is not reported by {self.trial} trials "
                             f"(one of: {', '.join(allowed)})")
        if self.max_images is not None and self.trial not in RELABEL_TRIALS:
            raise ValueError(f"max_images applies to {' and '.join(RELABEL_TRIALS)} trials only")
        return self

    def base_path(self) -> Path:
        """The base config file: absolute, or relative to the repository root (else the working directory)."""
        path = Path(self.base_config)
        if path.is_absolute() or not (REPO_ROOT / path).exists():
            return path
        return REPO_ROOT / path

    def tune_space(self) -> dict[str, Any]:
        """``param_space`` for the Tuner: flat, keyed by the dotted config path."""
        return {path: spec.to_tune() for path, spec in self.params.items()}


def param_overrides(params: dict[str, Any]) -> list[str]:
    """``key.path=value`` overrides for concrete trial values (JSON is valid YAML, so lists and floats survive)."""
    return [f"{path}={json.dumps(value)}" for path, value in params.items()]


def load_space(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> tuple[SearchSpace, PipelineConfig]:
    """Read and validate a space YAML; returns it and the base config (its overrides and ``overrides`` applied).

    ``overrides`` (the CLI's ``--set``) apply to the base pipeline config, after the space's own overrides.
    """
    source = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"{source}: cannot read search space: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: invalid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        space = SearchSpace.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_errors(source, error)) from None

    base_overrides = [*space.overrides, *overrides]
    try:
        base = load_config(space.base_path(), base_overrides)
    except ConfigError as error:
        raise ConfigError(f"{source}: base_config {space.base_config}:\n{error}") from None
    validate_params(space, base, source)
    if space.trial in EPOCH_TRIALS and space.metric == "val_miou" and base.train_seg.val_every < 1:
        raise ConfigError(f"{source}: metric: val_miou needs train_seg.val_every >= 1 in the base config "
                          f"(it is {base.train_seg.val_every})")
    return space, base


def validate_params(space: SearchSpace, base: PipelineConfig, source: str) -> None:
    """Apply each param's sample values to the base config; a failure names the space file and the param.

    A path outside the sections the trial runs (``TRIAL_SECTIONS``) is refused first: it would have no effect.
    """
    data = base.model_dump(mode="json")
    sections = TRIAL_SECTIONS[space.trial]
    for path, spec in space.params.items():
        if path.split(".", 1)[0] not in sections:
            hint = " (use trial: relabel_train_seg to relabel and train)" if space.trial == "train_seg" and \
                path.startswith("pseudo_labels.") else ""
            raise ConfigError(f"{source}: params.{path}: {space.trial} trials only run "
                              f"{' and '.join(sections)}, so this value would change nothing{hint}")
        for value in spec.samples():
            try:
                parse_config(data, source=source, overrides=param_overrides({path: value}))
            except ConfigError as error:
                raise ConfigError("\n".join(f"{source}: params.{path}.{spec.kind}: {_reason(line, source, path)}"
                                            for line in str(error).splitlines())) from None


def _reason(line: str, source: str, path: str) -> str:
    """A config error line re-pointed at the space's param entry (the field is dropped when it is the param)."""
    rest = line.removeprefix(f"{source}: ")
    field, _, message = rest.partition(": ")
    return message if field == path and message else rest


def trial_config(base: dict[str, Any], params: dict[str, Any], source: str = "<trial>") -> PipelineConfig:
    """The pipeline config of one trial: the (JSON-dumped) base config with the trial's values applied."""
    return parse_config(base, source=source, overrides=param_overrides(params))
