"""Bytes -> RGB pixels: pure functions, no I/O.

Every image the worker captions comes from an untrusted store, so decoding is defensive:
the pixel count is checked from the header before any pixel is decoded (decompression
bombs), only common raster formats are opened (no Ghostscript-backed EPS and the like),
and every Pillow failure leaves this module as `TooManyPixels` or `UndecodableImage`,
which the task records as a `failed` row.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from captioning.errors import TooManyPixels, UndecodableImage

#: Formats a captioning pipeline meets in practice. Everything else is refused as
#: "not an image" before its plugin runs (EPS would start Ghostscript, for one).
#: JPEG covers MPO (multi-picture JPEG from phone cameras) too.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_USUAL_RANGES = {"I": (255.0, 65535.0), "F": (1.0, 255.0, 65535.0)}
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap w and h
_WHITE = (255, 255, 255, 255)
_MAX_DETAIL = 200  # characters of a Pillow message kept in our error


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image ready for the processor, with the size the original had.

    `width`/`height` are the upright size (after EXIF orientation) before any downscale,
    i.e. what a person viewing the file sees; they go into the results row.
    """

    image: Image.Image
    width: int
    height: int


def decode_image(data: bytes, *, max_pixels: int, target_size: int | None = None) -> DecodedImage:
    """Decode `data` into an upright RGB image.

    `target_size` is the model's input resolution: when given, JPEGs are decoded at the
    smallest DCT scale that stays at or above it and larger images are box-reduced so
    both sides stay >= `target_size`, which keeps the later resize cheap.

    Raises `TooManyPixels` when the header declares more than `max_pixels` pixels (or
    Pillow's own bomb guard fires) and `UndecodableImage` for anything else that fails.
    """
    if not data:
        raise UndecodableImage("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        width, height = img.size
        if width * height > max_pixels:
            raise TooManyPixels(
                f"image is {width}x{height} = {width * height / 1e6:.1f} MP, "
                f"over the {max_pixels / 1e6:.1f} MP limit"
            )
        if target_size is not None:
            # A no-op for everything but JPEG, where libjpeg then decodes at 1/2, 1/4 or 1/8.
            img.draft("RGB", (target_size, target_size))
        img.load()  # frame 0 of an animation; truncation and corruption surface here
        if img.getexif().get(ExifTags.Base.Orientation, 1) in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
        img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img)
        if target_size is not None:
            rgb = _reduce(rgb, target_size)
    except (TooManyPixels, UndecodableImage):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's guard (Image.MAX_IMAGE_PIXELS) fired before ours could: only possible
        # when max_pixels is set above Pillow's limit; still a bomb as far as we can tell.
        raise TooManyPixels(f"decompression bomb: {_detail(exc)}") from exc
    except UnidentifiedImageError as exc:
        raise UndecodableImage("not an image (unrecognised format)") from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error...
        raise UndecodableImage(f"truncated or corrupt image: {_detail(exc)}") from exc
    return DecodedImage(image=rgb, width=width, height=height)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited onto white, not dropped
    (dropping it shows whatever colour the transparent pixels happen to hold)."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        img = _to_8bit_gray(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise UndecodableImage(f"unsupported colour mode {img.mode}") from exc


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float grey -> mode L, scaled rather than clipped to white.

    16-bit data is divided by 257 (65535 -> 255). For 32-bit "I" and float "F" the range is
    not implied by the mode: the smallest usual range that holds the values (0..1 for
    floats, 0..255, 0..65535) is used, else the image is stretched from its min to its max.
    """
    if img.mode in _SIXTEEN_BIT_MODES:
        img, lo, hi = img.convert("I"), 0.0, 65535.0
    else:
        lo, hi = (float(v) for v in img.getextrema())
        top = next((t for t in _USUAL_RANGES[img.mode] if lo >= 0.0 and hi <= t), None)
        if top is not None:
            lo, hi = 0.0, top
    scale = 255.0 / (hi - lo) if hi > lo else 1.0
    return img.point(lambda v: v * scale - lo * scale).convert("L")


def _reduce(img: Image.Image, target_size: int) -> Image.Image:
    """Box-reduce by the largest integer factor that keeps both sides >= target_size."""
    factor = min(img.width // target_size, img.height // target_size)
    return img.reduce(factor) if factor >= 2 else img


def _detail(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."
