"""The sweep report: a trial table, the best config as ``--set`` overrides, and PNG plots.

Plots: the metric against each hyperparameter (one point per trial, the best marked; log axis for values that
span decades) and the metric per epoch of every trial (where ASHA stopped trials is visible). Written through
:mod:`wsss_ray.core.storage` like the pipeline report, self-contained HTML with relative image links.
"""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from wsss_ray.core import storage
from wsss_ray.report.figures import figure_png
from wsss_ray.report.html import CSS, escape, format_value
from wsss_ray.tuning.space import EPOCH_TRIALS, SearchSpace


def _slug(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_metric_vs_param(results: dict[str, Any], param: str, log_x: bool) -> bytes:
    """Metric of each trial against one hyperparameter; categorical axis when values are not numbers."""
    metric = results["metric"]
    trials = [t for t in results["trials"] if t["metric"] is not None and param in t["params"]]
    best_id = (results.get("best") or {}).get("id")
    fig = Figure(figsize=(5.0, 3.6), layout="constrained")
    ax = fig.add_subplot()
    values = [t["params"][param] for t in trials]
    numeric = all(_is_number(v) for v in values)
    if numeric:
        x = np.asarray(values, dtype=np.float64)
    else:
        labels = sorted({str(v) for v in values})
        x = np.asarray([labels.index(str(v)) for v in values], dtype=np.float64)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    y = np.asarray([t["metric"] for t in trials], dtype=np.float64)
    # Colour by epochs run: trials ASHA stopped early stand out from those that ran to the end.
    epochs = np.asarray([t["epochs"] for t in trials], dtype=np.float64)
    points = ax.scatter(x, y, c=epochs, cmap="viridis", s=36, zorder=3)
    if len(trials) and len(set(epochs.tolist())) > 1:
        fig.colorbar(points, ax=ax, label="epochs run")
    for t, xi, yi in zip(trials, x, y):
        if t["id"] == best_id:
            ax.scatter([xi], [yi], s=160, facecolors="none", edgecolors="red", linewidths=1.5, zorder=4,
                       label="best")
            ax.legend(fontsize="small")
    if numeric and log_x and len(x) and (x > 0).all():
        ax.set_xscale("log")
    if not trials:
        ax.text(0.5, 0.5, "no scored trials", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(param)
    ax.set_ylabel(f"{metric} (best per trial)")
    ax.grid(True, alpha=0.3)
    return figure_png(fig)


def plot_trial_curves(results: dict[str, Any]) -> bytes:
    """The metric per epoch, one line per trial."""
    metric = results["metric"]
    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for trial in results["trials"]:
        rows = [r for r in trial["history"] if r.get(metric) is not None]
        if rows:
            ax.plot([r.get("epoch") for r in rows], [r[metric] for r in rows], marker="o", markersize=3,
                    label=trial["id"])
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if len(results["trials"]) <= 12:
        ax.legend(fontsize="x-small")
    return figure_png(fig)


def write_sweep_report(out_uri: str, results: dict[str, Any], space: SearchSpace) -> str:
    """Write ``out_uri/report.html`` and its PNGs; returns the HTML's URI."""
    params = list(space.params)
    parts = [*_summary_parts(results), *_plot_parts(out_uri, results, space), *_trial_parts(results, params)]
    parts.append("</body></html>")
    report_uri = storage.join(out_uri, "report.html")
    storage.write_text(report_uri, "\n".join(parts) + "\n")
    return report_uri


def _summary_parts(results: dict[str, Any]) -> list[str]:
    """The page's head, the summary table and the best config as ``overrides``."""
    metric = results["metric"]
    best = results.get("best")
    summary = {
        "trial": results["trial"], "metric": f"{metric} ({results['mode']})", "scheduler": results["scheduler"],
        "trials": len(results["trials"]),
        "stopped early": sum(bool(t["stopped_early"]) for t in results["trials"]),
        "errored": sum(t["status"] == "ERROR" for t in results["trials"]),
        "trial-epochs spent": results["trial_epochs"], "max epochs per trial": results["max_epochs"],
        f"best {metric}": None if best is None else best["metric"],
        "seconds": results.get("seconds"),
    }
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>sweep {escape(results['name'])}</title><style>{CSS}</style></head><body>",
        f"<h1>sweep: {escape(results['name'])}</h1>",
        (f'<p class="meta">generated {escape(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))} · '
         f"experiment <code>{escape(results['experiment_uri'])}</code> · "
         f"<code>tensorboard --logdir {escape(results['experiment_uri'])}</code></p>"),
        ("<h2>Summary</h2><table>"
         + "".join(f"<tr><th>{escape(k)}</th><td>{escape(format_value(v))}</td></tr>" for k, v in summary.items())
         + "</table>"),
        "<h2>Best config</h2>",
    ]
    if best is None:
        parts.append('<p class="none">no trial reported the metric</p>')
    else:
        lines = "\n".join(f"  - {o}" for o in best["overrides"])
        parts.append(f"<p>trial {escape(best['id'])}, {escape(metric)} {escape(format_value(best['metric']))}; as "
                     f"<code>overrides</code> of a pipeline config (or <code>--set</code> flags):</p>"
                     f"<pre>overrides:\n{escape(lines)}</pre>")
    return parts


def _plot_parts(out_uri: str, results: dict[str, Any], space: SearchSpace) -> list[str]:
    """Write the PNGs below ``out_uri``; the HTML that shows them."""
    metric = results["metric"]
    # Images are written before the HTML so that a report.html that exists never links a missing PNG.
    parts = ["<h2>Metric against each hyperparameter</h2>"]
    for param in space.params:
        name = f"metric_vs_{_slug(param)}.png"
        log_x = space.params[param].kind == "loguniform"
        storage.write_bytes(storage.join(out_uri, name), plot_metric_vs_param(results, param, log_x))
        parts.append(f'<figure><img src="{name}" alt="{escape(metric)} vs {escape(param)}"></figure>')
    if results["trial"] in EPOCH_TRIALS:
        storage.write_bytes(storage.join(out_uri, "trial_curves.png"), plot_trial_curves(results))
        parts.append(f'<h2>{escape(metric)} per epoch</h2><figure><img src="trial_curves.png" '
                     f'alt="{escape(metric)} per epoch"></figure>')
    return parts


def _trial_parts(results: dict[str, Any], params: list[str]) -> list[str]:
    """The trial table, best metric first (the best trial highlighted), and the errored trials' messages."""
    metric = results["metric"]
    best = results.get("best")
    head = "".join(f"<th>{escape(h)}</th>" for h in ["trial", "status", "epochs", metric, f"last {metric}", *params])
    rows = []
    for t in sorted(results["trials"], key=lambda t: (t["metric"] is None, -(t["metric"] or 0)
                                                      if results["mode"] == "max" else (t["metric"] or 0))):
        status = t["status"] + (" (stopped early)" if t["stopped_early"] else "")
        cells = [t["id"], status, t["epochs"], t["metric"], t["last_metric"], *[t["params"].get(p) for p in params]]
        style = ' style="background:#eef4fb"' if best and t["id"] == best["id"] else ""
        rows.append(f"<tr{style}>" + "".join(f"<td>{escape(format_value(c))}</td>" for c in cells) + "</tr>")
    parts = [(f"<h2>Trials</h2><div class=\"scroll\"><table><thead><tr>{head}</tr></thead>"
              f"<tbody>{''.join(rows)}</tbody></table></div>")]
    errors = [t for t in results["trials"] if t["error"]]
    if errors:
        parts.append("<h2>Errors</h2><ul>" + "".join(f"<li>{escape(t['id'])}: {escape(t['error'])}</li>"
                                                     for t in errors) + "</ul>")
    return parts
