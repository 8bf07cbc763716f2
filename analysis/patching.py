"""Activation patching (the residual stream, each head) and path patching, measured as the recovery
of the logit difference between a clean and a corrupted input (a task's `corrupt`)."""

from __future__ import annotations

import torch

from analysis.runs import model_of
from model import Transformer


def logit_difference(logits: torch.Tensor, right: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of logit[right] - logit[wrong] at the last position, in float32 or wider
    (a float64 model's analysis stays in float64)."""
    last = logits[:, -1].to(torch.promote_types(logits.dtype, torch.float32))
    return (last.gather(1, right[:, None]) - last.gather(1, wrong[:, None])).mean()


def _patching(model: Transformer, clean, corrupted, right, wrong, names: list[str]):
    """The clean cache of `names` and a function: hooks -> normalised recovery of the logit
    difference when the corrupted input runs with those hooks (0: as corrupted, 1: as clean)."""
    clean_logits, cache = model.run_with_cache(clean, names)
    clean_diff = logit_difference(clean_logits, right, wrong)
    corrupted_diff = logit_difference(model(corrupted), right, wrong)

    def recovery(hooks) -> torch.Tensor:
        patched = logit_difference(model.run_with_hooks(corrupted, hooks), right, wrong)
        return (patched - corrupted_diff) / (clean_diff - corrupted_diff)

    return cache, recovery


@torch.no_grad()
def patch_residual(model, clean: torch.Tensor, corrupted: torch.Tensor, right: torch.Tensor,
                   wrong: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Activation patching of the residual stream: for each block's `hook_resid_pre` (and
    `hook_resid_final`) and each position, run the corrupted input with the clean activation
    patched in there. Returns [layers, positions] of normalised recovery of the logit difference
    right - wrong: 0 = as corrupted, 1 = as clean."""
    model = model_of(model)
    names = [f"blocks.{i}.hook_resid_pre" for i in range(model.cfg.num_blocks)] + ["hook_resid_final"]
    cache, recovery = _patching(model, clean, corrupted, right, wrong, names)
    result = torch.zeros(len(names), clean.shape[1])
    for i, name in enumerate(names):
        for position in range(clean.shape[1]):
            def patch(x, hook, position=position, name=name):
                x = x.clone()
                x[:, position] = cache[name][:, position]
                return x

            result[i, position] = recovery([(name, patch)])
    return result, names


@torch.no_grad()
def patch_heads(model, clean: torch.Tensor, corrupted: torch.Tensor, right: torch.Tensor,
                wrong: torch.Tensor) -> torch.Tensor:
    """Patches each head's clean output (`attn.hook_z`, all positions) into the corrupted run;
    [blocks, heads] of normalised logit-difference recovery."""
    model = model_of(model)
    names = [f"blocks.{i}.attn.hook_z" for i in range(model.cfg.num_blocks)]
    cache, recovery = _patching(model, clean, corrupted, right, wrong, names)
    result = torch.zeros(model.cfg.num_blocks, model.cfg.num_heads, dtype=torch.float64)
    for i, name in enumerate(names):
        for head in range(model.cfg.num_heads):
            def patch(z, hook, head=head, name=name):
                z = z.clone()
                z[:, :, head] = cache[name][:, :, head]
                return z

            result[i, head] = recovery([(name, patch)])
    return result


@torch.no_grad()
def path_patch(model, clean: torch.Tensor, corrupted: torch.Tensor, right: torch.Tensor, wrong: torch.Tensor,
               sender: tuple[int, int], receivers: list[tuple[str, int | None]]) -> torch.Tensor:
    """Path patching: how much of the logit difference comes back when the sender head's clean
    output reaches the corrupted run only through the receivers' inputs.

    `sender` is (block, head). `receivers` are input hooks with an optional head: e.g.
    ("blocks.1.attn.hook_q", 2) for the query of L1H2, ("blocks.0.mlp.hook_pre", None) for an
    MLP, ("hook_resid_final", None) for the direct path to the logits. First the corrupted input
    runs with the sender's `hook_z` set to its clean value and every other head and every MLP
    frozen at its corrupted output, so only the direct sender -> receiver paths carry the change;
    the change in the receivers' inputs is recorded. Then the corrupted input runs with only that
    change added to the receivers' inputs. Returns the normalised recovery (0: as corrupted, 1: as
    clean). In a one-block model, receivers ("hook_resid_final", None) and the block's MLP input
    together carry everything the head does, so they recover what patching the head's output does.
    """
    model = model_of(model)
    block, head = sender
    frozen = [n for n in model.hook_names if n.endswith(("attn.hook_z", "hook_mlp_out"))]
    cache, recovery = _patching(model, clean, corrupted, right, wrong, [f"blocks.{block}.attn.hook_z"])
    receiver_names = sorted({name for name, _ in receivers})
    _, corrupted_cache = model.run_with_cache(corrupted, frozen + receiver_names)
    sender_name = f"blocks.{block}.attn.hook_z"

    def freeze(x, hook_point):
        value = corrupted_cache[hook_point.name]
        if hook_point.name == sender_name:
            value = value.clone()
            value[:, :, head] = cache[sender_name][:, :, head]
        return value

    with model.hooks([(name, freeze) for name in frozen]):
        _, patched_inputs = model.run_with_cache(corrupted, receiver_names)
    # Receivers get the change the sender made to their input, added to whatever they hold, so
    # several receivers compose (an MLP's new output still reaches a patched final residual).
    deltas = {name: patched_inputs[name] - corrupted_cache[name] for name in receiver_names}

    def replace(x, hook_point):
        x = x.clone()
        for name, index in receivers:
            if name == hook_point.name and index is None:
                x = x + deltas[name]
            elif name == hook_point.name:
                x[:, :, index] += deltas[name][:, :, index]
        return x

    return recovery([(name, replace) for name in receiver_names])


def corrupt(run, tokens: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, int]:
    """A corrupted copy of tokens [B, T] that differs at one position, and that position, as the run's
    task corrupts an input (TaskData.corrupt; modular: `a` becomes another number)."""
    return run.data.corrupt(tokens, seed)
