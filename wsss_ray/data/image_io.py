"""Decoding and encoding of images and label PNGs, with errors that name the offending file."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from wsss_ray.core import storage
from wsss_ray.core.items import BadItemError
from wsss_ray.data.classes import voc_palette

_PALETTE = voc_palette()


def _open(data: bytes, name: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        # Image.open only reads the header: load() decodes everything, so truncated files fail here.
        image.load()
    except UnidentifiedImageError as error:
        # Pillow's own message names the in-memory buffer ("<_io.BytesIO object at 0x…>"), not the file.
        raise BadItemError(name, "cannot decode image: not an image format Pillow reads") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadItemError(name, f"cannot decode image: {error}") from error
    return image


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode image bytes to an H×W×3 uint8 RGB array; ``name`` is used in errors."""
    image = _open(data, name)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()


def decode_photo(data: bytes, name: str) -> np.ndarray:
    """Decode any still image the way a viewer shows it, to H×W×3 uint8 RGB (for ``predict``).

    Unlike ``decode_image`` (ingest: the dataset's stored pixel grid) this applies the EXIF orientation, so a
    rotated phone JPEG is predicted upright at its displayed size; 16-bit grayscale is scaled to 8 bits (Pillow's
    plain ``convert`` would clip it to white); transparency is composited over white, as viewers show it.
    """
    if not data:
        raise BadItemError(name, "empty file")
    image = _open(data, name)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as error:  # a broken EXIF block is this file's fault: reported as such
        raise BadItemError(name, f"cannot apply the EXIF orientation: {error}") from error
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit samples (Pillow opens 16-bit grayscale PNGs as I;16 or I): keep the high byte.
        gray = (np.asarray(image, dtype=np.int64).clip(0, 65535) // 257).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        raise BadItemError(name, "floating-point images are not supported (mode 'F')")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()


def decode_label_png(data: bytes, name: str) -> np.ndarray:
    """Decode a label map to H×W uint8: palette PNGs give their indices, grayscale PNGs their values."""
    image = _open(data, name)
    if image.mode not in ("P", "L"):
        raise BadItemError(name, f"label image has mode {image.mode!r}, expected a palette ('P') or 'L' PNG")
    return np.asarray(image, dtype=np.uint8).copy()


def as_label_map(mask: np.ndarray) -> np.ndarray:
    """Check a label map is H×W with values in 0..255 and return it as uint8."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"label map must be 2-D (H×W), got shape {mask.shape}")
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError("label values must lie in 0..255")
        mask = mask.astype(np.uint8)
    return mask


def encode_label_png(mask: np.ndarray) -> bytes:
    """Encode an H×W label map as a VOC-palette PNG (fixed settings, so equal masks give equal bytes)."""
    mask = as_label_map(mask)
    image = Image.fromarray(np.ascontiguousarray(mask))
    image.putpalette(_PALETTE)  # turns the 'L' image into a 'P' image with the same indices
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """Encode an H×W×3 uint8 RGB array as JPEG."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H×W×3 uint8 image, got {image.shape} {image.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def _read(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError as error:
        raise BadItemError(uri, "file not found") from error


def read_image(uri: str) -> np.ndarray:
    """Read and decode the RGB image at ``uri``."""
    return decode_image(_read(uri), uri)


def read_label(uri: str) -> np.ndarray:
    """Read and decode the label PNG at ``uri``."""
    return decode_label_png(_read(uri), uri)
