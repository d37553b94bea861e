"""Logic of ``notebooks/p1_stroke_mri_clip_itm.py`` (P1: CLIP + image-tabular matching, stroke risk).

Stages, each a plain function the notebook calls in order:

1. :func:`load_data` -- FLAIR volumes on the profile's grid, the clinical table encoded for the
   :class:`~mmlib.models.TabularEncoder` (categorical codes, z-scored continuous values, missing
   kept as missing), the label, the splits and the planted-lesion truth mask.
2. :func:`pretrain` -- one self-supervised objective on the unlabelled pool plus the training
   images (labels unused): ``simclr`` (two image views), ``scarf`` (table vs corrupted table),
   ``clip`` (image view vs table view: MMCL), ``clip_itm`` (CLIP + ITM with hard negatives: the
   paper) and ``clip_itm_random`` (the ablation: ITM negatives drawn uniformly).
3. :func:`finetune` -- a classifier per compared method (supervised baselines from scratch,
   pretrained ones from their encoders), the whole network trained, best validation epoch kept.
4. :func:`evaluate` -- test ROC-AUC and balanced accuracy at the Youden threshold chosen on the
   validation split, with bootstrap intervals.
5. :func:`retrieval_table`, :func:`umap_figure`, :func:`gradcam_study` -- alignment and
   interpretability, scored against the planted truth; then the claims table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from mmlib import core, fast, metrics
from mmlib.augment import ImageAugment3d, TabularCorruption
from mmlib.core import Profile, ProfileSet
from mmlib.data import Cohort
from mmlib.explain import (
    grad_cam,
    grad_cam_layers,
    grid_ceiling,
    input_gradient,
    localisation_scores,
    occlusion_map,
    upsample_layer_map,
)
from mmlib.losses import ClipLoss, ImageTabularMatchingLoss
from mmlib.models import EnsembleClassifier, ImageTabularCLIP
from mmlib.replicates import VerdictTable
from mmlib.train import fit, load_checkpoint

__all__ = [
    "ABLATION", "ALL_METHODS", "ATTRIBUTION_MAPS", "METHODS", "OBJECTIVES", "PAPER_RELATIVE_GAINS", "PROFILES",
    "VERDICT_TABLES", "FineTuned", "GradCamStudy", "P1Classifier", "P1Data", "P1Profile", "Pretrained", "Pretrainer",
    "build_clip", "claims_table", "cohort_table", "comparison_table", "embeddings", "encode_table", "evaluate",
    "finetune", "finetune_all", "gradcam_by_stage", "gradcam_study", "itm_check", "load_data", "localisation_summary",
    "localisation_verdict", "paper_vs_run", "predict", "pretrain", "pretrain_all", "relative_gains", "retrieval_table",
    "stage_verdict", "umap_figure", "untrained_classifier",
]

log = core.get_logger(__name__)

# compared methods: name -> (pretraining objective or None, classifier heads)
METHODS: dict[str, tuple[str | None, str]] = {
    "supervised image": (None, "image"),
    "supervised tabular": (None, "tabular"),
    "supervised multimodal (concat)": (None, "concat"),
    "SimCLR image": ("simclr", "image"),
    "SCARF tabular": ("scarf", "tabular"),
    "MMCL (CLIP, no ITM)": ("clip", "image+tabular"),
    "CLIP + ITM (paper)": ("clip_itm", "ensemble"),
}
ABLATION = "CLIP + ITM, random negatives"
ALL_METHODS: dict[str, tuple[str | None, str]] = {**METHODS, ABLATION: ("clip_itm_random", "ensemble")}
OBJECTIVES = ("simclr", "scarf", "clip", "clip_itm", "clip_itm_random")
PAPER = "CLIP + ITM (paper)"
SSL_UNIMODAL = ("SimCLR image", "SCARF tabular")
SUPERVISED_MULTIMODAL = ("supervised multimodal (concat)",)
# P1 reports relative gains only (section 4): (comparison, metric, paper reported %)
PAPER_RELATIVE_GAINS = pd.DataFrame(
    [("over the best self-supervised unimodal model", "ROC-AUC", 2.1),
     ("over the best self-supervised unimodal model", "balanced accuracy", 10.6),
     ("over the best supervised multimodal model", "balanced accuracy", 7.6)],
    columns=["comparison", "metric", "paper reported gain %"])


@dataclass(frozen=True)
class P1Profile(Profile):
    """Sizes of one P1 run. ``full`` is the paper; ``quick`` and ``smoke`` shrink widths and epochs."""

    preset: str = "quick"  # cohort preset generated when data_dir holds no manifest
    spacing_mm: tuple[float, float, float] = (4.0, 4.0, 4.0)
    spatial_size: tuple[int, int, int] = (40, 48, 40)  # the brain FOV (152 x 188 x 160 mm) at 4 mm, padded
    widths: tuple[int, int, int, int] = (8, 16, 32, 64)  # ResNet-50: 64-128-256-512 (x4 bottleneck)
    layers: tuple[int, int, int, int] = (1, 1, 1, 1)  # ResNet-50: 3-4-6-3
    # ResNet-50's stem (conv1 stride 2 + max pool): the last stage is a 2x2x2 grid at 40x48x40, so Grad-CAM
    # is that coarse here; stride 1 gives 3x3x3 but costs ~13x the compute on a CPU
    conv1_stride: int = 2
    tabular_hidden: int = 128  # paper 2048
    proj_dim: int = 32  # paper 128
    interaction_dim: int = 32  # public example 256
    interaction_layers: int = 1  # public example 2
    interaction_heads: int = 2  # public example 4
    temperature: float = 0.1
    augment_rate: float = 0.95
    corruption_rate: float = 0.3
    pretrain_epochs: int = 20  # paper 100
    warmup_epochs: int = 2  # paper 10
    pretrain_batch: int = 32  # paper 6 (memory-bound); contrastive losses want more negatives
    pretrain_lr: float = 1e-3  # paper 3e-4 over 100 epochs; at 3e-4 x 12 epochs the CLIP loss stayed at chance
    weight_decay: float = 1e-3
    finetune_epochs: int = 15  # paper 50
    finetune_batch: int = 16
    finetune_lr: float = 3e-4  # paper 1e-5 for 50 epochs on a ResNet-50
    gradcam_cases: int = 8  # true-positive test cases scored against the planted lesions
    gradcam_layer: str = "layer4"  # the ResNet stage Grad-CAM weights (layer4 = the last, Grad-CAM's usual choice)
    occlusion_mask: tuple[int, int, int] = (4, 4, 4)  # the finer companion map: 1,200 forward passes a case
    n_boot: int = 500
    precision: str = "fp32"
    # mmlib.fast's fp32-exact options: channels-last 3D convolutions and the fused Adam/AdamW update. On for
    # `full` (the layout cuDNN's bf16 kernels want; the GPU gain is not measured yet). Off on the CPU sizes:
    # 2 CPU threads, quick, 3 pretraining epochs took 9.7 / 9.9 s with it vs 9.7 / 8.8 s without
    fast: bool = False


PROFILES = ProfileSet(
    smoke=P1Profile(name="smoke", preset="smoke", spacing_mm=(8.0, 8.0, 8.0), spatial_size=(20, 24, 20),
                    widths=(4, 4, 8, 8), tabular_hidden=16, proj_dim=8, interaction_dim=8, pretrain_epochs=2,
                    warmup_epochs=0, pretrain_batch=8, finetune_epochs=2, finetune_batch=8, gradcam_cases=2,
                    occlusion_mask=(5, 6, 5),
                    n_boot=50),
    quick=P1Profile(name="quick"),
    full=P1Profile(name="full", preset="full", spacing_mm=(2.0, 2.0, 2.0), spatial_size=(80, 96, 80),
                   widths=(64, 128, 256, 512), layers=(3, 4, 6, 3), tabular_hidden=2048,
                   proj_dim=128, interaction_dim=256, interaction_layers=2, interaction_heads=4,
                   pretrain_epochs=100, warmup_epochs=10, pretrain_batch=32, pretrain_lr=3e-4, finetune_epochs=50,
                   finetune_lr=1e-5,
                   gradcam_cases=20, occlusion_mask=(8, 8, 8), n_boot=2000, precision="auto", fast=True),
)


# --------------------------------------------------------------------------- data


@dataclass
class P1Data:
    """Everything the models see, in memory.

    Attributes:
        table: one row per subject (``subject_id``, ``split``, ``label``; NaN label in the pool).
        images: (N, 1, X, Y, Z) float16 FLAIR in [0, 1].
        categorical: (N, n_cat) long codes, -1 = missing.
        continuous: (N, n_cont) float32, z-scored on the pool + train rows, NaN = missing.
        n_categories: levels per categorical field.
        fields: ``{"categorical": [...], "continuous": [...]}`` column names.
        truth: (N, X, Y, Z) bool: WMH voxels inside the outcome region (None without masks).
        lesions: (N, X, Y, Z) bool: every planted WMH voxel (None without masks).
        spacing_mm: voxel size of ``images``.
    """

    table: pd.DataFrame
    images: torch.Tensor
    categorical: torch.Tensor
    continuous: torch.Tensor
    n_categories: list[int]
    fields: dict[str, list[str]]
    truth: torch.Tensor | None
    spacing_mm: tuple[float, float, float]
    lesions: torch.Tensor | None = None
    truth_card: dict[str, Any] = field(default_factory=dict)

    def index(self, which: str) -> np.ndarray:
        """Rows of ``pretrain`` (the unlabelled pool), ``train``/``val``/``test``, or ``ssl`` (pool + train)."""
        s = self.table["split"]
        sel = {"pretrain": s == "pretrain", "train": s == "train", "val": s == "val", "test": s == "test",
               "ssl": s.isin(["pretrain", "train"])}
        if which not in sel:
            raise ValueError(f"unknown subset {which!r}; choose one of {sorted(sel)}")
        return np.flatnonzero(sel[which].to_numpy())

    def labels(self, idx: np.ndarray) -> np.ndarray:
        return self.table["label"].to_numpy(float)[idx].astype(int)

    def batch(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        i = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        lab = torch.as_tensor(np.nan_to_num(self.table["label"].to_numpy(dtype=np.float64, copy=True), nan=-1.0))
        return {"image": self.images[i].float(), "categorical": self.categorical[i], "continuous": self.continuous[i],
                "label": lab[i].long()}

    def batches(self, idx: np.ndarray, batch_size: int, *, shuffle_seed: int | None = None, drop_last: bool = False):
        idx = np.asarray(idx)
        if shuffle_seed is not None:
            idx = np.random.default_rng(shuffle_seed).permutation(idx)
        stop = len(idx) - (len(idx) % batch_size if drop_last else 0)
        for s in range(0, stop, batch_size):
            yield self.batch(idx[s:s + batch_size])


def encode_table(cohort: Cohort, fit_rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list[int], dict[str, list[str]]]:
    """Categorical codes (-1 missing) and z-scored continuous values (NaN missing) of every clinical column.

    Categorical: the manifest's ``category`` (its declared levels) and ``bool`` columns. Continuous:
    ``float``/``int`` columns. Labels, the split and the id are left out. Means and SDs come from
    ``fit_rows`` only.
    """
    m = cohort.manifest
    skip = set(m.labels) | {m.split_column, m.id_column}
    t = cohort.subjects
    cat_cols, cont_cols, n_levels, codes, conts = [], [], [], [], []
    for c in m.columns:
        if c.name in skip:
            continue
        col = t[c.name]
        if c.dtype == "category":
            levels = list(c.categories or [])
            bad = sorted(set(col.dropna().astype(str)) - set(levels))
            if bad:
                raise ValueError(f"{cohort.root}/subjects.csv column {c.name!r}: values {bad} are not declared "
                                 f"categories {levels}")
            lookup = {v: k for k, v in enumerate(levels)}
            codes.append(np.array([lookup[str(v)] if pd.notna(v) else -1 for v in col], dtype=np.int64))
            n_levels.append(len(levels))
            cat_cols.append(c.name)
        elif c.dtype == "bool":
            codes.append(np.array([int(bool(v)) if pd.notna(v) else -1 for v in col], dtype=np.int64))
            n_levels.append(2)
            cat_cols.append(c.name)
        elif c.dtype in ("float", "int"):
            x = pd.to_numeric(col, errors="coerce").to_numpy(float)
            ref = x[fit_rows]
            mu, sd = np.nanmean(ref), np.nanstd(ref)
            conts.append(((x - mu) / (sd if sd > 0 else 1.0)).astype(np.float32))
            cont_cols.append(c.name)
    cat = torch.as_tensor(np.stack(codes, 1)) if codes else torch.zeros(len(t), 0, dtype=torch.long)
    cont = torch.as_tensor(np.stack(conts, 1)) if conts else torch.zeros(len(t), 0)
    return cat, cont, n_levels, {"categorical": cat_cols, "continuous": cont_cols}


def _outcome_region_mask(cohort: Cohort, prof: P1Profile) -> np.ndarray | None:
    """The outcome region of the generated cohort on the model grid (None for a cohort without one)."""
    knobs = (cohort.truth or {}).get("knobs", {})
    region = knobs.get("lesion_region")
    if region is None:
        return None
    from monai.transforms import ResizeWithPadOrCrop

    from mmlib.cohorts import stroke_mri

    if tuple(knobs.get("spacing_mm", ())) != tuple(prof.spacing_mm):
        raise ValueError(f"cohort {cohort.name!r} has {knobs.get('spacing_mm')} mm voxels but the profile reads "
                         f"{prof.spacing_mm} mm; the region atlas is only defined on the cohort's grid")
    anat = stroke_mri.anatomy(tuple(prof.spacing_mm), knobs.get("volume_shape"))
    k = stroke_mri.ALL_REGIONS.index(region) + 1
    atlas = (anat["atlas"] == k)[None].astype(np.uint8)
    return np.asarray(ResizeWithPadOrCrop(prof.spatial_size)(atlas))[0] > 0


def load_data(cohort: Cohort, prof: P1Profile) -> P1Data:
    """Read the cohort's FLAIR volumes and lesion masks onto the profile's grid and encode its table."""
    from mmlib.data.readers import volume_dataset, volume_transforms

    m = cohort.manifest
    if not m.labels or m.split_column is None:
        raise ValueError(f"cohort {cohort.name!r} ({cohort.root}/manifest.json) needs a label column and a split "
                         "column (pretrain / train / val / test); see data_manifest/real/uk_biobank.md")
    label_col = m.labels[0]
    t = cohort.subjects.rename(columns={m.id_column: "subject_id", m.split_column: "split", label_col: "label"}).copy()
    t["subject_id"] = t["subject_id"].astype(str)
    t["split"] = t["split"].astype(str)
    for s in ("train", "val", "test"):
        n = t.loc[t["split"] == s, "label"].dropna().nunique()
        if n < 2:
            raise ValueError(f"cohort {cohort.name!r}: the {s!r} split needs both classes of {label_col!r}, has {n}")
    fit_rows = np.flatnonzero(t["split"].isin(["pretrain", "train"]).to_numpy())
    cat, cont, n_levels, fields = encode_table(cohort, fit_rows)
    mods = [x.name for x in m.modalities]
    image_mod = "flair" if "flair" in mods else mods[0]
    keys = {"image": image_mod} | ({"mask": "lesion_mask"} if "lesion_mask" in mods else {})
    tf = volume_transforms(kind="mri", spacing_mm=prof.spacing_mm, spatial_size=prof.spatial_size,
                           keys=["image"], mask_keys=["mask"] if "mask" in keys else [])
    ds = volume_dataset(cohort, keys, tf, cache=None)
    images, masks, ids = [], [], []
    for i in core.progress(range(len(ds)), desc="load FLAIR"):
        item = ds[i]
        images.append(torch.as_tensor(item["image"]).as_subclass(torch.Tensor).half())
        if "mask" in item:
            masks.append(torch.as_tensor(item["mask"]).as_subclass(torch.Tensor)[0] > 0)
        ids.append(str(item["subject_id"]))
    order = {s: i for i, s in enumerate(ids)}
    keep = t["subject_id"].isin(order).to_numpy(copy=True)  # writable: pandas 3 hands out read-only views
    t = t[keep].reset_index(drop=True)
    pos = torch.as_tensor([order[s] for s in t["subject_id"]])
    truth = lesions = None
    region = _outcome_region_mask(cohort, prof) if masks else None
    if masks:
        lesions = torch.stack(masks)[pos]
        if region is not None:
            truth = lesions & torch.as_tensor(region)[None]
    return P1Data(table=t, images=torch.stack(images)[pos], categorical=cat[keep], continuous=cont[keep],
                  n_categories=n_levels, fields=fields, truth=truth, spacing_mm=tuple(prof.spacing_mm),
                  lesions=lesions, truth_card=dict(cohort.truth or {}))


def cohort_table(data: P1Data) -> pd.DataFrame:
    """Subjects per split and class, beside the paper's setting."""
    t = data.table
    rows = []
    for s in ("pretrain", "train", "val", "test"):
        sub = t[t["split"] == s]
        rows.append({"split": s, "subjects": len(sub),
                     "stroke": int((sub["label"] == 1).sum()) if s != "pretrain" else None,
                     "no stroke": int((sub["label"] == 0).sum()) if s != "pretrain" else None,
                     "used for": {"pretrain": "self-supervised pretraining (no labels)",
                                  "train": "pretraining images + fine-tuning", "val": "best epoch, Youden threshold",
                                  "test": "reported metrics"}[s]})
    rows.append({"split": "paper reported", "subjects": None, "stroke": None, "no stroke": None,
                 "used for": "~5000 UK Biobank subjects for pretraining; class-balanced downstream splits"})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- models


