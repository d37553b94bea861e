"""Logic of ``notebooks/p5_umeml_histology_genomics.py`` (P5: UMEML, histology prototypes + grouped genomics).

Stages, each a plain function the notebook calls in order:

1. :func:`load_data` -- every slide's bag of patch features, the RNA table and its gene -> group
   map, grade, subtype, survival and the cross-validation folds (plus, for a generated cohort,
   the true tissue program of every patch).
2. :func:`cross_validate` -- for each fold and each model (UMEML, the single-modality and
   simple-fusion baselines, the ablations): train on the other folds, predict the held-out fold.
   Grading, subtyping and discrete-time survival are learnt together by one model with three
   heads in ``quick`` (``joint_tasks``); the ``full`` profile trains one model per task, as the
   paper does.
3. :func:`comparison_table` / :func:`ablation_table` -- accuracy, macro one-vs-rest AUC and
   c-index, mean and sd over the folds, and paired per-fold differences to UMEML.
4. :func:`prototype_recovery` -- how well the prototypes' patch assignments recover the planted
   tissue programs (ARI, NMI) against k-means on the same features.
5. :func:`gene_group_attention` -- the unified decoder's attention to each gene group, ranked
   against the generator's planted group loadings.
6. :func:`claims_table` and :func:`paper_vs_run`.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from mmlib import core
from mmlib.core import Profile, ProfileSet
from mmlib.data import Cohort

__all__ = [
    "ABLATIONS", "LITERAL", "MODELS", "PAPER_REPORTED", "PROFILES", "TASKS", "CVResult", "ModelSpec", "P5Data", "P5Profile",
    "ablation_table", "assignment_figure", "attention_figure", "build_model", "ceiling_table", "claims_table", "cohort_table",
    "comparison_figure", "comparison_table", "cross_validate", "fold_metrics", "gene_group_attention",
    "load_data", "model_specs", "paper_vs_run", "prototype_recovery", "survival_cuts", "training_figure",
]

log = core.get_logger(__name__)

TASKS = ("grade", "subtype", "survival")


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class P5Profile(Profile):
    """Sizes of one P5 run; ``full`` is the paper's (bags of thousands of 512-d patches, one model per task)."""

    preset: str = "quick"  # cohort preset generated when data_dir holds no manifest
    n_subjects: int | None = None  # subjects of the generated cohort (None: the preset's)
    folds: tuple[int, ...] | None = None  # folds to run (None: every fold of the cohort)
    max_patches: int | None = None  # patches kept per bag (a seeded random subset); None keeps all
    dim: int = 64
    heads: int = 4
    n_prototypes: int = 5  # public code: 5
    n_registers: int = 3  # public code: 3
    cross_layers: int = 2
    self_layers: int = 1
    genomic_layers: int = 1
    decoder_layers: int = 1
    dropout: float = 0.1
    epochs: int = 12
    batch_size: int = 16  # bags per step (the paper: 1); padded and masked
    lr: float = 1e-3  # the paper's 2e-4 is for one bag per step
    weight_decay: float = 1e-4
    gamma: float = 5.0  # weight of the modularity loss (public code 5.0)
    modularity_patches: int | None = 96  # patches per bag the modularity graph is built on (seeded subset; None: all)
    alpha: float = 1.0  # pathology-prototype term of the modularity loss
    beta: float = 1.0  # gene-group term of the modularity loss
    n_bins: int = 4  # discrete-time survival intervals (quartiles of the training fold's event times)
    joint_tasks: bool = True  # one model with three heads (True) or one model per task, as the paper (False)
    ablation_prototypes: tuple[int, ...] = (1, 16)  # K of the prototype ablation (besides n_prototypes)
    kmeans_patches: int = 20000  # training patches the k-means baseline is fitted on
    device_batch_eval: int = 32

    @property
    def cohort_knobs(self) -> dict[str, Any]:
        return {} if self.n_subjects is None else {"n_subjects": self.n_subjects}


PROFILES = ProfileSet(
    smoke=P5Profile(name="smoke", preset="smoke", folds=(0, 1), dim=16, heads=2, cross_layers=1, epochs=2,
                    batch_size=8, ablation_prototypes=(1,), kmeans_patches=2000),
    quick=P5Profile(name="quick"),
    full=P5Profile(name="full", preset="full", max_patches=4096, dim=256, heads=8, epochs=30, batch_size=4,
                   lr=2e-4, joint_tasks=False, kmeans_patches=100000),
)


# --------------------------------------------------------------------------- data


