"""Indirect-object identification (Wang et al. 2022), IOI-style: "When Mary and John went to the store,
John gave a drink to" -> " Mary". The built-in clean/corrupted pairs of a text run (`interp.py circuit
--pairs builtin`, TextData.circuit_pairs) and a corpus of such sentences to train a small model on
(`write_corpus`, and `write_tokenizer` for a small BPE of it; docs/circuits.md trains a GPT-2-shaped
model on them).

A clean input names two people and repeats one of them (the subject); the answer is the other (the
indirect object). Its corrupted twin replaces the repeated name with a third one, so nothing in it
points to either ("ABC"); right is the indirect object and wrong the subject, the logit difference
Wang et al. measure. Names, places and objects are words that a BPE tokenizer writes as one token
with their leading space; `pairs` keeps the names the run's tokenizer writes as one token."""

from __future__ import annotations

import random

NAMES = [" Mary", " John", " Tom", " James", " Dan", " Sid", " Paul", " Anna", " Lisa", " Kate", " Mark", " Sarah",
         " David", " Jane", " Mike", " Laura", " Peter", " Alice", " Bob", " Emma", " Jack", " Rose", " Sam", " Tim"]
PLACES = [" store", " garden", " restaurant", " school", " hospital", " office", " house", " station", " park",
          " market"]
OBJECTS = [" drink", " book", " ring", " bone", " ball", " computer", " necklace", " snack", " letter", " key"]
TEMPLATES = [
    "When{A} and{B} went to the{P},{C} gave a{O} to",
    "After{A} and{B} went to the{P},{C} gave a{O} to",
    "While{A} and{B} were working at the{P},{C} gave a{O} to",
    "Then,{A} and{B} had a long argument, and afterwards{C} said to",
    "When{A} and{B} got a{O} at the{P},{C} decided to give it to",
    "Friends{A} and{B} found a{O} at the{P}.{C} gave it to",
]


def sentence(rng: random.Random, names: list[str], corrupted_too: bool = False):
    """(clean prompt, answer, subject, corrupted prompt) of one random template; the subject comes first
    or second at random."""
    template = rng.choice(TEMPLATES)
    io, subject, third = rng.sample(names, 3)
    a, b = (io, subject) if rng.random() < 0.5 else (subject, io)
    place, thing = rng.choice(PLACES), rng.choice(OBJECTS)
    clean = template.format(A=a, B=b, C=subject, P=place, O=thing)
    corrupted = template.format(A=a, B=b, C=third, P=place, O=thing)
    return clean, io, subject, corrupted


def write_corpus(path: str, count: int = 50_000, seed: int = 0) -> str:
    """`count` IOI sentences, one per line, each ending with its answer and a full stop: a corpus for
    train.py --data_path."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(count):
            clean, io, _, _ = sentence(rng, NAMES)
            f.write(f"{clean}{io}.\n")
    return path


def write_tokenizer(corpus: str, path: str, vocab_size: int = 512) -> str:
    """A byte-level BPE of `vocab_size` tokens (GPT-2's scheme) learnt from the corpus, as a Hugging Face
    tokenizer.json for train.py --tokenizer: every name, place and object becomes one token with its
    leading space, and a CPU trains a model on it far faster than on GPT-2's 50,257 tokens. Needs the
    `tokenizers` package (pip install tokenizers)."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as error:
        raise ImportError(f"write_tokenizer needs the tokenizers package: pip install tokenizers ({error})") from None
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train([corpus], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[],
                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(path)
    return path


def pairs(encode, count: int, seed: int = 0) -> tuple[list[tuple[list[int], list[int], int, int]], list[str]]:
    """`count` (clean, corrupted, right, wrong) rows of token ids through `encode` (text -> ids), and the
    clean texts; the names are those `encode` writes as one token. ValueError when fewer than three are."""
    names = [name for name in NAMES if len(encode(name)) == 1]
    if len(names) < 3:
        raise ValueError(f"the tokenizer writes only {len(names)} of the IOI names as one token (a character "
                         f"tokenizer writes none); the answers must be single tokens")
    rng = random.Random(seed)
    rows, texts = [], []
    while len(rows) < count:
        clean, io, subject, corrupted = sentence(rng, names)
        a, b = encode(clean), encode(corrupted)
        if len(a) == len(b):  # the third name is one token as well: always, with names that are one token
            rows.append((a, b, encode(io)[0], encode(subject)[0]))
            texts.append(clean)
    return rows, texts
