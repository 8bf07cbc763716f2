"""Corpora -> token shards -> windows: the text task's data, from 1 MB to tens of GB.

What `--data_path` (and `--val_path`) may name:
  * one text file: one stream of text, as tiny-shakespeare is; the tail `--val_frac` of its tokens
    is validation, and no end-of-text token is added.
  * a folder (searched recursively) or a glob of documents: `.txt` files (one document each),
    `.jsonl` files (one document per line, in the `--text_field` field) or `.parquet` files (the
    `--text_field` column; needs pyarrow). Each document is followed by the tokenizer's end-of-text
    token, and one document in every 1 / val_frac (evenly spaced) is validation.
  * token shards, read in place, never copied: nanoGPT's `train.bin` / `val.bin` (raw uint16 that
    record no tokenizer: `--tokenizer` names it, gpt2 for nanoGPT's), llm.c / modded-nanogpt shards
    (a 256 x int32 header with magic 20240520, then GPT-2's uint16 tokens), or a folder this module
    prepared. Files named `val.bin`, `val_*` or `*_val_*` are the validation split.

Preparing turns documents into shards once, into `<cache_dir>/<name>-<tokenizer>-<fingerprint>/`,
never beside the source. The fingerprint covers the source's paths, sizes and modification times,
the tokenizer and what decides the split, so a changed source makes a new cache. The work is cut
into units of about 32 MB of source (a byte range of a text or jsonl file, a group of .txt files, a
parquet row group), independent of the number of workers; each unit becomes its own shard (two
with a held-out share: train_*, val_*), written to a temporary name and renamed when complete. So
a prepare that was killed resumes with the units it had not finished, memory stays flat, and the
shards are byte for byte the same whatever the number of workers. Workers are plain Python
processes fed units on a pipe (not fork: the caller may be a training process with threads).

Long documents are encoded in pieces cut where every tiktoken encoding would split anyway (after a
newline between two printable ASCII characters), so the tokens equal those of encoding the whole text.

A shard: 8 bytes b"TLTOKENS", a uint32 data offset D (a multiple of 4096), a JSON header (format
version, tokenizer, dtype, n_vocab, end-of-text token, token count, documents, split, unit, source
fingerprint; the character vocabulary for the char tokenizer) padded with spaces to D, then the
tokens (uint16 when the vocabulary fits, else uint32). `manifest.json`, written last, lists them.

Training reads the shards through `TokenStream`: memory-mapped, one sequence across shards, so a
window is a pure function of its start and opening a corpus reads headers, not tokens.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
import math
import os
import re
import resource
import selectors
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from config import ConfigError
from plumbing.rundirs import CLAIM, Claim, process_start_time
from utils import format_duration, write_json

log = logging.getLogger("tinylab")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: what a corpus server puts on its path
MAGIC = b"TLTOKENS"
FORMAT_VERSION = 1
LLMC_MAGIC = 20240520  # llm.c's GPT-2 token shards (modded-nanogpt's FineWeb shards too)
MANIFEST = "manifest.json"
UNIT_BYTES = 32 << 20  # --shard_mb's default
PIECE_CHARS = 1 << 20  # long documents are encoded in pieces of about this many characters
EOT_TEXT = "<|endoftext|>"
DOCUMENT_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}

# A cut after a newline that sits between two printable ASCII characters (not "/", which o200k's
# pattern may glue to a newline before it) splits no pre-token of gpt2, r50k, cl100k or o200k, so
# encoding the pieces gives the tokens of encoding the whole text.
_CUT = re.compile(r"[!-~]\n(?=[!-.0-~])")  # the cut is the end of the match
_CUT_BYTES = re.compile(rb"[!-~]\n(?=[!-.0-~])")
_SPACE_CUT = re.compile(r"[!-~](?= [A-Za-z])")  # fallback for a long run without such a newline


# ---------------------------------------------------------------- tokenizers


class CharTokenizer:
    """A corpus's characters, sorted. A corpus of documents has one token more, after them, that
    ends each document (it decodes to <|endoftext|>)."""

    def __init__(self, vocab: str, eot: bool = False):
        self.vocab = vocab
        self.eot_token = len(vocab) if eot else None
        self.n_vocab = len(vocab) + int(eot)
        self._codepoints = np.array([ord(c) for c in vocab], dtype=np.uint32)

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of `text`; characters outside the vocabulary are dropped."""
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        if not len(self._codepoints):
            return np.zeros(0, dtype=np.int64)
        ids = np.minimum(np.searchsorted(self._codepoints, points), len(self._codepoints) - 1)
        return ids[self._codepoints[ids] == points]

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        n = len(self.vocab)
        return "".join(self.vocab[i] if i < n else EOT_TEXT for i in map(int, ids) if 0 <= i < self.n_vocab)


