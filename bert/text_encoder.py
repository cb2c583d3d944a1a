"""BERT text encoder on `transformers`, with the numerics of the originals' vendored BERT.

The LAVT family vendored Hugging Face Transformers 3.0.2. A modern eager `BertModel` differs from
it in exactly two places (found by comparing both on the same weights):

* embedding sum order: vendored ``(word + position) + token_type``; modern ``(word + token_type)
  + position`` (last-bit differences, amplified through the layers);
* attention mask: vendored adds ``(1 - m) * -10000.0`` in the parameter dtype; modern adds the
  dtype minimum (so a fully masked row attends uniformly instead of to every token).

`BertTextEncoder` is a `transformers.BertModel` (no pooler) whose ``forward`` reproduces both, then
runs the stock ``encoder`` with eager attention. With these two changes the modern model is
bit-identical to the vendored one. The parameter names are transformers' own, so original
``text_encoder.*`` / ``bert_model`` state_dicts load strictly (no pooler, no ``position_ids``).
Works with transformers 4.4x and 5.x.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import BertConfig, BertModel
from transformers.modeling_outputs import BaseModelOutput

# config.json of `bert-base-uncased` (the text encoder of every model here).
BERT_BASE_UNCASED: dict[str, Any] = {
    "architectures": ["BertForMaskedLM"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30522,
}

# Keys of a BERT config.json that describe the architecture (everything else is metadata).
_ARCH_KEYS = (
    "attention_probs_dropout_prob", "hidden_act", "hidden_dropout_prob", "hidden_size",
    "initializer_range", "intermediate_size", "layer_norm_eps", "max_position_embeddings",
    "num_attention_heads", "num_hidden_layers", "pad_token_id", "type_vocab_size", "vocab_size",
)

# Additive mask value of the vendored BERT (NOT the dtype minimum).
MASK_VALUE = -10000.0


class BertConfigError(ValueError):
    """A BERT config/folder argument that cannot be used."""


def bert_config_dict(bert: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """Resolve a BERT description into a plain, JSON-serialisable config dict.

    ``bert`` is a dict of BertConfig fields, the name ``'bert-base-uncased'`` (built-in config), or
    a local folder holding a ``config.json`` (e.g. a downloaded bert-base-uncased). Nothing is
    fetched from the network.
    """
    if isinstance(bert, Mapping):
        src: Mapping[str, Any] = bert
    else:
        text = str(bert)
        folder = Path(text)
        if folder.is_dir():
            cfg_file = folder / "config.json"
            if not cfg_file.is_file():
                raise BertConfigError(f"BERT folder {folder} has no config.json")
            with open(cfg_file, encoding="utf-8") as fh:
                src = json.load(fh)
        elif text in ("bert-base-uncased", "bert-base-uncased-config-or-folder", ""):
            src = BERT_BASE_UNCASED
        else:
            raise BertConfigError(
                f"BERT argument {text!r} is neither a config dict, 'bert-base-uncased', nor a local folder with config.json"
            )
    out = {k: src[k] for k in _ARCH_KEYS if k in src}
    for key, default in BERT_BASE_UNCASED.items():
        if key in _ARCH_KEYS:
            out.setdefault(key, default)
    if out["hidden_act"] != "gelu":
        raise BertConfigError(f"BERT hidden_act {out['hidden_act']!r} is not supported (the originals use 'gelu')")
    return out


def _to_bert_config(cfg: Mapping[str, Any]) -> BertConfig:
    config = BertConfig(**bert_config_dict(cfg))
    # Eager attention: the fused kernels add ~1e-6 differences (measured against the vendored BERT).
    config._attn_implementation = "eager"
    return config


class BertTextEncoder(BertModel):
    """`transformers.BertModel` without pooler, numerically equal to the vendored BERT 3.0.2.

    ``forward(input_ids (B, N) int64, attention_mask (B, N) 0/1) -> BaseModelOutput`` whose
    ``last_hidden_state`` (also ``[0]``) is ``(B, N, hidden)``. Token types are all 0 and
    positions are ``0..N-1``, as in the originals' data pipelines.
    """

    def __init__(self, config: BertConfig):
        super().__init__(config, add_pooling_layer=False)

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **unused: Any,
    ) -> BaseModelOutput:
        emb = self.embeddings
        n = input_ids.shape[1]
        positions = torch.arange(n, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # Vendored order: (word + position) + token_type.
        x = emb.word_embeddings(input_ids) + emb.position_embeddings(positions)[None]
        x = x + emb.token_type_embeddings(token_type_ids)
        x = emb.dropout(emb.LayerNorm(x))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # (B, 1, 1, N) additive key mask in the parameter dtype: 0 for kept, -10000 for masked keys.
        ext = (1.0 - attention_mask[:, None, None, :].to(self.dtype)) * MASK_VALUE
        out = self.encoder(x, attention_mask=ext)
        return BaseModelOutput(last_hidden_state=out[0])


def build_text_encoder(bert: Mapping[str, Any] | str | os.PathLike, pretrained: str | os.PathLike | None = None) -> BertTextEncoder:
    """Build the text encoder from a config (random init) or, with ``pretrained`` = a local folder
    (``config.json`` + weights), from pretrained weights. Pooler weights in the folder are ignored.
    """
    if pretrained:
        folder = Path(pretrained)
        if not folder.is_dir():
            raise FileNotFoundError(f"BERT weights folder not found: {folder}")
        model = BertTextEncoder.from_pretrained(str(folder), attn_implementation="eager", local_files_only=True)
        model.config._attn_implementation = "eager"
        return model
    return BertTextEncoder(_to_bert_config(bert_config_dict(bert)))
