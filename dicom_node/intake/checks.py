"""Header checks of a received C-STORE: what can never become a photo is refused in its response.

A sender learns that an object is unusable from the C-STORE status, at once, instead of from a
job that fails minutes later (or never, for a C-STORE pynetdicom cannot even hand over). Nothing
here decodes pixels: the data set is already in memory (pynetdicom's buffer), its header is read
up to Pixel Data (7FE0,0010), whose length and, when encapsulated, the first fragment's opening
bytes are looked at where they lie, without a copy.

Statuses (PS3.4 B.2.3, Storage Service Class):

* 0xC000 *cannot understand*: not a data set at all (random bytes, text, a bare JPEG file, an
  empty data set), UIDs that are not UIDs (PS3.5 9.1), Pixel Data whose length or codestream
  disagrees with Rows/Columns/Samples per Pixel, more pixels than this node takes.
* 0xA900 *data set does not match SOP class*: a data set of another SOP class than the
  presentation context and the command say (a CT image on a photo context), a SOP Instance UID
  other than the command's Affected SOP Instance UID (as dcmtk's storescp answers), an image
  without Pixel Data or without a Type 1 attribute its IOD requires (PS3.3 C.7.6.3, C.12.1).

Each refusal carries an Error Comment (0000,0902; LO, 64 characters at most, PS3.7 Annex E) that
says what is wrong, never a value from the data set.

:class:`ReceiveGuard` deals with what happens *before* pynetdicom calls the C-STORE handler:
an Affected SOP Instance UID that is missing, empty or longer than 64 characters makes pynetdicom
drop the request silently (the sender waits for its DIMSE timeout) or abort the association with
a traceback; an object that keeps growing past ``max_object_mb`` would fill memory.
"""

from __future__ import annotations

import logging
import threading
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import BinaryIO, cast

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom._handlers import standard_dimse_recv_handler, standard_pdu_recv_handler
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF

from dicom_node.decode.frame_header import (
    FrameHeaderError,
    FrameHeaderIncomplete,
    codestream_for,
    frame_header_problem,
    read_frame_header,
)
from dicom_node.logs import fields
from dicom_node.monitor.metrics import StageMetrics
from dicom_node.net import status

log = logging.getLogger(__name__)

ERROR_COMMENT_MAX = 64  # Error Comment (0000,0902) is LO (PS3.5 6.2)
UID_MAX = 64  # PS3.5 9.1

# Tags read at the top level of the data set (PS3.6): where header reading stops.
_PIXEL_DATA = 0x7FE00010
_OTHER_PIXEL_DATA = (0x7FE00008, 0x7FE00009)  # Float / Double Float Pixel Data: never a photo
_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000); encapsulated transfer syntaxes are all little endian
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0"  # (FFFE,E0DD)
_UNDEFINED_LENGTH = 0xFFFFFFFF
# Explicit VRs with a 4-byte length after two reserved bytes (PS3.5 7.1.2): a 12-byte element header.
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
# Values longer than this are not read while looking at the header (an ICC profile, private blobs).
_DEFER_BYTES = 64 * 1024


# --------------------------------------------------------------------------- refusals


@dataclass(frozen=True)
class Refusal:
    """Why a C-STORE is refused: its status, a metrics reason key and the sentence for the sender.

    ``comment`` goes into the response's Error Comment (cut to 64 characters); ``detail`` (longer,
    for the log) defaults to it. Neither ever holds a value taken from the data set.
    """

    status: int
    reason: str  # a fixed word for the metrics label: "not_a_dataset", "invalid_uid", ...
    comment: str
    detail: str = ""
    omit_instance_uid: bool = False  # the command's Affected SOP Instance UID is not one: never echo it

    @property
    def log_reason(self) -> str:
        return self.detail or self.comment

    def response(self) -> Dataset:
        """The status a C-STORE handler returns: pynetdicom copies Status and Error Comment into the
        response, and with ``omit_instance_uid`` leaves out the Affected SOP Instance UID (optional
        in a C-STORE-RSP, PS3.7 9.3.1.2; an invalid one must not be echoed)."""
        rsp = Dataset()
        if self.omit_instance_uid:
            rsp.AffectedSOPInstanceUID = ""
        rsp.Status = self.status
        rsp.ErrorComment = error_comment(self.comment)
        return rsp


