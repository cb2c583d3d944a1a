"""``--amp auto``: the resolver (`utils.amp_decision` / `utils.resolve_amp`) on described CPUs and
GPUs, the one-line warning for bf16 forced on a CPU without bf16 instructions, and train.py /
test.py recording the resolved value."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import utils

CPU = torch.device("cpu")
AVX2_EPYC = {"model": "AMD EPYC 7B13", "flags": ["avx", "avx2", "fma", "f16c"], "capability": "AVX2", "isa_env": {}}
AVX512_BF16 = {"model": "AMD EPYC 9B14", "flags": ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"],
               "capability": "AVX512", "isa_env": {}}
AMX = {"model": "Intel(R) Xeon(R) Platinum 8481C", "flags": ["avx2", "fma", "avx512f", "amx_tile", "amx_bf16"],
       "capability": "AVX512", "isa_env": {}}
AVX512_NO_BF16 = {"model": "Intel(R) Xeon(R) Gold 6148", "flags": ["avx2", "fma", "avx512f", "avx512bw"],
                  "capability": "AVX512", "isa_env": {}}


@pytest.fixture(autouse=True)
def unpinned(monkeypatch):
    """conftest pins OPENRRSIS_AMP=off for the suite; the resolver's own tests run without it."""
    monkeypatch.delenv("OPENRRSIS_AMP", raising=False)


@pytest.mark.parametrize("features, expected", [(AVX2_EPYC, "off"), (AVX512_NO_BF16, "off"), (AVX512_BF16, "bf16"),
                                                (AMX, "bf16")])
def test_auto_on_cpus(features, expected):
    value, why = utils.amp_decision("auto", CPU, features)
    assert value == expected
    assert ("avx512_bf16" in why or "amx_bf16" in why)


def test_auto_is_off_when_an_isa_cap_emulates_avx2():
    """ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY below bf16 make an AMX machine run as AVX2."""
    for env in ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, {"ONEDNN_MAX_CPU_ISA": "avx512_core"}, {"ATEN_CPU_CAPABILITY": "avx2"}):
        value, why = utils.amp_decision("auto", CPU, {**AMX, "isa_env": env})
        assert value == "off" and next(iter(env)) in why
    assert utils.amp_decision("auto", CPU, {**AMX, "isa_env": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}})[0] == "bf16"


