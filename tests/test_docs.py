"""The documentation: the README's links and anchors, its table of methods and commands, and the
MkDocs site in docs/ built with --strict (a broken link, a missing #anchor or a page left out of the
nav fails)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from conftest import REPO

README = REPO / "README.md"
LINK = re.compile(r"!?\[(?:[^\]`]|`[^`]*`)*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


# ----------------------------------------------------------------------------------- anchors of a Markdown file


def _heading_text(raw: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", raw)  # [text](link) -> text
    text = re.sub(r"<[^>]+>", "", text)
    return text.replace("`", "").replace("*", "").strip()


def github_slug(text: str) -> str:
    """GitHub's anchor of a heading (github-slugger): lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def mkdocs_slug(text: str) -> str:
    """Python-Markdown's (MkDocs') anchor of a heading: ASCII only, runs of spaces and hyphens one hyphen."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(markdown: str) -> set[str]:
    """Anchors that both GitHub and MkDocs give this text: headings whose two slugs agree (a link to one
    works on GitHub and on the site) and explicit ``id="..."`` anchors."""
    body = FENCE.sub("", markdown)
    found = set(re.findall(r"""\bid=["']([^"']+)["']""", body))
    for raw in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", body, re.M):
        text = _heading_text(raw)
        if github_slug(text) == mkdocs_slug(text):
            found.add(github_slug(text))
    return found


def broken_links(markdown: str, base: Path) -> list[str]:
    """Relative links of ``markdown`` (a file in ``base``) to a missing file or a missing #anchor."""
    problems = []
    for target in LINK.findall(FENCE.sub("", markdown)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (base / path).resolve() if path else None
        if file is not None and not file.exists():
            problems.append(f"{target}: no file {path}")
            continue
        if anchor:
            text = file.read_text(encoding="utf-8") if file is not None else markdown
            if file is not None and file.suffix != ".md":
                problems.append(f"{target}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(text):
                problems.append(f"{target}: no heading or id '{anchor}' in {path or 'this file'}")
    return problems


def test_the_link_checker_finds_missing_files_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## What `make demo` runs\n\n<a id=\"kept\"></a>text\n")
    text = ("# T\n\n## Your own images\n\n[a](#your-own-images) [b](docs/page.md#what-make-demo-runs) "
            "[c](docs/page.md#kept) [d](https://example.org/x#y)\n\n```\n[e](#inside-code)\n```\n"
            "[f](#nowhere) [g](docs/missing.md) [h](docs/page.md#gone) ![i](docs/page.md)\n")
    assert broken_links(text, tmp_path) == ["#nowhere: no heading or id 'nowhere' in this file",
                                            "docs/missing.md: no file docs/missing.md",
                                            "docs/page.md#gone: no heading or id 'gone' in docs/page.md"]
    # a heading GitHub and MkDocs slug differently is no target for a link read on both
    assert (github_slug("a - b"), mkdocs_slug("a - b")) == ("a---b", "a-b") and anchors("## a - b\n") == set()
    assert anchors("## Héllo\n") == set() and anchors("## Hello, `code` [link](x.md)\n") == {"hello-code-link"}


def test_readme_links_and_anchors_resolve():
    text = README.read_text(encoding="utf-8")
    assert "docs/" in text
    assert broken_links(text, REPO) == []


def test_docs_pages_link_to_existing_files_and_anchors():
    """The same check on every page of docs/ (the MkDocs build below checks them too, where mkdocs is
    installed; this one also runs without it)."""
    problems = []
    for page in sorted((REPO / "docs").glob("*.md")):
        problems += [f"{page.name}: {p}" for p in broken_links(page.read_text(encoding="utf-8"), page.parent)]
    assert problems == []


# ----------------------------------------------------------------------------------- what the code cites

# the team's design notes and paper texts live outside this repository: nothing in it may send a reader there
OUTSIDE_NOTES = re.compile(r"\bMETHODS\.md\b|\bpapers[/]")
DOC_CITATION = re.compile(r"\bdocs/([\w.-]+\.md)(?:#([\w-]+))?")
SOURCES = ("mlsctl", "recipes", "docs", "benchmarks", "scripts", "tests")
SOURCE_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".cfg", ".txt"}


def _source_files(*folders: str):
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and path.suffix in SOURCE_SUFFIXES and "results" not in path.parts:
                yield path


def unresolved_doc_citations(text: str, docs: Path) -> list[str]:
    """``docs/<page>.md`` and ``docs/<page>.md#anchor`` cited in ``text`` whose page is not in ``docs``
    or has no such heading or id (the anchors a link read on GitHub and on the site both find)."""
    problems = []
    for page, anchor in DOC_CITATION.findall(text):
        file = docs / page
        if not file.is_file():
            problems.append(f"docs/{page}: no such page")
        elif anchor and anchor not in anchors(file.read_text(encoding="utf-8")):
            problems.append(f"docs/{page}#{anchor}: no heading or id '{anchor}'")
    return problems


def test_the_citation_checker_finds_missing_pages_and_anchors(tmp_path):
    (tmp_path / "page.md").write_text("# Page\n\n## SOVE: departures\n")
    text = ('"""(docs/page.md#sove-departures), docs/page.md, docs/page.md#sove, docs/gone.md#x."""\n'
            "# see METHODS" ".md and papers" "/sove.txt")
    assert unresolved_doc_citations(text, tmp_path) == ["docs/page.md#sove: no heading or id 'sove'",
                                                        "docs/gone.md: no such page"]
    assert len(OUTSIDE_NOTES.findall(text)) == 2 and not OUTSIDE_NOTES.search("MY_METHODS.mdx newspapers")


def test_nothing_cites_the_design_notes_outside_the_repository():
    """Docstrings, recipes, docs, benchmarks and scripts cite docs/ pages (the README and CHANGELOG are
    the lead's and may tell history)."""
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
             for path in _source_files(*SOURCES)
             for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if OUTSIDE_NOTES.search(line)]
    assert found == []


