"""FIANet word masks and the cached per-sentence text features.

For one sentence with ``N = max_tokens`` positions (spec data-train-eval.md §b.5–b.7):

* ``t_mask`` (ground-object mask, ``(N,)`` 0/1): for every class name of the dataset that occurs
  in the raw sentence (case-sensitive *substring*: "street" contains "tree"), mark ``n`` positions
  (``n`` = words of the class name) starting at *NLTK word index + 1* of the first NLTK word
  containing the class's first word (word 0 when none does).
* ``p_mask`` (spatial-position mask): POS-tag the NLTK words, chunk prepositional phrases with
  ``PP_GRAMMAR``, drop every phrase containing the letters "of", and mark each phrase's words
  starting at the *first* occurrence of its first word + 1. A sentence without any mark uses
  its own attention mask instead.

Positions are NLTK word indices shifted by one for ``[CLS]`` -- not word-piece positions -- as
in the reference (a word split into several pieces shifts every later flag). Deliberate fixes:
flags past ``N`` are dropped (the reference grows the list and crashes when batching), and the
position-mask fallback is decided per sentence (the reference aliased a ref's lists).

NLTK resources: words come from ``nltk.word_tokenize(..., preserve_line=True)`` (no Punkt data
needed); tags from the averaged-perceptron tagger data ``averaged_perceptron_tagger_eng``, found
through ``NLTK_DATA``. Missing data raises ``NLTKDataMissingError`` -- never a silent fallback.

Computing the masks of a whole dataset takes NLTK time, so ``build_text_features`` caches ids,
attention, both masks and untruncated lengths in a ``.npz`` file keyed by the sentences, the
tokenizer files, ``max_tokens``, the class list and the code version.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = [
    "RRSISD_CLASSES", "REFSEGRS_CLASSES", "DATASET_CLASSES", "PP_GRAMMAR", "WORD_MASKS_VERSION",
    "NLTKDataMissingError", "WordMasker", "TextFeatures", "build_text_features", "default_cache_dirs",
]

# The 20 DIOR classes used for RRSIS-D (spec §b.5).
RRSISD_CLASSES = (
    "airplane", "airport", "golf field", "expressway service area", "baseball field", "stadium",
    "ground track field", "storage tank", "basketball court", "chimney", "tennis court", "overpass",
    "train station", "ship", "expressway toll station", "dam", "harbor", "bridge", "vehicle", "windmill",
)
# The 14 RefSegRS classes.
REFSEGRS_CLASSES = (
    "road", "vehicle", "car", "van", "building", "truck", "trailer", "bus", "road marking", "bikeway",
    "sidewalk", "tree", "low vegetation", "impervious surface",
)
DATASET_CLASSES = {"rrsisd": RRSISD_CLASSES, "refsegrs": REFSEGRS_CLASSES}

# One chunk label, three rules applied in this order: IN [DT] [JJ-family] then NN | JJ | (JJ-family) VBD.
PP_GRAMMAR = r"""
PP: {<IN><DT>?<JJ|JJR|JJS>?<NN>}
    {<IN><DT>?<JJ|JJR|JJS>?<JJ>}
    {<IN><DT>?<JJ|JJR|JJS><VBD>}
