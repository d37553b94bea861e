"""Generated head-and-neck CTA cohort for P2 (stroke relapse from 3D CTA + 4 attributes).

Stands in for the paper's private Innsbruck CTA cohort (491 stroke patients, 119 of them in the
fine-tuning subset). The causal model, per subject:

- attributes: age ~ N(68, 11) years, male ~ Bernoulli(0.64), CHD ~ Bernoulli(0.24),
  PAD ~ Bernoulli(0.20);
- carotid plaque severity (% lumen narrowing, 0-90) at the bifurcation on the side(s)
  ``plaque_side``: ``severity = 90 * sigmoid(b0 + plaque_risk * r . x + e)``, ``e ~ N(0, 1)``,
  where ``x`` are the centred attributes (older, male, CHD, PAD -> worse plaque);
- relapse hazard, Weibull proportional hazards (:func:`phantoms.weibull_ph_times`):
  ``log h(t) = log h0(t) + tabular_signal * beta . x + image_signal * z(severity)``, so
  ``image_signal`` is the log hazard ratio per SD of severity;
- follow-up: administrative censoring (inclusion spread over the study years) and random loss to
  follow-up (``censoring`` per year); RFS = min(relapse time, censoring), relapse = event;
- the paper's fine-tuning selection (relapse with RFS < 1642 d, or no relapse with RFS in
  [1825, 2555] d) and its label ``relapse_within_kappa`` (relapse with RFS < kappa = 1642 d).

The CTA carries the severity: the internal carotid origin is narrowed by a soft plaque with a
calcified crescent that grows with severity, and a plaque mask (1 soft, 2 calcified) is saved.
Volumes are drawn analytically, slab by slab, in a template space bent by a smooth per-subject
deformation, so a worker holds a few slabs and one int16 volume whatever the size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mmlib.cohorts import phantoms
from mmlib.cohorts.base import CohortGenerator, CohortKnobs, CohortPlan, SubjectFiles
from mmlib.core import ProfileSet, get_logger
from mmlib.data.manifest import Column, Manifest, Modality, Survival

__all__ = [
    "PRESETS",
    "Knobs",
    "StrokeCTA",
    "finetune_rule",
    "planted_effect_checks",
    "plaque_load",
    "tour_figures",
    "vessel_mip_volume",
]

log = get_logger(__name__)

KAPPA_DAYS = 1642  # the paper's relapse threshold kappa
NON_RELAPSE_WINDOW = (1825, 2555)  # RFS window of the non-relapse fine-tuning patients (days)
WEIBULL_SHAPE = 0.8  # < 1: the relapse hazard is highest soon after the index stroke
AGE_MEAN, AGE_SD = 68.0, 11.0
P_MALE, P_CHD, P_PAD = 0.64, 0.24, 0.20
# planted log hazard ratios at tabular_signal = 1 (age per SD; male, CHD, PAD vs not)
HAZARD_BETA = {"age_per_sd": 0.6, "male": 0.5, "chd": 0.6, "pad": 0.7}
# the attributes' effect on the severity logit at plaque_risk = 1 (same units)
SEVERITY_BETA = {"age_per_sd": 0.35, "male": 0.25, "chd": 0.35, "pad": 0.45}
SEVERITY_INTERCEPT, SEVERITY_NOISE = -1.1, 1.0
SLAB_VOXELS = 1 << 21  # voxels rendered at once (8 MB per float32 temporary)
HU_AIR, HU_FAT, HU_MUSCLE, HU_BRAIN, HU_CSF = -1000.0, -100.0, 50.0, 35.0, 8.0
HU_CORTICAL, HU_CANCELLOUS, HU_DISC, HU_VEIN, HU_SOFT_PLAQUE = 1250.0, 240.0, 80.0, 160.0, 45.0


@dataclass(frozen=True)
class Knobs(CohortKnobs):
    """Knobs of the stroke CTA cohort; override by keyword, e.g. ``StrokeCTA("quick", image_signal=0)``."""

    n_subjects: int = 491  # patients in the pretraining pool
    volume_shape: tuple[int, int, int] = (64, 64, 96)  # CTA voxels (x, y, z)
    spacing_mm: tuple[float, float, float] = (3.5, 3.5, 3.5)  # voxel size (x, y, z), mm
    image_signal: float = 0.8  # log hazard ratio of relapse per SD of plaque severity; 0: the image carries none
    tabular_signal: float = 1.0  # multiplies the planted attribute log hazard ratios (HAZARD_BETA); 0: none
    plaque_risk: float = 1.0  # multiplies the attributes' effect on the severity logit (SEVERITY_BETA)
    plaque_side: str = "left"  # carotid with the plaque: "left" | "right" | "both" (same severity)
    noise_sd: float = 12.0  # scanner noise, HU (white Gaussian)
    contrast_hu: float = 380.0  # mean arterial enhancement, HU (per subject SD 35 HU)
    deformation_mm: float = 4.0  # amplitude of the smooth neck bending (in-plane shift varying with z), mm
    relapse_5y: float = 0.055  # relapse probability by 5 years at average attributes and severity
    follow_up_days: tuple[float, float] = (180.0, 4400.0)  # administrative follow-up, uniform in (days)
    censoring: float = 0.03  # yearly probability of loss to follow-up (exponential)


PRESETS = ProfileSet(
    # smoke: more relapses than the paper, so 160 subjects fill every split with both outcomes
    smoke=Knobs(name="smoke", n_subjects=160, volume_shape=(32, 32, 48), spacing_mm=(7.0, 7.0, 7.0), relapse_5y=0.2),
    quick=Knobs(name="quick"),
    full=Knobs(name="full", n_subjects=491, volume_shape=(224, 224, 320), spacing_mm=(1.0, 1.0, 1.0)),
)
presets = PRESETS

Point = tuple[float, float, float]
Segment = tuple[Point, Point, float, float]  # capsule: end points (mm) and radii (mm)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _soft(signed_mm: np.ndarray, edge_mm: float) -> np.ndarray:
    """Partial-volume fraction from a signed distance (mm, > 0 inside), ramping over one voxel."""
    return np.clip(0.5 + signed_mm / edge_mm, 0.0, 1.0)


def _floats(v: Any) -> Point:
    # Python floats, not numpy float64 scalars: they keep the float32 arithmetic float32
    return tuple(float(c) for c in v)  # type: ignore[return-value]


def _polyline(points: Sequence[Sequence[float]], r0: float, r1: float | None = None) -> list[Segment]:
    """Capsule segments along ``points`` (mm), the radius tapering from r0 to r1 (mm)."""
    pts = [_floats(p) for p in points]
    radii = [float(r) for r in np.linspace(r0, r0 if r1 is None else r1, len(pts))]
    return [(pts[i], pts[i + 1], radii[i], radii[i + 1]) for i in range(len(pts) - 1)]


@dataclass
class _Plaque:
    """One stenosis, from the bifurcation ``base`` along the unit ``axis`` for ``length`` mm."""

    base: Point
    axis: Point
    toward: Point  # unit vector perpendicular to the axis: the plaque's thick (medial) side
    length: float
    radius: float  # lumen radius of the healthy bulb, mm
    severity: float  # % lumen narrowing


def _anatomy(row: dict[str, Any], side: str) -> tuple[list[Segment], list[Segment], list[_Plaque]]:
    """Template-space arteries, veins and plaques of one subject (mm, RAS+: right is x > 0)."""
    xc, yc, zb = row["carotid_x_mm"], row["carotid_y_mm"], row["bifurcation_z_mm"]
    zh, az = row["head_z_mm"], 76.0 * row["head_scale"]
    zsb, zw = zh - 0.55 * az, zh - 0.2 * az  # skull base, circle of Willis
    ring = [(13 * np.cos(a), -2 + 15 * np.sin(a), zw) for a in np.linspace(0, 2 * np.pi, 17)]
    arteries = _polyline(ring, 1.3) + _polyline([(0, -18, zsb + 18), (0, -14, zw - 4), (0, -9, zw)], 1.9, 1.6)
    veins: list[Segment] = []
    plaques: list[_Plaque] = []
    for s in (1.0, -1.0):  # +1: the subject's right, -1: left
        b = np.array([s * xc, yc, zb])  # carotid bifurcation
        bulb = b + np.array([-s * 1.0, -4.0, 14.0])
        arteries += _polyline([(s * xc, yc, -190), (s * (xc + 1), yc + 1, (zb - 190) / 2), b], 3.6)  # common carotid
        arteries += _polyline([b, bulb], 4.3)  # carotid bulb, the internal carotid's origin
        ica = [bulb, (s * (xc - 3), yc - 8, zb + 45), (s * 19, 2, zsb), (s * 17, 12, zsb + 14), (s * 15, 4, zw - 2)]
        arteries += _polyline([*ica, (s * 13, 0, zw)], 2.9, 2.2)
        arteries += _polyline([b, (s * (xc - 2), yc + 8, zb + 15), (s * (xc + 4), yc + 18, zb + 45)], 2.3, 1.6)  # ECA
        arteries += _polyline([(s * (xc - 2), yc + 8, zb + 15), (s * (xc + 14), yc + 34, zb + 38)], 1.6, 1.2)  # facial
        vertebral = [(s * 19, -17, -190), (s * 19, -18, zsb - 10), (s * 24, -26, zsb), (s * 7, -22, zsb + 12)]
        arteries += _polyline([*vertebral, (0, -18, zsb + 18)], 2.1, 1.9)
        mca = [(s * 12, 2, zw), (s * 30, 6, zw + 2), (s * 48, 2, zw + 12), (s * 58, -15, zw + 30)]
        arteries += _polyline(mca, 1.6, 1.0)
        arteries += _polyline([(s * 48, 2, zw + 12), (s * 58, 22, zw + 26)], 1.2, 1.0)  # MCA branches
        aca = [(s * 5, 13, zw), (s * 3, 30, zw + 10), (s * 3, 45, zw + 35), (s * 3, 20, zw + 62)]
        arteries += _polyline(aca, 1.3, 1.0)
        pca = [(0, -9, zw), (s * 12, -15, zw), (s * 30, -42, zw + 8), (s * 34, -62, zw + 20)]
        arteries += _polyline(pca, 1.4, 1.0)
        jugular = [(s * (xc + 11), yc - 4, -190), (s * (xc + 9), yc - 6, zb + 30), (s * 30, -16, zsb)]
        veins += _polyline(jugular, 5.5, 4.5)
        if side == "both" or (side == "right") == (s > 0):
            axis = (bulb - b) / np.linalg.norm(bulb - b)
            toward = np.array([-s, 0.0, 0.0]) - (-s * axis[0]) * axis
            sev = float(row["severity_pct"])
            plaques.append(_Plaque(_floats(b), _floats(axis), _floats(toward / np.linalg.norm(toward)),
                                   8.0 + 14.0 * sev / 90, 4.3, sev))
    return arteries, veins, plaques


class _Slab:
    """Template coordinates of one z-slab of a subject's volume.

    The deformation is in-plane (neck bending, body size), so template z is world z and the
    coordinates stay sparse: xt (nx, 1, nk), yt (1, ny, nk), zt (1, 1, nk), float32 mm.
    """

    def __init__(self, world: Sequence[np.ndarray], shift: Sequence[np.ndarray], scale: float, edge: float) -> None:
        xw, yw, zw = world
        self.xt = ((xw[:, None, None] - shift[0][None, None, :]) / np.float32(scale)).astype(np.float32)
        self.yt = ((yw[None, :, None] - shift[1][None, None, :]) / np.float32(scale)).astype(np.float32)
        self.zt = zw[None, None, :].astype(np.float32)
        self.shape = (len(xw), len(yw), len(zw))
        self.edge = edge / scale  # one voxel in template mm: the partial-volume ramp
        self._axes = [(float(a[0]), float(a[1] - a[0]) if len(a) > 1 else 1.0, len(a)) for a in world]
        self._shift, self._scale = shift, scale

    def _range(self, axis: int, lo: float, hi: float) -> slice | None:
        first, step, n = self._axes[axis]
        i0, i1 = max(0, int(np.ceil((lo - first) / step))), min(n, int(np.floor((hi - first) / step)) + 1)
        return slice(i0, i1) if i1 > i0 else None

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Voxel slices of this slab covering the template-space box [lo, hi] (mm); None if outside."""
        pad = 2 * self.edge
        ks = self._range(2, lo[2] - pad, hi[2] + pad)
        if ks is None:
            return None
        ij = []
        for axis in (0, 1):  # world = template * scale + shift(z)
            sh = self._shift[axis][ks]
            r = self._range(axis, (lo[axis] - pad) * self._scale + float(sh.min()),
                            (hi[axis] + pad) * self._scale + float(sh.max()))
            if r is None:
                return None
            ij.append(r)
        return ij[0], ij[1], ks

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.xt[box[0], :, box[2]], self.yt[:, box[1], box[2]], self.zt[:, :, box[2]]


