"""The Dockerfile and .dockerignore, checked without a Docker engine against the real context.

What the wheel build needs (pyproject's packages and package data) must be in the build context
and copied into the build stage; the runtime stage installs only the wheels, runs as a non-root
user, and its entry point gives every container its own HOSTISO_INSTANCE_ID.
"""

from __future__ import annotations

import os
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.dockerbuild import ROOT, build_context, copied_files, ignore_patterns, ignored, stages


def _pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _packages() -> list[str]:
    """Every package the wheel must hold: directories with an __init__.py under the includes."""
    tool = _pyproject()["tool"]
    assert isinstance(tool, dict)
    includes = [p.rstrip("*") for p in tool["setuptools"]["packages"]["find"]["include"]]
    found = []
    for top in includes:
        for init in (ROOT / top).rglob("__init__.py"):
            found.append(init.parent.relative_to(ROOT).as_posix())
    return sorted(found)


def test_dockerignore_follows_the_engines_matching_rules() -> None:
    patterns = ignore_patterns()
    assert ignored("shared/__pycache__/config.cpython-311.pyc", patterns)
    assert ignored(".venv/bin/python", patterns)
    assert ignored("tests/unit/ops/test_image.py", patterns)
    assert not ignored("shared/config.py", patterns)
    assert not ignored("portal/static/index.html", patterns)
    assert not ignored("infra/docker/entrypoint.sh", patterns)


def test_build_stage_copies_every_package_and_data_file_the_wheel_build_needs() -> None:
    context = build_context()
    build, runtime = stages()
    assert build.name == "build" and runtime.base == build.base
    assert build.base.startswith("python:3.11") and build.base.endswith("-slim")
    taken = copied_files(build, context)
    for source, files in taken.items():
        assert files, f"COPY {source}: nothing in the build context (excluded by .dockerignore?)"
    for copy in build.copies:
        # The layout `tests.dockerbuild.materialize` reproduces: each source at its own path.
        assert copy.destination in ("./", *(f"./{s}" for s in copy.sources)), copy
    stage_files = {f for files in taken.values() for f in files}
    assert "pyproject.toml" in stage_files
    missing = [p for p in _packages() if f"{p}/__init__.py" not in stage_files]
    assert not missing, f"packages the wheel needs but the build stage lacks: {missing}"
    tool = _pyproject()["tool"]
    assert isinstance(tool, dict)
    for package, globs in tool["setuptools"]["package-data"].items():
        for glob in globs:
            data = sorted((ROOT / package).glob(glob))
            assert data, f"package data {package}/{glob} matches nothing"
            for path in data:
                relative = path.relative_to(ROOT).as_posix()
                assert relative in stage_files, f"{relative} is not copied into the build stage"
    for package in _packages():
        for module in (ROOT / package).glob("*.py"):
            relative = module.relative_to(ROOT).as_posix()
            assert relative in stage_files, f"{relative} is not copied into the build stage"
    assert ("RUN", "pip wheel --wheel-dir /wheels .") in build.instructions


