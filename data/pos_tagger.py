"""A small built-in part-of-speech tagger: the opt-in stand-in for NLTK's perceptron tagger.

FIANet's spatial-position mask (``data.word_masks``) chunks prepositional phrases from Penn
Treebank tags. The reference uses NLTK's averaged-perceptron tagger, whose data
(``averaged_perceptron_tagger_eng``) must be downloaded. On a machine without that data and
without internet, ``OPENRRSIS_POS_TAGGER=builtin`` selects this tagger instead. It is a
lexicon plus a few suffix and context rules, written for short referring expressions:

* closed-class words from a lexicon: prepositions and subordinators -> ``IN``, determiners ->
  ``DT``, ``to`` -> ``TO``, conjunctions -> ``CC``, pronouns, a few auxiliaries and adverbs;
* adjectives from a lexicon: colours, sizes, shapes, positions (``top``, ``upper``, ``middle``,
  ...) -> ``JJ``; comparatives / superlatives (``lower``, ``largest``, ...) -> ``JJR`` / ``JJS``;
* ``left`` / ``right`` -> ``JJ`` before a noun such as ``side`` or ``corner``, else ``NN``;
* numbers (digits or number words) -> ``CD``; words ending in ``-ly`` -> ``RB``; ``-ed`` past
  participles -> ``VBN`` (``VBD`` after a noun with no auxiliary before it); ``-ing`` after a
  form of *be* or a noun -> ``VBG``;
* plural nouns ending in ``-s`` -> ``NNS``; mixed- or upper-case words not at the start of the
  sentence, and all-capital words anywhere -> ``NNP``; punctuation -> its Penn tag;
* everything else -> ``NN``.

It agrees with NLTK on most tags of short captions but not on all (NLTK's tags depend on the
context in ways a lexicon cannot follow, e.g. "in the bottom right" vs. "at the bottom
right"), so masks computed with it differ from the reference's on some sentences. Bump
``BUILTIN_TAGGER_VERSION`` whenever the rules change: it is part of the word-mask cache key.
"""
from __future__ import annotations

import re
from typing import Sequence

__all__ = ["BUILTIN_TAGGER_VERSION", "BuiltinTagger"]

BUILTIN_TAGGER_VERSION = 1


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_IN = _words("""
    about above across after against along alongside amid amidst among amongst around as at atop
    before behind below beneath beside besides between beyond by despite during except for from
    in inside into like near nearby next of off on onto opposite out outside over past per since
    than through throughout toward towards under underneath unlike until upon via with within
    without because although though while whereas if whether unless
""")
_DT = _words("the a an this these those each every another some any no all both either neither")
_CC = _words("and or but nor plus")
_PRP = _words("it they them he she him her i we you us me itself themselves")
_PRP_POSS = _words("its their his my our your")
_WDT = _words("which whatever")
_WP = _words("who whom what")
_WRB = _words("where when how why")
_RB = _words("""
    not very also just almost only too quite slightly mostly partly partially nearly here there
    together apart away again still even rather somewhat
""")
_VERBS = {
    "is": "VBZ", "'s": "POS", "has": "VBZ", "does": "VBZ", "are": "VBP", "have": "VBP", "do": "VBP",
    "was": "VBD", "were": "VBD", "had": "VBD", "did": "VBD", "be": "VB", "been": "VBN", "being": "VBG",
    "can": "MD", "could": "MD", "may": "MD", "might": "MD", "will": "MD", "would": "MD",
    "should": "MD", "must": "MD", "n't": "RB", "seen": "VBN", "shown": "VBN",
}
_BE = frozenset(("is", "are", "was", "were", "be", "been", "being", "'s", "'re"))
_NUMBERS = _words("""
    zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
    sixteen seventeen eighteen nineteen twenty thirty forty fifty hundred thousand
""")
_JJ = _words("""
    white black red blue green yellow orange grey gray brown purple pink violet silver golden gold
    beige cyan dark light bright pale colorful colourful
    large big small little tiny huge giant long short tall high low wide narrow thin thick
    round square rectangular circular oval triangular straight curved flat empty full
    top upper middle central inner outer rear
    other same first second third fourth fifth last single double whole entire main new old
    open closed visible separate different similar close far distant adjacent lone only
    north south east west northern southern eastern western
    impervious
""")
_JJR = _words("""
    lower larger bigger smaller longer shorter taller higher wider narrower closer nearer farther
    further darker lighter brighter thinner thicker more less
""")
_JJS = _words("""
    largest biggest smallest longest shortest tallest highest lowest widest narrowest closest
    nearest farthest furthest darkest lightest brightest most least leftmost rightmost topmost
    uppermost bottommost
""")
# Nouns that the suffix rules would get wrong (-s / -ing / -ed words that are singular nouns).
_NN = _words("""
    bus gas glass grass class overpass campus canvas atlas iris lens tennis series species news
    chess christmas building marking parking ceiling ring thing string king wing spring evening
    morning ping swing railing clothing painting crossing landing bed shed sled seed speed weed
    need reed red hundred
""")
# Irregular plurals (the -s rule cannot see them).
_NNS = _words("people men women children feet teeth geese mice")
# After "left" / "right" these make the position word an adjective ("on the left side").
_SIDE_NOUNS = frozenset(_words("side sides corner corners part half edge end hand bank"))

