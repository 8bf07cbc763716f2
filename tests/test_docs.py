"""What the README and the docs cite as evidence exists: every `tests/test_x.py::test_name` they name is
a test in that file, and every script they name is there."""
from __future__ import annotations

import glob
import os
import re

from conftest import ROOT

PAGES = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "DEVELOPERS.md"),
         *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def cited(pattern: str) -> list[tuple[str, str]]:
    """(page, match) for every match of `pattern` in the pages."""
    found = []
    for page in PAGES:
        text = open(page).read()
        found += [(os.path.basename(page), m) for m in re.findall(pattern, text)]
    return found


def test_every_test_the_docs_cite_exists():
    references = cited(r"(tests/test_\w+\.py)::(test_\w+)")
    assert len(references) > 20  # the README names its tests
    missing = []
    for page, (path, name) in references:
        source = os.path.join(ROOT, path)
        if not os.path.isfile(source) or not re.search(rf"^def {name}\(", open(source).read(), re.M):
            missing.append(f"{page}: {path}::{name}")
    assert not missing, "cited but not found:\n" + "\n".join(missing)


def test_every_file_the_docs_cite_exists():
    missing = [f"{page}: {path}" for page, path in cited(r"`((?:tests|bench)/\w+\.py)")
               if not os.path.isfile(os.path.join(ROOT, path))]
    assert not missing, "cited but not found:\n" + "\n".join(missing)
