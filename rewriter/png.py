"""A dependency-free bar chart written as a PNG (zlib only; matplotlib is not required).

>>> write_bar_chart("bars.png", [0.2, 0.9, 0.5], [(70, 130, 180), (230, 120, 40), (70, 130, 180)])  # doctest: +SKIP
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

Color = tuple[int, int, int]

BAR_WIDTH = 12
GAP = 4
HEIGHT = 200
MARGIN = 8
BACKGROUND: Color = (255, 255, 255)
AXIS: Color = (0, 0, 0)


def write_bar_chart(path: str | Path, values: Sequence[float], colors: Sequence[Color]) -> None:
    """One bar per value (heights scaled to the range of ``values``), colored by ``colors``.

    The bars rise from the bottom axis; values are shifted so the smallest bar is a
    tenth of the plot's height, which keeps negative scores (LIM, ZD) visible.
    """
    width = 2 * MARGIN + max(1, len(values)) * (BAR_WIDTH + GAP)
    height = HEIGHT + 2 * MARGIN
    pixels = [[BACKGROUND] * width for _ in range(height)]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    span = high - low or 1.0
    for index, (value, color) in enumerate(zip(values, colors, strict=True)):
        bar = int(HEIGHT * (0.1 + 0.9 * (value - low) / span))
        left = MARGIN + index * (BAR_WIDTH + GAP)
        for row in range(MARGIN + HEIGHT - bar, MARGIN + HEIGHT):
            pixels[row][left : left + BAR_WIDTH] = [color] * BAR_WIDTH
    pixels[MARGIN + HEIGHT - 1] = [AXIS] * width
    Path(path).write_bytes(encode_png(pixels))


def encode_png(pixels: Sequence[Sequence[Color]]) -> bytes:
    """An 8-bit RGB PNG of ``pixels`` (rows of (r, g, b))."""
    height, width = len(pixels), len(pixels[0])
    raw = b"".join(b"\x00" + bytes(channel for pixel in row for channel in pixel) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
