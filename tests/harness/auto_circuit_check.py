"""Run in the auto-circuit virtualenv by tests/test_circuit.py and bench/circuit.py: argv = an input .pt
(our model's HookedTransformer settings and weights from interop.transformerlens, the pairs, the IG
steps) and an output .pt. It builds the HookedTransformer (TransformerLens 2, which auto-circuit 1.0.1
needs), wraps it with auto-circuit's patchable_model (split q/k/v inputs, per-head results, MLP inputs:
the same graph as ours), and saves auto-circuit's EAP and integrated-gradient edge scores by our edge
names, with the seconds each took."""
import sys
import time
import warnings

import torch

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.dirname(
    __import__("os").path.abspath(__file__)))))
warnings.filterwarnings("ignore")

from auto_circuit.data import PromptDataLoader, PromptDataset  # noqa: E402
from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores  # noqa: E402
from auto_circuit.types import AblationType  # noqa: E402
from auto_circuit.utils.graph_utils import patchable_model  # noqa: E402

from interop.transformerlens import hooked_from_settings  # noqa: E402

given = torch.load(sys.argv[1], weights_only=False)
settings = dict(given["settings"])
if settings.get("n_key_value_heads"):
    settings["ungroup_grouped_query_attention"] = True  # a key and value input per query head, as ours
tl = hooked_from_settings(settings, given["state"])
tl.set_use_attn_result(True)
tl.set_use_split_qkv_input(True)
if not settings["attn_only"]:
    tl.set_use_hook_mlp_in(True)
clean, corrupted = given["clean"], given["corrupted"]
with torch.no_grad():
    logits_differ = float((tl(clean) - given["logits"]).abs().max())
T = clean.shape[1]
loader = PromptDataLoader(PromptDataset(list(clean), list(corrupted), list(given["right"][:, None]),
                                        list(given["wrong"][:, None])), seq_len=T, diverge_idx=0,
                          batch_size=len(clean), shuffle=False)
model = patchable_model(tl, factorized=True, slice_output="last_seq", separate_qkv=True, device=torch.device("cpu"))


def name(node, receiving: bool) -> str:
    """auto-circuit's node names as ours: Resid Start -> input, A1.2 -> a1.h2, A1.2.Q -> a1.h2<q>,
    MLP 0 -> m0, Resid End -> logits."""
    if node.name == "Resid Start":
        return "input"
    if node.name == "Resid End":
        return "logits"
    if node.name.startswith("MLP "):
        return "m" + node.name[4:]
    layer, head, *qkv = node.name[1:].split(".")
    return f"a{layer}.h{head}" + (f"<{qkv[0].lower()}>" if receiving and qkv else "")


out = {"logits_differ": logits_differ}
for key, kwargs in (("eap", dict(mask_val=0.0)), ("ig", dict(integrated_grad_samples=given["ig_steps"]))):
    start = time.perf_counter()
    scores = mask_gradient_prune_scores(model, loader, None, grad_function="logit", answer_function="avg_diff",
                                        ablation_type=AblationType.RESAMPLE, **kwargs)
    out[key + "_seconds"] = time.perf_counter() - start
    out[key] = {f"{name(e.src, False)}->{name(e.dest, True)}": float(e.prune_score(scores)) for e in model.edges}
torch.save(out, sys.argv[2])
print("ok", len(out["eap"]), "edges")
