"""``dicom-node``: the one command-line entry point, with a sub-command per job.

The arguments of every command are declared here (cheap: ``--help`` loads nothing heavy); each
command group runs in a module of its own: ``serve``, ``parse``, ``model``, ``jobs``, ``peers``
(``echo`` and ``send``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
from pathlib import Path

from dicom_node import __version__
from dicom_node.logs import LOG_FORMATS, LOG_LEVELS
from dicom_node.model.names import PostprocessMode, default_model_dir
from dicom_node.model.runtime.names import RUNTIME_CHOICES, RuntimeName
from dicom_node.queue.job import JobState

log = logging.getLogger("dicom_node.cli")

DEFAULT_MODEL_DIR = default_model_dir()
DISTRIBUTION = "dicom-node"  # the name in pyproject.toml


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
                   help="ModelScope M2FP directory (configuration.json + pytorch_model.pt); default %(default)s")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def installed_version() -> str:
    """The version pip installed (package metadata: what `pip show dicom-node` and a bug report name);
    the source tree's ``__version__`` when run from a checkout that was never installed."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-node", description="DICOM AI node: parse body photographs with M2FP, "
                                     "return SEG, SC and SR to the PACS.")
    parser.add_argument("--version", action="version", version=f"dicom-node {installed_version()}",
                        help="print the installed version and exit")
    # choices: a typo (--log-level LOUD) is an argparse error naming the levels, not a silent INFO;
    # str.upper runs before the check, so `--log-level debug` is accepted.
    parser.add_argument("--log-level", default=None, type=str.upper, choices=LOG_LEVELS, metavar="LEVEL",
                        help="log level: %(choices)s (case-insensitive); default: $DICOM_NODE_LOG_LEVEL, else "
                             "the configuration's log_level (serve), else INFO")
    parser.add_argument("--log-format", default=None, type=str.lower, choices=LOG_FORMATS,
                        help="text: lines for people; json: one JSON object a line for log shippers; default: "
                             "$DICOM_NODE_LOG_FORMAT, else the configuration's log_format (serve), else text")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")

    p = sub.add_parser("parse", help="parse photos (JPEG, PNG, DICOM) and write label maps, overlays and JSON")
    p.add_argument("photos", nargs="+", type=Path, help="photo files to parse: JPEG, PNG or DICOM")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--lesion-mask", type=Path, action="append", default=[],
                   help="binary lesion mask image (same size as the photo); repeat once per photo, in order")
    p.add_argument("--dicom", action="store_true", help="also write <stem>_seg.dcm, _sc.dcm, _sr.dcm for DICOM input")
    p.add_argument("--view", choices=["anterior", "posterior"], action="append", default=[],
                   help="side of the body a photo shows, for the estimated %%TBSA of a --lesion-mask: once for all "
                        "photos, or once per photo in order; default: the DICOM View Code Sequence, else anterior "
                        "(with a warning in the report). With masks for several photos, the photos of one study "
                        "(DICOM Study Instance UID; non-DICOM photos together) are also combined into "
                        "study_tbsa.json")
    p.add_argument("--age", type=float, default=None, metavar="YEARS",
                   help="patient age in years, for the Lund-Browder chart column; default: the DICOM Patient's Age "
                        "or Birth Date and Study Date, else adult (with a warning in the report)")
    p.add_argument("--tbsa-method", choices=["lund-browder", "rule-of-nines"], default="lund-browder",
                   help="chart for the estimated %%TBSA of a --lesion-mask: lund-browder (default, age-dependent) "
                        "or rule-of-nines (adults)")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    p.add_argument("--postprocess", choices=[m.value for m in PostprocessMode], default=PostprocessMode.EXACT.value,
                   help="exact: the official semantics at the photo's size (default); fast: scores and label map "
                        "at the network-input size, about 35x faster on 12 MP photos, label maps agree on >99.5%% "
                        "of pixels")
    p.add_argument("--runtime", choices=RUNTIME_CHOICES, default=RuntimeName.AUTO.value,
                   help="auto (default): the fastest runtime whose results agree with eager fp32 on the parity "
                        "images (checked once per model and machine, logged); eager: the fp32 reference")
    _add_model_args(p)

    m = sub.add_parser("model", help="get the weights or make an untrained test model")
    msub = m.add_subparsers(dest="model_command", required=True, metavar="ACTION", help="fetch or make-test")
    f = msub.add_parser("fetch", help="download the official M2FP weights with modelscope (pip install '.[fetch]')")
    f.add_argument("--dir", type=Path, default=DEFAULT_MODEL_DIR,
                   help="where to put configuration.json and pytorch_model.pt; default %(default)s")
    f.add_argument("--revision", default=None,
                   help="hub revision to download (default: the revision this release was verified with)")
    f.add_argument("--force", action="store_true", help="replace a model already in --dir")
    t = msub.add_parser("make-test", help="write an UNTRAINED model in the official layout, for tests and benchmarks")
    t.add_argument("--dir", type=Path, required=True, help="directory to write configuration.json and the "
                   "random pytorch_model.pt into (created if missing)")
    t.add_argument("--small", action="store_true", help="a tiny configuration for fast tests")

    _add_node_commands(sub)
    return parser


