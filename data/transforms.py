"""Image / target transforms of the reference loaders (LAVT, RMSIN, FIANet: PIL resize, no augmentation).

Train, validation and test all use the same steps:

1. resize image and target to ``size x size`` ignoring the aspect ratio, on PIL images
   (image bilinear with PIL's antialiasing, target nearest) -- tensor-side interpolation does
   not reproduce PIL, so it stays PIL;
2. image -> float32 ``(3, S, S)`` in [0, 1]; target -> int64 ``(S, S)`` 0/1;
3. normalise the image with the ImageNet mean/std.

Images are read with `load_rgb`, the one reader of the project: 8-bit files are converted to RGB by
PIL; 16-bit and 32-bit integer and float images are rescaled per image (min-max) to 8 bit first,
because PIL's ``convert("RGB")`` clips them to white.

The RRSIS-D loaders additionally black out 20-60 random 32x32 boxes of the original image for
a fixed 20 % of the training refs (``choose_black_box_refs`` / ``black_box``).
"""
from __future__ import annotations

import os
import random
from typing import Hashable, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "HIGH_DEPTH_MODES", "is_high_depth", "to_rgb", "load_rgb",
           "resize_pair", "image_to_tensor", "target_to_tensor",
           "SegmentationTransform", "choose_black_box_refs", "black_box", "BOX_SIZE"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BOX_SIZE = 32
BLACK_BOX_FRACTION = 0.2


# PIL modes holding more than 8 bits per pixel (single band): 16-bit unsigned in its byte orders,
# 32-bit signed integer and 32-bit float.
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def is_high_depth(mode: str) -> bool:
    """Whether a PIL mode is one `to_rgb` rescales (``convert("RGB")`` would clip it to white)."""
    return mode in HIGH_DEPTH_MODES


def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any PIL mode as 8-bit RGB.

    Rule for 16-bit / 32-bit single-band images (``I;16*``, ``I``, ``F``): a per-image min-max
    rescale, ``round(255 * (x - min) / (max - min))``, the grey value repeated on three channels
    (a constant image becomes black; NaN / inf pixels of a float image become 0 and are left out
    of min and max). This keeps the image's contrast whatever bits the sensor filled, at the cost
    of absolute brightness. Every other mode (``L``, ``P``, ``RGBA``, ``CMYK``, ``1``, ...) goes
    through PIL's ``convert("RGB")``, as the reference loaders do.
    """
    if not is_high_depth(image.mode):
        return image if image.mode == "RGB" else image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(values)
    grey = np.zeros(values.shape, dtype=np.uint8)
    if finite.any():
        low, high = float(values[finite].min()), float(values[finite].max())
        if high > low:
            scaled = np.where(finite, (values - low) * (255.0 / (high - low)), 0.0)
            grey = np.rint(scaled).clip(0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), mode="RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Read an image file as 8-bit RGB with the rule of `to_rgb` (fully loaded, file closed).

    PIL's errors pass through (``FileNotFoundError``, ``PIL.UnidentifiedImageError``, ``OSError``
    for a truncated file); callers turn them into one-line messages naming the file.
    """
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def resize_pair(image: Image.Image, target: np.ndarray | Image.Image, size: int) -> tuple[Image.Image, Image.Image]:
    """Resize an image (bilinear) and its 0/1 target (nearest) to ``size x size``."""
    if not isinstance(target, Image.Image):
        target = Image.fromarray(np.ascontiguousarray(target, dtype=np.uint8))
    return image.resize((size, size), Image.BILINEAR), target.resize((size, size), Image.NEAREST)


def image_to_tensor(image: Image.Image, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """RGB PIL image -> normalised float32 ``(3, H, W)`` (ToTensor then Normalize, same float ops)."""
    array = np.asarray(to_rgb(image), dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)


def target_to_tensor(target: Image.Image | np.ndarray) -> torch.Tensor:
    """0/1 target -> int64 ``(H, W)``."""
    return torch.from_numpy(np.array(target, dtype=np.int64))


class SegmentationTransform:
    """Joint resize + tensor conversion of (image, target): ``(3,S,S)`` float32 normalised with
    ``mean`` / ``std`` (the model's; ImageNet by default), ``(S,S)`` int64."""

    def __init__(self, size: int = 480, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        if size < 1:
            raise ValueError(f"image size must be >= 1, got {size}")
        self.size = int(size)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: Image.Image, target: np.ndarray | Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        image, target = resize_pair(image, target, self.size)
        return image_to_tensor(image, self.mean, self.std), target_to_tensor(target)


def choose_black_box_refs(ref_ids: Sequence[Hashable], seed: int) -> frozenset:
    """The fixed 20 % of refs (``int(0.2 * len)``) that get black boxes, drawn once per dataset."""
    ref_ids = list(ref_ids)
    count = int(BLACK_BOX_FRACTION * len(ref_ids))
    return frozenset(random.Random(seed).sample(ref_ids, count))


def black_box(image: Image.Image, rng: random.Random | None = None) -> Image.Image:
    """Black out 20-60 boxes of 32x32 pixels; fresh boxes on every call.

    Both box coordinates are bounded by the image *width*, like the reference (which assumes
    square images): on a tall image boxes never reach the bottom, on a wide one boxes starting
    below the image simply fall outside it. Images narrower than 32 px get boxes of their width.
    ``rng`` defaults to Python's global ``random`` (DataLoader re-seeds it in every worker).
    """
    rng = rng if rng is not None else random  # the module functions use the global generator
    array = np.array(to_rgb(image), dtype=np.uint8)  # (H, W, 3), a writable copy
    width = array.shape[1]
    box = min(BOX_SIZE, width)
    for _ in range(rng.randint(20, 60)):
        y = rng.randint(0, width - box)
        x = rng.randint(0, width - box)
        array[y:y + box, x:x + box, :] = 0
    return Image.fromarray(array)
