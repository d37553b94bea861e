"""Occlusion sensitivity: mmlib.explain.occlusion_map vs MONAI's OcclusionSensitivity.

Both occlude every patch of a ``--mask`` grid (no overlap, constant 0 baseline, raw outputs)
of one volume and run a small 3D ResNet on the occluded copies; MONAI builds each copy in a
Python loop through ``sliding_window_inference``, mmlib builds a whole batch with one
vectorised mask. Prints a Markdown table (wall seconds, forward passes, passes per second,
speed-up over MONAI, peak memory, and the largest difference between the two maps, which must be
~0), with the bare network on as many unoccluded copies as a floor for both, and writes it to
``results/benchmarks/occlusion.md``. Peak memory is each method's rise over what was in use just
before it: on CUDA ``torch.cuda.max_memory_allocated`` (reset per method), on CPU the resident set
size sampled every 2 ms from ``/proc/self/statm`` by a background thread (so a spike shorter than
that can be missed):

    .venv/bin/python benchmarks/bench_occlusion.py                      # 64x64x96, mask 4x4x6: 4,096 passes
    .venv/bin/python benchmarks/bench_occlusion.py --shape 32 32 48 --mask 4 4 6 --batch-sizes 16 64
    .venv/bin/python benchmarks/bench_occlusion.py --device cuda --batch-sizes 64 256 1024
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from mmlib import core
from mmlib.explain import occlusion_map
from mmlib.results import atomic_write_text


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory above the level at entry, in MiB: CUDA allocations on a GPU, resident set size on CPU."""

    def __init__(self, device: torch.device, interval_s: float = 0.002) -> None:
        self.device, self.interval_s, self.mib = device, interval_s, 0.0
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:  # hand freed heap back to the OS first, so an earlier method's leftovers do not hide this one's rise
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self._base = self._peak = self._rss()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, self._rss())
                time.sleep(self.interval_s)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._rss())
        self.mib = max(0.0, (peak - self._base) / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 96], help="volume size X Y Z")
    parser.add_argument("--mask", type=int, nargs=3, default=[4, 4, 6], help="occlusion patch size")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256], help="mmlib batch sizes")
    parser.add_argument("--monai-batch", type=int, default=64, help="MONAI n_batch")
    parser.add_argument("--widths", type=int, nargs=4, default=[8, 16, 32, 64], help="ResNet stage widths")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="results/benchmarks")
    args = parser.parse_args()

    from monai.networks.nets import ResNet
    from monai.visualize import OcclusionSensitivity

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    core.seed_everything(args.seed, deterministic=False)
    net = ResNet("basic", [1, 1, 1, 1], list(args.widths), spatial_dims=3, n_input_channels=1, num_classes=2)
    net = net.to(device).eval()
    x = torch.randn(1, 1, *args.shape, device=device)
    shape, mask = tuple(args.shape), tuple(args.mask)

    def forward(batch):
        return net(batch["image"])

    # warm-up: oneDNN / cuDNN choose kernels for each batch shape on first use
    with torch.no_grad():
        for b in sorted({*args.batch_sizes, args.monai_batch}):
            net(x.expand(b, -1, -1, -1, -1).contiguous())
    _sync(device)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's indexing deprecation warnings
        t0 = time.perf_counter()
        with torch.no_grad(), PeakMemory(device) as monai_mem:
            theirs, _ = OcclusionSensitivity(net, mask_size=mask, n_batch=args.monai_batch, overlap=0.0, mode=0.0,
                                             activate=False, verbose=False)(x)
            _sync(device)
        monai_s = time.perf_counter() - t0
    monai_map = torch.as_tensor(theirs)[0].permute(1, 2, 3, 0).float().cpu().numpy()  # (X, Y, Z, K)

    rows = []
    for bs in args.batch_sizes:
        _sync(device)
        t0 = time.perf_counter()
        with PeakMemory(device) as mem:
            res = occlusion_map(forward, {"image": x}, mask_size=mask, batch_size=bs, device=device, desc=None)
            _sync(device)
        wall = time.perf_counter() - t0
        diff = float(np.abs(res.voxel_occluded - monai_map).max())
        rows.append((bs, wall, res.forward_passes, diff, mem.mib))
    passes = rows[0][2]

    # the network alone on the same number of copies (no occlusion, no bookkeeping): the floor for both
    copies = x.expand(args.monai_batch, -1, -1, -1, -1).contiguous()
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad(), PeakMemory(device) as net_mem:
        for i in range(0, passes, args.monai_batch):
            net(copies[: min(args.monai_batch, passes - i)])
        _sync(device)
    net_s = time.perf_counter() - t0

    n_params = sum(p.numel() for p in net.parameters())
    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    lines = [
        f"occlusion sensitivity of one {'x'.join(map(str, shape))} volume, mask {'x'.join(map(str, mask))} "
        f"({passes:,} patches), MONAI ResNet basic 1-1-1-1 widths {'-'.join(map(str, args.widths))} "
        f"({n_params / 1e6:.2f}M parameters), 2 outputs",
        f"device: {device} ({core.device_name(device)}), torch threads: {threads}, "
        f"machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} usable cores; "
        f"torch {torch.__version__}",
        "",
        f"peak memory: rise over the level before each method ({'CUDA allocated' if device.type == 'cuda' else 'RSS'})",
        "",
        "| method | batch | wall s | forward passes | passes / s | speed-up vs MONAI | peak memory MiB "
        "| max abs diff vs MONAI |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| MONAI OcclusionSensitivity | {args.monai_batch} | {monai_s:.2f} | {passes:,} | {passes / monai_s:,.0f} "
        f"| 1.00x | {monai_mem.mib:,.0f} | - |",
    ]
    lines.append(f"| network forward only (floor) | {args.monai_batch} | {net_s:.2f} | {passes:,} | "
                 f"{passes / net_s:,.0f} | {monai_s / net_s:.2f}x | {net_mem.mib:,.0f} | - |")
    for bs, wall, n, diff, mib in rows:
        lines.append(f"| mmlib occlusion_map | {bs} | {wall:.2f} | {n:,} | {n / wall:,.0f} | {monai_s / wall:.2f}x "
                     f"| {mib:,.0f} | {diff:.1e} |")
    text = "\n".join(lines)
    print(text)
    dest = Path(args.results) / "occlusion.md"
    atomic_write_text(dest, text + "\n")
    print(f"\nwritten: {dest}")
    worst = max(r[3] for r in rows)
    if worst > 1e-4:
        raise SystemExit(f"maps differ from MONAI's by up to {worst:.2e}")


if __name__ == "__main__":
    main()
