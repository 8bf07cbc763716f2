"""Hugging Face checkpoints in (pretrained.py, train.py --init_from) and out (export.py), against
transformers' own implementations of small random models saved locally."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from conftest import TIKTOKEN_CACHE, run_bad_input, run_metrics

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
transformers.logging.set_verbosity_error()

import export  # noqa: E402
from interop import huggingface as pretrained  # noqa: E402
import train  # noqa: E402

VOCAB = 97
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # the references' tokenizer: these, then <|endoftext|>
SMALL = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
             max_position_embeddings=64)
FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=VOCAB)),
    "gpt2-untied-gelu": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_embd=32, n_head=4, n_positions=64,
                                                               vocab_size=VOCAB, tie_word_embeddings=False,
                                                               activation_function="gelu")),
    "llama3-gqa-bias": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, num_key_value_heads=2, attention_bias=True,
                                                                rope_theta=500000.0, rope_scaling={
                                                                    "rope_type": "llama3", "factor": 8.0,
                                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                    "original_max_position_embeddings": 16})),
    "llama-tied-mqa": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, num_key_value_heads=1, tie_word_embeddings=True,
                                                               mlp_bias=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3-head-dim": ("Qwen3Config", "Qwen3ForCausalLM", dict(SMALL, num_key_value_heads=2, head_dim=16)),
}


def save_reference(kind: str, folder: str, seed: int = 0):
    """A random transformers model of family `kind`, weights scaled so that logits are O(1) and every
    bias and norm weight differs from its default, saved with a character tokenizer.json."""
    config_class, model_class, settings = FAMILIES[kind]
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**settings)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name or "ln" in name and "bias" not in name else 0))
            else:
                p.mul_(8)
    model.save_pretrained(folder)
    pretrained.write_char_tokenizer(os.path.join(folder, "tokenizer.json"), CHARS, VOCAB - 1)
    return model


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: (save_reference(kind, str(root / kind)), str(root / kind)) for kind in FAMILIES}


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_a_checkpoint_opens_with_transformers_logits_hooks_and_greedy_tokens(references, kind):
    reference, folder = references[kind]
    ours, cfg = pretrained.load_pretrained(folder)
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = reference(tokens, output_hidden_states=True)
        theirs = out.logits
        scale = theirs.abs().max().item()
        assert scale > 1  # logits big enough that a wrong piece shows
        assert (ours(tokens) - theirs).abs().max().item() < 1e-4 * scale  # the fused fast path
        logits, cache = ours.run_with_cache(tokens)  # every hook: the explicit path
    assert (logits - theirs).abs().max().item() < 1e-4 * scale
    for i in range(cfg.num_blocks):  # transformers' hidden states are our residual stream before each block
        assert (cache[f"blocks.{i}.hook_resid_pre"] - out.hidden_states[i]).abs().max() < 1e-4 * out.hidden_states[i].abs().max()
    Dh = reference.config.to_dict().get("head_dim") or 8
    Hkv = getattr(reference.config, "num_key_value_heads", 4)
    assert cache["blocks.1.attn.hook_q"].shape == (2, 40, 4, Dh)
    assert cache["blocks.1.attn.hook_k"].shape == (2, 40, Hkv, Dh)
    prompt = tokens[:1, :8]
    greedy = reference.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert ours.generate(prompt, 12, temperature=0).tolist() == greedy.tolist()


# Checkpoints tinylab refuses, as `--model` gives them to a program: the changes to qwen2's config.json
# (None: a case of its own), and the fragment the one line must hold.
REFUSALS = {
    "sliding": (dict(use_sliding_window=True, layer_types=["sliding_attention"] * 2), "sliding-window attention"),
    "neox": (dict(model_type="gpt_neox"), "'gpt_neox' model; tinylab opens gpt2, llama"),
    "yarn": (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "rope scaling 'yarn'"),
    "shapes": (dict(hidden_size=48), "embed.weight is [97, 32] but its config.json makes it [97, 48]"),
    "empty": (None, "has config.json but no weights"),  # config.json and tokenizer.json, no weights
    "nowhere": (None, "--model: no folder ./nowhere"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_name_what_is_unsupported(tmp_path, references, case):
    """As a user meets them: `python sample.py --model FOLDER` exits 2 with one line that names what is
    unsupported, and writes nothing (in the folder, the reference or the working folder)."""
    _, folder = references["qwen2"]
    config = json.load(open(os.path.join(folder, "config.json")))
    changes, fragment = REFUSALS[case]
    path = tmp_path / case
    if changes is not None:  # a variant: the reference's files, another config.json
        path.mkdir()
        for f in os.listdir(folder):
            os.symlink(os.path.join(folder, f), path / f) if f != "config.json" else None
        json.dump({**config, **changes}, open(path / "config.json", "w"))
    elif case == "empty":
        path.mkdir()
        json.dump(config, open(path / "config.json", "w"))
        os.symlink(os.path.join(folder, "tokenizer.json"), path / "tokenizer.json")
    model = "./nowhere" if case == "nowhere" else str(path)
    run_bad_input("sample.py", ["--model", model], tmp_path, fragment, watch=[folder])


def fake_hf_cache(tmp_path, folder: str):
    """tmp_path/hf as an HF_HOME whose hub cache holds `folder` as tinylab-test/tiny-llama."""
    repo = tmp_path / "hf" / "hub" / "models--tinylab-test--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in os.listdir(folder):
        os.symlink(os.path.join(folder, f), snapshot / f)
    return tmp_path / "hf"


def test_a_hub_id_comes_from_the_hf_cache_offline(tmp_path, monkeypatch, references):
    pytest.importorskip("huggingface_hub")
    _, folder = references["llama-tied-mqa"]
    home = fake_hf_cache(tmp_path, folder)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants  # read once at import: point them at this cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    model, cfg = pretrained.load_pretrained("tinylab-test/tiny-llama")
    assert cfg.num_kv_heads == 1 and cfg.tokenizer.endswith("tokenizer.json")


@pytest.mark.slow
def test_an_unknown_hub_id_offline_says_what_to_do(tmp_path, references):
    """As a user meets it: `python sample.py --model tinylab-test/absent` offline, with a cache that holds
    another model, exits 2 with one line that says how to get it, and writes nothing."""
    pytest.importorskip("huggingface_hub")
    home = fake_hf_cache(tmp_path, references["llama-tied-mqa"][1])
    result = run_bad_input("sample.py", ["--model", "tinylab-test/absent"], tmp_path, "--model: ",
                           env={"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": "1"})
    assert re.search(r"could not download tinylab-test/absent .* `hf download tinylab-test/absent`", result.stderr)


@pytest.mark.slow
def test_init_from_fine_tunes_from_the_checkpoint_and_refuses_a_different_shape(tmp_path, references, corpus):
    _, folder = references["qwen3-head-dim"]
    base = ["--init_from", folder, "--data_path", corpus, "--save_model_dir", str(tmp_path / "runs"),
            "--context_len", "32", "--batch_size", "4", "--eval_max_batches", "2"]
    # Bad input, as a user meets it: `python train.py ...` exits 2 with one line, and writes nothing.
    for args, pattern in ((base + ["--embedding_dim", "64"], "--embedding_dim: .* keeps the checkpoint's shape"),
                          (base[:-6] + ["--context_len", "65"], "--context_len: .* at most 64 positions"),
                          (base + ["--tokenizer", "char"], "--tokenizer: .* was trained with")):
        assert re.search(pattern, run_bad_input("train.py", args, tmp_path, watch=[folder]).stderr), args
    # lr 0: the run's weights are the checkpoint's, and its loss is transformers' loss on them
    train.main(base + ["--run_name", "still", "--lr", "0", "--max_steps", "1", "--eval_every", "1"])
    saved = torch.load(tmp_path / "runs" / "still" / "last.pt", weights_only=True)
    assert saved["config"]["preset"] == "finetune" and saved["config"]["head_dim"] == 16
    reference_state = pretrained.state_from_hf(pretrained.read_weights(folder, "x"), pretrained.load_pretrained(folder)[1], "qwen3")
    for key, value in reference_state.items():
        assert torch.equal(saved["model"][key], value), key
    train.main(base + ["--run_name", "tuned", "--lr", "3e-3", "--max_steps", "8", "--eval_every", "4"])
    losses = [m["val_loss"] for m in run_metrics(tmp_path / "runs" / "tuned") if "val_loss" in m]
    assert losses[-1] < losses[0] and len(losses) == 2


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(TIKTOKEN_CACHE), reason="no tiktoken BPE cache beside the checkout")
def test_export_round_trips_through_transformers_and_the_pretrained_path(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", TIKTOKEN_CACHE)
    runs = tmp_path / "runs"
    common = ["--save_model_dir", str(runs), "--data_path", corpus, "--num_blocks", "2", "--num_heads", "4",
              "--embedding_dim", "32", "--context_len", "32", "--batch_size", "4", "--max_steps", "2",
              "--eval_every", "2", "--eval_max_batches", "1", "--sample_tokens", "0"]
    train.main(common + ["--preset", "shakespeare_char", "--tokenizer", "gpt2", "--use_muon", "false", "--run_name",
                         "gpt2", "--activation", "gelu_tanh", "--bias", "true", "--num_kv_heads", "2"])
    train.main(common + ["--preset", "shakespeare_char_modern", "--activation", "swiglu", "--logit_softcap", "0",
                         "--norm_weights", "true", "--run_name", "qwen3"])
    train.main(common + ["--preset", "shakespeare_char_modern", "--run_name", "capped"])
    from analysis.runs import load_run
    for name, family in (("gpt2", "gpt2"), ("qwen3", "qwen3")):
        out = export.main([str(runs / name), "--to", "hf", str(tmp_path / f"hf-{name}")])  # --check compares logits
        assert json.load(open(os.path.join(out, "config.json")))["model_type"] == family
        run = load_run(str(runs / name), "cpu")
        reopened, cfg = pretrained.load_pretrained(out)
        text = open(corpus).read()[:2000]
        tokens = torch.tensor([run.data.encode(text)[:30]])
        with torch.no_grad():
            assert torch.equal(reopened(tokens), run.model(tokens))
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
        assert hf_tokenizer(text)["input_ids"] == run.data.encode(text)
    # Bad input, as a user meets it: `python export.py ...` exits 2 with one line, and writes nothing.
    run_bad_input("export.py", [str(runs / "capped"), "--to", "hf", str(tmp_path / "hf-capped")], tmp_path,
                  "soft-caps its logits")
    assert not (tmp_path / "hf-capped").exists()
    result = run_bad_input("export.py", [str(runs / "gpt2"), "--to", "hf", str(tmp_path / "hf-gpt2")], tmp_path)
    assert re.search("--out: .* exists and is not an empty folder", result.stderr)


@pytest.mark.slow
def test_the_analysis_programs_open_a_pretrained_model_where_they_open_a_run(tmp_path, references, corpus, monkeypatch):
    import activations
    import interp
    import lens
    import sae
    import sample

    _, folder = references["gpt2"]
    monkeypatch.chdir(tmp_path)  # --runs_dir's default, runs/, is here
    model = ["--model", folder, "--data_path", corpus]
    home = tmp_path / "runs" / "gpt2"  # <runs_dir>/<model name>/ stands for the model as a run directory does

    out = activations.main(["dump", *model, "--hook", "blocks.1.hook_resid_pre", "--max_tokens", "640"])
    assert out == os.path.join("runs", "gpt2", "activations", "blocks.1.hook_resid_pre", "train-answer")
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["checkpoint"] == str(home / "pretrained.json") and manifest["step"] == 0
    recorded = json.load(open(home / "pretrained.json"))
    assert recorded["model"] == folder and recorded["data_path"] == corpus
    ours, cfg = pretrained.load_pretrained(folder)
    text = open(corpus).read()
    tokens = torch.tensor([[CHARS.index(c) for c in text[:64]]])  # the first window of the train split
    first = torch.from_numpy(np.load(os.path.join(out, "acts-00000.npy"))[:64])
    assert torch.allclose(first, activations.capture(ours, tokens, "blocks.1.hook_resid_pre")[0], atol=1e-5)

    result = sae.main([*model, "--hook", "blocks.1.hook_resid_pre", "--positions", "all", "--max_steps", "20",
                       "--batch_size", "128", "--eval_every", "20", "--eval_tokens", "1024", "--device", "cpu"])
    assert result["sae_dir"].startswith(os.path.join("runs", "gpt2", "sae"))
    sae_report = open(sae.report(result["sae_dir"])).read()  # reopens the model from pretrained.json
    assert "ce_loss_score" in sae_report and f"`{os.path.join('runs', 'gpt2')}`" in sae_report

    # Transcoders of every MLP and the attribution graph of a prompt, with --model as with a run.
    clt = sae.main([*model, "--transcoder", "cross_layer", "--arch", "topk", "--k", "4", "--positions", "all",
                    "--max_steps", "20", "--batch_size", "128", "--eval_every", "20", "--eval_tokens", "1024",
                    "--device", "cpu"])
    graph = json.load(open(interp.main(["graph", *model, "--transcoders", clt["sae_dir"], "--prompt", "To be"])))
    assert graph["metadata"]["prompt_tokens"] == list("To be")
    assert {n["feature_type"] for n in graph["nodes"]} >= {"embedding", "logit", "cross layer transcoder"}

    # Circuit discovery on JSONL pairs in the model's own (character) tokens; builtin IOI pairs need names
    # its tokenizer writes as one token, which a character tokenizer has none of (refused below).
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"clean": "To be or not to b", "corrupted": "To be or not to m", "right": "e",
                                 "wrong": "a"}) + "\n")
    found = json.load(open(interp.main(["circuit", *model, "--pairs", str(pairs), "--method", "eap"])))
    assert found["num_pairs"] == 1 and found["total"] == len(found["edges"]) > 0
    assert os.path.isfile(home / "circuit" / "eap-resample-logit_diff" / "circuit.html")

    summary = lens.main([*model, "--t_text", "2", "--max_steps", "4", "--eval_every", "4", "--eval_rows", "8",
                         "--batch_size", "8", "--device", "cpu", "--run_name", "quick"])
    assert os.path.isfile(home / "lens" / "quick" / "last.pt") and "val_fve" in summary

    report = open(interp.main(model)).read()
    assert "windows of 64 tokens from the start of the validation split" in report and "| L1 MLP |" in report

    drawn = sample.main(["--model", folder, "--start", "To be", "--num_samples", "1", "--max_new_tokens", "10",
                         "--temperature", "0"])
    assert drawn[0] == "To be" + "".join(CHARS[t] for t in ours.generate(torch.tensor([[CHARS.index(c) for c in "To be"]]),
                                                                      10, temperature=0)[0, 5:].tolist())

    # The folder stands for the model reading this text: another corpus is refused, nothing changes
    other = tmp_path / "other.txt"
    other.write_text(text[::-1])
    run = tmp_path / "elsewhere" / "gpt2"  # a run's directory where the model would stand
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(b"")
    # Bad input, as a user meets it (from tmp_path, where runs/ is): exit 2, one line, nothing written.
    for script, args, pattern in (
            ("interp.py", ["--model", folder, "--data_path", str(other)],
             "--data_path: runs/gpt2 stands for .* give the same --data_path"),
            ("interp.py", [*model, "--runs_dir", str(tmp_path / "elsewhere")], "--model: .*elsewhere/gpt2 is a run's directory"),
            ("sae.py", ["runs/elsewhere", *model, "--hook", "blocks.1.hook_resid_pre"],
             "--model: name a run .* or --model .*, not both"),
            ("interp.py", ["circuit", *model, "--pairs", "builtin"], "--pairs builtin: the tokenizer writes only 0 of the IOI names"),
            ("sae.py", ["--hook", "blocks.1.hook_resid_pre"],
             "--run_dir: name a run directory or checkpoint .* or a pretrained model")):
        assert re.search(pattern, run_bad_input(script, args, tmp_path, watch=[folder]).stderr), (script, args)
    assert json.load(open(home / "pretrained.json")) == recorded
    assert os.listdir(run) == ["last.pt"]


@pytest.mark.slow
def test_a_fine_tune_runs_on_two_ranks_as_on_one_and_resumes_exactly(tmp_path, references, corpus):
    from conftest import model_weights, run_torchrun

    _, folder = references["llama3-gqa-bias"]
    common = ["--init_from", folder, "--data_path", corpus, "--save_model_dir", str(tmp_path), "--context_len", "32",
              "--batch_size", "8", "--lr", "1e-3", "--eval_every", "3", "--eval_max_batches", "2", "--log_every", "1"]
    train.main(common + ["--run_name", "one", "--max_steps", "6"])
    result = run_torchrun(common + ["--run_name", "two", "--max_steps", "6"], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (run_metrics(tmp_path / name) for name in ("one", "two"))
    assert [m["step"] for m in one] == [m["step"] for m in two] and one[-1]["step"] == 6
    for a, b in zip(one, two):  # the same global batch: only the order of float sums differs
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6), (a["step"], key)
    assert "weights identical on all 2 ranks" in (tmp_path / "two" / "train.log").read_text()

    # the same fine-tune sharded (--fsdp) on 2 ranks: the same steps too, saved as a sharded folder
    result = run_torchrun(common + ["--run_name", "sharded", "--max_steps", "6", "--fsdp"], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(one, run_metrics(tmp_path / "sharded")):
        assert a["step"] == b["step"]
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6), (a["step"], key)
    # (its weights are not compared elementwise: AdamW moves a weight whose gradient is at rounding level
    # by about lr either way, so another reduction order can leave such weights 2 x lr x steps apart)
    a, b = model_weights(tmp_path / "one" / "last.pt"), model_weights(tmp_path / "sharded" / "last.dcp")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    # and exports as any run: export.py reads the folder whole (--check: transformers' logits are ours)
    out = export.main([str(tmp_path / "sharded"), "--checkpoint", "last", "--to", "hf", str(tmp_path / "hf-sharded")])
    exported = pretrained.load_pretrained(out)[0].state_dict()
    assert all(torch.equal(exported[k], b[k]) for k in b)

    # stopped after step 3 and resumed: the uninterrupted run's losses and weights exactly, the
    # pretrained weights not read again (the checkpoint's are the run's)
    train.main(common + ["--run_name", "stopped", "--max_steps", "3"])
    train.main(common + ["--run_name", "stopped", "--max_steps", "6", "--resume", "auto"])
    assert [(m["step"], m.get("train_loss")) for m in run_metrics(tmp_path / "stopped")] == \
        [(m["step"], m.get("train_loss")) for m in one]
    a, b = model_weights(tmp_path / "one" / "last.pt"), model_weights(tmp_path / "stopped" / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def serve_a_hub(models: dict[str, str]):
    """A local stand-in for the Hugging Face hub (HF_ENDPOINT): each repo id in `models` serves the
    files of its folder; "<org>/gated" answers as a gated repository does, anything else as a
    repository that does not exist. Returns (server, base URL, requests seen)."""
    import hashlib
    import http.server
    import threading

    commit = "0123456789abcdef0123456789abcdef01234567"
    seen = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def refuse(self, status: int, code: str):
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def answer(self, body: bytes, content_type: str, etag: str = ""):
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{etag or hashlib.sha256(body).hexdigest()}"')
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            parts = self.path.split("?")[0].strip("/").split("/")
            if parts[:2] == ["api", "models"]:
                repo = "/".join(parts[2:4])
                if repo.endswith("/gated"):
                    return self.refuse(403, "GatedRepo")
                if repo not in models:
                    return self.refuse(401, "RepoNotFound")
                names = sorted(os.listdir(models[repo]))
                if parts[4:5] == ["tree"]:  # the file listing
                    tree = [{"type": "file", "path": n, "size": os.path.getsize(os.path.join(models[repo], n)),
                             "oid": hashlib.sha1(n.encode()).hexdigest()} for n in names]
                    return self.answer(json.dumps(tree).encode(), "application/json")
                files = [{"rfilename": n} for n in names]
                return self.answer(json.dumps({"id": repo, "sha": commit, "siblings": files}).encode(), "application/json")
            repo, filename = "/".join(parts[:2]), "/".join(parts[4:])  # <org>/<name>/resolve/<revision>/<file>
            if repo not in models or not os.path.isfile(os.path.join(models[repo], filename)):
                return self.refuse(404, "EntryNotFound")
            with open(os.path.join(models[repo], filename), "rb") as f:
                self.answer(f.read(), "application/octet-stream")

        do_HEAD = do_GET

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", seen


@pytest.mark.slow
def test_a_hub_id_downloads_through_hf_endpoint_and_gated_or_unknown_ones_say_what_to_do(tmp_path, monkeypatch,
                                                                                          references):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants as constants  # read once at import: point them at this server and cache

    reference, folder = references["qwen2"]
    server, url, seen = serve_a_hub({"tinylab-test/tiny-qwen": folder})
    try:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.setenv("HF_TOKEN", "hf_tinylab_test")  # sent with every request
        model, cfg = pretrained.load_pretrained("tinylab-test/tiny-qwen")
        tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert (model(tokens) - reference(tokens).logits).abs().max() < 1e-4 * reference(tokens).logits.abs().max()
        assert any("model.safetensors" in path for path, _ in seen)  # it came over HTTP, into that cache
        assert {token for path, token in seen if "tinylab-test" in path} == {"Bearer hf_tinylab_test"}, seen
        assert list((tmp_path / "hub").glob("models--tinylab-test--tiny-qwen/snapshots/*/model.safetensors"))
        # Gated and unknown ids, as a user meets them: `python sample.py --model ID` through the same hub
        # and cache exits 2 with one line that says what to do, and writes nothing.
        environment = {"HF_ENDPOINT": url, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "0",
                       "HF_TOKEN": "hf_tinylab_test"}
        for name, pattern in (("tinylab-test/gated", "tinylab-test/gated is gated .* set HF_TOKEN"),
                              ("tinylab-test/nothing", "the Hugging Face hub has no model 'tinylab-test/nothing'")):
            result = run_bad_input("sample.py", ["--model", name], tmp_path, "--model: ", env=environment)
            assert re.search(pattern, result.stderr), name
    finally:
        server.shutdown()
        server.server_close()
