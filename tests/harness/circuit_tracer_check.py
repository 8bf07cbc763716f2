"""Run in the circuit-tracer virtualenv by tests/test_graph.py: argv = run directory, the folder
`sae.py export --to circuit-tracer` wrote, the prompt's token ids (comma-separated), an output .pt,
and a graph.json of ours, which circuit-tracer's own schema for its viewer's files must read as it is.
It converts our model to a TransformerLens 3 HookedTransformer (interop.transformerlens) with its
norms folded (so that `mlp.hook_in` is the normalised input before the gain, what our transcoders
read), builds circuit-tracer's TransformerLensReplacementModel from that config with those weights
and the transcoders circuit-tracer's own load_transcoder_set opens, runs circuit-tracer's
`attribute` on the prompt and saves its graph's tensors."""
import json
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from circuit_tracer import attribute  # noqa: E402
from circuit_tracer.frontend.graph_models import Model  # noqa: E402
from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel  # noqa: E402
from circuit_tracer.transcoder import load_transcoder_set  # noqa: E402

from analysis.runs import load_run  # noqa: E402
from interop.transformerlens import to_transformer_lens  # noqa: E402

run_dir, folder, prompt, out, ours = sys.argv[1:6]
with open(ours) as f:
    document = json.load(f)
read = Model.model_validate(document)  # circuit-tracer's viewer files (frontend/graph_models.py)
assert read.model_dump() == document, "graph.json holds fields or values its schema would change"
print("schema ok", len(read.nodes), "nodes", len(read.links), "links")
run = load_run(run_dir, device="cpu")
tl = to_transformer_lens(run.model.float())
tl.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=False)
files = sorted(f for f in os.listdir(folder) if f.startswith("layer_"))
transcoders = load_transcoder_set({i: os.path.join(folder, f"layer_{i}.safetensors") for i in range(len(files))},
                                  scan="tinylab", feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out",
                                  device=torch.device("cpu"), dtype=torch.float32, lazy_encoder=False,
                                  lazy_decoder=False)
model = TransformerLensReplacementModel(tl.cfg)
missing, unexpected = model.load_state_dict(tl.state_dict(), strict=False)
assert not unexpected, unexpected
model._configure_replacement_model(transcoders)
tokens = torch.tensor([int(t) for t in prompt.split(",")])
# circuit-tracer reads a Hugging Face tokenizer only to see that the prompt starts with a special token
# (else it prepends one); it leaves the first position out of the graph either way (zero_positions).
model.tokenizer = SimpleNamespace(all_special_ids=[int(tokens[0])], padding_side="right", vocab_size=tl.cfg.d_vocab,
                                  decode=lambda ids: " ".join(map(str, ids if isinstance(ids, list) else [ids])))
with torch.no_grad():
    assert torch.allclose(model(tokens[None]), run.model.float()(tokens[None]), atol=1e-4)
# Its salient-logit choice takes the top max_n_logits whatever the vocabulary's size: at most it.
graph = attribute(tokens, model, max_n_logits=min(10, tl.cfg.d_vocab), desired_logit_prob=0.95, batch_size=64)
torch.save({"adjacency": graph.adjacency_matrix.cpu(), "active": graph.active_features.cpu(),
            "selected": graph.selected_features.cpu(), "logit_tokens": [int(t) for t in graph.logit_tokens],
            "activations": graph.activation_values.cpu(), "normalization": tl.cfg.normalization_type}, out)
print("ok", graph.adjacency_matrix.shape)
