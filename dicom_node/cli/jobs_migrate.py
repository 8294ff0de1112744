"""``dicom-node jobs migrate --to URL``: move a node's queue from its SQLite file to PostgreSQL.

Why a command: a node that joins others on a shared PostgreSQL store (issue 16) keeps what it
already holds (waiting photos, results not yet sent, the history a PACS administrator asks about)
only if its records are copied with their ids, states, backoff and deliveries. Stop the node first:
the copy is of one moment of the file. The target must be empty, because merging two queues would
renumber jobs that logs and tickets already name.
"""

from __future__ import annotations

import argparse
import sys

from dicom_node.cli.common import load_or_explain
from dicom_node.config import POSTGRES_URL_SCHEMES, mask_url
from dicom_node.queue.sqlite_store import SqliteJobStore
from dicom_node.queue.store import JobStoreUnavailableError


def run(args: argparse.Namespace) -> int:
    config = load_or_explain(args)
    if config is None:
        return 2
    url: str = args.to.strip()
    if url.split("://", 1)[0].lower() not in POSTGRES_URL_SCHEMES:
        print(f"error: --to {mask_url(url)!r} is not a postgresql:// URL", file=sys.stderr)
        return 2
    source = config.job_db_path
    if not source.is_file():
        print(f"error: no job store at {source} (has the node run with data_dir {config.data_dir}?)",
              file=sys.stderr)
        return 1
    SqliteJobStore(source).close()  # brings a file an older version wrote to the schema this one copies

    from dicom_node.queue.postgres_store import PostgresJobStore, TargetNotEmptyError

    try:
        target = PostgresJobStore(url)
    except JobStoreUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        copied = target.import_sqlite(source)
    except (TargetNotEmptyError, JobStoreUnavailableError) as exc:
        print(f"error: {exc}; nothing was copied", file=sys.stderr)
        return 1
    finally:
        target.close()
    print(f"copied {copied['jobs']} jobs, {copied['job_results']} results, {copied['deliveries']} deliveries "
          f"and {copied['job_events']} history events from {source} to {mask_url(url)}")
    print("set [job_store] url (or DICOM_NODE_JOB_STORE__URL) to that URL and start the node")
    return 0
