"""How long the feature browser of a wide SAE takes to write and to open, in a real headless Chromium.

    python bench/browser_speed.py                      # 16,384 features
    python bench/browser_speed.py --features 4096 --repeats 5

Trains a small character-level text model and a TopK SAE of --features features on its residual
stream for a few steps (what its features mean does not matter here, only how many there are),
then `sae.py report` it, timing the report. Then opens features.html from disk in headless Chromium
--repeats times at a feature deep in the dictionary (its panel file loaded on demand), and, as the
yardstick in the same run, an empty page: the browser's own start-up. Prints the wall time of each,
their difference (what the page costs), and when the page drew the feature's panel
(performance.now() after its panel file loaded and the panel was written). The target is under 3 s with 16k features.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import sae as sae_module  # noqa: E402
import train  # noqa: E402
from harness.headless_chromium import MISSING, open_page  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=16384)
    parser.add_argument("--eval_tokens", type=int, default=16384, help="held-out tokens the report reads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "tiny_shakespeare.txt"))
    args = parser.parse_args()
    if not os.path.isfile(args.data_path):
        parser.error(f"--data_path: {args.data_path} does not exist; name a text file")
    if MISSING:
        sys.exit(MISSING)
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            train.main(["--preset", "shakespeare_char_modern", "--num_blocks", "1", "--embedding_dim", "64",
                        "--num_heads", "2", "--context_len", "64", "--batch_size", "16", "--max_steps", "50",
                        "--eval_every", "50", "--sample_tokens", "0", "--data_path", args.data_path,
                        "--save_model_dir", tmp, "--run_name", "text"])
            trained = sae_module.main([os.path.join(tmp, "text"), "--hook", "blocks.0.hook_resid_post", "--arch",
                                       "topk", "--k", "16", "--dict_size", str(args.features), "--batch_size", "256",
                                       "--max_steps", "10", "--eval_every", "10", "--save_every", "0",
                                       "--eval_tokens", str(args.eval_tokens), "--name", "wide"])
            started = time.perf_counter()
            report = sae_module.main(["report", trained["sae_dir"]])
            report_seconds = time.perf_counter() - started
        folder = os.path.dirname(report)
        page = os.path.join(folder, "features.html")
        files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(folder, "features")) for f in names]
        size = sum(os.path.getsize(f) for f in files) / 2**20
        blank = os.path.join(tmp, "blank.html")
        with open(blank, "w") as f:
            f.write("<!doctype html><title>blank</title>")
        feature = args.features * 3 // 4
        print(f"{args.features:,} features: report written in {report_seconds:.1f}s "
              f"(features.html and {len(files)} data files, {size:.1f} MiB)")
        walls, blanks, readies = [], [], []
        for repeat in range(args.repeats):
            profile = os.path.join(tmp, f"profile-{repeat}")  # a fresh profile: nothing cached
            opened = open_page(page, f"feature={feature}", profile)
            if f'data-feature="{feature}"' not in opened.dom or opened.console:
                sys.exit(f"the panel of feature {feature} did not appear cleanly: {opened.console}")
            walls.append(opened.seconds)
            readies.append(int(re.search(r'data-panel-ready="(\d+)"', opened.dom).group(1)) / 1000)
            blanks.append(open_page(blank, "", profile + "-blank").seconds)
        wall, empty = statistics.median(walls), statistics.median(blanks)
        print(f"| page | Chromium wall time (median of {args.repeats}) |")
        print("| --- | --- |")
        print(f"| features.html#feature={feature} ({args.features:,} features) | {wall:.2f} s |")
        print(f"| an empty page (the yardstick: the browser's start-up) | {empty:.2f} s |")
        print(f"the page costs {wall - empty:.2f} s beyond the browser's start-up; the feature's panel, its "
              f"file loaded on demand, was drawn {statistics.median(readies):.2f} s after navigation "
              f"({'under' if wall < 3 else 'OVER'} the 3 s target, start-up included)")


if __name__ == "__main__":
    main()
