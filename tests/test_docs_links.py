"""Docs cite the project's own files: every relative link in README.md and docs/*.md, every
``docs/....md#anchor`` cited in a docstring or comment under fedmaml/, simulations/ and configs/,
and every project path the docs quote in backticks exists, anchors included (GitHub's heading slugs).

The checker is tested on small files of its own first, so that a checker that finds nothing
cannot pass for docs without dangling links."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A docs file cited from Python: ``docs/algorithms.md#evaluation`` or docs/robustness.md.
PY_CITATION = re.compile(r"(?<![\w/.])(docs/[\w./-]+?\.md)(#[\w-]+)?")
# A project path quoted in backticks in the docs, e.g. `fedmaml/core/estimators.py`.
QUOTED_PATH = re.compile(r"`((?:fedmaml|simulations|configs|tests|docs)/[\w./-]*)`")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"", re.IGNORECASE)
FENCE = re.compile(r"^\s*(```|~~~)")


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lowercase, spaces to hyphens
    (letters, digits, ``_`` and ``-`` survive, non-ASCII letters included)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    kept = []
    for ch in text:
        if ch in " -_" or unicodedata.category(ch)[0] in "LN":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors_of(markdown: str) -> set[str]:
    """Every anchor a Markdown file defines: heading slugs (repeated ones get -1, -2, ... as on
    GitHub) and explicit ``<a id=...>`` / ``<a name=...>``; headings inside code fences don't count."""
    seen: dict[str, int] = {}
    anchors: set[str] = set()
    in_fence = False
    for line in markdown.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        anchors.update(HTML_ANCHOR.findall(line))
        m = re.match(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        count = seen.get(slug, 0)
        anchors.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return anchors


def _without_code(markdown: str) -> str:
    """The text outside code fences (a shell example is not a link)."""
    out, in_fence = [], False
    for line in markdown.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            out.append("")
            continue
        out.append("" if in_fence else line)
    return "\n".join(out)


def _check_target(source: Path, path_part: str, anchor: str | None, base: Path) -> str | None:
    """None if ``path_part`` (relative to ``base``) exists and defines ``anchor``, else why not."""
    target = (base / path_part).resolve() if path_part else source
    if not target.exists():
        return f"{path_part}: no such file"
    if anchor is not None and target.suffix == ".md":
        if anchor not in anchors_of(target.read_text(encoding="utf-8")):
            return f"{path_part or target.name}#{anchor}: no such heading in {target.name}"
    return None


def broken_markdown_links(md: Path, root: Path) -> list[str]:
    """Every relative link of one Markdown file that points nowhere, as ``file:line: reason``."""
    problems = []
    text = _without_code(md.read_text(encoding="utf-8"))
    for lineno, line in enumerate(text.splitlines(), 1):
        for target in MD_LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, mailto:, ...
                continue
            path_part, _, anchor = target.partition("#")
            why = _check_target(md, path_part, anchor or None, md.parent)
            if why:
                problems.append(f"{md.relative_to(root)}:{lineno}: {why}")
        for quoted in QUOTED_PATH.findall(line):
            if "<" in quoted or "*" in quoted:
                continue
            why = _check_target(md, quoted.rstrip("/"), None, root)
            if why:
                problems.append(f"{md.relative_to(root)}:{lineno}: {why}")
    return problems


def broken_python_citations(py: Path, root: Path) -> list[str]:
    """Every ``docs/....md[#anchor]`` a Python file cites that points nowhere."""
    problems = []
    for lineno, line in enumerate(py.read_text(encoding="utf-8").splitlines(), 1):
        for path_part, anchor in PY_CITATION.findall(line):
            why = _check_target(py, path_part, anchor[1:] or None, root)
            if why:
                problems.append(f"{py.relative_to(root)}:{lineno}: {why}")
    return problems


# --- the checker itself, on files it is given -------------------------------------------------


@pytest.mark.parametrize("heading, slug", [
    ("Layer groups and Lambda patterns", "layer-groups-and-lambda-patterns"),
    ("MOML: the memory", "moml-the-memory"),
    ("1. MOML sinewave protocol, centralized", "1-moml-sinewave-protocol-centralized"),
    ("Meta-gradient estimators (`fedmaml/core/estimators.py`, `algorithm.meta_gradient`)",
     "meta-gradient-estimators-fedmamlcoreestimatorspy-algorithmmeta_gradient"),
    ("**Bold** and a [link](x.md)", "bold-and-a-link"),
    ("Schätzer für β", "schätzer-für-β"),
])
def test_slugs_follow_github(heading, slug):
    assert github_slug(heading) == slug


def test_checker_finds_every_kind_of_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "pkg").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# Title\n## Same\n## Same\n<a id=\"custom\"></a>\n```\n## Not a heading\n```\n",
        encoding="utf-8")
    (tmp_path / "docs" / "b.md").write_text(
        "[ok](a.md#title) [ok](a.md#same-1) [ok](a.md#custom) [ok](#here) [web](https://x.org/y)\n"
        "## Here\n"
        "[gone](missing.md) [bad anchor](a.md#same-2) [fenced](a.md#not-a-heading)\n"
        "`docs/a.md` `docs/none.md` `results/<run>/x.json`\n"
        "```\n[in code](nowhere.md)\n```\n",
        encoding="utf-8")
    (tmp_path / "pkg" / "m.py").write_text(
        '"""See docs/a.md#title and docs/a.md#nope, docs/c.md."""\n', encoding="utf-8")
    problems = broken_markdown_links(tmp_path / "docs" / "b.md", tmp_path)
    assert problems == [
        "docs/b.md:3: missing.md: no such file",
        "docs/b.md:3: a.md#same-2: no such heading in a.md",
        "docs/b.md:3: a.md#not-a-heading: no such heading in a.md",
        "docs/b.md:4: docs/none.md: no such file",
    ]
    assert broken_python_citations(tmp_path / "pkg" / "m.py", tmp_path) == [
        "pkg/m.py:1: docs/a.md#nope: no such heading in a.md",
        "pkg/m.py:1: docs/c.md: no such file",
    ]


# --- the project's own docs and docstrings ---------------------------------------------------


def test_every_relative_link_in_readme_and_docs_exists():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    problems = [p for md in files for p in broken_markdown_links(md, ROOT)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_docs_citation_in_code_exists():
    files = sorted([*(ROOT / "fedmaml").rglob("*.py"), *(ROOT / "simulations").rglob("*.py"),
                    *(ROOT / "configs").rglob("*.yaml")])
    problems = [p for py in files for p in broken_python_citations(py, ROOT)]
    assert not problems, "broken citations:\n" + "\n".join(problems)


def test_nothing_cites_a_guide_the_project_does_not_ship():
    """The math guide is docs/algorithms.md; citations of an upper-case guide with numbered
    sections pointed at a file outside the project."""
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "fedmaml").rglob("*.py"),
             *(ROOT / "simulations").rglob("*.py"), *(ROOT / "tests").rglob("*.py"),
             *(ROOT / "configs").rglob("*.yaml")]
    needle = "ALGORITHMS" + ".md"  # spelt in two pieces so that this file does not cite it
    hits = [f"{f.relative_to(ROOT)}" for f in files if needle in f.read_text(encoding="utf-8")]
    assert not hits, hits
