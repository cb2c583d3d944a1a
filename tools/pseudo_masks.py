"""TRIS step 3: pseudo masks from the PRMS response maps, with IRNet or a labelled reduced variant.

    python -m tools.pseudo_masks --prms PRMS_DIR --out OUT_DIR [--method irnet|threshold|threshold+crf]
        [--irn_backbone resnet50.pth | --tiny] [--crf auto|dense|approx] [--device cpu] ...

Input: ``PRMS_DIR/index.jsonl``, one record per ref ``{"index", "ref_id", "image_id", "image" (absolute
path), "map" (.npy relative to PRMS_DIR: float32 (H, W) in [0, 1] at the image's resolution), "size":
[H, W]}``.

``--method irnet`` runs IRNet's three passes (Ahn et al., CVPR 2019; lib/irnet.py):

1. seeds: confident fg / bg / ignore labels per map, refined by the dense CRF (§4.1) ->
   ``OUT/irn/seeds/<ref_id>.png``;
2. training of the boundary and displacement branches on a frozen ResNet-50 (§3, §4.2): SGD, lr 0.1
   (boundary) / 1.0 (displacement), poly decay (power 0.9) over (N // batch) · epochs steps, weight
   decay 1e-4 (the reference hands its weight decay to SGD's momentum slot too: momentum 1e-4 here
   as well), random rescale 0.5–1.5, flip, random crop 512, labels at stride 4; afterwards the mean
   displacement over the training images (top-left crops) goes into the mean-shift buffer ->
   ``OUT/irn/res50_irn.safetensors``;
3. instances (§5): boundary and displacement of the image and its flip, centroid clustering, the
   map split by instance, random walk, background score 0.25, connected components; the pseudo mask
   is the union of every component (what TRIS's stage 2 trains on) -> ``OUT/masks/<ref_id>.png``.

``--method threshold`` (reduced variant, no IRNet): foreground = map > --conf_fg_thres (the rule of
IRNet's foreground seeds); the band between --conf_bg_thres and --conf_fg_thres, an "ignore" band in
the seeds, counts as background in the binary mask (``OUT/seeds/`` keeps the three-valued seeds).
``--method threshold+crf``: the CRF-refined foreground seeds. Both are labelled as reduced variants in
every output.

Outputs: ``masks/<ref_id>.png`` (mode L, 0/1, original size), ``index.jsonl`` ({"ref_id", "mask",
"method"}), ``config.json`` and, written last, ``summary.json`` (counts, labels, timings) — its presence
marks a finished run. Every pass resumes: existing seeds and masks are skipped, and training is
skipped when its weights file exists (written atomically, so it is complete).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

import args as args_lib  # noqa: E402
import utils  # noqa: E402
from engine import UserError  # noqa: E402
from lib import crf as crf_lib  # noqa: E402
from lib import irnet as irn  # noqa: E402

TINY = {"irn_crop_size": 128, "irn_batch_size": 4, "irn_num_epoches": 8}
WEIGHTS = "res50_irn.safetensors"
PAIR_RADIUS = 10  # §4.2: pairs for training
WALK_RADIUS = 5  # §5: affinities of the random walk


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _write_png(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(arr.astype(np.uint8), mode="L").save(tmp)
    os.replace(tmp, path)


def _read_prms(prms: Path) -> list[dict[str, Any]]:
    index = prms / "index.jsonl"
    if not index.is_file():
        raise UserError(f"--prms {prms}: no index.jsonl there (expected a PRMS folder)")
    records, seen = [], set()
    for n, line in enumerate(index.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{index}:{n}: not JSON ({e.msg})") from None
        for key in ("ref_id", "image", "map", "size"):
            if key not in r:
                raise UserError(f"{index}:{n}: record has no {key!r}")
        if r["ref_id"] in seen:
            raise UserError(f"{index}:{n}: ref_id {r['ref_id']} appears twice")
        seen.add(r["ref_id"])
        if not (prms / r["map"]).is_file():
            raise UserError(f"{index}:{n}: map {prms / r['map']} not found")
        if not Path(r["image"]).is_file():
            raise UserError(f"{index}:{n}: image {r['image']} not found")
        records.append(r)
    if not records:
        raise UserError(f"{index}: no records")
    return records


def _load_pair(prms: Path, r: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image and (H, W) float32 map of one record, checked against each other."""
    image = np.asarray(Image.open(r["image"]).convert("RGB"))
    cam = np.load(prms / r["map"], allow_pickle=False)
    if cam.ndim != 2:
        raise UserError(f"{prms / r['map']}: map of shape {cam.shape}, expected (H, W)")
    if cam.shape != image.shape[:2] or list(cam.shape) != list(r["size"]):
        raise UserError(f"{prms / r['map']}: map {cam.shape}, image {image.shape[:2]}, size {r['size']} differ")
    return image, cam.astype(np.float32)


