"""The DICOM Conformance Statement (docs/conformance-statement.md) against what the node really does.

Two independent sources are compared: the statement's tables (PS3.2 Annex A: presentation contexts
of each AE, Sections 2.2.1.3 and 2.2.2.3) and the running code. Nothing expected is computed from the
code under test alone:

* **Accepted as SCP**: an in-process :class:`IntakeSCP` (the real pynetdicom server) is offered every
  (SOP class, transfer syntax) pair of a wide candidate set over real associations; what it accepts
  must be exactly Table 2.2.1.3-1. STOW-RS has no negotiation: each candidate is handed to the node's
  one acceptor (what ``POST /dicom-web/studies`` calls per instance) and must be refused with the
  PS3.18 Annex I Failure Reasons 0122 / C122 exactly when the table does not list it.
* **Configurable classes**: every class of Table 2.2.1.3-2 configured at once must negotiate in the
  default transfer syntaxes, and every other storage class must be refused by the configuration.
* **Sent as SCU**: SEG, SC and SR are built for real from a photo through the encode path, written as
  the spool writes them and C-STOREd by the dispatch SCU to a recording SCP; the contexts it proposes
  (and those of the C-ECHO) must be exactly Table 2.2.2.3-1.
* **It can fail**: a SOP class appended in-process to the accepted list, or a row that is not true,
  is reported by the same comparison.

Dermoscopic Photography (issue 14): a dermoscopic photo with the IOD's required modules is accepted
by the real SCP in the default configuration, decodes, and yields SEG, SC and SR that dciodvfy finds no error in.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    ComprehensiveSRStorage,
    CTImageStorage,
    DermoscopicPhotographyImageStorage,
    EncapsulatedPDFStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    VideoPhotographicImageStorage,
    VLEndoscopicImageStorage,
    VLMicroscopicImageStorage,
    VLPhotographicImageStorage,
    VLWholeSlideMicroscopyImageStorage,
    generate_uid,
)
from pynetdicom import AE, build_context, evt
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.config import ConfigError, DispatchSettings, IntakeSettings, LesionSettings, NodeConfig
from dicom_node.decode.photo import photo_from_dataset
from dicom_node.dispatch.scu import Peer, echo, store_files
from dicom_node.encode.options import EncodeOptions
from dicom_node.encode.results import EncodedResults, encode_results
from dicom_node.encode.validate import dciodvfy_available, validate
from dicom_node.intake.accept import Acceptor, Received
from dicom_node.intake.scp import IntakeSCP
from dicom_node.monitor.metrics import NullMetrics
from dicom_node.net import status
from dicom_node.parse.result import result_from_label_map
from dicom_node.queue.doorbell import new_doorbells
from dicom_node.queue.job import JobState
from dicom_node.queue.sqlite_store import SqliteJobStore
from dicom_node.spool.local import LocalSpool
from tests.node_fixtures import NODE_AET, SCU_AET, free_port
from tests.photo_factory import make_vl_photo, synthetic_rgb, write_dataset

STATEMENT = Path(__file__).resolve().parents[1] / "docs" / "conformance-statement.md"

SCP_TABLE = "Table 2.2.1.3-1"
CONFIGURABLE_TABLE = "Table 2.2.1.3-2"
SCU_TABLE = "Table 2.2.2.3-1"
VERIFICATION = "1.2.840.10008.1.1"
ALWAYS = "always"
SC_JPEG_CONDITION = "`results.sc_jpeg = true`"

Pair = tuple[str, str]  # (abstract syntax UID, transfer syntax UID)

# What a peer might offer: every class the statement or the decoder could name, and some nobody
# should accept (a CT, a PDF, a video, a slide), each in every transfer syntax pydicom knows.
CANDIDATE_CLASSES: tuple[str, ...] = (
    VERIFICATION, VLPhotographicImageStorage, DermoscopicPhotographyImageStorage, VLEndoscopicImageStorage,
    VLMicroscopicImageStorage, SecondaryCaptureImageStorage, VideoPhotographicImageStorage,
    VLWholeSlideMicroscopyImageStorage, CTImageStorage, MRImageStorage, SegmentationStorage,
    ComprehensiveSRStorage, EncapsulatedPDFStorage,
)
MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: odd context ids 1..255


# --------------------------------------------------------------------------- reading the statement


def statement_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Every markdown table under a heading that starts with "Table ", keyed by its id ("Table 2.2.1.3-1"),
    as rows of {column name: cell}."""
    tables: dict[str, list[dict[str, str]]] = {}
    current: str | None = None
    header: list[str] | None = None
    for line in text.splitlines():
        heading = re.match(r"^#+\s+(Table\s+\S+)", line)
        if heading:
            current, header = heading.group(1), None
            tables[current] = []
            continue
        if line.startswith("#"):
            current, header = None, None
            continue
        if current is None or not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not all(set(cell) <= {"-", ":"} for cell in cells):
            assert len(cells) == len(header), f"{current}: row {line!r} has {len(cells)} cells, header {len(header)}"
            tables[current].append(dict(zip(header, cells, strict=True)))
    return tables


