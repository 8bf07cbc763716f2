"""Consistency lens: explain a model's activations in words, trained as an autoencoder through text.

    python lens.py runs/<run> --layer 2                       # activations computed on the fly
    python lens.py runs/<run> --layer 2 --source dump         # from `activations.py dump ... --positions all`
    torchrun --nproc_per_node=8 lens.py runs/<run> --layer 2 --batch_size 256
    TINYLAB_PROGRAM=lens.py sbatch train.slurm runs/<run> --layer 2     # checkpoint-and-requeue on Slurm
    python lens.py eval runs/<run>/lens/<name>                # held-out figures and example explanations

An activation A of a frozen text model (the residual stream after block `--layer`, at position p of
some context) is forced through `--t_text` tokens of the model's own vocabulary:

- the decoder, the model with a trainable soft prompt around a slot (initialised from the
  embeddings of `--decoder_prompt`, "<A>" marking the slot), reads W_in A + b_in in that slot (and
  at every layer's input with --patch_all_layers) and writes t_text tokens. Each token is drawn by
  Gumbel-softmax at temperature tau (`--tau`, a schedule): one-hot in the forward pass, the soft
  distribution's gradient in the backward pass (straight-through); its one-hot times the embedding
  matrix is fed back in as the next input.
- the encoder, the model with its own soft prompt (`--encoder_prompt`, "<T>" marking the text),
  reads the same one-hot tokens through its embedding matrix, so gradients reach the decoder; its
  residual stream after block `--encoder_layer` at the last position, through W_out, gives Â.

The losses, each weighted by a schedule (a number, or `start>end@from:to[:cosine]`, steps or
fractions of --max_steps): `kl`, KL(P_A ‖ P_Â) of the original model's next-token distribution at
p with A and with Â patched in after block l (float32); `mse`, |Â - A|² / E|A|², the error relative
to the activations' mean square; `fluency` (weight --alpha), KL from the original model's
distribution over each generated token (after --fluency_prefix and the tokens before it) to the
decoder's; `entropy`, a bonus for the decoder's entropy. With --resample_ablation the KL patches
Â + (A′ - Â′), another sample's reconstruction error added to this one's Â.

By default only the soft prompts and the two projections train, and decoder, encoder and the
original model are one set of weights in memory. --unfreeze_decoder_step / --unfreeze_encoder_step
give the decoder or encoder its own copy of the base at that step, trained at --decoder_lr_mult /
--encoder_lr_mult times the learning rate after a --decoder_warmup_steps / --encoder_warmup_steps
warm-up.

A lens lives in `<run>/lens/<name>/` (or `<save_model_dir>/<run_name>/`), laid out like a run:
config.json, train.log, metrics.jsonl, last.pt, curves.png, explanations.jsonl (the explanations
of a few held-out activations at every eval) and explanations.png (how they change as tau anneals).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F

from analysis.runs import POSITIONS, Run, encode_exactly, load_run, run_folder, split_sequences
from analysis.sources import DumpSource, TokenSource, default_dump_dir
from plumbing.checkpoints import CheckpointError, load_checkpoint, seed_everything, set_rng_state
from config import (DEVICES, DTYPES, STEP_TIMEOUT_HELP, ConfigError, check_step_timeout, ModelSourceConfig,
                    OptimConfig, config_from_dict, need, need_name, need_one_of, override, parse_flags, section,
                    subcommand_flags)
from data import _step_seed
from plumbing.distributed import all_reduce_sum, gather_objects
from plumbing.hardware import autocast, pick_dtype
from model import Transformer
from optimizer import LRSchedule, Muon, load_optimizer_states, split_parameters
from plumbing.session import Session, resume_checkpoint, run_command
from plumbing.tracking import Panel, plot_curves, read_metrics, trim_metrics

SOURCES = ("live", "dump")
DIVERGED_ADVICE = "Lower --lr or --muon_lr, or set --grad_clip, then start again"

_what = section("what to explain")
_lens = section("the lens")
_losses = section("losses (each a schedule: a number, or start>end@from:to[:cosine])")
_freeze = section("freezing")
_optim = section("optimization")
_eval = section("evaluation, logging, checkpoints")
_runtime = section("runtime")


@dataclass
class LensConfig(OptimConfig, ModelSourceConfig):
    run_dir: str = _what("", "the text model's run directory (runs/<run>) or checkpoint (or --model)")
    layer: int = _what(-1, "explain the residual stream after this block (-1: the middle block, num_blocks // 2)")
    source: str = _what("live", "live (computed from the train split as needed) | dump (activations.py dump)")
    dump: str = _what("", "with --source dump: the dump (default <run>/activations/blocks.L.hook_resid_post/train-all)")
    positions: str = _what("all", "which positions of the split: all | answer (the same for a text run)")
    max_tokens: int = _what(0, "use only the first N tokens of the train split (0: all)")
    run_name: str = _what("", "the lens's name (default layer<L>-t<t_text>)")
    save_model_dir: str = _what("", "where lenses live (default <run>/lens)")
    resume: str = _what("", "'auto': continue <lens dir>/last.pt if it exists")
    claim_timeout: float = _what(300.0, "a lens directory whose writer on another host has sent no heartbeat for "
                                        "this many seconds may be taken over")
    seed: int = _what(0, "seed for initialisation, batch order and Gumbel noise")

    t_text: int = _lens(8, "tokens in each explanation")
    decoder_prompt: str = _lens("explanation of <A>:",
                                "text whose embeddings start the decoder's soft prompt; <A> is the slot")
    encoder_prompt: str = _lens("<T> explains:",
                                "text whose embeddings start the encoder's soft prompt; <T> is the explanation")
    encoder_layer: int = _lens(-1, "the encoder reads its residual stream after this block (-1: --layer)")
    patch_all_layers: bool = _lens(False, "also write the projected A into the slot's residual stream before every block")
    fluency_prefix: str = _lens("\n", "natural text the original model reads before an explanation, for the fluency term")
    tau: str = _lens("1.0>0.3@0.2:0.8:cosine", "Gumbel-softmax temperature schedule")
    gumbel_noise: bool = _lens(True, "draw tokens with Gumbel noise (false: the argmax, still straight-through)")

    kl_weight: str = _losses("1.0", "weight of KL(P_A || P_Â) at the activation's position")
    mse_weight: str = _losses("1.0", "weight of |Â - A|² / E|A|²")
    alpha: str = _losses("0.1", "weight of the fluency KL (original model -> decoder over the explanation)")
    entropy_weight: str = _losses("0.0", "weight of the bonus for the decoder's entropy")
    resample_ablation: bool = _losses(False, "KL with Â + (A' - Â') patched in, A' another sample's activation")

    unfreeze_decoder_step: int = _freeze(-1, "give the decoder a trainable copy of the base at this step (-1: never)")
    unfreeze_encoder_step: int = _freeze(-1, "give the encoder a trainable copy of the base at this step (-1: never)")
    decoder_lr_mult: float = _freeze(0.1, "learning rate of the decoder's unfrozen base, times the lens's")
    encoder_lr_mult: float = _freeze(0.1, "learning rate of the encoder's unfrozen base, times the lens's")
    decoder_warmup_steps: int = _freeze(100, "the decoder's base: its learning rate rises linearly over these steps")
    encoder_warmup_steps: int = _freeze(100, "the encoder's base: its learning rate rises linearly over these steps")

    max_steps: int = _optim(2000, "optimizer steps")
    batch_size: int = _optim(64, "activations per step (all ranks together)")
    lr: float = override("lr", 1e-2, "AdamW learning rate (soft prompts, biases, and every matrix without Muon)")
    use_muon: bool = _optim(True, "Muon for the projections (and an unfrozen base's block matrices)")
    muon_lr: float = _optim(0.05, "Muon learning rate (the projections)")
    weight_decay: float = _optim(0.0, "AdamW / Muon weight decay")
    warmup_steps: int = override("warmup_steps", 50)
    lr_schedule: str = override("lr_schedule", "cosine")  # plateau: on the held-out val_kl

    eval_every: int = _eval(200, "evaluate on held-out activations every N steps")
    eval_rows: int = _eval(512, "held-out activations (val split) per evaluation")
    examples: int = _eval(6, "held-out activations whose explanations are kept at every eval")
    log_every: int = _eval(20, "log training metrics every N steps")
    save_every: int = _eval(500, "write last.pt every N steps (0: only at the end)")
    wandb_enabled: bool = _eval(False, "log to Weights & Biases (WANDB_MODE=offline works)")
    wandb_project: str = _eval("", "W&B project (empty: WANDB_PROJECT, else tinylab)")

    device: str = _runtime("auto", "auto | cpu | cuda | mps")
    dtype: str = _runtime("auto", "auto (bf16 autocast on capable GPUs) | float32 | bfloat16")
    step_timeout: float = _runtime(900.0, STEP_TIMEOUT_HELP)

    # Fields that shape the lens or its optimizer state: a resumed lens keeps them (and its layers).
    FIXED_ON_RESUME = ("t_text", "decoder_prompt", "encoder_prompt", "patch_all_layers", "seed", "use_muon",
                       "unfreeze_decoder_step", "unfreeze_encoder_step")

    def validate(self) -> "LensConfig":
        self.validate_optimization()
        check_step_timeout(self.step_timeout)
        for name, choices in (("source", SOURCES), ("positions", POSITIONS), ("device", DEVICES), ("dtype", DTYPES)):
            need_one_of(self, name, choices)
        for name in ("t_text", "max_steps", "batch_size", "eval_every", "eval_rows", "log_every"):
            need(getattr(self, name) >= 1, name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("max_tokens", "save_every", "examples", "decoder_warmup_steps",
                     "encoder_warmup_steps"):
            need(getattr(self, name) >= 0, name, f"must be 0 or more, got {getattr(self, name)}")
        for name in ("lr", "muon_lr", "decoder_lr_mult", "encoder_lr_mult"):
            need(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "claim_timeout"):
            need(getattr(self, name) >= 0, name, f"must not be negative, got {getattr(self, name)}")
        for name in ("layer", "encoder_layer", "unfreeze_decoder_step", "unfreeze_encoder_step"):
            need(getattr(self, name) >= -1, name, f"must be -1 or more, got {getattr(self, name)}")
        need(self.dtype != "float16", "dtype", "float16 would need a gradient scaler through the straight-through "
             "chain; use bfloat16 (the default on capable GPUs) or float32")
        need(self.eval_rows >= 2, "eval_rows", "the 'another sample' baseline needs at least 2 rows")
        need(self.decoder_prompt.count("<A>") == 1, "decoder_prompt",
             f"{self.decoder_prompt!r} must contain the slot marker <A> once, e.g. 'explanation of <A>:'")
        need(self.encoder_prompt.count("<T>") == 1, "encoder_prompt",
             f"{self.encoder_prompt!r} must contain the text marker <T> once, e.g. '<T> explains:'")
        need_name(self.run_name, "run_name")
        need(self.resume in ("", "auto"), "resume", f"{self.resume!r}: the only value is auto")
        for name in ("tau", "kl_weight", "mse_weight", "alpha", "entropy_weight"):
            schedule = Schedule.parse(getattr(self, name), name, self.max_steps)
            need(schedule.start >= 0 and schedule.end >= 0, name, f"{getattr(self, name)!r}: must not go below 0")
        need(Schedule.parse(self.tau, "tau", self.max_steps).end > 0 and
             Schedule.parse(self.tau, "tau", self.max_steps).start > 0, "tau", "the temperature must stay above 0")
        self.validate_source()
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def schedule(self, name: str) -> "Schedule":
        return Schedule.parse(getattr(self, name), name, self.max_steps)


@dataclass(frozen=True)
class Schedule:
    """A value over training steps: `start` until step `begin`, then a linear or cosine move to
    `end` at step `finish`, and `end` after. Written `0.5` (constant) or `1.0>0.3@200:1500[:cosine]`;
    `@0.2:0.8` means fractions of max_steps."""
    start: float
    end: float
    begin: int
    finish: int
    shape: str = "linear"

    @staticmethod
    def parse(text: str, flag: str, max_steps: int) -> "Schedule":
        hint = (f"--{flag}: {text!r} is not a schedule; write a number (0.5) or start>end@from:to[:cosine], "
                f"e.g. 1.0>0.3@0.2:0.8:cosine")
        try:
            if ">" not in text:
                value = float(text)
                return Schedule(value, value, 0, 0)
            values, _, span = text.partition("@")
            start, end = (float(v) for v in values.split(">"))
            parts = span.split(":")
            shape = parts.pop() if len(parts) == 3 else "linear"
            if len(parts) != 2 or shape not in ("linear", "cosine"):
                raise ValueError
            begin, finish = (round(float(p) * max_steps) if "." in p else int(p) for p in parts)
        except ValueError:
            raise ConfigError(hint) from None
        if not 0 <= begin <= finish:
            raise ConfigError(f"--{flag}: {text!r}: the change must start at step 0 or later and end after it starts")
        return Schedule(start, end, begin, finish, shape)

    def __call__(self, step: int) -> float:
        if step <= self.begin or self.start == self.end:
            return self.start
        if step >= self.finish:
            return self.end
        progress = (step - self.begin) / (self.finish - self.begin)
        if self.shape == "cosine":
            progress = 0.5 * (1 - math.cos(math.pi * progress))
        return self.start + (self.end - self.start) * progress


# ---------------------------------------------------------------- the lens


def run_blocks(model: Transformer, x: torch.Tensor, blocks: range, slot: int | None = None,
               slot_value: torch.Tensor | None = None, caches: list[dict] | None = None, start: int = 0) -> torch.Tensor:
    """x [B, T, D] (embeddings, positions not yet added when blocks start at 0) through `blocks` of
    the model: the fast attention path (no hooks). With slot_value [B, D], position `slot` of the
    residual stream is set to it before every block after the first. With caches (one dict per
    block, {} at first), x holds positions start.. and attends to the cached ones before them."""
    if blocks.start == 0 and model.pos_embed is not None:  # rotary models place positions in attention
        x = x + model.pos_embed.weight[start:start + x.shape[1]]
    for i in blocks:
        if slot_value is not None and i > 0:
            x = torch.cat([x[:, :slot], slot_value[:, None].to(x.dtype), x[:, slot + 1:]], 1)
        x = model.blocks[i](x, model.rope, cache=None if caches is None else caches[i])
    return x


def logits_at(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    """The model's logits from residual-stream rows x [..., D] (final norm, unembedding, any soft cap), in float32."""
    return model.head(x).float()


