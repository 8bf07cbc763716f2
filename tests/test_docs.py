"""What the README and the docs say stays true: every `tests/test_x.py::test_name` they name is a test
in that file, every script and file they name is there, every relative link and picture resolves,
and every command line they give a program (`python sae.py ...`, under torchrun, through
`sbatch train.slurm`) parses against that program's flags of today, without running it."""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import glob
import importlib
import os
import re
import shlex
import tempfile

import pytest

from conftest import ROOT

PAGES = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "DEVELOPERS.md"),
         *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# What users read, whose commands and links must hold (DEVELOPERS.md is the contributors' and cites tests).
USER_PAGES = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "CHANGELOG.md"),
              *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def cited(pattern: str, pages=PAGES) -> list[tuple[str, str]]:
    """(page, match) for every match of `pattern` in the pages."""
    found = []
    for page in pages:
        text = open(page).read()
        found += [(os.path.relpath(page, ROOT), m) for m in re.findall(pattern, text)]
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
    references = cited(r"`((?:tests|bench|sweeps|notebooks|plumbing|interop|saes)/[\w/]+\.(?:py|yaml|sh|ipynb|txt))")
    assert len(references) > 20
    missing = [f"{page}: {path}" for page, path in references if not os.path.isfile(os.path.join(ROOT, path))]
    assert not missing, "cited but not found:\n" + "\n".join(missing)


# ---------------------------------------------------------------- links and pictures


def _outside_code(text: str) -> list[str]:
    """The page's lines that are not inside a fenced code block."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(page: str):
    """The #anchors GitHub makes of a page's headings (lower case, punctuation but - and _ dropped,
    spaces to hyphens, a repeated one numbered)."""
    seen: dict[str, int] = {}
    for line in _outside_code(open(page).read()):
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_every_relative_link_and_picture_resolves():
    broken, checked = [], 0
    for page in USER_PAGES:
        for line in _outside_code(open(page).read()):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):  # https:, mailto:
                    continue
                checked += 1
                path, _, anchor = target.partition("#")
                resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
                where = f"{os.path.relpath(page, ROOT)}: ({target})"
                if not os.path.exists(resolved):
                    broken.append(f"{where}: {os.path.relpath(resolved, ROOT)} does not exist")
                elif anchor and resolved.endswith(".md") and anchor not in set(anchors(resolved)):
                    broken.append(f"{where}: no heading #{anchor} in {os.path.relpath(resolved, ROOT)}")
    assert checked > 30
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_links_every_docs_page_and_the_docs_show_every_picture():
    readme = open(os.path.join(ROOT, "README.md")).read()
    linked = {os.path.normpath(t.partition("#")[0]) for t in LINK.findall(readme)}
    pages = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    assert len(pages) >= 10
    assert not [p for p in pages if p not in linked], "docs pages the README does not link"
    shown = {os.path.basename(t) for page in USER_PAGES for t in LINK.findall(open(page).read())}
    pictures = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "docs", "*.png"))}
    assert not sorted(pictures - shown), "pictures in docs/ that no page shows"


# ---------------------------------------------------------------- command lines

PROGRAMS = ("train", "sample", "interp", "activations", "sae", "lens", "sweep", "prepare", "export")
PLACEHOLDERS = {"...", "…", "ARGS", "FLAGS", "[FLAGS]"}  # an elided part of a command
SEPARATORS = {"&&", "||", ";", "|", "do", "then"}


def command_lines(page: str) -> list[tuple[int, str, str | None]]:
    """(line number, text, the `error:` line printed right after it or None) for every line of a shell
    code block (lines continued with a backslash joined) and every inline code span outside code
    blocks (one may run over a line break)."""
    found, fence, prose, lines = [], None, [], open(page).read().splitlines()

    def spans():  # the inline code of the prose lines gathered since the last code block
        text = "\n".join(line for _, line in prose)
        for match in re.finditer(r"`([^`]+)`", text):
            found.append((prose[0][0] + text.count("\n", 0, match.start()), match.group(1).replace("\n", " "), None))
        prose.clear()

    i = 0
    while i < len(lines):
        line, number = lines[i], i + 1
        if line.lstrip().startswith("```"):
            if fence is None:
                spans()
            fence = None if fence is not None else line.strip()[3:].strip()
        elif fence is None:
            prose.append((number, line))
        elif fence not in ("python", "json", "yaml"):
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i].strip()
            following = lines[i + 1] if i + 1 < len(lines) else ""
            found.append((number, line, following if following.startswith("error:") else None))
        i += 1
    if prose:
        spans()
    return found


def without_comment(text: str) -> str:
    """A shell line up to its `# comment` (a # that starts a word outside quotes)."""
    quote = None
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i]
    return text