def error_comment(text: str) -> str:
    """``text`` as an LO value: printable ASCII without backslash, at most 64 characters."""
    clean = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in text).strip()
    return clean if len(clean) <= ERROR_COMMENT_MAX else clean[:ERROR_COMMENT_MAX - 3].rstrip() + "..."


def _cannot_understand(reason: str, comment: str, detail: str = "", omit_instance_uid: bool = False) -> Refusal:
    return Refusal(status.CANNOT_UNDERSTAND, reason, comment, detail, omit_instance_uid)


def _does_not_match(reason: str, comment: str, detail: str = "") -> Refusal:
    return Refusal(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, reason, comment, detail)


def uid_problem(value: str | bytes | None) -> str | None:
    """What makes ``value`` not a UID (PS3.5 9.1: digits and dots, components without leading
    zeros, at most 64 characters), as a phrase that follows the UID's name and never repeats the
    value ("is 70 characters long (at most 64)"); None when it is a UID."""
    if value is None:
        return "is missing"
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return "is not ASCII"
    value = value.rstrip("\x00 ")  # the one trailing NUL (or space) that pads a UI value to even length
    if not value:
        return "is empty"
    if len(value) > UID_MAX:
        return f"is {len(value)} characters long (at most {UID_MAX})"
    for position, char in enumerate(value):
        if char != "." and not "0" <= char <= "9":
            shown = repr(char) if " " < char <= "~" else f"0x{ord(char):02X}"
            return f"holds character {shown} at position {position + 1}"
    if not UID(value).is_valid:
        return "has an empty component or one with a leading zero"
    return None


# --------------------------------------------------------------------------- the received object


@dataclass(frozen=True)
class ReceivedStore:
    """One received C-STORE as intake sees it before it writes anything."""

    data_set: BinaryIO  # the data set as sent (pynetdicom's in-memory buffer)
    transfer_syntax: str  # of the presentation context it came on
    context_sop_class: str  # the presentation context's abstract syntax
    command_sop_class: str
    command_sop_instance: str


def check_store(received: ReceivedStore, max_pixels: int, max_object_bytes: int) -> Refusal | None:
    """Every header check of one C-STORE, cheapest first; None when the object may be spooled."""
    problem = uid_problem(received.command_sop_instance)
    if problem is not None:
        return _cannot_understand("invalid_command_uid", f"Affected SOP Instance UID {problem}",
                                  f"the command's Affected SOP Instance UID (0000,1000) {problem}", True)
    problem = uid_problem(received.command_sop_class)
    if problem is not None:
        return _cannot_understand("invalid_command_uid", f"Affected SOP Class UID {problem}",
                                  f"the command's Affected SOP Class UID (0000,0002) {problem}")
    stream = received.data_set
    if not isinstance(stream, BytesIO):  # pynetdicom receives into a BytesIO; anything else is read once
        stream.seek(0)
        stream = BytesIO(stream.read())
    try:
        with stream.getbuffer() as buffer:  # the received bytes themselves, not a copy
            if len(buffer) == 0:
                return _cannot_understand("not_a_dataset", "the data set is empty")
            ts = UID(received.transfer_syntax)
            if ts != DeflatedExplicitVRLittleEndian:
                return _check_parsed(stream, buffer, ts, received, max_pixels)
            inflated = _inflate(buffer, max_object_bytes)
        if isinstance(inflated, Refusal):
            return inflated
        inflated_stream = BytesIO(inflated)
        with inflated_stream.getbuffer() as inflated_buffer:
            return _check_parsed(inflated_stream, inflated_buffer, ts, received, max_pixels)
    finally:
        stream.seek(0)


@dataclass(frozen=True)
class _PixelDataElement:
    vr: str | None  # None when the transfer syntax is implicit VR
    length: int  # _UNDEFINED_LENGTH for encapsulated pixel data
    value_offset: int  # where its value starts in the (inflated) data set