def _mix(hu: np.ndarray, box: tuple[slice, ...], value: float | np.ndarray, frac: np.ndarray) -> None:
    """Partial-volume paint in place: hu <- hu + (value - hu) * frac inside ``box``."""
    sub = hu[box]
    sub += (value - sub) * frac


def _capsules(slab: _Slab, hu: np.ndarray, segments: list[Segment], value: float, gradient: float = 0.0) -> None:
    """Paint tubes of HU ``value`` along ``segments``, each evaluated in its own bounding box.

    Args:
        gradient: relative change of ``value`` per 160 mm of z (contrast bolus timing).
    """
    for p0, p1, r0, r1 in segments:
        r = max(r0, r1)
        box = slab.box(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r)
        if box is None:
            continue
        x, y, z = slab.coords(box)
        qx, qy, qz = x - p0[0], y - p0[1], z - p0[2]
        v = (p1[0] - p0[0], p1[1] - p0[1], p1[2] - p0[2])
        inv_len2 = 1.0 / max(v[0] ** 2 + v[1] ** 2 + v[2] ** 2, 1e-6)
        t = np.clip((qx * v[0] + qy * v[1] + qz * v[2]) * inv_len2, 0.0, 1.0)
        dist = np.sqrt((qx - t * v[0]) ** 2 + (qy - t * v[1]) ** 2 + (qz - t * v[2]) ** 2)
        hu_value = value * (1.0 + gradient * z / 160.0) if gradient else value
        _mix(hu, box, hu_value, _soft(r0 + t * (r1 - r0) - dist, slab.edge))


