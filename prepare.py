"""Prepare a corpus into token shards once, on every core, before training on it.

    python prepare.py --data_path corpus/ --tokenizer gpt2                 # .txt / .jsonl / .parquet
    python prepare.py --data_path 'stories/*.jsonl' --text_field story --tokenizer gpt2
    python train.py --task text --data_path corpus/ --tokenizer gpt2 ...   # finds the same cache

train.py prepares on first use by itself; this program does it ahead of time (on a login node, say),
shows the progress and prints where the shards are. Killed half-way, it resumes where it stopped.
Flags are train.py's corpus flags. See corpus.py for the formats.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from config import ConfigError, CorpusConfig, parse_flags, section
from plumbing.corpus import open_corpus

_run = section("run")


@dataclass
class PrepareConfig(CorpusConfig):
    claim_timeout: float = _run(300.0, "a prepare on another host whose claim has sent no heartbeat for this many "
                                       "seconds is taken over (and resumed)")

    def validate(self) -> "PrepareConfig":
        self.validate_corpus()
        return self


def main(argv: list[str] | None = None) -> dict:
    """Prepares (or finds) the cache of the corpus the flags name; returns a summary of it."""
    cfg, _ = parse_flags(PrepareConfig, argv, "prepare.py", __doc__.split("\n\n")[0])
    log = logging.getLogger("tinylab")
    log.handlers.clear()
    log.addHandler(logging.StreamHandler(sys.stdout))
    log.setLevel(logging.INFO)
    log.propagate = False
    text = open_corpus(cfg, may_build=True, claim_timeout=cfg.claim_timeout, live=sys.stdout.isatty())
    summary = {"train_tokens": len(text.train), "val_tokens": len(text.val), "vocab": text.tokenizer.n_vocab,
               "description": text.description}
    print(f"corpus: {text.description}")
    print(f"train {len(text.train):,} tokens · val {len(text.val):,} tokens · vocabulary {text.tokenizer.n_vocab:,} "
          f"({text.train.dtype})")
    return summary


if __name__ == "__main__":
    try:
        main()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        sys.exit(130)