"""

# Bump whenever the mask or encoding algorithm changes: invalidates every cache file.
WORD_MASKS_VERSION = 1

_TAGGER_RESOURCE = "averaged_perceptron_tagger_eng"


class NLTKDataMissingError(FileNotFoundError):
    """The NLTK POS-tagger data needed for the word masks is not installed."""


def _sync_nltk_path(nltk: Any) -> None:
    """Honour NLTK_DATA even when it was set after nltk was imported."""
    for entry in reversed(os.environ.get("NLTK_DATA", "").split(os.pathsep)):
        if entry and entry not in nltk.data.path:
            nltk.data.path.insert(0, entry)


def _mark(mask: list[int], start: int, count: int) -> bool:
    """Set ``mask[start:start+count]`` to 1 within the mask; True if flags fell past its end."""
    end = start + count
    for pos in range(start, min(end, len(mask))):
        mask[pos] = 1
    return end > len(mask)


class WordMasker:
    """Computes ``(t_mask, p_mask)`` for sentences of one dataset (class list fixed at creation)."""

    def __init__(self, classes: Sequence[str]):
        try:
            import nltk
            from nltk.tag.perceptron import PerceptronTagger
        except ImportError as exc:  # pragma: no cover - nltk is a declared dependency
            raise NLTKDataMissingError(f"nltk is required for the word masks: {exc}") from None
        _sync_nltk_path(nltk)
        try:
            self._tagger = PerceptronTagger(lang="eng")
        except LookupError:
            raise NLTKDataMissingError(
                f"NLTK tagger data '{_TAGGER_RESOURCE}' not found (searched {os.pathsep.join(nltk.data.path)}); "
                f"install it with `python -m nltk.downloader {_TAGGER_RESOURCE}` or set NLTK_DATA to a folder "
                f"containing taggers/{_TAGGER_RESOURCE}/"
            ) from None
        self._word_tokenize = nltk.word_tokenize
        self._parser = nltk.RegexpParser(PP_GRAMMAR)
        self.classes = tuple(classes)
        self._class_words = [self.words(name) for name in self.classes]

    # -- building blocks --------------------------------------------------------------------
    def words(self, text: str) -> list[str]:
        """NLTK words of ``text`` (Treebank rules, whole string as one line: no Punkt needed)."""
        return self._word_tokenize(text, preserve_line=True)

    def tag(self, words: list[str]) -> list[tuple[str, str]]:
        """Penn Treebank POS tags (the reference's ``nltk.pos_tag``)."""
        return self._tagger.tag(words)

    def position_phrases(self, words: list[str]) -> list[str]:
        """PP chunks (words joined by spaces) in tree order, without those containing "of"."""
        tree = self._parser.parse(self.tag(words)) if words else None
        if tree is None:
            return []
        phrases = [" ".join(word for word, _ in sub.leaves()) for sub in tree.subtrees(lambda t: t.label() == "PP")]
        return [ph for ph in phrases if re.search("of", ph) is None]

    def target_mask(self, sentence: str, words: list[str], max_tokens: int) -> tuple[list[int], bool]:
        """Ground-object mask and whether any flag fell past ``max_tokens``."""
        mask, overflow = [0] * max_tokens, False
        for name, name_words in zip(self.classes, self._class_words):
            if re.search(name, sentence) is None:
                continue
            first = name_words[0]
            idx = next((i for i, word in enumerate(words) if re.search(first, word)), 0)
            overflow |= _mark(mask, idx + 1, len(name_words))
        return mask, overflow

    def position_mask(self, words: list[str], attention: Sequence[int], max_tokens: int) -> tuple[list[int], bool]:
        """Spatial-position mask (fallback: this sentence's attention) and the overflow flag."""
        mask, overflow = [0] * max_tokens, False
        for phrase in self.position_phrases(words):
            phrase_words = self.words(phrase)
            idx = next((i for i, word in enumerate(words) if word == phrase_words[0]), 0)
            overflow |= _mark(mask, idx + 1, len(phrase_words))
        if sum(mask) == 0:
            mask = [int(a) for a in attention]
        return mask, overflow

    def __call__(self, sentence: str, attention: Sequence[int]) -> tuple[list[int], list[int], bool]:
        """``(t_mask, p_mask, overflow)`` of one raw sentence; ``len(attention)`` = max_tokens."""
        max_tokens = len(attention)
        words = self.words(sentence)
        t_mask, t_over = self.target_mask(sentence, words, max_tokens)
        p_mask, p_over = self.position_mask(words, attention, max_tokens)
        return t_mask, p_mask, t_over or p_over


# ---------------------------------------------------------------------------- cached features
@dataclass
class TextFeatures:
    """Per-sentence text inputs, row ``i`` for sentence ``i``; all ``(M, max_tokens)`` except lengths."""

    input_ids: np.ndarray       # int32 word-piece ids, 0-padded
    attention_mask: np.ndarray  # uint8
    target_mask: np.ndarray     # uint8 t_mask
    position_mask: np.ndarray   # uint8 p_mask
    lengths: np.ndarray         # int32 (M,) word pieces before truncation (incl. [CLS]/[SEP])
    overflow: np.ndarray        # uint8 (M,) 1 where a word-mask flag fell past max_tokens

    _ARRAYS = ("input_ids", "attention_mask", "target_mask", "position_mask", "lengths", "overflow")

    def __len__(self) -> int:
        return int(self.lengths.shape[0])


def default_cache_dirs(data_root: str | Path | None) -> list[Path]:
    """Where caches are looked for / written: ``<root>/.openrrsis_cache`` then ``~/.cache/openrrsis/data``."""
    dirs = [] if data_root is None else [Path(data_root) / ".openrrsis_cache"]
    dirs.append(Path.home() / ".cache" / "openrrsis" / "data")
    return dirs


def _nltk_version() -> str:
    try:
        from importlib.metadata import version

        return version("nltk")
    except Exception:  # pragma: no cover - metadata missing
        return "unknown"


def _cache_key(sentences: Sequence[str], tokenizer_hash: str, classes: Sequence[str], max_tokens: int) -> str:
    digest = hashlib.sha256()
    header = {"version": WORD_MASKS_VERSION, "nltk": _nltk_version(), "grammar": PP_GRAMMAR,
              "classes": list(classes), "max_tokens": int(max_tokens), "tokenizer": tokenizer_hash,
              "count": len(sentences)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for sentence in sentences:
        digest.update(sentence.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()


def _load_cache(path: Path, key: str, count: int) -> TextFeatures | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["key"]) != key:
                return None
            features = TextFeatures(**{name: npz[name] for name in TextFeatures._ARRAYS})
    except Exception:  # unreadable / partial / old format: recompute
        return None
    return features if len(features) == count else None


def _save_cache(dirs: Iterable[Path], filename: str, key: str, features: TextFeatures) -> Path | None:
    """Write atomically into the first usable folder; caching is best effort (None if impossible)."""
    for folder in dirs:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, key=np.array(key), **{n: getattr(features, n) for n in TextFeatures._ARRAYS})
                os.replace(tmp, folder / filename)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return folder / filename
        except OSError:
            continue
    return None


def compute_text_features(sentences: Sequence[str], tokenizer: Any, classes: Sequence[str],
                          max_tokens: int) -> TextFeatures:
    """Tokenise and compute word masks for every sentence (no cache)."""
    from .tokenizer import encode_many

    ids, attention, lengths = encode_many(tokenizer, sentences, max_tokens)
    masker = WordMasker(classes)
    t_rows, p_rows, overflow = [], [], []
    for sentence, att in zip(sentences, attention):
        t_mask, p_mask, over = masker(sentence, att)
        t_rows.append(t_mask)
        p_rows.append(p_mask)
        overflow.append(over)
    shape = (len(sentences), max_tokens)

    def table(rows: list, dtype: Any) -> np.ndarray:
        return np.asarray(rows, dtype=dtype).reshape(shape)

    return TextFeatures(
        input_ids=table(ids, np.int32), attention_mask=table(attention, np.uint8),
        target_mask=table(t_rows, np.uint8), position_mask=table(p_rows, np.uint8),
        lengths=np.asarray(lengths, dtype=np.int32).reshape(-1), overflow=np.asarray(overflow, dtype=np.uint8).reshape(-1),
    )


def build_text_features(sentences: Sequence[str], tokenizer_dir: str | Path, classes: Sequence[str],
                        max_tokens: int, *, cache_dirs: Sequence[Path] = (), name: str = "text") -> TextFeatures:
    """Cached ``compute_text_features``: a cache hit loads neither transformers nor NLTK.

    ``cache_dirs`` are searched in order for ``<name>-<key>.npz``; a miss computes the features
    and writes them to the first writable folder (no cache when ``cache_dirs`` is empty).
    """
    from .tokenizer import load_tokenizer, tokenizer_fingerprint

    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    key = _cache_key(sentences, tokenizer_fingerprint(tokenizer_dir), classes, max_tokens)
    safe_name = re.sub(r"[^A-Za-z0-9_.+-]", "_", name)
    filename = f"{safe_name}-{key[:24]}.npz"
    for folder in cache_dirs:
        path = Path(folder) / filename
        if path.is_file():
            cached = _load_cache(path, key, len(sentences))
            if cached is not None:
                return cached
    features = compute_text_features(sentences, load_tokenizer(tokenizer_dir), classes, max_tokens)
    if cache_dirs:
        _save_cache([Path(d) for d in cache_dirs], filename, key, features)
    return features
