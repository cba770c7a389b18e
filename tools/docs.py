"""Writes the checked-in API documents: ``docs/asyncapi.{json,yaml}``,
``docs/openapi-<service>.json`` and ``docs/schemas/<topic>/<Type>.json``.

Run ``python -m tools.docs`` after changing a route, a message or a topic; unit tests fail
while the checked-in documents differ from what the code generates. Dev tooling: it builds the
services' apps, so it lives outside ``shared/`` (which imports nothing above it).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI

DOCS_DIR = Path(__file__).resolve().parents[1] / "docs"
SERVICES = ("settings", "isolation", "enforcer")


def _settings_app() -> FastAPI:
    from services.settings.bootstrap import build_app
    from services.settings.config import SettingsServiceSettings

    return build_app(SettingsServiceSettings(dev=True))


def _isolation_app() -> FastAPI:
    from services.isolation.bootstrap import build_app
    from services.isolation.config import IsolationSettings

    return build_app(IsolationSettings(dev=True))


def _enforcer_app() -> FastAPI:
    from services.enforcer.bootstrap import build_app
    from services.enforcer.config import EnforcerSettings

    return build_app(EnforcerSettings(dev=True))


APP_FACTORIES: dict[str, Callable[[], FastAPI]] = {
    "settings": _settings_app,
    "isolation": _isolation_app,
    "enforcer": _enforcer_app,
}


def openapi_document(service: str) -> dict[str, Any]:
    """The service's OpenAPI document, from an app built in dev mode (building connects nothing)."""
    document: dict[str, Any] = json.loads(json.dumps(APP_FACTORIES[service]().openapi()))
    return document


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2), encoding="utf-8")


SCHEMAS_DIR = "schemas"


def write_schemas(target: Path = DOCS_DIR) -> list[Path]:
    """``<target>/schemas/<topic>/<Type>.json`` for every message; stale files are removed."""
    from shared.asyncapi import message_schemas

    root = target / SCHEMAS_DIR
    written = []
    for (topic, name), schema in message_schemas().items():
        path = root / topic / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, schema)
        written.append(path)
    for stale in set(root.glob("*/*.json")) - set(written):
        stale.unlink()
    return written


def write_all(target: Path = DOCS_DIR) -> list[Path]:
    """Regenerate every document under ``target``; returns the paths written."""
    from shared.asyncapi import asyncapi_document, asyncapi_yaml

    target.mkdir(parents=True, exist_ok=True)
    written = [target / "asyncapi.json", target / "asyncapi.yaml"]
    _write_json(written[0], asyncapi_document())
    written[1].write_text(asyncapi_yaml(), encoding="utf-8")
    for service in SERVICES:
        path = target / f"openapi-{service}.json"
        _write_json(path, openapi_document(service))
        written.append(path)
    written.extend(write_schemas(target))
    return written


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0]) if args else DOCS_DIR
    for path in write_all(target):
        sys.stdout.write(f"wrote {path}\n")


if __name__ == "__main__":
    main()
