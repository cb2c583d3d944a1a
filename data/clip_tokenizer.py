"""CLIP byte-pair tokenisation (Radford et al., ICML 2021, §2.4: lower-cased BPE, vocabulary
49,408, sentences bracketed by start / end tokens) as TRIS's data pipeline uses it, without a download.

The BPE merges ship inside the ``open_clip_torch`` package (``bpe_simple_vocab_16e6.txt.gz``, the
file of OpenAI's release); a local copy of that file can be given instead. Text is cleaned as CLIP
does (ftfy, HTML unescape twice, whitespace collapsed, lower case).

``encode`` gives exactly ``context_length`` (20) ids: ``[SOT] bpe... [EOT]``, then zeros; longer
sequences are CUT to their first 20 ids, exactly as the reference (``clip.tokenize(s)[:20]``). So
a sentence of more than 18 BPE tokens keeps SOT and its first 19 tokens and has NO end token.
The CLIP text encoder takes the sentence embedding at the largest id, which is then the start
token (49406 > every BPE id): the sentence embedding of a truncated sentence is the SOT state,
the same for every truncated sentence (the word states still differ). This is the reference's
behaviour and is kept; ``encode_many`` reports the untruncated lengths so a dataset check can
count such sentences. The word mask (id > 0) is returned for completeness; TRIS uses no mask.

open_clip's tokenizer gives OpenAI's ids (checked against the reference's tokenizer, non-ASCII
text included). One corner case differs: the literal strings ``<|startoftext|>`` /
``<|endoftext|>`` inside a sentence are special tokens only for OpenAI's tokenizer.
"""
from __future__ import annotations

import gzip
import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

__all__ = ["SOT_ID", "EOT_ID", "VOCAB_SIZE", "CONTEXT_LENGTH", "ClipTokenizerError", "load_tokenizer",
           "default_bpe_path", "encode", "encode_many", "tokenizer_fingerprint"]

SOT_ID = 49406   # <|startoftext|>
EOT_ID = 49407   # <|endoftext|>
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 20


class ClipTokenizerError(FileNotFoundError):
    """No BPE vocabulary: open_clip_torch is not installed and no local file was given."""


def default_bpe_path() -> Path:
    """The BPE merges file shipped with ``open_clip_torch``."""
    try:
        from open_clip.tokenizer import default_bpe  # local import: open_clip is slow to import
    except ImportError as exc:
        raise ClipTokenizerError(
            "the CLIP tokenizer needs the open_clip_torch package (pip install 'open_clip_torch>=2.20,<4') "
            f"or a local bpe_simple_vocab_16e6.txt.gz ({exc})") from None
    return Path(default_bpe())


@lru_cache(maxsize=4)
def _load(bpe_path: str) -> Any:
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer(bpe_path=bpe_path, context_length=None, clean="lower")
    # open_clip names the special tokens <start_of_text> / <end_of_text>; their ids are OpenAI's.
    sot, eot = tok.all_special_ids[:2]
    if (sot, eot) != (SOT_ID, EOT_ID) or len(tok.encoder) != VOCAB_SIZE:
        raise ClipTokenizerError(f"{bpe_path}: not CLIP's BPE vocabulary (special ids {sot}/{eot}, "
                                 f"{len(tok.encoder)} entries; expected {SOT_ID}/{EOT_ID}, {VOCAB_SIZE})")
    return tok


def load_tokenizer(bpe_path: str | Path | None = None) -> Any:
    """The CLIP BPE tokenizer (``bpe_path``: a local ``bpe_simple_vocab_16e6.txt.gz``; default:
    the copy inside open_clip_torch). Cached per path."""
    path = Path(bpe_path) if bpe_path else default_bpe_path()
    if not path.is_file():
        raise ClipTokenizerError(f"CLIP BPE vocabulary not found: {path}")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            fh.readline()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ClipTokenizerError(f"{path}: not a gzipped CLIP BPE merges file ({exc})") from None
    return _load(str(path.resolve()))


def tokenizer_fingerprint(bpe_path: str | Path | None = None) -> str:
    """Hash of the BPE file (for cache keys of tokenised datasets)."""
    path = Path(bpe_path) if bpe_path else default_bpe_path()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cut_and_pad(ids: Sequence[int], context_length: int) -> tuple[list[int], list[int]]:
    kept = list(ids[:context_length])
    pad = context_length - len(kept)
    return kept + [0] * pad, [1] * len(kept) + [0] * pad


def _full_ids(tokenizer: Any, sentence: str) -> list[int]:
    return [SOT_ID, *tokenizer.encode(sentence), EOT_ID]


def encode(tokenizer: Any, sentence: str, context_length: int = CONTEXT_LENGTH) -> tuple[list[int], list[int]]:
    """``(ids, word_mask)``, both ``context_length`` long: SOT + BPE + EOT cut to the first
    ``context_length`` ids (no EOT when the sentence has more than ``context_length - 2`` BPE
    tokens), zero padded; the mask is 1 on kept ids."""
    return _cut_and_pad(_full_ids(tokenizer, sentence), context_length)


def encode_many(tokenizer: Any, sentences: Sequence[str], context_length: int = CONTEXT_LENGTH
                ) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """`encode` for many sentences; also each sentence's untruncated length (SOT and EOT included)."""
    full = [_full_ids(tokenizer, s) for s in sentences]
    if not full:
        return [], [], []
    ids, masks = zip(*(_cut_and_pad(f, context_length) for f in full))
    return list(ids), list(masks), [len(f) for f in full]
