"""docker-compose.yml structure (no Docker engine here) and the configuration's secret rules."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

import services
from shared.config import DEV_JWT_SECRET, ConfigError, ServiceSettings

ROOT = Path(__file__).resolve().parents[3]


def _settings_fields() -> set[str]:
    fields = set(ServiceSettings.model_fields)
    for module in pkgutil.iter_modules(services.__path__):
        try:
            config = importlib.import_module(f"services.{module.name}.config")
        except ModuleNotFoundError:
            continue
        for value in vars(config).values():
            if isinstance(value, type) and issubclass(value, ServiceSettings):
                fields |= set(value.model_fields)
    return fields


def test_compose_runs_kafka_redis_and_the_three_services_with_health_checks() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = compose["services"]
    assert {"kafka", "redis", "settings", "isolation", "enforcer"} <= set(svc)
    assert svc["kafka"]["image"].startswith("apache/kafka:")
    assert svc["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "--appendonly" in svc["redis"]["command"] and "always" in svc["redis"]["command"]
    for name in ("kafka", "redis", "settings", "isolation", "enforcer"):
        assert "healthcheck" in svc[name], name
    for name, port in (("settings", 8001), ("isolation", 8002), ("enforcer", 8003)):
        assert svc[name]["command"] == ["python", "-m", f"services.{name}"]
        assert f"{port}/ready" in " ".join(svc[name]["healthcheck"]["test"])
        deps = svc[name]["depends_on"]
        assert deps["kafka"]["condition"] == "service_healthy"
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["topics"]["condition"] == "service_completed_successfully"


def _names_read_outside_settings() -> set[str]:
    """``HOSTISO_*`` names the CLI and the agent read themselves (os.environ, typer envvar)."""
    names: set[str] = set()
    for package in ("cli", "agent"):
        for module in (ROOT / package).rglob("*.py"):
            names |= set(re.findall(r"[\"'](HOSTISO_[A-Z0-9_]+)[\"']", module.read_text()))
    return names


def test_compose_environment_names_are_read_by_the_code() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    fields = _settings_fields()
    direct = _names_read_outside_settings()
    assert {"HOSTISO_TOKEN", "HOSTISO_ENFORCER_URL"} <= direct
    for name, service in compose["services"].items():
        for var in service.get("environment") or {}:
            if var.startswith("HOSTISO_"):
                assert var.removeprefix("HOSTISO_").lower() in fields or var in direct, (
                    f"{name}: {var} is read by no config"
                )


def test_secrets_are_required_outside_dev_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HOSTISO_DEV", "HOSTISO_JWT_SECRET"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="HOSTISO_JWT_SECRET is required outside dev mode"):
        ServiceSettings().require_secret("jwt_secret")
    assert ServiceSettings(dev=True).require_secret("jwt_secret") == DEV_JWT_SECRET


def test_dev_secret_is_refused_outside_dev_mode() -> None:
    with pytest.raises(ValidationError, match="dev default"):
        ServiceSettings(dev=False, jwt_secret=DEV_JWT_SECRET)  # type: ignore[arg-type]


def test_short_secret_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least 32"):
        ServiceSettings(jwt_secret="short").require_secret("jwt_secret")  # type: ignore[arg-type]


def test_platform_addresses_are_parsed_from_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTISO_PLATFORM_ADDRESSES", "198.51.100.1, 198.51.100.2")
    assert ServiceSettings().platform_addresses == ["198.51.100.1", "198.51.100.2"]
    monkeypatch.setenv("HOSTISO_PLATFORM_ADDRESSES", "platform.example")
    with pytest.raises(ValidationError, match="not an IP address"):
        ServiceSettings()
