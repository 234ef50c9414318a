"""A crack segmenter for ELPV: a small U-Net taught thin dark cracks drawn on normal cells.

The poly cells every score misses are clean, bright cells crossed by one thin crack, 1-2 px wide at
300 px (``benchmarks/results/2026-12-03-quality-elpv-poly-descriptor.md``). At the AAE's 64² the crack is gone; at 128²
(2026-11-22) a segmenter taught faint scratches reached 0.781. This trains, at 256², a
segmentation network on synthetic cracks only (the real defects of the test set stay unseen):

* each training cell is divided by its median (brightness is not a defect), flipped / transposed,
  scaled by 0.8-1.2, and with probability 0.7 crossed by a crack: a polyline of 2-9 segments that
  turns by N(0, 0.18) rad per segment, 8-100 % of the side long (log-uniform), with Poisson(0.8)
  branches, drawn anti-aliased at 4x the size (``--widths``, default 1-8 px there: 0.25-2 px of the
  cell) and area-shrunk, darkening the cell by ``--depth``; with probability ``--region-p`` the cell is also darkened on one side of the
  crack (a partly inactive area);
* random ``--crop`` crops, BCE (positive weight 5) + Dice, Adam 1e-3, batch 16, for ``--minutes``;
* a test cell's score is the mean of its top 0.05 / 0.2 / 1 % pixel probabilities.

With ``--audit`` (the ``results.csv`` of an ``anomaly audit`` of the same ``test/`` folder) it also
sums the segmenter's score, standardised on ``calibrate/good``, with the bundle's scores at a few
weights. The test AUROC printed during training is a learning curve only: nothing is selected by it.

Usage::

    anomaly demo --cell-type poly --out /tmp/poly_demo
    python benchmarks/elpv_crack_segmenter.py /tmp/poly_demo/data/elpv_poly --minutes 22 \\
        --audit /tmp/poly_demo/audit/results.csv
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _load(folder: Path, size: int) -> tuple[np.ndarray, list[str]]:
    """``(N, size, size)`` float32 cells, each divided by its median (x 0.5, clipped to 1.5), and their paths."""
    import cv2

    from anomaly.data.io import list_images

    paths = [str(p) for p in list_images(folder)]
    cells = np.stack([cv2.resize(cv2.imread(p, cv2.IMREAD_GRAYSCALE), (size, size), interpolation=cv2.INTER_AREA)
                      for p in paths]).astype(np.float32) / 255.0
    med = np.median(cells.reshape(len(cells), -1), axis=1)[:, None, None]
    return np.clip(cells / np.maximum(med, 1e-3) * 0.5, 0.0, 1.5).astype(np.float32), paths


def draw_crack(cell: np.ndarray, rng: np.random.Generator, depth: tuple[float, float],
               region_p: float, widths: tuple[int, int] = (1, 8)) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic crack on ``cell`` ``(H, W)``: returns the cracked cell and its ``{0, 1}`` mask.

    ``widths``: the main line's width range in pixels of the 4x canvas (1-8: 0.25-2 px of the cell).
    """
    import cv2

    h, w = cell.shape
    s = 4  # drawn at 4x and area-shrunk: sub-pixel widths
    canvas = np.zeros((h * s, w * s), np.uint8)
    for _ in range(1 if rng.random() < 0.7 else 2):
        length = np.exp(rng.uniform(np.log(0.08), np.log(1.0))) * h * s
        n = int(rng.integers(2, 10))
        step = length / n
        p = rng.uniform(0.05, 0.95, size=2) * [w * s, h * s]
        heading = rng.uniform(0, 2 * np.pi)
        pts = [p.copy()]
        for _ in range(n):
            heading += rng.normal(0, 0.18)
            p = p + step * np.array([np.cos(heading), np.sin(heading)])
            pts.append(p.copy())
        width = int(rng.integers(widths[0], widths[1] + 1))
        cv2.polylines(canvas, [np.round(np.array(pts)).astype(np.int32).reshape(-1, 1, 2)], False, 255, width,
                      cv2.LINE_AA)
        for _ in range(int(rng.poisson(0.8))):
            q = pts[int(rng.integers(1, len(pts)))].copy()
            branch, hd = [q.copy()], heading + rng.choice([-1, 1]) * rng.uniform(0.4, 1.3)
            for _ in range(int(rng.integers(2, 6))):
                hd += rng.normal(0, 0.25)
                q = q + step * rng.uniform(0.3, 0.8) * np.array([np.cos(hd), np.sin(hd)])
                branch.append(q.copy())
            cv2.polylines(canvas, [np.round(np.array(branch)).astype(np.int32).reshape(-1, 1, 2)], False, 255,
                          max(2, width - 2), cv2.LINE_AA)
    cover = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    if cover.max() < 0.05:
        return cell, np.zeros_like(cell)
    out = cell * (1.0 - rng.uniform(*depth) * np.clip(cover * rng.uniform(1.0, 2.0), 0, 1))
    mask = (cover > 0.15).astype(np.float32)
    if rng.random() < region_p:
        dist = cv2.distanceTransform((cover < 0.1).astype(np.uint8), cv2.DIST_L2, 3)
        normal = rng.normal(size=2)
        yy, xx = np.mgrid[0:h, 0:w]
        cy, cx = np.argwhere(cover > 0.3).mean(0) if (cover > 0.3).any() else (h / 2, w / 2)
        side = ((xx - cx) * normal[0] + (yy - cy) * normal[1]) > 0
        region = cv2.GaussianBlur((side & (dist < rng.uniform(0.1, 0.6) * h)).astype(np.float32), (0, 0), 1.5)
        out = out * (1 - rng.uniform(0.1, 0.5) * region)
        mask = np.maximum(mask, (region > 0.5).astype(np.float32))
    return out.astype(np.float32), mask


