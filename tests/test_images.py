"""decode_image on the awkward inputs a bucket of user uploads really holds, made in-test."""

from __future__ import annotations

import io
import random
import struct
import time
import zlib

import pytest
from PIL import ExifTags, Image

from captioning.errors import TooManyPixels, UndecodableImage
from workers.images import DecodedImage, decode_image

MP = 1_000_000
LIMIT = 64 * MP
RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims width x height (CRC fixed, pixel data left tiny)."""
    data = encode(Image.new("L", (1, 1)), "PNG")
    # 8-byte signature, 4-byte length, then b"IHDR" + 13 bytes of data + CRC.
    chunk = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def test_plain_jpeg() -> None:
    decoded = decode_image(encode(Image.new("RGB", (64, 48), RED), "JPEG"), max_pixels=LIMIT)
    assert isinstance(decoded, DecodedImage)
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == decoded.image.size == (64, 48)
    assert close_to(decoded.image.getpixel((32, 24)), RED)


def test_cmyk_jpeg_becomes_rgb() -> None:
    cyan = Image.new("CMYK", (32, 32), (255, 0, 0, 0))
    decoded = decode_image(encode(cyan, "JPEG"), max_pixels=LIMIT)
    assert decoded.image.mode == "RGB"
    assert close_to(decoded.image.getpixel((16, 16)), (0, 255, 255))


def test_16_bit_png_is_scaled_not_clipped_to_white() -> None:
    values = [60000 if x < 16 else 20000 for _ in range(32) for x in range(32)]
    gray16 = Image.frombytes("I;16", (32, 32), struct.pack("<1024H", *values))
    data = encode(gray16, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really stored as 16-bit
    image = decode_image(data, max_pixels=LIMIT).image
    assert image.mode == "RGB"
    assert image.getextrema() != ((255, 255),) * 3
    assert close_to(image.getpixel((24, 0)), (78, 78, 78), tolerance=1)  # 20000 / 257
    assert close_to(image.getpixel((0, 0)), (233, 233, 233), tolerance=1)  # 60000 / 257


@pytest.mark.parametrize(
    ("mode", "fmt", "value", "expected"),
    [
        ("1", "PNG", 1, 255),
        ("L", "PNG", 100, 100),
        ("I", "TIFF", 1000, 4),  # 32-bit integer holding 16-bit data: 1000 / 257
        ("F", "TIFF", 0.5, 127),  # float in 0..1
    ],
)
def test_grey_modes_become_rgb(mode: str, fmt: str, value: float, expected: int) -> None:
    image = decode_image(encode(Image.new(mode, (8, 8), value), fmt), max_pixels=LIMIT).image
    assert image.mode == "RGB"
    assert close_to(image.getpixel((4, 4)), (expected,) * 3, tolerance=1)


def test_palette_png_with_transparency_is_composited_onto_white() -> None:
    img = Image.new("P", (20, 10), 0)
    img.putpalette([0, 0, 0, *RED])  # index 0 black (made transparent), index 1 red
    img.paste(1, (10, 0, 20, 10))
    image = decode_image(encode(img, "PNG", transparency=0), max_pixels=LIMIT).image
    assert image.mode == "RGB"
    assert image.getpixel((2, 5)) == WHITE  # transparent black shows as white, not black
    assert image.getpixel((15, 5)) == RED


def test_rgba_is_composited_onto_white() -> None:
    img = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    img.paste((255, 0, 0, 128), (10, 0, 20, 10))
    image = decode_image(encode(img, "PNG"), max_pixels=LIMIT).image
    assert image.mode == "RGB"
    assert image.getpixel((2, 5)) == WHITE
    assert close_to(image.getpixel((15, 5)), (255, 127, 127), tolerance=2)


def test_grey_with_alpha_is_composited_onto_white() -> None:
    img = Image.new("LA", (8, 8), (0, 0))
    image = decode_image(encode(img, "PNG"), max_pixels=LIMIT).image
    assert image.getpixel((4, 4)) == WHITE


@pytest.mark.parametrize(
    ("fmt", "params"), [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})]
)
def test_animation_gives_its_first_frame(fmt: str, params: dict[str, object]) -> None:
    frames = [Image.new("RGB", (24, 16), colour) for colour in (RED, (0, 255, 0), BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    decoded = decode_image(data, max_pixels=LIMIT)
    assert (decoded.width, decoded.height) == (24, 16)
    assert close_to(decoded.image.getpixel((12, 8)), RED)


def test_lossy_webp() -> None:
    decoded = decode_image(encode(Image.new("RGB", (40, 30), BLUE), "WEBP"), max_pixels=LIMIT)
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == (40, 30)
    assert close_to(decoded.image.getpixel((20, 15)), BLUE)


def test_exif_orientation_is_applied_and_size_reported_upright() -> None:
    stored = Image.new("RGB", (80, 40), RED)
    stored.paste(BLUE, (40, 0, 80, 40))  # left half red, right half blue, as stored
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # "rotate 90 degrees clockwise to display"
    decoded = decode_image(encode(stored, "JPEG", exif=exif.tobytes()), max_pixels=LIMIT)
    assert (decoded.width, decoded.height) == (40, 80)
    assert decoded.image.size == (40, 80)
    assert close_to(decoded.image.getpixel((20, 5)), RED)  # the left edge is now the top
    assert close_to(decoded.image.getpixel((20, 75)), BLUE)


def test_exif_orientation_with_draft_reports_original_size() -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 8
    data = encode(Image.new("RGB", (2000, 1000), RED), "JPEG", exif=exif.tobytes())
    decoded = decode_image(data, max_pixels=LIMIT, target_size=224)
    assert (decoded.width, decoded.height) == (1000, 2000)
    assert decoded.image.width < decoded.image.height
    assert min(decoded.image.size) >= 224


def test_one_pixel() -> None:
    decoded = decode_image(encode(Image.new("RGB", (1, 1), BLUE), "PNG"), max_pixels=LIMIT)
    assert (decoded.width, decoded.height) == (1, 1)
    assert decoded.image.getpixel((0, 0)) == BLUE


def test_extreme_aspect_ratio_is_kept() -> None:
    data = encode(Image.new("RGB", (10000, 3), RED), "PNG")
    decoded = decode_image(data, max_pixels=LIMIT, target_size=224)
    assert (decoded.width, decoded.height) == (10000, 3)
    assert decoded.image.size == (10000, 3)  # no side may drop below 1 px or the target


def test_twelve_megapixel_jpeg_is_decoded_small() -> None:
    img = Image.effect_noise((4000, 3000), 64).convert("RGB")
    data = encode(img, "JPEG", quality=85)
    start = time.perf_counter()
    decoded = decode_image(data, max_pixels=LIMIT, target_size=224)
    elapsed = time.perf_counter() - start
    assert (decoded.width, decoded.height) == (4000, 3000)
    assert decoded.image.width * decoded.image.height <= 4000 * 3000 // 32
    assert min(decoded.image.size) >= 224  # never below the model's resolution
    assert elapsed < 1.0


def test_large_png_is_reduced_keeping_aspect() -> None:
    decoded = decode_image(
        encode(Image.new("RGB", (2000, 1000), RED), "PNG"), max_pixels=LIMIT, target_size=224
    )
    assert (decoded.width, decoded.height) == (2000, 1000)
    assert decoded.image.size == (500, 250)


def test_no_target_size_keeps_full_resolution() -> None:
    decoded = decode_image(encode(Image.new("RGB", (2000, 1000), RED), "JPEG"), max_pixels=LIMIT)
    assert decoded.image.size == (2000, 1000)


def test_over_our_pixel_limit_is_refused_from_the_header() -> None:
    start = time.perf_counter()
    with pytest.raises(TooManyPixels, match=r"9000x9000 = 81\.0 MP, over the 64\.0 MP limit"):
        decode_image(png_declaring(9000, 9000), max_pixels=LIMIT)
    assert time.perf_counter() - start < 0.5


def test_decompression_bomb_is_refused_without_decoding() -> None:
    data = png_declaring(30000, 30000)  # 900 MP declared in a ~70-byte file
    assert len(data) < 100
    start = time.perf_counter()
    with pytest.raises(TooManyPixels):
        decode_image(data, max_pixels=LIMIT)
    with pytest.raises(TooManyPixels):  # Pillow's own guard, mapped, when ours is laxer
        decode_image(data, max_pixels=10_000 * MP)
    assert time.perf_counter() - start < 0.5


def test_small_limit_applies_to_real_images() -> None:
    with pytest.raises(TooManyPixels, match="100x100"):
        decode_image(encode(Image.new("RGB", (100, 100)), "PNG"), max_pixels=9999)


def test_truncated_jpeg() -> None:
    data = encode(Image.effect_noise((256, 256), 64).convert("RGB"), "JPEG")
    with pytest.raises(UndecodableImage, match="truncated or corrupt image"):
        decode_image(data[: len(data) // 2], max_pixels=LIMIT)


def test_corrupt_png() -> None:
    data = bytearray(encode(Image.effect_noise((64, 64), 64), "PNG"))
    data[60:80] = bytes(20)  # inside the image data
    with pytest.raises(UndecodableImage, match="truncated or corrupt image"):
        decode_image(bytes(data), max_pixels=LIMIT)


def test_random_bytes() -> None:
    data = random.Random(0).randbytes(4096)
    with pytest.raises(UndecodableImage, match=r"not an image \(unrecognised format\)"):
        decode_image(data, max_pixels=LIMIT)


def test_text_is_not_an_image() -> None:
    with pytest.raises(UndecodableImage, match="not an image"):
        decode_image(b"<html><body>404 Not Found</body></html>", max_pixels=LIMIT)


def test_empty_bytes() -> None:
    with pytest.raises(UndecodableImage, match="empty"):
        decode_image(b"", max_pixels=LIMIT)


def test_formats_outside_the_allowlist_are_refused() -> None:
    """Pillow can read PPM, but an upload pipeline has no use for it (nor for EPS)."""
    with pytest.raises(UndecodableImage, match="not an image"):
        decode_image(encode(Image.new("RGB", (8, 8)), "PPM"), max_pixels=LIMIT)
    with pytest.raises(UndecodableImage, match="not an image"):
        decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n", max_pixels=LIMIT)


@pytest.mark.filterwarnings("ignore:Tag data larger than file")  # TIFF, expected here
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_garbage_after_a_valid_header_never_escapes_as_a_pillow_error(fmt: str) -> None:
    data = encode(Image.new("RGB", (64, 64), RED), fmt)
    mangled = data[:40] + random.Random(fmt).randbytes(len(data) - 40)
    try:
        decoded = decode_image(mangled, max_pixels=LIMIT)
    except (UndecodableImage, TooManyPixels):
        return
    assert decoded.image.mode == "RGB"  # some formats decode garbage pixels; that is fine