def _paint_plaque(slab: _Slab, pl: _Plaque, hu: np.ndarray, lab: np.ndarray) -> None:
    """Paint one plaque (soft wall, calcified crescent) into ``hu`` and its labels into ``lab``.

    The lumen narrows by ``severity`` % (eccentric, pushed away from the plaque) over a smooth
    bump along the axis, the wall remodels outward, and a crescent on the thick side calcifies
    (none below 20% severity; its arc and share grow with severity). Labels: 1 where >= 40% of
    the voxel is plaque, 2 where that plaque is mostly calcified.
    """
    end = np.add(pl.base, np.multiply(pl.length, pl.axis))
    reach = pl.radius + 4.0
    box = slab.box(np.minimum(pl.base, end) - reach, np.maximum(pl.base, end) + reach)
    if box is None:
        return
    x, y, z = slab.coords(box)
    q = (x - pl.base[0], y - pl.base[1], z - pl.base[2])
    t = q[0] * pl.axis[0] + q[1] * pl.axis[1] + q[2] * pl.axis[2]
    bump = np.where((t > 0) & (t < pl.length), np.sin(np.pi * np.clip(t, 0, pl.length) / pl.length) ** 2, 0.0)
    vx, vy, vz = (q[i] - t * pl.axis[i] for i in range(3))
    dist = np.sqrt(vx * vx + vy * vy + vz * vz)
    along = vx * pl.toward[0] + vy * pl.toward[1] + vz * pl.toward[2]
    lumen = pl.radius * (1.0 - pl.severity / 100.0 * bump)
    shift = 0.6 * (pl.radius - lumen)
    d_lumen = np.sqrt(np.maximum(dist * dist + 2 * shift * along + shift * shift, 0.0))
    outer = pl.radius + (1.0 + 2.5 * pl.severity / 90.0) * bump
    frac = np.clip(_soft(outer - dist, slab.edge) - _soft(lumen - d_lumen, slab.edge), 0.0, 1.0)
    half_arc = np.pi * (0.12 + 0.45 * pl.severity / 90.0)
    cosang = along / np.maximum(dist, 1e-3)
    calc = np.clip((cosang - np.cos(half_arc)) / 0.3 + 0.5, 0.0, 1.0) * np.clip((pl.severity - 20.0) / 40.0, 0.0, 1.0)
    calc_hu = 700.0 + 600.0 * pl.severity / 90.0
    _mix(hu, box, HU_SOFT_PLAQUE + (calc_hu - HU_SOFT_PLAQUE) * calc, frac)
    inside = frac >= 0.4
    sub = lab[box]
    sub[inside] = np.where(calc[inside] >= 0.5, 2, 1)


