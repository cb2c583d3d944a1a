"""The one checkpoint loader of the project (train.py, test.py, demo.py, tools, tests).

* `safe_torch_load` — ``torch.load(weights_only=True)`` with ``argparse.Namespace`` allow-listed
  (original checkpoints pickle their args); anything else that is not plain data is refused.
* `extract_state_dict` — original layouts: ``{'model': ...}`` (+ ``'bert_model'`` of the two-part
  ``lavt`` variant, merged under ``text_encoder.``), ``{'state_dict': ...}``, raw state_dicts,
  ``module.`` prefixes, pooler keys dropped.
* `load_model_state` — STRICT by default; on mismatch raises `CheckpointMismatchError` with a
  readable report. ``strict=False`` loads what matches and prints the report.
* `load_swin_pretrained` — official Swin ImageNet checkpoints into the backbone (with the key
  handling of LAVT's reference loader).
* `save_checkpoint` (atomic); `read_checkpoint_file_or_folder` (a file, or an exported safetensors folder).
"""
from __future__ import annotations

import argparse
import glob
import os
import pickle
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

BERT_PREFIX = "text_encoder."
# Buffers that old files may hold and that are recomputed by our modules.
_DERIVED_BUFFER_SUFFIXES = (".attn_mask", "embeddings.position_ids", "embeddings.token_type_ids")


class CheckpointError(ValueError):
    """A checkpoint file or dict that cannot be used."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist."""


class CheckpointMismatchError(CheckpointError):
    """Strict load failed; the message is the key report."""


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------
# torch names a refused global as "Unsupported global: GLOBAL mod.name" (>= 2.4) or "unsupported
# GLOBAL mod.name whose module mod is blocked" (>= 2.6); the spelling has changed between releases.
_REFUSED_GLOBAL = re.compile(r"unsupported\s+global:?\s*(?:global\s+)?([A-Za-z_][\w.]*)", re.IGNORECASE)
_NOT_A_CHECKPOINT = "not a checkpoint (corrupt or another format)"
# Pickle opcodes that import a global: GLOBAL / INST carry "module name" as their argument;
# STACK_GLOBAL takes the last two strings pushed.
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _pickled_globals(data: bytes, limit: int = 3) -> list[str]:
    """Globals a pickle stream would import, read with ``pickletools`` (nothing is executed)."""
    import pickletools

    found: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in _STRING_OPS and isinstance(arg, str):
                strings = (strings + [arg])[-2:]
            elif op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) == 2:
                found.append(".".join(strings))
            if len(found) >= limit:
                break
    except Exception:  # not a (complete) pickle: report what was seen so far
        pass
    return found


def _refused_global(p: Path, msg: str) -> str | None:
    """The global a weights-only load refused: from torch's message, else from scanning the file."""
    match = _REFUSED_GLOBAL.search(msg)
    if match:
        return match.group(1)
    try:
        data = p.read_bytes()
    except OSError:
        return None
    allowed = {"collections.OrderedDict", "argparse.Namespace"}
    names = [g for g in _pickled_globals(data, limit=20) if g not in allowed and not g.startswith("torch.")]
    return names[0] if names else None