def load_statement() -> dict[str, list[dict[str, str]]]:
    return statement_tables(STATEMENT.read_text(encoding="utf-8"))


def pairs(rows: list[dict[str, str]]) -> set[Pair]:
    return {(row["Abstract Syntax UID"], row["Transfer Syntax UID"]) for row in rows}


def describe(pair: Pair) -> str:
    abstract, syntax = pair
    return f"{UID(abstract).name} ({abstract}) in {UID(syntax).name} ({syntax})"


def discrepancies(documented: set[Pair], actual: set[Pair], what: str) -> list[str]:
    """What the node does that the statement does not list, and what it lists that the node does not."""
    return ([f"{what} but not in the statement: {describe(p)}" for p in sorted(actual - documented)]
            + [f"in the statement but not {what}: {describe(p)}" for p in sorted(documented - actual)])


# --------------------------------------------------------------------------- the node as SCP


def intake_config(tmp_path: Path, accepted_sop_classes: list[str] | None = None) -> NodeConfig:
    intake = {} if accepted_sop_classes is None else {"accepted_sop_classes": accepted_sop_classes}
    return NodeConfig.model_validate({
        "port": free_port(), "data_dir": tmp_path / "data", "intake": intake,
        "callers": [{"ae_title": SCU_AET, "host": "127.0.0.1", "return_to": "pacs"}],
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
    })


@dataclass
class RunningIntake:
    scp: IntakeSCP
    acceptor: Acceptor
    store: SqliteJobStore


@pytest.fixture
def start_intake(tmp_path: Path) -> Iterator:
    """Start the node's intake (SCP and the acceptor STOW-RS uses) on a configuration; stopped after the test."""
    started: list[RunningIntake] = []

    def start(config: NodeConfig) -> RunningIntake:
        store = SqliteJobStore(config.job_db_path)
        spool = LocalSpool(config.data_dir)
        spool.prepare()
        acceptor = Acceptor(config.intake, store, spool, NullMetrics(), new_doorbells().photo_received, config.lesion)
        scp = IntakeSCP(config.listener, config.intake, config.peers, store, spool, NullMetrics(),
                        acceptor.photo_received, acceptor)
        scp.start()
        started.append(RunningIntake(scp, acceptor, store))
        return started[-1]

    yield start
    for running in started:
        running.scp.stop()
        running.store.close()


