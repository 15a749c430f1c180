"""The docs read as a product: a short README, links that land, the protocol table complete,
and none of the words of how the project was worked on (sessions, leads, helpers, branches)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300

#: Process vocabulary: how the work was organised, not what the project is. Case-insensitive.
#: "helper" alone is legitimate English ("a helper function"), so only its process uses are listed.
FORBIDDEN = {
    r"\bsessions?[ -]\d": "a session number",
    r"\b(this|that|the|each|next|previous|earlier|same|other) session\b": "a work session",
    r"\bsession's\b": "a work session",
    r"\blead's\b": "the lead's (run, baseline, ...)",
    r"\bthe lead\b": "the lead",
    r"\bhelpers?'? (runs?|sessions?|training|tests?|benchmarks?)\b": "a helper's run",
    r"\bother (helpers|agents|developers)\b": "other helpers or agents",
    r"\bhelper's\b": "a helper's",
    r"\bbranch `": "a branch name",
    r"\b(this|that|the|a|its|own) branch\b": "a branch",
    r"\bbranch's\b": "a branch",
    r"\b(on|at) main\b": "the main branch",
    r"\bmain at [0-9a-f]{7}": "the main branch",
    r"/work/(wt|main|scratch)\b": "a path on the development machine",
}
_PATTERNS = [(re.compile(p, re.IGNORECASE), why) for p, why in FORBIDDEN.items()]


def doc_pages() -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def process_words(text: str) -> list[tuple[int, str, str]]:
    """(line number, what was matched, why it is not the project's word) for every hit."""
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        for pattern, why in _PATTERNS:
            for match in pattern.finditer(line):
                hits.append((number, match.group(0), why))
    return hits


def test_the_checker_tells_process_words_from_plain_english():
    flagged = ["(session 5, 2026-11-30)", "Session-6 added seeds", "the lead's run", "on branch `select`",
               "other helpers' training runs", "as of this session", "stays on this branch",
               "--cache /work/wt/evidence-scratch/cache", "main at 6db57fc"]
    clean = ["a helper function parses the header", "the test helpers in tests/helpers.py", "this leads to",
             "the elastic agent watches the workers", "an SSH tunnel", "branch prediction", "the main thread",
             "the leading term", "main(argv)"]
    for text in flagged:
        assert process_words(text), text
    for text in clean:
        assert not process_words(text), text


def test_docs_speak_of_the_project_only():
    found = [f"{page.relative_to(REPO)}:{number}: '{word}' ({why})"
             for page in doc_pages() for number, word, why in process_words(page.read_text())]
    assert not found, ("README.md and docs/ describe the product in its own words; history belongs in "
                       "CHANGELOG.md and git. Reword:\n" + "\n".join(found))


def test_readme_is_a_front_door():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


# --------------------------------------------------------------------------- links


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.lstrip("#").strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen, fence = set(), {}, False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        if fence or not re.match(r"#{1,6} ", line):
            continue
        base = github_anchor(line)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(page: Path) -> list[tuple[int, str]]:
    links, fence = [], False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            fence = not fence
        if fence:
            continue
        for target in LINK.findall(line):
            if not re.match(r"[a-z]+:", target):
                links.append((number, target))
    return links


def test_github_anchor_follows_githubs_rule():
    assert github_anchor("## `hfs export` (Export to ONNX)") == "hfs-export-export-to-onnx"
    assert github_anchor("### Query time at C = 1M: the ≤ 40 ms target") == "query-time-at-c--1m-the--40-ms-target"
    assert github_anchor("## Evaluate on IJB-B / IJB-C") == "evaluate-on-ijb-b--ijb-c"


def test_every_relative_link_lands():
    broken = []
    for page in doc_pages():
        for number, target in relative_links(page):
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO)}:{number}: {target}"
            if not dest.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where} (no heading with that anchor in {dest.relative_to(REPO)})")
    assert not broken, "broken links:\n" + "\n".join(broken)


# --------------------------------------------------------------------------- generated and mirrored content


def test_the_protocol_table_lists_every_op():
    from hfs.paramserver.protocol import OPS

    text = (REPO / "docs" / "parameter-server.md").read_text()
    table = text[text.index("| op | request fields / arrays | reply |"):]
    listed = set()
    for row in table.splitlines()[2:]:
        if not row.startswith("|"):
            break
        listed.update(re.findall(r"`(\w+)`", row.split("|")[1]))
    assert listed == set(OPS), f"docs/parameter-server.md's op table differs from protocol.OPS: {listed ^ set(OPS)}"


@pytest.mark.parametrize("page", ["commands.md", "training.md", "samplers.md", "parameter-server.md",
                                  "evaluation.md", "configuration.md", "configuration-reference.md",
                                  "benchmarks.md", "results/history.md"])
def test_the_readme_leads_to_every_topic_page(page):
    readme = (REPO / "README.md").read_text()
    pointed = {target.split("#")[0] for _, target in relative_links(REPO / "README.md")}
    assert f"docs/{page}" in pointed, f"README.md links to no docs/{page}"
    assert readme.count("](docs/") >= 10
