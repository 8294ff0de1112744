"""The one code table: how each CIHP class and each SR measurement is coded in DICOM.

Read this file to learn "how is Hair coded". SEG, SR (and anything else that needs a concept)
take their codes from here; nothing else in the package spells a code value.

Choices, and where they come from:

- Segmented Property Category (PS3.3 C.8.20.2, CID 7150): Anatomical Structure (SCT 91723000)
  for body parts, Physical Object (SCT 260787004) for clothes and accessories.
- Segmented Property Type (CID 7151, extensible): SNOMED CT where a concept fits; every code
  below was checked against pydicom's concept dictionary (``pydicom.sr.codedict.codes``).
- Laterality goes in the Segmented Property Type Modifier (CID 244: Left SCT 7771000,
  Right SCT 24028007), not in a lateralised anatomy code, so Left-arm and Right-arm share
  the type "Upper limb".
- Garments are typed "Clothing" (SCT 272180002) and the garment is named by a modifier from
  our private scheme, so a consumer that knows SNOMED sees "Clothing" and one that reads the
  modifier sees "Upper clothes".
- Where no standard concept exists (Hat, Gloves, Sunglasses, shoes, the garment names and the
  SR's share/percent/count concepts) we use the private scheme :data:`PRIVATE_SCHEME`
  (PS3.16 Section 8.2: a designator beginning with "99" is a private scheme). It is declared in the
  Coding Scheme Identification Sequence (0008,0110) of every object that uses it
  (:func:`coding_scheme_identification`). For classes the code value is the CIHP class index.
"""

from __future__ import annotations

from dataclasses import dataclass

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.parse.classes import CLASS_NAMES, HUMAN

PRIVATE_SCHEME = "99M2FP"
PRIVATE_SCHEME_NAME = "dicom_node M2FP human parsing codes"
PRIVATE_SCHEME_ORGANIZATION = "dicom_node project"


def private_code(value: str | int, meaning: str) -> Code:
    """A concept of the private scheme :data:`PRIVATE_SCHEME` (code value SH: 16 characters)."""
    value = str(value)
    if not 0 < len(value) <= 16:
        raise ValueError(f"private code value {value!r} must have 1 to 16 characters (VR SH)")
    return Code(value, PRIVATE_SCHEME, meaning)


