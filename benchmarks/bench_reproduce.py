"""End-to-end wall time of ``make reproduce`` per notebook, and where each notebook spends it.

Either runs every notebook (``python -m mmlib run``, as ``make reproduce`` does) into a fresh
results folder and times it, or (``--from-results``) tabulates a results folder a earlier
``make reproduce`` wrote, from each notebook's ``run.json``. Like ``make reproduce`` it runs
each notebook on ``--threads`` CPU threads (default 2), ``--jobs`` at a time (default: the
usable cores / threads). Prints a Markdown table: wall seconds per notebook (the papermill run, kernel start
included), its recorded stages, the cohort generation the first notebook of a cohort pays, the
sum of the notebooks' times and the elapsed time from the first start to the last finish, against
the target (``--target-min``, default 15 minutes on 2 CPU cores). Writes it to
``results/benchmarks/reproduce.md``.

    .venv/bin/python benchmarks/bench_reproduce.py                          # run all, quick profile
    .venv/bin/python benchmarks/bench_reproduce.py --jobs 2 --threads 1     # two at a time, 1 thread each
    .venv/bin/python benchmarks/bench_reproduce.py --prefix p3              # one notebook
    .venv/bin/python benchmarks/bench_reproduce.py --from-results results   # tabulate an earlier run

Run it on an otherwise idle machine: two jobs on two cores double each other's times.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmlib.results import atomic_write_text


def _notebooks(prefix: str) -> list[Path]:
    nbs = sorted((ROOT / "notebooks").glob(f"{prefix}*.py"))
    if not nbs:
        raise SystemExit(f"no notebook in notebooks/ starts with {prefix!r}")
    return nbs


def _record(results: Path, name: str) -> dict:
    path = results / name / "run.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def _row(name: str, wall: float | None, rec: dict) -> dict:
    stages = rec.get("stages_s") or {}
    execution = rec.get("execution") or {}
    return {
        "started": execution.get("started"),
        "finished": execution.get("finished"),
        "threads": execution.get("threads"),
        "notebook": name,
        "status": rec.get("status", "missing"),
        "wall s": wall if wall is not None else (rec.get("execution") or {}).get("notebook_wall_s"),
        "notebook cells s": rec.get("wall_s"),
        "profile": (rec.get("profile") or {}).get("name", ""),
        "stages (s)": ", ".join(f"{k} {v:.0f}" for k, v in stages.items()),
    }


def _table(rows: list[dict], target_min: float) -> str:
    cols = ["notebook", "status", "profile", "threads", "wall s", "notebook cells s", "stages (s)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = [f"{r[c]:.0f}" if isinstance(r[c], float) else str(r[c] if r[c] is not None else "") for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    total = sum(r["wall s"] or 0.0 for r in rows)
    times = [(r["started"], r["finished"]) for r in rows]
    if all(a and b for a, b in times):  # notebooks may have run side by side: the elapsed time counts
        from datetime import datetime

        elapsed = (max(datetime.fromisoformat(b) for _, b in times)
                   - min(datetime.fromisoformat(a) for a, _ in times)).total_seconds()
        lines.append(f"| sum of the notebooks | | | | {total:.0f} ({total / 60:.1f} min) | | |")
    else:  # an older record without start times: assume one after another
        elapsed = total
    lines.append(f"| **elapsed, first start to last finish** | | | | **{elapsed:.0f}** ({elapsed / 60:.1f} min; "
                 f"target {target_min:.0f} min: {'met' if elapsed <= target_min * 60 else 'not met'}) | | |")
    return "\n".join(lines)


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", default="", help="only notebooks whose name starts with this")
    ap.add_argument("--profile", default="quick", choices=("smoke", "quick", "full"))
    ap.add_argument("--data-dir", default=None, help="cohort folder (default: a fresh temporary one, so generation "
                                                      "is timed too)")
    ap.add_argument("--results", default=None, help="results root to run into (default: a temporary folder)")
    ap.add_argument("--from-results", default=None, help="tabulate this results root instead of running")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per notebook (default 2, as make reproduce)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="notebooks at once (default: usable cores / threads, at least 1, as make reproduce)")
    ap.add_argument("--target-min", type=float, default=15.0)
    ap.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "reproduce.md"))
    args = ap.parse_args()

    if args.jobs is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        args.jobs = max(1, cores // args.threads)
    rows = []
    if args.from_results:
        res = Path(args.from_results)
        for nb in _notebooks(args.prefix):
            rows.append(_row(nb.stem, None, _record(res, nb.stem)))
        how = f"tabulated from {res}/*/run.json"
    else:
        tmp = tempfile.mkdtemp(prefix="bench_reproduce_")
        res = Path(args.results or Path(tmp) / "results")
        data = args.data_dir or str(Path(tmp) / "data")

        def one(nb: Path) -> dict:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "mmlib", "run", str(nb), "--profile", args.profile,
                                   "--results", str(res), "--data-dir", data, "--threads", str(args.threads),
                                   "--no-progress"], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
            wall = time.perf_counter() - t0
            rec = _record(res, nb.stem)
            if proc.returncode != 0:
                rec = dict(rec, status=f"failed (rc {proc.returncode})")
                print(proc.stderr[-2000:], file=sys.stderr)
            print(f"{nb.stem}: {wall:.0f} s", file=sys.stderr)
            return _row(nb.stem, wall, rec)

        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            rows = list(pool.map(one, _notebooks(args.prefix)))
        how = (f"ran `python -m mmlib run <notebook> --profile {args.profile} --threads {args.threads}` for each "
               f"notebook, {args.jobs} at a time, into {res}, cohorts in {data}")
    text = (f"# make reproduce, per notebook\n\nMachine: {_machine()}\n\nHow: {how}\n\n"
            f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`\n\n{_table(rows, args.target_min)}\n")
    print(text)
    atomic_write_text(args.out, text)
    return 0 if all(r["status"] == "complete" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
