"""Certificate subjects as callers are pinned by them: one canonical RFC 4514 form.

Apart from :mod:`dicom_node.net.tls` so that the configuration can check a pin without importing
the TLS machinery (which itself reads the configuration's TLS section).
"""

from __future__ import annotations

import re
import socket
import ssl

from cryptography import x509

_SEPARATOR_SPACES = re.compile(r"(?<!\\)\s*([,+])\s*")
_ATTRIBUTE_TYPE = re.compile(r"(^|(?<!\\)[,+])([A-Za-z][A-Za-z0-9-]*)\s*=\s*")


def canonical_subject(text: str) -> str:
    """``text`` as an RFC 4514 distinguished name in the one form pins are compared in.

    Spaces around separators and lower-case attribute types are accepted ("cn=a, o=B" is
    "CN=a,O=B"); the order is kept (RFC 4514 lists the most specific RDN first). Raises
    ``ValueError`` when the text is not a distinguished name.
    """
    cleaned = _SEPARATOR_SPACES.sub(r"\1", text.strip())
    cleaned = _ATTRIBUTE_TYPE.sub(lambda m: f"{m.group(1)}{m.group(2).upper()}=", cleaned)
    try:
        name = x509.Name.from_rfc4514_string(cleaned)
    except ValueError:
        raise ValueError(f"{text!r} is not an RFC 4514 distinguished name (e.g. 'CN=modality-1,O=Hospital')") \
            from None
    if not len(name):
        raise ValueError("an empty distinguished name pins nothing")
    return name.rfc4514_string()


def peer_certificate_subject(sock: socket.socket | None) -> str | None:
    """The subject of the verified client certificate on an accepted TLS socket, in
    :func:`canonical_subject` form; None on a plain socket or without a client certificate."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    der = sock.getpeercert(binary_form=True)
    if not der:
        return None
    return str(x509.load_der_x509_certificate(der).subject.rfc4514_string())