@dataclass
class P5Data:
    """Everything the models see, in memory.

    Attributes:
        table: one row per subject: ``subject_id``, ``grade`` and ``subtype`` (integer codes),
            ``time``, ``event``, ``fold``, ``site`` (where present), ``n_patches``.
        bags: float32 (n_i, D) patch features per subject.
        rna: (N, genes) float32 expression.
        group_index: per gene group, the columns of ``rna`` it holds.
        group_names, grade_names, subtype_names: labels of the groups and classes.
        programs: the true tissue program of every kept patch (generated cohorts), else None.
        patch_rows: the bag rows kept for each subject (all rows unless ``max_patches`` cut the bag).
        truth: the generated cohort's ``truth.json`` ({} for real data).
        time_unit: the unit of ``time``.
    """

    table: pd.DataFrame
    bags: list[torch.Tensor]
    rna: np.ndarray
    group_index: list[list[int]]
    group_names: list[str]
    grade_names: list[str]
    subtype_names: list[str]
    programs: list[np.ndarray] | None = None
    patch_rows: list[np.ndarray] = field(default_factory=list)
    latents: pd.DataFrame | None = None
    truth: dict[str, Any] = field(default_factory=dict)
    time_unit: str = "months"
    root: Any = None

    @property
    def folds(self) -> list[int]:
        return sorted(int(f) for f in self.table["fold"].unique())

    def split(self, fold: int) -> tuple[np.ndarray, np.ndarray]:
        """(training rows, held-out rows) of one cross-validation fold."""
        f = self.table["fold"].to_numpy()
        return np.flatnonzero(f != fold), np.flatnonzero(f == fold)

    def survival(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = self.table.iloc[idx]
        return t["event"].to_numpy().astype(bool), t["time"].to_numpy().astype(float)


def _column(cohort: Cohort, names: Sequence[str], what: str) -> str:
    for n in names:
        if n and n in cohort.subjects.columns:
            return n
    raise ValueError(f"cohort {cohort.name!r} ({cohort.root}/subjects.csv) has no {what} column (looked for "
                     f"{[n for n in names if n]}); see data_manifest/real/tcga_gbm_lgg.md")


def _rna(cohort: Cohort, ids: list[str]) -> tuple[np.ndarray, list[list[int]], list[str]]:
    """Expression matrix and gene groups: the ``rna`` long table (generated cohorts), else the subject
    table's ``rna_*`` columns, each its own group (the real-data card's group scores)."""
    if "rna" in cohort.tables:
        from mmlib.cohorts.glioma import gene_groups

        groups = gene_groups(cohort)
        rna = cohort.tables["rna"].copy()
        rna["subject_id"] = rna["subject_id"].astype(str)
        rna = rna.set_index("subject_id")
        missing = [s for s in ids if s not in rna.index]
        if missing:
            raise ValueError(f"{cohort.root}: table 'rna' has no row for subject(s) {missing[:5]}")
        x = rna.loc[ids, list(groups.index)].to_numpy(dtype=np.float32)
        names = list(dict.fromkeys(groups.tolist()))
        index = [list(np.flatnonzero((groups == g).to_numpy())) for g in names]
        return x, index, names
    cols = [c for c in cohort.subjects.columns if str(c).startswith("rna_")]
    if not cols:
        raise ValueError(f"cohort {cohort.name!r} ({cohort.root}) has neither an 'rna' table nor 'rna_*' columns "
                         "in subjects.csv; P5 needs genomics (see data_manifest/real/tcga_gbm_lgg.md)")
    x = cohort.subjects[cols].to_numpy(dtype=np.float32)
    return x, [[i] for i in range(len(cols))], cols


def load_data(cohort: Cohort, prof: P5Profile, *, seed: int = 0) -> P5Data:
    """Read every bag, the RNA and the labels of ``cohort``.

    Raises:
        ValueError: naming the file, subject or column when something P5 needs is missing or
            malformed (an empty bag, bags of different widths, non-finite features, NaN labels).
    """
    from mmlib.data.readers import read_feature_bag

    sub = cohort.subjects
    where = f"{cohort.root}/subjects.csv"
    id_col = cohort.manifest.id_column
    surv = cohort.manifest.survival
    time_col = _column(cohort, [getattr(surv, "time", None), "survival_months", "os_days"], "survival time")
    event_col = _column(cohort, [getattr(surv, "event", None), "death"], "event")
    fold_col = _column(cohort, [cohort.manifest.split_column, "fold"], "fold")
    for col in ("grade", "subtype"):
        _column(cohort, [col], col)
    t = pd.DataFrame({"subject_id": sub[id_col].astype(str)})
    grade = sub["grade"].astype("category")
    subtype = sub["subtype"].astype("category")
    for name, cat in (("grade", grade), ("subtype", subtype), (time_col, sub[time_col]), (event_col, sub[event_col]),
                      (fold_col, sub[fold_col])):
        bad = np.flatnonzero(pd.isna(cat).to_numpy())
        if len(bad):
            raise ValueError(f"{where}: column {name!r} is empty for subject(s) {t['subject_id'].iloc[bad[:5]].tolist()}")
    t["grade"] = grade.cat.codes.to_numpy()
    t["subtype"] = subtype.cat.codes.to_numpy()
    t["time"] = sub[time_col].astype(float).to_numpy()
    t["event"] = sub[event_col].astype(int).to_numpy()
    t["fold"] = pd.to_numeric(sub[fold_col].astype(str)).astype(int).to_numpy()
    if "site" in sub.columns:
        t["site"] = sub["site"].astype(str).to_numpy()

    rng = np.random.default_rng(seed)
    lat = None
    if cohort.manifest.truth:
        lat = cohort.latents()
        lat["subject_id"] = lat["subject_id"].astype(str)
        lat = lat.set_index("subject_id")
    bags, rows, programs = [], [], ([] if lat is not None else None)
    width = None
    for sid, path in core.progress(list(zip(t["subject_id"], cohort.paths("wsi_features"))), desc="read bags"):
        if path is None:
            raise ValueError(f"{where}: subject {sid} has no patch-feature bag (column 'wsi_features' is empty)")
        x = np.asarray(read_feature_bag(path), dtype=np.float32)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"{path}: a bag must be (N >= 1 patches, D), got shape {x.shape}")
        if width is not None and x.shape[1] != width:
            raise ValueError(f"{path}: patch features are {x.shape[1]}-d, the first bag's are {width}-d")
        if not np.isfinite(x).all():
            raise ValueError(f"{path}: non-finite patch features in row(s) "
                             f"{np.flatnonzero(~np.isfinite(x).all(1))[:5].tolist()}")
        width = x.shape[1]
        keep = np.arange(len(x))
        if prof.max_patches is not None and len(x) > prof.max_patches:
            keep = np.sort(rng.choice(len(x), prof.max_patches, replace=False))
        bags.append(torch.from_numpy(x[keep]))
        rows.append(keep)
        if programs is not None:
            programs.append(np.load(cohort.root / lat.loc[sid, "programs_file"])[keep])
    t["n_patches"] = [len(b) for b in bags]
    rna, index, names = _rna(cohort, t["subject_id"].tolist())
    if not np.isfinite(rna).all():
        r, c = np.argwhere(~np.isfinite(rna))[0]
        raise ValueError(f"{cohort.root}: RNA value of subject {t['subject_id'].iloc[r]} is not finite (gene {c})")
    unit = getattr(surv, "unit", None) or ("days" if "day" in time_col else "months")
    return P5Data(table=t, bags=bags, rna=rna, group_index=index, group_names=names,
                  grade_names=[str(c) for c in grade.cat.categories],
                  subtype_names=[str(c) for c in subtype.cat.categories], programs=programs, patch_rows=rows,
                  latents=None if lat is None else lat.loc[t["subject_id"]].reset_index(),
                  truth=dict(cohort.truth) if cohort.manifest.truth else {}, time_unit=unit, root=cohort.root)


