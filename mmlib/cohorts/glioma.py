"""P5 (UMEML, arXiv 2406.07078): a generated glioma cohort standing in for TCGA GBM-LGG.

Each subject is a whole-slide image, given as a bag of patch feature vectors and a few rendered
H&E-like patches, plus a bulk RNA profile, with WHO grade, a 6-class molecular subtype and
overall survival. The structural causal model (all numbers are in ``truth.json``):

1. **Grade and subtype.** ``grade`` in {II, III, IV} is drawn by quota from
   ``grade_prevalence``; ``subtype`` given grade from :data:`SUBTYPE_GIVEN_GRADE` (grade IV is
   glioblastoma, IDH-mutant or -wildtype; grades II-III are oligodendroglioma IDH-mutant 1p/19q
   codeleted, astrocytoma IDH-mutant, oligoastrocytoma IDH-mutant or astrocytoma IDH-wildtype).
   IDH status, 1p/19q codeletion and oligodendroglial lineage follow from the subtype.
2. **Aggressiveness** ``a = grade_effect[grade] + subtype_effect[subtype]
   + 0.15 (age - 50)/10 + aggressiveness_sd * N(0, 1)``.
3. **Survival** (months): Weibull proportional hazards with log hazard
   ``survival_effect * (a - 0.4)``; censoring by staggered entry (uniform follow-up up to
   ``follow_up_months``) and loss to follow-up at rate ``censoring`` per year.
4. **Tissue programs** (normal brain, tumour cellular, necrosis, microvascular proliferation,
   inflammation, haemorrhage): per-subject proportions ~ Dirichlet(20 p) with
   ``log p = log p_pooled + h (log p_grade - log p_pooled) + h tilt (a - grade_effect)``,
   ``h = histology_signal``: necrosis and microvascular proliferation are planted in grade IV;
   at ``h = 0`` every subject draws from the pooled mixture. Each patch takes one program;
   tumour and vascular patches get nuclear density x ``exp(0.35 h (a - 0.4))``, radius x
   ``exp(0.12 h (a - 0.4))`` and radius CV x ``exp(0.4 h (a - 0.4))`` (pleomorphism), and
   oligodendroglial tumour cells perinuclear halos with probability ``0.85 min(h, 1) lineage``.
5. **Patch features** ``x = u P + site_shift * o_site + feature_noise_sd * N(0, I)``: ``u`` is
   the patch's descriptor (program one-hot, log density, log radius, log CV, halo), ``P`` a
   fixed random projection to ``feature_dim``; **PNG patches** render the same descriptors in
   haematoxylin/eosin optical density (Beer-Lambert with Ruifrok-Macenko stain vectors).
6. **RNA** (log2 TPM+1), genes in 6 functional groups: ``expr = base + genomic_signal * L f
   + group activity + site_shift * batch[site] + noise_sd * N(0, 1)`` with factors ``f`` =
   (grade, aggressiveness beyond grade, IDH mutant, codeletion, oligodendroglial lineage) and
   group loadings :data:`GROUP_LOADINGS` (per gene: jittered).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import ndimage

from mmlib.cohorts import phantoms
from mmlib.cohorts.base import CohortGenerator, CohortKnobs, CohortPlan, SubjectFiles
from mmlib.core import ProfileSet
from mmlib.data.manifest import Cohort, Column, LongTable, Manifest, Modality, Survival

__all__ = [
    "GENE_GROUPS",
    "GRADES",
    "PRESETS",
    "PROGRAMS",
    "SUBTYPES",
    "Glioma",
    "Knobs",
    "gene_groups",
    "nuclear_measures",
    "planted_effect_checks",
    "render_he_patch",
    "tour_figures",
]  # fmt: skip

GRADES = ("II", "III", "IV")
SUBTYPES = (
    "oligodendroglioma_idhmut_codel",
    "astrocytoma_idhmut",
    "oligoastrocytoma_idhmut",
    "astrocytoma_idhwt",
    "glioblastoma_idhmut",
    "glioblastoma_idhwt",
)
# P(subtype | grade), rows II, III, IV (TCGA-like: grade IV is GBM, mostly IDH-wildtype)
SUBTYPE_GIVEN_GRADE = np.array(
    [
        [0.38, 0.35, 0.19, 0.08, 0.00, 0.00],
        [0.27, 0.33, 0.20, 0.20, 0.00, 0.00],
        [0.00, 0.00, 0.00, 0.00, 0.10, 0.90],
    ]
)
SUBTYPE_LABELS = (
    "oligodendroglioma, IDH-mut, 1p/19q-codel", "astrocytoma, IDH-mut", "oligoastrocytoma, IDH-mut",
    "astrocytoma, IDH-wt", "glioblastoma, IDH-mut", "glioblastoma, IDH-wt",
)  # fmt: skip
IDH_MUTANT = np.array([1, 1, 1, 0, 1, 0])
CODELETED = np.array([1, 0, 0, 0, 0, 0])
OLIGO_LINEAGE = np.array([1.0, 0.0, 0.5, 0.0, 0.0, 0.0])  # oligodendroglial component of the histology
GRADE_EFFECT = np.array([-1.0, 0.0, 1.2])  # aggressiveness by grade
SUBTYPE_EFFECT = np.array([-0.5, 0.0, -0.2, 0.8, -0.4, 0.3])  # IDH-wt lower grade behaves like GBM
AGE_MEAN = np.array([43.0, 38.0, 41.0, 50.0, 40.0, 60.0])
AGE_SD, AGE_EFFECT_PER_DECADE = 12.0, 0.15
AGGR_CENTRE = 0.4  # about the cohort mean of aggressiveness: the Weibull scale refers to it
WEIBULL_SCALE_MONTHS, WEIBULL_SHAPE = 45.0, 1.2  # medians ~ 11 y (II), 4 y (III), 13 mo (IV GBM)

PROGRAMS = ("normal_brain", "tumour_cellular", "necrosis", "microvascular_proliferation", "inflammation", "haemorrhage")
NECROSIS, TUMOUR, MVP = 2, 1, 3
# P(program | grade): rows II, III, IV
PROGRAM_GIVEN_GRADE = np.array(
    [
        [0.45, 0.38, 0.005, 0.01, 0.10, 0.055],
        [0.25, 0.55, 0.03, 0.05, 0.08, 0.04],
        [0.10, 0.45, 0.20, 0.13, 0.06, 0.06],
    ]
)
PROGRAM_TILT = np.array([-0.5, 0.3, 0.5, 0.5, 0.0, 0.0])  # log-proportion per unit aggressiveness beyond grade
DIRICHLET_CONCENTRATION = 20.0
ATYPIA = {"density": 0.35, "radius": 0.12, "cv": 0.4}  # log-multipliers per unit aggressiveness (x h)
# per program: nuclei per (128 um)^2 field, nuclear radius (um), radius CV, haematoxylin OD, eosin OD
MORPHOLOGY = {
    "normal_brain": (14, 3.0, 0.08, 1.0, 0.28),
    "tumour_cellular": (55, 4.2, 0.15, 1.15, 0.34),
    "necrosis": (10, 0.8, 0.3, 0.9, 0.52),  # karyorrhectic debris only
    "microvascular_proliferation": (30, 4.2, 0.15, 1.15, 0.36),
    "inflammation": (60, 2.4, 0.05, 1.5, 0.30),  # lymphocytes (+ a few tumour cells)
    "haemorrhage": (4, 4.2, 0.15, 1.15, 0.30),  # + ~110 red cells
}

GENE_GROUPS = (
    "tumour_suppression", "oncogenesis", "protein_kinases",
    "cellular_differentiation", "transcription", "cytokines_growth",
)  # fmt: skip
GENE_PREFIX = ("TSUP", "ONCO", "KIN", "DIFF", "TXN", "CYTO")
FACTORS = ("grade", "aggressiveness_beyond_grade", "idh_mutant", "codeletion", "oligo_lineage")
# log2 expression change per unit factor, by group (rows) and factor (columns)
GROUP_LOADINGS = np.array(
    [
        [-0.5, -0.3, 0.3, 0.0, 0.0],
        [0.5, 0.4, -0.4, 0.0, 0.0],
        [0.3, 0.2, -0.6, -0.2, 0.0],
        [-0.4, 0.0, 0.3, 0.4, 0.7],
        [0.2, 0.0, 0.6, -0.5, 0.0],
        [0.7, 0.4, -0.2, 0.0, -0.2],
    ]
)
GROUP_ACTIVITY_SD = 0.35  # per-subject pathway activity unrelated to the labels (log2)

# stain optical-density vectors (Ruifrok & Johnston haematoxylin, Macenko eosin); rows H, E, residual
_H_VEC = np.array([0.650, 0.704, 0.286])
_E_VEC = np.array([0.216, 0.801, 0.558])
_STAINS = np.stack([v / np.linalg.norm(v) for v in (_H_VEC, _E_VEC, np.cross(_H_VEC, _E_VEC))])
_UNMIX = np.linalg.inv(_STAINS)
NUCLEAR_OD_THRESHOLD = 0.45  # haematoxylin density above which a pixel counts as nuclear


@dataclass(frozen=True, kw_only=True)
class Knobs(CohortKnobs):
    """Knobs of the glioma cohort (keyword-only overrides: ``Glioma("quick", genomic_signal=0)``)."""

    n_subjects: int = 400  # subjects (one slide + one RNA profile each)
    grade_prevalence: tuple[float, float, float] = (0.26, 0.25, 0.49)  # share of grade II, III, IV
    histology_signal: float = 1.0  # h: how strongly grade/subtype/aggressiveness shape the slides (0 = none)
    genomic_signal: float = 1.0  # scale of the RNA loadings on grade/subtype factors (0 = none)
    survival_effect: float = 1.0  # log hazard ratio per unit aggressiveness (0 = survival is noise)
    aggressiveness_sd: float = 0.6  # within grade/subtype spread of aggressiveness (its units)
    bag_size_median: int = 150  # median patches per slide bag
    bag_size_range: tuple[int, int] = (50, 400)  # min, max patches per bag
    feature_dim: int = 64  # d of the patch feature vectors (public code: 512)
    feature_noise_sd: float = 1.5  # per-patch feature noise (feature units)
    png_per_subject: int = 12  # rendered H&E patches per subject (a subset of the bag)
    png_size: int = 64  # PNG side (pixels)
    field_of_view_um: float = 128.0  # side of one patch (micrometres)
    genes_per_group: tuple[int, ...] = (24, 24, 24, 24, 24, 24)  # genes in each of the 6 functional groups
    noise_sd: float = 0.7  # per-gene RNA measurement noise (log2 units)
    n_sites: int = 6  # tissue source sites (batches)
    site_shift: float = 0.3  # batch effect scale: RNA shift SD (log2), stain and feature offsets
    follow_up_months: float = 180.0  # longest follow-up (staggered entry: uniform 3..this)
    censoring: float = 0.03  # loss-to-follow-up rate (per year)
    n_folds: int = 5  # cross-validation folds (stratified by grade and event)


PRESETS = presets = ProfileSet(
    smoke=Knobs(
        name="smoke", n_subjects=30, bag_size_median=40, bag_size_range=(20, 60), feature_dim=32,
        png_per_subject=6, genes_per_group=(6, 6, 6, 6, 6, 6),
    ),
    quick=Knobs(name="quick", png_per_subject=8),
    # the public code's MCAT signature sizes; 512-d features like its foundation-model patches
    full=Knobs(
        name="full", n_subjects=1000, bag_size_median=1500, bag_size_range=(1000, 4000), feature_dim=512,
        png_per_subject=16, png_size=224, genes_per_group=(84, 314, 498, 331, 1237, 428),
    ),
)  # fmt: skip


# --------------------------------------------------------------------------- H&E rendering


def _stamp(
    canvas: np.ndarray, cx: ArrayLike, cy: ArrayLike, ra: ArrayLike, rb: ArrayLike, theta: ArrayLike, value: ArrayLike
) -> None:
    """Max-composite soft filled ellipses onto ``canvas`` (H, W); centres and radii in pixels."""
    cx, cy = np.atleast_1d(cx).astype(float), np.atleast_1d(cy).astype(float)
    if cx.size == 0:
        return
    ra, rb, theta, value = (np.broadcast_to(np.asarray(v, dtype=float), cx.shape) for v in (ra, rb, theta, value))
    half = int(np.ceil(max(ra.max(), rb.max()))) + 1
    off = np.arange(-half, half + 1)
    ix = np.round(cx).astype(int)[:, None, None] + off[None, None, :]
    iy = np.round(cy).astype(int)[:, None, None] + off[None, :, None]
    dx, dy = ix - cx[:, None, None], iy - cy[:, None, None]
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    rho = np.hypot((dx * c + dy * s) / ra[:, None, None], (-dx * s + dy * c) / rb[:, None, None])
    # signed distance to the edge in pixels, for an anti-aliased boundary
    alpha = np.clip((1 - rho) * np.minimum(ra, rb)[:, None, None] + 0.5, 0, 1) * value[:, None, None]
    ix, iy = np.broadcast_to(ix, alpha.shape), np.broadcast_to(iy, alpha.shape)
    ok = (alpha > 0) & (ix >= 0) & (ix < canvas.shape[1]) & (iy >= 0) & (iy < canvas.shape[0])
    np.maximum.at(canvas, (iy[ok], ix[ok]), alpha[ok])


def _nuclei(
    canvas: np.ndarray, rng: np.random.Generator, n: int, px: int, um: float, radius_um: float, cv: float, hema: float,
    *, halo: np.ndarray | None = None, elong: float = 0.25,
) -> None:
    """Scatter ``n`` nuclei on a (px, px) canvas of ``um`` micrometres per pixel (lognormal radii, CV ``cv``)."""
    r = radius_um * np.exp(rng.normal(0, np.sqrt(np.log1p(cv**2)), n)) / um
    r = np.maximum(r, 0.7)
    ecc = 1 + elong * rng.random(n)
    cx, cy, th = rng.uniform(0, px, n), rng.uniform(0, px, n), rng.uniform(0, np.pi, n)
    if halo is not None:  # oligodendroglial "fried egg": a clear ring around the nucleus
        _stamp(halo, cx, cy, 1.9 * r * ecc, 1.9 * r, th, 1.0)
    _stamp(canvas, cx, cy, r * ecc, r / ecc**0.5, th, hema * np.exp(rng.normal(0, 0.08, n)))


def render_he_patch(
    program: int,
    *,
    density: float,
    radius: float,
    cv: float,
    halo: bool,
    stain: tuple[float, float],
    rng: np.random.Generator,
    px: int = 64,
    fov_um: float = 128.0,
) -> np.ndarray:
    """One H&E-like patch of tissue program ``program``.

    Args:
        program: index into :data:`PROGRAMS`.
        density, radius, cv: multipliers of the program's nuclear density, radius and radius CV.
        halo: perinuclear halos around tumour cells (oligodendroglial morphology).
        stain: (haematoxylin, eosin) intensity factors of the slide's site.
        px: side in pixels; fov_um: side in micrometres.

    Returns:
        (px, px, 3) uint8 RGB.
    """
    um = fov_um / px
    area = (fov_um / 128.0) ** 2
    name = PROGRAMS[program]
    n0, r0, cv0, hema, eosin = MORPHOLOGY[name]
    H = np.zeros((px, px), np.float32)
    clear = np.zeros((px, px), np.float32)  # lumen / halo: stroma removed
    red = np.zeros((px, px), np.float32)  # red blood cells (dense eosin)
    if name == "normal_brain":  # fibrillary neuropil: texture elongated along one axis
        tex = ndimage.gaussian_filter(rng.standard_normal((px, px)).astype(np.float32), (0.5, 2.5 / um))
        tex = (tex / (tex.std() or 1.0)) * 0.05
        E = eosin + (tex.T if rng.random() < 0.5 else tex)
    else:
        E = eosin + phantoms.smooth_field((px, px), rng, max(1.5 / um, 0.6), 0.04 if name != "necrosis" else 0.07)
    tumour = MORPHOLOGY["tumour_cellular"]
    if name == "microvascular_proliferation":  # glomeruloid vessels: lumen, red cells, layered endothelium
        for _ in range(1 + min(rng.poisson(0.7), 2)):
            lumen = rng.uniform(5, 9) / um
            c = rng.uniform(0.25 * px, 0.75 * px, 2)
            _stamp(clear, c[0], c[1], lumen, lumen, 0.0, 1.0)
            n_red = rng.poisson(2)
            rx, ry = c[0] + rng.normal(0, lumen / 3, n_red), c[1] + rng.normal(0, lumen / 3, n_red)
            _stamp(red, rx, ry, 3.2 / um, 3.2 / um, 0.0, 1.0)
            for layer in (2.5, 7.0):
                ring = lumen + layer / um
                m = max(int(2 * np.pi * ring * um / 6.0), 6)
                ang = np.sort(rng.uniform(0, 2 * np.pi, m))
                rr = ring + rng.normal(0, 0.8 / um, m)
                rad = np.maximum(4.0 * radius / um, 0.8)
                ex, ey = c[0] + rr * np.cos(ang), c[1] + rr * np.sin(ang)
                _stamp(H, ex, ey, rad, max(1.8 / um, 0.7), ang + np.pi / 2, 1.2)  # tangential endothelial nuclei
    if name == "haemorrhage":
        n_red = rng.poisson(110 * area)
        rx, ry, th = rng.uniform(0, px, n_red), rng.uniform(0, px, n_red), rng.uniform(0, np.pi, n_red)
        _stamp(red, rx, ry, 3.6 / um, 3.4 / um, th, 1.0)
    if name == "inflammation":  # a few tumour cells among the lymphocytes
        _nuclei(H, rng, rng.poisson(10 * area * density), px, um, tumour[1] * radius, tumour[2] * cv, tumour[3])
    if name in ("normal_brain", "necrosis", "inflammation"):
        _nuclei(H, rng, rng.poisson(n0 * area), px, um, r0, cv0, hema, elong=0.1)
    else:  # tumour cells (their density and shape carry the subject's atypia)
        _nuclei(H, rng, rng.poisson(n0 * area * density), px, um, r0 * radius, cv0 * cv, hema,
                halo=clear if halo else None)  # fmt: skip
    H *= 1 + 0.15 * rng.standard_normal((px, px)).astype(np.float32)  # chromatin texture
    E = np.maximum(E * (1 - 0.85 * clear), 1.1 * red)
    H, E = ndimage.gaussian_filter(H, 0.5), ndimage.gaussian_filter(E, 0.5)
    od = H[..., None] * (_STAINS[0] * stain[0]) + E[..., None] * (_STAINS[1] * stain[1])
    rgb = 255.0 * np.exp(-od) + rng.normal(0, 2.0, od.shape)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def nuclear_measures(rgb: np.ndarray) -> tuple[float, np.ndarray]:
    """Colour-deconvolve an H&E patch and find its nuclei.

    Args:
        rgb: (H, W, 3) uint8.

    Returns:
        (fraction of nuclear pixels, (n_nuclei,) nucleus areas in pixels) where nuclei are
        connected components of haematoxylin density > :data:`NUCLEAR_OD_THRESHOLD`.
    """
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    hema = od @ _UNMIX[:, 0]
    mask = hema > NUCLEAR_OD_THRESHOLD
    labels, n = ndimage.label(mask)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return float(mask.mean()), areas


# --------------------------------------------------------------------------- the generator


def _quota(rng: np.random.Generator, n: int, probs) -> np.ndarray:
    """``n`` labels with counts as close to ``n * probs`` as possible, in random order."""
    p = np.asarray(probs, dtype=float) / np.sum(probs)
    counts = np.floor(n * p).astype(int)
    frac = n * p - counts
    counts[np.lexsort((rng.random(len(p)), -frac))[: n - counts.sum()]] += 1
    return rng.permutation(np.repeat(np.arange(len(p)), counts))


class Glioma(CohortGenerator):
    """TCGA GBM-LGG-like cohort for P5: slide bags (features + PNG patches), RNA, grade, subtype, survival."""

    name = "glioma"
    paper = "P5"
    description = (
        "Glioma: WSI patch-feature bags + H&E patches + grouped RNA; grade, subtype, survival (TCGA GBM-LGG stand-in)"
    )
    presets = PRESETS

    def _genes(self) -> tuple[list[str], list[str]]:
        """Synthetic gene names (``ONCO0001``, ...) and the functional group of each."""
        names, groups = [], []
        for g, (group, prefix) in enumerate(zip(GENE_GROUPS, GENE_PREFIX, strict=True)):
            names += [f"{prefix}{i + 1:04d}" for i in range(self.knobs.genes_per_group[g])]
            groups += [group] * self.knobs.genes_per_group[g]
        return names, groups

    def plan(self, rng: np.random.Generator) -> CohortPlan:
        """Latents, labels, survival, tissue-program mixtures, folds and the RNA table of all subjects.

        Also draws the cohort-level feature projection, site offsets and stain factors that
        :meth:`render_subject` uses (kept on the instance; the engine forks workers after this).
        """
        k = self.knobs
        if len(k.genes_per_group) != len(GENE_GROUPS):
            raise ValueError(f"genes_per_group needs {len(GENE_GROUPS)} sizes, got {k.genes_per_group}")
        n, h = k.n_subjects, k.histology_signal
        grade = _quota(rng, n, k.grade_prevalence)
        subtype = np.array([rng.choice(len(SUBTYPES), p=SUBTYPE_GIVEN_GRADE[g]) for g in grade])
        age = np.clip(rng.normal(AGE_MEAN[subtype], AGE_SD), 18, 89).round(0)
        aggr = GRADE_EFFECT[grade] + SUBTYPE_EFFECT[subtype] + AGE_EFFECT_PER_DECADE * (age - 50) / 10
        aggr = aggr + k.aggressiveness_sd * rng.standard_normal(n)

        t_event = phantoms.weibull_ph_times(
            k.survival_effect * (aggr - AGGR_CENTRE), rng, scale=WEIBULL_SCALE_MONTHS, shape=WEIBULL_SHAPE
        )
        t_censor = rng.uniform(3.0, k.follow_up_months, n)
        if k.censoring > 0:
            t_censor = np.minimum(t_censor, rng.exponential(12.0 / k.censoring, n))
        death = (t_event <= t_censor).astype(int)
        time = np.maximum(np.minimum(t_event, t_censor), 0.1).round(2)

        # tissue-program mixture: tempered between the pooled and the grade-specific mixture
        pooled = np.asarray(k.grade_prevalence) / np.sum(k.grade_prevalence) @ PROGRAM_GIVEN_GRADE
        logp = np.log(pooled) + h * (np.log(PROGRAM_GIVEN_GRADE[grade]) - np.log(pooled))
        logp = logp + h * np.outer(aggr - GRADE_EFFECT[grade], PROGRAM_TILT)
        p = np.exp(logp - logp.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        props = rng.gamma(DIRICHLET_CONCENTRATION * p) + 1e-9
        props /= props.sum(axis=1, keepdims=True)
        lo, hi = k.bag_size_range
        n_patches = np.clip(np.round(k.bag_size_median * np.exp(0.5 * rng.standard_normal(n))), lo, hi).astype(int)

        site = rng.integers(0, k.n_sites, n)
        sex = np.where(rng.random(n) < 0.58, "M", "F")
        # folds stratified by grade and event: consecutive runs of one stratum cover every fold
        order = np.lexsort((rng.random(n), death, grade))
        fold = np.empty(n, dtype=int)
        fold[order] = np.arange(n) % k.n_folds

        # cohort-level parameters used while rendering (kept on the instance: workers are forked after plan)
        m = len(PROGRAMS) + 4
        self._world = {
            "projection": rng.standard_normal((m, k.feature_dim)),
            "site_feature_offset": 0.5 * rng.standard_normal((k.n_sites, k.feature_dim)),
            # haematoxylin and eosin intensity per site: exp(0.5 site_shift z), +-15% at site_shift 0.3
            "site_stain": np.exp(0.5 * k.site_shift * rng.standard_normal((k.n_sites, 2))),
        }

        # RNA
        genes, gene_group = self._genes()
        gidx = np.array([GENE_GROUPS.index(g) for g in gene_group])
        n_genes = len(genes)
        loadings = GROUP_LOADINGS[gidx] * rng.uniform(0.5, 1.5, (n_genes, len(FACTORS)))
        loadings = loadings + 0.1 * rng.standard_normal((n_genes, len(FACTORS)))
        base = np.clip(rng.normal(6.0, 1.5, n_genes), 2.0, None)
        batch = rng.standard_normal((k.n_sites, n_genes))
        factors = np.column_stack(
            [grade - 1.0, aggr - GRADE_EFFECT[grade] - AGGR_CENTRE, IDH_MUTANT[subtype] - 0.5,
             CODELETED[subtype] - 0.5, OLIGO_LINEAGE[subtype]]
        )  # fmt: skip
        activity = GROUP_ACTIVITY_SD * rng.standard_normal((n, len(GENE_GROUPS)))
        expr = base + k.genomic_signal * factors @ loadings.T + activity[:, gidx]
        expr = expr + k.site_shift * batch[site] + k.noise_sd * rng.standard_normal((n, n_genes))
        expr = np.clip(expr, 0.0, None).round(3)

        width = max(4, len(str(n)))
        ids = [f"sub-{i + 1:0{width}d}" for i in range(n)]
        subjects = pd.DataFrame(
            {
                "subject_id": ids,
                "age": age,
                "sex": sex,
                "site": [f"TSS-{s + 1:02d}" for s in site],
                "grade": [GRADES[g] for g in grade],
                "subtype": [SUBTYPES[s] for s in subtype],
                "survival_months": time,
                "death": death,
                "fold": fold,
                "n_patches": n_patches,
                # latents
                "idh_mutant": IDH_MUTANT[subtype],
                "codeleted": CODELETED[subtype],
                "oligo_lineage": OLIGO_LINEAGE[subtype],
                "aggressiveness": aggr.round(4),
                "event_time_months": t_event.round(2),
                "censor_time_months": t_censor.round(2),
                **{f"prop_{name}": props[:, j].round(4) for j, name in enumerate(PROGRAMS)},
            }
        )
        rna = pd.DataFrame(expr, columns=genes)
        rna.insert(0, "subject_id", ids)
        truth = self._truth(genes, gene_group, loadings, base, batch, pooled)
        return CohortPlan(subjects=subjects, truth=truth, tables={"rna": rna})

    def _truth(self, genes, gene_group, loadings, base, batch, pooled) -> dict[str, Any]:
        k, w = self.knobs, self._world
        morph_keys = ("nuclei_per_128um_field", "radius_um", "radius_cv", "haematoxylin_od", "eosin_od")
        return {
            "grades": list(GRADES),
            "subtypes": {
                s: {"idh_mutant": int(IDH_MUTANT[i]), "codeleted": int(CODELETED[i]),
                    "oligo_lineage": float(OLIGO_LINEAGE[i]), "aggressiveness_effect": float(SUBTYPE_EFFECT[i]),
                    "p_given_grade": dict(zip(GRADES, SUBTYPE_GIVEN_GRADE[:, i].tolist(), strict=True))}
                for i, s in enumerate(SUBTYPES)
            },  # fmt: skip
            "aggressiveness": {
                "formula": "a = grade_effect[grade] + subtype_effect[subtype] + 0.15 (age - 50) / 10"
                " + aggressiveness_sd N(0,1)",
                "grade_effect": dict(zip(GRADES, GRADE_EFFECT.tolist(), strict=True)),
                "age_effect_per_decade": AGE_EFFECT_PER_DECADE,
                "age_mean_by_subtype": dict(zip(SUBTYPES, AGE_MEAN.tolist(), strict=True)),
            },
            "survival": {
                "formula": "Weibull PH: h(t) = h0(t) exp(survival_effect (a - 0.4)); observed = min(event, censor)",
                "log_hazard_ratio_per_unit_aggressiveness": k.survival_effect,
                "weibull_scale_months": WEIBULL_SCALE_MONTHS,
                "weibull_shape": WEIBULL_SHAPE,
                "censoring": "min(uniform(3, follow_up_months), exponential(12 / censoring months))",
            },
            "tissue_programs": {
                "programs": list(PROGRAMS),
                "p_given_grade": {g: PROGRAM_GIVEN_GRADE[i].tolist() for i, g in enumerate(GRADES)},
                "p_pooled": pooled.round(5).tolist(),
                "tilt_per_unit_aggressiveness_beyond_grade": PROGRAM_TILT.tolist(),
                "dirichlet_concentration": DIRICHLET_CONCENTRATION,
                "formula": "log p = log p_pooled + h (log p_grade - log p_pooled) + h tilt (a - grade_effect);"
                " props ~ Dirichlet(20 p); h = histology_signal; each patch's program ~ Categorical(props)",
                "atypia_log_multipliers_per_unit_a": ATYPIA,
                "atypia_formula": "tumour/vascular patches: density x exp(0.35 h (a-0.4) + 0.15 N), radius x"
                " exp(0.12 h (a-0.4) + 0.05 N), radius CV x exp(0.4 h (a-0.4)); tumour patches of an"
                " oligodendroglial subtype: halo with probability 0.85 min(h, 1) lineage",
                "morphology_per_program": {p: dict(zip(morph_keys, v, strict=True)) for p, v in MORPHOLOGY.items()},
                "per_patch_assignments": "truth/<subject>_programs.npy: uint8 program index per bag row;"
                " patches/<subject>/pNNNN.png renders bag row NNNN",
            },
            "patch_features": {
                "formula": "x = u P + site_shift o_site + feature_noise_sd N(0, I);"
                " u = [2 onehot(program), log density, 3 log radius, log cv, halo]",
                "projection_P": np.round(w["projection"], 4).tolist(),
                "site_offset_o": np.round(w["site_feature_offset"], 4).tolist(),
            },
            "site_stain_factors_HE": np.round(w["site_stain"], 4).tolist(),
            "rna": {
                "formula": "expr = base + genomic_signal loadings . factors + group_activity"
                " + site_shift batch[site] + noise_sd N(0,1), clipped at 0; log2(TPM+1)",
                "factors": list(FACTORS),
                "factor_coding": "grade: II=-1, III=0, IV=1; aggressiveness beyond grade: a - grade_effect - 0.4;"
                " idh_mutant, codeletion: +-0.5; oligo_lineage: 0..1",
                "group_loadings": {
                    g: dict(zip(FACTORS, GROUP_LOADINGS[i].tolist(), strict=True)) for i, g in enumerate(GENE_GROUPS)
                },
                "group_activity_sd": GROUP_ACTIVITY_SD,
                "gene_groups": dict(zip(genes, gene_group, strict=True)),
                "gene_loadings": {gname: np.round(loadings[i], 4).tolist() for i, gname in enumerate(genes)},
                "gene_base": dict(zip(genes, np.round(base, 4).tolist(), strict=True)),
                "site_batch_unit": {f"TSS-{s + 1:02d}": np.round(batch[s], 3).tolist() for s in range(k.n_sites)},
            },
        }

    def render_subject(self, subject: dict[str, Any], rng: np.random.Generator, files: SubjectFiles) -> dict[str, Any]:
        """Draw the bag's per-patch programs and morphology; write features, assignments and PNGs.

        Returns:
            the modality paths (``wsi_features``, ``he_patches``), the latent ``programs_file``
            and the realised share of each program in the bag (``bag_frac_<program>``).
        """
        k, w = self.knobs, getattr(self, "_world", None)
        if w is None:
            raise RuntimeError("Glioma.render_subject needs plan() to have run first (it draws the projection)")
        sid, h = subject["subject_id"], k.histology_signal
        n = int(subject["n_patches"])
        site = int(subject["site"].split("-")[1]) - 1
        props = np.array([subject[f"prop_{p}"] for p in PROGRAMS], dtype=float)
        programs = rng.choice(len(PROGRAMS), size=n, p=props / props.sum())
        atypical = (programs == TUMOUR) | (programs == MVP)
        s = h * (subject["aggressiveness"] - AGGR_CENTRE)
        density = np.exp(0.15 * rng.standard_normal(n) + atypical * ATYPIA["density"] * s)
        radius = np.exp(0.05 * rng.standard_normal(n) + atypical * ATYPIA["radius"] * s)
        cv = np.exp(atypical * ATYPIA["cv"] * s)
        lineage = OLIGO_LINEAGE[SUBTYPES.index(subject["subtype"])]
        halo = (programs == TUMOUR) & (rng.random(n) < 0.85 * min(h, 1.0) * lineage)
        onehot = np.eye(len(PROGRAMS))[programs]
        u = np.column_stack([2.0 * onehot, np.log(density), 3 * np.log(radius), np.log(cv), halo])
        x = u @ w["projection"] + k.site_shift * w["site_feature_offset"][site]
        x = x + k.feature_noise_sd * rng.standard_normal(x.shape)
        out = {
            "wsi_features": files.npy(f"features/{sid}.npy", x.astype(np.float16)),
            "programs_file": files.npy(f"truth/{sid}_programs.npy", programs.astype(np.uint8)),
            "he_patches": f"patches/{sid}",
        }
        stain = tuple(w["site_stain"][site])
        for j in np.sort(rng.choice(n, size=min(k.png_per_subject, n), replace=False)):
            img = render_he_patch(
                int(programs[j]), density=density[j], radius=radius[j], cv=cv[j], halo=bool(halo[j]),
                stain=stain, rng=rng, px=k.png_size, fov_um=k.field_of_view_um,
            )  # fmt: skip
            files.png(f"patches/{sid}/p{j:04d}.png", img)
        counts = np.bincount(programs, minlength=len(PROGRAMS))
        out.update({f"bag_frac_{p}": round(float(c) / n, 4) for p, c in zip(PROGRAMS, counts, strict=True)})
        return out

    def manifest(self) -> Manifest:
        """Subject table, two slide modalities, the wide RNA table, labels, survival, folds and sites."""
        k = self.knobs
        genes, gene_group = self._genes()
        return Manifest(
            name=self.name,
            description=self.description,
            columns=[
                Column(name="age", dtype="float", unit="years", min=18, max=90, description="age at diagnosis"),
                Column(name="sex", dtype="category", categories=["F", "M"]),
                Column(name="site", dtype="category", categories=[f"TSS-{s + 1:02d}" for s in range(k.n_sites)],
                       description="tissue source site (batch)"),  # fmt: skip
                Column(name="grade", dtype="category", categories=list(GRADES), description="WHO grade"),
                Column(name="subtype", dtype="category", categories=list(SUBTYPES),
                       description="histology x IDH x 1p/19q class (6 classes)"),  # fmt: skip
                Column(name="survival_months", dtype="float", unit="months", min=0,
                       description="overall survival or censoring time"),
                Column(name="death", dtype="int", min=0, max=1, description="1 = death observed, 0 = censored"),
                Column(name="fold", dtype="int", min=0, max=k.n_folds - 1,
                       description="cross-validation fold (stratified by grade and event)"),
                Column(name="n_patches", dtype="int", unit="patches", min=1, description="rows of the feature bag"),
            ],
            modalities=[
                Modality(name="wsi_features", column="wsi_features", format="npy",
                         description=f"float16 (n_patches, {k.feature_dim}) patch feature bag of the slide"),
                Modality(name="he_patches", column="he_patches", format="directory",
                         description=f"{k.png_size}x{k.png_size} RGB H&E patches pNNNN.png (NNNN: row of the bag)"),
            ],  # fmt: skip
            labels=["grade", "subtype"],
            survival=Survival(time="survival_months", event="death", unit="months"),
            split_column="fold",
            site_column="site",
            tables=[
                LongTable(
                    name="rna",
                    path="rna_expression.csv",
                    columns=[
                        Column(name=g, dtype="float", unit="log2(TPM+1)", min=0, description=f"group: {grp}")
                        for g, grp in zip(genes, gene_group, strict=True)
                    ],
                    description="bulk RNA, one row per subject; each gene's functional group is in its description",
                )
            ],
            truth="truth.json",
        )


# --------------------------------------------------------------------------- tour and checks


def gene_groups(cohort: Cohort) -> pd.Series:
    """Gene -> functional group, read from the ``rna`` table's column descriptions ("group: X")."""
    table = next(t for t in cohort.manifest.tables if t.name == "rna")
    return pd.Series({c.name: c.description.split("group:")[-1].strip() for c in table.columns}, name="group")


