"""Test images made in-process: real photos re-encoded, awkward formats and hostile files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image

PHOTOS_DIR = Path(__file__).resolve().parent.parent / "captioning" / "samples"


def photo_bytes() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(PHOTOS_DIR.iterdir()) if p.suffix != ".md"}


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def sample_rgb(size: tuple[int, int] = (96, 64)) -> Image.Image:
    return Image.open(PHOTOS_DIR / "chelsea.png").convert("RGB").resize(size)


def awkward_images() -> dict[str, bytes]:
    """Valid but unusual images that must all caption."""
    rgb = sample_rgb()
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    frames = [rgb, rgb.rotate(90), rgb.rotate(180)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    sixteen = Image.new("I;16", (64, 48))
    sixteen.putdata([i * 20 for i in range(64 * 48)])
    return {
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "sixteen-bit.png": encode(sixteen, "PNG"),
        "palette-transparent.png": encode(palette, "PNG"),
        "rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "animated.gif": gif.getvalue(),
        "photo.webp": encode(rgb, "WEBP"),
        "rotated-exif.jpg": encode(rgb, "JPEG", exif=exif),
        "one-pixel.png": encode(Image.new("RGB", (1, 1), "white"), "PNG"),
        "wide.png": encode(Image.new("RGB", (4000, 3), "navy"), "PNG"),
        "grey.jpg": encode(rgb.convert("L"), "JPEG"),
    }


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header claims width x height: decoding it would need gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + b"\x00" * (width * 3)
    compressed = zlib.compress(row * 16, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", compressed) + chunk(
        b"IEND", b""
    )


def hostile_files(max_bytes: int) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the error class its row must carry)."""
    jpeg = encode(sample_rgb((320, 240)), "JPEG")
    return {
        "not-an-image.jpg": (b"this is plain text, not a JPEG\n" * 10, "UndecodableImage"),
        "empty.png": (b"", "UndecodableImage"),
        "truncated.jpg": (jpeg[: len(jpeg) // 3], "UndecodableImage"),
        "corrupt.png": (encode(sample_rgb(), "PNG")[:60] + b"\x00garbage" * 20, "UndecodableImage"),
        "bomb.png": (png_bomb(), "TooManyPixels"),
        "huge.jpg": (b"\xff\xd8\xff" + b"\x00" * (max_bytes + 10), "ImageTooLarge"),
    }