def test_auto_on_cuda(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert utils.amp_decision("auto", cuda, AVX2_EPYC)[0] == "bf16"  # the CPU does not matter on a GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert utils.amp_decision("auto", cuda, AMX)[0] == "fp16"


def test_explicit_values_are_kept_and_the_environment_pins_auto(monkeypatch):
    for value in ("off", "bf16", "fp16"):
        assert utils.resolve_amp(value, CPU, AMX) == value
        assert utils.resolve_amp(value, CPU, AVX2_EPYC) == value
    monkeypatch.setenv("OPENRRSIS_AMP", "off")
    assert utils.amp_decision("auto", CPU, AMX) == ("off", "auto, pinned by OPENRRSIS_AMP=off")
    assert utils.resolve_amp("bf16", CPU, AMX) == "bf16"  # the pin applies to auto only
    monkeypatch.setenv("OPENRRSIS_AMP", "bf17")
    with pytest.raises(utils.AmpError, match="OPENRRSIS_AMP=bf17"):
        utils.amp_decision("auto", CPU, AMX)


def test_forced_bf16_without_bf16_instructions_warns_once(capsys):
    assert utils.resolve_amp("bf16", CPU, AVX2_EPYC, log_prefix="[train]") == "bf16"
    out, err = capsys.readouterr()
    assert out.strip() == "[train] --amp bf16 -> bf16 (as requested)"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: --amp bf16") and "4x slower" in lines[0]
    # no warning where bf16 has hardware, for auto, or without a log prefix (DDP ranks > 0)
    utils.resolve_amp("bf16", CPU, AMX, log_prefix="[train]")
    utils.resolve_amp("auto", CPU, AVX2_EPYC, log_prefix="[test]")
    utils.resolve_amp("bf16", CPU, AVX2_EPYC)
    out, err = capsys.readouterr()
    assert err == "" and out.splitlines()[1] == "[test] --amp auto -> off (auto: CPU without bf16 instructions " \
                                                "(no avx512_bf16 / amx_bf16))"


def test_cpu_features_of_this_machine():
    f = utils.cpu_features()
    assert f["source"] in ("cpuinfo", "torch") and f["model"]
    assert set(f["flags"]) <= set(utils.CPU_FLAGS_OF_INTEREST)
    assert f["capability"] == torch.backends.cpu.get_cpu_capability()


def test_autocast_refuses_an_unresolved_auto():
    import engine

    with pytest.raises(ValueError, match="resolve_amp"):
        engine.autocast(CPU, "auto")


def test_train_and_test_record_the_resolved_value(tmp_path):
    """A tiny LAVT trained and evaluated with the default --amp: both log and store what auto became
    on this machine (bf16 on a CPU with bf16 instructions, else off)."""
    from data.synthetic import generate

    expected = utils.amp_decision("auto", CPU)[0]
    paths = generate(tmp_path / "data", seed=1, num_images=4, num_val=2, num_test=2, image_size=32)
    common = ["--model", "lavt", "--dataset", "rrsisd", "--refer_data_root", str(paths["rrsisd"]),
              "--bert_tokenizer", str(paths["bert"]), "--ck_bert", str(paths["bert"]),
              "--cache_dir", str(tmp_path / "cache"), "--swin_embed_dim", "8", "--swin_depths", "1-1-1-1",
              "--swin_heads", "1-1-2-2", "--window_size", "4", "--img_size", "32", "--workers", "0",
              "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "OPENRRSIS_AMP"}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    def run(script, *argv):
        proc = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc

    out = tmp_path / "run"
    proc = run("train.py", *common, "--epochs", "1", "-b", "2", "--max_steps", "1", "--no_val", "--output-dir", str(out))
    assert f"[train] --amp auto -> {expected} (auto: " in proc.stdout
    assert json.loads((out / "args.json").read_text())["amp"] == expected
    res = tmp_path / "test.json"
    proc = run("test.py", *common, "--resume", str(out / "checkpoint_last.pth"), "--split", "test",
               "--save_json", str(res))
    assert f"[test] --amp auto -> {expected} (auto: " in proc.stdout
    assert json.loads(res.read_text())["amp"] == expected


# ------------------------------------------------------------------------- CPU allocator (glibc)
_RSS_PROBE = """
import os, sys, torch
sys.path.insert(0, {root!r})
import utils
state = utils.keep_freed_memory("cpu")
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
x = torch.ones(64 * 2**20)          # 256 MiB, one block
del x
print(state)
print((rss() - before) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
@pytest.mark.parametrize("env, state, kept", [({}, "kept", True),
                                              ({"OPENRRSIS_MALLOC": "default"}, "OPENRRSIS_MALLOC=default", False),
                                              ({"MALLOC_MMAP_MAX_": "65536"}, "MALLOC_* set", False)])
def test_keep_freed_memory_keeps_a_freed_block_in_the_process(env, state, kept):
    """Kept: a freed 256 MiB tensor stays resident (no unmap, so no page faults when the next step
    allocates it again); otherwise glibc unmaps it and the resident size falls back."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OPENRRSIS_MALLOC", "MALLOC_MMAP_MAX_")}
    proc = subprocess.run([sys.executable, "-c", _RSS_PROBE.format(root=str(ROOT))], capture_output=True, text=True,
                          env={**clean, **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    *_, got, grown = proc.stdout.splitlines()
    assert got == state
    assert (float(grown) > 200) if kept else (float(grown) < 50), proc.stdout


def test_keep_freed_memory_leaves_other_devices_alone():
    assert utils.keep_freed_memory("meta") == "not cpu"
