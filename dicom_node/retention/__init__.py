"""Retention: the cleaner stage that bounds the disk (mercure's "cleaner").

Spooled photos are PHI and results pile up; the job records grow forever. The cleaner deletes a
delivered job's files ``retention.done_after_h`` after it ended, a failed job's after
``failed_after_h`` (time for a person to retry it), job records after ``job_history_days``, the
oldest delivered jobs' files early when the spool is over ``max_spool_gb``, and files no job refers
to. It never deletes anything of a job not yet delivered.

``cleaner`` is the stage (and what ``dicom-node jobs purge`` runs), ``reasons`` the words its log
lines and metrics say why with. Nothing heavy is imported here.
"""
