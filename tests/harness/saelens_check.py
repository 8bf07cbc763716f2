"""Run in the SAELens virtualenv by tests/test_saelens.py. For each folder given, it opens the exported
SAE with SAELens's own loader and reads the rows the folder's x.npy holds. It encodes and decodes them,
then compares the result with f.npy and x_hat.npy, tinylab's features and reconstruction of those
rows. It prints one JSON line per folder. It also saves each SAE again with SAELens's own save_model
into the folder's resaved/, so that the test can open an SAE that SAELens wrote."""
import json
import os
import sys

import numpy as np
import torch
from sae_lens import SAE

for folder in sys.argv[1:]:
    sae = SAE.load_from_disk(os.path.join(folder, "saelens"), device="cpu")
    x, ours_f, ours_x_hat = (torch.from_numpy(np.load(os.path.join(folder, f"{n}.npy"))) for n in ("x", "f", "x_hat"))
    f = sae.encode(x)
    x_hat = sae(x) if hasattr(sae, "W_skip") else sae.decode(f)  # a skip transcoder's path reads x
    sae.save_model(os.path.join(folder, "resaved"))
    print(json.dumps({
        "folder": folder, "class": type(sae).__name__, "hook_name": sae.cfg.metadata.hook_name,
        "features": float((f - ours_f).abs().max() / ours_f.abs().max().clamp_min(1e-12)),
        "same_active": bool(torch.equal(f > 0, ours_f > 0)),
        "reconstruction": float((x_hat - ours_x_hat).abs().max() / ours_x_hat.abs().max()),
    }))
