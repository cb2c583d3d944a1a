"""Data fidelity: 16-bit / float images are rescaled, not clipped to white; empty sentences are
reported by ``data.check`` and skipped (with one counted warning) by the training datasets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_datasets import RRSISD_REFS, all_sentences, write_refsegrs, write_rrsisd, write_vocab

from data import check
from data.datasets import DatasetError, RefSegRSDataset, RRSISDDataset
from data.transforms import HIGH_DEPTH_MODES, image_to_tensor, is_high_depth, load_rgb, to_rgb

pytestmark = pytest.mark.usefixtures("nltk_data_dir")


def grey(image: Image.Image) -> np.ndarray:
    array = np.asarray(image)
    assert image.mode == "RGB" and array.shape[2] == 3
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    return array[..., 0]


# ------------------------------------------------------------------------------ the reader
@pytest.mark.parametrize("mode,values,expected", [
    # min-max: (x - min) * 255 / (max - min), rounded; worked out by hand
    ("I;16", [[0, 1000], [2000, 4000]], [[0, 64], [128, 255]]),       # 12-bit data in a 16-bit file
    ("I;16", [[300, 300], [300, 301]], [[0, 0], [0, 255]]),
    ("I", [[-5, 0], [5, 70000]], [[0, 0], [0, 255]]),                   # 0.018 and 0.036 round to 0
    ("F", [[0.0, 0.5], [1.0, 0.25]], [[0, 128], [255, 64]]),            # 127.5 -> 128, 63.75 -> 64
    ("F", [[np.nan, 2.0], [np.inf, 4.0]], [[0, 0], [0, 255]]),          # non-finite -> 0, not in min/max
    ("I;16", [[7, 7], [7, 7]], [[0, 0], [0, 0]]),                       # constant -> black
])
def test_high_depth_images_are_min_max_rescaled(mode, values, expected):
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    image = Image.fromarray(np.array(values, dtype=dtype))
    assert image.mode == mode and is_high_depth(mode)
    np.testing.assert_array_equal(grey(to_rgb(image)), np.array(expected, dtype=np.uint8))
    # what the loaders had before: PIL clips anything above 255 to white
    if mode == "I;16" and max(map(max, values)) > 255:
        assert (np.asarray(image.convert("RGB"))[..., 0] == 255).sum() > (grey(to_rgb(image)) == 255).sum()


def test_eight_bit_modes_keep_pils_conversion():
    rng = np.random.RandomState(0)
    rgb = Image.fromarray(rng.randint(0, 256, (6, 5, 3), dtype=np.uint8))
    for image in (rgb, rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("P"), rgb.convert("CMYK")):
        assert not is_high_depth(image.mode)
        assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB"))), image.mode
    assert to_rgb(rgb) is rgb
    assert set(HIGH_DEPTH_MODES) >= {"I;16", "I", "F"}


@pytest.mark.parametrize("suffix,dtype", [(".png", np.uint16), (".tif", np.uint16), (".tif", np.float32)])
def test_load_rgb_reads_files_and_image_to_tensor_agrees(tmp_path, suffix, dtype):
    ramp = np.linspace(0, 1, 20 * 16).reshape(16, 20)
    values = (ramp * 4095).astype(dtype) if dtype == np.uint16 else ramp.astype(dtype) * 3 - 1
    path = tmp_path / f"scene{suffix}"
    Image.fromarray(values).save(path)
    image = load_rgb(path)
    assert image.size == (20, 16)
    g = grey(image)
    assert g.min() == 0 and g.max() == 255 and len(np.unique(g)) > 200  # a ramp, not a white sheet
    # The tensor path takes the same rule when handed the raw image.
    with Image.open(path) as raw:
        raw.load()
        torch.testing.assert_close(image_to_tensor(raw), image_to_tensor(image), rtol=0, atol=0)


def test_load_rgb_passes_errors_through(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_rgb(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(OSError):  # PIL.UnidentifiedImageError is an OSError
        load_rgb(bad)


# ------------------------------------------------------------------------------ datasets
def _sixteen_bit_refsegrs(root):
    write_refsegrs(root)
    path = root / "images" / "301.tif"
    ramp = (np.arange(20 * 24).reshape(20, 24) * 8).astype(np.uint16)  # 0 .. 3832: all > 255 but the first row
    Image.fromarray(ramp).save(path)
    return path


def test_dataset_reads_a_16_bit_image_as_a_ramp_not_white(tmp_path):
    write_vocab(tmp_path / "tok", all_sentences())
    path = _sixteen_bit_refsegrs(tmp_path / "rs")
    ds = RefSegRSDataset(tmp_path / "rs", "test", tmp_path / "tok", img_size=24, cache_dir=tmp_path / "cache",
                         mode="eval")
    item = ds[0]
    assert ds.samples[0].image_path == str(path)
    expected = image_to_tensor(load_rgb(path).resize((24, 24), Image.BILINEAR))
    torch.testing.assert_close(item["image"], expected, rtol=0, atol=0)
    red = item["image"][0]
    white, black = (1 - 0.485) / 0.229, (0 - 0.485) / 0.229
    # before: all but the first row (values <= 255) were clipped to white
    assert (red >= white - 1e-4).float().mean() < 0.05 and red.min() == pytest.approx(black, abs=1e-4)
    assert len(torch.unique(red)) > 100


def test_data_check_reports_high_depth_images(tmp_path, capsys):
    write_vocab(tmp_path / "tok", all_sentences())
    path = _sixteen_bit_refsegrs(tmp_path / "rs")
    argv = ["--dataset", "refsegrs", "--refer_data_root", str(tmp_path / "rs"), "--split", "test",
            "--bert_tokenizer", str(tmp_path / "tok"), "--cache_dir", str(tmp_path / "cache")]
    assert check.main(argv) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "more than 8 bits" in x]
    assert len(lines) == 1 and "mode I;16" in lines[0] and ": 1 (e.g. " in lines[0] and str(path) in lines[0]


EMPTY_REFS = {
    **{k: v for k, v in RRSISD_REFS.items() if v[0] == "train"},
    # ref 7 keeps two sentences; ref 3 loses its only one; ref 9 has a whitespace-only one
    7: ("train", ["the vehicle on the left", "", "the vehicle near the bridge"],
        [[4, 4, 20, 4, 20, 20, 4, 20]], (64, 64), True),
    3: ("train", ["   "], [[30, 30, 60, 30, 60, 60, 30, 60]], (64, 64), True),
    9: ("train", ["the bridge", " \t "], [[0, 0, 10, 0, 10, 10, 0, 10]], (64, 64), True),
}


def test_training_skips_empty_sentences_with_one_counted_warning(tmp_path, capfd):
    write_vocab(tmp_path / "tok", all_sentences())
    root = write_rrsisd(tmp_path / "rr", EMPTY_REFS)
    kw = dict(img_size=16, cache_dir=tmp_path / "cache")
    train = RRSISDDataset(root, "train", tmp_path / "tok", mode="train", **kw)
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["warning: rrsisd train: skipped 3 empty or whitespace-only sentences for training; left out "
                   "1 refs without any sentence left (python -m data.check lists them)"]
    assert all(s.sentence for s in train.samples) and 3 not in {s.ref_id for s in train.samples}
    assert len(train) == len(train.groups) == 4  # refs 7, 9, 4, 5
    assert [s.sent_index for s in train.samples if s.ref_id == 7] == [0, 2]  # indices keep the file's
    for k in range(len(train)):
        item = train[k]
        assert item["sentence"] and item["l_mask"].sum() > 2  # [CLS] word ... [SEP]
    # Evaluation keeps every sentence (the protocol counts them) and warns nothing.
    ev = RRSISDDataset(root, "train", tmp_path / "tok", mode="eval", **kw)
    assert len(ev) == 8 and capfd.readouterr().err == ""


def test_data_check_reports_empty_sentences(tmp_path, capsys):
    write_vocab(tmp_path / "tok", all_sentences())
    root = write_rrsisd(tmp_path / "rr", EMPTY_REFS)
    argv = ["--dataset", "rrsisd", "--refer_data_root", str(root), "--split", "train",
            "--bert_tokenizer", str(tmp_path / "tok"), "--cache_dir", str(tmp_path / "cache")]
    assert check.main(argv) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "empty sentences" in x)
    assert line.strip() == ("warning: empty sentences (skipped in training): 3 (e.g. ref 7 sentence 1; "
                            "ref 3 sentence 0; ref 9 sentence 1)")


def test_a_split_of_only_empty_sentences_is_one_clear_error(tmp_path):
    write_vocab(tmp_path / "tok", all_sentences())
    root = write_rrsisd(tmp_path / "rr", {3: ("train", [" "], [[30, 30, 60, 30, 60, 60, 30, 60]], (64, 64), True)})
    with pytest.raises(DatasetError, match="no non-empty sentences"):
        RRSISDDataset(root, "train", tmp_path / "tok", img_size=16, cache_dir=tmp_path / "cache")


def test_refsegrs_line_without_a_sentence_is_skipped_in_training(tmp_path, capfd):
    lines = {"train": ["101 the car on the street", "102", "103  ", "104 the tree on the left"]}
    write_vocab(tmp_path / "tok", all_sentences())
    write_refsegrs(tmp_path / "rs", lines)
    kw = dict(img_size=16, cache_dir=tmp_path / "cache")
    train = RefSegRSDataset(tmp_path / "rs", "train", tmp_path / "tok", mode="train", **kw)
    assert [s.line for s in train.samples] == [0, 3]
    assert capfd.readouterr().err.count("skipped 2 empty") == 1
    assert len(RefSegRSDataset(tmp_path / "rs", "train", tmp_path / "tok", mode="eval", **kw)) == 4