def program_invocations(text: str) -> list[tuple[str, list[str]]]:
    """(program, its arguments) for each program this shell line runs: `python X.py ...`, `torchrun
    [its flags] X.py ...`, `[TINYLAB_PROGRAM=X.py] sbatch [its flags] train.slurm ...` and `sbatch
    sweeps/slurm_agent.sh FILE.yaml ...` (a sweep agent). `<run>`-style placeholders stand for one
    value, a trailing `...` for what was left out, and a `# comment` ends the line."""
    text = re.sub(r"^\s*\$\s+", "", text)
    text = re.sub(r"<[^<>`]*>", "X", without_comment(text))  # runs/<run>, <job name>-<job id>
    try:
        words = shlex.split(text)
    except ValueError:  # an unbalanced quote: prose, not a command
        return []
    segments, current = [], []
    for token in words:
        if token in SEPARATORS:
            segments.append(current)
            current = []
        elif token.endswith(";"):
            segments.append(current + [token[:-1]])
            current = []
        else:
            current.append(token)
    segments.append(current)

    found = []
    for seg in segments:
        names = [os.path.basename(t) for t in seg]
        program, args = None, []
        for i, name in enumerate(names):
            before = names[:i]
            if name in {f"{p}.py" for p in PROGRAMS} and seg[i] in (name, f"./{name}") and before and (
                    re.fullmatch(r"python3?", before[-1]) or "torchrun" in before):
                program, args = name[:-3], seg[i + 1:]
                break
            if name == "train.slurm" and "sbatch" in before:
                chosen = [t.split("=", 1)[1] for t in seg[:i] if t.startswith("TINYLAB_PROGRAM=")]
                program, args = (chosen[0] if chosen else "train.py")[:-3], seg[i + 1:]
                break
            if name == "slurm_agent.sh" and "sbatch" in before:
                if i + 1 < len(seg) and seg[i + 1].endswith(".yaml"):
                    program, args = "sweep", seg[i + 1:]
                break  # otherwise a W&B sweep id: `wandb agent` runs it
        if program is None:
            continue
        cleaned = []
        for token in args:
            if token in PLACEHOLDERS:
                if cleaned and cleaned[-1].startswith("--") and "=" not in cleaned[-1]:
                    cleaned.append("1")  # `--text_run …`: the flag's value was elided
                continue
            cleaned.append(token)
        found.append((program, cleaned))
    return found


def _prog_of(call: ast.Call) -> str:
    return call.args[2].value if len(call.args) > 2 and isinstance(call.args[2], ast.Constant) else ""


@dataclasses.dataclass
class Parser:
    """How a program (or one of its subcommands) reads its arguments: a settings class and
    config.parse_flags, train.py's config.parse_config, or a fixed grammar for the small hand-parsed
    subcommands."""
    settings: type | None = None
    positional: str | tuple = ""
    prog: str = ""
    grammar: object = None


def _grammar(usage: str, positionals: int, flags: dict[str, object]):
    """A checker for a hand-parsed subcommand: `positionals` bare arguments, and each flag in `flags`
    with one value that must satisfy its predicate."""
    def check(args):
        import config
        bare = []
        rest = list(args)
        while rest:
            token = rest.pop(0)
            if token.startswith("-"):
                if token not in flags or not rest:
                    raise config.ConfigError(f"{token}: not a flag of {usage}")
                value = rest.pop(0)
                if not flags[token](value):
                    raise config.ConfigError(f"{token}: {value!r} is not a value it takes ({usage})")
            else:
                bare.append(token)
        if len(bare) != positionals:
            raise config.ConfigError(f"{len(bare)} bare arguments where {usage} takes {positionals}")
    return check


