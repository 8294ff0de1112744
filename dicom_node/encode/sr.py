"""The TID 1500 Measurement Report (PS3.16 A.35.1) of a parsed photograph, as a Comprehensive SR.

Content tree:

- Observer context (TID 1002/1004): the node, as a DEVICE observer.
- Procedure reported: Imaging procedure (CID 100).
- Imaging Measurements:
  - one image-level group (TID 1501) for the people in the photo: person count, their area in
    pixels and as percent of the image;
  - one group per part class present (TID 1411 Volumetric ROI Measurements, region given by a
    Referenced Segment of our SEG with the photo as Source Image For Segmentation): area in
    pixels, percent of the image, percent of the persons' area, and with a lesion mask the
    lesion area and its percent of the region;
  - one group per person (TID 1411 referencing the person's segment, or TID 1501 on the photo
    when the SEG has no person segments): area in pixels and percent of the image.
  Every group carries the algorithm (TID 4019) and the SEG segment's Tracking ID/UID (TID 4108).

Why TID 1411 and not TID 1410 (Planar ROI) with Referenced Segmentation Frame: highdicom's
TID 1410 builder puts the SEG frame number on the photo reference, which dciodvfy reports as an
error; TID 1411 with a Referenced Segment validates clean (see the project's interop notes).
Numbers come from ``dicom_node.parse.statistics`` only; nothing here counts pixels.
"""

from __future__ import annotations

from typing import TypedDict

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage

from dicom_node.encode import codes as codetable
from dicom_node.encode.common import (
    check_photo,
    content_datetime,
    copy_patient_study,
    device_observer_uid,
    equipment_kwargs,
    new_uid,
    photo_reference,
    set_content_datetime,
    sr_algorithm_identification,
)
from dicom_node.encode.options import EncodeOptions
from dicom_node.encode.seg import PlannedSegment, plan_segments, segment_numbers, segment_tracking_uids
from dicom_node.parse.classes import HUMAN
from dicom_node.parse.result import ParsingResult
from dicom_node.parse.statistics import LesionRegionStats, ParsingStatistics, RegionStats

IMAGE_TRACKING_ID = "Persons in image"


class _PersonGroupContent(TypedDict):
    """The arguments a person's measurement group has whether it is a TID 1411 or a TID 1501."""

    finding_category: Code
    finding_type: Code
    algorithm_id: hd.sr.AlgorithmIdentification
    measurements: list[hd.sr.Measurement]


def _measurement(name, value: float, unit) -> hd.sr.Measurement:
    # TID 300; the algorithm (TID 4019) is named once per group, not per measurement.
    return hd.sr.Measurement(name=name, value=value, unit=unit)


def _percent(fraction: float) -> float:
    # A float is written as DS and, exactly, as Floating Point Value (C.18.1.1).
    return 100.0 * float(fraction)


