"""CLIP's byte-level BPE tokenizer, read offline from the vocabulary that the open-clip-torch wheel ships.

SD1.5 (transformers' CLIPTokenizer) and SD2.x (open_clip) use the same vocabulary and text cleaning; they
differ only in the id used for padding. The wheel is located by path and never imported, because importing
open_clip pulls in torchvision and other heavy dependencies that inference does not need.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
import site
import sys
from collections.abc import Sequence
from pathlib import Path

import ftfy
import regex
import torch

from ldm.errors import MissingFileError

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
START_TOKEN_ID = 49406
END_TOKEN_ID = 49407
CONTEXT_LENGTH = 77
# Merges kept by CLIP: the vocabulary size 49408 = 2 * 256 bytes + 48894 merges + 2 special tokens.
_NUM_MERGES = 49152 - 256 - 2
_START_TOKEN = "<|startoftext|>"
_END_TOKEN = "<|endoftext|>"
_WORD_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


class BPEVocabNotFoundError(MissingFileError):
    """The CLIP BPE vocabulary file could not be found."""


def _candidate_dirs() -> list[Path]:
    """Directories that may hold the `open_clip` package, found without importing it."""
    dirs: list[Path] = []
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        dirs.extend(Path(p) for p in spec.submodule_search_locations)
    roots = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    dirs.extend(Path(r) / "open_clip" for r in roots if r)
    return dirs


def find_bpe_vocab(path: str | os.PathLike[str] | None = None) -> Path:
    """Return the path of CLIP's BPE vocabulary: `path` if given, else the copy inside the open_clip wheel."""
    hint = "`pip install --no-deps open-clip-torch` provides it"
    if path is not None:
        candidate = Path(path)
        if candidate.is_file():
            return candidate
        raise BPEVocabNotFoundError(f"CLIP BPE vocabulary {str(candidate)!r} not found; {hint}")
    for directory in _candidate_dirs():
        candidate = directory / VOCAB_FILENAME
        if candidate.is_file():
            return candidate
    raise BPEVocabNotFoundError(f"CLIP BPE vocabulary {VOCAB_FILENAME} not found; {hint}")


def _bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable character so that BPE never sees whitespace or control bytes."""
    ranges = (("!", "~"), ("¡", "¬"), ("®", "ÿ"))
    printable = {b for first, last in ranges for b in range(ord(first), ord(last) + 1)}
    mapping = {b: chr(b) for b in sorted(printable)}
    others = [b for b in range(256) if b not in printable]
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return mapping


def _clean(text: str) -> str:
    """Normalise text as CLIP did at training time: fix mojibake, unescape HTML, squeeze spaces, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class BPE:
    """CLIP's byte-pair encoder: text to token ids, without start/end tokens or padding."""

    def __init__(self, vocab_path: Path) -> None:
        with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
        self._byte_encoder = _bytes_to_unicode()
        symbols = list(self._byte_encoder.values())
        words = [s + "</w>" for s in symbols]
        vocab = [*symbols, *words, *("".join(m) for m in merges), _START_TOKEN, _END_TOKEN]
        self.encoder: dict[str, int] = {token: i for i, token in enumerate(vocab)}
        self._ranks: dict[tuple[str, ...], int] = {m: i for i, m in enumerate(merges)}
        self._cache: dict[str, list[str]] = {}
        self._pattern = regex.compile(_WORD_PATTERN, regex.IGNORECASE)
        if self.encoder[_START_TOKEN] != START_TOKEN_ID or self.encoder[_END_TOKEN] != END_TOKEN_ID:
            raise RuntimeError(f"unexpected CLIP vocabulary layout in {vocab_path}")

    def _bpe(self, word: str) -> list[str]:
        """Merge the characters of one pre-tokenised word by merge rank until no known pair is left."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:], strict=False)}
            best = min(pairs, key=lambda p: self._ranks.get(p, sys.maxsize))
            if best not in self._ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without start/end tokens."""
        ids: list[int] = []
        for word in self._pattern.findall(_clean(text)):
            mapped = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self._bpe(mapped))
        return ids


@functools.lru_cache(maxsize=4)
def _load_bpe_cached(path: Path) -> BPE:
    return BPE(path)


def load_bpe(path: str | os.PathLike[str] | None = None) -> BPE:
    """Load CLIP's BPE once per process (parsing the merges takes a noticeable fraction of a second)."""
    return _load_bpe_cached(find_bpe_vocab(path).resolve())


class CLIPTokenizer:
    """Texts to fixed-length id rows `[start, ..., end, pad, ...]` as SD's text encoders expect them.

    SD1.5 pads with the end token (49407, the default); OpenCLIP (SD2.x) pads with 0. Text longer than
    `max_length - 2` tokens is cut so that the row still ends with the end token.
    """

    def __init__(
        self,
        pad_token_id: int = END_TOKEN_ID,
        max_length: int = CONTEXT_LENGTH,
        vocab_path: str | os.PathLike[str] | None = None,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (start and end tokens), got {max_length}")
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.bpe = load_bpe(vocab_path)

    def encode(self, text: str) -> list[int]:
        """Ids of one text with start and end tokens, truncated but not padded."""
        content = self.bpe.encode(text)[: self.max_length - 2]
        return [START_TOKEN_ID, *content, END_TOKEN_ID]

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """LongTensor `[B, max_length]` of padded ids for a text or a batch of texts."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.max_length), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
