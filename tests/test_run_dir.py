"""A run directory is self-contained: a text run carries its tokenizer (tokenizer.json) and the start of
its validation split (val_excerpt.npy), so sample.py and interp.py open it copied anywhere with its
corpus gone, and give what they gave beside it; what needs the corpus's text says so in one line.
Sample prompts start where the corpus's text does: its end-of-text token on a corpus of documents."""

from __future__ import annotations

import json
import os
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sample
import train
from analysis.runs import load_run, split_sequences
from config import Config, ConfigError
from conftest import SMALL_CORPUS, TIKTOKEN_CACHE, run_bad_input, run_program, write_corpus, write_documents
from tasks.text import (RUN_TOKENIZER, RUN_VAL_EXCERPT, RunTextData, TextData, encode_text, open_run_data, sample_prompts,
                  tokenizer_from_record, tokenizer_record)
from plumbing.corpus import EOT_TEXT, CharTokenizer
from plumbing.distributed import Dist

CPU = torch.device("cpu")
needs_bpe = pytest.mark.skipif(not os.path.isdir(TIKTOKEN_CACHE), reason="no tiktoken BPE cache beside the checkout")


def text_cfg(path, **overrides):
    return Config(**{"task": "text", "data_path": str(path), "context_len": 16, "batch_size": 8, **overrides})


def saved(cfg, run_dir) -> TextData:
    """cfg's data, saved into run_dir as train.py saves it."""
    data = TextData(cfg, Dist(), CPU)
    os.makedirs(run_dir)
    data.save_to_run(str(run_dir))
    return data


# ---------------------------------------------------------------- without training


def test_the_tokenizer_record_makes_the_same_tokenizer(tmp_path):
    char = CharTokenizer("\n !abc", eot=True)
    again = tokenizer_from_record(tokenizer_record(char), str(tmp_path))
    assert (again.vocab, again.eot_token, again.n_vocab) == ("\n !abc", 6, 7)
    assert tokenizer_record(again) == tokenizer_record(char)


def test_the_end_of_text_text_is_the_token():
    char = CharTokenizer("\n !abc", eot=True)
    ids = encode_text(char, EOT_TEXT + "ab c")
    assert ids == [6, 3, 4, 1, 5] and char.decode(ids) == EOT_TEXT + "ab c"
    plain = CharTokenizer("\n !abc")  # no documents, no such token: the text stays text (here, dropped)
    assert encode_text(plain, "a" + EOT_TEXT) == plain.encode("a" + EOT_TEXT)


def test_prompts_start_where_the_text_starts():
    lines = CharTokenizer("".join(sorted(set(SMALL_CORPUS))))
    head = lines.encode_array("soft!\nFirst Citizen:\n\nBefore we proceed any further, hear\nAll:\nSpeak")
    assert sample_prompts(lines, head, documents=False) == ("\n", "\nFirst Citizen:", "\nBefore we proceed")
    documents = CharTokenizer("".join(sorted(set(SMALL_CORPUS))), eot=True)
    head = encode_text(documents, f"ech?\n{EOT_TEXT}ROMEO:\nBut, soft!{EOT_TEXT}All:\nSpeak{EOT_TEXT}First Cit")
    assert sample_prompts(documents, head, documents=True) == (EOT_TEXT, EOT_TEXT + "ROMEO:", EOT_TEXT + "All:")


def test_a_text_run_opens_without_its_corpus(tmp_path):
    corpus = write_corpus(tmp_path)
    cfg = text_cfg(corpus)
    data = saved(cfg, tmp_path / "run")
    record = json.load(open(tmp_path / "run" / RUN_TOKENIZER))
    assert record["kind"] == "char" and record["vocab"] == "".join(sorted(set(SMALL_CORPUS)))
    assert record["eot_token"] is None and record["documents"] is False
    assert data.SAMPLE_PROMPTS[0] == "\n" and all(p[1:] in SMALL_CORPUS for p in data.SAMPLE_PROMPTS)
    shutil.rmtree(os.path.dirname(corpus))
    opened = open_run_data(cfg, str(tmp_path / "run"), CPU)
    assert isinstance(opened, RunTextData)
    assert (opened.vocab_size, opened.seq_len, opened.SAMPLE_PROMPTS) == (data.vocab_size, 16, data.SAMPLE_PROMPTS)
    assert opened.encode("All:\nSpeak") == data.encode("All:\nSpeak") and opened.decode([5, 6]) == data.decode([5, 6])
    assert len(opened.val_tokens) == len(data.val_tokens)
    assert np.array_equal(opened.val_tokens[:16 * 16 + 1], data.val_tokens[:16 * 16 + 1])  # the excerpt
    past_the_excerpt = (lambda: opened.train_tokens, lambda: opened.val_tokens[:16 * 16 + 2],
                        lambda: opened.train_batches(0))
    for reads in past_the_excerpt:
        with pytest.raises(ConfigError, match=f"--data_path: the corpus run was trained on, {corpus}, is missing"):
            reads()


