"""P1 cohort: 3D FLAIR-like brain MRI and a UK-Biobank-like clinical table, stroke after the scan.

Serves P1 (stroke risk with a multimodal foundation model: CLIP + image-tabular matching on
T2-FLAIR volumes and clinical fields). It stands in for UK Biobank imaging participants.

The causal model, per subject (``data_manifest/cohorts/stroke_mri.md`` has the numbers):

- Clinical fields come from a small structural model. Age drives SBP, diabetes, AF and
  medication; BMI drives diabetes and SBP; statins lower cholesterol. Missingness: a few % MCAR,
  plus MAR blood biochemistry that is missing more often in the young.
- White-matter hyperintensity (WMH) load in each region r:
  ``log L_r = log(lesion_load_ml * m_r) + risk_to_lesion * l . x + lesion_sd * (0.6 u + 0.8 u_r)``.
  ``x`` holds age, SBP, diabetes and smoking. ``u`` (shared) and ``u_r`` (per region) are N(0, 1)
  small-vessel burden that no clinical field explains.
- Stroke after the scan:
  ``logit p = a + tabular_signal * c . (x - mean) + image_signal * z(log L_target)``.
  ``target`` is the knob ``lesion_region``. ``a`` is solved so that the population risk equals
  ``prevalence``. The WMH load is itself caused by age, SBP, diabetes and smoking, so these
  confound the image-outcome association. The truth records the direct, indirect and total effects.
- Image: the MNI152 2009a template's GM/WM/CSF on the chosen grid. Ventricles and sulci widen with
  age. WMH voxels are placed inside each region's white matter: exactly the planned load, in whole
  voxels. FLAIR contrast: WMH > GM > WM > CSF. Then a smooth deformation, a bias field, a site
  gain and Rician noise.
- Sampling: the unlabelled ``pretrain`` pool is a random sample of a virtual population. The
  labelled train/val/test subjects are a case-control sample (the paper's class-balanced splits).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage, optimize, special, stats

from mmlib.cohorts import phantoms
from mmlib.cohorts.base import CohortGenerator, CohortKnobs, CohortPlan, SubjectFiles
from mmlib.core import ProfileSet
from mmlib.data.manifest import Column, Manifest, Modality

__all__ = ["PRESETS", "REGIONS", "Knobs", "StrokeMRI", "anatomy", "planted_effect_checks", "tour_figures"]

# the brain's field of view in MNI mm (x, y, z): the template's brain bounding box plus a margin
FOV_CENTER_MM = (0.0, -17.0, 5.0)
FOV_SIZE_MM = (152.0, 188.0, 160.0)
# Named WMH regions: (centre, radii) in mm of an ellipsoid. None means the band of WM within
# PERIVENTRICULAR_MM of the lateral ventricles, with the side taken from the sign of x.
PERIVENTRICULAR_MM = 10.0
REGIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]] | None] = {
    "periventricular_left": None,
    "periventricular_right": None,
    "deep_wm_frontal_left": ((-24.0, 24.0, 26.0), (14.0, 18.0, 16.0)),
    "deep_wm_frontal_right": ((24.0, 24.0, 26.0), (14.0, 18.0, 16.0)),
    "deep_wm_parietal_left": ((-26.0, -46.0, 32.0), (14.0, 18.0, 16.0)),
    "deep_wm_parietal_right": ((26.0, -46.0, 32.0), (14.0, 18.0, 16.0)),
}
ALL_REGIONS = (*REGIONS, "other_wm")  # other_wm: the rest of the supratentorial WM (not a knob value)
REGION_LOAD_SCALE = {"other_wm": 1.0, **{r: (1.0 if r.startswith("peri") else 0.4) for r in REGIONS}}
LEVELS = {"wm": 450.0, "gm": 650.0, "csf": 100.0, "wmh": 1000.0}  # FLAIR intensities (a.u.): WMH > GM > WM > CSF
CENTRES = ("Cheadle", "Newcastle", "Reading")  # UK Biobank imaging centres (the site column)
CENTRE_GAIN = {"Cheadle": 0.0, "Newcastle": 1.0, "Reading": -1.0}  # x site_shift
# categorical fields: levels and population shares
ETHNICITY = {"white": 0.95, "asian": 0.02, "black": 0.012, "mixed": 0.008, "chinese": 0.004, "other": 0.006}
EDUCATION = {"degree": 0.45, "a_levels": 0.13, "o_levels": 0.27, "none": 0.15}
ALCOHOL = {"daily": 0.2, "3-4 per week": 0.23, "1-2 per week": 0.26, "1-3 per month": 0.11,
           "special occasions": 0.11, "never": 0.09}  # fmt: skip
ACTIVITY = {"low": 0.2, "moderate": 0.4, "high": 0.4}

# clinical log-odds of stroke per unit, x tabular_signal, centred at the population mean
STROKE_LOG_ODDS = {
    "age": 0.09, "sbp": 0.025, "atrial_fibrillation": 1.4, "diabetes": 0.8, "smoking_current": 0.9,
    "smoking_previous": 0.3, "male": 0.35, "antihypertensive_medication": 0.3, "hdl_cholesterol": -0.6,
    "family_history_stroke": 0.4,
}  # fmt: skip
# risk factors of WMH load (log ml per unit), x risk_to_lesion: the confounding path
LESION_LOG_LOAD = {"age": 0.05, "sbp": 0.012, "diabetes": 0.35, "smoking_current": 0.3, "smoking_previous": 0.1}

BOOL_FIELDS = ("diabetes", "atrial_fibrillation", "antihypertensive_medication", "statin", "family_history_stroke")
MAR_FIELDS = ("total_cholesterol", "hdl_cholesterol", "hba1c")  # blood biochemistry: missing more in the young
MCAR_FIELDS = ("ethnicity", "townsend_index", "education", "bmi", "sbp", "dbp", "smoking_status",
               "alcohol_frequency", "physical_activity", "diabetes", "antihypertensive_medication", "statin",
               "family_history_stroke")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Knobs(CohortKnobs):
    """Knobs of the stroke-MRI cohort (see the module docstring for the model)."""

    n_subjects: int = 500  # subjects written: unlabelled pretraining pool + labelled (train/val/test)
    n_labelled: int = 200  # labelled subjects (a case-control sample); the rest are the 'pretrain' pool
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train/val/test shares of the labelled
    case_fraction: float = 0.5  # share of stroke cases among the labelled (0.5 = class-balanced, as the paper)
    prevalence: float = 0.1  # population risk of stroke after the scan (the intercept is solved to match)
    spacing_mm: tuple[float, float, float] = (4.0, 4.0, 4.0)  # voxel size (mm)
    volume_shape: tuple[int, int, int] | None = None  # voxels; None = FOV_SIZE_MM at spacing_mm
    image_signal: float = 1.0  # direct log-odds of stroke per SD of log WMH load in lesion_region (0 = none)
    tabular_signal: float = 1.0  # multiplier of STROKE_LOG_ODDS (0 = no direct clinical effect)
    risk_to_lesion: float = 1.0  # multiplier of LESION_LOG_LOAD, risk factors -> WMH (0 = no confounding)
    lesion_region: str = "periventricular_left"  # the region whose WMH load drives stroke (a key of REGIONS)
    lesion_load_ml: float = 1.5  # median WMH volume (ml) of a periventricular region at average risk
    lesion_sd: float = 1.0  # SD of the latent (non-clinical) part of log WMH load per region
    atrophy_mm_per_decade: float = 0.8  # ventricular widening (sulci: half) per decade past 40 years (mm)
    noise_sd: float = 0.04  # Rician noise SD as a fraction of the WM intensity
    bias_field: float = 0.08  # SD of the log multiplicative bias field
    deformation_mm: float = 2.0  # SD of the smooth per-subject displacement (mm)
    site_shift: float = 0.05  # relative intensity gain (and half of it, GM/WM contrast) between centres
    missing_rate: float = 0.03  # MCAR missing share of each nullable clinical field
    mar_missing: float = 0.10  # extra mean missing share of blood biochemistry, higher in the young (MAR)


PRESETS = presets = ProfileSet(
    # smoke and quick strengthen both signals so that ~200 labelled subjects show them clearly
    smoke=Knobs(name="smoke", n_subjects=24, n_labelled=16, spacing_mm=(8.0, 8.0, 8.0),
                image_signal=2.0, tabular_signal=1.5),
    quick=Knobs(name="quick", n_subjects=500, n_labelled=200, spacing_mm=(4.0, 4.0, 4.0),
                image_signal=2.0, tabular_signal=1.5),
    # the paper's scale: ~5000 unlabelled for pretraining, a class-balanced labelled set, realistic risk
    full=Knobs(name="full", n_subjects=6000, n_labelled=1000, spacing_mm=(2.0, 2.0, 2.0), prevalence=0.03),
)  # fmt: skip


# --------------------------------------------------------------------------- template anatomy


def _grid(spacing: tuple[float, ...], shape: tuple[int, ...] | None) -> tuple[tuple[int, ...], np.ndarray]:
    """The output grid: shape (voxels) and RAS affine in MNI mm, centred on the brain."""
    if shape is None:
        shape = tuple(int(round(f / s)) for f, s in zip(FOV_SIZE_MM, spacing, strict=True))
    affine = phantoms.ras_affine(shape, spacing)
    affine[:3, 3] += FOV_CENTER_MM
    return tuple(int(n) for n in shape), affine


@lru_cache(maxsize=1)
def _template_1mm() -> dict[str, Any]:
    """MNI152 2009a GM, WM at 1 mm (the files nilearn ships), with CSF, ventricles and the region atlas."""
    import nibabel as nib

    # read the files directly: importing nilearn.datasets costs seconds, the data are the same
    data_dir = Path(importlib.util.find_spec("nilearn").submodule_search_locations[0]) / "datasets" / "data"
    imgs = {k: nib.load(data_dir / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz") for k in ("t1", "gm", "wm")}
    affine = imgs["t1"].affine.copy()
    # crop to the field of view first: everything below then costs half as much (1 mm voxels)
    lo = np.floor(np.subtract(FOV_CENTER_MM, np.divide(FOV_SIZE_MM, 2)) - affine[:3, 3]).astype(int).clip(0)
    hi = np.ceil(np.add(FOV_CENTER_MM, np.divide(FOV_SIZE_MM, 2)) - affine[:3, 3]).astype(int) + 1
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    affine[:3, 3] += lo
    t1, gm, wm = (np.asarray(imgs[k].dataobj[crop], dtype=np.float32) / 255.0 for k in ("t1", "gm", "wm"))
    brain = ndimage.binary_fill_holes(t1 > 0.05)
    csf = np.clip(brain - gm - wm, 0.0, 1.0).astype(np.float32)
    X, Y, Z = np.meshgrid(*(affine[i, i] * np.arange(n) + affine[i, 3] for i, n in enumerate(t1.shape)),
                          indexing="ij", sparse=True)  # fmt: skip
    # lateral ventricles: the two largest CSF components in a central box
    lab, _ = ndimage.label((csf > 0.5) & (np.abs(X) < 30) & (Y > -50) & (Y < 35) & (Z > -5) & (Z < 35))
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    vent = np.isin(lab, np.argsort(sizes)[-2:])
    # distance to the ventricles, only where it can be <= PERIVENTRICULAR_MM
    near = tuple(slice(max(0, a.min() - 12), a.max() + 13) for a in np.nonzero(vent))
    dist_vent = np.full(t1.shape, np.inf, dtype=np.float32)
    dist_vent[near] = ndimage.distance_transform_edt(~vent[near])
    wm_core = wm > 0.5
    peri = wm_core & (dist_vent <= PERIVENTRICULAR_MM) & (Z > -5)
    atlas = np.zeros(t1.shape, dtype=np.int8)
    for k, (name, spec) in enumerate(REGIONS.items(), start=1):
        if spec is None:
            atlas[peri & ((X < 0) if name.endswith("left") else (X > 0))] = k
        else:
            (cx, cy, cz), (rx, ry, rz) = spec
            inside = ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 + ((Z - cz) / rz) ** 2 <= 1.0
            atlas[inside & wm_core & ~peri & (atlas == 0)] = k
    atlas[wm_core & (atlas == 0) & (Z > -10)] = len(REGIONS) + 1  # other_wm: supratentorial, like most WMH
    maps = {"gm": gm, "wm": wm, "csf": csf, "brain": brain.astype(np.float32), "vent": vent.astype(np.float32)}
    return {**maps, "atlas": atlas, "affine": affine}


@lru_cache(maxsize=4)
def _anatomy_cached(spacing: tuple[float, ...], shape: tuple[int, ...]) -> dict[str, Any]:
    tpl = _template_1mm()
    shape, affine = _grid(spacing, shape)
    vox = np.linalg.inv(tpl["affine"]) @ affine  # output voxel -> template voxel
    idx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    coords = [vox[i, 0] * idx[0] + vox[i, 1] * idx[1] + vox[i, 2] * idx[2] + vox[i, 3] for i in range(3)]
    sigma = [max(0.0, 0.42 * (s - 1.0)) for s in spacing]  # anti-aliasing before sampling a coarser grid
    out: dict[str, Any] = {"shape": shape, "affine": affine, "spacing": np.asarray(spacing, dtype=float)}
    for k in ("gm", "wm", "csf", "brain", "vent"):
        src = ndimage.gaussian_filter(tpl[k], sigma) if any(sigma) else tpl[k]
        out[k] = ndimage.map_coordinates(src, coords, order=1, mode="constant").astype(np.float32)
    out["atlas"] = ndimage.map_coordinates(tpl["atlas"], coords, order=0, mode="constant").astype(np.int8)
    # distances (mm) that turn age into ventricular and sulcal widening
    out["dist_vent"] = ndimage.distance_transform_edt(out["vent"] < 0.3, sampling=spacing).astype(np.float32)
    out["dist_out"] = ndimage.distance_transform_edt(out["brain"] > 0.5, sampling=spacing).astype(np.float32)
    world = np.stack([i.ravel() for i in idx], 1) @ affine[:3, :3].T + affine[:3, 3]
    out["region_voxels"] = {r: np.flatnonzero(out["atlas"].ravel() == k) for k, r in enumerate(ALL_REGIONS, 1)}
    out["region_mm"] = {r: world[v] for r, v in out["region_voxels"].items()}
    return out


def anatomy(spacing: tuple[float, ...], shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Template tissue maps, ventricles and the region atlas on an output grid (cached per process).

    Args:
        spacing: voxel size (mm), e.g. ``(4.0, 4.0, 4.0)``.
        shape: voxels; None = the brain field of view at ``spacing``.

    Returns:
        ``gm``, ``wm``, ``csf``, ``brain``, ``vent``: float32 fractions of shape (X, Y, Z).
        ``atlas``: int8, 0 outside the WM regions, k for the k-th of :data:`ALL_REGIONS`.
        ``affine``: (4, 4). Also the distance maps and each region's voxel indices.
    """
    spacing = tuple(float(s) for s in spacing)
    shape, _ = _grid(spacing, None if shape is None else tuple(int(n) for n in shape))
    return _anatomy_cached(spacing, shape)  # one cache entry per grid, however it was named