def _inflate(buffer: memoryview, limit: int) -> bytes | Refusal:
    """The data set of the Deflated transfer syntax (PS3.5 A.5: raw deflate), at most ``limit`` bytes."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(buffer, limit + 1)
    except zlib.error:
        return _cannot_understand("not_a_dataset", "the deflated data set cannot be inflated")
    if len(data) > limit:
        return Refusal(status.OUT_OF_RESOURCES, "object_too_large", "inflated data set exceeds the node's size limit",
                       f"the deflated data set inflates to more than {limit} bytes (intake.max_object_mb)")
    return data


def _read_header(stream: BinaryIO, ts: UID) -> tuple[Dataset, _PixelDataElement | None]:
    """Read the data set's elements up to Pixel Data; return them and where Pixel Data's value lies.

    pydicom reads from the stream element by element (small values only: longer ones are skipped),
    stops at Pixel Data and rewinds to its element header, which it has already decoded for us."""
    implicit = ts == ImplicitVRLittleEndian
    little = ts != ExplicitVRBigEndian
    found: list[tuple[str | None, int]] = []

    def at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
        if tag == _PIXEL_DATA:
            found.append((vr, length))
            return True
        return tag in _OTHER_PIXEL_DATA

    stream.seek(0)
    ds = read_dataset(stream, implicit, little, stop_when=at_pixel_data, defer_size=_DEFER_BYTES)
    if not found:
        return ds, None
    vr, length = found[0]
    header = 12 if not implicit and vr in _LONG_VRS else 8
    return ds, _PixelDataElement(vr, length, stream.tell() + header)


def _check_parsed(stream: BinaryIO, buffer: memoryview, ts: UID, received: ReceivedStore,
                  max_pixels: int) -> Refusal | None:
    try:
        ds, pixel_data = _read_header(stream, ts)
    except Exception as exc:  # whatever pydicom makes of bytes that are not a data set
        return _cannot_understand("not_a_dataset", "not a DICOM data set (its elements cannot be read)",
                                  f"not a DICOM data set: {type(exc).__name__} reading its elements")

    sop_class = _raw_text(ds, 0x00080016)
    sop_instance = _raw_text(ds, 0x00080018)
    if sop_class is None and sop_instance is None:
        return _cannot_understand("not_a_dataset", "not a DICOM data set (no SOP Class or Instance UID)",
                                  f"not a DICOM data set: {len(ds)} elements read, none a SOP Class or "
                                  "SOP Instance UID")

    for keyword, tag, name in (("SOPClassUID", 0x00080016, "SOP Class UID"),
                               ("SOPInstanceUID", 0x00080018, "SOP Instance UID"),
                               ("StudyInstanceUID", 0x0020000D, "Study Instance UID"),
                               ("SeriesInstanceUID", 0x0020000E, "Series Instance UID")):
        value = _raw_text(ds, tag)
        if value is None:
            return _does_not_match("missing_attribute", f"{name} is missing",
                                   f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X}) is missing (Type 1)")
        problem = uid_problem(value)
        if problem is not None:
            return _cannot_understand("invalid_uid", f"{name} {problem}",
                                      f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X}) {problem}")

    sop_class = str(sop_class).rstrip("\x00 ")
    if sop_class != received.context_sop_class or sop_class != received.command_sop_class:
        return _does_not_match(
            "sop_class_mismatch", "SOP Class UID differs from the context's and command's",
            f"the data set's SOP Class UID {sop_class} ({UID(sop_class).name}) differs from the presentation "
            f"context's {received.context_sop_class} or the command's {received.command_sop_class}")
    if str(sop_instance).rstrip("\x00 ") != received.command_sop_instance:
        return _does_not_match("sop_instance_mismatch", "SOP Instance UID differs from the command's",
                               "the data set's SOP Instance UID differs from the command's Affected SOP Instance UID")

    if pixel_data is None:
        return _does_not_match("no_pixel_data", "Pixel Data (7FE0,0010) is missing",
                               "the image has no Pixel Data (7FE0,0010)")
    return _check_pixel_data(ds, pixel_data, buffer, ts, max_pixels)


def _raw_text(ds: Dataset, tag: int) -> str | None:
    """A text element's value as read (no pydicom conversion, so no validation warning repeats it)."""
    if tag not in ds:
        return None
    element = ds.get_item(tag)
    value = element.value
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace")
    return str(value)


def _int_value(ds: Dataset, keyword: str, tag: str, default: int | None = None) -> int | Refusal:
    try:
        value = ds.get(keyword)
    except Exception:
        value = "?"
    if value is None or value == "":
        if default is not None:
            return default
        return _does_not_match("missing_attribute", f"{keyword} {tag} is missing", f"{keyword} {tag} is missing "
                               "(Type 1 in the Image Pixel module, PS3.3 C.7.6.3)")
    try:
        return int(value)
    except (TypeError, ValueError):
        return _cannot_understand("invalid_attribute", f"{keyword} {tag} is not a number",
                                  f"{keyword} {tag} is not an integer")


