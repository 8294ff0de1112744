"""What the SEG, SC and SR builders share: UIDs, the photo's patient/study, the algorithm.

Every result object belongs to the photo's study and patient (PS3.3 C.7.1.1 Patient Module,
C.7.2.1 General Study Module, C.7.2.2 Patient Study Module are copied unchanged) and opens a
series of its own (new Series and SOP Instance UIDs, PS3.3 C.7.3.1).
"""

from __future__ import annotations

import copy
import datetime
from typing import TypedDict

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, TM

from dicom_node.encode.body_parts import is_unpaired
from dicom_node.encode.options import LO_MAX, EncodeOptions
from dicom_node.parse.result import ParsingResult

ALGORITHM_NAME = "M2FP"
ALGORITHM_SOURCE = "M2FP human parsing (Yang et al. 2023, arXiv 2301.00394)"  # LO: <= 64

# Patient Module (C.7.1.1), Clinical Trial Subject (C.7.1.3), General Study (C.7.2.1),
# Patient Study (C.7.2.2) and Clinical Trial Study (C.7.2.3): copied from the photo as they are.
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    # Patient
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
    "OtherPatientIDsSequence", "OtherPatientNames", "EthnicGroup", "PatientComments",
    "PatientSpeciesDescription", "PatientSpeciesCodeSequence", "PatientBreedDescription",
    "PatientBreedCodeSequence", "BreedRegistrationSequence", "ResponsiblePerson",
    "ResponsiblePersonRole", "ResponsibleOrganization", "PatientIdentityRemoved",
    "DeidentificationMethod", "DeidentificationMethodCodeSequence", "QualityControlSubject",
    "StrainDescription", "StrainNomenclature", "StrainAdditionalInformation",
    # Clinical Trial Subject
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    # General Study
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName", "StudyID",
    "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyDescription",
    "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "RequestingService",
    "RequestingServiceCodeSequence", "ReferencedStudySequence", "ProcedureCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    # Patient Study
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "PatientAge",
    "PatientSize", "PatientWeight", "PatientBodyMassIndex", "Occupation",
    "AdditionalPatientHistory", "AdmissionID", "IssuerOfAdmissionIDSequence",
    "PatientSexNeutered", "SmokingStatus", "PregnancyStatus", "LastMenstrualDate",
    # Clinical Trial Study
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription",
)



class Equipment(TypedDict):
    """highdicom's keyword arguments for General Equipment (PS3.3 C.7.5.1), typed so that
    ``**equipment_kwargs(options)`` is checked key by key against each builder's signature."""

    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str
    institution_name: str | None
    institutional_department_name: str | None


def equipment_kwargs(options: EncodeOptions) -> Equipment:
    """The General Equipment attributes shared by SEG, SC and SR: the node is the device."""
    return {
        "manufacturer": options.manufacturer,
        "manufacturer_model_name": options.manufacturer_model_name,
        "software_versions": options.software_versions,
        "device_serial_number": options.device_serial_number,
        "institution_name": options.institution_name,
        "institutional_department_name": options.institutional_department_name,
    }


def new_uid(options: EncodeOptions) -> str:
    """A new UID: under ``options.uid_prefix`` when given, else under highdicom's UID root."""
    if options.uid_prefix:
        return generate_uid(prefix=options.uid_prefix)
    return hd.UID()


def device_observer_uid(options: EncodeOptions) -> str:
    """The node's Device Observer UID (TID 1004): stable for one manufacturer/model/serial."""
    if options.device_observer_uid:
        return options.device_observer_uid
    return generate_uid(
        prefix=None,
        entropy_srcs=[options.manufacturer, options.manufacturer_model_name, options.device_serial_number],
    )


def content_datetime(options: EncodeOptions) -> datetime.datetime:
    """Content Date/Time for all three objects of one photo (the same instant for each)."""
    return options.content_datetime or datetime.datetime.now()


