"""Generated cohort of P3 (MoRE): chest X-ray + 12-lead ECG + reports of the same patients.

Causal model (a small Bayesian network, every number recorded in ``truth.json``):

- Each patient has five hidden conditions, drawn independently given age except that a prior
  myocardial infarction triples the odds of heart failure: hypertensive heart disease, heart
  failure, prior MI, conduction disease and an acute lung process (pneumonia or post-operative
  state). ``prevalence`` is the fraction of patients with at least one.
- Findings come from the conditions through noisy-OR links,
  ``P(f = 1 | C) = 1 - (1 - leak_f) * prod_c (1 - p_cf) ** C_c``. For example heart failure leads
  to cardiomegaly, edema and effusion on the X-ray and to ST-T change or hypertrophy on the ECG.
  There are 4 X-ray findings (atelectasis, cardiomegaly, edema, pleural effusion) and 4 ECG
  superclasses (MI, STTC, CD, HYP), with NORM = none of the four.
- ``coupling`` is the fraction of patients whose ECG reflects their own conditions. For the
  others the ECG findings are drawn from an independent patient's conditions. At 0 the two
  modalities are independent, and every finding's frequency is unchanged.
- The X-ray (PNG, PA view, radiological convention: the patient's right is on the image left)
  and the ECG (WFDB, 12 leads, mV) render the true findings. Their visibility is scaled by
  ``image_signal`` and ``ecg_signal`` (0: the files carry no trace of them).
- Labels are the true findings, except that with probability ``label_noise`` a label is
  replaced by a draw from its marginal. The radiology report and the machine ECG statement are
  written from the labels, with synonyms, negation and uncertainty.

The ECG is the ECGSYN Gaussian-wave beat (McSharry et al. 2003, the model neurokit2 simulates)
in its 3-D dipole form (Sameni et al. 2007). Every lead is a projection of one heart vector, so
Einthoven's law (III = II - I) and the augmented leads hold exactly and voltages mean
something. neurokit2's ``ecg_simulate(method="multileads")`` rescales every lead independently
to [-0.4, 1.2] mV, which makes the Sokolow-Lyon voltage criterion and aVR polarity meaningless,
so it is not used here. Conditions edit the heart vector:
MI gives pathological Q waves and T inversion facing the territory, HYP raises voltages with
strain, CD gives a bundle-branch block, and STTC gives ST depression with flat or inverted T.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import ndimage, signal

from mmlib.cohorts.base import CohortGenerator, CohortKnobs, CohortPlan, SubjectFiles
from mmlib.cohorts.phantoms import smooth_field
from mmlib.core import ProfileSet
from mmlib.data import Column, Manifest, Modality
from mmlib.data.readers import STANDARD_LEADS, read_wfdb

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from mmlib.data import Cohort

__all__ = [
    "CONDITIONS",
    "ECG_CLASSES",
    "FINDING_BITS",
    "LEADS",
    "PRESETS",
    "XRAY_FINDINGS",
    "Knobs",
    "XrayECGReports",
    "ecg_features",
    "ecg_figure",
    "ecg_range",
    "finding_mask",
    "measure_ctr",
    "planted_effect_checks",
    "presets",
    "read_ecg",
    "report_labels",
    "tour_figures",
]

XRAY_FINDINGS = ("atelectasis", "cardiomegaly", "edema", "pleural_effusion")
# bit of each X-ray finding in the per-subject findings mask (masks/<id>_findings.png)
FINDING_BITS = {"atelectasis": 1, "cardiomegaly": 2, "edema": 4, "pleural_effusion": 8}
ECG_CLASSES = ("NORM", "MI", "STTC", "CD", "HYP")  # PTB-XL diagnostic superclasses
CONDITIONS = ("hypertensive_heart_disease", "heart_failure", "prior_mi", "conduction_disease", "lung_process")
LEADS = tuple(STANDARD_LEADS)  # I, II, III, aVR, aVL, aVF, V1-V6

# relative base rates (scaled so that P(any condition) = prevalence), and the links to findings
CONDITION_WEIGHT = {"hypertensive_heart_disease": 0.30, "heart_failure": 0.20, "prior_mi": 0.15,
                    "conduction_disease": 0.10, "lung_process": 0.25}
AGE_LOG_ODDS_PER_DECADE = 0.3  # every condition is commoner with age (centred at 65 years)
MI_TO_HF_ODDS_RATIO = 3.0
P_FINDING = {  # P(finding | condition) in the noisy-OR
    "hypertensive_heart_disease": {"cardiomegaly": 0.35, "HYP": 0.60, "STTC": 0.20},
    "heart_failure": {"cardiomegaly": 0.75, "edema": 0.55, "pleural_effusion": 0.50, "atelectasis": 0.15,
                      "HYP": 0.30, "STTC": 0.40, "CD": 0.20},
    "prior_mi": {"cardiomegaly": 0.20, "MI": 0.80, "STTC": 0.30},
    "conduction_disease": {"cardiomegaly": 0.10, "CD": 0.85},
    "lung_process": {"atelectasis": 0.60, "pleural_effusion": 0.30, "edema": 0.05, "STTC": 0.10},
}
LEAK = {"atelectasis": 0.06, "cardiomegaly": 0.04, "edema": 0.02, "pleural_effusion": 0.04,
        "MI": 0.02, "STTC": 0.06, "CD": 0.04, "HYP": 0.04}
LOBES = ("right lower lobe", "left lower lobe", "right middle lobe", "right upper lobe", "left upper lobe")
# body-frame coordinates (x: image right = patient's left, y: down; thorax spans about [-1, 1])
_LOBE_XY = {"right lower lobe": (-0.45, 0.45), "left lower lobe": (0.6, 0.5), "right middle lobe": (-0.33, 0.25),
            "right upper lobe": (-0.42, -0.32), "left upper lobe": (0.42, -0.32)}
MI_TERRITORY = {"anterior": (0.1, 0.0, 1.0), "inferior": (0.0, 1.0, 0.0), "lateral": (1.0, -0.4, 0.0)}


@dataclass(frozen=True)
class Knobs(CohortKnobs):
    n_subjects: int = 500  # patients, each with one X-ray, one ECG, one radiology report, one ECG statement
    image_size: int = 128  # X-ray side (pixels, square PA view)
    field_of_view_mm: float = 400.0  # X-ray field of view (mm); pixel spacing = fov / image_size
    ecg_fs_hz: int = 100  # sampling rate of the written ECG records (Hz; synthesised at 500 Hz, then decimated)
    ecg_seconds: float = 10.0  # ECG record length (s)
    prevalence: float = 0.6  # fraction of patients with at least one hidden condition
    coupling: float = 1.0  # fraction of patients whose ECG reflects their own conditions (0: modalities independent)
    image_signal: float = 1.0  # visibility of X-ray findings (CTR increase, fluid/haze/collapse density); 0 = invisible
    ecg_signal: float = 1.0  # visibility of ECG findings (Q waves, ST-T change, QRS widening, voltage); 0 = absent
    label_noise: float = 0.05  # probability that a label is replaced by a draw from its marginal
    uncertain_rate: float = 0.15  # fraction of positive report mentions that are hedged ("possible", "cannot exclude")
    noise_sd: float = 1.0  # multiplier on acquisition noise (X-ray 0.02 intensity SD; ECG 0.015 mV + wander + mains)
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train / val / test fractions


PRESETS = presets = ProfileSet(
    smoke=Knobs(name="smoke", n_subjects=40, image_size=64),
    quick=Knobs(name="quick", n_subjects=500, image_size=128),
    full=Knobs(name="full", n_subjects=5000, image_size=256, ecg_fs_hz=500),
)


# --------------------------------------------------------------------------- the causal model


def _condition_probs(scale: float, age: np.ndarray) -> np.ndarray:
    """(N, C) marginal condition probabilities before the MI -> HF link (HF given no MI)."""
    w = np.array([CONDITION_WEIGHT[c] for c in CONDITIONS]) * scale
    logit = np.log(w / (1 - w))[None, :] + AGE_LOG_ODDS_PER_DECADE * (age[:, None] - 65) / 10
    return 1 / (1 + np.exp(-logit))


def _calibrate(prevalence: float, age: np.ndarray) -> float:
    """Scale of the base rates so that the mean P(at least one condition) equals ``prevalence``."""
    lo, hi = 1e-6, 1.0 / max(CONDITION_WEIGHT.values()) - 1e-6
    for _ in range(60):  # bisection: P(any) grows with the scale
        mid = (lo + hi) / 2
        p_none = np.prod(1 - _condition_probs(mid, age), axis=1).mean()
        lo, hi = (mid, hi) if 1 - p_none < prevalence else (lo, mid)
    return (lo + hi) / 2


def _draw_conditions(rng: np.random.Generator, scale: float, age: np.ndarray) -> np.ndarray:
    """(N, C) bool conditions; prior MI multiplies the odds of heart failure."""
    p = _condition_probs(scale, age)
    cond = np.zeros(p.shape, dtype=bool)
    mi, hf = CONDITIONS.index("prior_mi"), CONDITIONS.index("heart_failure")
    u = rng.random(p.shape)
    cond[:, mi] = u[:, mi] < p[:, mi]
    odds = p[:, hf] / (1 - p[:, hf]) * np.where(cond[:, mi], MI_TO_HF_ODDS_RATIO, 1.0)
    for j in range(len(CONDITIONS)):
        pj = odds / (1 + odds) if j == hf else p[:, j]
        cond[:, j] = u[:, j] < pj
    return cond


def _noisy_or(cond: np.ndarray, finding: str, rng: np.random.Generator) -> np.ndarray:
    keep = np.full(len(cond), 1 - LEAK[finding])
    for j, c in enumerate(CONDITIONS):
        keep *= np.where(cond[:, j], 1 - P_FINDING[c].get(finding, 0.0), 1.0)
    return rng.random(len(cond)) < 1 - keep


def _assign_splits(labels: np.ndarray, fractions: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    """Random train/val/test split in which every split holds both classes of every label.

    ``load_cohort`` rejects a split in which a label has a single class, which small cohorts hit
    by chance. So one random subject of each (label, class) goes to each split that lacks it
    (rarest first), and the rest are dealt randomly to reach ``fractions``.

    Args:
        labels: (N, L) 0/1.
    """
    n = len(labels)
    split = np.full(n, -1)
    for j, v in sorted(((j, v) for j in range(labels.shape[1]) for v in (0, 1)),
                       key=lambda jv: int((labels[:, jv[0]] == jv[1]).sum())):
        for s in range(3):
            if not ((split == s) & (labels[:, j] == v)).any():
                free = np.flatnonzero((split < 0) & (labels[:, j] == v))
                if len(free):
                    split[rng.choice(free)] = s
    want = np.round(np.asarray(fractions) / np.sum(fractions) * n).astype(int)
    need = np.maximum(want - np.bincount(split[split >= 0], minlength=3), 0)
    rest = rng.permutation(np.flatnonzero(split < 0))
    cuts = np.cumsum(need)
    split[rest] = np.minimum(np.searchsorted(cuts, np.arange(len(rest)), side="right"), 2)
    return np.array(["train", "val", "test"])[split]


# --------------------------------------------------------------------------- X-ray phantom


def _soft(d: np.ndarray, edge: float) -> np.ndarray:
    """Inside-ness from a signed distance ``d`` (negative inside), with a sigmoid edge."""
    return 1.0 / (1.0 + np.exp(np.clip(d / edge, -30, 30)))


def finding_mask(mask: np.ndarray, finding: str) -> np.ndarray:
    """Where one X-ray finding was planted, decoded from a bit-coded findings mask.

    Args:
        mask: (H, W) uint8 findings mask (``masks/<id>_findings.png``, bits in ``FINDING_BITS``).
        finding: one of ``XRAY_FINDINGS``.

    Returns:
        (H, W) bool.
    """
    if finding not in FINDING_BITS:
        raise ValueError(f"unknown X-ray finding {finding!r}; choose one of {list(FINDING_BITS)}")
    return (np.asarray(mask).astype(np.uint8) & FINDING_BITS[finding]) > 0


def render_xray(subject: dict[str, Any], rng: np.random.Generator, size: int, *, image_signal: float,
                noise_sd: float) -> tuple[np.ndarray, dict[str, float], np.ndarray]:
    """A PA chest radiograph phantom with the subject's findings.

    Returns:
        (size, size) uint8 image (bright = attenuating), measured geometry (``ctr_rendered``), and a
        (size, size) uint8 findings mask with a ``FINDING_BITS`` bit set where a truly present
        (``true_*``) finding is drawn: the heart silhouette > 0.5 (cardiomegaly); the bat-wing core,
        bat x lung > 0.5 (edema); and the effusion and atelectasis regions with their sigmoid edges
        made sharp (every soft factor > 0.5, i.e. inside the drawn shape) within lung > 0.5. The
        product of the blurred factors would miss thin plates and small effusions at 64 px. The
        mask is the same whatever ``image_signal`` is (0: the pixels carry nothing there).
    """
    s = subject
    c = (np.arange(size) - (size - 1) / 2) / (size / 2)
    u, v = np.meshgrid(c, c, indexing="xy")  # u: image columns (left->right), v: rows (top->bottom)
    th = np.deg2rad(rng.normal(0, 2.0))
    scale = rng.normal(1.0, 0.03)
    du, dv = rng.normal(0, 0.015, 2)
    x = (np.cos(th) * (u - du) + np.sin(th) * (v - dv)) / scale
    y = (-np.sin(th) * (u - du) + np.cos(th) * (v - dv)) / scale
    e = 1.5 * 2 / size / scale  # edges ~1.5 px wide

    half_w, cy = s["thorax_half_width"], 0.25
    ry = np.where(y < cy, 1.05, 1.6)
    cavity = _soft(np.sqrt(np.abs(x / half_w) ** 2.2 + ((y - cy) / ry) ** 2) - 1, e / half_w)
    body = _soft(np.sqrt((x / 1.04) ** 2 + ((y - 0.3) / 1.38) ** 2) - 1, e)
    # heart: an ellipse tilted 25 deg (apex to the patient's left and down) whose horizontal
    # extent is ctr x the thoracic width; its base sits in the left hemidiaphragm
    tilt, aspect = np.deg2rad(25.0), 0.85
    ha = s["ctr"] * half_w / np.sqrt(np.cos(tilt) ** 2 + (aspect * np.sin(tilt)) ** 2)
    hx, hy = s["heart_x"], 0.33
    hu = (x - hx) * np.cos(tilt) + (y - hy) * np.sin(tilt)
    hv = -(x - hx) * np.sin(tilt) + (y - hy) * np.cos(tilt)
    heart = _soft(np.sqrt((hu / ha) ** 2 + (hv / (aspect * ha)) ** 2) - 1, e / ha)
    medi = np.maximum(_soft(np.abs(x - 0.01) - (0.09 + 0.03 * (y > -0.2)), e),
                      _soft(np.hypot(x - 0.09, y + 0.22) - 0.08, e))  # mediastinum + aortic knob
    apex = np.where(x < 0, s["dome_right"], s["dome_left"])
    dome = apex + 0.45 * ((x - np.where(x < 0, -0.35, 0.38)) / 0.45) ** 2
    above = _soft(y - dome, e)
    lung = cavity * above * (1 - np.maximum(heart, medi))

    att = 0.55 * body + 0.05 * (1 - above) * body - 0.42 * lung
    att += 0.10 * _soft(np.abs(x) - 0.065, e) * body  # spine, faint through the mediastinum
    att -= 0.10 * _soft(np.abs(x) - 0.03, e) * (y < -0.35) * body  # trachea (air)
    xr = np.clip(np.abs(x) - 0.06, 0, None)
    ribs_x = (np.abs(x) > 0.06) * _soft(xr - half_w, e)
    for k in range(10):  # posterior ribs: arcs rising from the spine, then sloping down laterally
        yk = -0.86 + 0.12 * k + 0.008 * k * k - 0.12 * np.sin(np.pi * np.clip(xr, 0, 0.5)) + 0.35 * xr ** 2
        att += 0.07 * _soft(np.abs(y - yk) - 0.02 - 0.002 * k, e) * ribs_x
        ya = -0.65 + 0.14 * k + 0.45 * (0.8 - np.clip(xr, 0, 0.8)) ** 2  # anterior ribs: faint, down medially
        att += 0.03 * _soft(np.abs(y - ya) - 0.025, e) * ribs_x * (xr > 0.15)
    clav = -0.74 - 0.22 * np.clip(np.abs(x) - 0.06, 0, 0.6)
    att += 0.16 * _soft(np.abs(y - clav) - 0.028, e) * _soft(np.abs(x) - 0.62, e) * (np.abs(x) > 0.05)
    att += 0.12 * _soft(np.hypot(np.abs(x) - 1.0, y + 0.8) - 0.2, e)  # humeral heads
    att += 0.10 * np.exp(-(((np.abs(x) - 0.2) / 0.07) ** 2 + ((y - 0.05) / 0.09) ** 2) / 2) * lung  # hila
    vessels = smooth_field((size, size), rng, sigma_vox=size / 60, amplitude=1.0)
    att += 0.035 * np.clip(vessels, 0, None) * lung * np.exp(-np.abs(np.abs(x) - 0.2) / 0.4)

    sig = image_signal
    # where each finding is: its region with hard edges (every soft factor > 0.5), within the lung;
    # no random draw feeds it, so the image does not change
    mask = np.zeros((size, size), dtype=np.uint8)
    in_lung = lung > 0.5
    if s["true_cardiomegaly"]:
        mask[heart > 0.5] |= FINDING_BITS["cardiomegaly"]
    if s["true_pleural_effusion"]:
        sides = {"right": (-1,), "left": (1,), "bilateral": (-1, 1)}[s["effusion_side"]]
        for side in sides:
            surface = 0.92 - s["effusion_size"] * 1.4 - 0.15 * (np.abs(x) / half_w) ** 2
            att += 0.36 * sig * _soft(surface - y, e) * lung * (np.sign(x) == side)
            mask[(y > surface) & in_lung & (np.sign(x) == side)] |= FINDING_BITS["pleural_effusion"]
    if s["true_edema"]:
        bat = np.exp(-(((np.abs(x) - 0.2) / 0.22) ** 2 + ((y - 0.1) / 0.28) ** 2) / 2)
        att += sig * s["edema_severity"] * (0.16 * bat + 0.04) * lung
        mask[bat * lung > 0.5] |= FINDING_BITS["edema"]
    if s["true_atelectasis"]:
        cx, cy_ = _LOBE_XY[s["atelectasis_lobe"]]
        a = np.deg2rad(s["atelectasis_angle_deg"])
        along = (x - cx) * np.cos(a) + (y - cy_) * np.sin(a)
        across = -(x - cx) * np.sin(a) + (y - cy_) * np.cos(a)
        if s["atelectasis_shape"] == "plate":  # plate-like (discoid) band
            region = _soft(np.abs(across) - 0.035, 2 * e) * _soft(np.abs(along) - 0.18, 2 * e)
            inside = (np.abs(across) < 0.035) & (np.abs(along) < 0.18)
        else:  # segmental wedge, widening towards the pleura
            half = 0.03 + 0.25 * np.clip(along + 0.15, 0, None)
            region = _soft(np.abs(across) - half, 4 * e) * _soft(np.abs(along) - 0.15, 4 * e)
            inside = (np.abs(across) < half) & (np.abs(along) < 0.15)
        att += 0.26 * sig * s["atelectasis_severity"] * region * lung
        mask[inside & in_lung] |= FINDING_BITS["atelectasis"]

    img = np.clip(att, 0, 1) ** rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.25) + rng.normal(0.0, 0.03)
    img = ndimage.gaussian_filter(img, 0.5 * size / 128) + rng.normal(0, 0.02 * noise_sd, img.shape)
    out = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
    widths = [(m > 0.5).sum(axis=1).max() for m in (heart, cavity * (y < dome.max()))]
    return out, {"ctr_rendered": float(widths[0] / max(widths[1], 1))}, mask


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=64)
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * mids) / np.maximum(w0, 1)
    m1 = (np.sum(hist * mids) - np.cumsum(hist * mids)) / np.maximum(w1, 1)
    return float(mids[np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def measure_ctr(image: np.ndarray) -> float:
    """Cardiothoracic ratio measured from a PA radiograph's pixels (no knowledge of the phantom).

    Lungs are the two largest dark regions (Otsu threshold of the central image, closed
    vertically across the rib shadows; dark regions touching the border are outside air).
    Thoracic diameter: the widest span from the right lung's outer edge to the left lung's.
    Cardiac diameter: the widest gap between the lungs' medial edges on rows 30-78% of the way
    down the lung fields, i.e. above the hemidiaphragms, whose costophrenic recesses would
    otherwise read as a wide gap.

    Args:
        image: (H, W) greyscale radiograph, bright = attenuating.
    """
    h, w = image.shape
    a = ndimage.gaussian_filter(np.asarray(image, dtype=float), w / 128)
    dark = a < _otsu(a[h // 8: -h // 8, w // 8: -w // 8])
    dark = ndimage.binary_closing(dark, np.ones((max(3, h // 16), 1)))  # bridge the rib shadows
    comp, n = ndimage.label(dark)
    sizes = ndimage.sum(dark, comp, np.arange(1, n + 1))
    outside = set(np.r_[comp[0], comp[-1], comp[:, 0], comp[:, -1]].tolist())
    keep = [i + 1 for i in np.argsort(-sizes) if i + 1 not in outside][:2]
    if len(keep) < 2:
        return float("nan")
    # the patient's right lung is on the image left
    keep.sort(key=lambda i: float(np.mean(np.nonzero(comp == i)[1])))
    rows = np.flatnonzero(np.isin(comp, keep).any(axis=1))
    thorax, cardiac = 0, 0
    top, height = rows[0], rows[-1] - rows[0]
    for r in rows:
        right, left = np.flatnonzero(comp[r] == keep[0]), np.flatnonzero(comp[r] == keep[1])
        if not len(right) or not len(left):
            continue
        thorax = max(thorax, left[-1] - right[0])
        if 0.3 <= (r - top) / height <= 0.78:
            cardiac = max(cardiac, left[0] - right[-1])
    return float(cardiac / thorax) if thorax else float("nan")


# --------------------------------------------------------------------------- 12-lead ECG

FS_SYNTH = 500  # Hz; every record is synthesised at this rate, then decimated to ``ecg_fs_hz``
_PRECORDIAL_DEG = (115, 95, 75, 55, 30, 5)  # V1..V6 in the horizontal plane (0 = left, 90 = anterior)
# heart-vector axes: x = patient's left, y = inferior, z = anterior; rows: I, II, V1..V6
_LEAD_VECTORS = np.array(
    [[1.0, 0.0, 0.0], [0.5, np.sqrt(3) / 2, 0.0]]
    + [[1.5 * np.cos(np.deg2rad(a)), 0.1, 1.5 * np.sin(np.deg2rad(a))] for a in _PRECORDIAL_DEG]
)


def _unit(*v: float) -> np.ndarray:
    a = np.asarray(v, dtype=float)
    return a / np.linalg.norm(a)


def _limb_to_12(x8: np.ndarray) -> np.ndarray:
    """(T, 8) leads I, II, V1..V6 -> (T, 12) in LEADS order (Einthoven and Goldberger exactly)."""
    i, ii = x8[:, 0], x8[:, 1]
    return np.column_stack([i, ii, ii - i, -(i + ii) / 2, i - ii / 2, ii - i / 2, x8[:, 2:]])


def ecg_beat(subject: dict[str, Any], ecg_signal: float) -> tuple[dict[str, list], np.ndarray]:
    """The subject's beat as Gaussian waves of the heart vector (ECGSYN in dipole form).

    Returns:
        waves: name -> [centre (ms from R), width sigma (ms), vector (3,) in mV], and the ST
        vector (3,) in mV (a plateau from the J point to the T wave).
    """
    s = subject
    w = s["qrs_width_factor"]
    rr = 60.0 / s["heart_rate_bpm"]
    rot = np.deg2rad(s["qrs_axis_deg"])
    r2 = np.array([[np.cos(rot), -np.sin(rot), 0], [np.sin(rot), np.cos(rot), 0], [0, 0, 1]])
    volt = s["voltage_scale"]
    qt = 400 * np.sqrt(rr)  # Bazett, QTc 400 ms
    pr = s["pr_ms"]
    waves = {
        "septal": [-24 * w, 7 * w, 0.18 * _unit(-0.55, 0.25, 0.8)],
        "anterior": [-9 * w, 8 * w, 0.55 * _unit(0.35, 0.35, 0.87)],
        "R": [0.0, 9 * w, 1.25 * _unit(0.8, 0.55, -0.25)],
        "S": [22 * w, 8 * w, 0.45 * _unit(-0.35, -0.45, -0.82)],
        "T": [-42 * w + qt - 95, 45.0, 0.32 * _unit(0.65, 0.6, 0.3)],
    }
    for k in ("septal", "anterior", "R", "S"):
        waves[k][2] = r2 @ waves[k][2]
    st = np.zeros(3)
    r_dir = waves["R"][2] / np.linalg.norm(waves["R"][2])
    if s["true_MI"]:
        a = ecg_signal * s["mi_severity"]
        u = _unit(*MI_TERRITORY[s["mi_territory"]])
        for k in ("septal", "anterior", "R"):
            waves[k][2] = waves[k][2] - min(1.0, 0.6 * a) * max(float(waves[k][2] @ u), 0.0) * u
        waves["Q_infarct"] = [-20.0, 11.0, -0.55 * a * u]  # points away from the dead wall: Q >= 40 ms facing it
        waves["T"][2] = waves["T"][2] - 0.45 * a * u
        st += 0.18 * a * u * s["mi_st_elevation"]
    if s["true_HYP"]:
        a = ecg_signal * s["hyp_severity"]
        waves["R"][2] = (1 + 0.75 * a) * (waves["R"][2] + np.array([0, 0, -0.25 * a]))
        waves["S"][2] = (1 + 0.6 * a) * waves["S"][2]
        waves["anterior"][2] = (1 + 0.3 * a) * waves["anterior"][2]
        for k in ("septal", "anterior", "R", "S"):
            waves[k][1] *= 1 + 0.08 * a
        if s["hyp_strain"]:  # discordant ST-T in the lateral leads
            waves["T"][2] = (1 - min(0.9 * a, 1.2)) * waves["T"][2] - 0.25 * a * r_dir
            st -= 0.08 * a * r_dir
    if s["true_CD"]:
        a = ecg_signal * s["cd_severity"]
        if s["cd_type"] == "RBBB":  # late right-anterior forces: R' in V1, broad S in I and V6
            rp = _unit(-0.55, 0.05, 0.83)
            waves["R_prime"] = [22 * w + 38 * a, 16.0, 0.7 * a * rp]
            waves["S"][1] *= 1 + 0.8 * a
            waves["T"][2] = waves["T"][2] - 0.2 * a * rp
        else:  # LBBB: septum activated from the left, broad notched leftward-posterior QRS, discordant T
            lb = _unit(0.75, 0.3, -0.6)
            b = min(a, 1.0)
            waves["septal"][2] = (1 - b) * waves["septal"][2] + b * 0.2 * _unit(0.7, 0.0, -0.3)
            waves["anterior"][2] = (1 - b) * waves["anterior"][2]
            waves["S"][2] = (1 - b) * waves["S"][2]
            waves["R"][1] *= 1 + 0.9 * a
            waves["R"][0] += 8 * a
            waves["R_notch"] = [30 * w * (1 + 0.6 * a), 12.0, 0.8 * a * lb]
            waves["T"][2] = (1 - b) * waves["T"][2] - 0.25 * a * lb
        pr += 90 * a * s["av_block"]  # first-degree A-V block
    if s["true_STTC"]:
        a = ecg_signal * s["sttc_severity"]
        st -= 0.12 * a * _unit(0.6, 0.6, 0.4)
        waves["T"][2] = (1 - 1.3 * a) * waves["T"][2]
    qrs_on = min(c - 2.5 * sd for k, (c, sd, _) in waves.items() if k not in ("T",))
    waves["P"] = [qrs_on - pr + 50, 22.0, 0.15 * _unit(0.55, 0.8, 0.2)]
    for k in waves:
        waves[k][2] = volt * waves[k][2]
    return waves, volt * st


def _beat_template(waves: dict[str, list], st: np.ndarray, t_ms: np.ndarray) -> np.ndarray:
    """(T, 8) leads I, II, V1..V6 of one beat sampled at ``t_ms`` (ms from R)."""
    heart = np.zeros((len(t_ms), 3))
    for centre, sd, vec in waves.values():
        heart += np.exp(-0.5 * ((t_ms - centre) / sd) ** 2)[:, None] * vec[None, :]
    j_point = max(c + 2 * sd for k, (c, sd, _) in waves.items() if k not in ("T", "P"))
    t_peak = waves["T"][0]
    plateau = 1 / (1 + np.exp(-(t_ms - j_point) / 12)) / (1 + np.exp(-(t_peak + 40 - t_ms) / 25))
    heart += plateau[:, None] * st[None, :]
    return heart @ _LEAD_VECTORS.T


def render_ecg(subject: dict[str, Any], rng: np.random.Generator, *, fs: int, seconds: float, ecg_signal: float,
               noise_sd: float) -> tuple[np.ndarray, np.ndarray]:
    """A 12-lead resting ECG: beats at the subject's rate with respiratory sinus arrhythmia,
    baseline wander, mains interference and white noise.

    Returns:
        (samples, 12) noisy record and the same record without noise, both in mV at ``fs``.
    """
    n = int(round(seconds * FS_SYNTH))
    waves, st = ecg_beat(subject, ecg_signal)
    pre, post = int(0.45 * FS_SYNTH), int(0.65 * FS_SYNTH)
    template = _beat_template(waves, st, np.arange(-pre, post) * 1000 / FS_SYNTH)
    rr = 60.0 / subject["heart_rate_bpm"]
    f_resp, ph = rng.uniform(0.15, 0.35), rng.uniform(0, 2 * np.pi)
    pad = pre + post  # beats just outside the record still show their T or P wave
    clean = np.zeros((n + 2 * pad, 8))
    t = rng.uniform(-rr, 0.0)
    while t * FS_SYNTH < n + pre:
        k = int(round(t * FS_SYNTH)) + pad
        if k >= pre:
            clean[k - pre: k + post] += template * (1 + 0.04 * np.sin(2 * np.pi * f_resp * t + ph))
        t += rr * (1 + 0.04 * np.sin(2 * np.pi * f_resp * t + ph) + 0.01 * rng.standard_normal())
    clean = clean[pad: pad + n]
    tt = np.arange(n)[:, None] / FS_SYNTH
    wander = 0.06 * np.sin(2 * np.pi * f_resp * tt + ph) * rng.standard_normal(8)
    wander = wander + 0.03 * np.sin(2 * np.pi * rng.uniform(0.05, 0.3, 8) * tt + rng.uniform(0, 2 * np.pi, 8))
    mains = rng.uniform(0, 0.015, 8) * np.sin(2 * np.pi * rng.choice([50, 60]) * tt + rng.uniform(0, 2 * np.pi, 8))
    noisy = clean + noise_sd * (wander + mains + rng.normal(0, 0.015, clean.shape))
    g = np.gcd(int(fs), FS_SYNTH)
    out = [_limb_to_12(x) for x in (noisy, clean)]
    if fs != FS_SYNTH:  # anti-aliased decimation, as PTB-XL's 100 Hz records were made
        out = [signal.resample_poly(x, int(fs) // g, FS_SYNTH // g, axis=0) for x in out]
    return out[0], out[1]


def read_ecg(record: Any) -> tuple[np.ndarray, float]:
    """(samples, 12) mV and fs of a WFDB record (path without extension), via :func:`mmlib.data.readers.read_wfdb`."""
    ecg = read_wfdb(record)
    return ecg.signal.T, ecg.fs


def _median_beat(sig: np.ndarray, fs: float) -> tuple[np.ndarray, int, float]:
    """Median beat (12 leads) aligned on the QRS peak of the spatial velocity; (beat, R index, RR s)."""
    if fs > 150:  # the QRS slopes matter, not the high-frequency noise
        b, a = signal.butter(3, 40 / (fs / 2))
        sig = signal.filtfilt(b, a, sig, axis=0)
    vel = np.sqrt((np.gradient(sig, axis=0) ** 2).sum(axis=1))
    sm = ndimage.uniform_filter1d(vel, max(1, int(0.04 * fs)))
    peaks, _ = signal.find_peaks(sm, distance=int(0.33 * fs), height=0.4 * np.percentile(sm, 99))
    pre, post = int(0.25 * fs), int(0.5 * fs)
    rr = float(np.median(np.diff(peaks)) / fs) if len(peaks) > 1 else float("nan")
    peaks = peaks[(peaks >= pre) & (peaks + post < len(sig))]
    return np.median(np.stack([sig[p - pre: p + post] for p in peaks]), axis=0), pre, rr


def ecg_features(sig: np.ndarray, fs: float) -> dict[str, Any]:
    """Interval and voltage measurements of a 12-lead record, from its median beat.

    QRS onset/offset: where the spatial velocity (root sum of squared lead slopes) exceeds 15%
    of its peak within -120..+140 ms of the QRS. Sokolow-Lyon: S in V1 + the larger R in V5/V6
    (> 3.5 mV suggests LVH).

    Args:
        sig: (samples, 12) mV in LEADS order.

    Returns:
        heart_rate_bpm, qrs_ms, sokolow_lyon_mv and ``per_lead`` (12, 5): Q, R, S, ST (J + 60 ms)
        and T (largest deflection 80-350 ms after J) in mV, baseline at the PR segment.
    """
    beat, r, rr = _median_beat(np.asarray(sig, dtype=float), fs)
    vel = np.sqrt((np.gradient(beat, axis=0) ** 2).sum(axis=1))
    lo, hi = r - int(0.12 * fs), r + int(0.14 * fs)  # the widest QRS fits; the T wave stays outside
    above = np.flatnonzero(vel[lo:hi] > 0.15 * vel[lo:hi].max()) + lo
    on, off = int(above[0]), int(above[-1])
    beat = beat - np.median(beat[max(0, on - max(2, int(0.03 * fs))): on], axis=0)
    qrs = beat[on: off + 1]
    t_seg = beat[off + int(0.08 * fs): off + int(0.35 * fs)]
    per_lead = np.column_stack([
        beat[on: on + max(2, int(0.04 * fs))].min(axis=0), qrs.max(axis=0), qrs.min(axis=0),
        beat[min(off + int(0.06 * fs), len(beat) - 1)], t_seg[np.abs(t_seg).argmax(axis=0), np.arange(12)],
    ])
    v1, v5, v6 = (LEADS.index(k) for k in ("V1", "V5", "V6"))
    return {
        "heart_rate_bpm": 60.0 / rr,
        "qrs_ms": (off - on + 1) * 1000.0 / fs,
        "sokolow_lyon_mv": float(-qrs[:, v1].min() + max(qrs[:, v5].max(), qrs[:, v6].max())),
        "per_lead": per_lead,
    }


# --------------------------------------------------------------------------- reports

NEGATION_CUES = (r"\bno\b", r"\bwithout\b", r"\bnot\b", r"\bnegative for\b", r"\bnormal\b", r"\bclear\b")
UNCERTAINTY_CUES = (r"\bpossible\b", r"\bpossibly\b", r"\bmay\b", r"\bcannot be excluded\b", r"\bcannot exclude\b",
                    r"\bborderline\b", r"\blikely\b", r"\bconsider\b", r"\bcannot rule out\b")
# what a sentence must contain to mention a label (a NegEx-style labeller reads these)
MENTIONS = {
    "atelectasis": r"atelecta|collapse|volume loss",
    "cardiomegaly": r"cardiomegaly|heart size|heart is|cardiac silhouette|cardiomediastinal silhouette",
    "edema": r"edema|vascular congestion|fluid overload",
    "pleural_effusion": r"effusion",
    "NORM": r"\bnormal ecg\b",
    "MI": r"infarct",
    "STTC": r"st-t|st depression|t wave|ischemi",
    "CD": r"bundle branch block|a-v block|conduction delay",
    "HYP": r"hypertrophy|\blvh\b",
}
MENTION_NEGATIVE_RATE = 0.7  # a negative X-ray finding is stated (negated) in 70% of reports, else omitted
_NEG = {
    "cardiomegaly": ["The heart size is normal.", "Heart size is within normal limits.", "No cardiomegaly.",
                     "The cardiac silhouette is normal in size.", "The cardiomediastinal silhouette is normal."],
    "edema": ["No pulmonary edema.", "There is no evidence of pulmonary edema.",
              "No pulmonary vascular congestion or edema.", "Pulmonary vasculature is normal without edema."],
    "pleural_effusion": ["No pleural effusion.", "No pleural effusion or pneumothorax.",
                         "There is no pleural effusion.", "No evidence of pleural effusion."],
    "atelectasis": ["No atelectasis.", "The lungs are clear without focal consolidation or atelectasis.",
                    "No focal opacity or atelectasis."],
}
_POS = {
    "cardiomegaly": ["{Sev} cardiomegaly.", "The heart is {sev_adv} enlarged.",
                     "{Sev} enlargement of the cardiac silhouette.", "The cardiac silhouette is {sev_adv} enlarged."],
    "edema": ["{Sev} pulmonary edema.", "{Sev} interstitial pulmonary edema.",
              "Perihilar haziness and vascular congestion consistent with {sev} pulmonary edema."],
    "pleural_effusion": ["{Sev} {side} pleural {effusions}.",
                         "{Sev} {side} pleural {effusions} with blunting of the costophrenic {angles}."],
    "atelectasis": ["{Shape} atelectasis in the {lobe}.", "Opacity in the {lobe} consistent with atelectasis.",
                    "{Lobe} volume loss and atelectasis."],
}
_UNC = {
    "cardiomegaly": ["Heart size is borderline enlarged.", "Possible mild cardiomegaly.",
                     "The cardiac silhouette may be mildly enlarged, accentuated by low lung volumes."],
    "edema": ["Possible mild pulmonary edema.", "Mild vascular congestion, early edema cannot be excluded.",
              "Hazy perihilar opacities may reflect mild edema."],
    "pleural_effusion": ["Possible small {side} pleural {effusions}.",
                         "Blunting of the costophrenic {angles} may reflect small {side} {effusions}.",
                         "A small {side} pleural effusion cannot be excluded."],
    "atelectasis": ["Opacity in the {lobe} may reflect atelectasis.", "Possible {lobe} atelectasis.",
                    "{Lobe} opacity, likely atelectasis, though infection cannot be excluded."],
}
_BOILERPLATE = ["PA and lateral views of the chest were obtained.",
                "The mediastinal and hilar contours are unremarkable.",
                "No pneumothorax is seen.", "No acute osseous abnormality.",
                "Visualized upper abdomen is unremarkable."]
_INDICATION = ["Shortness of breath.", "Chest pain.", "Cough and fever, evaluate for pneumonia.",
               "Preoperative evaluation.", "Dyspnea on exertion.", "Follow-up."]


def _words(subject: dict[str, Any]) -> dict[str, str]:
    ctr, size = subject["ctr"], subject["effusion_size"]
    sev_cm = "mild" if ctr < 0.56 else "moderate" if ctr < 0.61 else "severe"
    side = subject["effusion_side"]
    return {"cardiomegaly": sev_cm, "edema": "mild" if subject["edema_severity"] < 0.75 else "moderate",
            "pleural_effusion": "small" if size < 0.15 else "moderate" if size < 0.21 else "large",
            "side": side, "effusions": "effusions" if side == "bilateral" else "effusion",
            "angles": "angles" if side == "bilateral" else "angle", "lobe": subject["atelectasis_lobe"],
            "shape": "plate-like" if subject["atelectasis_shape"] == "plate" else "segmental"}


def _fill(template: str, label: str, wd: dict[str, str]) -> str:
    sev = wd.get(label, "mild")
    adv = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}.get(sev, sev)
    out = template.format(sev=sev, Sev=sev.capitalize(), sev_adv=adv, side=wd["side"], effusions=wd["effusions"],
                          angles=wd["angles"], lobe=wd["lobe"], Lobe=wd["lobe"].capitalize(),
                          Shape=wd["shape"].capitalize())
    return out[0].upper() + out[1:]


def write_radiology_report(subject: dict[str, Any], rng: np.random.Generator,
                           uncertain_rate: float) -> tuple[str, list[dict]]:
    """A MIMIC-CXR-style report (FINDINGS + IMPRESSION) stating the subject's four X-ray labels.

    Returns:
        the text and one annotation per sentence: {section, text, label (or None), polarity}.
    """
    wd = _words(subject)
    ann: list[dict[str, Any]] = []
    findings: list[str] = []
    positive: list[tuple[str, str]] = []
    for label in rng.permutation(XRAY_FINDINGS):
        if subject[label]:
            pol = "uncertain" if rng.random() < uncertain_rate else "positive"
            sent = _fill(rng.choice((_UNC if pol == "uncertain" else _POS)[label]), label, wd)
            positive.append((label, pol))
        elif rng.random() < MENTION_NEGATIVE_RATE:
            pol, sent = "negated", str(rng.choice(_NEG[label]))
        else:
            continue
        findings.append(sent)
        ann.append({"section": "findings", "text": sent, "label": str(label), "polarity": pol})
    for sent in rng.choice(_BOILERPLATE, size=int(rng.integers(1, 4)), replace=False):
        findings.insert(int(rng.integers(0, len(findings) + 1)), str(sent))
        ann.append({"section": "findings", "text": str(sent), "label": None, "polarity": None})
    impression: list[str] = []
    for i, (label, pol) in enumerate(positive, 1):
        sent = _fill(rng.choice((_UNC if pol == "uncertain" else _POS)[label]), label, wd)
        impression.append(f"{i}. {sent}" if len(positive) > 1 else sent)
        ann.append({"section": "impression", "text": sent, "label": label, "polarity": pol})
    if not positive:
        impression.append("No acute cardiopulmonary process.")
        ann.append({"section": "impression", "text": impression[0], "label": None, "polarity": None})
    sex = "woman" if subject["sex"] == "F" else "man"
    text = (f"EXAMINATION: CHEST (PA AND LAT)\n\nINDICATION: ___-year-old {sex}. {rng.choice(_INDICATION)}\n\n"
            "COMPARISON: None.\n\nFINDINGS:\n" + textwrap.fill(" ".join(findings), 79) + "\n\nIMPRESSION:\n"
            + "\n".join(impression) + "\n")
    return text, ann


_ECG_POS = {
    "MI": ["{Territory} infarct - age undetermined", "{Territory} infarct, old",
           "Q waves consistent with {territory} infarct"],
    "STTC": ["Nonspecific ST-T wave changes", "ST depression suggesting subendocardial ischemia", "T wave abnormality"],
    "HYP": ["Left ventricular hypertrophy", "Left ventricular hypertrophy by voltage criteria",
            "LVH with strain pattern"],
    "RBBB": ["Right bundle branch block"], "LBBB": ["Left bundle branch block"], "AVB": ["1st degree A-V block"],
}
_ECG_UNC = {
    "MI": ["Possible {territory} infarct - age undetermined", "Cannot rule out {territory} infarct"],
    "STTC": ["ST-T changes, possibly ischemic", "Possible T wave abnormality"],
    "HYP": ["Possible left ventricular hypertrophy", "Borderline voltage criteria for LVH"],
    "RBBB": ["Possible incomplete right bundle branch block"], "LBBB": ["Possible left bundle branch block"],
    "AVB": ["Borderline 1st degree A-V block"],
}


def write_ecg_statement(subject: dict[str, Any], rng: np.random.Generator, uncertain_rate: float,
                        measured: dict[str, float]) -> tuple[str, list[dict]]:
    """A machine ECG statement (MIMIC-IV-ECG style) stating the subject's five ECG labels."""
    hr = measured["heart_rate_bpm"]
    ann: list[dict[str, Any]] = []
    lines = [f"Vent. rate {hr:.0f} bpm. QRS duration {measured['qrs_ms']:.0f} ms."]
    ann.append({"text": lines[0], "label": None, "polarity": None})
    rhythm = "Sinus bradycardia" if hr < 60 else "Sinus tachycardia" if hr > 100 else "Sinus rhythm"
    lines.append(rhythm)
    ann.append({"text": rhythm, "label": None, "polarity": None})
    terr = subject["mi_territory"]
    for label in ("CD", "HYP", "MI", "STTC"):
        if not subject[label]:
            continue
        kinds = [subject["cd_type"]] + (["AVB"] if subject["av_block"] else []) if label == "CD" else [label]
        for kind in kinds:
            pol = "uncertain" if rng.random() < uncertain_rate else "positive"
            line = str(rng.choice((_ECG_UNC if pol == "uncertain" else _ECG_POS)[kind]))
            line = line.format(territory=terr, Territory=terr.capitalize())
            lines.append(line)
            ann.append({"text": line, "label": label, "polarity": pol})
    final = "Normal ECG" if subject["NORM"] else "Abnormal ECG"
    lines.append(final)
    norm = bool(subject["NORM"])
    ann.append({"text": final, "label": "NORM" if norm else None, "polarity": "positive" if norm else None})
    return "\n".join(lines) + "\n", ann