def observation_context(options: EncodeOptions) -> hd.sr.ObservationContext:
    """TID 1001 with a Device observer (TID 1004): the node made these observations."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_observer_uid(options),
        name=options.device_name,
        manufacturer_name=options.manufacturer,
        model_name=options.manufacturer_model_name,
        serial_number=options.device_serial_number,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=device,
        )
    )


def _region_measurements(region: RegionStats, lesion: LesionRegionStats | None) -> list[hd.sr.Measurement]:
    measurements = [
        _measurement(codetable.AREA, region.pixels, codetable.PIXELS),
        _measurement(codetable.AREA_PERCENT_OF_IMAGE, _percent(region.image_fraction), codetable.PERCENT),
    ]
    if region.person_fraction is not None:
        measurements.append(
            _measurement(codetable.AREA_PERCENT_OF_PERSONS, _percent(region.person_fraction),
                         codetable.PERCENT)
        )
    if lesion is not None:
        measurements += [
            _measurement(codetable.LESION_AREA, lesion.lesion_pixels, codetable.PIXELS),
            _measurement(codetable.LESION_PERCENT_OF_REGION, float(lesion.lesion_percent),
                         codetable.PERCENT),
        ]
    return measurements


class _SegmentReferences:
    """Looks up, for a planned segment, its number and Tracking UID in the SEG actually built."""

    def __init__(self, seg: Dataset, photo_ds: Dataset, planned: list[PlannedSegment]):
        self.seg = seg
        self.photo_ds = photo_ds
        numbers = segment_numbers(seg)
        self.tracking_uids = segment_tracking_uids(seg)
        for segment in planned:
            if numbers.get(segment.tracking_id) != segment.segment_number:
                raise ValueError(
                    f"the SEG has no segment {segment.segment_number} with Tracking ID "
                    f"{segment.tracking_id!r}: it was not built from this parsing with these options"
                )
        self.by_key = {(s.class_index, s.person_index): s for s in planned}

    def find(self, class_index: int, person_index: int | None = None) -> PlannedSegment | None:
        return self.by_key.get((class_index, person_index))

    def referenced_segment(self, segment: PlannedSegment) -> hd.sr.ReferencedSegment:
        return hd.sr.ReferencedSegment(
            sop_class_uid=SegmentationStorage,
            sop_instance_uid=self.seg.SOPInstanceUID,
            segment_number=segment.segment_number,
            source_images=[
                hd.sr.SourceImageForSegmentation(self.photo_ds.SOPClassUID, self.photo_ds.SOPInstanceUID)
            ],
        )

    def tracking_identifier(self, segment: PlannedSegment) -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(
            uid=self.tracking_uids[segment.segment_number], identifier=segment.tracking_id
        )


def build_measurement_report(
    photo_ds: Dataset,
    seg: Dataset | None,
    result: ParsingResult,
    statistics: ParsingStatistics,
    options: EncodeOptions | None = None,
    lesion: list[LesionRegionStats] | None = None,
) -> hd.sr.ComprehensiveSR:
    """Build the TID 1500 Measurement Report of ``result`` (see the module docstring).

    ``seg`` is the SEG built from the same ``result`` and ``options`` (None when the parsing
    had nothing to segment: then only the image-level group is written). ``statistics`` is
    ``region_statistics(result)``; ``lesion`` is ``lesion_statistics(result, mask)`` or None.
    """
    options = options or EncodeOptions()
    check_photo(photo_ds)
    photo_ref = photo_reference(photo_ds)
    algorithm = sr_algorithm_identification(result)
    lesion_by_class = {item.class_index: item for item in lesion or []}
    classes = [region.class_index for region in statistics.regions]
    planned = plan_segments(result, options.include_person_segments, classes) if seg is not None else []
    references = _SegmentReferences(seg, photo_ds, planned) if seg is not None else None

    groups: list = [
        # Image level (TID 1501): how many people, how much of the photo they cover.
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=new_uid(options), identifier=IMAGE_TRACKING_ID),
            finding_type=codetable.PERSONS_IN_IMAGE,
            algorithm_id=algorithm,
            measurements=[
                _measurement(codetable.PERSON_COUNT, statistics.person_count, codetable.NO_UNITS),
                _measurement(codetable.AREA, statistics.person_pixels, codetable.PIXELS),
                _measurement(codetable.AREA_PERCENT_OF_IMAGE,
                             _percent(statistics.person_pixels / statistics.image_pixels),
                             codetable.PERCENT),
            ],
            source_images=[
                hd.sr.SourceImageForMeasurementGroup(photo_ds.SOPClassUID, photo_ds.SOPInstanceUID)
            ],
        )
    ]

    for region in statistics.regions:
        coding = codetable.class_coding(region.class_index)
        segment = references.find(region.class_index) if references is not None else None
        if references is None or segment is None:
            raise ValueError(f"class {region.class_index} ({region.label}) has statistics but no SEG segment")
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=references.tracking_identifier(segment),
                referenced_segment=references.referenced_segment(segment),
                finding_category=coding.category,
                finding_type=coding.finding_type,
                finding_sites=(
                    [hd.sr.FindingSite(coding.property_type, laterality=coding.laterality)]
                    if coding.is_anatomy else None
                ),
                algorithm_id=algorithm,
                measurements=_region_measurements(region, lesion_by_class.get(region.class_index)),
            )
        )

    person_coding = codetable.class_coding(HUMAN)
    for person in statistics.persons:
        measurements = [
            _measurement(codetable.AREA, person.pixels, codetable.PIXELS),
            _measurement(codetable.AREA_PERCENT_OF_IMAGE, _percent(person.image_fraction), codetable.PERCENT),
        ]
        common = _PersonGroupContent(
            finding_category=person_coding.category,
            finding_type=person_coding.finding_type,
            algorithm_id=algorithm,
            measurements=measurements,
        )
        segment = references.find(HUMAN, person.person_index) if references is not None else None
        if references is not None and segment is not None:
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=references.tracking_identifier(segment),
                    referenced_segment=references.referenced_segment(segment),
                    **common,
                )
            )
        else:  # persons not segmented: the group stands on the photo (TID 1501)
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=new_uid(options), identifier=f"Person {person.person_index + 1}"
                    ),
                    source_images=[
                        hd.sr.SourceImageForMeasurementGroup(photo_ds.SOPClassUID, photo_ds.SOPInstanceUID)
                    ],
                    **common,
                )
            )

    report = hd.sr.MeasurementReport(
        observation_context=observation_context(options),
        procedure_reported=codes.cid100.ImagingProcedure,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )

    when = content_datetime(options)
    evidence = [photo_ref] + ([seg] if seg is not None else [])
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=report,
        series_instance_uid=new_uid(options),
        series_number=options.sr_series_number,
        sop_instance_uid=new_uid(options),
        instance_number=1,
        **equipment_kwargs(options),
        # An AI report nobody has checked: complete, but preliminary and unverified.
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=options.sr_series_description,
        coding_schemes=[codetable.coding_scheme_identification()],
        content_date=when.date(),
        content_time=when.time(),
    )
    copy_patient_study(photo_ds, sr)
    set_content_datetime(sr, when)
    return sr
