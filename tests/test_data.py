import json
import os

import numpy as np
import pytest
import torch

from config import Config, ConfigError
from conftest import SMALL_CORPUS, TIKTOKEN_CACHE
from data import IGNORE, build_data
from tasks.dyck import DyckData, generate_dyck
from tasks.modular import ModularData
from tasks.text import TextData
from plumbing.distributed import Dist

CPU = torch.device("cpu")


def modular(**overrides):
    return ModularData(Config(**{"modulus": 23, **overrides}), Dist(), CPU)


# ---------------------------------------------------------------- modular


@pytest.mark.parametrize("operation", ["add", "subtract", "multiply", "divide"])
def test_modular_answers_and_split(operation):
    p = 23
    data = modular(operation=operation)
    n = p * (p - 1) if operation == "divide" else p * p
    assert len(data.train_x) + len(data.val_x) == n
    assert len(data.train_x) == round(0.3 * n)
    assert data.train_x.shape[1] == 3 and data.train_y.shape[1] == 1 and data.loss_positions == 1
    assert (data.train_x[:, 2] == p).all() and data.vocab_size == p + 1
    for x, y in ((data.train_x, data.train_y), (data.val_x, data.val_y)):
        a, b, c = x[:, 0], x[:, 1], y[:, 0]
        if operation == "add":
            assert ((a + b) % p == c).all()
        elif operation == "subtract":
            assert ((a - b) % p == c).all()
        elif operation == "multiply":
            assert ((a * b) % p == c).all()
        else:
            assert (b != 0).all() and ((c * b) % p == a).all()


def test_modular_split_is_deterministic_disjoint_and_seeded():
    first, again, other = modular(), modular(), modular(seed=1)
    pairs = lambda x: {(int(a), int(b)) for a, b, _ in x.tolist()}
    assert torch.equal(first.train_x, again.train_x) and torch.equal(first.val_x, again.val_x)
    assert not pairs(first.train_x) & pairs(first.val_x)
    assert pairs(first.train_x) != pairs(other.train_x)


def test_full_batch_when_batch_size_zero_or_large():
    for batch_size in (0, 10_000):
        data = modular(batch_size=batch_size)
        batches, num_targets = data.train_batches(5)
        assert len(batches) == 1 and num_targets == len(data.train_x)
        assert torch.equal(batches[0][0], data.train_x)


def test_minibatches_cover_an_epoch_and_depend_only_on_step():
    data = modular(batch_size=16)
    per_epoch = data.steps_per_epoch()
    seen = torch.cat([data.train_batches(s)[0][0][0] for s in range(per_epoch)])
    assert len(seen) == per_epoch * 16
    assert len({tuple(row) for row in seen.tolist()}) == len(seen)  # no repeats within an epoch
    fresh = modular(batch_size=16)  # a new object (e.g. after resume) draws the same batch
    assert torch.equal(fresh.train_batches(7)[0][0][0], data.train_batches(7)[0][0][0])
    assert not torch.equal(data.train_batches(per_epoch)[0][0][0], data.train_batches(0)[0][0][0])


def test_global_batch_is_split_across_ranks_and_micro_steps():
    single = modular(batch_size=16)
    whole = single.train_batches(3)[0][0][0]
    parts = []
    for rank in range(2):
        shard = ModularData(Config(modulus=23, batch_size=16, accumulation_steps=2), Dist(rank, rank, 2), CPU)
        batches, num_targets = shard.train_batches(3)
        assert len(batches) == 2 and num_targets == 16
        parts += [(micro, rank, x) for micro, (x, _) in enumerate(batches)]
    parts.sort(key=lambda item: (item[0], item[1]))
    assert torch.equal(torch.cat([x for _, _, x in parts]), whole)


def test_validation_is_shared_between_ranks():
    """Each validation row is evaluated by exactly one of the ranks: together they hold the whole
    split, no row twice (the counts alone would pass two ranks that took the same half)."""
    halves = [ModularData(Config(modulus=23), Dist(r, r, 2), CPU) for r in range(2)]
    rows = torch.cat([x for half in halves for x, _, _ in half.val_batches()])
    whole = halves[0].val_x
    assert len(rows) == len(whole)
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, whole.tolist()))
    assert len(set(map(tuple, whole.tolist()))) == len(whole)  # so a row twice would show


# ---------------------------------------------------------------- Dyck


