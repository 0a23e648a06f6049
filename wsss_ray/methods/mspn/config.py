"""Config of MSPN (Sang et al., JEIT 2025): the multi-seed generator and the positive-negative hybrid loss."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator

from wsss_ray.core.config_base import Fraction, PositiveFloat, PositiveInt, StrictModel
from wsss_ray.methods.base import CamThresholdSettings, GeneratorSettings

# MSPN's six (dropout rate, input scale) seeds, chosen in the paper from a larger grid.
_MSPN_SEEDS: list[tuple[float, float]] = [(0.05, 1.0), (0.05, 1.2), (0.10, 1.0), (0.10, 1.2), (0.20, 1.0), (0.30, 1.2)]


class MultiSeedGeneratorConfig(GeneratorSettings, CamThresholdSettings):
    """MSPN multi-seed pseudo-masks: one classifier, CAMs under several (feature dropout, input scale) seeds, each
    refined by DenseCRF; pixels where at least ``agreement`` seeds vote for the same label are clean. Each seed's
    CAM is averaged with its mirror image (``flip``); a per-seed CRF posterior below ``confidence`` is an
    abstaining vote."""

    name: Literal["multi_seed"] = "multi_seed"
    # (dropout rate on the backbone features, input scale) per seed; default: the paper's six seeds.
    seeds: Annotated[list[tuple[Fraction, PositiveFloat]], Field(min_length=1)] = _MSPN_SEEDS
    # t: a label is clean when at least t seeds agree (paper: t in 3..6, best near 6; we default to 4, the middle
    # of the range, so a one-seed disagreement still counts as clean).
    agreement: PositiveInt = 4

    @field_validator("agreement")
    @classmethod
    def _agreement_within_seeds(cls, value: int, info: ValidationInfo) -> int:
        seeds = info.data.get("seeds")
        if seeds is not None and value > len(seeds):
            raise ValueError(f"agreement ({value}) must not exceed the number of seeds ({len(seeds)})")
        return value


class MspnLossConfig(StrictModel):
    """MSPN positive–negative hybrid learning over the ``multi_seed`` generator's vote (our reading of an
    illegible paper, see ``methods/mspn/losses.py``): CE on clean pixels (agreement ≥ t), negative learning on
    the seeds' minority labels at noisy pixels, indirect negative learning on labels no seed proposed, and a
    confidence penalty on noisy pixels."""

    name: Literal["mspn"] = "mspn"
    # t: a pixel is clean when at least t seeds agree; read from the stored agreement map, so t can be swept
    # without regenerating the seeds. Must not exceed the generator's number of seeds.
    agreement: PositiveInt = 4
    negative_weight: Annotated[float, Field(ge=0.0)] = 1.0
    indirect_weight: Annotated[float, Field(ge=0.0)] = 1.0
    constraint_weight: Annotated[float, Field(ge=0.0)] = 0.1
    # Which labels of a noisy pixel are "determined as incorrect" (L_neg). The paper's rule is illegible; our
    # reading: minority = proposed by some seed but not the majority. proposed_below_t = every proposed label
    # (the literal "proposed by fewer than t seeds"; degenerate: the majority is pushed down too);
    # excluded_tags = classes outside the image's label set (our first reading; p ≈ 0 there, nearly no signal).
    negative_labels: Literal["minority", "proposed_below_t", "excluded_tags"] = "minority"
    # L_ind's complementary labels: the image's labels no seed proposed (default), or every unproposed class.
    indirect_labels: Literal["present_unproposed", "all_unproposed"] = "present_unproposed"
    # Each term averaged over its own set (own_set, as NLNL / JNPL average theirs), or every term's sum over the
    # labelled pixels (labelled_pixels: a pixel weighs the same in whichever set). The paper is illegible here.
    term_mean: Literal["own_set", "labelled_pixels"] = "own_set"

    # Added after stage keys were published, at the value that reproduces earlier models: left out of the key.
    KEY_NEUTRAL: ClassVar[dict[str, Any]] = {"term_mean": "own_set"}
