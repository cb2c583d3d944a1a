"""FIANet word masks (t_mask / p_mask), tokenisation and the on-disk text-feature cache.

Expected positions below are worked out by hand from spec data-train-eval.md §b.5-b.7: a class
or phrase found at NLTK word ``i`` marks positions ``i+1 ... i+n`` (one ``[CLS]`` in front,
one position per NLTK word). The POS tags that decide the phrases are noted per case.
"""
from __future__ import annotations

import numpy as np
import pytest

from data import word_masks as wm
from data.tokenizer import TokenizerFolderError, encode, load_tokenizer

ATT = "attention"  # p_mask expected to fall back to the sentence's own attention mask


@pytest.fixture(scope="module")
def rrsisd_masker(nltk_data_dir):
    return wm.WordMasker(wm.RRSISD_CLASSES)


@pytest.fixture(scope="module")
def refsegrs_masker(nltk_data_dir):
    return wm.WordMasker(wm.REFSEGRS_CLASSES)


def ones(n_real: int, n: int) -> list[int]:
    return [1] * min(n_real, n) + [0] * max(n - n_real, 0)


def positions(mask) -> set[int]:
    return {i for i, v in enumerate(mask) if v}


# (sentence, real BERT tokens if every word is one piece, expected t positions, expected p positions)
RRSISD_CASES = [
    # worked example §b.7: vehicle@1 -> 2, bridge@7 -> 8; "on the left" kept, "of the bridge" dropped
    ("the vehicle on the left of the bridge", 10, {2, 8}, {3, 4, 5}),
    # "dam" is a substring of "damaged" (word 1); no IN -> no phrase -> attention fallback
    ("the damaged ship", 5, {2, 3}, ATT),
    # "vehicle" found inside "vehicles" (word 1); near/IN the/DT bridge/NN at word 2
    ("the vehicles near the bridge", 6, {2, 5}, {3, 4, 5}),
    # two PPs start with "on": both located at the first "on" (word 2)
    ("the vehicle on the road on the left", 10, {2}, {3, 4, 5}),
    # PP at word 0 -> positions 1..3; ship@5 -> 6
    ("in the middle is a ship", 8, {6}, {1, 2, 3}),
    # "on the roof" contains "of" (ro-OF) and so does "of the building": both dropped
    ("the vehicle on the roof of the building", 10, {2}, ATT),
    # "off the coast" contains "of" -> dropped
    ("the ship off the coast", 7, {2}, ATT),
    # plural nouns are NNS, the grammar wants exactly NN -> no phrase; vehicle inside word 0
    ("vehicles on the roads", 6, {1}, ATT),
    # case-sensitive: no class; words tagged NNP -> no phrase
    ("THE VEHICLE ON THE LEFT", 7, set(), ATT),
    # two-word class at word 2 -> positions 3, 4; no preposition
    ("a large storage tank", 6, {3, 4}, ATT),
    # both expressway classes land on the first word containing "expressway" (word 1), n = 3;
    # PP "near the expressway" (IN DT NN) at word 4
    ("the expressway toll station near the expressway service area", 11, {2, 3, 4}, {5, 6, 7}),
    # rule 2 (IN DT JJ JJ): "above the big green" at word 2, n = 4; tennis court@6 -> 7, 8
    ("the vehicle above the big green tennis court", 10, {2, 7, 8}, {3, 4, 5, 6}),
    # rule 3 (IN DT JJR VBD): "in the lower left" at word 2
    ("the windmill in the lower left", 8, {2}, {3, 4, 5, 6}),
    # "left" tagged VBD after an NN: only "in the bottom" is chunked
    ("the ship in the bottom left corner", 8, {2}, {3, 4, 5}),
    # "at the top" @2, "of the image" dropped, "on the left" @8
    ("the ship at the top of the image on the left", 13, {2}, {3, 4, 5, 9, 10, 11}),
    # empty caption: nothing found, fallback = [CLS] [SEP]
    ("", 2, set(), ATT),
]

REFSEGRS_CASES = [
    # "tree" is a substring of "street" (word 4 -> 5); car@1 -> 2
    ("the car on the street", 7, {2, 5}, {3, 4, 5}),
    # "low vegetation" located at the first word containing "low": "yellow" (word 1) -> 2, 3;
    # car@2 -> 3; PP "near the low vegetation" (IN DT JJ NN) at word 3, n = 4
    ("the yellow car near the low vegetation", 9, {2, 3}, {4, 5, 6, 7}),
    # "road" and "road marking" share their first word: both at word 1
    ("the road marking on the road", 8, {2, 3}, {4, 5, 6}),
    # "car" and "van" both inside "caravan"
    ("a caravan", 4, {2}, ATT),
    # "rooftop" contains "of" -> the only phrase is dropped
    ("the vehicle on the rooftop", 7, {2}, ATT),
    # "bus" inside "business" (word 4)
    ("the truck near the business", 7, {2, 5}, {3, 4, 5}),
]