def build_clip(data: P1Data, prof: P1Profile) -> ImageTabularCLIP:
    """The image + tabular encoders, projections and interaction module at the profile's sizes
    (with ``prof.fast`` the convolutions are stored channels-last; same parameters and keys)."""
    clip = ImageTabularCLIP(
        n_categories=data.n_categories, n_continuous=data.continuous.shape[1], widths=prof.widths, layers=prof.layers,
        conv1_stride=prof.conv1_stride, hidden=prof.tabular_hidden, proj_dim=prof.proj_dim,
        interaction_dim=prof.interaction_dim, interaction_layers=prof.interaction_layers,
        interaction_heads=prof.interaction_heads)
    if prof.fast:
        fast.channels_last(clip)
    return clip


def _optimizer(cls: type[torch.optim.Optimizer], model: nn.Module, lr: float, prof: P1Profile) -> torch.optim.Optimizer:
    """``cls`` (Adam or AdamW), with the fused update kernel where ``prof.fast`` and the device has one."""
    params = list(model.parameters())
    fused = {"fused": True} if prof.fast and fast.fused_adamw_supported(params) else {}
    return cls(params, lr=lr, weight_decay=prof.weight_decay, **fused)


class Pretrainer(nn.Module):
    """One self-supervised objective around an :class:`ImageTabularCLIP` (its views, losses and ITM head).

    Objectives: ``simclr`` (two augmented image views), ``scarf`` (table vs SCARF-corrupted table),
    ``clip`` (augmented image vs corrupted table), ``clip_itm`` (CLIP + ITM with hard negatives,
    loss = (ITC + ITM) / 2) and ``clip_itm_random`` (ITM negatives uniform over the batch).
    """

    def __init__(self, clip: ImageTabularCLIP, objective: str, prof: P1Profile, corruption: TabularCorruption) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
        self.clip, self.objective = clip, objective
        self.itc = ClipLoss(temperature=prof.temperature)
        self.itm = ImageTabularMatchingLoss(prof.interaction_dim) if objective.startswith("clip_itm") else None
        self.augment = ImageAugment3d(rate=prof.augment_rate)
        self.corruption = corruption

    def _seed(self) -> int:
        return int(torch.randint(0, 2**31 - 1, (1,)).item())  # from the epoch-seeded global stream (fit)

    def _image_view(self, x: torch.Tensor) -> torch.Tensor:
        return self.augment(x, self._seed()) if self.training else x

    def _table_view(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.training:
            return batch["categorical"], batch["continuous"]
        cat, cont = self.corruption(batch["categorical"].cpu(), batch["continuous"].cpu(), self._seed())
        return cat.to(batch["categorical"].device), cont.to(batch["continuous"].device)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.clip
        if self.objective == "simclr":
            z = [c.image_projection(c.image_encoder(self._image_view(batch["image"]))["features"]) for _ in range(2)]
            return {"loss": self.itc(z[0], z[1])["loss"]}
        if self.objective == "scarf":
            anchor = c.tabular_projection(c.tabular_encoder(batch["categorical"], batch["continuous"]))
            view = c.tabular_projection(c.tabular_encoder(*self._table_view(batch)))
            return {"loss": self.itc(anchor, view)["loss"]}
        cat, cont = self._table_view(batch)
        out = c({"image": self._image_view(batch["image"]), "categorical": cat, "continuous": cont})
        itc = self.itc(out["image_embedding"], out["tabular_embedding"])
        if self.itm is None:
            return {"loss": itc["loss"], "itc": itc["loss"]}
        logits = itc["local_logits"]
        if self.objective == "clip_itm_random":
            logits = torch.zeros_like(logits)  # uniform over the other subjects of the batch
        itm = self.itm(c.fuse, out["image_tokens"], out["tabular_features"], logits.detach())
        return {"loss": 0.5 * (itc["loss"] + itm["loss"]), "itc": itc["loss"], "itm": itm["loss"],
                "itm_accuracy": itm["accuracy"]}


def itm_check(history: pd.DataFrame) -> pd.DataFrame:
    """Final-epoch validation ITM accuracy per ITM objective, beside the 2/3 of always answering "mismatch"."""
    h = history[history["objective"].str.startswith("clip_itm")]
    if "val_itm_accuracy" not in h:
        return pd.DataFrame()
    last = h.sort_values("epoch").groupby("objective").tail(1)
    return pd.DataFrame({"objective": last["objective"], "val ITM accuracy (last epoch)": last["val_itm_accuracy"].round(3),
                         "always 'mismatch'": round(2 / 3, 3),
                         "learnt to tell pairs apart": np.where(last["val_itm_accuracy"] > 2 / 3 + 0.02, "yes", "no")})


def _warmup_cosine(warmup: int, epochs: int):
    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        span = max(epochs - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / span))
    return factor


