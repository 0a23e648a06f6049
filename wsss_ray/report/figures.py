"""Pictures for reports: label colouring, overlays, labelled panels and matplotlib charts, all as arrays/PNG bytes.

Nothing here touches storage or global matplotlib state: figures are built with ``matplotlib.figure.Figure`` and
rendered through ``FigureCanvasAgg`` directly, so importing this module never switches the user's backend.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from wsss_ray.data.classes import voc_palette
from wsss_ray.data.image_io import as_label_map

IGNORE_INDEX = 255

# Panel layout (pixels): padding around/between columns and the gap between a column's caption and its image.
_PAD = 8
_CAPTION_GAP = 4
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)


def label_colormap() -> np.ndarray:
    """The standard PASCAL VOC colour map as 256x3 uint8 (0 black, 1 (128, 0, 0), 255 (224, 224, 192)),
    so colours match the dataset's own PNGs."""
    return np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)


_CMAP = label_colormap()


def _as_label(label: np.ndarray) -> np.ndarray:
    """Validate a label map and return it as H×W uint8 (class ids and 255 only)."""
    return as_label_map(label)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Coerce an image to H×W×3 uint8 (grey, RGBA and float-in-[0, 1] inputs are accepted)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"image must be H×W×3, got shape {image.shape}")
    image = image[:, :, :3]
    if image.dtype != np.uint8:
        # Float images in [0, 1] are common straight out of a transform; anything else is clipped to bytes.
        scale = 255.0 if np.issubdtype(image.dtype, np.floating) and image.size and image.max() <= 1.0 else 1.0
        image = np.clip(np.rint(image.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def _resize_label(label: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize, because interpolating class ids would invent classes."""
    if label.shape == size_hw:
        return label
    resized = Image.fromarray(label).resize((size_hw[1], size_hw[0]), Image.Resampling.NEAREST)
    return np.asarray(resized)


def colorize(label: np.ndarray) -> np.ndarray:
    """Label map (H×W, 255 = ignore) -> H×W×3 uint8 in VOC colours."""
    return _CMAP[_as_label(label)]


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours over ``image`` (H×W×3 uint8).

    Background (0) is left untinted, since blending with its black colour would only darken the photo; ignore
    pixels get the ignore colour at half ``alpha`` so uncertain regions stay visible but read as secondary.
    A label of a different size is resized to the image with nearest neighbour.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = as_rgb(image)
    lab = _resize_label(_as_label(label), rgb.shape[:2])
    # float32 throughout: a 12-megapixel photo (wsss-ray predict --overlay) stays ~150 MB per array
    weight = np.where(lab == IGNORE_INDEX, alpha * 0.5, np.where(lab == 0, 0.0, alpha)).astype(np.float32)[:, :, None]
    out = rgb.astype(np.float32) * (np.float32(1.0) - weight) + _CMAP[lab].astype(np.float32) * weight
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont
               ) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return math.ceil(right - min(left, 0)), math.ceil(bottom - min(top, 0))


def make_panel(columns: Mapping[str, np.ndarray], title: str | None = None) -> np.ndarray:
    """One row of images, each captioned with its column name; returns H×W×3 uint8.

    Columns are scaled to the first column's height (keeping aspect ratio) so mixed resolutions line up;
    H×W inputs are treated as label maps and colourised. An optional ``title`` is drawn above the row.
    """
    if not columns:
        raise ValueError("make_panel needs at least one column")
    images = []
    for value in columns.values():
        arr = np.asarray(value)
        images.append(colorize(arr) if arr.ndim == 2 else as_rgb(arr))
    height = images[0].shape[0]
    if height == 0:
        raise ValueError("panel images must not be empty")
    scaled = []
    for img in images:
        if img.shape[0] != height:
            width = max(1, round(img.shape[1] * height / img.shape[0]))
            img = np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.BILINEAR))
        scaled.append(img)

    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    names = [str(name) for name in columns]
    name_sizes = [_text_size(probe, name, font) for name in names]
    caption_h = max(h for _, h in name_sizes)
    title_w, title_h = _text_size(probe, title or "", font)
    col_widths = [max(img.shape[1], tw) for img, (tw, _) in zip(scaled, name_sizes)]

    title_block = title_h + _PAD if title else 0
    total_w = max(sum(col_widths) + _PAD * (len(scaled) + 1), title_w + 2 * _PAD)
    total_h = _PAD + title_block + caption_h + _CAPTION_GAP + height + _PAD
    canvas = Image.new("RGB", (total_w, total_h), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((_PAD, _PAD), title, fill=_TEXT, font=font)
    x = _PAD
    top = _PAD + title_block
    for img, name, (tw, _), cw in zip(scaled, names, name_sizes, col_widths):
        # Centre both caption and image within the column so a wide caption doesn't shift the picture.
        draw.text((x + (cw - tw) // 2, top), name, fill=_TEXT, font=font)
        canvas.paste(Image.fromarray(img), (x + (cw - img.shape[1]) // 2, top + caption_h + _CAPTION_GAP))
        x += cw + _PAD
    return np.asarray(canvas)


def encode_png(rgb: np.ndarray) -> bytes:
    """Encode an H×W×3 (or H×W grey) uint8 array as PNG bytes."""
    arr = np.asarray(rgb)
    img = Image.fromarray(arr if arr.ndim == 2 and arr.dtype == np.uint8 else as_rgb(arr))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """Render a standalone Figure to PNG through its own Agg canvas (no pyplot, no global backend)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _finite_or_nan(values: Sequence[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def plot_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], title: str) -> bytes:
    """Training curves as PNG: one subplot per top-level key (e.g. stage), one line per metric, x = epoch from 1."""
    panels = {name: {k: v for k, v in series.items() if len(v)} for name, series in curves.items()}
    panels = {name: series for name, series in panels.items() if series}
    n = max(1, len(panels))
    fig = Figure(figsize=(4.5 * n, 3.6), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    if not panels:
        axes[0].text(0.5, 0.5, "no curves recorded", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    for ax, (name, series) in zip(axes, panels.items()):
        for metric, values in series.items():
            y = _finite_or_nan(values)
            x = np.arange(1, len(y) + 1)
            # Markers make short runs (a handful of epochs) readable; on long runs they'd just be clutter.
            ax.plot(x, y, marker="o" if len(y) <= 30 else None, markersize=3, label=str(metric))
        ax.set_title(str(name))
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return figure_png(fig)


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else None


def scored_classes(rows: Mapping[str, Mapping[str, float | None]]) -> list[str]:
    """The classes (in first-seen order) with an IoU in at least one row: a class with None/NaN everywhere is
    absent from the dataset (no ground-truth and no predicted pixel) and gets no column or bar."""
    classes: list[str] = []
    for row in rows.values():
        classes.extend(c for c in row if c not in classes)
    return [c for c in classes if any(not math.isnan(_finite_or_nan([row.get(c)])[0]) for row in rows.values())]


def plot_per_class_iou(per_class: Mapping[str, Mapping[str, float | None]], title: str | None = None) -> bytes:
    """Grouped bar chart of per-class IoU (in %): one bar series per row name, plus an mIoU group at the end.

    Missing/None/NaN IoUs (class absent from the split) draw no bar, so they are not mistaken for 0%; a class
    absent from every row is left out (:func:`scored_classes`).
    """
    classes = scored_classes(per_class)
    groups = [*classes, "mIoU"]
    n_series = max(1, len(per_class))
    # The legend goes below the axes, two entries a row: inside them, a row of long series names ("pseudo-masks
    # image_cam + CRF (train)") is wider than the axes, and the layout squeezed the bars into a third of the width.
    legend_rows = math.ceil(len(per_class) / 2)
    fig = Figure(figsize=(max(6.0, 0.32 * len(groups) * (1 + 0.35 * n_series)), 4.0 + 0.25 * legend_rows),
                 layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / n_series
    x = np.arange(len(groups))
    for i, (series, row) in enumerate(per_class.items()):
        values = [row.get(c) for c in classes]
        heights = _finite_or_nan([*values, _mean(values)]) * 100.0
        keep = ~np.isnan(heights)
        offset = (i - (n_series - 1) / 2) * width
        ax.bar(x[keep] + offset, heights[keep], width=width, label=str(series))
    ax.set_xticks(x, groups, rotation=45, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.grid(True, axis="y", alpha=0.3)
    if per_class:
        fig.legend(fontsize="small", ncols=min(n_series, 2), loc="outside lower center")
    if title:
        ax.set_title(title)
    return figure_png(fig)
