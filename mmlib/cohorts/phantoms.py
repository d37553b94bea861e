"""Small building blocks of the phantoms: grids in millimetres, shapes, smooth random fields,
smooth deformations and the survival-time draw. numpy/scipy only (they run in worker processes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "deform",
    "ellipsoid",
    "grid_mm",
    "ras_affine",
    "smooth_field",
    "tube",
    "weibull_ph_times",
]


def ras_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """A RAS+ voxel-to-mm affine with isotropic axes along x, y, z and the volume centred on 0."""
    spacing = np.asarray(spacing, dtype=float)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -spacing * (np.asarray(shape, dtype=float) - 1) / 2
    return affine


def grid_mm(shape: Sequence[int], spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World coordinates (mm, centred on 0) of every voxel, as three broadcastable arrays."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    return tuple(np.meshgrid(*axes, indexing="ij", sparse=True))  # type: ignore[return-value]


def ellipsoid(grid: Sequence[np.ndarray], center: Sequence[float], radii: Sequence[float], soft: float = 0.0) -> np.ndarray:
    """Inside-ness of an axis-aligned ellipsoid: 1 inside, 0 outside (a sigmoid edge if ``soft`` > 0, in mm)."""
    r = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grid, center, radii, strict=True)))
    if soft <= 0:
        return (r <= 1.0).astype(np.float32)
    scale = float(np.mean(radii))
    return (1.0 / (1.0 + np.exp((r - 1.0) * scale / soft))).astype(np.float32)


def tube(grid: Sequence[np.ndarray], points: np.ndarray, radius: float | np.ndarray) -> np.ndarray:
    """Distance-based tube along a polyline of ``points`` (K, 3) in mm; 1 inside ``radius`` (mm).

    ``radius`` may be one value or one per point (a narrowing, e.g. a stenosis).
    """
    points = np.asarray(points, dtype=float)
    radii = np.broadcast_to(np.asarray(radius, dtype=float), (len(points),))
    inside = np.zeros(np.broadcast_shapes(*(g.shape for g in grid)), dtype=bool)
    for p, r in zip(points, radii, strict=True):
        inside |= sum((g - c) ** 2 for g, c in zip(grid, p, strict=True)) <= r * r
    return inside.astype(np.float32)


def smooth_field(shape: Sequence[int], rng: np.random.Generator, sigma_vox: float, amplitude: float = 1.0) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to standard deviation ``amplitude`` (float32)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="wrap")
    sd = float(field.std()) or 1.0
    return (field * (amplitude / sd)).astype(np.float32)


def deform(
    volumes: Sequence[np.ndarray],
    rng: np.random.Generator,
    sigma_vox: float,
    magnitude_vox: float,
    orders: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Warp several aligned volumes with one smooth random displacement field.

    Args:
        volumes: arrays of one shape (e.g. an image and its masks).
        sigma_vox: smoothness of the field (voxels); magnitude_vox: its standard deviation.
        orders: spline order per volume (1 for images, 0 for label masks).
    """
    shape = volumes[0].shape
    orders = list(orders) if orders is not None else [1] * len(volumes)
    # the field is drawn on a coarse grid and upsampled: same smoothness, far less work
    coarse = tuple(max(4, int(np.ceil(n / max(sigma_vox, 1.0)))) for n in shape)
    disp = [
        ndimage.zoom(smooth_field(coarse, rng, 1.0, magnitude_vox), [n / c for n, c in zip(shape, coarse, strict=True)], order=1)
        for _ in shape
    ]
    coords = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    warped_coords = [c + d[tuple(slice(0, n) for n in shape)] for c, d in zip(coords, disp, strict=True)]
    return [
        ndimage.map_coordinates(v, warped_coords, order=o, mode="nearest").astype(v.dtype)
        for v, o in zip(volumes, orders, strict=True)
    ]


def weibull_ph_times(
    linear_predictor: np.ndarray, rng: np.random.Generator, *, scale: float, shape: float = 1.0
) -> np.ndarray:
    """Event times from a Weibull proportional-hazards model (Bender et al., 2005).

    Hazard h(t | x) = h0(t) exp(lp) with h0 the Weibull(scale, shape) baseline; so the true
    log hazard ratio of a covariate is exactly its coefficient in ``linear_predictor``.
    """
    u = rng.random(np.shape(linear_predictor))
    return scale * (-np.log(u) * np.exp(-np.asarray(linear_predictor))) ** (1.0 / shape)
