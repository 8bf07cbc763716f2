"""TransformerLens 3 (HookedTransformer) in a second virtualenv. The main environment has the newest
TransformerLens (4, TransformerBridge); SAELens and older notebooks still need 3, and one environment
cannot hold both. The second one, `.venv-tl3/` beside the checkout, is built on first use: a
virtualenv whose .pth file adds this environment's site-packages (torch, transformers and the rest
are shared, nothing is downloaded twice) with TransformerLens 3 installed in its own site-packages,
which come first. test_transformer_lens.py then runs there as it runs here."""

from __future__ import annotations

import os
import subprocess

import pytest

from harness import overlay_venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ["transformer_lens>=3,<4", "better-abc>=0.0.3"]  # what 3 needs beyond what 4 needs


def overlay_python() -> str:
    """The second virtualenv's python, built if it is not there yet (tests/overlay_venv.py)."""
    python, why_not = overlay_venv.overlay_python(".venv-tl3", PACKAGES)
    if python is None:
        pytest.skip(why_not)
    return python


@pytest.mark.slow
def test_the_transformer_lens_tests_pass_with_version_3_in_its_own_virtualenv():
    python = overlay_python()
    version = subprocess.run([python, "-c", "from importlib.metadata import version; print(version('transformer_lens'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    assert version.startswith("3."), version
    result = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_transformer_lens.py"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], result.stdout[-500:]