_PUNCT = {".": ".", "!": ".", "?": ".", ",": ",", ";": ":", ":": ":", "-": ":", "--": ":", "...": ":",
          "(": "(", ")": ")", "[": "(", "]": ")", "{": "(", "}": ")", "``": "``", "''": "''", '"': "''",
          "'": "''", "`": "``", "$": "$", "#": "#"}


def _lexicon() -> dict[str, str]:
    table: dict[str, str] = {}
    for words, tag in ((_NN, "NN"), (_NNS, "NNS"), (_JJ, "JJ"), (_JJR, "JJR"), (_JJS, "JJS"), (_NUMBERS, "CD"),
                       (_RB, "RB"), (_WRB, "WRB"), (_WP, "WP"), (_WDT, "WDT"), (_PRP_POSS, "PRP$"),
                       (_PRP, "PRP"), (_CC, "CC"), (_DT, "DT"), (_IN, "IN")):
        table.update(dict.fromkeys(words, tag))  # later groups win: closed classes last
    table.update(_VERBS)
    table["to"] = "TO"
    table["that"] = "IN"
    table["there"] = "EX"
    return table


_NUMBER_RE = re.compile(r"^[+-]?(\d+([.,]\d+)*|\d*\.\d+)(st|nd|rd|th)?$")
_PUNCT_RE = re.compile(r"^[^\w\s]+$")


class BuiltinTagger:
    """Penn Treebank tags from a lexicon and suffix / context rules (no data files).

    ``tag(words)`` has the interface of ``nltk.pos_tag``: a list of ``(word, tag)`` pairs.
    """

    name = f"builtin-{BUILTIN_TAGGER_VERSION}"

    def __init__(self) -> None:
        self.lexicon = _lexicon()

    def _base_tag(self, word: str, first: bool) -> str:
        lower = word.lower()
        if word != lower:
            # NLTK tags capitalised words as proper nouns except a capitalised sentence start.
            if word.isupper() and len(word) > 1 or not first or word[1:] != lower[1:]:
                return "NNP"
        if lower in self.lexicon:
            return self.lexicon[lower]
        if lower in _PUNCT:
            return _PUNCT[lower]
        if _NUMBER_RE.match(lower):
            return "JJ" if lower[-2:] in ("st", "nd", "rd", "th") else "CD"
        if _PUNCT_RE.match(lower):
            return ":"
        if "-" in lower.strip("-"):
            return "JJ"  # hyphenated modifiers: "tree-lined", "t-shaped"
        if len(lower) > 4 and lower.endswith("ly"):
            return "RB"
        if len(lower) > 4 and lower.endswith("ed") and not lower.endswith("eed"):
            return "VBN"
        if len(lower) > 5 and lower.endswith("ing"):
            return "NN-ing"  # resolved from the context below
        if len(lower) > 3 and lower.endswith("s") and not lower.endswith(("ss", "us", "is")):
            return "NNS"
        return "NN"

    def tag(self, words: Sequence[str]) -> list[tuple[str, str]]:
        tags = [self._base_tag(word, i == 0) for i, word in enumerate(words)]
        for i, word in enumerate(words):
            lower = word.lower()
            prev_word = words[i - 1].lower() if i > 0 else ""
            prev_tag = tags[i - 1] if i > 0 else ""
            nxt = words[i + 1].lower() if i + 1 < len(words) else ""
            if lower in ("left", "right") and tags[i] == "NN":
                tags[i] = "JJ" if nxt in _SIDE_NOUNS else "NN"
            elif tags[i] == "NN-ing":
                tags[i] = "VBG" if prev_word in _BE or prev_tag in ("NN", "NNS", "PRP") else "NN"
            elif tags[i] == "VBN" and prev_tag in ("NN", "NNS", "PRP", "NNP") and not any(
                    w.lower() in _BE for w in words[:i]):
                tags[i] = "VBD"  # "the car parked ...": a verb right after its subject
        return list(zip(words, tags))