def _unet(width: int) -> Any:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    def block(a: int, b: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
                             nn.Conv2d(b, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(inplace=True))

    class UNet(nn.Module):
        """``(N, 1, H, W)`` cells (H, W divisible by 8) -> ``(N, 1, H, W)`` crack logits."""

        def __init__(self) -> None:
            super().__init__()
            w = width
            self.e1, self.e2, self.e3, self.e4 = block(1, w), block(w, 2 * w), block(2 * w, 4 * w), block(4 * w, 8 * w)
            self.d3, self.d2, self.d1 = block(12 * w, 4 * w), block(6 * w, 2 * w), block(3 * w, w)
            self.head = nn.Conv2d(w, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            def up(t: torch.Tensor) -> torch.Tensor:
                return F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)

            e1 = self.e1((x - 0.5) / 0.25)
            e2 = self.e2(F.max_pool2d(e1, 2))
            e3 = self.e3(F.max_pool2d(e2, 2))
            e4 = self.e4(F.max_pool2d(e3, 2))
            d3 = self.d3(torch.cat([up(e4), e3], 1))
            d2 = self.d2(torch.cat([up(d3), e2], 1))
            return self.head(self.d1(torch.cat([up(d2), e1], 1)))

    return UNet()


def _scores(model: Any, cells: np.ndarray, fracs: tuple[float, ...]) -> dict[float, np.ndarray]:
    """Mean of each cell's top ``frac`` pixel probabilities, for every ``frac``."""
    import torch

    model.eval()
    out: dict[float, list[np.ndarray]] = {f: [] for f in fracs}
    with torch.no_grad():
        for i in range(0, len(cells), 16):
            p = torch.sigmoid(model(torch.from_numpy(cells[i:i + 16, None]))).flatten(1)
            for f in fracs:
                out[f].append(p.topk(max(1, int(f * p.shape[1])), dim=1).values.mean(1).numpy())
    model.train()
    return {f: np.concatenate(v) for f, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    import torch
    import torch.nn.functional as F

    from anomaly.metrics import image_metrics

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="an ELPV category folder (train/good, calibrate/good, test/good, test/defective)")
    p.add_argument("--size", type=int, default=256, help="working size (default 256)")
    p.add_argument("--crop", type=int, default=128, help="training crop (default 128)")
    p.add_argument("--minutes", type=float, default=22.0, help="training budget (default 22)")
    p.add_argument("--width", type=int, default=16, help="U-Net base width (default 16)")
    p.add_argument("--depth", type=float, nargs=2, default=(0.05, 0.5), help="crack darkening range (default 0.05 0.5)")
    p.add_argument("--widths", type=int, nargs=2, default=(1, 8),
                   help="crack width range in pixels of the 4x canvas (default 1 8: 0.25-2 px)")
    p.add_argument("--region-p", type=float, default=0.0, help="probability of a darker area beside the crack (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--audit", default=None, help="results.csv of an audit of DATA/test, to sum with")
    p.add_argument("--out", default=None, help="JSON file for the figures")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    root, rng = Path(a.data), np.random.default_rng(a.seed)
    torch.manual_seed(a.seed)
    train, _ = _load(root / "train" / "good", a.size)
    cal, _ = _load(root / "calibrate" / "good", a.size)
    good, good_paths = _load(root / "test" / "good", a.size)
    bad, bad_paths = _load(root / "test" / "defective", a.size)
    test, paths = np.concatenate([good, bad]), good_paths + bad_paths
    y = np.r_[np.zeros(len(good)), np.ones(len(bad))]
    model = _unet(a.width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0, step, c, curve = time.monotonic(), 0, a.crop, []
    while time.monotonic() - t0 < a.minutes * 60:
        xs, ms = [], []
        for _ in range(16):
            cell = train[rng.integers(len(train))]
            cell = cell[:, ::-1] if rng.random() < 0.5 else cell
            cell = cell[::-1] if rng.random() < 0.5 else cell
            cell = np.ascontiguousarray(cell.T if rng.random() < 0.5 else cell) * rng.uniform(0.8, 1.2)
            cell, m = draw_crack(cell, rng, tuple(a.depth), a.region_p, tuple(a.widths)) if rng.random() < 0.7 else (cell, np.zeros_like(cell))
            y0, x0 = rng.integers(0, a.size - c + 1, size=2)
            xs.append(cell[y0:y0 + c, x0:x0 + c])
            ms.append(m[y0:y0 + c, x0:x0 + c])
        x, m = torch.from_numpy(np.stack(xs)[:, None].astype(np.float32)), torch.from_numpy(np.stack(ms)[:, None])
        logit = model(x)
        prob = torch.sigmoid(logit)
        loss = (F.binary_cross_entropy_with_logits(logit, m, pos_weight=torch.tensor(5.0))
                + 1 - (2 * (prob * m).sum() + 1) / (prob.sum() + m.sum() + 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            auc = image_metrics(y, _scores(model, test, (0.002,))[0.002])["auroc"]
            curve.append((step, round(time.monotonic() - t0), round(float(loss.detach()), 4), round(auc, 4)))
            print(f"step {step}  {curve[-1][1]} s  loss {curve[-1][2]:.3f}  test AUROC (top 0.2 %) {auc:.3f}", flush=True)
    fracs = (0.0005, 0.002, 0.01)
    test_s, cal_s = _scores(model, test, fracs), _scores(model, cal, fracs)
    res: dict[str, Any] = {"steps": step, "seconds": round(time.monotonic() - t0), "curve": curve, "args": vars(a)}
    for f in fracs:
        res[f"segmenter_top{f}"] = round(image_metrics(y, test_s[f])["auroc"], 4)
    if a.audit:
        with open(a.audit, newline="") as fh:
            by_path = {str(Path(r["path"]).resolve()): float(r["score"]) for r in csv.DictReader(fh) if r["score"]}
        base = np.array([by_path[str(Path(q).resolve())] for q in paths])
        res["bundle"] = round(image_metrics(y, base)["auroc"], 4)
        for f in fracs:
            z = (test_s[f] - cal_s[f].mean()) / (cal_s[f].std() + 1e-9)
            for wgt in (0.5, 1.0, 2.0):
                res[f"sum_top{f}_w{wgt}"] = round(image_metrics(y, base + wgt * z)["auroc"], 4)
    print("\n".join(f"{k:28s} {v}" for k, v in res.items() if k not in ("curve", "args")))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
