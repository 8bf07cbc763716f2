"""`python activations.py dump`: a trained run's activations at one hook point, written to disk in
memory-mappable shards for sparse autoencoders (sae.py --source dump), lenses and probes.

    python activations.py dump runs/<run> --hook blocks.0.mlp.hook_post            # train split
    python activations.py dump runs/<run> --hook blocks.0.mlp.hook_post --split val
    torchrun --nproc_per_node=8 activations.py dump runs/<run> --hook blocks.3.hook_resid_post

The dump lands in `<run>/activations/<hook>/<split>-<positions>/` and picks up where it stopped when
interrupted. `--positions answer` takes the positions the task's loss reads, `all` every position
that holds a token. The format, and the sources that read it, are in analysis/sources.py.
"""

from __future__ import annotations

import sys

# The library behind this program is analysis/runs.py and analysis/sources.py; the names below are
# re-exported so that what imported them from here (`from activations import load_run`) still runs.
from analysis.runs import (POSITIONS, SPLITS, ActivationBatch, Run, Sequences, capture, capture_all,  # noqa: F401
                           encode_exactly, hook_width, load_run, open_pretrained, rows_of, run_folder,
                           split_sequences, token_names)
from analysis.sources import DumpConfig, DumpSource, LiveSource, TokenSource, default_dump_dir, dump  # noqa: F401
from config import ConfigError, parse_flags
from plumbing.session import run_command


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\ncommands: dump (see `python activations.py dump --help`)")
        return ""
    command, rest = argv[0], argv[1:]
    if command != "dump":
        raise ConfigError(f"unknown command {command!r}; the command is `dump`: "
                          f"python activations.py dump RUN --hook NAME")
    settings, _ = parse_flags(DumpConfig, rest, "activations.py dump",
                              "Dump a run's activations at one hook point to sharded .npy files.",
                              positional="run_dir")
    return dump(settings)


if __name__ == "__main__":
    run_command(main)
