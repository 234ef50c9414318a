"""The documentation stays true: the CLI reference is the parsers' own text, links resolve, the
benchmark results are named by date and topic and indexed, and nothing narrates how it was built."""
from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _generator():
    spec = importlib.util.spec_from_file_location("make_cli_reference", ROOT / "docs" / "make_cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="module")
def generator():
    return _generator()


@pytest.fixture(scope="module")
def rendered(generator) -> str:
    return generator.render()


def test_cli_reference_is_current(generator, rendered: str) -> None:
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == rendered, "docs/cli.md differs from the parsers: run python docs/make_cli_reference.py"


def test_cli_reference_covers_every_command_and_option(rendered: str) -> None:
    from anomaly.cli import build_parser

    root = build_parser()
    subs = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"train", "export", "calibrate", "audit", "review", "models"} <= set(subs)
    for name, parser in subs.items():
        section = rendered.split(f"## `anomaly {name}`\n", 1)
        assert len(section) == 2, f"no section for anomaly {name}"
        body = section[1].split("\n## `anomaly ", 1)[0]
        for action in parser._actions:
            if action.help is argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            for option in action.option_strings:
                assert f"`{option}" in body or f", {option}" in body, f"anomaly {name} {option} missing from docs/cli.md"
            if action.default not in (None, False, True, [], {}, "", argparse.SUPPRESS) and action.option_strings:
                assert f"`{action.default}`" in body, f"anomaly {name} {action.option_strings[0]}: default missing"


def test_cli_reference_write_is_atomic_and_idempotent(generator, rendered: str, tmp_path: Path) -> None:
    target = tmp_path / "cli.md"
    target.write_text("stale\n", encoding="utf-8")
    assert generator.write(target) is True
    assert target.read_text(encoding="utf-8") == rendered
    assert generator.write(target) is False
    assert [p.name for p in tmp_path.iterdir()] == ["cli.md"]  # no temp file left behind


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), RESULTS / "README.md", RESULTS / "CHANGELOG.md"]


def test_relative_links_resolve() -> None:
    broken = []
    for md in _markdown_files():
        for target in _LINK.findall(md.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not (md.parent / path).exists():
                broken.append(f"{md.relative_to(ROOT)} -> {target}")
    assert not broken, "broken links: " + ", ".join(broken)


_DATED = re.compile(r"^\d{4}-\d{2}-\d{2}-[a-z0-9]+(?:-[a-z0-9]+)*(?:\.md|\.json)?$")


def test_results_are_named_by_date_and_topic_and_indexed() -> None:
    index = (RESULTS / "README.md").read_text(encoding="utf-8")
    names = sorted(p.name for p in RESULTS.iterdir() if p.name not in ("README.md", "CHANGELOG.md"))
    assert names, "benchmarks/results is empty"
    misnamed = [n for n in names if not _DATED.match(n)]
    assert not misnamed, f"results not named YYYY-MM-DD-<topic>: {misnamed}"
    unindexed = [n for n in names if f"]({n}" not in index]
    assert not unindexed, f"results missing from benchmarks/results/README.md: {unindexed}"


_ORDINALS = ("first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|thirteenth|"
             "fourteenth|fifteenth|sixteenth|seventeenth|eighteenth|nineteenth|twentieth|twenty-[a-z]+")
_NARRATION = re.compile(rf"\b(?:(?:{_ORDINALS}|\d+(?:st|nd|rd|th)?)\s+sessions?\b|sessions?[ -]\d+)", re.IGNORECASE)


def test_nothing_narrates_how_it_was_built() -> None:
    """Docs, code and results speak of the product: no numbered sessions ("the tenth session", "session 12")."""
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    for folder in ("anomaly", "data", "training", "deploy", "benchmarks"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".md", ".py")]
    hits = []
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _NARRATION.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:80]}")
    assert not hits, "numbered-session narration:\n" + "\n".join(hits)