# Subcommands each program's main() reads by hand rather than through a settings class.
HAND_PARSED = {
    ("sae", "report"): _grammar("sae.py report DIR [--model RUN_OR_MODEL] [--data_path CORPUS]", 1,
                                {"--model": bool, "--data_path": bool}),
    ("sae", "replacement"): _grammar("sae.py replacement DIR [--data_path CORPUS]", 1, {"--data_path": bool}),
    ("sae", "export"): _grammar("sae.py export DIR --to saelens|circuit-tracer OUT", 2,
                                {"--to": lambda v: v in ("saelens", "circuit-tracer")}),
    ("lens", "eval"): _grammar("lens.py eval DIR [--data_path CORPUS]", 1, {"--data_path": bool}),
    ("sweep", "report"): _grammar("sweep.py report DIR [--study NAME] [--top N]", 1,
                                  {"--study": bool, "--top": lambda v: v.isdigit() and int(v) >= 1}),
}


def parsers(program: str) -> dict[str, Parser]:
    """The program's parsers by subcommand ("" for the bare command), found in its source: each
    `parse_flags(Settings, argv, "prog[ sub]", ..., positional=...)` call, with Settings taken from the
    imported module (importing a program runs nothing: each guards its main)."""
    if program == "train":
        return {"": Parser(prog="train.py")}
    source = open(os.path.join(ROOT, f"{program}.py")).read()
    module = importlib.import_module(program)
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "parse_flags":
            words = _prog_of(node).split()
            positional = next((ast.literal_eval(k.value) for k in node.keywords if k.arg == "positional"), "")
            found[words[1] if len(words) > 1 else ""] = Parser(getattr(module, node.args[0].id), positional,
                                                             " ".join(words))
    for (name, sub), grammar in HAND_PARSED.items():
        if name == program:
            found[sub] = Parser(grammar=grammar)
    assert found, f"{program}.py: no parse_flags call found; tell tests/test_docs.py how it reads its flags"
    return found


@contextlib.contextmanager
def _scratch_folder(args: list[str]):
    """A scratch working folder where every path-like argument exists as an empty folder, so that a
    program's check that `runs/<run>` exists passes and the checks after it run too."""
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        for token in args:
            value = token.split("=", 1)[-1]
            if "/" in value and not value.startswith(("-", "/")) and ".." not in value:
                path = os.path.join(scratch, value)
                if value.endswith(".json"):  # --config runs/<run>/config.json: a config with no keys
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "w") as f:
                        f.write("{}")
                else:
                    os.makedirs(path, exist_ok=True)
        os.chdir(scratch)
        try:
            yield
        finally:
            os.chdir(here)


def parse(program: str, args: list[str], table: dict[str, Parser]) -> None:
    """Parses `args` as `program` would, validation included; raises config.ConfigError when it would
    refuse them. Runs nothing."""
    import config
    sub = args[0] if args and args[0] in table and args[0] else ""
    if sub == "" and "" not in table:
        raise config.ConfigError(f"{program}.py needs a command: {', '.join(sorted(table))}")
    parser, rest = table[sub], args[1:] if sub else args
    with _scratch_folder(rest):
        if parser.grammar:
            parser.grammar(rest)
        elif program == "train":
            config.parse_config(rest)
        else:
            config.parse_flags(parser.settings, rest, parser.prog, "", positional=parser.positional)


def documented_commands():
    """(where, program, arguments, the documented error or None) for every command line in the pages."""
    for page in sorted(set(USER_PAGES)):
        for number, text, error in command_lines(page):
            for program, args in program_invocations(text):
                yield f"{os.path.relpath(page, ROOT)}:{number}", program, args, error


