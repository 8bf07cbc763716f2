"""The house's arrows point down (docs/layout.md): a module imports only from its own floor or the
floors below it, and nothing imports a program. Every import counts, at the top of a file or inside
a function, so an import moved into a function to dodge a cycle is caught too."""

from __future__ import annotations

import ast
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = {"train", "sae", "lens", "interp", "sample", "prepare", "export", "sweep", "activations"}
FLOORS = [  # bottom up
    {"config", "utils"},
    {"plumbing"},
    {"model", "data", "tasks", "optimizer", "fourier"},
    {"analysis", "saes", "interop"},
    PROGRAMS,
]


def floor_of(module: str) -> int | None:
    top = module.split(".")[0]
    return next((i for i, names in enumerate(FLOORS) if top in names), None)


def project_modules() -> dict[str, str]:
    """module name -> path, for every tracked .py file outside tests/, bench/ and notebooks."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    return {path[:-3].replace("/", ".").removesuffix(".__init__"): path for path in files
            if not path.startswith(("tests/", "bench/", "notebooks/", "sweeps/"))}


def imports_of(path: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(open(os.path.join(ROOT, path)).read())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from saes import relu`
    return found


def violations(modules: dict[str, str]) -> list[str]:
    wrong = []
    for module, path in sorted(modules.items()):
        here = floor_of(module)
        assert here is not None, f"{path} stands on no floor: add it to FLOORS (and docs/layout.md)"
        for name in sorted(imports_of(path)):
            there = floor_of(name)
            if there is None or name.split(".")[0] == module.split(".")[0] and here != len(FLOORS) - 1:
                continue  # another library, or the module's own package
            if name.split(".")[0] in PROGRAMS and name.split(".")[0] != module:
                wrong.append(f"{path} imports the program {name.split('.')[0]}.py")
            elif there > here:
                wrong.append(f"{path} (floor {here}) imports {name.split('.')[0]} (floor {there})")
    return sorted(set(wrong))


def test_every_import_points_down_and_nothing_imports_a_program():
    modules = project_modules()
    assert {"train", "analysis.runs", "saes.base", "plumbing.session", "tasks.modular"} <= set(modules)
    assert violations(modules) == []


def test_the_check_sees_an_upward_import_and_a_program_imported(tmp_path, monkeypatch):
    """Not vacuous: a task that imports the analysis package, and a library that imports interp.py, are
    both reported, also from inside a function."""
    os.makedirs(tmp_path / "tasks")
    (tmp_path / "tasks" / "bad.py").write_text("def f():\n    from analysis.runs import load_run\n")
    (tmp_path / "fourier.py").write_text("import interp\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    found = violations({"tasks.bad": "tasks/bad.py", "fourier": "fourier.py"})
    assert found == ["fourier.py imports the program interp.py",
                     "tasks/bad.py (floor 2) imports analysis (floor 3)"]
