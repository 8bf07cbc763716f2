"""Sparse autoencoders on a trained run's activations, judged by what they recover.

    python sae.py runs/<run> --hook blocks.0.mlp.hook_post                   # ReLU SAE, activations live
    python sae.py runs/<run> --hook blocks.0.hook_resid_post --arch topk --k 16 --source dump
    torchrun --nproc_per_node=8 sae.py runs/<run> --hook blocks.3.hook_resid_post --arch topk
    python sae.py runs/<run> --transcoder per_layer --layer 0 --arch topk --k 16  # block 0's MLP, replaced
    python sae.py report runs/<run>/sae/<name>                              # feature views + summary

An SAE lives in `<run>/sae/<name>/` (name: `<hook>-<arch>-<dict_size>` unless --name says
otherwise) and is laid out like a run: config.json, train.log, metrics.jsonl, last.pt, curves.

The dictionary: x̂ = W_dec f + b_dec with f = ReLU(W_enc (x - b_dec) + b_enc) (`relu`, trained with an
L1 penalty on f weighted by each feature's decoder norm, warmed up linearly), f = the k largest
of those pre-activations, ReLU'd (`topk`, no penalty), the k x rows largest of the whole batch
(`batchtopk`; in use, those above a threshold learned in training), those above a threshold per
feature (`jumprelu`, an L0 penalty through a straight-through estimator), or batchtopk whose
nested prefixes each reconstruct (`matryoshka`); each kind is one file in saes/. Inputs are divided by one scalar so that
E‖x‖² = d (estimated on the first rows of the train split), so --l1_coefficient means the same at
every width and layer. Each feature's decoder vector is kept at unit norm: the gradient's component
along it is removed before each step and the vector renormalised after it. Features that have not
fired for --dead_rows rows are dead: a ReLU SAE resamples them every --resample_every steps in the
first half of training (new directions from the inputs it reconstructs worst, Anthropic 2023);
a TopK SAE trains them with the AuxK loss (the dead features' k_aux largest pre-activations
reconstruct what the live ones miss, Gao et al. 2024).

A transcoder (--transcoder per_layer, or skip with a linear path beside it) is the same dictionary
reading an MLP's input (blocks.N.ln2.hook_normalized, or hook_resid_mid without a norm) and
reconstructing its output (blocks.N.hook_mlp_out); its rows are both side by side, and its metrics
are of the output, with the MLP's output replaced in the model for the CE and KL scores.

Evaluation uses the val split of the run, which neither the SAE nor the model trained on, under the
names SAELens's evals use: mse, explained_variance, l0, the dead and never-fired fractions, and with
the reconstruction spliced into the model at the hook, ce_loss_score = (CE_ablation - CE_sae) /
(CE_ablation - CE_clean) and kl_div_score = (KL_ablation - KL_sae) / KL_ablation (spliced_metrics).
"""

from __future__ import annotations

import functools
import os
import sys

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP

from analysis.runs import Sequences, hook_width, load_run, rows_of, split_sequences
from analysis.sources import DumpSource, LiveSource, default_dump_dir
from config import ConfigError, ModelSourceConfig, parse_flags, subcommand_flags
from interop.saelens import export
from optimizer import LRSchedule, apply_lr, load_optimizer_states
from plumbing.checkpoints import seed_everything, set_rng_state
from plumbing.distributed import all_reduce_sum, gather_to_main, regroup_ddp_buckets
from plumbing.session import Session, resume_checkpoint, run_command
from plumbing.tracking import Panel, plot_curves, read_metrics
from saes import SparseAutoencoder, build_sae
from saes.base import update
from saes.config import SAEConfig, load_sae, sae_dir  # noqa: F401 (load_sae: `sae.load_sae(DIR)` in notebooks)
from saes.metrics import held_out_metrics, modern_metrics
from saes.report import plot_feature_density, report

DIVERGED_ADVICE = "Lower --lr or set --grad_clip, then start again"


