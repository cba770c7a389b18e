"""The image's install, without an engine: the wheel built from the Dockerfile's build context,
installed into a clean virtual environment with only its declared runtime dependencies, runs
every entry point from a directory outside the repository.

A package missing from the wheel, a portal file missing from its package data, or an import of
an undeclared distribution fails here, as it would in the container.

The dependencies live in a cached environment (``$HOSTISO_CACHE_DIR/runtime-deps-<hash>``, built
once per set of pins with pip, which uses its download cache); each run makes a fresh venv that
sees only that environment's site-packages (a ``.pth`` line, so the cached environment's own
``.pth`` files, such as an editable install, are not processed) and installs the wheel into it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from shared.infra.kafka import cache_dir
from tests.dockerbuild import ROOT, materialize, stages

pytestmark = pytest.mark.timeout(900)


def _run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel .` (the build stage's command) on exactly what the build stage copies."""
    context = tmp_path_factory.mktemp("build-stage")
    build = stages()[0]
    assert materialize(build, context), "the build stage copies nothing"
    out = tmp_path_factory.mktemp("wheels")
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "-q",
        "--wheel-dir",
        out,
        ".",
        cwd=context,
    )
    (found,) = out.glob("hostiso-*.whl")
    return found


def _requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode())
    return sorted(r for r in metadata.get_all("Requires-Dist") or [] if "extra ==" not in r)


def _site_packages(environment: Path) -> Path:
    return (
        environment
        / "lib"
        / f"python{sys.version_info.major}.{sys.version_info.minor}"
        / "site-packages"
    )


@pytest.fixture(scope="module")
def runtime_env(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    requirements = _requirements(wheel)
    digest = hashlib.sha256("\n".join(requirements).encode()).hexdigest()[:16]
    deps = cache_dir() / f"runtime-deps-{digest}"
    if not (deps / ".complete").exists():
        # Built beside it and renamed into place: a concurrent run never sees half of it.
        partial = deps.with_name(f"{deps.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        venv.create(partial, with_pip=True)
        _run(partial / "bin" / "python", "-m", "pip", "install", "-q", *requirements)
        (partial / ".complete").write_text("\n".join(requirements) + "\n")
        if (deps / ".complete").exists():  # another run finished first: use its environment
            shutil.rmtree(partial, ignore_errors=True)
        else:
            shutil.rmtree(deps, ignore_errors=True)  # a half-built one from a killed run
            partial.rename(deps)
    clean = tmp_path_factory.mktemp("clean") / "venv"
    venv.create(clean, with_pip=False)
    (_site_packages(clean) / "runtime-deps.pth").write_text(f"{_site_packages(deps)}\n")
    _run(
        deps / "bin" / "python",
        "-m",
        "pip",
        "--python",
        clean / "bin" / "python",
        "install",
        "-q",
        "--no-deps",
        "--no-index",
        wheel,
    )
    return clean


def test_wheel_holds_every_package_and_the_portal_files(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    packages = sorted(
        init.parent.relative_to(ROOT).as_posix()
        for top in ("shared", "services", "agent", "cli", "portal", "bench")
        for init in (ROOT / top).rglob("__init__.py")
    )
    missing = [p for p in packages if f"{p}/__init__.py" not in names]
    assert not missing, missing
    static = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "portal/static").iterdir())
    assert static and set(static) <= names, set(static) - names
    assert not any(n.startswith(("tests/", "docs/")) for n in names)


ENTRY_POINTS = """
import importlib, importlib.util, json, sys
# `python -m` targets: found (not run: some start their service at import).
mains = ["services.settings", "services.isolation", "services.enforcer", "agent", "shared.infra"]
files = {f"{m}.__main__": importlib.util.find_spec(f"{m}.__main__").origin for m in mains}
modules = [
    "services.settings.bootstrap", "services.isolation.bootstrap", "services.enforcer.bootstrap",
    "agent.cli", "agent.bootstrap", "cli.app", "portal", "shared.infra.__main__",
]
files |= {m: importlib.import_module(m).__file__ for m in modules}
outside = {m: f for m, f in files.items() if not f.startswith(sys.prefix)}
assert not outside, f"imported from outside the venv: {outside}"

import asyncio, httpx
from services.settings.bootstrap import build_app as settings_app
from services.settings.config import SettingsServiceSettings
from services.isolation.bootstrap import build_app as isolation_app
from services.isolation.config import IsolationSettings
from services.enforcer.bootstrap import build_app as enforcer_app
from services.enforcer.config import EnforcerSettings
APP_FACTORIES = {
    "settings": lambda: settings_app(SettingsServiceSettings(dev=True)),
    "isolation": lambda: isolation_app(IsolationSettings(dev=True)),
    "enforcer": lambda: enforcer_app(EnforcerSettings(dev=True)),
}
async def main():
    seen = {}
    for service, factory in APP_FACTORIES.items():
        app = factory()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            seen[service] = (await c.get("/health")).status_code
            if service == "settings":
                page = await c.get("/portal/")
                seen["portal"] = page.status_code, "<html" in page.text.lower()
    return seen
print(json.dumps(asyncio.run(main())))
"""


def _clean_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "VIRTUAL_ENV", "HOSTISO_")) and k != "PATH"
    } | {"PATH": "/usr/bin:/bin", "HOSTISO_DEV": "1"}


def test_clean_environment_imports_every_entry_point_outside_the_repo(
    runtime_env: Path, tmp_path: Path
) -> None:
    python = runtime_env / "bin" / "python"
    out = _run(python, "-I", "-c", ENTRY_POINTS, cwd=tmp_path, env=_clean_env())
    assert json.loads(out.strip().splitlines()[-1]) == {
        "settings": 200,
        "isolation": 200,
        "enforcer": 200,
        "portal": [200, True],
    }


@pytest.mark.parametrize(
    "command",
    [
        ("bin/hostiso", "--help"),
        ("bin/python", "-m", "agent", "--help"),
        ("bin/python", "-m", "shared.infra", "--help"),
    ],
    ids=["hostiso", "agent", "infra"],
)
def test_console_commands_of_the_image_run(
    runtime_env: Path, tmp_path: Path, command: tuple[str, ...]
) -> None:
    out = _run(runtime_env / command[0], *command[1:], cwd=tmp_path, env=_clean_env())
    assert "Usage" in out
