"""FIANet word masks and the cached per-sentence text features.

For one sentence with ``N = max_tokens`` positions (FIANet, Lei et al., IEEE TGRS 2024, as its released code computes them):

* ``t_mask`` (ground-object mask, ``(N,)`` 0/1): for every class name of the dataset that occurs
  in the raw sentence (case-sensitive *substring*: "street" contains "tree"), mark ``n`` positions
  (``n`` = words of the class name) starting at *NLTK word index + 1* of the first NLTK word
  containing the class's first word (word 0 when none does).
* ``p_mask`` (spatial-position mask): POS-tag the NLTK words, chunk prepositional phrases with
  ``PP_GRAMMAR``, drop every phrase containing the letters "of", and mark each phrase's words
  starting at the *first* occurrence of its first word + 1. A sentence without any phrase uses
  its own attention mask instead; one whose phrases all lie past ``N`` keeps an all-zero mask
  (the reference's list grew past ``N`` there, so its emptiness test did not fire).

Positions are NLTK word indices shifted by one for ``[CLS]`` -- not word-piece positions -- as
in the reference (a word split into several pieces shifts every later flag). Deliberate fixes:
flags past ``N`` are dropped (the reference grows the list and crashes when batching), and the
position-mask fallback is decided per sentence (the reference aliased a ref's lists).

NLTK resources: words come from ``nltk.word_tokenize(..., preserve_line=True)`` (no Punkt data
needed); tags from the averaged-perceptron tagger data ``averaged_perceptron_tagger_eng``, found
through ``NLTK_DATA``. Missing data raises ``NLTKDataMissingError`` with install instructions --
never a silent fallback.

Built-in tagger (opt-in): on a machine that has no tagger data and no internet, set the
environment variable ``OPENRRSIS_POS_TAGGER=builtin`` (or pass ``pos_tagger="builtin"``) to tag
with ``data.pos_tagger.BuiltinTagger`` -- a lexicon of closed-class words, colour / size /
position adjectives and suffix rules -- instead of NLTK's perceptron. Words and ``t_mask`` are
unchanged (they never use the tagger); ``p_mask`` equals NLTK's on about 99 % of the synthetic
captions but not on every sentence, so a one-time warning is printed and results are not
comparable with the reference. ``OPENRRSIS_POS_TAGGER=nltk`` (the default) keeps the strict
behaviour. The tagger's identity is part of the cache key, so masks of the two taggers never mix.

Only FIANet reads the word masks: with ``word_masks=False`` the features hold token ids and
attention only (``t_mask``/``p_mask`` all zeros), NLTK is never imported, and the cache entry is
a separate one, so a later ``word_masks=True`` run still computes the masks.

Computing the masks of a whole dataset takes NLTK time, so ``build_text_features`` caches ids,
attention, both masks and untruncated lengths in a ``.npz`` file keyed by the sentences, the
tokenizer files, ``max_tokens``, the class list, the tagger and the code version.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = [
    "RRSISD_CLASSES", "REFSEGRS_CLASSES", "DATASET_CLASSES", "PP_GRAMMAR", "WORD_MASKS_VERSION",
    "NLTKDataMissingError", "WordMasker", "TextFeatures", "build_text_features", "compute_text_features",
    "default_cache_dirs", "POS_TAGGER_ENV", "POS_TAGGERS", "resolve_pos_tagger",
]

# The 20 DIOR classes used for RRSIS-D.
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
WORD_MASKS_VERSION = 2  # 2: no attention fallback when a phrase lies past the limit

_TAGGER_RESOURCE = "averaged_perceptron_tagger_eng"

# Environment variable choosing the POS tagger of the position masks, and its values.
POS_TAGGER_ENV = "OPENRRSIS_POS_TAGGER"
POS_TAGGERS = ("nltk", "builtin")


class NLTKDataMissingError(FileNotFoundError):
    """The NLTK POS-tagger data needed for the word masks is not installed."""


class PosTaggerChoiceError(ValueError):
    """An unknown POS-tagger name (argument or ``OPENRRSIS_POS_TAGGER``)."""


def resolve_pos_tagger(name: str | None = None) -> str:
    """``name``, else ``$OPENRRSIS_POS_TAGGER``, else ``"nltk"``; validated against ``POS_TAGGERS``."""
    source = "pos_tagger"
    if name is None:
        name, source = os.environ.get(POS_TAGGER_ENV, "").strip() or "nltk", POS_TAGGER_ENV
    value = name.strip().lower()
    if value not in POS_TAGGERS:
        raise PosTaggerChoiceError(f"{source}={name!r} is not a known POS tagger; valid: {', '.join(POS_TAGGERS)}")
    return value


_BUILTIN_WARNED = False


def _warn_builtin_tagger() -> None:
    """Say once per process that the word masks come from the built-in tagger."""
    global _BUILTIN_WARNED
    if _BUILTIN_WARNED:
        return
    _BUILTIN_WARNED = True
    print(f"warning: {POS_TAGGER_ENV}=builtin: FIANet position masks (p_mask) use the built-in POS tagger; "
          "they differ from NLTK's on some sentences, so results are not comparable with the reference "
          f"(install the NLTK data with `python -m nltk.downloader {_TAGGER_RESOURCE}` for exact masks)",
          file=sys.stderr, flush=True)


def _tagger_identity(pos_tagger: str) -> str:
    """What the cache key records about the tagger that produced the masks."""
    if pos_tagger == "builtin":
        from .pos_tagger import BuiltinTagger

        return BuiltinTagger.name
    return f"nltk-{_nltk_version()}"


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


def _nltk_tagger(nltk: Any) -> Any:
    """NLTK's averaged-perceptron tagger; a one-line install hint when its data is missing."""
    from nltk.tag.perceptron import PerceptronTagger

    _sync_nltk_path(nltk)
    try:
        return PerceptronTagger(lang="eng")
    except LookupError:
        raise NLTKDataMissingError(
            f"NLTK tagger data '{_TAGGER_RESOURCE}' not found (searched {os.pathsep.join(nltk.data.path)}); "
            f"install it with `python -m nltk.downloader {_TAGGER_RESOURCE}` or set NLTK_DATA to a folder "
            f"containing taggers/{_TAGGER_RESOURCE}/ (or set {POS_TAGGER_ENV}=builtin for approximate masks "
            "from the built-in tagger)"
        ) from None


