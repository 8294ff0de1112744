"""Intake: the C-ECHO / C-STORE SCP. It accepts, persists and answers; nothing else.

What it promises a PACS:

* Only configured callers get an association (AE title, optionally pinned to a host and, over
  DICOM TLS, to a client certificate subject); only the accepted SOP classes are negotiated, in
  the transfer syntaxes the decoder reads, and Segmentation Storage (lesion masks) in Explicit and
  Implicit VR Little Endian when ``[lesion] enabled``.
* With ``[tls] enabled`` a second listener speaks DICOM TLS (PS3.15 Annex B.9, port 2762 by
  convention) to the same AE and handlers; a failed handshake is one log line, and SIGHUP
  (:meth:`IntakeSCP.reload_tls`) swaps in renewed certificates without dropping associations.
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
from dataclasses import InitVar, dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from typing import cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import from pynetdicom's tables
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.config import IntakeSettings, Listener, Peers
from dicom_node.decode.lesion_seg import SEG_TRANSFER_SYNTAXES, SEGMENTATION_SOP_CLASS
from dicom_node.intake.accept import Acceptor, Received
from dicom_node.intake.checks import ReceiveGuard
from dicom_node.intake.watermark import MB, DiskWatermark
from dicom_node.logs import fields
from dicom_node.monitor.metrics import StageMetrics
from dicom_node.net import status
from dicom_node.net.connection import no_delay
from dicom_node.net.subjects import peer_certificate_subject
from dicom_node.net.tls import (
    TlsAssociationServer,
    TlsFilesError,
    certificate_info,
    server_context,
    start_tls_server,
)
from dicom_node.queue.doorbell import Doorbell
from dicom_node.queue.store import JobStore
from dicom_node.spool.base import Spool

log = logging.getLogger(__name__)


@dataclass(eq=False)
class IntakeSCP:
    """The node's receiving application entity, started without blocking.

    ``photo_received`` is rung for every new job (the workers wait on it). ``acceptor``: the node's
    one :class:`~dicom_node.intake.accept.Acceptor`, shared with the STOW-RS route; without it the SCP
    makes its own over ``store``, ``spool``, ``metrics`` and ``photo_received``.
    """

    listener: Listener
    settings: IntakeSettings
    peers: Peers
    store: JobStore
    spool: Spool
    metrics: StageMetrics
    photo_received: Doorbell
    acceptor: InitVar[Acceptor | None] = None
    received: int = field(default=0, init=False)  # photos acknowledged since start (new jobs and duplicates)
    _server: ThreadedAssociationServer | None = field(default=None, init=False, repr=False)
    _tls_server: TlsAssociationServer | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    # the disk the spool writes to, held above intake.min_free_disk_mb (read by /readyz too)
    watermark: DiskWatermark = field(init=False, repr=False)
    # catches what pynetdicom would drop or choke on before _on_store is called
    guard: ReceiveGuard = field(init=False, repr=False)
    _acceptor: Acceptor = field(init=False, repr=False)

    def __post_init__(self, acceptor: Acceptor | None) -> None:
        self._acceptor = acceptor or Acceptor(self.settings, self.store, self.spool, self.metrics, self.photo_received)
        self.watermark = self._acceptor.watermark
        self.guard = ReceiveGuard(self.settings.max_object_mb * MB, self.metrics)
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
        if self._acceptor.lesion_input:
            # Lesion masks (issue 15): Segmentation Storage only when [lesion] is enabled, and only in
            # the uncompressed syntaxes its reader takes (see dicom_node.decode.lesion_seg).
            ae.add_supported_context(SEGMENTATION_SOP_CLASS, list(SEG_TRANSFER_SYNTAXES))
        return ae

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Listen on the plain port and/or the TLS port; returns once the sockets are listening.

        Both listeners serve the one AE with the same handlers. The TLS files are read before
        anything listens, so unusable files raise :class:`TlsFilesError` with nothing started;
        a port in use raises ``OSError`` (for the TLS port, saying so) with nothing left listening.
        """
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_CONN_OPEN, no_delay),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            *self.guard.handlers(),
        ]
        listener = self.listener
        tls = listener.tls
        context = server_context(tls) if tls is not None else None
        if listener.plain:
            self._server = self.ae.start_server((listener.bind_address, listener.port), block=False,
                                                evt_handlers=handlers)
            log.info(fields(event="intake.listening", ae_title=listener.ae_title, address=listener.bind_address,
                            port=self.port))
        if tls is not None and context is not None:
            try:
                self._tls_server = start_tls_server(self.ae, (listener.bind_address, tls.port), context, handlers,
                                                    self.settings.acse_timeout_s, self._on_tls_refused)
            except OSError as exc:
                self.stop()
                raise OSError(exc.errno, f"{exc.strerror or exc} (the DICOM TLS port {tls.port})") from exc
            log.info(fields(event="intake.listening", ae_title=listener.ae_title, address=listener.bind_address,
                            port=self.tls_port, tls="true",
                            client_certificate="required" if tls.require_client_certificate else "optional"))
            self._log_certificate("intake.tls_certificate")

    @property
    def port(self) -> int:
        """The port actually bound (the configured one, or the kernel's choice for port 0): the plain
        listener's, or the TLS listener's when only that one listens (``plain_listener = false``)."""
        if self._server is not None:
            return int(self._server.server_address[1])
        if not self.listener.plain and self.listener.tls is not None:
            return self.tls_port or self.listener.tls.port
        return self.listener.port

    @property
    def tls_port(self) -> int | None:
        """The DICOM TLS port actually bound; None without a TLS listener."""
        if self._tls_server is not None:
            return int(self._tls_server.server_address[1])
        return self.listener.tls.port if self.listener.tls is not None else None

    @property
    def listening(self) -> bool:
        """Whether a DICOM port takes associations now (between start and stop)."""
        return self._server is not None or self._tls_server is not None

    def reload_tls(self) -> bool:
        """Read the TLS certificate, key and CA files again and use them for new connections (SIGHUP).

        Associations already open keep the context they were accepted with. Files that cannot be
        used leave the previous context in place and are logged as an ERROR: a half-renewed
        certificate never takes the listener down. Returns whether the new files are in use.
        """
        server, tls = self._tls_server, self.listener.tls
        if server is None or tls is None:
            return False
        try:
            context = server_context(tls)
        except TlsFilesError as exc:
            log.error(fields(event="intake.tls_reload_failed", reason=str(exc), kept="the previous certificates"))
            return False
        server.ssl_context = context
        self._log_certificate("intake.tls_reloaded")
        return True

    def _log_certificate(self, event: str) -> None:
        tls = self.listener.tls
        if tls is None or tls.certificate is None:
            return
        try:
            info = certificate_info(tls.certificate)
        except TlsFilesError as exc:  # loaded by OpenSSL but not readable here: say so, keep going
            log.warning(fields(event=event, reason=str(exc)))
            return
        expired = info.not_after <= datetime.now(UTC)
        (log.error if expired else log.info)(fields(
            event=event, subject=info.subject, serial=f"{info.serial:x}", not_after=info.not_after.isoformat(),
            expired=expired or None))

    @property
    def open_associations(self) -> int:
        return len(self.ae.active_associations)

    def stop(self) -> None:
        """Stop listening and end open associations (their unacknowledged objects are resent by peers)."""
        servers = [s for s in (self._server, self._tls_server) if s is not None]
        self._server = self._tls_server = None
        for server in servers:
            server.shutdown()
        if servers:
            log.info(fields(event="intake.stopped", received=self.received))

    # ------------------------------------------------------------------ handlers

    def _on_requested(self, event: Event) -> None:
        """Reject an association from an AE title (or host, or client certificate) not in ``callers``.

        Over TLS the handshake has verified the client certificate by now; its subject is what a
        caller's ``certificate_subject`` pin is compared with (a pinned caller is never admitted
        over plain TCP: there is no certificate there)."""
        requestor = event.assoc.requestor
        # requestor.ae_title is only filled in by the negotiation that follows this event
        primitive = requestor.primitive
        calling_ae = str(primitive.calling_ae_title or "").strip() if primitive is not None else ""
        host = requestor.address
        transport = event.assoc.dul.socket
        subject = peer_certificate_subject(transport.socket if transport is not None else None)
        if self.peers.caller(calling_ae, host, subject) is None:
            # a caller of this AE title and host exists, so only its certificate pin can have failed
            pinned = any(c.ae_title == calling_ae and c.admits_host(host) for c in self.peers.callers)
            if pinned:
                reason = ("client certificate subject not the one this caller is pinned to" if subject is not None
                          else "caller is pinned to a client certificate: TLS with a client certificate needed")
            else:
                reason = "calling AE title not configured for this host"
            log.warning(fields(event="intake.rejected", calling_ae=calling_ae, host=host,
                               certificate_subject=subject, reason=reason))
            self._rejected("certificate_subject" if pinned else "calling_ae_not_recognised")
            event.assoc.acse.send_reject(
                status.REJECTED_PERMANENT, status.SOURCE_SERVICE_USER, status.REASON_CALLING_AE_NOT_RECOGNISED
            )
            # as pynetdicom's own rejection does: wait until the A-ASSOCIATE-RJ is out before the
            # server closes the socket, or the peer only sees a dropped connection
            event.assoc.kill()

    def _on_tls_refused(self, host: str, port: int, reason: str) -> None:
        """A TLS handshake on the TLS port failed (no, unverifiable or expired client certificate,
        plain TCP, timeout): one line, and the connection is closed."""
        log.warning(fields(event="intake.tls_refused", host=host, port=port, reason=reason))
        self._rejected("tls_handshake")

    def _on_echo(self, event: Event) -> int:
        return status.SUCCESS

    def _on_store(self, event: Event) -> int | Dataset:
        """Refuse what pynetdicom flagged while the request arrived, then hand the object to the
        node's :class:`~dicom_node.intake.accept.Acceptor` (size, header checks, duplicate, disk
        watermark, spool, commit) and answer with the status it gives.

        What can never become a photo is refused at once with the standard's status and an Error
        Comment (:mod:`dicom_node.intake.checks`); a disk below its watermark answers 0xA700 before
        anything is written (:mod:`dicom_node.intake.watermark`).
        """
        request = cast(C_STORE, event.request)  # the event this handler is bound to
        sop_instance_uid = str(request.AffectedSOPInstanceUID or "").strip()
        sop_class_uid = str(request.AffectedSOPClassUID or "").strip()
        calling_ae = event.assoc.requestor.ae_title.strip()

        # a command UID pynetdicom could not take (swapped for a stand-in), an object dropped as it arrived
        early = self.guard.take_refusal(event.assoc, request.MessageID)
        if early is not None:
            return self._acceptor.refuse(None, early, sop_instance_uid=sop_instance_uid, calling_ae=calling_ae,
                                         sop_class_uid=sop_class_uid).dimse_response()
        data_set = request.DataSet if isinstance(request.DataSet, BytesIO) else BytesIO(event.encoded_dataset(False))
        outcome = self._acceptor.accept(Received(
            data_set=data_set,
            transfer_syntax=str(UID(event.context.transfer_syntax)),  # one per accepted context
            declared_sop_class=str(event.context.abstract_syntax),
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            calling_ae=calling_ae,
            calling_host=event.assoc.requestor.address,
        ))
        if outcome.stored:
            with self._lock:
                self.received += 1
        return outcome.dimse_response()

    def _rejected(self, reason: str) -> None:
        self.metrics.rejected(reason)
