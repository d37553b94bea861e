"""P2 autoencoder pretraining throughput: mmlib's fast path vs the plain MONAI-tutorial loop.

Both P2 autoencoders (``ResNetAutoEnc``, ``ViTAutoEnc``) are trained for a few steps of the P2
pretext task (augmented volume, corrupted copy in, L1 against the clean volume out) by each of
these paths, each in a fresh process (so peak memory and allocator state are its own):

- ``plain``: the loop of MONAI's tutorials. A ``monai.data.DataLoader`` over a MONAI
  ``Dataset`` of synthetic NIfTI files decodes every volume again each epoch with the P2 chain
  (:func:`mmlib.data.readers.volume_transforms`: load, RAS, spacing, HU window, pad/crop), then
  augments (``RandFlipd`` x3, ``RandScaleIntensityd``, ``RandShiftIntensityd``) and corrupts
  (``RandCoarseDropoutd``, ``RandCoarseShuffled``) per sample; fp32; torch's default AdamW;
  einsum attention.
- ``plain-cached`` (ablation): the plain model and optimiser, fed from the fast path's data
  side (:class:`mmlib.fast.VolumeCache` in fp32, on-device :class:`mmlib.fast.Augment`,
  :class:`mmlib.ssl.InputCorruption`): what decoding costs.
- ``fast-fp32`` (ablation): the fast path without bf16 autocast: what the layout, fused AdamW
  and SDPA give alone.
- ``fast``: :meth:`mmlib.fast.FastPath.for_device` (bf16 autocast where native, channels-last,
  fused AdamW, SDPA) fed from a :class:`~mmlib.fast.VolumeCache` (``--storage``).

Reported per model and path: volumes/s and seconds per step over the timed steps (warm-up
steps excluded; the time to fetch a batch is included and also shown alone), achieved TFLOP/s
(forward + backward FLOPs of one step, counted once with ``torch.utils.flop_counter`` on the
meta device; the same count for every path), model-FLOPs utilisation with ``--peak-tflops``,
peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the rise of the process's peak
RSS, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, over its value just before the model and data
are set up, DataLoader workers not included), and the speed-up over ``plain``. The Markdown
table is printed and written to ``results/benchmarks/p2_pretrain.md`` (``--size quick``) or
``p2_pretrain_<size>.md``, with the machine and the command.

    .venv/bin/python benchmarks/bench_p2_pretrain.py --threads 2                  # quick, CPU
    .venv/bin/python benchmarks/bench_p2_pretrain.py --size paper --steps 1 --batch 1 --warmup 0 --threads 2
    .venv/bin/python benchmarks/bench_p2_pretrain.py --size paper --device cuda --steps 20 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SIZES = {"quick": "quick", "paper": "full"}  # --size -> P2 profile
MODELS = ("ResNetAutoEnc", "ViTAutoEnc")
CASES = ("plain", "plain-cached", "fast-fp32", "fast")
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- synthetic data


def write_volumes(folder: Path, n: int, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                  seed: int) -> list[str]:
    """``n`` CTA-like int16 NIfTI volumes (air, an elliptic soft-tissue body, contrast-filled vessels, noise)."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij", sparse=True)
    x, y, z = grids
    paths = []
    for i in range(n):
        a, b = rng.uniform(0.6, 0.9, 2)
        hu = np.where((x / a) ** 2 + (y / b) ** 2 < 1, 40.0, -1000.0).astype(np.float32)
        for _ in range(4):  # vessels along z
            cx, cy, r = rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), rng.uniform(0.03, 0.08)
            wob = 0.1 * np.sin(3 * z + rng.uniform(0, 6))
            hu = np.where((x - cx - wob) ** 2 + (y - cy) ** 2 < r * r, 350.0, hu)
        hu += rng.standard_normal(shape, dtype=np.float32) * 20
        affine = np.diag([*spacing, 1.0])
        p = folder / f"cta_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(np.clip(hu, -1024, 3000).astype(np.int16), affine), p)
        paths.append(str(p))
    return paths


# --------------------------------------------------------------------------- FLOPs