class TiktokenTokenizer:
    def __init__(self, name: str):
        import tiktoken

        try:
            self._encoding = tiktoken.get_encoding(name)
        except ValueError:
            known = ", ".join(tiktoken.list_encoding_names())
            raise ConfigError(f"--tokenizer: {name!r} is neither 'char' nor a tiktoken encoding ({known})") from None
        except Exception as e:  # the BPE file could not be downloaded
            raise ConfigError(
                f"--tokenizer: could not load the {name!r} BPE file ({type(e).__name__}); when offline, "
                f"set TIKTOKEN_CACHE_DIR to a directory that holds it") from None
        self.n_vocab = self._encoding.n_vocab
        self.eot_token = self._encoding.eot_token

    def encode_array(self, text: str) -> np.ndarray:
        return np.array(self._encoding.encode_ordinary(text), dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self._encoding.decode([int(i) for i in ids if 0 <= int(i) < self.n_vocab])


def is_tokenizer_file(name: str) -> bool:
    """Whether --tokenizer names a Hugging Face tokenizer.json (the file or its folder) rather than
    char or a tiktoken encoding."""
    return name.endswith(".json") or os.sep in name or os.path.isfile(os.path.join(name, "tokenizer.json"))


def tokenizer_file(name: str) -> str:
    """The tokenizer.json that --tokenizer names (a file, or a folder that holds one)."""
    path = os.path.join(name, "tokenizer.json") if os.path.isdir(name) else name
    if not os.path.isfile(path):
        raise ConfigError(f"--tokenizer: no tokenizer.json at {path}; name a Hugging Face tokenizer.json, the folder "
                          f"that holds one, char, or a tiktoken encoding")
    return os.path.abspath(path)


class HFTokenizer:
    """A Hugging Face tokenizer.json (Llama 3, Qwen, SmolLM, ... ship one), read by the `tokenizers`
    package alone. Encodes without special tokens (no BOS): text in, the text's tokens out. The
    end-of-text token is the one tokenizer_config.json (or config.json) beside it names as EOS."""

    def __init__(self, name: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError(f"--tokenizer: {name} is a Hugging Face tokenizer, which needs the tokenizers "
                              f"package: pip install tokenizers") from None
        self.path = tokenizer_file(name)
        try:
            self._tokenizer = Tokenizer.from_file(self.path)
        except Exception as e:
            raise ConfigError(f"--tokenizer: {self.path} is not a tokenizer.json the tokenizers package can read "
                              f"({str(e).splitlines()[0][:200]})") from None
        self.n_vocab = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eot_token = self._end_of_text()

    def _end_of_text(self) -> int | None:
        folder = os.path.dirname(self.path)
        settings = _read_json(os.path.join(folder, "tokenizer_config.json")) or {}
        eos = settings.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str) and self._tokenizer.token_to_id(eos) is not None:
            return self._tokenizer.token_to_id(eos)
        eos_id = (_read_json(os.path.join(folder, "config.json")) or {}).get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
        if isinstance(eos_id, int) and 0 <= eos_id < self.n_vocab:
            return eos_id
        for text in (EOT_TEXT, "</s>", "<|end_of_text|>", "<eos>"):
            if self._tokenizer.token_to_id(text) is not None:
                return self._tokenizer.token_to_id(text)
        return None

    def encode_array(self, text: str) -> np.ndarray:
        return np.array(self.encode(text), dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids if 0 <= int(i) < self.n_vocab], skip_special_tokens=False)


def tokenizer_label(name: str) -> str:
    """What names a tokenizer in cache folders, fingerprints and shard headers: char or the tiktoken
    encoding, or for a tokenizer.json hf- and a digest of its contents (wherever the file lives)."""
    if not is_tokenizer_file(name):
        return name
    with open(tokenizer_file(name), "rb") as f:
        return "hf-" + hashlib.sha256(f.read()).hexdigest()[:12]


def make_tokenizer(name: str, vocab: str | None = None, eot: bool = False):
    if name == "char":
        return CharTokenizer(vocab or "", eot)
    return HFTokenizer(name) if is_tokenizer_file(name) else TiktokenTokenizer(name)


def token_dtype(n_vocab: int) -> str:
    return "uint16" if n_vocab <= 2**16 else "uint32"


# ---------------------------------------------------------------- sources


@dataclass
class Source:
    """What a --data_path or --val_path names: `kind` is "stream" (one text file), "documents",
    "tokens" (shards read in place: `files` train, `val_files` validation) or "prepared" (a folder
    this module wrote: `files` is [that folder])."""
    path: str
    flag: str
    kind: str
    files: list[str]
    val_files: tuple[str, ...] = ()
    ignored: int = 0  # files of no known kind in the folder or glob

    def size(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)

    def fingerprint(self, **settings) -> str:
        """Paths, sizes and modification times of every file and the settings that shape the
        tokens: what decides whether a cache is this source's (no hash of gigabytes)."""
        digest = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, **settings}, sort_keys=True).encode())
        for path in self.files:
            stat = os.stat(path)
            digest.update(json.dumps([os.path.abspath(path), stat.st_size, stat.st_mtime_ns]).encode())
        return digest.hexdigest()


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _is_val_name(path: str) -> bool:
    name = os.path.basename(path).lower()
    return name == "val.bin" or name.startswith("val_") or "_val_" in name or name.startswith("val.")


def find_source(path: str, flag: str) -> Source:
    """Classifies what `path` names; a ConfigError names the flag when it holds nothing usable."""
    if any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise ConfigError(f"--{flag}: {path} matches no files; check the pattern (and quote it, so that "
                              f"the shell passes it on unexpanded)")
    elif os.path.isdir(path):
        if os.path.isfile(os.path.join(path, MANIFEST)):
            return Source(path, flag, "prepared", [path])
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
        if not files:
            raise ConfigError(f"--{flag}: {path} is an empty folder; put .txt, .jsonl, .parquet or token .bin "
                              f"files in it, or point --{flag} at a text file")
    elif os.path.isfile(path):
        files = [path]
        if os.path.getsize(path) == 0:
            raise ConfigError(f"--{flag}: {path} is empty; point --{flag} at a file with text in it")
        if _extension(path) not in DOCUMENT_KINDS and _extension(path) != ".bin":
            return Source(path, flag, "stream", files)  # any other single file is text, as it always was
        if _extension(path) == ".txt":
            return Source(path, flag, "stream", files)
    else:
        raise ConfigError(f"--{flag}: {path} does not exist; point --{flag} at a text file, a folder or glob of "
                          f".txt / .jsonl / .parquet files, or token shards (.bin)")
    tokens = [f for f in files if _extension(f) == ".bin"]
    documents = [f for f in files if _extension(f) in DOCUMENT_KINDS]
    ignored = len(files) - len(tokens) - len(documents)
    if tokens and documents:
        raise ConfigError(f"--{flag}: {path} holds both token shards (.bin) and documents "
                          f"({len(documents)} .txt/.jsonl/.parquet files); point --{flag} at one kind")
    if not tokens and not documents:
        kinds = sorted({_extension(f) or "(none)" for f in files})
        raise ConfigError(f"--{flag}: {path} holds no .txt, .jsonl, .parquet or .bin files (found {len(files)} "
                          f"of kind {', '.join(kinds[:5])}); convert them, or point --{flag} at a text file")
    if documents:
        if not any(os.path.getsize(f) for f in documents):
            raise ConfigError(f"--{flag}: all {len(documents)} documents under {path} are empty files")
        return Source(path, flag, "documents", documents, ignored=ignored)
    val = tuple(f for f in tokens if _is_val_name(f))
    train = [f for f in tokens if f not in val]
    if not val and "train" in path:  # train.bin or fineweb_train_*.bin: their val siblings, when present
        head, _, tail = path.rpartition("train")
        val = tuple(sorted(f for f in glob.glob(head + "val" + tail) if os.path.isfile(f)))
    if not train:
        raise ConfigError(f"--{flag}: {path} holds only validation shards ({len(val)}); point --{flag} at the "
                          f"training shards")
    return Source(path, flag, "tokens", train, val, ignored)


