"""Intake: the C-ECHO / C-STORE SCP. It accepts, persists and answers; nothing else.

What it promises a PACS:

* Only configured callers get an association (AE title, optionally pinned to a host); only the
  accepted SOP classes are negotiated, in the transfer syntaxes the decoder reads.
* A C-STORE is answered with success only after the photo is in the spool (atomic, fsynced) and its
  job is committed to the job store. Anything that prevents that is answered with 0xA700 (out of
  resources): the sender keeps the object and retries, so nothing acknowledged is ever lost.
* A SOP Instance UID that already has a job is acknowledged again but makes no new job (Orthanc
  and many PACS resend on retry): one photo, one set of results.

The handlers never decode pixels or touch the model: an association costs a disk write and a
commit, so a slow parse never makes a PACS time out.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from io import BytesIO
from typing import cast

from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import from pynetdicom's tables
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.config import IntakeSettings, Listener, Peers
from dicom_node.logs import fields
from dicom_node.monitor.metrics import StageMetrics
from dicom_node.net import status
from dicom_node.net.connection import no_delay
from dicom_node.queue.doorbell import Doorbell
from dicom_node.queue.job import NewJob
from dicom_node.queue.store import JobStore
from dicom_node.spool.base import Spool

log = logging.getLogger(__name__)


_PREAMBLE = b"\x00" * 128 + b"DICM"


def part10_chunks(event: Event) -> list[bytes | memoryview]:
    """The received object as DICOM Part 10 (PS3.10 section 7.1: preamble, "DICM", File Meta
    Information, then the data set exactly as sent), in pieces that reference the received
    buffer instead of copying 1 MB into one more ``bytes``."""
    data_set = cast(C_STORE, event.request).DataSet
    body = data_set.getbuffer() if isinstance(data_set, BytesIO) else memoryview(event.encoded_dataset(False))
    return [_PREAMBLE, encode_file_meta(event.file_meta), body]


@dataclass(eq=False)
class IntakeSCP:
    """The node's receiving application entity, started without blocking.

    ``photo_received`` is rung for every new job (the workers wait on it).
    """

    listener: Listener
    settings: IntakeSettings
    peers: Peers
    store: JobStore
    spool: Spool
    metrics: StageMetrics
    photo_received: Doorbell
    received: int = field(default=0, init=False)  # photos acknowledged since start (new jobs and duplicates)
    _server: ThreadedAssociationServer | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        intake = self.settings
        ae = AE(ae_title=self.listener.ae_title)
        ae.maximum_associations = intake.max_associations
        ae.maximum_pdu_size = intake.max_pdu_bytes
        ae.acse_timeout = intake.acse_timeout_s
        ae.dimse_timeout = intake.dimse_timeout_s
        ae.network_timeout = intake.network_timeout_s
        ae.require_called_aet = True
        # Calling AE titles (and hosts) are checked in _on_requested, which can also see the host.
        ae.add_supported_context(Verification)
        for sop_class in intake.accepted_sop_classes:
            ae.add_supported_context(sop_class, intake.accepted_transfer_syntaxes)
        return ae

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Listen on the configured address and port; returns once the socket is listening."""
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_CONN_OPEN, no_delay),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        listener = self.listener
        self._server = self.ae.start_server((listener.bind_address, listener.port), block=False,
                                            evt_handlers=handlers)
        log.info(fields(event="intake.listening", ae_title=listener.ae_title, address=listener.bind_address,
                        port=self.port))

    @property
    def port(self) -> int:
        """The port actually bound (the configured one, or the kernel's choice for port 0)."""
        if self._server is None:
            return self.listener.port
        return int(self._server.server_address[1])

    @property
    def listening(self) -> bool:
        """Whether the DICOM port takes associations now (between start and stop)."""
        return self._server is not None

    @property
    def open_associations(self) -> int:
        return len(self.ae.active_associations)

    def stop(self) -> None:
        """Stop listening and end open associations (their unacknowledged objects are resent by peers)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            log.info(fields(event="intake.stopped", received=self.received))

    # ------------------------------------------------------------------ handlers

    def _on_requested(self, event: Event) -> None:
        """Reject an association from an AE title (or host) that is not in ``callers``."""
        requestor = event.assoc.requestor
        # requestor.ae_title is only filled in by the negotiation that follows this event
        primitive = requestor.primitive
        calling_ae = str(primitive.calling_ae_title or "").strip() if primitive is not None else ""
        host = requestor.address
        if self.peers.caller(calling_ae, host) is None:
            log.warning(fields(event="intake.rejected", calling_ae=calling_ae, host=host,
                               reason="calling AE title not configured for this host"))
            self._rejected("calling_ae_not_recognised")
            event.assoc.acse.send_reject(
                status.REJECTED_PERMANENT, status.SOURCE_SERVICE_USER, status.REASON_CALLING_AE_NOT_RECOGNISED
            )
            # as pynetdicom's own rejection does: wait until the A-ASSOCIATE-RJ is out before the
            # server closes the socket, or the peer only sees a dropped connection
            event.assoc.kill()

    def _on_echo(self, event: Event) -> int:
        return status.SUCCESS

    def _on_store(self, event: Event) -> int:
        """Spool the object as sent (no decoding), commit its job, then acknowledge."""
        request = cast(C_STORE, event.request)  # the event this handler is bound to
        sop_instance_uid = str(request.AffectedSOPInstanceUID or "").strip()
        sop_class_uid = str(request.AffectedSOPClassUID or "").strip()
        calling_ae = event.assoc.requestor.ae_title.strip()
        host = event.assoc.requestor.address
        if not sop_instance_uid or not sop_class_uid:
            log.warning(fields(event="intake.refused", calling_ae=calling_ae,
                               reason="C-STORE without Affected SOP Class/Instance UID"))
            self._rejected("missing_uids")
            return status.CANNOT_UNDERSTAND
        try:
            existing = self.store.find(sop_instance_uid)
        except Exception as exc:  # the store is down: the sender must keep the object
            return self._out_of_resources(sop_instance_uid, calling_ae, "job store unavailable", exc)
        if existing is not None:
            self._count()
            log.info(fields(event="intake.duplicate", sop=sop_instance_uid, job=existing.id,
                            state=existing.state.value, calling_ae=calling_ae))
            return status.SUCCESS

        try:
            relative = self.spool.write_photo(part10_chunks(event))
        except Exception as exc:  # disk full, read-only, permissions: never acknowledge
            return self._out_of_resources(sop_instance_uid, calling_ae, "cannot write the spool", exc)
        new = NewJob(
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            transfer_syntax_uid=str(UID(event.context.transfer_syntax)),  # one per accepted context
            calling_ae=calling_ae,
            calling_host=host,
            photo_path=relative,
        )
        try:
            job, created = self.store.add_received(new)
        except Exception as exc:
            self.spool.discard(relative)
            return self._out_of_resources(sop_instance_uid, calling_ae, "cannot commit the job", exc)
        if not created:  # the same UID arrived on another association meanwhile
            self.spool.discard(relative)
            log.info(fields(event="intake.duplicate", sop=sop_instance_uid, job=job.id, state=job.state.value,
                            calling_ae=calling_ae))
        else:
            self.photo_received.ring()
        self._count()
        return status.SUCCESS

    def _count(self) -> None:
        with self._lock:
            self.received += 1
        self.metrics.received()

    def _rejected(self, reason: str) -> None:
        self.metrics.rejected(reason)

    def _out_of_resources(self, sop_instance_uid: str, calling_ae: str, what: str, exc: BaseException) -> int:
        self._rejected("out_of_resources")
        log.error(fields(event="intake.out_of_resources", sop=sop_instance_uid, calling_ae=calling_ae,
                         status=status.describe(status.OUT_OF_RESOURCES),
                         reason=f"{what}: {type(exc).__name__}: {exc}"))
        return status.OUT_OF_RESOURCES
