"""activations.py: dumps on disk and the live buffer give the same rows; a dump survives being
interrupted and splits across torchrun ranks; bad input fails with one clear line."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from analysis.sources import DumpConfig, DumpSource, LiveSource, dump
from config import ConfigError
from conftest import run_bad_input, run_torchrun
from analysis.runs import load_run

HOOK = "blocks.0.mlp.hook_post"


def dump_to(run_dir, out, **settings) -> str:
    return dump(DumpConfig(run_dir=run_dir, hook=settings.pop("hook", HOOK), out=str(out), **settings).validate(),
                log=lambda *a: None)


def read_dump(directory) -> dict:
    """{(sequence, position): activation row} of a whole dump."""
    source = DumpSource(str(directory), batch_size=1, device="cpu")
    everything = source.rows(torch.arange(source.num_rows))
    return {tuple(w): row for w, row in zip(source.where.tolist(), everything)}


@pytest.mark.slow
@pytest.mark.parametrize("task,positions", [("modular", "answer"), ("text", "all"), ("dyck", "all")])
def test_dump_and_live_source_give_the_same_rows(tmp_path, trained_runs, task, positions):
    shard_rows = 30 if task == "modular" else 1000  # several shards either way
    out = dump_to(trained_runs[task], tmp_path / "dump", positions=positions, shard_rows=shard_rows)
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    assert manifest["complete"] and manifest["num_shards"] > 1
    assert manifest["num_rows"] == sum(manifest["rows_per_shard"])
    dumped = read_dump(out)
    tokens = np.load(os.path.join(out, "tokens.npy"))
    if task == "modular":  # one row per example, at "="
        assert {p for _, p in dumped} == {2} and len(dumped) == len(tokens)
    if task == "dyck":  # padding (token 0) is never taken
        assert all(tokens[s, p] != 0 for s, p in dumped) and len(dumped) == int((tokens != 0).sum())

    run = load_run(trained_runs[task], device="cpu")
    live = LiveSource(run, HOOK, positions, "train", batch_size=64, buffer_rows=256, seed=3)
    seen = set()
    for step in range(12):  # past the first refill
        batch = live.batch(step)
        for s, p, row in zip(batch.sequence.tolist(), batch.position.tolist(), batch.acts):
            assert torch.allclose(row, dumped[(s, p)], atol=1e-5), (s, p)
            seen.add((s, p))
    if task == "modular":  # 87 rows: the buffer holds each several times
        assert len(seen) == len(dumped)
    else:  # fewer rows served than the split holds: none twice
        assert len(seen) == 12 * 64
    # Shuffled: consecutive rows rarely come from the same sequence.
    first = live.batch(12).sequence
    assert (first[1:] == first[:-1]).float().mean() < 0.2

    # Its state holds only the rows still to be served, as compact copies, and a source restored
    # from it serves exactly what the original does, across refills.
    state = live.state_dict()
    unserved = state["unserved"][0]
    assert len(unserved) == live.capacity - live.served and unserved.untyped_storage().nbytes() == unserved.numel() * 4
    restored = LiveSource(run, HOOK, positions, "train", batch_size=64, buffer_rows=256, seed=3)
    restored.load_state_dict(state)
    for step in range(13, 23):
        assert torch.equal(restored.batch(step).acts, live.batch(step).acts)


def test_dump_source_batches_are_a_function_of_seed_and_step_and_split_across_ranks(tmp_path, trained_runs):
    out = dump_to(trained_runs["modular"], tmp_path / "dump")
    one = DumpSource(out, batch_size=32, device="cpu", seed=1)
    ranks = [DumpSource(out, batch_size=32, device="cpu", seed=1, rank=r, world=2) for r in range(2)]
    for step in (0, 5, 1000):  # 1000 is many epochs on: a fresh order each epoch
        whole = one.batch(step)
        halves = [source.batch(step) for source in ranks]
        assert torch.equal(torch.cat([h.acts for h in halves]), whole.acts)
        assert torch.equal(torch.cat([h.sequence for h in halves]), whole.sequence)
    assert not torch.equal(one.batch(0).sequence, one.batch(one.num_rows // 32).sequence)
    small = DumpSource(out, batch_size=32, device="cpu", seed=1, in_memory_bytes=0)  # read through the memmaps
    assert torch.equal(small.batch(7).acts, one.batch(7).acts)


def test_an_interrupted_dump_finishes_what_is_missing(tmp_path, trained_runs):
    reference = dump_to(trained_runs["text"], tmp_path / "reference", shard_rows=200)
    out = dump_to(trained_runs["text"], tmp_path / "cut", shard_rows=200)
    # What a killed dump leaves: some shards written, the manifest not yet marked complete.
    manifest_path = os.path.join(out, "manifest.json")
    manifest = json.loads(open(manifest_path).read())
    assert manifest["num_shards"] >= 3
    manifest["complete"] = False
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    for k in (1, manifest["num_shards"] - 1):
        os.remove(os.path.join(out, f"acts-{k:05d}.npy"))
    kept = os.path.join(out, "acts-00000.npy")
    before = os.stat(kept).st_mtime_ns
    with pytest.raises(ConfigError, match="incomplete"):
        DumpSource(out, batch_size=8, device="cpu")

    messages = []
    dump(DumpConfig(run_dir=trained_runs["text"], hook=HOOK, out=out, shard_rows=200).validate(), log=messages.append)
    assert any(f"{manifest['num_shards'] - 2} of {manifest['num_shards']} shards" in m for m in messages), messages
    assert os.stat(kept).st_mtime_ns == before  # done shards are not recomputed
    a, b = read_dump(out), read_dump(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow
def test_two_ranks_write_the_same_dump_as_one_process(tmp_path, trained_runs):
    one = dump_to(trained_runs["modular"], tmp_path / "one", shard_rows=40)
    result = run_torchrun(["dump", trained_runs["modular"], "--hook", HOOK, "--out", str(tmp_path / "two"),
                           "--shard_rows", "40"], cwd=str(tmp_path), script="activations.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done:") == 1  # rank 0 speaks for both
    a, b = read_dump(one), read_dump(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.allclose(a[key], b[key], atol=1e-6) for key in a)


@pytest.mark.slow
def test_an_existing_dump_of_something_else_is_never_overwritten(tmp_path, trained_runs):
    out = dump_to(trained_runs["modular"], tmp_path / "dump")
    result = run_bad_input("activations.py", ["dump", trained_runs["modular"], "--hook", HOOK, "--out", out,
                                              "--positions", "all"], tmp_path, watch=[trained_runs["modular"]])
    assert re.search("--out: .* another positions", result.stderr)
    dump_to(trained_runs["modular"], out, positions="all", overwrite=True)
    assert json.loads(open(os.path.join(out, "manifest.json")).read())["positions"] == "all"


@pytest.mark.parametrize("args,message", [
    (["--hook", "blocks.0.mlp.hook_pots"], "--hook: this model has no hook point 'blocks.0.mlp.hook_pots'; did you"),
    (["--hook", "blocks.0.attn.hook_pattern"], "--hook: blocks.0.attn.hook_pattern is [batch, head, query, key]"),
    (["--hook", HOOK, "--split", "test"], "--split: 'test' is not one of train, val"),
    (["--hook", HOOK, "--shard_row", "5"], "unknown flag --shard_row; did you mean --shard_rows?"),
    ([], "--hook: name the hook point"),
])
@pytest.mark.slow
def test_bad_input_names_the_flag_and_writes_nothing(tmp_path, trained_runs, args, message):
    """As a user meets it: `python activations.py dump RUN ARGS` exits 2 with one line that starts with
    the message, and writes nothing (no <run>/activations, nothing in the working folder or the cache)."""
    result = run_bad_input("activations.py", ["dump", trained_runs["modular"], *args], tmp_path,
                           watch=[trained_runs["modular"]])
    assert result.stderr.startswith(f"error: {message}")
    assert not os.path.exists(os.path.join(trained_runs["modular"], "activations"))


@pytest.mark.slow
def test_a_missing_run_is_refused(tmp_path):
    result = run_bad_input("activations.py", ["dump", str(tmp_path / "nope"), "--hook", HOOK], tmp_path)
    assert re.search("does not exist|holds no", result.stderr)
    assert not os.path.exists(tmp_path / "nope")


def test_a_folder_without_a_manifest_is_not_a_dump(tmp_path):
    with pytest.raises(ConfigError, match="no manifest.json"):
        DumpSource(str(tmp_path), batch_size=8, device="cpu")