def negotiated(port: int, candidates: list[Pair]) -> tuple[set[Pair], list[tuple[str, str]]]:
    """Offer every candidate pair (one transfer syntax per context) over as many real associations as
    the 128-context limit needs; return the accepted pairs and each acceptor's (Implementation Class
    UID, Implementation Version Name)."""
    accepted: set[Pair] = set()
    implementations: list[tuple[str, str]] = []
    anchor = (VERIFICATION, "1.2.840.10008.1.2")  # in every association, so that it is established
    others = [p for p in candidates if p != anchor]
    for start in range(0, len(others), MAX_CONTEXTS - 1):
        batch = [anchor, *others[start:start + MAX_CONTEXTS - 1]]
        ae = AE(ae_title=SCU_AET)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
        assoc = ae.associate("127.0.0.1", port, contexts=[build_context(a, [t]) for a, t in batch], ae_title=NODE_AET)
        assert assoc.is_established, "the intake refused an association from a configured caller"
        try:
            accepted |= {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
            implementations.append((str(assoc.acceptor.implementation_class_uid),
                                    str(assoc.acceptor.implementation_version_name)))
        finally:
            assoc.release()
    return accepted, implementations


def candidate_pairs(extra_classes: set[str] | frozenset[str] = frozenset()) -> list[Pair]:
    classes = list(dict.fromkeys([*CANDIDATE_CLASSES, *sorted(extra_classes)]))
    return [(c, str(t)) for c in classes for t in AllTransferSyntaxes]


def stow_accepted(acceptor: Acceptor, candidates: list[Pair]) -> set[Pair]:
    """The storage pairs the STOW-RS door does not refuse as unsupported (PS3.18 Annex I: 0122 SOP class,
    C122 transfer syntax). The data set is empty, so an accepted pair ends at the header checks (0xC000)
    and nothing is spooled."""
    taken: set[Pair] = set()
    for sop_class, syntax in candidates:
        if sop_class == VERIFICATION:
            continue  # no C-ECHO over DICOMweb
        outcome = acceptor.accept(Received(
            data_set=BytesIO(), transfer_syntax=syntax, declared_sop_class=sop_class, sop_class_uid=sop_class,
            sop_instance_uid=generate_uid(), calling_ae="DICOMWEB", calling_host="127.0.0.1", source="dicomweb"))
        if outcome.status not in (status.SOP_CLASS_NOT_SUPPORTED, status.TRANSFER_SYNTAX_NOT_SUPPORTED):
            assert outcome.status == status.CANNOT_UNDERSTAND, describe((sop_class, syntax))
            taken.add((sop_class, syntax))
    return taken


def documented_classes(tables: dict[str, list[dict[str, str]]]) -> set[str]:
    return {row["Abstract Syntax UID"] for rows in tables.values() for row in rows if "Abstract Syntax UID" in row}


# --------------------------------------------------------------------------- the statement itself


def test_the_statement_tables_are_there_and_name_each_uid_as_the_standard_does() -> None:
    """Every UID of the machine-readable tables is named as PS3.6 names it (pydicom's dictionary), so a
    reader and the parser see the same thing; a typo in a UID shows up here as a name mismatch."""
    tables = load_statement()
    for table in (SCP_TABLE, CONFIGURABLE_TABLE, SCU_TABLE):
        assert tables.get(table), f"{table} is missing or empty in {STATEMENT.name}"
    for table, rows in tables.items():
        for row in rows:
            for name_column, uid_column in (("Abstract Syntax", "Abstract Syntax UID"),
                                            ("Transfer Syntax", "Transfer Syntax UID")):
                if uid_column in row:
                    uid = UID(row[uid_column])
                    assert uid.is_valid, f"{table}: {row[uid_column]!r} is not a UID"
                    assert row[name_column] == uid.name, f"{table}: {uid} is {uid.name!r}, not {row[name_column]!r}"


# --------------------------------------------------------------------------- accepted (SCP, STOW-RS)


def test_what_the_intake_negotiates_and_stow_rs_takes_is_table_2_2_1_3_1(start_intake, tmp_path: Path) -> None:
    tables = load_statement()
    documented = pairs(tables[SCP_TABLE])
    running = start_intake(intake_config(tmp_path))
    candidates = candidate_pairs(documented_classes(tables))

    accepted, implementations = negotiated(running.scp.port, candidates)
    assert discrepancies(documented, accepted, "negotiated by the intake SCP") == []

    storage_rows = {p for p in documented if p[0] != VERIFICATION}
    assert discrepancies(storage_rows, stow_accepted(running.acceptor, candidates), "taken by STOW-RS") == []

    identity = {row["Item"]: row["Value"] for row in _implementation_rows()}
    assert set(implementations) == {(identity["Implementation Class UID"], identity["Implementation Version Name"])}


def _implementation_rows() -> list[dict[str, str]]:
    """The Implementation identifying information table (Section 2.2.1.2), found by its first column."""
    rows = []
    for line in STATEMENT.read_text().splitlines():
        match = re.match(r"^\|\s*(Implementation (?:Class UID|Version Name))\s*\|\s*([^|]+?)\s*\|$", line)
        if match:
            rows.append({"Item": match.group(1), "Value": match.group(2)})
    assert len(rows) == 2, "the statement's Implementation identifying information table is missing"
    return rows


def test_the_configurable_classes_are_table_2_2_1_3_2(start_intake, tmp_path: Path) -> None:
    """Every class of Table 2.2.1.3-2 configured together negotiates in the default transfer syntaxes,
    and the configuration refuses every other storage class a peer might send."""
    tables = load_statement()
    configurable = [row["Abstract Syntax UID"] for row in tables[CONFIGURABLE_TABLE]]
    defaults = {row["Abstract Syntax UID"] for row in tables[CONFIGURABLE_TABLE] if row["Default"] == "Yes"}
    assert defaults == {p[0] for p in pairs(tables[SCP_TABLE])} - {VERIFICATION, SegmentationStorage}, \
        "Table 2.2.1.3-2's defaults are not the photo storage classes of Table 2.2.1.3-1"
    default_syntaxes = {t for a, t in pairs(tables[SCP_TABLE]) if a not in (VERIFICATION, SegmentationStorage)}
    # lesion SEGs ([lesion] enabled by default) are negotiated beside whatever photo classes are configured
    fixed = {p for p in pairs(tables[SCP_TABLE]) if p[0] in (VERIFICATION, SegmentationStorage)}

    running = start_intake(intake_config(tmp_path, configurable))
    accepted, _ = negotiated(running.scp.port, candidate_pairs(set(configurable)))
    expected = {(c, t) for c in configurable for t in default_syntaxes} | fixed
    assert discrepancies(expected, accepted, "negotiated with every configurable class") == []

    for sop_class in sorted(set(CANDIDATE_CLASSES) - set(configurable) - {VERIFICATION}):
        with pytest.raises((ConfigError, ValueError)):
            IntakeSettings(accepted_sop_classes=[sop_class])


def test_the_comparison_reports_a_class_added_in_process_and_a_row_that_is_not_true(
        start_intake, tmp_path: Path) -> None:
    """The check can fail: VL Endoscopic appended to the accepted list in-process (the list that both
    the SCP's AE and the STOW-RS acceptor read) is reported as undocumented by both doors; a row that
    claims a class the node does not take is reported as not negotiated."""
    tables = load_statement()
    documented = pairs(tables[SCP_TABLE])
    config = intake_config(tmp_path)
    config.intake.accepted_sop_classes.append(VLEndoscopicImageStorage)  # the in-process change
    running = start_intake(config)
    candidates = candidate_pairs(documented_classes(tables))

    accepted, _ = negotiated(running.scp.port, candidates)
    reported = discrepancies(documented, accepted, "negotiated by the intake SCP")
    assert reported and all("VL Endoscopic Image Storage" in line and "but not in the statement" in line
                            for line in reported)
    assert len(reported) == len({t for a, t in documented if a not in (VERIFICATION, SegmentationStorage)})

    stow = discrepancies({p for p in documented if p[0] != VERIFICATION}, stow_accepted(running.acceptor, candidates),
                         "taken by STOW-RS")
    assert stow and all("VL Endoscopic Image Storage" in line for line in stow)

    claimed = documented | {(CTImageStorage, "1.2.840.10008.1.2.1")}
    assert discrepancies(claimed, accepted - {(VLEndoscopicImageStorage, t) for _, t in documented}, "negotiated") == [
        f"in the statement but not negotiated: {describe((CTImageStorage, '1.2.840.10008.1.2.1'))}"]


# --------------------------------------------------------------------------- sent (SCU)


class RecordingSCP:
    """A storage SCP that accepts the node's result classes and records every proposed context."""

    def __init__(self) -> None:
        self.proposed: set[Pair] = set()
        self.stored: list[str] = []
        self._lock = threading.Lock()
        self.ae = AE(ae_title="RECORDER")
        for sop_class in (SegmentationStorage, SecondaryCaptureImageStorage, ComprehensiveSRStorage):
            self.ae.add_supported_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2",
                                                      "1.2.840.10008.1.2.4.50"])
        self.ae.add_supported_context(VERIFICATION)
        self.port = free_port()
        server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_REQUESTED, self._requested), (evt.EVT_C_STORE, self._store), (evt.EVT_C_ECHO, lambda e: 0)])
        assert server is not None  # block=False returns the running server
        self.server: ThreadedAssociationServer = server

    def _requested(self, event: Event) -> None:
        request = event.assoc.requestor.primitive
        assert request is not None  # EVT_REQUESTED comes with the A-ASSOCIATE-RQ
        contexts: list[PresentationContext] = request.presentation_context_definition_list
        with self._lock:
            self.proposed |= {(str(cx.abstract_syntax), str(ts)) for cx in contexts for ts in cx.transfer_syntax}

    def _store(self, event: Event) -> int:
        with self._lock:
            self.stored.append(str(event.request.AffectedSOPClassUID))
        return 0x0000

    def peer(self) -> Peer:
        return Peer("RECORDER", "127.0.0.1", self.port)

    def stop(self) -> None:
        self.server.shutdown()