def _normalise(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) float32 with ImageNet statistics."""
    return ((image.astype(np.float32) / 255.0 - np.asarray(irn.IMAGENET_MEAN, np.float32))
            / np.asarray(irn.IMAGENET_STD, np.float32))


def _progress(it: Any, enabled: bool, **kw: Any) -> Any:
    return utils.progress(it, enabled=enabled, **kw)


# --------------------------------------------------------------------------------------------
# Pass 1: seeds
# --------------------------------------------------------------------------------------------
def seeds_pass(prms: Path, records: list[dict[str, Any]], seed_dir: Path, fg: float, bg: float,
               crf_backend: str | None, progress: bool) -> dict[str, int]:
    seed_dir.mkdir(parents=True, exist_ok=True)
    crf: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    if crf_backend is not None:
        def crf(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
            return crf_lib.crf_inference_label(image, labels, n_labels=2, backend=crf_backend)
    made = skipped = 0
    for r in _progress(records, progress, desc="seeds"):
        out = seed_dir / f"{r['ref_id']}.png"
        if out.is_file():
            skipped += 1
            continue
        image, cam = _load_pair(prms, r)
        _write_png(out, irn.seed_labels(cam, image, fg, bg, crf))
        made += 1
    return {"made": made, "skipped": skipped}


# --------------------------------------------------------------------------------------------
# Pass 2: IRNet training
# --------------------------------------------------------------------------------------------
class AffinityDataset(torch.utils.data.Dataset):
    """Training crops: image (3, C, C) normalised, bg/fg/neg pair masks (bool, (P, S) each) of the
    seeds at stride 4. Augmentation (§4.2 / the reference recipe) is drawn from a generator seeded by
    (seed, epoch, item), so it does not depend on the number of workers."""

    def __init__(self, records: list[dict[str, Any]], seed_dir: Path, crop: int, seed: int) -> None:
        self.records, self.seed_dir, self.crop, self.seed = records, seed_dir, crop, seed
        self.pairs = irn.PairIndex(PAIR_RADIUS, (crop // 4, crop // 4))
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = self.records[i]
        rng = np.random.default_rng((self.seed, self.epoch, i))
        image = Image.open(r["image"]).convert("RGB")
        label = Image.open(self.seed_dir / f"{r['ref_id']}.png")
        s = rng.uniform(0.5, 1.5)
        size = (max(1, round(image.width * s)), max(1, round(image.height * s)))
        img = _normalise(np.asarray(image.resize(size, Image.BICUBIC)))
        lab = np.asarray(label.resize(size, Image.NEAREST))
        if rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        c = self.crop
        h, w = lab.shape
        top = rng.integers(0, h - c + 1) if h > c else 0
        left = rng.integers(0, w - c + 1) if w > c else 0
        ctop = rng.integers(0, c - h + 1) if h < c else 0
        cleft = rng.integers(0, c - w + 1) if w < c else 0
        ch, cw = min(c, h), min(c, w)
        img_c = np.zeros((c, c, 3), np.float32)
        lab_c = np.full((c, c), irn.IGNORE, np.uint8)
        img_c[ctop:ctop + ch, cleft:cleft + cw] = img[top:top + ch, left:left + cw]
        lab_c[ctop:ctop + ch, cleft:cleft + cw] = lab[top:top + ch, left:left + cw]
        bg, fg, neg = self.pairs.pair_labels(lab_c[::4, ::4])
        return {"img": torch.from_numpy(img_c.transpose(2, 0, 1).copy()), "bg": bg.bool(), "fg": fg.bool(),
                "neg": neg.bool()}


def _top_left_crop(image: np.ndarray, crop: int) -> np.ndarray:
    out = np.zeros((crop, crop, 3), np.float32)
    h, w = min(crop, image.shape[0]), min(crop, image.shape[1])
    out[:h, :w] = image[:h, :w]
    return out


def build_backbone(args: Any) -> tuple[torch.nn.Module, str]:
    if args.tiny:
        return irn.tiny_backbone(args.seed), "tiny random ResNet (Bottleneck [1,1,1,1], width/4)"
    path = Path(args.irn_backbone)
    if not path.is_file():
        raise UserError(f"--irn_backbone {path}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            from lib.checkpoint import safe_torch_load

            sd = safe_torch_load(path)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        return irn.resnet50_backbone(sd), f"torchvision ResNet-50 from {path.name}"
    except Exception as e:  # noqa: BLE001 - any failure is a bad --irn_backbone file
        raise UserError(f"--irn_backbone {path}: {str(e).splitlines()[0]}") from None


def train_pass(records: list[dict[str, Any]], seed_dir: Path, irn_dir: Path, args: Any, device: torch.device,
               backbone_label: str, progress: bool) -> dict[str, Any]:
    from safetensors.torch import load_file, save_file

    weights = irn_dir / WEIGHTS
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("backbone") != backbone_label:
            raise UserError(f"{weights} was trained with backbone {meta.get('backbone')!r}, not {backbone_label!r}: "
                            "use another --out or delete that file")
        return {"trained": False, "weights": str(weights)}
    backbone, _ = build_backbone(args)
    model = irn.IRNet(backbone).to(device)
    data = AffinityDataset(records, seed_dir, args.irn_crop_size, args.seed)
    batch = min(args.irn_batch_size, len(data))
    max_step = (len(data) // batch) * args.irn_num_epoches
    edge_p, dp_p = model.trainable_parameters()
    lr, wd = args.irn_learning_rate, args.irn_weight_decay
    # The reference's SGD gets its weight decay positionally as momentum (momentum = wd).
    opt = torch.optim.SGD([{"params": edge_p, "lr": lr}, {"params": dp_p, "lr": 10 * lr}], lr=lr, momentum=wd,
                          weight_decay=wd)
    base = [g["lr"] for g in opt.param_groups]
    target = data.pairs.offset_target(device)
    gen = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=args.workers, generator=gen)
    log = (irn_dir / "train_log.jsonl").open("w")
    model.train()
    step = 0
    bar = _progress(range(max_step), progress, desc="irn train")
    bar_it = iter(bar)
    for epoch in range(args.irn_num_epoches):
        data.epoch = epoch
        for b in loader:
            mult = (1 - step / max_step) ** 0.9
            for g, b0 in zip(opt.param_groups, base):
                g["lr"] = b0 * mult
            img = b["img"].to(device)
            edge, dp = model(img)
            aff = data.pairs.affinity(torch.sigmoid(edge))
            losses = irn.irn_losses(aff, data.pairs.pair_displacement(dp), target, b["bg"].to(device).float(),
                                    b["fg"].to(device).float(), b["neg"].to(device).float())
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            opt.step()
            log.write(json.dumps({"step": step, "epoch": epoch, "lr": opt.param_groups[0]["lr"],
                                  **{k: round(float(v.detach()), 6) for k, v in losses.items()}}) + "\n")
            step += 1
            next(bar_it, None)
    log.close()
    # Mean displacement over the training images (top-left crops) -> the mean-shift buffer.
    model.eval()
    means = []
    with torch.no_grad():
        for start in range(0, len(records), batch):
            imgs = [_top_left_crop(_normalise(np.asarray(Image.open(r["image"]).convert("RGB"))), args.irn_crop_size)
                    for r in records[start:start + batch]]
            x = torch.from_numpy(np.stack(imgs).transpose(0, 3, 1, 2).copy()).to(device)
            means.append(model(x)[1].mean(dim=(0, 2, 3)).cpu())
    model.mean_shift.running_mean.copy_(torch.stack(means).mean(0).to(device))
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = irn_dir / (WEIGHTS + ".tmp")
    save_file(sd, str(tmp), metadata={"backbone": backbone_label, "steps": str(step)})
    load_file(str(tmp))  # read back before it becomes the completion marker
    os.replace(tmp, weights)
    return {"trained": True, "steps": step, "batch": batch, "weights": str(weights)}


# --------------------------------------------------------------------------------------------
# Pass 3: instance masks
# --------------------------------------------------------------------------------------------
def _load_irnet(irn_dir: Path, args: Any, device: torch.device) -> irn.IRNet:
    from safetensors.torch import load_file

    backbone = irn.tiny_backbone(args.seed) if args.tiny else irn.resnet50_backbone()
    model = irn.IRNet(backbone)
    model.load_state_dict(load_file(str(irn_dir / WEIGHTS)))
    return model.to(device).eval()


def irnet_mask(model: irn.IRNet, image: np.ndarray, cam: np.ndarray, args: Any,
               device: torch.device) -> tuple[np.ndarray, int]:
    """Union of the IRNet instance components of one map (H, W) bool, and the component count."""
    x = torch.from_numpy(_normalise(image).transpose(2, 0, 1).copy()).to(device)
    edge, dp = irn.edge_and_displacement(model, x)
    dp_np = dp.cpu().numpy()
    inst = irn.cluster_centroids(irn.find_centroids(dp_np), dp_np)
    h, w = inst.shape
    onehot = torch.from_numpy(np.eye(inst.max() + 1, dtype=np.float32)[inst].transpose(2, 0, 1).copy()).to(device)
    cam_t = F.interpolate(torch.from_numpy(cam)[None, None].to(device), size=(h, w), mode="bilinear",
                          align_corners=True)[0]
    rw = irn.random_walk(cam_t * onehot, edge, radius=WALK_RADIUS, beta=args.beta, exp_times=args.exp_times)
    masks, _ = irn.instances_from_walk(rw, image.shape[:2], bg_thres=args.ins_seg_bg_thres)
    union = masks.any(0) if len(masks) else np.zeros(image.shape[:2], bool)
    return union, int(len(masks))


def masks_pass(prms: Path, records: list[dict[str, Any]], out: Path, make: Callable[[dict[str, Any]], np.ndarray],
               progress: bool, desc: str) -> dict[str, Any]:
    mask_dir = out / "masks"
    mask_dir.mkdir(parents=True, exist_ok=True)
    made = skipped = empty = 0
    for r in _progress(records, progress, desc=desc):
        path = mask_dir / f"{r['ref_id']}.png"
        if path.is_file():
            skipped += 1
            continue
        m = make(r)
        empty += int(not m.any())
        _write_png(path, m.astype(np.uint8))
        made += 1
    return {"made": made, "skipped": skipped, "empty_made": empty}


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def _config(args: Any, method_label: str, crf_label: str) -> dict[str, Any]:
    keys = ["method", "conf_fg_thres", "conf_bg_thres", "seed"]
    if args.method == "irnet":
        keys += ["irn_crop_size", "irn_batch_size", "irn_num_epoches", "irn_learning_rate", "irn_weight_decay",
                 "beta", "exp_times", "ins_seg_bg_thres", "tiny", "irn_backbone"]
    cfg = {k: getattr(args, k) for k in keys}
    if args.method == "irnet":
        cfg.update(pair_radius=PAIR_RADIUS, walk_radius=WALK_RADIUS, centroid_iterations=300, weak_displacement=2.5,
                   min_component_fraction=0.01)
    cfg.update(method_label=method_label, crf=crf_label, prms=str(Path(args.prms).resolve()))
    return cfg


def run(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (without the program name); raises UserError on bad input."""
    args = args_lib.pseudo_masks_parser().parse_args(argv)
    t_start = time.time()
    prms, out = Path(args.prms), Path(args.out)
    if not prms.is_dir():
        raise UserError(f"--prms {prms}: not a folder")
    if args.method == "irnet" and not args.tiny and not args.irn_backbone:
        raise UserError("--method irnet needs --irn_backbone (a torchvision ResNet-50 ImageNet state_dict), "
                        "or --tiny for a test run with a random backbone")
    if args.tiny:
        for k, v in TINY.items():
            setattr(args, k, v)
    if args.method == "irnet" and args.irn_crop_size // 4 <= 2 * (PAIR_RADIUS - 1):
        raise UserError(f"--irn_crop_size {args.irn_crop_size}: must be at least {4 * (2 * PAIR_RADIUS - 1)}")
    records = _read_prms(prms)
    try:
        crf_backend = None if args.method == "threshold" else crf_lib.resolve_backend(args.crf)
    except ValueError as e:
        raise UserError(str(e)) from None
    crf_label = "none" if crf_backend is None else f"crf={crf_backend}"
    if args.method == "irnet":
        method_label = "irnet (tiny random backbone)" if args.tiny else "irnet"
    else:
        method_label = f"{args.method} (reduced variant, no IRNet)"
    device = utils.resolve_device(args.device)
    torch.manual_seed(args.seed)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _config(args, method_label, crf_label)
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        old = json.loads(cfg_path.read_text())
        if old != json.loads(json.dumps(cfg)):
            diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
            raise UserError(f"--out {out} holds a run with another configuration ({', '.join(diff)}): use another --out")
    _write_json(cfg_path, cfg)
    progress = not args.no_progress
    print(f"pseudo masks: {len(records)} refs, method {method_label}, {crf_label}, device {device}")
    timings: dict[str, float] = {}
    counts: dict[str, Any] = {"refs": len(records)}

    t = time.time()
    seed_dir = out / ("irn/seeds" if args.method == "irnet" else "seeds")
    counts["seeds"] = seeds_pass(prms, records, seed_dir, args.conf_fg_thres, args.conf_bg_thres, crf_backend, progress)
    timings["seeds_s"] = round(time.time() - t, 3)
    print(f"seeds: {counts['seeds']['made']} made, {counts['seeds']['skipped']} already there ({crf_label}) "
          f"in {timings['seeds_s']:.1f}s")

    if args.method == "irnet":
        irn_dir = out / "irn"
        t = time.time()
        label = ("tiny random ResNet (Bottleneck [1,1,1,1], width/4)" if args.tiny
                 else f"torchvision ResNet-50 from {Path(args.irn_backbone).name}")
        counts["irn_training"] = train_pass(records, seed_dir, irn_dir, args, device, label, progress)
        timings["irn_training_s"] = round(time.time() - t, 3)
        tr = counts["irn_training"]
        print(f"irn training: {'%d steps' % tr['steps'] if tr['trained'] else 'skipped (weights exist)'} "
              f"in {timings['irn_training_s']:.1f}s")
        model = _load_irnet(irn_dir, args, device)
        n_comp: list[int] = []

        def make(r: dict[str, Any]) -> np.ndarray:
            image, cam = _load_pair(prms, r)
            m, k = irnet_mask(model, image, cam, args, device)
            n_comp.append(k)
            return m
    else:
        def make(r: dict[str, Any]) -> np.ndarray:
            return np.asarray(Image.open(seed_dir / f"{r['ref_id']}.png")) == 1

    t = time.time()
    counts["masks"] = masks_pass(prms, records, out, make, progress, desc="masks")
    if args.method == "irnet":
        counts["masks"]["components_made"] = int(sum(n_comp))
    timings["masks_s"] = round(time.time() - t, 3)
    print(f"masks: {counts['masks']['made']} made ({counts['masks']['empty_made']} empty), "
          f"{counts['masks']['skipped']} already there in {timings['masks_s']:.1f}s")

    lines = [json.dumps({"ref_id": r["ref_id"], "mask": f"masks/{r['ref_id']}.png", "method": method_label})
             for r in records]
    tmp = out / "index.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "index.jsonl")
    fg = [float(np.asarray(Image.open(out / "masks" / f"{r['ref_id']}.png")).mean()) for r in records]
    timings["total_s"] = round(time.time() - t_start, 3)
    _write_json(out / "summary.json", {"method": method_label, "crf": crf_label, "counts": counts,
                                       "mean_foreground_fraction": round(float(np.mean(fg)), 6),
                                       "timings": timings, "device": str(device)})
    print(f"pseudo masks: done, {len(records)} masks in {out} ({method_label}, {crf_label}) "
          f"in {timings['total_s']:.1f}s")
    return 0


def evaluate_against(pseudo_dir: str | os.PathLike, gt: Callable[[int], np.ndarray]) -> dict[str, float]:
    """mIoU / oIoU of the pseudo masks against ground truth given per ref_id (a diagnostic: the
    ground truth never enters mask generation). IoU of a ref is 0 when both masks are empty."""
    pseudo_dir = Path(pseudo_dir)
    inter = union = 0
    ious = []
    for line in (pseudo_dir / "index.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        pred = np.asarray(Image.open(pseudo_dir / r["mask"])) > 0
        g = np.asarray(gt(r["ref_id"])) > 0
        if pred.shape != g.shape:
            raise ValueError(f"ref {r['ref_id']}: pseudo mask {pred.shape} vs ground truth {g.shape}")
        i, u = int((pred & g).sum()), int((pred | g).sum())
        inter, union = inter + i, union + u
        ious.append(i / u if u > 0 else 0.0)
    return {"mIoU": float(np.mean(ious)) if ious else math.nan, "oIoU": inter / union if union else 0.0,
            "n": len(ious)}


def main() -> int:
    return run(sys.argv[1:])


if __name__ == "__main__":
    import engine

    engine.cli_main(main)
