"""What the rest of the code may know about a model: its `ModelSpec`, and the model contract.

Every model file of ``lib/`` ends with ``SPEC = ModelSpec(...)``; ``lib.registry`` maps a name to
that object (one line per model). Entry points (train.py, test.py, demo.py, predict.py, bench/,
tools/) read only the spec and the contract below, never a model's name.

The contract every registered ``nn.Module`` fulfils (`SegmentationModel` gives the defaults of a
two-class-logit model):

* ``forward(**{k: batch[k] for k in spec.inputs})`` -> ``outputs`` (eval), and with
  ``spec.train_inputs`` in training. ``outputs`` is model-specific (a tensor, tuple or dict);
  only the model's own methods look inside it.
* ``loss(outputs, batch) -> dict[str, Tensor]``: named float32 scalar terms, already weighted;
  the training loss is their sum and each term is logged by name (detectron2's loss dicts).
* ``predict_scores(outputs, size) -> (B, H, W)`` float foreground probability in [0, 1] at
  ``size = (H, W)`` (a tiled scene predictor blends these).
* ``predict_mask(outputs, size) -> (B, H, W)`` bool: the model's own decision rule (argmax of two
  classes, sigmoid > 0.5, positive response ...).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

VAL_PROTOCOLS = ("all", "one-per-ref")
SCHEDULE_STEPS = ("iteration", "epoch")
TOKENIZERS = ("bert", "clip")


class UnknownRecipeError(ValueError):
    """A model has no reference recipe for the requested dataset."""


@dataclass(frozen=True)
class Recipe:
    """A reference training recipe: ``batch_size`` per process on ``gpus`` processes (the total
    batch is their product); ``options`` are model options the recipe sets (FIANet's ``num_tmem``)."""

    lr: float
    epochs: int
    batch_size: int
    max_tokens: int
    weight_decay: float = 0.01
    seed: int = 2401
    gpus: int = 1
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def total_batch(self) -> int:
        return self.batch_size * self.gpus

    def as_flags(self) -> dict[str, Any]:
        """The recipe as argparse destinations (``weight_decay`` etc.), options included."""
        flags = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("options", "gpus")}
        return {**flags, **dict(self.options)}


@dataclass(frozen=True)
class TextSide:
    """How a model's sentences are tokenised.

    ``tokenizer``: ``'bert'`` (WordPiece from a local folder with vocab.txt) or ``'clip'`` (BPE).
    ``context_length``: a fixed token count (CLIP models), else ``None`` (the recipe's
    ``max_tokens``). ``word_masks``: the model also reads FIANet's ground-object / position masks.
    """

    tokenizer: str = "bert"
    context_length: int | None = None
    word_masks: bool = False

    def __post_init__(self) -> None:
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")


