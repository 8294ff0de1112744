"""The ``[http]`` section of the node configuration: where the web UI and REST API listen, and their limits.

It is a section model in the style of :mod:`dicom_node.config` (frozen, unknown keys rejected) so the
node's :class:`~dicom_node.config.NodeConfig` can hold it as ``http: HttpSettings``; until then the
app is built with an explicit instance.
"""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

MIB = 1024 * 1024


def is_loopback(address: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, ``localhost``)."""
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume others can reach it


class HttpSettings(BaseModel):
    """Web UI, REST API, health and metrics on one HTTP port next to the DICOM port."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
    min_free_disk_mb: int = Field(default=500, ge=0, description="/readyz fails below this much free space in "
                                                                   "data_dir")

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
