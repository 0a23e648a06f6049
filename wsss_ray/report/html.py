"""Static HTML run report: summary, per-class IoU tables and charts, training curves, sample overlays, failures.

Everything is written through :mod:`wsss_ray.core.storage`, so a report lands on S3 exactly as it does locally. The
HTML is self-contained (inline CSS, no JS) and links its PNGs relatively, so the folder can be copied or synced
anywhere and still opens in a browser.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from wsss_ray.core import storage
from wsss_ray.report.figures import (
    IGNORE_INDEX,
    as_rgb,
    colorize,
    encode_png,
    make_panel,
    overlay,
    plot_curves,
    plot_per_class_iou,
    scored_classes,
)

MAX_FAILURE_ROWS = 50
# Sample panels are downscaled to this height: full-resolution 4-column panels would make reports tens of MB.
MAX_SAMPLE_HEIGHT = 320
_DASH = "\u2013"

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.meta { color: #777; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; }
th { background: #f4f4f4; text-align: left; }
table.iou td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.iou th.col { writing-mode: vertical-rl; transform: rotate(180deg); white-space: nowrap;
                   text-align: left; vertical-align: bottom; }
table.iou td.miou, table.iou th.miou { background: #eef4fb; }
.scroll { overflow-x: auto; }
img { max-width: 100%; height: auto; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #444; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border: 1px solid #888; vertical-align: middle;
          margin: 0 0.2em 0 0.8em; }
.none { color: #777; font-style: italic; }
"""


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float | None) -> float | None:
    """Treat NaN like None: metrics report NaN for classes absent from the split."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def format_value(value: Any) -> str:
    """Summary cell text: floats to 4 significant digits, ints exact, mappings/lists formatted element-wise."""
    if value is None:
        return _DASH
    if isinstance(value, (bool, np.bool_, str)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value) or math.isinf(value):
            return str(value)
        text = f"{value:.4g}"
        # "%.4g" switches to exponent notation from 1e4 up; large seconds/counts read better as grouped integers.
        if "e" in text and 1e4 <= abs(value) < 1e15:
            text = f"{round(value):,}"
        return text
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {format_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def _pct(value: float | None) -> str:
    return _DASH if value is None else f"{value * 100:.1f}"


def mean_iou(row: Mapping[str, float | None]) -> float | None:
    """Mean over the classes that have an IoU (None/NaN skipped); None if there are none."""
    values = [v for v in (_num(x) for x in row.values()) if v is not None]
    return sum(values) / len(values) if values else None


def _iou_table_html(rows: Mapping[str, Mapping[str, float | None]]) -> str:
    """Rows x classes (+ mIoU) as percentages; the best value per column is bold when rows compete. Classes
    absent from the dataset (no IoU in any row) have no column."""
    classes = scored_classes(rows)
    columns = [*classes, "mIoU"]
    cells = {name: [_num(row.get(c)) for c in classes] + [mean_iou(row)] for name, row in rows.items()}
    best: list[float | None] = []
    for j in range(len(columns)):
        # Compare at display precision so visually tied values are all bold; one value alone isn't "best".
        shown = [round(vals[j] * 100, 1) for vals in cells.values() if vals[j] is not None]
        best.append(max(shown) if len(shown) >= 2 else None)

    head = "".join(
        f'<th class="{"miou" if c == "mIoU" else "col"}">{escape(c)}</th>' for c in columns
    )
    body = []
    for name, vals in cells.items():
        tds = []
        for j, v in enumerate(vals):
            text = _pct(v)
            if v is not None and best[j] is not None and round(v * 100, 1) == best[j]:
                text = f"<b>{text}</b>"
            cls = "num miou" if j == len(columns) - 1 else "num"
            tds.append(f'<td class="{cls}">{text}</td>')
        body.append(f"<tr><th>{escape(name)}</th>{''.join(tds)}</tr>")
    return (f'<div class="scroll"><table class="iou"><thead><tr><th>IoU (%)</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _summary_html(summary: Mapping[str, Any]) -> str:
    if not summary:
        return '<p class="none">none</p>'
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(format_value(v))}</td></tr>" for k, v in summary.items())
    return f'<table class="summary">{rows}</table>'


def _failures_html(failures: Sequence[Mapping[str, str]] | None) -> str:
    if not failures:
        return '<p class="none">none</p>'
    shown = failures[:MAX_FAILURE_ROWS]
    rows = "".join(
        f"<tr><td>{escape(f.get('image_id', ''))}</td><td>{escape(f.get('file', ''))}</td>"
        f"<td>{escape(f.get('reason', ''))}</td></tr>"
        for f in shown
    )
    count = (f"<p>{len(failures)} failed item(s)"
             + (f", first {len(shown)} shown" if len(shown) < len(failures) else "") + ".</p>")
    return (f"{count}<table><thead><tr><th>image id</th><th>file</th><th>reason</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def _downscale(image: np.ndarray, labels: Mapping[str, np.ndarray], max_height: int
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Shrink the image (bilinear) and every label to its size (nearest) when taller than ``max_height``."""
    h, w = image.shape[:2]
    if h > max_height:
        size = (max(1, round(w * max_height / h)), max_height)
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    size = (image.shape[1], image.shape[0])
    out = {}
    for name, lab in labels.items():
        lab = np.asarray(lab, dtype=np.uint8)
        if lab.shape != image.shape[:2]:
            lab = np.asarray(Image.fromarray(lab).resize(size, Image.Resampling.NEAREST))
        out[name] = lab
    return image, out


