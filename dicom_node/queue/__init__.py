"""The job store: the one durable record every stage reads and writes (received -> done or failed).

``job`` holds the states and records, ``owners`` the names of who holds a job, ``store`` the
engine-neutral interface, ``sqlite_store`` the embedded default, ``factory`` which engine to open,
``doorbell`` the rings between the stages. Stages never talk to each other in memory; they move
jobs here.
"""
