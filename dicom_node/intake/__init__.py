"""Receiving: the C-STORE / C-ECHO SCP (``scp``). It accepts, persists (in the spool) and commits
(in the job store) before it answers; nothing downstream ever runs inside an association."""
