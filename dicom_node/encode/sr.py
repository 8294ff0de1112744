"""The TID 1500 Measurement Report (PS3.16 A.35.1) of a parsed photograph, as a Comprehensive SR.

Content tree:

- Observer context (TID 1002/1004): the node, as a DEVICE observer.
- Procedure reported: Imaging procedure (CID 100).
- Imaging Measurements:
  - one image-level group (TID 1501) for the people in the photo: person count, their area in
    pixels and as percent of the image; the count is INFERRED FROM (TID 300 / TID 320) a closed
    POLYLINE along the whole photo's border, SELECTED FROM the photo: it was counted on all of it;
  - one group per part class present (TID 1411 Volumetric ROI Measurements, region given by a
    Referenced Segment of our SEG with the photo as Source Image For Segmentation): area in
    pixels, percent of the image, percent of the persons' area, and with a lesion mask the
    lesion area and its percent of the region;
  - one group per person (TID 1411 referencing the person's segment, or TID 1501 on the photo
    when the SEG has no person segments): area in pixels and percent of the image;
  - after each part-class or person group, one outline group per piece of that region (TID
    1410 Planar ROI Measurements, region given by an Image Region SCOORD POLYLINE on the photo,
    see :mod:`dicom_node.encode.outlines`): the piece's area in pixels, and the same finding
    type, category and site as the region's group. A region made only of specks is outlined by
    its largest speck, so every region has at least one outline group.
  Every group carries the algorithm (TID 4019) and a Tracking ID/UID (TID 4108): a region's
  group and its largest piece's outline group have the region's (for a TID 1411 group, its SEG
  segment's); every other piece's outline group has its own.

Why TID 1411 and not TID 1410 (Planar ROI) with Referenced Segmentation Frame: highdicom's
TID 1410 builder puts the SEG frame number on the photo reference, which dciodvfy reports as an
error; TID 1411 with a Referenced Segment validates clean (see the project's interop notes).

Why outlines come in groups of their own: TID 1410 and TID 1411 each take one way of giving the
region (Image Region XOR Referenced Segment; highdicom enforces it) and TID 1410 allows a single
Image Region, so a region in pieces takes one TID 1410 group per piece, and the TID 1411
groups that reference the SEG stay as they are. A TID 1411 measurement cannot carry the outline
either: its NUMs follow TID 1419, which has no INFERRED FROM row (highdicom refuses referenced
coordinates there); TID 1501's follow TID 300, which has one.

Why the Tracking UIDs are shared that way: OHIF's SR viewport (@ohif/extension-cornerstone-dicom-sr
3.13) merges the Measurement Groups that share a Tracking UID into one measurement, whose
coordinates are the first top-level SCOORD, or else the SCOORDs its NUMs are INFERRED FROM. A
measurement without coordinates stops it placing any measurement (it reads ``coords[0]``), and
the viewport stays black. So each region group is merged, through its Tracking UID, with the
outline group of its largest piece (the same finding, outlined where it is largest; TID 4108),
and the image-level group's count carries its own coordinates. The other pieces keep UIDs of
their own, as a merged measurement is drawn from its first outline only. Each SCOORD is SELECTED
FROM the photo (its SOP instance), closed (first point repeated last, PS3.3 C.18.6.1.2), in
image-relative pixel coordinates (C.10.5.1.2).

With a %TBSA estimate (:mod:`dicom_node.parse.tbsa`) the report also has:

- one image-level group (TID 1501, finding "Estimated lesion extent as percent of body surface",
  Tracking ID "Estimated %TBSA") on the photo: the estimate's percent and visible percent, and
  the chart (Lund and Browder or rule of nines) and its age group as qualitative evaluations;
- one TID 1501 group per region and view ("%TBSA <region> <view>"): the region as finding site
  (SNOMED CT anatomy, laterality, and Anterior/Posterior as topographical modifier), its chart
  percent, visible share, lesion share (absent when no skin of it was visible) and contribution.
  Shares are ratios (unit "1"), the others percent of the TBSA; the values are the estimate's,
  unrounded, so the SR and the JSON report say the same. The estimate may pool several photos
  of the study (front and back); the groups name this SR's photo as source image.
A received lesion SEG (``lesion_seg``) is listed in the evidence (Current Requested Procedure
Evidence Sequence, or Pertinent Other Evidence when of another study; PS3.3 C.17.2).

Numbers come from ``dicom_node.parse.statistics`` (regions) and ``outlines`` (pieces) only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import highdicom as hd
import numpy as np
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
from dicom_node.encode.outlines import Outline, trace_outlines
from dicom_node.encode.seg import PlannedSegment, plan_segments, segment_numbers, segment_tracking_uids
from dicom_node.parse.classes import HUMAN
from dicom_node.parse.result import ParsingResult
from dicom_node.parse.statistics import LesionRegionStats, ParsingStatistics, RegionStats
from dicom_node.parse.tbsa import TbsaEstimate

IMAGE_TRACKING_ID = "Persons in image"
TBSA_TRACKING_ID = "Estimated %TBSA"


def tbsa_region_tracking_id(region: str, view: str) -> str:
    """Tracking Identifier of a %TBSA region group: "%TBSA left upper limb anterior"."""
    return f"%TBSA {region} {view}"


def tbsa_groups(photo_ds: Dataset, tbsa: TbsaEstimate, algorithm: hd.sr.AlgorithmIdentification,
                options: EncodeOptions, photos: Sequence[tuple[Dataset, str]] | None = None,
                ) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """The %TBSA groups (TID 1501, see the module docstring): the estimate, then one per region and view.

    ``photos``: every photo the estimate combines, with its view ("anterior"/"posterior"); the
    estimate's group names them all as its source images, each region row those of its view
    (default: ``photo_ds`` alone, for every view).
    """
    photos = list(photos) if photos else [(photo_ds, "")]

    def sources(view: str | None) -> list[hd.sr.SourceImageForMeasurementGroup]:
        chosen = [ds for ds, v in photos if view is None or not v or str(v) == view] or [photo_ds]
        unique = {str(ds.SOPInstanceUID): ds for ds in chosen}.values()
        return [hd.sr.SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID) for ds in unique]

    source = sources(None)
    groups = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=new_uid(options), identifier=TBSA_TRACKING_ID),
            finding_type=codetable.TBSA_ESTIMATE,
            algorithm_id=algorithm,
            measurements=[
                _measurement(codetable.TBSA_PERCENT, float(tbsa.percent), codetable.PERCENT),
                _measurement(codetable.TBSA_VISIBLE_PERCENT, float(tbsa.visible_percent), codetable.PERCENT),
            ],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(codetable.TBSA_METHOD, codetable.TBSA_METHODS[str(tbsa.method)]),
                hd.sr.QualitativeEvaluation(codetable.TBSA_AGE_GROUP,
                                            codetable.TBSA_AGE_GROUPS[str(tbsa.age_group)]),
            ],
            source_images=source,
        )
    ]
    for row in tbsa.regions:
        site, laterality = codetable.TBSA_REGION_SITES[str(row.region)]
        side = codetable.ANTERIOR if str(row.view) == "anterior" else codetable.POSTERIOR
        measurements = [
            _measurement(codetable.TBSA_CHART_PERCENT, float(row.chart_percent), codetable.PERCENT),
            _measurement(codetable.TBSA_VISIBLE_SHARE, float(row.visible_share), codetable.NO_UNITS),
        ]
        if row.lesion_share is not None:
            measurements.append(
                _measurement(codetable.TBSA_LESION_SHARE, float(row.lesion_share), codetable.NO_UNITS))
        measurements.append(
            _measurement(codetable.TBSA_CONTRIBUTION, float(row.contribution_percent), codetable.PERCENT))
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=new_uid(options), identifier=tbsa_region_tracking_id(str(row.region), str(row.view))),
                finding_type=codetable.TBSA_REGION,
                finding_sites=[hd.sr.FindingSite(site, laterality=laterality, topographical_modifier=side)],
                algorithm_id=algorithm,
                measurements=measurements,
                source_images=sources(str(row.view)),
            )
        )
    return groups


class _FindingContent(TypedDict):
    """What a region's groups (its TID 1411 group and its outline groups) say about the finding."""

    finding_category: Code
    finding_type: Code
    finding_sites: list[hd.sr.FindingSite] | None
    algorithm_id: hd.sr.AlgorithmIdentification


