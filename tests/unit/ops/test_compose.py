"""docker-compose.yml can scale, persists its state, and runs the same Kafka as the jars.

No Docker engine here: these read the file (and the gateway's nginx config) and check what
`docker compose up --scale isolation=3 --scale enforcer=2 --scale settings=2` depends on.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

import pytest
import yaml

from shared.infra.kafka import KAFKA_IMAGE, KAFKA_VERSION
from tests.dockerbuild import ROOT

SCALED = {"settings": 8001, "isolation": 8002, "enforcer": 8003}
LONG_RUNNING = ("kafka", "redis", *SCALED, "gateway", "agents")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


def test_no_container_has_a_fixed_name(compose: dict[str, Any]) -> None:
    named = [name for name, svc in compose["services"].items() if "container_name" in svc]
    assert not named, f"container_name stops --scale: {named}"


@pytest.mark.parametrize("service", sorted(SCALED))
def test_scaled_services_publish_no_host_port_and_restart(
    compose: dict[str, Any], service: str
) -> None:
    svc = compose["services"][service]
    assert "ports" not in svc, f"{service}: a fixed host port allows one replica only"
    assert svc["restart"] == "unless-stopped"
    assert svc["image"] == "hostiso:local" and svc["build"] == "."
    assert f"{SCALED[service]}/ready" in " ".join(svc["healthcheck"]["test"])
    # Each replica names itself (the image's entry point): never one id for all.
    assert "HOSTISO_INSTANCE_ID" not in svc["environment"]
    assert "HOSTISO_KAFKA_STATIC_MEMBERSHIP" not in svc["environment"]


def test_gateway_is_the_one_front_door_and_reaches_every_replica(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    published = {p.rsplit(":", 1)[-1] for p in gateway["ports"]}
    assert published == {str(port) for port in SCALED.values()}
    assert "./infra/docker/gateway.conf:/etc/nginx/conf.d/default.conf:ro" in gateway["volumes"]
    conf = (ROOT / "infra/docker/gateway.conf").read_text()
    # Resolved per request through Docker's DNS, so a replica added by --scale gets traffic.
    assert re.search(r"^resolver 127\.0\.0\.11 ", conf, re.M)
    for service, port in SCALED.items():
        assert re.search(
            rf"listen {port};\s+location / {{\s+set \$(\w+) http://{service}:{port};"
            rf"\s+proxy_pass \$\1;",
            conf,
        ), f"{service} is not proxied by variable"
        assert gateway["depends_on"][service]["condition"] == "service_healthy"
    timeout = re.search(r"proxy_read_timeout (\d+)s;", conf)
    assert timeout and int(timeout.group(1)) > 60, "agents long-poll up to 60 s"


def test_long_running_containers_restart_and_one_shot_jobs_do_not_loop(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    for name in LONG_RUNNING:
        assert services[name].get("restart") == "unless-stopped", name
    for name in ("kafka-users", "topics", "enrollment-key"):
        assert services[name].get("restart") == "on-failure", name


def test_state_lives_in_named_volumes(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    used = set()
    for svc in compose["services"].values():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith("."):
                used.add(source)
    assert used <= declared, used - declared
    kafka = compose["services"]["kafka"]
    log_dirs = kafka["environment"]["KAFKA_LOG_DIRS"]
    assert f"kafka-data:{log_dirs}" in kafka["volumes"]
    assert kafka["environment"]["CLUSTER_ID"], "a fixed cluster id: the volume's storage is reused"
    redis = compose["services"]["redis"]
    assert "redis-data:/data" in redis["volumes"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"


def test_kafka_image_is_the_release_of_the_jars(compose: dict[str, Any]) -> None:
    images = {
        svc["image"] for svc in compose["services"].values() if "kafka" in svc.get("image", "")
    }
    assert images == {KAFKA_IMAGE} == {f"apache/kafka:{KAFKA_VERSION}"}
    pom = ET.parse(ROOT / "infra/pom.xml").getroot()
    namespace = {"m": "http://maven.apache.org/POM/4.0.0"}
    version = pom.find("m:properties/m:kafka.version", namespace)
    assert version is not None and version.text == KAFKA_VERSION
    # The testcontainers path of the tests uses the same constant.
    assert "DockerContainer(KAFKA_IMAGE)" in (ROOT / "tests/conftest.py").read_text()


def test_kafka_has_a_secure_listener_reachable_from_the_host(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    env = kafka["environment"]
    assert "HOST://localhost:29092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert "HOST://:29092" in env["KAFKA_LISTENERS"].split(",")
    assert "HOST:SASL_SSL" in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    assert "KAFKA_LISTENER_NAME_HOST_SCRAM___SHA___512_SASL_JAAS_CONFIG" in env
    assert any(port.endswith(":29092:29092") for port in kafka["ports"])
    # The broker certificate names localhost, so host clients verify it.
    certs = compose["services"]["certs"]["command"]
    assert "localhost" in certs[certs.index("--hosts") + 1].split(",")


def test_simulated_agents_enroll_with_a_key_the_enforcer_issued(compose: dict[str, Any]) -> None:
    services = compose["services"]
    agents, job = services["agents"], services["enrollment-key"]
    command = agents["command"]
    assert command[:4] == ["python", "-m", "agent", "--simulated"]
    key_file = command[command.index("--enrollment-key-file") + 1]
    assert command[command.index("--enforcer-url") + 1] == "http://gateway:8003"
    key_volume = next(v for v in job["volumes"] if v.startswith("agent-keys:"))
    key_dir = key_volume.split(":")[1]
    assert key_file.startswith(key_dir + "/")
    assert f"agent-keys:{key_dir}:ro" in agents["volumes"]
    assert agents["depends_on"]["enrollment-key"]["condition"] == "service_completed_successfully"
    assert job["command"] == ["hostiso-enrollment-key"]
    assert job["environment"]["HOSTISO_ENFORCER_URL"] == "http://gateway:8003"
    state_dir = command[command.index("--state-dir") + 1]
    assert any(
        v.endswith(f":{state_dir}") and v.startswith("agent-state:") for v in agents["volumes"]
    )


def test_cli_is_a_run_only_tool_wired_to_the_gateway(compose: dict[str, Any]) -> None:
    cli = compose["services"]["cli"]
    assert cli["profiles"] == ["tools"], "`up` must not start it; `run --rm cli …` does"
    assert cli["command"][0] == "hostiso"
    env = cli["environment"]
    assert env["HOSTISO_SETTINGS_URL"] == "http://gateway:8001"
    assert env["HOSTISO_ISOLATION_URL"] == "http://gateway:8002"
    assert env["HOSTISO_ENFORCER_URL"] == "http://gateway:8003"
    # `hostiso token` signs with the services' secret (the same variable, same default).
    services_env = compose["services"]["settings"]["environment"]
    assert env["HOSTISO_JWT_SECRET"] == services_env["HOSTISO_JWT_SECRET"]
    assert env["HOSTISO_DEV"] == services_env["HOSTISO_DEV"]
