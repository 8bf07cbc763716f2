"""Export a trained run as a Hugging Face checkpoint folder (config.json, model.safetensors and the
tokenizer's files, which `transformers.AutoModelForCausalLM.from_pretrained(OUT)` and
`AutoTokenizer.from_pretrained(OUT)` open, and `--init_from OUT` / `--model OUT` open again here),
or for TransformerLens.

    python export.py runs/<run> --to hf OUT
    python export.py runs/<run>/last.pt --to hf OUT --check false
    python export.py runs/<run> --to transformer_lens OUT    # interop.transformerlens.load_transformer_lens(OUT)

Learned-position runs (LayerNorm, gelu / gelu_tanh / relu / relu2 MLPs) become GPT-2
(GPT2LMHeadModel), rotary SwiGLU RMSNorm runs Llama (LlamaForCausalLM), Qwen2 with --qkv_bias
alone, Qwen3 with QK-norm. A piece with no counterpart there (an attention sink, soft-capped
logits, a ReLU² rotary MLP, ...) is refused by name. Tokenizers: a char run gets a tokenizer.json of
its characters (one token each), gpt2 GPT-2's own files, a tokenizer.json run a copy of it; other
tiktoken encodings get none (the log says so). With transformers installed, --check (the default)
opens the folder with it and compares its logits with ours before the folder takes its name.

--to transformer_lens writes transformer_lens.json (the installed TransformerLens's major version,
its class and config) and model.safetensors (the weights under its names): a TransformerBridge
around TransformerLens 4's native model, or a HookedTransformer for 2 and 3 (interop.transformerlens.to_transformer_lens
says what each has). Any task exports; --check opens it and compares logits the same way.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from analysis.runs import load_run
from interop.transformerlens import export_transformer_lens, load_transformer_lens, transformer_lens_version
from config import ConfigError, need, need_one_of, parse_flags, section
from interop.huggingface import export_hf
from plumbing.session import run_command
from utils import new_or_empty, write_folder

_what = section("what to export")
_how = section("how")
TARGETS = ("hf", "transformer_lens")


@dataclass
class ExportConfig:
    run_dir: str = _what("", "a run directory (runs/<run>) or a checkpoint file in one")
    out: str = _what("", "the folder to write: new, or empty")
    checkpoint: str = _what("best", "best | last: which checkpoint of a run directory (the other when it is missing)")
    to: str = _how("hf", "hf: a Hugging Face checkpoint folder | transformer_lens: for the installed TransformerLens")
    check: bool = _how(True, "open the export (with transformers when installed, for hf) and compare its logits with ours")

    def validate(self) -> "ExportConfig":
        need(bool(self.run_dir), "run_dir", "name a run: python export.py runs/<run> --to hf OUT")
        need(os.path.exists(self.run_dir), "run_dir", f"{self.run_dir} does not exist")
        need(bool(self.out), "out", "name the folder to write: python export.py runs/<run> --to hf OUT")
        need(new_or_empty(self.out), "out",
             f"{self.out} exists and is not an empty folder; name a new one (nothing was overwritten)")
        need_one_of(self, "to", TARGETS)
        need_one_of(self, "checkpoint", ("best", "last"))
        return self


def _logit_difference(theirs, model) -> float:
    """Max |logit difference| between `theirs` (tokens -> logits) and our model on a fixed batch,
    relative to our largest logit (at least 1)."""
    T = min(model.cfg.context_len, 64)
    tokens = torch.randint(0, model.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.float().cpu()(tokens)
        return (theirs(tokens)[..., : ours.shape[-1]].float() - ours).abs().max().item() / max(1.0, ours.abs().max().item())


def check_with_transformers(folder: str, model) -> float | None:
    """_logit_difference for transformers' model of `folder`, or None when it is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return _logit_difference(lambda tokens: theirs(tokens).logits, model)


def check_with_transformer_lens(folder: str, model) -> float:
    """_logit_difference for the TransformerLens model of `folder`."""
    return _logit_difference(load_transformer_lens(folder, "cpu"), model)


def main(argv: list[str] | None = None) -> str:
    cfg, _ = parse_flags(ExportConfig, argv, "export.py", __doc__.split("\n\n")[0], positional=("run_dir", "out"))
    version = None
    if cfg.to == "transformer_lens":
        try:
            version = transformer_lens_version()
        except ImportError:
            raise ConfigError("--to transformer_lens: TransformerLens is not installed: pip install transformer_lens "
                              "(version 4), or 'transformer_lens<4' for a HookedTransformer") from None
    run = load_run(cfg.run_dir, "cpu", prefer=cfg.checkpoint)
    if cfg.to == "hf" and not run.data.generates_text:
        raise ConfigError(f"--run_dir: {run.checkpoint_path} is a {run.cfg.task} run; Hugging Face's causal-LM "
                          f"classes are language models, so --to hf exports text runs (--task text); "
                          f"--to transformer_lens takes any run")
    if cfg.to == "hf":  # (what the folder holds, for the log), its check, the bound on the check
        def write(folder):
            family, written = export_hf(run.model, run.data.tokenizer, folder)
            return f"{family} · {run.model.num_params():,} parameters · {written}"
        check, other, bound = check_with_transformers, "transformers", 1e-4
    else:
        def write(folder):
            record = export_transformer_lens(run.model, folder)
            return (f"TransformerLens {version} {record['class']} · {run.model.num_params():,} parameters · "
                    f"interop.transformerlens.load_transformer_lens({cfg.out!r}) opens it")
        # version 4 takes norms and rotary tables in float32 whatever the model's dtype
        check, other, bound = check_with_transformer_lens, f"TransformerLens {version}", 1e-5
    def write_and_check(staging):  # the folder is renamed to out only once written and checked
        try:
            described = write(staging)
        except ValueError as e:
            raise ConfigError(f"--to {cfg.to}: {run.checkpoint_path}: {e}") from None
        difference = check(staging, run.model) if cfg.check else None
        if difference is not None and difference > bound * max(1.0, run.model.cfg.num_blocks / 4):
            raise RuntimeError(f"{other}'s model of the export gives logits {difference:.2e} (relative) away from "
                               f"ours; nothing was written (please report this)")
        return described, difference

    out = os.path.abspath(cfg.out)
    described, difference = write_folder(out, write_and_check)
    print(f"{run.checkpoint_path} (step {run.step}) -> {out}: {described}", file=sys.stderr)
    if difference is not None:
        print(f"checked: {other} gives our logits to {difference:.1e} of the largest", file=sys.stderr)
    elif cfg.check:
        print("not checked: transformers is not installed", file=sys.stderr)
    return out


if __name__ == "__main__":
    run_command(main)
