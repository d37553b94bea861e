"""P4's fusion strategies on real data: gene expression + clinical variables of 198 breast cancers.

The P4 pipeline (:mod:`mmlib.pipelines.p4`) runs on a generated CT + EHR cohort. This module runs the
same strategies (:mod:`mmlib.models.fusion`) on a real two-modality survival dataset that ships with
scikit-survival (:func:`sksurv.datasets.load_breast_cancer`; GEO GSE7390, the TRANSBIG validation
series of node-negative breast cancer, Desmedt et al., Clin Cancer Res 2007): 76 gene-expression
values (the probe sets of the 76-gene signature) are one modality, the clinical variables (age, tumour
size, oestrogen-receptor status, grade) the other; the endpoint is the time to distant metastasis.
scikit-survival's own models (ridge Cox, elastic-net Cox, random survival forest) are scored on the
same cross-validation folds, in the same table.

- :func:`load_breast_cancer_modalities` -- the two modalities as float arrays (:class:`BreastData`).
- :func:`feature_tokens` -- a (B, F) table as F feature tokens, so attention has tokens to attend over.
- :data:`STRATEGIES` -- name -> model builder (two unimodal models and six fusion models).
- :func:`breast_cancer_benchmark` -- repeated stratified K-fold cross-validation of every strategy and
  baseline on the same folds: per-fold Harrell's c-index, a summary with the paired difference against
  the best unimodal neural model, and every out-of-fold risk score (:class:`BreastResult`).
- :func:`breast_figure` -- the per-fold c-indices by model.

With 198 subjects and 51 events a test fold of a 5-fold split holds about 10 events, so one fold's
c-index has a standard error of roughly 0.05-0.08: differences of a few hundredths between models are
within noise, which is what the fold-wise SD and the win counts of the summary show.
"""

from __future__ import annotations

import time as _time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from mmlib import core, metrics
from mmlib.models.fusion import (
    CoAttentionFusion,
    ContrastiveFusion,
    CrossAttentionFusion,
    LateFusion,
    UnimodalSurvival,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "ARCH",
    "BASELINES",
    "BreastData",
    "BreastResult",
    "STRATEGIES",
    "breast_cancer_benchmark",
    "breast_figure",
    "feature_tokens",
    "load_breast_cancer_modalities",
    "standardize",
]

log = core.get_logger(__name__)

CLINICAL_SOURCE = ("age", "er", "grade", "size")
#: grade categories as the source spells them ("unkown" sic); "well differentiated" is the reference level
GRADE_LEVELS = {"intermediate": "grade_intermediate", "poorly differentiated": "grade_poorly_differentiated",
                "unkown": "grade_unknown"}
GRADE_REFERENCE = "well differentiated"
FAMILIES = ("neural unimodal", "neural fusion", "scikit-survival")


# --------------------------------------------------------------------------- data


@dataclass
class BreastData:
    """The breast-cancer cohort as two modalities plus the outcome.

    Attributes:
        genes: (N, 76) float32 log2 expression of the 76-gene signature's probe sets, raw (not
            standardised: :func:`breast_cancer_benchmark` z-scores with training-fold statistics).
        clinical: (N, k) float32, columns named in ``clinical_names`` (encoding: see
            :func:`load_breast_cancer_modalities`).
        gene_names: the probe-set column names of the source (e.g. ``"X200726_at"``).
        clinical_names: one name per clinical column.
        time: (N,) float64 time to distant metastasis or censoring, in days (``t.tdm``).
        event: (N,) bool, True = distant metastasis observed (``e.tdm``).
    """

    genes: np.ndarray
    clinical: np.ndarray
    gene_names: list[str]
    clinical_names: list[str]
    time: np.ndarray
    event: np.ndarray

    @property
    def n(self) -> int:
        """Number of subjects."""
        return int(len(self.time))

    def __post_init__(self) -> None:
        n = len(self.time)
        for name in ("genes", "clinical", "event"):
            rows = len(getattr(self, name))
            if rows != n:
                raise ValueError(f"BreastData: {name} has {rows} rows, time has {n}")
        if self.genes.shape[1] != len(self.gene_names) or self.clinical.shape[1] != len(self.clinical_names):
            raise ValueError(f"BreastData: {self.genes.shape[1]} gene columns for {len(self.gene_names)} names, "
                             f"{self.clinical.shape[1]} clinical columns for {len(self.clinical_names)} names")

    def subset(self, idx: np.ndarray) -> BreastData:
        """The rows ``idx`` (copies)."""
        idx = np.asarray(idx)
        return BreastData(self.genes[idx].copy(), self.clinical[idx].copy(), list(self.gene_names),
                          list(self.clinical_names), self.time[idx].copy(), self.event[idx].copy())


