"""Export a trained run as a Hugging Face checkpoint folder (config.json, model.safetensors and the
tokenizer's files, which `transformers.AutoModelForCausalLM.from_pretrained(OUT)` and
`AutoTokenizer.from_pretrained(OUT)` open, and `--init_from OUT` / `--model OUT` open again here),
or for TransformerLens.

    python export.py runs/<run> --to hf OUT
    python export.py runs/<run>/last.pt --to hf OUT --check false
    python export.py runs/<run> --to transformer_lens OUT    # interp.load_transformer_lens(OUT)

Learned-position runs (LayerNorm, gelu / gelu_tanh / relu / relu2 MLPs) become GPT-2
(GPT2LMHeadModel), rotary SwiGLU RMSNorm runs Llama (LlamaForCausalLM), Qwen2 with --qkv_bias
alone, Qwen3 with QK-norm. A piece with no counterpart there (an attention sink, soft-capped
logits, a ReLU² rotary MLP, ...) is refused by name. Tokenizers: a char run gets a tokenizer.json of
its characters (one token each), gpt2 GPT-2's own files, a tokenizer.json run a copy of it; other
tiktoken encodings get none (the log says so). With transformers installed, --check (the default)
opens the folder with it and compares its logits with ours before the folder takes its name.

--to transformer_lens writes transformer_lens.json (the installed TransformerLens's major version,
its class and config) and model.safetensors (the weights under its names): a TransformerBridge
around TransformerLens 4's native model, or a HookedTransformer for 2 and 3 (interp.to_transformer_lens
says what each has). Any task exports; --check opens it and compares logits the same way.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import torch

from activations import load_run
from interp import export_transformer_lens, load_transformer_lens, transformer_lens_version
from config import ConfigError, need, need_one_of, parse_flags, section
from pretrained import export_hf
from session import run_command

_what = section("what to export")
_how = section("how")
TARGETS = ("hf", "transformer_lens")


@dataclass
class ExportSettings:
    run_dir: str = _what("", "a run directory (runs/<run>) or a checkpoint file in one")
    out: str = _what("", "the folder to write: new, or empty")
    checkpoint: str = _what("best", "best | last: which checkpoint of a run directory (the other when it is missing)")
    to: str = _how("hf", "hf: a Hugging Face checkpoint folder | transformer_lens: for the installed TransformerLens")
    check: bool = _how(True, "open the export (with transformers when installed, for hf) and compare its logits with ours")

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


def check_with_transformer_lens(folder: str, model, vocab: int) -> float:
    """Max |logit difference| between the TransformerLens model of `folder` and ours on a fixed batch,
    relative to the largest logit (at least 1)."""
    theirs = load_transformer_lens(folder, "cpu")
    T = min(model.cfg.context_len, 64)
    tokens = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.float().cpu()(tokens)
        return (theirs(tokens).float() - ours).abs().max().item() / max(1.0, ours.abs().max().item())


def main(argv: list[str] | None = None) -> str:
    cfg, _ = parse_flags(ExportSettings, argv, "export.py", __doc__.split("\n\n")[0], positional=("run_dir", "out"))
    if cfg.to == "transformer_lens":
        try:
            version = transformer_lens_version()
        except ImportError:
            raise ConfigError("--to transformer_lens: TransformerLens is not installed: pip install transformer_lens "
                              "(version 4), or 'transformer_lens<4' for a HookedTransformer") from None
    run = load_run(cfg.run_dir, "cpu", prefer=cfg.checkpoint)
    if cfg.to == "transformer_lens":
        return export_to_transformer_lens(cfg, run, version)
    if run.cfg.task != "text":
        raise ConfigError(f"--run_dir: {run.checkpoint_path} is a {run.cfg.task} run; Hugging Face's causal-LM "
                          f"classes are language models, so export.py exports text runs (--task text)")
    tokenizer = run.data.tokenizer
    out, staging = _staging(cfg.out)
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
        _finish(staging, out)
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


def export_to_transformer_lens(cfg: ExportSettings, run, version: int) -> str:
    out, staging = _staging(cfg.out)
    try:
        try:
            record = export_transformer_lens(run.model, staging)
        except ValueError as e:
            raise ConfigError(f"--to transformer_lens: {run.checkpoint_path}: {e}") from None
        difference = check_with_transformer_lens(staging, run.model, run.model.vocab_size) if cfg.check else None
        if difference is not None and difference > 1e-5 * max(1.0, run.model.cfg.num_blocks / 4):  # float32 rounding
            raise RuntimeError(f"TransformerLens {version}'s model of the export gives logits {difference:.2e} "
                               f"(relative) away from ours; nothing was written (please report this)")
        _finish(staging, out)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    print(f"{run.checkpoint_path} (step {run.step}) -> {out}: TransformerLens {version} {record['class']} · "
          f"{run.model.num_params():,} parameters · interp.load_transformer_lens({cfg.out!r}) opens it", file=sys.stderr)
    if difference is not None:
        print(f"checked: TransformerLens gives our logits to {difference:.1e} of the largest", file=sys.stderr)
    return out


def _staging(out: str) -> tuple[str, str]:
    """(the folder to write, a temporary folder beside it that takes its name once whole)."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    return out, tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)


def _finish(staging: str, out: str) -> None:
    if os.path.isdir(out):
        os.rmdir(out)  # empty, checked by validate
    os.replace(staging, out)


if __name__ == "__main__":
    run_command(main)
