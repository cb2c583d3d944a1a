"""Bad input at the entry points: exit code 2, ONE line starting with ``error:`` that names the
flag or file, and nothing left behind that looks like a finished result."""
from __future__ import annotations

import os
import resource

import pytest
import torch
from test_entrypoints import TINY, data_args, run, synth  # noqa: F401  (session fixture)


def _one_error_line(proc, *needles: str) -> str:
    # (progress bars also write to stderr; what counts is one error line and no traceback)
    lines = [x.strip() for x in proc.stderr.replace("\r", "\n").splitlines() if x.strip().startswith("error:")]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _train(synth, out, *extra, **kw):  # noqa: F811
    return run("train.py", "--model", "lavt_one", *data_args(synth), *TINY, "-b", "2", "--epochs", "1",
               "--output-dir", str(out), *extra, check=False, **kw)


@pytest.mark.parametrize("flags,needle", [
    (["--device", "cuda"], "--device cuda"),
    (["-b", "0"], "--batch-size 0"),
    (["-b", "-3"], "--batch-size -3"),
    (["--epochs", "0"], "--epochs 0"),
    (["--max_steps", "0"], "--max_steps 0"),
])
def test_bad_flag_values(synth, tmp_path, flags, needle):  # noqa: F811
    out = tmp_path / "run"
    _one_error_line(_train(synth, out, *flags), needle)
    assert not (out / "checkpoint_best.pth").exists()


def test_corrupt_pretrained_files(synth, tmp_path):  # noqa: F811
    swin = tmp_path / "swin_tiny_patch4_window7_224.pth"
    swin.write_bytes(os.urandom(4096))
    _one_error_line(_train(synth, tmp_path / "a", "--pretrained_swin_weights", str(swin)), "--pretrained_swin_weights",
                    str(swin))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text("{not json")
    _one_error_line(_train(synth, tmp_path / "b", "--ck_bert", str(bert)), "--ck_bert", "config.json")
    (bert / "config.json").write_text((synth["bert"] / "config.json").read_text())
    (bert / "pytorch_model.bin").write_bytes(os.urandom(2048))
    _one_error_line(_train(synth, tmp_path / "c", "--ck_bert", str(bert)), "--ck_bert")
    assert not any((tmp_path / d / "checkpoint_best.pth").exists() for d in "abc")


def test_output_dir_that_is_a_file_or_read_only(synth, tmp_path):  # noqa: F811
    f = tmp_path / "file"
    f.write_text("x")
    _one_error_line(_train(synth, f), "--output-dir", "not a directory")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        _one_error_line(_train(synth, ro / "run"), "--output-dir")


def test_missing_and_empty_images_found_before_training(synth, tmp_path):  # noqa: F811
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth["rrsisd"], data)
    images = sorted((data / "images").rglob("*.jpg"))
    images[0].unlink()
    images[1].write_bytes(b"")
    args = ["--model", "lavt_one", "--dataset", "rrsisd", "--refer_data_root", str(data), "--bert_tokenizer",
            str(synth["bert"]), "--ck_bert", str(synth["bert"]), *TINY, "-b", "2", "--epochs", "1",
            "--output-dir", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "cache")]
    line = _one_error_line(run("train.py", *args, check=False), "missing", "empty")
    assert "data.check" in line and not (tmp_path / "run" / "checkpoint_last.pth").exists()


def test_resume_of_a_finished_run_says_already_complete(synth, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    run("train.py", "--model", "lavt_one", *data_args(synth), *TINY, "-b", "4", "--epochs", "1", "--max_steps", "1",
        "--output-dir", str(out))
    proc = _train(synth, out, "--resume", str(out / "checkpoint_last.pth"), "--max_steps", "1")
    assert proc.returncode == 0 and "already complete" in proc.stdout


def test_disk_full_while_saving_names_the_file(synth, tmp_path):  # noqa: F811
    """A file-size limit (EFBIG, like a full disk) while the checkpoint is written: one line naming
    it, and no checkpoint file that looks complete."""
    out = tmp_path / "run"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))

    import subprocess
    import sys

    from conftest import ROOT
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", "lavt_one", *data_args(synth), *TINY, "-b", "4",
           "--epochs", "1", "--max_steps", "1", "--no_val", "--output-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=limit,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    _one_error_line(proc, "checkpoint_last.pth", "no space left")
    assert not (out / "checkpoint_last.pth").exists() and not list(out.glob(".checkpoint_*.tmp"))


def test_demo_refuses_empty_sentences(synth, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    run("train.py", "--model", "lavt_one", *data_args(synth), *TINY, "-b", "4", "--epochs", "1", "--max_steps", "1",
        "--output-dir", str(out))
    img = next((synth["rrsisd"] / "images").rglob("*.jpg"))
    for text in ("", "   "):
        proc = run("demo.py", "--resume", str(out / "checkpoint_last.pth"), "--img", str(img), "--text", text,
                   "--out", str(tmp_path / "demo"), "--device", "cpu", check=False)
        _one_error_line(proc, "--text")
    assert not (tmp_path / "demo").exists()


def test_nonfinite_weights_are_refused(synth, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    run("train.py", "--model", "lavt_one", *data_args(synth), *TINY, "-b", "4", "--epochs", "1", "--max_steps", "1",
        "--output-dir", str(out))
    ck = torch.load(out / "checkpoint_last.pth", weights_only=True)
    key = next(k for k in ck["model"] if k.endswith("classifier.conv1_4.weight") or "classifier." in k)
    ck["model"][key] = torch.full_like(ck["model"][key], float("nan"))
    bad = tmp_path / "nan.pth"
    torch.save(ck, bad)
    res = tmp_path / "res.json"
    proc = run("test.py", "--resume", str(bad), *data_args(synth), "--workers", "0", "--device", "cpu",
               "--save_json", str(res), check=False)
    _one_error_line(proc, key)
    assert not res.exists()


def test_corrupt_image_mid_epoch_names_file_and_ref(synth, tmp_path):  # noqa: F811
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth["rrsisd"], data)
    bad = sorted((data / "images").rglob("*.jpg"))[0]
    bad.write_bytes(b"\xff\xd8 this is not a jpeg " * 20)  # non-empty: passes the stat pass
    args = ["--model", "lavt_one", "--dataset", "rrsisd", "--refer_data_root", str(data), "--bert_tokenizer",
            str(synth["bert"]), "--ck_bert", str(synth["bert"]), *TINY, "-b", "1", "--epochs", "1", "--no_val",
            "--output-dir", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "cache")]
    line = _one_error_line(run("train.py", *args, check=False), bad.name, "ref ")
    assert "cannot read image" in line