def check_photo(photo_ds: Dataset) -> None:
    """Raise ValueError when the photo lacks what every result object needs to reference it."""
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                    "Rows", "Columns"):
        if keyword not in photo_ds or photo_ds[keyword].value in (None, ""):
            raise ValueError(f"the photo has no {keyword}; results cannot reference it")
    frames = int(photo_ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ValueError(f"the photo has NumberOfFrames {frames}; only single-frame photos are supported")


def check_size(photo_ds: Dataset, result: ParsingResult) -> None:
    """The parsing must be pixel for pixel on the photo (a photo has no Frame of Reference)."""
    rows, columns = int(photo_ds.Rows), int(photo_ds.Columns)
    if result.size_hw != (rows, columns):
        raise ValueError(
            f"the parsing is {result.size_hw[1]}x{result.size_hw[0]} but the photo (Rows, Columns) "
            f"is {columns}x{rows}: a photo has no Frame of Reference, so results must match it "
            "pixel for pixel"
        )
    for person in result.persons:
        if tuple(person.mask.shape) != (rows, columns):
            raise ValueError(
                f"person {person.index + 1}'s mask is {person.mask.shape[1]}x{person.mask.shape[0]} "
                f"but the photo is {columns}x{rows}"
            )


def photo_reference(photo_ds: Dataset) -> Dataset:
    """The photo's metadata for the builder library: no pixel data, patient values it accepts.

    highdicom insists on some Type 2 patient/study attributes and rejects some values the photo
    may carry (a Patient's Sex outside M/F/O, a malformed date). The builders hand it this copy,
    with those attributes empty, and then restore the photo's values unchanged with
    :func:`copy_patient_study`: patient data is passed on, never edited.
    """
    reference = Dataset()
    for element in photo_ds:
        if element.tag.group != 0x7FE0:  # Pixel Data and friends: not needed to reference
            reference.add(element)
    if hasattr(photo_ds, "file_meta"):
        reference.file_meta = photo_ds.file_meta
    for keyword in _REFERENCE_TYPE2_KEYWORDS:
        if keyword not in reference or not _acceptable(keyword, reference[keyword].value):
            if keyword in reference:
                del reference[keyword]  # a new element below: the photo's own stays untouched
            setattr(reference, keyword, None)
    return reference


# Type 2 Patient / General Study attributes the builder library reads from the source image
# (a photo from a non-conformant gateway may lack them); copy_patient_study restores the photo's.
_REFERENCE_TYPE2_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "StudyID", "AccessionNumber", "ReferringPhysicianName",
)


def _acceptable(keyword: str, value) -> bool:
    """Whether highdicom takes the photo's value as it is."""
    if value in (None, ""):
        return True
    try:
        if keyword == "PatientSex":
            return str(value) in ("M", "F", "O")
        if keyword in ("PatientBirthDate", "StudyDate"):
            return DA(value) is not None
        if keyword == "StudyTime":
            return TM(value) is not None
    except (ValueError, TypeError):
        return False
    return True


def copy_patient_study(photo_ds: Dataset, target: Dataset) -> None:
    """Copy the photo's Patient and Study modules (and character set) onto ``target``.

    The result objects belong to the photo's patient and study (PS3.3 C.7.1.1, C.7.2.1): what
    the photo says is copied as it is (deep copies: the photo is never modified); the Type 2
    attributes it lacks are present and empty on ``target``, as the modules require.
    """
    if "SpecificCharacterSet" in photo_ds:
        target.SpecificCharacterSet = photo_ds.SpecificCharacterSet
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in photo_ds:
            target[keyword] = copy.deepcopy(photo_ds[keyword])
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        if keyword not in target:  # Type 2 in the Patient / General Study modules
            setattr(target, keyword, None)


def copy_body_context(photo_ds: Dataset, target: Dataset) -> None:
    """Copy Body Part Examined (General Series, C.7.3.1) from the photo; never Laterality.

    General Series Laterality is Type 2C ("required if the body part examined is a paired
    structure"), and dciodvfy checks it per IOD: on a SEG it counts the condition as never
    satisfied and reports a Laterality of any value, even empty, as "present when condition
    unsatisfied", so the SEG carries none (the photo's laterality stays reachable through the
    SEG's reference to the photo). The SC sets it with :func:`set_sc_laterality`.
    """
    if "BodyPartExamined" in photo_ds and photo_ds.BodyPartExamined not in (None, ""):
        target["BodyPartExamined"] = copy.deepcopy(photo_ds["BodyPartExamined"])


def set_sc_laterality(photo_ds: Dataset, target: Dataset) -> None:
    """General Series Laterality (C.7.3.1, Type 2C) of the SC, as dciodvfy checks it for the SC.

    - Body Part Examined an unpaired structure (:data:`~dicom_node.encode.body_parts.UNPAIRED_BODY_PARTS`):
      absent. dciodvfy rejects an empty one ("should be absent (not empty) if an unpaired body
      part") and one with a value ("present when condition unsatisfied"), so even the photo's
      own value is left out; it stays reachable through the SC's reference to the photo.
    - Otherwise (paired, unknown term, or no Body Part Examined, when nobody can tell the part
      has no sides): the photo's value when it has one, else present and empty ("unknown";
      dciodvfy warns that empty is only for unknown, which is the truth here).
    """
    if "Laterality" in target:
        del target["Laterality"]
    if is_unpaired(photo_ds.get("BodyPartExamined")):
        return
    if "Laterality" in photo_ds and photo_ds.Laterality not in (None, ""):
        target["Laterality"] = copy.deepcopy(photo_ds["Laterality"])
    else:
        target.Laterality = ""


