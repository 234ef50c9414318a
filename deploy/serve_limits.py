"""What the inspection service accepts: content types, body and pixel limits, header sniffing.

A request body is untrusted bytes from the line's network. Before a single pixel is decoded the
service knows how large the image would be: :func:`image_dimensions` reads the width and height
from the header of a PNG, JPEG, BMP, TIFF, WebP or PNM file (the formats it accepts), so a
decompression bomb (a few kilobytes of PNG that would inflate to gigabytes) is refused with 413
instead of being decoded. Other formats OpenCV could read are refused (415): their size cannot be
checked first.

:func:`decode_checked` is the whole path of one body: sniff, check the pixel limit, decode with
:func:`anomaly.data.io.decode_image` (raw pixels, as the runtime reads files). Every refusal is an
:class:`InputError` with the HTTP status and a message that names what was expected and what was
found.

Torch-free and FastAPI-free: numpy, OpenCV and the standard library.
"""
from __future__ import annotations

import re
import struct

import numpy as np

from anomaly.data.io import ImageReadError, decode_image

__all__ = ["InputError", "IMAGE_TYPES", "ACCEPTED_TYPES", "FORMATS", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS",
           "image_dimensions", "sniff_format", "check_content_type", "decode_checked"]

#: request bodies larger than this are refused (413): 32 MiB holds a 12-MP PNG
DEFAULT_MAX_BYTES = 32 << 20
#: images of more pixels than this are refused before decoding (413): 40 MP (120 MB as RGB)
DEFAULT_MAX_PIXELS = 40_000_000

#: media types of one encoded image in a request body
IMAGE_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/x-ms-bmp", "image/tiff", "image/webp",
               "image/x-portable-anymap", "image/x-portable-bitmap", "image/x-portable-graymap",
               "image/x-portable-pixmap", "application/octet-stream")
#: all a ``POST .../inspect`` body may be
ACCEPTED_TYPES = IMAGE_TYPES + ("multipart/form-data",)
#: the formats :func:`image_dimensions` can size (and so the service decodes)
FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WebP", "PNM")


class InputError(ValueError):
    """A request the service refuses; ``status`` is the HTTP status code to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def check_content_type(value: str | None, allowed: tuple[str, ...] = ACCEPTED_TYPES) -> str:
    """The media type of a ``Content-Type`` header value (lower case, parameters dropped).

    Raises:
        InputError: 415 when it is missing or not one of ``allowed``.
    """
    media = (value or "").split(";", 1)[0].strip().lower()
    if media not in allowed:
        shown = f"{media!r}" if media else "no Content-Type"
        raise InputError(415, f"unsupported content type {shown}; expected one encoded image "
                              f"({', '.join(t for t in allowed if t != 'multipart/form-data')})"
                         + (" or multipart/form-data" if "multipart/form-data" in allowed else ""))
    return media


def sniff_format(data: bytes) -> str | None:
    """The format of encoded image bytes from their signature (one of :data:`FORMATS`), or ``None``."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if len(data) >= 2 and data[0:1] == b"P" and data[1] in b"123456":
        return "PNM"
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC): precision, height, width
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        i += 2 + length
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    end = "<" if data[:2] == b"II" else ">"
    if len(data) < 8:
        return None
    (ifd,) = struct.unpack(end + "I", data[4:8])
    if ifd + 2 > len(data):
        return None
    (count,) = struct.unpack(end + "H", data[ifd:ifd + 2])
    dims: dict[int, int] = {}
    for k in range(count):
        off = ifd + 2 + 12 * k
        if off + 12 > len(data):
            return None
        tag, typ, _n = struct.unpack(end + "HHI", data[off:off + 8])
        if tag in (256, 257):
            if typ == 3:  # SHORT
                (dims[tag],) = struct.unpack(end + "H", data[off + 8:off + 10])
            elif typ == 4:  # LONG
                (dims[tag],) = struct.unpack(end + "I", data[off + 8:off + 12])
            else:
                return None
    if 256 in dims and 257 in dims:
        return dims[256], dims[257]
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


_PNM_HEADER = re.compile(rb"P[1-6](?:\s+|#[^\n]*\n)+(\d+)(?:\s+|#[^\n]*\n)+(\d+)")


def image_dimensions(data: bytes) -> tuple[str, int, int] | None:
    """``(format, width, height)`` read from the header of encoded image bytes, without decoding.

    Returns ``None`` for bytes that are not one of :data:`FORMATS` or whose header is cut short.
    """
    fmt = sniff_format(data)
    size: tuple[int, int] | None = None
    if fmt == "PNG":
        if len(data) >= 24 and data[12:16] == b"IHDR":
            size = struct.unpack(">II", data[16:24])
    elif fmt == "JPEG":
        size = _jpeg_size(data)
    elif fmt == "BMP":
        if len(data) >= 26:
            (header,) = struct.unpack("<I", data[14:18])
            if header == 12:
                size = struct.unpack("<HH", data[18:22])
            else:
                w, h = struct.unpack("<ii", data[18:26])
                size = (abs(w), abs(h))
    elif fmt == "TIFF":
        size = _tiff_size(data)
    elif fmt == "WebP":
        size = _webp_size(data)
    elif fmt == "PNM":
        m = _PNM_HEADER.match(data[:512])
        if m:
            size = (int(m.group(1)), int(m.group(2)))
    if fmt is None or size is None:
        return None
    return fmt, int(size[0]), int(size[1])


def decode_checked(data: bytes, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one request image: ``(H, W)`` or ``(H, W, 3|4)`` RGB(A) in its own pixel type.

    Args:
        data: the encoded bytes.
        name: what to call it in messages (``image``, a multipart part's file name).
        max_pixels: most ``width * height`` accepted.

    Raises:
        InputError: 422 for an empty body, bytes of no accepted format or a header that does not
            decode; 413 for an image over ``max_pixels``.
    """
    if not data:
        raise InputError(422, f"{name}: the body is empty; expected one encoded image ({', '.join(FORMATS)})")
    dims = image_dimensions(data)
    if dims is None:
        kind = "a format this service does not accept" if sniff_format(data) is None else "a truncated header"
        raise InputError(422, f"{name}: not a decodable image ({kind}, {len(data)} bytes starting "
                              f"{data[:8].hex()}); expected one of {', '.join(FORMATS)}")
    fmt, w, h = dims
    if w <= 0 or h <= 0:
        raise InputError(422, f"{name}: the {fmt} header says {w}x{h} pixels; expected a non-empty image")
    if w * h > max_pixels:
        raise InputError(413, f"{name}: {w}x{h} = {w * h:,} pixels ({fmt}); this server accepts at most "
                              f"{max_pixels:,} pixels per image")
    try:
        img = decode_image(data, name, raw=True)
    except ImageReadError as exc:
        raise InputError(422, f"{exc} (the {fmt} header says {w}x{h})") from exc
    if img.shape[0] * img.shape[1] > max_pixels:  # a header that lied about the size
        raise InputError(413, f"{name}: decoded to {img.shape[1]}x{img.shape[0]} pixels; this server accepts at most "
                              f"{max_pixels:,}")
    return img