def _check_dyck(sequence, k, max_depth, min_len, max_len):
    assert sequence[0] == DyckData.BOS
    body = []
    for token in sequence[1:]:
        if token == DyckData.EOS:
            break
        body.append(token)
    stack = []
    for token in body:
        if 3 <= token < 3 + k:
            stack.append(token - 3)
            assert len(stack) <= max_depth
        else:
            assert stack and stack.pop() == token - 3 - k
    assert not stack and min_len <= len(body) <= max_len
    rest = sequence[len(body) + 2 :]
    assert all(t == DyckData.PAD for t in rest)


def test_dyck_sequences_are_balanced_within_limits():
    rng = np.random.default_rng(0)
    sequences, valid = generate_dyck(500, 3, 4, 4, 16, rng)
    for row, mask in zip(sequences.tolist(), valid):
        _check_dyck(row, 3, 4, 4, 16)
        length = row.index(DyckData.EOS)
        for t in range(length):  # the token that came next was always a valid continuation
            assert mask[t, row[t + 1]]
        assert not mask[length:].any()


def test_dyck_valid_sets():
    # At maximum depth the only valid move is the closing bracket matching the top of the stack.
    k, depth = 2, 2
    sequences, valid = generate_dyck(2000, k, depth, 2, 8, np.random.default_rng(1))
    found = 0
    for row, mask in zip(sequences.tolist(), valid):
        stack = []
        for t, token in enumerate(row[1:]):
            if token in (DyckData.EOS, DyckData.PAD):
                break
            if token < 3 + k:
                stack.append(token - 3)
            else:
                stack.pop()
            allowed = set(np.flatnonzero(mask[t + 1]).tolist())
            if len(stack) == depth:
                assert allowed == {3 + k + stack[-1]}
                found += 1
            if not stack:  # balanced: EOS may follow, and an opening bracket if there is room
                assert DyckData.EOS in allowed
                assert all((3 + i in allowed) == (t + 1 + 2 <= 8) for i in range(k))
    assert found > 0


def test_dyck_data_split_shapes_and_no_overlap():
    cfg = Config(task="dyck", context_len=21, dyck_max_len=20, dyck_num_train=500, dyck_num_val=100)
    data = DyckData(cfg, Dist(), CPU)
    assert data.train_x.shape == (500, 21) and data.val_x.shape == (100, 21)
    assert data.vocab_size == 3 + 2 * cfg.dyck_types
    train = {tuple(r) for r in data.train_sequences.tolist()}
    val = {tuple(r) for r in data.val_sequences.tolist()}
    assert len(train) == 500 and len(val) == 100 and not train & val
    assert (data.train_y[data.train_x == DyckData.PAD] == IGNORE).all()
    again = DyckData(cfg, Dist(), CPU)
    assert torch.equal(again.train_x, data.train_x)


def test_dyck_metrics_reward_a_perfect_predictor():
    cfg = Config(task="dyck", context_len=21, dyck_max_len=20, dyck_num_train=200, dyck_num_val=50)
    data = DyckData(cfg, Dist(), CPU)
    sums = {}
    for x, y, extras in data.val_batches():
        logits = torch.full((*y.shape, data.vocab_size), -10.0)
        logits.scatter_(-1, y.clamp(min=0).unsqueeze(-1), 10.0)  # predicts the true next token
        for key, value in data.eval_sums(logits, y, extras).items():
            sums[key] = sums.get(key, 0) + value
    metrics = data.eval_metrics(sums)
    assert metrics["val_acc"] == 1.0 and metrics["val_forced_acc"] == 1.0 and metrics["val_valid_frac"] == 1.0
    # and nothing to one that always predicts padding: the metrics are not constantly 1
    sums = {}
    for x, y, extras in data.val_batches():
        logits = torch.full((*y.shape, data.vocab_size), -10.0)
        logits[..., DyckData.PAD] = 10.0
        for key, value in data.eval_sums(logits, y, extras).items():
            sums[key] = sums.get(key, 0) + value
    metrics = data.eval_metrics(sums)
    assert metrics["val_acc"] == 0.0 and metrics["val_forced_acc"] == 0.0 and metrics["val_valid_frac"] == 0.0


def test_dyck_asking_for_too_many_distinct_sequences():
    cfg = Config(task="dyck", context_len=5, dyck_max_len=4, dyck_min_len=2, dyck_num_train=5000)
    with pytest.raises(ConfigError, match="--dyck_num_train"):
        DyckData(cfg, Dist(), CPU)


# ---------------------------------------------------------------- text


def text_cfg(path, **overrides):
    return Config(**{"task": "text", "data_path": path, "context_len": 16, "batch_size": 8, **overrides})


