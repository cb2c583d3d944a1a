"""BERT word-piece tokenisation as the reference loaders do it (spec data-train-eval.md §b.3).

``encode`` returns ``max_tokens`` ids: ``[CLS] pieces... [SEP]`` cut to the first ``max_tokens``
(a long sentence loses its ``[SEP]``), then zero padding; the attention mask is 1 on kept ids.

The tokenizer is always loaded with ``BertTokenizer.from_pretrained(folder)``: with
transformers 5.x, ``BertTokenizer(vocab_file=...)`` silently ignores the file and maps every
word to ``[UNK]`` (spec data-quirks.md, "Tokeniser trap").
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

__all__ = ["TokenizerFolderError", "check_tokenizer_folder", "load_tokenizer", "encode", "encode_many",
           "tokenizer_fingerprint"]

# Files of a tokenizer folder that can change the ids it produces.
_TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


class TokenizerFolderError(FileNotFoundError):
    """The ``--bert_tokenizer`` folder is missing or has no vocab.txt."""


def check_tokenizer_folder(folder: str | Path) -> Path:
    """Return the folder as a Path; raise a one-line error if it has no ``vocab.txt``."""
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
    folder = check_tokenizer_folder(folder)
    digest = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def load_tokenizer(folder: str | Path) -> Any:
    """Load the BERT tokenizer of a local folder (``vocab.txt`` required; lower-cases by default)."""
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
    """``encode`` for many sentences at once; also returns each sentence's untruncated length."""
    if not sentences:
        return [], [], []
    full = tokenizer(list(sentences), add_special_tokens=True)["input_ids"]
    ids, attention = zip(*(_cut_and_pad(one, max_tokens) for one in full))
    return list(ids), list(attention), [len(one) for one in full]
