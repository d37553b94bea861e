"""P2's input corruption (coarse dropout + coarse shuffle): where its time goes, per volume.

The P2 pretext task corrupts every training batch (:class:`mmlib.ssl.InputCorruption`). At the
paper's 224 x 224 x 320 the GPU target leaves about 29 ms per volume for the whole step, so the
corruption must not run on the host. This prints, per volume size, the milliseconds per volume of:

- ``host recipe`` (the CPU default): every box, noise value and permutation drawn on one host
  generator, applied on the CPU;
- ``boxes only``: just the box geometry (the ~100 small integers the device recipe still draws
  on the host): the host's share of the device recipe;
- ``device recipe`` (``draws_on_device=True``) on each device given: on the CPU this is the same
  work as the host recipe; on a GPU the noise and permutations are kernels.

    .venv/bin/python benchmarks/bench_corruption.py --threads 2
    python benchmarks/bench_corruption.py --devices cpu cuda       # on a GPU machine

The table is printed and written to ``results/benchmarks/corruption.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _timing import median_ms

from mmlib import core
from mmlib.ssl import InputCorruption

SIZES = {"quick (64x64x96)": (64, 64, 96), "paper (224x224x320)": (224, 224, 320)}
ROOT = Path(__file__).resolve().parents[1]


def _ms_per_volume(fn, batch: int, repeats: int, device: torch.device) -> float:
    return median_ms(fn, repeats, device) / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=["cpu"], help="devices for the device recipe")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--batch", type=int, default=2, help="volumes per call")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device(d) for d in args.devices]
    corr, on_device = InputCorruption(), InputCorruption(draws_on_device=True)

    rows = []
    for label, shape in SIZES.items():
        x = torch.rand(args.batch, 1, *shape, generator=torch.Generator().manual_seed(0))
        cpu = torch.device("cpu")
        host = _ms_per_volume(lambda x=x: corr(x, seed=1), args.batch, args.repeats, cpu)

        def boxes_only(shape=shape):
            g = torch.Generator().manual_seed(1)
            for _ in range(args.batch):
                corr._boxes(g, shape, corr.dropout_holes, corr.dropout_size)
                corr._boxes(g, shape, corr.shuffle_holes, corr.shuffle_size)

        boxes = _ms_per_volume(boxes_only, args.batch, args.repeats, cpu)
        row = {"volume": label, "host recipe (CPU)": host, "boxes only (host)": boxes}
        for dev in devices:
            xd = x.to(dev)
            row[f"device recipe ({core.device_name(dev)})"] = _ms_per_volume(
                lambda xd=xd: on_device(xd, seed=1), args.batch, args.repeats, dev)
        rows.append(row)

    head = list(rows[0])
    machine = (f"CPU: {core.device_name(torch.device('cpu'))}, torch threads {torch.get_num_threads()}, "
               f"torch {torch.__version__}; batch {args.batch}, median of {args.repeats}; ms per volume")
    lines = [machine,
             "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join([r["volume"]] + [f"{r[k]:.1f}" for k in head[1:]]) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    out = ROOT / "results" / "benchmarks" / "corruption.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
