"""sample.py and KV-cache generation: the cached loop gives the uncached loop's tokens, for every
architecture, inside the context and after the window starts to slide."""

from __future__ import annotations


import pytest
import torch

import sample
from config import Config
from conftest import run_bad_input
from model import Transformer

ARCHITECTURES = {
    "gpt2-sink": dict(norm="layernorm", activation="gelu", attention_sink=True),
    "rope-gqa-qknorm-swiglu": dict(norm="rmsnorm", positional="rope", num_kv_heads=2, qk_norm=True,
                                   activation="swiglu", logit_softcap=4.0, tie_embeddings=False),
    "mqa-relu2-parameter-free": dict(norm="rmsnorm", num_kv_heads=1, activation="relu2", norm_weights=False),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_generation_gives_the_uncached_tokens(arch):
    torch.manual_seed(0)
    cfg = Config(num_blocks=2, num_heads=4, embedding_dim=32, mlp_dim=48, context_len=10, **ARCHITECTURES[arch])
    model = Transformer(cfg.validate(), 17).double().eval()  # float64: no near-tie may flip a draw
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    prompt = torch.randint(17, (2, 3), generator=torch.Generator().manual_seed(1))
    for new in (5, 12):  # inside the context of 10, then past it: the window slides
        runs = [model.generate(prompt, new, temperature=1.0, top_k=8, generator=torch.Generator().manual_seed(2),
                               use_cache=cache) for cache in (True, False)]
        assert runs[0].shape == (2, 3 + new) and torch.equal(runs[0], runs[1]), new
    greedy = [model.generate(prompt, 12, temperature=0, use_cache=cache) for cache in (True, False)]
    assert torch.equal(*greedy)


@pytest.mark.slow
def test_sample_py_samples_a_text_run(trained_runs, tmp_path, capsys):
    run = trained_runs["text"]  # rotary, multi-query, SwiGLU
    args = [run, "--start", "the ", "--num_samples", "2", "--max_new_tokens", "24", "--seed", "3", "--device", "cpu"]
    samples = sample.main(args)
    assert len(samples) == 2 and all(s.startswith("the ") and len(s) > 4 for s in samples)
    assert samples[0] != samples[1]  # two draws, not one printed twice
    out, err = capsys.readouterr()
    assert out.count("---------------") == 2 and samples[0] in out
    assert "best.pt" in err and "KV cache" in err and "ms/token" in err
    assert "window slides" in err  # 4 + 24 tokens outgrow the context of 16
    assert sample.main(args + ["--kv_cache", "false"]) == samples  # same seed, same tokens, either loop
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the ")
    assert sample.main(args[:1] + ["--start", f"FILE:{prompt}"] + args[3:] + ["--checkpoint", "last"]) == samples


# {text}, {modular}: the shared runs; {tmp}: this test's tmp_path. The fragments the line must hold.
BAD_INPUT = [
    (["{text}", "--start", "FILE:{tmp}/missing.txt"], ["--start: FILE:"]),
    (["{text}", "--start", "\u20ac"], ["--start: the run's tokenizer cannot write"]),
    (["{modular}"], ["--run_dir: ", "is a modular run"]),
    (["{tmp}/no-run"], ["--run_dir: "]),
    (["{text}", "--temperature", "-1"], ["--temperature"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("argv,fragments", BAD_INPUT, ids=["missing-prompt-file", "unwritable-prompt", "modular-run",
                                                             "missing-run", "negative-temperature"])
def test_sample_py_bad_input_names_the_flag(trained_runs, tmp_path, argv, fragments):
    """As a user meets it: `python sample.py ARGS` exits 2 with one line naming the flag, prints no
    sample and writes nothing."""
    argv = [a.format(text=trained_runs["text"], modular=trained_runs["modular"], tmp=tmp_path) for a in argv]
    result = run_bad_input("sample.py", argv, tmp_path, *fragments, watch=[trained_runs["text"], trained_runs["modular"]])
    assert result.stdout == ""