def _group_scores(cohort: Cohort) -> pd.DataFrame:
    """(subjects, 6) mean z-score of each gene group, indexed like ``cohort.subjects``."""
    rna = cohort.tables["rna"].set_index("subject_id").loc[cohort.subjects["subject_id"]]
    groups = gene_groups(cohort)
    x = rna[groups.index].astype(float)
    z = (x - x.mean()) / x.std(ddof=0).replace(0, 1)
    return z.T.groupby(groups).mean().T.reindex(columns=[g for g in GENE_GROUPS if g in set(groups)])


def _subject_pngs(cohort: Cohort) -> list[list[Path]]:
    return [sorted(p.glob("p*.png")) for p in cohort.paths("he_patches")]


def _png_program(path: Path, programs: np.ndarray) -> int:
    """The true program of PNG ``pNNNN.png``: row NNNN of the subject's per-patch assignments."""
    return int(programs[int(path.stem[1:])])


def tour_figures(cohort: Cohort) -> dict[str, Any]:
    """Figures of the data tour: H&E mosaic by grade, gene-group heatmap, program mix, Kaplan-Meier."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from PIL import Image
    from sksurv.nonparametric import kaplan_meier_estimator

    sub = cohort.subjects
    lat = cohort.latents().set_index("subject_id").loc[sub["subject_id"]]
    figs: dict[str, Any] = {}

    # 1. mosaic: per grade, patches of different programs from different subjects
    n_cols = 8
    fig, axes = plt.subplots(3, n_cols, figsize=(14, 6.2), squeeze=False)
    pngs = _subject_pngs(cohort)
    for r, g in enumerate(GRADES):
        # candidates from up to 40 subjects; one per program first, then fill with the rest
        cands = []
        for i in np.flatnonzero((sub["grade"] == g).to_numpy())[:40]:
            progs = np.load(cohort.root / lat["programs_file"].iloc[i])
            cands += [(rank, path, _png_program(path, progs)) for rank, path in enumerate(pngs[i])]
        cands.sort(key=lambda c: c[0])
        picks, seen = [], set()
        for _, path, prog in cands:
            if prog not in seen:
                picks.append((path, prog))
                seen.add(prog)
        picks += [(path, prog) for _, path, prog in cands if (path, prog) not in picks][: n_cols - len(picks)]
        picks = sorted(picks[:n_cols], key=lambda c: c[1])
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if c < len(picks):
                path, prog = picks[c]
                ax.imshow(np.asarray(Image.open(path)))
                ax.set_title(PROGRAMS[prog].replace("_", " ").replace("microvascular proliferation", "MVP"), fontsize=9)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(f"grade {g}", fontsize=12)
    fig.suptitle("Generated H&E patches by WHO grade (tile title = true tissue program)")
    fig.tight_layout()
    figs["histology_mosaic"] = fig

    # 2. gene-group heatmap, subjects sorted by subtype then grade
    scores = _group_scores(cohort)
    order = np.lexsort((sub["grade"].cat.codes.to_numpy(), sub["subtype"].cat.codes.to_numpy()))
    fig, (ax_bar, ax) = plt.subplots(2, 1, figsize=(14, 5.5), gridspec_kw={"height_ratios": [1, 7]}, sharex=True)
    palette = plt.get_cmap("tab10").colors[: len(SUBTYPES)]
    codes = sub["subtype"].cat.codes.to_numpy()[order]
    ax_bar.imshow(codes[None, :], aspect="auto", cmap=ListedColormap(palette), vmin=-0.5, vmax=len(SUBTYPES) - 0.5,
                  interpolation="nearest")  # fmt: skip
    ax_bar.set_yticks([]), ax_bar.set_ylabel("subtype", rotation=0, ha="right", va="center")
    ax_bar.legend(handles=[Patch(color=palette[i], label=lab) for i, lab in enumerate(SUBTYPE_LABELS)],
                  ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.05), fontsize=9, frameon=False)  # fmt: skip
    im = ax.imshow(
        scores.to_numpy()[order].T, aspect="auto", cmap="RdBu_r", vmin=-1.5, vmax=1.5, interpolation="nearest"
    )
    ax.set_yticks(range(scores.shape[1]), [c.replace("_", " ") for c in scores.columns])
    ax.set_xlabel(f"subjects (n = {len(sub)}), sorted by subtype then grade")
    fig.colorbar(im, ax=[ax_bar, ax], label="mean z-score of the group's genes", fraction=0.025, pad=0.01)
    fig.suptitle("RNA: functional gene-group scores by molecular subtype", y=1.02)
    figs["gene_group_heatmap"] = fig

    # 3. tissue-program proportions by grade (from the true per-patch assignments)
    fracs = lat[[f"bag_frac_{p}" for p in PROGRAMS]].astype(float).groupby(sub["grade"].to_numpy()).mean()
    fracs = fracs.reindex(list(GRADES)).fillna(0.0)
    fig, ax = plt.subplots(figsize=(9, 5))
    bottom = np.zeros(len(GRADES))
    colours = ["#d9c7d9", "#6a51a3", "#f4a582", "#b2182b", "#4393c3", "#d6604d"]
    for j, p in enumerate(PROGRAMS):
        ax.bar(list(GRADES), fracs.iloc[:, j], bottom=bottom, color=colours[j], label=p.replace("_", " "))
        bottom += fracs.iloc[:, j].to_numpy()
    counts = sub["grade"].value_counts()
    ax.set_xticks(range(len(GRADES)), [f"grade {g}\n(n = {counts.get(g, 0)})" for g in GRADES])
    ax.set_ylabel("mean share of the bag's patches"), ax.set_ylim(0, 1)
    ax.legend(title="tissue program", bbox_to_anchor=(1.02, 1), loc="upper left")
    ax.set_title("Slide composition by grade (true patch assignments)")
    fig.tight_layout()
    figs["tissue_programs_by_grade"] = fig

    # 4. Kaplan-Meier by grade
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for g, colour in zip(GRADES, ["#1b9e77", "#d95f02", "#7570b3"], strict=True):
        m = (sub["grade"] == g).to_numpy()
        if m.sum() < 2:
            continue
        event, time = sub["death"].to_numpy()[m].astype(bool), sub["survival_months"].to_numpy()[m].astype(float)
        t, s = kaplan_meier_estimator(event, time)
        ax.step(np.r_[0, t], np.r_[1, s], where="post", color=colour,
                label=f"grade {g} (n = {m.sum()}, deaths = {int(event.sum())})")  # fmt: skip
        cens = time[~event]  # censoring ticks on the curve
        ax.plot(cens, s[np.searchsorted(t, cens, side="right") - 1], "|", color=colour, markersize=7, alpha=0.7)
    ax.set_xlabel("months since diagnosis"), ax.set_ylabel("overall survival probability"), ax.set_ylim(0, 1.02)
    ax.legend(loc="upper right"), ax.grid(alpha=0.3)
    ax.set_title("Kaplan-Meier overall survival by WHO grade (| = censored)")
    fig.tight_layout()
    figs["km_by_grade"] = fig
    return figs


def _auc_null_se(y: np.ndarray) -> float:
    """Mean over classes of the Hanley-McNeil standard error of a one-vs-rest AUC of 0.5."""
    se = []
    for c in np.unique(y):
        n1, n0 = int((y == c).sum()), int((y != c).sum())
        if n1 and n0:
            se.append(np.sqrt((n1 + n0 + 1) / (12.0 * n1 * n0)))
    return float(np.mean(se)) if se else float("nan")


def _cv_auc(x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> tuple[float, float]:
    """Macro one-vs-rest ROC-AUC of logistic regression predicted on the held-out folds, and its null SE."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import PredefinedSplit, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    keep = np.isin(y, [c for c in np.unique(y) if (y == c).sum() >= 2])  # a singleton class cannot be scored
    x, y, folds = x[keep], y[keep], folds[keep]
    classes = np.unique(y)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    proba = cross_val_predict(model, x, y, cv=PredefinedSplit(folds), method="predict_proba")
    auc = roc_auc_score(y, proba[:, 1] if len(classes) == 2 else proba, multi_class="ovr", labels=classes)
    return float(auc), _auc_null_se(y)


