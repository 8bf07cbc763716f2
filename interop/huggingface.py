"""Pretrained checkpoints in Hugging Face's layout as tinylab models, and tinylab models out to it.

    model, cfg = load_pretrained("gpt2")                   # a hub id, or a folder: config.json + *.safetensors
    python train.py --init_from gpt2 --data_path my.txt    # fine-tune it (train.py)
    python export.py runs/<run> --to hf OUT                # a run as a Hugging Face folder (export.py)

What opens: GPT-2 (`model_type` gpt2: gpt2, gpt2-medium/large/xl, distilgpt2) and the Llama family
(llama, mistral without a sliding window, qwen2, qwen3; SmolLM and TinyStories-style Llamas are
llama): rotary positions with rope_theta and linear or Llama 3 rope_scaling, grouped-query attention,
SwiGLU, RMSNorm, tied or untied embeddings, attention and MLP biases, biases on q/k/v only (Qwen2),
q/k norms and a head_dim of its own (Qwen3). Anything else (sliding windows, layers without RoPE,
mixtures of experts, partial rotary, other activations) is refused by name.

The weights become our parameters exactly: GPT-2's Conv1D matrices transposed, Llama's q, k and v
projections stacked into our one qkv matrix (our rotary layout is Llama's, so nothing is permuted),
a bias the checkpoint lacks but our model has (Llama with attention_bias: o_proj's) set to zero.
The tokenizer comes with the model: tiktoken's gpt2 for GPT-2, the checkpoint's tokenizer.json
(read by the `tokenizers` package) for the others. Reading safetensors needs the `safetensors`
package, downloading `huggingface_hub` (the HF cache, HF_HOME, HF_ENDPOINT and HF_TOKEN as usual);
training from scratch needs neither.
"""

from __future__ import annotations

import json
import os

import torch

from config import Config, ConfigError, config_from_dict, rope_scaling
from model import Transformer, head_width, mlp_width

GPT2_TYPES = ("gpt2",)
LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED = GPT2_TYPES + LLAMA_TYPES
GPT2_VOCAB = 50257  # tiktoken's gpt2
DEFAULT_TRAIN_CONTEXT = 1024  # --init_from's --context_len unless given: nanoGPT's GPT-2 block size
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"]
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": None, "gelu": "gelu",
               "relu": "relu", "relu2": "relu2"}  # GPT-2's activation_function -> ours (None: refused)


# ---------------------------------------------------------------- where the checkpoint is


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.path.exists(name) or name.count("/") > 1


def resolve(name: str, flag: str) -> str:
    """The local folder of a checkpoint: `name` itself, or the hub id's snapshot in the HF cache,
    downloaded first if the machine is online. ConfigError naming `--flag` and what to do."""
    if _looks_local(name):
        folder = os.path.expanduser(name)
        if not os.path.isdir(folder):
            raise ConfigError(f"--{flag}: no folder {name}; name a Hugging Face checkpoint folder "
                              f"(config.json + *.safetensors) or a hub id such as gpt2")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ConfigError(f"--{flag}: {name} has no config.json; a Hugging Face checkpoint folder holds "
                              f"config.json and model.safetensors (or shards with model.safetensors.index.json)")
        return folder
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise ConfigError(f"--{flag}: {name} is not a folder here, and downloading it from the Hugging Face hub "
                          f"needs huggingface_hub: pip install huggingface_hub safetensors tokenizers") from None
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME") or
                                                            os.path.expanduser("~/.cache/huggingface"), "hub")
    try:
        folder = huggingface_hub.snapshot_download(name, allow_patterns=HUB_FILES)
        if not _weight_files(folder):  # an older repository: PyTorch pickles, no safetensors
            folder = huggingface_hub.snapshot_download(name, allow_patterns=HUB_FILES + ["pytorch_model*.bin*"])
    except errors.GatedRepoError:
        raise ConfigError(f"--{flag}: {name} is gated on the Hugging Face hub: accept its licence on "
                          f"https://huggingface.co/{name} and set HF_TOKEN to a token of that account "
                          f"(or run `hf auth login`)") from None
    except errors.RepositoryNotFoundError:
        raise ConfigError(f"--{flag}: the Hugging Face hub has no model {name!r} (or it is private: set HF_TOKEN); "
                          f"check the id, or name a local folder") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, OSError) as e:
        raise ConfigError(f"--{flag}: could not download {name} from the Hugging Face hub, and the cache "
                          f"{cache} does not hold it ({type(e).__name__}). On a machine that can download, run "
                          f"`hf download {name}` into that cache (HF_HOME sets where), or copy the model's folder "
                          f"here (config.json, *.safetensors, tokenizer.json) and pass its path") from None
    return folder


