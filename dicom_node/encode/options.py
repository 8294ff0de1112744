"""How the node labels the SEG, SC and SR it sends back: one instance per node configuration.

A module of its own, free of highdicom, because the configuration's ``[results]`` section takes
its defaults from here (:class:`~dicom_node.config.ResultsSettings`): one place says what a
series is called and numbered.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from dicom_node import __version__

LO_MAX = 64  # VR LO: at most 64 characters


def _check_lo(name: str, value: str | None) -> None:
    if value is not None and len(value) > LO_MAX:
        raise ValueError(f"{name} is {len(value)} characters long; VR LO allows {LO_MAX}")


@dataclass(frozen=True)
class EncodeOptions:
    """How the node labels what it sends back. One instance per node configuration."""

    seg_series_number: int = 9101
    sc_series_number: int = 9102
    sr_series_number: int = 9103
    seg_series_description: str = "AI body-part segmentation (M2FP)"
    sc_series_description: str = "AI body-part overlay (M2FP) - not for diagnosis"
    sr_series_description: str = "AI body-part measurements (M2FP)"
    manufacturer: str = "dicom_node"
    manufacturer_model_name: str = "dicom_node human parsing"
    software_versions: str = __version__
    device_serial_number: str = "1"
    device_name: str = "DICOM_NODE"  # Device Observer Name in the SR (TID 1004)
    device_observer_uid: str | None = None  # None: derived from manufacturer, model and serial
    institution_name: str | None = None
    institutional_department_name: str | None = None
    include_person_segments: bool = True
    sc_jpeg: bool = False  # send the overlay JPEG Baseline compressed (lossy, about 10x smaller)
    uid_prefix: str | None = None  # None: highdicom's UID root
    content_datetime: datetime.datetime | None = None  # None: the time of encoding

    def __post_init__(self) -> None:
        for name in ("seg_series_number", "sc_series_number", "sr_series_number"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 < value < 2**31:
                raise ValueError(f"{name} must be a positive integer (VR IS), got {value!r}")
        if self.uid_prefix is not None and not (
            self.uid_prefix.endswith(".") and len(self.uid_prefix) <= 54
            and all(part.isdigit() for part in self.uid_prefix[:-1].split("."))
        ):
            raise ValueError(
                f"uid_prefix must be digits and dots ending in '.', at most 54 characters (VR UI), "
                f"got {self.uid_prefix!r}"
            )
        for name in (
            "seg_series_description", "sc_series_description", "sr_series_description",
            "manufacturer", "manufacturer_model_name", "software_versions", "device_serial_number",
            "device_name", "institution_name", "institutional_department_name",
        ):
            _check_lo(name, getattr(self, name))
