"""Under CI a skip fails the run unless tests/allowed_skips.txt lets its reason through (tests/ci_skips.py)."""
from __future__ import annotations

import pytest

import ci_skips

pytest_plugins = ["pytester"]

SUITE = """
import pytest

def test_runs():
    pass

def test_needs_a_tool():
    pytest.skip("no frobnicator here (apt-get install frobnicator)")

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_known_bug():
    assert False
"""


def run_suite(pytester, monkeypatch, ci: str, allowed: str = "", module_skip: bool = False):
    pytester.makepyfile(test_suite=SUITE)
    if module_skip:
        pytester.makepyfile(test_optional="import pytest\npytest.importorskip('no_such_package_here')\n"
                                          "def test_never():\n    pass\n")
    allowed_file = pytester.path / "allowed.txt"
    allowed_file.write_text(allowed)
    monkeypatch.setattr(ci_skips, "ALLOWED_FILE", str(allowed_file))
    pytester.makeconftest("pytest_plugins = ['ci_skips']\n")
    monkeypatch.setenv("CI", ci)
    return pytester.runpytest_inprocess("-p", "no:cacheprovider")


def test_a_skip_passes_outside_ci(pytester, monkeypatch):
    result = run_suite(pytester, monkeypatch, "")
    result.assert_outcomes(passed=1, skipped=1, xfailed=1)


def test_a_skip_fails_in_ci_naming_its_reason(pytester, monkeypatch):
    result = run_suite(pytester, monkeypatch, "true")
    result.assert_outcomes(passed=1, failed=1, xfailed=1)
    result.stdout.fnmatch_lines(["*skipped in CI: no frobnicator here (apt-get install frobnicator)*"])
    assert result.ret == 1


def test_an_allowed_reason_passes_in_ci(pytester, monkeypatch):
    result = run_suite(pytester, monkeypatch, "true", "# comment\nno frobnicator here # CI's machine has no frobnicator\n")
    result.assert_outcomes(passed=1, skipped=1, xfailed=1)
    assert result.ret == 0


def test_a_module_skip_fails_ci_at_collection(pytester, monkeypatch):
    assert run_suite(pytester, monkeypatch, "", module_skip=True).ret == 0
    result = run_suite(pytester, monkeypatch, "true", module_skip=True)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*skipped in CI: could not import 'no_such_package_here'*"])


def test_an_allowed_skip_must_say_why(tmp_path):
    path = tmp_path / "allowed.txt"
    path.write_text("no frobnicator here\n")
    with pytest.raises(pytest.UsageError, match="needs ' # why"):
        ci_skips.allowed_reasons(str(path))
    path.write_text("# only comments\n\n")
    assert ci_skips.allowed_reasons(str(path)) == []


def test_the_repository_allows_no_skip_without_a_reason():
    for reason in ci_skips.allowed_reasons():
        assert reason, "an empty entry would let every skip through"