def _check_pixel_data(ds: Dataset, pixel_data: _PixelDataElement, buffer: memoryview, ts: UID,
                      max_pixels: int) -> Refusal | None:
    numbers: dict[str, int] = {}
    for keyword, tag, default in (("Rows", "(0028,0010)", None), ("Columns", "(0028,0011)", None),
                                  ("SamplesPerPixel", "(0028,0002)", None), ("BitsAllocated", "(0028,0100)", None),
                                  ("NumberOfFrames", "(0028,0008)", 1)):
        value = _int_value(ds, keyword, tag, default)
        if isinstance(value, Refusal):
            return value
        numbers[keyword] = value
    rows, columns, samples = numbers["Rows"], numbers["Columns"], numbers["SamplesPerPixel"]
    bits, frames = numbers["BitsAllocated"], numbers["NumberOfFrames"]
    if rows <= 0 or columns <= 0 or samples <= 0 or bits <= 0 or frames <= 0:
        return _cannot_understand(
            "invalid_attribute", "Rows, Columns, Samples, Bits or Frames is zero",
            f"image of Rows {rows} x Columns {columns}, SamplesPerPixel {samples}, BitsAllocated {bits}, "
            f"{frames} frames: none may be zero")
    if rows * columns > max_pixels:
        return _cannot_understand("too_many_pixels", "image has more pixels than this node takes",
                                  f"image too large: {columns}x{rows} = {rows * columns} pixels, limit {max_pixels}")

    end = pixel_data.value_offset + (0 if pixel_data.length == _UNDEFINED_LENGTH else pixel_data.length)
    if end > len(buffer):
        return _cannot_understand("pixel_length_mismatch", "the data set ends inside Pixel Data",
                                  f"Pixel Data claims {pixel_data.length} bytes but the data set ends "
                                  f"{end - len(buffer)} bytes earlier")
    if not ts.is_encapsulated:
        if pixel_data.length == _UNDEFINED_LENGTH:
            return _cannot_understand("pixel_length_mismatch", "Pixel Data is encapsulated in a native syntax",
                                      f"transfer syntax {ts.name} is uncompressed but Pixel Data is encapsulated")
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
        return _check_native_length(pixel_data.length, rows, columns, samples, bits, frames, photometric)
    if pixel_data.length != _UNDEFINED_LENGTH:
        return _cannot_understand("pixel_length_mismatch", "compressed syntax but Pixel Data is not encapsulated",
                                  f"transfer syntax {ts.name} is compressed but Pixel Data has a defined length "
                                  "(PS3.5 A.4 requires encapsulation)")
    fragment = _first_fragment(buffer, pixel_data.value_offset)
    if isinstance(fragment, Refusal):
        return fragment
    with fragment:
        return _check_codestream(fragment, ts, rows, columns, samples, max_pixels)


def _check_native_length(present: int, rows: int, columns: int, samples: int, bits: int, frames: int,
                         photometric: str) -> Refusal | None:
    """Uncompressed Pixel Data holds exactly Rows x Columns x Samples x Bits Allocated x frames
    (PS3.5 8.1.1; YBR_FULL_422 two samples' worth per pixel, PS3.3 C.7.6.3.1.2), padded to even."""
    per_pixel = 2 if photometric == "YBR_FULL_422" and samples == 3 else samples
    expected = (rows * columns * per_pixel * bits * frames + 7) // 8
    if present == expected or present == expected + (expected % 2):
        return None
    layout = (f"Rows {rows} x Columns {columns} x SamplesPerPixel {samples} x BitsAllocated {bits}"
              + (f" x {frames} frames" if frames > 1 else "") + (" in YBR_FULL_422" if per_pixel != samples else ""))
    return _cannot_understand("pixel_length_mismatch", "Pixel Data length does not match the image size",
                              f"Pixel Data holds {present} bytes but {layout} needs {expected}")