def cohort_table(data: P5Data) -> pd.DataFrame:
    """Subjects, grade mix, deaths and bag sizes per fold."""
    rows = []
    for f in data.folds:
        t = data.table[data.table["fold"] == f]
        counts = t["grade"].value_counts()
        rows.append({"fold": f, "subjects": len(t),
                     **{f"grade {g}": int(counts.get(i, 0)) for i, g in enumerate(data.grade_names)},
                     "subtypes present": int(t["subtype"].nunique()), "deaths": int(t["event"].sum()),
                     f"median time ({data.time_unit})": float(t["time"].median()),
                     "patches per bag (median)": float(t["n_patches"].median())})
    return pd.DataFrame(rows)


def survival_cuts(time: np.ndarray, event: np.ndarray, n_bins: int) -> np.ndarray:
    """``n_bins + 1`` cut points: 0, the inner quantiles of the event times, and the largest time.

    As in MCAT and the public UMEML code, the bins are quantiles of the uncensored times (of the
    training fold only), so that each bin holds about as many events.
    """
    t = np.asarray(time, float)
    ev = np.asarray(event, bool)
    src = t[ev] if ev.sum() >= n_bins else t
    inner = np.quantile(src, np.linspace(0, 1, n_bins + 1)[1:-1]) if n_bins > 1 else np.array([])
    cuts = np.concatenate([[0.0], inner, [max(t.max(), inner.max() if len(inner) else 0.0) + 1e-6]])
    return np.maximum.accumulate(cuts + np.arange(len(cuts)) * 1e-9)  # strictly increasing even for tied quantiles


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """One row of the comparison: a model family and its settings."""

    name: str
    kind: str  # umeml | pathology | genomics | simple | mcat
    mode: str | None = None  # simple fusion: add | concat | bilinear
    n_prototypes: int | None = None  # None: the profile's
    n_registers: int | None = None
    modularity: bool = False
    literal: bool = False  # UMEML's S as printed: against the bag's output prototypes, rows not normalised
    group: str = "comparison"  # comparison | ablation


MODELS = ("UMEML", "pathology only", "genomics only", "add", "concat", "bilinear (Kronecker)", "co-attention (MCAT)")
LITERAL = "UMEML, S as printed (output prototypes, rows not normalised)"
ABLATIONS = ("UMEML w/o modularity loss", "UMEML w/o register tokens", LITERAL)


def model_specs(prof: P5Profile) -> list[ModelSpec]:
    """The comparison table's models, then the ablations (UMEML with one piece removed, and other K)."""
    specs = [
        ModelSpec("UMEML", "umeml", modularity=True),
        ModelSpec("pathology only", "pathology"),
        ModelSpec("genomics only", "genomics"),
        ModelSpec("add", "simple", mode="add"),
        ModelSpec("concat", "simple", mode="concat"),
        ModelSpec("bilinear (Kronecker)", "simple", mode="bilinear"),
        ModelSpec("co-attention (MCAT)", "mcat"),
        ModelSpec("UMEML w/o modularity loss", "umeml", modularity=False, group="ablation"),
        ModelSpec("UMEML w/o register tokens", "umeml", n_registers=0, modularity=True, group="ablation"),
        ModelSpec(LITERAL, "umeml", modularity=True, literal=True, group="ablation"),
    ]
    specs += [ModelSpec(f"UMEML K={k}", "umeml", n_prototypes=k, modularity=True, group="ablation")
              for k in prof.ablation_prototypes if k != prof.n_prototypes]
    return specs


def build_model(spec: ModelSpec, data: P5Data, prof: P5Profile, tasks: dict[str, int]) -> nn.Module:
    """The network of ``spec`` at this profile's sizes, with one head per task."""
    from mmlib.models import umeml

    d_in = data.bags[0].shape[1]
    common = dict(dim=prof.dim, n_heads=prof.heads, dropout=prof.dropout)
    k = spec.n_prototypes or prof.n_prototypes
    path = dict(n_prototypes=k, cross_layers=prof.cross_layers, self_layers=prof.self_layers)
    if spec.kind == "umeml":
        r = prof.n_registers if spec.n_registers is None else spec.n_registers
        return umeml.UMEML(d_in, data.group_index, tasks, n_registers=r, genomic_layers=prof.genomic_layers,
                           decoder_layers=prof.decoder_layers, modularity_weights=(prof.alpha, prof.beta),
                           assign_to="outputs" if spec.literal else "queries", normalise_assignment=not spec.literal,
                           modularity_patches=prof.modularity_patches, **path, **common)
    if spec.kind == "pathology":
        return umeml.PathologyOnly(d_in, tasks, **path, **common)
    if spec.kind == "genomics":
        return umeml.GenomicsOnly(data.group_index, tasks, layers=prof.genomic_layers, **common)
    if spec.kind == "simple":
        return umeml.SimpleFusion(d_in, data.group_index, tasks, mode=spec.mode, genomic_layers=prof.genomic_layers,
                                  **path, **common)
    if spec.kind == "mcat":
        return umeml.MCATFusion(d_in, data.group_index, tasks, **common)
    raise ValueError(f"unknown model kind {spec.kind!r}")


# --------------------------------------------------------------------------- training


