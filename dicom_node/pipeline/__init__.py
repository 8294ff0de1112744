"""The processing stage: received photo -> decode -> parse -> encode -> spooled results.

``processor`` does one job (pure stage logic, testable in-process), ``worker`` is the worker
process loop (the model loaded once per process), ``supervisor`` runs the worker processes,
restarts dead ones and says loudly when processing is impossible.
"""