def first_step_loss(sae: SparseAutoencoder, model, x: torch.Tensor, cfg: SAEConfig) -> torch.Tensor:
    """The loss of a first step (no feature dead yet, so no AuxK) on rows x through `model`: the
    graph whose backward pass set the uninterrupted run's DDP buckets."""
    return sae.loss(x, cfg, cfg.l1_coefficient, None, model)[0]


# ---------------------------------------------------------------- training


def train(cfg: SAEConfig, explicit: set[str] = frozenset()) -> dict:
    """Trains one SAE (every rank of a torchrun job calls this); returns the final metrics and
    where the SAE lives. Bad input raises ConfigError / CheckpointError before anything is written."""
    with Session(cfg.device, cfg.dtype, cfg.step_timeout) as session:
        log, dist, device, dtype = session.log, session.dist, session.device, session.dtype
        run = load_run(cfg.run_dir, device=str(device), source=cfg)
        for p in run.model.parameters():
            p.requires_grad_(False)  # the model is only read
        cfg.find_transcoder_hooks(run.model)
        d = hook_width(run, cfg.hook)  # the width read
        d_out = hook_width(run, cfg.hook_out, "hook_out") if cfg.transcoder else 0  # a transcoder's, reconstructed
        out_dir, name = sae_dir(cfg, d)
        checkpoint, cfg = resume_checkpoint(out_dir, cfg, explicit, "SAE", run.step, run.checkpoint_path)
        if cfg.batch_size % dist.world_size:
            raise ConfigError(f"--batch_size: {cfg.batch_size} rows do not split into {dist.world_size} ranks")
        dict_size = cfg.dict_size or int(cfg.expansion * d)
        layers = cfg.layers  # a cross-layer transcoder's: d, d_out and dict_size are every layer's together
        if layers and dict_size % layers:
            raise ConfigError(f"--dict_size: {dict_size} features do not split evenly into {layers} layers")
        cfg.check_kind(dict_size // max(layers, 1), "--dict_size" if cfg.dict_size else
                       f"--expansion {cfg.expansion:g} x width {d}")
        source = open_source(cfg, run, d + d_out, session)
        held_out = split_sequences(run, "val", cfg.positions, cfg.eval_tokens)
        session.claim_directory(out_dir, cfg.resume == "auto", f"--run_name: {out_dir} already holds an SAE; pass "
                                f"another --run_name, or --resume auto to continue it", cfg.to_dict(), cfg.claim_timeout)

        # ---- the SAE, its optimizer, its state
        eval_rows = all_rows(run, held_out, cfg.rows_hook, device, dtype)
        seed_everything(cfg.seed)  # the same initialisation on every rank
        per = max(layers, 1)
        sae = build_sae(d // per, dict_size // per, cfg.arch, cfg.k, cfg.jumprelu_init_threshold,
                        cfg.jumprelu_bandwidth, d_out // per, cfg.transcoder == "skip", layers).to(device)
        # The input scale and b_dec from the rows it will train on: a dump's own (as stored), else the
        # model's on the first 32,768 tokens of the train split.
        sae.calibrate(source.rows(torch.arange(min(source.num_rows, 32768))) if cfg.source == "dump" else
                      all_rows(run, split_sequences(run, "train", cfg.positions, 32768), cfg.rows_hook, device, dtype),
                      cfg.normalize)
        optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        for group in optimizer.param_groups:
            group["initial_lr"] = cfg.lr
        schedule = LRSchedule(cfg, cfg.max_steps)
        step, rows_since_fired = restore(checkpoint, sae, optimizer, schedule, source, cfg, session)
        model = DDP(sae, device_ids=[dist.local_rank] if device.type == "cuda" else None) if dist.enabled else sae
        if dist.enabled and checkpoint is not None:  # bit-exact resume on 3+ ranks (see there)
            rows = eval_rows[:cfg.batch_size].to(device)
            regroup_ddp_buckets(model, functools.partial(first_step_loss, sae, model, rows, cfg), device)
        describe(cfg, run, sae, name, out_dir, len(eval_rows), step if checkpoint is not None else None, session)
        loop = session.loop(out_dir, cfg, cfg.max_steps, step, sae.parameters, checkpoint, name, DIVERGED_ADVICE)

        def state() -> dict:
            return {"model": sae.state_dict(), "optimizers": [optimizer.state_dict()], "step": step,
                    "source": gather_to_main(source.state_dict()),  # a live buffer per rank: only rank 0 needs them
                    "rows_since_fired": rows_since_fired.cpu(), "lr_schedule": schedule.state_dict(),
                    "config": cfg.to_dict(), "elapsed_seconds": loop.clock.elapsed(), "wandb_id": loop.tracker.wandb_id,
                    "d": d, "d_out": d_out, "layers": layers, "model_checkpoint": os.path.abspath(run.checkpoint_path),
                    "model_step": run.step}

        # ---- the loop
        window = dict.fromkeys(("mse_sum", "l0_sum", *sae.logged, "rows"), 0.0)
        last_eval, density = {}, None  # density: each feature's firing frequency on the held-out rows
        with loop.running():
            while step < cfg.max_steps:
                apply_lr([optimizer], schedule(step))
                x = source.batch(step).acts
                l1_weight = sae.penalty_weight(step, cfg)
                parts, f = update(sae, optimizer, x, cfg, l1_weight, rows_since_fired >= cfg.dead_rows, forward=model)
                fired = (f > 0).any(0).long()
                if dist.enabled:
                    torch_dist.all_reduce(fired)
                rows_since_fired = torch.where(fired > 0, 0, rows_since_fired + cfg.batch_size)
                step += 1
                for key in window:
                    window[key] += len(x) if key == "rows" else float(parts[key]) if key in parts else 0.0
                due = loop.after_step(step, parts["loss"])
                record = {}
                if due.record:
                    sums, window = all_reduce_sum(window, device), dict.fromkeys(window, 0.0)
                    rows = max(sums["rows"], 1)
                    ms_per_step, rows_per_sec = loop.clock.report(cfg.batch_size)
                    record = {"step": step, "train_mse": sums["mse_sum"] / rows, "train_l0": sums["l0_sum"] / rows,
                              "dead_frac": float((rows_since_fired >= cfg.dead_rows).float().mean()),
                              "lr": optimizer.param_groups[0]["lr"], "ms_per_step": ms_per_step,
                              "rows_per_sec": rows_per_sec, **sae.extra_record(sums, rows, l1_weight)}
                    log.info(f"step {step:>6}/{cfg.max_steps} | mse {record['train_mse']:.4g} | L0 "
                             f"{record['train_l0']:.1f}{sae.extra_log(record)} | dead {record['dead_frac']:.1%} | lr "
                             f"{record['lr']:.2e} | {ms_per_step:.1f} ms/step | {rows_per_sec:,.0f} rows/s | "
                             f"{loop.clock.progress(step)}")
                with loop.clock.paused():  # evals and checkpoints stay out of ms/step and rows/s
                    if due.evaluate:
                        sae.eval()
                        last_eval, density = held_out_metrics(sae, run, held_out, eval_rows, cfg.rows_hook)
                        sae.train()
                        record = {"step": step, **record, **last_eval}
                        log.info(f"eval {step:>6} | " + " | ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
                        if schedule.observe(last_eval["mse"]):
                            log.info(f"plateau: LR x {schedule.factor:.3g} of its schedule from step {step + 1}")
                    loop.write(record)
                    # After this step's metrics: they describe the SAE as trained, not the moment after resampling.
                    count = sae.maintain(step, cfg, optimizer, x, rows_since_fired >= cfg.dead_rows, dist.enabled)
                    if count:
                        rows_since_fired = torch.where(rows_since_fired >= cfg.dead_rows, 0, rows_since_fired)
                        log.info(f"step {step}: resampled {count} dead features")
                    if due.save:
                        loop.save(step, state())
                if loop.stop_requested(step):
                    break
            loop.save(step, state())
        del model  # the DDP wrapper goes before the process group does (see distributed.teardown_distributed)
        session.report_replicas(sae.parameters(), "SAE weights")  # resampling included
        if dist.is_main:
            plot_sae_curves(loop.tracker.path, os.path.join(out_dir, "curves.png"), title=name)
            if density is not None:
                plot_feature_density(density, os.path.join(out_dir, "feature_density.png"))
        shown = [f"{k} {last_eval[k]:.4f}" for k in ("explained_variance", "l0", "ce_loss_score", "kl_div_score")
                 if k in last_eval]
        seconds = loop.finish(step, " | ".join(["", *shown, f"report: python sae.py report {out_dir}"]).strip())
    return {"sae_dir": out_dir, "steps": step, "seconds": seconds, "dict_size": dict_size,
            "interrupted": loop.interrupted_name(), **last_eval}


def describe(cfg: SAEConfig, run, sae: SparseAutoencoder, name: str, out_dir: str, eval_rows: int,
             resumed_at: int | None, session: Session) -> None:
    """The SAE describes itself at the top of its log."""
    what = f"{cfg.transcoder} transcoder {name} from {cfg.hook} to {cfg.hook_out}" if cfg.transcoder else \
        f"SAE {name} on {cfg.hook}"
    session.log.info(f"{what} of {cfg.run_dir} (checkpoint {run.checkpoint_path}, step {run.step}) -> {out_dir}")
    session.log.info("  " + " ".join(f"{k}={v!r}" for k, v in cfg.to_dict().items()))
    widths = f"d={sae.d} -> {sae.dict_size} features" + (f" -> d_out={sae.d_out}" if sae.transcoder else "")
    session.log.info(f"{widths} ({sae.describe()}) | {cfg.source} source | "
                     f"{cfg.batch_size} rows/step on {session.dist.world_size} rank(s) | eval on {eval_rows:,} val rows "
                     f"| input scale {', '.join(f'{float(v):.4g}' for v in sae.scale.flatten())}"
                     + (f" | resumed at step {resumed_at}" if resumed_at is not None else ""))


def open_source(cfg: SAEConfig, run, d: int, session: Session):
    """The training rows, each rank its share: a dump of the train split (refused, naming what
    differs, if it is not of this hook, width, positions and model step), or the model live."""
    dist = session.dist
    if cfg.source == "live":
        return LiveSource(run, cfg.rows_hook, cfg.positions, "train", cfg.batch_size // dist.world_size,
                          cfg.buffer_rows // dist.world_size, cfg.seed, dist.rank, dist.world_size, cfg.max_tokens,
                          dtype=cfg.dtype)
    directory = cfg.dump or default_dump_dir(cfg.run_dir, cfg.rows_hook, "train", cfg.positions)
    wanted = {"hook": cfg.rows_hook, "d": d, "split": "train", "positions": cfg.positions, "step": run.step}
    return DumpSource(directory, cfg.batch_size, session.device, cfg.seed, dist.rank, dist.world_size).require(
        wanted, "SAE", cfg.run_dir, f" (the train split of the model at step {run.step})")


def all_rows(run, sequences: Sequences, hook: str, device, dtype) -> torch.Tensor:
    """The model's activations at `hook` on the taken positions of every sequence, 1,024 at a time."""
    return torch.cat([rows_of(run.model, sequences, s, s + 1024, hook, device, dtype).acts
                      for s in range(0, len(sequences.tokens), 1024)])


def restore(checkpoint: dict | None, sae: SparseAutoencoder, optimizer, schedule: LRSchedule, source,
            cfg: SAEConfig, session: Session) -> tuple[int, torch.Tensor]:
    """(the step to start from, each feature's rows since it last fired), and with a checkpoint the
    SAE, optimizer, schedule, source and RNG streams as it left them. On another number of ranks a
    dump continues exactly (its batches are a function of the step) and live buffers start afresh."""
    if checkpoint is None:
        return 0, torch.zeros(sae.dict_size, dtype=torch.long, device=session.device)
    sae.load_state_dict(checkpoint["model"])
    load_optimizer_states([optimizer], checkpoint["optimizers"])
    schedule.load_state_dict(checkpoint.get("lr_schedule"))
    states, dist = checkpoint["source"], session.dist
    if len(states) == dist.world_size:
        source.load_state_dict(states[dist.rank])
        set_rng_state(checkpoint["rng"][dist.rank])
    elif cfg.source == "live":
        session.log.warning("warning: resumed on a different number of ranks; the live buffers start afresh")
    return checkpoint["step"], checkpoint["rows_since_fired"].to(session.device)


# ---------------------------------------------------------------- pictures and the report


def plot_sae_curves(metrics_path: str, out_path: str, title: str = "") -> str:
    """Training and held-out mse, explained variance, L0, the dead fraction and the CE-loss score."""
    records = [modern_metrics(r) for r in read_metrics(metrics_path)]
    return plot_curves(records, out_path, [
        Panel("mse (normalised)", [("train_mse", "train", "-"), ("mse", "val", "o-")], "log"),
        Panel("explained variance (val)", [("explained_variance", "", "-")]),
        Panel("L0", [("train_l0", "", "-")], "log"),
        Panel("dead fraction", [("dead_frac", "", "-")]),
        Panel("CE-loss score (val)", [("ce_loss_score", "", "-")])], title)


# ---------------------------------------------------------------- command line


def replacement(argv: list[str]) -> dict:
    """`sae.py replacement DIR`: the whole replacement model's metrics (every MLP replaced at once)."""
    from analysis.graph import open_transcoders
    from saes.metrics import replacement_metrics
    usage = ("usage: python sae.py replacement <transcoders> [--data_path CORPUS]: a cross-layer transcoder's folder, "
             "per-layer transcoders' folders joined by commas, or a folder holding one per block (<run>/sae)")
    folder, flags = subcommand_flags(argv, ("data_path",), usage)
    transcoders, run = open_transcoders(folder, source=ModelSourceConfig.corpus_at(flags.get("data_path", "")))
    held_out = split_sequences(run, "val", "answer", 32768)
    metrics = replacement_metrics(run, transcoders, held_out)
    print(f"every MLP of {run.checkpoint_path} replaced by {', '.join(transcoders.folders)}, on "
          f"{int(held_out.mask.sum()):,} held-out positions:")
    for key, value in metrics.items():
        print(f"  {key} {value:.4f}")
    return metrics


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        usage = ("usage: python sae.py report <run>/sae/<name> [--data_path CORPUS], or report <SAELens folder> "
                 "--model <run or model>")
        folder, flags = subcommand_flags(argv[1:], ("model", "data_path"), usage)
        path = report(folder, model=flags.get("model", ""), log=print, data_path=flags.get("data_path", ""))
        print(f"wrote {path}")
        return path
    if argv and argv[0] == "replacement":
        return replacement(argv[1:])
    if argv and argv[0] == "export":
        usage = "usage: python sae.py export <run>/sae/<name> --to saelens OUT, or export <transcoders> --to circuit-tracer OUT"
        if len(argv) != 5 or argv[2] != "--to":
            raise ConfigError(usage)
        if argv[3] == "circuit-tracer":
            from analysis.graph import open_transcoders
            from interop.circuit_tracer import export_circuit_tracer
            path = export_circuit_tracer(open_transcoders(argv[1])[0], argv[4])
            print(f"wrote {path}: circuit-tracer opens it with load_transcoder_set (see its config.yaml)")
            return path
        if argv[3] != "saelens":
            raise ConfigError(f"--to: {argv[3]!r} is not a format sae.py exports; they are saelens and circuit-tracer "
                              f"({usage})")
        path = export(argv[1], argv[4])
        print(f"wrote {path}: SAELens opens it with SAE.load_from_disk({path!r})")
        return path
    cfg, explicit = parse_flags(SAEConfig, argv, "sae.py", "Train a sparse autoencoder on a run's activations "
                                "(`python sae.py report DIR` writes feature views; `python sae.py export DIR --to "
                                "saelens OUT` a folder SAELens opens).", positional="run_dir")
    return train(cfg, explicit)


if __name__ == "__main__":
    run_command(main)
