"""Fully connected (dense) CRF over pixel labels, as used for IRNet's seed refinement.

Model: Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge
Potentials", NeurIPS 2011 (§2 the energy, §3 mean-field inference, Eq. 3 the two kernels). IRNet
(Ahn et al., CVPR 2019, §4.1 "inter-pixel relation mining") refines its confident seeds with it,
with these settings: 2 labels here (background, foreground), 10 mean-field iterations, a unary
from hard labels with ground-truth probability 0.7, a Gaussian (smoothness) kernel with
``sxy = 3`` and Potts weight 3, and a bilateral (appearance) kernel with ``sxy = 50``,
``srgb = 5`` and Potts weight 10.

Two back-ends compute the same mean-field update

    Q_i(l) ∝ exp(-U_i(l) + Σ_m w_m Σ_j k̃_m(i, j) Q_j(l)),   k̃_m = D_m^-1/2 K_m D_m^-1/2,

(symmetric kernel normalisation with D_m = K_m·1, the default of the reference library):

* ``dense``: the ``pydensecrf`` library (permutohedral-lattice filtering), used when it is
  importable. It is not a requirement of this project: it is published as source only and
  needs a compiler.
* ``approx``: plain PyTorch, labelled ``crf=approx`` wherever results are written. The Gaussian
  kernel is exact (separable convolution truncated at 4 σ). The bilateral kernel is evaluated
  exactly at every target pixel i (its own colour, so label edges stay at colour edges) but
  summed over a strided subset of source pixels j: every ``s``-th pixel in both directions,
  ``s = ceil(sxy / 5)`` (10 px for sxy 50), within a square window of half-width ``2 sxy``
  (100 px), each sample weighted ``s²``. Objects thinner than ``s`` pixels are therefore seen by
  the appearance term only through their own samples, and pixels farther than ``2 sxy`` do not
  interact (their spatial weight is below exp(-2) there).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

BACKENDS = ("auto", "dense", "approx")


def dense_available() -> bool:
    """Whether the ``pydensecrf`` library can be imported."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def resolve_backend(name: str) -> str:
    """``auto`` -> ``dense`` when pydensecrf is importable, else ``approx``. Raises ValueError for
    ``dense`` without the library."""
    if name not in BACKENDS:
        raise ValueError(f"CRF backend {name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "dense" if dense_available() else "approx"
    if name == "dense" and not dense_available():
        raise ValueError("--crf dense needs the pydensecrf package (not importable here); use --crf approx or auto")
    return name


def unary_from_labels(labels: np.ndarray, n_labels: int, gt_prob: float = 0.7) -> np.ndarray:
    """Negative log-probabilities (n_labels, H, W): ``gt_prob`` for the given label, the rest
    shared evenly by the other labels (every label is a real label: none means "unsure")."""
    other = (1.0 - gt_prob) / (n_labels - 1)
    prob = np.full((n_labels,) + labels.shape, other, dtype=np.float32)
    for lab in range(n_labels):
        prob[lab][labels == lab] = gt_prob
    return -np.log(prob)


def _dense_crf(image: np.ndarray, labels: np.ndarray, n_labels: int, iterations: int, gt_prob: float) -> np.ndarray:
    import pydensecrf.densecrf as dcrf

    h, w = labels.shape
    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_labels(labels, n_labels, gt_prob).reshape(n_labels, -1)))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(image.astype(np.uint8)), compat=10)
    q = np.array(d.inference(iterations)).reshape(n_labels, h, w)
    return np.argmax(q, axis=0)


