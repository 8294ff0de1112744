"""The image size a compressed frame declares in its own codestream, read without decoding it.

A decoder allocates what the codestream's frame header says, not what Rows and Columns say: a
file of a few kilobytes whose JPEG SOF claims 26000 x 26000 pixels makes libjpeg ask for 2 GB.
Reading that header first (a few dozen bytes at the start of the first fragment) lets intake
refuse such an object in its C-STORE response and lets the decoder fail with a reason before
anything is allocated. Both use :func:`read_frame_header` and :func:`frame_header_problem`.

What is read, per codestream (PS3.5 8.2 names the standards behind each transfer syntax):

* JPEG (ISO/IEC 10918-1 B.2.2): the first SOFn segment (SOF0-SOF15 but DHT, JPG, DAC): sample
  precision P, number of lines Y, samples per line X, components Nf.
* JPEG-LS (ISO/IEC 14495-1 C.2.2): the SOF55 segment (marker FFF7), laid out as a JPEG SOF.
* JPEG 2000 (ISO/IEC 15444-1 A.5.1): the SIZ segment that follows SOC: width Xsiz - XOsiz,
  height Ysiz - YOsiz, Csiz components. A JP2 file wrapper (not allowed by PS3.5 A.4.4, but
  written by some encoders) is looked through to its contiguous codestream box.

Nothing here decodes entropy-coded data; each parser walks marker segments by their lengths
and stops at the first frame header, so the cost is a few reads whatever the image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pydicom.uid import UID, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes


class Codestream(Enum):
    """The codestream families whose frame headers are read here."""

    JPEG = "JPEG"
    JPEG_LS = "JPEG-LS"
    JPEG_2000 = "JPEG 2000"


class FrameHeaderError(ValueError):
    """The bytes are not the start of a codestream of the expected kind, or its header is cut off."""


class FrameHeaderIncomplete(FrameHeaderError):
    """The bytes end before the frame header: more of the codestream is needed to tell."""


@dataclass(frozen=True)
class FrameHeader:
    """What a codestream's frame header declares.

    ``rows`` is None for a JPEG frame whose SOF gives 0 lines: the number of lines then comes in a
    DNL segment after the first scan (ISO/IEC 10918-1 B.2.5), which is not read here.
    """

    codestream: Codestream
    marker: str  # "SOF0", "SOF55", "SIZ"
    rows: int | None
    columns: int
    samples: int
    precision: int  # bits per sample (the largest over components for JPEG 2000)

    def describe(self) -> str:
        rows = "?" if self.rows is None else str(self.rows)
        return f"{self.codestream.value} {self.marker} {self.columns}x{rows}x{self.samples}"


def codestream_for(transfer_syntax: str) -> Codestream | None:
    """The codestream family of an encapsulated transfer syntax, or None (native, RLE, video)."""
    ts = UID(transfer_syntax)
    if ts in JPEGLSTransferSyntaxes:
        return Codestream.JPEG_LS
    if ts in JPEG2000TransferSyntaxes:
        return Codestream.JPEG_2000
    if ts in JPEGTransferSyntaxes:
        return Codestream.JPEG
    return None


def read_frame_header(data: bytes | bytearray | memoryview, codestream: Codestream) -> FrameHeader:
    """Read the frame header at the start of ``data`` (a compressed frame or its first fragment).

    Raises :class:`FrameHeaderIncomplete` when ``data`` ends before the header, and
    :class:`FrameHeaderError` when it is not a codestream of that kind.
    """
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if codestream is Codestream.JPEG_2000:
        return _read_j2k(view)
    return _read_jpeg(view, codestream)


def frame_header_problem(header: FrameHeader, rows: int, columns: int, samples: int, max_pixels: int) -> str | None:
    """Why the frame header must not be decoded, or None when it agrees with the data set.

    The codestream and the Image Pixel module must describe the same image (PS3.5 8.2: "the
    encapsulated pixel data ... shall be consistent with" Rows, Columns, Samples per Pixel);
    what the codestream declares is also held to ``max_pixels``, since that is what a decoder
    allocates.
    """
    header_rows = header.rows if header.rows is not None else rows
    if header.columns * header_rows > max_pixels:
        return (f"{header.codestream.value} frame header claims {header.columns}x{header_rows} = "
                f"{header.columns * header_rows} pixels, limit {max_pixels}")
    if (header.columns, header_rows, header.samples) != (columns, rows, samples):
        return (f"{header.codestream.value} frame header ({header.marker}) says {header.columns}x{header_rows} "
                f"with {header.samples} samples, but Columns x Rows is {columns}x{rows} with SamplesPerPixel "
                f"{samples}")
    return None


# --------------------------------------------------------------------------- JPEG and JPEG-LS

_SOI = 0xD8
_SOS = 0xDA
_EOI = 0xD9
_SOF55 = 0xF7  # JPEG-LS frame header
# SOF0..SOF15 are C0..CF, but C4 (DHT), C8 (JPG, reserved) and CC (DAC) are not frame headers.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length (ISO/IEC 10918-1 B.1.1.3): TEM, RSTm, SOI, EOI.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), _SOI, _EOI})


def _read_jpeg(view: memoryview, codestream: Codestream) -> FrameHeader:
    size = len(view)
    if size < 2:
        raise FrameHeaderIncomplete(f"{codestream.value} codestream is {size} bytes long")
    if view[0] != 0xFF or view[1] != _SOI:
        raise FrameHeaderError(f"{codestream.value} codestream does not start with SOI (FFD8) but with "
                               f"{bytes(view[:2]).hex().upper()}")
    frame_markers = {_SOF55} if codestream is Codestream.JPEG_LS else _JPEG_SOF
    pos = 2
    while True:
        # a marker is FF followed by a code; any number of FF fill bytes may precede it (B.1.1.2)
        if pos >= size:
            raise FrameHeaderIncomplete(f"{codestream.value} codestream ends before its frame header")
        if view[pos] != 0xFF:
            raise FrameHeaderError(f"{codestream.value} codestream has no marker at byte {pos} before its "
                                   "frame header")
        while pos < size and view[pos] == 0xFF:
            pos += 1
        if pos >= size:
            raise FrameHeaderIncomplete(f"{codestream.value} codestream ends before its frame header")
        code = view[pos]
        pos += 1
        if code in _STANDALONE:
            if code in (_SOI, _EOI):
                raise FrameHeaderError(f"{codestream.value} codestream has marker FF{code:02X} before any "
                                       "frame header")
            continue
        if pos + 2 > size:
            raise FrameHeaderIncomplete(f"{codestream.value} codestream ends inside a marker segment")
        length = (view[pos] << 8) | view[pos + 1]
        if length < 2:
            raise FrameHeaderError(f"{codestream.value} marker segment FF{code:02X} has length {length}")
        if code in frame_markers:
            if pos + 8 > size:
                raise FrameHeaderIncomplete(f"{codestream.value} codestream ends inside its frame header")
            if length < 8:
                raise FrameHeaderError(f"{codestream.value} frame header FF{code:02X} is {length} bytes long")
            precision = view[pos + 2]
            lines = (view[pos + 3] << 8) | view[pos + 4]
            samples_per_line = (view[pos + 5] << 8) | view[pos + 6]
            components = view[pos + 7]
            marker = "SOF55" if code == _SOF55 else f"SOF{code - 0xC0}"
            if samples_per_line == 0 or components == 0:
                raise FrameHeaderError(f"{codestream.value} {marker} declares {samples_per_line} samples per line "
                                       f"and {components} components")
            return FrameHeader(codestream, marker, lines or None, samples_per_line, components, precision)
        if code == _SOS or (code in _JPEG_SOF and codestream is Codestream.JPEG_LS) or (
                code == _SOF55 and codestream is Codestream.JPEG):
            raise FrameHeaderError(f"{codestream.value} codestream has marker FF{code:02X} where its frame "
                                   "header should be")
        pos += length


# --------------------------------------------------------------------------- JPEG 2000

_J2K_SOC = b"\xff\x4f"
_J2K_SIZ = b"\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_SIZ_FIXED = 38  # Lsiz .. Csiz: 2 + 2 + 8 x 4 + 2 bytes
_MAX_COMPONENTS = 16384  # ISO/IEC 15444-1 A.5.1: Csiz is 1..16384


def _read_j2k(view: memoryview) -> FrameHeader:
    if bytes(view[:12]) == _JP2_SIGNATURE:
        view = _jp2_codestream(view)
    if len(view) < 2:
        raise FrameHeaderIncomplete(f"JPEG 2000 codestream is {len(view)} bytes long")
    if bytes(view[:2]) != _J2K_SOC:
        raise FrameHeaderError(f"JPEG 2000 codestream does not start with SOC (FF4F) but with "
                               f"{bytes(view[:2]).hex().upper()}")
    if len(view) < 4 + _SIZ_FIXED:
        raise FrameHeaderIncomplete("JPEG 2000 codestream ends inside its SIZ segment")
    if bytes(view[2:4]) != _J2K_SIZ:
        raise FrameHeaderError("JPEG 2000 codestream has no SIZ (FF51) right after SOC, as ISO/IEC 15444-1 A.4.2 "
                               "requires")
    siz = view[4:]

    def u32(offset: int) -> int:
        return int.from_bytes(siz[offset:offset + 4], "big")

    length = int.from_bytes(siz[0:2], "big")
    width, height = u32(4) - u32(12), u32(8) - u32(16)
    components = int.from_bytes(siz[36:38], "big")
    if not 1 <= components <= _MAX_COMPONENTS or length != _SIZ_FIXED + 3 * components:
        raise FrameHeaderError(f"JPEG 2000 SIZ segment is invalid: {components} components in {length} bytes")
    if width <= 0 or height <= 0:
        raise FrameHeaderError(f"JPEG 2000 SIZ declares an empty image ({width}x{height})")
    if len(siz) < length:
        raise FrameHeaderIncomplete("JPEG 2000 codestream ends inside its SIZ segment")
    # Ssiz: bit depth - 1 in the low seven bits, the top bit says signed
    precision = max((siz[38 + 3 * c] & 0x7F) + 1 for c in range(components))
    return FrameHeader(Codestream.JPEG_2000, "SIZ", height, width, components, precision)


def _jp2_codestream(view: memoryview) -> memoryview:
    """The contiguous codestream box ('jp2c') of a JP2 file (ISO/IEC 15444-1 I.5.4), walking box lengths."""
    pos, size = 0, len(view)
    while pos + 8 <= size:
        length = int.from_bytes(view[pos:pos + 4], "big")
        kind = bytes(view[pos + 4:pos + 8])
        header = 8
        if length == 1:  # XLBox: a 64-bit length follows the type
            if pos + 16 > size:
                break
            length, header = int.from_bytes(view[pos + 8:pos + 16], "big"), 16
        if kind == b"jp2c":
            return view[pos + header:] if length == 0 else view[pos + header:pos + length]
        if length == 0 or length < header:
            raise FrameHeaderError(f"JP2 box {kind!r} has length {length} before any codestream box")
        pos += length
    raise FrameHeaderIncomplete("JP2 file ends before its codestream box")
