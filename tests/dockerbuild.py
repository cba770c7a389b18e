"""The Docker build as far as it can be known without an engine: context, stages, COPY sources.

``build_context`` applies ``.dockerignore`` the way the engine does (patterns relative to the
context root, ``*``/``?`` within one path element, ``**`` across any number, a pattern that
matches a directory excludes what is under it, ``!`` re-includes, the last match wins).
``stages`` parses the Dockerfile's ``FROM``/``COPY`` instructions; ``materialize`` copies what one
stage's ``COPY`` instructions take from the context into a directory, so a test can run that
stage's build command (``pip wheel .``) on exactly the files the image build would see.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def ignore_patterns(root: Path = ROOT) -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per line of ``.dockerignore``."""
    patterns = []
    for line in (root / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        cleaned = line.removeprefix("!").strip().strip("/")
        cleaned = re.sub(r"^\./", "", cleaned)
        patterns.append((negated, _pattern_regex(cleaned)))
    return patterns


def ignored(relative: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = relative.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negated, regex in patterns:
        if any(regex.match(prefix) for prefix in prefixes):
            result = not negated
    return result


def build_context(root: Path = ROOT) -> set[str]:
    """Relative paths of the files the engine would send as the build context."""
    patterns = ignore_patterns(root)
    # An excluded directory can be skipped whole unless a `!` pattern could re-include from it.
    prune = not any(negated for negated, _ in patterns)
    files = set()
    for directory, dirs, names in os.walk(root):
        base = Path(directory).relative_to(root).as_posix()
        prefix = "" if base == "." else base + "/"
        if prune:
            dirs[:] = [d for d in dirs if not ignored(prefix + d, patterns)]
        for name in names:
            if not ignored(prefix + name, patterns):
                files.add(prefix + name)
    return files


@dataclass
class Copy:
    sources: list[str]
    destination: str
    from_stage: str | None
    chmod: str | None


@dataclass
class Stage:
    base: str
    name: str | None
    copies: list[Copy] = field(default_factory=list)
    instructions: list[tuple[str, str]] = field(default_factory=list)


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#") and current:
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    return lines


def stages(root: Path = ROOT) -> list[Stage]:
    args: dict[str, str] = {}
    found: list[Stage] = []
    for line in _logical_lines((root / "Dockerfile").read_text()):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not found:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        elif keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            found.append(Stage(base=base, name=name))
        elif found:
            found[-1].instructions.append((keyword, rest))
            if keyword in ("COPY", "ADD"):
                words = shlex.split(rest)
                flags = {
                    w.split("=", 1)[0]: w.split("=", 1)[1] for w in words if w.startswith("--")
                }
                paths = [w for w in words if not w.startswith("--")]
                found[-1].copies.append(
                    Copy(
                        sources=paths[:-1],
                        destination=paths[-1],
                        from_stage=flags.get("--from"),
                        chmod=flags.get("--chmod"),
                    )
                )
    return found


def copied_files(stage: Stage, context: set[str]) -> dict[str, list[str]]:
    """For each context ``COPY`` source of ``stage``, the context files it takes."""
    taken: dict[str, list[str]] = {}
    for copy in stage.copies:
        if copy.from_stage is not None:
            continue
        for source in copy.sources:
            source = source.rstrip("/").removeprefix("./")
            if source in ("", "."):
                taken[source] = sorted(context)
            else:
                taken[source] = sorted(
                    f for f in context if f == source or f.startswith(source + "/")
                )
    return taken


def materialize(stage: Stage, target: Path, root: Path = ROOT) -> list[str]:
    """Copy what ``stage``'s context COPYs take into ``target`` (the WORKDIR layout)."""
    context = build_context(root)
    written = []
    for files in copied_files(stage, context).values():
        for relative in files:
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / relative, destination)
            written.append(relative)
    return written
