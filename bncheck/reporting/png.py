"""A minimal PNG writer (8-bit RGB) and the one class palette of the pictures a report
carries: no image library (and no torch) needed, and the bytes are the same on every machine."""

from __future__ import annotations

import base64
import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


FILTERS = {"none": 0, "up": 2}
"""PNG row filters a caller may have applied (``up``: each byte minus the one above, mod 256)."""


def encode_rgb(pixels: bytes, width: int, height: int, filtered: str = "none") -> bytes:
    """``pixels``: ``height`` rows of ``width`` RGB triplets (row-major, 8 bits each), already
    passed through the row filter ``filtered`` (the same for every row)."""
    if width <= 0 or height <= 0 or len(pixels) != width * height * 3:
        raise ValueError(f"{len(pixels)} bytes are not a {width}x{height} RGB image")
    stride, tag = width * 3, bytes([FILTERS[filtered]])
    raw = b"".join(tag + pixels[row * stride:(row + 1) * stride] for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def data_uri(png_base64: str) -> str:
    return "data:image/png;base64," + png_base64


def to_base64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def _voc_color(index: int) -> tuple[int, int, int]:
    """The Pascal VOC palette: class 0 black, then well-separated colours (255, the ignore
    index, cream)."""
    r = g = b = 0
    c = index
    for bit in range(8):
        r |= ((c >> 0) & 1) << (7 - bit)
        g |= ((c >> 1) & 1) << (7 - bit)
        b |= ((c >> 2) & 1) << (7 - bit)
        c >>= 3
    return r, g, b


PALETTE = tuple(_voc_color(i) for i in range(256))
"""The one palette of every class picture: class ``i`` in ``PALETTE[i % 256]``."""


def palette_hex(index: int) -> str:
    r, g, b = PALETTE[index % 256]
    return f"#{r:02x}{g:02x}{b:02x}"


def box_color(label: int) -> int:
    """The palette entry a box of class ``label`` is drawn in: class 0 is black in the palette,
    invisible on a dark image, so boxes of class 0 take 255's cream."""
    return label % 256 or 255
