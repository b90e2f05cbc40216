"""bench/RESULTS.md is a page a reader can use: today's figures on the first screen, each with command, commit,
date and machine; topic sections named, not numbered; every link (to a dated report in bench/reports/, a figure,
a section) resolves; nothing elsewhere points at a section number that no longer exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
PAGE = ROOT / "bench" / "RESULTS.md"
REPORTS = ROOT / "bench" / "reports"
FIRST_SCREEN = 40  # lines
HEADER = ["figure", "value", "command", "commit", "date", "machine"]
SHA = r"[0-9a-f]{7,40}"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", path.read_text(), re.M)}


def test_first_screen_is_a_table_of_current_figures():
    lines = PAGE.read_text().splitlines()[:FIRST_SCREEN]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("|") and _cells(ln) == HEADER), None)
    assert start is not None, f"no | {' | '.join(HEADER)} | table in the first {FIRST_SCREEN} lines of {PAGE}"
    rows = [_cells(ln) for ln in lines[start + 2:] if ln.startswith("|")]
    rows = rows[:next((i for i, r in enumerate(rows) if len(r) != len(HEADER)), len(rows))]
    assert len(rows) >= 8, f"only {len(rows)} headline rows"
    for figure, _value, command, commit, date, machine in rows:
        assert command and machine, figure
        assert re.fullmatch(rf"-|{SHA}|stale \({SHA}.*\)", commit), f"{figure}: commit cell {commit!r}"
        assert re.fullmatch(r"-|\d{4}-\d{2}-\d{2}.*", date), f"{figure}: date cell {date!r}"


def test_sections_are_named_not_numbered():
    for heading in re.findall(r"^#{2,} (.+)$", PAGE.read_text(), re.M):
        assert not re.match(r"\d", heading), heading
        assert not re.search(r"\bissues? \d", heading), heading


def test_links_resolve_and_every_report_is_linked():
    pages = [PAGE, *sorted(REPORTS.glob("*.md"))]
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if "://" in target:
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            assert dest.exists(), f"{page.name}: broken link {target}"
            if anchor:
                assert anchor in _anchors(dest), f"{page.name}: no section #{anchor} in {dest.name}"
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall(PAGE.read_text())}
    for report in REPORTS.glob("*.md"):
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-[a-z0-9-]+\.md", report.name), report.name
        assert report.name in linked, f"{report.name} is not linked from {PAGE.name}"


def test_no_reference_to_a_numbered_section_of_the_page():
    section = re.compile(r"\u00a7\s*\d|\bsection\s+\d")  # the old page's "\u00a715" / "section 9" style
    files = [ROOT / "README.md", *(p for d in ("fastmae", "bench", "kernels", "tests") for p in (ROOT / d).rglob("*.py"))]
    for path in files:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            numbered = section.search(line) and ("RESULTS" in line or path.name == "README.md")
            assert not numbered, f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
