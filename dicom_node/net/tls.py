"""DICOM TLS: the contexts both sides use, and a listener that reports every refused handshake.

PS3.15 Annex B.9 (the BCP 195 non-downgrading profile, which dcmtk's ``+py`` also selects) asks
for TLS 1.2 or later and, in TLS 1.2, only the ECDHE/DHE AES-GCM suites below; TLS 1.3 has only
AEAD suites, so OpenSSL's TLS 1.3 defaults stay. Both sides authenticate: the node shows its
certificate, verifies its peer against a configured CA file, and (as intake, by default)
requires a client certificate signed by one of those CAs.

Certificates are read when a context is built: the listener's context once at start and again
on :meth:`IntakeSCP.reload_tls` (SIGHUP), the sending side's for each send, so a renewed
certificate is used without a restart and an association already open keeps the one it began with.

A caller can be pinned to its client certificate's subject, compared as RFC 4514 strings in
``cryptography``'s rendering (:func:`canonical_subject`: most specific RDN first, no spaces,
``CN=modality-1,O=Hospital``), the form ``openssl x509 -noout -subject -nameopt RFC2253`` prints.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pynetdicom.transport import ThreadedAssociationServer

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.events import EventHandlerType

    from dicom_node.config import TlsSettings

log = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
# PS3.15 B.9 / BCP 195 (RFC 9325 4.2): the TLS 1.2 suites of the non-downgrading profile, in
# OpenSSL's names (TLS_ECDHE_{ECDSA,RSA}_WITH_AES_{128,256}_GCM_SHA{256,384},
# TLS_DHE_RSA_WITH_AES_{128,256}_GCM_SHA{256,384}).
BCP195_TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES256-GCM-SHA384",
))


class TlsFilesError(ValueError):
    """A certificate, key or CA file cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class CertificateInfo:
    """What the log says about a loaded certificate (no subject data beyond the names of machines)."""

    subject: str
    serial: int
    not_after: datetime