def load_breast_cancer_modalities() -> BreastData:
    """Read scikit-survival's breast-cancer data (offline, from the package) as two modalities.

    198 subjects, 51 distant metastases. Modality ``genes``: the 76 gene-expression columns as
    given (log2 scale). Modality ``clinical``, 6 columns:

    - ``age`` (years) and ``size`` (tumour size, cm): numeric, as given;
    - ``er_positive``: 1 = oestrogen-receptor positive, 0 = negative;
    - ``grade_intermediate``, ``grade_poorly_differentiated``, ``grade_unknown``: one-hot of the
      histological grade with ``"well differentiated"`` as the reference level (all three 0). The
      reference is dropped because a Cox model has no intercept: the full one-hot would sum to 1
      and be collinear. ``grade_unknown`` (the source's ``"unkown"``) has 2 subjects.

    Returns:
        :class:`BreastData` (time in days).

    Raises:
        ValueError: if the shipped table lacks a clinical column, has a category not listed above,
            or holds missing values (the data as shipped have none).
    """
    from sksurv.datasets import load_breast_cancer

    X, y = load_breast_cancer()
    missing = [c for c in CLINICAL_SOURCE if c not in X.columns]
    if missing:
        raise ValueError(f"sksurv's breast-cancer table lacks the clinical column(s) {missing}")
    gene_names = [c for c in X.columns if c not in CLINICAL_SOURCE]
    er = X["er"].astype(str)
    grade = X["grade"].astype(str)
    bad = sorted(set(er) - {"positive", "negative"}) + sorted(set(grade) - set(GRADE_LEVELS) - {GRADE_REFERENCE})
    if bad:
        raise ValueError(f"unexpected category value(s) {bad} in the columns 'er'/'grade'")
    clinical = {"age": X["age"].to_numpy(float), "size": X["size"].to_numpy(float),
                "er_positive": (er == "positive").to_numpy(float)}
    clinical.update({name: (grade == level).to_numpy(float) for level, name in GRADE_LEVELS.items()})
    genes = X[gene_names].to_numpy(dtype=np.float32)
    clin = np.column_stack(list(clinical.values())).astype(np.float32)
    if np.isnan(genes).any() or np.isnan(clin).any():
        raise ValueError("sksurv's breast-cancer table holds missing values; this loader does not impute")
    return BreastData(genes=genes, clinical=clin, gene_names=gene_names, clinical_names=list(clinical),
                      time=np.asarray(y["t.tdm"], dtype=float), event=np.asarray(y["e.tdm"], dtype=bool))


