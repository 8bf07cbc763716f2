"""SAELens's SAE folders (SAE.save_model: cfg.json and sae_weights.safetensors), in and out:
`python sae.py export DIR --to saelens OUT` writes one, and `sae.py report FOLDER --model RUN` opens
one. An optional extra (safetensors)."""

from __future__ import annotations

import json
import os

import torch

from analysis.runs import hook_width, load_run
from config import ConfigError
from saes import build_sae
from saes.base import SparseAutoencoder
from saes.config import SAEConfig, load_sae
from utils import new_or_empty, write_folder, write_json


OPENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}  # SAELens's architectures -> our kinds


def saelens_folder(sae: SparseAutoencoder, cfg: SAEConfig, model_name: str) -> tuple[dict, dict]:
    """(cfg.json, the weights) of `sae` as SAELens saves an SAE (SAE.save_model: cfg.json and
    sae_weights.safetensors), for SAE.load_from_disk. Our input scale is folded into the weights
    (SAELens computes (x - b_dec) W_enc + b_enc; ours (x / scale - b_dec) W_enc + b_enc, then times
    scale out), so `normalize_activations` is none and the pre-activations, thresholds and
    features are ours exactly; only the decoder rows then have norm `scale` instead of 1."""
    if sae.transcoder:
        return saelens_transcoder(sae, cfg, model_name)
    scale = float(sae.scale)
    weights = {"W_enc": sae.W_enc.detach() / scale, "W_dec": sae.W_dec.detach() * scale,
               "b_enc": sae.b_enc.detach().clone(), "b_dec": sae.b_dec.detach() * scale}
    architecture = sae.saelens_architecture  # the batch kinds are JumpReLU SAEs in use, as SAELens saves them
    if architecture is None:
        raise ConfigError(f"--to saelens: SAELens has no form of a {sae.name} SAE; its kinds are standard (relu), "
                          f"topk and jumprelu")
    weights.update(sae.saelens_weights())
    config = {"architecture": architecture, "d_in": sae.d, "d_sae": sae.dict_size, "dtype": "float32",
              "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
              "reshape_activations": "none",
              # sae_lens_version: the format's (SAELens converts configs without one, or older, from pre-6 layouts)
              "metadata": {"sae_lens_version": "6.0.0", "sae_lens_training_version": None,
                           "hook_name": cfg.hook, "model_name": model_name, "hook_head_index": None,
                           "prepend_bos": False, "context_size": None, "dataset_path": None,
                           "model_from_pretrained_kwargs": {}, "exported_by": "tinylab sae.py export",
                           "tinylab_arch": sae.arch}}
    if architecture == "topk":
        config.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    return config, {name: value.float().contiguous() for name, value in weights.items()}


# What our kinds are in use (saelens_architecture) -> SAELens's transcoder architectures (without, with
# a skip path): ReLU ones, and JumpReLU ones (batchtopk and matryoshka too, one threshold for all).
TRANSCODERS = {"standard": ("transcoder", "skip_transcoder"), "jumprelu": ("jumprelu_transcoder", "jumprelu_skip_transcoder")}


def saelens_transcoder(sae: SparseAutoencoder, cfg: SAEConfig, model_name: str) -> tuple[dict, dict]:
    """(cfg.json, the weights) of a per-layer or skip transcoder as SAELens saves its transcoders
    (sae_lens/saes/transcoder.py): W_enc [d_in, n], W_dec [n, d_out], W_skip [d_out, d_in], the input
    and output scales folded in, so that its features and output are ours exactly."""
    if sae.cross_layer:
        raise ConfigError("--to saelens: SAELens has no cross-layer transcoder; export per-layer ones")
    if sae.saelens_architecture not in TRANSCODERS:
        raise ConfigError(f"--to saelens: SAELens has no {sae.arch} transcoder; its transcoders are ReLU and JumpReLU "
                          f"ones (train with --arch relu, jumprelu, batchtopk or matryoshka)")
    W_enc, b_enc = sae.encoder(0)
    weights = {"W_enc": W_enc, "W_dec": sae.decoder(0), "b_enc": b_enc, "b_dec": sae.decoder_bias(0),
               **sae.saelens_weights()}
    if sae.skip:
        weights["W_skip"] = sae.W_skip.T
    config = {"architecture": TRANSCODERS[sae.saelens_architecture][int(sae.skip)], "d_in": sae.d, "d_sae": sae.dict_size,
              "d_out": sae.d_out, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
              "normalize_activations": "none", "reshape_activations": "none",
              "metadata": {"sae_lens_version": "6.0.0", "sae_lens_training_version": None, "hook_name": cfg.hook,
                           "hook_name_out": cfg.hook_out, "model_name": model_name, "hook_head_index": None,
                           "prepend_bos": False, "context_size": None, "dataset_path": None,
                           "model_from_pretrained_kwargs": {}, "exported_by": "tinylab sae.py export",
                           "tinylab_arch": sae.arch, "tinylab_transcoder": cfg.transcoder}}
    return config, {name: value.detach().float().contiguous() for name, value in weights.items()}