def report_labels(text: str, labels: tuple[str, ...] = XRAY_FINDINGS) -> dict[str, int]:
    """A NegEx-style labeller: 1 if a sentence mentions the label without a negation cue
    (uncertain mentions count as positive, the CheXpert "U-ones" policy), else 0."""
    out = dict.fromkeys(labels, 0)
    text = re.sub(r"\n(?=[a-z0-9(])", " ", text)  # undo line wrapping inside a sentence
    for sent in re.split(r"(?<=\.)\s+|\n", text.lower()):
        uncertain = any(re.search(c, sent) for c in UNCERTAINTY_CUES)
        negated = not uncertain and any(re.search(c, sent) for c in NEGATION_CUES)
        for label in labels:
            # "Normal ECG" states NORM; its "normal" is the finding, not a negation
            if re.search(MENTIONS[label], sent) and (label == "NORM" or not negated):
                out[label] = 1
    return out


# --------------------------------------------------------------------------- the generator


def _choice(rng: np.random.Generator, options: tuple[str, ...], p: np.ndarray) -> np.ndarray:
    """One draw per row of ``p`` (N, K) from ``options``."""
    return np.asarray(options)[(rng.random(len(p))[:, None] > np.cumsum(p, axis=1)).sum(axis=1)]


class XrayECGReports(CohortGenerator):
    """Chest X-ray + 12-lead ECG + radiology report + ECG statement linked by hidden conditions (P3).

    Example::

        from mmlib.cohorts import generate
        cohort = generate("xray_ecg", "quick", seed=0, coupling=0.0)   # modalities independent
    """

    name = "xray_ecg"
    paper = "P3"
    description = ("Chest X-ray (PNG), 12-lead ECG (WFDB) and reports of patients whose hidden conditions "
                   "(heart failure, hypertensive heart disease, prior MI, conduction disease, lung process) "
                   "drive 4 X-ray findings and 5 ECG superclasses")
    presets = PRESETS
    version = "2"  # 2: masks/<id>_findings.png (findings_mask)

    def plan(self, rng: np.random.Generator) -> CohortPlan:
        k = self.knobs
        n = k.n_subjects
        for knob in ("prevalence", "coupling", "label_noise", "uncertain_rate"):
            if not 0 <= getattr(k, knob) <= 1:
                raise ValueError(f"{knob} must be in [0, 1], got {getattr(k, knob)}")
        if n < 20:
            raise ValueError(f"n_subjects must be >= 20 (every split needs both classes of 9 labels), got {n}")
        age = np.clip(rng.normal(64, 15, n), 18, 95).round()
        scale = _calibrate(k.prevalence, age)
        cond = _draw_conditions(rng, scale, age)
        shared = rng.random(n) < k.coupling
        # the ECG of an unshared patient shows another (independent) patient's conditions
        other = _draw_conditions(rng, scale, np.clip(rng.normal(64, 15, n), 18, 95).round())
        cond_ecg = np.where(shared[:, None], cond, other)
        true = {f: _noisy_or(cond, f, rng) for f in XRAY_FINDINGS}
        true |= {f: _noisy_or(cond_ecg, f, rng) for f in ECG_CLASSES[1:]}
        true["NORM"] = ~np.any([true[f] for f in ECG_CLASSES[1:]], axis=0)
        obs = {}
        for f in (*XRAY_FINDINGS, *ECG_CLASSES[1:]):
            redraw = rng.random(n) < true[f].mean()
            obs[f] = np.where(rng.random(n) < k.label_noise, redraw, true[f]).astype(int)
        obs["NORM"] = 1 - np.max([obs[f] for f in ECG_CLASSES[1:]], axis=0)
        # the ECG's patient: tachycardia with heart failure or a lung process
        hf, lung = (cond_ecg[:, CONDITIONS.index(c)] for c in ("heart_failure", "lung_process"))

        df = pd.DataFrame({"subject_id": [f"sub-{i + 1:04d}" for i in range(n)], "age": age,
                           "sex": np.where(rng.random(n) < 0.5, "F", "M")})
        for f in (*XRAY_FINDINGS, *ECG_CLASSES):
            df[f] = obs[f]
        df["split"] = _assign_splits(df[[*XRAY_FINDINGS, *ECG_CLASSES]].to_numpy(), k.split_fractions, rng)
        for j, c in enumerate(CONDITIONS):
            df[f"cond_{c}"] = cond[:, j]
            df[f"ecg_cond_{c}"] = cond_ecg[:, j]
        df["ecg_shares_conditions"] = shared
        for f in (*XRAY_FINDINGS, *ECG_CLASSES):
            df[f"true_{f}"] = true[f]
        # X-ray geometry (body frame, thorax half-width ~0.76) and finding details
        df["thorax_half_width"] = np.clip(rng.normal(0.76, 0.025, n), 0.70, 0.82)
        df["heart_x"] = rng.normal(0.09, 0.015, n)
        ctr_base = np.clip(rng.normal(0.44, 0.025, n), 0.37, 0.49)
        df["ctr"] = np.minimum(ctr_base + k.image_signal * true["cardiomegaly"] * rng.uniform(0.09, 0.17, n), 0.68)
        df["dome_right"], df["dome_left"] = rng.normal(0.58, 0.03, n), rng.normal(0.63, 0.03, n)
        hf_x = cond[:, CONDITIONS.index("heart_failure"), None]  # effusions in heart failure are mostly bilateral
        df["effusion_side"] = _choice(rng, ("right", "left", "bilateral"),
                                      np.where(hf_x, [0.25, 0.15, 0.6], [0.5, 0.3, 0.2]))
        df["effusion_size"] = rng.uniform(0.08, 0.25, n)
        df["edema_severity"] = rng.uniform(0.5, 1.0, n)
        df["atelectasis_lobe"] = _choice(rng, LOBES, np.tile([0.35, 0.3, 0.15, 0.1, 0.1], (n, 1)))
        df["atelectasis_shape"] = np.where(rng.random(n) < 0.6, "plate", "wedge")
        lobe_xy = np.array([_LOBE_XY[lb] for lb in df["atelectasis_lobe"]])
        outward = np.degrees(np.arctan2(lobe_xy[:, 1] - 0.05, lobe_xy[:, 0] - 0.2 * np.sign(lobe_xy[:, 0])))
        df["atelectasis_angle_deg"] = np.where(df["atelectasis_shape"] == "plate", 0.0, outward) + rng.normal(0, 10, n)
        df["atelectasis_severity"] = rng.uniform(0.7, 1.0, n)
        # ECG: rhythm, intervals, axis, voltage, and the details of each condition's pattern
        df["heart_rate_bpm"] = np.clip(rng.normal(72, 11, n) + k.ecg_signal * (12 * lung + 6 * hf), 45, 130)
        df["pr_ms"] = np.clip(rng.normal(160, 15, n), 120, 200)
        df["qrs_width_factor"] = rng.normal(1.12, 0.06, n)
        df["qrs_axis_deg"] = rng.normal(0, 15, n)
        df["voltage_scale"] = np.exp(rng.normal(0, 0.15, n)) * np.where(df["sex"] == "F", 0.9, 1.0)
        df["mi_territory"] = _choice(rng, tuple(MI_TERRITORY), np.tile([0.5, 0.35, 0.15], (n, 1)))
        df["mi_st_elevation"] = rng.random(n) < 0.25
        df["mi_severity"] = rng.uniform(0.7, 1.2, n)
        df["hyp_severity"] = rng.uniform(0.5, 1.3, n)
        df["hyp_strain"] = rng.random(n) < 0.5
        df["cd_type"] = np.where(rng.random(n) < 0.55, "RBBB", "LBBB")
        df["cd_severity"] = rng.uniform(0.7, 1.2, n)
        df["av_block"] = rng.random(n) < 0.3
        df["sttc_severity"] = rng.uniform(0.6, 1.0, n)
        return CohortPlan(subjects=df, truth=self._truth(scale))

    def _truth(self, scale: float) -> dict[str, Any]:
        k = self.knobs
        return {
            "conditions": {c: {"base_rate_at_65": float(CONDITION_WEIGHT[c] * scale)} for c in CONDITIONS},
            "condition_model": (f"logit P(c) = logit(base_rate_c) + {AGE_LOG_ODDS_PER_DECADE} * (age - 65) / 10, "
                                "independent except prior_mi multiplies the odds of heart_failure by "
                                f"{MI_TO_HF_ODDS_RATIO}; "
                                "base rates scaled so that P(any condition) = prevalence"),
            "condition_to_finding_probability": P_FINDING,
            "leak_probability": LEAK,
            "finding_model": ("noisy-OR: P(f=1 | C) = 1 - (1 - leak_f) * prod_c (1 - p_cf)^C_c; "
                              "NORM = none of MI, STTC, CD, HYP"),
            "coupling": (f"with probability {k.coupling} a patient's ECG findings come from the patient's own "
                         "conditions "
                         "(latent ecg_shares_conditions), else from an independent patient's (ecg_cond_*)"),
            "label_noise": f"each label is replaced with probability {k.label_noise} by a draw from its marginal",
            "xray": {
                "view": "PA; radiological convention (patient's right on the image left); bright = attenuating",
                "pixel_spacing_mm": k.field_of_view_mm / k.image_size,
                "cardiomegaly": ("CTR = heart width / thoracic width = N(0.44, 0.025), "
                                 f"+ {k.image_signal} x U(0.09, 0.17) with cardiomegaly"),
                "pleural_effusion": f"fluid (density +{0.36 * k.image_signal:.2f}) filling the base below a meniscus; "
                                    "side right/left/bilateral (bilateral 60% with heart failure)",
                "edema": f"perihilar (bat-wing) haze, peak density +{0.2 * k.image_signal:.2f} x severity",
                "atelectasis": ("plate-like band (60%) or segmental wedge in one lobe, "
                                f"density +{0.26 * k.image_signal:.2f} x severity"),
            },
            "ecg": {
                "model": ("ECGSYN Gaussian waves (P, septal, anterior, R, S, T) of a 3-D heart vector, "
                          "projected on 12 lead vectors"),
                "fs_hz": k.ecg_fs_hz, "seconds": k.ecg_seconds, "units": "mV", "leads": list(LEADS),
                "MI": f"Q wave vector away from the territory (0.55 x {k.ecg_signal} mV), R loss and T inversion "
                      "facing it; "
                      "ST elevation in 25%",
                "HYP": f"R voltage x (1 + 0.75 x {k.ecg_signal} x severity), more posterior; "
                       "strain (discordant ST-T) in 50%",
                "CD": f"RBBB (55%: late R' of 0.7 x {k.ecg_signal} mV) or LBBB (broad notched QRS, discordant T); "
                      "first-degree A-V block (PR + 90 ms) in 30%",
                "STTC": (f"ST depression (0.12 x {k.ecg_signal} mV), "
                         f"T amplitude x (1 - 1.3 x {k.ecg_signal} x severity)"),
                "heart_rate": (f"N(72, 11) + {k.ecg_signal} x (12 with a lung process + 6 with heart failure), "
                               "clipped to [45, 130] bpm"),
            },
            "reports": {
                "source": "written from the labels (so label noise is image/ECG vs text disagreement)",
                "uncertain_rate": k.uncertain_rate,
                "negative_mention_rate": MENTION_NEGATIVE_RATE,
                "negation_cues": list(NEGATION_CUES), "uncertainty_cues": list(UNCERTAINTY_CUES),
                "per_sentence": "latents report_sentences / ecg_statement_sentences: text, label, polarity",
            },
            "splits": dict(zip(("train", "val", "test"), k.split_fractions, strict=True)),
        }

    def render_subject(self, subject: dict[str, Any], rng: np.random.Generator, files: SubjectFiles) -> dict[str, Any]:
        k = self.knobs
        sid = subject["subject_id"]
        img, geo, mask = render_xray(subject, rng, k.image_size, image_signal=k.image_signal, noise_sd=k.noise_sd)
        noisy, clean = render_ecg(subject, rng, fs=k.ecg_fs_hz, seconds=k.ecg_seconds, ecg_signal=k.ecg_signal,
                                  noise_sd=k.noise_sd)
        machine, exact = ecg_features(noisy, k.ecg_fs_hz), ecg_features(clean, k.ecg_fs_hz)
        report, report_ann = write_radiology_report(subject, rng, k.uncertain_rate)
        statement, statement_ann = write_ecg_statement(subject, rng, k.uncertain_rate, machine)
        return {
            "xray": files.png(f"xray/{sid}_pa.png", img),
            "ecg": files.wfdb(f"ecg/{sid}", noisy, k.ecg_fs_hz, list(LEADS),
                              comments=[f"age: {int(subject['age'])}", f"sex: {subject['sex']}"]),
            "report": files.text(f"reports/{sid}_cxr.txt", report),
            "ecg_statement": files.text(f"reports/{sid}_ecg.txt", statement),
            "findings_mask": files.png(f"masks/{sid}_findings.png", mask),
            **geo,
            "qrs_ms_clean": exact["qrs_ms"],
            "sokolow_lyon_mv_clean": exact["sokolow_lyon_mv"],
            "report_sentences": report_ann,
            "ecg_statement_sentences": statement_ann,
        }

    def manifest(self) -> Manifest:
        label = {"atelectasis": "atelectasis on the radiograph (report-derived label)",
                 "cardiomegaly": "enlarged cardiac silhouette (report-derived label)",
                 "edema": "pulmonary edema (report-derived label)",
                 "pleural_effusion": "pleural effusion (report-derived label)",
                 "NORM": "normal ECG (PTB-XL superclass)", "MI": "myocardial infarction (PTB-XL superclass)",
                 "STTC": "ST/T change (PTB-XL superclass)", "CD": "conduction disturbance (PTB-XL superclass)",
                 "HYP": "hypertrophy (PTB-XL superclass)"}
        return Manifest(
            name=self.name,
            description=self.description,
            columns=[
                Column(name="age", dtype="float", unit="years", min=18, max=95),
                Column(name="sex", dtype="category", categories=["F", "M"]),
                *[Column(name=f, dtype="int", description=d, min=0, max=1) for f, d in label.items()],
                Column(name="split", dtype="category", categories=["train", "val", "test"]),
            ],
            modalities=[
                Modality(name="xray", column="xray", format="png",
                         description=f"PA chest radiograph, 8-bit greyscale, {self.knobs.image_size} px square"),
                Modality(name="ecg", column="ecg", format="wfdb",
                         description=f"12-lead ECG, {self.knobs.ecg_seconds:g} s at {self.knobs.ecg_fs_hz} Hz, mV"),
                Modality(name="report", column="report", format="text",
                         description="radiology report: FINDINGS + IMPRESSION"),
                Modality(name="ecg_statement", column="ecg_statement", format="text",
                         description="machine ECG statement"),
                Modality(name="findings_mask", column="findings_mask", format="png",
                         description="where the true X-ray findings were planted, uint8 bit-coded on the xray grid: "
                                     "1 atelectasis, 2 cardiomegaly (heart), 4 edema, 8 pleural effusion"),
            ],
            labels=[*XRAY_FINDINGS, *ECG_CLASSES],
            split_column="split",
            truth="truth.json",
        )


