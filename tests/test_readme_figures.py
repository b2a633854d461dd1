"""Every figure in the README comes from a committed result file.

A block of figures in README.md (a table, or a paragraph: the lines up to the next blank line) is
preceded by `<!-- figures: benchmarks/results/NAME.json -->`. Each number shown in the block must
be a value of that JSON file at the shown precision (`.973` matches 0.9731; `37%` matches 0.372 or
37.2; `2,814` matches 2814). Not checked, by design: the first cell of a table row and the header
row (names such as `BLEU-1/2/3/4` or `T(IoBB)=0.5`), `inline code`, link targets, the year of a
citation (`Wang 2017`, `Shin et al. 2016`), and numbers glued to a word (`ChestX-ray8`, `BLEU-4`,
`CXR43`); `64 px` is checked, and so are ratios (`1.15x`). A figure from an earlier run of the
same script may be shown where the block names the commit that held it (`the JSON as of
\`9ef0542\``): it is then looked up in that commit's version of the file. Targets are written
as inline code (the `1.15x` aimed at), so they are not taken for measured figures.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CITATION = re.compile(r"\b[A-Z][a-z]+(?: et al\.)? (?:19|20)\d\d\b")  # "Wang 2017", "Shin et al. 2016"
MARKER = re.compile(r"<!--\s*figures:\s*(\S+)\s*-->")
# a number not glued to a word, a dash or a dot before it: 12, 2,814, 0.5, .973, 37%, 1.5x
NUMBER = re.compile(r"(?<![\w.\-])(\d{1,3}(?:,\d{3})+|\d+\.\d+|\d+|\.\d+)(%?)(?:x\b)?(?![\w.]*[A-Za-z(])")


def blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(line number, JSON path, lines of the block) for every marker."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        match = MARKER.search(line)
        if not match:
            continue
        block = []
        for following in lines[i + 1:]:
            if not following.strip():
                break
            block.append(following)
        out.append((i + 1, match.group(1), block))
    return out


def checked_text(block: list[str]) -> str:
    """The parts of a block whose numbers are figures: table rows without their first cell and
    without the header and separator rows; prose without code and link targets."""
    kept = []
    table_row = 0
    for line in block:
        if line.lstrip().startswith("|"):
            table_row += 1
            cells = line.strip().strip("|").split("|")
            if table_row <= 2:  # header and separator
                continue
            line = "|".join(cells[1:])
        else:
            table_row = 0
        line = re.sub(r"`[^`]*`", " ", line)
        line = CITATION.sub(" ", line)
        line = re.sub(r"\]\([^)]*\)", "]", line)
        kept.append(line)
    return "\n".join(kept)


COMMIT = re.compile(r"`([0-9a-f]{7,40})`")


def committed_values(block: list[str], path: str) -> list[float]:
    """The numbers of `path` as of each commit the block names in backticks (an earlier run of
    the same script). A commit that does not hold the file fails the test, unless this copy has
    no history to look in (no git, or a shallow clone): the test is then skipped."""
    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        except OSError:
            return None

    values = []
    for rev in COMMIT.findall("\n".join(block)):
        shown = git("show", f"{rev}:{path}")
        if shown is None or shown.returncode:
            shallow = git("rev-parse", "--is-shallow-repository")
            if shallow is None or shallow.returncode or shallow.stdout.strip() == "true":
                pytest.skip(f"no history to read {path} as of {rev} in")
            pytest.fail(f"the README names {path} as of {rev}, which this repository does not hold")
        values += numbers_in(json.loads(shown.stdout))
    return values


def numbers_in(value) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)] if math.isfinite(value) else []
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers_in(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers_in(v)]
    return []


def shown_matches(shown: str, percent: bool, values: list[float]) -> bool:
    digits = len(shown.split(".", 1)[1]) if "." in shown else 0
    target = float(shown.replace(",", ""))
    tolerance = 0.5 * 10 ** -digits + 1e-9
    candidates = values + ([v * 100 for v in values] if percent else [])
    return any(abs(v - target) <= tolerance for v in candidates)


def test_blocks_are_found_and_name_committed_files():
    found = blocks(README.read_text())
    assert len(found) >= 4, "the README's figure blocks lost their markers"
    for line, path, block in found:
        assert (ROOT / path).is_file(), f"README line {line}: {path} is not in the repository"
        assert block, f"README line {line}: a marker with no block after it"


@pytest.mark.parametrize("line,path,block", blocks(README.read_text()),
                         ids=lambda v: v if isinstance(v, str) and v.endswith(".json") else None)
def test_every_number_is_in_its_result_file(line, path, block):
    values = numbers_in(json.loads((ROOT / path).read_text()))
    text = checked_text(block)
    shown = NUMBER.findall(text)
    assert shown, f"README line {line}: no figures in the block marked with {path}"
    missing = [number + pct for number, pct in shown if not shown_matches(number, bool(pct), values)]
    if missing:  # an earlier run's figures, from the commit the block names
        earlier = committed_values(block, path)
        missing = [m for m in missing if not shown_matches(m.rstrip("%"), m.endswith("%"), earlier)]
    assert not missing, f"README line {line}: not in {path}: {', '.join(missing)}"


def test_the_checker_catches_a_wrong_figure():
    values = numbers_in({"a": {"f1": 0.9731, "n": 2814}, "b": [0.372]})
    assert shown_matches(".973", False, values) and shown_matches("2,814", False, values)
    assert shown_matches("37", True, values) and shown_matches("0.97", False, values)
    assert not shown_matches(".974", False, values) and not shown_matches("2,815", False, values)
    text = checked_text(["| label | n | F1 |", "| --- | ---: | ---: |",
                         "| BLEU-4 at T(IoBB)=0.5 | 2,814 | .973 |",
                         "see `x=7` and [a](b/9.json) 37% (Wang et al. 2017), 1.5x the `1.15x` aimed at"])
    assert [n + p for n, p in NUMBER.findall(text)] == ["2,814", ".973", "37%", "1.5"]
