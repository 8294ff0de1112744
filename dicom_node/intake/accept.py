"""Accepting one received photo: the one way an object becomes a job, whichever door it came in by.

The C-STORE SCP (:mod:`dicom_node.intake.scp`) and the STOW-RS route (:mod:`dicom_node.web.dicomweb`)
each read a request their own way, then hand every object to :meth:`Acceptor.accept`, which runs the
same steps for both, in this order:

1. the size bound (``intake.max_object_mb``) and, for what was not negotiated (STOW-RS), the SOP
   classes and transfer syntaxes the node accepts;
2. the header checks of :mod:`dicom_node.intake.checks` (no decoding);
3. the duplicate check: a SOP Instance UID that already has a job is acknowledged again and makes
   no new job (one photo, one set of results);
4. the disk watermark (:mod:`dicom_node.intake.watermark`), before anything is written;
5. the spool write (atomic, fsynced) and the job commit, then the workers' doorbell.

A Segmentation (PS3.3 A.51; taken only with ``[lesion] enabled``) goes the same way, with one more
step after the header checks: its header says whether it is a lesion mask of one photo
(:func:`dicom_node.decode.lesion_seg.classify_segmentation`). A lesion mask becomes a *lesion job*
waiting for that photo's parsing. Any other SEG (a viewer's organ contours, our own body-part SEG
sent back) is, per ``lesion.other_segmentations``, either acknowledged and dropped ("ignore":
0x0000, nothing kept, ``event=intake.segmentation_ignored``) or refused with 0xC000 *cannot
understand* (PS3.4 B.2.3: the node cannot process it; not 0xA700, which would make the sender
retry forever, nor 0xA900, since the data set does match its SOP class). A lesion SEG that does
not name exactly one source image is refused the same way: no job could ever join it.

The answer is an :class:`Outcome` holding a DICOM status: the SCP returns it in the C-STORE response
(PS3.4 B.2.3), the STOW-RS route reports it as the instance's Failure Reason (PS3.18 Annex I). Success
means the photo is spooled and its job committed; whatever prevents that is 0xA700 (out of
resources), so the sender keeps the object and sends it again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from io import BytesIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from dicom_node.config import IntakeSettings, LesionSettings
from dicom_node.decode.lesion_seg import SEG_TRANSFER_SYNTAXES, SEGMENTATION_SOP_CLASS, classify_segmentation
from dicom_node.intake.checks import ReceivedStore, Refusal, check_store, error_comment, uid_problem
from dicom_node.intake.watermark import MB, DiskWatermark
from dicom_node.logs import fields
from dicom_node.monitor.metrics import SOURCE_DICOM, StageMetrics
from dicom_node.net import status
from dicom_node.queue.doorbell import Doorbell
from dicom_node.queue.job import JobKind, NewJob
from dicom_node.queue.store import JobStore
from dicom_node.spool.base import Spool

log = logging.getLogger(__name__)

PART10_PREAMBLE = b"\x00" * 128 + b"DICM"  # PS3.10 7.1: 128-byte preamble, then the prefix
_SPOOL_OVERHEAD_BYTES = 4096  # preamble, file meta, a last block: reserved beside the data set


@dataclass(frozen=True)
class Received:
    """One object as it arrived, before anything is written.

    ``declared_sop_class`` is what the transport says the object is: the presentation context's
    abstract syntax for a C-STORE, the File Meta's Media Storage SOP Class UID for STOW-RS.
    ``sop_class_uid`` / ``sop_instance_uid`` are what the data set must carry: the command's Affected
    SOP Class and Instance UIDs, or the File Meta's Media Storage ones (PS3.10 7.1 requires them to
    equal the data set's).
    """

    data_set: BytesIO  # the data set as sent, without preamble or File Meta (checked where it lies)
    transfer_syntax: str
    declared_sop_class: str
    sop_class_uid: str
    sop_instance_uid: str
    calling_ae: str
    calling_host: str
    source: str = SOURCE_DICOM


@dataclass(frozen=True)
class Outcome:
    """What became of one received object: its DICOM status and, when refused, why.

    ``refusal`` is set for a refusal the sender is told about in an Error Comment (a check, a full
    disk); a failure of the node itself (spool, job store) has only ``comment``, for the STOW-RS
    response, and answers a C-STORE with the bare 0xA700 as it always has.
    """

    status: int
    sop_class_uid: str
    sop_instance_uid: str
    refusal: Refusal | None = None
    comment: str | None = None
    job_id: int | None = None
    duplicate: bool = False  # acknowledged again: the SOP Instance UID already had a job

    @property
    def stored(self) -> bool:
        """The photo is spooled and its job committed (now or by an earlier send)."""
        return status.is_success(self.status)

    @property
    def error_comment(self) -> str | None:
        """The sentence for the sender (an LO value, PS3.7 Annex E), never a value from the data set."""
        text = self.refusal.comment if self.refusal is not None else self.comment
        return error_comment(text) if text else None

    def dimse_response(self) -> int | Dataset:
        """What the C-STORE handler returns (pynetdicom copies Status and Error Comment into the response)."""
        return self.refusal.response() if self.refusal is not None else self.status


@dataclass(eq=False)
class Acceptor:
    """Checks, spools and commits received photos; shared by every intake door of one node.

    Thread-safe: the SCP calls it from its association threads, the STOW-RS route from its own pool
    (the job store keeps one connection per thread, the watermark reserves under a lock).
    """

    settings: IntakeSettings
    store: JobStore
    spool: Spool
    metrics: StageMetrics
    photo_received: Doorbell  # rung for every new job (the workers wait on it)
    lesion: LesionSettings | None = None  # lesion SEG input; None or not enabled: no SEG is taken
    # the disk the spool writes to, held above intake.min_free_disk_mb (read by /readyz too)
    watermark: DiskWatermark = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # The file system the photos are written to: spool_dir's (shared by a group of nodes, issue 16)
        self.watermark = DiskWatermark.from_settings(self.spool.path("spool"), self.settings)

    @property
    def lesion_input(self) -> bool:
        """Whether Segmentation Storage is taken (negotiated by the SCP, accepted over STOW-RS)."""
        return self.lesion is not None and self.lesion.enabled

    @property
    def max_object_bytes(self) -> int:
        return self.settings.max_object_mb * MB

    def accept(self, received: Received) -> Outcome:
        """Check, spool and commit one object; the outcome's status is what its sender is answered."""
        settings = self.settings
        with received.data_set.getbuffer() as view:
            size = view.nbytes
        if size > self.max_object_bytes:
            return self.refuse(received, Refusal(
                status.OUT_OF_RESOURCES, "object_too_large", "object larger than the node takes",
                f"{size} bytes, more than intake.max_object_mb ({settings.max_object_mb} MB)"))
        refusal = self._not_accepted(received)
        if refusal is None:
            store = ReceivedStore(received.data_set, received.transfer_syntax, received.declared_sop_class,
                                  received.sop_class_uid, received.sop_instance_uid)
            try:
                refusal = check_store(store, settings.max_pixels, self.max_object_bytes)
            except Exception as exc:  # a bug in a check must not cost a photo: the worker decides then
                log.error(fields(event="intake.check_error", sop=received.sop_instance_uid,
                                 calling_ae=received.calling_ae, reason=f"{type(exc).__name__}: {exc}"))
                refusal = None
        if refusal is not None:
            return self.refuse(received, refusal)
        kind, source_uid = JobKind.PHOTO, None
        if received.sop_class_uid == SEGMENTATION_SOP_CLASS:
            seg = self._segmentation(received)
            if isinstance(seg, Outcome):
                return seg
            kind, source_uid = JobKind.LESION, seg

        uid = received.sop_instance_uid
        try:
            existing = self.store.find(uid)
        except Exception as exc:  # the store is down: the sender must keep the object
            return self._out_of_resources(received, "job store unavailable", exc)
        if existing is not None:
            self._log_duplicate(received, existing.id, existing.state.value)
            self.metrics.received(received.source)
            return Outcome(status.SUCCESS, received.sop_class_uid, uid, job_id=existing.id, duplicate=True)

        try:
            room = self.watermark.reserve(size + _SPOOL_OVERHEAD_BYTES)
        except OSError as exc:
            return self._out_of_resources(received, "cannot read the free disk space", exc)
        if room is None:  # logged by the watermark, once a minute
            self.metrics.rejected("disk_low", received.source)
            low = Refusal(status.OUT_OF_RESOURCES, "disk_low", "node disk space low, send again later")
            return Outcome(status.OUT_OF_RESOURCES, received.sop_class_uid, uid, refusal=low)
        with room:
            try:
                with received.data_set.getbuffer() as body:  # the received bytes, not a copy
                    relative = self.spool.write_photo([PART10_PREAMBLE, encode_file_meta(_file_meta(received)), body])
            except Exception as exc:  # disk full, read-only, permissions: never acknowledge
                return self._out_of_resources(received, "cannot write the spool", exc)
            new = NewJob(
                sop_instance_uid=uid,
                sop_class_uid=received.sop_class_uid,
                transfer_syntax_uid=str(UID(received.transfer_syntax)),
                calling_ae=received.calling_ae,
                calling_host=received.calling_host,
                photo_path=relative,
                kind=kind,
                source_uid=source_uid,
            )
            try:
                job, created = self.store.add_received(new)
            except Exception as exc:
                self.spool.discard(relative)
                return self._out_of_resources(received, "cannot commit the job", exc)
        if not created:  # the same UID arrived on another association (or request) meanwhile
            self.spool.discard(relative)
            self._log_duplicate(received, job.id, job.state.value)
        else:
            self.photo_received.ring()
        self.metrics.received(received.source)
        return Outcome(status.SUCCESS, received.sop_class_uid, uid, job_id=job.id, duplicate=not created)

    def refuse(self, received: Received | None, refusal: Refusal, *, sop_instance_uid: str = "",
               calling_ae: str = "", source: str = SOURCE_DICOM, sop_class_uid: str = "") -> Outcome:
        """Refuse an object (one WARNING line, counted by reason): from :meth:`accept`, or from a door
        that refuses before an object can be handed over (pynetdicom's command checks, a STOW-RS part
        that is not a Part 10 file), which then names the UIDs, caller and source itself."""
        if received is not None:
            sop_instance_uid, sop_class_uid = received.sop_instance_uid, received.sop_class_uid
            calling_ae, source = received.calling_ae, received.source
        log.warning(fields(event="intake.refused", sop=None if refusal.omit_instance_uid else sop_instance_uid or None,
                           calling_ae=calling_ae, status=status.describe(refusal.status), reason=refusal.log_reason,
                           source=None if source == SOURCE_DICOM else source))
        self.metrics.rejected(refusal.reason, source)
        return Outcome(refusal.status, sop_class_uid, sop_instance_uid, refusal=refusal)

    # ------------------------------------------------------------------ internals

    def _segmentation(self, received: Received) -> str | Outcome:
        """A SEG that passed the header checks: the photo it is a lesion mask of, or the outcome for
        one that is not (ignored or refused, per ``lesion.other_segmentations``)."""
        assert self.lesion is not None  # negotiated (or taken over STOW-RS) only with lesion input on
        try:
            received.data_set.seek(0)
            header = dcmread_header(received.data_set, received.transfer_syntax)
            found = classify_segmentation(header, self.lesion)
        except Exception as exc:  # the checks read it already; what is left is an unreadable sequence
            return self.refuse(received, Refusal(status.CANNOT_UNDERSTAND, "unreadable_segmentation",
                                                 "the SEG's segment descriptions cannot be read",
                                                 f"SEG header: {type(exc).__name__}: {exc}"))
        finally:
            received.data_set.seek(0)
        if not found.is_lesion:
            if self.lesion.other_segmentations == "refuse":
                return self.refuse(received, Refusal(
                    status.CANNOT_UNDERSTAND, "not_a_lesion_mask", "SEG is not a lesion mask; not taken here",
                    f"SEG is not a lesion mask ({found.why}); lesion.other_segmentations = refuse"))
            log.info(fields(event="intake.segmentation_ignored", sop=received.sop_instance_uid,
                            calling_ae=received.calling_ae, reason=found.why,
                            source=None if received.source == SOURCE_DICOM else received.source))
            self.metrics.received(received.source)
            return Outcome(status.SUCCESS, received.sop_class_uid, received.sop_instance_uid)
        if found.photo_uid is None:
            return self.refuse(received, Refusal(
                status.CANNOT_UNDERSTAND, "lesion_seg_without_photo", "lesion SEG must reference one source image",
                "lesion SEG references no source image or several (Derivation Image / Source Image / "
                "Referenced Series Sequence): it cannot be joined with one photo"))
        log.info(fields(event="intake.lesion_seg", sop=received.sop_instance_uid, photo=found.photo_uid,
                        segments=",".join(map(str, found.segments)), rule=found.why))
        return found.photo_uid

    def _not_accepted(self, received: Received) -> Refusal | None:
        """A SOP class or transfer syntax the node does not take. A C-STORE never gets here with one
        (its presentation context was negotiated); a STOW-RS instance can, and is refused with the
        Failure Reasons PS3.18 Annex I (Table I.2-2) gives for them."""
        settings = self.settings
        sop_class = received.declared_sop_class
        if sop_class == SEGMENTATION_SOP_CLASS and self.lesion_input:
            syntax = received.transfer_syntax
            if uid_problem(syntax) is None and syntax not in SEG_TRANSFER_SYNTAXES:
                return Refusal(status.TRANSFER_SYNTAX_NOT_SUPPORTED, "transfer_syntax_not_accepted",
                               "transfer syntax not accepted here",
                               f"a SEG is taken in {', '.join(UID(t).name for t in SEG_TRANSFER_SYNTAXES)} only")
            return None
        if uid_problem(sop_class) is None and sop_class not in settings.accepted_sop_classes:
            return Refusal(status.SOP_CLASS_NOT_SUPPORTED, "sop_class_not_accepted", "SOP class not accepted here",
                           f"SOP class {sop_class} ({UID(sop_class).name}) is not in intake.accepted_sop_classes")
        syntax = received.transfer_syntax
        if uid_problem(syntax) is None and syntax not in settings.accepted_transfer_syntaxes:
            return Refusal(status.TRANSFER_SYNTAX_NOT_SUPPORTED, "transfer_syntax_not_accepted",
                           "transfer syntax not accepted here",
                           f"transfer syntax {syntax} ({UID(syntax).name}) is not in intake.accepted_transfer_syntaxes")
        return None

    def _log_duplicate(self, received: Received, job_id: int, state: str) -> None:
        log.info(fields(event="intake.duplicate", sop=received.sop_instance_uid, job=job_id, state=state,
                        calling_ae=received.calling_ae,
                        source=None if received.source == SOURCE_DICOM else received.source))

    def _out_of_resources(self, received: Received, what: str, exc: BaseException) -> Outcome:
        self.metrics.rejected("out_of_resources", received.source)
        log.error(fields(event="intake.out_of_resources", sop=received.sop_instance_uid,
                         calling_ae=received.calling_ae, status=status.describe(status.OUT_OF_RESOURCES),
                         reason=f"{what}: {type(exc).__name__}: {exc}",
                         source=None if received.source == SOURCE_DICOM else received.source))
        return Outcome(status.OUT_OF_RESOURCES, received.sop_class_uid, received.sop_instance_uid,
                       comment=f"{what}, send again later")


def dcmread_header(data_set: BytesIO, transfer_syntax: str) -> Dataset:
    """The data set's elements before Pixel Data, read from the received bytes (no File Meta there)."""
    from pydicom.filereader import read_dataset

    syntax = UID(transfer_syntax)
    return read_dataset(data_set, syntax.is_implicit_VR, syntax.is_little_endian,
                        stop_when=lambda tag, vr, length: tag == 0x7FE00010)


def _file_meta(received: Received) -> FileMetaDataset:
    """The spooled file's File Meta Information (PS3.10 7.1), made from the checked UIDs as pynetdicom
    makes it for a C-STORE, whichever door the object came in by: the spool holds one kind of file."""
    return create_file_meta(sop_class_uid=UID(received.sop_class_uid), sop_instance_uid=UID(received.sop_instance_uid),
                            transfer_syntax=UID(received.transfer_syntax))
