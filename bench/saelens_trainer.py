"""The SAELens side of bench/sae_vs_saelens.py: trains SAELens's own BatchTopK or Matryoshka BatchTopK
SAE, with SAELens's own trainer (SAETrainer), on the rows of a tinylab activation dump, and saves it as
SAELens saves a finished SAE (save_inference_model: a JumpReLU SAE, cfg.json + sae_weights.safetensors,
reading raw activations), which sae.load_saelens opens. It runs under the SAELens virtualenv:

    .venv-saelens/bin/python bench/saelens_trainer.py --dump DUMP_DIR --arch batchtopk|matryoshka \
        --d_sae N --k K --steps S --batch_size B --lr LR --seed SEED [--matryoshka_sizes 64,256] \
        [--warmup_steps 100] [--hook HOOK] --out FOLDER

and prints one JSON line on stdout: {"seconds", "rows_per_sec", "steps", "train_l0"} (seconds: trainer.fit()
alone, no loading, norm estimate or saving; train_l0: mean features per row over the last ~10% of steps).

Data: every shard's rows in one float32 tensor on the CPU, served in batches of B from a fresh permutation
per epoch (torch.Generator seeded by SEED), cycling through epochs; the SAE's init is seeded by SEED too.

Settings chosen here (everything else is SAELens 6.54's default):
  lr schedule   "cosineannealing" to lr_end 0 after --warmup_steps of linear warmup (lr_decay_steps 0);
                SAELens also offers "constant" and "cosineannealingwarmrestarts", plus an optional linear
                decay tail (lr_decay_steps). Adam betas 0.9/0.999 (its defaults).
  normalisation "expected_average_only_in": inputs times sqrt(d) / E||x|| (tinylab: sqrt(d / E||x||^2)),
                estimated here over every row, before fit() (so it neither eats training batches nor
                counts in the time); fit() folds it into the weights, so cfg.json says "none".
  matryoshka    matryoshka_widths = the --matryoshka_sizes prefixes + [d_sae] (cumulative, as tinylab's).
  windows       feature_sampling_window = ceil(S / 10) steps, only so that the trainer's last sparsity
                window (metadata.l0) covers the last ~10% of steps; it changes no training.
  off           W&B logging, evals, checkpoints; tqdm bars (TQDM_DISABLE).
SAELens defaults kept, where they differ from tinylab's sae.py: AuxK coefficient 1.0 (tinylab 1/32), its
k_aux d/2 scaled down by min(dead / k_aux, 1); dead = no firing for dead_feature_window = 1000 steps (tinylab
counts 1M rows); no unit-norm decoder constraint -- rescale_acts_by_decoder_norm=True instead (features are
pre-activations times decoder norms, folded out on saving); decoder init: kaiming-uniform rows scaled to norm
0.1, encoder its transpose; b_dec init zeros (tinylab: the mean input); grad-norm clip 1.0 (hard-coded);
topk_threshold_lr 0.01; use_matryoshka_aux_loss False; no autocast.
"""

import argparse
import glob
import json
import math
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # before sae_lens imports tqdm
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                    MatryoshkaBatchTopKTrainingSAEConfig)
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.sae_trainer import SAETrainer


def load_rows(dump: str) -> torch.Tensor:
    shards = sorted(glob.glob(os.path.join(dump, "acts-*.npy")))
    if not shards:
        sys.exit(f"{dump}: no acts-*.npy shards")
    return torch.from_numpy(np.concatenate([np.load(p, mmap_mode="r") for p in shards]).astype(np.float32))


def batches(rows: torch.Tensor, batch_size: int, seed: int):
    """Batches of batch_size rows, a new random order each epoch, forever."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    while True:
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(rows), generator=gen)])
        yield rows[order[:batch_size]]
        order = order[batch_size:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dump", required=True)
    p.add_argument("--arch", required=True, choices=("batchtopk", "matryoshka"))
    p.add_argument("--d_sae", type=int, required=True)
    p.add_argument("--k", type=float, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch_size", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--matryoshka_sizes", default="", help="nested prefix sizes below d_sae, e.g. 64,256")
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--hook", default="", help="hook name for cfg.json (default: the dump manifest's)")
    p.add_argument("--out", required=True)
    a = p.parse_args()

    with open(os.path.join(a.dump, "manifest.json")) as f:
        manifest = json.load(f)
    rows = load_rows(a.dump)
    d = rows.shape[1]
    torch.manual_seed(a.seed)

    common = dict(d_in=d, d_sae=a.d_sae, k=a.k, dtype="float32", device="cpu",
                  normalize_activations="expected_average_only_in",
                  metadata=SAEMetadata(hook_name=a.hook or manifest["hook"],
                                       model_name=os.path.dirname(manifest.get("checkpoint") or "")))
    if a.arch == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    else:
        sizes = [int(s) for s in a.matryoshka_sizes.split(",") if s.strip()]
        if any(s >= a.d_sae for s in sizes):
            sys.exit("--matryoshka_sizes: every prefix must be below --d_sae (the full dictionary is the last level)")
        sae = MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(**common, matryoshka_widths=sizes + [a.d_sae]))

    cfg = SAETrainerConfig(total_training_samples=a.steps * a.batch_size, train_batch_size_samples=a.batch_size,
                           lr=a.lr, lr_end=0.0, lr_scheduler_name="cosineannealing",
                           lr_warm_up_steps=a.warmup_steps, lr_decay_steps=0, device="cpu",
                           feature_sampling_window=max(1, math.ceil(a.steps / 10)))
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches(rows, a.batch_size, a.seed))
    # SAELens's own estimate (sqrt(d) / mean norm) over every row, in one pass of full batches
    trainer.activation_scaler.estimate_scaling_factor(d_in=d, data_provider=iter(rows.split(a.batch_size)),
                                                      n_batches_for_norm_estimate=math.ceil(len(rows) / a.batch_size))

    start = time.perf_counter()
    sae = trainer.fit()  # trains, then folds the scaling factor into the weights (normalize_activations none)
    seconds = time.perf_counter() - start

    sae.save_inference_model(a.out)  # as SAELens's runner saves: a JumpReLU SAE
    l0 = sae.cfg.metadata.l0
    print(json.dumps({"seconds": round(seconds, 3), "rows_per_sec": round(a.steps * a.batch_size / seconds, 1),
                      "steps": trainer.n_training_steps, "train_l0": None if l0 is None else round(l0, 3)}))


if __name__ == "__main__":
    main()
