"""Cohort generation: wall time and peak memory (main process + workers) per cohort.

Generates into a fresh temporary folder (nothing reused), sampling the resident memory of the
whole process tree every 0.1 s, and prints a Markdown table (also written to
``results/benchmarks/generate_<preset>.md``). The acceptance targets of the data issue:

    # the five quick cohorts in at most 2 minutes on 2 cores
    .venv/bin/python benchmarks/bench_generate.py --preset quick --workers 2
    # the full CTA cohort (491 subjects at 224x224x320) under 2 GB whatever N: run several N
    .venv/bin/python benchmarks/bench_generate.py --cohort stroke_cta --preset full --n 4 12 491
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
from mmlib.data import ManifestError
from mmlib.results import atomic_write_text


class PeakMemory:
    """Peak memory (MB) of this process and its workers, sampled every ``interval_s`` in a thread.

    RSS counts the pages a forked worker shares with its parent once per process (an upper
    bound); PSS divides shared pages among the processes that map them (the fair total).
    """

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.rss = self.pss = self.worker_rss = self.worker_pss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            rss = pss = 0.0
            for i, proc in enumerate([me, *me.children(recursive=True)]):
                try:
                    info = proc.memory_full_info()
                except psutil.Error:
                    continue
                r, p = info.rss / 2**20, getattr(info, "pss", info.rss) / 2**20
                rss, pss = rss + r, pss + p
                if i > 0:
                    self.worker_rss, self.worker_pss = max(self.worker_rss, r), max(self.worker_pss, p)
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _image_size(root: Path) -> str:
    """Voxels (and mm) of the first volume, or pixels of the first PNG, of a written cohort."""
    import nibabel as nib
    from PIL import Image

    for path in sorted(root.rglob("*.nii.gz"))[:1]:
        img = nib.load(path)
        return f"{'x'.join(map(str, img.shape))} @ {'x'.join(f'{z:g}' for z in img.header.get_zooms())} mm"
    for path in sorted(root.rglob("*.png"))[:1]:
        return "x".join(map(str, Image.open(path).size)) + " px"
    return "-"


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
        "| cohort | subjects | volume / image size | wall s | s per subject | files | MB on disk "
        "| peak total RSS MB | peak total PSS MB | peak worker RSS / PSS MB | note |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
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
                note = ""
                with PeakMemory() as mem:
                    try:
                        gen.generate(out_dir=out, seed=args.seed, workers=args.workers, show_progress=False)
                    except ManifestError as err:
                        # a few subjects at full size (memory runs) may leave a split with one class
                        note = f"files written; validation refused: {err.problems[0][:80]}"
                wall = time.perf_counter() - t0
                n_subjects = gen.knobs.n_subjects
                total_s += wall
                files = [p for p in out.rglob("*") if p.is_file()]
                size = sum(p.stat().st_size for p in files) / 1e6
                shape = _image_size(out)
                line = (
                    f"| {name} | {n_subjects} | {shape} | {wall:.1f} | {wall / n_subjects:.3f} | {len(files)} | "
                    f"{size:.0f} | {mem.rss:.0f} | {mem.pss:.0f} | {mem.worker_rss:.0f} / {mem.worker_pss:.0f} | {note} |"
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