def set_lossy_compression(target: Dataset, history: tuple[list[str], list[str]] | None) -> None:
    """Lossy Image Compression (C.7.6.1.1.5) of a derived image: "01" with ratios and methods.

    ``history`` is what :func:`lossy_compression_history` found, possibly extended with this
    object's own compression; None marks the image as never lossy compressed ("00").
    Ratios are written only when there is one per method, so the two lists stay aligned.
    """
    for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if keyword in target:
            del target[keyword]
    if history is None:
        target.LossyImageCompression = "00"
        return
    ratios, methods = history
    target.LossyImageCompression = "01"
    if methods:
        target.LossyImageCompressionMethod = methods
        if len(ratios) == len(methods):
            target.LossyImageCompressionRatio = ratios


def set_content_datetime(target: Dataset, when: datetime.datetime) -> None:
    """Content, Series and Instance Creation Date/Time (C.7.6.1, C.7.3.1, C.12.1) from one instant."""
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f")
    target.ContentDate, target.ContentTime = date, time
    target.SeriesDate, target.SeriesTime = date, time
    target.InstanceCreationDate, target.InstanceCreationTime = date, time


def algorithm_version(result: ParsingResult) -> str:
    """Algorithm Version (LO): the model digest, cut to 64 characters."""
    return (result.model_digest or "unknown")[:LO_MAX]


def algorithm_parameters(result: ParsingResult) -> dict[str, str]:
    """Algorithm Parameters: whether the weights were the trained checkpoint, and the whole
    digest when Algorithm Version had to cut it."""
    parameters = {"weights": "untrained" if result.model_untrained else "trained"}
    if len(result.model_digest or "") > LO_MAX:
        parameters["digest"] = result.model_digest
    return parameters


def algorithm_identification(result: ParsingResult) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence (PS3.3 C.8.20.2 Segment Description, CID 7162 family)."""
    return hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm_version(result),
        source=ALGORITHM_SOURCE,
        parameters=algorithm_parameters(result),
    )


def sr_algorithm_identification(result: ParsingResult) -> hd.sr.AlgorithmIdentification:
    """The same algorithm as PS3.16 TID 4019 Algorithm Identification, for SR content."""
    return hd.sr.AlgorithmIdentification(
        name=ALGORITHM_NAME,
        version=algorithm_version(result),
        parameters=[f"{k}={v}" for k, v in algorithm_parameters(result).items()],
        family=codes.cid7162.ArtificialIntelligence,
    )


def lossy_compression_history(photo_ds: Dataset) -> tuple[list[str], list[str]] | None:
    """The photo's lossy compression (ratios, methods), or None when it never was lossy.

    PS3.3 C.7.6.1.1.5: once lossy, always lossy; derived images carry "01" and the history.
    A JPEG Baseline/Extended transfer syntax counts even when the photo does not say so
    itself (some gateways and cameras omit Lossy Image Compression).
    """
    lossy_flag = str(photo_ds.get("LossyImageCompression", "")) == "01"
    ts = getattr(getattr(photo_ds, "file_meta", None), "TransferSyntaxUID", None)
    ts_method = _LOSSY_TRANSFER_SYNTAX_METHODS.get(str(ts)) if ts else None
    if not lossy_flag and ts_method is None:
        return None
    ratios = [str(v) for v in _as_list(photo_ds.get("LossyImageCompressionRatio"))]
    methods = [str(v) for v in _as_list(photo_ds.get("LossyImageCompressionMethod"))]
    if not methods and ts_method:
        methods = [ts_method]
    return ratios, methods


def _as_list(value) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return list(value)
    return [value]


# Transfer syntaxes that are always lossy, with their Lossy Image Compression Method Defined Term
# (PS3.3 C.7.6.1.1.5.1). Syntaxes that may also be reversible (JPEG 2000, JPEG-LS near-lossless)
# count only when the photo's Lossy Image Compression says "01".
_LOSSY_TRANSFER_SYNTAX_METHODS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended (Process 2 & 4)
}
