"""Dependencies are declared exactly as imported.

Every third-party top-level import of the deployable packages is a pinned runtime dependency
(mapped to distributions by ``importlib.metadata.packages_distributions()``), every pinned
runtime dependency is imported (or is named here with the reason it is needed without an
import), and whatever the tests import is in the ``test`` extra or the runtime list.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
import tomllib
from collections.abc import Mapping
from importlib.metadata import packages_distributions
from pathlib import Path

from tests.dockerbuild import ROOT

DEPLOYED = ("shared", "services", "agent", "cli", "portal", "bench")
LOCAL = {*DEPLOYED, "tests", "tools"}
# Tooling inside a deployed package that the services never import: its imports belong to the
# named extra (`pip install hostiso[docs]`), not to the runtime list.
EXTRA_ONLY = {"shared/asyncapi.py": "docs"}
# Runtime dependencies needed without a top-level import of their own.
NOT_IMPORTED = {
    "hiredis": "redis-py's C reply parser, used by redis when installed",
    "opentelemetry-exporter-otlp-proto-http": "imported as opentelemetry.exporter.otlp",
    "opentelemetry-instrumentation-fastapi": "imported as opentelemetry.instrumentation",
    "opentelemetry-instrumentation-httpx": "imported as opentelemetry.instrumentation",
    "opentelemetry-api": "imported as opentelemetry",
    "opentelemetry-sdk": "imported as opentelemetry.sdk",
}
# Test-extra entries the suite needs without importing them.
TEST_TOOLS = {
    "ruff": "make lint",
    "mypy": "make lint",
    "pytest-asyncio": "a pytest plugin (asyncio_mode = auto)",
    "pytest-timeout": "a pytest plugin (timeout = 300)",
    "faststream": "the tests import shared.asyncapi, which imports it (the docs extra)",
    "pyinstrument": "`python -m bench --profile` runs the services under it (a script template)",
    "schemathesis": "tests/e2e/realstack/test_schemathesis_realstack.py runs its CLI",
    "py-spy": "`python -m services.enforcer.measure --spy` samples the enforcer with its CLI",
}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(entries: list[str]) -> dict[str, str]:
    pins = {}
    for entry in entries:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]+\])?==([^\s;]+)", entry)
        assert match, f"not pinned exactly: {entry!r}"
        pins[_normal(match.group(1))] = match.group(3)
    return pins


def _project() -> dict[str, object]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert isinstance(project, dict)
    return project


def _imports(files: list[Path]) -> dict[str, set[str]]:
    """Third-party top-level module -> files importing it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in LOCAL | {"__future__"}:
                    found.setdefault(top, set()).add(path.relative_to(ROOT).as_posix())
    return found


@functools.cache
def _installed() -> Mapping[str, list[str]]:
    return packages_distributions()


def _distributions(module: str) -> set[str]:
    dists = _installed().get(module)
    assert dists, f"{module} is imported but no installed distribution provides it"
    return {_normal(d) for d in dists}


def _deployed_files() -> list[Path]:
    return [p for top in DEPLOYED for p in (ROOT / top).rglob("*.py")]


def test_every_runtime_import_is_a_declared_runtime_dependency() -> None:
    runtime = _pins(_project()["dependencies"])  # type: ignore[arg-type]
    files = [p for p in _deployed_files() if p.relative_to(ROOT).as_posix() not in EXTRA_ONLY]
    undeclared = {
        module: sorted(where)
        for module, where in _imports(files).items()
        if not _distributions(module) & set(runtime)
    }
    assert not undeclared, f"imported but not in [project].dependencies: {undeclared}"


def test_every_runtime_dependency_is_imported_or_explained() -> None:
    runtime = set(_pins(_project()["dependencies"]))  # type: ignore[arg-type]
    files = [p for p in _deployed_files() if p.relative_to(ROOT).as_posix() not in EXTRA_ONLY]
    imported = {d for module in _imports(files) for d in _distributions(module)}
    unused = runtime - imported - set(NOT_IMPORTED)
    assert not unused, f"declared but never imported by the deployed code: {sorted(unused)}"


def test_extra_only_tooling_imports_are_in_its_extra_and_not_at_runtime() -> None:
    extras = _project()["optional-dependencies"]
    assert isinstance(extras, dict)
    runtime = set(_pins(_project()["dependencies"]))  # type: ignore[arg-type]
    for relative, extra in EXTRA_ONLY.items():
        pins = set(_pins(extras[extra]))
        for module in _imports([ROOT / relative]):
            dists = _distributions(module)
            assert dists & (pins | runtime), f"{relative} imports {module}: not in [{extra}]"
    # faststream is the AsyncAPI generator's only: never a runtime dependency of the image.
    assert "faststream" not in runtime
    assert "faststream" in _pins(extras["docs"]) and "faststream" in _pins(extras["test"])
    # No service imports the tooling module.
    for path in _deployed_files():
        if path.relative_to(ROOT).as_posix() in EXTRA_ONLY:
            continue
        assert "shared.asyncapi" not in path.read_text(), path


def test_test_imports_are_in_the_test_extra_or_the_runtime_list() -> None:
    extras = _project()["optional-dependencies"]
    assert isinstance(extras, dict)
    test = _pins(extras["test"])
    allowed = set(test) | set(_pins(_project()["dependencies"]))  # type: ignore[arg-type]
    undeclared = {
        module: sorted(where)[:3]
        for module, where in _imports(list((ROOT / "tests").rglob("*.py"))).items()
        if not _distributions(module) & allowed
    }
    assert not undeclared, f"tests import undeclared distributions: {undeclared}"
    imported = {
        d
        for module in _imports(list((ROOT / "tests").rglob("*.py")))
        for d in _distributions(module)
    }
    unused = set(test) - imported - set(TEST_TOOLS)
    assert not unused, f"test extra entries nothing imports: {sorted(unused)}"