def test_another_corpus_at_the_path_is_refused(tmp_path):
    corpus = write_corpus(tmp_path)
    cfg = text_cfg(corpus)
    data = saved(cfg, tmp_path / "run")
    with open(corpus, "w") as f:  # other characters: the run's token ids would mean other text
        f.write("zzzz qqqq xxxx\n" * 200)
    opened = open_run_data(cfg, str(tmp_path / "run"), CPU)
    assert opened.encode("All:") == data.encode("All:")  # the run's tokenizer, still
    with pytest.raises(ConfigError, match=f"--data_path: {corpus} is not the corpus run was trained on"):
        opened.train_tokens


def test_a_run_from_before_tokenizer_json_reads_its_corpus(tmp_path):
    corpus = write_corpus(tmp_path)
    data = open_run_data(text_cfg(corpus), str(tmp_path), CPU)  # no tokenizer.json there
    assert type(data) is TextData


@needs_bpe
def test_a_bpe_run_on_documents_records_its_encoding(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", TIKTOKEN_CACHE)
    documents = write_documents(tmp_path)
    cfg = text_cfg(documents, tokenizer="gpt2")
    data = saved(cfg, tmp_path / "run")
    record = json.load(open(tmp_path / "run" / RUN_TOKENIZER))
    assert {k: record[k] for k in ("kind", "name", "eot_token", "documents")} == \
        {"kind": "tiktoken", "name": "gpt2", "eot_token": 50256, "documents": True}
    assert data.SAMPLE_PROMPTS == (EOT_TEXT, EOT_TEXT + "First Citizen:")  # every document opens alike
    assert data.encode(EOT_TEXT + "First")[0] == 50256
    shutil.rmtree(documents)
    opened = open_run_data(cfg, str(tmp_path / "run"), CPU)
    assert (opened.vocab_size, opened.SAMPLE_PROMPTS) == (50304, data.SAMPLE_PROMPTS)


def test_a_hugging_face_tokenizer_is_copied_into_the_run(tmp_path):
    pytest.importorskip("tokenizers")
    from interop.huggingface import write_char_tokenizer

    chars = "".join(sorted(set(SMALL_CORPUS)))
    os.makedirs(tmp_path / "hf")
    write_char_tokenizer(str(tmp_path / "hf" / "my-bpe.json"), chars, len(chars))  # a file of any name
    corpus = write_corpus(tmp_path)
    cfg = text_cfg(corpus, tokenizer=str(tmp_path / "hf" / "my-bpe.json"))
    data = saved(cfg, tmp_path / "run")
    shutil.rmtree(tmp_path / "hf")  # the model's folder is gone too
    shutil.rmtree(os.path.dirname(corpus))
    opened = open_run_data(cfg, str(tmp_path / "run"), CPU)
    assert opened.tokenizer.path == str(tmp_path / "run" / "hf_tokenizer" / "tokenizer.json")
    assert opened.encode("All:") == data.encode("All:") and opened.tokenizer.eot_token == data.tokenizer.eot_token
    # a run written before the copy took the name tokenizer.json still opens
    os.rename(tmp_path / "run" / "hf_tokenizer" / "tokenizer.json", tmp_path / "run" / "hf_tokenizer" / "my-bpe.json")
    assert open_run_data(cfg, str(tmp_path / "run"), CPU).encode("All:") == data.encode("All:")


# ---------------------------------------------------------------- trained, moved, corpus gone

SMALL = ["--num_blocks", "1", "--embedding_dim", "32", "--num_heads", "2", "--context_len", "16", "--batch_size", "8",
         "--max_steps", "4", "--eval_every", "4", "--log_every", "2", "--sample_tokens", "0"]


def samples_of(run_dir, *args) -> list[str]:
    return sample.main([str(run_dir), "--num_samples", "2", "--max_new_tokens", "24", "--seed", "5", "--device",
                        "cpu", *args])


def samples_as_an_old_run(run_dir) -> list[str]:
    """The samples of the run read as runs from before tokenizer.json are: through its corpus."""
    os.rename(run_dir / RUN_TOKENIZER, run_dir / "put-aside")
    try:
        return samples_of(run_dir)
    finally:
        os.rename(run_dir / "put-aside", run_dir / RUN_TOKENIZER)


def interp_report(run_dir, cwd) -> tuple[str, dict]:
    """interp.py's report.md (the checkpoint's path left out) and its pictures' bytes."""
    result = run_program("interp.py", [str(run_dir), "--device", "cpu"], cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    folder = os.path.join(cwd, run_dir, "interp")
    text = re.sub(r"Checkpoint `[^`]*`", "Checkpoint", open(os.path.join(folder, "report.md")).read())
    pictures = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)
                if name != "report.md"}
    return text, pictures