@pytest.mark.parametrize("sentence,n_real,t_exp,p_exp", RRSISD_CASES)
def test_rrsisd_word_masks_table(rrsisd_masker, sentence, n_real, t_exp, p_exp):
    n = 22
    attention = ones(n_real, n)
    t_mask, p_mask, overflow = rrsisd_masker(sentence, attention)
    assert len(t_mask) == n and len(p_mask) == n
    assert positions(t_mask) == t_exp
    assert p_mask == attention if p_exp == ATT else positions(p_mask) == p_exp
    assert not overflow


@pytest.mark.parametrize("sentence,n_real,t_exp,p_exp", REFSEGRS_CASES)
def test_refsegrs_word_masks_table(refsegrs_masker, sentence, n_real, t_exp, p_exp):
    n = 20
    attention = ones(n_real, n)
    t_mask, p_mask, overflow = refsegrs_masker(sentence, attention)
    assert positions(t_mask) == t_exp
    assert p_mask == attention if p_exp == ATT else positions(p_mask) == p_exp
    assert not overflow


@pytest.mark.parametrize("n,t_exp,p_exp", [(6, {2}, {3, 4, 5}), (5, {2}, {3, 4}), (2, set(), set())])
def test_flags_past_max_tokens_are_clipped(rrsisd_masker, n, t_exp, p_exp):
    # bridge would be at 8 and the phrase at 3..5: everything >= n is cut, the lists stay n long
    attention = [1] * n  # 10 word pieces truncated to n: no [SEP]
    t_mask, p_mask, overflow = rrsisd_masker("the vehicle on the left of the bridge", attention)
    assert len(t_mask) == n and len(p_mask) == n
    assert positions(t_mask) == t_exp
    assert overflow
    # n=2: the phrase was found but lies entirely past the limit -> an all-zero mask, no fallback
    assert positions(p_mask) == p_exp


def test_position_phrase_past_the_token_limit_keeps_an_all_zero_mask(rrsisd_masker):
    """An RRSIS-D-style caption cut at 22 tokens whose one position phrase ("in the lower right":
    IN DT JJR NN) starts past the cut: a phrase was found, so the mask within the limit stays all
    zero instead of falling back to the attention mask (the reference's per-sentence rule)."""
    sentence = ("the big white storage tank and the small grey storage tank and the long thin grey road "
                "and the white ship are in the lower right corner")
    words = rrsisd_masker.words(sentence)
    assert rrsisd_masker.position_phrases(words) == ["in the lower right"], rrsisd_masker.tag(words)
    assert words.index("in") + 1 == 23  # its position with [CLS] in front: past 0..21
    n = 22
    attention = [1] * n  # truncated: every kept position is a real token, no [SEP]
    t_mask, p_mask, overflow = rrsisd_masker(sentence, attention)
    assert p_mask == [0] * n and overflow
    # t_mask unchanged: "storage tank" at its first word 3 -> 4, 5; "ship" word 20 -> 21
    assert positions(t_mask) == {4, 5, 21}
    # With room for it the same phrase is marked as usual ...
    _, p_full, _ = rrsisd_masker(sentence, [1] * 29 + [0] * 1)
    assert positions(p_full) == {23, 24, 25, 26}
    # ... and a sentence with no phrase at all still falls back to its attention mask.
    _, p_none, _ = rrsisd_masker("the big white storage tank", ones(7, n))
    assert p_none == ones(7, n)


def test_class_lists_exact():
    assert len(wm.RRSISD_CLASSES) == 20 and len(set(wm.RRSISD_CLASSES)) == 20
    assert len(wm.REFSEGRS_CLASSES) == 14 and len(set(wm.REFSEGRS_CLASSES)) == 14
    assert {"golf field", "expressway service area", "expressway toll station", "ground track field",
            "dam", "harbor", "windmill", "train station"} <= set(wm.RRSISD_CLASSES)
    assert {"road marking", "low vegetation", "impervious surface", "bikeway", "sidewalk"} <= set(wm.REFSEGRS_CLASSES)


def write_vocab(folder, words):
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words)
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return {tok: i for i, tok in enumerate(tokens)}