def _gaussian_filter(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian of (B, C, H, W) with zero padding (pixels outside the image do not
    exist, as in the dense CRF), truncated at 4 sigma."""
    r = max(1, int(math.ceil(4 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, r), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(r, 0), groups=c)


class _StridedBilateral:
    """Σ_j k(i, j) v_j for the bilateral kernel, over strided sources j (see the module docstring).

    Sources are the pixels whose row and column are multiples of the step ``s``. A target pixel
    (y, x) lies in source cell (y // s, x // s); the sources it sees are the cells (y // s + a,
    x // s + b) for |a|, |b| <= reach, at a distance (a s - y % s, b s - x % s). A source grid
    repeated s times and zero-padded by ``reach`` cells makes every cell offset one slice.

    ``image``: (3, H, W) float RGB in 0..255. ``apply(v)``: v (C, H, W) -> (C, H, W).
    """

    def __init__(self, image: torch.Tensor, sxy: float, srgb: float) -> None:
        self.h, self.w = image.shape[-2:]
        self.s = max(1, int(math.ceil(sxy / 5)))
        self.reach = int(math.ceil(2 * sxy / self.s))
        self.sxy, self.srgb = sxy, srgb
        self.image = image
        dev, dt = image.device, image.dtype
        self.ry = (torch.arange(self.h, device=dev) % self.s).to(dt)[:, None]
        self.rx = (torch.arange(self.w, device=dev) % self.s).to(dt)[None, :]
        self.cells = [(a, b) for a in range(-self.reach, self.reach + 1) for b in range(-self.reach, self.reach + 1)]
        self.src_img = self._spread(image)
        self.valid = self._spread(torch.ones(1, self.h, self.w, device=dev, dtype=dt))[0]
        # The kernel weights do not depend on v: kept between calls when they fit in ~400 MB.
        self.cache = [self._kernel(a, b) for a, b in self.cells] if len(self.cells) * self.h * self.w <= 1e8 else None

    def _spread(self, x: torch.Tensor) -> torch.Tensor:
        """(C, H, W) -> the sources x[:, ::s, ::s], each repeated over its s×s cell, padded by
        ``reach`` cells of zeros on every side."""
        src = x[:, ::self.s, ::self.s]
        rep = src.repeat_interleave(self.s, 1).repeat_interleave(self.s, 2)
        p = self.reach * self.s
        return F.pad(rep, (p, p, p, p))

    def _cell(self, spread: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """The value of source cell (y // s + a, x // s + b) at every target (y, x): a slice."""
        y0, x0 = (self.reach + a) * self.s, (self.reach + b) * self.s
        return spread[..., y0:y0 + self.h, x0:x0 + self.w]

    def _kernel(self, a: int, b: int) -> torch.Tensor:
        dist2 = (a * self.s - self.ry) ** 2 + (b * self.s - self.rx) ** 2
        diff = ((self.image - self._cell(self.src_img, a, b)) ** 2).sum(0)
        k = torch.exp(-dist2 / (2 * self.sxy**2) - diff / (2 * self.srgb**2))
        return k * self._cell(self.valid, a, b) * float(self.s**2)

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        spread = self._spread(v)
        out = torch.zeros_like(v)
        for n, (a, b) in enumerate(self.cells):
            k = self.cache[n] if self.cache is not None else self._kernel(a, b)
            out.addcmul_(k, self._cell(spread, a, b))
        return out


def _approx_crf(image: np.ndarray, labels: np.ndarray, n_labels: int, iterations: int, gt_prob: float) -> np.ndarray:
    """Mean-field inference with the kernels of the module docstring. ``labels``: (P, H, W) for P
    independent problems on the same image (they share the kernel work)."""
    img = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
    unary = torch.from_numpy(np.stack([unary_from_labels(lab, n_labels, gt_prob) for lab in labels])).float()
    p, _, h, w = unary.shape
    bil = _StridedBilateral(img, sxy=50.0, srgb=5.0)
    ones = torch.ones(1, 1, h, w, dtype=torch.float32)
    # Symmetric normalisation D^-1/2 K D^-1/2 with D = K·1 (computed with the same kernels).
    norm_g = _gaussian_filter(ones, 3.0).clamp_min(1e-20).rsqrt()[0]
    norm_b = bil.apply(ones[0]).clamp_min(1e-20).rsqrt()
    q = torch.softmax(-unary, dim=1)
    for _ in range(iterations):
        flat = q.reshape(p * n_labels, 1, h, w)
        msg_g = (_gaussian_filter(flat * norm_g, 3.0) * norm_g).reshape(p, n_labels, h, w)
        msg_b = (bil.apply(flat[:, 0] * norm_b) * norm_b).reshape(p, n_labels, h, w)
        q = torch.softmax(-unary + 3.0 * msg_g + 10.0 * msg_b, dim=1)
    return q.argmax(1).numpy()


def crf_inference_label(image: np.ndarray, labels: np.ndarray | list[np.ndarray], n_labels: int = 2,
                        iterations: int = 10, gt_prob: float = 0.7, backend: str = "approx") -> np.ndarray:
    """Refine hard label maps with the dense CRF.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: one (H, W) integer map in ``[0, n_labels)`` or a stack (P, H, W) of several maps
            on the same image (refined independently).
        backend: ``dense`` (pydensecrf) or ``approx`` (see the module docstring).
    Returns:
        The refined labels, same shape as ``labels``.
    """
    lab = np.asarray(labels)
    single = lab.ndim == 2
    stack = lab[None] if single else lab
    if image.shape[:2] != stack.shape[1:]:
        raise ValueError(f"image {image.shape[:2]} and label map {stack.shape[1:]} differ in size")
    if backend == "dense":
        out = np.stack([_dense_crf(image, m, n_labels, iterations, gt_prob) for m in stack])
    elif backend == "approx":
        out = _approx_crf(image, stack, n_labels, iterations, gt_prob)
    else:
        raise ValueError(f"CRF backend {backend!r}: expected dense or approx")
    return out[0] if single else out
