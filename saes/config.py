"""The settings of an SAE (sae.py's flags), where its folder lives, and opening one."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from analysis.runs import POSITIONS, load_run, run_folder
from config import (DEVICES, DTYPES, STEP_TIMEOUT_HELP, ConfigError, check_step_timeout, ModelSourceConfig,
                    OptimConfig, config_from_dict, need, need_name, need_one_of, override, section)
from plumbing.checkpoints import CheckpointError, load_checkpoint
from saes import build_sae
from saes.base import KINDS

SOURCES = ("live", "dump")
TRANSCODERS = ("per_layer", "skip", "cross_layer")

_what = section("what to train on")
_dictionary = section("dictionary")
_optim = section("optimization")
_eval = section("evaluation, logging, checkpoints")
_runtime = section("runtime")


@dataclass
class SAEConfig(OptimConfig, ModelSourceConfig):
    run_dir: str = _what("", "the model's run directory (runs/<run>) or checkpoint (or --model)")
    hook: str = _what("", "hook point whose activations to reconstruct, e.g. blocks.0.mlp.hook_post (a transcoder: "
                          "the one it reads; --layer sets it)")
    transcoder: str = _what("", "per_layer | skip: a transcoder that reads an MLP's input and reconstructs its "
                                "output (skip: plus a linear path); cross_layer: one over every layer, each "
                                "layer's features writing to its MLP's output and every later one's; empty: an SAE")
    layer: int = _what(-1, "with --transcoder: the block whose MLP it replaces (sets --hook and --hook_out)")
    hook_out: str = _what("", "with --transcoder: the hook it reconstructs (default blocks.<layer>.hook_mlp_out)")
    positions: str = _what("answer", "answer (the positions the loss reads) | all (every token)")
    source: str = _what("live", "live (from the model, through a shuffling buffer) | dump (activations.py dump)")
    dump: str = _what("", "with --source dump: the dump directory (default <run>/activations/<hook>/train-<positions>)")
    max_tokens: int = _what(0, "with --source live: use only the first N tokens of the train split (0: all)")
    buffer_rows: int = _what(65536, "with --source live: rows in the shuffling buffer")
    run_name: str = _what("", "the SAE's name (empty: <hook>-<arch>-<dict_size>)", aliases=("--name",))
    save_model_dir: str = _what("", "where SAEs live (empty: <run>/sae); the SAE is <save_model_dir>/<run_name>")
    resume: str = _what("", "'auto': continue <save_model_dir>/<run_name>/last.pt if it exists")
    claim_timeout: float = _what(300.0, "an SAE directory whose writer on another host has sent no heartbeat for "
                                        "this many seconds may be taken over")
    seed: int = _what(0, "seed for initialisation and batch order")

    arch: str = _dictionary("relu", " | ".join(f"{name} ({kind.summary})" for name, kind in KINDS.items()))
    dict_size: int = _dictionary(0, "features (0: expansion x the activation width)")
    expansion: float = _dictionary(4.0, "features per activation dimension, when --dict_size is 0")
    k: int = _dictionary(32, "topk: active features per row; batchtopk, matryoshka: on average over the batch")
    threshold_lr: float = _dictionary(0.01, "batchtopk, matryoshka: the threshold used outside training is an "
                                            "average of each step's smallest kept activation, with this weight")
    l0_coefficient: float = _dictionary(1.0, "jumprelu: weight of the L0 penalty (features active per row)")
    jumprelu_init_threshold: float = _dictionary(0.01, "jumprelu: every feature's threshold at the start")
    jumprelu_bandwidth: float = _dictionary(0.05, "jumprelu: width of the straight-through estimator's window")
    pre_act_coefficient: float = _dictionary(3e-6, "jumprelu: weight of the loss that pulls dead features' "
                                                   "pre-activations up to their thresholds")
    matryoshka_sizes: str = _dictionary("", "matryoshka: the nested prefixes that each reconstruct, e.g. 64,256,1024 "
                                            "(the whole dictionary is the last level; empty: 1/16, 1/4 of it)")
    l1_coefficient: float = _dictionary(5.0, "relu: weight of the decoder-norm-weighted L1 penalty")
    l1_warmup_steps: int = _dictionary(500, "relu: the L1 weight rises linearly from 0 over these steps")
    dead_rows: int = _dictionary(1_000_000, "a feature that fired on none of the last N training rows is dead")
    resample_every: int = _dictionary(250, "relu: resample dead features every N steps in the first half (0: never)")
    aux_k: int = _dictionary(0, "topk: dead features used by the AuxK loss (0: half the activation width)")
    aux_coefficient: float = _dictionary(1 / 32, "topk: weight of the AuxK loss")
    normalize: bool = _dictionary(True, "scale inputs so that E|x|^2 = d (one scalar, kept in the SAE)")

    max_steps: int = _optim(3000, "optimizer steps")
    batch_size: int = _optim(4096, "rows per step (all ranks together)")
    lr: float = override("lr", 1e-3, "Adam learning rate (peak)")
    beta1: float = override("beta1", 0.9, "Adam beta1")
    beta2: float = override("beta2", 0.999, "Adam beta2")
    warmup_steps: int = override("warmup_steps", 100)
    lr_schedule: str = override("lr_schedule", "cosine")  # plateau: on the held-out mse

    eval_every: int = _eval(500, "evaluate on held-out rows every N steps")
    eval_tokens: int = _eval(32768, "tokens of the val split used for evaluation (0: all)")
    log_every: int = _eval(50, "log training metrics every N steps")
    save_every: int = _eval(1000, "write last.pt every N steps (0: only at the end)")
    wandb_enabled: bool = _eval(False, "log to Weights & Biases (WANDB_MODE=offline works)")
    wandb_project: str = _eval("", "W&B project (empty: WANDB_PROJECT, else tinylab)")

    device: str = _runtime("auto", "auto | cpu | cuda | mps")
    dtype: str = _runtime("auto", "precision of the model's forward pass (the SAE trains in float32)")
    step_timeout: float = _runtime(900.0, STEP_TIMEOUT_HELP)

    # Fields that shape the SAE, its data or its live buffer (in the checkpoint): a resumed SAE keeps them.
    FIXED_ON_RESUME = ("hook", "transcoder", "layer", "hook_out", "positions", "arch", "dict_size", "expansion", "k",
                       "normalize", "source", "seed", "buffer_rows", "max_tokens", "matryoshka_sizes")
    RENAMED = {"name": "run_name"}  # the keys of SAE checkpoints written before the rename

    def validate(self) -> "SAEConfig":
        self.validate_optimization()
        check_step_timeout(self.step_timeout)
        for name, choices in (("arch", tuple(KINDS)), ("source", SOURCES), ("positions", POSITIONS),
                              ("device", DEVICES), ("dtype", DTYPES)):
            need_one_of(self, name, choices)
        need(self.transcoder in ("",) + TRANSCODERS, "transcoder",
             f"{self.transcoder!r} is not a transcoder; choose from {', '.join(TRANSCODERS)} (or leave it out: an SAE)")
        if self.transcoder == "cross_layer":
            need(self.layer == -1, "layer", "a cross-layer transcoder reads and replaces every layer's MLP; leave it out")
            need(self.arch != "matryoshka", "arch", "a cross-layer transcoder's features are per layer, not nested "
                 "prefixes; take relu, topk, batchtopk or jumprelu")
        elif self.transcoder:
            need(self.layer >= 0 or bool(self.hook and self.hook_out), "layer",
                 "name the block whose MLP the transcoder replaces, e.g. --layer 0")
            need(not (self.transcoder == "skip" and self.arch == "matryoshka"), "arch",
                 "a skip transcoder's nested prefixes would leave out its skip path; take --transcoder per_layer "
                 "with matryoshka, or another --arch")
        else:
            need(bool(self.hook), "hook", "name the hook point, e.g. --hook blocks.0.mlp.hook_post")
            for name in ("layer", "hook_out"):
                need(getattr(self, name) in (-1, ""), name,
                     "only a transcoder (--transcoder per_layer or skip) has one")
        for name in ("max_steps", "batch_size", "k", "eval_every", "log_every", "buffer_rows", "dead_rows"):
            need(getattr(self, name) >= 1, name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("dict_size", "l1_warmup_steps", "resample_every", "aux_k", "save_every",
                     "eval_tokens", "max_tokens"):
            need(getattr(self, name) >= 0, name, f"must be 0 or more, got {getattr(self, name)}")
        for name in ("expansion", "lr"):
            need(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        for name in ("l1_coefficient", "aux_coefficient", "claim_timeout", "l0_coefficient", "pre_act_coefficient"):
            need(getattr(self, name) >= 0, name, f"must not be negative, got {getattr(self, name)}")
        for name in ("jumprelu_init_threshold", "jumprelu_bandwidth"):
            need(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        need(0 < self.threshold_lr <= 1, "threshold_lr", f"must be in (0, 1], got {self.threshold_lr}")
        if self.dict_size:
            self.check_kind(self.dict_size, "--dict_size")
        need(not self.matryoshka_sizes or self.arch == "matryoshka", "matryoshka_sizes",
             f"only --arch matryoshka has nested prefixes (this SAE is {self.arch})")
        sizes = self.prefix_sizes()
        if sizes:
            need(sizes[0] >= 1 and all(a < b for a, b in zip(sizes, sizes[1:])), "matryoshka_sizes",
                 f"{self.matryoshka_sizes}: the prefixes must grow, each at least 1")
        need_name(self.run_name, "run_name")
        need(self.resume in ("", "auto"), "resume", f"{self.resume!r}: the only value is auto")
        self.validate_source()
        return self

    @property
    def rows_hook(self) -> str:
        """What a row is: the hook's activation, or a transcoder's input and output side by side."""
        return f"{self.hook}+{self.hook_out}" if self.transcoder else self.hook

    def find_transcoder_hooks(self, model) -> None:
        """--hook and --hook_out of a transcoder from --layer (the MLP's normalised input, or the
        residual stream before it under --norm none, and its output); a ConfigError naming --layer
        for a block that does not exist or has no MLP. A cross-layer transcoder's: every block's, joined
        by `+`."""
        if self.transcoder == "cross_layer":
            need(model.blocks[0].mlp is not None, "transcoder",
                 "an attention-only model has no MLP for a transcoder to replace")
            ins, outs = ("+".join(hooks) for hooks in zip(*(mlp_hooks(model, i) for i in range(model.cfg.num_blocks))))
            for name, hooks in (("hook", ins), ("hook_out", outs)):
                need(getattr(self, name) in ("", hooks), name, "a cross-layer transcoder reads and replaces every "
                     "layer's MLP; leave it out")
            self.hook, self.hook_out = ins, outs
        if self.transcoder not in ("per_layer", "skip") or self.layer < 0:
            return
        blocks = model.cfg.num_blocks
        need(self.layer < blocks, "layer", f"the model has blocks 0 to {blocks - 1}; got {self.layer}")
        need(model.blocks[self.layer].mlp is not None, "layer",
             f"block {self.layer} has no MLP (an attention-only model): a transcoder replaces an MLP")
        hook_in, hook_out = mlp_hooks(model, self.layer)
        self.hook, self.hook_out = self.hook or hook_in, self.hook_out or hook_out

    @property
    def layers(self) -> int:
        """How many layers the dictionary spans: every block's for a cross-layer transcoder, else 0."""
        return len(self.hook_out.split("+")) if self.transcoder == "cross_layer" else 0

    def check_kind(self, dict_size: int, origin: str) -> None:
        """ConfigError if the kind's own settings do not fit a dictionary of `dict_size` features
        (`origin`: where that size came from, for the message)."""
        problem = KINDS[self.arch].check(self, dict_size, origin)
        if problem:
            raise ConfigError(problem)

    def prefix_sizes(self) -> list[int]:
        """--matryoshka_sizes as numbers ([] when not given)."""
        try:
            return [int(s) for s in self.matryoshka_sizes.split(",")] if self.matryoshka_sizes else []
        except ValueError:
            raise ConfigError(f"--matryoshka_sizes: {self.matryoshka_sizes!r} is not a comma-separated list of "
                              f"feature counts, e.g. 64,256") from None

    def to_dict(self) -> dict:
        return asdict(self)


