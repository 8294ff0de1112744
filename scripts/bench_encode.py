"""Time building and writing SEG + SC + SR for a 4000x3000 photo with 8 classes and 1 person.

Usage: python scripts/bench_encode.py [--repeat N] [--jpeg] [--out DIR]
Prints the cold (first call in this process) and the warm (median of the rest) figures
against the target of 1.0 s for all three objects, built and written.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_node.encode import EncodeOptions, encode_results  # noqa: E402
from dicom_node.parse.render import overlay  # noqa: E402
from dicom_node.parse.result import result_from_label_map  # noqa: E402

TARGET_S = 1.0
ROWS, COLUMNS = 3000, 4000
CLASSES = (2, 5, 9, 10, 13, 14, 15, 16)  # Hair, UpperClothes, Pants, Torso-skin, Face, arms, leg


def photo_dataset(rows: int, columns: int) -> Dataset:
    """An uncompressed RGB VL Photographic Image header (pixel data is not needed to encode)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.4"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^Photo", "BENCH", "", ""
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240611", "120000", "1", ""
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "XC", 1, 1
    ds.BodyPartExamined, ds.PatientOrientation = "WHOLEBODY", ""
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 3, "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    return ds


def parsing(rows: int, columns: int):
    label_map = np.zeros((rows, columns), dtype=np.uint8)
    band = rows // (len(CLASSES) + 2)
    for i, class_index in enumerate(CLASSES):
        label_map[band * (i + 1):band * (i + 2), columns // 8:columns * 7 // 8] = class_index
    person = np.zeros((rows, columns), dtype=bool)
    person[band // 2:rows - band // 2, columns // 10:columns * 9 // 10] = True
    return result_from_label_map(label_map, [person], model_digest="bench")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--jpeg", action="store_true", help="JPEG Baseline SC (sc_jpeg=True)")
    parser.add_argument("--out", type=Path, default=None, help="write here (default: a temporary dir)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    photo_rgb = rng.integers(0, 256, (ROWS, COLUMNS, 3), dtype=np.uint8)
    result = parsing(ROWS, COLUMNS)
    overlay_rgb = overlay(photo_rgb, result.label_map)  # made by render.py, not timed here
    options = EncodeOptions(sc_jpeg=args.jpeg)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        timings = []
        for _ in range(max(args.repeat, 1)):
            photo_ds = photo_dataset(ROWS, COLUMNS)
            start = time.perf_counter()
            encoded = encode_results(photo_ds, photo_rgb, result, overlay_rgb, options)
            built = time.perf_counter()
            sizes = {}
            for name, ds in (("seg", encoded.seg), ("sc", encoded.sc), ("sr", encoded.sr)):
                path = out / f"{name}.dcm"
                ds.save_as(path, enforce_file_format=True)
                sizes[name] = path.stat().st_size
            done = time.perf_counter()
            timings.append((built - start, done - built, done - start))

    cold = timings[0]
    warm = timings[1:] or timings
    warm_total = statistics.median(t[2] for t in warm)
    print(f"photo {COLUMNS}x{ROWS}, {len(CLASSES)} classes + 1 person -> "
          f"{len(CLASSES) + 1} segments, SC {'JPEG' if args.jpeg else 'uncompressed'}")
    print("sizes: " + ", ".join(f"{n} {s / 1e6:.1f} MB" for n, s in sizes.items()))
    print(f"cold (first call): build {cold[0]:.3f} s + write {cold[1]:.3f} s = {cold[2]:.3f} s")
    print(f"warm (median of {len(warm)}): build {statistics.median(t[0] for t in warm):.3f} s + "
          f"write {statistics.median(t[1] for t in warm):.3f} s = {warm_total:.3f} s")
    verdict = "OK" if warm_total <= TARGET_S else "OVER"
    print(f"target <= {TARGET_S:.1f} s (warm, build + write all three): {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