@dataclass(frozen=True)
class ModelSpec:
    """Everything outside ``lib/`` knows about one model.

    ``target``: ``'module:Class'`` of the model (imported lazily). ``build_config(name, **options)``
    returns the model's full JSON-serialisable config (stored in checkpoints); ``options`` are the
    model flags of args.py (swin_type, window_size, img_size, ...); a builder ignores what it has
    no use for. ``config_from_fixture(fixture_config)`` converts a reference fixture's config.
    ``recipes``: dataset name (or ``'*'``, the fallback) -> `Recipe`. ``sync_bn``: BatchNorm becomes
    SyncBatchNorm under DDP (as the reference). ``val_protocol`` / ``test_protocol``: the sentences the per-epoch
    validation / the reference's test script evaluate (``all`` or ``one-per-ref``). ``inputs`` / ``train_inputs``: batch keys the forward takes in eval / training.
    ``mean`` / ``std``: image normalisation. ``pretrained_missing``: regexes of the model keys
    expected to stay missing when the ImageNet backbone / language weights are loaded; any other
    missing key is an error. ``output_stride``: how many times smaller the coarsest feature
    map is than the input (the smallest useful tile). ``tiny``: ``build_config`` options of a seconds-on-a-CPU model (tests,
    quick starts, ``bench --setting tiny``). ``eval_at_original_resolution``: test-time metrics compare the
    prediction upsampled to each image's own size with the ground truth at that size (instead of the
    ground truth resized to the input), and add the point metrics Hit / PointM of ``predict_scores``.
    ``schedule_step``: when the reference steps its poly learning-rate schedule (horizon: iterations
    x epochs in both cases): every ``'iteration'`` (default), or once per ``'epoch'`` (TRIS stage 2,
    whose learning rate is thus almost constant).
    """

    target: str
    build_config: Callable[..., dict[str, Any]]
    recipes: Mapping[str, Recipe]
    config_from_fixture: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    sync_bn: bool = False
    val_protocol: str = "all"
    test_protocol: str = "all"
    inputs: tuple[str, ...] = ("image", "text", "l_mask")
    train_inputs: tuple[str, ...] | None = None
    text: TextSide = TextSide()
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pretrained_missing: tuple[str, ...] = ()
    default_img_size: int = 480
    output_stride: int = 32
    tiny: Mapping[str, Any] = field(default_factory=dict)
    eval_at_original_resolution: bool = False
    schedule_step: str = "iteration"

    def __post_init__(self) -> None:
        for name in ("val_protocol", "test_protocol"):
            if getattr(self, name) not in VAL_PROTOCOLS:
                raise ValueError(f"{name} must be one of {VAL_PROTOCOLS}, got {getattr(self, name)!r}")
        if self.schedule_step not in SCHEDULE_STEPS:
            raise ValueError(f"schedule_step must be one of {SCHEDULE_STEPS}, got {self.schedule_step!r}")
        if "*" not in self.recipes and not self.recipes:
            raise ValueError("a ModelSpec needs at least one recipe")

    def __reduce__(self):
        """A registered spec pickles (and deep-copies) as its registry name: specs are singletons
        holding functions, and a whole model (``model.spec``) must pickle, e.g. ``torch.save(model)``
        or multiprocessing. An unregistered spec pickles by value."""
        from lib import registry  # lazy: registry imports this module

        for name in registry.available_models():
            if registry.model_spec(name) is self:
                return registry.model_spec, (name,)
        return super().__reduce__()

    @property
    def training_inputs(self) -> tuple[str, ...]:
        return self.train_inputs if self.train_inputs is not None else self.inputs

    def recipe(self, dataset: str) -> Recipe:
        """The reference recipe for ``dataset`` (or the model's ``'*'`` recipe); an error otherwise."""
        if dataset in self.recipes:
            return self.recipes[dataset]
        if "*" in self.recipes:
            return self.recipes["*"]
        raise UnknownRecipeError(f"no reference recipe for dataset {dataset!r}; known: {', '.join(self.recipes)}")

    def unexpected_missing(self, missing: Sequence[str]) -> list[str]:
        """The keys of ``missing`` that ``pretrained_missing`` does not allow."""
        patterns = [re.compile(p) for p in self.pretrained_missing]
        return [k for k in missing if not any(p.match(k) for p in patterns)]


# --------------------------------------------------------------------------------------------
# The contract's defaults for two-class logits
# --------------------------------------------------------------------------------------------
def resize_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W) float32, bilinear with align_corners=True (the decoders'
    upsampling rule); unchanged when already at ``size``."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)
    return logits


class SegmentationModel(nn.Module):
    """Base of the models whose ``outputs`` are two-class logits (B, 2, H, W) (the LAVT family).

    ``predict_mask`` is the references' argmax (a tie goes to background); ``predict_scores`` the
    softmax probability of the foreground class. Subclasses implement ``loss``.
    """

    def logits(self, outputs: Any) -> torch.Tensor:
        """The (B, 2, H, W) logits inside ``outputs``."""
        return outputs[0] if isinstance(outputs, (tuple, list)) else outputs

    def loss(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict_scores(self, outputs: Any, size: Sequence[int]) -> torch.Tensor:
        return resize_logits(self.logits(outputs), size).softmax(1)[:, 1]

    def predict_mask(self, outputs: Any, size: Sequence[int]) -> torch.Tensor:
        logits = resize_logits(self.logits(outputs), size)
        return logits[:, 1] > logits[:, 0]