def _profile(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(BCP195_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)$")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        if exc.reason:
            return str(exc.reason).replace("_", " ").lower()
        return _SSL_SOURCE.sub("", str(exc.strerror or exc))
    if isinstance(exc, OSError):
        return str(exc.strerror or exc)
    return str(exc)


def _read_pem(path: Path, what: str) -> None:
    """Check one PEM file before OpenSSL reads it: OpenSSL says only "PEM lib" for every kind of
    unreadable file, this names the file and what is wrong with it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsFilesError(f"{what} {path}: {exc.strerror or exc}") from None
    try:
        if what == "private key":
            serialization.load_pem_private_key(data, password=None)
        else:
            x509.load_pem_x509_certificates(data)
    except TypeError:  # cryptography's word for a key that needs a password
        raise TlsFilesError(f"{what} {path} is encrypted: the node needs it unencrypted (protect it by its "
                            "file permissions)") from None
    except ValueError:
        kind = "private key" if what == "private key" else "certificate"
        raise TlsFilesError(f"{what} {path} holds no PEM {kind}") from None


def _load_chain(context: ssl.SSLContext, certificate: Path, private_key: Path) -> None:
    _read_pem(certificate, "certificate")
    _read_pem(private_key, "private key")
    try:
        context.load_cert_chain(certfile=certificate, keyfile=private_key)
    except (ssl.SSLError, OSError) as exc:
        mismatch = isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH"
        why = "the key does not belong to the certificate" if mismatch else _reason(exc)
        raise TlsFilesError(f"cannot use certificate {certificate} with private key {private_key}: {why}") from None


def _load_cas(context: ssl.SSLContext, ca_certificates: Path) -> None:
    _read_pem(ca_certificates, "CA certificates")
    try:
        context.load_verify_locations(cafile=ca_certificates)
    except (ssl.SSLError, OSError) as exc:
        raise TlsFilesError(f"cannot read CA certificates {ca_certificates}: {_reason(exc)}") from None


def server_context(settings: TlsSettings) -> ssl.SSLContext:
    """The listener's context: the node's certificate, and the CAs whose client certificates it accepts.

    ``require_client_certificate`` (the default) makes a missing or unverifiable client
    certificate fail the handshake. Without it a client certificate is still asked for and
    verified when one is sent (so that ``certificate_subject`` pins keep working), as long as
    ``ca_certificates`` is given; with neither, no client certificate is asked for.
    """
    if settings.certificate is None or settings.private_key is None:
        raise TlsFilesError("tls.certificate and tls.private_key are needed for the TLS listener")
    context = _profile(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_chain(context, settings.certificate, settings.private_key)
    if settings.ca_certificates is not None:
        _load_cas(context, settings.ca_certificates)
    if settings.require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_OPTIONAL if settings.ca_certificates is not None else ssl.CERT_NONE
    return context


def client_context(ca_certificates: Path, certificate: Path | None = None,
                   private_key: Path | None = None) -> ssl.SSLContext:
    """The sending side's context: the peer must chain to ``ca_certificates`` and match the host name
    or IP address it is called by (an IP address is checked against the certificate's IP SANs);
    the node shows ``certificate`` when given (peers that require client certificates)."""
    context = _profile(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # CERT_REQUIRED and check_hostname
    _load_cas(context, ca_certificates)
    if certificate is not None and private_key is not None:
        _load_chain(context, certificate, private_key)
    return context


def certificate_info(path: Path) -> CertificateInfo:
    """Subject, serial and expiry of the first certificate in a PEM file (for the log)."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise TlsFilesError(f"cannot read certificate {path}: {_reason(exc)}") from None
    return CertificateInfo(cert.subject.rfc4514_string(), cert.serial_number, cert.not_valid_after_utc)


def describe_handshake_error(exc: BaseException) -> str:
    """Why a TLS handshake failed, in words an administrator can act on."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, TimeoutError):
        return "no TLS handshake within the timeout"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or "").upper()
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE"):
            return f"not a TLS client ({_reason(exc)}; plain DICOM on the TLS port?)"
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no client certificate"
        if isinstance(exc, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
            return "connection closed during the TLS handshake"
        return _reason(exc)
    if isinstance(exc, ConnectionError) or (isinstance(exc, OSError) and not exc.strerror):
        return "connection closed during the TLS handshake"
    return _reason(exc)


# ---------------------------------------------------------------------------------- the listener

RefusalHandler = Callable[[str, int, str], None]  # (host, port, reason)


class TlsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved off the accept loop.

    pynetdicom's own server wraps each accepted socket in the accepting thread, with a blocking
    handshake and no timeout: one client that connects and says nothing stops the listener, and a
    failed handshake vanishes without a word. Here the accept loop only wraps; the handshake runs
    in the connection's own thread with ``handshake_timeout_s``, and a failure is handed to
    ``on_refused`` (one log line, no traceback) before the socket is closed.

    The context is read once per accepted connection, so replacing :attr:`ssl_context` (a
    certificate reload) applies to new connections while open ones keep theirs.
    """

    handshake_timeout_s: float = 30.0
    on_refused: RefusalHandler | None = None
    # the connection thread only shakes hands and starts the association's own (daemon) thread: a
    # client stalling its handshake must not hold up the process's exit
    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        client_socket, address = self.socket.accept()
        context = self.ssl_context
        if context is None:  # never configured so; refuse rather than speak plain DICOM on a TLS port
            client_socket.close()
            raise OSError("the TLS listener has no context")
        return context.wrap_socket(client_socket, server_side=True, do_handshake_on_connect=False), address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(self.handshake_timeout_s)
            request.do_handshake()
            request.settimeout(None)  # as pynetdicom's plain sockets: its reactor polls with select
        except (OSError, ValueError) as exc:
            if self.on_refused is not None:
                self.on_refused(str(client_address[0]), int(client_address[1]), describe_handshake_error(exc))
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)


def start_tls_server(ae: AE, address: tuple[str, int], context: ssl.SSLContext,
                     handlers: list[EventHandlerType], handshake_timeout_s: float,
                     on_refused: RefusalHandler) -> TlsAssociationServer:
    """Serve ``ae`` over TLS on ``address`` in a background thread (as ``AE.start_server(block=False)``
    does, with :class:`TlsAssociationServer`); the same AE may serve a plain port besides."""
    server = ae.make_server(address, ssl_context=context, evt_handlers=handlers,
                            server_class=TlsAssociationServer)
    assert isinstance(server, TlsAssociationServer)
    server.handshake_timeout_s = handshake_timeout_s
    server.on_refused = on_refused
    thread = threading.Thread(target=server.serve_forever, name=f"TlsAcceptor@{address[1]}", daemon=True)
    thread.start()
    ae._servers.append(server)  # as start_server does: active_associations and shutdown() look there
    return server


class _NoTlsTraceback(logging.Filter):
    """pynetdicom logs a failed TLS connect (or a peer's TLS alert) twice, the second time with a
    traceback; the first line already says why, and the node's own line names the peer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ssl.SSLError))


for _name in ("pynetdicom.transport", "pynetdicom.dul"):
    logging.getLogger(_name).addFilter(_NoTlsTraceback())