def test_word_piece_shift_keeps_nltk_positions(tmp_path, rrsisd_masker):
    vocab = write_vocab(tmp_path / "tok", ["the", "vehicle", "##s", "near", "bridge"])
    tok = load_tokenizer(tmp_path / "tok")
    ids, att = encode(tok, "the vehicles near the bridge", 22)
    expected_ids = [vocab[w] for w in ["[CLS]", "the", "vehicle", "##s", "near", "the", "bridge", "[SEP]"]]
    assert ids[:8] == expected_ids and ids[8:] == [0] * 14
    assert att == ones(8, 22)
    t_mask, p_mask, _ = rrsisd_masker("the vehicles near the bridge", att)
    # bridge is NLTK word 4 -> position 5, which holds the word piece "the" (the quirk is kept)
    assert positions(t_mask) == {2, 5} and ids[5] == vocab["the"]
    assert positions(p_mask) == {3, 4, 5}


def test_tokenizer_from_folder_is_not_unk_and_truncates(tmp_path):
    vocab = write_vocab(tmp_path / "tok", ["the", "vehicle", "on", "left"])
    tok = load_tokenizer(tmp_path / "tok")
    ids, att = encode(tok, "The Vehicle on the left", 5)  # lower-cased; 7 pieces cut to 5: no [SEP]
    assert ids == [vocab["[CLS]"], vocab["the"], vocab["vehicle"], vocab["on"], vocab["the"]]
    assert vocab["[UNK]"] not in ids and att == [1] * 5
    ids, att = encode(tok, "vehicle", 4)
    assert ids == [vocab["[CLS]"], vocab["vehicle"], vocab["[SEP]"], 0] and att == [1, 1, 1, 0]


def test_tokenizer_folder_without_vocab_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(TokenizerFolderError) as err:
            load_tokenizer(folder)
        message = str(err.value)
        assert "--bert_tokenizer" in message and str(folder) in message and "\n" not in message


def test_missing_tagger_data_raises_install_hint(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(wm.NLTKDataMissingError) as err:
        wm.WordMasker(wm.RRSISD_CLASSES)
    message = str(err.value)
    assert "python -m nltk.downloader averaged_perceptron_tagger_eng" in message and "NLTK_DATA" in message
    assert "\n" not in message


def test_feature_cache_second_build_skips_nltk(tmp_path, monkeypatch, nltk_data_dir):
    write_vocab(tmp_path / "tok", ["the", "vehicle", "on", "left", "of", "bridge", "a", "ship"])
    sentences = ["the vehicle on the left of the bridge", "a ship", "the ship"]
    cache = tmp_path / "cache"
    first = wm.build_text_features(sentences, tmp_path / "tok", wm.RRSISD_CLASSES, 22, cache_dirs=[cache], name="x")
    assert len(list(cache.glob("x-*.npz"))) == 1
    assert positions(first.target_mask[0]) == {2, 8} and positions(first.position_mask[0]) == {3, 4, 5}
    assert first.lengths.tolist() == [10, 4, 4]

    def boom(*_a, **_k):
        raise AssertionError("the tagger must not run on a cache hit")

    monkeypatch.setattr(wm.WordMasker, "__init__", boom)
    second = wm.build_text_features(sentences, tmp_path / "tok", wm.RRSISD_CLASSES, 22, cache_dirs=[cache], name="x")
    for name in ("input_ids", "attention_mask", "target_mask", "position_mask", "lengths", "overflow"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    # a different max_tokens / sentence list / vocab is a different key -> recomputed (here: boom)
    with pytest.raises(AssertionError, match="tagger"):
        wm.build_text_features(sentences, tmp_path / "tok", wm.RRSISD_CLASSES, 20, cache_dirs=[cache], name="x")
    with pytest.raises(AssertionError, match="tagger"):
        wm.build_text_features(sentences[:2], tmp_path / "tok", wm.RRSISD_CLASSES, 22, cache_dirs=[cache], name="x")
    (tmp_path / "tok" / "vocab.txt").write_text((tmp_path / "tok" / "vocab.txt").read_text() + "extra\n")
    with pytest.raises(AssertionError, match="tagger"):
        wm.build_text_features(sentences, tmp_path / "tok", wm.RRSISD_CLASSES, 22, cache_dirs=[cache], name="x")


def test_corrupt_cache_is_recomputed(tmp_path, nltk_data_dir):
    write_vocab(tmp_path / "tok", ["a", "ship"])
    cache = tmp_path / "cache"
    wm.build_text_features(["a ship"], tmp_path / "tok", wm.RRSISD_CLASSES, 8, cache_dirs=[cache], name="y")
    (path,) = cache.glob("y-*.npz")
    path.write_bytes(b"not a zip file")
    again = wm.build_text_features(["a ship"], tmp_path / "tok", wm.RRSISD_CLASSES, 8, cache_dirs=[cache], name="y")
    assert positions(again.target_mask[0]) == {2}
