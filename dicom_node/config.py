"""The node's one configuration model: a TOML file, overridden by ``DICOM_NODE_*`` environment variables.

Everything the running node needs is here and validated before anything starts, so a typo in
``node.toml`` stops the node with a message that names the key instead of surfacing hours later
as a photo that went nowhere. Precedence, highest first: environment variables (nested keys with
``__``, e.g. ``DICOM_NODE_DISPATCH__MAX_ATTEMPTS=5``; lists as JSON), the TOML file, the defaults
below. ``config/node.example.toml`` explains every key.
"""

from __future__ import annotations

import contextvars
import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydicom.uid import UID

from dicom_node.decode.supported import (
    DECODABLE_SOP_CLASSES,
    DECODABLE_TRANSFER_SYNTAXES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_PHOTO_SOP_CLASSES,
    DecodeLimits,
)
from dicom_node.encode.options import EncodeOptions
from dicom_node.model.names import DEFAULT_MODEL_DIR, PostprocessMode
from dicom_node.model.runtime.names import DEFAULT_MAX_RSS_MIB, RuntimeName

ENV_PREFIX = "DICOM_NODE_"
ENV_NESTED_DELIMITER = "__"
DEFAULT_CONFIG_PATH = Path("config/node.toml")
CONFIG_PATH_ENV = "DICOM_NODE_CONFIG"

SENDER = "@sender"  # in routing.rules[].send_to: the destination configured for the calling AE

_AE_MAX = 16  # VR AE: at most 16 characters (PS3.5 6.2)
_PORT_MAX = 65535

# The TOML file the current load reads; a context variable so that loading is re-entrant.
_toml_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("dicom_node_toml_path", default=None)


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and says what is wrong."""


def _check_ae_title(value: str) -> str:
    """AE titles (VR AE): 1..16 characters of the default repertoire, no backslash, not all spaces."""
    stripped = value.strip()
    if not stripped:
        raise ValueError("an AE title cannot be empty")
    if len(value) > _AE_MAX:
        raise ValueError(f"AE title {value!r} is {len(value)} characters long; DICOM allows {_AE_MAX}")
    if "\\" in value or any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        raise ValueError(f"AE title {value!r} may only hold printable ASCII characters and no backslash")
    return stripped


def _uid_from_name(value: str, what: str) -> str:
    """Accept a UID or pydicom's keyword for it ('JPEGBaseline8Bit'), return the UID."""
    value = value.strip()
    if value and value[0].isdigit():
        return value
    import pydicom.uid as uids

    uid = getattr(uids, value, None)
    if isinstance(uid, UID):
        return str(uid)
    raise ValueError(f"{value!r} is neither a {what} UID nor a pydicom name of one")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IntakeSettings(_Section):
    """What the C-STORE SCP negotiates and how long it waits."""

    # VL Photographic, and Dermoscopic Photography for skin-lesion follow-up (same photo forms)
    accepted_sop_classes: list[str] = Field(default_factory=lambda: list(DEFAULT_PHOTO_SOP_CLASSES))
    accepted_transfer_syntaxes: list[str] = Field(default_factory=lambda: list(DECODABLE_TRANSFER_SYNTAXES))
    max_associations: int = Field(default=10, ge=1, le=256)
    max_pdu_bytes: int = Field(
        default=16 * 1024 * 1024, ge=0,
        description="largest PDU a sender may send: what one association holds in memory before the object's "
                    "size is checked (16 MiB: a 36 MB photo in 3 PDUs); 0: no limit")
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    network_timeout_s: float = Field(default=60.0, gt=0)
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    min_free_disk_mb: int = Field(
        default=1024, ge=0,
        description="below this much free space in data_dir a C-STORE gets 0xA700 before anything is written")
    resume_free_disk_mb: int = Field(
        default=256, ge=0,
        description="hysteresis: once refusing, intake resumes at min_free_disk_mb + this much free space")
    max_object_mb: int = Field(
        default=1024, ge=1,
        description="largest object one C-STORE may spool; larger ones are refused (a 12 MP photo is ~36 MB)")

    @field_validator("accepted_sop_classes")
    @classmethod
    def _sop_classes(cls, values: list[str]) -> list[str]:
        out = [_uid_from_name(v, "SOP class") for v in values]
        if not out:
            raise ValueError("at least one SOP class must be accepted")
        for uid in out:
            if uid not in DECODABLE_SOP_CLASSES:
                names = ", ".join(sorted(UID(u).name for u in DECODABLE_SOP_CLASSES))
                raise ValueError(f"SOP class {uid} ({UID(uid).name}) cannot be decoded here; choose from {names}")
        return list(dict.fromkeys(out))

    @field_validator("accepted_transfer_syntaxes")
    @classmethod
    def _transfer_syntaxes(cls, values: list[str]) -> list[str]:
        out = [_uid_from_name(v, "transfer syntax") for v in values]
        if not out:
            raise ValueError("at least one transfer syntax must be accepted")
        from pydicom.pixels import get_decoder

        for uid in out:
            if uid not in DECODABLE_TRANSFER_SYNTAXES:
                raise ValueError(f"transfer syntax {uid} ({UID(uid).name}) is not one the photo decoder reads")
            if not get_decoder(UID(uid)).is_available:
                raise ValueError(f"no decoder plugin is installed for transfer syntax {uid} ({UID(uid).name})")
        return list(dict.fromkeys(out))

    def decode_limits(self) -> DecodeLimits:
        """What the worker's decoder holds a received photo to (the same rules intake accepted it by)."""
        return DecodeLimits(self.max_pixels, frozenset(self.accepted_sop_classes))


