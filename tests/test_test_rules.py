"""The rules tests/conftest.py sets for every test, checked on a throwaway test file run by a real
pytest in a subprocess: skips end in one summary line with their reasons, and under CI=true a skip
is a failure."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()
TESTS = """
import pytest

def test_missing_piece():
    pytest.skip("no frobnicator here")

def test_missing_module():
    pytest.importorskip("a_module_that_is_not_installed")

def test_runs():
    assert True
"""


def _run(pytester, monkeypatch, ci: str | None):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_rules=TESTS)
    return pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")


def test_skips_are_summed_up_in_one_line(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, None)
    result.assert_outcomes(passed=1, skipped=2)
    lines = [line for line in result.outlines if line.startswith("skipped 2: ")]
    assert len(lines) == 1
    assert "1 because no frobnicator here" in lines[0] and "a_module_that_is_not_installed" in lines[0]


def test_under_ci_nothing_skips(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, "true")
    result.assert_outcomes(passed=1, failed=2)
    assert "skipped under CI=true, where nothing may skip: no frobnicator here" in result.stdout.str()
