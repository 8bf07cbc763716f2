"""TransformerLens 3 and 4: our model as a HookedTransformer (2, 3) or a TransformerBridge around its
native model (4), with the same logits and the same activations under the same hook names, and the
folder `export.py --to transformer_lens` writes. An optional extra: nothing here runs unless asked.

    from interop.transformerlens import to_transformer_lens
    tl = to_transformer_lens(run.model)        # or a Run; logits and hooks match ours
"""

from __future__ import annotations

import json
import os
import warnings

import torch

from config import rope_scaling
from model import Transformer, head_width, mlp_width


def _model(model_or_run) -> Transformer:
    """A Transformer from itself or from a Run (which holds one as .model)."""
    return getattr(model_or_run, "model", model_or_run)


def transformer_lens_version() -> int:
    """The installed TransformerLens's major version; ImportError saying how to install it."""
    try:
        from importlib.metadata import version

        import transformer_lens  # noqa: F401
    except ImportError as error:
        raise ImportError(f"this needs TransformerLens: pip install transformer_lens ({error})") from error
    return int(version("transformer_lens").split(".")[0])


def to_transformer_lens(model, device=None):
    """This model in TransformerLens, the same logits and the same activations under the same hook
    names: with TransformerLens 4 a `TransformerBridge` around its native model (built from a config
    and our weights, no Hugging Face download), with 2 or 3 a `HookedTransformer`. An optional extra.

    Version 3 has every piece (rotary positions, QK-norm, ReLU², SwiGLU, grouped-query attention,
    soft-capped logits, parameter-free norms); version 4's native model has all but QK-norm and
    ReLU², and rotates adjacent pairs of each head's query and key (we rotate halves, as Llama
    does), so its hook_q and hook_k hold ours with each head's dimensions reordered
    (`rotary_order`). Neither has an attention sink or biases inside a SwiGLU (their gated MLP has
    none there). What has no counterpart raises ValueError naming it."""
    model = _model(model)
    _, settings, state, build = _transformer_lens_parts(model, transformer_lens_version())
    return build(settings, state, device or next(model.parameters()).device)


def _transformer_lens_parts(model, major: int):
    """(class name, the config's arguments as JSON values, our weights under its names, the function
    that builds it from those) for TransformerLens `major`; ValueError naming a piece it lacks."""
    cfg = model.cfg
    if cfg.attention_sink:
        raise ValueError("this model has an attention sink (--attention_sink), which TransformerLens does not have")
    if cfg.activation == "swiglu" and cfg.bias:
        raise ValueError("this model's SwiGLU MLPs have biases on the gate and its partner (--bias true); "
                         "TransformerLens's gated MLP has none there (one bias after the product). Train with --bias false")
    if major >= 4:
        return "TransformerBridge (native)", _bridge_settings(model), _bridge_state(model), bridge_from_settings
    return "HookedTransformer", _hooked_settings(model), _hooked_state(model), hooked_from_settings


TL_FILE = "transformer_lens.json"  # export.py --to transformer_lens: the settings beside model.safetensors


def export_transformer_lens(model, out: str) -> dict:
    """Writes `out` for the installed TransformerLens: transformer_lens.json (its major version, the
    class, the config's arguments) and model.safetensors (the weights under its names), which
    load_transformer_lens (or the README's few lines, without tinylab) opens. Returns the JSON.
    A model with a piece TransformerLens lacks raises ValueError before anything is written."""
    from safetensors.torch import save_file

    major = transformer_lens_version()
    name, settings, state, _ = _transformer_lens_parts(_model(model), major)
    record = {"transformer_lens": major, "class": name, "settings": settings}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, TL_FILE), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    save_file({k: v.detach().cpu().clone() for k, v in state.items()}, os.path.join(out, "model.safetensors"))  # tied: twice
    return record


def load_transformer_lens(folder: str, device=None):
    """A folder export.py --to transformer_lens wrote -> the TransformerBridge (4) or
    HookedTransformer (2, 3) it describes, in eval mode. The installed TransformerLens must be of
    the major version it was written for."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, TL_FILE)) as f:
        record = json.load(f)
    major = transformer_lens_version()
    if (record["transformer_lens"] >= 4) != (major >= 4):
        raise ValueError(f"{folder} was exported for TransformerLens {record['transformer_lens']}, and this is "
                         f"{major}: export it again with this TransformerLens installed")
    state = load_file(os.path.join(folder, "model.safetensors"))
    build = bridge_from_settings if major >= 4 else hooked_from_settings
    return build(record["settings"], state, device)


def rotary_order(head_dim: int) -> torch.Tensor:
    """TransformerLens 4's order of a rotary head's dimensions in ours: it rotates the pairs
    (2i, 2i+1), we rotate (i, i + head_dim/2), so its dimension 2i is our i and 2i+1 our i + head_dim/2.
    theirs = ours[..., rotary_order(Dh)]."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], 1).flatten()