class Caller(_Section):
    """A modality or PACS allowed to open associations with the node."""

    ae_title: str
    host: str | None = Field(default=None, description="pin: only associations from this IP address or network")
    certificate_subject: str | None = Field(
        default=None, min_length=1,
        description="pin: only TLS associations whose client certificate has this subject (RFC 4514, "
                    "e.g. 'CN=modality-1,O=Hospital')")
    return_to: str | None = Field(default=None, description="destination name that '@sender' means")

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("certificate_subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        """Canonical RFC 4514 form, the one intake renders the client certificate's subject in
        (so 'cn=a, o=B' pins 'CN=a,O=B'); text that is no distinguished name fails here."""
        if value is None:
            return None
        from dicom_node.net.subjects import canonical_subject

        return canonical_subject(value)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        """An IP address or network (CIDR). Host names are refused here rather than resolved: the
        association's peer is known only by its address, a name resolved once goes stale when DNS
        changes, and a silently stale pin rejects every association from a legitimate caller."""
        if value is None:
            return None
        value = value.strip()
        try:
            return str(ipaddress.ip_network(value, strict=False)) if "/" in value else str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(
                f"{value!r} is not an IP address or network: callers are pinned by address (e.g. '10.1.2.3' or "
                "'10.1.2.0/24'), because an association's peer is known only by its address; "
                "resolve the host name and give its address"
            ) from None

    def admits_host(self, address: str | None) -> bool:
        """Whether an association from ``address`` may be this caller (no pin: any address)."""
        if self.host is None or address is None:
            return True
        try:
            peer = ipaddress.ip_address(address.strip().strip("[]"))
        except ValueError:
            return False
        if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
            peer = peer.ipv4_mapped
        if "/" in self.host:
            return peer in ipaddress.ip_network(self.host)
        return peer == ipaddress.ip_address(self.host)


class DestinationKind(StrEnum):
    """How results reach a destination (``destinations[].kind``)."""

    DIMSE = "dimse"  # C-STORE over an association (PS3.7), DICOM TLS optional (PS3.15 Annex B.9)
    DICOMWEB = "dicomweb"  # STOW-RS to a DICOMweb root over HTTP(S) (PS3.18 10.5)


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DIMSE_KEYS = ("ae_title", "host", "port", "tls")
_DICOMWEB_KEYS = ("url", "token_env", "username", "password_env", "verify_tls")
_SECRET_KEYS = ("token", "password", "bearer_token", "api_key")


class Destination(_Section):
    """A peer the node sends results to: by C-STORE (``kind = "dimse"``, the default; over TLS when
    ``tls`` is true) or by STOW-RS to a DICOMweb root (``kind = "dicomweb"`` with ``url``).

    Which keys each kind takes: dimse needs ``ae_title``, ``host`` and ``port`` (``tls``,
    ``ca_certificates``, ``certificate``/``private_key`` optional); dicomweb needs ``url`` and takes
    ``token_env`` (bearer) or ``username`` + ``password_env`` (HTTP basic), ``ca_certificates``,
    ``certificate``/``private_key`` and ``verify_tls``. Secrets are never in the file: the
    configuration names the environment variables that hold them, read at every send.
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: DestinationKind = DestinationKind.DIMSE
    # dimse
    ae_title: str | None = None
    host: str | None = Field(default=None, min_length=1)
    port: int | None = Field(default=None, ge=1, le=_PORT_MAX)
    tls: bool = Field(default=False, description="DICOM TLS (PS3.15 Annex B.9, BCP 195) to this peer")
    # dicomweb
    url: str | None = Field(default=None, description="the DICOMweb root, e.g. https://pacs:8042/dicom-web "
                                                      "(STOW-RS posts to {url}/studies/{study})")
    token_env: str | None = Field(default=None, description="environment variable holding a bearer token")
    username: str | None = Field(default=None, min_length=1, description="HTTP basic user (with password_env)")
    password_env: str | None = Field(default=None, description="environment variable holding the basic password")
    verify_tls: bool = Field(default=True, description="https: verify the server's certificate and host name")
    # both
    ca_certificates: Path | None = Field(
        default=None, description="PEM file of the CAs the peer's certificate must chain to (DICOM TLS: "
                                  "required; https: instead of the system's CAs)")
    certificate: Path | None = Field(default=None, description="client certificate (PEM) shown to the peer")
    private_key: Path | None = Field(default=None, description="the client certificate's private key (PEM)")

    @model_validator(mode="before")
    @classmethod
    def _no_secrets_in_the_file(cls, data: Any) -> Any:
        """A password in node.toml ends up in backups, tickets and screenshots: name a variable instead."""
        if isinstance(data, dict):
            for key in _SECRET_KEYS:
                if key in data:
                    raise ValueError(f"{key!r}: credentials are never read from the configuration; put the secret "
                                     "in an environment variable and name it with token_env (bearer) or "
                                     "password_env (with username, HTTP basic)")
        return data

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)

    @field_validator("token_env", "password_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError(f"{value!r} is not an environment variable name (letters, digits and _)")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        """An http(s) URL without credentials, query or fragment; kept without its trailing slash so
        that the STOW-RS and QIDO-RS resources are ``{url}/studies`` (PS3.18 8.2)."""
        if value is None:
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL of a DICOMweb root")
        if parts.username is not None or parts.password is not None:
            raise ValueError("the URL must not carry credentials: use token_env, or username + password_env")
        if parts.query or parts.fragment:
            raise ValueError(f"{value!r}: a DICOMweb root has no query or fragment")
        try:
            parts.port  # noqa: B018  (raises on a port out of range)
        except ValueError as exc:
            raise ValueError(f"{value!r}: {exc}") from None
        return value.strip().rstrip("/")

    @property
    def is_dicomweb(self) -> bool:
        return self.kind is DestinationKind.DICOMWEB

    @property
    def is_https(self) -> bool:
        return self.url is not None and self.url.lower().startswith("https:")

    @model_validator(mode="after")
    def _keys_of_the_kind(self) -> Destination:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together (the client certificate and its key)")
        given = self.model_fields_set
        if self.is_dicomweb:
            misplaced = [k for k in _DIMSE_KEYS if k in given]
            if misplaced:
                raise ValueError(f"kind = \"dicomweb\" does not use {', '.join(misplaced)} (keys of kind = "
                                 "\"dimse\"): give url, the DICOMweb root; TLS is chosen by an https:// url")
            if self.url is None:
                raise ValueError("kind = \"dicomweb\" needs url, the DICOMweb root (e.g. http://pacs:8042/dicom-web)")
            if self.token_env is not None and (self.username is not None or self.password_env is not None):
                raise ValueError("token_env (bearer) and username/password_env (basic) exclude each other")
            if (self.username is None) != (self.password_env is None):
                raise ValueError("username and password_env go together (HTTP basic authentication)")
            if not self.is_https and (self.ca_certificates or self.certificate or "verify_tls" in given):
                raise ValueError("ca_certificates, certificate, private_key and verify_tls are used only with "
                                 "an https:// url")
            if not self.verify_tls and self.ca_certificates is not None:
                raise ValueError("verify_tls = false ignores ca_certificates: give one or the other")
            return self
        misplaced = [k for k in _DICOMWEB_KEYS if k in given]
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)}: keys of kind = \"dicomweb\"; this destination is "
                             "kind = \"dimse\" (the default), which uses ae_title, host and port")
        missing = [k for k in ("ae_title", "host", "port") if getattr(self, k) is None]
        if missing:
            raise ValueError(f"kind = \"dimse\" (the default) needs ae_title, host and port; missing: "
                             f"{', '.join(missing)} (for a DICOMweb destination set kind = \"dicomweb\" and url)")
        if not self.tls and (self.ca_certificates or self.certificate):
            raise ValueError("ca_certificates, certificate and private_key are used only with tls = true")
        if self.tls and self.ca_certificates is None:
            raise ValueError("tls = true needs ca_certificates: the node verifies every peer it sends PHI to")
        return self

    def describe(self) -> str:
        """``ORTHANC@10.0.0.5:4242`` or the DICOMweb root: where this destination is, for messages."""
        if self.is_dicomweb:
            return str(self.url)
        return f"{self.ae_title}@{self.host}:{self.port}"


class RoutingRule(_Section):
    """Which received photos a rule takes and where their results go; the first rule that matches wins."""

    name: str = Field(min_length=1)
    calling_ae_titles: list[str] = Field(default_factory=list, description="empty: any allowed caller")
    match: dict[str, list[str]] = Field(
        default_factory=dict,
        description="DICOM keyword -> accepted values (shell patterns, case-insensitive); all keywords must match",
    )
    process: bool = Field(default=True, description="false: matching photos are kept but not parsed")
    send_to: list[str] = Field(default_factory=lambda: [SENDER])

    @field_validator("calling_ae_titles")
    @classmethod
    def _callers(cls, values: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in values]

    @field_validator("match")
    @classmethod
    def _keywords(cls, match: dict[str, list[str]]) -> dict[str, list[str]]:
        from pydicom.datadict import tag_for_keyword

        for keyword, values in match.items():
            if tag_for_keyword(keyword) is None:
                raise ValueError(f"match key {keyword!r} is not a DICOM keyword (e.g. Modality, BodyPartExamined)")
            if not values:
                raise ValueError(f"match.{keyword} lists no value; use [\"*\"] to require any value")
        return match


class RoutingSettings(_Section):
    rules: list[RoutingRule] = Field(default_factory=lambda: [RoutingRule(name="photos-back-to-sender")])


class WorkerSettings(_Section):
    """The processing stage: worker processes, each holding the model once."""

    count: int = Field(default=1, ge=0, le=64, description="0: accept and queue only, process nothing")
    torch_threads: int = Field(default=0, ge=0, description="per worker; 0: CPU cores / count")
    postprocess: PostprocessMode = Field(
        default=PostprocessMode.EXACT,
        description="exact: official semantics at the photo's size; fast: at the network-input size")
    runtime: RuntimeName = Field(
        default=RuntimeName.AUTO,
        description="auto: the fastest runtime that passes its agreement check against eager fp32")
    runtime_max_rss_mib: float = Field(
        default=DEFAULT_MAX_RSS_MIB, gt=0,
        description="auto takes a faster runtime only if a worker running it stays within this resident size "
                    "(MiB) or within eager fp32's, whichever is larger (measured once with the check)")
    recycle_rss_mib: float = Field(
        default=3072, ge=0,
        description="a worker whose resident size exceeds this (MiB) after a job exits and is replaced by a fresh "
                    "one (not counted as a death): months of photos cannot grow a worker without bound; 0: never")
    max_attempts: int = Field(
        default=3, ge=1,
        description="tries of one photo whose processing fails for the machine's sake (disk, memory) or whose "
                    "worker dies while the node lives; a node restart is not counted")
    poll_interval_s: float = Field(default=0.1, gt=0)
    restart_delay_s: float = Field(default=1.0, gt=0, description="first wait before restarting a dead worker")
    max_restart_delay_s: float = Field(default=60.0, gt=0)
    deaths_before_not_ready: int = Field(default=3, ge=1, description="worker deaths within 5 minutes")
    model_retry_interval_s: float = Field(default=60.0, gt=0, description="wait before loading a failed model again")
    not_ready_log_interval_s: float = Field(default=60.0, gt=0)
    sweep_interval_s: float = Field(default=30.0, gt=0,
                                    description="how often jobs held by a gone worker are returned to the queue")
    lease_s: float = Field(
        default=120.0, ge=1,
        description="how long a processing claim lasts unless its worker renews it (it does, every quarter of "
                    "this, while it parses and encodes): a node sharing the job store takes over a job whose "
                    "lease ran out, so this is how long a dead node's photo waits")


class DispatchSettings(_Section):
    """The sending stage and its retry policy (exponential backoff, persisted in the job store)."""

    max_attempts: int = Field(default=10, ge=1, description="at least this many attempts ...")
    give_up_after_h: float = Field(
        default=24.0, ge=0,
        description="... and at least this long since the first attempt before a job ends failed: a PACS "
                    "down for a maintenance window gets its results afterwards")
    backoff_initial_s: float = Field(default=5.0, gt=0)
    backoff_factor: float = Field(default=2.0, ge=1)
    backoff_max_s: float = Field(default=600.0, gt=0)
    concurrency: int = Field(default=2, ge=1, le=32)
    associations_per_job: int = Field(
        default=2, ge=1, le=8,
        description="associations one job's objects go out on at once (SC beside SEG; SR last); 1: one by one")
    poll_interval_s: float = Field(default=0.1, gt=0)
    timeout_s: float = Field(default=60.0, gt=0, description="ACSE, DIMSE and network timeouts of one send")
    lease_s: float = Field(default=600.0, gt=0, description="how long a send may hold a job before others may")


class RetentionSettings(_Section):
    """The cleaner: how long spooled photos, results and job records are kept (photos are PHI).

    Nothing that is not yet delivered is ever deleted: a job's files go only once it is DONE
    (or FAILED, after ``failed_after_h``, which leaves a person time to retry it)."""

    done_after_h: float = Field(default=24.0, ge=0,
                                description="delete a delivered job's photo and results this long after it ended")
    failed_after_h: float = Field(default=168.0, ge=0,
                                  description="delete a failed job's files this long after it failed")
    job_history_days: float = Field(default=90.0, ge=0,
                                    description="delete ended jobs' records and history this long after they ended")
    max_spool_gb: float = Field(default=10.0, gt=0,
                                description="above this the oldest delivered jobs' files go first, before their time")
    interval_s: float = Field(default=300.0, gt=0, description="how often the cleaner runs")


class LesionSettings(_Section):
    """Lesion masks over DICOM: a Segmentation (PS3.3 A.51) of a received photo, joined with its parsing.

    A SEG is a lesion mask when one of its segments matches (Segment Description macro, PS3.3
    C.8.20.2): its Segment Label matches ``segment_label_pattern``, or its Segmented Property
    Category or Type is one of ``property_codes`` ("SCHEME:VALUE"), or, with
    ``series_description_pattern`` set, its Series Description matches (then all its segments
    count). Defaults: SCT 49755003 Morphologically abnormal structure (the CID 7150 category of
    lesions), SCT 52988006 Lesion, SCT 56208002 Ulcer. Only the matching segments make the mask.
    """

    enabled: bool = Field(default=True, description="negotiate Segmentation Storage and join lesion SEGs")
    segment_label_pattern: str | None = Field(default=r"(?i)lesion|burn|wound|ulcer",
                                              description="regex searched in each Segment Label (0062,0005)")
    property_codes: list[str] = Field(
        default_factory=lambda: ["SCT:49755003", "SCT:52988006", "SCT:56208002"],
        description="SCHEME:VALUE codes; a segment whose property category or type is one is a lesion")
    series_description_pattern: str | None = Field(
        default=None, description="regex: a SEG whose Series Description matches is a lesion mask as a whole")
    wait_for_photo_h: float = Field(default=24.0, gt=0,
                                    description="a lesion SEG whose photo has not been parsed by then fails")
    other_segmentations: Literal["ignore", "refuse"] = Field(
        default="ignore",
        description="a SEG that is not a lesion mask: ignore (0x0000, nothing kept) or refuse (0xC000)")

    @field_validator("segment_label_pattern", "series_description_pattern")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @field_validator("property_codes")
    @classmethod
    def _codes(cls, values: list[str]) -> list[str]:
        for value in values:
            scheme, _, code = value.partition(":")
            if not scheme.strip() or not code.strip():
                raise ValueError(f"{value!r} is not SCHEME:VALUE (e.g. SCT:52988006)")
        return values


class TlsSettings(_Section):
    """DICOM TLS on the receiving side (PS3.15 Annex B.9: TLS 1.2+, BCP 195 cipher suites)."""

    enabled: bool = False
    port: int = Field(default=2762, ge=0, le=_PORT_MAX, description="the TLS listener (2762: DICOM over TLS)")
    plain_listener: bool = Field(default=True, description="false: only the TLS port listens")
    certificate: Path | None = Field(default=None, description="the node's certificate chain (PEM)")
    private_key: Path | None = Field(default=None, description="its private key (PEM)")
    ca_certificates: Path | None = Field(default=None,
                                         description="PEM file of the CAs whose client certificates are accepted")
    require_client_certificate: bool = True

    @model_validator(mode="after")
    def _files(self) -> TlsSettings:
        if not self.enabled:
            return self
        if self.certificate is None or self.private_key is None:
            raise ValueError("tls.enabled needs tls.certificate and tls.private_key")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("tls.require_client_certificate needs tls.ca_certificates (the CAs callers' "
                             "certificates must be signed by)")
        return self


_LABELS = EncodeOptions()  # the defaults of how results are labelled live with the encoder


class ResultsSettings(_Section):
    """How the SEG, SC and SR are labelled: the configurable part of :class:`EncodeOptions`."""

    sc_jpeg: bool = Field(default=_LABELS.sc_jpeg,
                          description="send the overlay JPEG compressed (lossy, ~10x smaller)")
    include_person_segments: bool = _LABELS.include_person_segments
    seg_series_number: int = Field(default=_LABELS.seg_series_number, gt=0, lt=2**31)
    sc_series_number: int = Field(default=_LABELS.sc_series_number, gt=0, lt=2**31)
    sr_series_number: int = Field(default=_LABELS.sr_series_number, gt=0, lt=2**31)
    seg_series_description: str = Field(default=_LABELS.seg_series_description, min_length=1, max_length=64)
    sc_series_description: str = Field(default=_LABELS.sc_series_description, min_length=1, max_length=64)
    sr_series_description: str = Field(default=_LABELS.sr_series_description, min_length=1, max_length=64)
    institution_name: str | None = Field(default=_LABELS.institution_name, max_length=64)
    uid_prefix: str | None = Field(default=_LABELS.uid_prefix, pattern=r"^[0-9]+(\.[0-9]+)*\.$")

    def encode_options(self) -> EncodeOptions:
        """The encoder's options with these labels (every field here is one of its fields)."""
        return EncodeOptions(**self.model_dump())


MIB = 1024 * 1024


def is_loopback(address: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, ``localhost``)."""
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume others can reach it


class HttpSettings(_Section):
    """Web UI, REST API, health and metrics on one HTTP port next to the DICOM port."""

    enabled: bool = True
    bind_address: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8080, ge=0, le=65535, description="0: the kernel picks a free port (tests)")
    token: SecretStr | None = Field(
        default=None,
        description="bearer token; required when bind_address is not a loopback address (set it with "
                    "DICOM_NODE_HTTP__TOKEN rather than in the file)",
    )
    max_upload_bytes: int = Field(default=64 * MIB, ge=1024, description="larger uploads get 413")
    max_pixels: int = Field(default=40_000_000, ge=1, description="photos with more pixels get 413")
    max_waiting_parses: int = Field(default=4, ge=0, description="parses queued behind the running one; "
                                                                  "more get 503")
    parse_threads: int = Field(default=0, ge=0, description="torch threads of the API's parser; 0: half the cores")
    dicomweb_calling_ae: str = Field(
        default="DICOMWEB",
        description="the calling AE title photos stored by STOW-RS (POST /dicom-web/studies) are received as: "
                    "a [[callers]] entry with this ae_title admits DICOMweb clients (its host pin is matched "
                    "against the HTTP client's address), its return_to is what '@sender' means for them and "
                    "routing rules name it in calling_ae_titles; without such an entry STOW-RS answers 403")

    @field_validator("dicomweb_calling_ae")
    @classmethod
    def _dicomweb_ae(cls, value: str) -> str:
        return _check_ae_title(value)

    @property
    def auth_required(self) -> bool:
        return not is_loopback(self.bind_address)

    @model_validator(mode="after")
    def _token_off_loopback(self) -> HttpSettings:
        if self.auth_required and (self.token is None or not self.token.get_secret_value().strip()):
            raise ValueError(
                f"http.token is required when http.bind_address ({self.bind_address}) is not a loopback "
                "address: every request except /healthz must then carry it as a bearer token"
            )
        if self.token is not None and len(self.token.get_secret_value().strip()) < 16:
            raise ValueError("http.token must be at least 16 characters long")
        return self


POSTGRES_URL_SCHEMES = ("postgresql", "postgres")  # what libpq accepts as a connection URI


def mask_url(url: str) -> str:
    """``url`` with its password (``user:PASSWORD@`` or ``?password=``) shown as ``***``: what logs,
    messages and tickets may carry. Everything else stays, so an administrator still sees where."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return parts._replace(netloc=netloc, query=query).geturl()


class JobStoreSettings(_Section):
    """Where the job records live (issue 16).

    No ``url`` (the default): the embedded SQLite file in ``data_dir``, for one machine. A
    ``postgresql://user@host:5432/dbname`` URL: a PostgreSQL database several nodes share, so
    that any node's workers take any node's jobs. The password may be in the URL (then set the
    URL with ``DICOM_NODE_JOB_STORE__URL`` rather than in the file) or in libpq's environment
    (``PGPASSWORD``, ``~/.pgpass``); it is never logged.
    """

    url: SecretStr | None = Field(
        default=None,
        description="empty: SQLite in data_dir; postgresql://user@host:port/dbname: a shared PostgreSQL store")

    @model_validator(mode="before")
    @classmethod
    def _postgres_url(cls, data: Any) -> Any:
        """Checked on the section's input, not the field's: a refused value is then not echoed
        (``_explain`` shows a field's input, and this one may hold a password)."""
        if not isinstance(data, dict) or not isinstance(data.get("url"), str):
            return data
        url = data["url"].strip()
        if not url:
            return {**data, "url": None}
        scheme = urlsplit(url).scheme.lower()
        if scheme not in POSTGRES_URL_SCHEMES:
            raise ValueError(f"url: {mask_url(url)!r} is not a postgresql:// URL (leave it empty for the "
                             "embedded SQLite store in data_dir)")
        try:
            _ = urlsplit(url).port  # raises for a port that is not a number
        except ValueError as exc:
            raise ValueError(f"url: {mask_url(url)!r}: {exc}") from None
        return {**data, "url": url}

    @property
    def engine(self) -> Literal["sqlite", "postgresql"]:
        return "sqlite" if self.url is None else "postgresql"


@dataclass(frozen=True)
class Listener:
    """Where and as whom intake listens."""

    ae_title: str
    bind_address: str
    port: int
    plain: bool = True  # false: only the TLS listener
    tls: TlsSettings | None = None  # None: no TLS listener


@dataclass(frozen=True)
class Peers:
    """Who may call the node and where it may send: the look-ups over ``callers`` and ``destinations``."""

    callers: tuple[Caller, ...]
    destinations: tuple[Destination, ...]

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(f"no destination named {name!r}")

    def sender_destination(self, caller: Caller) -> Destination | None:
        """The destination that results go to when a rule says '@sender' for this caller."""
        if caller.return_to is not None:
            return self.destination(caller.return_to)
        for dest in self.destinations:  # a DICOMweb destination has no AE title: only return_to names it
            if dest.ae_title is not None and dest.ae_title == caller.ae_title and caller.admits_host(dest.host):
                return dest
        return None

    def caller(self, ae_title: str, host: str | None, certificate_subject: str | None = None) -> Caller | None:
        """The caller entry that admits ``ae_title`` from ``host`` (and, over TLS, with a client
        certificate of ``certificate_subject``), or None (association rejected)."""
        for caller in self.callers:
            if caller.ae_title != ae_title.strip() or not caller.admits_host(host):
                continue
            if caller.certificate_subject is not None and caller.certificate_subject != certificate_subject:
                continue
            return caller
        return None


def _default_node_id() -> str:
    return socket.gethostname() or "node"


class NodeConfig(BaseSettings):
    """The whole node configuration. Build it with :func:`load_config`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    node_id: str = Field(default_factory=_default_node_id, min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: str = "DICOM_NODE"
    bind_address: str = "127.0.0.1"
    port: int = Field(default=11112, ge=1, le=_PORT_MAX)
    data_dir: Path = Path("data")
    spool_dir: Path = Field(
        default_factory=lambda data: Path(data.get("data_dir", "data")) / "spool",
        description="received photos and encoded results (default <data_dir>/spool); the nodes of a group "
                    "sharing one job store point it at one shared file system")
    model_dir: Path = DEFAULT_MODEL_DIR
    auto_fetch_model: bool = True
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="text: lines for people (journalctl); json: one JSON object a line for log shippers, "
                    "the key=value fields of each line as keys of their own")
    intake: IntakeSettings = Field(default_factory=IntakeSettings)
    callers: list[Caller] = Field(default_factory=list)
    destinations: list[Destination] = Field(default_factory=list)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    results: ResultsSettings = Field(default_factory=ResultsSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    lesion: LesionSettings = Field(default_factory=LesionSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    job_store: JobStoreSettings = Field(default_factory=JobStoreSettings)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        value = value.upper()
        if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"log level {value!r} is not DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value

    @field_validator("log_format", mode="before")
    @classmethod
    def _log_format(cls, value: object) -> object:
        """``JSON`` or ``Text`` in a file or ``DICOM_NODE_LOG_FORMAT`` mean what they say (as log_level does)."""
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _references(self) -> NodeConfig:
        """Cross-key checks: every name a rule or caller uses must exist, '@sender' must resolve."""
        names = [d.name for d in self.destinations]
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise ValueError(f"destinations[{i}].name: {name!r} is used twice")
        known = set(names)
        callers = [c.ae_title for c in self.callers]
        for i, ae in enumerate(callers):
            if callers.index(ae) != i and self.callers[i].host == self.callers[callers.index(ae)].host:
                raise ValueError(f"callers[{i}].ae_title: {ae!r} is listed twice for the same host")
        for i, caller in enumerate(self.callers):
            if caller.return_to is not None and caller.return_to not in known:
                raise ValueError(f"callers[{i}].return_to: no destination is named {caller.return_to!r}")
        for r, rule in enumerate(self.routing.rules):
            for d, target in enumerate(rule.send_to):
                if target != SENDER and target not in known:
                    raise ValueError(
                        f"routing.rules[{r}].send_to[{d}]: no destination is named {target!r} "
                        f"(known: {sorted(known) or 'none'}; '{SENDER}' means the calling AE's own entry)"
                    )
            if rule.process and SENDER in rule.send_to:
                for i, caller in enumerate(self.callers):
                    applies = not rule.calling_ae_titles or caller.ae_title in rule.calling_ae_titles
                    if applies and self.peers.sender_destination(caller) is None:
                        raise ValueError(
                            f"callers[{i}] ({caller.ae_title}): routing.rules[{r}] sends results back to the "
                            f"sender, but no destination stands for it: set callers[{i}].return_to or add a "
                            f"destination with ae_title {caller.ae_title!r}"
                        )
            for ae in rule.calling_ae_titles:
                if ae not in callers:
                    raise ValueError(f"routing.rules[{r}].calling_ae_titles: {ae!r} is not in callers")
        return self

    # ---------------------------------------------------------------- what each stage is given

    @property
    def peers(self) -> Peers:
        """The configured callers and destinations, with the look-ups intake, routing and dispatch use."""
        return Peers(tuple(self.callers), tuple(self.destinations))

    @property
    def listener(self) -> Listener:
        tls = self.tls if self.tls.enabled else None
        return Listener(self.ae_title, self.bind_address, self.port, plain=tls is None or tls.plain_listener, tls=tls)

    @property
    def job_db_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def health_path(self) -> Path:
        return self.data_dir / "health.json"

    # ---------------------------------------------------------------- sources

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment over TOML over defaults; no .env or secrets directory (one place to look)."""
        path = _toml_path.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def _format_location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _env_name(key: str) -> str | None:
    """The environment variable that set ``key`` (a dotted path), if one is set."""
    if not key or "[" in key:
        return None
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        name = ENV_PREFIX + ENV_NESTED_DELIMITER.join(parts[:n]).upper()
        if name in os.environ:
            return name
    return None


def _explain(exc: ValidationError, source: str) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        loc = tuple(p for p in error["loc"] if p not in ("function-after[_references()]",))
        key = _format_location(loc)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key (see config/node.example.toml for the keys there are)"
        env = _env_name(key)
        origin = f" (set by {env})" if env else ""
        value = error.get("input")
        quiet = error["type"] in ("extra_forbidden", "missing") or isinstance(value, dict)
        shown = "" if quiet else f" (got {value!r})"
        lines.append(f"{key}{origin}: {message}{shown}" if loc else f"{message}")
    return f"invalid configuration in {source}:\n  " + "\n  ".join(lines)


def load_config(path: str | os.PathLike[str] | None = None, *, required: bool | None = None) -> NodeConfig:
    """Read ``path`` (default: $DICOM_NODE_CONFIG, else config/node.toml), apply the environment, validate.

    A path named explicitly must exist; the default one may be missing (defaults and environment
    then make the whole configuration). Raises :class:`ConfigError` naming every bad key.
    """
    explicit = path is not None or CONFIG_PATH_ENV in os.environ
    chosen = Path(path if path is not None else os.environ.get(CONFIG_PATH_ENV, DEFAULT_CONFIG_PATH))
    must_exist = explicit if required is None else required
    if not chosen.is_file():
        if must_exist:
            raise ConfigError(f"configuration file {chosen} does not exist")
        toml_file: Path | None = None
    else:
        toml_file = chosen
        try:
            with open(chosen, "rb") as fh:
                tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {chosen} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read configuration file {chosen}: {exc.strerror or exc}") from None
    token = _toml_path.set(toml_file)
    try:
        return NodeConfig()
    except ValidationError as exc:
        source = f"{chosen} and DICOM_NODE_* variables" if toml_file else "DICOM_NODE_* variables and defaults"
        raise ConfigError(_explain(exc, source)) from None
    finally:
        _toml_path.reset(token)
