"""Under CI (the environment variable CI set to true, as `.ci/run` and every CI service set it), a
skipped test fails: a green run must mean every test ran. A skip is let through only when its reason
starts with an entry of tests/allowed_skips.txt, which says why that test cannot run on CI's machine.

A skip raised while collecting a file (a module-level `pytest.importorskip`, say) is a collection
error under CI, which stops the run at once: a missing package is an install step that failed.
Loaded by conftest.py (`pytest_plugins`); tests/test_ci_skips.py runs it on a small suite of its own.
"""
from __future__ import annotations

import os

import pytest

ALLOWED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "allowed_skips.txt")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def allowed_reasons(path: str | None = None) -> list[str]:
    """The reasons a skip may give in CI: every line of the file (ALLOWED_FILE unless given) that is
    not blank or a comment, up to its ` # why` note (each entry must carry one)."""
    path = path or ALLOWED_FILE
    reasons = []
    if not os.path.isfile(path):
        return reasons
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            reason, sep, why = line.partition(" # ")
            if not sep or not why.strip():
                raise pytest.UsageError(f"{path}:{number}: an allowed skip needs ' # why it cannot run in CI'")
            reasons.append(reason.strip())
    return reasons


def skip_reason(report) -> str:
    """The reason a skip report gives (pytest keeps it as (file, line, 'Skipped: reason'))."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _refused(report) -> str | None:
    """Why this skip fails CI, or None when it does not (not a skip, an expected failure, or allowed)."""
    if not (in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return None
    reason = skip_reason(report)
    if any(reason.startswith(allowed) for allowed in allowed_reasons()):
        return None
    return (f"skipped in CI: {reason}\n(a skip fails CI unless its reason is in tests/allowed_skips.txt "
            "with why it cannot run on CI's machine; install what it needs instead)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    refused = _refused(report)
    if refused:
        report.outcome, report.longrepr = "failed", refused


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    refused = _refused(report)
    if refused:
        report.outcome, report.longrepr = "failed", refused