def mlp_hooks(model, layer: int) -> tuple[str, str]:
    """(what a transcoder of block `layer`'s MLP reads, what it reconstructs): the MLP's normalised
    input (the residual stream before it under --norm none) and its output."""
    normalized = f"blocks.{layer}.ln2.hook_normalized"
    return (normalized if normalized in model.hook_names else f"blocks.{layer}.hook_resid_mid",
            f"blocks.{layer}.hook_mlp_out")


def sae_dir(cfg: SAEConfig, d: int) -> tuple[str, str]:
    """(where the SAE lives, its name): <save_model_dir>/<run_name>, by default <run>/sae/<hook>-<arch>-<size>
    (a transcoder: <hook_out>-<transcoder>-<arch>-<size>, e.g. blocks.0.hook_mlp_out-per_layer-relu-512;
    a cross-layer one: cross_layer-<arch>-<size>, its size every layer's features together)."""
    base = run_folder(cfg.run_dir)
    size = cfg.dict_size or int(cfg.expansion * d)
    name = cfg.run_name or (f"cross_layer-{cfg.arch}-{size}" if cfg.transcoder == "cross_layer" else
                            f"{cfg.hook_out}-{cfg.transcoder}-{cfg.arch}-{size}" if cfg.transcoder
                            else f"{cfg.hook}-{cfg.arch}-{size}")
    return os.path.join(cfg.save_model_dir or os.path.join(base, "sae"), name), name