def test_every_docs_page_and_anchor_the_code_cites_exists():
    problems = [f"{path.relative_to(REPO)}: {problem}"
                for path in _source_files("mlsctl", "recipes", "benchmarks", "scripts")
                for problem in unresolved_doc_citations(path.read_text(encoding="utf-8", errors="replace"), REPO / "docs")]
    assert problems == []
    cited = {m for path in _source_files("mlsctl") for m in DOC_CITATION.findall(path.read_text(encoding="utf-8"))}
    for section in ("dino", "cribo", "sove", "mls-and-moco-v2", "multi-similarity", "context-refinement", "mile"):
        assert ("methods.md", section) in cited, f"no module docstring cites docs/methods.md#{section}"


# ----------------------------------------------------------------------------------- the README's table


def readme_table() -> dict[str, list[str]]:
    """The rows of the README's "What is in it" table, by kind: ``| method | `dino` | ... |``."""
    section = README.read_text(encoding="utf-8").split("\n## What is in it\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[str]] = {}
    for kind, name in re.findall(r"^\|\s*(\w+)\s*\|\s*`([^`]+)`\s*\|", section, re.M):
        rows.setdefault(kind, []).append(name)
    return rows


def test_readme_lists_every_method_and_command_once_in_the_help_order():
    import typer

    from mlsctl import methods
    from mlsctl.cli import app

    rows = readme_table()
    assert set(rows) == {"method", "command"}
    group = typer.main.get_command(app)
    assert sorted(rows["method"]) == sorted(methods.names())
    assert rows["command"] == group.list_commands(None)  # every command once, in `mlsctl --help`'s order


# ----------------------------------------------------------------------------------- the MkDocs site

needs_mkdocs = pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                                  reason="mkdocs is not installed (pip install -e '.[dev]')")


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], capture_output=True, text=True, timeout=120)


@needs_mkdocs
def test_docs_site_builds_strictly(tmp_path):
    result = _build(REPO / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "commands" / "index.html").is_file()


@needs_mkdocs
def test_strict_build_fails_on_a_broken_link_an_anchor_and_a_page_outside_the_nav(tmp_path):
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with open(tmp_path / "docs" / "index.md", "a", encoding="utf-8") as page:
        page.write("\n[a](commands.md#no-such-heading) [b](no-such-page.md)\n")
    (tmp_path / "docs" / "orphan.md").write_text("# Not in the nav\n")
    result = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "no-such-heading" in out and "no-such-page.md" in out and "orphan.md" in out, out


def test_the_commands_table_lists_every_option_of_every_command():
    """A new user's probe (2026-12-06): the README calls docs/commands.md "every option", and its table lacked
    seventeen options of eight commands."""
    from typer.main import get_command

    from mlsctl.cli import app

    text = (REPO / "docs" / "commands.md").read_text(encoding="utf-8")
    rows = [line for line in text.split("## Errors")[0].splitlines() if line.startswith("| `mlsctl")]

    def commands(command, path):
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                yield from commands(sub, [*path, name])
        else:
            yield " ".join(path), command

    missing = {}
    for path, command in commands(get_command(app), []):
        row = next((r for r in rows if r.startswith(f"| `mlsctl {path} ") or r.startswith(f"| `mlsctl {path}`")), None)
        assert row is not None, f"no row for mlsctl {path}"
        absent = [p.opts[-1] for p in command.params if type(p).__name__.endswith("Option") and "--help" not in p.opts
                  and not getattr(p, "hidden", False)  # an option kept only to refuse it in a sentence
                  and not any(re.search(rf"{re.escape(o)}\b", row) for o in p.opts)]
        if absent:
            missing[path] = absent
    assert not missing, missing
