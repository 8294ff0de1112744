"""``dicom-node jobs list | show | retry | purge``: what arrived, what happened to it, a second chance,
and deleting by hand what the retention stage would delete later.

``purge --older-than AGE`` deletes the photo and results of DONE and FAILED jobs that ended more
than AGE ago (never of a job not yet delivered, whatever its age) and keeps their records, so
``jobs show`` still tells what happened (and that the files are gone); ``--forget`` also deletes
those records and their history, as ``retention.job_history_days`` does later on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from typing import Any

from dicom_node.cli.common import load_or_explain
from dicom_node.config import NodeConfig
from dicom_node.queue.factory import open_job_store
from dicom_node.queue.job import FINAL_STATES, Job, JobEvent, JobState
from dicom_node.queue.store import JobNotFoundError, JobStore, JobStoreUnavailableError, StaleJobError


def _open_store_for_reading(config: NodeConfig) -> JobStore | None:
    if config.job_store.url is None and not config.job_db_path.is_file():
        print(f"error: no job store at {config.job_db_path} (has the node run with data_dir {config.data_dir}?)",
              file=sys.stderr)
        return None
    try:
        return open_job_store(config.job_db_path, config.job_store.url)
    except JobStoreUnavailableError as exc:  # a shared store's server is down or unreachable
        print(f"error: {exc}", file=sys.stderr)
        return None


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.datetime.fromtimestamp(epoch).isoformat(sep=" ", timespec="seconds")


def _job_dict(job: Job, history: list[JobEvent] | None = None) -> dict[str, Any]:
    out = dataclasses.asdict(job)
    out["state"] = job.state.value
    out["deliveries"] = sorted([list(d) for d in job.deliveries])
    out["results"] = [dataclasses.asdict(r) for r in job.results]
    out["destinations"] = list(job.destinations)
    if history is not None:
        out["history"] = [{"at": e.at, "from": e.from_state.value if e.from_state else None,
                           "to": e.to_state.value, "reason": e.reason} for e in history]
    return out


def run(args: argparse.Namespace) -> int:
    config = load_or_explain(args)
    if config is None:
        return 2
    store = _open_store_for_reading(config)
    if store is None:
        return 1
    try:
        if args.jobs_command == "list":
            states = [JobState(s) for s in args.state] if args.state else None
            jobs = store.list_jobs(states, limit=args.limit)
            if args.json:
                print(json.dumps({"counts": {k.value: v for k, v in store.counts().items()},
                                  "jobs": [_job_dict(j) for j in jobs]}, indent=2))
                return 0
            print(f"{'ID':>6}  {'STATE':<11}  {'TRIES':>5}  {'SENDS':>5}  {'RECEIVED':<19}  {'FROM':<16}  REASON")
            for job in jobs:
                print(f"{job.id:>6}  {job.state.value:<11}  {job.attempts:>5}  {job.dispatch_attempts:>5}  "
                      f"{_when(job.received_at):<19}  {job.calling_ae:<16}  {job.reason or ''}")
            counts = store.counts()
            print("  ".join(f"{state.value}: {counts[state]}" for state in JobState))
            return 0
        if args.jobs_command == "show":
            found = store.find(args.job) if not args.job.isdigit() else store.get(int(args.job))
            if found is None:
                raise JobNotFoundError(args.job)
            job = found
            history = store.history(job.id)
            if args.json:
                print(json.dumps(_job_dict(job, history), indent=2))
                return 0
            _print_job(job, history)
            return 0
        if args.jobs_command == "purge":
            return _purge(config, store, args.older_than, args.dry_run, args.forget)
        # retry
        ids = [int(j) for j in args.jobs]
        if args.all_failed:
            ids += [j.id for j in store.list_jobs([JobState.FAILED], limit=1_000_000)]
        if not ids:
            print("error: name job ids, or --all-failed", file=sys.stderr)
            return 2
        failures = 0
        for job_id in ids:
            try:
                job = store.retry(job_id)
                print(f"job {job_id}: {job.state.value} again")
            except (StaleJobError, JobNotFoundError) as exc:
                print(f"job {job_id}: not retried: {exc}", file=sys.stderr)
                failures += 1
        return 1 if failures else 0
    except JobNotFoundError as exc:
        print(f"error: no job {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()


def _print_job(job: Job, history: list[JobEvent]) -> None:
    print(f"job {job.id}: {job.state.value}")
    print(f"  received      {_when(job.received_at)} from {job.calling_ae} ({job.calling_host})")
    print(f"  SOP instance  {job.sop_instance_uid}")
    print(f"  SOP class     {job.sop_class_uid}  transfer syntax {job.transfer_syntax_uid}")
    print(f"  photo         {job.photo_path}")
    if job.files_purged_at is not None:
        print(f"  files         photo and results deleted by retention at {_when(job.files_purged_at)}; "
              "cannot be retried")
    print(f"  attempts      {job.attempts} processing, {job.dispatch_attempts} failed dispatch")
    if job.not_before:
        print(f"  next attempt  {_when(job.not_before)}")
    print(f"  route         {job.rule or '-'} -> {', '.join(job.destinations) or '-'}")
    if job.parse_s is not None:
        print(f"  parse time    {job.parse_s:.2f} s")
    if job.reason:
        print(f"  reason        {job.reason}")
    for result in job.results:
        sent = [d for d, uid in job.deliveries if uid == result.sop_instance_uid]
        where = ", ".join(sent) or "nobody yet"
        print(f"  result {result.kind:<3}    {result.sop_instance_uid} -> delivered to {where}")
    print("  history:")
    for event in history:
        source = event.from_state.value if event.from_state else "-"
        print(f"    {_when(event.at)}  {source} -> {event.to_state.value}  {event.reason or ''}")


def _size(nbytes: int) -> str:
    return f"{nbytes / 1_000_000:.1f} MB" if nbytes >= 100_000 else f"{nbytes / 1000:.1f} kB"


def _purge(config: NodeConfig, store: JobStore, older_than_s: float, dry_run: bool, forget: bool) -> int:
    """Delete (or, ``dry_run``, list) the files of DONE and FAILED jobs that ended ``older_than_s`` ago."""
    from dicom_node.retention.cleaner import Cleaner
    from dicom_node.spool.local import LocalSpool

    cleaner = Cleaner(config.retention, store, LocalSpool(config.data_dir, config.spool_dir))
    ended_before = time.time() - older_than_s
    if dry_run:
        planned = cleaner.plan_purge(ended_before)
        for item in planned:
            print(f"would delete: job {item.job.id} ({item.job.state.value}, ended {_when(item.job.updated_at)}): "
                  f"{item.files.files} files, {_size(item.files.bytes)}")
        files = sum(p.files.files for p in planned)
        nbytes = sum(p.files.bytes for p in planned)
        forgettable = ""
        if forget:
            ended = [j for j in store.list_jobs(FINAL_STATES, limit=10_000_000) if j.updated_at <= ended_before]
            forgettable = f"; would forget {len(ended)} job records"
        print(f"dry run: would purge {len(planned)} jobs: {files} files, {nbytes} bytes ({_size(nbytes)})"
              f"{forgettable}; nothing was deleted")
        return 0
    tally = cleaner.purge_ended_before(ended_before, forget=forget)
    forgotten = f"; forgot {tally.forgotten} job records" if forget else ""
    print(f"purged {tally.jobs} jobs: {tally.files} files, {tally.bytes} bytes ({_size(tally.bytes)}){forgotten}")
    return 0