def count_flops(kind: str, prof, batch: int) -> int:
    """Forward + backward FLOPs of one plain step (counted on the meta device: no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmlib.pipelines.p2 import build_model

    with torch.device("meta"):
        model = build_model(kind, prof)
        x = torch.zeros(batch, 1, *prof.spatial_size)
    with FlopCounterMode(display=False) as fc:
        loss = torch.nn.functional.l1_loss(model(x), x)
        loss.backward()
    return int(fc.get_total_flops())


# --------------------------------------------------------------------------- one case (child process)


def _plain_loader(files: list[str], prof, batch: int, workers: int, seed: int):
    from monai import transforms as mt
    from monai.data import DataLoader, Dataset

    from mmlib.data.readers import volume_transforms

    size = prof.spatial_size

    def frac(f: float) -> list[int]:
        return [max(1, round(f * s)) for s in size]

    tf = mt.Compose([
        volume_transforms(kind="ct", spacing_mm=prof.spacing_mm, spatial_size=size, hu_window=prof.hu_window),
        *[mt.RandFlipd(keys=["image"], prob=0.5, spatial_axis=a) for a in range(3)],
        mt.RandScaleIntensityd(keys=["image"], factors=0.1, prob=1.0),
        mt.RandShiftIntensityd(keys=["image"], offsets=0.1, prob=1.0),
        mt.CopyItemsd(keys=["image"], names=["corrupted"]),
        mt.RandCoarseDropoutd(keys=["corrupted"], holes=6, max_holes=12, spatial_size=frac(0.05),
                              max_spatial_size=frac(0.25), dropout_holes=True, fill_value=None, prob=1.0),
        mt.RandCoarseShuffled(keys=["corrupted"], holes=10, max_holes=20, spatial_size=frac(0.04),
                              max_spatial_size=frac(0.12), prob=0.8),
    ])
    tf.set_random_state(seed)
    ds = Dataset([{"image": f} for f in files], transform=tf)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, generator=g, drop_last=True)

    def batches():
        while True:  # one pass = one epoch; every epoch decodes again
            for item in loader:
                yield item["image"], item["corrupted"]

    return batches()


def _cached_batches(files: list[str], prof, batch: int, device: torch.device, storage: str, seed: int):
    from mmlib.data.readers import volume_transforms
    from mmlib.fast import Augment, VolumeCache
    from mmlib.ssl import InputCorruption

    tf = volume_transforms(kind="ct", spacing_mm=prof.spacing_mm, spatial_size=prof.spatial_size,
                           hu_window=prof.hu_window)
    t0 = time.perf_counter()
    cache = VolumeCache.decode((tf({"image": f}) for f in files), device=device, storage=storage)
    decode_s = time.perf_counter() - t0
    aug, corrupt = Augment(seed=seed), InputCorruption()
    n_full = len(cache) // batch * batch

    def batches():
        epoch = 0
        while True:
            for b, x in enumerate(cache.batches(range(len(cache)), batch, shuffle_seed=seed * 7919 + epoch,
                                                augment=aug, epoch=epoch)):
                if x.shape[0] == batch:
                    yield x, corrupt(x, seed=seed * 1_000_003 + epoch * 1009 + b)
            epoch += 1

    assert n_full > 0, "fewer volumes than one batch"
    return batches(), decode_s, cache.nbytes


def run_case(spec: dict) -> dict:
    from mmlib import core
    from mmlib.fast import FastPath
    from mmlib.pipelines.p2 import PROFILES, build_model

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    core.seed_everything(spec["seed"], deterministic=False)
    # the bare model: the fast options come from FastPath below, not from the profile's own `fast`
    prof = dataclasses.replace(PROFILES[spec["profile"]], fast=False)
    case, batch = spec["case"], spec["batch"]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    decode_s, cache_bytes = None, None
    if case == "plain":
        data = _plain_loader(spec["files"], prof, batch, spec["workers"], spec["seed"])
    else:
        storage = "fp32" if case == "plain-cached" else spec["storage"]
        data, decode_s, cache_bytes = _cached_batches(spec["files"], prof, batch, device, storage, spec["seed"])
    if case.startswith("plain"):
        path = FastPath.plain()
    else:
        path = FastPath.for_device(device)
        if case == "fast-fp32":
            path = FastPath(**{**path.__dict__, "precision": "fp32"})
        elif spec["fast_precision"] != "auto":
            path = FastPath(**{**path.__dict__, "precision": spec["fast_precision"]})
        if spec["compile"]:
            path = FastPath(**{**path.__dict__, "compile": True})
    model = build_model(spec["model"], prof)
    model = path.prepare(model, device)
    opt = path.optimizer(model.parameters(), lr=prof.pretrain_lr)
    model.train()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step_s, data_s, losses = [], [], []
    for i in range(spec["warmup"] + spec["steps"]):
        sync()
        t0 = time.perf_counter()
        clean, corrupted = next(data)
        clean, corrupted = clean.to(device), corrupted.to(device)
        if case != "plain":
            corrupted = path.inputs(corrupted)
        sync()
        t1 = time.perf_counter()
        with path.autocast(device):
            loss = torch.nn.functional.l1_loss(model(corrupted).float(), clean.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        t2 = time.perf_counter()
        losses.append(float(loss))
        if i >= spec["warmup"]:
            step_s.append(t2 - t0)
            data_s.append(t1 - t0)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    total = sum(step_s)
    return {
        "model": spec["model"], "case": case, "options": _describe(path, device, attention=spec["model"].startswith("ViT")),
        "volumes_per_s": batch * len(step_s) / total, "s_per_step": total / len(step_s),
        "median_s_per_step": statistics.median(step_s), "data_s_per_step": sum(data_s) / len(data_s),
        "peak_mb": peak_mb, "decode_once_s": decode_s, "cache_mb": None if cache_bytes is None else cache_bytes / 2**20,
        "loss_first": losses[0], "loss_last": losses[-1], "finite": all(np.isfinite(losses)),
    }


def _describe(path, device: torch.device, *, attention: bool) -> str:
    from mmlib import core

    bf16 = core.autocast_dtype(device, path.precision) is not None
    bits = ["bf16" if bf16 else "fp32"]
    bits += [name for name, on in (("channels-last", path.channels_last), ("fused AdamW", path.fused),
                                   ("compile", path.compile)) if on]
    if path.sdpa and attention:  # FastPath.prepare keeps einsum attention under CPU bf16
        bits.append("einsum attention" if bf16 and device.type == "cpu" else "SDPA")
    return ", ".join(bits) if len(bits) > 1 else bits[0] + ", default AdamW"


# --------------------------------------------------------------------------- driver


def _machine(device: torch.device, threads: int) -> str:
    import monai

    from mmlib import core

    usable = len(os.sched_getaffinity(0))
    hw = core.device_name(device)
    cpu = core.device_name(torch.device("cpu"))
    s = (f"device: {device} ({hw}); CPU: {cpu}, {usable} usable cores, torch threads {threads}, "
         f"native bf16: {core.cpu_supports_bf16()}; torch {torch.__version__}, MONAI {monai.__version__}, "
         f"Python {platform.python_version()}; load average at start {os.getloadavg()[0]:.2f} (a shared machine "
         "inflates every path's time)")
    return s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="quick",
                        help="quick: P2 quick profile (64x64x96, narrow); paper: 224x224x320, the paper's widths")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--batch", type=int, default=None, help="volumes per step (default: the profile's)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 12 quick, 5 paper)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 quick, 1 paper)")
    parser.add_argument("--volumes", type=int, default=None, help="synthetic NIfTI volumes (default 2 x batch)")
    parser.add_argument("--native-scale", type=int, default=1,
                        help="NIfTI voxels per model voxel along each axis (1 = stored on the model grid, as the "
                             "synthetic P2 cohort does; 2+ = finer native scans that Spacingd resamples)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the plain loop")
    parser.add_argument("--storage", choices=("fp16", "uint8", "fp32"), default="fp16", help="VolumeCache storage")
    parser.add_argument("--fast-precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile in the fast paths")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--peak-tflops", type=float, default=None, help="hardware peak for model-FLOPs utilisation")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of every case, in alternating order; the table keeps each case's fastest run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="results/benchmarks")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._case is not None:  # child process: one case, JSON result on the last line
        print("RESULT " + json.dumps(run_case(json.loads(args._case))), flush=True)
        return

    from mmlib.pipelines.p2 import PROFILES
    from mmlib.results import atomic_write_text

    device = torch.device(args.device)
    threads = args.threads or torch.get_num_threads()
    prof = dataclasses.replace(PROFILES[SIZES[args.size]], fast=False)
    batch = args.batch or prof.pretrain_batch
    steps = args.steps or (12 if args.size == "quick" else 5)
    warmup = args.warmup if args.warmup is not None else (2 if args.size == "quick" else 1)
    n_vol = args.volumes or max(2 * batch, 2)
    command = "python benchmarks/bench_p2_pretrain.py " + shlex.join(sys.argv[1:])
    machine = _machine(device, threads)
    print(machine, flush=True)

    with tempfile.TemporaryDirectory(prefix="p2bench_") as tmp:
        s = args.native_scale
        native = tuple(int(v) * s for v in prof.spatial_size)
        t0 = time.perf_counter()
        files = write_volumes(Path(tmp), n_vol, native, tuple(float(v) / s for v in prof.spacing_mm), args.seed)
        mb = sum(os.path.getsize(f) for f in files) / 2**20
        print(f"wrote {n_vol} NIfTI volumes {native} ({mb:.1f} MiB) in {time.perf_counter() - t0:.1f} s", flush=True)
        rows = []
        for kind in args.models:
            flops = count_flops(kind, prof, batch)
            runs: dict[str, list[dict]] = {c: [] for c in args.cases}
            for rep in range(args.repeats):  # alternate the order, so a burst of load elsewhere hits every case
                for case in (args.cases if rep % 2 == 0 else args.cases[::-1]):
                    spec = {"model": kind, "case": case, "profile": SIZES[args.size], "batch": batch, "steps": steps,
                            "warmup": warmup, "files": files, "device": str(device), "threads": threads,
                            "workers": args.workers, "storage": args.storage, "fast_precision": args.fast_precision,
                            "compile": args.compile, "seed": args.seed}
                    r = _run_child(spec, threads)
                    runs[case].append(r)
                    print(f"  {kind:14s} {case:13s} run {rep + 1}: {r['volumes_per_s']:7.2f} vol/s  "
                          f"{r['s_per_step']:.3f} s/step (data {r['data_s_per_step']:.3f})  "
                          f"loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}", flush=True)
            for case in args.cases:
                best = dict(max(runs[case], key=lambda r: r["volumes_per_s"]))
                best["all_volumes_per_s"] = [r["volumes_per_s"] for r in runs[case]]
                best["peak_mb"] = max(r["peak_mb"] for r in runs[case])
                best["tflops"] = flops / best["s_per_step"] / 1e12
                best["gflop_per_step"] = flops / 1e9
                rows.append(best)

    table = _table(rows, args.peak_tflops)
    mem = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
           "rise of peak RSS (ru_maxrss) of the case's fresh process over its value before setup; "
           "DataLoader workers not included")
    text = (f"# P2 autoencoder pretraining throughput: fast path vs plain MONAI loop ({args.size})\n\n"
            f"Command: `{command}`\n\n"
            f"Machine: {machine}\n\n"
            f"Setup: volumes {tuple(prof.spatial_size)}, batch {batch}, {warmup} warm-up + {steps} timed steps per "
            f"case, each case in a fresh process, run {args.repeats}x in alternating order (the table keeps the "
            f"fastest run; 'runs' lists every run's volumes/s); {n_vol} synthetic int16 NIfTI volumes stored at "
            f"{args.native_scale}x the model grid; plain-loop DataLoader workers: {args.workers}; VolumeCache "
            f"storage: {args.storage}. FLOPs per step (forward + backward, FlopCounterMode): "
            + ", ".join(f"{k} {v:.1f} GFLOP" for k, v in {r['model']: r['gflop_per_step'] for r in rows}.items())
            + f". Peak memory: {mem}. Load average at the end: {os.getloadavg()[0]:.2f}.\n\n{table}\n")
    print()
    print(table)
    if not args.no_write:
        name = "p2_pretrain.md" if args.size == "quick" else f"p2_pretrain_{args.size}.md"
        out = atomic_write_text(ROOT / args.results / name, text)
        print(f"\nwrote {out}")


def _run_child(spec: dict, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_case", json.dumps(spec)],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"case {spec['model']} / {spec['case']} failed (exit {proc.returncode})")
    return json.loads(lines[-1][7:])


def _table(rows: list[dict], peak: float | None) -> str:
    lines = [("| model | path | options | volumes/s | s/step | data s/step | TFLOP/s | MFU | peak mem MiB | "
              "decode-once s | speed-up vs plain | runs (volumes/s) |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    base = {r["model"]: r["volumes_per_s"] for r in rows if r["case"] == "plain"}
    for r in rows:
        mfu = f"{100 * r['tflops'] / peak:.1f}%" if peak else "-"
        up = f"{r['volumes_per_s'] / base[r['model']]:.2f}x" if r["model"] in base else "-"
        dec = "-" if r["decode_once_s"] is None else f"{r['decode_once_s']:.2f}"
        flag = "" if r["finite"] else " (non-finite loss!)"
        lines.append(f"| {r['model']} | {r['case']}{flag} | {r['options']} | {r['volumes_per_s']:.2f} | "
                     f"{r['s_per_step']:.3f} | {r['data_s_per_step']:.3f} | {r['tflops']:.4f} | {mfu} | "
                     f"{r['peak_mb']:.0f} | {dec} | {up} | {', '.join(f'{v:.2f}' for v in r['all_volumes_per_s'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