def _first_fragment(buffer: memoryview, offset: int) -> memoryview | Refusal:
    """The first fragment after the Basic Offset Table item (PS3.5 A.4), as a view of the buffer."""
    def item_at(pos: int) -> tuple[bytes, int] | None:
        if pos + 8 > len(buffer):
            return None
        return bytes(buffer[pos:pos + 4]), int.from_bytes(buffer[pos + 4:pos + 8], "little")

    offset_table = item_at(offset)
    if offset_table is None or offset_table[0] != _ITEM or offset_table[1] == _UNDEFINED_LENGTH:
        return _cannot_understand("codestream_unreadable", "encapsulated Pixel Data has no offset table item",
                                  "encapsulated Pixel Data does not start with a Basic Offset Table item (PS3.5 A.4)")
    position = offset + 8 + offset_table[1]
    fragment = item_at(position)
    if fragment is None or fragment[0] == _SEQUENCE_DELIMITER:
        return _cannot_understand("codestream_unreadable", "encapsulated Pixel Data holds no fragment",
                                  "encapsulated Pixel Data holds no compressed fragment")
    tag, length = fragment
    if tag != _ITEM or length == _UNDEFINED_LENGTH or position + 8 + length > len(buffer):
        return _cannot_understand("codestream_unreadable", "encapsulated Pixel Data is damaged",
                                  "the first fragment of encapsulated Pixel Data is not a complete item")
    return buffer[position + 8:position + 8 + length]


def _check_codestream(fragment: memoryview, ts: UID, rows: int, columns: int, samples: int,
                      max_pixels: int) -> Refusal | None:
    codestream = codestream_for(ts)
    if codestream is None:  # RLE: its segment header says nothing about the image size
        return None
    try:
        header = read_frame_header(fragment, codestream)
    except FrameHeaderIncomplete:
        return None  # the header runs on in the next fragment: the decoder checks the whole frame
    except FrameHeaderError as exc:
        return _cannot_understand("codestream_unreadable", f"{codestream.value} codestream is damaged", str(exc))
    problem = frame_header_problem(header, rows, columns, samples, max_pixels)
    if problem is None:
        return None
    too_many = "limit" in problem
    return _cannot_understand("too_many_pixels" if too_many else "frame_header_mismatch",
                              f"{codestream.value} frame header claims too many pixels" if too_many
                              else f"{codestream.value} frame header disagrees with Rows/Columns", problem)


# --------------------------------------------------------------------------- before the handler


# Stands in for an Affected SOP Instance UID pynetdicom would refuse to decode, so that the request
# reaches the C-STORE handler, which refuses it and leaves the UID out of its response.
_PLACEHOLDER_INSTANCE_UID = "2.25.0"


