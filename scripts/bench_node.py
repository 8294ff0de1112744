#!/usr/bin/env python
"""Benchmark the node's intake against dcmtk's storescp, and its end-to-end overhead with Orthanc.

1. Intake rate: photos acknowledged per second, ~1 MB uncompressed VL photos sent by dcmtk's
   storescu over one association and over 4 parallel associations, to
   (a) ``dicom-node serve`` with ``worker.count = 0`` (intake only: spool + fsync + job commit), and
   (b) dcmtk's ``storescp`` writing the same files to disk (no fsync, no database).
   Target: node >= 0.5 x storescp.
2. End-to-end: a 12 MP photo C-STOREd to the node until its SEG, SC and SR are stored in Orthanc
   (polled over REST), minus the parse time the node records (``parse_s``). Target <= 0.5 s.
   The breakdown comes from the node's ``worker.timings`` and ``dispatch.sent`` log lines.

Usage: .venv/bin/python scripts/bench_node.py [--photos 100] [--e2e-photos 3] [--model-dir DIR]
Needs dcmtk and orthanc (Debian packages). With no --model-dir, an UNTRAINED small model is made in
a temporary directory (parse times are then not those of the real model; the overhead is).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.node_fixtures import (  # noqa: E402  (the tests' process helpers: one copy of each)
    SCU_AET,
    NodeProcess,
    Orthanc,
    StoreSCP,
    free_port,
    node_config,
    wait_until,
)
from tests.photo_factory import make_vl_photo, synthetic_rgb, write_dataset  # noqa: E402

PARALLEL = 4
SIDE_1MB = 578  # 578 x 578 x 3 bytes = 1.0 MB of pixel data
# dcmtk leaves Nagle's algorithm on unless TCP_NODELAY=1 is in its environment; then every object
# waits for a delayed ACK (~40 ms) and storescp tops out near 20 photos/s. Both settings are measured
# (for the sender and for storescp); the node always turns Nagle off on its own sockets.
DCMTK_SETTINGS = {"dcmtk default": "0", "TCP_NODELAY=1": "1"}


def make_photos(directory: Path, count: int, rows: int, columns: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rgb = synthetic_rgb(rows, columns)
    return [write_dataset(make_vl_photo(rgb), directory / f"p{i:04d}.dcm") for i in range(count)]


def send(files: list[Path], port: int, called: str, parallel: int) -> float:
    """Seconds until every storescu (one association each) has finished; raises if any failed."""
    groups = [files[i::parallel] for i in range(parallel)]
    started = time.perf_counter()
    processes = [subprocess.Popen(["storescu", "-aet", SCU_AET, "-aec", called, "127.0.0.1", str(port),
                                   *map(str, group)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for group in groups]
    for process in processes:
        _, err = process.communicate(timeout=600)
        if process.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.strip()[:500]}")
    return time.perf_counter() - started


def bench_intake(work: Path, count: int, model_dir: Path, repeat: int) -> dict[tuple[str, str, int], float]:
    """Best-of-``repeat`` rates (photos/s) by (dcmtk setting, receiver, associations); fresh UIDs every run."""
    rates: dict[tuple[str, str, int], float] = {}
    run = 0
    for setting, nodelay in DCMTK_SETTINGS.items():
        os.environ["TCP_NODELAY"] = nodelay
        for parallel in (1, PARALLEL):
            for _ in range(repeat):
                run += 1
                files = make_photos(work / f"photos_{run}", count, SIDE_1MB, SIDE_1MB)
                scp = StoreSCP(work / f"storescp_{run}", fork=parallel > 1).start()
                try:
                    rate = count / send(files, scp.port, scp.aet, parallel)
                finally:
                    scp.stop()
                key = (setting, "storescp", parallel)
                rates[key] = max(rates.get(key, 0.0), rate)

                config = node_config(work / f"node_{run}" / "data", model_dir, free_port(), 9,
                                     worker={"count": 0}, intake={"max_associations": 16})
                node = NodeProcess(work / f"node_{run}", config).start(wait_ready=False)
                try:
                    node.wait_listening()
                    rate = count / send(files, node.port, "DICOM_NODE", parallel)
                    committed = len(node.jobs())
                    assert committed == count, f"{committed} jobs for {count} photos"
                finally:
                    node.stop()
                key = (setting, "dicom-node", parallel)
                rates[key] = max(rates.get(key, 0.0), rate)
                for path in files:
                    path.unlink()
    os.environ["TCP_NODELAY"] = "1"
    return rates


_TIMINGS = re.compile(r"event=worker\.timings job=(\d+) decode_s=([\d.]+) parse_s=([\d.]+) encode_s=([\d.]+) "
                      r"write_s=([\d.]+)")
_SENT = re.compile(r"event=dispatch\.sent job=(\d+) destination=\S+ objects=\d+ seconds=([\d.]+)")


def bench_end_to_end(work: Path, photos: int, model_dir: Path, sc_jpeg: bool) -> list[dict[str, float]]:
    node_port = free_port()
    orthanc = Orthanc(work / f"orthanc_{int(sc_jpeg)}", node_port).start()
    config = node_config(work / f"e2e_{int(sc_jpeg)}" / "data", model_dir, node_port, orthanc.dicom_port,
                         results={"sc_jpeg": sc_jpeg},
                         # the default polls: the stages hand over by doorbell (queue/doorbell.py), not by poll
                         worker={"poll_interval_s": 0.1}, dispatch={"poll_interval_s": 0.1})
    node = NodeProcess(work / f"e2e_{int(sc_jpeg)}", config).start()
    rows = []
    try:
        files = make_photos(work / f"photos_12mp_{int(sc_jpeg)}", photos, 3000, 4000)
        for path in files:
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            started = time.perf_counter()
            send([path], node.port, "DICOM_NODE", 1)
            acknowledged = time.perf_counter() - started
            wait_until(lambda ds=ds: len(orthanc.study_instances(ds.StudyInstanceUID)) >= 3, 600,
                       "results in Orthanc", interval_s=0.02)
            total = time.perf_counter() - started
            job = wait_until(lambda ds=ds: next((j for j in node.jobs() if j.sop_instance_uid == ds.SOPInstanceUID
                                                 and j.state.value == "done"), None), 60, "the job to be done")
            log = node.log_text()
            timing = next(m for m in _TIMINGS.finditer(log) if int(m.group(1)) == job.id)
            sent = next(m for m in _SENT.finditer(log) if int(m.group(1)) == job.id)
            rows.append({
                "end_to_end_s": total,
                "parse_s": job.parse_s,
                "overhead_s": total - job.parse_s,
                "intake_s": acknowledged,
                "decode_s": float(timing.group(2)),
                "encode_s": float(timing.group(4)),
                "write_s": float(timing.group(5)),
                "dispatch_s": float(sent.group(2)),
            })
    finally:
        node.stop()
        orthanc.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=100, help="1 MB photos per intake run (default %(default)s)")
    parser.add_argument("--e2e-photos", type=int, default=3, help="12 MP photos end to end (default %(default)s)")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: a small UNTRAINED test model")
    parser.add_argument("--repeat", type=int, default=2, help="intake runs per figure, best kept (default %(default)s)")
    parser.add_argument("--skip-intake", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_node_") as tmp:
        work = Path(tmp)
        model_dir = args.model_dir
        if model_dir is None:
            from dicom_node.model.untrained import make_test_model_dir

            model_dir = make_test_model_dir(work / "model", small=True)
            print(f"model: small UNTRAINED test model ({model_dir})")
        else:
            print(f"model: {model_dir}")

        if not args.skip_intake:
            rates = bench_intake(work, args.photos, model_dir, args.repeat)
            print(f"\nIntake: {args.photos} photos of {SIDE_1MB * SIDE_1MB * 3 / 1e6:.1f} MB each, dcmtk storescu as "
                  f"sender, photos acknowledged per second (best of {args.repeat})")
            print(f"{'dcmtk setting':<15} {'receiver':<12} {'1 association':>14} {f'{PARALLEL} parallel':>12}")
            for setting in DCMTK_SETTINGS:
                for receiver in ("dicom-node", "storescp"):
                    print(f"{setting:<15} {receiver:<12} {rates[(setting, receiver, 1)]:>14.1f} "
                          f"{rates[(setting, receiver, PARALLEL)]:>12.1f}")
                ratios = [rates[(setting, "dicom-node", n)] / rates[(setting, "storescp", n)] for n in (1, PARALLEL)]
                print(f"{setting:<15} {'node/scp':<12} {ratios[0]:>14.2f} {ratios[1]:>12.2f}   (target >= 0.5)")

        if not args.skip_e2e:
            for sc_jpeg in (False, True):
                rows = bench_end_to_end(work, args.e2e_photos, model_dir, sc_jpeg)
                label = "JPEG" if sc_jpeg else "uncompressed"
                print(f"\nEnd to end: 12 MP (4000x3000) uncompressed photo -> node -> SEG+SC+SR in Orthanc "
                      f"(SC {label}), median of {len(rows)}")
                for key in ("end_to_end_s", "parse_s", "overhead_s", "intake_s", "decode_s", "encode_s", "write_s",
                            "dispatch_s"):
                    print(f"  {key:<14} {statistics.median(r[key] for r in rows):8.3f}")
                print("  overhead = end to end - parse (target <= 0.5 s); intake/decode/encode/write/dispatch are "
                      "its parts, plus polling")
    return 0


if __name__ == "__main__":
    sys.exit(main())
