"""Self-supervised pretraining by corrupted-input reconstruction (P2 section 3.1, after Tang et al. 2022).

The autoencoder sees a corrupted copy of the volume (coarse dropout: boxes filled with random
intensities; coarse shuffle: voxels permuted inside boxes) and is scored with L1 against the
**clean** volume, so it must learn anatomy to fill the holes. The corruptions follow MONAI's
``RandCoarseDropout`` and ``RandCoarseShuffle``, re-implemented with torch because MONAI's took
about 3 s per 64x64x96 volume on two CPU cores. Box sizes are fractions of the volume, so the
same recipe works at every profile's resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["InputCorruption", "reconstruction_loss"]


@dataclass(frozen=True)
class InputCorruption:
    """Coarse dropout then coarse shuffle, drawn independently per sample.

    The semantics of MONAI's ``RandCoarseDropout(dropout_holes=True, fill_value=None)`` and
    ``RandCoarseShuffle`` (the SSL recipe of Tang et al.), written with torch so that a batch
    of 3D volumes is corrupted in milliseconds rather than seconds: between ``holes`` and
    ``2 x holes`` boxes, each edge a uniform fraction of its axis; dropped boxes are filled with
    uniform noise between the volume's minimum and maximum; shuffled boxes have their voxels
    permuted (per channel).

    Args:
        dropout_holes: boxes dropped per volume (at least; up to twice as many).
        dropout_size: box edge as a fraction of each axis, (min, max).
        shuffle_holes: boxes whose voxels are shuffled.
        shuffle_size: shuffle box edge as a fraction of each axis, (min, max).
        shuffle_prob: probability that a volume is shuffled at all.
        draws_on_device: where the noise values and permutations are drawn. ``None`` (default):
            on the images' device when that is not the CPU. Corrupting a 224 x 224 x 320 volume
            on the host took 29 ms on 2 CPU cores (46 ms on one), about the whole per-volume
            step budget of the 34 volumes/s GPU target, and all but 0.4 ms of it is drawing and
            writing noise and permutations (``benchmarks/bench_corruption.py``). On the device
            those are kernels; the host only draws the boxes (about 100 small integers) and
            launches them, with no device-to-host sync. The CPU default keeps every
            draw on one CPU generator, as before; ``True`` forces the device recipe (a second
            generator for the values) on any device, which is how the tests check it on a CPU.
            The two recipes corrupt alike but draw differently, so a seed gives different boxes.
    """

    dropout_holes: int = 6
    dropout_size: tuple[float, float] = (0.05, 0.25)
    shuffle_holes: int = 10
    shuffle_size: tuple[float, float] = (0.04, 0.12)
    shuffle_prob: float = 0.8
    draws_on_device: bool | None = None

    def __post_init__(self) -> None:
        for name in ("dropout_size", "shuffle_size"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi < 1:
                raise ValueError(f"{name} must be fractions 0 < min <= max < 1, got {(lo, hi)}")
        if self.dropout_holes < 0 or self.shuffle_holes < 0 or not 0 <= self.shuffle_prob <= 1:
            raise ValueError(f"invalid corruption settings: {self}")

    @staticmethod
    def _boxes(g: torch.Generator, spatial: Sequence[int], holes: int, size: tuple[float, float]) -> list[tuple[slice, ...]]:
        n = int(torch.randint(holes, 2 * holes + 1, (1,), generator=g))
        boxes = []
        for _ in range(n):
            sl = []
            for s in spatial:
                lo, hi = max(1, round(size[0] * s)), max(1, round(size[1] * s))
                e = int(torch.randint(lo, hi + 1, (1,), generator=g))
                start = int(torch.randint(0, s - e + 1, (1,), generator=g))
                sl.append(slice(start, start + e))
            boxes.append(tuple(sl))
        return boxes

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        """A corrupted copy of ``images`` (B, C, X, Y, Z); the input is left untouched.

        ``seed`` fixes the draws (the pipeline passes one per epoch and batch).
        """
        if images.ndim != 5:
            raise ValueError(f"InputCorruption expects (B, C, X, Y, Z), got {tuple(images.shape)}")
        g = torch.Generator().manual_seed(int(seed))
        out = images.detach().clone()
        spatial = tuple(images.shape[2:])
        dev = images.device
        on_device = self.draws_on_device if self.draws_on_device is not None else dev.type != "cpu"
        if on_device:  # box geometry from g (host), values and permutations from gv (device)
            gv = torch.Generator(device=dev).manual_seed(int(seed) * 2 + 1)
        for b in range(out.shape[0]):
            vol = out[b]
            if on_device:
                lo, hi = vol.amin().float(), vol.amax().float()  # 0-d tensors: no host sync
                for sl in self._boxes(g, spatial, self.dropout_holes, self.dropout_size):
                    box = vol[(slice(None), *sl)]
                    noise = torch.rand(box.shape, generator=gv, dtype=torch.float32, device=dev) * (hi - lo) + lo
                    box.copy_(noise)
                if self.shuffle_holes and float(torch.rand((), generator=g)) < self.shuffle_prob:
                    for sl in self._boxes(g, spatial, self.shuffle_holes, self.shuffle_size):
                        box = vol[(slice(None), *sl)]
                        flat = box.reshape(box.shape[0], -1)
                        perm = torch.randperm(flat.shape[1], generator=gv, device=dev)
                        box.copy_(flat[:, perm].reshape(box.shape))
                continue
            lo, hi = float(vol.min()), float(vol.max())
            for sl in self._boxes(g, spatial, self.dropout_holes, self.dropout_size):
                box = vol[(slice(None), *sl)]
                noise = torch.rand(box.shape, generator=g, dtype=torch.float32) * (hi - lo) + lo
                vol[(slice(None), *sl)] = noise.to(vol.dtype)
            if self.shuffle_holes and float(torch.rand((), generator=g)) < self.shuffle_prob:
                for sl in self._boxes(g, spatial, self.shuffle_holes, self.shuffle_size):
                    box = vol[(slice(None), *sl)]
                    flat = box.reshape(box.shape[0], -1)
                    perm = torch.randperm(flat.shape[1], generator=g)
                    vol[(slice(None), *sl)] = flat[:, perm].reshape(box.shape)
        return out


def reconstruction_loss(model: nn.Module, clean: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
    """L1 between the reconstruction of the corrupted input and the clean volume."""
    recon = model(corrupted)
    return nn.functional.l1_loss(recon.float(), clean.float())
