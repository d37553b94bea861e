"""fp32 vs bf16 autocast on this machine's CPU (and GPU if present): matmul, Conv3d, training step.

Prints a Markdown table of median milliseconds per call and the speed-up of bf16. The
decision in mmlib.core.autocast_dtype ("auto" = bf16 where the hardware runs it natively)
rests on these numbers, so re-run it on new hardware:

    .venv/bin/python benchmarks/bench_precision.py [--device cpu|cuda] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmlib import core


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (oneDNN / cuDNN pick kernels on the first call)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    dev = core.select_device(args.device)
    core.seed_everything(0)

    a, b = torch.randn(2048, 2048, device=dev), torch.randn(2048, 2048, device=dev)
    conv = torch.nn.Conv3d(32, 64, 3, padding=1).to(dev)
    vol = torch.randn(2, 32, 32, 32, 32, device=dev)
    stem = torch.nn.Conv3d(1, 64, 7, stride=2, padding=3).to(dev)
    img = torch.randn(2, 1, 96, 96, 96, device=dev)
    mlp = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 128)).to(dev)
    tab = torch.randn(256, 2048, device=dev)

    def train_step():
        out = conv(vol).mean() + mlp(tab).mean()
        out.backward()

    # the quick profiles' own networks: narrow 3D convolutions, where oneDNN's bf16 kernels lose
    from mmlib.models.autoencoders import ResNetAutoEnc
    from mmlib.models.clip import ResNet3dEncoder

    p1_net = ResNet3dEncoder(widths=(8, 16, 32, 64), layers=(1, 1, 1, 1)).to(dev)  # P1 quick image encoder
    p1_img = torch.randn(16, 1, 40, 48, 40, device=dev)
    p2_net = ResNetAutoEnc(widths=(16, 32, 64, 128), layers=(2, 2, 2, 2)).to(dev)  # P2 quick ResNetAutoEnc
    p2_img = torch.randn(4, 1, 64, 64, 96, device=dev)

    def p1_step():
        p1_net(p1_img)["features"].float().mean().backward()

    def p2_step():
        p2_net(p2_img).float().mean().backward()

    cases = {
        "matmul 2048x2048": lambda: a @ b,
        "Conv3d 32->64 k3 on 2x32^3 (forward)": lambda: conv(vol),
        "Conv3d 1->64 k7 s2 on 2x96^3 (forward)": lambda: stem(img),
        "Conv3d + MLP (forward + backward)": train_step,
        "P1 quick image encoder, batch 16 of 40x48x40 (forward + backward)": p1_step,
        "P2 quick ResNetAutoEnc, batch 4 of 64x64x96 (forward + backward)": p2_step,
    }
    print(f"device: {dev} ({core.device_name(dev)}), CPU bf16 instructions: {core.cpu_supports_bf16()}, "
          f"threads: {torch.get_num_threads()}, auto autocast: {core.autocast_dtype(dev)}")
    print()
    print("| operation | fp32 ms | bf16 autocast ms | speed-up |")
    print("|---|---:|---:|---:|")
    for label, fn in cases.items():
        with torch.set_grad_enabled(label.endswith("backward)")):
            fp32 = _time(fn, args.repeats, dev)
            with core.autocast(dev, "bf16"):
                bf16 = _time(fn, args.repeats, dev)
        print(f"| {label} | {fp32:.1f} | {bf16:.1f} | {fp32 / bf16:.2f}x |")


if __name__ == "__main__":
    main()