class WordMasker:
    """Computes ``(t_mask, p_mask)`` for sentences of one dataset (class list fixed at creation)."""

    def __init__(self, classes: Sequence[str], pos_tagger: str | None = None):
        """``pos_tagger``: ``"nltk"`` (reference), ``"builtin"``, or None for ``$OPENRRSIS_POS_TAGGER``."""
        self.pos_tagger = resolve_pos_tagger(pos_tagger)
        try:
            import nltk
        except ImportError as exc:  # pragma: no cover - nltk is a declared dependency
            raise NLTKDataMissingError(f"nltk is required for the word masks: {exc}") from None
        if self.pos_tagger == "builtin":
            from .pos_tagger import BuiltinTagger

            _warn_builtin_tagger()
            self._tagger = BuiltinTagger()
        else:
            self._tagger = _nltk_tagger(nltk)
        self._word_tokenize = nltk.word_tokenize
        self._parser = nltk.RegexpParser(PP_GRAMMAR)
        self.classes = tuple(classes)
        self._class_words = [self.words(name) for name in self.classes]

    # -- building blocks --------------------------------------------------------------------
    def words(self, text: str) -> list[str]:
        """NLTK words of ``text`` (Treebank rules, whole string as one line: no Punkt needed)."""
        return self._word_tokenize(text, preserve_line=True)

    def tag(self, words: list[str]) -> list[tuple[str, str]]:
        """Penn Treebank POS tags (the reference's ``nltk.pos_tag``, or the built-in tagger)."""
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
        phrases = self.position_phrases(words)
        for phrase in phrases:
            phrase_words = self.words(phrase)
            idx = next((i for i, word in enumerate(words) if word == phrase_words[0]), 0)
            overflow |= _mark(mask, idx + 1, len(phrase_words))
        if not phrases:
            # Only a sentence without any phrase falls back. A phrase that starts past the limit
            # leaves an all-zero mask: the reference's list grew past N there, so its sum was not 0.
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


