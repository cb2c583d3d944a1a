"""Sentence tokenisation: BERT word pieces as the reference loaders do it, or CLIP BPE.

A tokenizer is named by one string: a local BERT folder (with ``vocab.txt``), or ``clip`` /
``clip:PATH`` for CLIP's byte-pair encoding (``data.clip_tokenizer``; PATH a local
``bpe_simple_vocab_16e6.txt.gz``, default the copy shipped with open_clip_torch). Every function
below takes that string, so the datasets, demo.py and predict.py need not know which kind a model
uses (its spec says).

BERT:
``encode`` returns ``max_tokens`` ids: ``[CLS] pieces... [SEP]`` cut to the first ``max_tokens``
(a long sentence loses its ``[SEP]``), then zero padding; the attention mask is 1 on kept ids.

The tokenizer is always loaded with ``BertTokenizer.from_pretrained(folder)``: with
transformers 5.x, ``BertTokenizer(vocab_file=...)`` silently ignores the file and maps every
word to ``[UNK]`` (measured; the ids then silently differ from the references').
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

__all__ = ["TokenizerFolderError", "check_tokenizer_folder", "load_tokenizer", "encode", "encode_many",
           "tokenizer_fingerprint", "clip_name", "CLIP"]

# Files of a tokenizer folder that can change the ids it produces.
_TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


class TokenizerFolderError(FileNotFoundError):
    """The ``--bert_tokenizer`` folder is missing or has no vocab.txt."""


CLIP = "clip"


def clip_name(bpe_path: str | Path | None = None) -> str:
    """The tokenizer string of CLIP's BPE (optionally from a local merges file)."""
    return f"{CLIP}:{bpe_path}" if bpe_path else CLIP


def _clip_path(name: str | Path) -> str | None:
    """The BPE file of a ``clip`` / ``clip:PATH`` tokenizer string, or None when it names BERT."""
    text = str(name)
    if text == CLIP:
        return ""
    if text.startswith(CLIP + ":"):
        return text[len(CLIP) + 1:]
    return None


class _ClipTokenizer:
    """CLIP BPE behind the interface of this module (``encode_many`` dispatches on it)."""

    def __init__(self, bpe_path: str) -> None:
        from . import clip_tokenizer

        self.module = clip_tokenizer
        self.inner = clip_tokenizer.load_tokenizer(bpe_path or None)


def check_tokenizer_folder(folder: str | Path) -> Path:
    """Return the folder as a Path; raise a one-line error if it has no ``vocab.txt``. (A CLIP
    tokenizer string is checked by loading its BPE file.)"""
    bpe = _clip_path(folder)
    if bpe is not None:
        _ClipTokenizer(bpe)
        return Path(str(folder))
    folder = Path(folder)
    if not (folder / "vocab.txt").is_file():
        what = "does not exist" if not folder.exists() else "has no vocab.txt"
        raise TokenizerFolderError(
            f"--bert_tokenizer {folder}: {what} (expected a local BERT tokenizer folder with vocab.txt, "
            "e.g. a copy of bert-base-uncased)"
        )
    return folder


def tokenizer_fingerprint(folder: str | Path) -> str:
    """Hash of the files that define the tokenizer's output (for cache keys)."""
    bpe = _clip_path(folder)
    if bpe is not None:
        from . import clip_tokenizer

        return "clip-" + clip_tokenizer.tokenizer_fingerprint(bpe or None)
    folder = check_tokenizer_folder(folder)
    digest = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def load_tokenizer(folder: str | Path) -> Any:
    """Load the BERT tokenizer of a local folder (``vocab.txt`` required; lower-cases by default),
    or CLIP's BPE for a ``clip`` / ``clip:PATH`` string."""
    bpe = _clip_path(folder)
    if bpe is not None:
        return _ClipTokenizer(bpe)
    folder = check_tokenizer_folder(folder)
    from transformers import BertTokenizer  # local import: transformers is slow to import

    return BertTokenizer.from_pretrained(str(folder))


def _cut_and_pad(ids: Sequence[int], max_tokens: int) -> tuple[list[int], list[int]]:
    kept = list(ids[:max_tokens])
    pad = max_tokens - len(kept)
    return kept + [0] * pad, [1] * len(kept) + [0] * pad


def encode(tokenizer: Any, sentence: str, max_tokens: int) -> tuple[list[int], list[int]]:
    """Ids and attention mask of one sentence, both ``max_tokens`` long."""
    ids = tokenizer.encode(sentence, add_special_tokens=True)
    return _cut_and_pad(ids, max_tokens)


def encode_many(tokenizer: Any, sentences: Sequence[str], max_tokens: int) -> tuple[list, list, list[int]]:
    """``encode`` for many sentences at once; also returns each sentence's untruncated length.
    (CLIP: ``max_tokens`` ids with SOT / EOT, the EOT lost past ``max_tokens - 2`` BPE tokens.)"""
    if isinstance(tokenizer, _ClipTokenizer):
        return tokenizer.module.encode_many(tokenizer.inner, sentences, max_tokens)
    if not sentences:
        return [], [], []
    full = tokenizer(list(sentences), add_special_tokens=True)["input_ids"]
    ids, attention = zip(*(_cut_and_pad(one, max_tokens) for one in full))
    return list(ids), list(attention), [len(one) for one in full]