def _smooth_coarse(shape: tuple[int, ...], rng: np.random.Generator, sigma_vox: float, amplitude: float) -> np.ndarray:
    """A smooth random field (SD ``amplitude``), drawn on a coarse grid and upsampled: same look, less work."""
    coarse = tuple(max(4, int(np.ceil(n / max(sigma_vox, 1.0))) + 1) for n in shape)
    field = phantoms.smooth_field(coarse, rng, 1.0, amplitude)
    zoomed = ndimage.zoom(field, [n / c for n, c in zip(shape, coarse, strict=True)], order=1)
    return zoomed[tuple(slice(0, n) for n in shape)]


# --------------------------------------------------------------------------- the clinical table


def _bern(rng: np.random.Generator, logit: np.ndarray) -> np.ndarray:
    return rng.random(np.shape(logit)) < special.expit(logit)


def _draw_population(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Complete (no missing values) UK-Biobank-like clinical fields of ``n`` people."""
    age = np.clip(rng.normal(63.5, 7.5, n), 45.0, 82.0)
    male = rng.random(n) < 0.48
    townsend = np.clip(rng.normal(-1.5, 2.8, n), -6.5, 11.0)
    bmi = np.clip(rng.normal(26.5 + 0.6 * male, 4.2, n), 16.0, 55.0)
    smoke_u = rng.random(n) - 0.015 * townsend
    smoking = np.where(smoke_u < 0.60, "never", np.where(smoke_u < 0.94, "previous", "current"))
    diabetes = _bern(rng, -3.2 + 0.05 * (age - 63.5) + 0.13 * (bmi - 26.5) + 0.4 * male)
    af = _bern(rng, -3.8 + 0.09 * (age - 63.5) + 0.4 * male)
    sbp = np.clip(138.0 + 0.7 * (age - 63.5) + 0.9 * (bmi - 26.5) + 5.0 * male + rng.normal(0, 16, n), 85, 230)
    dbp = np.clip(79.0 + 0.4 * (sbp - 138.0) + 0.3 * (bmi - 26.5) + rng.normal(0, 7, n), 45.0, 130.0)
    bp_meds = _bern(rng, -1.8 + 0.04 * (sbp - 138) + 0.06 * (age - 63.5) + 0.06 * (bmi - 26.5) + 0.6 * diabetes)
    statin = _bern(rng, -2.0 + 0.07 * (age - 63.5) + 1.5 * diabetes + 0.4 * male)
    chol = np.clip(5.6 - 0.25 * male - 1.3 * statin + rng.normal(0, 1.0, n), 2.0, 11.0)
    hdl = np.clip(1.6 - 0.3 * male - 0.025 * (bmi - 26.5) + rng.normal(0, 0.35, n), 0.5, 3.5)
    hba1c = np.clip(35.0 + 16.0 * diabetes + 0.3 * (bmi - 26.5) + rng.normal(0, 3.5, n), 20.0, 120.0)

    def cat(shares: dict[str, float]) -> np.ndarray:
        return np.asarray(list(shares), dtype=object)[rng.choice(len(shares), size=n, p=list(shares.values()))]

    return pd.DataFrame({
        "age": age.round(1), "sex": np.where(male, "male", "female"), "ethnicity": cat(ETHNICITY),
        "townsend_index": townsend.round(2), "education": cat(EDUCATION), "bmi": bmi.round(1),
        "sbp": sbp.round(0), "dbp": dbp.round(0), "total_cholesterol": chol.round(2),
        "hdl_cholesterol": hdl.round(2), "hba1c": hba1c.round(1), "smoking_status": smoking,
        "alcohol_frequency": cat(ALCOHOL), "physical_activity": cat(ACTIVITY), "diabetes": diabetes,
        "atrial_fibrillation": af, "antihypertensive_medication": bp_meds, "statin": statin,
        "family_history_stroke": rng.random(n) < 0.25,
    })  # fmt: skip


def _risk_factors(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """The risk factors of the outcome and lesion models, from complete fields."""
    x = {f: df[f].to_numpy(float) for f in ("age", "sbp", "hdl_cholesterol", *BOOL_FIELDS)}
    x["smoking_current"] = (df["smoking_status"] == "current").to_numpy(float)
    x["smoking_previous"] = (df["smoking_status"] == "previous").to_numpy(float)
    x["male"] = (df["sex"] == "male").to_numpy(float)
    return x


# --------------------------------------------------------------------------- the generator


class StrokeMRI(CohortGenerator):
    """FLAIR-like MNI152-based brain volumes with WMH masks, a clinical table and stroke (P1)."""

    name = "stroke_mri"
    paper = "P1"
    description = "3D FLAIR-like brain MRI + UK-Biobank-like clinical table; stroke after the scan"
    version = "1"
    presets = PRESETS

    def __init__(self, preset: str = "quick", **knobs: Any) -> None:
        super().__init__(preset, **knobs)
        k = self.knobs
        if k.lesion_region not in REGIONS:
            raise ValueError(f"lesion_region={k.lesion_region!r}: choose one of {list(REGIONS)}")
        n_cases = round(k.n_labelled * k.case_fraction)
        if not 0 < k.n_labelled <= k.n_subjects or min(n_cases, k.n_labelled - n_cases) < 3:
            raise ValueError(f"need 0 < n_labelled <= n_subjects and >= 3 cases and controls; got {k}")
        if not 0 < k.prevalence < 1 or abs(sum(k.split_fractions) - 1) > 1e-6:
            raise ValueError(f"prevalence must be in (0, 1) and split_fractions sum to 1; got {k}")

    def plan(self, rng: np.random.Generator) -> CohortPlan:
        k = self.knobs
        anat = anatomy(k.spacing_mm, k.volume_shape)  # also warms the cache that the forked workers inherit
        n_cases = round(k.n_labelled * k.case_fraction)
        n_pool = k.n_subjects - k.n_labelled
        # a virtual population, large enough to case-control sample from
        n_pop = int(max(4 * k.n_subjects, np.ceil(3 * n_cases / k.prevalence)))
        pop = _draw_population(n_pop, rng)
        x = _risk_factors(pop)
        means = {f: float(v.mean()) for f, v in x.items()}

        lesion_lp = k.risk_to_lesion * sum(c * (x[f] - means[f]) for f, c in LESION_LOG_LOAD.items())
        u_shared = rng.standard_normal(n_pop)
        log_load = {}
        for r in ALL_REGIONS:
            latent = k.lesion_sd * (0.6 * u_shared + 0.8 * rng.standard_normal(n_pop))
            log_load[r] = np.log(k.lesion_load_ml * REGION_LOAD_SCALE[r]) + lesion_lp + latent
        mu, sd = float(log_load[k.lesion_region].mean()), float(log_load[k.lesion_region].std())
        lp_clin = k.tabular_signal * sum(c * (x[f] - means[f]) for f, c in STROKE_LOG_ODDS.items())
        lp_img = k.image_signal * (log_load[k.lesion_region] - mu) / sd
        intercept = optimize.brentq(lambda a: special.expit(a + lp_clin + lp_img).mean() - k.prevalence, -30, 30)
        p = special.expit(intercept + lp_clin + lp_img)
        stroke = rng.random(n_pop) < p

        # the pool is a random sample; the labelled are cases and controls sampled apart (case-control)
        order = rng.permutation(n_pop)
        pool, rest = order[:n_pool], order[n_pool:]
        cases, controls = rest[stroke[rest]], rest[~stroke[rest]]
        if len(cases) < n_cases:
            raise ValueError(f"population of {n_pop} has {len(cases)} cases; lower n_labelled or case_fraction")
        cases, controls = cases[:n_cases], controls[: k.n_labelled - n_cases]
        split = np.full(n_pop, "", dtype=object)
        split[pool] = "pretrain"
        for group in (cases, controls):
            cuts = np.round(np.cumsum(k.split_fractions)[:-1] * len(group)).astype(int)
            cuts[0] = np.clip(cuts[0], 1, len(group) - 2)  # every split gets both classes (len >= 3)
            cuts[1] = np.clip(cuts[1], cuts[0] + 1, len(group) - 1)
            for name, part in zip(("train", "val", "test"), np.split(group, cuts), strict=True):
                split[part] = name
        chosen = rng.permutation(np.concatenate([pool, cases, controls]))  # ids do not encode the split

        df = pop.iloc[chosen].reset_index(drop=True)
        n = len(df)
        complete = df.copy()
        df.insert(0, "subject_id", [f"sub-{i + 1:04d}" for i in range(n)])
        df["assessment_centre"] = np.asarray(CENTRES, dtype=object)[rng.integers(0, len(CENTRES), n)]
        df["split"] = split[chosen]
        label = np.where(df["split"] == "pretrain", pd.NA, stroke[chosen].astype(int))
        df["stroke"] = pd.array(label, dtype="Int64")
        # missingness: MCAR in every nullable field, plus MAR biochemistry (more missing in the young)
        mar_p = k.mar_missing * 2 * special.expit(-(df["age"].to_numpy() - 63.5) / 5.0)
        for f in (*MCAR_FIELDS, *MAR_FIELDS):
            miss = rng.random(n) < k.missing_rate + (mar_p if f in MAR_FIELDS else 0.0)
            if f in BOOL_FIELDS:
                df[f] = df[f].astype("boolean").mask(miss)
            else:
                df[f] = df[f].astype(float if pd.api.types.is_numeric_dtype(df[f]) else object).mask(miss)
            df[f"{f}_complete"] = complete[f].to_numpy()  # latent: the value before it went missing
        df["atrial_fibrillation"] = df["atrial_fibrillation"].astype("boolean")
        for r in ALL_REGIONS:
            df[f"planned_load_{r}_ml"] = np.exp(log_load[r][chosen])
        df["u_shared"] = u_shared[chosen]
        df["lp_clinical"] = lp_clin[chosen]
        df["lp_image"] = lp_img[chosen]
        df["p_stroke"] = p[chosen]
        df["stroke_latent"] = stroke[chosen].astype(int)  # the pool's hidden outcome too
        decades = np.maximum(df["age"].to_numpy() - 40.0, 0.0) / 10.0
        df["ventricle_widening_mm"] = k.atrophy_mm_per_decade * decades * np.exp(0.2 * rng.standard_normal(n))
        df["sulcal_widening_mm"] = 0.5 * k.atrophy_mm_per_decade * decades * np.exp(0.2 * rng.standard_normal(n))
        df["site_gain"] = 1.0 + k.site_shift * df["assessment_centre"].map(CENTRE_GAIN)
        return CohortPlan(subjects=df, truth=self._truth(anat, intercept, mu, sd, means, n_pop, stroke))

    def _truth(self, anat: dict, intercept: float, mu: float, sd: float, means: dict, n_pop: int,
               stroke: np.ndarray) -> dict[str, Any]:  # fmt: skip
        k = self.knobs
        direct = {f: round(k.tabular_signal * c, 5) for f, c in STROKE_LOG_ODDS.items()}
        via_wmh = {f: round(k.image_signal * k.risk_to_lesion * c / sd, 5) for f, c in LESION_LOG_LOAD.items()}
        effects = {f: {"direct": direct.get(f, 0.0), "indirect_via_wmh": via_wmh.get(f, 0.0),
                       "total": round(direct.get(f, 0.0) + via_wmh.get(f, 0.0), 5)}
                   for f in sorted({*direct, *via_wmh})}  # fmt: skip
        regions = {r: (f"WM within {PERIVENTRICULAR_MM:g} mm of the lateral ventricles, z > -5 mm" if s is None
                       else {"center_mm": s[0], "radii_mm": s[1], "within": "WM > 0.5, not periventricular"})
                   for r, s in REGIONS.items()}  # fmt: skip
        return {
            "outcome": "stroke after the scan (binary): logit p = intercept + lp_clinical + lp_image",
            "lp_clinical": "tabular_signal * sum_f c_f (x_f - population mean of x_f), from the complete fields",
            "lp_image": "image_signal * (log planned WMH load in lesion_region - log_load_mean) / log_load_sd",
            "intercept": intercept, "prevalence": k.prevalence, "log_load_mean": mu, "log_load_sd": sd,
            "lesion_region": k.lesion_region, "image_log_odds_per_sd_log_load": k.image_signal,
            "clinical_log_odds_per_unit": STROKE_LOG_ODDS, "risk_factor_means": means,
            "lesion_model": "log L_r = log(lesion_load_ml * m_r) + risk_to_lesion * sum_f l_f (x_f - mean) "
                            "+ lesion_sd * (0.6 u_shared + 0.8 u_r), u ~ N(0, 1)",
            "lesion_log_ml_per_unit": LESION_LOG_LOAD, "region_load_scale": REGION_LOAD_SCALE,
            "effects_log_odds_per_unit": effects,
            "regions": regions,
            "region_voxels": {r: len(v) for r, v in anat["region_voxels"].items()},
            "atrophy": "ventricles widen by ventricle_widening_mm, sulci by sulcal_widening_mm (atrophy_mm_per_decade "
                       "x decades past 40 x lognormal(0, 0.2)); GM and WM shrink in proportion",
            "flair_levels": LEVELS, "site_gain": {c: f"1 + {g:+g} x site_shift" for c, g in CENTRE_GAIN.items()},
            "sampling": {"population": n_pop, "population_cases": int(stroke.sum()),
                         "pool": k.n_subjects - k.n_labelled, "labelled": k.n_labelled,
                         "labelled_cases": round(k.n_labelled * k.case_fraction)},
            "noise": "u_shared, u_r; blob shapes; deformation, bias field, Rician noise (noise_sd x WM level); "
                     "no direct effect of ethnicity, education, alcohol, activity, Townsend, BMI, DBP, total "
                     "cholesterol, HbA1c, statin, centre",
        }  # fmt: skip

    def render_subject(self, subject: dict[str, Any], rng: np.random.Generator, files: SubjectFiles) -> dict[str, Any]:
        k = self.knobs
        anat = anatomy(k.spacing_mm, k.volume_shape)
        spacing = anat["spacing"]
        s = float(spacing.mean())
        voxel_ml = float(np.prod(spacing)) / 1000.0
        # atrophy: CSF spreads from the ventricles and the brain surface; GM/WM shrink in proportion
        grow = np.clip(0.5 + (subject["ventricle_widening_mm"] - anat["dist_vent"]) / s, 0, 1)
        vent = np.maximum(anat["vent"], grow) * anat["brain"]
        sulc = np.clip(0.5 + (subject["sulcal_widening_mm"] - anat["dist_out"]) / s, 0, 1) * anat["brain"]
        csf = np.maximum(anat["csf"], np.maximum(vent, sulc))
        tissue = anat["gm"] + anat["wm"]
        scale = np.where(tissue > 1e-3, np.clip((anat["brain"] - csf) / np.maximum(tissue, 1e-3), 0, 1), 0)
        gm, wm = anat["gm"] * scale, anat["wm"] * scale

        # WMH: each region's planned volume in whole voxels, as irregular blobs inside its white matter
        lesion = np.zeros(anat["shape"], dtype=bool).ravel()
        n_blobs = 0
        for r in ALL_REGIONS:
            vox = anat["region_voxels"][r]
            ok = wm.ravel()[vox] > 0.5
            cand, mm = vox[ok], anat["region_mm"][r][ok]
            n_vox = min(int(subject[f"planned_load_{r}_ml"] / voxel_ml + rng.random()), len(cand))  # unbiased
            if n_vox == 0:
                continue
            k_blobs = min(n_vox, 1 + rng.poisson(n_vox * voxel_ml / 0.6))  # ~0.6 ml per blob
            free = np.ones(len(cand), dtype=bool)
            for size in 1 + rng.multinomial(n_vox - k_blobs, rng.dirichlet(np.ones(k_blobs))):
                seed = rng.choice(np.flatnonzero(free))
                axes = np.exp(rng.normal(0, 0.35, 3))
                d = np.sqrt((((mm - mm[seed]) / axes) ** 2).sum(1)) + s * rng.random(len(cand))  # ragged edge
                d[~free] = np.inf
                free[np.argpartition(d, size - 1)[:size]] = False
                n_blobs += 1
            lesion[cand[~free]] = True
        lesion = lesion.reshape(anat["shape"])

        # FLAIR contrast with partial-volume WMH; then deformation, bias field, site gain, Rician noise
        site = float(subject["site_gain"])
        flair = gm * LEVELS["gm"] * (1 + 0.5 * (site - 1)) + wm * LEVELS["wm"] + csf * LEVELS["csf"]
        wmh = np.maximum(lesion.astype(np.float32), ndimage.gaussian_filter(lesion.astype(np.float32), 0.5))
        flair = flair * (1 - wmh) + wmh * LEVELS["wmh"] * (1 + 0.08 * rng.standard_normal())
        flair, lesion_d, brain = phantoms.deform(
            [flair.astype(np.float32), lesion.astype(np.uint8), anat["brain"]],
            rng, sigma_vox=20.0 / s, magnitude_vox=k.deformation_mm / s, orders=[1, 0, 1],
        )
        bias = np.exp(_smooth_coarse(anat["shape"], rng, 40.0 / s, k.bias_field))
        sigma = k.noise_sd * LEVELS["wm"]
        flair = flair * bias * site
        flair = np.hypot(flair + sigma * rng.standard_normal(flair.shape), sigma * rng.standard_normal(flair.shape))
        inside = brain > 0.5  # skull-stripped
        flair = np.where(inside, np.clip(np.round(flair), 0, 32767), 0).astype(np.int16)
        lesion_d = (lesion_d > 0) & inside

        sid = subject["subject_id"]
        out: dict[str, Any] = {
            "flair": files.nifti(f"images/{sid}_flair.nii.gz", flair, anat["affine"]),
            "lesion_mask": files.nifti(f"masks/{sid}_wmh.nii.gz", lesion_d.astype(np.uint8), anat["affine"]),
        }
        # measured on the rendered mask: what planted_effect_checks recomputes from disk
        for j, r in enumerate(ALL_REGIONS, start=1):
            out[f"lesion_load_{r}_ml"] = float((lesion_d & (anat["atlas"] == j)).sum() * voxel_ml)
        out["lesion_load_ml"] = float(lesion_d.sum() * voxel_ml)
        out["n_lesion_blobs"] = n_blobs
        out["ventricle_volume_ml"] = float(vent.sum() * voxel_ml)
        out["csf_volume_ml"] = float(csf.sum() * voxel_ml)
        out["brain_tissue_volume_ml"] = float((gm + wm).sum() * voxel_ml)
        return out

    def manifest(self) -> Manifest:
        def num(name: str, unit: str | None, lo: float, hi: float, desc: str, nullable: bool = True) -> Column:
            return Column(name=name, dtype="float", unit=unit, min=lo, max=hi, nullable=nullable, description=desc)

        def cat(name: str, levels: Any, desc: str, nullable: bool = True) -> Column:
            return Column(name=name, dtype="category", categories=list(levels), nullable=nullable, description=desc)

        def flag(name: str, desc: str, nullable: bool = True) -> Column:
            return Column(name=name, dtype="bool", nullable=nullable, description=desc)

        return Manifest(
            name=self.name,
            description=self.description,
            columns=[
                num("age", "years", 40, 90, "age at the imaging visit (UKB 21003)", nullable=False),
                cat("sex", ["female", "male"], "sex (UKB 31)", nullable=False),
                cat("ethnicity", ETHNICITY, "ethnic background (UKB 21000)"),
                cat("assessment_centre", CENTRES, "imaging centre (UKB 54): the site", nullable=False),
                num("townsend_index", None, -8, 12, "Townsend deprivation index (UKB 189)"),
                cat("education", EDUCATION, "highest qualification (UKB 6138)"),
                num("bmi", "kg/m2", 14, 60, "body mass index (UKB 21001)"),
                num("sbp", "mmHg", 80, 240, "systolic blood pressure, automated (UKB 4080)"),
                num("dbp", "mmHg", 40, 140, "diastolic blood pressure, automated (UKB 4079)"),
                num("total_cholesterol", "mmol/L", 1.5, 12, "total cholesterol (UKB 30690)"),
                num("hdl_cholesterol", "mmol/L", 0.3, 4, "HDL cholesterol (UKB 30760)"),
                num("hba1c", "mmol/mol", 15, 130, "glycated haemoglobin (UKB 30750)"),
                cat("smoking_status", ["never", "previous", "current"], "smoking status (UKB 20116)"),
                cat("alcohol_frequency", ALCOHOL, "alcohol intake frequency (UKB 1558)"),
                cat("physical_activity", ACTIVITY, "IPAQ activity group (UKB 22032)"),
                flag("diabetes", "diabetes diagnosed by a doctor (UKB 2443)"),
                flag("atrial_fibrillation", "atrial fibrillation before the scan (hospital records)", nullable=False),
                flag("antihypertensive_medication", "blood-pressure medication (UKB 6177/6153)"),
                flag("statin", "cholesterol-lowering medication (UKB 6177/6153)"),
                flag("family_history_stroke", "stroke in a parent or sibling (UKB 20107/20110/20111)"),
                cat("split", ["pretrain", "train", "val", "test"], "pretrain = the unlabelled pool", nullable=False),
                Column(name="stroke", dtype="int", min=0, max=1, nullable=True,
                       description="stroke after the scan (1 = yes); empty in the pretraining pool"),
            ],  # fmt: skip
            modalities=[
                Modality(name="flair", column="flair", format="nifti",
                         description="T2-FLAIR-like volume, MNI space, int16 a.u., skull-stripped"),
                Modality(name="lesion_mask", column="lesion_mask", format="nifti", description="WMH mask, uint8 0/1"),
            ],  # fmt: skip
            labels=["stroke"],
            split_column="split",
            site_column="assessment_centre",
            truth="truth.json",
        )


# --------------------------------------------------------------------------- measuring the planted effects

CLINICAL_NUMERIC = ("age", "townsend_index", "bmi", "sbp", "dbp", "total_cholesterol", "hdl_cholesterol", "hba1c")
CLINICAL_CATEGORICAL = ("sex", "ethnicity", "education", "smoking_status", "alcohol_frequency", "physical_activity",
                        "assessment_centre", *BOOL_FIELDS)  # fmt: skip


def _clinical_matrix(df: pd.DataFrame) -> np.ndarray:
    """(N, F) design: standardised median-imputed numerics + one-hot categories (missing = all zeros)."""
    parts = []
    for c in CLINICAL_NUMERIC:
        v = df[c].astype(float)
        v = v.fillna(v.median())
        parts.append(((v - v.mean()) / (v.std() or 1.0)).to_numpy()[:, None])
    for c in CLINICAL_CATEGORICAL:
        parts.append(pd.get_dummies(df[c].astype("string"), dtype=float).to_numpy())
    return np.hstack(parts)


def _residual(y: np.ndarray, X: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y minus its weighted least-squares fit on X (with intercept). Shapes: y (N,), X (N, F), w (N,)."""
    A = np.column_stack([np.ones(len(y)), X])
    sw = np.sqrt(w)
    return y - A @ np.linalg.lstsq(A * sw[:, None], y * sw, rcond=None)[0]


def _population_weights(stroke: pd.Series, prevalence: float) -> np.ndarray:
    """Weights under which the pool + the case-control labelled subjects stand for the population.

    The pool is a random sample (weight 1). The labelled cases and controls are reweighted to
    the population risk. Without this, a regression fitted on the case-enriched subjects picks up
    the association that selecting on the outcome creates (a collider). "Adjusting" with it would
    remove real signal.
    """
    y = stroke.to_numpy(dtype=float, na_value=np.nan)
    lab = ~np.isnan(y)
    n1, n0 = np.nansum(y), lab.sum() - np.nansum(y)
    w = np.ones(len(y))
    w[lab] = np.where(y[lab] == 1, prevalence * lab.sum() / n1, (1 - prevalence) * lab.sum() / n0)
    return w


def _auc_row(effect: str, measure: str, score: np.ndarray, y: np.ndarray, knob: str) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    n1, n0 = int(y.sum()), int(len(y) - y.sum())
    margin = max(0.05, 3 * np.sqrt((n1 + n0 + 1) / (12.0 * n1 * n0)))  # 3 x the AUC's SD under no effect
    value = float(roc_auc_score(y, score))
    return {"effect": effect, "measure": measure, "value": value, "chance": 0.5, "margin": margin,
            "present": value - 0.5 > margin, "knob": knob}  # fmt: skip


def _corr_row(effect: str, measure: str, value: float, n: int, knob: str) -> dict[str, Any]:
    margin = max(0.1, 3 / np.sqrt(n - 1))  # 3 x the correlation's SD under no effect
    return {"effect": effect, "measure": measure, "value": float(value), "chance": 0.0, "margin": margin,
            "present": value > margin, "knob": knob}  # fmt: skip


def _measured(cohort: Any) -> pd.DataFrame:
    """Per subject, from the files on disk: WMH load per region and the CSF-dark volume near the ventricles."""
    import nibabel as nib

    rows = []
    for sid, fpath, mpath in zip(cohort.ids, cohort.paths("flair"), cohort.paths("lesion_mask"), strict=True):
        mask_img = nib.load(mpath)
        mask = np.asarray(mask_img.dataobj) > 0
        spacing = tuple(float(z) for z in mask_img.header.get_zooms()[:3])
        anat = anatomy(spacing, mask.shape)
        if not np.allclose(anat["affine"], mask_img.affine, atol=1e-3):
            raise ValueError(f"{mpath}: affine differs from the stroke_mri grid; not a generated cohort?")
        voxel_ml = float(np.prod(spacing)) / 1000.0
        row = {"subject_id": sid, "load_total": float(mask.sum() * voxel_ml)}
        for j, r in enumerate(ALL_REGIONS, start=1):
            row[f"load_{r}"] = float((mask & (anat["atlas"] == j)).sum() * voxel_ml)
        flair = np.asarray(nib.load(fpath).dataobj, dtype=np.float32)
        brain = flair > 0
        # CSF-dark voxels (below 0.45 x the brain median) within 12 mm of the template's lateral ventricles
        dark = brain & (flair < 0.45 * np.median(flair[brain])) & (anat["dist_vent"] <= 12.0)
        row["ventricle_csf_ml"] = float(dark.sum() * voxel_ml)
        rows.append(row)
    return pd.DataFrame(rows)


def planted_effect_checks(cohort: Any) -> pd.DataFrame:
    """Measure every planted effect from the generated files and table, not from the knobs.

    WMH loads are recomputed from the lesion masks on disk, within the template region atlas. The
    ventricle measure counts CSF-dark FLAIR voxels near the template ventricles.

    "Direct" effects are protected from the confounding. The image score is the log load
    residualised on the clinical table. The clinical score (an out-of-fold logistic regression) is
    residualised on the log load. Both adjustments are fitted on the pool plus the labelled
    subjects, reweighted to the population (:func:`_population_weights`). A cohort with the signal
    switched off then gives about chance.

    ``present`` means ``value - chance > margin``. The tests are one-sided, because every planted
    effect has a known direction. Margins:

    - AUC: max(0.05, 3 x its SD with no effect), the SD from Hanley-McNeil.
    - correlation: max(0.1, 3 / sqrt(n - 1)).

    Returns:
        One row per effect: ``effect``, ``measure``, ``value``, ``chance``, ``present``, plus
        ``margin`` and ``knob`` (the knob that switches the effect off).
    """
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict

    knobs = cohort.truth["knobs"]
    region = knobs["lesion_region"]
    table = cohort.subjects.merge(_measured(cohort), on="subject_id")
    w = _population_weights(table["stroke"], knobs["prevalence"])
    X = _clinical_matrix(table)
    lab = table["stroke"].notna().to_numpy()
    y = table.loc[lab, "stroke"].astype(int).to_numpy()
    log_load = np.log(table[f"load_{region}"].to_numpy() + 0.05)  # + 0.05 ml: subjects without WMH stay finite
    # clinical risk score: out-of-fold for the labelled; a model fitted on all of them for the pool
    clf = LogisticRegression(C=0.3, solver="newton-cholesky", max_iter=200)
    score = clf.fit(X[lab], y).decision_function(X)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    score[lab] = cross_val_predict(clf, X[lab], y, cv=folds, method="decision_function")
    on_disk = f"WMH load in {region} (lesion masks on disk)"
    rows = [
        _auc_row(f"stroke <- WMH load in {region}, direct (beyond the clinical fields)",
                 f"ROC-AUC of log {on_disk}, residualised on the clinical table",
                 _residual(log_load, X, w)[lab], y, "image_signal"),
        _auc_row(f"stroke <- WMH load in {region}, total (direct + confounding by age, SBP, diabetes, smoking)",
                 f"ROC-AUC of the {on_disk} alone", log_load[lab], y, "image_signal; risk_to_lesion x tabular_signal"),
        _auc_row("stroke <- clinical risk factors, direct (beyond WMH load)",
                 "ROC-AUC of a 5-fold out-of-fold logistic-regression score on the clinical table, "
                 "residualised on log WMH load", _residual(score, log_load[:, None], w)[lab], y, "tabular_signal"),
        _auc_row("stroke <- clinical risk factors, total",
                 "5-fold out-of-fold ROC-AUC of logistic regression on the clinical table", score[lab], y,
                 "tabular_signal; risk_to_lesion x image_signal"),
    ]  # fmt: skip
    log_total = np.log(table["load_total"].to_numpy() + 0.05)
    pred = cross_val_predict(Ridge(alpha=10.0), X, log_total, cv=KFold(5, shuffle=True, random_state=0),
                             params={"sample_weight": w})  # fmt: skip
    cov = np.cov(pred, log_total, aweights=w)
    rows.append(_corr_row("WMH load <- risk factors (the confounding path)",
                          "population-weighted Pearson r of a 5-fold out-of-fold ridge prediction from the clinical "
                          "table vs log total WMH load (masks on disk)",
                          cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1]), len(table), "risk_to_lesion"))  # fmt: skip
    rows.append(_corr_row("ventricles widen with age (atrophy)",
                          "Spearman rho of age vs the CSF-dark FLAIR volume within 12 mm of the template ventricles "
                          "(FLAIR on disk)", stats.spearmanr(table["age"], table["ventricle_csf_ml"]).statistic,
                          len(table), "atrophy_mm_per_decade"))  # fmt: skip
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- figures