class _PersonGroupContent(TypedDict):
    """The arguments a person's measurement group has whether it is a TID 1411 or a TID 1501."""

    finding_category: Code
    finding_type: Code
    algorithm_id: hd.sr.AlgorithmIdentification
    measurements: list[hd.sr.Measurement]


def _measurement(name, value: float, unit, inferred_from: hd.sr.CoordinatesForMeasurement | None = None
                 ) -> hd.sr.Measurement:
    # ``inferred_from``: TID 300 row "INFERRED FROM" (TID 320), allowed in TID 1501, not in TID 1419.
    # TID 300; the algorithm (TID 4019) is named once per group, not per measurement.
    return hd.sr.Measurement(
        name=name, value=value, unit=unit,
        referenced_coordinates=[inferred_from] if inferred_from is not None else None,
    )


def _percent(fraction: float) -> float:
    # A float is written as DS and, exactly, as Floating Point Value (C.18.1.1).
    return 100.0 * float(fraction)


def outline_tracking_id(label: str, piece: int, pieces: int) -> str:
    """Tracking Identifier of an outline group: "Face outline", or "Face outline 2 of 3"."""
    return f"{label} outline" if pieces == 1 else f"{label} outline {piece} of {pieces}"


def region_outlines(mask: np.ndarray) -> list[Outline]:
    """``trace_outlines(mask)``; a region made of specks only gets its largest speck's outline.

    Every region group needs an outline group to share its Tracking UID with (see the module
    docstring), so a non-empty region always has at least one outline.
    """
    outlines = trace_outlines(mask)
    return outlines or trace_outlines(mask, min_area_px=1, min_share=0.0, max_pieces=1)


