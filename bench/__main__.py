"""``python -m bench [--full] [--report PATH] [--profile]``: the six figures of issue 6."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from bench.figures import BenchSizes, run_bench
from bench.report import bench_table, write_json

app = typer.Typer(add_completion=False, help=__doc__)


def scratch_dir(prefix: str) -> Path:
    """A work dir in RAM when possible: simulated agents fsync their state on every policy."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix=prefix, dir=shm if shm.is_dir() else None))


@app.command()
def main(
    full: Annotated[
        bool, typer.Option(help="Issue 6's sizes (100,000 backlog, 10,000 agents).")
    ] = False,
    report: Annotated[Path, typer.Option(help="Where the JSON report goes.")] = Path(
        "artifacts/bench-report.json"
    ),
    profile: Annotated[
        bool, typer.Option(help="Run isolation and enforcer under pyinstrument (slower).")
    ] = False,
) -> None:
    """Start Kafka, Redis, the services and simulated agents; measure; print and write the report."""
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    # Each phase logs its end: a full-size run takes long and is followed in its log.
    logging.getLogger("bench").setLevel(logging.INFO)
    sizes = BenchSizes.full() if full else BenchSizes()
    workdir = scratch_dir("hostiso-bench-")
    typer.echo(f"bench: {'full' if full else 'reduced'} sizes, logs in {workdir}")
    result: dict[str, Any] = {}
    try:
        asyncio.run(run_bench(workdir, sizes, profile=profile, report=result))
    except BaseException as exc:
        # A full-size run takes long: keep what it measured before it failed.
        result["failed"] = repr(exc)
        write_json(report, result)
        typer.echo(f"bench failed ({exc!r}); partial report: {report}", err=True)
        raise
    write_json(report, result)
    typer.echo(bench_table(result))
    if profile:
        for name, lines in result.get("profile", {}).items():
            typer.echo(f"\n--- {name} profile (pyinstrument, top) ---")
            typer.echo("\n".join(lines))
    typer.echo(f"\nreport: {report}  ({result['wall_s']} s)")


if __name__ == "__main__":
    app()
