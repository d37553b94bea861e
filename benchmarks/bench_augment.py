"""P1's image views: where :class:`mmlib.augment.ImageAugment3d` spends its time, per batch.

Every P1 pretraining step augments its batch (SimCLR twice). The crop, rotation and zoom are
one affine per sample, resampled by ``affine_grid`` + ``grid_sample``. This prints, per size,
the milliseconds per batch of:

- ``F.affine_grid``: torch's grid (a base grid per sample, then one batched matmul);
- ``affine_grid_3d``: mmlib's separable grid, and whether it is bit-identical to torch's on
  this machine (over ``--repeats`` random batches of matrices);
- ``grid_sample``: the trilinear resampling itself;
- ``ImageAugment3d``: the whole call (draws, grid, resampling, flips, gamma) at P1's rate.

    .venv/bin/python benchmarks/bench_augment.py --threads 2
    python benchmarks/bench_augment.py --device cuda          # on a GPU machine

The table is printed and written to ``results/benchmarks/augment.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import median_ms

from mmlib import core
from mmlib.augment import ImageAugment3d, affine_grid_3d
from mmlib.pipelines import p1
from mmlib.results import atomic_write_text

PROFILES = ("quick", "full")  # P1's pretraining batch at each profile's size
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    rows = []
    for name in PROFILES:
        prof = p1.PROFILES.get_profile(name)
        aug = ImageAugment3d(rate=prof.augment_rate)
        batch, spatial = prof.pretrain_batch, tuple(prof.spatial_size)
        label = f"P1 {name} ({batch} x {'x'.join(map(str, spatial))})"
        g = torch.Generator().manual_seed(0)
        x = torch.rand(batch, 1, *spatial, generator=g).to(dev)
        size = list(x.shape)
        thetas = []
        for k in range(args.repeats):  # the matrices the augmentation draws: crop x rotation x zoom
            draw = torch.Generator().manual_seed(k)
            s = torch.rand(batch, 3, generator=draw, dtype=torch.float64) * 0.3 + 0.7
            offset = (torch.rand(batch, 3, generator=draw, dtype=torch.float64) * 2 - 1) * (1 - s)
            angles = (torch.rand(batch, 3, generator=draw, dtype=torch.float64) * 2 - 1) * 0.1745
            zoom = torch.rand(batch, 3, generator=draw, dtype=torch.float64) * 0.2 + 0.9
            thetas.append(aug._theta(spatial, s, offset, angles, zoom).to(device=dev, dtype=x.dtype))
        theta = thetas[0]
        same = all(torch.equal(affine_grid_3d(t, size), F.affine_grid(t, size, align_corners=True)) for t in thetas)
        grid = affine_grid_3d(theta, size)
        calls = {
            "F.affine_grid": lambda t=theta, s=size: F.affine_grid(t, s, align_corners=True),
            "affine_grid_3d": lambda t=theta, s=size: affine_grid_3d(t, s),
            "grid_sample": lambda v=x, g=grid: F.grid_sample(v, g, align_corners=True),
            "ImageAugment3d": lambda a=aug, v=x: a(v, 1),
        }
        row = {"batch": label, **{name: median_ms(fn, args.repeats, dev) for name, fn in calls.items()}}
        row["bit-identical"] = "yes" if same else "no"
        rows.append(row)

    head = list(rows[0])
    machine = (f"{core.device_name(dev)}, torch threads {torch.get_num_threads()}, torch {torch.__version__}; "
               f"median of {args.repeats}; ms per batch")
    lines = [machine, "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(v if isinstance(v, str) else f"{v:.1f}" for v in r.values()) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    out = atomic_write_text(ROOT / "results" / "benchmarks" / "augment.md", text + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