# ---------------------------------------------------------------- shard files


def _header_bytes(header: dict) -> bytes:
    """MAGIC, the data offset, the JSON header padded to it. The room is sized for the largest
    token count, so the same header always takes the same room."""
    room = json.dumps({**header, "num_tokens": 10**18}, sort_keys=True).encode()
    offset = -(-(len(MAGIC) + 4 + len(room)) // 4096) * 4096
    body = json.dumps(header, sort_keys=True).encode()
    return MAGIC + np.uint32(offset).tobytes() + body.ljust(offset - len(MAGIC) - 4)


def read_header(path: str) -> dict:
    """The header of a token file of any known kind, with "offset" (where tokens start), "dtype",
    "num_tokens" and "tokenizer" (None when the file does not say: raw nanoGPT tokens).
    A ConfigError names a truncated or foreign file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(1024)
        if head.startswith(MAGIC) and len(head) >= 12:
            offset = int(np.frombuffer(head[8:12], dtype=np.uint32)[0])
            f.seek(0)
            try:
                header = json.loads(f.read(offset)[12:].decode())
            except (UnicodeDecodeError, ValueError):
                raise ConfigError(f"--data_path: {path} has a damaged header; prepare it again") from None
            if header.get("version") != FORMAT_VERSION:
                raise ConfigError(f"--data_path: {path} is tinylab shard format {header.get('version')}; this "
                                  f"version reads {FORMAT_VERSION}: prepare the corpus again")
            header["offset"] = offset
        elif len(head) >= 12 and int(np.frombuffer(head[:4], dtype=np.int32)[0]) == LLMC_MAGIC:
            count = int(np.frombuffer(head[8:12], dtype=np.int32)[0])
            header = {"tokenizer": "gpt2", "dtype": "uint16", "num_tokens": count, "offset": 1024, "kind": "llm.c"}
        else:
            header = {"tokenizer": None, "dtype": "uint16", "num_tokens": size // 2, "offset": 0, "kind": "raw"}
            if size % 2:
                raise ConfigError(f"--data_path: {path} has an odd number of bytes, so it is not raw uint16 tokens "
                                  f"(nanoGPT's .bin) nor a shard of a known format")
    expected = header["offset"] + header["num_tokens"] * np.dtype(header["dtype"]).itemsize
    if size != expected:
        raise ConfigError(f"--data_path: {path} is truncated or damaged: {size:,} bytes where its header promises "
                          f"{expected:,}; prepare or download it again")
    return header


def open_tokens(path: str, header: dict | None = None) -> np.ndarray:
    header = header or read_header(path)
    if not header["num_tokens"]:
        return np.zeros(0, dtype=header["dtype"])
    return np.memmap(path, dtype=header["dtype"], mode="r", offset=header["offset"], shape=(header["num_tokens"],))


class _ShardWriter:
    """One shard, written to a temporary file and renamed into place by `close`."""

    def __init__(self, path: str, header: dict):
        self.path, self.header = path, dict(header)
        self.tmp = f"{path}.tmp-{os.getpid()}"
        self.dtype = np.dtype(header["dtype"])
        self.count, self.documents, self._buffer, self._buffered = 0, 0, [], 0
        self.file = open(self.tmp, "wb")
        self.file.write(_header_bytes({**self.header, "num_tokens": 0, "documents": 0}))

    def add(self, ids: np.ndarray) -> None:
        self._buffer.append(ids.astype(self.dtype, copy=False))
        self.count += len(ids)
        self._buffered += len(ids)
        if self._buffered >= 1 << 20:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            np.concatenate(self._buffer).tofile(self.file)
        self._buffer, self._buffered = [], 0

    def close(self) -> None:
        self._flush()
        self.header.update(num_tokens=self.count, documents=self.documents)
        self.file.seek(0)
        self.file.write(_header_bytes(self.header))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abandon(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


# ---------------------------------------------------------------- units of work


def plan_units(source: Source, unit_bytes: int = UNIT_BYTES) -> list[dict]:
    """The source cut into units of about `unit_bytes`, in corpus order; the same for any number
    of workers. Text and jsonl units are byte ranges whose ends a worker moves to the next cut."""
    units, group, group_bytes = [], [], 0
    for path in source.files:
        kind = "text" if source.kind == "stream" else DOCUMENT_KINDS[_extension(path)]
        size = os.path.getsize(path)
        if kind == "txt":
            group.append(path)
            group_bytes += size
            if group_bytes >= unit_bytes:
                units.append({"kind": "txt", "files": group, "bytes": group_bytes})
                group, group_bytes = [], 0
            continue
        if group:
            units.append({"kind": "txt", "files": group, "bytes": group_bytes})
            group, group_bytes = [], 0
        if kind == "parquet":
            try:
                groups = _parquet_file(path).metadata.num_row_groups
            except _BadInput as e:
                raise ConfigError(f"--{source.flag}: {e}") from None
            units += [{"kind": "parquet", "file": path, "row_group": g, "bytes": size // max(groups, 1)}
                      for g in range(groups)]
        else:
            units += [{"kind": kind, "file": path, "start": k * unit_bytes, "end": (k + 1) * unit_bytes,
                       "bytes": min(size, (k + 1) * unit_bytes) - k * unit_bytes}
                      for k in range(max(1, math.ceil(size / unit_bytes)))]
    if group:
        units.append({"kind": "txt", "files": group, "bytes": group_bytes})
    return units


def _parquet_file(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise _BadInput(f"{path} is parquet, which needs pyarrow: pip install pyarrow") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:
        raise _BadInput(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None


def _next_cut(f, position: int, pattern: re.Pattern) -> int:
    """The first cut at or after `position` in file `f`: the end of a `pattern` match. The file's
    start and end are cuts."""
    size = os.fstat(f.fileno()).st_size
    if position <= 0:
        return 0
    start = max(position - 2, 0)
    while start < size:
        f.seek(start)
        block = f.read(1 << 16)
        for match in pattern.finditer(block):
            cut = start + match.end()
            if cut >= position:
                return cut
        if len(block) < 1 << 16:
            break
        start += len(block) - 2
    return size


class _BadInput(Exception):
    """Bad input found by a worker; the message names the file (the caller adds the flag)."""


def _text_pieces(f, start: int, end: int, path: str, progress):
    """The text of bytes [start, end) of a file, decoded, in pieces cut at `_CUT` points."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    f.seek(start)
    position, text = start, ""
    while position < end:
        block = f.read(min(1 << 20, end - position))
        if not block:
            break
        try:
            text += decoder.decode(block, final=position + len(block) >= end)
        except UnicodeDecodeError as e:
            raise _BadInput(f"{path} is not UTF-8 text (byte {position + e.start:,}); convert it to UTF-8") from None
        position += len(block)
        progress(0, len(block))
        while len(text) >= PIECE_CHARS:
            cut = _piece_cut(text)
            yield text[:cut]
            text = text[cut:]
    if text:
        yield text


def _piece_cut(text: str) -> int:
    """Where to end the next piece of a long text: the last safe cut, or the end."""
    for pattern in (_CUT, _SPACE_CUT):
        last = None
        for last in pattern.finditer(text, len(text) // 2):
            pass
        if last is not None:
            return last.end()
    return len(text)


def _documents(unit: dict, text_field: str, progress):
    """(text, ends_a_document) in order: pieces of a stream, of .txt files, jsonl lines, parquet rows."""
    kind = unit["kind"]
    if kind == "text":
        with open(unit["file"], "rb") as f:
            start, end = (_next_cut(f, unit[k], _CUT_BYTES) for k in ("start", "end"))
            for piece in _text_pieces(f, start, end, unit["file"], progress):
                yield piece, False
    elif kind == "txt":
        for path in unit["files"]:
            with open(path, "rb") as f:
                last = None  # one piece behind, so that the document's last piece says so
                for piece in _text_pieces(f, 0, os.fstat(f.fileno()).st_size, path, progress):
                    if last is not None:
                        yield last, False
                    last = piece
                if last is not None:
                    yield last, True
    elif kind == "jsonl":
        with open(unit["file"], "rb") as f:
            start, end = (_next_cut(f, unit[k], re.compile(rb"\n")) for k in ("start", "end"))
            f.seek(start)
            position = start
            while position < end:
                line = f.readline()
                if not line:
                    break
                progress(0, len(line))
                here, position = position, position + len(line)
                if not line.strip():
                    continue
                yield _jsonl_text(line, text_field, unit["file"], here), True
    else:
        table = _parquet_file(unit["file"])
        if text_field not in table.schema_arrow.names:
            raise _BadInput(f"{unit['file']} has no column {text_field!r} (its columns: "
                            f"{', '.join(table.schema_arrow.names[:8])}); pass --text_field NAME")
        rows = table.metadata.row_group(unit["row_group"]).num_rows or 1
        for batch in table.iter_batches(batch_size=1024, row_groups=[unit["row_group"]], columns=[text_field]):
            progress(0, unit["bytes"] * batch.num_rows / rows)
            for text in batch.column(0).to_pylist():
                if not isinstance(text, str):
                    raise _BadInput(f"{unit['file']}: a row's {text_field!r} is {type(text).__name__}, not text")
                if text:
                    yield text, True


def _jsonl_text(line: bytes, text_field: str, path: str, offset: int) -> str:
    def where():  # only when something is wrong: count the lines before it
        with open(path, "rb") as f:
            lines = f.read(offset).count(b"\n") + 1
        return f"line {lines:,}"
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, ValueError) as e:
        raise _BadInput(f"{path} {where()} is not a JSON object ({type(e).__name__}); fix or drop that line") from None
    if not isinstance(record, dict) or text_field not in record:
        keys = ", ".join(list(record)[:8]) if isinstance(record, dict) else type(record).__name__
        raise _BadInput(f"{path} {where()} has no {text_field!r} field (it has: {keys}); pass --text_field NAME")
    if not isinstance(record[text_field], str):
        raise _BadInput(f"{path} {where()}: {text_field!r} is {type(record[text_field]).__name__}, not text")
    return record[text_field]


def _held_out(document: int, fraction: float) -> bool:
    """One document in every 1 / fraction, evenly spaced (the 5th, 15th, ... at 0.1)."""
    return fraction > 0 and int((document + 1) * fraction + 0.5) > int(document * fraction + 0.5)


def _shard_path(folder: str, split: str, unit: int) -> str:
    return os.path.join(folder, f"{split}_{unit:06d}.bin")


def _splits(holdout: float) -> tuple[str, ...]:
    return ("train", "val") if holdout > 0 else ("all",)


# ---------------------------------------------------------------- the work of one unit


class _Job:
    """What every unit of one prepare shares: where shards go, the tokenizer, the split rule."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.tokenizer = make_tokenizer(spec["tokenizer"], spec.get("vocab"), spec["eot"]) \
            if spec["op"] == "tokens" else None

    def run(self, index: int, unit: dict, progress) -> dict:
        if self.spec["op"] == "chars":
            chars = set()
            for text, _ in _documents(unit, self.spec["text_field"], progress):
                chars.update(text)
            return {"chars": "".join(sorted(chars))}
        spec, tokenizer = self.spec, self.tokenizer
        header = {"format": "tinylab-tokens", "version": FORMAT_VERSION, "tokenizer": tokenizer_label(spec["tokenizer"]),
                  "dtype": token_dtype(tokenizer.n_vocab), "n_vocab": tokenizer.n_vocab,
                  "eot_token": tokenizer.eot_token if spec["eot"] else None, "source": spec["fingerprint"],
                  "unit": index, "vocab": spec.get("vocab")}
        writers = {split: _ShardWriter(_shard_path(spec["folder"], split, index), {**header, "split": split})
                   for split in _splits(spec["holdout"])}
        eot = np.array([tokenizer.eot_token], dtype=np.int64) if spec["eot"] else None
        document = 0
        try:
            for text, ends in _documents(unit, spec["text_field"], progress):
                split = "all" if "all" in writers else ("val" if _held_out(document, spec["holdout"]) else "train")
                writer = writers[split]
                ids = tokenizer.encode_array(text)
                writer.add(ids)
                progress(0, 0, len(ids))
                if ends:
                    if eot is not None:
                        writer.add(eot)
                    writer.documents += 1
                    document += 1
                    progress(1, 0, 0)
        except BaseException:
            for writer in writers.values():
                writer.abandon()
            raise
        for split in sorted(writers, reverse=True):  # train_ last: its presence marks the unit done
            writers[split].close()
        return {split: [w.count, w.documents] for split, w in writers.items()}


def _serve() -> None:
    """A worker process: a job spec on the first line of stdin, then one unit per line; answers
    progress, results and errors as JSON lines on stdout."""
    job = _Job(json.loads(sys.stdin.readline()))
    out = sys.stdout
    pending = [0, 0, 0]  # documents, bytes, tokens since the last report
    last = [time.monotonic()]

    def progress(documents, nbytes, tokens=0):
        pending[0] += documents
        pending[1] += nbytes
        pending[2] += tokens
        if time.monotonic() - last[0] > 0.25:
            out.write(json.dumps({"progress": pending}) + "\n")
            out.flush()
            pending[:] = [0, 0, 0]
            last[0] = time.monotonic()

    for line in sys.stdin:
        index, unit = json.loads(line)
        try:
            result = job.run(index, unit, progress)
        except (_BadInput, ConfigError) as e:
            out.write(json.dumps({"error": str(e)}) + "\n")
            out.flush()
            return
        out.write(json.dumps({"progress": pending}) + "\n")
        pending[:] = [0, 0, 0]
        out.write(json.dumps({"done": index, "result": result}) + "\n")
        out.flush()
    out.write(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}) + "\n")
    out.flush()


def _run_units(spec: dict, units: list[tuple[int, dict]], workers: int, meter: "_Meter") -> dict[int, dict]:
    """Runs `units` ([(index, unit)]) on `workers` processes (in this one when 1); returns the
    results by index. A worker's bad-input report stops them all and becomes a ConfigError."""
    results = {}
    if workers <= 1 or len(units) <= 1:
        job = _Job(spec)
        for index, unit in units:
            try:
                results[index] = job.run(index, unit, meter.add)
            except (_BadInput, ConfigError) as e:
                raise ConfigError(f"--{spec['flag']}: {e}") from None
            meter.unit_done()
        meter.peak_rss["coordinator"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return results
    command = [sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); from plumbing import corpus; corpus._serve()"]
    procs = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
             for _ in range(min(workers, len(units)))]
    todo = list(units)
    selector = selectors.DefaultSelector()
    failure, finished = None, False

    def send(proc, value) -> None:
        proc.stdin.write((json.dumps(value) + "\n").encode())

    try:
        for n, proc in enumerate(procs):
            send(proc, spec)
            send(proc, todo.pop(0))
            selector.register(proc.stdout, selectors.EVENT_READ, [n, b""])
        busy = len(procs)
        while busy and failure is None:
            for key, _ in selector.select():
                n, pending = key.data
                proc = procs[n]
                data = os.read(proc.stdout.fileno(), 1 << 16)
                if not data:
                    raise RuntimeError(f"a prepare worker (pid {proc.pid}) died with exit status {proc.wait()}")
                *lines, key.data[1] = (pending + data).split(b"\n")
                for line in lines:
                    message = json.loads(line)
                    if "progress" in message:
                        meter.add(*message["progress"][:2], message["progress"][2])
                    elif "done" in message:
                        results[message["done"]] = message["result"]
                        meter.unit_done()
                        if todo:
                            send(proc, todo.pop(0))
                        else:
                            proc.stdin.close()
                    elif "error" in message:
                        failure = message["error"]  # the others are stopped below
                    else:  # peak_rss: the worker is leaving
                        meter.peak_rss[f"worker {n}"] = message["peak_rss"]
                        selector.unregister(proc.stdout)
                        busy -= 1
                if failure is not None:
                    break
        finished = failure is None
    finally:
        for proc in procs:
            if proc.poll() is None and not finished:  # a bad input, a dead worker, an interrupt
                proc.kill()
            proc.wait()
            proc.stdout.close()
            if not proc.stdin.closed:
                proc.stdin.close()
        selector.close()
    meter.peak_rss["coordinator"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if failure is not None:
        raise ConfigError(f"--{spec['flag']}: {failure}")
    return results


class _Meter:
    """Progress of a prepare: documents, tokens, MB of source, MB/s and ETA; a live line on a
    terminal, a log line every 15 s otherwise, and `progress.json` in the cache folder for the
    processes waiting on it."""

    def __init__(self, folder: str, total_bytes: int, units: int, live: bool):
        self.folder, self.total, self.units, self.live = folder, max(total_bytes, 1), units, live
        self.documents = self.tokens = self.bytes = self.units_done = 0
        self.started = self.shown = time.monotonic()
        self.peak_rss: dict[str, int] = {}

    def add(self, documents: int, nbytes: float, tokens: int = 0) -> None:
        self.documents += documents
        self.bytes += nbytes
        self.tokens += tokens
        now = time.monotonic()
        if now - self.shown >= (0.5 if self.live else 15.0):
            self.shown = now
            self.show()

    def unit_done(self) -> None:
        self.units_done += 1

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.bytes / max(elapsed, 1e-9)
        eta = (self.total - self.bytes) / rate if rate > 0 else float("nan")
        eta_text = format_duration(eta) if math.isfinite(eta) else "?"
        return (f"prepare: {min(self.bytes / self.total, 1):.0%} · {self.bytes / 1e6:,.0f}/{self.total / 1e6:,.0f} MB · "
                f"{self.units_done}/{self.units} units · "
                f"{self.documents:,} documents · {self.tokens:,} tokens · {rate / 1e6:.1f} MB/s · ETA {eta_text}")

    def show(self) -> None:
        line = self.line()
        if self.live:
            print("\r" + line, end="", flush=True)
        else:
            log.info(line)
        write_json(os.path.join(self.folder, "progress.json"), {"line": line, "time": time.time()})

    def finish(self) -> None:
        if self.live:
            print("\r" + self.line(), flush=True)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- preparing a cache folder


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cache_folder(source: Source, tokenizer: str, cache_dir: str, **settings) -> tuple[str, str]:
    """(the cache folder of this source and these settings, their fingerprint)."""
    stem = os.path.basename(os.path.normpath(source.path.split("*")[0].rstrip("/"))) or "corpus"
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.splitext(stem)[0])[:40] or "corpus"
    digest = source.fingerprint(tokenizer=tokenizer, **settings)
    return os.path.join(cache_dir, f"{stem}-{tokenizer}-{digest[:12]}"), digest


def prepare(source: Source, folder: str, fingerprint: str, tokenizer: str, holdout: float = 0.0,
            text_field: str = "text", workers: int = 0, vocab: str | None = None, unit_bytes: int = UNIT_BYTES,
            live: bool = False) -> dict:
    """Documents (or a text stream) -> shards in `folder`, resuming whatever an earlier attempt
    finished; returns the manifest. The caller holds the folder's claim."""
    started = time.monotonic()
    for name in os.listdir(folder):
        # An attempt that was killed left these; its finished shards stay. The claim's files are the
        # claim's: a launch waiting on the folder writes .claim.tmp-<token> before it links it.
        if ".tmp-" in name and not name.startswith(CLAIM):
            os.remove(os.path.join(folder, name))
    units = plan_units(source, unit_bytes)
    workers = workers or default_workers()
    eot = source.kind == "documents"
    base = {"folder": folder, "flag": source.flag, "text_field": text_field, "holdout": holdout,
            "tokenizer": tokenizer, "eot": eot, "fingerprint": fingerprint}
    total_bytes = sum(u["bytes"] for u in units)
    if tokenizer == "char" and vocab is None:
        vocab = (_read_json(os.path.join(folder, "vocab.json")) or {}).get("vocab")
        if vocab is None:
            log.info(f"prepare: finding the characters of {source.path} ({total_bytes / 1e6:,.1f} MB)")
            meter = _Meter(folder, total_bytes, len(units), live)
            found = _run_units({**base, "op": "chars"}, list(enumerate(units)), workers, meter)
            vocab = "".join(sorted(set().union(*(r["chars"] for r in found.values()))))
            write_json(os.path.join(folder, "vocab.json"), {"vocab": vocab})
    spec = {**base, "op": "tokens", "vocab": vocab}
    done = [i for i in range(len(units)) if _unit_done(folder, i, holdout, fingerprint)]
    todo = [(i, u) for i, u in enumerate(units) if i not in set(done)]
    if done:
        log.info(f"prepare: resuming {folder}: {len(done)} of {len(units)} units were done")
    processes = max(1, min(workers, len(todo)))
    log.info(f"prepare: {source.path} -> {folder}: {len(units)} units, {total_bytes / 1e6:,.1f} MB of source, "
             f"tokenizer {tokenizer}, {processes} worker process{'es' if processes > 1 else ''}")
    meter = _Meter(folder, sum(u["bytes"] for _, u in todo), len(todo), live)
    _run_units(spec, todo, workers, meter)
    meter.finish()
    shards = []
    for index in range(len(units)):
        for split in _splits(holdout):
            header = read_header(_shard_path(folder, split, index))
            shards.append({"name": os.path.basename(_shard_path(folder, split, index)), "split": split,
                           "num_tokens": header["num_tokens"], "documents": header["documents"]})
    tokenizer_object = make_tokenizer(tokenizer, vocab, eot)
    manifest = {
        "format": "tinylab-tokens", "version": FORMAT_VERSION, "tokenizer": tokenizer_label(tokenizer),
        "dtype": token_dtype(tokenizer_object.n_vocab), "n_vocab": tokenizer_object.n_vocab,
        "eot_token": tokenizer_object.eot_token if eot else None, "vocab": vocab, "fingerprint": fingerprint,
        "source": {"path": source.path, "kind": source.kind, "files": len(source.files), "bytes": source.size()},
        "holdout": holdout, "text_field": text_field if source.kind == "documents" else None,
        "shards": shards,
        "tokens": {s: sum(x["num_tokens"] for x in shards if x["split"] == s) for s in _splits(holdout)},
        "documents": {s: sum(x["documents"] for x in shards if x["split"] == s) for s in _splits(holdout)},
        "prepare_seconds": round(time.monotonic() - started, 2), "workers": workers,
        "peak_rss_bytes": meter.peak_rss,
    }
    write_json(os.path.join(folder, MANIFEST), manifest)
    seconds = time.monotonic() - started
    log.info(f"prepare: done in {format_duration(seconds)}: {sum(manifest['tokens'].values()):,} tokens, "
             f"{sum(manifest['documents'].values()):,} documents, {len(shards)} shards, "
             f"{source.size() / 1e6 / max(seconds, 1e-9):.1f} MB/s, peak memory "
             f"{sum(meter.peak_rss.values()) / 2**20:,.0f} MiB over {len(meter.peak_rss)} processes")
    return manifest


def _unit_done(folder: str, index: int, holdout: float, fingerprint: str) -> bool:
    for split in _splits(holdout):
        path = _shard_path(folder, split, index)
        try:
            header = read_header(path)
        except (OSError, ConfigError):
            return False
        if header.get("source") != fingerprint or header.get("unit") != index:
            return False
    return True


def ensure_prepared(source: Source, folder: str, fingerprint: str, tokenizer: str, holdout: float, text_field: str,
                    workers: int,
                    vocab: str | None = None, may_build: bool = True, claim_timeout: float = 300.0,
                    live: bool = False, unit_bytes: int = UNIT_BYTES) -> dict:
    """The manifest of `folder`, prepared first if need be, by exactly one process: the first to
    claim the folder builds; every other one (another rank, another node sharing the file system)
    waits for `manifest.json` by watching files, never inside a collective, so a long prepare
    cannot time out a process group. A builder that dies is taken over (on this host at once, on
    another when its heartbeat is `claim_timeout` old) and resumed. A builder's bad-input error
    reaches its waiters through `failed.json`, so every rank exits with the same message."""
    manifest_path = os.path.join(folder, MANIFEST)
    if (manifest := _read_json(manifest_path)) is not None:
        return manifest
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".probe-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--cache_dir: cannot write the token cache {folder} ({e.strerror}); point --cache_dir "
                          f"at a folder you can write") from None
    my_start = process_start_time(os.getpid()) or time.time()
    said_at = 0.0
    while (manifest := _read_json(manifest_path)) is None:
        failed = _read_json(os.path.join(folder, "failed.json"))
        if failed and failed.get("time", 0) >= my_start - 1:
            raise ConfigError(failed["message"])
        if may_build:
            claim, holder = Claim.try_take(folder, claim_timeout, own_launch=False)
            if claim is not None:
                if holder:
                    log.info(f"prepare: {holder}")
                try:
                    if (manifest := _read_json(manifest_path)) is not None:
                        return manifest
                    if os.path.exists(os.path.join(folder, "failed.json")):
                        os.remove(os.path.join(folder, "failed.json"))
                    return prepare(source, folder, fingerprint, tokenizer, holdout, text_field, workers, vocab,
                                   unit_bytes, live)
                except ConfigError as e:
                    write_json(os.path.join(folder, "failed.json"), {"message": str(e), "time": time.time(),
                                                                     "host": socket.gethostname(), "pid": os.getpid()})
                    raise
                finally:
                    claim.release()
        else:
            holder = "the process of this node that may build"
        if time.monotonic() - said_at > 15:
            said_at = time.monotonic()
            progress = (_read_json(os.path.join(folder, "progress.json")) or {}).get("line", "starting")
            log.info(f"waiting for {holder} to prepare {folder} ({progress})")
        time.sleep(0.2)
    return manifest