def test_char_tokens_are_cached_outside_the_source(corpus, tmp_path):
    data = TextData(text_cfg(corpus, cache_dir=str(tmp_path / "cache")), Dist(), CPU)
    text = open(corpus).read()
    tokens = np.concatenate([data.train_tokens[:], data.val_tokens[:]])
    assert tokens.dtype == np.uint16 and data.decode(tokens[:200].tolist()) == text[:200]
    assert os.listdir(os.path.dirname(corpus)) == ["tiny.txt"]  # nothing beside the text
    folder, = os.listdir(tmp_path / "cache")
    assert folder.startswith("tiny-char-")
    manifest = json.load(open(tmp_path / "cache" / folder / "manifest.json"))
    assert manifest["tokens"] == {"all": len(text)} and manifest["vocab"] == "".join(sorted(set(text)))
    again = TextData(text_cfg(corpus, cache_dir=str(tmp_path / "cache")), Dist(), CPU)  # from the cache
    assert np.array_equal(again.train_tokens[:], data.train_tokens[:])


def test_text_batches_windows_and_split(corpus):
    data = TextData(text_cfg(corpus), Dist(), CPU)
    batches, num_targets = data.train_batches(0)
    (x, y), = batches
    assert x.shape == (8, 16) and num_targets == 8 * 16
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    assert len(data.train_tokens) + len(data.val_tokens) == len(SMALL_CORPUS * 40)
    assert len(data.val_tokens) == pytest.approx(0.1 * len(SMALL_CORPUS * 40), abs=1)
    windows = [x for x, _, _ in data.val_batches()]
    assert sum(len(w) for w in windows) == (len(data.val_tokens) - 1) // 16
    assert torch.equal(data.train_batches(4)[0][0][0], TextData(text_cfg(corpus), Dist(), CPU).train_batches(4)[0][0][0])


def test_missing_text_is_downloaded(tmp_path, http_server):
    root, url = http_server
    (root / "shakespeare.txt").write_text(SMALL_CORPUS * 30)
    target = tmp_path / "data" / "tiny_shakespeare.txt"
    data = build_data(text_cfg(str(target), data_url=f"{url}/shakespeare.txt"), Dist(), CPU)
    assert target.read_text() == SMALL_CORPUS * 30
    assert data.vocab_size == len(set(SMALL_CORPUS))


def test_failed_download_names_the_file_and_leaves_nothing(tmp_path, http_server):
    _, url = http_server
    target = tmp_path / "data" / "tiny_shakespeare.txt"
    with pytest.raises(ConfigError) as info:
        build_data(text_cfg(str(target), data_url=f"{url}/no-such-file.txt"), Dist(), CPU)
    assert str(target) in str(info.value) and "by hand" in str(info.value)
    assert os.listdir(tmp_path) == ["www"]  # the server's folder only: not the file, nor data/ made for it


@pytest.mark.skipif(not os.path.isdir(TIKTOKEN_CACHE), reason="no tiktoken BPE cache beside the checkout")
def test_tiktoken_tokens(corpus, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", TIKTOKEN_CACHE)
    data = TextData(text_cfg(corpus, tokenizer="gpt2"), Dist(), CPU)
    assert data.vocab_size == 50304  # 50257 padded to a multiple of 64
    assert data.decode(data.encode("ROMEO: soft!")) == "ROMEO: soft!"
    big = TextData(text_cfg(corpus, tokenizer="o200k_base"), Dist(), CPU)
    assert big.train_tokens.dtype == np.uint32


def test_unknown_tokenizer(corpus):
    with pytest.raises(ConfigError, match="--tokenizer"):
        build_data(text_cfg(corpus, tokenizer="not_an_encoding"), Dist(), CPU)


def test_eval_cap_is_global_not_per_rank():
    cfg = dict(modulus=23, eval_max_batches=2, eval_batch_size=5)
    single = sum(len(x) for x, _, _ in ModularData(Config(**cfg), Dist(), CPU).val_batches())
    pair = sum(len(x) for r in range(2) for x, _, _ in ModularData(Config(**cfg), Dist(r, r, 2), CPU).val_batches())
    assert single == pair == 10


def test_non_utf8_corpus(tmp_path):
    path = tmp_path / "binary.txt"
    path.write_bytes(b"\xff\xfe\x00\x81 not text")
    with pytest.raises(ConfigError, match="not UTF-8"):
        build_data(text_cfg(str(path)), Dist(), CPU)