def gumbel_straight_through(logits: torch.Tensor, tau: float, generator: torch.Generator | None) -> torch.Tensor:
    """One-hot of argmax((logits + Gumbel noise) / tau) [B, V] whose gradient is the soft
    softmax's (straight-through). generator None: no noise (the argmax of the logits)."""
    if generator is not None:
        uniform = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(1e-10, 1 - 1e-7)
        logits = logits - torch.log(-torch.log(uniform))
    soft = F.softmax(logits / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


class ConsistencyLens(nn.Module):
    """Decoder (soft prompt + slot → t_text tokens) and encoder (soft prompt + tokens → Â) on a
    frozen base. The base is not a submodule: its weights are the original model's, shared, and
    not in this module's state dict; an unfrozen decoder or encoder base is (`decoder_base`,
    `encoder_base`). Parameters: decoder_left/right [n, D], encoder_left/right [m, D] (soft
    prompts), decoder_in and encoder_out (D × D projections, identity at the start)."""

    def __init__(self, base: Transformer, layer: int, encoder_layer: int, t_text: int,
                 decoder_ids: tuple[list[int], list[int]], encoder_ids: tuple[list[int], list[int]],
                 patch_all_layers: bool = False):
        super().__init__()
        self._base = [base]  # a list hides it from nn.Module: no parameters, no state dict entry
        self.layer, self.encoder_layer, self.t_text = layer, encoder_layer, t_text
        self.patch_all_layers = patch_all_layers
        embed = base.embed.weight.detach()
        D = embed.shape[1]

        def prompt(ids: list[int]) -> nn.Parameter:
            return nn.Parameter(embed[torch.tensor(ids, dtype=torch.long, device=embed.device)].clone().float()
                                if ids else torch.zeros(0, D, device=embed.device))

        self.decoder_left, self.decoder_right = prompt(decoder_ids[0]), prompt(decoder_ids[1])
        self.encoder_left, self.encoder_right = prompt(encoder_ids[0]), prompt(encoder_ids[1])
        self.decoder_in = nn.Linear(D, D, device=embed.device)
        self.encoder_out = nn.Linear(D, D, device=embed.device)
        for projection in (self.decoder_in, self.encoder_out):
            nn.init.eye_(projection.weight)
            nn.init.zeros_(projection.bias)
        self.decoder_base: Transformer | None = None
        self.encoder_base: Transformer | None = None
        self.register_buffer("mean_square", torch.ones((), device=embed.device))  # E|A|² / D on the train split
        self.register_buffer("mean_act", torch.zeros(D, device=embed.device))  # E[A], the mean baseline

    @property
    def base(self) -> Transformer:
        return self._base[0]

    def unfreeze(self, part: str) -> Transformer:
        """Gives the decoder or encoder its own trainable copy of the base; returns it."""
        copy_ = copy.deepcopy(self.base)
        for p in copy_.parameters():
            p.requires_grad_(True)
        setattr(self, f"{part}_base", copy_)
        return copy_

    def trainable(self) -> list[nn.Parameter]:
        """What the optimizers train now (it grows when a base unfreezes)."""
        return [p for p in self.parameters() if p.requires_grad and p.numel()]

    def decoder_model(self) -> Transformer:
        return self.decoder_base or self.base

    def encoder_model(self) -> Transformer:
        return self.encoder_base or self.base

    def explain(self, acts: torch.Tensor, tau: float, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """acts [B, D] → (tokens as straight-through one-hots [B, t_text, V], the decoder's logits
        before each token [B, t_text, V], float32). generator None: greedy, no Gumbel noise."""
        model = self.decoder_model()
        B = acts.shape[0]
        with torch.autocast(acts.device.type, enabled=False):  # the projections stay in float32
            slot_value = self.decoder_in(acts.float())
        x = torch.cat([self.decoder_left.expand(B, -1, -1), slot_value[:, None], self.decoder_right.expand(B, -1, -1)], 1)
        slot = self.decoder_left.shape[0]
        # The prompt once, then one position per token, each attending to the keys and values cached
        # before it (gradients flow through the cache). The slot is in the prompt, so patching it
        # at every layer happens in the first pass.
        caches = [{} for _ in model.blocks]
        h = run_blocks(model, x, range(len(model.blocks)), slot, slot_value if self.patch_all_layers else None, caches)
        position = x.shape[1]
        tokens, all_logits = [], []
        for k in range(self.t_text):
            logits = logits_at(model, h[:, -1])
            one_hot = gumbel_straight_through(logits, tau, generator)
            tokens.append(one_hot)
            all_logits.append(logits)
            if k + 1 < self.t_text:
                embedded = (one_hot.to(model.embed.weight.dtype) @ model.embed.weight)[:, None]
                h = run_blocks(model, embedded, range(len(model.blocks)), caches=caches, start=position)
                position += 1
        return torch.stack(tokens, 1), torch.stack(all_logits, 1)

    def reconstruct(self, tokens: torch.Tensor) -> torch.Tensor:
        """One-hot tokens [B, t, V] → Â [B, D]."""
        model = self.encoder_model()
        B = tokens.shape[0]
        text = tokens.to(model.embed.weight.dtype) @ model.embed.weight
        x = torch.cat([self.encoder_left.expand(B, -1, -1).to(text.dtype), text,
                       self.encoder_right.expand(B, -1, -1).to(text.dtype)], 1)
        h = run_blocks(model, x, range(self.encoder_layer + 1))
        with torch.autocast(h.device.type, enabled=False):
            return self.encoder_out(h[:, -1].float())

    def forward(self, acts: torch.Tensor, tau: float, generator: torch.Generator | None = None):
        tokens, logits = self.explain(acts, tau, generator)
        return self.reconstruct(tokens), tokens, logits


def prompt_ids(run: Run, text: str, marker: str, flag: str) -> tuple[list[int], list[int]]:
    """The token ids on either side of `marker` in `text`."""
    left, right = text.split(marker)
    return encode_exactly(run, left, flag), encode_exactly(run, right, flag)


# ---------------------------------------------------------------- the losses


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T'] the contexts, cut after the last position needed
    position: torch.Tensor  # [B] where A was taken
    acts: torch.Tensor  # [B, D] A, float32
    resid: torch.Tensor  # [B, T', D] the residual stream after block `layer`, for patching
    clean_logprobs: torch.Tensor | None  # [B, V] float32: the original model's next-token log-probs at p, with A


@torch.no_grad()
def build_batch(base: Transformer, layer: int, contexts: torch.Tensor, position: torch.Tensor,
            acts: torch.Tensor | None, device, dtype) -> Batch:
    """The original model's view of a batch: its residual stream after `layer`, and its next-token
    distribution at each activation's position with A itself patched in there: the same path (and
    precision) that Â takes, so that Â = A gives a KL of exactly 0, whether A came from a dump or
    from this forward pass (acts None: A is read from it)."""
    tokens = contexts[:, :int(position.max()) + 1].to(device)
    position = position.to(device)
    with autocast(device, dtype):
        resid = run_blocks(base, base.embed(tokens), range(layer + 1))
        if acts is None:
            acts = resid[torch.arange(len(tokens), device=device), position]
        batch = Batch(tokens, position, acts.float(), resid, None)
        batch.clean_logprobs = patched_logprobs(base, batch, layer, batch.acts)
    return batch


def patched_logprobs(base: Transformer, batch: Batch, layer: int, value: torch.Tensor) -> torch.Tensor:
    """The original model's next-token log-probs at each row's position with the residual stream
    there (after block `layer`) replaced by value [B, D]; float32."""
    rows = torch.arange(len(value), device=value.device)
    where = F.one_hot(batch.position, batch.resid.shape[1]).bool()[..., None]  # [B, T', 1]
    x = torch.where(where, value[:, None].to(batch.resid.dtype), batch.resid)
    x = run_blocks(base, x, range(layer + 1, len(base.blocks)))
    return F.log_softmax(logits_at(base, x[rows, batch.position]), -1)


def kl_from(clean_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ other) per row [B]."""
    return (clean_logprobs.exp() * (clean_logprobs - logprobs)).sum(-1)


@torch.no_grad()
def fluency_prior(base: Transformer, prefix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The original model's log-probs for each explanation token [B, t, V], having read prefix [1, P]
    and the explanation's tokens before it (ids [B, t]): the target of the fluency term."""
    text = torch.cat([prefix.expand(len(ids), -1), ids], 1)
    return F.log_softmax(base(text)[:, prefix.shape[1] - 1:-1].float(), -1)


def lens_losses(lens: ConsistencyLens, batch: Batch, tau: float, weights: dict, fluency_prefix: torch.Tensor,
                resample_ablation: bool, generator: torch.Generator | None, forward=None
                ) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """(weighted loss, each term's mean as a float, the explanations' token ids [B, t]). `forward`
    is the module to call (lens itself)."""
    reconstruction, tokens, decoder_logits = (forward or lens)(batch.acts, tau, generator)
    base = lens.base
    error = reconstruction - batch.acts
    mse = error.pow(2).mean(-1) / lens.mean_square
    patched = reconstruction
    if resample_ablation:  # this Â with another sample's reconstruction error
        patched = reconstruction + (batch.acts - reconstruction).roll(1, 0).detach()
    kl = kl_from(batch.clean_logprobs, patched_logprobs(base, batch, lens.layer, patched))
    decoder_logprobs = F.log_softmax(decoder_logits, -1)  # [B, t, V]
    ids = tokens.argmax(-1)
    terms = {"kl": kl.mean(), "mse": mse.mean()}
    if weights["alpha"]:
        terms["fluency"] = kl_from(fluency_prior(base, fluency_prefix, ids), decoder_logprobs).mean()
    entropy = -(decoder_logprobs.exp() * decoder_logprobs).sum(-1).mean()
    terms["entropy"] = entropy
    loss = (weights["kl_weight"] * terms["kl"] + weights["mse_weight"] * terms["mse"]
            + weights["alpha"] * terms.get("fluency", 0.0) - weights["entropy_weight"] * entropy)
    return loss, {k: float(v.detach()) for k, v in terms.items()}, ids


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(lens: ConsistencyLens, batches: list[Batch]) -> tuple[dict, list[torch.Tensor]]:
    """On held-out batches, greedy explanations (no noise): fraction of variance explained by Â,
    mse (as in training) and KL, with two baselines each: Â = the mean activation (of the train
    split) and Â = another sample's A. Returns (metrics, the explanations' token ids per batch)."""
    base = lens.base
    sums = dict.fromkeys(("kl", "kl_mean", "kl_random", "mse", "mse_mean", "mse_random", "squared", "rows"), 0.0)
    acts_all, explanations = [], []
    for batch in batches:
        reconstruction, tokens, _ = lens(batch.acts, 1.0, None)
        explanations.append(tokens.argmax(-1))
        other = batch.acts.roll(1, 0)
        mean = lens.mean_act.expand_as(batch.acts)
        for name, value in (("", reconstruction), ("_mean", mean), ("_random", other)):
            sums["kl" + name] += float(kl_from(batch.clean_logprobs, patched_logprobs(base, batch, lens.layer, value)).sum())
            sums["mse" + name] += float(((value - batch.acts).pow(2).mean(-1) / lens.mean_square).sum())
        sums["squared"] += float((reconstruction - batch.acts).pow(2).sum())
        sums["rows"] += len(batch.acts)
        acts_all.append(batch.acts)
    acts = torch.cat(acts_all)
    total = float((acts - acts.mean(0)).pow(2).sum())
    rows = sums.pop("rows")
    metrics = {f"val_{k}": v / rows for k, v in sums.items() if k != "squared"}
    metrics["val_fve"] = 1 - sums["squared"] / max(total, 1e-12)
    return metrics, explanations


def show_context(run: Run, tokens: torch.Tensor, position: int, width: int = 40) -> str:
    """The text before and at a position, the token at it in ⟦brackets⟧."""
    ids = tokens.tolist()
    before = run.data.decode(ids[max(0, position + 1 - width):position])
    return before + "⟦" + run.data.decode(ids[position:position + 1]) + "⟧"


# ---------------------------------------------------------------- training


def lens_dir(cfg: LensConfig, layer: int) -> str:
    return os.path.join(cfg.save_model_dir or os.path.join(run_folder(cfg.run_dir), "lens"),
                        cfg.run_name or f"layer{layer}-t{cfg.t_text}")


def resolve_layers(cfg: LensConfig, run: Run) -> tuple[int, int]:
    blocks = run.cfg.num_blocks
    layer = blocks // 2 if cfg.layer == -1 else cfg.layer
    encoder_layer = layer if cfg.encoder_layer == -1 else cfg.encoder_layer
    for flag, value in (("layer", layer), ("encoder_layer", encoder_layer)):
        if value >= blocks:
            raise ConfigError(f"--{flag}: {value} is not a block of this model (blocks 0 to {blocks - 1})")
    return layer, encoder_layer


def build_lens(cfg: LensConfig, run: Run) -> ConsistencyLens:
    """A fresh lens for this run (bad prompts or layers raise ConfigError)."""
    if not run.data.generates_text:
        raise ConfigError(f"run_dir: {cfg.run_dir} is a {run.cfg.task} run; the lens explains a language model's "
                          f"activations in its own tokens, so it needs a text run (e.g. --preset shakespeare_char)")
    layer, encoder_layer = resolve_layers(cfg, run)
    decoder_ids = prompt_ids(run, cfg.decoder_prompt, "<A>", "decoder_prompt")
    encoder_ids = prompt_ids(run, cfg.encoder_prompt, "<T>", "encoder_prompt")
    decoder_length = len(decoder_ids[0]) + 1 + len(decoder_ids[1]) + cfg.t_text - 1
    encoder_length = len(encoder_ids[0]) + cfg.t_text + len(encoder_ids[1])
    fluency_length = len(encode_exactly(run, cfg.fluency_prefix, "fluency_prefix")) + cfg.t_text
    limit = run.cfg.context_len
    for flag, length in (("decoder_prompt", decoder_length), ("encoder_prompt", encoder_length),
                         ("fluency_prefix", fluency_length)):
        if length > limit:
            raise ConfigError(f"--{flag}: with --t_text {cfg.t_text} it makes {length} positions, more than the "
                              f"model's context of {limit}; shorten it or lower --t_text")
    if not cfg.fluency_prefix:
        raise ConfigError("--fluency_prefix: give the original model some text to read first, e.g. a newline")
    return ConsistencyLens(run.model, layer, encoder_layer, cfg.t_text, decoder_ids, encoder_ids,
                           cfg.patch_all_layers)


def parameter_groups(cfg: LensConfig, named: list[tuple[str, nn.Parameter]], part: str | None = None
                     ) -> list[dict]:
    """Parameter groups: Muon for 2-D matrices (the projections, a base's block matrices) when
    --use_muon, AdamW for the rest. Returns [adamw groups, muon groups] as dicts; `part`
    ("decoder" or "encoder") marks an unfrozen base's groups, which have their own LR multiplier
    and warm-up."""
    muon, decay, no_decay = split_parameters(
        named, to_muon=lambda name, p: cfg.use_muon and p.ndim == 2 and (
            name.startswith("blocks.") or name.endswith(("decoder_in.weight", "encoder_out.weight"))),
        decayed=lambda name, p: p.ndim >= 2 and "prompt" not in name and not name.endswith(("_left", "_right")))
    adamw = [{"params": params, "kind": "adamw", "decays": decays, "part": part}
             for params, decays in ((decay, True), (no_decay, False)) if params]
    muon_groups = [{"params": muon, "kind": "muon", "decays": True, "part": part}] if muon else []
    for group in adamw + muon_groups:
        apply_settings(cfg, group)
    return [adamw, muon_groups]


def apply_settings(cfg: LensConfig, group: dict) -> None:
    """A group's peak LR and weight decay from the config (again after loading a checkpoint, so that
    --lr, --muon_lr, --decoder_lr_mult, --encoder_lr_mult and --weight_decay given on resume take
    effect)."""
    scale = 1.0 if group["part"] is None else getattr(cfg, f"{group['part']}_lr_mult")
    group["initial_lr"] = (cfg.lr if group["kind"] == "adamw" else cfg.muon_lr) * scale
    group["weight_decay"] = cfg.weight_decay if group["decays"] else 0.0


class Optimizers:
    """AdamW and Muon over the lens's groups; groups are added when a base unfreezes, in the same
    order on resume, so their states line up."""

    def __init__(self, cfg: LensConfig, lens: ConsistencyLens):
        self.cfg = cfg
        self.schedule = LRSchedule(cfg, cfg.max_steps)
        adamw, muon = parameter_groups(cfg, list(lens.named_parameters()))
        fused = lens.decoder_in.weight.is_cuda or None
        self.adamw = torch.optim.AdamW(adamw, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
        self.muon = Muon(muon, lr=cfg.muon_lr, weight_decay=cfg.weight_decay) if muon else None

    def add_base(self, base: Transformer, part: str) -> None:
        adamw, muon = parameter_groups(self.cfg, list(base.named_parameters()), part)
        for group in adamw:
            self.adamw.add_param_group(group)
        for group in muon:
            if self.muon is None:
                self.muon = Muon([group], lr=self.cfg.muon_lr, weight_decay=self.cfg.weight_decay)
            else:
                self.muon.add_param_group(group)

    def all(self) -> list[torch.optim.Optimizer]:
        return [self.adamw] + ([self.muon] if self.muon is not None else [])

    def set_lr(self, step: int) -> float:
        multiplier = self.schedule(step)
        for optimizer in self.all():
            for group in optimizer.param_groups:
                warm, part = 1.0, group["part"]
                if part is not None:  # an unfrozen base: its own warm-up from the step it unfroze
                    since = step - getattr(self.cfg, f"unfreeze_{part}_step") + 1
                    warm = min(1.0, since / max(1, getattr(self.cfg, f"{part}_warmup_steps")))
                group["lr"] = group["initial_lr"] * multiplier * warm
        return self.adamw.param_groups[0]["lr"]

    def step(self) -> None:
        for optimizer in self.all():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict]:
        return [optimizer.state_dict() for optimizer in self.all()]

    def load_state_dict(self, states: list[dict]) -> None:
        load_optimizer_states(self.all(), states)  # the groups keep today's settings (apply_settings)


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """DDP's gradient average, by hand: one all-reduce of every gradient flattened together. (DDP
    itself cannot take parameters added mid-run, which an unfrozen base is.)"""
    params = [p for p in params if p.grad is not None]  # the same on every rank: one graph
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten().float() for g in grads])
    torch_dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()


