"""Ask dicom3tools' dciodvfy which Body Part Examined terms it treats as unpaired structures.

General Series Laterality (PS3.3 C.7.3.1, Type 2C) is "required if the body part examined is a
paired structure"; dciodvfy decides that from Body Part Examined (PS3.16 Annex L, CID 4031
defined terms) with a table of its own. This script recovers that table by asking dciodvfy:
for each candidate term it builds a colour Secondary Capture with that Body Part Examined and

- Laterality absent: dciodvfy reports "Missing attribute Type 2C" for a paired (or unknown) part;
- Laterality empty: dciodvfy reports "should be absent (not empty) if an unpaired body part".

A term whose absent-laterality SC passes and whose empty-laterality SC fails is unpaired.

Candidates: the uppercase tokens (``^[A-Z][A-Z0-9]{1,15}$``) of the printable strings in the
dciodvfy binary near body part terms of the hand list below, with their suffixes (the linker
merges a string into the tail of a longer one, e.g. ABDOMEN into NECKCHESTABDOMEN), plus that
hand list of common CID 4031 terms, paired and unpaired.

Usage: python scripts/probe_laterality.py [--window N | --all] [--show-paired]
Prints the dciodvfy version, the classification and the frozenset literal for
``dicom_node/encode/body_parts.py``.
"""

from __future__ import annotations

import argparse
import copy
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.encode.sc import build_overlay_sc
from dicom_node.parse.result import result_from_label_map

# Common PS3.16 CID 4031 Body Part Examined defined terms (paired and unpaired), and a few terms
# this node sees (SKIN, TRUNK): candidates only, dciodvfy decides which are unpaired.
HAND_LIST: tuple[str, ...] = (
    "ABDOMEN", "ABDOMENPELVIS", "ADRENAL", "ANKLE", "ANUS", "AORTA", "APPENDIX", "ARM", "AXILLA",
    "BACK", "BILEDUCT", "BLADDER", "BRAIN", "BREAST", "BRONCHUS", "BUTTOCK", "CALCANEUS", "CALF",
    "CAROTID", "CEREBELLUM", "CERVIX", "CHEEK", "CHEST", "CHESTABDOMEN", "CHESTABDPELVIS",
    "CIRCLEOFWILLIS", "CLAVICLE", "COCCYX", "COLON", "CORNEA", "CORONARYARTERY", "CSPINE",
    "CTSPINE", "DUODENUM", "EAR", "ELBOW", "ESOPHAGUS", "EXTREMITY", "EYE", "EYELID", "FACE",
    "FEMUR", "FINGER", "FOOT", "FOREARM", "GALLBLADDER", "HAND", "HEAD", "HEADNECK", "HEART",
    "HIP", "HUMERUS", "IAC", "ILEUM", "ILIUM", "JAW", "JEJUNUM", "KIDNEY", "KNEE", "LARYNX", "LEG",
    "LIVER", "LSPINE", "LSSPINE", "LUNG", "MAXILLA", "MEDIASTINUM", "MOUTH", "NECK", "NECKCHEST",
    "NECKCHESTABDOMEN", "NECKCHESTABDPELV", "NOSE", "ORBIT", "OVARY", "PANCREAS", "PAROTID",
    "PATELLA", "PELVIS", "PENIS", "PHARYNX", "PROSTATE", "RADIUS", "RECTUM", "RIB", "SACRUM",
    "SCALP", "SCAPULA", "SCLERA", "SCROTUM", "SHOULDER", "SKIN", "SKULL", "SPINE", "SPLEEN",
    "SSPINE", "STERNUM", "STOMACH", "SUBMANDIBULAR", "TESTIS", "THIGH", "THUMB", "THYMUS",
    "THYROID", "TIBIA", "TLSPINE", "TOE", "TONGUE", "TRACHEA", "TRUNK", "TSPINE", "ULNA",
    "UPRGITRACT", "URETER", "URETHRA", "UTERUS", "VAGINA", "VULVA", "WHOLEBODY", "WRIST", "ZYGOMA",
    "FOOBAR",  # not a defined term: how dciodvfy treats an unknown value
)

TOKEN = re.compile(r"^[A-Z][A-Z0-9]{1,15}$")