def _bridge_settings(model) -> dict:
    """TransformerBridgeConfig's arguments for this model (JSON values; rope_scaling is an attribute
    TransformerLens 4's native model reads but the constructor does not take)."""
    cfg = model.cfg
    if cfg.qk_norm:
        raise ValueError("this model has QK-norm (--qk_norm), which TransformerLens 4's native model does not have; "
                         "use TransformerLens 3, or export.py --to hf and TransformerBridge.boot_transformers")
    if cfg.activation == "relu2":
        raise ValueError("this model's MLPs use ReLU² (--activation relu2), which TransformerLens 4's native model "
                         "does not have; use TransformerLens 3")
    D, H = cfg.embedding_dim, cfg.num_heads
    Dh, Hkv = head_width(cfg), cfg.num_kv_heads or H
    dtype = next(model.parameters()).dtype
    normalization = {"none": None, "layernorm": "LN", "rmsnorm": "RMS"}[cfg.norm]
    if normalization and not cfg.norm_weights:
        normalization += "Pre"
    rotary = cfg.positional == "rope"
    settings = dict(
        d_model=D, d_head=Dh, n_layers=cfg.num_blocks, n_ctx=cfg.context_len, n_heads=H, d_vocab=model.vocab_size,
        d_mlp=model.blocks[0].mlp.fc_in.out_features if model.blocks[0].mlp is not None else mlp_width(cfg),
        act_fn={"swiglu": "silu", "gelu_tanh": "gelu_new"}.get(cfg.activation, cfg.activation),
        gated_mlp=cfg.activation == "swiglu", attn_only=cfg.attention_only, normalization_type=normalization,
        eps=cfg.norm_eps or (1e-5 if cfg.norm == "layernorm" else torch.finfo(dtype).eps),
        positional_embedding_type="rotary" if rotary else "standard", n_key_value_heads=Hkv if Hkv != H else None,
        output_logits_soft_cap=cfg.logit_softcap or -1.0, tie_word_embeddings=cfg.tie_embeddings,
        default_prepend_bos=False, init_weights=False, dtype=str(dtype).replace("torch.", ""))
    if rotary:
        settings.update(rotary_dim=Dh, rotary_base=cfg.rope_base)
    if rope_scaling(cfg):
        settings["rope_scaling"] = rope_scaling(cfg)
    return settings


def _bridge_state(model) -> dict[str, torch.Tensor]:
    """Our weights under the names of TransformerLens 4's NativeModel (its modules hold biases
    everywhere but in a gated MLP and the unembedding: ours, or zeros)."""
    cfg = model.cfg
    params = dict(model.named_parameters(remove_duplicate=False))
    D, H = cfg.embedding_dim, cfg.num_heads
    Dh, Hkv = head_width(cfg), cfg.num_kv_heads or H
    order = rotary_order(Dh) if cfg.positional == "rope" else torch.arange(Dh)

    def get(name, size=None):
        return params[name].detach() if name in params else torch.zeros(size)

    state = {"tok_embed.weight": get("embed.weight"), "head.weight": get("unembed.weight")}
    if cfg.positional == "learned":
        state["pos.weight"] = get("pos_embed.weight")

    def norm(ours: str, theirs: str):
        if cfg.norm != "none" and cfg.norm_weights:
            state[f"{theirs}.weight"] = get(f"{ours}.norm.weight")
            if cfg.norm == "layernorm":
                state[f"{theirs}.bias"] = get(f"{ours}.norm.bias", (D,))

    for i in range(cfg.num_blocks):
        ours, theirs = f"blocks.{i}", f"layers.{i}"
        sizes = [H * Dh, Hkv * Dh, Hkv * Dh]
        weights = get(f"{ours}.attn.qkv.weight").split(sizes)
        biases = get(f"{ours}.attn.qkv.bias", (sum(sizes),)).split(sizes)
        for letter, weight, bias, heads in zip("qkv", weights, biases, (H, Hkv, Hkv)):
            rows = order if letter != "v" else torch.arange(Dh)  # the rotation's pairs side by side
            state[f"{theirs}.attn.{letter}.weight"] = weight.view(heads, Dh, D)[:, rows].reshape(heads * Dh, D)
            state[f"{theirs}.attn.{letter}.bias"] = bias.view(heads, Dh)[:, rows].reshape(heads * Dh)
        state[f"{theirs}.attn.o.weight"] = get(f"{ours}.attn.out.weight")
        state[f"{theirs}.attn.o.bias"] = get(f"{ours}.attn.out.bias", (D,))
        norm(f"{ours}.ln1", f"{theirs}.ln1")
        if not cfg.attention_only:
            norm(f"{ours}.ln2", f"{theirs}.ln2")
            if cfg.activation == "swiglu":
                for mine, name in (("fc_gate", "gate"), ("fc_in", "in"), ("fc_out", "out")):
                    state[f"{theirs}.mlp.{name}.weight"] = get(f"{ours}.mlp.{mine}.weight")
            else:
                for mine in ("fc_in", "fc_out"):
                    weight = get(f"{ours}.mlp.{mine}.weight")
                    state[f"{theirs}.mlp.{mine}.weight"] = weight
                    state[f"{theirs}.mlp.{mine}.bias"] = get(f"{ours}.mlp.{mine}.bias", (weight.shape[0],))
    norm("ln_final", "ln_out")
    return {k: v.contiguous() for k, v in state.items()}


