"""All three result objects of one parsed photo, built in one call."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom_node.encode.common import content_datetime
from dicom_node.encode.options import EncodeOptions
from dicom_node.encode.sc import build_overlay_sc
from dicom_node.encode.seg import build_segmentation
from dicom_node.encode.sr import build_measurement_report
from dicom_node.parse.render import overlay
from dicom_node.parse.result import ParsingResult
from dicom_node.parse.statistics import ParsingStatistics, lesion_statistics, region_statistics
from dicom_node.parse.tbsa import TbsaEstimate


@dataclass
class EncodedResults:
    """What the node sends back for one photo.

    ``seg`` is None when the parsing found nothing to segment (no part and no person): a SEG
    needs at least one segment, and the SC and SR still tell the PACS that nobody was found.
    """

    seg: hd.seg.Segmentation | None
    sc: hd.sc.SCImage
    sr: hd.sr.ComprehensiveSR
    statistics: ParsingStatistics

    def datasets(self) -> list[Dataset]:
        """The objects to send, in sending order (SEG before the SR that references it)."""
        return [d for d in (self.seg, self.sc, self.sr) if d is not None]


def encode_results(
    photo_ds: Dataset,
    photo_rgb: np.ndarray | None,
    result: ParsingResult,
    overlay_rgb: np.ndarray | None = None,
    options: EncodeOptions | None = None,
    lesion_mask: np.ndarray | None = None,
    tbsa: TbsaEstimate | None = None,
    lesion_seg: Dataset | None = None,
) -> EncodedResults:
    """Compute the statistics and build SEG, SC and SR for one photo.

    ``tbsa`` (``parse.tbsa.estimate_tbsa`` of the study's photos) adds the %TBSA groups to the
    SR, ``lesion_seg`` (a received lesion SEG) is listed in the SR's evidence; see
    :func:`dicom_node.encode.sr.build_measurement_report`.

    ``photo_rgb`` is the decoded photo: the photo's pixels are not re-encoded anywhere, but
    with ``overlay_rgb`` None the overlay is rendered from it (:func:`parse.render.overlay`).
    That rendering and the SC run in a thread of their own while SEG and SR are built: they are
    numpy and Pillow work that releases the GIL, SEG and SR are mostly Python, so a 12 MP
    photo's three objects come out ~0.2 s sooner. Identical input gives identical content except for UIDs and
    dates/times; all three share one Content Date/Time.
    """
    options = options or EncodeOptions()
    if photo_rgb is not None and tuple(photo_rgb.shape[:2]) != result.size_hw:
        raise ValueError(
            f"the decoded photo is {photo_rgb.shape[1]}x{photo_rgb.shape[0]} but the parsing is "
            f"{result.size_hw[1]}x{result.size_hw[0]} (width x height)"
        )
    if overlay_rgb is None and photo_rgb is None:
        raise ValueError("an overlay, or the photo to render it from, is needed")
    options = dataclasses.replace(options, content_datetime=content_datetime(options))

    def overlay_sc() -> hd.sc.SCImage:
        if overlay_rgb is not None:
            image = overlay_rgb
        else:
            assert photo_rgb is not None  # refused above: an overlay or the photo is given
            image = overlay(photo_rgb, result.label_map)
        return build_overlay_sc(photo_ds, image, result, options)

    sc_future = _sc_executor().submit(overlay_sc)
    try:
        seg, sr, statistics = _seg_and_sr(photo_ds, result, options, lesion_mask, tbsa, lesion_seg)
    except BaseException:
        wait([sc_future])  # no SC is left building behind the caller's error handling
        raise
    return EncodedResults(seg=seg, sc=sc_future.result(), sr=sr, statistics=statistics)


def _sc_executor() -> ThreadPoolExecutor:
    global _SC_EXECUTOR
    with _SC_EXECUTOR_LOCK:
        if _SC_EXECUTOR is None:
            # one thread per process: a worker encodes one photo at a time
            _SC_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode-sc")
        return _SC_EXECUTOR


_SC_EXECUTOR: ThreadPoolExecutor | None = None
_SC_EXECUTOR_LOCK = threading.Lock()


def _seg_and_sr(photo_ds: Dataset, result: ParsingResult, options: EncodeOptions,
                lesion_mask: np.ndarray | None, tbsa: TbsaEstimate | None = None,
                lesion_seg: Dataset | None = None) -> tuple[hd.seg.Segmentation | None, hd.sr.ComprehensiveSR,
                                                         ParsingStatistics]:
    statistics = region_statistics(result)
    lesion = lesion_statistics(result, lesion_mask) if lesion_mask is not None else None

    # A SEG needs at least one segment: a part class present, or a person (when persons are segmented).
    has_segments = bool(statistics.regions) or (options.include_person_segments and bool(result.persons))
    classes = [region.class_index for region in statistics.regions]
    seg = build_segmentation(photo_ds, result, options, classes_present=classes) if has_segments else None
    sr = build_measurement_report(photo_ds, seg, result, statistics, options, lesion=lesion, tbsa=tbsa,
                                  lesion_seg=lesion_seg)
    return seg, sr, statistics


def warm_up() -> None:
    """Build SEG, SC and SR of a tiny photo once, in memory.

    The first objects a process builds pay for loading highdicom's tables of the standard
    (about 0.3-0.5 s); a node calls this at start-up so that its first photo does not.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, VLPhotographicImageStorage, generate_uid

    from dicom_node.parse.result import result_from_label_map

    photo = Dataset()
    photo.file_meta = FileMetaDataset()
    photo.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    photo.SOPClassUID = VLPhotographicImageStorage
    photo.SOPInstanceUID, photo.StudyInstanceUID, photo.SeriesInstanceUID = (
        generate_uid(), generate_uid(), generate_uid()
    )
    photo.PatientName, photo.PatientID, photo.Modality = "Warm^Up", "WARMUP", "XC"
    photo.Rows, photo.Columns = 8, 8
    label_map = np.zeros((8, 8), dtype=np.uint8)
    label_map[2:6, 2:6] = 13
    result = result_from_label_map(label_map, [label_map > 0])
    encode_results(photo, None, result, np.zeros((8, 8, 3), np.uint8))
