"""Localisation scoring: the shuffled-map baseline of mmlib.explain.localisation_scores, drawn vs permuted.

The chance level of a voxel map is the share of its mass that lands on the truth region when
the map is shuffled over the grid. ``localisation_scores`` draws the region's cells at random
(the same distribution, since every cell has the same size); the reference here permutes every
voxel, as mmlib did before. Prints a Markdown table (seconds per map, speed-up, and the chance
mean and 95th percentile both ways, which must agree within Monte Carlo error) and writes it to
``results/benchmarks/localisation.md``:

    .venv/bin/python benchmarks/bench_localisation.py            # P1 quick and full grids
    .venv/bin/python benchmarks/bench_localisation.py --n-random 1000
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

from mmlib.explain import localisation_scores
from mmlib.results import atomic_write_text


def _permuted(cells: np.ndarray, region: np.ndarray, n_random: int, seed: int) -> np.ndarray:
    """The reference: every voxel of the map permuted, the share on the region kept."""
    rng = np.random.default_rng(seed)
    total = cells.sum()
    return np.array([cells[rng.permutation(len(cells))][region].sum() / total for _ in range(n_random)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-random", type=int, default=200, help="shuffles per map (P1's Grad-CAM study uses 200)")
    parser.add_argument("--out", default="results/benchmarks/localisation.md")
    args = parser.parse_args()

    cases = [  # (label, grid, region cells): P1's outcome-region lesions are ~0.08% of the volume, all WMH ~0.5%
        ("P1 quick, outcome-region lesions", (40, 48, 40), 64),
        ("P1 quick, all planted lesions", (40, 48, 40), 360),
        ("P1 full, outcome-region lesions", (80, 96, 80), 512),
    ]
    rows = []
    for label, grid, k in cases:
        rng = np.random.default_rng(0)
        amap = rng.gamma(0.5, size=grid)  # skewed, like an attribution map
        mask = np.zeros(int(np.prod(grid)), dtype=bool)
        mask[rng.choice(mask.size, k, replace=False)] = True
        mask = mask.reshape(grid)
        t0 = time.perf_counter()
        ref = _permuted(amap.ravel(), mask.ravel(), args.n_random, seed=1)
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = localisation_scores(amap, mask, n_random=args.n_random, seed=1)
        t_ours = time.perf_counter() - t0
        rows.append(f"| {label} | {'x'.join(map(str, grid))} | {k} | {t_ref:.3f} | {t_ours:.4f} | "
                    f"{t_ref / t_ours:.0f}x | {ref.mean():.5f} / {ours['chance_mean']:.5f} | "
                    f"{np.quantile(ref, 0.95):.5f} / {ours['chance_p95']:.5f} |")
    lines = [f"machine: {platform.processor() or platform.machine()}, numpy {np.__version__}, "
             f"{args.n_random} shuffles per map", "",
             "| case | grid | region cells | permuted s | mmlib s | speed-up | chance mean (permuted / mmlib) "
             "| chance p95 (permuted / mmlib) |",
             "|---|---|---:|---:|---:|---:|---|---|", *rows]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
