"""IRNet: inter-pixel relations from confident seeds, used by TRIS to turn response maps into masks.

Paper: Ahn, Cho, Kwak, "Weakly Supervised Learning of Instance Segmentation with Inter-pixel
Relations", CVPR 2019. TRIS (Liu et al., ICCV 2023) applies it with one foreground class to the
response map PRMS selected for each referring expression.

What this module computes (section numbers are the IRNet paper's):

* ``seed_labels`` — §4.1 inter-pixel relation mining: confident foreground where the map beats a
  constant background score 0.3, confident background where even a background score 0.1 wins, both
  refined by a dense CRF; 255 (ignore) between.
* ``IRNet`` — §3 the network: a frozen ResNet-50 (strides 2, 2, 2, 1; BatchNorm in eval; features
  detached) feeding a class-boundary branch (§3.2; 1×1 conv + GroupNorm + ReLU per level, 32
  channels each, all at stride 4, concatenated 160 → 1×1 conv → 1 boundary logit) and a
  displacement-field branch (§3.1; multi-level heads → 2 channels at stride 4, followed by a
  mean-shift layer that subtracts the mean displacement in eval mode, §4.3 end).
* ``PairIndex`` — §4.2 pixel pairs within a radius (10 at training): the lower half-disc of
  offsets, so every unordered pair is counted once; ``affinity`` = 1 − max boundary probability on
  the straight path between the two pixels (Eq. 5); ``pair_labels`` = positive (same label, bg or
  fg), negative (different labels), ignored when either is 255.
* ``irn_losses`` — Eq. 6 (affinity, −log aff for positives with bg/fg averaged separately and
  halved, −log(1 − aff) for negatives) and Eq. 7–8 (displacement: for fg-positive pairs the
  difference of displacements must equal the pair offset, for bg-positive pairs be zero; L1).
* ``find_centroids`` / ``cluster_centroids`` — §5 instance centroids: every pixel follows the
  displacement field for 300 steps; pixels whose end points fall in the same connected region of
  weak displacement (|d| < 2.5) form one instance.
* ``random_walk`` — §5 (Eq. 9–10): affinities within radius 5 from the boundary map raised to
  β = 10, column-normalised to a transition matrix T; the seeds times (1 − boundary) are
  propagated by T^(2^exp_times), exp_times = 8. Here the power is applied as 2^exp_times sparse
  products (mathematically T squared exp_times times, without the dense N×N matrix); ``dense=True``
  squares the dense matrix as the reference does (small maps only).
* ``instances_from_walk`` — §5 end: upsample ×4, divide by the maximum, a background score 0.25,
  argmax, connected components; components under 1 % of the image score 0 but are kept.

Tensor layout: images (B, 3, H, W) ImageNet-normalised; boundary and displacement outputs at
stride 4, (B, 1, h, w) and (B, 2, h, w) with h = (H − 1) // 4 + 1; displacements in stride-4 pixels,
channel 0 = rows (y), 1 = columns (x).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from scipy import ndimage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE = 255


# --------------------------------------------------------------------------------------------
# Seeds (§4.1)
# --------------------------------------------------------------------------------------------
def seed_labels(cam: np.ndarray, image: np.ndarray, fg_thres: float = 0.3, bg_thres: float = 0.1,
                crf: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Confident seeds of one map.

    Args:
        cam: (H, W) response map (negatives are clipped to 0).
        image: (H, W, 3) uint8 RGB.
        crf: ``crf(image, labels (2, H, W)) -> (2, H, W)`` refining the foreground pass and the
            background pass together, or None for no refinement.
    Returns:
        (H, W) uint8: 1 = confident foreground, 0 = confident background, 255 = ignore.
    """
    cam = np.clip(cam, 0, None)
    # argmax over [constant background score, map]: a tie goes to the background.
    passes = np.stack([cam > fg_thres, cam > bg_thres]).astype(np.int64)
    if crf is not None:
        passes = crf(image, passes)
    fg, bg = passes[0], passes[1]
    out = np.where(fg == 1, 1, IGNORE).astype(np.uint8)
    out[(fg == 0) & (bg == 0)] = 0
    return out


