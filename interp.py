"""Look inside a trained run or a pretrained model: `python interp.py` writes a report; the functions
behind it (residual stream, logit lens, attribution, ablation, patching, probes, the Fourier analysis
of grokked modular arithmetic) live in the analysis package and fourier.py.

    python interp.py runs/<run>        # writes runs/<run>/interp/: plots and report.md
    python interp.py --model gpt2 --data_path my.txt   # a pretrained model: runs/gpt2/interp/

In a notebook, `import interp` (or `import analysis`) gives every analysis function by name:

    from interp import load_run
    run = load_run("runs/add113-20261122-105839")       # model in eval mode, config, data
    logits, cache = run.model.run_with_cache(run.data.val_x)
"""

from __future__ import annotations

from dataclasses import dataclass

from analysis import *  # noqa: F401,F403 (a notebook's namespace: `import interp; interp.logit_lens(...)`)
from analysis.report import write_report
from config import ModelSourceConfig, parse_flags, section
from plumbing.session import run_command


_report = section("report")


@dataclass
class ReportConfig(ModelSourceConfig):
    run_dir: str = _report("", "a run directory (runs/<run>) or a checkpoint file (or --model)")
    out: str = _report("", "output directory (default <run>/interp)")
    device: str = _report("auto", "auto | cpu | cuda | mps")

    def validate(self) -> "ReportConfig":
        self.validate_source()
        return self


def main(argv: list[str] | None = None) -> str:
    cfg, _ = parse_flags(ReportConfig, argv, "interp.py", "Write an interpretability report for a run or a "
                         "pretrained model.", positional="run_dir")
    path = write_report(cfg.run_dir, cfg.out or None, cfg.device, source=cfg)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_command(main)