_DURATION_UNITS_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration_s(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``90s`` (or ``1.5d``) -> seconds; argparse reports a bad value."""
    value, unit = text.strip()[:-1], text.strip()[-1:].lower()
    try:
        seconds = float(value) * _DURATION_UNITS_S[unit]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: a number and a unit s, m, h or d "
                                         "(e.g. 7d, 12h)") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: the duration must be zero or more")
    return seconds


def _add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="node configuration (TOML); default $DICOM_NODE_CONFIG, else config/node.toml")


def _add_node_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="run the node: receive photos, parse them, send SEG/SC/SR to the PACS")
    _add_config_arg(s)

    c = sub.add_parser("check", help="check an installation: configuration, model, data directory, ports, "
                                     "destinations, TLS files, Orthanc rule; exit 0 ok, 1 warnings, 2 failures")
    _add_config_arg(c)

    e = sub.add_parser("echo", help="C-ECHO a configured destination (by name) or HOST:PORT")
    e.add_argument("destination", help="a destination name from the configuration, or HOST:PORT")
    e.add_argument("--aet", default=None, help="called AE title (with HOST:PORT; default ANY-SCP)")
    e.add_argument("--calling-aet", default=None, help="our AE title (default: the node's ae_title)")
    e.add_argument("--timeout", type=float, default=10.0, help="seconds (default %(default)s)")
    _add_config_arg(e)

    j = sub.add_parser("jobs", help="list, show, retry and purge the node's jobs; migrate them to PostgreSQL")
    jsub = j.add_subparsers(dest="jobs_command", required=True, metavar="ACTION",
                            help="list, show, retry, purge or migrate")
    jl = jsub.add_parser("list", help="newest jobs first")
    jl.add_argument("--state", action="append", default=None,
                    choices=[s.value for s in JobState], help="only jobs in this state (repeatable)")
    jl.add_argument("--limit", type=int, default=50, help="show at most this many jobs (default %(default)s)")
    jl.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    _add_config_arg(jl)
    js = jsub.add_parser("show", help="one job: record, results, deliveries and history")
    js.add_argument("job", help="job id or received SOP Instance UID")
    js.add_argument("--json", action="store_true", help="one JSON document instead of text")
    _add_config_arg(js)
    jr = jsub.add_parser("retry", help="re-open failed jobs (dispatch again, or process again)")
    jr.add_argument("jobs", nargs="*", help="job ids")
    jr.add_argument("--all-failed", action="store_true", help="every failed job")
    _add_config_arg(jr)
    jp = jsub.add_parser("purge", help="delete the photo and results of done and failed jobs that ended before "
                                       "a time (never of jobs not yet delivered)")
    jp.add_argument("--older-than", required=True, type=duration_s, metavar="AGE",
                    help="jobs that ended longer ago than this: a number with a unit s, m, h or d (7d, 12h)")
    jp.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    jp.add_argument("--forget", action="store_true",
                    help="also delete those jobs' records and history: `jobs list` no longer shows them, and the "
                         "same photo sent again becomes a new job")
    _add_config_arg(jp)
    jm = jsub.add_parser("migrate", help="copy the SQLite job store of data_dir into an empty PostgreSQL store "
                                         "(stop the node first)")
    jm.add_argument("--to", required=True, metavar="URL",
                    help="postgresql://user@host:port/dbname; a password is best given in $PGPASSWORD or ~/.pgpass")
    _add_config_arg(jm)

    n = sub.add_parser("send", help="C-STORE DICOM files to a configured DIMSE destination (by name, over TLS "
                                    "where it says so) or HOST:PORT (a small SCU for demos and tests)")
    n.add_argument("files", nargs="+", type=Path, help="DICOM files or directories (searched recursively)")
    n.add_argument("--to", required=True, metavar="DESTINATION|HOST:PORT",
                   help="a destination name from the configuration, or the peer's address and DICOM port")
    n.add_argument("--aet", default=None, help="called AE title (required with HOST:PORT)")
    n.add_argument("--calling-aet", default=None,
                   help="our AE title (default: the node's ae_title to a destination, DICOM_NODE_SCU to HOST:PORT)")
    n.add_argument("--timeout", type=float, default=30.0, help="seconds (default %(default)s)")
    n.add_argument("--tls-ca", type=Path, default=None, metavar="PEM",
                   help="with HOST:PORT: speak DICOM TLS, trusting these CA certificates for the peer's")
    n.add_argument("--tls-cert", type=Path, default=None, metavar="PEM",
                   help="with --tls-ca: our client certificate (peers that require one), with --tls-key")
    n.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="the private key of --tls-cert")
    _add_config_arg(n)


# command -> (module of this package, its entry point); imported only when that command runs, so
# `dicom-node --help` and `jobs list` never load torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "parse": ("parse", "run_parse"),
    "model": ("model", "run"),
    "serve": ("serve", "run"),
    "check": ("check", "run"),
    "jobs": ("jobs", "run"),
    "echo": ("peers", "run_echo"),
    "send": ("peers", "run_send"),
}


def main(argv: list[str] | None = None) -> int:
    from dicom_node.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    module, entry = COMMANDS[args.command]
    if args.command == "jobs" and args.jobs_command == "migrate":
        module, entry = "jobs_migrate", "run"
    run = getattr(importlib.import_module(f"dicom_node.cli.{module}"), entry)
    return int(run(args))
