"""GPT-2's byte-level BPE as a ``tiktoken.Encoding``, built from a checkpoint's vocab.json + merges.txt."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import tiktoken

from ..constants import TOKENIZER_FILES
from ..errors import CheckpointError, CheckpointNotFoundError
from .hub import resolve_checkpoint

#: GPT-2's pre-tokenisation pattern (contractions, letters, digits, other symbols, whitespace).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"


@functools.lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted (character -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    table = {}
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def ranks_from_files(vocab_path: Path, merges_path: Path) -> tuple[dict[bytes, int], int]:
    """BPE ranks (token bytes -> id) and the id of ``<|endoftext|>`` from Hugging Face tokenizer files."""
    for path in (vocab_path, merges_path):
        if not path.is_file():
            raise CheckpointNotFoundError(f"{path} not found: the GPT-2 tokenizer needs vocab.json and merges.txt")
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{vocab_path} is not valid JSON: {err}") from None
    if not isinstance(vocab, dict) or ENDOFTEXT not in vocab:
        raise CheckpointError(f"{vocab_path}: expected a JSON object of token -> id with {ENDOFTEXT!r}")
    decoder = byte_decoder()
    ranks: dict[bytes, int] = {}
    for token, rank in vocab.items():
        if token == ENDOFTEXT:
            continue
        try:
            ranks[bytes(decoder[ch] for ch in token)] = int(rank)
        except KeyError:
            raise CheckpointError(f"{vocab_path}: token {token!r} has a character outside GPT-2's byte "
                                  "alphabet") from None
    merges = [line for line in merges_path.read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    # tiktoken merges by the rank of the merged token, which equals GPT-2's merge order only when
    # merge i produces token 256 + i. Check it rather than assume it.
    for i, line in enumerate(merges):
        left, _, right = line.partition(" ")
        if vocab.get(left + right) != 256 + i:
            raise CheckpointError(f"{merges_path} line {i + 2}: merge {line!r} does not produce token id "
                                  f"{256 + i} in vocab.json; not a GPT-2 byte-level BPE vocabulary")
    return ranks, int(vocab[ENDOFTEXT])


@functools.lru_cache(maxsize=8)
def _encoding_from_folder(folder: str, stamp: tuple[int, ...]) -> tiktoken.Encoding:
    # ``stamp`` (file sizes and mtimes) is part of the cache key so edited files are read again.
    ranks, eot = ranks_from_files(*(Path(folder) / name for name in TOKENIZER_FILES))
    return tiktoken.Encoding(name=f"gpt2lora:{folder}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: eot})


def load_tokenizer(name_or_path: str | os.PathLike, revision: str | None = None,
                   cache_dir: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """The tokenizer of a checkpoint (hub id or local folder), as a ``tiktoken.Encoding``.

    Only ``vocab.json`` and ``merges.txt`` are read (and, for a hub id, downloaded).
    """
    folder = resolve_checkpoint(name_or_path, revision=revision, cache_dir=cache_dir,
                                patterns=TOKENIZER_FILES)
    files = [folder / name for name in TOKENIZER_FILES]
    stamp = tuple(n for f in files if f.is_file() for n in (f.stat().st_size, f.stat().st_mtime_ns))
    return _encoding_from_folder(str(folder.resolve()), stamp)
