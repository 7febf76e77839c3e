"""Property-based fuzzing of every documented operation from /openapi.json: bad input is never a 5xx.

Each operation is fuzzed with generated path parameters (mostly unknown models) and again with the
real model names, so generated bodies and queries reach parsing, decoding and scoring. Bounded (a few
examples per operation and generation mode) so it stays well under a minute.
"""

from __future__ import annotations

import collections
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from schemathesis import GenerationMode

from tests.service.helpers import GREY_MODEL, RGB_MODEL, Server

EXAMPLES = 6

pytestmark = pytest.mark.timeout(180)


def _fuzz(
    operation: Any, base_url: str, seen: list[tuple[str, int]], failures: list[str], **fixed: Any
) -> None:
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @hypothesis.settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode, **fixed))
        def check(case: schemathesis.Case) -> None:
            response = case.call(base_url=base_url, timeout=30)
            seen.append((f"{case.method} {case.path}", response.status_code))
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}"
                )

        try:
            check()
        except hypothesis.errors.Unsatisfiable:
            continue  # nothing negative to generate for this operation


def test_no_server_errors(service: Server) -> None:
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 16
    seen: list[tuple[str, int]] = []
    failures: list[str] = []
    for operation in operations:
        _fuzz(operation, service.url, seen, failures)
        if "{name}" in operation.path:
            for name in (GREY_MODEL, RGB_MODEL):
                path = {"name": name, "version": "1"} if "{version}" in operation.path else {"name": name}
                _fuzz(operation, service.url, seen, failures, path_parameters=path)
    assert not failures, "\n".join(failures[:10])
    statuses = collections.Counter(status for _, status in seen)
    # the generated requests reached the scoring code, not only routing
    assert statuses[200] > 0 and statuses[404] > 0 and statuses[400] + statuses[422] > 0, statuses