def move_away(tmp_path, run_dir, corpus) -> str:
    """The run directory copied to another machine (another folder), its corpus gone: its new path
    from there (elsewhere/, the working directory from now on)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(str(run_dir), str(elsewhere / run_dir.name))
    shutil.rmtree(corpus) if os.path.isdir(corpus) else os.remove(corpus)
    return run_dir.name


@pytest.mark.slow
def test_a_moved_char_run_without_its_corpus_samples_and_reports_alike(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = write_corpus(tmp_path)
    train.main(["--preset", "shakespeare_char", "--data_path", corpus, "--save_model_dir", "runs", "--run", "c",
                *SMALL])
    run_dir = tmp_path / "runs" / "c"
    assert {RUN_TOKENIZER, RUN_VAL_EXCERPT, "config.json", "best.pt", "last.pt"} <= set(os.listdir(run_dir))
    before = samples_of(run_dir)
    assert all(s.startswith("\n") for s in before)  # a text file: the default start is a newline, as ever
    assert samples_as_an_old_run(run_dir) == before
    report = interp_report("runs/c", tmp_path)
    moved = move_away(tmp_path, run_dir, corpus)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert samples_of(moved) == before  # same seed, same tokenizer: the same samples
    assert interp_report(moved, tmp_path / "elsewhere") == report  # the validation windows it read: the excerpt
    result = run_bad_input("sae.py", [moved, "--hook", "blocks.0.hook_resid_post", "--device", "cpu"],
                           tmp_path / "elsewhere", f"--data_path: the corpus c was trained on, {corpus}, is missing",
                           "pass --data_path with where it is now")
    assert result.stdout == ""
    # Pointed at where the corpus is now, the run reads its text again.
    again = write_corpus(tmp_path / "new")
    run = load_run(moved, "cpu", source=SimpleNamespace(data_path=again, pretrained_spec=lambda: None))
    assert split_sequences(run, "train", "all", 64).tokens.shape == (4, 16)


@pytest.mark.slow
@needs_bpe
def test_a_moved_bpe_run_on_documents_starts_from_the_end_of_text_token(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", TIKTOKEN_CACHE)
    documents = write_documents(tmp_path)
    train.main(["--data_path", documents, "--task", "text", "--tokenizer", "gpt2", "--save_model_dir", "runs",
                "--run", "b", *SMALL])
    before = samples_of(tmp_path / "runs" / "b")
    assert all(s.startswith(EOT_TEXT) for s in before)  # documents: sample.py starts a document
    assert samples_as_an_old_run(tmp_path / "runs" / "b") == before
    moved = move_away(tmp_path, tmp_path / "runs" / "b", documents)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert samples_of(moved) == before
    assert samples_of(moved, "--start", "\n") != before  # --start still chooses


@pytest.mark.slow
def test_an_sae_report_and_a_lens_eval_of_a_moved_run_take_data_path(tmp_path, monkeypatch):
    """`sae.py report` and `lens.py eval` read more of the validation split than the run carries: with the
    corpus gone each says so in one line naming --data_path, and given --data_path each writes what it
    wrote beside the corpus."""
    import lens
    import sae
    from test_lens import QUICK

    monkeypatch.chdir(tmp_path)
    corpus = write_corpus(tmp_path)
    train.main(["--preset", "shakespeare_char", "--data_path", corpus, "--save_model_dir", "runs", "--run", "c",
                *SMALL])
    sae.main(["runs/c", "--hook", "blocks.0.hook_resid_post", "--max_steps", "4", "--eval_tokens", "4096",
              "--device", "cpu", "--run_name", "s"])
    lens.main(["runs/c", "--layer", "0", *QUICK, "--max_steps", "4", "--device", "cpu", "--run_name", "l"])

    def reports(run_dir, *flags) -> tuple[str, str]:
        with open(sae.main(["report", f"{run_dir}/sae/s", *flags])) as f:
            sae_report = f.read()
        with open(lens.main(["eval", f"{run_dir}/lens/l", *flags])) as f:
            lens_report = f.read()
        return sae_report, lens_report

    before = reports("runs/c")
    moved = move_away(tmp_path, tmp_path / "runs" / "c", corpus)
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.chdir(elsewhere)
    for program, command in (("sae.py", ["report", f"{moved}/sae/s"]), ("lens.py", ["eval", f"{moved}/lens/l"])):
        run_bad_input(program, command, elsewhere, f"--data_path: the corpus c was trained on, {corpus}, is missing",
                      "pass --data_path with where it is now")
    run_bad_input("sae.py", ["report", f"{moved}/sae/s", "--data", "x"], elsewhere, "--data: not a flag of this command",
                  "usage: python sae.py report")
    assert reports(moved, "--data_path", write_corpus(tmp_path / "new")) == before