def coding_scheme_identification() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification Sequence item declaring :data:`PRIVATE_SCHEME`.

    PS3.3 C.12.1.1.2: a coding scheme that is not in PS3.16's registry (Table 8-1) shall be
    identified in (0008,0110) of every SOP instance that uses it.
    """
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name=PRIVATE_SCHEME_NAME,
        version="1",
        responsible_organization=PRIVATE_SCHEME_ORGANIZATION,
    )


# Segmented Property Categories (CID 7150).
ANATOMICAL_STRUCTURE: Code = codes.SCT.AnatomicalStructure  # 91723000
PHYSICAL_OBJECT: Code = codes.SCT.PhysicalObject  # 260787004

# Laterality modifiers (CID 244).
LEFT: Code = codes.SCT.Left  # 7771000
RIGHT: Code = codes.SCT.Right  # 24028007

# Standard property types used below (all in pydicom's SNOMED CT dictionary).
FACE: Code = codes.SCT.Face  # 89545001
HAIR: Code = codes.SCT.Hair  # 386045008
UPPER_LIMB: Code = codes.SCT.UpperLimb  # 53120007
LOWER_LIMB: Code = codes.SCT.LowerLimb  # 61685007
# CIHP's "Torso-skin" is the visible skin of neck, chest and belly. "Skin of upper trunk"
# (SCT 54440003) would leave out the belly, so we use the whole "Trunk" (SCT 22943007), as the
# limbs use the whole "Upper limb"/"Lower limb" rather than their skin.
TRUNK: Code = codes.SCT.Trunk  # 22943007
CLOTHING: Code = codes.SCT.Clothing  # 272180002
ENTIRE_BODY: Code = codes.SCT.EntireBody  # 38266002


@dataclass(frozen=True)
class ClassCoding:
    """How one CIHP class is coded in a SEG segment description and an SR measurement group.

    ``modifiers`` go to the Segmented Property Type Modifier Code Sequence (0062,0011);
    ``laterality`` (one of them, or None) is also what the SR's finding site carries.
    """

    class_index: int
    label: str  # Segment Label (LO) and SR tracking identifier
    category: Code
    property_type: Code
    modifiers: tuple[Code, ...] = ()
    laterality: Code | None = None

    @property
    def is_anatomy(self) -> bool:
        return self.category == ANATOMICAL_STRUCTURE

    @property
    def finding_type(self) -> Code:
        """The most specific concept, for the SR's Finding (TID 1411 row "Finding").

        SR content items have no property-type modifier, so a garment is named by its
        private code there ("Upper clothes") instead of the SEG's "Clothing" + modifier.
        """
        garment = [m for m in self.modifiers if m.scheme_designator == PRIVATE_SCHEME]
        return garment[0] if garment else self.property_type


def _garment(index: int, label: str, meaning: str) -> ClassCoding:
    return ClassCoding(index, label, PHYSICAL_OBJECT, CLOTHING, (private_code(index, meaning),))


def _accessory(index: int, label: str, meaning: str, laterality: Code | None = None) -> ClassCoding:
    modifiers = (laterality,) if laterality is not None else ()
    return ClassCoding(index, label, PHYSICAL_OBJECT, private_code(index, meaning), modifiers, laterality)


def _anatomy(index: int, label: str, property_type: Code, laterality: Code | None = None) -> ClassCoding:
    modifiers = (laterality,) if laterality is not None else ()
    return ClassCoding(index, label, ANATOMICAL_STRUCTURE, property_type, modifiers, laterality)


CLASS_CODINGS: dict[int, ClassCoding] = {
    c.class_index: c
    for c in (
        _accessory(1, "Hat", "Hat"),
        _anatomy(2, "Hair", HAIR),
        _accessory(3, "Gloves", "Gloves"),
        _accessory(4, "Sunglasses", "Sunglasses"),
        _garment(5, "Upper clothes", "Upper clothes"),
        _garment(6, "Dress", "Dress"),
        _garment(7, "Coat", "Coat"),
        _garment(8, "Socks", "Socks"),
        _garment(9, "Pants", "Pants"),
        _anatomy(10, "Torso skin", TRUNK),
        _garment(11, "Scarf", "Scarf"),
        _garment(12, "Skirt", "Skirt"),
        _anatomy(13, "Face", FACE),
        _anatomy(14, "Left arm", UPPER_LIMB, LEFT),
        _anatomy(15, "Right arm", UPPER_LIMB, RIGHT),
        _anatomy(16, "Left leg", LOWER_LIMB, LEFT),
        _anatomy(17, "Right leg", LOWER_LIMB, RIGHT),
        _accessory(18, "Left shoe", "Left shoe", LEFT),
        _accessory(19, "Right shoe", "Right shoe", RIGHT),
        # Whole-person instances (never in the label map): one segment per person.
        _anatomy(HUMAN, "Person", ENTIRE_BODY),
    )
}

assert sorted(CLASS_CODINGS) == list(range(1, len(CLASS_NAMES)))


def class_coding(class_index: int) -> ClassCoding:
    """The coding of CIHP class ``class_index`` (1..20); Background (0) has none."""
    try:
        return CLASS_CODINGS[class_index]
    except KeyError:
        raise ValueError(
            f"class index {class_index} has no DICOM coding (valid: 1..{len(CLASS_NAMES) - 1})"
        ) from None


# --- SR concepts (PS3.16 TID 1500 / TID 1411 / TID 300) --------------------------------------

#: Measurement name for a region's area (SCT 42798000, CID 7469 "Generic Intensity and Size
#: Measurements"). A photograph has no calibrated pixel spacing, so the unit is pixels.
AREA: Code = codes.SCT.Area
#: UCUM annotation unit: "{pixels}" is dimensionless (UCUM §4.3 curly-brace annotations).
PIXELS: Code = Code("{pixels}", "UCUM", "pixels")
PERCENT: Code = codes.UCUM.Percent  # "%"
NO_UNITS: Code = codes.UCUM.NoUnits  # "1", for counts

AREA_PERCENT_OF_IMAGE = private_code("AREA-PCT-IMAGE", "Area as percent of image area")
AREA_PERCENT_OF_PERSONS = private_code("AREA-PCT-PERSON", "Area as percent of person area")
PERSON_COUNT = private_code("PERSON-COUNT", "Number of persons")
LESION_AREA = private_code("LESION-AREA", "Lesion area within region")
LESION_PERCENT_OF_REGION = private_code("LESION-PCT", "Lesion area as percent of region area")

#: Finding of the image-level measurement group (TID 1501): the people in the photograph.
PERSONS_IN_IMAGE = private_code("PERSONS", "Persons in image")


# --- Estimated %TBSA (dicom_node.parse.tbsa) ----------------------------------------------------
# Checked for standard concepts first: LOINC has 88099-7 "Third degree burn area/Body surface area
# [Area/Area] Estimated", which is for full-thickness burns only (a photo's lesion mask says nothing
# of depth), and we found no LOINC or SNOMED CT concept in pydicom's dictionary or PS3.16 for "burnt
# (lesion) percent of the body surface estimated from a chart", nor for the chart's per-region shares.
# So the figures use the private scheme; regions use SNOMED CT anatomy (Head 69536005, Trunk
# 22943007, Upper limb 53120007, Lower limb 61685007 with laterality Left 7771000 / Right 24028007)
# and the side of the body the SNOMED CT topographical modifiers Anterior 255549009 / Posterior
# 255551008, all in pydicom's SNOMED CT dictionary.
HEAD: Code = codes.SCT.Head  # 69536005
ANTERIOR: Code = codes.SCT.Anterior  # 255549009
POSTERIOR: Code = codes.SCT.Posterior  # 255551008
#: Finding of the image-level (TID 1501) %TBSA group.
TBSA_ESTIMATE = private_code("TBSA-ESTIMATE", "Estimated lesion extent as percent of body surface")
#: Finding of each region's (TID 1501) group: the lesion on that region's visible skin.
TBSA_REGION = private_code("TBSA-REGION", "Lesion extent within body region")
TBSA_PERCENT = private_code("TBSA-PCT", "Lesion area as percent of total body surface area")
TBSA_VISIBLE_PERCENT = private_code("TBSA-VIS-PCT", "Visible skin as percent of total body surface area")
TBSA_CHART_PERCENT = private_code("TBSA-CHART-PCT", "Chart share of region as percent of TBSA")
TBSA_VISIBLE_SHARE = private_code("TBSA-VIS-SHARE", "Visible skin share of region")
TBSA_LESION_SHARE = private_code("TBSA-LES-SHARE", "Lesion share of visible region skin")
TBSA_CONTRIBUTION = private_code("TBSA-CONTRIB", "Lesion contribution as percent of TBSA")
TBSA_METHOD = private_code("TBSA-METHOD", "Body surface area chart")
TBSA_AGE_GROUP = private_code("TBSA-AGE-GROUP", "Body surface area chart age group")
TBSA_METHODS: dict[str, Code] = {
    "lund-browder": private_code("LUND-BROWDER", "Lund and Browder chart"),
    "rule-of-nines": private_code("RULE-OF-NINES", "Rule of nines"),
}
TBSA_AGE_GROUPS: dict[str, Code] = {
    "under-1": private_code("AGE-UNDER-1", "Age under 1 year"),
    "1-4": private_code("AGE-1-4", "Age 1 to 4 years"),
    "5-9": private_code("AGE-5-9", "Age 5 to 9 years"),
    "10-14": private_code("AGE-10-14", "Age 10 to 14 years"),
    "15": private_code("AGE-15", "Age 15 years"),
    "adult": private_code("AGE-ADULT", "Adult"),
}
#: Anatomy (and laterality) of each %TBSA region, keyed by :class:`dicom_node.parse.tbsa.Region` value.
TBSA_REGION_SITES: dict[str, tuple[Code, Code | None]] = {
    "head": (HEAD, None),
    "trunk": (TRUNK, None),
    "left upper limb": (UPPER_LIMB, LEFT),
    "right upper limb": (UPPER_LIMB, RIGHT),
    "left lower limb": (LOWER_LIMB, LEFT),
    "right lower limb": (LOWER_LIMB, RIGHT),
}
