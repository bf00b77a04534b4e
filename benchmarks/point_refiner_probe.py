"""Probe of issue 17: how much a full-resolution point refiner adds to a model's masks (not part of the product).

The shipped model draws its masks at stride 4 of its input and upsamples them bilinearly. Here a small MLP
(PointRend-style) corrects the upsampled logit of every uncertain pixel (``|logit| < T``) from what lies at
that pixel at the image's own resolution: the coarse logit and a patch of its neighbours, two RGB patches
(5 x 5 at steps of 1 and 3 pixels), the stride-4 high-resolution features of the image encoder, and the colours
inside and outside the coarse mask around it (9- and 25-pixel windows). Its last layer starts at zero, so it
starts as the identity; the model stays frozen. Results and commands: MODELS.md, "A point refiner".

    python benchmarks/point_refiner_probe.py oracle --sets davis2016_val           # error near the mask's edge
    python benchmarks/point_refiner_probe.py train runs/refiner.pt --minutes 25 --box-fraction 0.3
    python benchmarks/point_refiner_probe.py eval runs/refiner.pt -- --sets davis2016_val --max-clicks 20
    python benchmarks/point_refiner_probe.py speed runs/refiner.pt                 # one mask of a 1024-px image

``--grid-stats`` (train, eval and speed alike) takes the window means on the mask grid instead: the fast variant.

``eval`` runs ``eval_default.py`` (arguments after ``--``) with every mask the predictor returns refined.

The product has its own refiner since (``SamConfig.point_refiner``, ``segany train-refiner``), and the shipped
model holds one: to rerun this probe as it ran, give ``--model`` the weights before it
(``git show cb409c6:src/segany/weights/segany_default.safetensors``).
"""

from __future__ import annotations

import argparse
import random
import runpy
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_default import DATA, held_out_objects  # noqa: E402

from segany import SamPredictor, load_model  # noqa: E402
from segany.evaluation.metrics import mask_iou  # noqa: E402
from segany.evaluation.protocols import _select_objects, click_object, load_samples  # noqa: E402
from segany.training.refiner_train import ClickRecorder, fit_points, prompted_mask  # noqa: E402

PATCH = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
WINDOWS = (9, 25)
HIGH_RES = 16  # channels of the shipped model's projected stride-4 map
IN = 1 + 3 * len(PATCH) * 2 + len(PATCH) + HIGH_RES + 8 * len(WINDOWS)
MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
TRAIN = [("coco_instances_mini", "train", 3.0), ("coco_panoptic200", "train2017", 1.0), ("ccp_clothing", "train", 1.0),
         ("bsds500", "train", 0.5), ("bsds500", "val", 0.3), ("davis2016_val", "davis_train", 2.0)]


class PointRefiner(nn.Module):
    """Point features ``N x IN`` and coarse logits ``N`` -> refined logits ``N``."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(IN, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, feats: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
        return logit + self.mlp(feats).squeeze(-1)


def padded_image(rgb: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` uint8 -> normalised ``3 x (H + 12) x (W + 12)`` (edge-replicated)."""
    x = (torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() - MEAN) / STD
    return F.pad(x[None], (6, 6, 6, 6), mode="replicate")[0]