def load_sae(path: str, device: str = "auto", source: ModelSourceConfig | None = None):
    """An SAE directory (its last.pt) or checkpoint -> (SparseAutoencoder in eval mode, SAEConfig, run).
    `source`: a program's --data_path, for a text run whose corpus moved (load_run)."""
    path = os.path.join(path, "last.pt") if os.path.isdir(path) else path
    checkpoint = load_checkpoint(path)
    if "rows_since_fired" not in checkpoint:
        raise CheckpointError(f"{path} is a model checkpoint, not an SAE's; pass <run>/sae/<name>")
    cfg = config_from_dict(checkpoint["config"], cls=SAEConfig)
    # The model checkpoint it was trained on, by absolute path (run_dir may be relative to elsewhere);
    # else the run directory two levels up (<run>/sae/<name>/last.pt).
    model_path = checkpoint.get("model_checkpoint", "")
    if not os.path.exists(model_path):  # a checkpoint file, or a sharded run's folder
        model_path = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    run = load_run(model_path, device=device, source=source)
    if checkpoint.get("model_step", run.step) != run.step:
        raise CheckpointError(f"{path}: this SAE was trained on the model at step {checkpoint['model_step']}, but "
                              f"{run.checkpoint_path} now holds step {run.step}; its metrics would not mean much")
    weights = checkpoint["model"]
    layers = checkpoint.get("layers", 0)
    sae = build_sae(checkpoint["d"] // max(layers, 1), weights["W_dec"].shape[0] // max(layers, 1), cfg.arch, cfg.k,
                    d_out=checkpoint.get("d_out", 0) // max(layers, 1), skip=cfg.transcoder == "skip", layers=layers)
    sae.load_state_dict(weights)
    return sae.to(run.device).eval(), cfg, run