def is_saelens_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "cfg.json")) and os.path.isfile(os.path.join(path, "sae_weights.safetensors"))


def load_saelens(folder: str, model: str, device: str = "auto"):
    """A folder SAELens saved (SAE.save_model: cfg.json, sae_weights.safetensors) for a hook of `model`
    (a run directory or checkpoint, or a pretrained model as --model takes it) -> (SparseAutoencoder in
    eval mode, SAEConfig, run), as load_sae gives ours. Standard, TopK and JumpReLU SAEs open (SAELens
    saves its BatchTopK and Matryoshka SAEs as JumpReLU ones)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ConfigError("opening a SAELens folder reads safetensors: pip install safetensors") from None
    if not model:
        raise ConfigError(f"--model: {folder} is a SAELens SAE, which does not record the model it reads; name it, "
                          f"e.g. python sae.py report {folder} --model runs/<run>")
    with open(os.path.join(folder, "cfg.json")) as f:
        config = json.load(f)
    architecture = config.get("architecture", "standard")
    if architecture not in OPENS:
        raise ConfigError(f"{folder}: a SAELens {architecture!r} SAE; sae.py opens {', '.join(OPENS)} ones")
    for key in ("normalize_activations", "reshape_activations"):
        if config.get(key, "none") != "none":
            raise ConfigError(f"{folder}: {key} is {config[key]!r}; sae.py opens SAEs that read the hook as it is "
                              f"({key} none; SAELens's fold_activation_norm_scaling_factor folds a scale in)")
    hook = (config.get("metadata") or {}).get("hook_name") or config.get("hook_name")
    if not hook:
        raise ConfigError(f"{folder}/cfg.json names no hook (metadata.hook_name)")
    source = {"run_dir": model} if os.path.exists(model) else {"model": model}
    cfg = SAEConfig(hook=hook, arch=OPENS[architecture], k=int(config.get("k", 32)), positions="all",
                    **source).validate()
    run = load_run(cfg.run_dir, device=device, source=cfg)
    d = hook_width(run, hook)  # names the hook if the model has no such point
    weights = load_file(os.path.join(folder, "sae_weights.safetensors"))
    if tuple(weights["W_enc"].shape) != (d, config["d_sae"]):
        raise ConfigError(f"{folder}: its W_enc is {list(weights['W_enc'].shape)}, but {hook} of {model} is {d} wide")
    sae = build_sae(d, config["d_sae"], cfg.arch, cfg.k)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", *sae.saelens_weights()):
            getattr(sae, name).copy_(weights[name].float())
        if not config.get("apply_b_dec_to_input", True):  # theirs: x W_enc + b_enc; ours subtracts b_dec first
            sae.b_enc += sae.b_dec @ sae.W_enc
    return sae.to(run.device).eval(), cfg, run


def export(sae_path: str, out: str) -> str:
    """`python sae.py export <sae dir> --to saelens OUT`: a folder SAELens opens with SAE.load_from_disk."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ConfigError("--to saelens writes safetensors: pip install safetensors") from None
    if not new_or_empty(out):
        raise ConfigError(f"--to: {out} already exists and is not an empty folder; name a new one")
    if not os.path.isdir(sae_path) and not os.path.isfile(sae_path):
        raise ConfigError(f"{sae_path} does not exist; pass an SAE folder (<run>/sae/<name>)")
    sae, cfg, run = load_sae(sae_path, device="cpu")  # refuses an SAE whose model checkpoint moved on
    config, weights = saelens_folder(sae, cfg, os.path.abspath(run.checkpoint_path))

    def write(staging):
        save_file(weights, os.path.join(staging, "sae_weights.safetensors"))
        write_json(os.path.join(staging, "cfg.json"), config)

    write_folder(out, write)
    return out