@dataclass
class Pretrained:
    models: dict[str, ImageTabularCLIP]
    history: pd.DataFrame
    init: ImageTabularCLIP  # the shared random initialisation ("before pretraining")


def pretrain(objective: str, data: P1Data, prof: P1Profile, *, ckpt_dir: str | Path, device: torch.device,
             seed: int = 0, resume: bool = False) -> tuple[ImageTabularCLIP, pd.DataFrame]:
    """Train ``objective`` on the unlabelled pool + training images; keep the best validation epoch."""
    torch.manual_seed(seed)
    clip = build_clip(data, prof)
    idx = data.index("ssl")
    corruption = TabularCorruption(prof.corruption_rate).fit(data.categorical[idx], data.continuous[idx])
    model = Pretrainer(clip, objective, prof, corruption)
    opt = _optimizer(torch.optim.Adam, model, prof.pretrain_lr, prof)
    val = data.index("val")
    stem = Path(ckpt_dir) / f"pretrain-{objective}"
    hist = fit(model, loss_fn=lambda m, b: m(b),
               train_batches=lambda e: data.batches(idx, prof.pretrain_batch, shuffle_seed=seed * 1000 + e, drop_last=True),
               val_batches=lambda: data.batches(val, prof.pretrain_batch), epochs=prof.pretrain_epochs, optimizer=opt,
               checkpoint=stem, resume=resume, device=device, precision=prof.precision, seed=seed,
               meta={"objective": objective, "profile": prof.name}, desc=f"pretrain {objective}",
               lr_factor=_warmup_cosine(prof.warmup_epochs, prof.pretrain_epochs))
    state, _ = load_checkpoint(stem.with_name(stem.name + ".best"))
    model.load_state_dict(state)
    return model.clip.eval(), hist.assign(objective=objective)


