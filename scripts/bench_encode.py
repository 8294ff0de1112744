"""Time building and writing SEG + SC + SR for a 4000x3000 photo with 8 classes and 1 person.

Usage: python scripts/bench_encode.py [--repeat N] [--jpeg] [--out DIR]
Prints the start-up ``warm_up()`` time, the first photo after it and the warm median, against
the target of 1.0 s for all three objects, built and written. The overlay picture is rendered
inside the timing, as the node does (``encode_results`` renders it beside SEG and SR).
Machines with few cores vary by 20-30 % from run to run: compare figures taken in one run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.encode.options import EncodeOptions
from dicom_node.encode.results import encode_results, warm_up
from dicom_node.parse.result import result_from_label_map

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


def smooth_photo(rows: int, columns: int) -> np.ndarray:
    """A photo-like image (gradients and mild noise): pure noise would make JPEG unrealistically slow."""
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float32)
    noise = np.random.default_rng(0).normal(0, 4, (rows, columns, 3)).astype(np.float32)
    red, green = 120 + 80 * xx / columns, 90 + 60 * yy / rows
    blue = 100 + 40 * (xx + yy) / (rows + columns)
    base = np.stack([red, green, blue], axis=-1)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


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

    photo_rgb = smooth_photo(ROWS, COLUMNS)
    result = parsing(ROWS, COLUMNS)
    options = EncodeOptions(sc_jpeg=args.jpeg)

    def run_once(out: Path) -> tuple[float, float, float, dict[str, int]]:
        photo_ds = photo_dataset(ROWS, COLUMNS)
        start = time.perf_counter()
        encoded = encode_results(photo_ds, photo_rgb, result, None, options)
        built = time.perf_counter()
        sizes = {}
        for name, ds in (("seg", encoded.seg), ("sc", encoded.sc), ("sr", encoded.sr)):
            path = out / f"{name}.dcm"
            ds.save_as(path, enforce_file_format=True)
            sizes[name] = path.stat().st_size
        done = time.perf_counter()
        return built - start, done - built, done - start, sizes

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        warm_up_start = time.perf_counter()
        warm_up()  # what the node does at start-up: loads highdicom's tables of the standard
        warm_up_s = time.perf_counter() - warm_up_start
        first = run_once(out)
        timings = [run_once(out) for _ in range(max(args.repeat, 1))]

    sizes = timings[-1][3]
    warm_total = statistics.median(t[2] for t in timings)
    print(f"photo {COLUMNS}x{ROWS}, {len(CLASSES)} classes + 1 person -> "
          f"{len(CLASSES) + 1} segments, SC {'JPEG' if args.jpeg else 'uncompressed'}")
    print("sizes: " + ", ".join(f"{n} {s / 1e6:.1f} MB" for n, s in sizes.items()))
    print(f"start-up warm_up(): {warm_up_s:.3f} s; first photo after it: build {first[0]:.3f} s + "
          f"write {first[1]:.3f} s = {first[2]:.3f} s")
    print(f"warm (median of {len(timings)}): build {statistics.median(t[0] for t in timings):.3f} s + "
          f"write {statistics.median(t[1] for t in timings):.3f} s = {warm_total:.3f} s "
          f"(min {min(t[2] for t in timings):.3f} s, max {max(t[2] for t in timings):.3f} s)")
    verdict = "OK" if warm_total <= TARGET_S else "OVER"
    print(f"target <= {TARGET_S:.1f} s (warm, build + write all three): {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
