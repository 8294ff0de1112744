"""How the running node is watched: ``health`` (can it process what it receives; loud when not),
``readiness`` (the named checks behind ``/readyz``) and ``metrics`` (Prometheus counters the
stages report to and job-store gauges read at scrape time). The stages depend on this room; the
web side only serves what it holds."""