def standardize(train: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """Z-score columns with the mean and SD of ``train`` only, and apply the same map to ``others``.

    A column constant in ``train`` (e.g. a rare category absent from a fold) is centred and left
    unscaled (SD taken as 1), so it stays finite.

    Args:
        train: (N, F) training rows; the only rows the statistics come from.
        *others: (M, F) arrays (validation, test) transformed with the training statistics.

    Returns:
        ``(train_z, *others_z)`` as float32.
    """
    train = np.asarray(train, dtype=np.float64)
    if train.ndim != 2 or len(train) < 2:
        raise ValueError(f"standardize: train must be (N >= 2, F), got shape {train.shape}")
    mean = train.mean(axis=0)
    sd = train.std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    out = [((train - mean) / sd).astype(np.float32)]
    for i, x in enumerate(others):
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != train.shape[1]:
            raise ValueError(f"standardize: others[{i}] must be (M, {train.shape[1]}), got shape {x.shape}")
        out.append(((x - mean) / sd).astype(np.float32))
    return tuple(out)


# --------------------------------------------------------------------------- feature tokens and strategies


def feature_tokens(x: torch.Tensor) -> torch.Tensor:
    """A (B, F) table as F feature tokens: token f of a sample is ``value_f * e_f``, a (B, F, F) tensor.

    ``e_f`` is the f-th unit vector of R^F, so ``tokens[b, f] = x[b, f] * e_f`` (``torch.diag_embed``).
    The fusion modules project every token with one ``Linear(F, d)`` (weight W, bias b), which gives
    ``value_f * W[:, f] + b``: a learned embedding per feature, scaled by its value, plus a shared
    bias -- the numerical feature tokenizer of FT-Transformer (Gorishniy et al., 2021) without its
    per-feature bias. The feature's identity is thus carried by the direction ``W[:, f]``, and
    cross-attention can weigh individual genes or clinical variables.

    The mean of the F tokens is ``x / F``, so the pooling models (:class:`UnimodalSurvival`,
    :class:`LateFusion`, :class:`ContrastiveFusion`) see the feature vector scaled by ``1 / F``;
    their first Linear layer absorbs the scale (and Adam's steps do not depend on it).

    Args:
        x: (B, F) float tensor.

    Returns:
        (B, F, F) tensor, zero off the diagonal of each sample's (F, F) block.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 2 or x.shape[1] == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"feature_tokens: x must be a (B, F) float tensor with F >= 1, got {shape}")
    return torch.diag_embed(x)


#: architecture of every neural strategy: token width (``dim``; also the contrastive projection width),
#: risk-MLP hidden width, dropout, attention heads and the attention blocks' MLP ratio
ARCH: dict[str, Any] = {"dim": 16, "hidden": 16, "dropout": 0.2, "heads": 2, "mlp_ratio": 2}


def _unimodal(key: str) -> Callable[..., nn.Module]:
    def build(dims: Mapping[str, int], *, hidden: int = 16, dropout: float = 0.2, **_: Any) -> nn.Module:
        return UnimodalSurvival(key, dims[key], hidden=hidden, dropout=dropout)

    return build


def _late(dims: Mapping[str, int], *, hidden: int = 16, dropout: float = 0.2, **_: Any) -> nn.Module:
    """Late fusion trained end to end (the benchmark itself combines the trained unimodal models instead)."""
    return LateFusion(dims, hidden=hidden, dropout=dropout)


def _contrastive(dims: Mapping[str, int], *, dim: int = 16, hidden: int = 16, dropout: float = 0.2,
                 **_: Any) -> nn.Module:
    return ContrastiveFusion(dims, proj_dim=dim, proj_hidden=hidden, hidden=hidden, dropout=dropout)


def _cross(direction: str) -> Callable[..., nn.Module]:
    def build(dims: Mapping[str, int], *, dim: int = 16, hidden: int = 16, dropout: float = 0.2, heads: int = 2,
              mlp_ratio: int = 2, **_: Any) -> nn.Module:
        return CrossAttentionFusion(dims, dim=dim, heads=heads, direction=direction, mlp_ratio=mlp_ratio,
                                    hidden=hidden, dropout=dropout)

    return build


def _co(guided_by: str | None) -> Callable[..., nn.Module]:
    def build(dims: Mapping[str, int], *, dim: int = 16, hidden: int = 16, dropout: float = 0.2, heads: int = 2,
              mlp_ratio: int = 2, **_: Any) -> nn.Module:
        return CoAttentionFusion(dims, dim=dim, heads=heads, guided_by=guided_by, mlp_ratio=mlp_ratio,
                                 hidden=hidden, dropout=dropout)

    return build


#: name -> ``builder(dims, **ARCH)``, where ``dims = {"genes": 76, "clinical": k}`` (the token widths).
#: "co-attention clinical-guided" is :class:`CoAttentionFusion` with ``guided_by="clinical"`` (P4's
#: "image-guided" variant with the clinical table in the guide's role): the gene tokens attend to the
#: clinical tokens, the clinical tokens are not updated.
STRATEGIES: dict[str, Callable[..., nn.Module]] = {
    "genes only": _unimodal("genes"),
    "clinical only": _unimodal("clinical"),
    "late fusion": _late,
    "contrastive": _contrastive,
    "cross-attention genes->clinical": _cross("genes->clinical"),
    "cross-attention clinical->genes": _cross("clinical->genes"),
    "co-attention": _co(None),
    "co-attention clinical-guided": _co("clinical"),
}
UNIMODAL = ("genes only", "clinical only")

#: the scikit-survival baselines, in table order (see :func:`breast_cancer_benchmark` for their settings)
BASELINES = ("CoxPH ridge (clinical)", "CoxPH ridge (genes + clinical)", "Coxnet (genes + clinical)",
             "RSF (genes + clinical)")


def _family(model: str) -> str:
    if model in UNIMODAL:
        return "neural unimodal"
    return "neural fusion" if model in STRATEGIES else "scikit-survival"


# --------------------------------------------------------------------------- baselines


def _surv(event: np.ndarray, time: np.ndarray) -> np.ndarray:
    from sksurv.util import Surv

    return Surv.from_arrays(event=np.asarray(event, bool), time=np.asarray(time, float))


def _coxnet_alpha(x: np.ndarray, event: np.ndarray, time: np.ndarray, *, l1_ratio: float, n_alphas: int,
                  alpha_min_ratio: float, inner_folds: int, seed: int) -> tuple[Any, float]:
    """Elastic-net Cox fitted on all of ``x`` along its own alpha path, with alpha chosen by inner CV.

    The path (``n_alphas`` values from the smallest alpha that zeroes every coefficient down to
    ``alpha_min_ratio`` times it) is computed once on the whole training fold; ``inner_folds``-fold
    stratified CV fits that same path on each inner training part and scores Harrell's c on the held
    out part for every alpha; the alpha with the best mean c is used to predict. Returns the fitted
    model and the alpha.
    """
    from sklearn.model_selection import StratifiedKFold
    from sksurv.linear_model import CoxnetSurvivalAnalysis

    def fit(rows: np.ndarray, alphas: np.ndarray | None) -> CoxnetSurvivalAnalysis:
        kw = {"alphas": alphas} if alphas is not None else {"n_alphas": n_alphas, "alpha_min_ratio": alpha_min_ratio}
        model = CoxnetSurvivalAnalysis(l1_ratio=l1_ratio, fit_baseline_model=False, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence warnings at the path's smallest alphas
            return model.fit(x[rows], _surv(event[rows], time[rows]))

    full = fit(np.arange(len(x)), None)
    alphas = np.asarray(full.alphas_)
    scores = np.zeros((inner_folds, len(alphas)))
    inner = StratifiedKFold(n_splits=inner_folds, shuffle=True, random_state=seed)
    for i, (tr, va) in enumerate(inner.split(x, event)):
        model = fit(tr, alphas)
        for j, a in enumerate(alphas):
            risk = model.predict(x[va], alpha=a)
            try:
                scores[i, j] = metrics.concordance_index(event[va], time[va], risk)
            except ValueError:
                scores[i, j] = 0.5
    best = float(alphas[int(np.argmax(scores.mean(axis=0)))])
    return full, best


def _baseline_risks(name: str, x_clin: tuple[np.ndarray, np.ndarray], x_all: tuple[np.ndarray, np.ndarray],
                    event: np.ndarray, time: np.ndarray, *, seed: int) -> np.ndarray:
    """Risk scores of one scikit-survival baseline on the test rows (trained on the whole training fold)."""
    from sksurv.ensemble import RandomSurvivalForest
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    y = _surv(event, time)
    if name == "CoxPH ridge (clinical)":
        return CoxPHSurvivalAnalysis(alpha=1.0, ties="efron").fit(x_clin[0], y).predict(x_clin[1])
    if name == "CoxPH ridge (genes + clinical)":
        return CoxPHSurvivalAnalysis(alpha=100.0, ties="efron").fit(x_all[0], y).predict(x_all[1])
    if name == "Coxnet (genes + clinical)":
        model, alpha = _coxnet_alpha(x_all[0], event, time, l1_ratio=0.5, n_alphas=30, alpha_min_ratio=0.01,
                                     inner_folds=3, seed=seed)
        return model.predict(x_all[1], alpha=alpha)
    if name == "RSF (genes + clinical)":
        rsf = RandomSurvivalForest(n_estimators=100, min_samples_leaf=10, max_features="sqrt", random_state=seed,
                                   n_jobs=1)
        return rsf.fit(x_all[0], y).predict(x_all[1])
    raise ValueError(f"unknown baseline {name!r}; choose from {list(BASELINES)}")


# --------------------------------------------------------------------------- benchmark


@dataclass
class BreastResult:
    """What :func:`breast_cancer_benchmark` returns.

    Attributes:
        per_fold: one row per model x test fold: ``model``, ``family`` (``"neural unimodal"``,
            ``"neural fusion"``, ``"scikit-survival"``), ``fold``, ``repeat``, ``c_index``
            (Harrell's, on the test fold), ``n_test``, ``n_events``.
        summary: one row per model, best mean first: ``model``, ``family``, ``mean_c``, ``sd_c`` (SD
            over folds x repeats), ``n_folds``, ``reference`` (the best unimodal neural model),
            ``mean_diff`` (mean paired per-fold difference model - reference), ``sd_diff`` (its SD
            over folds), ``wins`` (folds where the model's c-index is strictly higher).
        folds: the test-index arrays, ``folds[repeat * n_folds + fold]``; every model was tested on these.
        risks: every out-of-fold score: ``model``, ``repeat``, ``fold``, ``subject`` (row of
            :class:`BreastData`), ``risk`` (higher = earlier metastasis).
        seconds: wall-clock time of the run.
        settings: the arguments of the run.
    """

    per_fold: pd.DataFrame
    summary: pd.DataFrame
    folds: list[np.ndarray]
    risks: pd.DataFrame
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)


def _summarise(per_fold: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    wide = per_fold.pivot_table(index=["repeat", "fold"], columns="model", values="c_index", aggfunc="first")
    means = wide.mean()
    unimodal = [m for m in UNIMODAL if m in wide.columns]
    ref = str(means[unimodal].idxmax()) if unimodal else None
    rows = []
    for m in order:
        c = wide[m]
        row = {"model": m, "family": _family(m), "mean_c": float(c.mean()), "sd_c": float(c.std(ddof=1)),
               "n_folds": int(c.notna().sum()), "reference": ref, "mean_diff": np.nan, "sd_diff": np.nan,
               "wins": np.nan}
        if ref is not None:
            d = c - wide[ref]
            row.update(mean_diff=float(d.mean()), sd_diff=float(d.std(ddof=1)), wins=int((d > 0).sum()))
        rows.append(row)
    out = pd.DataFrame(rows)
    out["wins"] = out["wins"].astype("Int64")
    return out.sort_values("mean_c", ascending=False, kind="stable").reset_index(drop=True)


def breast_cancer_benchmark(
    *,
    n_folds: int = 5,
    n_repeats: int = 1,
    seed: int = 0,
    epochs: int = 200,
    lr: float = 3e-3,
    weight_decay: float = 1e-2,
    patience: int = 30,
    contrastive_weight: float = 0.5,
    strategies: Sequence[str] | None = None,
    baselines: bool | Sequence[str] = True,
    model_seeds: Sequence[int] = (0,),
    arch: Mapping[str, Any] | None = None,
    data: BreastData | None = None,
    torch_threads: int | None = 1,
) -> BreastResult:
    """Cross-validate P4's fusion strategies and scikit-survival's models on the breast-cancer data.

    Folds: :class:`sklearn.model_selection.RepeatedStratifiedKFold` on the event indicator
    (``n_folds`` folds, ``n_repeats`` repeats, shuffled with ``seed``): every model is trained and
    tested on the same folds. In each training fold:

    - both modalities are z-scored with the training fold's mean and SD (:func:`standardize`); the
      test fold never enters the statistics;
    - neural models: 20% of the training fold (stratified by the event, seeded) is held out for early
      stopping (lowest validation Cox loss, :func:`mmlib.survival.fit_survival` with the whole
      training part as one batch, AdamW); inputs are :func:`feature_tokens`; the risk is the mean
      over ``model_seeds`` (each seed sets the initial weights, dropout and the batch order);
    - scikit-survival baselines train on the whole training fold:

      - ``CoxPH ridge (clinical)``: :class:`CoxPHSurvivalAnalysis` with ``alpha=1`` (a ridge penalty
        ``alpha/2 ||beta||^2`` on z-scored columns; small against a partial likelihood summed over
        ~40 events, but it keeps the fit finite when a rare grade level has no event in a fold);
      - ``CoxPH ridge (genes + clinical)``: the same with ``alpha=100``, 82 columns on ~158 subjects
        (a fixed strong ridge, not tuned);
      - ``Coxnet (genes + clinical)``: elastic net with ``l1_ratio=0.5`` (a middle ground between
        the lasso's selection among correlated genes and the ridge's grouping), a 30-value alpha path
        down to 1% of the largest alpha, alpha chosen by Harrell's c in a 3-fold inner CV on the
        training fold (``fit_baseline_model=False``);
      - ``RSF (genes + clinical)``: :class:`RandomSurvivalForest` with 100 trees,
        ``min_samples_leaf=10``, ``max_features="sqrt"``, ``random_state=seed``, ``n_jobs=1``.

    Harrell's c-index is computed on each test fold (:func:`mmlib.metrics.concordance_index`). The
    summary's reference is the unimodal neural model with the best mean c-index; choosing it on the
    test folds favours the reference, so the fusion gains reported against it are conservative.

    Args:
        n_folds: folds per repeat (>= 2).
        n_repeats: repeats of the K-fold split (>= 1), each reshuffled.
        seed: seed of the folds, the validation hold-outs, the inner CV of Coxnet and the forest.
        epochs: maximum training epochs of the neural models.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        patience: early-stopping patience in epochs.
        contrastive_weight: weight of the InfoNCE term of ``"contrastive"``.
        strategies: names from :data:`STRATEGIES` (default: all; ``()``: none); "late fusion" brings the two
            unimodal models it combines (trained first, then frozen; only its two weights are fitted).
        baselines: True (all of :data:`BASELINES`), False, or a list of their names.
        model_seeds: seeds of the neural models; their risks are averaged.
        arch: overrides of :data:`ARCH` (``dim``, ``hidden``, ``dropout``, ``heads``, ``mlp_ratio``).
        data: the cohort (default: :func:`load_breast_cancer_modalities`); e.g. a copy with permuted
            outcomes as a negative control.
        torch_threads: torch CPU threads during the run (restored afterwards). 1 is fastest for these
            tiny networks and steady on a busy machine (defaults on a loaded 2-core machine: 35 s with 1
            thread, over 9 minutes with 2). ``None`` leaves the setting alone.

    Returns:
        :class:`BreastResult`. Deterministic on CPU for fixed arguments (and thread count), whatever the
        caller's global torch RNG state, which is left as it was (each fit runs in
        :func:`torch.random.fork_rng`; the initial weights come from ``torch.manual_seed(model_seed)``).

    Raises:
        ValueError: naming the argument, on an unknown strategy or baseline, ``n_folds < 2``,
            ``n_repeats < 1``, ``epochs < 1``, no ``model_seeds``, or nothing to run.
    """
    from sklearn.model_selection import RepeatedStratifiedKFold, train_test_split

    from mmlib.survival import fit_survival, frozen_copy, predict_risk

    names = list(STRATEGIES) if strategies is None else list(strategies)
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"strategies: unknown or repeated name(s) {unknown or names}; choose from {list(STRATEGIES)}")
    if "late fusion" in names:  # it combines the trained unimodal models: train them first
        names = [m for m in UNIMODAL if m not in names] + names
        names = sorted(names, key=lambda m: (m not in UNIMODAL, names.index(m)))
    if isinstance(baselines, bool):
        base = list(BASELINES) if baselines else []
    else:
        base = list(baselines)
        bad = [b for b in base if b not in BASELINES]
        if bad:
            raise ValueError(f"baselines: unknown name(s) {bad}; choose from {list(BASELINES)} (or True/False)")
    if not names and not base:
        raise ValueError("strategies and baselines: nothing to run (no strategy and no baseline)")
    if int(n_folds) < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds!r}")
    if int(n_repeats) < 1:
        raise ValueError(f"n_repeats must be >= 1, got {n_repeats!r}")
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs!r}")
    model_seeds = [int(s) for s in model_seeds]
    if names and not model_seeds:
        raise ValueError("model_seeds must hold at least one seed")
    arch_kw = dict(ARCH)
    if arch is not None:
        bad = sorted(set(arch) - set(ARCH))
        if bad:
            raise ValueError(f"arch: unknown key(s) {bad}; allowed {sorted(ARCH)}")
        arch_kw.update(arch)
    data = load_breast_cancer_modalities() if data is None else data
    if not isinstance(data, BreastData):
        raise ValueError(f"data must be a BreastData, got {type(data).__name__}")
    event, time = np.asarray(data.event, bool), np.asarray(data.time, float)
    dims = {"genes": data.genes.shape[1], "clinical": data.clinical.shape[1]}
    settings = dict(n_folds=n_folds, n_repeats=n_repeats, seed=seed, epochs=epochs, lr=lr, weight_decay=weight_decay,
                    patience=patience, contrastive_weight=contrastive_weight, strategies=names, baselines=base,
                    model_seeds=model_seeds, arch=arch_kw)

    splitter = RepeatedStratifiedKFold(n_splits=int(n_folds), n_repeats=int(n_repeats), random_state=seed)
    splits = list(splitter.split(np.zeros((data.n, 1)), event))
    rows: list[dict[str, Any]] = []
    risk_rows: list[pd.DataFrame] = []
    start = _time.perf_counter()
    threads = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(int(torch_threads))
    try:
        for k, (train_idx, test_idx) in enumerate(core.progress(splits, desc="breast-cancer folds", total=len(splits))):
            repeat, fold = divmod(k, int(n_folds))
            ev_tr, t_tr = event[train_idx], time[train_idx]
            genes_tr, genes_te = standardize(data.genes[train_idx], data.genes[test_idx])
            clin_tr, clin_te = standardize(data.clinical[train_idx], data.clinical[test_idx])
            fold_risks: dict[str, np.ndarray] = {}
            if names:
                val_seed = int(np.random.SeedSequence([seed, repeat, fold]).generate_state(1)[0] % (2**31))
                fit_pos, val_pos = train_test_split(np.arange(len(train_idx)), test_size=0.2, stratify=ev_tr,
                                                    random_state=val_seed)

                def tensors(genes: np.ndarray, clin: np.ndarray, rows_: np.ndarray | None,
                            ev: np.ndarray, t: np.ndarray) -> dict[str, torch.Tensor]:
                    sel = slice(None) if rows_ is None else rows_
                    return {"genes": feature_tokens(torch.from_numpy(genes[sel])),
                            "clinical": feature_tokens(torch.from_numpy(clin[sel])),
                            "time": torch.as_tensor(t[sel], dtype=torch.float32),
                            "event": torch.as_tensor(ev[sel], dtype=torch.bool)}

                train_t = tensors(genes_tr, clin_tr, fit_pos, ev_tr, t_tr)
                val_t = tensors(genes_tr, clin_tr, val_pos, ev_tr, t_tr)
                test_t = tensors(genes_te, clin_te, None, event[test_idx], time[test_idx])
                unimodal_fits: dict[tuple[str, int], nn.Module] = {}
                for name in names:
                    risk = np.zeros(len(test_idx))
                    for ms in model_seeds:
                        with torch.random.fork_rng(devices=[]):
                            torch.manual_seed(ms)
                            step = lr
                            if name == "late fusion":  # as in P4: the trained unimodal models' risks, combined
                                model = LateFusion.from_unimodal({
                                    "genes": frozen_copy(unimodal_fits["genes only", ms]),
                                    "clinical": frozen_copy(unimodal_fits["clinical only", ms])})
                                step = 10 * lr  # two weights
                            else:
                                model = STRATEGIES[name](dims, **arch_kw)
                            fitted = fit_survival(model, train_t, val_t, epochs=int(epochs), lr=step,
                                                  weight_decay=weight_decay, patience=patience,
                                                  contrastive_weight=contrastive_weight, seed=ms)
                            if name in UNIMODAL:
                                unimodal_fits[name, ms] = fitted.model
                            risk += predict_risk(fitted.model, test_t) / len(model_seeds)
                    fold_risks[name] = risk
            if base:
                x_all = (np.hstack([genes_tr, clin_tr]).astype(np.float64),
                         np.hstack([genes_te, clin_te]).astype(np.float64))
                x_clin = (clin_tr.astype(np.float64), clin_te.astype(np.float64))
                for name in base:
                    fold_risks[name] = np.asarray(
                        _baseline_risks(name, x_clin, x_all, ev_tr, t_tr, seed=seed), dtype=float)
            for name, risk in fold_risks.items():
                c = metrics.concordance_index(event[test_idx], time[test_idx], risk)
                rows.append({"model": name, "family": _family(name), "fold": fold, "repeat": repeat, "c_index": c,
                             "n_test": len(test_idx), "n_events": int(event[test_idx].sum())})
                risk_rows.append(pd.DataFrame({"model": name, "repeat": repeat, "fold": fold, "subject": test_idx,
                                               "risk": risk}))
    finally:
        if torch_threads is not None:
            torch.set_num_threads(threads)
    per_fold = pd.DataFrame(rows)
    order = names + base
    per_fold["model"] = pd.Categorical(per_fold["model"], categories=order)
    per_fold = per_fold.sort_values(["model", "repeat", "fold"], kind="stable").reset_index(drop=True)
    per_fold["model"] = per_fold["model"].astype(str)
    risks = pd.concat(risk_rows, ignore_index=True)
    seconds = _time.perf_counter() - start
    log.info("breast-cancer benchmark: %d models x %d folds in %.1f s", len(order), len(splits), seconds)
    return BreastResult(per_fold=per_fold, summary=_summarise(per_fold, order), folds=[s[1] for s in splits],
                        risks=risks, seconds=seconds, settings=settings)


# --------------------------------------------------------------------------- figure


def breast_figure(result: BreastResult, *, title: str | None = None) -> Figure:
    """Per-fold c-index of every model (box + points), coloured by family, chance (0.5) dashed.

    Models are listed in the order of the summary (best mean c-index at the top).

    Args:
        result: a :class:`BreastResult`.
        title: figure title (default: describes the folds).

    Returns:
        The matplotlib Figure (not saved, not shown).
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    if not isinstance(result, BreastResult):
        raise ValueError(f"result must be a BreastResult, got {type(result).__name__}")
    df = result.per_fold
    order = list(result.summary["model"])
    families = [f for f in FAMILIES if f in set(df["family"])]
    palette = dict(zip(FAMILIES, sns.color_palette("colorblind", len(FAMILIES))))
    fig, ax = plt.subplots(figsize=(9.5, 0.45 * len(order) + 1.5))
    with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib >= 3.10's deprecated ``vert`` to bxp
        warnings.filterwarnings("ignore", message=".*vert: bool was deprecated.*")
        sns.boxplot(data=df, x="c_index", y="model", order=order, hue="family", hue_order=families, palette=palette,
                    dodge=False, showfliers=False, boxprops={"alpha": 0.35}, ax=ax, legend=False)
    sns.stripplot(data=df, x="c_index", y="model", order=order, hue="family", hue_order=families, palette=palette,
                  dodge=False, size=5, jitter=0.15, ax=ax)
    ax.axvline(0.5, color="0.3", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel("Harrell's c-index on the test fold")
    ax.set_ylabel("")
    n_folds, n_rep = result.settings.get("n_folds", "?"), result.settings.get("n_repeats", "?")
    ax.set_title(title or f"Breast cancer (GSE7390), time to distant metastasis: {n_folds}-fold CV x {n_rep}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    fig.tight_layout()
    return fig