def build_results(photo: Dataset, options: EncodeOptions) -> EncodedResults:
    """SEG, SC and SR of ``photo`` through the node's decode and encode path (two classes, one person)."""
    decoded = photo_from_dataset(photo)
    label_map = np.zeros(decoded.rgb.shape[:2], np.uint8)
    label_map[8:30, 8:40] = 13  # Face
    label_map[30:44, 20:60] = 5  # Upper-clothes
    return encode_results(photo, decoded.rgb, result_from_label_map(label_map, [label_map > 0]), options=options)


@pytest.mark.parametrize("sc_jpeg", [False, True], ids=["uncompressed-sc", "jpeg-sc"])
def test_what_dispatch_proposes_is_table_2_2_2_3_1(tmp_path: Path, sc_jpeg: bool) -> None:
    tables = load_statement()
    rows = tables[SCU_TABLE]
    conditions = {ALWAYS, SC_JPEG_CONDITION} if sc_jpeg else {ALWAYS}
    assert {row["Condition"] for row in rows} <= {ALWAYS, SC_JPEG_CONDITION}, "a condition this test does not know"
    documented = pairs([row for row in rows if row["Condition"] in conditions])

    results = build_results(make_vl_photo(synthetic_rgb(48, 72)), EncodeOptions(sc_jpeg=sc_jpeg))
    spool = LocalSpool(tmp_path / "data")
    spool.prepare()
    paths = [spool.path(spool.write_result(1, kind, ds))  # as the worker writes them
             for kind, ds in zip(("seg", "sc", "sr"), results.datasets(), strict=True)]

    recorder = RecordingSCP()
    try:
        outcomes = store_files(recorder.peer(), paths, NODE_AET,
                               associations=DispatchSettings().associations_per_job)
        assert echo(recorder.peer(), NODE_AET) == status.SUCCESS
    finally:
        recorder.stop()
    assert [o.status for o in outcomes] == [status.SUCCESS] * 3
    assert discrepancies(documented, recorder.proposed, "proposed by dispatch") == []
    created = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in paths}
    assert created == {a for a, _ in documented} - {VERIFICATION} == set(recorder.stored)


