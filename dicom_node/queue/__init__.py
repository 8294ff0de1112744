"""The job store: the one durable record every stage reads and writes (received -> done or failed).

``job`` holds the states and records, ``store`` the engine-neutral interface, ``sqlite_store`` the
embedded default. Stages never talk to each other in memory; they move jobs here.
"""

from dicom_node.queue.job import Job, JobEvent, JobState, NewJob, ResultObject
from dicom_node.queue.store import JobNotFoundError, JobStore, StaleJobError, open_job_store

__all__ = [
    "Job", "JobEvent", "JobNotFoundError", "JobState", "JobStore", "NewJob", "ResultObject", "StaleJobError",
    "open_job_store",
]