def grid_image(predictor: SamPredictor, rgb: np.ndarray) -> torch.Tensor:
    """The normalised image as the model sees it (resized, padded to ``image_size``), averaged onto the mask
    grid (stride 4): ``3 x g x g``."""
    x = padded_image(rgb)[:, 6:-6, 6:-6]
    h, w = predictor.input_size
    x = F.interpolate(x[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    size = predictor.model.image_size
    return F.avg_pool2d(F.pad(x, (0, size - w, 0, size - h)), 4)[0]


def _box_mean(t: torch.Tensor, w: int) -> torch.Tensor:
    """Mean over a ``w x w`` window of each channel of ``C x H x W`` (an integral image: O(1) a pixel)."""
    t = F.pad(t[None], (w // 2,) * 4, mode="replicate")[0]
    c = F.pad(t.cumsum(1).cumsum(2), (1, 0, 1, 0))
    return (c[:, w:, w:] - c[:, :-w, w:] - c[:, w:, :-w] + c[:, :-w, :-w]) / (w * w)


def _contrast(pix: torch.Tensor, stats: torch.Tensor) -> list[torch.Tensor]:
    """A pixel's colour ``N x 3`` against the window means ``N x 8`` (colour x p, p, colour x (1 - p), 1 - p):
    its differences from the mean colours inside and outside the mask, and their squared norms."""
    d_in = pix - stats[:, 0:3] / stats[:, 3:4].clamp_min(1e-3)
    d_out = pix - stats[:, 4:7] / stats[:, 7:8].clamp_min(1e-3)
    return [d_in, d_out, (d_in**2).sum(1, keepdim=True), (d_out**2).sum(1, keepdim=True)]


def point_features(
    img_p, logits, high_res, ys, xs, image_size: int, scale: float, grid_stats: tuple | None = None
) -> torch.Tensor:
    """Features ``N x IN`` of the pixels ``(ys, xs)`` of one mask's logits ``H x W``; ``img_p`` from
    :func:`padded_image`, ``high_res`` ``1 x C x g x g`` over the model's padded input of ``image_size``,
    ``scale`` the input's pixels per image pixel. With ``grid_stats`` (the image averaged onto the mask grid
    ``3 x g x g`` and the mask's low-res logits ``g x g``) the window means are taken on that grid (windows of
    3 and 7 cells) and sampled at the pixels, instead of at the image's own resolution."""
    lp = F.pad(logits[None, None], (4, 4, 4, 4), mode="replicate")[0, 0]
    parts = [(logits[ys, xs] / 8.0)[:, None]]
    for step in (1, 3):
        patch = torch.stack([img_p[:, ys + 6 + step * dy, xs + 6 + step * dx] for dy, dx in PATCH], 2)
        parts.append(patch.permute(1, 0, 2).reshape(len(ys), -1))  # N x (3 channels x 25 offsets)
    parts.append(torch.stack([lp[ys + 4 + 2 * dy, xs + 4 + 2 * dx] for dy, dx in PATCH], 1) / 8.0)
    grid = torch.stack([(xs.float() + 0.5) * scale, (ys.float() + 0.5) * scale], 1) / image_size * 2 - 1
    parts.append(F.grid_sample(high_res, grid[None, None], mode="bilinear", align_corners=False)[0, :, 0].T)
    img, pix = img_p[:, 6:-6, 6:-6], img_p[:, ys + 6, xs + 6].T
    if grid_stats is not None:
        small, low = grid_stats
        prob = torch.sigmoid(low)
        stack = torch.cat([small * prob, prob[None], small * (1 - prob), (1 - prob)[None]])
        for w in (3, 7):
            st = F.grid_sample(_box_mean(stack, w)[None], grid[None, None], mode="bilinear", align_corners=False)
            parts += _contrast(pix, st[0, :, 0].T)
        return torch.cat(parts, 1)
    prob = torch.sigmoid(logits)
    for w in WINDOWS:
        stack = torch.cat([img * prob, prob[None], img * (1 - prob), (1 - prob)[None]])
        parts += _contrast(pix, _box_mean(stack, w)[:, ys, xs].T)
    return torch.cat(parts, 1)


def uncertain(logits: torch.Tensor, threshold: float, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels with ``|logit| < threshold``, at most ``budget`` of them (the most uncertain; 0: all)."""
    ys, xs = torch.nonzero(logits.abs() < threshold, as_tuple=True)
    if budget and len(ys) > budget:
        keep = torch.topk(-logits[ys, xs].abs(), budget).indices
        ys, xs = ys[keep], xs[keep]
    return ys, xs


def refine(
    refiner: PointRefiner, predictor: SamPredictor, img_p, logits, threshold: float, budget: int, low_res=None
) -> torch.Tensor:
    """``C x H x W`` logits at the image's size -> the same with their uncertain pixels refined."""
    high_res = predictor.decoder_inputs["high_res_features"][0].float()
    scale = predictor.input_size[0] / logits.shape[-2]
    out = logits.clone()
    for c in range(logits.shape[0]):
        ys, xs = uncertain(logits[c], threshold, budget)
        if len(ys):
            gs = (predictor._refiner_small, low_res[c]) if low_res is not None else None
            f = point_features(img_p, logits[c], high_res, ys, xs, predictor.model.image_size, scale, gs)
            out[c, ys, xs] = refiner(f, logits[c, ys, xs])
    return out


def patch_predictor(refiner: PointRefiner, threshold: float, budget: int, grid: bool = False) -> None:
    """Make every :class:`SamPredictor` in this process refine the masks it returns."""
    set_image, predict = SamPredictor.set_image, SamPredictor.predict

    def set_image_refined(self, image, image_format="RGB"):
        set_image(self, image, image_format)
        rgb = image if image_format == "RGB" else image[..., ::-1]
        self._refiner_image = padded_image(rgb)
        self._refiner_small = grid_image(self, rgb) if grid else None

    def predict_refined(self, *args, return_logits=False, **kwargs):
        masks, scores, low_res = predict(self, *args, return_logits=True, **kwargs)
        with torch.no_grad():
            low = torch.from_numpy(low_res).float() if grid else None
            t = refine(refiner, self, self._refiner_image, torch.from_numpy(masks).float(), threshold, budget, low)
        return (t.numpy() if return_logits else (t > 0).numpy()), scores, low_res

    SamPredictor.set_image, SamPredictor.predict = set_image_refined, predict_refined


def train(args: argparse.Namespace) -> None:
    """Train the refiner on masks of the frozen model for the training splits' objects, for ``--minutes``."""
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    pred = SamPredictor(load_model(args.model))
    pools = [(list(load_samples(DATA / f, s, None)), w) for f, s, w in TRAIN]
    refiner = PointRefiner(args.hidden)
    opt = torch.optim.AdamW(refiner.parameters(), lr=1e-3, weight_decay=1e-4)
    buf: list[tuple[torch.Tensor, ...]] = []
    start, steps, images, hist = time.time(), 0, 0, []
    while time.time() - start < args.minutes * 60:
        sample = random.choice(random.choices(pools, weights=[w for _, w in pools])[0][0])
        objects, _ = _select_objects(sample, 100, 10)
        if not objects:
            continue
        images += 1
        with torch.no_grad():
            pred.set_image(sample.image)
            img_p = padded_image(sample.image)
            small = grid_image(pred, sample.image) if args.grid_stats else None
            high_res = pred.decoder_inputs["high_res_features"][0].float()
            for _, gt, ignore, _ in random.sample(objects, min(3, len(objects))):
                logits, low, _ = prompted_mask(pred, gt, ignore, args.box_fraction, 5)
                ys, xs = uncertain(logits, args.threshold, 0)
                if len(ys) > 768:
                    sel = torch.from_numpy(rng.choice(len(ys), 768, replace=False))
                    ys, xs = ys[sel], xs[sel]
                ys = torch.cat([ys, torch.from_numpy(rng.integers(0, gt.shape[0], 128))])
                xs = torch.cat([xs, torch.from_numpy(rng.integers(0, gt.shape[1], 128))])
                keep = torch.ones(len(ys), dtype=torch.bool)
                if ignore is not None:
                    keep = ~torch.from_numpy(ignore)[ys, xs]
                scale = pred.input_size[0] / gt.shape[0]
                gs = (small, low) if args.grid_stats else None
                f = point_features(img_p, logits, high_res, ys, xs, pred.model.image_size, scale, gs)
                buf.append((f[keep], logits[ys, xs][keep], torch.from_numpy(gt)[ys, xs].float()[keep]))
        if sum(len(b[2]) for b in buf) < 16384:
            continue
        x, lg, y = (torch.cat(t) for t in zip(*buf))
        buf = []
        stats = fit_points(refiner, opt, x, lg, y, epochs=2, batch=4096)
        steps += len(stats)
        hist += stats
        h = np.array(hist[-40:]).mean(0)
        print(f"{time.time() - start:6.0f}s images {images} steps {steps} loss {h[0]:.4f} (coarse {h[1]:.4f}) "
              f"accuracy {h[2]:.4f} (coarse {h[3]:.4f})", flush=True)
        torch.save(refiner.state_dict(), args.out)
    torch.save(refiner.state_dict(), args.out)


def oracle(args: argparse.Namespace) -> None:
    """IoU after 1 and 5 clicks if every pixel within d of the predicted mask's edge were right."""
    pred = SamPredictor(load_model(args.model))
    dists = (1, 2, 3, 4, 6, 8)
    for folder in args.sets:
        rows: dict[int, list] = {1: [], 5: []}
        for sample, objects, _ in held_out_objects(folder, args.max_images):
            pred.set_image(sample.image)
            for _, gt, ignore, _ in objects:
                recorder = ClickRecorder(pred)
                click_object(recorder, gt, ignore, max(rows))
                for k in rows:
                    p = recorder.kept(k)[0] > 0
                    edge = cv2.morphologyEx(p.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
                    dist = cv2.distanceTransform((~edge).astype(np.uint8), cv2.DIST_L2, 3)
                    fixed = [mask_iou(np.where(dist <= d, gt, p), gt, ignore) for d in dists]
                    rows[k].append([mask_iou(p, gt, ignore), *fixed])
        for k, v in rows.items():
            a = np.array(v).mean(0)
            print(f"{folder} click {k} ({len(v)} objects): IoU {a[0]:.3f}; with the pixels within d of the edge right: "
                  + ", ".join(f"d={d} {x:.3f}" for d, x in zip(dists, a[1:])))


def speed(args: argparse.Namespace, refiner: PointRefiner) -> None:
    """Uncertain pixels and refinement time of one point's mask on examples/cat.jpg at 1024 x 681."""
    from PIL import Image

    cat = Path(__file__).resolve().parents[1] / "examples" / "cat.jpg"
    image = np.array(Image.open(cat).convert("RGB").resize((1024, 681)))
    pred = SamPredictor(load_model(args.model))
    pred.set_image(image)
    img_p = padded_image(image)
    pred._refiner_small = grid_image(pred, image) if args.grid_stats else None
    for point in ([500, 340], [200, 100]):
        m, _, lr = pred.predict(np.array([point], float), np.array([1]), multimask_output=False, return_logits=True)
        t, low = torch.from_numpy(m).float(), (torch.from_numpy(lr).float() if args.grid_stats else None)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            with torch.no_grad():
                refine(refiner, pred, img_p, t, args.threshold, args.budget, low)
            times.append(time.perf_counter() - t0)
        n = (t.abs() < args.threshold).sum().item()
        print(f"point {point}: {n} uncertain pixels, refined in {1000 * min(times):.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["oracle", "train", "eval", "speed"])
    ap.add_argument("out", nargs="?", help="the refiner's file (train writes it, eval and speed read it)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--minutes", type=float, default=25.0)
    ap.add_argument("--box-fraction", type=float, default=0.3, help="training masks prompted by the object's box")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--threshold", type=float, default=6.0, help="refine pixels with |logit| below this")
    ap.add_argument("--budget", type=int, default=0, help="refine at most this many pixels a mask (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid-stats", action="store_true", help="window means on the mask grid (the fast variant)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sets", nargs="+", default=["davis2016_val", "coco_instances_mini"])
    ap.add_argument("--max-images", type=int, default=None)
    args, rest = ap.parse_known_args()
    torch.set_num_threads(args.threads)
    if args.mode == "oracle":
        return oracle(args)
    if args.mode == "train":
        return train(args)
    refiner = PointRefiner(args.hidden)
    refiner.load_state_dict(torch.load(args.out, weights_only=True))
    refiner.eval()
    if args.mode == "speed":
        return speed(args, refiner)
    patch_predictor(refiner, args.threshold, args.budget, args.grid_stats)
    sys.argv = ["eval_default.py", "--model", args.model] + [a for a in rest if a != "--"]
    runpy.run_path(str(Path(__file__).resolve().parent / "eval_default.py"), run_name="__main__")


if __name__ == "__main__":
    main()
