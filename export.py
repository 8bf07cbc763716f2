"""Export a trained run as a Hugging Face checkpoint folder: config.json, model.safetensors and the
tokenizer's files, which `transformers.AutoModelForCausalLM.from_pretrained(OUT)` and
`AutoTokenizer.from_pretrained(OUT)` open, and `--init_from OUT` / `--model OUT` open again here.

    python export.py runs/<run> --to hf OUT
    python export.py runs/<run>/last.pt --to hf OUT --check false

Learned-position runs (LayerNorm, gelu / gelu_tanh / relu / relu2 MLPs) become GPT-2
(GPT2LMHeadModel), rotary SwiGLU RMSNorm runs Llama (LlamaForCausalLM), Qwen2 with --qkv_bias
alone, Qwen3 with QK-norm. A piece with no counterpart there (an attention sink, soft-capped
logits, a ReLU² rotary MLP, ...) is refused by name. Tokenizers: a char run gets a tokenizer.json of
its characters (one token each), gpt2 GPT-2's own files, a tokenizer.json run a copy of it; other
tiktoken encodings get none (the log says so). With transformers installed, --check (the default)
opens the folder with it and compares its logits with ours before the folder takes its name.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import torch

from activations import load_run
from config import ConfigError, need, need_one_of, parse_flags, section
from pretrained import export_hf
from session import run_command

_what = section("what to export")
_how = section("how")
TARGETS = ("hf",)


@dataclass
class ExportSettings:
    run_dir: str = _what("", "a run directory (runs/<run>) or a checkpoint file in one")
    out: str = _what("", "the folder to write: new, or empty")
    checkpoint: str = _what("best", "best | last: which checkpoint of a run directory (the other when it is missing)")
    to: str = _how("hf", "hf: a Hugging Face checkpoint folder")
    check: bool = _how(True, "open the export with transformers (when installed) and compare its logits with ours")

    def validate(self) -> "ExportSettings":
        need(bool(self.run_dir), "run_dir", "name a run: python export.py runs/<run> --to hf OUT")
        need(os.path.exists(self.run_dir), "run_dir", f"{self.run_dir} does not exist")
        need(bool(self.out), "out", "name the folder to write: python export.py runs/<run> --to hf OUT")
        need(not os.path.exists(self.out) or (os.path.isdir(self.out) and not os.listdir(self.out)), "out",
             f"{self.out} exists and is not an empty folder; name a new one (nothing was overwritten)")
        need_one_of(self, "to", TARGETS)
        need_one_of(self, "checkpoint", ("best", "last"))
        return self


def check_with_transformers(folder: str, model, vocab: int) -> float | None:
    """Max |logit difference| between transformers' model of `folder` and ours on a fixed batch,
    or None when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    T = min(model.cfg.context_len, 64)
    tokens = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.float().cpu()(tokens)
        return (theirs(tokens).logits[..., : ours.shape[-1]] - ours).abs().max().item()


def main(argv: list[str] | None = None) -> str:
    cfg, _ = parse_flags(ExportSettings, argv, "export.py", __doc__.split("\n\n")[0], positional=("run_dir", "out"))
    run = load_run(cfg.run_dir, "cpu", prefer=cfg.checkpoint)
    if run.cfg.task != "text":
        raise ConfigError(f"--run_dir: {run.checkpoint_path} is a {run.cfg.task} run; Hugging Face's causal-LM "
                          f"classes are language models, so export.py exports text runs (--task text)")
    tokenizer = run.data.tokenizer
    out = os.path.abspath(cfg.out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)  # renamed once whole
    try:
        try:
            family, written = export_hf(run.model, tokenizer, staging)
        except ValueError as e:
            raise ConfigError(f"--to hf: {run.checkpoint_path}: {e}") from None
        difference = check_with_transformers(staging, run.model, run.model.vocab_size) if cfg.check else None
        if difference is not None:
            scale = 1e-4 * max(1.0, run.model.cfg.num_blocks / 4)
            if difference > scale:
                raise RuntimeError(f"transformers' {family} model of the export gives logits {difference:.2e} "
                                   f"away from ours; nothing was written (please report this)")
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.replace(staging, out)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    print(f"{run.checkpoint_path} (step {run.step}) -> {out}: {family} · {run.model.num_params():,} parameters · "
          f"{written}", file=sys.stderr)
    if difference is not None:
        print(f"checked: transformers' {family} model gives our logits to {difference:.1e}", file=sys.stderr)
    elif cfg.check:
        print("not checked: transformers is not installed", file=sys.stderr)
    return out


if __name__ == "__main__":
    run_command(main)