# --------------------------------------------------------------------------- Dermoscopic Photography


def dermoscopic_photo() -> Dataset:
    """A Dermoscopic Photography Image (PS3.3 A.32.11) with its required modules: Frame of Reference,
    Enhanced General Equipment and Dermoscopic Image (modality DMS) beside the VL image modules."""
    return make_vl_photo(
        synthetic_rgb(48, 72), sop_class=DermoscopicPhotographyImageStorage, Modality="DMS",
        FrameOfReferenceUID=generate_uid(), PositionReferenceIndicator="",
        ManufacturerModelName="Dermatoscope", DeviceSerialNumber="D-1", SoftwareVersions="1.0",
        RecognizableVisualFeatures="NO", LightSourcePolarization="", ContactMethod="",
        EmitterColorTemperature="", OpticalMagnificationFactor="",
    )


def test_a_dermoscopic_photo_is_accepted_by_default_and_its_results_are_valid(
        start_intake, tmp_path: Path) -> None:
    photo = dermoscopic_photo()
    path = write_dataset(photo, tmp_path / "dermoscopic.dcm")
    if dciodvfy_available():
        assert validate(path).errors == [], "the test's dermoscopic photo itself is not a valid IOD"

    config = intake_config(tmp_path)  # the default accepted classes
    running = start_intake(config)
    (outcome,) = store_files(Peer(NODE_AET, "127.0.0.1", running.scp.port), [path], SCU_AET)
    assert outcome.status == status.SUCCESS
    job = running.store.find(photo.SOPInstanceUID)
    assert job is not None and job.state == JobState.RECEIVED
    assert job.sop_class_uid == DermoscopicPhotographyImageStorage

    spooled = pydicom.dcmread(running.scp.spool.path(job.photo_path))
    decoded = photo_from_dataset(spooled, accepted_sop_classes=config.intake.decode_limits().sop_classes)
    assert decoded.rgb.shape == (48, 72, 3)
    results = build_results(spooled, EncodeOptions())
    assert results.seg is not None
    for ds in results.datasets():
        reference = ds.SourceImageSequence[0] if "SourceImageSequence" in ds else None
        if reference is not None:
            assert reference.ReferencedSOPClassUID == DermoscopicPhotographyImageStorage
        if dciodvfy_available():
            assert validate(ds).errors == [], f"{ds.SOPClassUID.name} of a dermoscopic photo"
    assert results.seg.FrameOfReferenceUID == photo.FrameOfReferenceUID, "Annex A.1.1: the photo's Frame of Reference"

    only_vl = start_intake(intake_config(tmp_path / "only-vl", [VLPhotographicImageStorage]))
    accepted, _ = negotiated(only_vl.scp.port, [(DermoscopicPhotographyImageStorage, "1.2.840.10008.1.2.1")])
    assert (DermoscopicPhotographyImageStorage, "1.2.840.10008.1.2.1") not in accepted, \
        "a configuration without it refuses it"


# --------------------------------------------------------------------------- lesion SEG input (issue 15)


def test_segmentation_storage_is_negotiated_only_with_lesion_input(start_intake, tmp_path: Path) -> None:
    """The statement's SEG rows hold for the default configuration (checked with the whole table above);
    with ``[lesion] enabled = false`` the same SCP negotiates no SEG context and STOW-RS refuses SEGs
    with 0122, so the rows are true only because lesion input is on."""
    tables = load_statement()
    seg_rows = {p for p in pairs(tables[SCP_TABLE]) if p[0] == SegmentationStorage}
    assert seg_rows == {(SegmentationStorage, "1.2.840.10008.1.2.1"), (SegmentationStorage, "1.2.840.10008.1.2")}
    config = intake_config(tmp_path).model_copy(update={"lesion": LesionSettings(enabled=False)})
    running = start_intake(config)
    candidates = [(SegmentationStorage, str(t)) for t in AllTransferSyntaxes]
    accepted, _ = negotiated(running.scp.port, candidates)
    assert not {p for p in accepted if p[0] == SegmentationStorage}
    assert stow_accepted(running.acceptor, candidates) == set()