def sample_panel(image: np.ndarray | None, columns: Mapping[str, np.ndarray],
                 max_height: int = MAX_SAMPLE_HEIGHT) -> np.ndarray:
    """The report's panel for one sample: the image, then each label overlaid on it (colourised if no image)."""
    if image is None:
        return make_panel({name: colorize(lab) for name, lab in columns.items()})
    image, labels = _downscale(as_rgb(image), columns, max_height)
    return make_panel({"image": image, **{name: overlay(image, lab) for name, lab in labels.items()}})


def _legend_html(columns: Mapping[str, np.ndarray], class_names: Sequence[str] | None) -> str:
    """Colour swatches for the classes that occur in this sample's labels (background and ignore included)."""
    present: set[int] = set()
    for lab in columns.values():
        present.update(int(v) for v in np.unique(np.asarray(lab)))
    cmap = colorize(np.arange(256, dtype=np.uint8)[None, :])[0]
    items = []
    for cid in sorted(present):
        if cid == IGNORE_INDEX:
            name = "ignore"
        elif class_names is not None and cid < len(class_names):
            name = class_names[cid]
        else:
            name = f"class {cid}"
        r, g, b = (int(c) for c in cmap[cid])
        items.append(f'<span class="swatch" style="background: rgb({r},{g},{b})"></span>{escape(name)}')
    return "".join(items)


def write_report(out_uri: str, *, title: str, summary: Mapping[str, Any],
                 tables: Mapping[str, Mapping[str, Mapping[str, float | None]]],
                 samples: Sequence[Mapping[str, Any]],
                 curves: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
                 failures: Sequence[Mapping[str, str]] | None = None,
                 notes: Sequence[str] | None = None,
                 class_names: Sequence[str] | None = None) -> str:
    """Write ``out_uri/report.html`` plus its PNGs (overlays/, curves.png, per_class_iou*.png); return the HTML URI.

    ``class_names`` names the classes in the per-sample colour legends; IoU tables use their own keys.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta">generated {escape(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))}</p>',
        "<h2>Summary</h2>",
        _summary_html(summary),
    ]

    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>")

    # Images are written before the HTML so that a report.html that exists never links a missing PNG.
    for i, (name, rows) in enumerate(tables.items()):
        parts.append(f"<h2>{escape(name)}</h2>")
        if not rows:
            parts.append('<p class="none">no rows</p>')
            continue
        parts.append(_iou_table_html(rows))
        chart = "per_class_iou.png" if i == 0 else f"per_class_iou_{i}.png"
        storage.write_bytes(storage.join(out_uri, chart), plot_per_class_iou(rows, title=str(name)))
        parts.append(f'<figure><img src="{chart}" alt="per-class IoU: {escape(name)}"></figure>')

    if curves:
        storage.write_bytes(storage.join(out_uri, "curves.png"), plot_curves(curves, "training curves"))
        parts.append('<h2>Training curves</h2><figure><img src="curves.png" alt="training curves"></figure>')

    parts.append("<h2>Samples</h2>")
    if not samples:
        parts.append('<p class="none">none</p>')
    for i, sample in enumerate(samples):
        columns = sample.get("columns", {})
        panel = sample_panel(sample.get("image"), columns)
        rel = f"overlays/sample_{i:02d}.png"
        storage.write_bytes(storage.join(out_uri, "overlays", f"sample_{i:02d}.png"), encode_png(panel))
        image_id = escape(sample.get("image_id", f"sample {i}"))
        parts.append(f'<figure><img src="{rel}" alt="{image_id}" width="{panel.shape[1]}" '
                     f'height="{panel.shape[0]}"><figcaption><b>{image_id}</b> '
                     f"{_legend_html(columns, class_names)}</figcaption></figure>")

    parts.append("<h2>Failures</h2>")
    parts.append(_failures_html(failures))
    parts.append("</body></html>")

    report_uri = storage.join(out_uri, "report.html")
    storage.write_text(report_uri, "\n".join(parts) + "\n")
    return report_uri
