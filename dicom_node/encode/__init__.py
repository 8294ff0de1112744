"""The DICOM result objects of a parsed photo: SEG (segments), SC (overlay) and SR (TID 1500).

Layout: ``codes`` (the one code table), ``common`` (options, UIDs, patient/study copy,
algorithm identification), one module per object (``seg``, ``sc``, ``sr``), ``results`` (all
three in one call) and ``validate`` (dciodvfy).
"""

from dicom_node.encode.common import EncodeOptions
from dicom_node.encode.results import EncodedResults, encode_results, warm_up
from dicom_node.encode.sc import build_overlay_sc
from dicom_node.encode.seg import PlannedSegment, build_segmentation, plan_segments
from dicom_node.encode.sr import build_measurement_report
from dicom_node.encode.validate import run_dciodvfy

__all__ = [
    "EncodeOptions",
    "EncodedResults",
    "PlannedSegment",
    "build_measurement_report",
    "build_overlay_sc",
    "build_segmentation",
    "encode_results",
    "plan_segments",
    "run_dciodvfy",
    "warm_up",
]
