"""A stand-in for train.py in the sweep tests that are about agents rather than training: it takes
the flags sweep.py gives a trial, starts in milliseconds instead of seconds, logs `val_loss` (a
function of --lr, --seed and the eval) to <run>/metrics.jsonl at each of --evals evals, and stops
and resumes the way train.py does: SIGTERM / SIGUSR1 end it after the current eval with its state
saved (exit 128 + the signal), and --resume auto continues from that state."""
import argparse
import json
import math
import os
import signal
import sys
import time

parser = argparse.ArgumentParser()
for name, kind, default in (("save_model_dir", str, "runs"), ("run_name", str, "run"), ("resume", str, ""),
                            ("lr", float, 1e-3), ("weight_decay", float, 0.0), ("seed", int, 0),
                            ("evals", int, 3), ("seconds_per_eval", float, 0.0)):
    parser.add_argument(f"--{name}", type=kind, default=default)
args = parser.parse_args()
run_dir = os.path.join(args.save_model_dir, args.run_name)
os.makedirs(run_dir, exist_ok=True)
state_path, metrics_path = os.path.join(run_dir, "state.json"), os.path.join(run_dir, "metrics.jsonl")

done = 0
if args.resume == "auto" and os.path.exists(state_path):
    with open(state_path) as f:
        done = json.load(f)["evals"]
    with open(metrics_path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= done]
    with open(metrics_path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(metrics_path + ".tmp", metrics_path)  # a new file, as train.py's trim makes
    print(f"resumed at eval {done}", flush=True)

stop = []
for signum in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(signum, lambda signum, frame: stop.append(signum))
while done < args.evals and not stop:
    time.sleep(args.seconds_per_eval)
    done += 1
    value = (math.log10(args.lr) + 3) ** 2 + args.weight_decay + 0.01 * args.seed + 1 / done
    with open(metrics_path, "a") as f:
        f.write(json.dumps({"step": done, "val_loss": value}) + "\n")
    with open(state_path + ".tmp", "w") as f:
        json.dump({"evals": done, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}, f)
    os.replace(state_path + ".tmp", state_path)
sys.exit(128 + stop[0] if stop and done < args.evals else 0)