def pretrain_all(data: P1Data, prof: P1Profile, *, ckpt_dir: str | Path, device: torch.device, seed: int = 0,
                 resume: bool = False) -> Pretrained:
    """Every objective the compared methods need, each from the same random initialisation."""
    models, hists = {}, []
    for obj in OBJECTIVES:
        models[obj], h = pretrain(obj, data, prof, ckpt_dir=ckpt_dir, device=device, seed=seed, resume=resume)
        hists.append(h)
    torch.manual_seed(seed)
    return Pretrained(models, pd.concat(hists, ignore_index=True), build_clip(data, prof).eval())


class P1Classifier(nn.Module):
    """Stroke classifier over an :class:`ImageTabularCLIP`'s encoders.

    ``heads``: ``image`` / ``tabular`` (a linear head on one encoder), ``concat`` (one linear head
    on both encoders' features: the supervised multimodal baseline), ``image+tabular`` (mean of an
    image and a tabular head's logits) or ``ensemble`` (the paper: mean of image, tabular and
    multimodal-token heads).
    """

    def __init__(self, clip: ImageTabularCLIP, heads: str, n_classes: int = 2) -> None:
        super().__init__()
        self.clip, self.heads = clip, heads
        img, tab = clip.image_encoder.out_features, clip.tabular_encoder.out_features
        if heads == "image":
            self.head = nn.Linear(img, n_classes)
        elif heads == "tabular":
            self.head = nn.Linear(tab, n_classes)
        elif heads == "concat":
            self.head = nn.Linear(img + tab, n_classes)
        elif heads == "image+tabular":
            self.head = nn.ModuleDict({"image": nn.Linear(img, n_classes), "tabular": nn.Linear(tab, n_classes)})
        elif heads == "ensemble":
            self.head = EnsembleClassifier(img, tab, clip.interaction.dim, n_classes)
        else:
            raise ValueError(f"unknown heads {heads!r}; choose image, tabular, concat, image+tabular or ensemble")

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.clip.gradcam_layer

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.clip
        uses_image = self.heads != "tabular"
        uses_table = self.heads != "image"
        im = c.image_encoder(batch["image"]) if uses_image else None
        tab = c.tabular_encoder(batch["categorical"], batch["continuous"]) if uses_table else None
        if self.heads == "image":
            return {"logits": self.head(im["features"])}
        if self.heads == "tabular":
            return {"logits": self.head(tab)}
        if self.heads == "concat":
            return {"logits": self.head(torch.cat([im["features"], tab], 1))}
        if self.heads == "image+tabular":
            return {"logits": 0.5 * (self.head["image"](im["features"]) + self.head["tabular"](tab))}
        return self.head(im["features"], tab, c.fuse(im["tokens"], tab))


@dataclass
class FineTuned:
    models: dict[str, P1Classifier]
    history: pd.DataFrame
    evals: dict[str, dict[str, Any]]


