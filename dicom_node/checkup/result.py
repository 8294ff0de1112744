"""One row of ``dicom-node check``: what was checked, how it stands, and what to do about it.

A check returns rows rather than raising or printing, so the command can run the checks side by
side, put their rows in a fixed order, and reduce them to one exit status a script can act on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    """How one check stands; the order of severity is ok < skip < warn < fail."""

    OK = "ok"
    SKIP = "skip"  # not checked, and nothing is wrong because of it (e.g. no Orthanc rule shipped beside)
    WARN = "warn"  # works now, but someone should look (a certificate expiring soon, a first-start delay)
    FAIL = "fail"  # the node cannot do its job until this is fixed


EXIT_OK = 0
EXIT_WARNINGS = 1
EXIT_FAILURES = 2


@dataclass(frozen=True)
class CheckRow:
    """``fix`` says what to do; it is empty only for rows that need nothing done."""

    name: str
    status: Status
    detail: str
    fix: str = ""


def ok(name: str, detail: str) -> CheckRow:
    return CheckRow(name, Status.OK, detail)


def skip(name: str, detail: str) -> CheckRow:
    return CheckRow(name, Status.SKIP, detail)


def warn(name: str, detail: str, fix: str) -> CheckRow:
    return CheckRow(name, Status.WARN, detail, fix)


def fail(name: str, detail: str, fix: str) -> CheckRow:
    return CheckRow(name, Status.FAIL, detail, fix)


def exit_status(rows: Iterable[CheckRow]) -> int:
    """0 all ok (or skipped), 1 some warnings and no failure, 2 any failure: scripts and monitoring
    can tell "fix now" from "look at it" without parsing the table."""
    statuses = {row.status for row in rows}
    if Status.FAIL in statuses:
        return EXIT_FAILURES
    if Status.WARN in statuses:
        return EXIT_WARNINGS
    return EXIT_OK