def outline_groups(
    photo_ds: Dataset,
    label: str,
    mask: np.ndarray,
    finding: _FindingContent,
    options: EncodeOptions,
    region_tracking: hd.sr.TrackingIdentifier,
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """One TID 1410 group per piece of the region ``mask`` (see the module docstring).

    The largest piece's group is tracked as the region (``region_tracking``, the Tracking
    Identifier and UID of the region's own group); every other piece has a UID of its own.
    The SCOORD is highdicom's Image Region (111030, DCM): a CONTAINS SCOORD whose SELECTED FROM
    item references the photo by SOP Class and Instance UID (TID 1410 row "Image Region").
    """
    outlines = region_outlines(mask)
    source = hd.sr.SourceImageForRegion(photo_ds.SOPClassUID, photo_ds.SOPInstanceUID)
    return [
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=region_tracking if piece == 1 else hd.sr.TrackingIdentifier(
                uid=new_uid(options), identifier=outline_tracking_id(label, piece, len(outlines))
            ),
            referenced_region=hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=outline.points,
                source_image=source,
            ),
            measurements=[_measurement(codetable.AREA, outline.pixels, codetable.PIXELS)],
            **finding,
        )
        for piece, outline in enumerate(outlines, start=1)
    ]


def whole_image(photo_ds: Dataset) -> hd.sr.CoordinatesForMeasurement:
    """The photo's border, a closed POLYLINE SELECTED FROM the photo, as TID 320 coordinates.

    C.10.5.1.2: 0\\0 is the top-left corner of the top-left pixel, Columns\\Rows the
    bottom-right corner of the bottom-right one.
    """
    return hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=whole_image_outline(photo_ds),
        source_image=hd.sr.SourceImageForRegion(photo_ds.SOPClassUID, photo_ds.SOPInstanceUID),
    )


