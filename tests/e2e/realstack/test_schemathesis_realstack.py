"""schemathesis against each service as it runs for real: every answer conforms to its OpenAPI.

``--checks all`` except ``positive_data_acceptance`` (a valid request may still be refused by a
rule the schema cannot express, e.g. an address that is private), with a soc token, and for the
enforcer's agent routes the token of an agent this test enrolled (its ``agent_id`` fixed, so the
routes are exercised past the auth gate). Bounded examples keep the run to a few minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.config import DEV_ENROLLMENT_SECRET
from shared.enrollment import enrollment_key
from tests.e2e.realstack.conftest import RealStack

pytestmark = pytest.mark.e2e

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
MAX_EXAMPLES = int(os.environ.get("HOSTISO_SCHEMATHESIS_EXAMPLES", "10"))


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a TOML basic string is a JSON string for these characters


def _config(soc_token: str, agent: dict[str, str] | None) -> str:
    lines = [
        f"headers = {{ Authorization = {_toml_string('Bearer ' + soc_token)} }}",
        "",
        "[checks.positive_data_acceptance]",
        "enabled = false",
    ]
    if agent is not None:
        lines += [
            "",
            "[[operations]]",
            'include-path-regex = "^/v1/agents/\\\\{agent_id\\\\}/"',
            f"headers = {{ Authorization = {_toml_string('Bearer ' + agent['agent_token'])} }}",
            # The long poll is bounded by the service (60 s); a test case must not wait for it.
            f'parameters = {{ "path.agent_id" = {_toml_string(agent["agent_id"])}, '
            '"query.wait" = 0 }',
        ]
    return "\n".join(lines) + "\n"


def _run(base_url: str, config: str, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "schemathesis.toml"
    config_path.write_text(config, encoding="utf-8")
    report = work / "report.json"
    command = [
        str(SCHEMATHESIS),
        "--config-file",
        str(config_path),
        "run",
        f"{base_url}/openapi.json",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--seed",
        "1",
        "--workers",
        "1",
        "--request-timeout",
        "40",
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    finished = subprocess.run(
        command, capture_output=True, text=True, timeout=400, check=False, cwd=work
    )
    (work / "output.txt").write_text(finished.stdout + finished.stderr, encoding="utf-8")
    assert report.exists(), finished.stdout[-4000:] + finished.stderr[-2000:]
    document: dict[str, Any] = json.loads(report.read_text(encoding="utf-8"))
    document["output_tail"] = finished.stdout[-6000:]
    return document


def _counts(document: dict[str, Any]) -> str:
    return json.dumps(
        {
            "operations": document.get("operations"),
            "test_cases": document.get("test_cases"),
            "failures": document.get("failures"),
            "errors": document.get("errors"),
        }
    )


def _assert_clean(service: str, document: dict[str, Any]) -> None:
    print(f"schemathesis {service}: {_counts(document)}")
    tail = document["output_tail"]
    assert document["operations"]["tested"] >= 1, tail
    assert document["operations"]["errored"] == 0, tail
    assert document["failures"] == [], tail
    assert document["errors"] == [], tail
    assert document["exit_code"] == 0, tail


def _enroll(stack: RealStack) -> dict[str, str]:
    body = {
        "account_id": stack.account_id,
        "enrollment_key": enrollment_key(DEV_ENROLLMENT_SECRET, stack.account_id),
        "hostname": "schemathesis-01",
        "platform": "linux",
    }
    response = httpx.post(f"{stack.enforcer_url}/v1/agents/enroll", json=body, timeout=10)
    assert response.status_code == 201, response.text
    enrolled: dict[str, str] = response.json()
    return enrolled


@pytest.mark.parametrize("service", ["settings", "isolation", "enforcer"])
def test_service_answers_conform_to_its_openapi(
    realstack: RealStack, service: str, tmp_path: Path
) -> None:
    url = getattr(realstack, f"{service}_url")
    agent = _enroll(realstack) if service == "enforcer" else None
    document = _run(url, _config(realstack.token("soc"), agent), tmp_path / service)
    _assert_clean(service, document)