def test_runtime_stage_installs_the_wheels_only_and_runs_as_a_non_root_user() -> None:
    context = build_context()
    _, runtime = stages()
    runs = [rest for keyword, rest in runtime.instructions if keyword == "RUN"]
    assert any("pip install --no-index --find-links=/wheels hostiso" in run for run in runs)
    assert any("from=build" in run for run in runs), "the wheels come from the build stage"
    # No source tree in the runtime image: only the two scripts are copied from the context.
    context_copies = [c for c in runtime.copies if c.from_stage is None]
    for copy in context_copies:
        for source in copy.sources:
            assert source.startswith("infra/docker/") and source in context, source
            assert copy.chmod == "0755"
            assert os.stat(ROOT / source).st_mode & stat.S_IXUSR, f"{source} is not executable"
    users = [rest for keyword, rest in runtime.instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    entrypoints = [rest for keyword, rest in runtime.instructions if keyword == "ENTRYPOINT"]
    assert entrypoints == ['["/usr/local/bin/hostiso-entrypoint"]']


def _entrypoint(env: dict[str, str], *command: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("HOSTISO_INSTANCE_ID", "HOSTNAME")}
    result = subprocess.run(
        ["sh", str(ROOT / "infra/docker/entrypoint.sh"), *command],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def test_entrypoint_names_each_container_instance_after_its_hostname() -> None:
    show = ("sh", "-c", 'echo "$HOSTISO_INSTANCE_ID"')
    # Docker sets HOSTNAME to the container id: two replicas, two ids.
    assert _entrypoint({"HOSTNAME": "3f2a9c1d0b7e"}, *show) == "3f2a9c1d0b7e"
    assert _entrypoint({"HOSTNAME": "8e41d27aa0c5"}, *show) == "8e41d27aa0c5"
    hostname = subprocess.run(["hostname"], capture_output=True, text=True, check=True)
    assert _entrypoint({}, *show) == hostname.stdout.strip() != ""
    # An explicit id wins (e.g. static group membership with stable names).
    assert (
        _entrypoint({"HOSTISO_INSTANCE_ID": "iso-a", "HOSTNAME": "3f2a9c1d0b7e"}, *show) == "iso-a"
    )


def _fake_cli(directory: Path, key: str) -> Path:
    """A stand-in `hostiso` on PATH: mints a token, and `enrollment-key rotate` prints ``key``."""
    directory.mkdir()
    script = directory / "hostiso"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        "  token) echo tok ;;\n"
        f'  enrollment-key) [ "$HOSTISO_TOKEN" = tok ] && echo {key} ;;\n'
        "  *) exit 2 ;;\n"
        "esac\n"
    )
    script.chmod(0o755)
    return directory


def test_enrollment_key_job_writes_the_issued_key_once_and_keeps_it(tmp_path: Path) -> None:
    bin_dir = _fake_cli(tmp_path / "bin", "hek_a_secret")
    key_file = tmp_path / "keys" / "enrollment.key"
    key_file.parent.mkdir()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "ENROLLMENT_KEY_FILE": str(key_file),
        "AGENTS_ACCOUNT": "acct-demo",
    }
    script = str(ROOT / "infra/docker/enrollment-key.sh")
    subprocess.run(["sh", script], env=env, check=True, capture_output=True)
    assert key_file.read_text().strip() == "hek_a_secret"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # A second run (the stack restarted) keeps the key instead of revoking it with a new one.
    _fake_cli(tmp_path / "bin2", "hek_b_other")
    env["PATH"] = f"{tmp_path / 'bin2'}:{os.environ['PATH']}"
    subprocess.run(["sh", script], env=env, check=True, capture_output=True)
    assert key_file.read_text().strip() == "hek_a_secret"


def test_enrollment_key_job_fails_and_writes_nothing_when_the_enforcer_refuses(
    tmp_path: Path,
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "hostiso").write_text('#!/bin/sh\n[ "$1" = token ] && echo tok && exit 0\nexit 1\n')
    (bin_dir / "hostiso").chmod(0o755)
    key_file = tmp_path / "enrollment.key"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "ENROLLMENT_KEY_FILE": str(key_file),
        "AGENTS_ACCOUNT": "acct-demo",
    }
    result = subprocess.run(["sh", str(ROOT / "infra/docker/enrollment-key.sh")], env=env)
    assert result.returncode != 0
    assert not key_file.exists()


@pytest.mark.parametrize("script", ["entrypoint.sh", "enrollment-key.sh"])
def test_image_scripts_are_posix_sh(script: str) -> None:
    # The slim image has dash as /bin/sh: no bashisms.
    subprocess.run(["sh", "-n", str(ROOT / "infra/docker" / script)], check=True)
    assert (ROOT / "infra/docker" / script).read_text().startswith("#!/bin/sh\n")
