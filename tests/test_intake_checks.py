"""Intake refuses at once what can never be parsed: the status comes in the C-STORE response, no
photo is spooled, no job is made, and the association goes on.

The SCP is real (pynetdicom server on a free port, SQLite job store, spool on disk); the sender is
a pynetdicom SCU that can also send what a conforming SCU never would: commands with a missing,
empty, over-long or mismatched Affected SOP Instance UID, and payloads that are not data sets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from pynetdicom import AE, evt
from pynetdicom._handlers import standard_dimse_sent_handler
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from dicom_node.config import NodeConfig
from dicom_node.intake.checks import ReceivedStore, check_store, error_comment, uid_problem
from dicom_node.intake.scp import IntakeSCP
from dicom_node.monitor.metrics import NodeMetrics
from dicom_node.net import status
from dicom_node.queue.doorbell import new_doorbells
from dicom_node.queue.sqlite_store import SqliteJobStore
from dicom_node.spool.local import LocalSpool
from tests.node_fixtures import NODE_AET, SCU_AET, forge_frame_size, free_port, header_bomb, node_config
from tests.photo_factory import VL_PHOTOGRAPHIC, drop_pixel_data, lie_about_rows, make_vl_photo, synthetic_rgb

# the test's sender writes invalid UIDs on purpose and the node reads garbage: pydicom warns about each
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length",
                                        "ignore:Expected explicit VR")

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MAX_PIXELS = 1_000_000
H, W = 48, 64
ROUND_TRIP_LIMIT_S = 2.0


@dataclass
class Intake:
    scp: IntakeSCP
    metrics: NodeMetrics

    def rejected(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value("dicom_node_instances_rejected_total",
                                                       {"source": "dicom", "reason": reason})
        return value or 0.0

    def spooled(self) -> list[Path]:
        return [p for p in (self.scp.spool.root / "photos").rglob("*") if p.is_file()]


@contextmanager
def running_intake(data_dir: Path, **intake: object) -> Iterator[Intake]:
    """A real IntakeSCP on a free port, with a real SQLite job store and spool under ``data_dir``."""
    config = NodeConfig(
        port=free_port(),
        data_dir=data_dir,
        callers=[{"ae_title": SCU_AET, "host": "127.0.0.1", "return_to": "pacs"}],
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
        intake={"max_pixels": MAX_PIXELS, "min_free_disk_mb": 1, **intake},
    )
    store = SqliteJobStore(config.job_db_path)
    spool = LocalSpool(config.data_dir)
    spool.prepare()
    metrics = NodeMetrics(job_store=store, process_metrics=False)
    scp = IntakeSCP(config.listener, config.intake, config.peers, store, spool, metrics,
                    new_doorbells().photo_received)
    scp.start()
    try:
        yield Intake(scp, metrics)
    finally:
        scp.stop()
        store.close()


@pytest.fixture
def intake(tmp_path: Path) -> Iterator[Intake]:
    with running_intake(tmp_path / "data") as running:
        yield running


AS_IN_DATA_SET = "the data set's SOP Instance UID"


@dataclass
class Response:
    status: int | None  # None: no response (the association broke or the DIMSE timeout ran out)
    comment: str | None
    instance_uid: str | None
    seconds: float


class RawSCU:
    """A pynetdicom SCU that sends C-STORE commands and payloads exactly as given.

    pynetdicom's own C-STORE refuses to *send* an over-long Affected SOP Instance UID, so the request
    primitive is filled past its validation and sent as ``Association.send_c_store`` does (reactor
    paused, request out, response back)."""

    def __init__(self, port: int, dimse_timeout_s: float = 15.0) -> None:
        ae = AE(ae_title=SCU_AET)
        ae.acse_timeout = 5
        ae.dimse_timeout = dimse_timeout_s
        for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit):
            ae.add_requested_context(VL_PHOTOGRAPHIC, ts)
        self.assoc: Association = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
        assert self.assoc.is_established, "the node refused the test's association"
        # pynetdicom's logger of sent messages raises on the commands without an Affected SOP Instance
        # UID sent here on purpose; that would be the test's traceback, not the node's
        self.assoc.unbind(evt.EVT_DIMSE_SENT, standard_dimse_sent_handler)
        self.message_id = 0

    def send(self, payload: bytes | None, instance_uid: str | None, ts: str = ExplicitVRLittleEndian,
             sop_class: str = VL_PHOTOGRAPHIC) -> Response:
        """``payload`` None: a C-STORE whose command says it carries no data set (0x0101); ``instance_uid``
        None: a command without Affected SOP Instance UID."""
        self.message_id += 1
        req = C_STORE()
        req.MessageID = self.message_id
        req.Priority = 2
        req.AffectedSOPClassUID = sop_class
        req._affected_sop_instance_uid = None if instance_uid is None else UID(instance_uid)  # unvalidated
        req.DataSet = None if payload is None else BytesIO(payload)
        context = next(cx for cx in self.assoc.accepted_contexts if cx.transfer_syntax[0] == ts)
        assoc = self.assoc
        started = time.monotonic()
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        assoc.dimse.send_msg(req, context.context_id)
        _cx, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        seconds = time.monotonic() - started
        if rsp is None:
            return Response(None, None, None, seconds)
        uid = rsp.AffectedSOPInstanceUID
        return Response(rsp.Status, rsp.ErrorComment, None if uid is None else str(uid), seconds)

    def send_dataset(self, ds: Dataset, instance_uid: str | None = AS_IN_DATA_SET, ts: str | None = None) -> Response:
        ts = UID(ts or ds.file_meta.TransferSyntaxUID)
        payload = encode(ds, ts.is_implicit_VR, ts.is_little_endian)
        return self.send(payload, ds.SOPInstanceUID if instance_uid is AS_IN_DATA_SET else instance_uid, ts)

    def release(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


@pytest.fixture
def scu(intake: Intake) -> Iterator[RawSCU]:
    sender = RawSCU(intake.scp.port)
    yield sender
    sender.release()


def photo(**tags: object) -> Dataset:
    return make_vl_photo(synthetic_rgb(H, W), **tags)


def pillow_jpeg(rgb: np.ndarray) -> bytes:
    out = BytesIO()
    Image.fromarray(rgb).save(out, "JPEG", quality=90)
    return out.getvalue()


def with_frame(ds: Dataset, frame: bytes) -> Dataset:
    ds.PixelData = encapsulate([frame])
    return ds


def jpeg_photo() -> Dataset:
    return make_vl_photo(synthetic_rgb(H, W), JPEGBaseline8Bit)


def first_frame(ds: Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


A900 = status.DATASET_DOES_NOT_MATCH_SOP_CLASS
C000 = status.CANNOT_UNDERSTAND

# name -> (what is sent: a data set or raw bytes, transfer syntax, expected status, metrics reason, comment words)
DAMAGED: dict[str, tuple] = {
    "no-pixel-data": (lambda: drop_pixel_data(photo()), None, A900, "no_pixel_data", "Pixel Data"),
    "control-character-in-sop-instance-uid": (lambda: photo(SOPInstanceUID="1.2.826.0.1.3680043.2\x01.5"), None,
                                              C000, "invalid_uid", "character 0x01"),
    "letters-in-study-uid": (lambda: photo(StudyInstanceUID="1.2.826.abc.9"), None, C000, "invalid_uid",
                             "Study Instance UID holds character 'a'"),
    "leading-zero-in-series-uid": (lambda: photo(SeriesInstanceUID="1.2.826.07.9"), None, C000, "invalid_uid",
                                   "Series Instance UID has an empty component"),
    "random-bytes": (lambda: np.random.default_rng(12).integers(0, 256, 4096, np.uint8).tobytes(), None, C000,
                     "not_a_dataset", "not a DICOM data set"),
    "text-payload": (lambda: b"Dear PACS, this is not DICOM but a letter.\n" * 40, None, C000, "not_a_dataset",
                     "not a DICOM data set"),
    "bare-jpeg-file": (lambda: pillow_jpeg(synthetic_rgb(H, W)), None, C000, "not_a_dataset",
                       "not a DICOM data set"),
    "empty-data-set": (lambda: None, None, C000, "not_a_dataset", "empty"),
    "ct-data-set-on-photo-context": (lambda: photo(SOPClassUID=CT_IMAGE_STORAGE, Modality="CT"), None, A900,
                                     "sop_class_mismatch", "SOP Class UID differs"),
    "rows-that-lie": (lambda: lie_about_rows(photo(), H + 1), None, C000, "pixel_length_mismatch",
                      "Pixel Data length does not match"),
    "rows-that-lie-implicit-vr": (lambda: lie_about_rows(photo(), H - 1), ImplicitVRLittleEndian, C000,
                                  "pixel_length_mismatch", "Pixel Data length does not match"),
    "too-many-pixels": (lambda: photo(Rows=1200, Columns=1200), None, C000, "too_many_pixels", "more pixels"),
    "jpeg-sof-claims-26000x26000": (lambda: header_bomb(26000, 26000), None, C000, "too_many_pixels",
                                    "frame header claims too many pixels"),
    "jpeg-sof-disagrees-with-rows": (lambda: with_frame(jpeg_photo(), forge_frame_size(first_frame(jpeg_photo()),
                                                                                       H + 16, W)),
                                     None, C000, "frame_header_mismatch", "frame header disagrees"),
    "jpeg-without-soi": (lambda: with_frame(jpeg_photo(), b"\x00\x00" + first_frame(jpeg_photo())), None, C000,
                         "codestream_unreadable", "codestream is damaged"),
    "compressed-syntax-native-pixel-data": (lambda: photo(), JPEGBaseline8Bit, C000, "pixel_length_mismatch",
                                            "not encapsulated"),
}


@pytest.mark.parametrize("case", list(DAMAGED), ids=list(DAMAGED))
def test_damaged_input_is_refused_at_once(case: str, intake: Intake, scu: RawSCU,
                                          caplog: pytest.LogCaptureFixture) -> None:
    build, ts, expected, reason, words = DAMAGED[case]
    item = build()
    caplog.set_level(logging.WARNING)
    if isinstance(item, Dataset):
        # a data set with an invalid SOP Instance UID comes with a valid command: the data set is checked
        command_uid = item.SOPInstanceUID if uid_problem(item.SOPInstanceUID) is None else generate_uid()
        response = scu.send_dataset(item, instance_uid=command_uid, ts=ts)
    else:
        response = scu.send(item, generate_uid(), ts or ExplicitVRLittleEndian)
    assert response.status == expected, (status.describe(response.status or 0), response.comment)
    assert words in (response.comment or ""), response.comment
    assert len(response.comment) <= 64
    assert response.seconds < ROUND_TRIP_LIMIT_S
    assert intake.rejected(reason) == 1
    assert intake.spooled() == [] and intake.scp.store.list_jobs() == [], "refused: nothing spooled, no job"
    refused = [r for r in caplog.records if "event=intake.refused" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.WARNING
    assert f"reason={reason}" not in refused[0].getMessage()  # the log says why in words
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], "no traceback, no error"

    good = photo()
    assert scu.send_dataset(good).status == status.SUCCESS, "the association goes on"
    (job,) = intake.scp.store.list_jobs()
    assert job.sop_instance_uid == good.SOPInstanceUID and len(intake.spooled()) == 1


COMMANDS = {
    "missing": (None, C000, "Affected SOP Instance UID is missing"),
    "empty": ("", C000, "Affected SOP Instance UID is empty"),
    "70-characters": ("1." * 35, C000, "Affected SOP Instance UID is 70 characters long (at most 64)"),
    "control-character": ("1.2.3\x07.4", C000, "Affected SOP Instance UID holds character 0x07"),
    "other-than-the-data-set's": ("1.2.826.0.1.3680043.2.1143.42", A900, "SOP Instance UID differs from the command"),
}


def test_bad_affected_sop_instance_uids_get_an_immediate_failure(intake: Intake, scu: RawSCU,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """pynetdicom on its own drops a C-STORE without the UID (the sender waits out its DIMSE timeout)
    and aborts on a 70-character one with a traceback; the node answers each at once."""
    caplog.set_level(logging.WARNING)
    for name, (uid, expected, words) in COMMANDS.items():
        response = scu.send_dataset(photo(), instance_uid=uid)
        assert response.status == expected, (name, response)
        assert response.seconds < ROUND_TRIP_LIMIT_S, (name, response)
        assert words in (response.comment or ""), (name, response.comment)
        if expected == C000:  # an invalid UID is not echoed in the response
            assert response.instance_uid is None, (name, response)
        assert intake.spooled() == [] and intake.scp.store.list_jobs() == [], name
    assert intake.rejected("invalid_command_uid") == 4 and intake.rejected("sop_instance_mismatch") == 1
    refused = [r.getMessage() for r in caplog.records if "event=intake.refused" in r.getMessage()]
    assert len(refused) == len(COMMANDS)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], "no traceback, no error"
    assert not [r for r in caplog.records if r.name.startswith("pynetdicom")], "pynetdicom dropped nothing"

    good = photo()
    response = scu.send_dataset(good)
    assert response.status == status.SUCCESS and response.instance_uid == good.SOPInstanceUID
    assert [j.sop_instance_uid for j in intake.scp.store.list_jobs()] == [good.SOPInstanceUID]


@pytest.mark.parametrize("max_pdu_bytes", [64 * 1024, 0], ids=["64kB-PDUs", "one-PDU"])
def test_an_object_over_the_size_limit_is_out_of_resources(max_pdu_bytes: int, tmp_path: Path) -> None:
    """max_object_mb: a larger object is answered 0xA700 with an Error Comment. Arriving in 64 kB
    PDUs, it is dropped as soon as it passes the limit (memory stays bounded) and the association
    goes on; in one PDU (the node offers no PDU limit by default) it is refused just the same."""
    with running_intake(tmp_path / "data", max_object_mb=1, max_pdu_bytes=max_pdu_bytes) as intake:
        sender = RawSCU(intake.scp.port)
        assert sender.assoc.acceptor.maximum_length == max_pdu_bytes  # how the sender fragments
        big = make_vl_photo(np.zeros((600, 600, 3), np.uint8))  # 1.08 MB of pixels
        response = sender.send_dataset(big)
        assert response.status == status.OUT_OF_RESOURCES, response
        assert "larger than this node takes (1 MB)" in response.comment
        assert response.instance_uid == big.SOPInstanceUID
        assert intake.scp.store.list_jobs() == [] and intake.spooled() == []
        assert intake.rejected("object_too_large") == 1
        good = photo()
        assert sender.send_dataset(good).status == status.SUCCESS, "the association goes on"
        assert [j.sop_instance_uid for j in intake.scp.store.list_jobs()] == [good.SOPInstanceUID]
        sender.release()


# --------------------------------------------------------------------------- the pieces


def test_uid_rules_of_ps3_5_9_1() -> None:
    assert uid_problem("1.2.840.10008.5.1.4.1.1.77.1.4") is None
    assert uid_problem("1.2.840.10008.1.2\x00") is None  # the NUL that pads a UI value
    assert uid_problem("0.1") is None
    assert uid_problem(None) == "is missing"
    assert uid_problem("") == "is empty"
    assert uid_problem("1." * 32 + "1") == "is 65 characters long (at most 64)"
    assert uid_problem("1.2.03") == uid_problem("1..2") == "has an empty component or one with a leading zero"
    assert uid_problem("1.2 .3") == "holds character 0x20 at position 4"
    assert uid_problem(b"1.2.\xe9") == "is not ASCII"


def test_error_comments_are_lo_values() -> None:
    assert error_comment("a\\b\nc") == "a?b?c"
    long = error_comment("x" * 100)
    assert len(long) == 64 and long.endswith("...")


def test_deflated_data_sets_are_read_too() -> None:
    """Deflated Explicit VR Little Endian (PS3.5 A.5) is inflated (within the object limit) and checked."""
    import zlib

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    def deflate(ds: Dataset) -> BytesIO:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return BytesIO(compressor.compress(encode(ds, False, True)) + compressor.flush())

    def check(ds: Dataset, data: BytesIO | None = None, limit: int = 10**7):
        received = ReceivedStore(data or deflate(ds), DeflatedExplicitVRLittleEndian, VL_PHOTOGRAPHIC,
                                 VL_PHOTOGRAPHIC, ds.SOPInstanceUID)
        return check_store(received, MAX_PIXELS, limit)

    assert check(photo()) is None
    assert check(lie_about_rows(photo(), H + 2)).reason == "pixel_length_mismatch"
    assert check(photo(), limit=1000).status == status.OUT_OF_RESOURCES
    assert check(photo(), BytesIO(b"not deflated at all")).reason == "not_a_dataset"


# --------------------------------------------------------------------------- through a running node


def _rss_kb(pid: int) -> int:
    """Resident memory of a process and its children (the workers), from /proc."""
    total = 0
    pids = [pid]
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        pids += [int(p) for p in child.read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def test_a_running_node_refuses_the_header_bomb_at_intake(node_factory, small_model_dir: Path,
                                                          tmp_path: Path) -> None:
    config = node_config(tmp_path / "data", small_model_dir, free_port(), free_port(),
                         worker={"count": 0}, intake={"min_free_disk_mb": 1})
    node = node_factory(config)
    node.start(wait_ready=False)
    node.wait_listening()
    assert node.process is not None
    sender = RawSCU(node.port)
    assert sender.send_dataset(photo()).status == status.SUCCESS  # warm: the first C-STORE's imports
    before = _rss_kb(node.process.pid)
    bomb = header_bomb(26000, 26000)
    response = sender.send_dataset(bomb)
    assert response.status == C000 and "frame header" in response.comment
    assert response.seconds < ROUND_TRIP_LIMIT_S
    assert sender.send_dataset(photo()).status == status.SUCCESS
    sender.release()
    grown_mb = (_rss_kb(node.process.pid) - before) / 1024
    assert grown_mb < 100, f"the node grew by {grown_mb:.0f} MB"
    assert bomb.SOPInstanceUID not in {j.sop_instance_uid for j in node.jobs()}
    assert len(node.jobs()) == 2
    log = node.log_text()
    assert "event=intake.refused" in log and "Traceback" not in log