def bridge_from_settings(settings: dict, state: dict[str, torch.Tensor], device=None):
    """TransformerLens 4: its native model built from `settings` (TransformerBridgeConfig's
    arguments, as _bridge_settings writes them) holding `state`, in a TransformerBridge."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge.sources import build_bridge_from_module
    from transformer_lens.model_bridge.sources.native import NativeModel

    settings = dict(settings)
    scaling = settings.pop("rope_scaling", None)
    dtype = getattr(torch, settings.pop("dtype"))
    tl_cfg = TransformerBridgeConfig(**settings, dtype=dtype)
    if scaling:
        tl_cfg.rope_scaling = scaling
    native = NativeModel(tl_cfg)
    native.load_state_dict(state, strict=True)
    native = native.to(device=device, dtype=dtype)
    return build_bridge_from_module(native, "TransformerLensNative", tl_config=tl_cfg).eval()


def _hooked_settings(model) -> dict:
    """HookedTransformerConfig's arguments for this model, as JSON values (dtype by name, no device)."""
    cfg, gated = model.cfg, model.cfg.activation == "swiglu"
    D, H = cfg.embedding_dim, cfg.num_heads
    Dh, Hkv = head_width(cfg), cfg.num_kv_heads or H
    mlp = model.blocks[0].mlp.fc_in.out_features if model.blocks[0].mlp is not None else mlp_width(cfg)
    dtype = next(model.parameters()).dtype
    # nn.RMSNorm's default eps is its input's machine epsilon
    eps = cfg.norm_eps or (1e-5 if cfg.norm == "layernorm" else torch.finfo(dtype).eps)
    normalization = {"none": None, "layernorm": "LN", "rmsnorm": "RMS"}[cfg.norm]
    if normalization and not cfg.norm_weights:
        normalization += "Pre"  # LNPre / RMSPre: TransformerLens's norms without weights
    rotary = cfg.positional == "rope"
    extra = dict(rotary_dim=Dh, rotary_base=cfg.rope_base, rotary_adjacent_pairs=False) if rotary else {}
    scaling = rope_scaling(cfg)
    if scaling and scaling["rope_type"] != "llama3":
        raise ValueError(f"this model's rope_scaling is {scaling['rope_type']}; TransformerLens has only llama3's")
    if scaling:  # TransformerLens calls Llama 3's scaling NTK-by-parts
        extra.update(use_NTK_by_parts_rope=True, NTK_by_parts_factor=scaling["factor"],
                     NTK_by_parts_low_freq_factor=scaling["low_freq_factor"],
                     NTK_by_parts_high_freq_factor=scaling["high_freq_factor"],
                     NTK_original_ctx_len=scaling["original_max_position_embeddings"])
    if Hkv != H:
        extra["n_key_value_heads"] = Hkv
    if cfg.logit_softcap:
        extra["output_logits_soft_cap"] = cfg.logit_softcap
    return dict(
        n_layers=cfg.num_blocks, d_model=D, n_ctx=cfg.context_len, d_head=Dh, n_heads=H, d_mlp=mlp,
        d_vocab=model.vocab_size, act_fn="silu" if gated else {"gelu_tanh": "gelu_new"}.get(cfg.activation, cfg.activation), gated_mlp=gated,
        attn_only=cfg.attention_only, eps=eps, normalization_type=normalization, use_qk_norm=cfg.qk_norm,
        positional_embedding_type="rotary" if rotary else "standard", default_prepend_bos=False,
        dtype=str(dtype).replace("torch.", ""), **extra)