def test_every_documented_command_line_parses_against_todays_flags():
    import config
    tables = {program: parsers(program) for program in PROGRAMS}
    refused, counts = [], dict.fromkeys(PROGRAMS, 0)
    for where, program, args, error in documented_commands():
        if "--help" in args or "-h" in args:
            continue
        counts[program] += 1
        try:
            parse(program, args, tables[program])
        except config.ConfigError as e:
            message = f"error: {e}"
            if error is None:
                refused.append(f"{where}: python {program}.py {shlex.join(args)}\n    {message}")
            elif message != error:  # a documented refusal must read as the program writes it
                refused.append(f"{where}: python {program}.py {shlex.join(args)}\n    documented: {error}\n"
                               f"    today:      {message}")
        except SystemExit as e:  # argparse's own exit (it should raise ConfigError)
            refused.append(f"{where}: python {program}.py {shlex.join(args)}: exit {e.code}")
    print("command lines parsed per program:", counts)
    assert all(counts[p] >= 1 for p in PROGRAMS), f"a program no page runs: {counts}"
    assert sum(counts.values()) > 60
    assert not refused, "documented commands today's flags refuse:\n" + "\n".join(refused)


def test_the_command_check_catches_a_flag_that_does_not_exist():
    """The check above is not vacuous: a made-up flag, a bad value or a missing subcommand is refused
    for every program."""
    import config
    tables = {program: parsers(program) for program in PROGRAMS}
    assert program_invocations("$ torchrun --nproc_per_node=2 sae.py runs/<run> --arch topk ...  # all ranks") == [
        ("sae", ["runs/X", "--arch", "topk"])]
    assert program_invocations("TINYLAB_PROGRAM=lens.py sbatch --nodes=2 train.slurm runs/<run> --layer 1") == [
        ("lens", ["runs/X", "--layer", "1"])]
    for program in PROGRAMS:
        prefix = {"activations": ["dump", "runs/x", "--hook", "h"], "export": ["runs/x", "out"],
                  "sweep": ["sweeps/grok_lr.yaml"], "prepare": []}.get(program, ["runs/x"] if program != "train" else [])
        with pytest.raises(config.ConfigError, match="no_such_flag"):
            parse(program, prefix + ["--no_such_flag", "1"], tables[program])
    with pytest.raises(config.ConfigError):
        parse("sae", ["runs/x", "--hook", "h", "--arch", "no_such_arch"], tables["sae"])
    with pytest.raises(config.ConfigError):
        parse("sae", ["export", "runs/x/sae/s", "--to", "onnx", "out"], tables["sae"])
    with pytest.raises(config.ConfigError):
        parse("activations", ["runs/x", "--hook", "h"], tables["activations"])
    with pytest.raises(config.ConfigError):
        parse("train", ["--lr", "fast"], tables["train"])


# ---------------------------------------------------------------- names in code

# Modules whose `module.name` the pages give, and how a file name looks (`config.json`, `sae.py`).
MODULES = r"(?:config|data|optimizer|fourier|utils|interp|activations|sae|lens|sweep|export|sample|prepare|train" \
          r"|(?:plumbing|interop|saes)\.\w+)"
FILE_ENDINGS = {"py", "json", "jsonl", "pt", "md", "png", "txt", "log", "yaml", "html", "npy", "bin", "slurm"}


def test_every_module_name_and_python_import_in_the_docs_exists():
    """`saes.metrics.modern_metrics`, `config.OptimConfig` and the `from X import a, b` lines of the
    pages' Python examples name what the code has today (modules move; their names in prose must follow)."""
    names = []
    for page in USER_PAGES:
        where = os.path.relpath(page, ROOT)
        text = open(page).read()
        for dotted in re.findall(rf"`({MODULES}\.[A-Za-z_]\w*)(?:\(|`)", text):
            module, _, name = dotted.rpartition(".")
            if name not in FILE_ENDINGS:
                names.append((where, module, name))
        for module, imported in re.findall(r"^from ([\w.]+) import (.+)$", text, re.M):
            names += [(where, module, name.strip()) for name in imported.split(",")]
    assert len(names) > 10
    missing = []
    for where, module, name in names:
        try:
            if not hasattr(importlib.import_module(module), name):
                missing.append(f"{where}: {module}.{name}")
        except ImportError as e:
            missing.append(f"{where}: {module}.{name} ({e})")
    assert not missing, "named in the docs but not in the code:\n" + "\n".join(missing)
