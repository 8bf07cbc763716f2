"""The notebooks run top to bottom, headless, and are committed without outputs."""

from __future__ import annotations

import json
import os

import pytest

from conftest import ROOT, TIKTOKEN_CACHE

NOTEBOOKS = os.path.join(ROOT, "notebooks")


@pytest.mark.parametrize("name", ["modular_interp.ipynb", "training.ipynb", "consistency_lens.ipynb", "pretrained.ipynb"])
def test_committed_without_outputs(name):
    with open(os.path.join(NOTEBOOKS, name)) as f:
        cells = json.load(f)["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


def execute(name: str, env: dict[str, str], monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="running notebooks needs nbclient and ipykernel "
                                                      "(pip install -r requirements-dev.txt)")
    nbclient = pytest.importorskip("nbclient", reason="pip install -r requirements-dev.txt")
    pytest.importorskip("ipykernel", reason="pip install -r requirements-dev.txt")
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    for key, value in env.items():  # the kernel inherits this process's environment
        monkeypatch.setenv(key, value)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": NOTEBOOKS}}).execute()
    return notebook


def printed(notebook) -> str:
    return "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs
                   if o.get("output_type") == "stream")


def images(notebook) -> int:
    return sum("image/png" in o.get("data", {}) for c in notebook.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.slow
def test_modular_interp_notebook_trains_a_run_and_analyses_it(tmp_path, monkeypatch):
    args = f"--save_model_dir {tmp_path}/runs --run_name nb --modulus 23 --frac_train 0.6 --max_steps 150 --eval_every 25"
    notebook = execute("modular_interp.ipynb", {"TINYLAB_TRAIN_ARGS": args, "TINYLAB_RUN": ""}, monkeypatch)
    out = printed(notebook)
    assert "key frequencies of the logits:" in out and "restricted" in out and "median share" in out
    assert images(notebook) >= 8  # curves, attention, norms, ablation, spectrum, neurons, three probe plots
    assert (tmp_path / "runs" / "nb" / "best.pt").is_file()
    metrics = [json.loads(line) for line in open(tmp_path / "runs" / "nb" / "metrics.jsonl")]
    assert any("restricted_loss" in m for m in metrics)  # the notebook trains with --track_progress


@pytest.mark.slow
def test_training_notebook_trains_plots_and_samples(tmp_path, monkeypatch):
    text = tmp_path / "corpus.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 300)
    notebook = execute("training.ipynb", {
        "TINYLAB_TRAIN_ARGS": f"--save_model_dir {tmp_path}/runs --modulus 23 --max_steps 40",
        "TINYLAB_TEXT_ARGS": f"--save_model_dir {tmp_path}/runs --data_path {text} --max_steps 30 --eval_every 15",
    }, monkeypatch)
    out = printed(notebook)
    assert "'steps': 40" in out and "'steps': 30" in out and "ROMEO:" in out
    assert images(notebook) >= 1


@pytest.mark.slow
def test_consistency_lens_notebook_trains_a_lens_and_reads_it(tmp_path, monkeypatch):
    text = tmp_path / "corpus.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks? An explanation of it, please.\n" * 300)
    notebook = execute("consistency_lens.ipynb", {
        "TINYLAB_TEXT_ARGS": f"--save_model_dir {tmp_path}/runs --data_path {text} --num_blocks 2 --embedding_dim 32 "
                             f"--num_heads 2 --max_steps 60 --eval_every 60",
        "TINYLAB_LENS_ARGS": "--max_steps 40 --eval_every 20 --batch_size 16 --eval_rows 64",
        "TINYLAB_RUN": "",
    }, monkeypatch)
    out = printed(notebook)
    assert "  ->  " in out and "step    40  tau" in out and "   Â:    " in out and "Fraction of variance" in out
    assert images(notebook) >= 1
    lens_dir = tmp_path / "runs"
    assert list(lens_dir.glob("*/lens/notebook/eval/report.md"))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(TIKTOKEN_CACHE), reason="no tiktoken BPE cache beside the checkout (GPT-2's tokenizer)")
def test_pretrained_notebook_exports_a_model_and_explains_it_through_the_pretrained_path(tmp_path, monkeypatch):
    pytest.importorskip("safetensors", reason="pip install -r requirements-dev.txt")
    text = tmp_path / "corpus.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n" * 200)
    notebook = execute("pretrained.ipynb", {
        "TIKTOKEN_CACHE_DIR": TIKTOKEN_CACHE, "TINYLAB_RUNS": str(tmp_path / "runs"), "TINYLAB_DATA": str(text),
        "TINYLAB_TEXT_ARGS": "--max_steps 4 --eval_every 4 --embedding_dim 32 --num_heads 2 --context_len 32",
        "TINYLAB_LENS_ARGS": "--t_text 2 --max_steps 4 --eval_every 4 --eval_rows 8 --batch_size 8",
        "TINYLAB_SAE_ARGS": "--max_steps 10 --eval_every 10 --batch_size 256 --eval_tokens 1024",
    }, monkeypatch)
    out = printed(notebook)
    assert "4 blocks x 2 heads x 32, vocab 50304, context 32, tokenizer 'gpt2'" in out, out  # rows padded to 64s
    difference = float(out.split("max |logit difference| from transformers: ")[1].split()[0])
    assert difference < 1e-4
    assert "ROMEO:" in out and "val FVE" in out and "val KL" in out
    assert "topk " in out and "relu " in out and "CE-loss score" in out
    home = tmp_path / "runs" / "tiny-gpt2"  # the exported folder's name: where the model's outputs go
    assert (home / "pretrained.json").is_file() and (home / "lens" / "notebook" / "last.pt").is_file()
    assert len(list((home / "sae").glob("blocks.2.hook_resid_pre-*"))) == 2
