"""Headers before pixels: what one sample's bytes declare, checked against the manifest before anything decodes them.

    problem = check_sample(png_bytes, b"3", "png", size=8, channels=1, num_classes=10)   # None, or why it is bad

Pure Python over a few bytes of the header (and, for PNG, the CRC32 of every chunk, which zlib computes at GB/s):
a PNG that declares 40000x40000 is refused before PIL or DALI allocate anything for it, and a PNG with a flipped
byte anywhere fails its chunk's CRC before it reaches a decoder.

Why DALI must not see such bytes: DALI 2.4's fn.decoders.image (nvImageCodec 0.9) dies of SIGSEGV, in the
per-sample task of ImageDecoder<CPUBackend>::RunImplImpl (gdb backtrace, DALI thread "[DALI][TP0]Exec"), when a
sample's first bytes are damaged so that no format is recognised (24 flipped bytes at the start of a digits PNG);
damage after the signature comes back as a Python RuntimeError instead (libpng "IDAT: invalid code lengths set").
A segfault cannot be caught, so the DALI backend only ever receives samples that passed this check
(glow_dist/data/dali_loader.py). JPEG has no checksum: its header (SOF) is checked, the entropy-coded data is not.

Shared by both loaders, the start-up scan (verify.py) and `glow-dist prepare folder` (a hostile source file).
"""
from __future__ import annotations

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type -> channels a decoder returns for it (palette: RGB)
PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
# JPEG start-of-frame markers (baseline, extended, progressive, lossless...); C4, C8 and CC are not frames
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def image_header(data: bytes) -> tuple[int, int, int]:
    """(width, height, channels) that a PNG or JPEG declares; ValueError saying what is wrong if it declares none."""
    if data.startswith(PNG_SIGNATURE):
        return _png_header(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_header(data)
    raise ValueError(f"neither PNG nor JPEG (starts {data[:8]!r})")


def _png_header(data: bytes) -> tuple[int, int, int]:
    length, kind = struct.unpack_from(">I4s", data, 8) if len(data) >= 16 else (0, b"")
    if kind != b"IHDR" or length != 13 or len(data) < 33:
        raise ValueError("PNG without an IHDR header")
    if zlib.crc32(data[12:29]) != struct.unpack_from(">I", data, 29)[0]:
        raise ValueError("PNG header fails its CRC")
    width, height, depth, colour = struct.unpack_from(">IIBB", data, 16)
    if colour not in PNG_CHANNELS or depth != 8:
        raise ValueError(f"PNG of colour type {colour} at {depth} bits (expected 8-bit grey or RGB)")
    return width, height, PNG_CHANNELS[colour]


def png_chunks_intact(data: bytes) -> str | None:
    """None when every chunk's CRC matches and the file ends with IEND; else what is wrong (damaged bytes)."""
    view, pos = memoryview(data), 8
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > len(data):
            return f"PNG chunk {kind!r} runs past the end of the file"
        if zlib.crc32(view[pos + 4:end - 4]) != struct.unpack_from(">I", data, end - 4)[0]:
            return f"PNG chunk {kind.decode('latin-1')!r} at byte {pos} fails its CRC: damaged bytes"
        if kind == b"IEND":
            return None
        pos = end
    return "PNG ends without IEND (cut short)"


def _jpeg_header(data: bytes) -> tuple[int, int, int]:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"JPEG marker expected at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in SOF_MARKERS:
            if pos + 10 > len(data):
                break
            height, width, components = struct.unpack_from(">HHB", data, pos + 5)
            return width, height, components
        if marker == 0xDA:  # start of scan before any frame header
            break
        pos += 2 + length
    raise ValueError("JPEG without a frame header (SOF)")


def check_label(cls: bytes, num_classes: int) -> tuple[int | None, str | None]:
    """(label, None), or (None, why) when .cls is not an integer or outside 0..num_classes-1 (-1 when unlabelled);
    num_classes < 0: any integer."""
    try:
        label = int(cls)
    except ValueError:
        return None, f"label {cls[:16]!r} is not an integer"
    if num_classes > 0 and not 0 <= label < num_classes:
        return None, f"label {label} is outside 0..{num_classes - 1}"
    if num_classes == 0 and label != -1:
        return None, f"label {label} in a data set without classes (expected -1)"
    return label, None


def check_sample(image: bytes | None, cls: bytes | None, ext: str, size: int, channels: int,
                 num_classes: int, checksums: bool = True) -> str | None:
    """None when the sample may be decoded; else one phrase saying what is wrong with it. `checksums`: also the CRC
    of every PNG chunk (the whole file; the header's own CRC is always checked)."""
    if image is None or cls is None:
        return f"lacks its .{ext if image is None else 'cls'} file"
    try:
        width, height, declared = image_header(image)
    except ValueError as e:
        return f"unreadable header: {e}"
    if (width, height) != (size, size) or declared != channels:
        return (f"header declares {width}x{height} with {declared} channel(s), the manifest says {size}x{size} with "
                f"{channels}")
    if checksums and image.startswith(PNG_SIGNATURE):
        damaged = png_chunks_intact(image)
        if damaged:
            return damaged
    return check_label(cls, num_classes)[1]
