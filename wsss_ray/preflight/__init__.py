"""Pre-flight: everything a config points at is checked before Ray starts or any work is done.

``wsss-ray config check`` and the start of ``run``, every stage command, ``sweep`` and ``predict`` run it. Each
check is a function ``(config, options) -> problems``; :func:`preflight` runs every one of
:data:`CONFIG_CHECKS` and returns all their problems together, so a config with three mistakes is reported once,
not over three runs. A problem names the config field, the path or URI, what is wrong and what to do, in one or
two lines (:meth:`Problem.lines`).

A new check is a function with that signature added to :data:`CONFIG_CHECKS` (``check_gpus`` was added so); checks that need the network return nothing for what they skip under
``options.offline`` and list it in ``options.skipped``.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from wsss_ray.pipeline_config import PipelineConfig
from wsss_ray.preflight.dataset import check_dataset
from wsss_ray.preflight.gpus import check_gpus
from wsss_ray.preflight.output import check_output
from wsss_ray.preflight.problem import PreflightOptions, Problem
from wsss_ray.preflight.weights import check_backbone_weights

__all__ = ["CONFIG_CHECKS", "Check", "PreflightOptions", "PreflightReport", "Problem", "format_report",
           "preflight"]

Check = Callable[[PipelineConfig, PreflightOptions], list[Problem]]

# Every check a pipeline config goes through, in the order their problems are listed.
CONFIG_CHECKS: list[Check] = [check_dataset, check_backbone_weights, check_output, check_gpus]


@dataclass
class PreflightReport:
    problems: list[Problem] = field(default_factory=list)
    # What --offline left unchecked ("output s3://b/x"), for one note line.
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def run_checks(checks: list[Check], config: PipelineConfig, options: PreflightOptions) -> PreflightReport:
    """Every check's problems; a check that fails on a bug of its own is one problem, not the end of the others."""
    report = PreflightReport(skipped=options.skipped)
    for check in checks:
        try:
            report.problems += check(config, options)
        except Exception as error:  # noqa: BLE001 - the other checks still run; the problem names this one
            where = traceback.extract_tb(error.__traceback__)[-1]
            report.problems.append(Problem(
                "<pre-flight>", check.__name__, f"the check itself failed: {type(error).__name__}: {error} "
                f"({where.filename.rsplit('/', 1)[-1]}:{where.lineno})", "a bug in the pre-flight step: please report it"))
    return report


def preflight(config: PipelineConfig, *, offline: bool = False,
              checks: list[Check] | None = None) -> PreflightReport:
    """Run :data:`CONFIG_CHECKS` (or ``checks``) on ``config``; ``offline`` skips what needs the network (S3)."""
    return run_checks(CONFIG_CHECKS if checks is None else checks, config, PreflightOptions(offline=offline))


def format_report(report: PreflightReport, source: str) -> str:
    """What the console shows: a header line, then each problem's lines prefixed by the config's file."""
    lines = []
    if report.problems:
        count = len(report.problems)
        lines.append(f"pre-flight: {count} problem{'s' * (count > 1)} with {source}; nothing was started:")
        for problem in report.problems:
            lines += problem.lines(source)
    if report.skipped:
        lines.append("pre-flight: --offline, not checked: " + "; ".join(report.skipped))
    return "\n".join(lines)