def train_source(cfg: LensConfig, run: Run, layer: int, rank: int, world: int):
    """The train batches: a dump's, or the same computed on the fly."""
    hook = f"blocks.{layer}.hook_resid_post"
    if cfg.source == "live":
        return TokenSource(run, hook, cfg.positions, "train", cfg.batch_size, cfg.seed, rank, world, cfg.max_tokens,
                           cfg.dtype)
    directory = cfg.dump or default_dump_dir(cfg.run_dir, hook, "train", cfg.positions)
    wanted = {"hook": hook, "split": "train", "positions": cfg.positions, "step": run.step,
              "checkpoint": os.path.abspath(run.checkpoint_path)}
    return DumpSource(directory, cfg.batch_size, run.device, cfg.seed, rank, world).require(wanted, "lens", cfg.run_dir)


def held_out(run: Run, layer: int, positions: str, rows: int, seed: int, dtype: str
             ) -> tuple[TokenSource, list[tuple[torch.Tensor, torch.Tensor]], list[Batch]]:
    """About `rows` activations of the val split, none twice, in a fixed order: (their source,
    each batch's (sequence, position), the prepared batches)."""
    available = int(split_sequences(run, "val", positions).mask.sum())
    size = min(rows, 256, available)
    source = TokenSource(run, f"blocks.{layer}.hook_resid_post", positions, "val", size, seed, 0, 1, 0, dtype)
    located = [source.locate(s) for s in range(max(1, min(rows, available) // size))]
    batches = [build_batch(run.model, layer, source.tokens[sequence], position, None, run.device,
                       pick_dtype(dtype, run.device)) for sequence, position in located]
    return source, located, batches


@torch.no_grad()
def activation_statistics(lens: ConsistencyLens, run: Run, cfg: LensConfig, rows: int = 512) -> None:
    """E|A|² and E[A] (the MSE's scale and the mean baseline) from the first rows of the train
    split in a fixed order: the same on every rank, whichever source trains."""
    hook = f"blocks.{lens.layer}.hook_resid_post"
    available = int(split_sequences(run, "train", cfg.positions, cfg.max_tokens).mask.sum())
    sample = TokenSource(run, hook, cfg.positions, "train", min(rows, available), cfg.seed + 2, 0, 1, cfg.max_tokens,
                         cfg.dtype)
    acts = sample.batch(0).acts.float()
    lens.mean_square.copy_(acts.pow(2).mean())
    lens.mean_act.copy_(acts.mean(0))


def train(cfg: LensConfig, explicit: set[str] = frozenset()) -> dict:
    """Trains one lens (every rank of a torchrun job calls this); returns the final metrics and
    where the lens lives. Bad input raises ConfigError / CheckpointError before anything is written."""
    with Session(cfg.device, cfg.dtype, cfg.step_timeout) as session:
        log, dist, device, dtype = session.log, session.dist, session.device, session.dtype
        run = load_run(cfg.run_dir, device=str(device), source=cfg)
        for p in run.model.parameters():
            p.requires_grad_(False)  # the original model is only read
        out_dir = lens_dir(cfg, resolve_layers(cfg, run)[0])
        checkpoint, cfg = resume_checkpoint(out_dir, cfg, explicit, "lens", run.step, run.checkpoint_path,
                                            functools.partial(refuse_other_lens, cfg, run, explicit, out_dir))
        if cfg.batch_size % dist.world_size or cfg.batch_size < 2 * dist.world_size:
            raise ConfigError(f"--batch_size: {cfg.batch_size} rows do not split into {dist.world_size} rank(s) of at "
                              f"least 2 (the resample ablation pairs each row with another of its rank)")
        seed_everything(cfg.seed)
        lens = build_lens(cfg, run)
        source = train_source(cfg, run, lens.layer, dist.rank, dist.world_size)
        held_out_source, located, eval_batches = held_out(run, lens.layer, cfg.positions, cfg.eval_rows,
                                                           cfg.seed + 1, cfg.dtype)
        fluency_prefix = torch.tensor([encode_exactly(run, cfg.fluency_prefix, "fluency_prefix")], device=device)
        activation_statistics(lens, run, cfg)
        session.claim_directory(out_dir, cfg.resume == "auto", f"--run_name: {out_dir} already holds a lens; pass "
                                f"another --run_name, or --resume auto to continue it", cfg.to_dict(), cfg.claim_timeout)
        schedules = {name: cfg.schedule(name) for name in ("tau", "kl_weight", "mse_weight", "alpha", "entropy_weight")}
        optimizers = Optimizers(cfg, lens)
        step, window = restore(checkpoint, lens, optimizers, cfg, session)
        describe(cfg, run, lens, source, eval_batches, out_dir, step if checkpoint is not None else None, session)
        explanations = Explanations(os.path.join(out_dir, "explanations.jsonl"), run, held_out_source, located,
                                    cfg.examples, session.is_main, step)
        loop = session.loop(out_dir, cfg, cfg.max_steps, step, lens.trainable, checkpoint, advice=DIVERGED_ADVICE)

        def state() -> dict:
            return {"model": lens.state_dict(), "optimizers": optimizers.state_dict(), "step": step,
                    "lr_schedule": optimizers.schedule.state_dict(), "config": cfg.to_dict(),
                    "elapsed_seconds": loop.clock.elapsed(), "wandb_id": loop.tracker.wandb_id,
                    "model_checkpoint": os.path.abspath(run.checkpoint_path), "model_step": run.step,
                    "window": gather_objects(dict(window))}

        # ---- the loop
        last_eval = {}
        with loop.running():
            while step < cfg.max_steps:
                unfreeze_due(cfg, lens, optimizers, step, log)
                lr = optimizers.set_lr(step)
                weights = {name: schedule(step) for name, schedule in schedules.items()}
                if isinstance(source, TokenSource):  # A from the forward pass build_batch runs anyway
                    sequence, position = source.locate(step)
                    acts = None
                else:
                    rows = source.batch(step)
                    sequence, position, acts = rows.sequence.cpu(), rows.position, rows.acts
                batch = build_batch(run.model, lens.layer, source.tokens[sequence], position, acts, device, dtype)
                # Gumbel noise from (seed, step, rank): a resumed lens draws what it would have drawn.
                generator = None
                if cfg.gumbel_noise:
                    generator = torch.Generator(device=device).manual_seed(
                        _step_seed(cfg.seed, 31, step * dist.world_size + dist.rank))
                with autocast(device, dtype):
                    loss, parts, _ = lens_losses(lens, batch, weights["tau"], weights, fluency_prefix,
                                                 cfg.resample_ablation, generator)
                loss.backward()
                params = lens.trainable()
                if dist.enabled:
                    average_gradients(params, dist.world_size)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else float("inf"))
                optimizers.step()
                step += 1
                for key, value in (("loss", float(loss.detach())), *parts.items()):
                    window[key] += value * len(batch.acts)
                    window[f"{key}_rows"] += len(batch.acts)
                due = loop.after_step(step, loss.detach() + grad_norm)
                record = {}
                if due.record:
                    sums, window = all_reduce_sum(window, device), dict.fromkeys(window, 0.0)
                    ms_per_step, rows_per_sec = loop.clock.report(cfg.batch_size)
                    record = {"step": step, **{f"train_{k}": sums[k] / sums[f"{k}_rows"] for k in TERMS
                                               if sums[f"{k}_rows"]},
                              "tau": weights["tau"], "lr": lr, "grad_norm": float(grad_norm),
                              "ms_per_step": ms_per_step, "rows_per_sec": rows_per_sec}
                    log.info(train_line(record, cfg.max_steps) + f" | {loop.clock.progress(step)}")
                with loop.clock.paused():  # evals and checkpoints stay out of ms/step and rows/s
                    if due.evaluate:
                        with autocast(device, dtype):  # as the held-out batches' reference was computed
                            last_eval, decoded = evaluate(lens, eval_batches)
                        explanations.write(step, weights["tau"], decoded)
                        record = {"step": step, **record, **last_eval}
                        log.info(eval_line(step, last_eval))
                        if optimizers.schedule.observe(last_eval["val_kl"]):
                            log.info(f"plateau: LR x {optimizers.schedule.factor:.3g} of its schedule from step {step + 1}")
                    loop.write(record)
                    if due.save:
                        loop.save(step, state())
                if loop.stop_requested(step):
                    break
            loop.save(step, state())
        session.report_replicas(lens.trainable(), "lens weights")
        if session.is_main:
            plot_lens_curves(loop.tracker.path, os.path.join(out_dir, "curves.png"), title=os.path.basename(out_dir))
            plot_explanations(explanations.path, os.path.join(out_dir, "explanations.png"))
        seconds = loop.finish(step, "| " + (f"val kl {last_eval['val_kl']:.4f} | val fve {last_eval['val_fve']:.4f} | "
                                     if last_eval else "") + f"report: python lens.py eval {out_dir}")
    return {"lens_dir": out_dir, "steps": step, "seconds": seconds, "interrupted": loop.interrupted_name(),
            **last_eval}


# Loss terms logged, each averaged over the rows of the steps that had it (a term switched off part-way,
# such as fluency at alpha 0, over the steps it was on).
TERMS = ("loss", "kl", "mse", "fluency", "entropy")


def refuse_other_lens(cfg: LensConfig, run: Run, explicit: set[str], out_dir: str, checkpoint: dict) -> None:
    """--resume auto: <out_dir>/last.pt must be a lens, of the layers asked for (if asked)."""
    if "mean_square" not in checkpoint.get("model", {}):
        raise CheckpointError(f"{out_dir}/last.pt is not a lens checkpoint; pass another --run_name")
    for key, now, then in zip(("layer", "encoder_layer"), resolve_layers(cfg, run),
                              resolve_layers(LensConfig(**checkpoint["config"]), run)):
        if key in explicit and now != then:  # -1 means the middle block: compare the blocks meant
            raise ConfigError(f"--{key}: a resumed lens keeps its checkpoint's {key} ({then})")


def restore(checkpoint: dict | None, lens: "ConsistencyLens", optimizers: "Optimizers", cfg: LensConfig,
            session: Session) -> tuple[int, dict]:
    """(the step to start from, the sums since the last log line), and with a checkpoint the lens, its
    copies of the base, the optimizers, the schedule and the RNG streams as it left them. The window
    of sums is carried over so that a resumed lens's next line averages the steps an unbroken one's does."""
    window = dict.fromkeys(TERMS + tuple(f"{k}_rows" for k in TERMS), 0.0)
    if checkpoint is None:
        return 0, window
    # The copies first, so that their weights and optimizer groups have a place, in the order the
    # run made them (optimizer states line up by position, and the two copies have one shape).
    for part in sorted(("decoder", "encoder"), key=lambda part: getattr(cfg, f"unfreeze_{part}_step")):
        if any(k.startswith(f"{part}_base.") for k in checkpoint["model"]):
            optimizers.add_base(lens.unfreeze(part), part)
    lens.load_state_dict(checkpoint["model"])
    optimizers.load_state_dict(checkpoint["optimizers"])
    optimizers.schedule.load_state_dict(checkpoint.get("lr_schedule"))
    dist = session.dist
    if len(checkpoint["rng"]) == dist.world_size:
        set_rng_state(checkpoint["rng"][dist.rank])
    if len(checkpoint["window"]) == dist.world_size:
        window = checkpoint["window"][dist.rank]
    return checkpoint["step"], window


def unfreeze_due(cfg: LensConfig, lens: "ConsistencyLens", optimizers: "Optimizers", step: int, log) -> None:
    """At --unfreeze_decoder_step / --unfreeze_encoder_step: that side gets its own trainable copy of the base."""
    for part in ("decoder", "encoder"):
        at = getattr(cfg, f"unfreeze_{part}_step")
        if at >= 0 and step >= at and getattr(lens, f"{part}_base") is None:
            optimizers.add_base(lens.unfreeze(part), part)
            if step == at:
                log.info(f"step {step}: the {part} gets its own copy of the base (lr x "
                         f"{getattr(cfg, f'{part}_lr_mult')}, warm-up {getattr(cfg, f'{part}_warmup_steps')} steps)")


def describe(cfg: LensConfig, run: Run, lens: "ConsistencyLens", source, eval_batches: list, out_dir: str,
             resumed_at: int | None, session: Session) -> None:
    """The lens describes itself at the top of its log."""
    log = session.log
    count = sum(p.numel() for p in lens.trainable())
    log.info(f"consistency lens on blocks.{lens.layer}.hook_resid_post of {cfg.run_dir} "
             f"(checkpoint {run.checkpoint_path}, step {run.step}) -> {out_dir}")
    log.info("  " + " ".join(f"{k}={v!r}" for k, v in cfg.to_dict().items()))
    log.info(f"d={lens.mean_act.numel()} | {count:,} trainable parameters (base frozen and shared) | "
             f"decoder prompt {len(lens.decoder_left) + 1 + len(lens.decoder_right)} positions, encoder prompt "
             f"{len(lens.encoder_left) + len(lens.encoder_right)} + {cfg.t_text} | {cfg.source} source, "
             f"{source.num_rows:,} train activations | {cfg.batch_size}/step on {session.dist.world_size} rank(s) | "
             f"eval on {sum(len(b.acts) for b in eval_batches):,} val activations | dtype {session.dtype}"
             + (f" | resumed at step {resumed_at}" if resumed_at is not None else ""))


def train_line(record: dict, max_steps: int) -> str:
    return (f"step {record['step']:>6}/{max_steps} | loss {record['train_loss']:.4f} | kl {record['train_kl']:.4f} | "
            f"mse {record['train_mse']:.4f}"
            + (f" | fluency {record['train_fluency']:.3f}" if "train_fluency" in record else "")
            + f" | entropy {record['train_entropy']:.2f} | tau {record['tau']:.3f} | lr {record['lr']:.2e} | "
            f"{record['ms_per_step']:.1f} ms/step | {record['rows_per_sec']:,.0f} rows/s")


def eval_line(step: int, val: dict) -> str:
    return (f"eval {step:>6} | kl {val['val_kl']:.4f} (mean A {val['val_kl_mean']:.4f}, other A "
            f"{val['val_kl_random']:.4f}) | mse {val['val_mse']:.4f} (mean A {val['val_mse_mean']:.4f}, other A "
            f"{val['val_mse_random']:.4f}) | fve {val['val_fve']:.4f}")


class Explanations:
    """explanations.jsonl: at each eval, the lens's explanations of the first `examples` held-out
    activations beside their contexts (rank 0 writes; a resumed lens first drops what came after
    its checkpoint)."""

    def __init__(self, path: str, run: Run, held_out_source, located, examples: int, is_main: bool, step: int):
        self.path, self.run, self.examples, self.is_main = path, run, examples, is_main
        self.contexts = [show_context(run, held_out_source.tokens[s], p)
                         for s, p in zip(*(column[:examples].tolist() for column in located[0]))]
        if is_main:
            trim_metrics(path, step)

    def write(self, step: int, tau: float, decoded: list) -> None:
        if self.is_main and self.examples:
            texts = [self.run.data.decode(ids.tolist()) for ids in decoded[0][:self.examples]]
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "tau": tau, "contexts": self.contexts, "explanations": texts}) + "\n")


