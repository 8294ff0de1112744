"""The node's C-STORE / C-ECHO client: what dispatch, ``dicom-node echo`` and ``dicom-node send`` use.

pynetdicom never transcodes, and a peer given several transfer syntaxes in one presentation
context may pick one the object is not in, which makes the send fail. So each file's
(SOP class, transfer syntax) gets a context of its own, plus separate uncompressed contexts as a
fallback: explicit and implicit little endian convert into each other on the fly, and a
compressed object is decompressed only when the peer accepts nothing else.

A destination with ``tls = true`` is called over DICOM TLS (PS3.15 Annex B.9): its certificate
must chain to its ``ca_certificates`` and name its host (an IP address is matched against the
certificate's IP SANs), and the node shows its client certificate when one is configured. The
context is built from the files for each send (:func:`tls_args`), so renewed certificates are
used from the next send on without a restart.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import from pynetdicom's tables

from dicom_node.net import status
from dicom_node.net.connection import no_delay
from dicom_node.net.tls import TlsFilesError, client_context, describe_handshake_error

log = logging.getLogger(__name__)

# Files sent by path are streamed from disk as they are, instead of being read into a Dataset and
# encoded again: a 12 MP overlay (36 MB) goes out in a third of the time. Only paths are affected.
_config.STORE_SEND_CHUNKED_DATASET = True

MAX_REQUESTED_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context ids are odd numbers 1..255
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class PeerLike(Protocol):
    """A configured destination or a :class:`Peer`: read-only AE title, host and port, and how to
    reach it over TLS."""

    @property
    def ae_title(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def tls(self) -> bool: ...
    @property
    def ca_certificates(self) -> Path | None: ...
    @property
    def certificate(self) -> Path | None: ...
    @property
    def private_key(self) -> Path | None: ...


@dataclass(frozen=True)
class Peer:
    """A remote application entity (over TLS when ``tls``; see :class:`dicom_node.config.Destination`)."""

    ae_title: str
    host: str
    port: int
    tls: bool = False
    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class AssociationError(RuntimeError):
    """No association: the peer is unreachable, rejected us, or aborted."""


@dataclass(frozen=True)
class StoreOutcome:
    path: Path
    sop_instance_uid: str
    status: int | None  # None: no response (the association broke) or not sent
    error: str | None = None

    @property
    def stored(self) -> bool:
        return self.status is not None and status.is_stored(self.status)

    def describe(self) -> str:
        if self.error:
            return self.error
        return status.describe(self.status) if self.status is not None else "no response"


def _new_ae(calling_ae: str, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.maximum_pdu_size = 0  # no limit on what we receive; peers choose what we send
    return ae


TlsArgs = tuple[ssl.SSLContext, str]
TLS_PROBE_WAIT_S = 2.0  # how long the diagnosis of a failed TLS association waits for the peer's alert


def tls_args(peer: PeerLike) -> TlsArgs | None:
    """pynetdicom's ``tls_args`` for ``peer`` (None: plain TCP), read from its files now.

    Raises :class:`AssociationError` when a file cannot be used: the send fails with that reason
    and is retried on the dispatch schedule, so fixed files are picked up without a restart."""
    if not peer.tls:
        return None
    if peer.ca_certificates is None:
        raise AssociationError(f"{peer.ae_title}@{peer.host}:{peer.port}: TLS needs ca_certificates")
    try:
        context = client_context(peer.ca_certificates, peer.certificate, peer.private_key)
    except TlsFilesError as exc:
        raise AssociationError(f"{peer.ae_title}@{peer.host}:{peer.port}: {exc}") from None
    # server_hostname is what the certificate is checked against (PS3.15 B.9: RFC 9325 6.1 identity check)
    return context, peer.host


def _tls_failure(peer: PeerLike, args: TlsArgs, timeout_s: float) -> str | None:
    """Why a TLS association failed before any A-ASSOCIATE answer, found by one bare handshake.

    pynetdicom reports only that the connection failed. The handshake is repeated on its own: a
    certificate the node rejects fails it here; one the peer rejects (TLS 1.3 finishes the client's
    side before the peer has checked the client certificate) shows as the peer's alert on the first
    read. None when the handshake works now (the failure was something else)."""
    context, hostname = args
    try:
        with socket.create_connection((peer.host, int(peer.port)), timeout=timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=hostname) as tls:
                tls.settimeout(TLS_PROBE_WAIT_S)
                try:
                    if not tls.recv(1):
                        return "the peer closed the connection after the TLS handshake"
                except TimeoutError:
                    return None  # the peer waits for our A-ASSOCIATE-RQ: TLS is fine
    except ssl.SSLError as exc:
        return f"TLS handshake failed: {describe_handshake_error(exc)}"
    except OSError:
        return None
    return None


def _plain_failure(peer: PeerLike, timeout_s: float) -> str:
    """Why a plain association got no A-ASSOCIATE answer, found by one bare TCP connection.

    pynetdicom reports only that the connection failed; a PACS administrator needs to know which
    of three things it was: nothing listens there, nothing answers (host down, a firewall that
    drops), or the port takes the connection and says nothing a DICOM peer would (most often a
    port that speaks DICOM TLS, which closes a plain connection at the first bytes)."""
    try:
        with socket.create_connection((peer.host, int(peer.port)), timeout=min(timeout_s, 3.0)):
            pass
    except ConnectionRefusedError:
        return "connection refused (nothing listens on that port)"
    except TimeoutError:
        return f"no answer within {min(timeout_s, 3.0):g} s (the host is down, or a firewall drops the connection)"
    except OSError as exc:
        return exc.strerror or str(exc)
    return ("the port takes TCP connections but gave no A-ASSOCIATE answer (a port that expects DICOM TLS "
            "closes a plain connection)")


def _associate(ae: AE, peer: PeerLike, contexts: list[PresentationContext],
               tls: TlsArgs | None = None) -> Association:
    assoc = ae.associate(peer.host, int(peer.port), contexts=contexts, ae_title=peer.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, no_delay)], tls_args=tls)
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        raise AssociationError(f"{peer.ae_title}@{peer.host}:{peer.port} rejected the association")
    if tls is not None and assoc.acceptor.primitive is None:
        why = _tls_failure(peer, tls, ae.connection_timeout or 30.0)
        if why is not None:
            raise AssociationError(f"cannot connect to {peer.ae_title}@{peer.host}:{peer.port} over TLS: {why}")
    if assoc.acceptor.primitive is None:  # no A-ASSOCIATE response at all: refused, unreachable, timed out
        why = _plain_failure(peer, ae.connection_timeout or 30.0) if tls is None else "no A-ASSOCIATE answer"
        raise AssociationError(f"cannot connect to {peer.ae_title}@{peer.host}:{peer.port}: {why}")
    if assoc.is_aborted:
        # pynetdicom aborts itself when the peer accepted none of the proposed contexts
        classes = sorted({UID(str(cx.abstract_syntax)).name for cx in contexts})
        raise AssociationError(f"{peer.ae_title}@{peer.host}:{peer.port} aborted the association, or accepted "
                               f"none of the proposed presentation contexts ({', '.join(classes)})")
    raise AssociationError(f"cannot connect to {peer.ae_title}@{peer.host}:{peer.port}")


def echo(peer: PeerLike, calling_ae: str, timeout_s: float = 30.0) -> int:
    """C-ECHO ``peer``; returns the status (raises :class:`AssociationError` when there is no association)."""
    ae = _new_ae(calling_ae, timeout_s)
    assoc = _associate(ae, peer, [build_context(Verification)], tls_args(peer))
    try:
        response = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in response:
        raise AssociationError(f"{peer.ae_title}@{peer.host}:{peer.port} did not answer the C-ECHO")
    return int(response.Status)


@dataclass(frozen=True)
class _FileInfo:
    path: Path
    sop_class_uid: UID
    sop_instance_uid: str
    transfer_syntax_uid: UID


def _file_info(path: Path) -> _FileInfo:
    meta = read_file_meta_info(path)
    return _FileInfo(path, UID(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                     UID(meta.TransferSyntaxUID))


def contexts_for(pairs: Sequence[tuple[str, str]]) -> list[PresentationContext]:
    """One presentation context per (SOP class, transfer syntax), plus uncompressed fallbacks."""
    wanted: list[tuple[str, str]] = []
    for sop_class, ts in pairs:
        for candidate in (ts, *_UNCOMPRESSED):
            if (sop_class, candidate) not in wanted:
                wanted.append((sop_class, candidate))
    return [build_context(sop_class, [ts]) for sop_class, ts in wanted]


def _batches(infos: list[_FileInfo]) -> list[list[_FileInfo]]:
    """Split files so that no association requests more than 128 contexts."""
    batches: list[list[_FileInfo]] = []
    current: list[_FileInfo] = []
    pairs: list[tuple[str, str]] = []
    for info in infos:
        pair = (info.sop_class_uid, info.transfer_syntax_uid)
        trial = pairs if pair in pairs else [*pairs, pair]
        if len(contexts_for(trial)) > MAX_REQUESTED_CONTEXTS and current:
            batches.append(current)
            current, pairs = [], []
            trial = [pair]
        current.append(info)
        pairs = trial
    if current:
        batches.append(current)
    return batches


def _accepted(assoc: Association, sop_class: UID) -> set[UID]:
    return {UID(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class}


def _dataset_to_send(info: _FileInfo, accepted: set[UID]) -> Dataset | Path | None:
    """What to hand pynetdicom: the file itself when the peer accepted its transfer syntax (streamed
    from disk, never decoded), else the dataset in a form the peer accepted, else None."""
    ts = info.transfer_syntax_uid
    if ts in accepted:
        return info.path
    ds = pydicom.dcmread(info.path)
    if not ts.is_compressed and accepted & set(_UNCOMPRESSED):
        return ds  # pynetdicom converts between the uncompressed little endian forms itself
    if ts.is_compressed and ExplicitVRLittleEndian in accepted:
        # the same object in another encoding: it keeps its SOP Instance UID (pydicom would make a new one)
        ds.decompress(generate_instance_uid=False)
        return ds
    return None


def store_files(
    peer: PeerLike,
    paths: Sequence[str | os.PathLike[str]],
    calling_ae: str,
    timeout_s: float = 60.0,
    on_stored: Callable[[StoreOutcome], None] | None = None,
    associations: int = 1,
) -> list[StoreOutcome]:
    """C-STORE every file to ``peer`` (as few associations as the 128-context limit allows).

    Returns one outcome per file, in order; ``on_stored`` is called right after each stored
    object so the caller can record the delivery before the next send. Raises
    :class:`AssociationError` when no association can be made; a failure status or an object the
    peer does not accept is an outcome, not an exception.

    ``associations`` > 1 sends up to that many at once (see :func:`_store_parallel`); the last
    file still goes out after every other file has its answer.
    """
    infos = [_file_info(Path(p)) for p in paths]
    pairs = [(i.sop_class_uid, i.transfer_syntax_uid) for i in infos]
    tls = tls_args(peer)  # once per send: every association of it uses the same certificates
    if associations > 1 and len(infos) > 2 and len(contexts_for(pairs)) <= MAX_REQUESTED_CONTEXTS:
        return _store_parallel(peer, infos, calling_ae, timeout_s, on_stored, associations, tls)
    outcomes: list[StoreOutcome] = []
    ae = _new_ae(calling_ae, timeout_s)
    for batch in _batches(infos):
        assoc = _associate(ae, peer, contexts_for([(i.sop_class_uid, i.transfer_syntax_uid) for i in batch]), tls)
        try:
            for index, info in enumerate(batch):
                if not assoc.is_established:
                    outcomes.extend(StoreOutcome(i.path, i.sop_instance_uid, None, "association ended early")
                                    for i in batch[index:])
                    break
                outcome = _store_one(assoc, info)
                outcomes.append(outcome)
                if outcome.stored and on_stored is not None:
                    on_stored(outcome)
        finally:
            if assoc.is_established:
                assoc.release()
    return outcomes


def _balanced_groups(infos: list[_FileInfo], count: int) -> list[list[int]]:
    """Indices of ``infos`` in ``count`` groups of about equal bytes (largest first onto the lightest
    group), each group in list order."""
    sizes = [info.path.stat().st_size for info in infos]
    groups: list[list[int]] = [[] for _ in range(min(count, len(infos)))]
    loads = [0] * len(groups)
    for index in sorted(range(len(infos)), key=lambda i: -sizes[i]):
        lightest = loads.index(min(loads))
        groups[lightest].append(index)
        loads[lightest] += sizes[index]
    return [sorted(group) for group in groups if group]


def _store_parallel(peer: PeerLike, infos: list[_FileInfo], calling_ae: str, timeout_s: float,
                    on_stored: Callable[[StoreOutcome], None] | None, associations: int,
                    tls: TlsArgs | None = None) -> list[StoreOutcome]:
    """All files but the last on up to ``associations`` associations at once, then the last one.

    A PACS stores each association's objects in a thread of its own, so a job's 36 MB overlay
    and 13 MB SEG go in together: measured against Orthanc here, SEG + SC + SR of a 12 MP
    photo took 0.72 s this way and 0.86 s one after another (median of 4; with the SR not
    waiting for the others, 0.58 s: Orthanc spends ~80 ms on any object, even a 31 KB SR).

    * The first association is requested alone, the others once it is answered (a PACS that
      allows one association per caller could refuse two that arrive together), and none when
      it failed: a PACS that is down costs one connect timeout, not one per association.
    * Each association is released as soon as its files are answered, so a PACS that serves
      one association at a time (dcmtk's storescp without --fork) takes them in turn.
    * The association that finishes last carries the files of any association that was refused
      and then the last file (the SR, which references the others), so the SR arrives after
      what it cites. When that one was itself refused, a new association carries them once
      every other is released.
    """
    tail = len(infos) - 1
    groups = _balanced_groups(infos[:-1], associations)
    contexts = contexts_for([(i.sop_class_uid, i.transfer_syntax_uid) for i in infos])  # any may send any file
    outcomes: dict[int, StoreOutcome] = {}
    leftovers: list[int] = []  # files of refused associations
    lock = threading.Lock()
    unfinished = [len(groups)]
    first_answered = threading.Event()
    first_error: list[AssociationError] = []

    def send(assoc: Association, indices: list[int]) -> None:
        for index in indices:
            info = infos[index]
            if not assoc.is_established:
                outcomes[index] = StoreOutcome(info.path, info.sop_instance_uid, None, "association ended early")
                continue
            outcomes[index] = outcome = _store_one(assoc, info)
            if outcome.stored and on_stored is not None:
                on_stored(outcome)

    def run(group: list[int], first: bool) -> None:
        assoc: Association | None = None
        if not first:
            first_answered.wait()
        try:
            if first or not first_error:
                assoc = _associate(_new_ae(calling_ae, timeout_s), peer, contexts, tls)
        except AssociationError as exc:
            if first:
                first_error.append(exc)  # before the event: the others see it and do not try
        finally:
            if first:
                first_answered.set()
        try:
            if assoc is not None:
                send(assoc, group)
            with lock:
                if assoc is None:
                    leftovers.extend(group)
                unfinished[0] -= 1
                last = unfinished[0] == 0
            if last and assoc is not None and assoc.is_established:
                send(assoc, sorted(leftovers) + [tail])
        finally:
            if assoc is not None and assoc.is_established:
                assoc.release()

    with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="store") as pool:
        futures = [pool.submit(run, group, i == 0) for i, group in enumerate(groups)]
    for future in futures:
        future.result()  # a failure of the caller's on_stored (or a bug) surfaces here
    if first_error:
        raise first_error[0]  # nothing was sent: the peer is unreachable or refuses us
    if tail not in outcomes:  # the last to finish had been refused: every other is released by now
        rest = [i for i in sorted(leftovers) + [tail] if i not in outcomes]
        try:
            assoc = _associate(_new_ae(calling_ae, timeout_s), peer, contexts, tls)
        except AssociationError as exc:  # some files went out: the others are outcomes, not an exception
            for index in rest:
                info = infos[index]
                outcomes[index] = StoreOutcome(info.path, info.sop_instance_uid, None, str(exc))
        else:
            try:
                send(assoc, rest)
            finally:
                if assoc.is_established:
                    assoc.release()
    return [outcomes[i] for i in range(len(infos))]  # send() gave every file an outcome


def _store_one(assoc: Association, info: _FileInfo) -> StoreOutcome:
    accepted = _accepted(assoc, info.sop_class_uid)
    if not accepted:
        return StoreOutcome(info.path, info.sop_instance_uid, None,
                            f"peer does not accept SOP class {info.sop_class_uid} ({info.sop_class_uid.name})")
    ds = _dataset_to_send(info, accepted)
    if ds is None:
        names = ", ".join(sorted(UID(u).name for u in accepted))
        return StoreOutcome(info.path, info.sop_instance_uid, None,
                            f"peer accepts {info.sop_class_uid.name} only as {names}, not as "
                            f"{info.transfer_syntax_uid.name}")
    response = assoc.send_c_store(ds)
    if "Status" not in response:
        return StoreOutcome(info.path, info.sop_instance_uid, None, "no C-STORE response (timeout or abort)")
    code = int(response.Status)
    return StoreOutcome(info.path, info.sop_instance_uid, code,
                        None if status.is_stored(code) else f"peer answered {status.describe(code)}")