def _cache_key(sentences: Sequence[str], tokenizer_hash: str, classes: Sequence[str], max_tokens: int,
               tagger: str | None) -> str:
    """Key of one cache entry; ``tagger`` None = ids and attention only (no word masks)."""
    digest = hashlib.sha256()
    header: dict[str, Any] = {"version": WORD_MASKS_VERSION, "max_tokens": int(max_tokens),
                              "tokenizer": tokenizer_hash, "count": len(sentences)}
    if tagger is None:
        header["content"] = "ids"
    else:
        header.update(content="ids+word_masks", tagger=tagger, grammar=PP_GRAMMAR, classes=list(classes))
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
                          max_tokens: int, *, word_masks: bool = True, pos_tagger: str | None = None) -> TextFeatures:
    """Tokenise and compute word masks for every sentence (no cache).

    ``word_masks=False``: ``target_mask`` / ``position_mask`` are all zeros and NLTK is not used.
    """
    from .tokenizer import encode_many

    ids, attention, lengths = encode_many(tokenizer, sentences, max_tokens)
    shape = (len(sentences), max_tokens)
    if word_masks:
        masker = WordMasker(classes, pos_tagger)
        t_rows, p_rows, overflow = [], [], []
        for sentence, att in zip(sentences, attention):
            t_mask, p_mask, over = masker(sentence, att)
            t_rows.append(t_mask)
            p_rows.append(p_mask)
            overflow.append(over)
        target = np.asarray(t_rows, dtype=np.uint8).reshape(shape)
        position = np.asarray(p_rows, dtype=np.uint8).reshape(shape)
    else:
        target, position, overflow = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8), [False] * len(sentences)
    return TextFeatures(
        input_ids=np.asarray(ids, dtype=np.int32).reshape(shape),
        attention_mask=np.asarray(attention, dtype=np.uint8).reshape(shape),
        target_mask=target, position_mask=position,
        lengths=np.asarray(lengths, dtype=np.int32).reshape(-1), overflow=np.asarray(overflow, dtype=np.uint8).reshape(-1),
    )


def build_text_features(sentences: Sequence[str], tokenizer_dir: str | Path, classes: Sequence[str],
                        max_tokens: int, *, cache_dirs: Sequence[Path] = (), name: str = "text",
                        word_masks: bool = True, pos_tagger: str | None = None) -> TextFeatures:
    """Cached ``compute_text_features``: a cache hit loads neither transformers nor NLTK.

    ``cache_dirs`` are searched in order for ``<name>-<key>.npz``; a miss computes the features
    and writes them to the first writable folder (no cache when ``cache_dirs`` is empty).
    ``word_masks=False`` caches ids only (its own entry); ``pos_tagger`` as in ``WordMasker``.
    """
    from .tokenizer import load_tokenizer, tokenizer_fingerprint

    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    tagger = None
    if word_masks:
        pos_tagger = resolve_pos_tagger(pos_tagger)
        if pos_tagger == "builtin":
            _warn_builtin_tagger()  # also on a cache hit: these masks are not the reference's
        tagger = _tagger_identity(pos_tagger)
    key = _cache_key(sentences, tokenizer_fingerprint(tokenizer_dir), classes, max_tokens, tagger)
    safe_name = re.sub(r"[^A-Za-z0-9_.+-]", "_", name)
    kind = "ids" if tagger is None else "builtin" if pos_tagger == "builtin" else "masks"
    filename = f"{safe_name}-{kind}-{key[:24]}.npz"
    for folder in cache_dirs:
        path = Path(folder) / filename
        if path.is_file():
            cached = _load_cache(path, key, len(sentences))
            if cached is not None:
                return cached
    features = compute_text_features(sentences, load_tokenizer(tokenizer_dir), classes, max_tokens,
                                     word_masks=word_masks, pos_tagger=pos_tagger)
    if cache_dirs:
        _save_cache([Path(d) for d in cache_dirs], filename, key, features)
    return features
