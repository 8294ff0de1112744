"""Schemathesis against the OpenAPI document a live server serves: no input makes it answer 5xx.

The server is the real app on uvicorn over a real job store (with jobs in every final state) and
the tiny untrained model. Each operation gets a bounded number of generated requests, derandomized
so a failure reproduces.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from dicom_node.web.server import HttpServer
from tests.web_fixtures import fill_job_store, make_app

EXAMPLES_PER_OPERATION = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def live_api(web_parser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    from dicom_node.queue.sqlite_store import SqliteJobStore

    data_dir: Path = tmp_path_factory.mktemp("fuzz") / "data"
    store = SqliteJobStore(data_dir / "jobs.sqlite3")
    fill_job_store(store)
    server = HttpServer(make_app(web_parser, data_dir, store), "127.0.0.1", 0)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        store.close()


@pytest.fixture(scope="module")
def api_schema(live_api: HttpServer):
    return schemathesis.openapi.from_url(f"{live_api.url}/openapi.json")


def _has_input(operation) -> bool:
    return any(len(group) for group in (operation.path_parameters, operation.query, operation.headers,
                                         operation.body))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_input_makes_the_api_fail(api_schema, mode: GenerationMode) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "POST /api/predict", "GET /api/v1/jobs", "GET /api/v1/jobs/{job_id}", "POST /api/v1/jobs/{job_id}/retry",
        "GET /healthz", "GET /readyz", "GET /metrics"}
    if mode == GenerationMode.NEGATIVE:
        operations = [op for op in operations if _has_input(op)]  # nothing to get wrong in a bare GET
    statuses: Counter[str] = Counter()
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def call(case) -> None:
            response = case.call_and_validate(timeout=60, checks=CHECKS)
            statuses[f"{case.operation.label} {response.status_code}"] += 1

        call()
    # the run did reach the handlers: successes for valid input, client errors for invalid input
    summary = "; ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))
    assert sum(statuses.values()) >= 5 * len(operations), summary
    wanted = "2" if mode == GenerationMode.POSITIVE else "4"
    assert any(key.rsplit(" ", 1)[1].startswith(wanted) for key in statuses), summary
    print(summary)