def _pick_subjects(lat: pd.DataFrame, region: str) -> list[tuple[str, str]]:
    """Young/old x low/high WMH load in the region: (subject_id, caption)."""
    load = lat[f"lesion_load_{region}_ml"]
    young, old = lat["age"] <= lat["age"].quantile(0.3), lat["age"] >= lat["age"].quantile(0.7)
    low, high = load <= load.quantile(0.35), load >= load.quantile(0.75)
    picks = []
    for a_mask, a_txt in ((young, "young"), (old, "old")):
        for l_mask, l_txt in ((low, "low"), (high, "high")):
            pool = lat[a_mask & l_mask] if (a_mask & l_mask).any() else lat[a_mask]
            row = pool.loc[pool[f"lesion_load_{region}_ml"].idxmax()] if l_txt == "high" else pool.iloc[0]
            picks.append((row["subject_id"], f"{a_txt}, {l_txt} WMH load"))
    return picks


def _wilson(k: np.ndarray, n: np.ndarray, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score 95% interval of a proportion k / n."""
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    return centre - half, centre + half


def _slices_figure(cohort: Any, lat: pd.DataFrame, region: str) -> Any:
    import matplotlib.pyplot as plt
    import nibabel as nib
    from matplotlib.patches import Patch

    from mmlib import viz

    picks = _pick_subjects(lat, region)
    fig, axes = plt.subplots(len(picks), 3, figsize=(14, 3.6 * len(picks)), constrained_layout=True)
    for row, (sid, caption) in enumerate(picks):
        img = nib.load(cohort.path("flair", sid))
        flair = np.asarray(img.dataobj, dtype=np.float32)
        mask = np.asarray(nib.load(cohort.path("lesion_mask", sid)).dataobj) > 0
        anat = anatomy(img.header.get_zooms()[:3], flair.shape)
        reg = anat["atlas"] == ALL_REGIONS.index(region) + 1
        c = np.round(np.argwhere(reg).mean(0)).astype(int)  # slices through the region's centroid
        aff = anat["affine"]
        world = aff[:3, :3] @ c + aff[:3, 3]
        ext = [aff[i, 3] + np.array([-0.5, n - 0.5]) * aff[i, i] for i, n in enumerate(flair.shape)]
        views = [("axial", np.s_[:, :, c[2]], (0, 1), f"z = {world[2]:.0f} mm"),
                 ("coronal", np.s_[:, c[1], :], (0, 2), f"y = {world[1]:.0f} mm"),
                 ("sagittal", np.s_[c[0], :, :], (1, 2), f"x = {world[0]:.0f} mm")]  # fmt: skip
        vmax = float(np.percentile(flair[(flair > 0) & ~mask], 99.5)) * 1.3  # WMH visible, tissue not washed out
        r = lat.loc[lat["subject_id"] == sid].iloc[0]
        outcome = "" if pd.isna(r["stroke"]) else f", stroke = {int(r['stroke'])}"
        for col, (view, sl, (a, b), where) in enumerate(views):
            ax, extent = axes[row, col], [*ext[a], *ext[b]]
            im = ax.imshow(flair[sl].T, cmap="gray", origin="lower", extent=extent, vmin=0, vmax=vmax)
            ax.imshow(np.ma.masked_where(~mask[sl].T, mask[sl].T), cmap="autumn", origin="lower", extent=extent,
                      alpha=0.5)  # fmt: skip
            ax.contour(reg[sl].T.astype(float), levels=[0.5], colors="cyan", linewidths=1.2, origin="lower",
                       extent=extent)  # fmt: skip
            ax.set_xlabel({0: "x (mm, R+)", 1: "y (mm, A+)"}[a])
            if a == 0:
                viz.radiological(ax)
            else:
                ax.invert_xaxis()  # sagittal seen from the left, anterior on the left, as in viz.orthogonal_slices
            ax.set_ylabel({1: "y (mm, A+)", 2: "z (mm, S+)"}[b])
            ax.set_title(f"{sid} ({caption}) - {view}, {where}\nage {r['age']:.0f} y, WMH in region "
                         f"{r[f'lesion_load_{region}_ml']:.1f} ml, total {r['lesion_load_ml']:.1f} ml{outcome}",
                         fontsize=9)  # fmt: skip
    fig.colorbar(im, ax=axes, shrink=0.5, label="FLAIR intensity (a.u.)")
    handles = [Patch(color="red", label="WMH mask"),
               Patch(edgecolor="cyan", facecolor="none", label=f"{region} (atlas)")]  # fmt: skip
    fig.legend(handles=handles, loc="outside lower center", ncol=2)
    fig.suptitle(f"stroke_mri: FLAIR-like volumes in MNI space, radiological view (the subject's right on the "
                 f"viewer's left); "
                 f"outcome-relevant region: {region}", fontsize=12)  # fmt: skip
    return fig


def _outcome_figure(lat: pd.DataFrame, region: str) -> Any:
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 4.4), constrained_layout=True)
    load = f"lesion_load_{region}_ml"
    labelled = lat[lat["stroke"].notna()].copy()
    labelled["age_bin"] = pd.qcut(labelled["age"], 5)
    high = labelled[load] > labelled[load].median()
    for grp, colour, name in ((~high, "tab:blue", "WMH in region <= median"),
                              (high, "tab:red", "WMH in region > median")):  # fmt: skip
        g = labelled[grp].groupby("age_bin", observed=True)["stroke"]
        k_, n_ = g.sum().to_numpy(float), g.count().to_numpy(float)
        p_, (lo, hi) = k_ / n_, _wilson(k_, n_)
        mids = [iv.mid for iv in g.sum().index]
        a1.errorbar(mids, p_, yerr=[p_ - lo, hi - p_], marker="o", capsize=3, color=colour, label=name)
    a1.set(xlabel="age (years)", ylabel="stroke rate (labelled, case-control sample)", ylim=(0, 1),
           title="Stroke rate by age quintile (95% CI)")  # fmt: skip
    a1.legend(fontsize=8)
    pool = lat["stroke"].isna()
    a2.scatter(lat.loc[pool, "age"], lat.loc[pool, load] + 0.01, s=6, c="lightgrey", label="pretrain pool (no label)")
    for val, colour in ((0, "tab:blue"), (1, "tab:red")):
        sel = lat["stroke"] == val
        a2.scatter(lat.loc[sel, "age"], lat.loc[sel, load] + 0.01, s=10, c=colour, label=f"stroke = {val}")
    a2.set(yscale="log", xlabel="age (years)", ylabel=f"WMH load in {region} (ml, +0.01)",
           title="Regional WMH load vs age")  # fmt: skip
    a2.legend(fontsize=8)
    a3.scatter(lat["age"], lat["ventricle_volume_ml"], s=6, c="tab:purple")
    slope, icpt = np.polyfit(lat["age"], lat["ventricle_volume_ml"], 1)
    xs = np.linspace(lat["age"].min(), lat["age"].max(), 2)
    a3.plot(xs, icpt + slope * xs, "k--", label=f"{slope * 10:.1f} ml per decade")
    a3.set(xlabel="age (years)", ylabel="ventricle volume (ml, rendered)", title="Ventricles widen with age")
    a3.legend(fontsize=8)
    fig.suptitle("stroke_mri: outcome, WMH load and atrophy against age", fontsize=11)
    return fig


def tour_figures(cohort: Any) -> dict[str, Any]:
    """Figures of the data tour.

    Returns:
        ``slices``: orthogonal FLAIR slices of four subjects (young/old x low/high WMH load). The
        WMH mask is in red and the outcome-relevant region is outlined.
        ``outcome_vs_age``: stroke rate, regional WMH load and ventricle volume against age.
    """
    region = cohort.truth["knobs"]["lesion_region"]
    lat = cohort.latents().merge(cohort.subjects[["subject_id", "age", "stroke", "split"]], on="subject_id")
    return {"slices": _slices_figure(cohort, lat, region), "outcome_vs_age": _outcome_figure(lat, region)}