def whole_image_outline(photo_ds: Dataset) -> np.ndarray:
    """The photo's border as a closed POLYLINE (C.10.5.1.2: 0\\0 is the top-left pixel's corner)."""
    rows, columns = float(photo_ds.Rows), float(photo_ds.Columns)
    return np.array([[0, 0], [0, rows], [columns, rows], [columns, 0], [0, 0]], dtype=np.float32)


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
    tbsa: TbsaEstimate | None = None,
    lesion_seg: Dataset | None = None,
    tbsa_photos: Sequence[tuple[Dataset, str]] | None = None,
    other_evidence: Sequence[Dataset] = (),
) -> hd.sr.ComprehensiveSR:
    """Build the TID 1500 Measurement Report of ``result`` (see the module docstring).

    ``seg`` is the SEG built from the same ``result`` and ``options`` (None when the parsing
    had nothing to segment: then only the image-level group is written). ``statistics`` is
    ``region_statistics(result)``; ``lesion`` is ``lesion_statistics(result, mask)`` or None;
    ``tbsa`` is ``parse.tbsa.estimate_tbsa(...)`` of the study's photos or None; ``lesion_seg`` a
    received lesion SEG the lesion mask came from, listed in the evidence. ``tbsa_photos``: the
    photos a study's estimate combines, with their views (see :func:`tbsa_groups`);
    ``other_evidence``: the other photos and lesion SEGs it used, listed in the evidence too.
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
                _measurement(codetable.PERSON_COUNT, statistics.person_count, codetable.NO_UNITS,
                             whole_image(photo_ds)),
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
        finding = _FindingContent(
            finding_category=coding.category,
            finding_type=coding.finding_type,
            finding_sites=(
                [hd.sr.FindingSite(coding.property_type, laterality=coding.laterality)]
                if coding.is_anatomy else None
            ),
            algorithm_id=algorithm,
        )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=references.tracking_identifier(segment),
                referenced_segment=references.referenced_segment(segment),
                measurements=_region_measurements(region, lesion_by_class.get(region.class_index)),
                **finding,
            )
        )
        groups += outline_groups(photo_ds, coding.label, segment.mask(result), finding, options,
                                 region_tracking=references.tracking_identifier(segment))

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
            person_tracking = references.tracking_identifier(segment)
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=person_tracking,
                    referenced_segment=references.referenced_segment(segment),
                    **common,
                )
            )
        else:  # persons not segmented: the group stands on the photo (TID 1501)
            person_tracking = hd.sr.TrackingIdentifier(
                uid=new_uid(options), identifier=f"Person {person.person_index + 1}"
            )
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=person_tracking,
                    source_images=[
                        hd.sr.SourceImageForMeasurementGroup(photo_ds.SOPClassUID, photo_ds.SOPInstanceUID)
                    ],
                    **common,
                )
            )
        person_finding = _FindingContent(
            finding_category=person_coding.category,
            finding_type=person_coding.finding_type,
            finding_sites=None,
            algorithm_id=algorithm,
        )
        person_mask = np.asarray(result.persons[person.person_index].mask, dtype=bool)
        groups += outline_groups(photo_ds, f"Person {person.person_index + 1}", person_mask, person_finding,
                                 options, region_tracking=person_tracking)

    if tbsa is not None:
        groups += tbsa_groups(photo_ds, tbsa, algorithm, options, tbsa_photos)

    report = hd.sr.MeasurementReport(
        observation_context=observation_context(options),
        procedure_reported=codes.cid100.ImagingProcedure,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )

    when = content_datetime(options)
    evidence = [photo_ref] + [d for d in (seg, lesion_seg) if d is not None]
    listed = {str(d.SOPInstanceUID) for d in evidence}
    for other in other_evidence:
        if str(other.SOPInstanceUID) not in listed:
            listed.add(str(other.SOPInstanceUID))
            evidence.append(other)
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
