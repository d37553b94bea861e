"""Generated chest-CT + longitudinal-EHR cohort with a time-to-event outcome (paper P4).

Stands in for a Mayo-like pulmonary-embolism (PE) mortality cohort: one CT pulmonary angiogram
per subject at the index date, the subject's coded EHR events over the three years before it,
death within a year after it, and an internal and an external hospital.

Causal model (per subject; every coefficient is recorded in ``truth.json``)::

    u_img ~ N(mu_site, 1)     clot burden (standardised); obstruction f = expit(1.3 u_img - 0.4)
    z_ehr ~ N(mu_site, 1)     comorbidity / frailty state at the index date; corr(u_img, z_ehr) = rho
    x(t)  = z_ehr - 0.25 t/365 + 0.5 B(t/365)     the state t days before the index (B: Brownian)
    lp    = signal * (sqrt(image_share) * u_img + sqrt(1 - image_share) * z_ehr)
            + tabular_signal * (age - 62) / 14
    T     ~ Weibull proportional hazards, h(t) = h0(t) exp(lp); censored at follow-up or on loss

The CT renders the burden as filling defects (~45 HU) in contrast-filled pulmonary arteries
(~320 HU), placed until the clot occupies a share f of the rendered arterial lumen; the clot
mask is saved beside it. The EHR carries the state through diagnosis and medication codes
(per-visit probability expit(a_c + b_c x + subject effect)) and lab values (standardised value
b_l x + subject effect + noise). The external site shifts the scanner (HU offset and scale,
noise, softer kernel, less contrast), the coding (sibling codes, fewer codes, visits and labs,
other lab units, BNP instead of NT-proBNP) and the case mix (older, larger clots, sicker);
``site_shift`` scales all of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.special import expit

from mmlib.cohorts import phantoms
from mmlib.cohorts.base import CohortGenerator, CohortKnobs, CohortPlan, SubjectFiles
from mmlib.core import ProfileSet
from mmlib.data.manifest import Cohort, Column, LongTable, Manifest, Modality, Survival

__all__ = [
    "CTEHR",
    "PRESETS",
    "RISK_FAMILIES",
    "VOCABULARY",
    "Knobs",
    "ehr_risk_score",
    "planted_effect_checks",
    "render_chest_ct",
    "tour_figures",
]

AGE_MEAN, AGE_SD = 62.0, 14.0  # the internal population; the age term is per AGE_SD years


@dataclass(frozen=True)
class Knobs(CohortKnobs):
    n_subjects: int = 500  # subjects at both sites together
    external_fraction: float = 0.2  # share of subjects at the external site (split "external")
    val_fraction: float = 0.1  # share of internal subjects in split "val"
    test_fraction: float = 0.25  # share of internal subjects in split "test" (internal test)
    volume_shape: tuple[int, int, int] = (64, 64, 48)  # CT voxels along (R, A, S)
    spacing_mm: tuple[float, float, float] = (5.5, 5.5, 6.5)  # CT voxel size (mm)
    signal: float = 1.2  # log hazard ratio per SD of the modality risk (CT + EHR); 0 = neither matters
    image_share: float = 0.5  # share of that risk carried by the clot burden: 1 = CT only, 0 = EHR only
    modality_correlation: float = 0.0  # correlation of clot burden and EHR state (redundant modalities)
    tabular_signal: float = 0.3  # log hazard ratio per 14 years of age
    noise_sd: float = 15.0  # CT noise at the internal scanner (HU)
    follow_up_days: int = 365  # administrative end of follow-up after the index CT (days)
    baseline_event_prob: float = 0.3  # P(event by the end of follow-up) for a subject with lp = 0
    weibull_shape: float = 0.7  # Weibull baseline shape (< 1: hazard highest early, as after PE)
    censoring: float = 0.2  # share lost to follow-up, at a uniform time before the end (0-1)
    lookback_days: int = 1095  # EHR history window before the index date (days)
    visits_per_year: float = 3.0  # mean visits per year, average state, internal site
    site_shift: float = 1.0  # scales every internal -> external difference (0 = identical sites)


PRESETS = presets = ProfileSet(
    smoke=Knobs(name="smoke", n_subjects=40, volume_shape=(32, 32, 24), spacing_mm=(11.0, 11.0, 13.0)),
    quick=Knobs(name="quick"),
    # the paper's PE cohort: 3,099 train (+ val) / 1,098 internal test / 435 external
    full=Knobs(
        name="full",
        n_subjects=4632,
        external_fraction=435 / 4632,
        val_fraction=0.1,
        test_fraction=1098 / 4197,
        volume_shape=(160, 160, 128),
        spacing_mm=(2.2, 2.2, 2.5),
    ),
)

# ---------------------------------------------------------------------------- EHR vocabulary
# (code, description, per-visit base logit a, effect b of the state x, external sibling code, family)
DIAGNOSES: list[tuple[str, str, float, float, str | None, str]] = [
    ("I50.9", "Heart failure, unspecified", -2.7, 0.9, "I50.22", "heart_failure"),
    ("N18.3", "Chronic kidney disease, stage 3", -2.8, 0.8, "N18.30", "kidney"),
    ("N17.9", "Acute kidney failure", -3.4, 0.7, None, "kidney"),
    ("J44.9", "COPD, unspecified", -2.6, 0.6, "J44.1", "copd"),
    ("C34.90", "Malignant neoplasm of lung", -3.3, 0.7, "C34.91", "cancer"),
    ("C80.1", "Malignant neoplasm, unspecified", -3.2, 0.7, None, "cancer"),
    ("I48.91", "Atrial fibrillation, unspecified", -2.7, 0.6, "I48.0", "arrhythmia"),
    ("I27.20", "Pulmonary hypertension", -3.5, 0.8, None, "pulmonary_hypertension"),
    ("R53.81", "Debility / frailty", -3.1, 0.9, "R54", "frailty"),
    ("E43", "Severe protein-calorie malnutrition", -3.7, 0.8, None, "frailty"),
    ("F03.90", "Dementia, unspecified", -3.5, 0.6, None, "frailty"),
    ("D64.9", "Anaemia, unspecified", -2.5, 0.6, "D64.89", "anaemia"),
    ("J96.01", "Acute respiratory failure with hypoxia", -3.7, 0.8, None, "respiratory_failure"),
    ("I25.10", "Coronary artery disease", -2.4, 0.4, None, "cardiovascular"),
    ("E11.9", "Type 2 diabetes", -1.9, 0.3, "E11.65", "metabolic"),
    ("I10", "Essential hypertension", -1.1, 0.25, None, "cardiovascular"),
    ("I82.409", "Deep vein thrombosis, lower limb", -3.1, 0.3, None, "vte"),
    ("Z86.711", "Personal history of pulmonary embolism", -3.1, 0.3, None, "vte"),
    ("Z79.01", "Long-term use of anticoagulants", -2.9, 0.2, None, "vte"),
    ("Z00.00", "General adult examination", -1.3, 0.0, None, "other"),
    ("M54.50", "Low back pain", -2.3, 0.0, None, "other"),
    ("J06.9", "Upper respiratory infection", -2.1, 0.0, None, "other"),
    ("K21.9", "Gastro-oesophageal reflux", -1.9, 0.0, None, "other"),
    ("E78.5", "Hyperlipidaemia", -1.3, 0.0, None, "other"),
    ("M17.11", "Osteoarthritis of the knee", -2.6, 0.0, None, "other"),
    ("H52.4", "Presbyopia", -3.1, 0.0, None, "other"),
    ("L30.9", "Dermatitis", -3.1, 0.0, None, "other"),
    ("R51.9", "Headache", -2.9, 0.0, None, "other"),
    ("Z23", "Immunisation", -1.6, 0.0, None, "other"),
    ("N39.0", "Urinary tract infection", -2.9, 0.0, None, "other"),
    ("F41.9", "Anxiety disorder", -2.5, 0.0, None, "other"),
    ("G47.33", "Obstructive sleep apnoea", -2.9, 0.0, None, "other"),
    ("E03.9", "Hypothyroidism", -2.3, 0.0, None, "other"),
    ("K59.00", "Constipation", -2.9, 0.0, None, "other"),
    ("J30.9", "Allergic rhinitis", -2.7, 0.0, None, "other"),
    ("R10.9", "Abdominal pain", -2.7, 0.0, None, "other"),
    ("I83.90", "Varicose veins", -3.3, 0.0, None, "other"),
    ("M81.0", "Osteoporosis", -2.9, 0.0, None, "other"),
    ("H40.9", "Glaucoma", -3.3, 0.0, None, "other"),
]
MEDICATIONS: list[tuple[str, str, float, float, str | None, str]] = [
    ("C03CA01", "furosemide", -2.7, 0.9, None, "diuretic"),
    ("C07AB07", "bisoprolol", -2.1, 0.5, None, "cardiovascular"),
    ("C09AA05", "ramipril", -1.9, 0.3, None, "cardiovascular"),
    ("C08CA01", "amlodipine", -1.9, 0.2, None, "cardiovascular"),
    ("B01AF01", "rivaroxaban", -2.9, 0.4, "B01AF02", "anticoagulant"),
    ("B01AA03", "warfarin", -3.3, 0.4, None, "anticoagulant"),
    ("A10BA02", "metformin", -2.0, 0.2, None, "metabolic"),
    ("C10AA05", "atorvastatin", -1.1, 0.2, None, "metabolic"),
    ("R03BB04", "tiotropium", -2.9, 0.6, None, "respiratory"),
    ("L01BC06", "capecitabine", -3.9, 0.7, None, "antineoplastic"),
    ("H02AB06", "prednisolone", -3.1, 0.5, None, "respiratory"),
    ("B03AA07", "ferrous sulfate", -3.1, 0.5, None, "anaemia"),
    ("A06AD65", "macrogol", -3.1, 0.3, None, "other"),
    ("A12AX", "calcium + vitamin D", -2.9, 0.2, None, "other"),
    ("N06AB06", "sertraline", -2.7, 0.1, None, "other"),
    ("A02BC01", "omeprazole", -1.6, 0.2, None, "other"),
    ("N02BE01", "paracetamol", -1.7, 0.1, None, "other"),
    ("M01AE01", "ibuprofen", -2.5, 0.0, None, "other"),
    ("R06AE07", "cetirizine", -2.9, 0.0, None, "other"),
    ("H03AA01", "levothyroxine", -2.5, 0.0, None, "other"),
    ("J01CA04", "amoxicillin", -2.7, 0.1, None, "other"),
    ("N05CF01", "zopiclone", -3.1, 0.1, None, "other"),
]
# (code, description, unit, log-normal?, mean (of the log if log-normal), sd, effect b of x,
#  P(measured at a routine visit), P(at the index encounter), external unit, factor to it,
#  external assay code, factor to its scale)
LABS: list[tuple] = [
    ("2160-0", "Creatinine", "mg/dL", True, np.log(1.0), 0.3, 0.6, 0.5, 0.95, "umol/L", 88.42, None, 1.0),
    ("33762-6", "NT-proBNP", "pg/mL", True, np.log(300.0), 1.0, 0.7, 0.15, 0.7, None, 1.0, "30934-4", 1 / 6),
    ("10839-9", "Troponin I", "ng/mL", True, np.log(0.02), 1.0, 0.5, 0.08, 0.9, None, 1.0, None, 1.0),
    ("718-7", "Haemoglobin", "g/dL", False, 13.2, 1.6, -0.5, 0.6, 0.95, "g/L", 10.0, None, 1.0),
    ("1751-7", "Albumin", "g/dL", False, 3.9, 0.45, -0.55, 0.35, 0.6, None, 1.0, None, 1.0),
    ("2951-2", "Sodium", "mmol/L", False, 139.0, 3.0, -0.25, 0.55, 0.95, None, 1.0, None, 1.0),
    ("2345-7", "Glucose", "mg/dL", True, np.log(105.0), 0.25, 0.15, 0.55, 0.9, "mmol/L", 1 / 18.016, None, 1.0),
    ("6690-2", "Leukocytes", "10*3/uL", True, np.log(7.5), 0.3, 0.2, 0.55, 0.95, None, 1.0, None, 1.0),
    ("777-3", "Platelets", "10*3/uL", False, 250.0, 60.0, 0.0, 0.55, 0.95, None, 1.0, None, 1.0),
    ("2823-3", "Potassium", "mmol/L", False, 4.2, 0.4, 0.1, 0.55, 0.95, None, 1.0, None, 1.0),
    ("1742-6", "ALT", "U/L", True, np.log(25.0), 0.45, 0.0, 0.3, 0.5, None, 1.0, None, 1.0),
    ("4548-4", "HbA1c", "%", False, 6.0, 0.8, 0.1, 0.15, 0.0, None, 1.0, None, 1.0),
    ("2093-3", "Cholesterol", "mg/dL", False, 185.0, 38.0, -0.1, 0.15, 0.0, None, 1.0, None, 1.0),
    ("48065-7", "D-dimer (FEU)", "ng/mL", True, np.log(2500.0), 0.8, 0.1, 0.02, 0.9, None, 1.0, None, 1.0),
    ("2524-7", "Lactate", "mmol/L", True, np.log(1.3), 0.4, 0.4, 0.03, 0.5, None, 1.0, None, 1.0),
]
SIBLINGS = {  # what the external site writes instead (same family, another code)
    "I50.22": "Chronic systolic heart failure", "N18.30": "CKD stage 3, unspecified",
    "J44.1": "COPD with exacerbation", "C34.91": "Malignant neoplasm of right lung",
    "I48.0": "Paroxysmal atrial fibrillation", "R54": "Age-related debility", "D64.89": "Other specified anaemias",
    "E11.65": "Type 2 diabetes with hyperglycaemia", "B01AF02": "apixaban", "30934-4": "BNP",
}


def _vocabulary() -> pd.DataFrame:
    rows = []
    for system, table in (("ICD10", DIAGNOSES), ("ATC", MEDICATIONS)):
        for code, desc, a, b, sub, fam in table:
            base = dict(code_system=system, base_logit=a, state_effect=b, family=fam)
            rows.append(dict(base, code=code, description=desc, external_code=sub))
            if sub:
                rows.append(dict(base, code=sub, description=SIBLINGS[sub], external_code=None))
    for code, desc, unit, lognorm, mu, sd, b, _p, _pi, alt_unit, _uf, sub, sfac in LABS:
        base = dict(code_system="LOINC", state_effect=b, family=f"lab:{desc}", log_normal=lognorm, lab_sd=sd)
        rows.append(dict(base, code=code, description=desc, unit=unit, lab_mean=mu, external_code=sub,
                         external_unit=alt_unit))
        if sub:
            rows.append(dict(base, code=sub, description=SIBLINGS[sub], unit=unit, lab_mean=mu + np.log(sfac)))
    return pd.DataFrame(rows)


VOCABULARY = _vocabulary()  # every code the generator can write, with its family and coefficients
RISK_FAMILIES = sorted({f for *_x, b, _s, f in DIAGNOSES if b >= 0.5})  # families the state drives most
_CODE_FAMILY = dict(zip(VOCABULARY["code"], VOCABULARY["family"], strict=True))

# ---------------------------------------------------------------------------- CT phantom
# geometry in mm (RAS, x = patient right), before the subject's body-size scaling
_PA_TREE = [  # (p0, p1, r0, r1): main trunk, right and left PA, lobar arteries
    ((-5, 45, -25), (-5, 15, 30), 14.0, 13.0),
    ((-5, 15, 30), (40, 5, 28), 11.0, 10.0), ((40, 5, 28), (70, 0, 18), 10.0, 8.0),
    ((-5, 15, 30), (-40, 0, 40), 11.0, 10.0), ((-40, 0, 40), (-68, -8, 28), 10.0, 8.0),
    ((70, 0, 18), (78, 5, 80), 6.0, 4.0), ((70, 0, 18), (62, 40, -15), 5.0, 3.5),
    ((70, 0, 18), (75, -15, -70), 7.0, 4.5), ((-68, -8, 28), (-76, 5, 82), 6.0, 4.0),
    ((-68, -8, 28), (-62, 35, -10), 5.0, 3.5), ((-68, -8, 28), (-72, -18, -65), 7.0, 4.5),
]
_AORTA = [  # (p0, p1, radius): ascending, arch, descending
    ((10, 20, -30), (10, 22, 45), 15.0), ((10, 22, 45), (-20, -10, 60), 13.0),
    ((-20, -10, 60), (-25, -45, 45), 13.0), ((-25, -45, 45), (-25, -50, -160), 12.0),
]
_LUNGS = [((72, 0, 15), (52, 78, 120)), ((-72, 0, 10), (50, 76, 115))]  # (centre, radii)


def _box(axes: list[np.ndarray], lo: np.ndarray, hi: np.ndarray):
    """Index slices and sparse sub-grids (mm) of the voxels whose centres lie in [lo, hi]; None if none."""
    sl = []
    for ax, a, b in zip(axes, lo, hi, strict=True):
        i0, i1 = np.searchsorted(ax, a, "left"), np.searchsorted(ax, b, "right")
        if i1 <= i0:
            return None
        sl.append(slice(int(i0), int(i1)))
    return tuple(sl), np.meshgrid(*[ax[s] for ax, s in zip(axes, sl, strict=True)], indexing="ij", sparse=True)


def _segment(axes, p0, p1, rmax):
    """Slices, position t in [0, 1] along p0 -> p1 and distance (mm) to the segment, over its box."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    box = _box(axes, np.minimum(p0, p1) - rmax, np.maximum(p0, p1) + rmax)
    if box is None:
        return None
    sl, (x, y, z) = box
    v = p1 - p0
    t = np.clip(((x - p0[0]) * v[0] + (y - p0[1]) * v[1] + (z - p0[2]) * v[2]) / float(v @ v), 0.0, 1.0)
    d = np.sqrt((x - p0[0] - t * v[0]) ** 2 + (y - p0[1] - t * v[1]) ** 2 + (z - p0[2] - t * v[2]) ** 2)
    return sl, t, d