def safe_torch_load(path: str | os.PathLike) -> Any:
    """Load a checkpoint with ``weights_only=True`` (tensors, plain containers, argparse.Namespace).

    Errors are one-line `CheckpointError` messages: a pickle that needs any other global is refused
    naming that global (e.g. ``posix.system``); random bytes, a truncated file or a pickle in a
    form torch cannot read weights-only are reported as "not a checkpoint (corrupt or another
    format)". Torch's advice to retry with ``weights_only=False`` is never repeated: that would
    run the file's code.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {p}")
    try:
        with warnings.catch_warnings():
            # "Detected pickle protocol N": noise on a file that is refused anyway.
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        name = _refused_global(p, str(exc))
        if name is not None:
            raise CheckpointError(
                f"{p}: refused to load, it would import the Python global {name} (only tensors, plain "
                "containers and argparse.Namespace are accepted; a checkpoint holding code is never run)") from None
        raise CheckpointError(f"{p}: {_NOT_A_CHECKPOINT}") from None
    except Exception as exc:  # zip / EOF / decode errors of random bytes or a truncated file
        if isinstance(exc, OSError) and exc.errno is not None:  # e.g. permission denied, I/O error
            raise CheckpointError(f"{p}: cannot read: {exc.strerror}") from None
        raise CheckpointError(f"{p}: {_NOT_A_CHECKPOINT}") from None


def _strip_prefix(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def _check_tensors(sd: Mapping[str, Any], where: str) -> None:
    bad = [k for k, v in sd.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{where}: entries that are not tensors: {', '.join(map(str, bad[:5]))}"
                              + (" ..." if len(bad) > 5 else ""))


def extract_state_dict(ckpt: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """State dict of our key layout from any supported checkpoint layout.

    ``{'model': sd, 'bert_model': bert_sd}`` (two-part ``lavt``: BERT keys get ``text_encoder.``),
    ``{'model': sd}``, ``{'state_dict': sd}``, or ``sd`` itself; ``module.`` prefixes (DDP) are
    removed; ``pooler.*`` keys are dropped (the originals set the pooler to None).
    """
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"checkpoint must be a dict, got {type(ckpt).__name__}")
    if isinstance(ckpt.get("model"), Mapping):
        sd = _strip_prefix(ckpt["model"], "module.")
        bert = ckpt.get("bert_model")
        if isinstance(bert, Mapping):
            for k, v in _strip_prefix(bert, "module.").items():
                sd[BERT_PREFIX + k] = v
    elif isinstance(ckpt.get("state_dict"), Mapping):
        sd = _strip_prefix(ckpt["state_dict"], "module.")
    else:
        sd = _strip_prefix(ckpt, "module.")
    sd = {k: v for k, v in sd.items() if not (k.startswith("pooler.") or k.startswith(BERT_PREFIX + "pooler."))}
    _check_tensors(sd, "state_dict")
    return sd


def split_lavt_checkpoint(state_dict: Mapping[str, torch.Tensor], bert_prefix: str = BERT_PREFIX) -> dict[str, dict]:
    """The two-part layout of an official ``lavt`` checkpoint (fixtures' ``key_mapping``):
    ``model`` = entries not under ``bert_prefix`` (keys unchanged), ``bert_model`` = entries under
    it with the prefix removed."""
    return {
        "model": {k: v for k, v in state_dict.items() if not k.startswith(bert_prefix)},
        "bert_model": {k[len(bert_prefix):]: v for k, v in state_dict.items() if k.startswith(bert_prefix)},
    }


# --------------------------------------------------------------------------------------------
# Loading into a model
# --------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What a load did: keys loaded, missing (model only), unexpected (file only), shape
    mismatches ``(key, file_shape, model_shape)``, and ignored keys (known, deliberately skipped)."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self, limit: int = 12, title: str = "checkpoint") -> str:
        lines = [f"{title}: {len(self.loaded)} loaded, {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                 f"{len(self.mismatched)} shape mismatches, {len(self.ignored)} ignored"]
        for label, items in (("missing (in model, not in file)", self.missing),
                             ("unexpected (in file, not in model)", self.unexpected)):
            if items:
                lines.append(f"  {label}:")
                lines += [f"    {k}" for k in _summarise(items, limit)]
        if self.mismatched:
            lines.append("  shape mismatches (file vs model):")
            for k, a, b in self.mismatched[:limit]:
                lines.append(f"    {k}: {list(a)} vs {list(b)}")
            if len(self.mismatched) > limit:
                lines.append(f"    ... and {len(self.mismatched) - limit} more")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _summarise(keys: list[str], limit: int) -> list[str]:
    """Up to ``limit`` lines; long lists are grouped by their first three key components."""
    if len(keys) <= limit:
        return list(keys)
    groups: dict[str, int] = {}
    for k in keys:
        head = ".".join(k.split(".")[:3])
        groups[head] = groups.get(head, 0) + 1
    out = [f"{g}.* ({n} keys)" if n > 1 else g for g, n in groups.items()]
    if len(out) > limit:
        out = out[:limit] + [f"... {len(keys)} keys in {len(groups)} groups"]
    return out


def _compare(model_sd: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]) -> LoadReport:
    rep = LoadReport()
    for k, v in sd.items():
        if k not in model_sd:
            if k.endswith(_DERIVED_BUFFER_SUFFIXES):
                rep.ignored.append(k)
            else:
                rep.unexpected.append(k)
        elif tuple(v.shape) != tuple(model_sd[k].shape):
            rep.mismatched.append((k, tuple(v.shape), tuple(model_sd[k].shape)))
        else:
            rep.loaded.append(k)
    rep.missing = [k for k in model_sd if k not in sd]
    return rep


class NonFiniteWeightsError(CheckpointError):
    """A state dict holds NaN or infinite values (a diverged run's weights)."""


def check_finite(state_dict: Mapping[str, Any], source: str, limit: int = 3) -> None:
    """Refuse weights that hold NaN / inf: raise `NonFiniteWeightsError` naming the first bad keys.

    ``source`` names where the weights come from (a file path) in the one-line message. Only
    floating-point tensors are inspected; integer buffers cannot be non-finite.
    """
    bad: list[str] = []
    count = 0
    for key, value in state_dict.items():
        if torch.is_tensor(value) and (value.is_floating_point() or value.is_complex()) \
                and not bool(torch.isfinite(value).all()):
            count += 1
            if len(bad) < limit:
                bad.append(key)
    if count:
        more = f" and {count - len(bad)} more" if count > len(bad) else ""
        raise NonFiniteWeightsError(f"{source}: weights hold NaN or inf values in {', '.join(bad)}{more} "
                                    "(a diverged run?); refusing to load them")


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True,
                     source: str = "checkpoint") -> LoadReport:
    """Load ``state`` (our key layout, see `extract_state_dict`) into ``model``.

    Strict by default: any missing / unexpected key or shape mismatch raises
    `CheckpointMismatchError`, and NaN / inf weights raise `NonFiniteWeightsError` (`check_finite`;
    ``source`` names the file in that message); in both cases nothing is loaded. With ``strict=False`` the matching entries are
    loaded and the report is printed. Tensors are cast to the parameters' dtype (e.g. float16 files).
    """
    check = getattr(model, "check_state_dict", None)
    if callable(check):  # a model may refuse a file it can name the problem of (e.g. the other TRIS stage)
        check(state)
    model_sd = model.state_dict()
    rep = _compare(model_sd, state)
    if strict and not rep.ok:
        raise CheckpointMismatchError("strict checkpoint load failed\n" + rep.format())
    if strict:
        check_finite({k: state[k] for k in rep.loaded}, source)
    model.load_state_dict({k: state[k] for k in rep.loaded}, strict=False)
    if not rep.ok:
        print(rep.format(title="non-strict checkpoint load"))
    return rep


# --------------------------------------------------------------------------------------------
# Official Swin ImageNet weights
# --------------------------------------------------------------------------------------------
def _swin_state_dict(ckpt: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: a Swin checkpoint must be a dict, got {type(ckpt).__name__}")
    sd = ckpt.get("state_dict") if isinstance(ckpt.get("state_dict"), Mapping) else \
        ckpt.get("model") if isinstance(ckpt.get("model"), Mapping) else ckpt
    sd = dict(sd)
    if not sd:
        raise CheckpointError(f"{path}: empty state dict")
    if next(iter(sd)).startswith("module."):
        sd = {k[7:]: v for k, v in sd.items()}
    if next(iter(sd)).startswith("backbone."):  # UperNet / mmseg files
        sd = {k.replace("backbone.", ""): v for k, v in sd.items() if k.startswith("backbone.")}
    if sorted(sd)[0].startswith("encoder"):  # MoBY files
        sd = {k.replace("encoder.", ""): v for k, v in sd.items() if k.startswith("encoder.")}
    return sd


def _resize_bias_table(table: torch.Tensor, target: torch.Tensor, key: str, rep: LoadReport) -> torch.Tensor | None:
    (l1, h1), (l2, h2) = table.shape, target.shape
    if h1 != h2:
        rep.notes.append(f"{key}: {h1} heads in the file vs {h2} in the model, not loaded")
        return None
    if l1 == l2:
        return table
    s1, s2 = int(round(l1 ** 0.5)), int(round(l2 ** 0.5))
    img = table.float().permute(1, 0).reshape(1, h1, s1, s1)
    out = F.interpolate(img, size=(s2, s2), mode="bicubic", align_corners=False)
    rep.notes.append(f"{key}: bias table resized {s1}x{s1} -> {s2}x{s2} (bicubic)")
    return out.reshape(h2, l2).permute(1, 0).to(table.dtype)


def load_swin_pretrained(backbone: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load an official Swin classification checkpoint into a `MultiModalSwin`.

    Non-strict by design: fusion modules, stage norms and model additions keep their init;
    ``head.*``, the classifier's final ``norm.*``, ``attn_mask`` buffers and (on a window change)
    ``relative_position_index`` are ignored; relative-position tables of another window size are
    resized bicubically. Prints a report of what was and was not loaded.
    """
    p = Path(path)
    sd = _swin_state_dict(safe_torch_load(p), p)
    model_sd = backbone.state_dict()
    rep = LoadReport()
    to_load: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("head.") or k in ("norm.weight", "norm.bias") or k.endswith("attn_mask") or k == "absolute_pos_embed":
            rep.ignored.append(k)
            continue
        if k not in model_sd:
            rep.unexpected.append(k)
            continue
        if "relative_position_bias_table" in k:
            v = _resize_bias_table(v, model_sd[k], k, rep)
            if v is None:
                rep.ignored.append(k)
                continue
        if tuple(v.shape) != tuple(model_sd[k].shape):
            if k.endswith("relative_position_index"):
                rep.ignored.append(k)  # derived from the window size; ours is kept
            else:
                rep.mismatched.append((k, tuple(v.shape), tuple(model_sd[k].shape)))
            continue
        to_load[k] = v
    rep.loaded = list(to_load)
    rep.missing = [k for k in model_sd if k not in to_load and k not in sd]
    backbone.load_state_dict(to_load, strict=False)
    print(rep.format(limit=8, title=f"Swin weights from {p.name}"))
    return rep


# --------------------------------------------------------------------------------------------
# Our checkpoints
# --------------------------------------------------------------------------------------------
def has_bert_weights(folder: str | os.PathLike) -> bool:
    """Whether a local BERT folder holds weights (else models keep a random BERT)."""
    return any((Path(folder) / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))


def load_pretrained_swin(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Official Swin ImageNet weights into a model: its own loader when it has one (backbones laid
    out differently, e.g. CrossVLT), else `load_swin_pretrained` on ``model.backbone``. Returns the
    model's state-dict keys that were loaded."""
    if hasattr(model, "load_pretrained_swin"):
        return list(model.load_pretrained_swin(path))
    return ["backbone." + k for k in load_swin_pretrained(model.backbone, path).loaded]


def load_pretrained_bert(model: nn.Module, folder: str | os.PathLike) -> list[str]:
    """Local Hugging Face BERT weights into a model: its own loader when it has one (CrossVLT's
    stage-divided encoder), else a strict copy into ``model.text_encoder`` (pooler dropped).
    Returns the model's state-dict keys that were loaded."""
    if hasattr(model, "load_pretrained_bert"):
        return list(model.load_pretrained_bert(folder))
    from transformers import BertModel

    hf = BertModel.from_pretrained(str(folder), add_pooling_layer=False, local_files_only=True)
    state = {k: v for k, v in hf.state_dict().items() if not k.startswith("pooler.")}
    load_model_state(model.text_encoder, state, strict=True)
    return ["text_encoder." + k for k in state]


def check_pretrained_coverage(model: nn.Module, loaded: list[str], allowed_missing: Any) -> list[str]:
    """After loading the ImageNet backbone and the language weights: the model keys left at their
    initialisation. Raises `CheckpointMismatchError` (with the key report) when one of them is not
    allowed by ``allowed_missing(keys) -> keys that are NOT allowed`` (the spec's patterns)."""
    done = set(loaded)
    missing = [k for k in model.state_dict() if k not in done]
    bad = allowed_missing(missing)
    if bad:
        rep = LoadReport(loaded=list(loaded), missing=list(bad))
        raise CheckpointMismatchError("pretrained weights left keys at their random initialisation that should "
                                      "have been loaded\n" + rep.format(title="pretrained weights"))
    return missing


def _remove_stale_temps(folder: Path, name: str) -> None:
    """Delete temp files an interrupted `save_checkpoint` left in ``folder`` (killed before its
    ``os.replace``): ``.checkpoint_*.tmp`` and ``.<name>.*.tmp``. Called after a successful save,
    so this save's own temp file is already renamed; best effort (a failure is ignored)."""
    patterns = {".checkpoint_*.tmp", f".{glob.escape(name)}.*.tmp"}
    for pattern in patterns:
        for stale in folder.glob(pattern):
            try:
                stale.unlink()
            except OSError:
                pass


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Atomically write ``payload`` (plain data + tensors): temp file in the same folder, fsync,
    ``os.replace``. A failure at any point leaves an existing file at ``path`` untouched; temp files
    of an earlier interrupted save in that folder are removed once this save has succeeded."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(dict(payload), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
        _remove_stale_temps(p.parent, p.name)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename durable
        dfd = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# Exported folders (model.safetensors + config.json): loading without any pickle
# --------------------------------------------------------------------------------------------
EXPORT_FORMAT = "openrrsis-export-v1"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"


def read_checkpoint_file_or_folder(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint: a ``torch.save`` file (through `safe_torch_load`), an exported folder
    (``model.safetensors`` + ``config.json``, written by ``python -m tools.export``), or a bare
    ``.safetensors`` file (with the ``config.json`` beside it, if any).

    Folders and ``.safetensors`` files are read with ``safetensors`` and ``json`` only: no pickle.
    Returns ``{'model': state_dict, 'config': model config, 'args': training args, ...}`` for an
    export, or the loaded file's dictionary otherwise.
    """
    p = Path(path)
    if p.is_dir():
        weights, meta_file = p / EXPORT_WEIGHTS, p / EXPORT_CONFIG
        if not weights.is_file():
            raise CheckpointError(f"{p}: folder without {EXPORT_WEIGHTS} (not an exported model)")
    elif p.suffix == ".safetensors":
        weights, meta_file = p, p.parent / EXPORT_CONFIG
    else:
        return safe_torch_load(p)
    if not weights.is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {weights}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    out: dict[str, Any] = {"model": state}
    if meta_file.is_file():
        import json

        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{meta_file}: not readable JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT or not isinstance(meta.get("config"), dict):
            raise CheckpointError(f"{meta_file}: not an OpenRRSIS export config (needs format {EXPORT_FORMAT!r} "
                                  "and a 'config' entry)")
        out.update({k: v for k, v in meta.items() if k not in ("model", "format")})
        out["format"] = EXPORT_FORMAT
    elif p.is_dir():
        raise CheckpointError(f"{p}: folder without {EXPORT_CONFIG} (not an exported model)")
    return out