# ---------------------------------------------------------------- pictures, loading, eval


def plot_lens_curves(metrics_path: str, out_path: str, title: str = "") -> str:
    """Training and held-out KL and MSE (with both baselines), FVE and tau against steps."""
    def term(name: str) -> Panel:
        return Panel(name, [(f"train_{name}", "train", "-"), (f"val_{name}", "val", "o-"),
                            (f"val_{name}_mean", "val, Â = mean A", "--"),
                            (f"val_{name}_random", "val, Â = another A", ":")], "log")

    return plot_curves(read_metrics(metrics_path), out_path, [
        term("kl"), term("mse"), Panel("fraction of variance explained (val)", [("val_fve", "", "-")]),
        Panel("tau", [("tau", "", "-")])], title)


def plot_explanations(path: str, out_path: str, evals: int = 8) -> str | None:
    """A table as a picture: held-out contexts (columns) and their explanations at up to `evals`
    evals spread over training (rows, with tau), to see them settle as tau anneals."""
    from matplotlib.figure import Figure

    records = read_metrics(path) if os.path.isfile(path) else []
    if not records:
        return None
    count = min(evals, len(records))
    picks = sorted({round(i * (len(records) - 1) / max(1, count - 1)) for i in range(count)})
    records = [records[i] for i in picks]
    columns = len(records[0]["contexts"])
    fig = Figure(figsize=(2.6 * columns + 1.5, 0.3 * (len(records) + 1) + 0.6))
    ax = fig.subplots()
    ax.axis("off")
    cells = [[repr(text)[1:-1] for text in r["explanations"]] for r in records]
    table = ax.table(cellText=cells, rowLabels=[f"step {r['step']}, tau {r['tau']:.2f}" for r in records],
                     colLabels=[repr(c[-18:])[1:-1].replace("⟦", "[").replace("⟧", "]") for c in records[0]["contexts"]],
                     loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    ax.set_title("explanations of held-out activations as tau anneals (greedy decoding; column: the context's end)",
                 fontsize=9)
    fig.savefig(out_path, dpi=110, bbox_inches="tight")
    return out_path


def load_lens(path: str, device: str = "auto", source: ModelSourceConfig | None = None
              ) -> tuple[ConsistencyLens, LensConfig, Run]:
    """A lens directory (its last.pt) or checkpoint -> (lens in eval mode, its config, the run).
    `source`: a program's --data_path, for a run whose corpus moved (load_run)."""
    path = os.path.join(path, "last.pt") if os.path.isdir(path) else path
    checkpoint = load_checkpoint(path)
    if "mean_square" not in checkpoint.get("model", {}):
        raise CheckpointError(f"{path} is not a lens checkpoint; pass <run>/lens/<name>")
    cfg = config_from_dict(checkpoint["config"], cls=LensConfig)
    model_path = checkpoint["model_checkpoint"]
    if not os.path.exists(model_path):  # moved: the run directory two levels up (<run>/lens/<name>/last.pt)
        model_path = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    run = load_run(model_path, device=device, source=source)
    if checkpoint["model_step"] != run.step:
        raise CheckpointError(f"{path}: this lens was trained on the model at step {checkpoint['model_step']}, but "
                              f"{run.checkpoint_path} now holds step {run.step}")
    for p in run.model.parameters():
        p.requires_grad_(False)
    lens = build_lens(cfg, run)
    for part in ("decoder", "encoder"):
        if any(k.startswith(f"{part}_base.") for k in checkpoint["model"]):
            lens.unfreeze(part)
    lens.load_state_dict(checkpoint["model"])
    return lens.eval(), cfg, run


@torch.no_grad()
def eval_report(lens_path: str, rows: int = 2048, examples: int = 16, data_path: str = "") -> tuple[str, dict]:
    """Writes <lens>/eval/report.md: held-out FVE, KL and MSE against the two baselines, and a
    table of example explanations beside their contexts. Returns (its path, the metrics).
    `data_path`: where the run's corpus is now, when it moved."""
    lens, cfg, run = load_lens(lens_path, source=ModelSourceConfig.corpus_at(data_path))
    directory = lens_path if os.path.isdir(lens_path) else os.path.dirname(lens_path)
    out = os.path.join(directory, "eval")
    os.makedirs(out, exist_ok=True)
    dtype = pick_dtype(cfg.dtype, run.device)
    source, located, batches = held_out(run, lens.layer, cfg.positions, rows, cfg.seed + 1, cfg.dtype)
    with autocast(run.device, dtype):
        metrics, explanations = evaluate(lens, batches)
    lines = [f"# Consistency lens {os.path.basename(os.path.normpath(directory))}", "",
             f"`blocks.{lens.layer}.hook_resid_post` of `{cfg.run_dir}` (model step {run.step}); "
             f"{cfg.t_text}-token explanations, greedy; {sum(len(b.acts) for b in batches):,} held-out activations "
             f"from the val split.", "",
             "| | lens (Â) | Â = mean activation | Â = another sample's A |", "| --- | --- | --- | --- |",
             f"| KL(P_A ‖ P_Â) | {metrics['val_kl']:.4f} | {metrics['val_kl_mean']:.4f} | {metrics['val_kl_random']:.4f} |",
             f"| MSE / E[A²] | {metrics['val_mse']:.4f} | {metrics['val_mse_mean']:.4f} | {metrics['val_mse_random']:.4f} |",
             "", f"Fraction of variance explained by Â: **{metrics['val_fve']:.4f}**.", "",
             "## Example explanations", "", "| context (⟦the activation's token⟧) | explanation |", "| --- | --- |"]
    shown = 0
    for (sequence, position), ids in zip(located, explanations):
        for s, p, text in zip(sequence.tolist(), position.tolist(), ids.tolist()):
            if shown == examples:
                break
            context = show_context(run, source.tokens[s], p).replace("|", "\\|").replace("\n", "↵")
            explanation = run.data.decode(text).replace("|", "\\|").replace("\n", "↵")
            lines.append(f"| `{context}` | `{explanation}` |")
            shown += 1
    explanations_path = os.path.join(directory, "explanations.jsonl")
    if plot_explanations(explanations_path, os.path.join(out, "explanations.png")):
        lines += ["", "## As tau annealed", "", "![explanations during training](explanations.png)"]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path, metrics


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "eval":
        folder, flags = subcommand_flags(argv[1:], ("data_path",),
                                         "usage: python lens.py eval <run>/lens/<name> [--data_path CORPUS]")
        if not os.path.exists(folder):
            raise ConfigError(f"{folder}: no such lens directory or checkpoint")
        path, metrics = eval_report(folder, data_path=flags.get("data_path", ""))
        print(" | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        print(f"wrote {path}")
        return path
    cfg, explicit = parse_flags(LensConfig, argv, "lens.py", "Train a consistency lens on a text run's residual "
                                "stream (`python lens.py eval DIR` evaluates one).", positional="run_dir")
    return train(cfg, explicit)


if __name__ == "__main__":
    run_command(main)