# --------------------------------------------------------------------------------------------
# Network (§3)
# --------------------------------------------------------------------------------------------
def _stride_one_layer4(net: torchvision.models.ResNet) -> torchvision.models.ResNet:
    """Strides [2, 2, 2, 1]: layer4 keeps layer3's resolution (no dilation, as in IRNet)."""
    first = net.layer4[0]
    first.conv2.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    net.fc = nn.Identity()
    return net


def resnet50_backbone(state_dict: dict[str, torch.Tensor] | None = None) -> torchvision.models.ResNet:
    """torchvision ResNet-50 (its parameter names) with strides [2, 2, 2, 1] and no classifier;
    ``state_dict``: torchvision ImageNet weights (``fc.*`` keys are dropped)."""
    net = torchvision.models.resnet50(weights=None)
    if state_dict is not None:
        sd = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(f"not a torchvision ResNet-50 state_dict: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return _stride_one_layer4(net)


def tiny_backbone(seed: int = 0) -> torchvision.models.ResNet:
    """A tiny random ResNet for tests: one Bottleneck per stage, inner width 1/4 of ResNet-50's,
    the same output channels (64, 256, 512, 1024, 2048) so the heads are unchanged; seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torchvision.models.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], width_per_group=16)
    return _stride_one_layer4(net)


def _head(cin: int, cout: int, groups: int, up: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1, bias=False), nn.GroupNorm(groups, cout)]
    if up > 1:
        layers.append(nn.Upsample(scale_factor=up, mode="bilinear", align_corners=False))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class MeanShift(nn.Module):
    """Identity in training; in eval subtracts the stored mean displacement ``running_mean`` (2,)."""

    def __init__(self, num_features: int = 2) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return x
        return x - self.running_mean.view(1, -1, 1, 1)


class IRNet(nn.Module):
    """Boundary + displacement network on a frozen ResNet (parameter names as the reference:
    ``resnet50.*``, ``fc_edge1..6``, ``fc_dp1..7``; the mean is ``fc_dp7.4.running_mean``).

    forward: images (B, 3, H, W) -> boundary logits (B, 1, h, w), displacements (B, 2, h, w).
    """

    def __init__(self, backbone: torchvision.models.ResNet) -> None:
        super().__init__()
        self.resnet50 = backbone
        for p in self.resnet50.parameters():
            p.requires_grad_(False)
        self.fc_edge1 = _head(64, 32, 4)
        self.fc_edge2 = _head(256, 32, 4)
        self.fc_edge3 = _head(512, 32, 4, up=2)
        self.fc_edge4 = _head(1024, 32, 4, up=4)
        self.fc_edge5 = _head(2048, 32, 4, up=4)
        self.fc_edge6 = nn.Conv2d(160, 1, 1, bias=True)
        self.fc_dp1 = _head(64, 64, 8)
        self.fc_dp2 = _head(256, 128, 16)
        self.fc_dp3 = _head(512, 256, 16)
        self.fc_dp4 = _head(1024, 256, 16, up=2)
        self.fc_dp5 = _head(2048, 256, 16, up=2)
        self.fc_dp6 = _head(768, 256, 16, up=2)
        self.fc_dp7 = nn.Sequential(nn.Conv2d(448, 256, 1, bias=False), nn.GroupNorm(16, 256), nn.ReLU(inplace=True),
                                    nn.Conv2d(256, 2, 1, bias=False), MeanShift(2))

    @property
    def mean_shift(self) -> MeanShift:
        return self.fc_dp7[4]

    def train(self, mode: bool = True) -> IRNet:
        super().train(mode)
        self.resnet50.eval()  # frozen BatchNorm statistics
        return self

    def trainable_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(boundary-branch parameters, displacement-branch parameters)."""
        edge = [p for n, p in self.named_parameters() if n.startswith("fc_edge")]
        dp = [p for n, p in self.named_parameters() if n.startswith("fc_dp")]
        return edge, dp

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        r = self.resnet50
        with torch.no_grad():  # the backbone is frozen: its features are constants
            x1 = r.maxpool(r.relu(r.bn1(r.conv1(x))))
            x2 = r.layer1(x1)
            x3 = r.layer2(x2)
            x4 = r.layer3(x3)
            x5 = r.layer4(x4)
        return [x1, x2, x3, x4, x5]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2, x3, x4, x5 = self.features(x)
        e2 = self.fc_edge2(x2)
        h, w = e2.shape[-2:]
        edges = [self.fc_edge1(x1), e2, self.fc_edge3(x3)[..., :h, :w], self.fc_edge4(x4)[..., :h, :w],
                 self.fc_edge5(x5)[..., :h, :w]]
        edge = self.fc_edge6(torch.cat(edges, 1))
        d3 = self.fc_dp3(x3)
        h3, w3 = d3.shape[-2:]
        d35 = torch.cat([d3, self.fc_dp4(x4)[..., :h3, :w3], self.fc_dp5(x5)[..., :h3, :w3]], 1)
        up3 = self.fc_dp6(d35)[..., :h, :w]
        dp = self.fc_dp7(torch.cat([self.fc_dp1(x1), self.fc_dp2(x2), up3], 1))
        return edge, dp


def strided_size(size: tuple[int, int], stride: int = 4) -> tuple[int, int]:
    return (size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1


@torch.no_grad()
def edge_and_displacement(model: IRNet, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference on one normalised image (3, H, W) and its horizontal flip (§5): boundary
    probability (h, w) = sigmoid of the mean of the two logit maps; displacement (2, h, w) of the
    unflipped image, minus the stored mean (eval mode)."""
    model.eval()
    h, w = strided_size(tuple(image.shape[-2:]))
    edge, dp = model(torch.stack([image, image.flip(-1)]))
    edge, dp = edge[..., :h, :w], dp[..., :h, :w]
    return torch.sigmoid(edge[0, 0] / 2 + edge[1, 0].flip(-1) / 2), dp[0]


# --------------------------------------------------------------------------------------------
# Pixel pairs and paths (§4.2)
# --------------------------------------------------------------------------------------------
def search_offsets(radius: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) to the neighbours closer than ``radius``, lower half-disc only: (0, dx)
    for dx > 0 and every (dy > 0, dx) — each unordered pair of pixels once."""
    out = [(0, dx) for dx in range(1, radius)]
    out += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius) if dx * dx + dy * dy < radius**2]
    return out


def path_coords(dy: int, dx: int) -> list[tuple[int, int]]:
    """Pixels of the straight path from (0, 0) to (dy, dx): those of the bounding box closer than
    one pixel to the line through both (end points included)."""
    length_sq = dy * dy + dx * dx
    out = []
    for y in range(min(0, dy), max(0, dy) + 1):
        for x in range(min(0, dx), max(0, dx) + 1):
            if (dy * x - dx * y) ** 2 / length_sq < 1:
                out.append((y, x))
    return out


class PairIndex:
    """Pairs (source, source + offset) on an (h, w) grid for every ``search_offsets(radius)``.

    Sources are the pixels of rows [0, h − r') and columns [r', w − r'), r' = radius − 1, so every
    pair lies inside the grid. Tensors over pairs have shape (n_offsets, n_sources) (a leading
    batch dimension where noted); ``offsets`` (n_offsets, 2) are sorted by path length.
    """

    def __init__(self, radius: int, size: tuple[int, int]) -> None:
        self.radius = radius
        self.size = size
        rf = int(math.ceil(radius)) - 1
        h, w = size
        ch, cw = h - rf, w - 2 * rf
        if ch <= 0 or cw <= 0:
            raise ValueError(f"grid {h}x{w} too small for pair radius {radius} (needs width > {2 * rf})")
        offs = search_offsets(radius)
        paths = [path_coords(dy, dx) for dy, dx in offs]
        order = sorted(range(len(offs)), key=lambda i: len(paths[i]))
        self.offsets = np.array([offs[i] for i in order], dtype=np.int64)
        paths = [paths[i] for i in order]
        grid = np.arange(h * w, dtype=np.int64).reshape(h, w)

        def region(oy: int, ox: int) -> np.ndarray:
            return grid[oy:oy + ch, rf + ox:rf + ox + cw].reshape(-1)

        self.src = torch.from_numpy(region(0, 0))
        self.dst = torch.from_numpy(np.stack([region(dy, dx) for dy, dx in self.offsets]))
        self._ch, self._cw, self._rf = ch, cw, rf
        # Paths grouped by length (one gather per group), as index tensors (n_g, L, n_src).
        self.groups: list[torch.Tensor] = []
        start = 0
        while start < len(paths):
            n = len(paths[start])
            end = start
            while end < len(paths) and len(paths[end]) == n:
                end += 1
            self.groups.append(torch.from_numpy(np.stack([np.stack([region(y, x) for y, x in p]) for p in paths[start:end]])))
            start = end

    @property
    def n_sources(self) -> int:
        return int(self.src.numel())

    def pair_labels(self, label: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h, w) seed labels (0, 1, 255) -> bg-positive, fg-positive, negative pair masks, each
        float (n_offsets, n_sources)."""
        flat = torch.as_tensor(np.asarray(label)).reshape(-1).long()
        a = flat[self.src].unsqueeze(0)
        b = flat[self.dst]
        valid = (a != IGNORE) & (b != IGNORE)
        same = a == b
        bg = (same & valid & (a == 0)).float()
        fg = (same & valid & (a > 0)).float()
        neg = (~same & valid).float()
        return bg, fg, neg

    def affinity(self, edge: torch.Tensor) -> torch.Tensor:
        """Boundary probabilities (B, h, w) or (B, 1, h, w) -> affinities (B, n_offsets, n_sources):
        1 − the largest boundary probability on the pair's path (Eq. 5)."""
        flat = edge.reshape(edge.shape[0], -1)
        out = []
        for idx in self.groups:
            g = flat[:, idx.to(flat.device).reshape(-1)].view(flat.shape[0], *idx.shape)
            out.append(1 - g.amax(dim=2))
        return torch.cat(out, 1)

    def pair_displacement(self, dp: torch.Tensor) -> torch.Tensor:
        """Displacements (B, 2, h, w) -> (B, 2, n_offsets, n_sources): d(source) − d(destination)."""
        flat = dp.reshape(dp.shape[0], dp.shape[1], -1)
        src = flat[:, :, self.src.to(dp.device)].unsqueeze(2)
        dst = flat[:, :, self.dst.to(dp.device).reshape(-1)].view(dp.shape[0], dp.shape[1], *self.dst.shape)
        return src - dst

    def offset_target(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(1, 2, n_offsets, 1): the (dy, dx) a pair of one instance must show as d(src) − d(dst)
        (both displacements point to the same centroid)."""
        return torch.from_numpy(self.offsets.T.astype(np.float32)).view(1, 2, -1, 1).to(device)


def irn_losses(aff: torch.Tensor, pair_disp: torch.Tensor, target: torch.Tensor, bg_pos: torch.Tensor,
               fg_pos: torch.Tensor, neg: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four IRNet terms and their total (Eq. 6–8).

    Args:
        aff: (B, P, S) affinities; pair_disp: (B, 2, P, S); target: (1, 2, P, 1) pair offsets;
        bg_pos, fg_pos, neg: (B, P, S) pair masks.
    Returns:
        ``pos_aff``, ``neg_aff``, ``dp_fg``, ``dp_bg`` and ``total`` =
        (pos_aff + neg_aff) / 2 + (dp_fg + dp_bg) / 2.
    """
    eps = 1e-5
    pos_term = -torch.log(aff + eps)
    neg_term = -torch.log(1.0 + eps - aff)
    bg_pos_aff = (bg_pos * pos_term).sum() / (bg_pos.sum() + eps)
    fg_pos_aff = (fg_pos * pos_term).sum() / (fg_pos.sum() + eps)
    pos_aff = bg_pos_aff / 2 + fg_pos_aff / 2
    neg_aff = (neg * neg_term).sum() / (neg.sum() + eps)
    dp_fg = ((pair_disp - target).abs() * fg_pos.unsqueeze(1)).sum() / (2 * fg_pos.sum() + eps)
    dp_bg = (pair_disp.abs() * bg_pos.unsqueeze(1)).sum() / (2 * bg_pos.sum() + eps)
    total = (pos_aff + neg_aff) / 2 + (dp_fg + dp_bg) / 2
    return {"pos_aff": pos_aff, "neg_aff": neg_aff, "dp_fg": dp_fg, "dp_bg": dp_bg, "total": total}


# --------------------------------------------------------------------------------------------
# Instances (§5)
# --------------------------------------------------------------------------------------------
def find_centroids(dp: np.ndarray, iterations: int = 300) -> np.ndarray:
    """Follow the displacement field (2, h, w) from every pixel, bilinearly sampled, clipped to the
    grid; returns the rounded end points (2, h, w) int (rows, columns)."""
    h, w = dp.shape[1:]
    cy = np.repeat(np.arange(h, dtype=np.float32)[:, None], w, axis=1)
    cx = np.repeat(np.arange(w, dtype=np.float32)[None, :], h, axis=0)
    for _ in range(iterations):
        y0, x0 = np.floor(cy).astype(np.int64), np.floor(cx).astype(np.int64)
        y1, x1 = np.ceil(cy).astype(np.int64), np.ceil(cx).astype(np.int64)
        fy, fx = cy - y0, cx - x0

        # bilinear weights of the four corners, shared by both channels
        w00, w01, w10, w11 = (1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx
        dy, dx = (c[y0, x0] * w00 + c[y0, x1] * w01 + c[y1, x0] * w10 + c[y1, x1] * w11 for c in dp)
        cy = np.clip(cy + dy, 0, h - 1)
        cx = np.clip(cx + dx, 0, w - 1)
    return np.stack([np.round(cy), np.round(cx)]).astype(np.int64)


def cluster_centroids(centroids: np.ndarray, dp: np.ndarray, thres: float = 2.5) -> np.ndarray:
    """Instance id (h, w) in 0..K−1 per pixel: pixels whose end points fall in the same
    4-connected region of weak displacement (|d| < thres) share an id; those ending outside every
    such region share one more id."""
    weak = np.hypot(dp[0], dp[1]) < thres
    regions, _ = ndimage.label(weak)
    ids = regions[centroids[0], centroids[1]]
    _, inv = np.unique(ids, return_inverse=True)
    return inv.reshape(ids.shape)


def _neighbour_affinities(edge: torch.Tensor, radius: int) -> list[tuple[int, int, torch.Tensor]]:
    """For each half-disc offset (dy, dx): (h, w) affinity between (y, x) and (y + dy, x + dx),
    1 − max boundary on the path; 0 where the neighbour is outside the grid."""
    h, w = edge.shape
    pad = radius
    big = F.pad(edge[None, None], (pad, pad, pad, pad), value=1.0)[0, 0]
    out = []
    for dy, dx in search_offsets(radius):
        m = None
        for y, x in path_coords(dy, dx):
            s = big[pad + y:pad + y + h, pad + x:pad + x + w]
            m = s if m is None else torch.maximum(m, s)
        out.append((dy, dx, 1 - m))
    return out


def transition_matrix(edge: torch.Tensor, radius: int = 5, beta: float = 10.0, dense: bool = False) -> torch.Tensor:
    """Column-normalised transition matrix T (N, N), N = h·w, from affinities within ``radius``
    (symmetric, self-affinity 1) raised to ``beta``: sparse (COO) Tᵀ, or dense T when ``dense``."""
    h, w = edge.shape
    n = h * w
    grid = torch.arange(n, device=edge.device).view(h, w)
    rows, cols, vals = [grid.reshape(-1)], [grid.reshape(-1)], [torch.ones(n, device=edge.device, dtype=edge.dtype)]
    for dy, dx, a in _neighbour_affinities(edge, radius):
        ys, ye = 0, h - dy
        xs, xe = max(0, -dx), min(w, w - dx)
        src = grid[ys:ye, xs:xe].reshape(-1)
        dst = grid[ys + dy:ye + dy, xs + dx:xe + dx].reshape(-1)
        v = a[ys:ye, xs:xe].reshape(-1)
        rows += [src, dst]
        cols += [dst, src]
        vals += [v, v]
    r, c, v = torch.cat(rows), torch.cat(cols), torch.cat(vals) ** beta
    colsum = torch.zeros(n, dtype=v.dtype, device=v.device).index_add_(0, c, v)
    v = v / colsum[c]
    if dense:
        t = torch.zeros(n, n, dtype=v.dtype, device=v.device)
        t[r, c] = v
        return t
    # Tᵀ, so that y·T = (Tᵀ yᵀ)ᵀ is one sparse product.
    return torch.sparse_coo_tensor(torch.stack([c, r]), v, (n, n), check_invariants=False).coalesce()


def random_walk(seeds: torch.Tensor, edge: torch.Tensor, radius: int = 5, beta: float = 10.0, exp_times: int = 8,
                dense: bool = False) -> torch.Tensor:
    """Propagate seeds (K, h, w) by T^(2^exp_times) after multiplying them by (1 − boundary)."""
    k, h, w = seeds.shape
    x = (seeds * (1 - edge)).reshape(k, h * w)
    t = transition_matrix(edge, radius, beta, dense=dense)
    if dense:
        for _ in range(exp_times):
            t = t @ t
        return (x @ t).view(k, h, w)
    y = x.t().contiguous()
    for _ in range(2**exp_times):
        y = t @ y
    return y.t().reshape(k, h, w)


def instances_from_walk(rw: torch.Tensor, size: tuple[int, int], bg_thres: float = 0.25,
                        min_fraction: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Instance masks from propagated scores (K, h, w) at stride 4.

    Upsample ×4 (bilinear), crop to ``size`` (H, W), divide by the maximum, prepend the background
    score, argmax; every instance splits into its 4-connected components. A component under
    ``min_fraction`` of the image scores 0 but is kept.
    Returns:
        masks (M, H, W) bool, scores (M,) float32 (M = 0 when nothing beats the background).
    """
    H, W = size
    up = F.interpolate(rw[None].float(), scale_factor=4, mode="bilinear", align_corners=False)[0, :, :H, :W]
    peak = float(up.max()) if up.numel() else 0.0
    if not peak > 0:
        return np.zeros((0, H, W), bool), np.zeros(0, np.float32)
    up = (up / peak).cpu().numpy()
    arg = np.argmax(np.concatenate([np.full((1, H, W), bg_thres, up.dtype), up]), axis=0)
    masks, scores = [], []
    for k in range(up.shape[0]):
        comps, n = ndimage.label(arg == k + 1)
        for c in range(1, n + 1):
            m = comps == c
            masks.append(m)
            scores.append(0.0 if m.sum() < min_fraction * H * W else float(up[k][m].max()))
    if not masks:
        return np.zeros((0, H, W), bool), np.zeros(0, np.float32)
    return np.stack(masks), np.asarray(scores, np.float32)