def _ellipsoid(axes, c, r):
    """Slices and squared normalised radius (<= 1 inside) over the ellipsoid's box."""
    c, r = np.asarray(c, float), np.asarray(r, float)
    box = _box(axes, c - r, c + r)
    if box is None:
        return None
    sl, (x, y, z) = box
    return sl, ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2


def _upsample(coarse: np.ndarray, shape) -> np.ndarray:
    """Separable linear interpolation of a coarse field to ``shape`` (far cheaper than ndimage.zoom)."""
    out = coarse
    for axis, n in enumerate(shape):
        pos = np.linspace(0, out.shape[axis] - 1, n)
        i0 = np.minimum(pos.astype(int), out.shape[axis] - 2)
        w = (pos - i0).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
        out = np.take(out, i0, axis) * (1 - w) + np.take(out, i0 + 1, axis) * w
    return out


def render_chest_ct(shape, spacing, subject: dict[str, Any], rng: np.random.Generator):
    """One contrast chest CT in HU before the scanner (blur, noise, calibration) and its clot mask.

    Body, fat, lungs (-850 HU with texture), ribs, heart, aorta, spine, sternum and the
    pulmonary-artery tree (tubes at ``subject['contrast_hu']``); clot pieces (random segment,
    15-60 mm times (1 + 2 f), filling 70-100% of the radius) are added until the clot occupies
    a share f = ``subject['obstruction']`` of the rendered lumen.

    Returns:
        (hu, clot, info): hu (X, Y, Z) float32 in RAS voxel order; clot (X, Y, Z) bool; info with
        the rendered lumen and clot volumes (mL) and the number of clot pieces.
    """
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    male = subject["sex"] == "M"
    scale = np.array([rng.normal(1.0 + 0.05 * male, 0.05), rng.normal(1.0 + 0.05 * male, 0.07), rng.normal(1.0, 0.04)])
    scale = np.clip(scale, 0.85, 1.15)  # body size; the anatomy follows it

    def S(p):
        return np.asarray(p, float) * scale

    rs = float(np.mean(scale[:2]))
    contrast = float(subject["contrast_hu"])
    hu = np.full(shape, -1000.0, np.float32)

    # body (elliptic cylinder): fat ring, soft tissue; lungs; ribs as a ring broken along z
    X, Y = axes[0][:, None], axes[1][None, :]
    rho = np.sqrt((X / (150 * scale[0])) ** 2 + (Y / (105 * scale[1])) ** 2)
    hu[rho <= 1.0] = -100.0
    hu[rho <= 0.92] = 40.0
    tex = _upsample(phantoms.smooth_field(tuple(max(4, n // 4) for n in shape), rng, 1.0), shape)
    for c, r in _LUNGS:
        box = _ellipsoid(axes, S(c), S(r))
        if box is not None:
            sl, q = box
            lung = (q <= 1.0) & (rho[sl[0], sl[1]][..., None] <= 0.9)
            hu[sl][lung] = -850.0 + 35.0 * tex[sl][lung]
    zs = axes[2][None, None, :]
    ring = ((rho > 0.84) & (rho < 0.9))[..., None]
    hu[ring & (np.mod(zs - 0.3 * Y[..., None], 28.0) < 9.0) & (zs > -110) & (zs < 135)] = 600.0
    # heart (myocardium, enhanced blood pool) and aorta (less enhanced: CTPA timing)
    box = _ellipsoid(axes, S((-15, 30, -50)), S((62, 50, 52)))
    if box is not None:
        sl, q = box
        hu[sl][q <= 1.0] = 50.0
        hu[sl][q <= 0.55] = 0.7 * contrast
    for p0, p1, r in _AORTA:
        seg = _segment(axes, S(p0), S(p1), r * rs)
        if seg is not None:
            hu[seg[0]][seg[2] <= r * rs] = 0.5 * contrast
    # spine (vertebral bodies with discs, cortex, canal) and sternum
    vb = np.sqrt(X**2 + (Y + 80 * scale[1]) ** 2)
    disc = np.mod(axes[2], 30.0) < 6.0
    hu[(vb <= 20)[..., None] & ~disc[None, None, :]] = 300.0
    hu[(vb <= 20)[..., None] & disc[None, None, :]] = 80.0
    hu[(vb > 20) & (vb <= 23)] = 650.0
    hu[np.sqrt(X**2 + (Y + 108 * scale[1]) ** 2) <= 9] = 20.0
    box = _box(axes, np.array([-14, 92 * scale[1] - 12, -90]), np.array([14, 92 * scale[1], 110]))
    if box is not None:
        hu[box[0]] = 400.0

    # pulmonary arteries, then clot pieces until the clot fills the target share of the lumen
    lumen = np.zeros(shape, bool)
    segs = []
    for p0, p1, r0, r1 in _PA_TREE:
        seg = _segment(axes, S(p0), S(p1), max(r0, r1) * rs)
        if seg is None:
            continue
        sl, t, d = seg
        r_t = (r0 + (r1 - r0) * t) * rs
        lumen[sl] |= d <= r_t
        segs.append((sl, t, d, r_t, float(np.linalg.norm(S(p1) - S(p0)))))
    clot = np.zeros(shape, bool)
    f = float(subject["obstruction"])
    target = f * lumen.sum()
    lengths = np.array([s[-1] for s in segs])
    n_pieces = 0
    while segs and clot.sum() < target and n_pieces < 60:
        sl, t, d, r_t, length = segs[rng.choice(len(segs), p=lengths / lengths.sum())]
        half = rng.uniform(7.5, 30.0) * (1 + 2 * f) / length
        centre = rng.uniform(0, 1)
        clot[sl] |= (np.abs(t - centre) <= half) & (d <= rng.uniform(0.7, 1.0) * r_t)
        clot &= lumen
        n_pieces += 1
    hu[lumen] = contrast + rng.normal(0, 8, int(lumen.sum()))
    hu[clot] = float(subject["clot_hu"])
    ml = float(np.prod(spacing)) / 1000.0
    info = {"pa_lumen_volume_ml": round(float(lumen.sum()) * ml, 3), "clot_volume_ml": round(float(clot.sum()) * ml, 3)}
    return hu, clot, {**info, "clot_pieces": n_pieces}


# ---------------------------------------------------------------------------- EHR events
def _ehr_events(subjects: pd.DataFrame, k: Knobs, rng: np.random.Generator) -> pd.DataFrame:
    """Visits over the look-back window and their codes and labs, driven by the state path x(t).

    Returns:
        The long table (subject_id, days_before_index, visit_id, code_system, code, value, unit),
        one row per recorded code or lab value; day 0 is the index encounter (labs only).
    """
    n, shift = len(subjects), k.site_shift
    ext = (subjects["site"] == "external").to_numpy()
    z = subjects["z_ehr"].to_numpy()
    # sicker subjects see doctors more often; the external site records fewer visits
    visit_factor = np.where(ext, max(0.0, 1 - 0.3 * shift), 1.0)
    n_vis = rng.poisson(k.visits_per_year * k.lookback_days / 365.0 * np.exp(0.35 * z) * visit_factor)
    subj = np.repeat(np.arange(n), n_vis)
    days = rng.integers(1, k.lookback_days + 1, size=subj.size)
    order = np.lexsort((days, subj))  # per subject, nearest to the index first
    subj, days = subj[order], days[order]
    # the state walks back from z_ehr at the index: drift to healthier + Brownian noise
    first = np.r_[True, subj[1:] != subj[:-1]]
    gap = np.where(first, days, days - np.r_[0, days[:-1]]) / 365.0
    steps = rng.normal(0, 0.5, subj.size) * np.sqrt(gap)
    walk = np.cumsum(steps)
    walk -= np.repeat(walk[first] - steps[first], np.diff(np.flatnonzero(np.r_[first, True])))
    x_vis = z[subj] - 0.25 * days / 365.0 + walk
    # the index encounter (day 0) for everyone
    subj, days, x_vis = np.r_[subj, np.arange(n)], np.r_[days, np.zeros(n, int)], np.r_[x_vis, z]
    is_index, e_vis = days == 0, ext[subj]
    frames = []

    def add(hit, codes, system, values=None, units=None):
        r, c = np.nonzero(hit)
        frames.append(pd.DataFrame({
            "_s": subj[r], "days_before_index": days[r], "code_system": system, "code": codes[r, c],
            "value": np.nan if values is None else values[r, c], "unit": None if units is None else units[r, c],
        }))

    for system, table in (("ICD10", DIAGNOSES), ("ATC", MEDICATIONS)):
        a, b = np.array([t[2] for t in table]), np.array([t[3] for t in table])
        re = rng.normal(0, 0.8, (n, len(table)))  # chronic conditions persist within a subject
        p = expit(a + x_vis[:, None] * b + re[subj])
        p *= np.where(e_vis, max(0.0, 1 - 0.3 * shift), 1.0)[:, None]  # the external site codes less
        hit = (rng.random(p.shape) < p) & ~is_index[:, None]
        codes = np.tile(np.array([t[0] for t in table], object), (len(subj), 1))
        subs = np.array([t[4] or t[0] for t in table], object)
        swap = e_vis[:, None] & (rng.random(p.shape) < min(1.0, 0.8 * shift))
        add(hit, np.where(swap, subs[None, :], codes), system)

    male = (subjects["sex"] == "M").to_numpy()[subj]
    age_z = ((subjects["age"].to_numpy() - AGE_MEAN) / AGE_SD)[subj]
    b = np.array([t[6] for t in LABS])
    p = np.where(is_index[:, None], [t[8] for t in LABS], [t[7] for t in LABS])
    p = p * np.where(e_vis & ~is_index, max(0.0, 1 - 0.35 * shift), 1.0)[:, None]  # fewer labs outside
    hit = rng.random(p.shape) < p
    re = rng.normal(0, 0.6, (n, len(LABS)))
    noise = np.sqrt(np.clip(1 - b**2 - 0.36, 0.05, None)) * rng.normal(size=p.shape)
    zval = b * x_vis[:, None] + re[subj] + noise
    codes, values, units = np.empty(p.shape, object), np.empty(p.shape), np.empty(p.shape, object)
    use_alt = e_vis[:, None] & (rng.random(p.shape) < min(1.0, shift))
    for j, (code, desc, unit, lognorm, mu, sd, _b, _p, _pi, alt_unit, ufac, sub, sfac) in enumerate(LABS):
        # sex and age shift creatinine and haemoglobin, as in real reference ranges
        m = mu + {"Creatinine": 0.15 * male + 0.05 * age_z, "Haemoglobin": 1.2 * male}.get(desc, 0.0)
        v = np.exp(m + sd * zval[:, j]) if lognorm else np.maximum(m + sd * zval[:, j], 0.01 * abs(mu) + 1e-3)
        codes[:, j], units[:, j] = code, unit
        if sub:  # the external lab runs another assay (another code and scale) ...
            codes[use_alt[:, j], j] = sub
            v = np.where(use_alt[:, j], v * sfac, v)
        elif alt_unit:  # ... or reports in other units
            units[use_alt[:, j], j] = alt_unit
            v = np.where(use_alt[:, j], v * ufac, v)
        values[:, j] = v
    add(hit, codes, "LOINC", values=values, units=units)

    ev = pd.concat(frames, ignore_index=True)
    ids = subjects["subject_id"].to_numpy()
    # visits numbered chronologically within each subject; the index encounter is the last
    span = k.lookback_days + 1
    keys, inv = np.unique(ev["_s"].to_numpy() * span + (k.lookback_days - ev["days_before_index"].to_numpy()),
                          return_inverse=True)
    number = pd.Series(keys // span).groupby(keys // span).cumcount().to_numpy() + 1
    ev["visit_id"] = [f"{ids[s]}-v{v:02d}" for s, v in zip(ev["_s"], number[inv], strict=True)]
    ev["subject_id"] = ids[ev["_s"].to_numpy()]
    ev = ev.sort_values(["_s", "days_before_index", "code_system", "code"], ascending=[True, False, True, True],
                        kind="stable")
    return ev[["subject_id", "days_before_index", "visit_id", "code_system", "code", "value", "unit"]].reset_index(
        drop=True
    )


def _assign_splits(site: np.ndarray, event: np.ndarray, rng: np.random.Generator, val: float, test: float):
    """'external' at the external site; train/val/test inside, stratified by event (each split gets both)."""
    split = np.where(site == "external", "external", "train").astype(object)
    for e in (0, 1):
        idx = rng.permutation(np.flatnonzero((site == "internal") & (event == e)))
        n_val, n_test = round(val * idx.size), round(test * idx.size)
        if idx.size >= 3:
            n_val, n_test = max(1, n_val), max(1, n_test)
        split[idx[:n_val]] = "val"
        split[idx[n_val : n_val + n_test]] = "test"
    return split


class CTEHR(CohortGenerator):
    """Chest CT (clot burden) + longitudinal EHR (frailty state) -> time to death, two sites (P4).

    Example::

        cohort = CTEHR("quick", image_share=1.0).generate(seed=0)   # only the CT carries the outcome
    """

    name = "ct_ehr"
    paper = "P4"
    description = "CT pulmonary angiogram + prior EHR events -> time to death after PE; internal and external site"
    presets = PRESETS

    def plan(self, rng: np.random.Generator) -> CohortPlan:
        k: Knobs = self.knobs
        if not 0.0 <= k.image_share <= 1.0:
            raise ValueError(f"image_share must lie in [0, 1], got {k.image_share}")
        if not -1.0 < k.modality_correlation < 1.0:
            raise ValueError(f"modality_correlation must lie in (-1, 1), got {k.modality_correlation}")
        n, shift, rho = k.n_subjects, k.site_shift, k.modality_correlation
        n_ext = int(round(k.external_fraction * n))
        site = np.array(["internal"] * (n - n_ext) + ["external"] * n_ext, object)[rng.permutation(n)]
        ext = site == "external"
        # case mix: the external hospital sees older patients with larger clots and more comorbidity
        age = np.clip(rng.normal(AGE_MEAN + 10.0 * shift * ext, AGE_SD), 18, 95).round(0)
        sex = np.where(rng.random(n) < 0.5, "F", "M")
        e1, e2 = rng.normal(size=(2, n))
        u_img = e1 + 0.4 * shift * ext
        z_ehr = rho * e1 + np.sqrt(1 - rho**2) * e2 + 0.3 * shift * ext
        b_img, b_ehr = k.signal * np.sqrt(k.image_share), k.signal * np.sqrt(1 - k.image_share)
        lp = b_img * u_img + b_ehr * z_ehr + k.tabular_signal * (age - AGE_MEAN) / AGE_SD
        scale = k.follow_up_days / (-np.log(1 - k.baseline_event_prob)) ** (1 / k.weibull_shape)
        t_event = phantoms.weibull_ph_times(lp, rng, scale=scale, shape=k.weibull_shape)
        lost = rng.random(n) < k.censoring
        t_cens = np.where(lost, rng.uniform(1, k.follow_up_days, n), float(k.follow_up_days))
        event = (t_event <= t_cens).astype(int)
        q = np.quantile(lp, [1 / 3, 2 / 3])
        df = pd.DataFrame({
            "subject_id": [f"sub-{i + 1:04d}" for i in range(n)],
            "age": age, "sex": sex, "site": site,
            "split": _assign_splits(site, event, rng, k.val_fraction, k.test_fraction),
            "time_days": np.maximum(np.ceil(np.minimum(t_event, t_cens)), 1).astype(int), "event": event,
            # latents (truth.json)
            "u_img": u_img, "obstruction": expit(1.3 * u_img - 0.4), "z_ehr": z_ehr, "lp": lp,
            "risk_group": np.select([lp < q[0], lp < q[1]], ["low", "mid"], "high"),
            "event_time_days": t_event, "censor_time_days": t_cens,
            # scanner and protocol: the external scanner reads offset, noisier and softer, less contrast
            "hu_offset": rng.normal(15.0 * shift * ext, 3.0), "hu_scale": 1.0 - 0.04 * shift * ext,
            "noise_sd_hu": k.noise_sd * (1 + 0.6 * shift * ext), "blur_mm": 2.5 + 2.0 * shift * ext,
            "contrast_hu": np.clip(rng.normal(320 - 50 * shift * ext, 45), 150, 500), "clot_hu": rng.normal(45, 8, n),
        })
        events = _ehr_events(df, k, rng)
        truth = {
            "outcome": "time to death (days) after the index CT; Weibull proportional hazards",
            "linear_predictor": "lp = beta_img * u_img + beta_ehr * z_ehr + beta_age * (age - 62) / 14",
            "beta_img": b_img, "beta_ehr": b_ehr, "beta_age_per_14y": k.tabular_signal,
            "image_share": k.image_share, "signal": k.signal, "modality_correlation": rho,
            "baseline": {"weibull_scale_days": scale, "weibull_shape": k.weibull_shape},
            "censoring": f"lost with probability {k.censoring} at a uniform time, else at {k.follow_up_days} days",
            "image": "clot (filling defect, clot_hu ~ N(45, 8) HU) in contrast-filled pulmonary arteries; clot "
            "occupies obstruction = expit(1.3 u_img - 0.4) of the rendered arterial lumen; clot_mask = clot",
            "ehr": "state x(t) = z_ehr - 0.25 t/365 + 0.5 B(t/365), t days before index; per visit P(code c) = "
            "expit(a_c + b_c x + subject effect N(0, 0.8^2)); lab z = b_l x + subject effect N(0, 0.6^2) + noise "
            "(total variance 1); a_c, b_c, lab means and sds in 'vocabulary'",
            "risk_families": RISK_FAMILIES,
            "vocabulary": VOCABULARY.to_dict(orient="records"),
            "site_shift": {
                "site_shift": shift, "age_years": 10.0 * shift, "u_img_mean": 0.4 * shift, "z_ehr_mean": 0.3 * shift,
                "hu_offset": 15.0 * shift, "hu_scale": 1 - 0.04 * shift, "noise_factor": 1 + 0.6 * shift,
                "blur_fwhm_mm": [2.5, 2.5 + 2.0 * shift], "contrast_hu": [320, 320 - 50 * shift],
                "code_recording_factor": max(0.0, 1 - 0.3 * shift), "sibling_code_prob": min(1.0, 0.8 * shift),
                "visit_rate_factor": max(0.0, 1 - 0.3 * shift), "lab_frequency_factor": max(0.0, 1 - 0.35 * shift),
                "other_lab_unit_or_assay_prob": min(1.0, shift),
            },
        }
        return CohortPlan(subjects=df, truth=truth, tables={"ehr_events": events})

    def render_subject(self, subject: dict[str, Any], rng: np.random.Generator, files: SubjectFiles) -> dict[str, Any]:
        k: Knobs = self.knobs
        shape, spacing = tuple(k.volume_shape), tuple(float(s) for s in k.spacing_mm)
        hu, clot, info = render_chest_ct(shape, spacing, subject, rng)
        hu = ndimage.gaussian_filter(hu, [subject["blur_mm"] / s / 2.355 for s in spacing])  # FWHM -> sigma
        hu += rng.standard_normal(shape, dtype=np.float32) * np.float32(subject["noise_sd_hu"])
        hu = hu * subject["hu_scale"] + subject["hu_offset"]
        affine = phantoms.ras_affine(shape, spacing)
        sid = subject["subject_id"]
        z_counts = clot.sum(axis=(0, 1))
        return {
            "ct": files.nifti(f"images/{sid}_ct.nii.gz", np.clip(np.rint(hu), -1024, 3071).astype(np.int16), affine),
            "clot_mask": files.nifti(f"masks/{sid}_clot.nii.gz", clot.astype(np.uint8), affine),
            **info,
            "clot_peak_slice": int(np.argmax(z_counts)) if z_counts.any() else -1,  # axial slice with most clot
        }

    def manifest(self) -> Manifest:
        k: Knobs = self.knobs
        return Manifest(
            name=self.name,
            description=self.description,
            columns=[
                Column(name="age", dtype="float", unit="years", min=18, max=95, description="age at the index CT"),
                Column(name="sex", dtype="category", categories=["F", "M"]),
                Column(name="site", dtype="category", categories=["internal", "external"], description="hospital"),
                Column(name="split", dtype="category", categories=["train", "val", "test", "external"]),
                Column(name="time_days", dtype="int", unit="days", min=1, max=k.follow_up_days,
                       description="days from the index CT to death or censoring"),
                Column(name="event", dtype="int", min=0, max=1, description="1 = died, 0 = censored"),
            ],
            modalities=[
                Modality(name="ct", column="ct", format="nifti", description="CT pulmonary angiogram, int16 HU, RAS"),
                Modality(name="clot_mask", column="clot_mask", format="nifti", description="uint8, 1 = clot"),
            ],
            survival=Survival(time="time_days", event="event", unit="days"),
            split_column="split",
            site_column="site",
            tables=[
                LongTable(
                    name="ehr_events",
                    path="ehr_events.csv",
                    description="coded EHR events up to the index CT (ICD10 diagnoses, ATC drugs, LOINC labs)",
                    columns=[
                        Column(name="days_before_index", dtype="int", unit="days", min=0, max=k.lookback_days),
                        Column(name="visit_id", dtype="string"),
                        Column(name="code_system", dtype="category", categories=["ICD10", "ATC", "LOINC"]),
                        Column(name="code", dtype="string"),
                        Column(name="value", dtype="float", nullable=True, description="lab result (LOINC rows)"),
                        Column(name="unit", dtype="string", nullable=True, description="unit of the lab result"),
                    ],
                )
            ],
            truth="truth.json",
        )


# ---------------------------------------------------------------------------- measures
def ehr_risk_score(events: pd.DataFrame, subject_ids, *, window_days: int = 365) -> pd.Series:
    """A pre-specified (unfitted) EHR risk score: what a clinician would read off the chart.

    The mean of standardised components: the number of distinct risk diagnosis families
    (``RISK_FAMILIES``; sibling codes count in their family) recorded in the last ``window_days``,
    the last log creatinine and log natriuretic peptide (BNP counted as NT-proBNP / 6), minus the
    last haemoglobin and albumin, each harmonised to one unit. A missing component counts 0.

    Args:
        events: the ``ehr_events`` long table.
        subject_ids: (N,) ids to score, in order.

    Returns:
        (N,) score indexed by subject id (higher = sicker).
    """
    ids = pd.Index(pd.Series(subject_ids).astype(str), name="subject_id")
    ev = events.assign(subject_id=events["subject_id"].astype(str), code=events["code"].astype(str))
    recent = ev[(ev["code_system"] == "ICD10") & (ev["days_before_index"].astype(float) <= window_days)]
    fam = recent["code"].map(_CODE_FAMILY)
    count = recent.assign(f=fam)[fam.isin(RISK_FAMILIES)].groupby("subject_id")["f"].nunique()
    labs = ev[ev["code_system"] == "LOINC"].assign(value=lambda d: d["value"].astype(float))
    unit = labs["unit"].astype(str)
    # harmonise units and assays before comparing subjects across sites
    labs.loc[unit == "umol/L", "value"] /= 88.42
    labs.loc[unit == "g/L", "value"] /= 10.0
    bnp = labs["code"] == "30934-4"
    labs.loc[bnp, "value"] *= 6.0
    labs.loc[bnp, "code"] = "33762-6"
    last = labs.sort_values("days_before_index", kind="stable").groupby(["subject_id", "code"])["value"].first()
    last = last.unstack().reindex(ids)
    parts = [count.reindex(ids).fillna(0)]
    for code, sign, log in (("2160-0", 1, True), ("33762-6", 1, True), ("718-7", -1, False), ("1751-7", -1, False)):
        v = last[code] if code in last else pd.Series(np.nan, index=ids)
        parts.append(sign * (np.log(v.clip(lower=1e-6)) if log else v))
    z = [(p - p.mean()) / (p.std() or 1.0) for p in parts]
    return pd.concat(z, axis=1).fillna(0.0).mean(axis=1).rename("ehr_risk_score")


def _with_latents(cohort: Cohort) -> pd.DataFrame:
    """The subject table with the truth card's per-subject latents joined on."""
    lat = cohort.latents().drop(columns=[c for c in cohort.subjects.columns if c != "subject_id"], errors="ignore")
    subjects = cohort.subjects.assign(subject_id=cohort.subjects["subject_id"].astype(str))
    return subjects.merge(lat.assign(subject_id=lat["subject_id"].astype(str)), on="subject_id", how="left")


def _mask_volumes_ml(cohort: Cohort) -> np.ndarray:
    import nibabel as nib

    out = []
    for p in cohort.paths("clot_mask"):
        img = nib.load(p)
        voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
        out.append(float((np.asanyarray(img.dataobj) > 0).sum()) * voxel_ml)
    return np.array(out)


def _air_hu(cohort: Cohort, idx: np.ndarray) -> np.ndarray:
    """Median HU of the 4 x 4 in-plane corner columns (air outside the body) of the CTs ``idx``."""
    import nibabel as nib

    paths, ends = cohort.paths("ct"), (slice(0, 4), slice(-4, None))
    vals = []
    for i in idx:
        v = np.asanyarray(nib.load(paths[i]).dataobj)
        vals.append(np.median(np.concatenate([v[a, b, :].ravel() for a in ends for b in ends])))
    return np.array(vals, float)


def _cindex_row(effect: str, measure: str, df: pd.DataFrame, risk, rng: np.random.Generator) -> dict:
    from mmlib.metrics import concordance_index

    e, t, r = df["event"].to_numpy(bool), df["time_days"].to_numpy(float), np.asarray(risk, float)
    c = concordance_index(e, t, r)
    boots = []
    for _ in range(100):
        i = rng.integers(0, len(r), len(r))
        if e[i].any():
            boots.append(concordance_index(e[i], t[i], r[i]))
    margin = max(0.03, 2.576 * float(np.std(boots)))
    return {"effect": effect, "measure": measure, "value": c, "chance": 0.5, "present": bool(c - 0.5 > margin)}


def _site_row(effect: str, measure: str, x, external: np.ndarray, floor: float, rng: np.random.Generator) -> dict:
    """Mean over columns of |external mean - internal mean|, against 200 site-label permutations."""
    x = np.asarray(x, float).reshape(len(external), -1)

    def stat(ext):
        return float(np.mean(np.abs(x[ext].mean(0) - x[~ext].mean(0))))

    obs = stat(external)
    null = np.array([stat(rng.permutation(external)) for _ in range(200)])
    present = obs > max(np.quantile(null, 0.99), float(null.mean()) + floor)
    return {"effect": effect, "measure": measure, "value": obs, "chance": float(null.mean()), "present": bool(present)}


def planted_effect_checks(cohort: Cohort) -> pd.DataFrame:
    """Each planted effect measured on the generated files, against its no-signal value.

    Rows: clot burden -> death (c-index of the clot volume re-measured on the mask NIfTIs), EHR
    state -> death (c-index of :func:`ehr_risk_score` on the events table), age -> death
    (c-index), and three site shifts (scanner: median air HU read from the CT files, at most 200
    subjects per site; coding: per-code share of subjects with the code; case mix: age).

    ``present``: a c-index exceeds 0.5 by more than max(0.03, 2.576 bootstrap SE) (a one-sided
    99% interval, 100 resamples); a site difference exceeds both the 99th percentile of 200
    site-label permutations and their mean plus a floor (5 HU, 0.02, 1 year). No model is
    fitted, so a cohort without the signal gives about chance.

    Returns:
        One row per effect: effect, measure, value, chance, present.
    """
    rng = np.random.default_rng(0)
    df = _with_latents(cohort)
    ext = (df["site"].astype(str) == "external").to_numpy()
    ev = cohort.tables["ehr_events"]
    rows = [
        _cindex_row("clot burden in the CT raises the hazard",
                    "c-index of clot volume measured on the clot-mask NIfTIs", df, _mask_volumes_ml(cohort), rng),
        _cindex_row("EHR comorbidity state raises the hazard",
                    "c-index of the pre-specified EHR risk score (events table: risk-code families, last labs)",
                    df, ehr_risk_score(ev, df["subject_id"]).to_numpy(), rng),
        _cindex_row("age raises the hazard", "c-index of age (subject table)", df, df["age"].to_numpy(float), rng),
    ]
    if ext.any() and (~ext).any():
        pick = np.sort(np.concatenate([rng.permutation(np.flatnonzero(m))[:200] for m in (ext, ~ext)]))
        rows.append(_site_row("scanner shift at the external site",
                              "|external - internal| mean of median air HU (CT files), HU",
                              _air_hu(cohort, pick), ext[pick], 5.0, rng))
        codes = ev[ev["code_system"] != "LOINC"]
        has = pd.crosstab(codes["subject_id"].astype(str), codes["code"].astype(str)).reindex(df["subject_id"]) > 0
        rows.append(_site_row("coding habits differ at the external site",
                              "mean over codes of |external - internal| share of subjects with the code (events)",
                              has.to_numpy(float), ext, 0.02, rng))
        rows.append(_site_row("case mix differs at the external site",
                              "|external - internal| mean age (subject table), years",
                              df["age"].to_numpy(float), ext, 1.0, rng))
    return pd.DataFrame(rows, columns=["effect", "measure", "value", "chance", "present"])


# ---------------------------------------------------------------------------- figures
def _fig_ct(cohort: Cohort, df: pd.DataFrame):
    import matplotlib.pyplot as plt
    import nibabel as nib
    from matplotlib.colors import ListedColormap

    from mmlib import viz

    has = df[df["clot_peak_slice"] >= 0].sort_values("clot_volume_ml")
    has = has if len(has) else df.sort_values("clot_volume_ml")
    picks = [("low", has.iloc[int(0.1 * (len(has) - 1))]), ("high", has.iloc[int(0.9 * (len(has) - 1))])]
    fig, axes = plt.subplots(2, 3, figsize=(15, 10), constrained_layout=True)
    for r, (tag, row) in enumerate(picks):
        img = nib.load(cohort.root / row["ct"])
        vol = np.asanyarray(img.dataobj).astype(float)
        mask = np.asanyarray(nib.load(cohort.root / row["clot_mask"]).dataobj) > 0
        lim = [((n - 1) / 2 * s) for n, s in zip(vol.shape, img.header.get_zooms()[:3], strict=True)]
        k, j = max(int(row["clot_peak_slice"]), 0), int(np.argmax(mask.sum(axis=(0, 2))))
        axial, coronal = (-lim[0], lim[0], -lim[1], lim[1]), (-lim[0], lim[0], -lim[2], lim[2])
        views = [  # (title, slice, mask, window (W/L 1500/-600 and 400/40), extent, vertical axis)
            ("axial, lung window", vol[:, :, k], None, (-1350, 150), axial, "y (mm, anterior up)"),
            ("axial, mediastinal window", vol[:, :, k], mask[:, :, k], (-160, 240), axial, "y (mm, anterior up)"),
            ("coronal, mediastinal window", vol[:, j, :], mask[:, j, :], (-160, 240), coronal, "z (mm, superior up)"),
        ]
        share = 100 * row["clot_volume_ml"] / max(row["pa_lumen_volume_ml"], 1e-9)
        for c, (title, sl, m, (lo, hi), extent, ylabel) in enumerate(views):
            ax = axes[r, c]
            im = ax.imshow(sl.T, origin="lower", cmap="gray", vmin=lo, vmax=hi, extent=extent)
            if m is not None:
                ax.imshow(np.ma.masked_where(~m.T, m.T), origin="lower", cmap=ListedColormap(["tab:orange"]),
                          alpha=0.7, extent=extent)
            viz.radiological(ax)  # the patient's right on the viewer's left
            ax.set_xlabel("x (mm, patient right on the left)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{row['subject_id']} ({tag} burden: {row['clot_volume_ml']:.0f} mL, "
                         f"{share:.0f}% of lumen)\n{title}", fontsize=10)
            fig.colorbar(im, ax=ax, shrink=0.8, label="HU")
    fig.suptitle("CT pulmonary angiograms: clot (filling defect, orange) in the contrast-filled pulmonary arteries",
                 fontsize=13)
    return fig


def _fig_timelines(df: pd.DataFrame, ev: pd.DataFrame, desc: dict[str, str]):
    import matplotlib.pyplot as plt

    lookback = float(ev["days_before_index"].astype(float).max())
    colors = {"ICD10": "tab:blue", "ATC": "tab:green", "LOINC": "tab:red"}
    fig, axes = plt.subplots(2, 2, figsize=(16, 14), constrained_layout=True)
    cases = [("internal", 0.1), ("internal", 0.9), ("external", 0.1), ("external", 0.9)]
    for ax, (site, q) in zip(axes.ravel(), cases, strict=True):
        pool = df[df["site"].astype(str) == site].sort_values("z_ehr")
        if pool.empty:
            ax.set_axis_off()
            continue
        row = pool.iloc[int(q * (len(pool) - 1))]
        e = ev[ev["subject_id"] == row["subject_id"]]
        e = e[e["code"].isin(e["code"].value_counts().index[:30])]
        order = e.drop_duplicates("code").sort_values(["code_system", "code"])["code"].tolist()
        ypos = {c: i for i, c in enumerate(order)}
        for system, g in e.groupby("code_system", observed=True):
            ax.scatter(g["days_before_index"].astype(float), g["code"].map(ypos), s=22, color=colors[str(system)],
                       label=str(system))
        ax.set_yticks(range(len(order)), [f"{c}  {desc.get(c, '')}"[:48] for c in order], fontsize=8)
        ax.set_xlim(lookback + 20, -20)
        ax.set_xlabel("days before the index CT")
        ax.set_title(f"{row['subject_id']} ({site}): state z_ehr = {row['z_ehr']:+.2f}, "
                     f"{'died' if row['event'] else 'censored'} at day {row['time_days']}", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    # one legend for the four panels, below them: inside a panel it hid events
    handles = [plt.Line2D([], [], ls="", marker="o", color=c, label=system) for system, c in colors.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), title="code system")
    fig.suptitle("EHR histories: the 30 most recorded codes of a low- and a high-state subject per site", fontsize=13)
    return fig


def _fig_codes(df: pd.DataFrame, ev: pd.DataFrame, desc: dict[str, str]):
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 10), constrained_layout=True,
                                   gridspec_kw={"width_ratios": [1.3, 1]})
    site = df[["subject_id", "site"]].assign(site=lambda d: d["site"].astype(str))
    per = ev[ev["code_system"] != "LOINC"].drop_duplicates(["subject_id", "code"]).merge(site, on="subject_id")
    n_site = site["site"].value_counts()
    share = per.groupby(["code", "site"]).size().unstack(fill_value=0).div(n_site, axis=1).fillna(0.0)
    share = share.reindex(columns=["internal", "external"], fill_value=0.0)
    swapped = {c for c, *_x, s, _f in DIAGNOSES + MEDICATIONS if s} | set(SIBLINGS)
    shown = share.assign(tot=share.sum(axis=1)).sort_values("tot", ascending=False)
    shown = shown[shown.index.isin(list(shown.index[:24]) + sorted(swapped))].sort_values("tot")
    y = np.arange(len(shown))
    ax1.barh(y - 0.2, shown["internal"], 0.4, label=f"internal (n={n_site.get('internal', 0)})", color="tab:blue")
    ax1.barh(y + 0.2, shown["external"], 0.4, label=f"external (n={n_site.get('external', 0)})", color="tab:orange")
    ax1.set_yticks(y, [f"{c}{' *' if c in swapped else ''}  {desc.get(c, '')}"[:48] for c in shown.index], fontsize=8)
    ax1.set_xlabel("share of subjects with the code at least once")
    ax1.set_title("Code use by site (* = code with a site-specific sibling)")
    ax1.legend(loc="lower right")
    cr = ev[ev["code"] == "2160-0"].merge(site, on="subject_id")
    for (s, unit), g in cr.groupby(["site", cr["unit"].astype(str)]):
        ax2.hist(np.log10(g["value"].astype(float)), bins=40, alpha=0.55, hatch=None if unit == "mg/dL" else "//",
                 color="tab:blue" if s == "internal" else "tab:orange", label=f"{s}, {unit} ({len(g)} results)")
    ax2.set_xlabel("log10 creatinine value (as reported)")
    ax2.set_ylabel("lab results")
    ax2.set_title("Creatinine (LOINC 2160-0) as reported: units differ by site")
    ax2.legend()
    return fig


def _fig_km(df: pd.DataFrame):
    import matplotlib.pyplot as plt

    from mmlib.viz import km_curves

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.5), constrained_layout=True, sharey=True)
    t, e = df["time_days"].to_numpy(float), df["event"].to_numpy(int)

    def groups(col, values):
        return [(label, e[m], t[m], color) for value, label, color in values
                if (m := (df[col].astype(str) == value).to_numpy()).any()]

    km_curves(ax1, groups("risk_group", [(g, f"{g} planted risk", c) for g, c in
                                         (("low", "tab:green"), ("mid", "tab:olive"), ("high", "tab:red"))]),
              title="By planted risk group (tertiles of the true log hazard)", xlabel="days after the index CT")
    km_curves(ax2, groups("site", [(s, s, c) for s, c in (("internal", "tab:blue"), ("external", "tab:orange"))]),
              title="By site", xlabel="days after the index CT", ylabel=None)
    return fig


def tour_figures(cohort: Cohort) -> dict[str, Any]:
    """Figures of the data tour.

    Returns:
        ``ct_slices`` (low vs high clot burden, lung and mediastinal windows, clot overlaid),
        ``ehr_timelines`` (events over the days before the index CT), ``code_frequency_by_site``
        (coding shift and lab units), ``kaplan_meier`` (by planted risk group and by site), each
        a matplotlib Figure.
    """
    df = _with_latents(cohort)
    ev = cohort.tables["ehr_events"]
    ev = ev.assign(subject_id=ev["subject_id"].astype(str), code=ev["code"].astype(str))
    desc = dict(zip(VOCABULARY["code"], VOCABULARY["description"], strict=True))
    return {
        "ct_slices": _fig_ct(cohort, df),
        "ehr_timelines": _fig_timelines(df, ev, desc),
        "code_frequency_by_site": _fig_codes(df, ev, desc),
        "kaplan_meier": _fig_km(df),
    }
