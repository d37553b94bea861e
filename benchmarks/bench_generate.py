"""Cohort generation: wall time and peak memory (main process + workers) per cohort.

Generates into a fresh temporary folder (nothing reused), sampling the resident memory of the
whole process tree every 0.1 s, and prints a Markdown table (also written to
``results/benchmarks/generate_<preset>.md``). The acceptance targets of the data issue:

    # the five quick cohorts in at most 2 minutes on 2 cores
    .venv/bin/python benchmarks/bench_generate.py --preset quick --workers 2
    # the full CTA cohort (491 subjects at 224x224x320) under 2 GB whatever N: run two N
    .venv/bin/python benchmarks/bench_generate.py --cohort stroke_cta --preset full --n 4 12
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil

from mmlib.cohorts import GENERATORS, generator
from mmlib.results import atomic_write_text


class PeakRSS:
    """Peak total resident memory (MB) of this process and all its children, sampled in a thread."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.peak_total = 0.0
        self.peak_child = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total, child_max = 0, 0
            try:
                total = me.memory_info().rss
                for child in me.children(recursive=True):
                    try:
                        rss = child.memory_info().rss
                    except psutil.Error:
                        continue
                    total += rss
                    child_max = max(child_max, rss)
            except psutil.Error:
                pass
            self.peak_total = max(self.peak_total, total / 2**20)
            self.peak_child = max(self.peak_child, child_max / 2**20)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", default="all", help=f"one of {sorted(GENERATORS)} or all")
    parser.add_argument("--preset", default="quick", choices=("smoke", "quick", "full"))
    parser.add_argument("--n", type=int, nargs="*", default=None, help="override n_subjects (several values: one run each)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for the cohorts (default: a temporary folder, removed)")
    parser.add_argument("--results", default="results/benchmarks")
    args = parser.parse_args()

    names = [n for n in ("stroke_mri", "stroke_cta", "xray_ecg", "ct_ehr", "glioma")] if args.cohort == "all" else [args.cohort]
    sizes = args.n or [None]
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mmlib-bench-"))
    lines = [
        f"cohort generation, preset {args.preset}, {args.workers} worker(s); machine: {platform.processor() or platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} usable cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "",
        "| cohort | subjects | volume / image size | wall s | s per subject | files | MB on disk | peak total RSS MB | peak worker RSS MB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    total_s = 0.0
    try:
        for name in names:
            for n in sizes:
                gen = generator(name, args.preset, **({"n_subjects": n} if n else {}))
                out = base / f"{name}-{n or 'preset'}"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                with PeakRSS() as mem:
                    cohort = gen.generate(out_dir=out, seed=args.seed, workers=args.workers, show_progress=False)
                wall = time.perf_counter() - t0
                total_s += wall
                files = [p for p in out.rglob("*") if p.is_file()]
                size = sum(p.stat().st_size for p in files) / 1e6
                knobs = gen.knobs.as_dict()
                shape = knobs.get("volume_shape") or knobs.get("image_size") or knobs.get("patch_size") or "-"
                line = (
                    f"| {name} | {len(cohort)} | {shape} | {wall:.1f} | {wall / len(cohort):.3f} | {len(files)} | "
                    f"{size:.0f} | {mem.peak_total:.0f} | {mem.peak_child:.0f} |"
                )
                lines.append(line)
                print(line, flush=True)
                if not args.out:
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.out:
            shutil.rmtree(base, ignore_errors=True)
    tail = f"\ntotal wall time: {total_s:.1f} s"
    print(tail)
    lines.append(tail)
    dest = Path(args.results) / f"generate_{args.preset}{'' if args.cohort == 'all' else '_' + args.cohort}.md"
    atomic_write_text(dest, "\n".join(lines) + "\n")
    print(f"written: {dest}")


if __name__ == "__main__":
    main()