def _batch(data: P5Data, idx: np.ndarray, rna: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    bags = [data.bags[i] for i in idx]
    n = max(len(b) for b in bags)
    x = torch.zeros(len(bags), n, bags[0].shape[1])
    mask = torch.ones(len(bags), n, dtype=torch.bool)
    for j, b in enumerate(bags):
        x[j, : len(b)] = b
        mask[j, : len(b)] = False
    return {"patches": x.to(device), "patches_mask": mask.to(device),
            "rna": rna[torch.as_tensor(idx)].to(device)}


def _task_losses(out: dict, data: P5Data, idx: np.ndarray, bins: torch.Tensor, tasks: Sequence[str],
                 device: torch.device) -> dict[str, torch.Tensor]:
    from mmlib.losses import discrete_time_nll

    t = data.table.iloc[idx]
    losses = {}
    for task in tasks:
        logits = out["logits"][task]
        if task == "survival":
            ev = torch.tensor(t["event"].to_numpy().astype(bool), device=device)
            losses[task] = discrete_time_nll(logits, bins[torch.as_tensor(idx)].to(device), ev)
        else:
            y = torch.tensor(t[task].to_numpy(), dtype=torch.long, device=device)
            losses[task] = nn.functional.cross_entropy(logits, y)
    return losses


def _fit(spec: ModelSpec, data: P5Data, train: np.ndarray, prof: P5Profile, tasks: Sequence[str], rna: torch.Tensor,
         bins: torch.Tensor, *, seed: int, device: torch.device) -> tuple[nn.Module, list[dict]]:
    """Train one model for ``prof.epochs`` epochs on the rows ``train`` (Adam, per-step cosine schedule).

    Runs on :func:`mmlib.train.fit`, so it trains data-parallel under ``torchrun``. Each epoch's
    batches are :func:`length_batches` of ``train`` (seeded by ``seed * 1000 + epoch``), padded to
    their longest bag; ``rows`` (the batch's subject indices) travels with the padded tensors, so
    each rank's shard holds its rows' labels. Under more than one process every batch must divide
    by the world size: the last ``len % world`` rows of a batch are dropped for that epoch (and a
    batch smaller than the world size is skipped); with one process nothing is dropped. The
    learning rate follows a cosine from ``prof.lr`` to 0 over all optimizer steps, stepped per batch.
    Returns the model and one history row per epoch (``epoch`` from 1, ``loss <task>``, and
    ``loss modularity`` when the model trains with it).
    """
    from mmlib import distributed
    from mmlib.train import fit

    outputs = {"grade": len(data.grade_names), "subtype": len(data.subtype_names), "survival": prof.n_bins}
    torch.manual_seed(seed)
    model = build_model(spec, data, prof, {t: outputs[t] for t in tasks})
    opt = torch.optim.Adam(model.parameters(), lr=prof.lr, weight_decay=prof.weight_decay)
    lengths = np.array([len(b) for b in data.bags])
    world = distributed.world_size() if distributed.is_initialized() else distributed.launched_world_size()
    with_mod = bool(spec.modularity and prof.gamma)

    def chunks(epoch: int):
        for chunk in length_batches(train, lengths, prof.batch_size, seed=seed * 1000 + epoch):
            chunk = chunk[: len(chunk) - len(chunk) % world]
            if len(chunk):
                yield chunk

    def train_batches(epoch: int):
        for chunk in chunks(epoch):
            yield {"rows": chunk, **_batch(data, chunk, rna, torch.device("cpu"))}

    def loss_fn(m: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        rows = batch["rows"]
        out = m(batch, compute_modularity=with_mod) if spec.kind == "umeml" else m(batch)
        losses = _task_losses(out, data, rows, bins, tasks, batch["patches"].device)
        loss = sum(losses.values())
        if with_mod:
            losses["modularity"] = out["modularity_loss"]
            loss = loss + prof.gamma * losses["modularity"]
        return {"loss": loss, **losses}

    # the cosine of torch's CosineAnnealingLR (eta_min 0) over every step of the run, in closed form
    steps = max(1, prof.epochs * sum(1 for _ in chunks(0)))  # batch sizes do not depend on the epoch

    def cosine(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * step / steps))

    hist = fit(model, loss_fn=loss_fn, train_batches=train_batches, epochs=prof.epochs, optimizer=opt,
               device=device, seed=seed, step_lr_factor=cosine, desc=f"{spec.name} {'+'.join(tasks)}",
               progress=False)  # cross_validate's bar counts the fits
    history = [{"epoch": int(r["epoch"]) + 1, **{f"loss {k}": r[f"train_{k}"] for k in (*tasks, "modularity")
                                                  if f"train_{k}" in r}} for r in hist.to_dict("records")]
    return model, history


def length_batches(idx: np.ndarray, lengths: np.ndarray, batch_size: int, *, seed: int, pool: int = 8):
    """Shuffled minibatches of rows ``idx`` whose bags have similar lengths (less padding).

    The rows are shuffled, cut into pools of ``pool`` batches, sorted by bag length inside each
    pool and cut into batches; the batch order is shuffled again. Every row appears once per epoch.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(np.asarray(idx))
    batches = []
    step = batch_size * pool
    for start in range(0, len(order), step):
        block = order[start:start + step]
        block = block[np.argsort(lengths[block], kind="stable")]
        batches += [block[i:i + batch_size] for i in range(0, len(block), batch_size)]
    for j in rng.permutation(len(batches)):
        yield batches[j]


@torch.no_grad()
def _predict(model: nn.Module, data: P5Data, idx: np.ndarray, rna: torch.Tensor, prof: P5Profile,
             device: torch.device) -> dict[str, Any]:
    """Class probabilities, survival risk, prototype assignments and attention of the rows ``idx``."""
    from mmlib.models.umeml import risk_from_hazard_logits

    model.eval()
    pred: dict[str, Any] = {"grade": [], "subtype": [], "risk": [], "assign": [], "decoder": [], "segments": None}
    for start in range(0, len(idx), prof.device_batch_eval):
        chunk = idx[start:start + prof.device_batch_eval]
        out = model(_batch(data, chunk, rna, device))
        for task in ("grade", "subtype"):
            if task in out["logits"]:
                pred[task].append(torch.softmax(out["logits"][task].float(), -1).cpu().numpy())
        if "survival" in out["logits"]:
            pred["risk"].append(risk_from_hazard_logits(out["logits"]["survival"].float()).cpu().numpy())
        if "assign_path" in out:
            s = out["assign_path"].float().cpu().numpy()
            pred["assign"] += [s[j, : len(data.bags[i])].argmax(-1) for j, i in enumerate(chunk)]
        if "decoder_attention" in out:
            pred["decoder"].append(out["decoder_attention"].float().cpu().numpy())
            pred["segments"] = out["segments"]
    for key in ("grade", "subtype", "risk", "decoder"):
        pred[key] = np.concatenate(pred[key]) if pred[key] else None
    return pred


@dataclass
class CVResult:
    """Everything :func:`cross_validate` produced.

    Attributes:
        specs: the models, in table order.
        predictions: per model, the held-out predictions of every subject (one row each):
            ``subject``, ``fold``, ``risk``, ``p_grade_<k>``, ``p_subtype_<k>``.
        history: training losses per model, fold, task set and epoch.
        assignments: per model and fold, the held-out subjects' prototype index of every patch.
        decoder: per fold, UMEML's decoder attention (subjects, L, L) on the held-out fold, and
            its segments.
        cuts: per fold, the survival interval cut points.
    """

    specs: list[ModelSpec]
    predictions: dict[str, pd.DataFrame]
    history: pd.DataFrame
    assignments: dict[tuple[str, int], list[np.ndarray]]
    decoder: dict[int, tuple[np.ndarray, dict]]
    cuts: dict[int, list[float]]
    models: dict[tuple[str, int], nn.Module] = field(default_factory=dict)


def cross_validate(data: P5Data, prof: P5Profile, *, specs: Sequence[ModelSpec] | None = None, seed: int = 0,
                   device: torch.device | str = "cpu") -> CVResult:
    """Train every model on each fold's training folds and predict its held-out fold.

    RNA is z-scored per gene with the training folds' statistics. The survival bins are
    quartiles of the training folds' event times. Each model starts from the seed
    ``seed * 100 + fold`` (the same initial draw for every model family of a fold), trains for
    ``prof.epochs`` epochs and is scored once at the end: there is no validation split inside a
    fold, so nothing is chosen on the held-out fold.
    """
    from mmlib.losses import discretize_times

    device = torch.device(device)
    specs = list(specs) if specs is not None else model_specs(prof)
    folds = [f for f in data.folds if prof.folds is None or f in prof.folds]
    task_sets = [TASKS] if prof.joint_tasks else [(t,) for t in TASKS]
    preds: dict[str, list[pd.DataFrame]] = {s.name: [] for s in specs}
    history, assignments, decoder, cuts, models = [], {}, {}, {}, {}
    setup: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for fold in folds:
        train, _ = data.split(fold)
        mean, sd = data.rna[train].mean(0), data.rna[train].std(0)
        rna = torch.from_numpy((data.rna - mean) / np.where(sd > 0, sd, 1.0)).float()
        ev, tm = data.survival(train)
        c = survival_cuts(tm, ev, prof.n_bins)
        cuts[fold] = c.tolist()
        setup[fold] = (rna, discretize_times(torch.tensor(data.table["time"].to_numpy(float)), torch.tensor(c)))
    jobs = [(fold, spec) for fold in folds for spec in specs]
    bar = core.progress(jobs, desc="cross-validation")
    for fold, spec in bar:
        train, test = data.split(fold)
        rna, bins = setup[fold]
        frame = pd.DataFrame({"subject": data.table["subject_id"].iloc[test].to_numpy(), "fold": fold})
        for tasks in task_sets:
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(f"fold {fold} · {spec.name} · {'+'.join(tasks)}", refresh=False)
            model, hist = _fit(spec, data, train, prof, tasks, rna, bins, seed=seed * 100 + fold, device=device)
            history += [{"model": spec.name, "fold": fold, "tasks": "+".join(tasks), **h} for h in hist]
            p = _predict(model, data, test, rna, prof, device)
            for task in ("grade", "subtype"):
                if p[task] is not None:
                    for k in range(p[task].shape[1]):
                        frame[f"p_{task}_{k}"] = p[task][:, k]
            if p["risk"] is not None:
                frame["risk"] = p["risk"]
            if p["assign"] and (spec.name, fold) not in assignments:
                assignments[(spec.name, fold)] = p["assign"]
            if spec.name == "UMEML" and p["decoder"] is not None and fold not in decoder:
                decoder[fold] = (p["decoder"], p["segments"])
            if spec.name == "UMEML" and fold == folds[0]:
                models[(spec.name, fold)] = model.cpu()
        preds[spec.name].append(frame)
    pred = {k: pd.concat(v, ignore_index=True) for k, v in preds.items()}
    return CVResult(specs=specs, predictions=pred, history=pd.DataFrame(history), assignments=assignments,
                    decoder=decoder, cuts=cuts, models=models)


# --------------------------------------------------------------------------- scoring


def fold_metrics(cv: CVResult, data: P5Data) -> pd.DataFrame:
    """Accuracy, macro one-vs-rest AUC and c-index of every model on every held-out fold."""
    from mmlib.metrics import concordance_index, macro_ovr_auc

    tab = data.table.set_index("subject_id")
    rows = []
    for spec in cv.specs:
        for fold, p in cv.predictions[spec.name].groupby("fold"):
            t = tab.loc[p["subject"]]
            row = {"model": spec.name, "group": spec.group, "fold": int(fold)}
            for task in ("grade", "subtype"):
                cols = [c for c in p.columns if c.startswith(f"p_{task}_")]
                prob = p[cols].to_numpy()
                y = t[task].to_numpy()
                row[f"{task} accuracy"] = float((prob.argmax(1) == y).mean())
                row[f"{task} AUC"] = macro_ovr_auc(y, prob)
            row["survival c-index"] = concordance_index(t["event"].to_numpy().astype(bool), t["time"].to_numpy(float),
                                                        p["risk"].to_numpy())
            rows.append(row)
    return pd.DataFrame(rows)


METRICS = ("grade accuracy", "grade AUC", "subtype accuracy", "subtype AUC", "survival c-index")


def _mean_sd(per_fold: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    rows = []
    for m in models:
        f = per_fold[per_fold["model"] == m]
        row = {"model": m}
        for k in METRICS:
            row[k] = f"{f[k].mean():.3f} ± {f[k].std(ddof=1) if len(f) > 1 else 0.0:.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_table(per_fold: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd over the folds of every comparison model (UMEML first)."""
    names = list(dict.fromkeys(per_fold.loc[per_fold["group"] == "comparison", "model"]))
    return _mean_sd(per_fold, names)


def paired_differences(per_fold: pd.DataFrame, reference: str = "UMEML") -> pd.DataFrame:
    """Per metric, ``reference`` minus each other model on the same folds: mean, sd, and the number of
    folds where the reference is ahead. A difference counts as shown when mean - 2 se > 0."""
    ref = per_fold[per_fold["model"] == reference].set_index("fold")
    rows = []
    for m in dict.fromkeys(per_fold["model"]):
        if m == reference:
            continue
        other = per_fold[per_fold["model"] == m].set_index("fold").loc[ref.index]
        for k in METRICS:
            d = (ref[k] - other[k]).to_numpy(float)
            se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else np.nan
            rows.append({"model": m, "group": other["group"].iloc[0], "metric": k, "UMEML minus model": d.mean(),
                         "sd over folds": d.std(ddof=1) if len(d) > 1 else np.nan, "folds UMEML ahead": int((d > 0).sum()),
                         "folds": len(d), "shown (mean - 2 se > 0)": bool(d.mean() - 2 * se > 0) if len(d) > 1 else False})
    return pd.DataFrame(rows)


def ceiling_table(data: P5Data) -> pd.DataFrame | None:
    """The c-index the planted latents reach on each held-out fold (mean ± sd): what no model can beat.

    Survival is generated from the aggressiveness latent alone, so its c-index is the ceiling of
    any model's; the c-index of the grade shows how much of it the grade label already gives.
    None for real data.
    """
    from mmlib.metrics import concordance_index

    if data.latents is None or "aggressiveness" not in data.latents:
        return None
    rows = []
    for name, score in (("planted aggressiveness (survival ceiling)", data.latents["aggressiveness"]),
                        ("grade alone", data.table["grade"])):
        vals = []
        for fold in data.folds:
            _, test = data.split(fold)
            ev, tm = data.survival(test)
            vals.append(concordance_index(ev, tm, np.asarray(score, float)[test]))
        rows.append({"reference": name, "survival c-index": f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"})
    return pd.DataFrame(rows)


def ablation_table(per_fold: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd over the folds of UMEML and its ablations."""
    names = ["UMEML"] + list(dict.fromkeys(per_fold.loc[per_fold["group"] == "ablation", "model"]))
    return _mean_sd(per_fold, names)


def comparison_figure(per_fold: pd.DataFrame, *, title: str):
    """Dot per fold and mean ± sd per model, one panel per metric."""
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(per_fold["model"]))
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 0.45 * len(models) + 1.8), sharey=True)
    y = np.arange(len(models))
    for ax, k in zip(axes, METRICS):
        for i, m in enumerate(models):
            v = per_fold.loc[per_fold["model"] == m, k].to_numpy(float)
            colour = "tab:red" if m == "UMEML" else ("tab:purple" if "UMEML" in m else "tab:blue")
            ax.scatter(v, np.full(len(v), i) + np.linspace(-0.15, 0.15, len(v)), s=9, color=colour, alpha=0.45)
            ax.errorbar(v.mean(), i, xerr=v.std(ddof=1) if len(v) > 1 else 0, fmt="o", color=colour, capsize=3)
        ax.set_title(k, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, models)
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def training_figure(history: pd.DataFrame):
    """Training losses per epoch (mean over folds) of every model: the task losses and UMEML's modularity term."""
    import matplotlib.pyplot as plt

    from mmlib import viz

    cols = [c for c in history.columns if c.startswith("loss ")]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.6 * len(cols) + 4, 3.6), squeeze=False)
    palette = plt.get_cmap("tab20").colors
    for ax, c in zip(axes[0], cols):
        for j, (m, h) in enumerate(history.groupby("model", sort=False)):
            if h[c].notna().any():
                curve = h.groupby("epoch")[c].mean()
                ax.plot(curve.index, curve.to_numpy(), label=m, lw=2.5 if m == "UMEML" else 1.2,
                        color="black" if m == "UMEML" else palette[(2 * j) % 20 + (j // 10) % 2])
        ax.set_title(c.replace("loss ", ""), fontsize=10)
        ax.set_xlabel("epoch")
        viz.epoch_axis(ax)
    axes[0][0].set_ylabel("training loss (mean over folds)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(0.785, 0.5), frameon=False)
    return fig


# --------------------------------------------------------------------------- ground truth: prototypes and gene groups


def prototype_recovery(cv: CVResult, data: P5Data, prof: P5Profile, *, seed: int = 0) -> pd.DataFrame | None:
    """How well each model's prototype assignments recover the planted tissue programs (held-out patches).

    Per fold: the adjusted Rand index and normalised mutual information between each patch's
    prototype (the argmax of its soft assignment S) and its true program, pooled over the
    held-out subjects; beside k-means with the same K (and with the true number of programs)
    fitted on the training folds' raw patch features. Returns mean and sd over folds; None
    for real data (no program labels).
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    if data.programs is None:
        return None
    n_programs = int(max(p.max() for p in data.programs)) + 1
    rows = []
    for (name, fold), assign in cv.assignments.items():
        _, test = data.split(fold)
        truth = np.concatenate([data.programs[i] for i in test])
        pred = np.concatenate(assign)
        k = len(np.unique(pred))
        rows.append({"method": name, "fold": fold, "prototypes used": k,
                     "ARI": adjusted_rand_score(truth, pred), "NMI": normalized_mutual_info_score(truth, pred)})
    rng = np.random.default_rng(seed)
    for fold in sorted({f for _, f in cv.assignments}):
        train, test = data.split(fold)
        pool = torch.cat([data.bags[i] for i in train]).numpy()
        pool = pool[rng.choice(len(pool), min(len(pool), prof.kmeans_patches), replace=False)]
        x_test = torch.cat([data.bags[i] for i in test]).numpy()
        truth = np.concatenate([data.programs[i] for i in test])
        for k in sorted({prof.n_prototypes, n_programs}):
            km = KMeans(k, n_init=4, random_state=seed).fit(pool)
            pred = km.predict(x_test)
            rows.append({"method": f"k-means, K={k} (raw features)", "fold": fold, "prototypes used": k,
                         "ARI": adjusted_rand_score(truth, pred), "NMI": normalized_mutual_info_score(truth, pred)})
    df = pd.DataFrame(rows)
    out = df.groupby("method", sort=False).agg(
        folds=("fold", "nunique"), **{"prototypes used (mean)": ("prototypes used", "mean")},
        ARI=("ARI", "mean"), **{"ARI sd": ("ARI", "std")}, NMI=("NMI", "mean"), **{"NMI sd": ("NMI", "std")})
    return out.reset_index()


_SHORT = {"normal_brain": "normal", "tumour_cellular": "tumour", "necrosis": "necrosis",
          "microvascular_proliferation": "MVP", "inflammation": "inflammation", "haemorrhage": "haemorrhage"}


def assignment_figure(cv: CVResult, data: P5Data, *, model: str = "UMEML", n_subjects: int = 4):
    """Left: held-out patches' prototype vs true program (row-normalised contingency, all folds).
    Right: for a few held-out subjects, their H&E patches framed in the colour of their prototype."""
    import matplotlib.pyplot as plt
    from PIL import Image

    from mmlib.cohorts.glioma import PROGRAMS

    if data.programs is None:
        return None
    items = sorted((f, a) for (m, f), a in cv.assignments.items() if m == model)
    if not items:
        return None
    # one fold: each fold's model numbers its prototypes its own way
    fold, assign = items[0]
    _, test = data.split(fold)
    k = int(max(x.max() for x in assign)) + 1
    tab = np.zeros((len(PROGRAMS), k))
    for i, a in zip(test, assign):
        np.add.at(tab, (data.programs[i], a), 1)
    share = tab / np.maximum(tab.sum(1, keepdims=True), 1)
    colours = plt.get_cmap("tab10" if k <= 10 else "tab20").colors
    grades = data.table["grade"].to_numpy()
    picks = []
    for g in np.unique(grades)[::-1]:
        picks += [j for j, i in enumerate(test) if grades[i] == g][:1]
    picks = (picks + [j for j in range(len(test)) if j not in picks])[:n_subjects]
    n_tiles = 6
    fig = plt.figure(figsize=(5 + 1.5 * n_tiles, 1.6 * max(n_subjects, 3) + 0.8))
    gs = fig.add_gridspec(max(n_subjects, 3), n_tiles + 3)
    ax = fig.add_subplot(gs[:, :3])
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_yticks(range(len(PROGRAMS)), [_SHORT.get(p, p) for p in PROGRAMS])
    ax.set_xticks(range(k), [f"P{j}" for j in range(k)])
    for tick, j in zip(ax.get_xticklabels(), range(k)):
        tick.set_color(colours[j % len(colours)])
    ax.set_xlabel("prototype (argmax of S)")
    ax.set_title(f"share of each program's patches per prototype\n(held-out fold {fold})", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.05)
    root = data.root
    for r, j in enumerate(picks):
        i = test[j]
        sid = data.table["subject_id"].iloc[i]
        pngs = sorted((root / "patches" / sid).glob("p*.png")) if root is not None else []
        row_of = {int(rw): n for n, rw in enumerate(data.patch_rows[i])}
        shown = [(p, row_of[int(p.stem[1:])]) for p in pngs if int(p.stem[1:]) in row_of][:n_tiles]
        for c in range(n_tiles):
            a = fig.add_subplot(gs[r, 3 + c])
            a.set_xticks([]), a.set_yticks([])
            if c >= len(shown):
                a.axis("off")
                continue
            path, n = shown[c]
            a.imshow(np.asarray(Image.open(path)))
            proto = int(assign[j][n])
            for s in a.spines.values():
                s.set_edgecolor(colours[proto % len(colours)])
                s.set_linewidth(4)
            a.set_title(f"P{proto} · {_SHORT.get(PROGRAMS[data.programs[i][n]], '?')}", fontsize=8)
            if c == 0:
                a.set_ylabel(f"{sid}\ngrade {data.grade_names[grades[i]]}", fontsize=8)
    fig.suptitle(f"What {model}'s prototypes capture: frame = prototype, title = prototype · true program")
    fig.tight_layout()
    return fig


def _group_importance(data: P5Data) -> pd.DataFrame | None:
    """Planted importance of each gene group per task: |loading| on the factors that drive it."""
    try:
        loads = data.truth["causal_model"]["rna"]["group_loadings"]
    except (KeyError, TypeError):
        return None
    rows = []
    for g in data.group_names:
        l_ = loads[g]
        rows.append({"group": g, "grade": abs(l_["grade"]),
                     "subtype": float(np.linalg.norm([l_["idh_mutant"], l_["codeletion"], l_["oligo_lineage"]])),
                     "survival": abs(l_["grade"]) + abs(l_["aggressiveness_beyond_grade"])})
    return pd.DataFrame(rows).set_index("group")


def gene_group_attention(cv: CVResult, data: P5Data) -> pd.DataFrame | None:
    """UMEML's decoder attention to each gene-group token, ranked against the planted loadings.

    The attention is read in the decoder's last layer from the two positions the heads read
    (the pathology and genomic CLS tokens), averaged over heads, both queries and the held-out
    subjects of every fold, and normalised over the gene-group tokens. The planted importance
    of a group is its |loading| on grade (grading), the norm of its IDH / codeletion / lineage
    loadings (subtyping) and |grade| + |aggressiveness| loadings (survival).
    """
    from scipy.stats import spearmanr

    if not cv.decoder:
        return None
    att = []
    for a, seg in cv.decoder.values():
        g0 = seg["genomics"].start
        cls = [0, g0]
        att.append(a[:, cls, g0 + 1: g0 + 1 + len(data.group_names)].mean(1))
    share = np.concatenate(att).mean(0)
    share = share / share.sum()
    df = pd.DataFrame({"group": data.group_names, "attention share": share}).set_index("group")
    imp = _group_importance(data)
    if imp is not None:
        for task in imp.columns:
            df[f"planted |loading| ({task})"] = imp[task]
        df.attrs["spearman"] = {t: float(spearmanr(df["attention share"], imp[t]).statistic) for t in imp.columns}
        df.attrs["top planted"] = {t: imp[t].idxmax() for t in imp.columns}
    df.attrs["top attended"] = df["attention share"].idxmax()
    return df.sort_values("attention share", ascending=False).reset_index()


def attention_figure(cv: CVResult, data: P5Data):
    """UMEML's mean decoder attention (last layer, held-out subjects, all folds) with the segments marked."""
    import matplotlib.pyplot as plt

    if not cv.decoder:
        return None
    a = np.concatenate([x for x, _ in cv.decoder.values()]).mean(0)
    seg = next(iter(cv.decoder.values()))[1]
    k = seg["pathology"].stop - seg["pathology"].start - 1
    r = seg["registers"].stop - seg["registers"].start
    labels = ["path CLS"] + [f"P{j}" for j in range(k)] + [f"reg{j}" for j in range(r)] + ["gen CLS"] + \
        [textwrap.fill(g.replace("_", " "), 16) for g in data.group_names]  # whole names, long ones on two lines
    fig, ax = plt.subplots(figsize=(0.42 * len(labels) + 3, 0.42 * len(labels) + 1.5))
    im = ax.imshow(a, cmap="magma", aspect="equal")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for b in (seg["registers"].start, seg["genomics"].start):
        ax.axhline(b - 0.5, color="white", lw=1)
        ax.axvline(b - 0.5, color="white", lw=1)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    fig.colorbar(im, ax=ax, fraction=0.04, label="attention weight")
    ax.set_title("UMEML unified decoder: attention across pathology, registers and genomics\n"
                 "(last layer, mean over heads and held-out subjects)", fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- paper vs run, claims


PAPER_REPORTED = pd.DataFrame([
    ("grading (3 classes)", "accuracy 77.56%, AUC 92.12%"),
    ("classification (public code: 6 classes)", "accuracy 75.14%, AUC 95.94%"),
    ("survival (4 discrete-time bins)", "c-index 83.96%"),
    ("ablations", "removing the modularity loss or the register tokens lowers every task (paper's tables)"),
    ("baselines", "UMEML beats pathology-only, genomics-only, add, concat, Kronecker and MCAT co-attention"),
], columns=["what", "paper reported"])


def _summary(per_fold: pd.DataFrame, model: str, metric: str) -> str:
    """Mean ± sd over folds in percent, as the paper prints its numbers."""
    v = 100 * per_fold.loc[per_fold["model"] == model, metric]
    return f"{v.mean():.2f}% ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"


def paper_vs_run(per_fold: pd.DataFrame) -> pd.DataFrame:
    """The paper's reported numbers beside UMEML's on this data (mean ± sd over folds, in percent)."""
    return pd.DataFrame([
        {"quantity": "grading accuracy", "paper reported": "77.56%", "this run": _summary(per_fold, "UMEML", "grade accuracy")},
        {"quantity": "grading AUC", "paper reported": "92.12%", "this run": _summary(per_fold, "UMEML", "grade AUC")},
        {"quantity": "classification accuracy", "paper reported": "75.14%",
         "this run": _summary(per_fold, "UMEML", "subtype accuracy")},
        {"quantity": "classification AUC", "paper reported": "95.94%", "this run": _summary(per_fold, "UMEML", "subtype AUC")},
        {"quantity": "survival c-index", "paper reported": "83.96%",
         "this run": _summary(per_fold, "UMEML", "survival c-index")},
    ]).assign(**{"held on this data": "not comparable: generated cohort (the planted signal sets the ceiling)"})


def claims_table(per_fold: pd.DataFrame, diffs: pd.DataFrame, recovery: pd.DataFrame | None,
                 attention: pd.DataFrame | None) -> pd.DataFrame:
    """Which of the paper's claims held in this run, with the numbers that decide."""
    rows = []

    def verdict(sub: pd.DataFrame) -> tuple[str, str]:
        shown = int(sub["shown (mean - 2 se > 0)"].sum())
        ahead = int((sub["UMEML minus model"] > 0).sum())
        held = "yes" if shown == len(sub) else ("partly" if ahead > len(sub) / 2 or shown else "no")
        return held, f"UMEML ahead on mean in {ahead}/{len(sub)}, by more than 2 se in {shown}/{len(sub)}"

    for label, models in (("single-modality", ["pathology only", "genomics only"]),
                          ("simple-fusion", ["add", "concat", "bilinear (Kronecker)", "co-attention (MCAT)"])):
        sub = diffs[diffs["model"].isin(models)]
        if len(sub):
            held, text = verdict(sub)
            worst = sub.loc[sub["UMEML minus model"].idxmin()]
            rows.append({"claim": f"UMEML beats the {label} baselines",
                         "paper reported": "yes, on every task",
                         "this run": f"{text} (model × metric pairs); largest shortfall: {worst['model']}, "
                                     f"{worst['metric']} {worst['UMEML minus model']:+.3f}",
                         "held": held})
    for label, model in (("the modularity loss helps", "UMEML w/o modularity loss"),
                         ("the register tokens help", "UMEML w/o register tokens")):
        sub = diffs[diffs["model"] == model]
        if len(sub):
            held, text = verdict(sub)
            detail = "; ".join(f"{m} {d:+.3f}" for m, d in zip(sub["metric"], sub["UMEML minus model"]))
            rows.append({"claim": label, "paper reported": "yes (ablation)",
                         "this run": f"{text} metrics: {detail}", "held": held})
    if recovery is not None:
        rec = recovery.set_index("method")
        km = rec[rec.index.str.startswith("k-means")]
        if "UMEML" in rec.index and len(km):
            u = rec.loc["UMEML"]
            best_km = km["ARI"].idxmax()
            rows.append({"claim": "prototypes cluster the patches into meaningful tissue groups",
                         "paper reported": "implied (prototype assignment; not measured)",
                         "this run": f"ARI vs planted programs: UMEML {u['ARI']:.3f} ± {u['ARI sd']:.3f}; "
                                     f"best k-means ({best_km}) {km.loc[best_km, 'ARI']:.3f}",
                         "held": "yes" if u["ARI"] > km["ARI"].max() else ("partly" if u["ARI"] > 0.1 else "no")})
        if "UMEML w/o modularity loss" in rec.index and "UMEML" in rec.index:
            a, b = rec.loc["UMEML", "ARI"], rec.loc["UMEML w/o modularity loss", "ARI"]
            rows.append({"claim": "the modularity loss ties the prototypes to the patch graph's communities",
                         "paper reported": "yes (method)",
                         "this run": f"prototype ARI with the loss {a:.3f}, without {b:.3f}",
                         "held": "yes" if a > b else "no"})
    if attention is not None and "spearman" in attention.attrs:
        rho = attention.attrs["spearman"]
        rows.append({"claim": "decoder attention points at the gene groups that drive the outcome",
                     "paper reported": "attention maps shown (not scored)",
                     "this run": "Spearman(attention, planted |loading|): "
                                 + ", ".join(f"{k} {v:+.2f}" for k, v in rho.items())
                                 + f"; most attended: {attention.attrs['top attended']}",
                     "held": "yes" if min(rho.values()) > 0.5 else ("partly" if max(rho.values()) > 0.5 else "no")})
    return pd.DataFrame(rows)