# ---------------------------------------------------------------- reading


class TokenStream:
    """Token shards read as one sequence, memory-mapped: `len`, slices (`stream[a:b]` reads those
    tokens into an array), `view(a, b)` (a lazy sub-stream), `windows(starts, span)`."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = [p for p in parts if len(p)]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.dtype = self.parts[0].dtype if self.parts else np.dtype(parts[0].dtype if parts else np.uint16)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("TokenStream slices are contiguous")
            return self._read(start, stop)
        key = int(key) + (len(self) if key < 0 else 0)
        i = int(np.searchsorted(self.offsets, key, side="right")) - 1
        return self.parts[i][key - self.offsets[i]]

    def _read(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces, i = [], first
        while start < stop:
            local = start - self.offsets[i]
            take = min(stop - start, len(self.parts[i]) - local)
            pieces.append(self.parts[i][local:local + take])
            start += take
            i += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def view(self, start: int, stop: int) -> "TokenStream":
        """Tokens [start, stop) as a stream of their own; nothing is read."""
        parts = []
        for part, offset in zip(self.parts, self.offsets):
            lo, hi = max(start - offset, 0), min(stop - offset, len(part))
            if lo < hi:
                parts.append(part[lo:hi])
        stream = TokenStream(parts)
        stream.dtype = self.dtype
        return stream

    def windows(self, starts: np.ndarray, span: int) -> np.ndarray:
        """[len(starts), span] int64: the tokens from each start (each start + span <= len)."""
        if len(self.parts) == 1:
            part = self.parts[0]
            return np.stack([part[s:s + span] for s in starts]).astype(np.int64)
        starts = np.asarray(starts, dtype=np.int64)
        shard = np.searchsorted(self.offsets, starts, side="right") - 1
        local = starts - self.offsets[shard]
        inside = local + span <= self.offsets[shard + 1] - self.offsets[shard]
        rows = []
        for s, i, lo, whole in zip(starts.tolist(), shard.tolist(), local.tolist(), inside.tolist()):
            rows.append(self.parts[i][lo:lo + span] if whole else self._read(s, s + span))
        return np.stack(rows).astype(np.int64)


@dataclass
class TokenSet:
    """A source's tokens by split ("train", "val", or "all" when the source holds no split) and what
    made them."""
    splits: dict[str, TokenStream]
    tokenizer: str | None  # None: raw tokens that do not say
    vocab: str | None
    eot: bool
    where: str  # the folder or files read, for the log
    documents: dict | None = None


def _prepared_set(folder: str, flag: str) -> TokenSet:
    manifest = _read_json(os.path.join(folder, MANIFEST))
    if not isinstance(manifest, dict) or manifest.get("format") != "tinylab-tokens":
        raise ConfigError(f"--{flag}: {folder}/{MANIFEST} is damaged; delete {folder} and prepare again")
    splits: dict[str, list] = {}
    for shard in manifest["shards"]:
        path = os.path.join(folder, shard["name"])
        if not os.path.isfile(path):
            raise ConfigError(f"--{flag}: {path}, listed in {MANIFEST}, is missing; delete {folder} and prepare again")
        header = read_header(path)
        if header.get("source") != manifest["fingerprint"] or header["num_tokens"] != shard["num_tokens"]:
            raise ConfigError(f"--{flag}: {path} is not the shard {MANIFEST} lists; delete {folder} and prepare again")
        splits.setdefault(shard["split"], []).append(open_tokens(path, header))
    return TokenSet({k: TokenStream(v) for k, v in splits.items()}, manifest["tokenizer"], manifest.get("vocab"),
                    manifest.get("eot_token") is not None, folder, manifest.get("documents"))


def _shard_set(source: Source) -> TokenSet:
    """Token shards read in place (nanoGPT's, llm.c's, or tinylab shards outside a prepared folder)."""
    splits, kinds, first = {}, set(), None
    for split, files in (("train", source.files), ("val", source.val_files)):
        if not files:
            continue
        headers = [read_header(f) for f in files]
        first = first or headers[0]
        kinds.update(h.get("tokenizer") or "" for h in headers)
        splits[split] = TokenStream([open_tokens(f, h) for f, h in zip(files, headers)])
    if len(kinds) > 1:
        raise ConfigError(f"--{source.flag}: the shards under {source.path} were made by different tokenizers "
                          f"({', '.join(sorted(k or 'unrecorded' for k in kinds))}); use one set")
    tokenizer = kinds.pop() or None
    names = f"{len(source.files)} train + {len(source.val_files)} val shards" if source.val_files \
        else f"{len(source.files)} shard{'s' if len(source.files) > 1 else ''}"
    return TokenSet(splits, tokenizer, first.get("vocab"), first.get("eot_token") is not None,
                    f"{source.path} ({names}, read in place)")


@dataclass
class Corpus:
    train: TokenStream
    val: TokenStream
    tokenizer: object
    description: str


def open_corpus(settings, may_build: bool = True, claim_timeout: float = 300.0, live: bool = False) -> Corpus:
    """The train and validation streams of `settings` (config.CorpusConfig), preparing documents
    into the cache on first use."""
    unit_bytes = int(settings.shard_mb * (1 << 20))
    source = find_source(settings.data_path, "data_path")
    val_source = find_source(settings.val_path, "val_path") if settings.val_path else None
    tokens = _token_set(source, settings, holdout=settings.val_frac if source.kind == "documents" and not val_source
                        else 0.0, vocab=None, may_build=may_build, claim_timeout=claim_timeout, live=live,
                        unit_bytes=unit_bytes)
    tokenizer = _check_tokenizer(tokens, settings.tokenizer, source)
    described = [tokens.where]
    if val_source is not None:
        held = _token_set(val_source, settings, 0.0, tokens.vocab, may_build, claim_timeout, live, unit_bytes)
        _check_tokenizer(held, settings.tokenizer, val_source)
        if held.tokenizer == "char" and held.eot != tokens.eot:
            raise ConfigError(f"--val_path: {val_source.path} and --data_path {source.path} must both be one text "
                              f"file or both documents, so that they share the char vocabulary")
        train = _joined(tokens, ("train", "all"))
        val = _joined(held, ("val", "all", "train"))
        described.append(f"validation: {held.where}")
    elif "val" in tokens.splits:
        train, val = tokens.splits["train"], tokens.splits["val"]
        if not len(val):
            count = (tokens.documents or {}).get("train", 0)
            raise ConfigError(f"--val_frac: none of the {count:,} documents of {source.path} is held out at val_frac "
                              f"{settings.val_frac} (one in every {1 / settings.val_frac:.0f} is); raise --val_frac "
                              f"or name a validation set with --val_path")
    else:
        stream = tokens.splits.get("all") or tokens.splits["train"]
        split = int(len(stream) * (1 - settings.val_frac))
        train, val = stream.view(0, split), stream.view(split, len(stream))
        described.append(f"validation: the last {settings.val_frac:g} of its tokens")
    return Corpus(train, val, tokenizer, " · ".join(described))


def _joined(tokens: TokenSet, order: tuple[str, ...]) -> TokenStream:
    """Every split of a set that was named as a whole (train, or --val_path) as one stream."""
    return TokenStream([p for split in order if split in tokens.splits for p in tokens.splits[split].parts])


def _token_set(source: Source, settings, holdout: float, vocab: str | None, may_build: bool, claim_timeout: float,
               live: bool, unit_bytes: int) -> TokenSet:
    if source.kind == "tokens":
        return _shard_set(source)
    if source.kind == "prepared":
        return _prepared_set(source.path, source.flag)
    name = settings.tokenizer
    made = make_tokenizer(name)  # an unknown tokenizer fails here, before any work
    if source.kind == "documents" and name != "char" and made.eot_token is None:
        raise ConfigError(f"--tokenizer: {name} has no end-of-text token to put between the documents of "
                          f"{source.path}; use a tokenizer with one, or one text file")
    text_field = settings.text_field if source.kind == "documents" else None
    folder, fingerprint = cache_folder(source, tokenizer_label(name), settings.cache_dir, holdout=holdout, text_field=text_field,
                                       vocab=hashlib.sha256(vocab.encode()).hexdigest() if vocab else None,
                                       unit_bytes=unit_bytes)
    ensure_prepared(source, folder, fingerprint, name, holdout, settings.text_field, settings.prepare_workers, vocab,
                    may_build, claim_timeout, live, unit_bytes)
    if source.ignored:
        log.info(f"corpus: {source.ignored} files under {source.path} are not .txt, .jsonl or .parquet and were skipped")
    return _prepared_set(folder, source.flag)


def _check_tokenizer(tokens: TokenSet, asked: str, source: Source):
    """The tokenizer of a token set, which must be the one --tokenizer names."""
    if tokens.tokenizer is None:  # raw tokens: --tokenizer says what they are
        if asked == "char":
            raise ConfigError(f"--tokenizer: {source.path} holds raw uint16 tokens that do not record their "
                              f"tokenizer; name it (nanoGPT's are gpt2: --tokenizer gpt2)")
        tokenizer = make_tokenizer(asked)
        if tokenizer.n_vocab > 2**16:
            raise ConfigError(f"--tokenizer: {asked} has {tokenizer.n_vocab:,} tokens, more than the uint16 tokens "
                              f"of {source.path} can hold; name the tokenizer that made them")
        for stream in tokens.splits.values():
            top = int(stream.parts[0][: 1 << 20].max()) if stream.parts else 0
            if top >= tokenizer.n_vocab:
                raise ConfigError(f"--tokenizer: {source.path} has token id {top:,}, beyond {asked}'s "
                                  f"{tokenizer.n_vocab:,}; name the tokenizer that made them")
        return tokenizer
    if tokens.tokenizer != tokenizer_label(asked):
        raise ConfigError(f"--tokenizer: {tokens.where} holds {tokens.tokenizer} tokens, not {asked}; pass "
                          f"--tokenizer {tokens.tokenizer}" + (" (a tokenizer.json of that digest)"
                                                             if tokens.tokenizer.startswith("hf-") else ""))
    return make_tokenizer(asked if is_tokenizer_file(asked) else tokens.tokenizer, tokens.vocab, tokens.eot)