def _weight_files(folder: str) -> list[str]:
    """The checkpoint's weight files: safetensors (one file, or the shards its index names),
    else PyTorch's pytorch_model*.bin."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(folder, n) for n in names]
        if os.path.isfile(os.path.join(folder, single)):
            return [os.path.join(folder, single)]
    return []


def weight_files(folder: str, flag: str) -> list[str]:
    """_weight_files, or a ConfigError naming what to put there."""
    files = _weight_files(folder)
    if not files:
        raise ConfigError(f"--{flag}: {folder} has config.json but no weights: put model.safetensors there (or "
                          f"its shards and model.safetensors.index.json, or pytorch_model.bin)")
    return files


def read_hf_config(folder: str, flag: str) -> dict:
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--{flag}: cannot read {path} ({e}); it should be the checkpoint's Hugging Face config") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"--{flag}: {path} is not a JSON object")
    return hf


# ---------------------------------------------------------------- config.json -> our flags


def _refuse(flag: str, name: str, what: str):
    raise ConfigError(f"--{flag}: {name} has {what}, which tinylab's model does not have. It opens GPT-2 "
                      f"(gpt2) and the Llama family ({', '.join(LLAMA_TYPES)}) with full attention in every "
                      f"layer, RoPE on every layer (default, linear or llama3 scaling), SwiGLU and RMSNorm")


def _rope(hf: dict, name: str, flag: str) -> tuple[float, str]:
    """(rope_theta, our --rope_scaling) from transformers 5's rope_parameters or 4's rope_theta + rope_scaling."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    spec = params if params.get("rope_type") not in (None, "default") else scaling
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind in (None, "default"):
        return float(theta), ""
    if kind not in ("linear", "llama3"):
        _refuse(flag, name, f"rope scaling {kind!r}")
    keep = ("factor",) + (("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                          if kind == "llama3" else ())
    return float(theta), json.dumps({"rope_type": kind, **{k: spec[k] for k in keep}})


def model_fields(hf: dict, name: str, flag: str) -> dict:
    """A checkpoint's config.json -> the Config fields that give our model its shape (every model
    flag that matters, so nothing is left to a preset's defaults)."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise ConfigError(f"--{flag}: {name} is a {kind!r} model; tinylab opens {', '.join(SUPPORTED)} "
                          f"(GPT-2 and the Llama family)")
    common = dict(task="text", attention_only=False, attention_sink=False, logit_softcap=0.0, norm_weights=True,
                  vocab_size=int(hf["vocab_size"]))
    if kind == "gpt2":
        if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
            _refuse(flag, name, "attention scores scaled other than by 1/sqrt(d_head)")
        if hf.get("add_cross_attention"):
            _refuse(flag, name, "cross-attention")
        activation = ACTIVATIONS.get(hf.get("activation_function", "gelu_new"))
        if activation is None:
            _refuse(flag, name, f"activation {hf.get('activation_function')!r}")
        D = int(hf["n_embd"])
        return dict(common, num_blocks=int(hf["n_layer"]), num_heads=int(hf["n_head"]), embedding_dim=D,
                    head_dim=0, num_kv_heads=0, mlp_dim=int(hf.get("n_inner") or 4 * D),
                    context_len=int(hf["n_positions"]), norm="layernorm",
                    norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), activation=activation,
                    positional="learned", rope_base=10000.0, rope_scaling="", qk_norm=False, bias=True,
                    qkv_bias=False, tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    if hf.get("hidden_act", "silu") != "silu":
        _refuse(flag, name, f"MLP activation {hf.get('hidden_act')!r} (the Llama family's is silu)")
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if hf.get("use_sliding_window") or layer_types != {"full_attention"} or \
            (kind == "mistral" and hf.get("sliding_window")):
        _refuse(flag, name, "sliding-window attention")
    if hf.get("no_rope_layers") or hf.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse(flag, name, "layers without RoPE, or RoPE on part of each head")
    if hf.get("num_local_experts") or hf.get("num_experts"):
        _refuse(flag, name, "a mixture of experts")
    D, H = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    Dh = int(hf.get("head_dim") or D // H)
    Hkv = int(hf.get("num_key_value_heads") or H)
    theta, scaling = _rope(hf, name, flag)
    attention_bias = bool(hf.get("attention_bias", False))
    return dict(common, num_blocks=int(hf["num_hidden_layers"]), num_heads=H, embedding_dim=D,
                head_dim=0 if Dh * H == D else Dh, num_kv_heads=0 if Hkv == H else Hkv,
                mlp_dim=int(hf["intermediate_size"]), context_len=int(hf["max_position_embeddings"]),
                norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), activation="swiglu",
                positional="rope", rope_base=theta, rope_scaling=scaling, qk_norm=kind == "qwen3",
                bias=attention_bias or bool(hf.get("mlp_bias", False)), qkv_bias=kind == "qwen2",
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def checkpoint_tokenizer(folder: str, hf: dict, name: str, flag: str) -> str:
    """--tokenizer for a checkpoint: gpt2 (tiktoken) for GPT-2's vocabulary, else its tokenizer.json."""
    if hf.get("model_type") == "gpt2" and hf.get("vocab_size", 0) >= GPT2_VOCAB:
        return "gpt2"
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        return os.path.abspath(path)
    spm = " (it has tokenizer.model, sentencepiece's: `AutoTokenizer.from_pretrained(folder).save_pretrained(folder)` " \
          "writes the tokenizer.json beside it)" if os.path.isfile(os.path.join(folder, "tokenizer.model")) else ""
    raise ConfigError(f"--{flag}: {name} has no tokenizer.json{spm}; place the model's tokenizer.json in {folder}"
                      + (", or pass --tokenizer" if flag == "init_from" else ""))


def pretrained_settings(name: str, flag: str, tokenizer: str = "") -> tuple[str, dict]:
    """(the checkpoint's folder, its Config fields: shape, task and tokenizer). `tokenizer` is an
    explicit --tokenizer; one that is not the checkpoint's raises ConfigError."""
    folder = resolve(name, flag)
    hf = read_hf_config(folder, flag)
    fields = model_fields(hf, name, flag)
    weight_files(folder, flag)  # before anything reads the tokenizer: a folder without weights says so
    if tokenizer:
        from plumbing.corpus import tokenizer_label  # the model-and-data floor: corpus.py reads tokenizers
        own = None
        try:
            own = checkpoint_tokenizer(folder, hf, name, flag)
        except ConfigError:
            pass  # no tokenizer with the checkpoint: the explicit one is all there is
        if own is not None and tokenizer_label(own) != tokenizer_label(tokenizer):
            raise ConfigError(f"--tokenizer: {name} was trained with {own}, not {tokenizer}; drop --tokenizer "
                              f"(--{flag} brings the checkpoint's own)")
        fields["tokenizer"] = tokenizer
    else:
        fields["tokenizer"] = checkpoint_tokenizer(folder, hf, name, flag)
    return folder, fields


def apply_init_from(cfg: Config, explicit: set[str]) -> Config:
    """train.py's --init_from: the checkpoint's task, tokenizer and shape in place of the preset's.
    A flag typed explicitly that disagrees is refused, except --context_len up to the checkpoint's
    (the default is min(checkpoint's, 1024) for training)."""
    _, fields = pretrained_settings(cfg.init_from, "init_from", cfg.tokenizer if "tokenizer" in explicit else "")
    longest = fields["context_len"]
    for key, value in fields.items():
        if key in explicit and key not in ("context_len", "tokenizer") and getattr(cfg, key) != value:
            raise ConfigError(f"--{key}: {cfg.init_from} has {key} {value!r}, and --init_from keeps the checkpoint's "
                              f"shape; drop --{key}")
    if "context_len" in explicit:
        if cfg.context_len > longest:
            raise ConfigError(f"--context_len: {cfg.init_from} was trained for at most {longest} positions; "
                              f"pass {longest} or fewer")
        fields["context_len"] = cfg.context_len
    else:
        fields["context_len"] = min(longest, DEFAULT_TRAIN_CONTEXT)
    return config_from_dict({**cfg.to_dict(), **fields})


# ---------------------------------------------------------------- weights


def read_weights(folder: str, flag: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's weight files, by its Hugging Face name."""
    files = weight_files(folder, flag)
    tensors = {}
    for path in files:
        if not os.path.isfile(path):
            raise ConfigError(f"--{flag}: {path} is missing: the checkpoint's index names it")
        if path.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise ConfigError(f"--{flag}: reading {path} needs the safetensors package: pip install "
                                  f"safetensors") from None
            try:
                tensors.update(load_file(path))
            except Exception as e:
                raise ConfigError(f"--{flag}: {path} is not a readable safetensors file "
                                  f"({str(e).splitlines()[0][:200]}); download it again") from None
        else:
            try:
                tensors.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
            except Exception as e:
                raise ConfigError(f"--{flag}: {path} is not a readable PyTorch checkpoint ({type(e).__name__}); "
                                  f"download it again") from None
    return tensors


def _strip(name: str) -> str:
    for prefix in ("transformer.", "model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def state_from_hf(tensors: dict[str, torch.Tensor], cfg: Config, model_type: str) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> our state dict names (shapes as our model holds them). Keys the
    mapping does not know are kept under their own name, so that loading reports them."""
    theirs = {_strip(k): v for k, v in tensors.items()
              if not k.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))}
    if cfg.tie_embeddings:
        theirs.pop("lm_head.weight", None)
    state = {}

    def take(their_name: str, ours: str, transpose: bool = False):
        if their_name in theirs:
            t = theirs.pop(their_name)
            state[ours] = t.T if transpose else t

    take("lm_head.weight", "unembed.weight")
    if model_type == "gpt2":
        take("wte.weight", "embed.weight")
        take("wpe.weight", "pos_embed.weight")
        take("ln_f.weight", "ln_final.norm.weight")
        take("ln_f.bias", "ln_final.norm.bias")
        for i in range(cfg.num_blocks):
            h, b = f"h.{i}.", f"blocks.{i}."
            for hf_norm, our_norm in (("ln_1", "ln1"), ("ln_2", "ln2")):
                take(f"{h}{hf_norm}.weight", f"{b}{our_norm}.norm.weight")
                take(f"{h}{hf_norm}.bias", f"{b}{our_norm}.norm.bias")
            # Conv1D stores [in, out]: our Linear's weight is its transpose
            for hf_layer, ours in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.out"),
                                   ("mlp.c_fc", "mlp.fc_in"), ("mlp.c_proj", "mlp.fc_out")):
                take(f"{h}{hf_layer}.weight", f"{b}{ours}.weight", transpose=True)
                take(f"{h}{hf_layer}.bias", f"{b}{ours}.bias")
    else:
        take("embed_tokens.weight", "embed.weight")
        take("norm.weight", "ln_final.norm.weight")
        for i in range(cfg.num_blocks):
            h, b = f"layers.{i}.", f"blocks.{i}."
            take(f"{h}input_layernorm.weight", f"{b}ln1.norm.weight")
            take(f"{h}post_attention_layernorm.weight", f"{b}ln2.norm.weight")
            # q, k, v stacked: our qkv matrix is [H·Dh | Hkv·Dh | Hkv·Dh] rows, their three in order
            projections = [f"{h}self_attn.{p}_proj" for p in "qkv"]
            if all(p + ".weight" in theirs for p in projections):
                weights = [theirs.pop(p + ".weight") for p in projections]
                state[f"{b}attn.qkv.weight"] = torch.cat(weights)
                if any(p + ".bias" in theirs for p in projections):
                    state[f"{b}attn.qkv.bias"] = torch.cat([theirs.pop(p + ".bias", None) if p + ".bias" in theirs
                                                            else w.new_zeros(w.shape[0])
                                                            for p, w in zip(projections, weights)])
            take(f"{h}self_attn.o_proj.weight", f"{b}attn.out.weight")
            take(f"{h}self_attn.o_proj.bias", f"{b}attn.out.bias")
            take(f"{h}self_attn.q_norm.weight", f"{b}attn.q_norm.norm.weight")
            take(f"{h}self_attn.k_norm.weight", f"{b}attn.k_norm.norm.weight")
            for hf_layer, ours in (("gate_proj", "fc_gate"), ("up_proj", "fc_in"), ("down_proj", "fc_out")):
                take(f"{h}mlp.{hf_layer}.weight", f"{b}mlp.{ours}.weight")
                take(f"{h}mlp.{hf_layer}.bias", f"{b}mlp.{ours}.bias")
    state.update(theirs)  # unknown: load_weights names them
    return state


def load_weights(model: Transformer, folder: str, flag: str, name: str) -> None:
    """The checkpoint's weights into `model` (built from its config): every parameter filled, or a
    ConfigError naming what does not fit. A bias our model has and the checkpoint does not is zero;
    a learned position table longer than the model's context is cropped to it."""
    hf = read_hf_config(folder, flag)
    state = state_from_hf(read_weights(folder, flag), model.cfg, hf["model_type"])
    ours = model.state_dict()
    if model.cfg.tie_embeddings and "embed.weight" in state:
        state["unembed.weight"] = state["embed.weight"]  # one tensor under both names, as our state dict has it
    if "pos_embed.weight" in state and "pos_embed.weight" in ours:
        state["pos_embed.weight"] = state["pos_embed.weight"][: ours["pos_embed.weight"].shape[0]]
    unknown = sorted(set(state) - set(ours))
    if unknown:
        raise ConfigError(f"--{flag}: the weights of {name} hold tensors its config.json does not describe "
                          f"({', '.join(unknown[:4])}{', ...' if len(unknown) > 4 else ''}); the weights and "
                          f"config.json are of different models")
    for key, target in ours.items():
        if key not in state:
            if key.endswith(".bias"):
                state[key] = torch.zeros_like(target)
                continue
            raise ConfigError(f"--{flag}: the weights of {name} have no {key} (config.json describes "
                              f"{model.cfg.num_blocks} layers); the weights and config.json are of different models")
        if tuple(state[key].shape) != tuple(target.shape):
            raise ConfigError(f"--{flag}: {name}'s {key} is {list(state[key].shape)} but its config.json makes it "
                              f"{list(target.shape)}; the weights and config.json are of different models")
        # The tensors become the parameters (assign=True): no second copy. safetensors maps the file
        # privately (copy on write), so training them never writes to it; a transposed (GPT-2) or
        # converted tensor is copied once here.
        state[key] = state[key].to(device=target.device, dtype=target.dtype).contiguous()
    with torch.no_grad():
        model.load_state_dict(state, strict=True, assign=True)
    if model.cfg.tie_embeddings:
        model.unembed.weight = model.embed.weight  # assign made two parameters of the one tensor


def load_pretrained(name: str, flag: str = "model", device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, tokenizer: str = "") -> tuple[Transformer, Config]:
    """A hub id or folder -> (our model in eval mode, its Config: task text, the checkpoint's
    tokenizer, its whole context). Weights in `dtype`; the model is allocated once, never
    randomly initialised first."""
    folder, fields = pretrained_settings(name, flag, tokenizer)
    cfg = config_from_dict({**Config().to_dict(), **fields, "init_from": name, "preset": "finetune"})
    with torch.device("meta"):
        model = Transformer(cfg, cfg.vocab_size)
    model = model.to_empty(device=device).to(dtype)  # recomputes the rotary tables
    load_weights(model, folder, flag, name)
    return model.eval(), cfg


# ---------------------------------------------------------------- ours -> Hugging Face


GPT2_FILES = {  # tiktoken's gpt2 is built from these two files, which are GPT-2's vocab.json and merges.txt
    "vocab.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                   "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "merges.txt": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                   "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "relu2": "relu2"}


def hf_family(cfg: Config) -> str:
    """Which Hugging Face class a model of this config exports to (gpt2, llama, qwen2 or qwen3), or
    ValueError naming the piece that has no counterpart there."""
    def refuse(what: str, fix: str):
        raise ValueError(f"{what}, which no Hugging Face class we export to has; {fix}. Exported: GPT-2 "
                         f"(learned positions, LayerNorm, gelu/gelu_tanh/relu/relu2 MLPs) and Llama / Qwen2 / Qwen3 "
                         f"(rope, RMSNorm, SwiGLU)")
    if cfg.attention_sink:
        refuse("this model has an attention sink (--attention_sink)", "train without it")
    if cfg.attention_only:
        refuse("this model has no MLPs (--attention_only)", "train with MLPs")
    if cfg.norm == "none":
        refuse("this model has no norms (--norm none)", "train with --norm layernorm or rmsnorm")
    if cfg.logit_softcap:
        refuse(f"this model soft-caps its logits (--logit_softcap {cfg.logit_softcap:g})", "train with --logit_softcap 0")
    if cfg.positional == "learned":
        if cfg.norm != "layernorm" or cfg.activation == "swiglu" or cfg.qk_norm or cfg.head_dim:
            refuse("a model with learned positions exports as GPT-2, but this one has "
                   + ", ".join(p for p, on in (("RMSNorm", cfg.norm != "layernorm"), ("SwiGLU", cfg.activation == "swiglu"),
                                               ("QK-norm", cfg.qk_norm), ("--head_dim", bool(cfg.head_dim))) if on),
                   "use --norm layernorm, a plain MLP, no QK-norm")
        return "gpt2"
    if cfg.norm != "rmsnorm" or cfg.activation != "swiglu":
        refuse(f"a rotary model exports as Llama / Qwen, but this one has {cfg.norm} and a {cfg.activation} MLP",
               "use --norm rmsnorm --activation swiglu")
    if cfg.qk_norm:
        if cfg.bias:
            refuse("this QK-norm model (Qwen3's class) has MLP biases (--bias true)", "train with --bias false")
        if cfg.qkv_bias:
            refuse("this QK-norm model (Qwen3's class) has --qkv_bias", "train without it")
        return "qwen3"
    return "qwen2" if cfg.qkv_bias and not cfg.bias else "llama"


def hf_config(cfg: Config, vocab_size: int, family: str, eos: int | None) -> dict:
    """config.json for `family`, in the keys transformers 4 wrote (rope_theta, rope_scaling), which 5 reads too."""
    H = cfg.num_heads
    if family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab_size,
                "n_positions": cfg.context_len, "n_embd": cfg.embedding_dim, "n_layer": cfg.num_blocks, "n_head": H,
                "n_inner": mlp_width(cfg), "activation_function": HF_ACTIVATIONS[cfg.activation],
                "layer_norm_epsilon": cfg.norm_eps or 1e-5, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "scale_attn_weights": True, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": eos,
                "eos_token_id": eos, "torch_dtype": "float32"}
    names = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    out = {"architectures": [names[family]], "model_type": family, "vocab_size": vocab_size,
           "hidden_size": cfg.embedding_dim, "intermediate_size": mlp_width(cfg), "num_hidden_layers": cfg.num_blocks,
           "num_attention_heads": H, "num_key_value_heads": cfg.num_kv_heads or H, "head_dim": head_width(cfg),
           "hidden_act": "silu", "max_position_embeddings": cfg.context_len,
           # nn.RMSNorm's default eps is float32's machine epsilon: written out, so HF's norm matches
           "rms_norm_eps": cfg.norm_eps or torch.finfo(torch.float32).eps, "rope_theta": cfg.rope_base,
           "rope_scaling": rope_scaling(cfg), "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
           "bos_token_id": eos, "eos_token_id": eos, "torch_dtype": "float32"}
    if family == "llama":
        out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    elif family == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None)
    else:
        out.update(attention_bias=False, use_sliding_window=False, sliding_window=None)
    return out


def hf_state(model: Transformer, family: str) -> dict[str, torch.Tensor]:
    """Our parameters under `family`'s Hugging Face names (contiguous float tensors, a tied unembedding
    once). What our model lacks and theirs has is written as its identity: zero biases, unit norm
    weights; key/value heads of grouped-query attention repeated for GPT-2, which has none."""
    cfg = model.cfg
    ours = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    D, H, Dh = cfg.embedding_dim, cfg.num_heads, head_width(cfg)
    Hkv = cfg.num_kv_heads or H
    ones, zeros = (lambda n: torch.ones(n)), (lambda n: torch.zeros(n))
    out = {}
    norm = lambda name, n: ours.get(f"{name}.norm.weight", ones(n))  # noqa: E731 - parameter-free: ones
    norm_bias = lambda name, n: ours.get(f"{name}.norm.bias", zeros(n))  # noqa: E731
    bias = lambda name, n: ours.get(f"{name}.bias", zeros(n))  # noqa: E731
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ours["unembed.weight"]
    M = mlp_width(cfg)
    if family == "gpt2":
        p = "transformer."
        out[p + "wte.weight"], out[p + "wpe.weight"] = ours["embed.weight"], ours["pos_embed.weight"]
        out[p + "ln_f.weight"], out[p + "ln_f.bias"] = norm("ln_final", D), norm_bias("ln_final", D)
        for i in range(cfg.num_blocks):
            h, b = f"{p}h.{i}.", f"blocks.{i}."
            for hf_norm, our_norm in (("ln_1", "ln1"), ("ln_2", "ln2")):
                out[f"{h}{hf_norm}.weight"], out[f"{h}{hf_norm}.bias"] = norm(b + our_norm, D), norm_bias(b + our_norm, D)
            qkv, qkv_bias = ours[b + "attn.qkv.weight"], bias(b + "attn.qkv", (H + 2 * Hkv) * Dh)
            if Hkv != H:  # each key/value head once per query head of its group
                q, k, v = qkv.split([H * Dh, Hkv * Dh, Hkv * Dh])
                bq, bk, bv = qkv_bias.split([H * Dh, Hkv * Dh, Hkv * Dh])
                grow = lambda t: t.view(Hkv, Dh, *t.shape[1:]).repeat_interleave(H // Hkv, 0).flatten(0, 1)  # noqa: E731
                qkv, qkv_bias = torch.cat([q, grow(k), grow(v)]), torch.cat([bq, grow(bk), grow(bv)])
            out[h + "attn.c_attn.weight"], out[h + "attn.c_attn.bias"] = qkv.T, qkv_bias  # Conv1D: [in, out]
            out[h + "attn.c_proj.weight"], out[h + "attn.c_proj.bias"] = ours[b + "attn.out.weight"].T, bias(b + "attn.out", D)
            out[h + "mlp.c_fc.weight"], out[h + "mlp.c_fc.bias"] = ours[b + "mlp.fc_in.weight"].T, bias(b + "mlp.fc_in", M)
            out[h + "mlp.c_proj.weight"], out[h + "mlp.c_proj.bias"] = ours[b + "mlp.fc_out.weight"].T, bias(b + "mlp.fc_out", D)
    else:
        p = "model."
        out[p + "embed_tokens.weight"], out[p + "norm.weight"] = ours["embed.weight"], norm("ln_final", D)
        for i in range(cfg.num_blocks):
            h, b = f"{p}layers.{i}.", f"blocks.{i}."
            out[h + "input_layernorm.weight"] = norm(b + "ln1", D)
            out[h + "post_attention_layernorm.weight"] = norm(b + "ln2", D)
            for letter, weight in zip("qkv", ours[b + "attn.qkv.weight"].split([H * Dh, Hkv * Dh, Hkv * Dh])):
                out[f"{h}self_attn.{letter}_proj.weight"] = weight
            if b + "attn.qkv.bias" in ours:
                for letter, t in zip("qkv", ours[b + "attn.qkv.bias"].split([H * Dh, Hkv * Dh, Hkv * Dh])):
                    out[f"{h}self_attn.{letter}_proj.bias"] = t
            out[h + "self_attn.o_proj.weight"] = ours[b + "attn.out.weight"]
            if cfg.bias:
                out[h + "self_attn.o_proj.bias"] = ours[b + "attn.out.bias"]
            if cfg.qk_norm:
                out[h + "self_attn.q_norm.weight"] = norm(b + "attn.q_norm", Dh)
                out[h + "self_attn.k_norm.weight"] = norm(b + "attn.k_norm", Dh)
            for hf_layer, our_layer in (("gate_proj", "fc_gate"), ("up_proj", "fc_in"), ("down_proj", "fc_out")):
                out[f"{h}mlp.{hf_layer}.weight"] = ours[f"{b}mlp.{our_layer}.weight"]
                if cfg.bias:
                    out[f"{h}mlp.{hf_layer}.bias"] = ours[f"{b}mlp.{our_layer}.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def write_char_tokenizer(path: str, vocab: str, eot: int | None) -> None:
    """A tokenizer.json for a character vocabulary: BPE with no merges, so each character is one token
    (one the vocabulary lacks is dropped, as our char tokenizer drops it), decoded by concatenation;
    with eot, <|endoftext|> after the characters."""
    from tokenizers import Tokenizer, decoders, models

    table = {c: i for i, c in enumerate(vocab)}
    if eot is not None:
        table["<|endoftext|>"] = eot
    tokenizer = Tokenizer(models.BPE(vocab=table, merges=[]))
    tokenizer.decoder = decoders.Fuse()
    if eot is not None:
        tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(path)


def write_gpt2_tokenizer(folder: str) -> None:
    """GPT-2's vocab.json and merges.txt (the files tiktoken's gpt2 is made of, from its cache) and
    the tokenizer.json the tokenizers package builds from them: byte-level BPE, GPT-2's own."""
    from tiktoken.load import read_file_cached
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    for name, (url, digest) in GPT2_FILES.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(read_file_cached(url, digest))
    bpe = models.BPE.from_file(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(os.path.join(folder, "tokenizer.json"))


def write_tokenizer(folder: str, cfg: Config, tokenizer, context_len: int) -> str:
    """The tokenizer files AutoTokenizer reads, where we can write them; returns what was written
    (a sentence for the log). char: a tokenizer.json of the characters; gpt2 (and r50k_base, the same
    ranks): GPT-2's files; a tokenizer.json: a copy; other tiktoken encodings: nothing."""
    import shutil

    name = cfg.tokenizer
    eot = getattr(tokenizer, "eot_token", None)
    settings = {"model_max_length": context_len, "clean_up_tokenization_spaces": False}
    if name == "char":
        write_char_tokenizer(os.path.join(folder, "tokenizer.json"), tokenizer.vocab, eot)
        settings.update(tokenizer_class="PreTrainedTokenizerFast")
        if eot is not None:
            settings.update(eos_token="<|endoftext|>")
        written = f"tokenizer.json of the {len(tokenizer.vocab)} characters (one token each)"
    elif name in ("gpt2", "r50k_base"):
        write_gpt2_tokenizer(folder)
        settings.update(tokenizer_class="GPT2Tokenizer", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                        unk_token="<|endoftext|>", add_prefix_space=False)
        written = "GPT-2's tokenizer (vocab.json, merges.txt, tokenizer.json)"
    elif hasattr(tokenizer, "path"):  # a Hugging Face tokenizer.json, with its settings when they are beside it
        shutil.copyfile(tokenizer.path, os.path.join(folder, "tokenizer.json"))
        beside = os.path.join(os.path.dirname(tokenizer.path), "tokenizer_config.json")
        if os.path.isfile(beside):
            shutil.copyfile(beside, os.path.join(folder, "tokenizer_config.json"))
            return f"the run's tokenizer.json and tokenizer_config.json ({tokenizer.path})"
        settings.update(tokenizer_class="PreTrainedTokenizerFast")
        written = f"the run's tokenizer.json ({tokenizer.path})"
    else:
        return (f"no tokenizer files: tiktoken's {name} has no Hugging Face file we write; encode with "
                f"tiktoken.get_encoding({name!r})")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(settings, f, indent=2)
    return written


def export_hf(model: Transformer, tokenizer, out: str) -> tuple[str, str]:
    """Writes `out` (which must not exist, or be empty) as a Hugging Face checkpoint folder:
    config.json, model.safetensors, tokenizer files where we can. Returns (the family, what
    tokenizer files were written). ValueError for a model with no Hugging Face counterpart."""
    from safetensors.torch import save_file

    cfg = model.cfg
    family = hf_family(cfg)
    eot = getattr(tokenizer, "eot_token", None)
    state = hf_state(model, family)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config(cfg, model.vocab_size, family, eot), f, indent=2)
        f.write("\n")
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return family, write_tokenizer(out, cfg, tokenizer, cfg.context_len)