def dciodvfy_version() -> str:
    """The Debian package version of dicom3tools (dciodvfy has no --version)."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "dicom3tools"],
                             capture_output=True, text=True, check=True).stdout
        return f"dicom3tools {out.strip()} (Debian package)"
    except (OSError, subprocess.CalledProcessError):
        return "dicom3tools (version unknown: not a Debian package)"


def binary_strings(path: str) -> list[str]:
    """The printable runs of 2+ characters in a binary, in order (like ``strings -n 2``)."""
    data = Path(path).read_bytes()
    return [m.decode("ascii") for m in re.findall(rb"[\x20-\x7e]{2,}", data)]


def candidates(window: int | None) -> list[str]:
    """Hand list plus uppercase tokens (and their suffixes) near hand-list terms in dciodvfy
    (``window`` None: every uppercase token of the binary)."""
    exe = shutil.which("dciodvfy")
    assert exe is not None
    lines = binary_strings(exe)
    anchors = set(HAND_LIST)
    found: set[str] = set(HAND_LIST)
    for i, line in enumerate(lines):
        if window is not None and line not in anchors:
            continue
        nearby = [line] if window is None else lines[max(0, i - window): i + window + 1]
        for token in nearby:
            if TOKEN.match(token):
                found.update(token[k:] for k in range(len(token) - 1) if TOKEN.match(token[k:]))
    return sorted(found)


def base_sc() -> Dataset:
    """A small colour SC of a VL photograph, built by the node's own builder."""
    photo = Dataset()
    photo.file_meta = FileMetaDataset()
    photo.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    photo.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.4"
    photo.SOPInstanceUID, photo.StudyInstanceUID, photo.SeriesInstanceUID = (
        generate_uid(), generate_uid(), generate_uid())
    photo.PatientName, photo.PatientID, photo.PatientBirthDate, photo.PatientSex = "Probe^Photo", "P", "", ""
    photo.StudyDate, photo.StudyTime, photo.StudyID, photo.AccessionNumber = "20240611", "120000", "1", ""
    photo.ReferringPhysicianName, photo.Modality, photo.PatientOrientation = "", "XC", ""
    photo.Rows, photo.Columns = 16, 16
    label_map = np.zeros((16, 16), dtype=np.uint8)
    label_map[4:12, 4:12] = 10
    result = result_from_label_map(label_map, [label_map > 0])
    sc = build_overlay_sc(photo, np.zeros((16, 16, 3), dtype=np.uint8), result)
    for keyword in ("BodyPartExamined", "Laterality"):
        if keyword in sc:
            del sc[keyword]
    return sc


def laterality_errors(sc: Dataset, body_part: str | None, laterality: str | None, tmp: Path) -> list[str]:
    """dciodvfy's Error lines about Laterality for ``sc`` with these two values (None: absent)."""
    ds = copy.deepcopy(sc)  # Dataset.copy() is shallow: its elements are shared between threads
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if laterality is not None:
        ds.Laterality = laterality
    path = tmp / f"{body_part}-{'absent' if laterality is None else 'empty'}.dcm"
    ds.save_as(path, enforce_file_format=True)
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace")
    lines = (done.stderr + done.stdout).splitlines()
    return [line for line in lines if line.startswith("Error") and "Laterality" in line]


def classify(sc: Dataset, term: str | None, tmp: Path) -> str:
    """unpaired: absent passes, empty fails; paired: absent fails, empty passes."""
    absent = laterality_errors(sc, term, None, tmp)
    empty = laterality_errors(sc, term, "", tmp)
    if not absent and empty:
        return "unpaired"
    if absent and not empty:
        return "paired"
    if not absent and not empty:
        return "either"
    return f"odd: absent={absent} empty={empty}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=80, help="strings either side of a hand-list term")
    parser.add_argument("--all", action="store_true",
                        help="every uppercase token of the binary, not only those near body parts (slow)")
    parser.add_argument("--show-paired", action="store_true", help="list every paired candidate too")
    args = parser.parse_args()
    if shutil.which("dciodvfy") is None:
        print("dciodvfy not found (Debian package dicom3tools)", file=sys.stderr)
        return 2
    terms = candidates(None if args.all else args.window)
    sc = base_sc()
    with tempfile.TemporaryDirectory() as tmp_dir, ThreadPoolExecutor(16) as pool:
        tmp = Path(tmp_dir)
        no_body_part = classify(sc, None, tmp)
        verdicts = dict(zip(terms, pool.map(lambda t: classify(sc, t, tmp), terms), strict=True))
    print(f"dciodvfy: {dciodvfy_version()}; {len(terms)} candidate terms")
    print(f"no Body Part Examined: {no_body_part}")
    by_class: dict[str, list[str]] = {}
    for term, verdict in verdicts.items():
        by_class.setdefault(verdict if not verdict.startswith("odd") else "odd", []).append(term)
    for verdict, members in sorted(by_class.items()):
        shown = members if verdict != "paired" or args.show_paired else [t for t in members if t in HAND_LIST]
        note = "" if shown is members else f" (hand-list terms only; {len(members)} in all)"
        print(f"{verdict}: {len(members)}{note}\n  " + " ".join(shown))
    for term, verdict in verdicts.items():
        if verdict.startswith("odd"):
            print(f"  {term}: {verdict}")
    unpaired = sorted(by_class.get("unpaired", []))
    print("\nUNPAIRED_BODY_PARTS: frozenset[str] = frozenset({")
    line = "   "
    for term in unpaired:
        item = f' "{term}",'
        if len(line) + len(item) > 100:
            print(line)
            line = "   "
        line += item
    print(line + "\n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