def _hooked_state(model) -> dict[str, torch.Tensor]:
    """Our weights under HookedTransformer's names (biases it always has: ours, or zeros)."""
    cfg, gated = model.cfg, model.cfg.activation == "swiglu"
    D, H = cfg.embedding_dim, cfg.num_heads
    Dh, Hkv = head_width(cfg), cfg.num_kv_heads or H
    rotary = cfg.positional == "rope"
    mlp = model.blocks[0].mlp.fc_in.out_features if model.blocks[0].mlp is not None else mlp_width(cfg)
    params = dict(model.named_parameters(remove_duplicate=False))

    def get(name, shape=None, fill=0.0):
        if name in params:
            return params[name].detach()
        return torch.full(shape, fill)  # bias=False: TransformerLens always has biases; no weight: ones

    def norm(ours: str, theirs: str, state: dict):
        if cfg.norm == "none" or not cfg.norm_weights:  # no norm, or LNPre / RMSPre: nothing to fill
            return
        state[f"{theirs}.w"] = get(f"{ours}.norm.weight")
        if cfg.norm == "layernorm":
            state[f"{theirs}.b"] = get(f"{ours}.norm.bias", (D,))

    state = {"embed.W_E": get("embed.weight"), "unembed.W_U": get("unembed.weight").T,
             "unembed.b_U": torch.zeros(model.vocab_size)}
    if not rotary:
        state["pos_embed.W_pos"] = get("pos_embed.weight")
    kv = "_" if Hkv != H else ""  # grouped-query attention keeps its Hkv heads in _W_K, _W_V
    for i in range(cfg.num_blocks):
        ours, theirs = f"blocks.{i}", f"blocks.{i}"
        w = get(f"{ours}.attn.qkv.weight").split([H * Dh, Hkv * Dh, Hkv * Dh])
        b = get(f"{ours}.attn.qkv.bias", ((H + 2 * Hkv) * Dh,)).split([H * Dh, Hkv * Dh, Hkv * Dh])
        for letter, weight, bias, heads in zip("QKV", w, b, (H, Hkv, Hkv)):
            prefix = kv if letter != "Q" else ""
            state[f"{theirs}.attn.{prefix}W_{letter}"] = weight.view(heads, Dh, D).transpose(1, 2)  # [heads, D, Dh]
            state[f"{theirs}.attn.{prefix}b_{letter}"] = bias.view(heads, Dh)  # [heads, Dh]
        state[f"{theirs}.attn.W_O"] = get(f"{ours}.attn.out.weight").view(D, H, Dh).permute(1, 2, 0)  # [H, Dh, D]
        state[f"{theirs}.attn.b_O"] = get(f"{ours}.attn.out.bias", (D,))
        if cfg.qk_norm:  # TransformerLens's QK-norm always has a weight: ones for a parameter-free one
            for which in ("q_norm", "k_norm"):
                state[f"{theirs}.attn.{which}.w"] = get(f"{ours}.attn.{which}.norm.weight", (Dh,), 1.0)
        norm(f"{ours}.ln1", f"{theirs}.ln1", state)
        if not cfg.attention_only:
            norm(f"{ours}.ln2", f"{theirs}.ln2", state)
            if gated:
                state[f"{theirs}.mlp.W_gate"] = get(f"{ours}.mlp.fc_gate.weight").T
            state[f"{theirs}.mlp.W_in"] = get(f"{ours}.mlp.fc_in.weight").T
            state[f"{theirs}.mlp.b_in"] = get(f"{ours}.mlp.fc_in.bias", (mlp,))
            state[f"{theirs}.mlp.W_out"] = get(f"{ours}.mlp.fc_out.weight").T
            state[f"{theirs}.mlp.b_out"] = get(f"{ours}.mlp.fc_out.bias", (D,))
    norm("ln_final", "ln_final", state)
    return {k: v.contiguous() for k, v in state.items()}


def hooked_from_settings(settings: dict, state: dict[str, torch.Tensor], device=None):
    """TransformerLens 2 or 3: a HookedTransformer built from `settings` (HookedTransformerConfig's
    arguments, as _hooked_settings writes them) holding `state`."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    settings = dict(settings, dtype=getattr(torch, settings["dtype"]), device=str(device or "cpu"))
    with warnings.catch_warnings():  # 3.x warns that 4.0 drops the class this function builds
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        tl = HookedTransformer(HookedTransformerConfig(**settings))
    expected = tl.state_dict()
    missing = [k for k in expected if k not in state and expected[k].is_floating_point()
               and not k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos"))]  # buffers TL computes
    if missing:
        raise RuntimeError(f"this TransformerLens expects weights this conversion does "
                           f"not fill: {missing[:5]}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise RuntimeError(f"this TransformerLens has no weights named {unexpected[:5]}")
    target = expected["embed.W_E"].device
    tl.load_state_dict({k: v.to(target, expected[k].dtype).contiguous() for k, v in state.items()}, strict=False)
    return tl.eval()
