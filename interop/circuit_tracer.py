"""circuit-tracer's per-layer transcoder files (safety-research/circuit-tracer, TranscoderSet): one
`layer_{i}.safetensors` per block holding W_enc [n, d], W_dec [n, d], b_enc [n], b_dec [d], and
`activation_function.threshold` [n] for a JumpReLU and W_skip [d, d] for a skip path, which its
`load_transcoder_set` opens (ReLU when there is no threshold), with features read at `mlp.hook_in`
and written at `mlp.hook_out`. `python sae.py export <run>/sae --to circuit-tracer OUT` writes one
per block and a config.yaml. An optional extra (safetensors).

Our input and output scales are folded into the weights (circuit-tracer computes x W_encᵀ + b_enc and
f W_dec + b_dec + x W_skipᵀ; ours x/scale W_enc + b_enc and (f W_dec + b_dec) out_scale + x W_skip),
so its features are ours exactly. Our transcoders read the MLP's input before the norm's gain
(TransformerLens's LNPre / RMSPre, what fold_ln leaves); a TransformerLens model with its norms
folded has the same `mlp.hook_in`."""

from __future__ import annotations

import os

from config import ConfigError
from utils import new_or_empty, write_folder

EXPORTED = ("standard", "jumprelu")  # what our kinds are in use (saelens_architecture): ReLU or JumpReLU


def circuit_tracer_weights(sae) -> dict:
    """One per-layer transcoder's tensors under circuit-tracer's names, in the model's units."""
    W_enc, b_enc = sae.encoder(0)
    weights = {"W_enc": W_enc.T, "W_dec": sae.decoder(0), "b_enc": b_enc, "b_dec": sae.decoder_bias(0)}
    threshold = sae.saelens_weights().get("threshold")  # a JumpReLU's, per feature (batchtopk: one for all)
    if threshold is not None:
        weights["activation_function.threshold"] = threshold
    if sae.skip:
        weights["W_skip"] = sae.W_skip.T
    return {name: value.detach().float().contiguous().cpu() for name, value in weights.items()}


def export_circuit_tracer(transcoders, out: str) -> str:
    """Writes `out` (new or empty): layer_{i}.safetensors for each block and config.yaml (the paths
    and hooks load_transcoder_set takes). `transcoders`: analysis.graph.Transcoders, one per block."""
    from safetensors.torch import save_file

    if transcoders.cross:
        raise ConfigError("--to circuit-tracer: sae.py writes circuit-tracer's per-layer transcoders; this is a "
                          "cross-layer one")
    for folder, sae in zip(transcoders.folders, transcoders.saes):
        if sae.saelens_architecture not in EXPORTED:
            raise ConfigError(f"--to circuit-tracer: {folder} is a {sae.arch} transcoder, and circuit-tracer's files "
                              f"hold ReLU or JumpReLU ones; train it with --arch jumprelu, batchtopk or relu")
    if not new_or_empty(out):
        raise ConfigError(f"--to: {out} already exists and is not empty; name a new folder")

    def write(staging: str) -> None:
        lines = ["# circuit-tracer: load_transcoder_set({layer: path}, scan, feature_input_hook, feature_output_hook)",
                 f"scan: {os.path.basename(os.path.normpath(transcoders.folders[0]))}",
                 "feature_input_hook: mlp.hook_in", "feature_output_hook: mlp.hook_out", "transcoders:"]
        for layer, sae in enumerate(transcoders.saes):
            name = f"layer_{layer}.safetensors"
            save_file(circuit_tracer_weights(sae), os.path.join(staging, name))
            lines.append(f"  - layer: {layer}\n    filepath: {name}")
        with open(os.path.join(staging, "config.yaml"), "w") as f:
            f.write("\n".join(lines) + "\n")

    write_folder(out, write)
    return out
