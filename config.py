"""Every knob of a tinylab run: the `Config` dataclass, named presets, flag parsing, validation.

Resolution order, lowest to highest: dataclass defaults (the `grokking` preset) -> `--preset NAME`
-> `--config FILE` -> flags typed on the command line. Stdlib only, so anything may import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field


class ConfigError(Exception):
    """Bad input a user can fix: one line naming the flag (or file) and what to do. Every rank finds it
    alike, so rank 0 alone says it; `every_rank`: one rank may find it alone (an out-of-memory error),
    so each rank that does says it."""
    every_rank = False


STEP_TIMEOUT_HELP = ("seconds a rank may wait on the others before the run is called hung: every live rank prints "
                     "its stack, the ranks that did not arrive are named and the run exits 3, to be restarted from "
                     "its last checkpoint (0: off)")


def section(title: str):
    """Returns a field factory whose knobs are listed under `title` in --help. `aliases` are other
    flags for the same field (an old spelling, say)."""

    def knob(default, help: str, aliases: tuple[str, ...] = ()):
        return field(default=default, metadata={"help": help, "group": title, "aliases": aliases})

    return knob


_run = section("run")
_task = section("task: modular arithmetic")
_dyck = section("task: Dyck languages")
_text = section("task: text")
_model = section("model")
_optim = section("optimization")
_eval = section("evaluation and early stopping")
_log = section("logging, checkpoints, W&B")
_runtime = section("runtime")

TASKS = ("modular", "dyck", "text")
OPERATIONS = ("add", "subtract", "multiply", "divide")
NORMS = ("none", "layernorm", "rmsnorm")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "relu2", "swiglu")
ROPE_SCALINGS = ("linear", "llama3")  # rope_type values of a Hugging Face rope_scaling dict we apply
POSITIONALS = ("learned", "rope")
SCHEDULES = ("cosine", "linear", "constant", "plateau")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")
SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)


@dataclass
class OptimConfig:
    """The optimisation settings every trainer shares (train.py, sae.py, lens.py inherit them, each
    with its own defaults through `override`): the learning rate's peak, warm-up and schedule, Adam's
    betas, gradient clipping. `optimizer.LRSchedule` and `optimizer.load_optimizer_states` take this."""

    lr: float = _optim(1e-2, "AdamW learning rate (peak)")
    beta1: float = _optim(0.9, "AdamW beta1")
    beta2: float = _optim(0.99, "AdamW beta2")
    warmup_steps: int = _optim(10, "linear warm-up steps")
    lr_schedule: str = _optim("constant", "after warm-up: cosine | linear (to min_lr_frac at the last step) | "
                                          "constant | plateau (x plateau_factor when the eval loss stalls)")
    min_lr_frac: float = _optim(0.1, "final LR as a fraction of the peak (cosine, linear), its floor (plateau)")
    plateau_factor: float = _optim(0.5, "plateau: multiply the LR by this when the eval loss stalls")
    plateau_patience: int = _optim(3, "plateau: evals without the eval loss improving by min_delta before a cut")
    min_delta: float = _optim(0.0, "smallest eval-loss decrease that counts as improvement (plateau; early stopping)")
    grad_clip: float = _optim(1.0, "clip the global gradient norm (0: off)")

    def validate_optimization(self) -> None:
        need_one_of(self, "lr_schedule", SCHEDULES)
        for name in ("lr", "grad_clip", "min_delta"):
            need(getattr(self, name) >= 0, name, f"must not be negative, got {getattr(self, name)}")
        need(self.warmup_steps >= 0, "warmup_steps", f"must be 0 or more, got {self.warmup_steps}")
        need(0 <= self.min_lr_frac <= 1, "min_lr_frac", f"must be in [0, 1], got {self.min_lr_frac}")
        for name in ("beta1", "beta2"):
            need(0 <= getattr(self, name) < 1, name, f"must be in [0, 1), got {getattr(self, name)}")
        need(0 < self.plateau_factor < 1, "plateau_factor", f"must be strictly between 0 and 1, got {self.plateau_factor}")
        need(self.plateau_patience >= 1, "plateau_patience", f"must be at least 1, got {self.plateau_patience}")


def override(name: str, default, help: str = ""):
    """A shared optimisation field with this program's default (and, if given, its own help text),
    for a config class that inherits OptimConfig: `lr: float = override("lr", 1e-3)`."""
    base = OptimConfig.__dataclass_fields__[name]
    return field(default=default, metadata={**base.metadata, "help": help or base.metadata["help"]})


@dataclass
class CorpusConfig:
    """Where the text task's tokens come from (train.py and prepare.py share them; corpus.py reads
    them): a text file, documents (.txt / .jsonl / .parquet, a folder or a glob) or token shards,
    prepared once into --cache_dir."""

    data_path: str = _text("data/tiny_shakespeare.txt",
                           "a text file (the default is downloaded from --data_url if missing); a folder or glob "
                           "of .txt / .jsonl / .parquet documents; or token shards: nanoGPT's train.bin/val.bin, "
                           "llm.c / modded-nanogpt .bin shards, a folder prepare.py wrote")
    data_url: str = _text(SHAKESPEARE_URL, "where to download --data_path from when it is missing")
    val_path: str = _text("", "the validation split, in any form --data_path takes (empty: val.bin or *_val_* "
                              "shards beside the data, else a held-out share, see --val_frac)")
    text_field: str = _text("text", "the field of .jsonl lines, or the column of .parquet files, that holds the text")
    tokenizer: str = _text("char", "char, a tiktoken encoding (gpt2, cl100k_base, o200k_base, ...), or a Hugging Face "
                                   "tokenizer.json (the file, or the folder that holds it; needs the tokenizers package)")
    val_frac: float = _text(0.1, "held out for validation when nothing names a split: the tail of one text "
                                 "file's tokens, or one document in every 1/val_frac")
    cache_dir: str = _text(os.environ.get("TINYLAB_CACHE_DIR") or "data/cache",
                           "where prepared token shards go (never beside the source), one folder per source and "
                           "tokenizer; the TINYLAB_CACHE_DIR environment variable sets this default")
    prepare_workers: int = _text(0, "processes that prepare documents into shards (0: every core this "
                                    "process may use)")
    shard_mb: float = _text(32.0, "MB of source per shard: the unit of work a prepare resumes by (another value "
                                  "makes another cache)")

    def validate_corpus(self) -> None:
        need(0 < self.val_frac < 1, "val_frac", f"must be strictly between 0 and 1, got {self.val_frac}")
        need(self.prepare_workers >= 0, "prepare_workers", f"must be 0 or more, got {self.prepare_workers}")
        need(bool(self.data_path), "data_path", "is empty; name a text file, a folder or glob of documents, or shards")
        need(bool(self.text_field), "text_field", "is empty; name the field that holds the text")
        need(bool(self.cache_dir), "cache_dir", "is empty; name a folder for the prepared shards")
        need(self.shard_mb > 0, "shard_mb", f"must be above 0, got {self.shard_mb}")


_pretrained = section("a pretrained model instead of a run")
PRETRAINED_FILE = "pretrained.json"  # what makes <runs_dir>/<model name>/ stand for a pretrained model


def pretrained_folder(model: str, runs_dir: str) -> str:
    """Where a pretrained model stands as a run directory does: <runs_dir>/<its last name part>/
    (gpt2 -> runs/gpt2, Qwen/Qwen2.5-0.5B -> runs/Qwen2.5-0.5B, /models/my-llama/ -> runs/my-llama)."""
    return os.path.join(runs_dir, os.path.basename(os.path.normpath(os.path.expanduser(model))))


@dataclass
class ModelSourceConfig:
    """What the analysis programs (activations.py, sae.py, lens.py, interp.py) read: a run (each
    program's own run_dir field) or, with --model, a pretrained checkpoint and the text it reads
    (sample.py, which reads no text, has --model alone). `validate_source` points run_dir at the
    model's folder, so that everything a program writes under a run goes under
    <runs_dir>/<model name>/ instead."""

    model: str = _pretrained("", "a pretrained model instead of a run: a Hugging Face hub id (gpt2, "
                                 "Qwen/Qwen2.5-0.5B) or a folder in its layout (config.json + *.safetensors); "
                                 "what a run would hold goes under <runs_dir>/<model name>/")
    data_path: str = _pretrained("data/tiny_shakespeare.txt", "with --model: the text it reads, anything train.py's "
                                                              "--data_path takes (the default is downloaded when "
                                                              "missing); with a run: where its corpus is now, if it moved")
    context_len: int = _pretrained(0, "with --model: tokens per window (0: the model's context, at most 1024)")
    runs_dir: str = _pretrained("runs", "with --model: the folder that holds <model name>/ (train.py's --runs_dir)")

    def validate_source(self, run_flag: str = "run_dir") -> None:
        need(self.context_len >= 0, "context_len", f"must be 0 or more, got {self.context_len}")
        if not self.model:
            need(bool(self.run_dir), run_flag, "name a run directory or checkpoint (runs/<run>), or a pretrained "
                                               "model with --model (a hub id such as gpt2, or a folder)")
            return
        need(bool(self.data_path), "data_path", "is empty; name the text the model should read")
        folder = pretrained_folder(self.model, self.runs_dir)
        need(not self.run_dir or os.path.normpath(self.run_dir) == os.path.normpath(folder), "model",
             f"name a run ({self.run_dir}) or --model ({self.model}), not both")
        self.run_dir = folder

    @classmethod
    def corpus_at(cls, data_path: str = "") -> "ModelSourceConfig":
        """Settings that say only where a run's corpus is now (--data_path; empty: where the run left it), for
        the subcommands that open a run's SAE or lens (load_run then names --data_path if the corpus is gone)."""
        return cls(**({"data_path": data_path} if data_path else {}))

    def pretrained_spec(self) -> dict | None:
        """--model's settings as pretrained.json records them (None without --model)."""
        if not self.model:
            return None
        return {"model": self.model, "data_path": self.data_path, "context_len": self.context_len}


@dataclass
class Config(OptimConfig, CorpusConfig):
    # The defaults are the `grokking` preset: `python train.py` memorises the training pairs by
    # step ~80, groks by step 290-540 and learns the circuit Nanda et al. describe (logits in a few
    # key frequencies: restricted loss at or below the full loss, excluded loss high). It takes
    # full-batch AdamW with a large LR (1e-2; the paper's is 1e-3), weight decay 0.5 on tied
    # embeddings, beta2 0.99 and init std 0.05. Measured on p = 113, steps to val_acc 0.99 for
    # seeds 0-4 (single-thread runs; thread count changes float rounding and so the trajectory):
    #   init 0.05 (default): 310 / 510 / 380 / 300 / 350, train_acc 0.99 at 70-80 with val ~0.25
    #   init 0.02: 530 / 690 / 270 / 590 / 380, no gap (train and val rise together)
    #   init 0.08: seed 0 610, train_acc 0.99 at step 60 with val 0.05
    #   beta2 0.98: seeds 0 / 1 took > 1,200 / 1,060 (wd 0.5), 520 / > 1,500 (wd 1.0)
    #   Grokfast (lamb 2) on AdamW: slower at lr 3e-3, diverged at 1e-2.
    # Muon on the hidden matrices groks in about 300 steps too (the `grokking_muon` preset, lr 0.3 /
    # decay 0.5) but learns a dense solution that uses every frequency, which the Fourier tools
    # cannot explain; lowering its decay restores sparsity only at 0.1, where it no longer groks fast.

    # ---- run ----
    run_name: str = _run("", "run name; the run lives in <runs_dir>/<run_name>/ (empty: generated)",
                         aliases=("--run",))
    runs_dir: str = _run("runs", "directory that holds run directories", aliases=("--save_model_dir",))
    preset: str = _run("grokking", "named set of defaults applied before --config and flags")
    seed: int = _run(0, "seed for the data split, initialisation and sampling")
    resume: str = _run("", "'auto' (resume <run>/last.pt if it exists) or a checkpoint / run dir")
    claim_timeout: float = _run(300.0, "a run directory whose writer on another host has sent no heartbeat for this "
                                       "many seconds may be taken over (a live writer on this host never is)")

    # ---- task ----
    task: str = _task("modular", "modular | dyck | text")
    modulus: int = _task(113, "p: numbers are 0..p-1 (prime for divide)")
    operation: str = _task("add", "add | subtract | multiply | divide (mod p)")
    frac_train: float = _task(0.3, "fraction of all p*p pairs used for training (rest: validation)")

    dyck_types: int = _dyck(2, "number of bracket types")
    dyck_max_depth: int = _dyck(6, "maximum nesting depth")
    dyck_min_len: int = _dyck(2, "minimum number of brackets in a sequence (even)")
    dyck_max_len: int = _dyck(30, "maximum number of brackets in a sequence (even)")
    dyck_num_train: int = _dyck(20000, "distinct training sequences")
    dyck_num_val: int = _dyck(2000, "distinct validation sequences (never in training)")

    # ---- model ----
    init_from: str = _model("", "start from a pretrained checkpoint: a Hugging Face hub id (gpt2, Qwen/Qwen2.5-0.5B) "
                                "or a folder in its layout (config.json + *.safetensors); sets the task, tokenizer "
                                "and every shape flag (--context_len may crop)")
    num_blocks: int = _model(1, "transformer blocks")
    num_heads: int = _model(4, "attention heads per block")
    embedding_dim: int = _model(128, "d_model, the residual stream width")
    mlp_dim: int = _model(512, "d_mlp, MLP hidden width (0: 4 * embedding_dim, or 8/3 x under swiglu)")
    context_len: int = _model(3, "maximum sequence length (positional embeddings)")
    norm: str = _model("none", "none | layernorm | rmsnorm (pre-norm blocks and a final norm)")
    norm_weights: bool = _model(True, "norms (and QK-norm) carry a learned weight; false: parameter-free, as nanochat's")
    head_dim: int = _model(0, "width of each attention head (0: embedding_dim / num_heads; Qwen3 sets its own)")
    norm_eps: float = _model(0.0, "epsilon of the norms (0: PyTorch's defaults, 1e-5 for layernorm and the dtype's "
                                  "machine epsilon for rmsnorm)")
    activation: str = _model("relu", "relu | gelu | gelu_tanh (GPT-2's tanh approximation) | relu2 (ReLU squared) | swiglu (SiLU-gated, a third matrix; "
                                     "mlp_dim 0: 8/3 x embedding_dim, rounded up to a multiple of 32)")
    positional: str = _model("learned", "learned (absolute position embeddings) | rope (rotary, on queries and keys)")
    rope_base: float = _model(10000.0, "RoPE: base of the rotation frequencies")
    rope_scaling: str = _model("", "RoPE frequency scaling as Hugging Face's rope_scaling JSON: "
                                   "{\"rope_type\": \"llama3\", \"factor\": 32, \"low_freq_factor\": 1, "
                                   "\"high_freq_factor\": 4, \"original_max_position_embeddings\": 8192}, or "
                                   "linear with a factor (empty: none)")
    qk_norm: bool = _model(False, "RMSNorm each query and key head before the rotation (Qwen3, OLMo 2, nanochat)")
    num_kv_heads: int = _model(0, "key/value heads: fewer than num_heads is grouped-query attention, 1 multi-query "
                                  "(0: num_heads)")
    logit_softcap: float = _model(0.0, "soft-cap the logits: cap * tanh(logits / cap) (0: off; Gemma 2 uses 30, "
                                       "modded-nanogpt 15)")
    tie_embeddings: bool = _model(True, "share the embedding and unembedding matrices")
    attention_only: bool = _model(False, "blocks without MLPs")
    bias: bool = _model(True, "biases in linear layers and norms")
    qkv_bias: bool = _model(False, "biases on the query, key and value projections even with --bias false (Qwen2)")
    vocab_size: int = _model(0, "embedding rows (0: the tokenizer's vocabulary, padded to a multiple of 64 above 256)")
    dropout: float = _model(0.0, "dropout on attention weights and residual branches")
    attention_sink: bool = _model(False, "learnable per-head sink logit (attention may go nowhere)")
    init_std: float = _model(0.05, "std of the normal initialisation of weight matrices")
    scale_residual_init: bool = _model(True, "GPT-2: scale output projections' init std by 1/sqrt(2 * blocks)")
    zero_init_outputs: bool = _model(False, "start the attention and MLP output projections (and an untied "
                                            "unembedding) at zero, as nanochat and modded-nanogpt do")

    # ---- optimization ----
    max_steps: int = _optim(3000, "optimizer steps (0: use --epochs)")
    epochs: float = _optim(0.0, "passes over the training set, used when --max_steps is 0")
    batch_size: int = _optim(0, "global batch (sequences per optimizer step, all ranks); 0: full batch")
    accumulation_steps: int = _optim(1, "micro-batches per optimizer step")
    weight_decay: float = _optim(0.5, "AdamW decoupled weight decay (matrices and embeddings)")
    decay_all_params: bool = _optim(False, "also decay biases, norms and sinks (plain AdamW on everything)")
    use_muon: bool = _optim(False, "Muon for hidden 2-D matrices, AdamW for the rest")
    muon_lr: float = _optim(0.3, "Muon learning rate (peak)")
    muon_momentum: float = _optim(0.95, "Muon momentum (Nesterov)")
    muon_weight_decay: float = _optim(0.5, "Muon decoupled weight decay")
    grokfast_lamb: float = _optim(0.0, "Grokfast: add lamb x EMA of the gradient to the gradient (0: off)")
    grokfast_alpha: float = _optim(0.98, "Grokfast: decay of that gradient EMA")

    # ---- evaluation and early stopping ----
    eval_every: int = _eval(10, "evaluate every N optimizer steps")
    eval_max_batches: int = _eval(0, "cap on validation batches per eval (0: the whole split)")
    eval_batch_size: int = _eval(0, "sequences per validation batch (0: the whole split for modular and "
                                    "Dyck, batch_size for text)")
    target_val_acc: float = _eval(0.99, "stop once val_acc reaches this (0: off)")
    patience: int = _eval(0, "stop after N evals without val_loss improving by min_delta (0: off)")
    track_progress: bool = _eval(False, "modular addition: also log Nanda et al.'s progress measures at each eval "
                                        "(restricted/excluded loss, Fourier gini, weight norm) and plot them")

    # ---- logging, checkpoints, W&B ----
    log_every: int = _log(10, "log training metrics every N optimizer steps")
    save_model: bool = _log(True, "write last.pt and best.pt")
    save_every: int = _log(500, "write last.pt every N optimizer steps (0: only at the end)")
    sample_tokens: int = _log(0, "tokens sampled from fixed prompts at each eval (text)")
    temperature: float = _log(0.8, "sampling temperature")
    top_k: int = _log(200, "sample from the k most likely tokens (0: all)")
    wandb_enabled: bool = _log(False, "log to Weights & Biases (settings from .env; WANDB_MODE=offline works)")
    wandb_project: str = _log("", "W&B project (empty: WANDB_PROJECT from the environment or .env, else tinylab)")
    wandb_entity: str = _log("", "W&B entity (empty: WANDB_ENTITY from the environment or .env, else your default)")
    rclone_every: int = _log(10, "with RCLONE_DEST set, copy the run directory there every N evals (0: only at the end)")

    # ---- runtime ----
    device: str = _runtime("auto", "auto | cpu | cuda | mps")
    dtype: str = _runtime("auto", "auto (bf16 autocast on capable GPUs, else fp32) | float32 | bfloat16 | float16")
    torch_compile: bool = _runtime(False, "torch.compile the model (slow start; worth it on GPUs)")
    fsdp: bool = _runtime(False, "shard weights, gradients and optimizer state over the ranks (FSDP2: each block "
                                 "and the root); checkpoints become last.dcp/ folders that resume on any number of ranks")
    activation_checkpointing: bool = _runtime(False, "recompute each block's activations during the backward pass "
                                                     "instead of keeping them: less memory, about a third more compute")
    step_timeout: float = _runtime(900.0, STEP_TIMEOUT_HELP)

    def validate(self) -> "Config":
        """Raises ConfigError naming the first flag whose value cannot work."""

        for name, choices in (
            ("task", TASKS), ("operation", OPERATIONS), ("norm", NORMS), ("activation", ACTIVATIONS),
            ("dtype", DTYPES), ("device", DEVICES), ("preset", PRESETS), ("positional", POSITIONALS),
        ):
            need_one_of(self, name, choices)
        for name in ("num_blocks", "num_heads", "embedding_dim", "context_len", "accumulation_steps",
                     "eval_every", "log_every", "dyck_types", "dyck_num_train", "dyck_num_val"):
            need(getattr(self, name) >= 1, name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("mlp_dim", "num_kv_heads", "max_steps", "batch_size", "save_every", "patience",
                     "sample_tokens", "top_k", "eval_max_batches", "eval_batch_size", "rclone_every"):
            need(getattr(self, name) >= 0, name, f"must be 0 or more, got {getattr(self, name)}")
        self.validate_optimization()
        for name in ("muon_lr", "weight_decay", "muon_weight_decay", "epochs", "init_std", "temperature",
                     "grokfast_lamb", "claim_timeout", "logit_softcap"):
            need(getattr(self, name) >= 0, name, f"must not be negative, got {getattr(self, name)}")
        need_name(self.run_name, "run_name")
        need(self.head_dim >= 0, "head_dim", f"must be 0 or more, got {self.head_dim}")
        need(self.head_dim > 0 or self.embedding_dim % self.num_heads == 0, "num_heads",
             f"embedding_dim {self.embedding_dim} is not divisible by num_heads {self.num_heads}; "
             f"pick a head count that divides it (or set --head_dim)")
        need(self.norm_eps >= 0, "norm_eps", f"must not be negative, got {self.norm_eps}")
        need(self.vocab_size >= 0, "vocab_size", f"must be 0 or more, got {self.vocab_size}")
        rope_scaling(self)  # raises naming --rope_scaling
        need(self.num_kv_heads == 0 or self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
             f"{self.num_kv_heads} does not divide num_heads {self.num_heads}: each key/value head serves an equal "
             f"group of query heads; pick a divisor of {self.num_heads}")
        head_dim = self.head_dim or self.embedding_dim // self.num_heads
        need(self.positional != "rope" or head_dim % 2 == 0, "positional",
             f"rope rotates pairs of dimensions, but the head size is {head_dim}, odd; "
             f"change --embedding_dim, --num_heads or --head_dim")
        need(self.rope_base > 1, "rope_base", f"must be above 1, got {self.rope_base}")
        need(0 < self.frac_train < 1, "frac_train", f"must be strictly between 0 and 1, got {self.frac_train}")
        self.validate_corpus()
        need(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        need(0 <= self.target_val_acc <= 1, "target_val_acc", f"must be in [0, 1], got {self.target_val_acc}")
        for name in ("muon_momentum", "grokfast_alpha"):
            need(0 <= getattr(self, name) < 1, name, f"must be in [0, 1), got {getattr(self, name)}")
        need(self.max_steps > 0 or self.epochs > 0, "max_steps", "set --max_steps or --epochs above 0")
        check_step_timeout(self.step_timeout)
        if self.fsdp:
            need(self.dtype != "float16", "fsdp", "float16 needs a gradient scaler that sees every shard; use "
                                                  "--dtype bfloat16 (or auto) with --fsdp")
            need(not self.grokfast_lamb, "fsdp", "the Grokfast gradient average is kept whole on every rank; drop "
                                                 "--grokfast_lamb or --fsdp")
            need(not self.track_progress, "fsdp", "the progress measures read whole weight matrices at every eval; "
                                                  "drop --track_progress (a model that small needs no sharding)")
        if self.task == "modular":
            need(self.modulus >= 2, "modulus", f"must be at least 2, got {self.modulus}")
            if self.operation == "divide":
                need(_is_prime(self.modulus), "modulus",
                     f"{self.modulus} is not prime, so division mod p is not defined; use a prime")
            need(self.context_len >= 3, "context_len",
                 f"a modular example 'a b =' has 3 tokens; context_len {self.context_len} is too short")
        need(not self.track_progress or (self.task == "modular" and self.operation == "add"), "track_progress",
             f"the progress measures are Fourier measures of modular addition; this run is "
             f"{self.task if self.task != 'modular' else self.operation}. Drop --track_progress")
        if self.task == "dyck":
            need(self.dyck_min_len % 2 == 0 and self.dyck_min_len >= 2, "dyck_min_len",
                 f"must be an even number >= 2, got {self.dyck_min_len}")
            need(self.dyck_max_len % 2 == 0 and self.dyck_max_len >= self.dyck_min_len, "dyck_max_len",
                 f"must be even and >= dyck_min_len ({self.dyck_min_len}), got {self.dyck_max_len}")
            need(self.dyck_max_depth >= 1, "dyck_max_depth", f"must be at least 1, got {self.dyck_max_depth}")
            need(self.context_len >= self.dyck_max_len + 1, "context_len",
                 f"Dyck sequences need dyck_max_len + 1 = {self.dyck_max_len + 1} positions "
                 f"(BOS, brackets, EOS, shifted by one); got {self.context_len}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")


MIN_STEP_TIMEOUT = 5.0  # seconds: below this a heartbeat's delay alone could look like a hang


def check_step_timeout(seconds: float) -> None:
    """--step_timeout, for every program that trains (train.py, sae.py, lens.py)."""
    need(seconds == 0 or seconds >= MIN_STEP_TIMEOUT, "step_timeout",
         f"{seconds:g} s would call a healthy run hung (a heartbeat takes a second to travel); "
         f"give {MIN_STEP_TIMEOUT:g} or more, or 0 for no watchdog")


def rope_scaling(cfg) -> dict | None:
    """--rope_scaling parsed: None, or a dict with "rope_type" linear (with "factor") or llama3 (with
    factor, low_freq_factor, high_freq_factor, original_max_position_embeddings), as Hugging Face
    writes it in config.json. Raises ConfigError naming the flag."""
    if not cfg.rope_scaling:
        return None
    try:
        spec = json.loads(cfg.rope_scaling)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--rope_scaling: not JSON ({e}); write e.g. '{{\"rope_type\": \"linear\", "
                          f"\"factor\": 2}}'") from None
    need(isinstance(spec, dict), "rope_scaling", "must be a JSON object")
    kind = spec.get("rope_type", spec.get("type"))
    need(kind in ROPE_SCALINGS, "rope_scaling", f"rope_type {kind!r} is not one of {', '.join(ROPE_SCALINGS)}")
    keys = ("factor",) + (("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                          if kind == "llama3" else ())
    for key in keys:
        need(isinstance(spec.get(key), (int, float)) and spec[key] > 0, "rope_scaling",
             f"{kind} needs a positive number for {key!r}")
    if kind == "llama3":
        need(spec["high_freq_factor"] > spec["low_freq_factor"], "rope_scaling",
             "high_freq_factor must be above low_freq_factor")
    return {"rope_type": kind, **{key: spec[key] for key in keys}}


def need(ok: bool, flag: str, message: str) -> None:
    """Validation, for Config and other tools' settings: raises ConfigError("--flag: message") unless ok."""
    if not ok:
        raise ConfigError(f"--{flag}: {message}")


def need_one_of(settings, name: str, choices) -> None:
    value = getattr(settings, name)
    need(value in choices, name, f"{value!r} is not one of {', '.join(choices)}")


def need_name(name: str, flag: str) -> None:
    """A run's (or an SAE's, a lens's) name: one directory, not a path."""
    need("/" not in name and "\\" not in name and name not in (".", ".."), flag,
         f"{name!r} is a path; give a name (--runs_dir says where it lives)")


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


# Named sets of defaults. `grokking` is the dataclass itself; the others list what differs from it.
PRESETS: dict[str, dict] = {
    "grokking": {},
    # Muon on the hidden matrices: val_acc 0.99 in about 300 steps, but through a dense solution
    # spread over every frequency (see the comment at the top of Config).
    "grokking_muon": dict(use_muon=True, lr=3e-3, weight_decay=1.0, beta2=0.98, muon_lr=0.3, muon_weight_decay=0.5,
                          init_std=0.02),
    # Nanda et al. 2023, "Progress measures for grokking via mechanistic interpretability":
    # 1 layer, 4 heads, d_model 128, d_mlp 512, ReLU, no LayerNorm, untied embeddings,
    # full-batch AdamW (lr 1e-3, weight decay 1.0 on every parameter, betas 0.9/0.98),
    # 10 warm-up steps, p = 113 and 30 % of pairs for training, TransformerLens init N(0, 0.8/sqrt(d_model)).
    # The paper trains 40k epochs.
    "nanda": dict(
        num_blocks=1, num_heads=4, embedding_dim=128, mlp_dim=512, activation="relu", norm="none",
        tie_embeddings=False, bias=True, use_muon=False, lr=1e-3, weight_decay=1.0,
        decay_all_params=True, beta1=0.9, beta2=0.98, batch_size=0, warmup_steps=10,
        lr_schedule="constant", grad_clip=0.0, init_std=0.8 / 128**0.5, scale_residual_init=False,
        max_steps=40000,
        eval_every=100, log_every=100, save_every=5000,
    ),
    "dyck": dict(
        task="dyck", num_blocks=2, num_heads=4, embedding_dim=128, mlp_dim=512, context_len=31,
        norm="layernorm", activation="gelu", tie_embeddings=True, batch_size=128, lr=3e-3,
        weight_decay=0.1, beta2=0.95, use_muon=True, muon_lr=0.02, muon_weight_decay=0.0,
        lr_schedule="cosine", warmup_steps=50, max_steps=2000, eval_every=100, log_every=50,
        target_val_acc=0.0, save_every=1000, init_std=0.02,
    ),
    # nanoGPT's shakespeare_char recipe: 6 blocks, 6 heads, 384 wide, context 256, batch 64,
    # dropout 0.2, AdamW at 1e-3 for 5,000 iterations (val loss 1.4697 in nanoGPT's README).
    "shakespeare_char_adamw": dict(
        task="text", tokenizer="char", num_blocks=6, num_heads=6, embedding_dim=384, mlp_dim=0,
        context_len=256, norm="layernorm", activation="gelu", tie_embeddings=True, bias=False,
        dropout=0.2, batch_size=64, lr=1e-3, weight_decay=0.1, beta2=0.99, use_muon=False,
        warmup_steps=100, lr_schedule="cosine", min_lr_frac=0.1, max_steps=5000, eval_every=250,
        eval_max_batches=20, log_every=10, target_val_acc=0.0, save_every=1000, sample_tokens=200,
        init_std=0.02,
    ),
    # The same model, data and batch, trained faster: Muon (lr 0.02, no decay) on the hidden matrices,
    # AdamW at 1e-3 on the embeddings, 2,000 steps. On an H100, evaluating every 100 steps:
    #   bench/shakespeare.py (one run after the other): this preset first reached val 1.47 at step
    #   1,100 (32 s, best 1.4416); shakespeare_char_adamw at step 1,800 (42 s; 5,000 steps took 77 s,
    #   best 1.4631 at step 2,000, then overfitting to 1.69).
    #   Six recipes at once (steps compare, seconds do not): Muon 0.02 / 2,500 steps at step 1,100
    #   (best 1.437); Muon 0.03 with AdamW 2e-3 / 2,000 at 1,200; AdamW 1e-3 / 5,000 at 1,600;
    #   AdamW 3e-3 / 2,500 at 1,800; Muon 0.05 / 1,500 or 2,500 never (1.58, 1.63).
    "shakespeare_char": dict(
        task="text", tokenizer="char", num_blocks=6, num_heads=6, embedding_dim=384, mlp_dim=0,
        context_len=256, norm="layernorm", activation="gelu", tie_embeddings=True, bias=False,
        dropout=0.2, batch_size=64, lr=1e-3, weight_decay=0.1, beta2=0.99, use_muon=True,
        muon_lr=0.02, muon_weight_decay=0.0, warmup_steps=100, lr_schedule="cosine", min_lr_frac=0.1,
        max_steps=2000, eval_every=250, eval_max_batches=20, log_every=10, target_val_acc=0.0,
        save_every=1000, sample_tokens=200, init_std=0.02,
    ),
    # The 2026 small-LM pieces on the same model, data and batch: rotary positions, QK-norm, ReLU²,
    # parameter-free RMSNorm, zero-started output projections, logits soft-capped at 15, no biases;
    # Muon 0.02 after a 20-step warm-up, AdamW 3e-3 on the (tied) embedding. Tuned at nanoGPT's
    # laptop shape on a 2-core CPU (bench/small_lm.py, seed 0, val loss at step 500 of 2,000):
    # this 1.875; untied 1.928 (softcap off 1.902, Muon 0.03 1.928, 0.05 1.930, 0.02 1.899; AdamW
    # 1e-2 1.928, 1e-3 1.938; SwiGLU 1.902; beta2 0.95 1.908); tied with no warm-up 1.903, without
    # the soft cap 1.897, with outputs started random 1.895, AdamW 1e-2 1.908.
    "shakespeare_char_modern": dict(
        task="text", tokenizer="char", num_blocks=6, num_heads=6, embedding_dim=384, mlp_dim=0,
        context_len=256, norm="rmsnorm", norm_weights=False, positional="rope", qk_norm=True,
        activation="relu2", tie_embeddings=True, zero_init_outputs=True, logit_softcap=15.0, bias=False,
        dropout=0.2, batch_size=64, lr=3e-3, weight_decay=0.0, beta2=0.99, use_muon=True,
        muon_lr=0.02, muon_weight_decay=0.0, warmup_steps=20, lr_schedule="cosine", min_lr_frac=0.1,
        max_steps=2000, eval_every=250, eval_max_batches=20, log_every=10, target_val_acc=0.0,
        save_every=1000, sample_tokens=200, init_std=0.02,
    ),
    # Fine-tuning a pretrained checkpoint (--init_from, which picks this preset unless --preset is given
    # and sets every shape flag from the checkpoint): nanoGPT's finetune_shakespeare (AdamW 3e-5,
    # constant, 32 sequences a step), evaluated and saved more often, for 200 steps.
    "finetune": dict(
        task="text", tokenizer="gpt2", dropout=0.0, batch_size=32, lr=3e-5, weight_decay=0.1, beta2=0.95,
        use_muon=False, warmup_steps=0, lr_schedule="constant", grad_clip=1.0, max_steps=200, eval_every=20,
        eval_max_batches=20, log_every=5, target_val_acc=0.0, save_every=100,
    ),
}

# Fields that shape the model, the data or the optimizer state: a resumed run keeps the checkpoint's.
Config.FIXED_ON_RESUME = (
    "task", "modulus", "operation", "frac_train", "dyck_types", "dyck_max_depth", "dyck_min_len",
    "dyck_max_len", "dyck_num_train", "dyck_num_val", "data_path", "val_path", "text_field", "tokenizer",
    "val_frac", "shard_mb", "seed",
    "num_blocks", "num_heads", "embedding_dim", "mlp_dim", "context_len", "norm", "activation",
    "tie_embeddings", "attention_only", "bias", "attention_sink", "use_muon", "decay_all_params",
    "norm_weights", "positional", "rope_base", "qk_norm", "num_kv_heads", "logit_softcap",
    "init_from", "head_dim", "norm_eps", "rope_scaling", "qkv_bias", "vocab_size",
)

# --help and the log list the sections in this order (the text task's are inherited, so would come last).
Config.SECTIONS = ("run", "task: modular arithmetic", "task: Dyck languages", "task: text")

# Keys of config.json files and checkpoints written before a field was renamed: they keep loading.
Config.RENAMED = {"run": "run_name", "save_model_dir": "runs_dir"}

# Fields that name a run rather than describe it: `--config` leaves them to the new run.
_IDENTITY_FIELDS = ("run_name", "resume")


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit; we want one clear line
        raise ConfigError(message)


def _field_types(cls=None) -> dict[str, type]:
    hints = {"str": str, "int": int, "float": float, "bool": bool}
    return {f.name: hints[f.type if isinstance(f.type, str) else f.type.__name__]
            for f in dataclasses.fields(cls or Config)}


def ordered_fields(cls) -> list[dataclasses.Field]:
    """A settings class's fields, section by section in the order the class itself declares its
    sections, and in each section its own fields (overrides included) before inherited ones. (A
    dataclass lists inherited fields first: the shared optimisation settings would otherwise head
    every --help and log.)"""
    fields = dataclasses.fields(cls)
    own = [name for name in vars(cls).get("__annotations__", {}) if name in {f.name for f in fields}]
    group = {f.name: f.metadata["group"] for f in fields}
    order = list(dict.fromkeys(list(getattr(cls, "SECTIONS", ())) + [group[name] for name in own]
                               + [group[f.name] for f in fields]))
    return sorted(fields, key=lambda f: (order.index(group[f.name]), f.name not in own))


def build_parser(cls=None, prog: str = "train.py", description: str = "",
                 positional: str | tuple[str, ...] = "") -> argparse.ArgumentParser:
    """The flags of a dataclass whose fields carry `section` metadata: Config (train.py) by
    default, or another tool's settings (sae.py). `positional` names a field (or a tuple of fields,
    in order) filled by bare arguments instead of flags."""
    positionals = (positional,) if isinstance(positional, str) else tuple(positional)
    cls = cls or Config
    parser = _Parser(
        prog=prog,
        description=description or "Train a small transformer. Later sources override earlier ones: "
        "defaults < --preset < --config < flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # `--lr` must never silently mean `--lr_schedule`
    )
    if cls is Config:
        parser.add_argument("--config", default=None, help="JSON file of a run's config (runs/<run>/config.json)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    types = _field_types(cls)
    for f in ordered_fields(cls):
        if f.name in positionals:
            # One positional is optional here (validate() says what is missing: a run, or --model instead);
            # of several, argparse would hand the later ones nothing at the first flag, so they are required.
            optional = dict(nargs="?", default=f.default) if len(positionals) == 1 else {}
            parser.add_argument(f.name, metavar=f.name.upper(), help=f.metadata["help"], **optional)
            continue
        if f.metadata["group"] not in groups:
            groups[f.metadata["group"]] = parser.add_argument_group(f.metadata["group"])
        group = groups[f.metadata["group"]]
        kind = types[f.name]
        help_text = f.metadata["help"]
        if f.name == "preset" and cls is Config:
            help_text += f" ({', '.join(PRESETS)})"
        # --run_name, not --run, is the run name's spelling: torchrun's own parser reads `--run`
        # anywhere on its command line as an abbreviation of its `--run-path`.
        names = [f"--{f.name}", *f.metadata.get("aliases", ())]
        if kind is bool:
            # `--flag`, `--flag true`, `--flag=False` all work.
            group.add_argument(*names, type=_parse_bool, nargs="?", const=True,
                               default=f.default, metavar="BOOL", help=help_text)
        else:
            group.add_argument(*names, type=kind, default=f.default, metavar=kind.__name__.upper(),
                               help=help_text)
    return parser


# What nanoGPT, TransformerLens and friends call our knobs: used only to suggest the right name.
_OTHER_NAMES = {
    "learning_rate": "lr", "n_layer": "num_blocks", "n_layers": "num_blocks", "n_head": "num_heads",
    "n_heads": "num_heads", "n_embd": "embedding_dim", "d_model": "embedding_dim", "d_mlp": "mlp_dim",
    "block_size": "context_len", "n_ctx": "context_len", "max_iters": "max_steps",
    "gradient_accumulation_steps": "accumulation_steps", "compile": "torch_compile",
    "wandb_log": "wandb_enabled", "out_dir": "runs_dir", "eval_interval": "eval_every",
    "log_interval": "log_every", "warmup_iters": "warmup_steps", "wd": "weight_decay", "p": "modulus",
}


def _suggest(flag: str, cls=None) -> str:
    name = flag.lstrip("-").split("=")[0]
    if name in _OTHER_NAMES and cls in (None, Config):
        return f"; did you mean --{_OTHER_NAMES[name]}?"
    names = ["config"] + [f.name for f in dataclasses.fields(cls or Config)]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    return f"; did you mean --{close[0]}?" if close else "; see --help for the list"


def load_config_file(path: str) -> dict:
    """Reads a config JSON; every key must be a Config field."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: {path} does not exist; pass the config.json of an existing run")
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--config: {path} is not readable JSON ({e}); pass a run's config.json")
    if not isinstance(values, dict):
        raise ConfigError(f"--config: {path} must hold a JSON object of flag names and values")
    values = renamed_keys(Config, values)
    known = {f.name for f in dataclasses.fields(Config)}
    for key in values:
        if key not in known:
            raise ConfigError(f"--config: {path} has unknown key {key!r}{_suggest(key)}")
    return values


def _coerce(values: dict, source: str, cls=None) -> dict:
    """Type-checks values from a preset or JSON file against the dataclass field types."""
    types = _field_types(cls)
    out = {}
    for key, value in values.items():
        kind = types[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"--{key}: {source} gives {value!r}, expected {kind.__name__}")
        out[key] = value
    return out


def parse_config(argv: list[str] | None = None) -> tuple[Config, set[str]]:
    """Flags -> validated Config, plus the set of field names typed explicitly on the command line.

    Raises ConfigError (unknown flag with a suggestion, bad value, missing --config file).
    `--help` prints every flag with its default and exits 0, as argparse does.
    """
    args, explicit = _parse(Config, argv)
    explicit -= {"config"}

    values = Config().to_dict()
    # --init_from fine-tunes a pretrained model: its own preset unless one is named
    preset = args.preset if "preset" in explicit else ("finetune" if "init_from" in explicit else Config.preset)
    if preset not in PRESETS:
        raise ConfigError(f"--preset: {preset!r} is not one of {', '.join(PRESETS)}")
    values.update(_coerce(PRESETS[preset], f"preset {preset!r}"))
    values["preset"] = preset
    if args.config is not None:
        from_file = _coerce(load_config_file(args.config), args.config)
        values.update({k: v for k, v in from_file.items() if k not in _IDENTITY_FIELDS})
    values.update({name: getattr(args, name) for name in explicit})
    cfg = Config(**values).validate()
    for name in sorted(explicit & {"data_path", "val_path", "text_field"}):
        need(cfg.task == "text", name, f"only the text task reads a corpus, and this run is {cfg.task}; add "
                                       f"--task text (or a text preset: --preset shakespeare_char)")
    return cfg, explicit


def subcommand_flags(argv: list[str], allowed: tuple[str, ...], usage: str) -> tuple[str, dict[str, str]]:
    """`DIR --flag value ...` after a subcommand (`sae.py report`, `lens.py eval`): the directory and the
    flags given, by name; a ConfigError with the usage for anything else."""
    if not argv or argv[0].startswith("-") or len(argv) % 2 == 0:
        raise ConfigError(usage)
    flags = {}
    for name, value in zip(argv[1::2], argv[2::2]):
        if not name.startswith("--") or name[2:] not in allowed:
            raise ConfigError(f"{name}: not a flag of this command; {usage}")
        flags[name[2:]] = value
    return argv[0], flags


def parse_flags(cls, argv: list[str] | None, prog: str, description: str, positional: str = ""):
    """Flags -> a validated instance of another tool's settings dataclass (fields made with
    `section`, a `validate()` method), with train.py's flag rules: `--name value` or
    `--name=value`, booleans as `--flag [true|false]`, no abbreviations, an unknown flag named with a
    suggestion. Returns (settings, the field names typed explicitly)."""
    args, explicit = _parse(cls, argv, prog, description, positional)
    return cls(**vars(args)).validate(), explicit


def _parse(cls, argv, *parser_args):
    """(parsed namespace, names typed explicitly); an unknown flag raises ConfigError."""
    parser = build_parser(cls, *parser_args)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        if flag.startswith("-"):
            raise ConfigError(f"unknown flag {flag.split('=')[0]}{_suggest(flag, cls)}")
        raise ConfigError(f"unexpected argument {flag!r}; flags look like --name value or --name=value")
    # Which fields did the user type? Parse again with every default suppressed.
    probe = build_parser(cls, *parser_args)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return args, set(vars(probe.parse_known_args(argv)[0]))


def renamed_keys(cls, values: dict) -> dict:
    """A saved config's keys in today's names (`cls.RENAMED`: old name -> new), so that config.json
    files and checkpoints written before a rename keep loading."""
    renames = getattr(cls, "RENAMED", {})
    return {renames.get(key, key): value for key, value in values.items()}


def config_from_dict(values: dict, overrides: dict | None = None, cls=None):
    """Settings (a Config unless `cls` says otherwise) from a saved dict (a checkpoint's, say), with
    optional overrides; keys it does not know are dropped, values type-checked, the result validated."""
    cls = cls or Config
    known = {f.name for f in dataclasses.fields(cls)}
    merged = {k: v for k, v in renamed_keys(cls, values).items() if k in known}
    merged.update(overrides or {})
    return cls(**_coerce(merged, "saved config", cls)).validate()


def resumed_config(settings, saved: dict, explicit: set[str], what: str = "run"):
    """What a resumed run trains with: the checkpoint's settings `saved`, with the flags typed now
    (`explicit`, their values in `settings`) on top, e.g. a longer --max_steps or another --lr.
    A flag in the class's FIXED_ON_RESUME (it shapes the model, the data or the optimizer state)
    that differs from the checkpoint raises ConfigError naming it."""
    cls = type(settings)
    saved = renamed_keys(cls, saved)
    for key in sorted(explicit & set(cls.FIXED_ON_RESUME)):
        if key in saved and getattr(settings, key) != saved[key]:
            raise ConfigError(f"--{key}: a resumed {what} keeps its checkpoint's {key} ({saved[key]!r}); "
                              f"start a new {what} to change it")
    return config_from_dict(saved, {k: getattr(settings, k) for k in explicit}, cls)


def format_config(cfg: Config) -> str:
    """The config as `section: key=value ...` lines, for the head of every log."""
    sections: dict[str, list[str]] = {}
    for f in ordered_fields(Config):
        sections.setdefault(f.metadata["group"], []).append(f"{f.name}={getattr(cfg, f.name)!r}")
    return "\n".join(f"  {title}: {' '.join(items)}" for title, items in sections.items())