def _render_slab(
    subj: dict[str, Any], slab: _Slab, anatomy: tuple, look: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """HU (float32, before noise) and plaque labels (uint8) of one slab, both (nx, ny, nk).

    Args:
        anatomy: (arteries, veins, plaques) from :func:`_anatomy`.
        look: per-subject appearance: contrast ``gradient``, ``bias`` amplitudes, vertebral ``phase``.
    """
    e = slab.edge
    hu = np.full(slab.shape, HU_AIR, np.float32)
    zh, hs, zb = float(subj["head_z_mm"]), float(subj["head_scale"]), float(subj["bifurcation_z_mm"])
    ax, ay, az = 72.0 * hs, 90.0 * hs, 76.0 * hs
    # neck: elliptic cylinder widening into the shoulders below and toward the jaw above the bifurcation
    top = zh - 0.3 * az
    if (box := slab.box((-135, -65, -1e3), (135, 80, top))) is not None:
        x, y, z = slab.coords(box)
        jaw = np.clip((z - zb) / 30.0, 0.0, 1.0)
        half_width = 55.0 + 0.8 * np.maximum(0.0, -110.0 - z)
        rho = np.sqrt((x / half_width) ** 2 + ((y + 5.0 - 15.0 * jaw) / (58.0 + 8.0 * jaw)) ** 2)
        below = _soft(top - z, e)
        _mix(hu, box, HU_FAT, _soft((1 - rho) * 55.0, e) * below)
        _mix(hu, box, HU_MUSCLE, _soft((1 - rho) * 55.0 - 8.0, e) * below)  # 8 mm of subcutaneous fat
    # cervical spine: vertebral bodies (cortical rim, cancellous core, discs), posterior arch, cord
    spine_top = zh - 0.6 * az
    if (box := slab.box((-21, -50, -1e3), (21, 2, spine_top))) is not None:
        x, y, z = slab.coords(box)
        below = _soft(spine_top - z, e)
        disc = ((z - look["phase"]) % 20.0 < 5.0).astype(np.float32)
        r_body = np.sqrt(x * x + (y + 12.0) ** 2)
        _mix(hu, box, HU_CORTICAL * 0.75, _soft(13.0 - r_body, e) * below)
        _mix(hu, box, HU_CANCELLOUS * (1 - disc) + HU_DISC * disc, _soft(11.0 - r_body, e) * below)
        arch = _soft((1 - np.sqrt((x / 16.0) ** 2 + ((y + 43.0) / 5.0) ** 2)) * 5.0, e)
        _mix(hu, box, HU_CORTICAL * 0.7, arch * below * (1 - disc))
        _mix(hu, box, 30.0, _soft(7.0 - np.sqrt(x * x + (y + 32.0) ** 2), e) * below)
    # trachea (air), ending just above the bifurcation
    if (box := slab.box((-9, 21, -1e3), (9, 39, zb + 5))) is not None:
        x, y, z = slab.coords(box)
        _mix(hu, box, HU_AIR, _soft(8.0 - np.sqrt(x * x + (y - 30.0) ** 2), e) * _soft(zb + 5.0 - z, e))
    # head over the neck: ellipsoid (signed distance ~ (1 - rho) * radius), 4 mm scalp, 6 mm skull
    # whose lower cap is cut into an 11 mm skull base, brain, lateral ventricles
    if (box := slab.box((-ax, 5 - ay, zh - az), (ax, 5 + ay, zh + az))) is not None:
        x, y, z = slab.coords(box)
        sd = (1 - np.sqrt((x / ax) ** 2 + ((y - 5.0) / ay) ** 2 + ((z - zh) / az) ** 2)) * ax
        sub = hu[box]
        np.maximum(sub, HU_AIR + (HU_FAT - HU_AIR) * _soft(sd, e), out=sub)  # air -> scalp; the neck stays
        _mix(hu, box, HU_CORTICAL, _soft(sd - 4.0, e) * _soft(z - (zh - 0.75 * az), e))
        _mix(hu, box, HU_BRAIN, _soft(sd - 10.0, e) * _soft(z - (zh - 0.6 * az), e))
        for s in (-1.0, 1.0):
            if (vb := slab.box((8 * s - 6, -20, zh - 5), (8 * s + 6, 20, zh + 15))) is not None:
                x, y, z = slab.coords(vb)
                rho = np.sqrt(((x - 8 * s) / 6.0) ** 2 + (y / 20.0) ** 2 + ((z - zh - 5) / 10.0) ** 2)
                _mix(hu, vb, HU_CSF, _soft((1 - rho) * 6.0, e))
    zm = zb + 28.0  # mandible: ramus, angle, body to the chin
    for s in (-1.0, 1.0):
        mandible = [(s * 46, 0, zm + 38), (s * 48, 5, zm), (s * 38, 40, zm - 8), (0, 62, zm - 12)]
        _capsules(slab, hu, _polyline(mandible, 5.5), HU_CORTICAL)
    arteries, veins, plaques = anatomy
    _capsules(slab, hu, veins, HU_VEIN)
    _capsules(slab, hu, arteries, float(subj["contrast_hu"]), look["gradient"])
    lab = np.zeros(slab.shape, np.uint8)
    for pl in plaques:
        _paint_plaque(slab, pl, hu, lab)
    b = look["bias"]  # low-frequency bias (beam hardening, scatter), a few HU
    hu += (b[0] * np.cos(slab.xt / 60.0)) + (b[1] * np.sin(slab.yt / 70.0)) + (b[2] * np.cos(slab.zt / 90.0))
    return hu, lab


class StrokeCTA(CohortGenerator):
    """P2's cohort: head-and-neck CTA (HU) with a carotid plaque, 4 attributes and relapse-free survival."""

    name = "stroke_cta"
    paper = "P2"
    description = "Head-and-neck CTA with a planted carotid plaque, age/gender/CHD/PAD and relapse-free survival"
    presets = PRESETS
    knobs: Knobs

    def __init__(self, preset: str = "quick", **knobs: Any) -> None:
        super().__init__(preset, **knobs)
        k = self.knobs
        if k.plaque_side not in ("left", "right", "both"):
            raise ValueError(f"plaque_side must be 'left', 'right' or 'both', got {k.plaque_side!r}")
        if len(k.volume_shape) != 3 or len(k.spacing_mm) != 3:
            raise ValueError(f"volume_shape and spacing_mm need 3 values, got {k.volume_shape}, {k.spacing_mm}")

    def plan(self, rng: np.random.Generator) -> CohortPlan:
        k, n = self.knobs, self.knobs.n_subjects
        age = np.clip(rng.normal(AGE_MEAN, AGE_SD, n), 35, 95).round(1)
        male, chd, pad = (rng.random(n) < p for p in (P_MALE, P_CHD, P_PAD))
        x = {"age_per_sd": (age - AGE_MEAN) / AGE_SD, "male": male - P_MALE, "chd": chd - P_CHD, "pad": pad - P_PAD}
        risk = sum(SEVERITY_BETA[c] * x[c] for c in x)
        severity = 90.0 * _sigmoid(SEVERITY_INTERCEPT + k.plaque_risk * risk + SEVERITY_NOISE * rng.normal(size=n))
        sev_mean, sev_sd = float(severity.mean()), float(severity.std()) or 1.0
        lp_tab = k.tabular_signal * sum(HAZARD_BETA[c] * x[c] for c in x)
        lp_img = k.image_signal * (severity - sev_mean) / sev_sd
        scale = 5 * 365.25 / (-np.log1p(-k.relapse_5y)) ** (1 / WEIBULL_SHAPE)
        relapse_time = phantoms.weibull_ph_times(lp_tab + lp_img, rng, scale=scale, shape=WEIBULL_SHAPE)
        admin = rng.uniform(*k.follow_up_days, n)
        loss = rng.exponential(365.25 / -np.log1p(-k.censoring), n) if k.censoring > 0 else np.full(n, np.inf)
        follow = np.minimum(admin, loss)
        relapse = relapse_time <= follow
        rfs = np.maximum(1, np.ceil(np.minimum(relapse_time, follow))).astype(int)
        finetune = finetune_rule(rfs, relapse)
        split, pretrain = _splits(rng, finetune, relapse)
        label = pd.array((relapse & (rfs < KAPPA_DAYS)).astype(int), dtype="Int64")
        label[~finetune] = pd.NA
        df = pd.DataFrame(
            {
                "subject_id": [f"sub-{i + 1:04d}" for i in range(n)],
                "age": age,
                "gender": np.where(male, "M", "F"),
                "chd": chd.astype(int),
                "pad": pad.astype(int),
                "rfs_days": rfs,
                "relapse": relapse.astype(int),
                "finetune": finetune,
                "relapse_within_kappa": label,
                "split": split,
                "pretrain_split": pretrain,
                # latent (truth.json): the causal chain and the anatomy the renderer uses
                "severity_pct": severity.round(2),
                "severity_z": ((severity - sev_mean) / sev_sd).round(4),
                "lp_tabular": lp_tab.round(4),
                "lp_image": lp_img.round(4),
                "relapse_time_days": relapse_time.round(1),
                "follow_up_days": follow.round(1),
                "head_scale": rng.normal(1.0, 0.04, n).round(3),
                "body_scale": rng.normal(1.0, 0.05, n).round(3),
                "head_z_mm": rng.normal(80.0, 4.0, n).round(1),
                "carotid_x_mm": rng.normal(24.0, 2.0, n).round(1),
                "carotid_y_mm": rng.normal(12.0, 2.0, n).round(1),
                "bifurcation_z_mm": rng.normal(-25.0, 7.0, n).round(1),
                "contrast_hu": np.clip(rng.normal(k.contrast_hu, 35.0, n), 250, 550).round(1),
            }
        )
        lo, hi = NON_RELAPSE_WINDOW
        truth = {
            "outcome": "relapse-free survival (days), Weibull proportional hazards: log h(t|x) = log h0(t) "
            "+ tabular_signal * sum(beta_j x_j) + image_signal * z(severity); x centred (attributes_centred_at)",
            "baseline": {"weibull_shape": WEIBULL_SHAPE, "weibull_scale_days": scale,
                         "relapse_5y_at_lp_0": k.relapse_5y},
            "hazard_log_hr": {c: k.tabular_signal * b for c, b in HAZARD_BETA.items()}
            | {"severity_per_sd": k.image_signal},
            "attributes_centred_at": {"age_years": AGE_MEAN, "age_sd": AGE_SD, "male": P_MALE, "chd": P_CHD,
                                      "pad": P_PAD},
            "severity": "90 * sigmoid(severity_intercept + sum(severity_logit_coef_j x_j) + N(0, 1)), "
            "% lumen narrowing",
            "severity_intercept": SEVERITY_INTERCEPT,
            "severity_logit_coef": {c: k.plaque_risk * b for c, b in SEVERITY_BETA.items()},
            "severity_mean_pct": sev_mean,
            "severity_sd_pct": sev_sd,
            "plaque_side": k.plaque_side,
            "plaque_region": "carotid bulb (internal carotid origin) just above the bifurcation, medial wall; "
            "RAS+ world coordinates: the right carotid is at x > 0, the left at x < 0",
            "plaque_mask_labels": {"1": "non-calcified plaque", "2": "calcified plaque"},
            "calcification": "none below 20% severity; the calcified arc and share grow with severity",
            "censoring": "administrative uniform(follow_up_days) and exponential loss to follow-up "
            "(censoring per year)",
            "finetune_rule": f"relapse and rfs_days < {KAPPA_DAYS}, or no relapse and {lo} <= rfs_days <= {hi}",
            "label": f"relapse_within_kappa = relapse and rfs_days < {KAPPA_DAYS} (fine-tuning subset only)",
            "splits": "pretraining on the whole pool (~80/20): training = split in {pretrain_train, train}, "
            "validation = split in {pretrain_val, test} (column pretrain_split); fine-tuning subset: train/test "
            "(~80/20, stratified by relapse), every fine-tuning test patient inside the pretraining validation split",
            "noise": "white Gaussian noise_sd HU; per-subject contrast level, contrast drift along z, HU bias field; "
            "smooth in-plane neck bending (deformation_mm), body and head size",
            "achieved": {
                "finetune_n": int(finetune.sum()),
                "finetune_relapses": int((finetune & relapse).sum()),
                "pool_relapses": int(relapse.sum()),
            },
        }
        thin = [str(name) for name, g in df.groupby("split") if g["relapse"].nunique() < 2]
        if thin:
            log.warning("%s: split(s) %s hold a single outcome value, which validation rejects; use more "
                        "subjects or a higher relapse_5y", self.name, thin)
        return CohortPlan(subjects=df, truth=truth)

    def render_subject(self, subject: dict[str, Any], rng: np.random.Generator, files: SubjectFiles) -> dict[str, Any]:
        """Render the CTA (int16 HU) and plaque mask (uint8) slab by slab; return paths and the measured plaque."""
        k = self.knobs
        shape, spacing = tuple(int(s) for s in k.volume_shape), tuple(float(s) for s in k.spacing_mm)
        affine = phantoms.ras_affine(shape, spacing)
        xw, yw, zw = (g.ravel().astype(np.float32) for g in phantoms.grid_mm(shape, spacing))
        # smooth neck bending: in-plane offsets, each a sum of three low-frequency cosines of z
        u = np.pi * (zw - zw[0]) / max(float(zw[-1] - zw[0]), 1.0)
        freqs = np.arange(1, 4)
        amplitude, phase = k.deformation_mm * rng.normal(size=(2, 3)) / freqs, rng.uniform(0, np.pi, (2, 3, 1))
        tx, ty = ((amplitude[i] @ np.cos(np.outer(freqs, u) + phase[i])).astype(np.float32) for i in range(2))
        look = {
            "gradient": rng.normal(0.0, 0.08),
            "bias": rng.normal(0.0, 6.0, 3).tolist(),
            "phase": rng.uniform(0, 20.0),
        }
        anatomy = _anatomy(subject, k.plaque_side)
        cta = np.empty(shape, np.int16)
        mask = np.empty(shape, np.uint8)
        depth = max(1, SLAB_VOXELS // (shape[0] * shape[1]))
        for k0 in range(0, shape[2], depth):
            zs = slice(k0, min(shape[2], k0 + depth))
            slab = _Slab((xw, yw, zw[zs]), (tx[zs], ty[zs]), float(subject["body_scale"]), float(np.mean(spacing)))
            hu, lab = _render_slab(subject, slab, anatomy, look)
            hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(k.noise_sd)
            np.clip(np.rint(hu, out=hu), -1024, 3071, out=hu)
            cta[:, :, zs] = hu
            mask[:, :, zs] = lab
            del hu, lab, slab
        sid = subject["subject_id"]
        out: dict[str, Any] = {
            "cta": files.nifti(f"images/{sid}_cta.nii.gz", cta, affine),
            "plaque_mask": files.nifti(f"masks/{sid}_plaque.nii.gz", mask, affine),
        }
        voxel_mm3 = float(np.prod(spacing))
        ijk = np.argwhere(mask > 0)
        out["plaque_volume_mm3"] = round(len(ijk) * voxel_mm3, 2)
        out["calcified_volume_mm3"] = round(float(np.count_nonzero(mask == 2)) * voxel_mm3, 2)
        world = ijk @ affine[:3, :3].T + affine[:3, 3]
        for name, sel in (("left", world[:, 0] < 0), ("right", world[:, 0] >= 0)):  # RAS+: right is x > 0
            has = bool(sel.any())
            out[f"plaque_{name}_ijk"] = ijk[sel].mean(0).round(2).tolist() if has else None
            out[f"plaque_{name}_mm"] = world[sel].mean(0).round(2).tolist() if has else None
        return out

    def manifest(self) -> Manifest:
        return Manifest(
            name=self.name,
            description=self.description,
            columns=[
                Column(name="age", dtype="float", unit="years", min=0, max=120, description="age at the index stroke"),
                Column(name="gender", dtype="category", categories=["M", "F"]),
                Column(name="chd", dtype="int", min=0, max=1, description="coronary heart disease"),
                Column(name="pad", dtype="int", min=0, max=1, description="peripheral artery disease"),
                Column(name="rfs_days", dtype="int", unit="days", min=1,
                       description="relapse-free survival: days to relapse or censoring"),
                Column(name="relapse", dtype="int", min=0, max=1, description="1 = recurrent ischemic event observed"),
                Column(name="finetune", dtype="bool",
                       description="in the paper's fine-tuning subset (selection on RFS)"),
                Column(name="relapse_within_kappa", dtype="int", min=0, max=1, nullable=True,
                       description=f"relapse with RFS < {KAPPA_DAYS} days; fine-tuning subset only (empty elsewhere)"),
                Column(name="split", dtype="category", categories=["pretrain_train", "pretrain_val", "train", "test"],
                       description="fine-tuning subset: train/test; other patients: their pretraining split"),
                Column(name="pretrain_split", dtype="category", categories=["train", "val"],
                       description="pretraining split of the whole pool (~80/20); val holds the fine-tuning test"),
            ],
            modalities=[
                Modality(name="cta", column="cta", format="nifti", description="head-and-neck CTA, HU, int16, RAS+"),
                Modality(name="plaque_mask", column="plaque_mask", format="nifti",
                         description="carotid plaque, uint8: 1 non-calcified, 2 calcified"),
            ],
            labels=["relapse_within_kappa"],
            survival=Survival(time="rfs_days", event="relapse", unit="days"),
            split_column="split",
            truth="truth.json",
        )


def finetune_rule(rfs_days: np.ndarray, relapse: np.ndarray) -> np.ndarray:
    """The paper's fine-tuning selection: relapse with RFS < 1642 d, or no relapse with RFS in [1825, 2555] d."""
    rfs, ev = np.asarray(rfs_days), np.asarray(relapse).astype(bool)
    return (ev & (rfs < KAPPA_DAYS)) | (~ev & (rfs >= NON_RELAPSE_WINDOW[0]) & (rfs <= NON_RELAPSE_WINDOW[1]))


def _pick(rng: np.random.Generator, idx: np.ndarray, frac: float) -> np.ndarray:
    """A random ~``frac`` share of ``idx``: at least one and at most all but one when it has two or more."""
    if idx.size < 2:
        return idx[:0]
    return rng.choice(idx, int(np.clip(round(frac * idx.size), 1, idx.size - 1)), replace=False)


def _splits(rng: np.random.Generator, finetune: np.ndarray, relapse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fine-tuning train/test (20%, stratified by relapse) nested in the pretraining train/val (~20%).

    As in the paper, every fine-tuning test patient is in the pretraining validation split; the rest
    of that split is filled with other patients (stratified by relapse) up to 20% of the pool.
    """
    n = len(finetune)
    test = np.zeros(n, bool)
    for cls in (True, False):
        test[_pick(rng, np.flatnonzero(finetune & (relapse == cls)), 0.2)] = True
    val = test.copy()
    others = np.flatnonzero(~finetune)
    share = max(0, round(0.2 * n) - int(test.sum())) / max(len(others), 1)
    for cls in (True, False):
        val[_pick(rng, others[relapse[others] == cls], share)] = True
    split = np.where(finetune, np.where(test, "test", "train"), np.where(val, "pretrain_val", "pretrain_train"))
    return split, np.where(val, "val", "train")


# ---------------------------------------------------------------------- checks and figures


def plaque_load(cohort) -> pd.DataFrame:
    """Plaque and calcified volume (mm^3) per subject, measured from the plaque masks on disk."""
    import nibabel as nib

    rows = []
    for sid, path in zip(cohort.ids, cohort.paths("plaque_mask"), strict=True):
        img = nib.load(path)
        m = np.asarray(img.dataobj)
        vox = float(np.prod(img.header.get_zooms()[:3]))
        rows.append({"subject_id": sid, "plaque_mm3": (m > 0).sum() * vox, "calcified_mm3": (m == 2).sum() * vox})
    return pd.DataFrame(rows)


def _cindex(time: np.ndarray, event: np.ndarray, score: np.ndarray) -> float:
    from sksurv.metrics import concordance_index_censored

    return float(concordance_index_censored(event.astype(bool), time.astype(float), score.astype(float))[0])


def _null_sd(stat, score: np.ndarray, rng: np.random.Generator, n_perm: int = 100) -> float:
    """SD of ``stat`` over permutations of ``score``: its spread when the score carries no signal."""
    return float(np.std([stat(rng.permutation(score)) for _ in range(n_perm)]))


def _cox_loglik(time: np.ndarray, event: np.ndarray, x: np.ndarray) -> float:
    """Maximised Cox partial log-likelihood (Breslow ties) of covariates ``x`` (n, p), fitted by scikit-survival."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    y = np.array(list(zip(event.astype(bool), time.astype(float), strict=True)), dtype=[("e", bool), ("t", float)])
    eta = x @ CoxPHSurvivalAnalysis(alpha=1e-6, ties="breslow").fit(x, y).coef_
    order = np.argsort(-time, kind="stable")
    t, e, eta = time[order], event[order].astype(bool), eta[order]
    log_risk = np.logaddexp.accumulate(eta)  # log sum of exp(eta) over those with a later or equal time
    last = np.searchsorted(-t, -t, side="right") - 1  # ties: the risk set includes every equal time
    return float(np.sum(eta[e] - log_risk[last][e]))


def planted_effect_checks(cohort) -> pd.DataFrame:
    """One row per planted effect, measured from the plaque masks on disk and the observed table.

    ``present``: beyond chance by more than 3 null SDs (c-index, AUC, CV correlation: the SD over
    100 permutations of the score; Spearman: 1/sqrt(n)); for the likelihood-ratio test, p < 0.001.
    Fitted models are cross-validated or nested tests, so a cohort without the signal gives about
    chance. Chance is 0.5 for a c-index or AUC, 0 for a correlation, 4 for the 4-df chi2 (its mean).
    """
    from scipy import stats
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import KFold, cross_val_predict

    df = cohort.subjects.merge(plaque_load(cohort), on="subject_id")
    time, event = df["rfs_days"].to_numpy(float), df["relapse"].to_numpy(int)
    attrs = np.column_stack([(df["age"] - AGE_MEAN) / AGE_SD, df["gender"].astype(str) == "M", df["chd"], df["pad"]])
    attrs = attrs.astype(float)
    load = df["plaque_mm3"].to_numpy(float)
    load_z = (load - load.mean()) / (load.std() or 1.0)
    rng = np.random.default_rng(0)
    rows = []
    # image -> hazard, residualised on the attributes: they raise both severity and hazard, and
    # without this their own effect would leak into the plaque's c-index
    resid = load_z - LinearRegression().fit(attrs, load_z).predict(attrs)
    c = _cindex(time, event, resid)
    sd = _null_sd(lambda s: _cindex(time, event, s), resid, rng)
    rows.append(("plaque severity raises the relapse hazard (image_signal)",
                 "c-index on RFS of the plaque volume measured from the masks, residualised on the 4 attributes",
                 c, 0.5, c - 0.5 > 3 * sd))
    # attributes -> hazard, directly (beyond the plaque they also raise): nested Cox models
    lr = 2 * (_cox_loglik(time, event, np.column_stack([load_z, attrs])) - _cox_loglik(time, event, load_z[:, None]))
    rows.append(("age, male, CHD, PAD raise the relapse hazard (tabular_signal)",
                 "likelihood-ratio chi2 (4 df) of the attributes added to a Cox model on measured plaque volume; "
                 "chance = 4 (its null mean)", lr, 4.0, stats.chi2.sf(lr, 4) < 1e-3))
    # attributes -> severity: cross-validated prediction of the measured plaque volume
    def cv_corr(target: np.ndarray) -> float:
        pred = cross_val_predict(LinearRegression(), attrs, target, cv=KFold(5, shuffle=True, random_state=0))
        return float(np.corrcoef(pred, target)[0, 1]) if pred.std() > 0 and target.std() > 0 else 0.0

    r = cv_corr(load_z)
    rows.append(("age, male, CHD, PAD raise plaque severity (plaque_risk)",
                 "5-fold CV correlation of measured plaque volume with its linear prediction from the 4 attributes",
                 r, 0.0, r > 3 * _null_sd(cv_corr, load_z, rng)))
    # the paper's task: relapse within kappa in the fine-tuning subset, scored by the plaque alone
    ft = df[df["finetune"].astype(bool)]
    yk, sk = ft["relapse_within_kappa"].to_numpy(int), ft["plaque_mm3"].to_numpy(float)
    both = 0 < yk.sum() < len(yk)
    auc = float(roc_auc_score(yk, sk)) if both else 0.5
    sd = _null_sd(lambda s: roc_auc_score(yk, s), sk, rng) if both else 1.0
    rows.append(("plaque separates relapse < 1642 d in the fine-tuning subset (image_signal)",
                 "ROC-AUC of measured plaque volume for relapse_within_kappa (fine-tuning subset, no fit)",
                 auc, 0.5, auc - 0.5 > 3 * sd))
    # rendering: the masks carry the latent severity (no knob switches this off)
    lat = cohort.latents().merge(df[["subject_id", "plaque_mm3"]], on="subject_id")
    rho = float(stats.spearmanr(lat["severity_pct"], lat["plaque_mm3"])[0])
    rows.append(("plaque masks encode the latent severity (rendering)",
                 "Spearman of measured plaque volume with the latent severity (truth.json)",
                 rho, 0.0, rho > 3 / np.sqrt(len(lat))))
    out = pd.DataFrame(rows, columns=["effect", "measure", "value", "chance", "present"])
    out["present"] = out["present"].astype(bool)
    return out


def vessel_mip_volume(
    cta: np.ndarray, zooms: Sequence[float], *, bone_hu: float = 500.0, margin_mm: float = 5.0
) -> np.ndarray:
    """The CTA with bone suppressed for vessel MIPs: bone (> ``bone_hu``) grown by ``margin_mm`` set to -200 HU.

    The margin removes bone's partial-volume rim, whose HU falls in the vessels' range.
    """
    from scipy import ndimage

    steps = max(1, int(np.ceil(margin_mm / float(min(zooms)))))
    bone = ndimage.binary_dilation(cta > bone_hu, ndimage.generate_binary_structure(3, 1), iterations=steps)
    return np.where(bone, np.float32(-200), cta.astype(np.float32))


def tour_figures(cohort) -> dict[str, Any]:
    """The data tour's figures: vessel MIPs (low vs high severity), a bifurcation slice, KM curves.

    Returns:
        {"cta_mip": Figure, "bifurcation_slice": Figure, "km_by_severity": Figure}
    """
    import matplotlib.pyplot as plt
    import nibabel as nib

    from mmlib import viz
    from mmlib.viz import km_curves

    lat = cohort.latents().set_index("subject_id")
    subj = cohort.subjects.set_index("subject_id")
    order = lat["severity_pct"].sort_values()
    picks = [*order.index[:2], *order.index[-2:]]
    figs: dict[str, Any] = {}

    def load(sid: str) -> tuple[np.ndarray, np.ndarray, Any]:
        img = nib.load(cohort.path("cta", sid))
        return np.asarray(img.dataobj), np.asarray(nib.load(cohort.path("plaque_mask", sid)).dataobj) > 0, img

    fig, axes = plt.subplots(
        2, len(picks), figsize=(14, 9), gridspec_kw={"height_ratios": [1.5, 1]}, layout="constrained"
    )
    for col, sid in enumerate(picks):
        vol, mask, img = load(sid)
        zooms = img.header.get_zooms()[:3]
        vessels = vessel_mip_volume(vol, zooms)
        for row, axis in enumerate((1, 2)):  # coronal (max over y), axial (max over z)
            mip, mk = vessels.max(axis=axis).T, mask.any(axis=axis).T
            aspect = zooms[2] / zooms[0] if axis == 1 else zooms[1] / zooms[0]
            im = axes[row, col].imshow(mip, cmap="gray", origin="lower", vmin=100, vmax=550, aspect=aspect)
            if mk.any():
                axes[row, col].contour(mk, levels=[0.5], colors="red", linewidths=1.5)
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            viz.radiological(axes[row, col])
        axes[0, col].set_title(
            f"{sid}: severity {lat.loc[sid, 'severity_pct']:.0f}%\n"
            f"RFS {subj.loc[sid, 'rfs_days']} d, relapse = {subj.loc[sid, 'relapse']}",
            fontsize=11,
        )
    axes[0, 0].set_ylabel("coronal MIP (from the front)")
    axes[1, 0].set_ylabel("axial MIP (anterior up)")
    fig.colorbar(im, ax=axes, shrink=0.6, label="HU (bone and its 5 mm rim suppressed)")
    fig.suptitle("CTA maximum-intensity projections: two lowest vs two highest plaque severities (plaque mask in red; "
                 "the subject's right on the viewer's left)")
    figs["cta_mip"] = fig

    fig, axes = plt.subplots(1, 2, figsize=(13, 6), layout="constrained")
    for ax, sid in zip(axes, (picks[0], picks[-1]), strict=True):
        vol, mask, img = load(sid)
        # the bending is in-plane, so the planned bifurcation height is the slice; +7 mm: mid-bulb
        k = np.linalg.solve(img.affine, [0.0, 0.0, lat.loc[sid, "bifurcation_z_mm"] + 7.0, 1.0])[2]
        k = int(np.clip(round(k), 0, vol.shape[2] - 1))
        im = ax.imshow(vol[:, :, k].T, cmap="gray", origin="lower", vmin=-200, vmax=800)
        if mask[:, :, k].any():
            ax.contour(mask[:, :, k].T, levels=[0.5], colors="red", linewidths=1.5)
        ax.set_title(f"{sid}: severity {lat.loc[sid, 'severity_pct']:.0f}%, axial slice k = {k}")
        ax.set_xlabel("x voxel (subject's right <-)")
        viz.radiological(ax)
        ax.set_ylabel("y voxel (anterior ->)")
    fig.colorbar(im, ax=axes, shrink=0.8, label="HU")
    fig.suptitle("Axial CTA slice through the carotid bulb, lowest vs highest severity (plaque mask in red)")
    figs["bifurcation_slice"] = fig

    fig, ax = plt.subplots(figsize=(10, 6), layout="constrained")
    df = subj.join(lat[["severity_pct"]])
    groups = pd.qcut(df["severity_pct"], 3, labels=["low", "middle", "high"])
    km_curves(ax, [(f"{name} severity tertile", df.loc[groups == name, "relapse"], df.loc[groups == name, "rfs_days"],
                    color) for name, color in zip(["low", "middle", "high"], ["C0", "C1", "C2"])],
              title="Relapse-free survival by tertile of the planted plaque severity",
              xlabel="days since the index stroke", ylabel="relapse-free probability (Kaplan-Meier, 95% CI)")
    ax.axvline(KAPPA_DAYS, color="grey", ls="--", lw=1,
               label=f"κ = {KAPPA_DAYS} d: a relapse before it is a positive case (P2's rule)")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left")
    figs["km_by_severity"] = fig
    return figs