class ReceiveGuard:
    """What must be caught before pynetdicom calls the C-STORE handler.

    * A C-STORE-RQ whose Affected SOP Instance (or Class) UID is missing, empty or not a UID:
      pynetdicom drops one without a UID as "unexpected" (the sender waits out its DIMSE timeout)
      and aborts on one over 64 characters, logging a traceback. On ``EVT_DIMSE_RECV`` (the command
      is decoded, the primitive not yet made) the bad value is swapped for a valid stand-in and the
      message is marked; the handler answers 0xC000 at once (:meth:`take_refusal`).
    * An object that grows past ``max_object_bytes`` while it arrives: on ``EVT_PDU_RECV`` its data
      fragments are counted, and once past the limit what has arrived is dropped, PDU by PDU, until
      the message ends; the handler then answers 0xA700 with an Error Comment. Memory never holds
      more than the limit plus one PDU (PS3.8 9.3.1: a PDU is at most the maximum length intake
      offered; ``intake.max_pdu_bytes`` 0 lets the sender choose), and the association goes on.
    """

    def __init__(self, max_object_bytes: int, metrics: StageMetrics) -> None:
        self.max_object_bytes = max_object_bytes
        self.metrics = metrics
        self._lock = threading.Lock()
        self._refusals: weakref.WeakKeyDictionary[Association, dict[int, Refusal]] = weakref.WeakKeyDictionary()
        self._receiving: weakref.WeakKeyDictionary[Association, int] = weakref.WeakKeyDictionary()

    def handlers(self) -> list[evt.EventHandlerType]:
        """The pynetdicom handlers to bind next to the C-STORE handler."""
        return [(evt.EVT_CONN_OPEN, self._on_conn_open), (evt.EVT_DIMSE_RECV, self._on_dimse_recv),
                (evt.EVT_PDU_RECV, self._on_pdu_recv)]

    def take_refusal(self, assoc: Association, message_id: int | None) -> Refusal | None:
        """The refusal this message earned while it arrived, once (None: nothing)."""
        if message_id is None:
            return None
        with self._lock:
            refusals = self._refusals.get(assoc)
            return refusals.pop(message_id, None) if refusals else None

    def _mark(self, assoc: Association, message_id: int, refusal: Refusal) -> None:
        with self._lock:
            self._refusals.setdefault(assoc, {}).setdefault(message_id, refusal)

    def _on_conn_open(self, event: Event) -> None:
        """Run before pynetdicom's own logging handlers of the association, not after them.

        Those are bound first, and a notification handler that raises skips every handler after
        it: pynetdicom's DIMSE logger raises on a C-STORE-RQ without Affected SOP Instance UID, which
        would keep :meth:`_on_dimse_recv` from ever seeing one. Binding them again puts them last."""
        assoc = event.assoc
        for kind, standard in ((evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
                               (evt.EVT_PDU_RECV, standard_pdu_recv_handler)):
            bound = cast(list[tuple[Callable[..., object], object]], assoc.get_handlers(kind))  # notification
            if any(func is standard for func, _args in bound):
                assoc.unbind(kind, standard)
                assoc.bind(kind, standard)

    def _on_dimse_recv(self, event: Event) -> None:
        message = event.message
        if not isinstance(message, C_STORE_RQ):
            return
        try:
            self._screen_command(event.assoc, message)
        except Exception as exc:  # never let a check break the association
            log.error(fields(event="intake.check_error", stage="command", reason=f"{type(exc).__name__}: {exc}"))

    def _screen_command(self, assoc: Association, message: C_STORE_RQ) -> None:
        command = message.command_set
        message_id = command.get("MessageID")
        if message_id is None:
            return  # nothing can be answered without it; pynetdicom ignores such a request
        found: list[str] = []
        problem = uid_problem(_raw_text(command, 0x00001000))
        if problem is not None:
            found.append(f"Affected SOP Instance UID {problem}")
            command.AffectedSOPInstanceUID = _PLACEHOLDER_INSTANCE_UID
        problem = uid_problem(_raw_text(command, 0x00000002))
        if problem is not None:
            found.append(f"Affected SOP Class UID {problem}")
            context = next((cx for cx in assoc.accepted_contexts if cx.context_id == message.context_id), None)
            if context is None:
                return  # pynetdicom aborts a message on a context it never accepted
            command.AffectedSOPClassUID = context.abstract_syntax
        if found:
            text = "; ".join(found)
            self._mark(assoc, int(message_id), _cannot_understand("invalid_command_uid", text, text,
                                                                   omit_instance_uid=True))

    def _on_pdu_recv(self, event: Event) -> None:
        pdu = event.pdu
        if not isinstance(pdu, P_DATA_TF):
            return
        assoc = event.assoc
        over = False
        with self._lock:
            received = self._receiving.get(assoc, 0)
            for item in pdu.presentation_data_value_items:
                data = item.data or b""
                if not data or data[0] & 0x01:  # message control header: bit 0 set for command fragments
                    continue
                received += len(data) - 1
                over = over or received > self.max_object_bytes
                if data[0] & 0x02:  # the last fragment of the data set: the next object starts at 0
                    received = 0
            self._receiving[assoc] = received
        if over:
            try:
                self._drop_data_set(assoc)
            except Exception as exc:  # pynetdicom's insides changed: bound memory the hard way
                log.warning(fields(event="intake.refused", calling_ae=str(assoc.requestor.ae_title or "").strip(),
                                   action="association aborted",
                                   reason=f"object larger than intake.max_object_mb ({self.max_object_bytes} "
                                          f"bytes) and its data cannot be dropped ({type(exc).__name__})"))
                self.metrics.rejected("object_too_large")
                assoc.abort()

    def _drop_data_set(self, assoc: Association) -> None:
        """Forget what has arrived of the data set being received (pynetdicom appends each fragment to
        the message's ``data_set`` after this event) and mark the message for a 0xA700 answer."""
        message = assoc.dimse.message
        if message is None or not isinstance(message.data_set, BytesIO) or message._data_set_file is not None:
            raise TypeError("the data set is not being received into memory")
        message.data_set = BytesIO()
        message_id = message.command_set.MessageID
        limit_mb = self.max_object_bytes // 1_000_000
        self._mark(assoc, int(message_id), Refusal(
            status.OUT_OF_RESOURCES, "object_too_large", f"object larger than this node takes ({limit_mb} MB)",
            f"object larger than intake.max_object_mb ({self.max_object_bytes} bytes): dropped as it arrived"))