def finetune(method: str, data: P1Data, prof: P1Profile, pre: Pretrained | None, *, ckpt_dir: str | Path,
             device: torch.device, seed: int = 0, resume: bool = False) -> tuple[P1Classifier, pd.DataFrame]:
    """Train one compared method's classifier (whole network) on ``train``; best ``val`` epoch kept."""
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(ALL_METHODS)}")
    objective, heads = ALL_METHODS[method]
    torch.manual_seed(seed)
    if objective is None:
        clip = build_clip(data, prof)
    else:
        if pre is None or objective not in pre.models:
            raise ValueError(f"{method!r} needs the {objective!r} pretraining; run pretrain_all first")
        clip = build_clip(data, prof)
        clip.load_state_dict(pre.models[objective].state_dict())
    model = P1Classifier(clip, heads)
    augment = ImageAugment3d(rate=prof.augment_rate)

    def loss_fn(m: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if m.training and heads != "tabular":
            batch = dict(batch, image=augment(batch["image"], int(torch.randint(0, 2**31 - 1, (1,)).item())))
        return F.cross_entropy(m(batch)["logits"], batch["label"])

    tr, val = data.index("train"), data.index("val")
    opt = _optimizer(torch.optim.AdamW, model, prof.finetune_lr, prof)
    stem = Path(ckpt_dir) / f"finetune-{method.replace(' ', '_').replace('(', '').replace(')', '').replace(',', '')}"
    hist = fit(model, loss_fn=loss_fn,
               train_batches=lambda e: data.batches(tr, prof.finetune_batch, shuffle_seed=seed * 1000 + e, drop_last=True),
               val_batches=lambda: data.batches(val, prof.finetune_batch), epochs=prof.finetune_epochs, optimizer=opt,
               checkpoint=stem, resume=resume, device=device, precision=prof.precision, seed=seed,
               meta={"method": method, "profile": prof.name}, desc=f"fine-tune {method}")
    state, _ = load_checkpoint(stem.with_name(stem.name + ".best"))
    model.load_state_dict(state)
    return model.eval(), hist.assign(method=method)


def predict(model: nn.Module, data: P1Data, idx: np.ndarray, *, device: torch.device, batch_size: int = 16) -> np.ndarray:
    """P(stroke) for rows ``idx``."""
    model.eval().to(device)
    out = []
    with torch.no_grad():
        for b in data.batches(idx, batch_size):
            b = {k: v.to(device) for k, v in b.items()}
            out.append(torch.softmax(model(b)["logits"].float(), 1)[:, 1].cpu().numpy())
    return np.concatenate(out)


def evaluate(model: nn.Module, data: P1Data, prof: P1Profile, *, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Test ROC-AUC and balanced accuracy at the validation Youden threshold, with bootstrap CIs."""
    val, te = data.index("val"), data.index("test")
    p_val, p_te = predict(model, data, val, device=device), predict(model, data, te, device=device)
    y_val, y_te = data.labels(val), data.labels(te)
    thr = metrics.youden_threshold(y_val, p_val)
    auc = metrics.bootstrap_ci(roc_auc_score, y_te, p_te, n_boot=prof.n_boot, seed=seed, desc=None)
    ba = metrics.bootstrap_ci(lambda y, p: metrics.balanced_accuracy_at(y, p, thr), y_te, p_te, n_boot=prof.n_boot,
                              seed=seed, desc=None)
    return {"test AUC": auc, "test balanced accuracy": ba, "threshold": thr, "p_test": p_te, "y_test": y_te,
            "val AUC": float(roc_auc_score(y_val, p_val))}


def finetune_all(data: P1Data, prof: P1Profile, pre: Pretrained, *, ckpt_dir: str | Path, device: torch.device,
                 seed: int = 0, resume: bool = False) -> FineTuned:
    models, hists, evals = {}, [], {}
    for method in ALL_METHODS:
        models[method], h = finetune(method, data, prof, pre, ckpt_dir=ckpt_dir, device=device, seed=seed,
                                     resume=resume)
        hists.append(h)
        evals[method] = evaluate(models[method], data, prof, device=device, seed=seed)
    return FineTuned(models, pd.concat(hists, ignore_index=True), evals)


def _fmt(ci: tuple[float, float, float]) -> str:
    return f"{ci[1]:.3f}-{ci[2]:.3f}"


def comparison_table(ft: FineTuned, *, include_ablation: bool = False) -> pd.DataFrame:
    """The paper's comparison: every method's test ROC-AUC and balanced accuracy with 95% CIs."""
    rows = []
    for method, (objective, heads) in (ALL_METHODS if include_ablation else METHODS).items():
        ev = ft.evals[method]
        rows.append({"method": method, "pretraining": objective or "none (supervised)", "heads": heads,
                     "val AUC": round(ev["val AUC"], 3),
                     "test AUC": round(ev["test AUC"][0], 3), "AUC 95% CI": _fmt(ev["test AUC"]),
                     "test balanced accuracy": round(ev["test balanced accuracy"][0], 3),
                     "BA 95% CI": _fmt(ev["test balanced accuracy"]), "threshold (val Youden)": round(ev["threshold"], 3)})
    return pd.DataFrame(rows)


def _best(ft: FineTuned, names: Sequence[str], key: str) -> tuple[str, float]:
    name = max(names, key=lambda n: ft.evals[n][key][0])
    return name, ft.evals[name][key][0]


def relative_gains(ft: FineTuned) -> pd.DataFrame:
    """This run's relative gains of the paper's method beside the paper's reported ones."""
    ours = {"ROC-AUC": ft.evals[PAPER]["test AUC"][0], "balanced accuracy": ft.evals[PAPER]["test balanced accuracy"][0]}
    key = {"ROC-AUC": "test AUC", "balanced accuracy": "test balanced accuracy"}
    rows = []
    for _, r in PAPER_RELATIVE_GAINS.iterrows():
        pool = SSL_UNIMODAL if "self-supervised" in r["comparison"] else SUPERVISED_MULTIMODAL
        name, base = _best(ft, pool, key[r["metric"]])
        gain = 100.0 * (ours[r["metric"]] - base) / base
        rows.append({**r.to_dict(), "baseline in this run": f"{name} ({base:.3f})",
                     "this run gain %": round(gain, 1)})
    return pd.DataFrame(rows)


def _paired_diff(ft: FineTuned, a: str, b: str, metric: str, prof: P1Profile, seed: int) -> tuple[float, float, float]:
    ea, eb = ft.evals[a], ft.evals[b]
    thr_a, thr_b = ea["threshold"], eb["threshold"]
    if metric == "auc":
        def f(y, pa, pb):
            return roc_auc_score(y, pa) - roc_auc_score(y, pb)
    else:
        def f(y, pa, pb):
            return metrics.balanced_accuracy_at(y, pa, thr_a) - metrics.balanced_accuracy_at(y, pb, thr_b)
    return metrics.bootstrap_ci(f, ea["y_test"], ea["p_test"], eb["p_test"], n_boot=prof.n_boot, seed=seed, desc=None)


# --------------------------------------------------------------------------- alignment


def embeddings(clip: ImageTabularCLIP, data: P1Data, idx: np.ndarray, *, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised image and tabular embeddings of rows ``idx``."""
    clip.eval().to(device)
    zi, zt = [], []
    with torch.no_grad():
        for b in data.batches(idx, 16):
            out = clip({k: v.to(device) for k, v in b.items() if k != "label"})
            zi.append(F.normalize(out["image_embedding"].float(), dim=1).cpu().numpy())
            zt.append(F.normalize(out["tabular_embedding"].float(), dim=1).cpu().numpy())
    return np.concatenate(zi), np.concatenate(zt)


def retrieval_table(pre: Pretrained, data: P1Data, *, device: torch.device) -> pd.DataFrame:
    """Test-set cross-modal retrieval (does a subject's image retrieve its own table?) per multimodal model."""
    te = data.index("test")
    rows, ranks = [], {}
    models = {"before pretraining (random init)": pre.init,
              "MMCL (CLIP, no ITM)": pre.models["clip"], "CLIP + ITM (paper)": pre.models["clip_itm"],
              ABLATION: pre.models["clip_itm_random"]}
    for name, clip in models.items():
        zi, zt = embeddings(clip, data, te, device=device)
        sim = zi @ zt.T
        ranks[name] = _ranks(sim)
        ks = (1, 5) if len(sim) >= 5 else (1,)  # a smoke-sized test split can hold fewer than 5 subjects
        i2t, t2i = metrics.retrieval_recall(sim, ks), metrics.retrieval_recall(sim.T, ks)
        nan = float("nan")
        rows.append({"model": name, "image→table R@1": i2t["R@1"], "image→table R@5": i2t.get("R@5", nan),
                     "table→image R@1": t2i["R@1"], "table→image R@5": t2i.get("R@5", nan),
                     "chance R@1": i2t["chance@1"], "chance R@5": i2t.get("chance@5", nan),
                     "matched - mismatched cosine": float(np.diag(sim).mean() - sim[~np.eye(len(sim), dtype=bool)].mean()),
                     **_rank_test(sim, seed=0)})
    out = pd.DataFrame(rows).round(3)
    out.attrs["ranks"] = ranks  # per test subject, for paired comparisons (claims_table)
    return out


def _ranks(sim: np.ndarray) -> np.ndarray:
    """Rank (1 = best, ties against the model) of each row's own column."""
    return metrics.retrieval_ranks(sim) + 1


def _rank_test(sim: np.ndarray, *, n_perm: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean rank (1 = best) of each image's own table among all tables, its chance (N + 1) / 2, and the
    one-sided permutation p-value of a mean rank this good when the image-table pairing is shuffled."""
    n = len(sim)

    def mean_rank(s: np.ndarray) -> float:
        return float(_ranks(s).mean())

    obs = mean_rank(sim)
    rng = np.random.default_rng(seed)
    null = np.array([mean_rank(sim[:, rng.permutation(n)]) for _ in range(n_perm)])
    return {"image→table mean rank": obs, "chance mean rank": (n + 1) / 2,
            "permutation p": float((1 + (null <= obs).sum()) / (1 + n_perm))}


def umap_figure(pre: Pretrained, data: P1Data, *, device: torch.device, seed: int = 0):
    """UMAP of test + validation image and tabular embeddings, before and after CLIP + ITM pretraining."""
    import matplotlib.pyplot as plt
    import umap

    idx = np.concatenate([data.index("val"), data.index("test")])
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, (title, clip) in zip(axes, [("before pretraining", pre.init), ("after CLIP + ITM pretraining",
                                                                            pre.models["clip_itm"])]):
        zi, zt = embeddings(clip, data, idx, device=device)
        points = np.vstack([zi, zt])  # UMAP's default 15 neighbours, fewer on a smaller set (as UMAP would, silently)
        xy = umap.UMAP(n_neighbors=min(15, len(points) - 1), min_dist=0.3, random_state=seed,
                       n_jobs=1).fit_transform(points)
        a, b = xy[: len(idx)], xy[len(idx):]
        for p, q in zip(a, b):
            ax.plot([p[0], q[0]], [p[1], q[1]], color="0.8", lw=0.5, zorder=0)
        ax.scatter(*a.T, s=14, label="image", color="tab:blue")
        ax.scatter(*b.T, s=14, label="table", color="tab:orange")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(loc="best")
    fig.suptitle("Image and tabular embeddings (validation + test subjects; grey: a subject's pair)")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- Grad-CAM


@dataclass
class GradCamStudy:
    scores: pd.DataFrame  # one row per case, method, weights (trained / untrained), map and truth
    summary: pd.DataFrame  # per method, map and truth: trained vs untrained, and the verdict
    figure: Any  # the maps of the trained models on one true-positive case
    sanity_figure: Any  # the paper's model beside its untrained network on the same case
    case_text: str
    cases: dict[str, list[int]] = field(default_factory=dict)  # per method, the data rows scored


# The maps gradcam_study scores, in table order.
ATTRIBUTION_MAPS = ("Grad-CAM", "Grad-CAM, its own cells", "Guided Grad-CAM", "gradient saliency", "occlusion")


def _attribution_maps(model: nn.Module, b: Mapping[str, torch.Tensor], prof: P1Profile, device: torch.device,
                      ) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...] | None]]:
    """Every map of :data:`ATTRIBUTION_MAPS` for one sample, with the resolution it is scored at."""
    def logits(x, m=model):
        return m(x)["logits"]

    cam = grad_cam(logits, getattr(model.clip.image_encoder, prof.gradcam_layer), b, target=1, model=model)
    guided = input_gradient(logits, b, target=1, model=model, guided=True)[0]
    plain = input_gradient(logits, b, target=1, model=model)[0]
    occ = occlusion_map(lambda x, m=model: torch.softmax(m(x)["logits"].float(), 1)[:, 1:], b,
                        mask_size=prof.occlusion_mask, device=device, desc=None)
    cell = tuple(-(-v // g) for v, g in zip(cam.cam.shape, cam.layer_cam.shape))
    maps = {"Grad-CAM": cam.cam, "Grad-CAM, its own cells": cam.cam,
            "Guided Grad-CAM": np.maximum(guided * cam.cam, 0.0), "gradient saliency": np.abs(plain),
            "occlusion": occ.sensitivity}
    patches = {"Grad-CAM, its own cells": cell, "occlusion": tuple(prof.occlusion_mask)}
    return maps, {k: patches.get(k) for k in maps}


def untrained_classifier(method: str, data: P1Data, prof: P1Profile, *, seed: int = 0) -> P1Classifier:
    """``method``'s classifier at the random initialisation fine-tuning starts from (every method shares it)."""
    torch.manual_seed(seed)
    return P1Classifier(build_clip(data, prof), ALL_METHODS[method][1]).eval()


def gradcam_study(ft: FineTuned, data: P1Data, prof: P1Profile, *, device: torch.device,
                  methods: Sequence[str] = ("supervised image", PAPER), seed: int = 0) -> GradCamStudy:
    """Grad-CAM and three finer maps on true-positive test cases, each scored against the planted
    lesions, for the trained model and for the same network with random weights.

    The maps (:data:`ATTRIBUTION_MAPS`), all for the stroke class:

    - Grad-CAM at ``prof.gradcam_layer`` (by default the last ResNet stage), scored per voxel and
      per cell of its layer's grid ("its own cells"). On a small volume that grid is 2 x 2 x 2,
      so the map can at best point to part of a hemisphere.
    - Guided Grad-CAM, the Grad-CAM paper's high-resolution variant: guided backpropagation
      times the upsampled Grad-CAM (positive part).
    - Gradient saliency: ``|d logit / d voxel|``.
    - Occlusion: the drop in P(stroke) when a patch (``prof.occlusion_mask``) is set to 0, scored per patch.

    The untrained network (:func:`untrained_classifier`) is the model-randomisation sanity check
    of Adebayo et al. (2018). Planted lesions are bright spots, and some maps find bright spots
    whatever the weights. A map is evidence that the model looks at the lesions only if it beats
    both the shuffled map and the untrained network. The summary's ``verdict`` says so: "yes"
    when the trained map is above the shuffled maps' 95th percentile in more than half of the
    cases and its ratio to random exceeds the untrained network's in more than half of them.
    """
    from mmlib import viz

    te = data.index("test")
    has_truth = data.truth is not None
    tps = {}
    for method in methods:
        ev = ft.evals[method]
        tp = [int(r) for r, p, y in zip(te, ev["p_test"], ev["y_test"]) if y == 1 and p >= ev["threshold"]]
        tps[method] = [r for r in tp if not has_truth or bool(data.truth[r].any())][: prof.gradcam_cases]
    common = [r for r in tps[methods[-1]] if all(r in t for t in tps.values())]
    case_row = common[0] if common else next((t[0] for t in reversed(list(tps.values())) if t), None)
    rows, shown = [], {}
    for method in methods:
        nets = {"trained": ft.models[method].to(device),
                "untrained": untrained_classifier(method, data, prof, seed=seed).to(device)}
        cases = tps[method] + ([case_row] if case_row is not None and case_row not in tps[method] else [])
        for weights, model in nets.items():
            for r in core.progress(cases, desc=f"attribution maps, {method} ({weights})"):
                b = {k: v.to(device) for k, v in data.batch([r]).items() if k != "label"}
                maps, patches = _attribution_maps(model, b, prof, device)
                if r == case_row:
                    shown[(method, weights)] = maps
                if not has_truth or r not in tps[method]:
                    continue
                for what, mask in (("lesions in the outcome region", data.truth), ("all planted lesions", data.lesions)):
                    if mask is None or not bool(mask[r].any()):
                        continue
                    for kind, amap in maps.items():
                        sc = localisation_scores(amap, mask[r].numpy(), patch=patches[kind], seed=r, n_random=200)
                        rows.append({"method": method, "weights": weights, "map": kind, "truth": what,
                                     "subject_id": data.table["subject_id"].iloc[r], **sc})
    scores = pd.DataFrame(rows)
    summary = (localisation_summary(scores) if len(scores) else
               pd.DataFrame({"note": ["no true-positive test case with a planted lesion (or no truth masks)"]}))
    fig = sanity = None
    case_text = "no true-positive test case"
    if case_row is not None:
        sid = data.table["subject_id"].iloc[case_row]
        vol = data.images[case_row, 0].float().numpy()
        mask = data.truth[case_row].numpy() if data.truth is not None else None
        point = ([int(round(c)) for c in np.argwhere(mask).mean(0)] if mask is not None and mask.any()
                 else [s // 2 for s in vol.shape])
        show = ("Grad-CAM", "Guided Grad-CAM", "gradient saliency", "occlusion")
        fig = viz.orthogonal_slices(
            vol, {f"{m} · {k}": shown[(m, "trained")][k] for m in methods for k in show}, point=point, contour=mask,
            spacing=data.spacing_mm, volume_label="FLAIR",
            title=f"Stroke-class maps (Grad-CAM at ResNet {prof.gradcam_layer}; occlusion mask "
                  f"{list(prof.occlusion_mask)}), {sid}")
        sanity = viz.orthogonal_slices(
            vol, {f"{w} · {k}": shown[(methods[-1], w)][k] for k in ("Guided Grad-CAM", "gradient saliency")
                  for w in ("trained", "untrained")}, point=point, contour=mask, spacing=data.spacing_mm,
            volume_label="FLAIR", title=f"Sanity check: {methods[-1]} trained vs the same network untrained, {sid}")
        case_text = f"{sid}, a true-positive test case" + ("" if common else " (not of every method)")
    return GradCamStudy(scores, summary, fig, sanity, case_text, cases=tps if has_truth else {})


RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
STAGE_MAPS = ("Grad-CAM", "Grad-CAM, negative part", "HiResCAM")

#: The tables besides ``claims`` whose verdicts ``make replicate`` lines up across seeds
#: (:mod:`mmlib.replicates`): does each map localise the planted lesions, seed after seed?
VERDICT_TABLES = (
    VerdictTable("gradcam_localisation_summary", ("method", "map", "truth"), "verdict", "ratio_to_random"),
    VerdictTable("gradcam_by_stage", ("method", "stage", "map"), "verdict", "ratio_to_random", "grid_ceiling"),
)


def gradcam_by_stage(ft: FineTuned, data: P1Data, prof: P1Profile, cams: GradCamStudy, *, device: torch.device,
                     stages: Sequence[str] = RESNET_STAGES, n_random: int = 100, seed: int = 0) -> pd.DataFrame:
    """Grad-CAM at every ResNet stage on the study's cases, scored against the lesions in the outcome region.

    Is Grad-CAM's miss a matter of the layer? The last stage's grid is coarse (2 x 2 x 2 at the
    quick size), the earlier stages' grids are finer. Per method of ``cams`` and stage, the table
    scores, like :func:`localisation_summary` (trained vs untrained network, shuffled maps with
    ``n_random`` draws):

    - ``Grad-CAM``: the usual map, ``ReLU(sum_c w_c A_c)``;
    - ``Grad-CAM, negative part``: ``ReLU(-sum_c w_c A_c)``, where the channel weights (the
      gradients averaged over the whole grid) say the activations lower the stroke logit. A
      negative part on the lesions means the averaged weights give lesion features the wrong sign.
    - ``HiResCAM`` (Draelos & Carin 2020): ``ReLU(sum_c dy/dA_c * A_c)``, each cell weighted by
      its own gradient instead of the grid's average, so it keeps what raises the logit where it
      does so.

    Returns one row per method, stage and map, with the stage's ``grid`` and ``grid_ceiling``: the
    mean over the cases of the best ratio to the shuffled map that any map on that grid could reach
    (:func:`~mmlib.explain.grid_ceiling`; a map that is one cell, the best one, upsampled), so
    ``ratio_to_random`` reads against what the grid allows.
    """
    none = pd.DataFrame({"note": ["no truth masks or no true-positive test case with a planted lesion"]})
    if data.truth is None or not any(cams.cases.values()):
        return none
    truth = "lesions in the outcome region"
    rows, grids, ceilings = [], {}, []
    for method, cases in cams.cases.items():
        nets = {"trained": ft.models[method].to(device),
                "untrained": untrained_classifier(method, data, prof, seed=seed).to(device)}
        for weights, model in nets.items():
            for r in core.progress(cases, desc=f"Grad-CAM per stage, {method} ({weights})"):
                if not bool(data.truth[r].any()):
                    continue
                b = {k: v.to(device) for k, v in data.batch([r]).items() if k != "label"}
                # every stage and both weightings from one forward and one backward pass
                maps = grad_cam_layers(lambda x, m=model: m(x)["logits"],
                                       {st: getattr(model.clip.image_encoder, st) for st in stages}, b, target=1,
                                       model=model, relu=False, upsample=False, weightings=("mean", "elementwise"))
                size = b["image"].shape[2:]
                for stage in stages:
                    signed, hires = maps[(stage, "mean")].layer_cam, maps[(stage, "elementwise")].layer_cam
                    grids[stage] = "x".join(str(v) for v in signed.shape)
                    if weights == "trained":  # the grid and the truth decide it, not the weights
                        ceilings.append({"method": method, "stage": stage,
                                         **grid_ceiling(signed.shape, data.truth[r].numpy())})
                    layer_maps = (np.maximum(signed, 0.0), np.maximum(-signed, 0.0), np.maximum(hires, 0.0))
                    for kind, part in zip(STAGE_MAPS, layer_maps):
                        amap = np.maximum(upsample_layer_map(part, size), 0.0)  # each part upsampled as Grad-CAM does
                        sc = localisation_scores(amap, data.truth[r].numpy(), seed=r, n_random=n_random)
                        rows.append({"method": method, "weights": weights, "map": f"{kind} @ {stage}", "truth": truth,
                                     "subject_id": data.table["subject_id"].iloc[r], **sc})
    if not rows:
        return none
    summary = localisation_summary(pd.DataFrame(rows))
    parts = summary["map"].str.split(" @ ", expand=True)
    summary.insert(1, "stage", parts[1])
    summary.insert(2, "grid", parts[1].map(grids))
    summary["map"] = parts[0]
    ceiling = pd.DataFrame(ceilings).groupby(["method", "stage"], sort=False)["ceiling_ratio"].mean()
    summary.insert(3, "grid_ceiling", [ceiling[(m, st)] for m, st in zip(summary["method"], summary["stage"])])
    order = {(m, st, k): i for i, (m, st, k) in enumerate(
        (m, st, k) for m in cams.cases for st in stages for k in STAGE_MAPS)}
    key = summary.apply(lambda r: order[(r["method"], r["stage"], r["map"])], axis=1)
    return summary.iloc[np.argsort(key.to_numpy(), kind="stable")].drop(columns="truth").reset_index(drop=True)


def stage_verdict(stages: pd.DataFrame, method: str = PAPER) -> str:
    """One line per map of :func:`gradcam_by_stage`: the stages where it beats both baselines, from the table."""
    if "verdict" not in stages:
        return "No Grad-CAM stage was scored."
    s = stages[stages["method"] == method]
    lines = []
    for kind in STAGE_MAPS:
        k = s[s["map"] == kind]
        held = [f"{r.stage} ({r.ratio_to_random:.2f}x the shuffled map)" for r in k.itertuples() if r.verdict == "yes"]
        lines.append(f"- {kind}: " + (f"beats both baselines at {', '.join(held)}" if held else
                                      f"beats both baselines at no stage (ratio to the shuffled map "
                                      f"{k['ratio_to_random'].min():.2f}x to {k['ratio_to_random'].max():.2f}x)"))
    if "grid_ceiling" in s:  # what a perfect map on each stage's grid could reach, for scale
        best = s.drop_duplicates("stage")
        lines.append("- the best any map on each grid could reach (a perfect one-cell map): " + ", ".join(
            f"{r.stage} ({r.grid}) {r.grid_ceiling:.2f}x" for r in best.itertuples()))
    return f"{method}, lesions in the outcome region:\n" + "\n".join(lines)


def localisation_summary(scores: pd.DataFrame) -> pd.DataFrame:
    """Per method, map and truth: the trained model's localisation beside its untrained network's, and the verdict
    (see :func:`gradcam_study`)."""
    # an all-zero map (Grad-CAM's ReLU can leave nothing) puts no mass on the lesions: 0, not "undefined"
    s = scores.assign(mass_inside=scores["mass_inside"].fillna(0.0), ratio=scores["ratio"].fillna(0.0))
    s = s.assign(above=lambda d: d["mass_inside"] > d["chance_p95"])
    keys = ["method", "map", "truth", "subject_id"]
    tr = s[s["weights"] == "trained"].set_index(keys)
    un = s[s["weights"] == "untrained"].set_index(keys)
    paired = tr.join(un[["ratio", "above"]], suffixes=("", "_untrained"), how="inner").reset_index()
    paired["beats_untrained"] = paired["ratio"] > paired["ratio_untrained"]
    out = paired.groupby(["method", "map", "truth"], sort=False).agg(
        cases=("subject_id", "size"), mass_in_lesions=("mass_inside", "mean"), random_map=("chance_mean", "mean"),
        ratio_to_random=("ratio", "mean"), above_random_p95=("above", "mean"), pointing_game=("pointing_game", "mean"),
        untrained_ratio=("ratio_untrained", "mean"), untrained_above_p95=("above_untrained", "mean"),
        beats_untrained=("beats_untrained", "mean")).reset_index()
    order = {m: i for i, m in enumerate(ATTRIBUTION_MAPS)}
    out = out.sort_values(["method", "truth", "map"], key=lambda c: c.map(order) if c.name == "map" else c,
                          kind="stable").reset_index(drop=True)
    out["verdict"] = np.where((out["above_random_p95"] > 0.5) & (out["beats_untrained"] > 0.5), "yes", "no")
    return out


def localisation_verdict(summary: pd.DataFrame, method: str = PAPER,
                         truth: str = "lesions in the outcome region") -> str:
    """One paragraph: which maps of ``method`` show it looks at the planted lesions, from the summary's numbers."""
    if "verdict" not in summary:
        return "No true-positive test case with a planted lesion: nothing to score."
    s = summary[(summary["method"] == method) & (summary["truth"] == truth)].set_index("map")
    parts = []
    for m, r in s.iterrows():
        parts.append(f"{m}: {r['ratio_to_random']:.2f}x the shuffled map (above its 95th percentile in "
                     f"{r['above_random_p95']:.0%} of {int(r['cases'])} cases), untrained network {r['untrained_ratio']:.2f}x "
                     f"-> {'evidence' if r['verdict'] == 'yes' else 'no evidence'}")
    good = [m for m, r in s.iterrows() if r["verdict"] == "yes"]
    head = (f"{method}, {truth}: the maps that show the model looks at the lesions are "
            f"{', '.join(good)}." if good else f"{method}, {truth}: no map shows the model looks at the lesions.")
    return head + "\n" + "\n".join(f"- {x}" for x in parts)


# --------------------------------------------------------------------------- claims


def claims_table(ft: FineTuned, retrieval: pd.DataFrame, prof: P1Profile, *, seed: int = 0) -> pd.DataFrame:
    """The paper's claims, this run's numbers, and whether each held: ``yes`` when the paired bootstrap 95% CI
    of the difference clears 0, ``partly`` when only the point estimate does (:func:`mmlib.metrics.ci_verdict`)."""
    rows = []

    def diff(a: str, b: str, metric: str) -> tuple[str, str]:
        e, lo, hi = _paired_diff(ft, a, b, metric, prof, seed)
        return f"difference {e:+.3f} (95% CI {lo:+.3f} to {hi:+.3f})", metrics.ci_verdict(e, lo, hi)

    for metric, key, label in [("auc", "test AUC", "ROC-AUC"), ("ba", "test balanced accuracy", "balanced accuracy")]:
        ours = ft.evals[PAPER][key][0]
        for pool, what in [(SSL_UNIMODAL, "self-supervised unimodal"), (SUPERVISED_MULTIMODAL, "supervised multimodal")]:
            name, base = _best(ft, pool, key)
            paper = {("auc", "self-supervised unimodal"): "+2.1% relative",
                     ("ba", "self-supervised unimodal"): "+10.6% relative",
                     ("ba", "supervised multimodal"): "+7.6% relative"}.get((metric, what), "claimed better (no number)")
            text, held = diff(PAPER, name, metric)
            rows.append({"claim": f"CLIP + ITM beats the best {what} model in {label}", "paper reported": paper,
                         "this run": f"{ours:.3f} vs {base:.3f} ({name}); {text}", "held": held})
    r = retrieval.set_index("model")
    a, b = r.loc[PAPER, "image→table mean rank"], r.loc["MMCL (CLIP, no ITM)", "image→table mean rank"]
    ranks = retrieval.attrs.get("ranks", {})
    ci, held = "", "partly: lower mean rank, no CI (per-subject ranks not given)" if a < b else "no"
    if PAPER in ranks and "MMCL (CLIP, no ITM)" in ranks:
        e, lo, hi = metrics.bootstrap_ci(lambda x, y: float(np.mean(x - y)), ranks[PAPER].astype(float),
                                         ranks["MMCL (CLIP, no ITM)"].astype(float), n_boot=prof.n_boot, seed=seed,
                                         desc=None)
        ci = f"; rank difference {e:+.2f} (95% CI {lo:+.2f} to {hi:+.2f})"
        held = metrics.ci_verdict(e, lo, hi, higher_is_better=False)
    rows.append({"claim": "ITM improves image-table alignment (test retrieval: mean rank of a subject's own table)",
                 "paper reported": "qualitative (UMAP)",
                 "this run": f"CLIP + ITM {a:.2f} (permutation p {r.loc[PAPER, 'permutation p']:.3f}) vs CLIP alone "
                 f"{b:.2f} (p {r.loc['MMCL (CLIP, no ITM)', 'permutation p']:.3f}); chance "
                 f"{r.loc[PAPER, 'chance mean rank']:.1f}{ci}",
                 "held": held})
    ours, rnd = ft.evals[PAPER]["test AUC"][0], ft.evals[ABLATION]["test AUC"][0]
    text, held = diff(PAPER, ABLATION, "auc")
    rows.append({"claim": "hard ITM negatives beat random ones (test ROC-AUC)", "paper reported": "design choice (ALBEF)",
                 "this run": f"{ours:.3f} vs {rnd:.3f}; {text}", "held": held})
    return pd.DataFrame(rows)


def paper_vs_run(gains: pd.DataFrame, claims: pd.DataFrame) -> pd.DataFrame:
    """The index's table: each reported relative gain (held = a gain in this run too) and each claim."""
    rows = [{"quantity": f"relative gain {r['comparison']} ({r['metric']})",
             "paper reported": f"+{r['paper reported gain %']}%", "this run": f"{r['this run gain %']:+.1f}%",
             "held on this data": "yes" if r["this run gain %"] > 0 else "no"} for _, r in gains.iterrows()]
    rows += [{"quantity": c["claim"], "paper reported": c["paper reported"], "this run": c["this run"],
              "held on this data": c["held"]} for _, c in claims.iterrows()]
    return pd.DataFrame(rows)