def _png_nuclear_stats(cohort: Cohort) -> tuple[np.ndarray, np.ndarray]:
    """Per subject: mean nuclear-pixel fraction of its PNGs and SD of nuclear equivalent diameter (px)."""
    from PIL import Image

    density, spread = [], []
    for paths in _subject_pngs(cohort):
        fracs, areas = zip(*(nuclear_measures(np.asarray(Image.open(p).convert("RGB"))) for p in paths), strict=True)
        a = np.concatenate(areas)
        a = a[a >= 2]  # single pixels are debris or noise, not nuclei
        density.append(np.mean(fracs))
        spread.append(np.std(np.sqrt(a)) if a.size > 1 else 0.0)
    return np.asarray(density), np.asarray(spread)


def planted_effect_checks(cohort: Cohort) -> pd.DataFrame:
    """One row per planted effect, measured from the files on disk (or the truth, as stated).

    ``present`` is one-sided: ``value > chance + margin`` with margin = max(floor, 3 null SE):
    for AUC and c-index the Hanley-McNeil SE of an AUC of 0.5 (c-index: deaths vs the rest),
    floor 0.05; for Spearman rho 1/sqrt(n - 1), floor 0.1. Classifiers are scored on the
    held-out folds of the cohort's own ``fold`` column, so a signal-free cohort scores about
    chance. The extra column ``knob`` names the knob that switches the effect off.
    """
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    from mmlib.data.readers import read_feature_bag
    from mmlib.metrics import concordance_index

    sub = cohort.subjects
    lat = cohort.latents().set_index("subject_id").loc[sub["subject_id"]]
    folds = sub["fold"].to_numpy(dtype=int)
    grade, subtype = sub["grade"].cat.codes.to_numpy(), sub["subtype"].cat.codes.to_numpy()
    rows: list[dict[str, Any]] = []

    def add(effect: str, measure: str, value: float, chance: float, se: float, floor: float, knob: str) -> None:
        margin = max(floor, 3 * se)
        rows.append(
            {"effect": effect, "measure": measure, "value": round(float(value), 4), "chance": chance,
             "margin": round(margin, 4), "present": bool(value > chance + margin), "knob": knob}
        )  # fmt: skip

    cv_lr = "macro one-vs-rest ROC-AUC of 5-fold CV (fold column) logistic regression on"
    pooled = np.stack([read_feature_bag(p).astype(np.float32).mean(axis=0) for p in cohort.paths("wsi_features")])
    for name, y in (("grade", grade), ("subtype", subtype)):
        auc, se = _cv_auc(pooled, y, folds)
        add(f"slide features carry {name}", f"{cv_lr} mean-pooled patch features (.npy)", auc, 0.5, se, 0.05,
            "histology_signal")  # fmt: skip

    density, spread = _png_nuclear_stats(cohort)
    se_rho = 1 / np.sqrt(max(len(sub) - 1, 1))
    add("nuclear density rises with grade", "Spearman rho(grade, mean nuclear-pixel fraction of the PNGs)",
        spearmanr(grade, density)[0], 0.0, se_rho, 0.1, "histology_signal")  # fmt: skip
    add("nuclear pleomorphism rises with grade", "Spearman rho(grade, SD of nuclear equivalent diameter in the PNGs)",
        spearmanr(grade, spread)[0], 0.0, se_rho, 0.1, "histology_signal")  # fmt: skip

    share = lat["bag_frac_necrosis"].astype(float) + lat["bag_frac_microvascular_proliferation"].astype(float)
    is_iv = (sub["grade"] == "IV").to_numpy()
    auc = roc_auc_score(is_iv, share) if 0 < is_iv.sum() < len(is_iv) else 0.5
    add("necrosis + MVP planted in grade IV", "ROC-AUC (IV vs II-III) of the bag's necrosis+MVP share (truth latents)",
        auc, 0.5, _auc_null_se(is_iv), 0.05, "histology_signal")  # fmt: skip

    scores = _group_scores(cohort).to_numpy()
    for name, y in (("grade", grade), ("subtype", subtype)):
        auc, se = _cv_auc(scores, y, folds)
        add(f"RNA gene groups carry {name}", f"{cv_lr} the 6 gene-group mean z-scores (rna_expression.csv)",
            auc, 0.5, se, 0.05, "genomic_signal")  # fmt: skip

    event, time = sub["death"].to_numpy(dtype=bool), sub["survival_months"].to_numpy(dtype=float)
    se_c = _auc_null_se(event)
    c_true = concordance_index(event, time, lat["aggressiveness"].to_numpy(float))
    add("aggressiveness drives survival", "c-index of the true aggressiveness (truth latent) on observed survival",
        c_true, 0.5, se_c, 0.05, "survival_effect")  # fmt: skip
    add("grade stratifies survival", "c-index of the observed grade on observed survival",
        concordance_index(event, time, grade.astype(float)), 0.5, se_c, 0.05, "survival_effect")  # fmt: skip
    return pd.DataFrame(rows)