# --------------------------------------------------------------------------- tour: figures and checks


def _load_xrays(cohort: Cohort) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(p)) for p in cohort.paths("xray")]


def _thumbnail(img: np.ndarray, k: int = 8) -> np.ndarray:
    """(k*k,) block means of an image, z-scored within the image (exposure differs by subject)."""
    h, w = (np.array(img.shape) // k) * k
    t = img[:h, :w].astype(float).reshape(k, h // k, k, w // k).mean(axis=(1, 3)).ravel()
    return (t - t.mean()) / (t.std() + 1e-9)


def _cv_scores(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Held-out probabilities of a 5-fold cross-validated L2 logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = int(min(5, np.bincount(y).min()))
    if folds < 2:
        return np.full(len(y), 0.5)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    cv = StratifiedKFold(folds, shuffle=True, random_state=0)
    return cross_val_predict(model, x, y, cv=cv, method="predict_proba")[:, 1]


def _auc(y: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """ROC-AUC and its standard deviation under no signal (Mann-Whitney null)."""
    from sklearn.metrics import roc_auc_score

    n1, n0 = int(y.sum()), int(len(y) - y.sum())
    if not n1 or not n0:
        return float("nan"), float("nan")
    auc = roc_auc_score(y, np.nan_to_num(score, nan=np.nanmedian(score)))  # a failed measurement scores neutral
    return float(auc), float(np.sqrt((n1 + n0 + 1) / (12 * n1 * n0)))


def planted_effect_checks(cohort: Cohort) -> pd.DataFrame:
    """One row per planted effect, measured now from the files on disk and the subject table.

    ``present``: the value beats chance by more than 3 null standard deviations and by at least
    0.05 (AUC, balanced accuracy or correlation). Fitted models are 5-fold cross-validated, so a
    cohort without the signal scores about chance.
    """
    sub = cohort.subjects
    y = {c: sub[c].astype(int).to_numpy() for c in (*XRAY_FINDINGS, *ECG_CLASSES)}
    n = len(sub)
    xrays = _load_xrays(cohort)
    thumbs = np.stack([_thumbnail(im) for im in xrays])
    ecgs = [ecg_features(*read_ecg(p)) for p in cohort.paths("ecg")]
    beat = np.stack([np.r_[f["per_lead"].ravel(), f["qrs_ms"], f["heart_rate_bpm"]] for f in ecgs])
    rows: list[tuple[str, str, float, float, float]] = []  # effect, measure, value, chance, null sd

    def auc_row(effect: str, measure: str, label: str, score: np.ndarray) -> None:
        value, sd = _auc(y[label], score)
        rows.append((effect, measure, value, 0.5, sd))

    auc_row("cardiomegaly widens the heart shadow", "ROC-AUC of the cardiothoracic ratio measured from the PNG "
            "(lung edges) for the cardiomegaly label", "cardiomegaly", np.array([measure_ctr(im) for im in xrays]))
    for f, what in (("pleural_effusion", "pleural effusion fills the costophrenic angles"),
                    ("edema", "edema adds perihilar haze"),
                    ("atelectasis", "atelectasis adds a band or wedge opacity")):
        auc_row(what, f"ROC-AUC, 5-fold CV logistic regression on 8x8 PNG thumbnails, for the {f} label", f,
                _cv_scores(thumbs, y[f]))
    auc_row("conduction disease widens the QRS", "ROC-AUC of QRS duration measured from the WFDB record "
            "(median beat) for the CD label", "CD", np.array([f["qrs_ms"] for f in ecgs]))
    auc_row("hypertrophy raises the QRS voltage", "ROC-AUC of the Sokolow-Lyon voltage (S V1 + R V5/V6) "
            "measured from the WFDB record for the HYP label", "HYP", np.array([f["sokolow_lyon_mv"] for f in ecgs]))
    for c, what in (("MI", "prior MI leaves Q waves and T inversion"),
                    ("STTC", "ST-T change depresses ST, flattens T")):
        auc_row(what, f"ROC-AUC, 5-fold CV logistic regression on median-beat Q/R/S/ST/T amplitudes of 12 leads "
                f"(WFDB), for the {c} label", c, _cv_scores(beat, y[c]))
    for col, labels, what in (("report", XRAY_FINDINGS, "the radiology report states the X-ray labels"),
                              ("ecg_statement", ECG_CLASSES, "the ECG statement states the ECG labels")):
        read = [report_labels(p.read_text(), labels) for p in cohort.paths(col)]
        stats = [_auc(y[c], np.array([r[c] for r in read], dtype=float)) for c in labels]
        rows.append((what, f"balanced accuracy of a NegEx-style keyword labeller on the {col.replace('_', ' ')} text, "
                     f"mean over {len(labels)} labels", float(np.mean([s[0] for s in stats])), 0.5,
                     float(np.mean([s[1] for s in stats]))))
    phi = float(np.corrcoef(y["cardiomegaly"], y["HYP"])[0, 1])
    rows.append(("shared conditions couple the modalities", "phi correlation of the cardiomegaly and HYP labels "
                 "(subject table)", phi, 0.0, 1 / np.sqrt(n)))
    xr = np.column_stack([y[f] for f in XRAY_FINDINGS]).astype(float)
    auc_row("shared conditions couple the modalities", "ROC-AUC, 5-fold CV logistic regression predicting an abnormal "
            "ECG (NORM = 0) from the 4 X-ray labels", "NORM", 1 - _cv_scores(xr, 1 - y["NORM"]))
    df = pd.DataFrame(rows, columns=["effect", "measure", "value", "chance", "null_sd"])
    df["present"] = (df["value"] - df["chance"]) > np.maximum(0.05, 3 * df["null_sd"])
    return df.drop(columns="null_sd")


_ECG_PAPER = {"minor": "#f6c8c8", "major": "#e48a8a"}


def ecg_range(sig: np.ndarray, fs: float, seconds: float = 4.0) -> tuple[float, float]:
    """The y range :func:`ecg_figure` draws ``sig`` ((samples, 12) at ``fs`` Hz) on: at least
    [-1.5, 1.5], widened to whole 0.5 units so the first ``seconds`` fit."""
    part = sig[np.arange(sig.shape[0]) / fs <= seconds]
    if not part.size:
        return -1.5, 1.5
    return min(-1.5, float(np.floor(part.min() * 2) / 2)), max(1.5, float(np.ceil(part.max() * 2) / 2))


def ecg_figure(sig: np.ndarray, fs: float, title: str, seconds: float = 4.0, units: str = "mV",
               ylim: tuple[float, float] | None = None) -> Figure:
    """12 panels (limb leads left, chest leads right) on ECG paper: 0.2 s x 0.5 mV major squares.

    ``sig`` is (samples, 12) in the order of :data:`LEADS`; ``units`` labels the y axes (a
    preprocessed ECG is unitless). In mV the paper's squares are square, as on a 25 mm/s,
    10 mm/mV printout. ``ylim`` fixes the y range (default: :func:`ecg_range` of ``sig``).
    """
    import matplotlib.pyplot as plt

    lo, hi = ylim if ylim is not None else ecg_range(sig, fs, seconds)
    # in mV the panels take the paper's shape (0.4 s of width per mV of height), so the grid fills the page
    panel_h = 6.2 * (hi - lo) * (0.2 / 0.5) / seconds if units == "mV" else 1.6
    fig, axs = plt.subplots(6, 2, figsize=(14, 6 * panel_h + 1.4), sharex=True, sharey=True)
    t = np.arange(sig.shape[0]) / fs
    keep = t <= seconds
    for j, lead in enumerate(LEADS):
        ax = axs[j % 6, j // 6]
        for step, colour, lw in ((0.04, _ECG_PAPER["minor"], 0.4), (0.2, _ECG_PAPER["major"], 0.8)):
            ax.vlines(np.arange(0, seconds + 1e-9, step), lo, hi, color=colour, lw=lw, zorder=0)
            ax.hlines(np.arange(lo, hi + 1e-9, step * 2.5), 0, seconds, color=colour, lw=lw, zorder=0)
        ax.plot(t[keep], sig[keep, j], color="black", lw=0.9)
        ax.text(0.01, 0.92, lead, transform=ax.transAxes, fontsize=12, fontweight="bold", va="top")
        ax.set_xlim(0, seconds)
        ax.set_ylim(lo, hi)
        if units == "mV":  # 0.5 mV spans as much paper as 0.2 s
            ax.set_aspect(0.2 / 0.5, adjustable="box")
    for ax in axs[-1]:
        ax.set_xlabel("time (s)")
    for ax in axs[:, 0]:
        ax.set_ylabel(units)
    paper = "  (paper: 0.04 s x 0.1 mV minor, 0.2 s x 0.5 mV major squares)" if units == "mV" else ""
    fig.suptitle(title + paper, fontsize=13)
    fig.tight_layout()
    return fig


def tour_figures(cohort: Cohort) -> dict[str, Figure]:
    """X-ray grid, a normal and an abnormal 12-lead ECG, example reports, and label co-occurrence."""
    import matplotlib.pyplot as plt

    sub = cohort.subjects.reset_index(drop=True)
    lat = cohort.latents().set_index("subject_id")
    xlab = sub[list(XRAY_FINDINGS)].astype(int)
    figs: dict[str, Figure] = {}

    # 1. X-rays: two without findings, then one per finding, then the most findings at once
    picks = list(np.flatnonzero(xlab.sum(axis=1).to_numpy() == 0)[:2])
    for f in XRAY_FINDINGS:
        cand = [i for i in np.flatnonzero(xlab[f].to_numpy() == 1) if i not in picks]
        picks += cand[:1]
    picks += [i for i in np.argsort(-xlab.sum(axis=1).to_numpy(), kind="stable") if i not in picks][: 8 - len(picks)]
    fig, axs = plt.subplots(2, 4, figsize=(14, 8.4))
    for ax, i in zip(axs.flat, picks, strict=False):
        from PIL import Image

        img = np.asarray(Image.open(cohort.root / sub.loc[i, "xray"]))
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        found = [f.replace("pleural_", "") for f in XRAY_FINDINGS if xlab.loc[i, f]] or ["no finding"]
        ax.set_title(f"{sub.loc[i, 'subject_id']} (CTR measured {measure_ctr(img):.2f})\n"
                     + textwrap.fill(", ".join(found), 34), fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.02, 0.02, "R", color="white", transform=ax.transAxes, fontsize=11, fontweight="bold")
    for ax in axs.flat[len(picks):]:
        ax.axis("off")
    fig.suptitle("Generated chest radiographs (PA, patient's right on the image left) with their labels", fontsize=13)
    fig.tight_layout()
    figs["xray_grid"] = fig

    # 2. ECGs: a normal one and a clearly abnormal one (true finding and label agree), on one scale
    fs_note = f"{cohort.truth['knobs']['ecg_seconds']:g} s at {cohort.truth['knobs']['ecg_fs_hz']} Hz, first 4 s shown"
    shown: dict[str, tuple[np.ndarray, float, str]] = {}
    norm = [i for i in range(len(sub)) if sub.loc[i, "NORM"] == 1 and lat.loc[sub.loc[i, "subject_id"], "true_NORM"]]
    if norm:
        sid = sub.loc[norm[0], "subject_id"]
        shown["ecg_normal"] = (*read_ecg(cohort.root / sub.loc[norm[0], "ecg"]), f"{sid}: normal ECG ({fs_note})")
    for c in ("CD", "MI", "HYP", "STTC"):
        hit = [i for i in range(len(sub)) if sub.loc[i, c] == 1 and lat.loc[sub.loc[i, "subject_id"], f"true_{c}"]]
        if hit:
            sid = sub.loc[hit[0], "subject_id"]
            detail = {"CD": lat.loc[sid, "cd_type"], "MI": f"{lat.loc[sid, 'mi_territory']} infarct",
                      "HYP": "left ventricular hypertrophy", "STTC": "ST-T change"}[c]
            labels = ", ".join(k for k in ECG_CLASSES if sub.loc[hit[0], k] == 1)
            shown["ecg_abnormal"] = (*read_ecg(cohort.root / sub.loc[hit[0], "ecg"]),
                                     f"{sid}: {labels} ({detail}; {fs_note})")
            break
    if shown:
        ranges = [ecg_range(sig, fs) for sig, fs, _ in shown.values()]
        ylim = (min(lo for lo, _ in ranges), max(hi for _, hi in ranges))
        for name, (sig, fs, title) in shown.items():
            figs[name] = ecg_figure(sig, fs, title, ylim=ylim)

    # 3. example reports: no finding, the most X-ray findings, and one with a hedged mention
    hedged = [i for i in range(len(sub))
              if any(a["polarity"] == "uncertain" for a in lat.loc[sub.loc[i, "subject_id"], "report_sentences"])]
    ex = [picks[0], int(np.argmax(xlab.sum(axis=1).to_numpy()))] + [i for i in hedged if i not in picks[:1]][:1]
    fig, axs = plt.subplots(1, len(ex), figsize=(14, 7))
    for ax, i in zip(np.atleast_1d(axs), ex, strict=True):
        rep = (cohort.root / sub.loc[i, "report"]).read_text()
        stmt = (cohort.root / sub.loc[i, "ecg_statement"]).read_text()
        body = "\n".join(textwrap.fill(line, 44) if line else "" for line in rep.splitlines())
        labels = ", ".join(c for c in (*XRAY_FINDINGS, *ECG_CLASSES) if sub.loc[i, c] == 1)
        ax.text(0, 1, f"{body}\n\nECG STATEMENT:\n{stmt}", va="top", family="monospace", fontsize=8.5, wrap=True)
        ax.set_title(f"{sub.loc[i, 'subject_id']}\nlabels: {labels}", fontsize=10)
        ax.axis("off")
    fig.suptitle("Example radiology reports and machine ECG statements (written from the labels)", fontsize=13)
    fig.tight_layout()
    figs["reports"] = fig

    # 4. the planted network and the label co-occurrence it produces
    cols = [*XRAY_FINDINGS, *ECG_CLASSES[1:]]
    planted = np.array([[P_FINDING[c].get(f, 0.0) for f in cols] for c in CONDITIONS] + [[LEAK[f] for f in cols]])
    allc = [*XRAY_FINDINGS, *ECG_CLASSES]
    phi = np.corrcoef(sub[allc].astype(float).to_numpy().T)
    fig, axs = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [1.15, 1]})
    im = axs[0].imshow(planted, cmap="Blues", vmin=0, vmax=1)
    axs[0].set_xticks(range(len(cols)), [c.replace("pleural_", "") for c in cols], rotation=40, ha="right")
    axs[0].set_yticks(range(len(CONDITIONS) + 1), [c.replace("_", " ") for c in CONDITIONS] + ["leak (no condition)"])
    for (r, c), v in np.ndenumerate(planted):
        if v:
            axs[0].text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v > 0.5 else "black")
    axs[0].axvline(3.5, color="black", lw=1.5)
    axs[0].set_title("Planted: P(finding | condition), noisy-OR\nX-ray findings | ECG classes")
    fig.colorbar(im, ax=axs[0], shrink=0.8, label="probability")
    im = axs[1].imshow(phi, cmap="RdBu_r", vmin=-0.6, vmax=0.6)
    names = [c.replace("pleural_", "") for c in allc]
    axs[1].set_xticks(range(len(allc)), names, rotation=40, ha="right")
    axs[1].set_yticks(range(len(allc)), names)
    for (r, c), v in np.ndenumerate(phi):
        if r != c:
            axs[1].text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7)
    for v in (3.5,):
        axs[1].axvline(v, color="black", lw=1.5)
        axs[1].axhline(v, color="black", lw=1.5)
    coupling = cohort.truth["knobs"]["coupling"]
    axs[1].set_title(f"Observed: label correlation (phi), n = {len(sub)}, coupling = {coupling:g}")
    fig.colorbar(im, ax=axs[1], shrink=0.8, label="phi")
    fig.suptitle("Hidden conditions link the X-ray findings and the ECG classes", fontsize=13)
    fig.tight_layout()
    figs["label_cooccurrence"] = fig
    return figs
