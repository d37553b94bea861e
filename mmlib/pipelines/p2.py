"""Logic of ``notebooks/p2_stroke_cta_ssl_freezing.py`` (P2: SSL pretraining, freezing, modality contribution).

Stages, each a plain function the notebook calls in order:

1. :func:`load_data` -- the CTA volumes (HU window -> [0, 1], the profile's grid), the five
   tabular inputs, RFS, the label and the splits; the plaque masks where the cohort has them.
2. :func:`pretrain` -- an autoencoder (``"ResNetAutoEnc"`` or ``"ViTAutoEnc"``) on the whole
   pool: corrupted input, L1 against the clean volume, best validation checkpoint kept.
3. :func:`finetune` -- one of the six setups (backbone x from scratch / pretrained frozen /
   pretrained progressive) regressing RFS on the fine-tuning subset.
4. :func:`evaluate` -- predictions, AUC (train, test, bootstrap CI), c-index, the kappa rule,
   and the occlusion modality contribution (vision / age / gender / CHD / PAD).
5. :func:`occlusion_case` -- the occlusion-sensitivity map of one volume, scored against the
   planted plaque.
6. Tables, figures and the claims table.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from mmlib import core, fast, metrics
from mmlib.core import Profile, ProfileSet
from mmlib.data import Cohort
from mmlib.explain import OcclusionMap, localisation_scores, modality_contribution, occlusion_map
from mmlib.models import ResNetAutoEnc, ResNetMLP, ViTAutoEnc, ViTMLP
from mmlib.ssl import InputCorruption
from mmlib.train import FreezeSchedule, fit, from_scratch, frozen_encoder, load_encoder, progressive_unfreeze

__all__ = [
    "BACKBONES", "GROUPS", "KAPPA_DAYS", "PAPER_TABLE2", "PAPER_TABLE3", "PAPER_TABLE4", "PROFILES", "SETUPS",
    "P2Data", "P2Profile", "build_model", "claims_table", "cohort_table", "dead_vision_features", "evaluate", "finetune",
    "FineTuned", "OcclusionStudy", "localisation_verdict", "Pretrained", "contribution_figure", "finetune_all", "load_data",
    "occlusion_case", "occlusion_study", "paper_vs_run", "planted_shares", "pretrain", "pretrain_both",
    "reconstruction_figure", "schedule_for", "schedule_figure", "seed_spread", "table2", "table3", "truth_comparison",
]

log = core.get_logger(__name__)

KAPPA_DAYS = 1642.0  # predicted RFS below kappa = relapse (P2 section 3.2)
RFS_SCALE_DAYS = 1000.0  # the network regresses RFS in thousands of days
TABULAR_INPUTS = ("age_z", "male", "female", "chd", "pad")  # age z-scored, gender 2 bits, CHD, PAD
GROUPS: dict[str, tuple[str, list[int] | None]] = {  # P2: h_vision = 1, h_tabular = 4 (gender's bits together)
    "vision": ("image", None), "age": ("tabular", [0]), "gender": ("tabular", [1, 2]),
    "CHD": ("tabular", [3]), "PAD": ("tabular", [4]),
}
BACKBONES = ("ResNetMLP", "ViTMLP")
SETUPS = ("from scratch", "pretrained frozen", "pretrained progressive")
AUTOENCODER = {"ResNetMLP": "ResNetAutoEnc", "ViTMLP": "ViTAutoEnc"}

# --------------------------------------------------------------------------- paper reported

PAPER_TABLE2 = pd.DataFrame(
    [("ResNetMLP", "from scratch", 0.570, 0.549, 79.46), ("ResNetMLP", "pretrained frozen", 0.409, 0.653, 93.31),
     ("ResNetMLP", "pretrained progressive", 0.695, 0.715, 92.20), ("ViTMLP", "from scratch", 0.617, 0.722, 0.13),
     ("ViTMLP", "pretrained frozen", 0.805, 0.743, 28.39), ("ViTMLP", "pretrained progressive", 0.626, 0.729, 5.53)],
    columns=["backbone", "setup", "train AUC", "test AUC", "vision %"],
)
PAPER_TABLE3 = pd.DataFrame(
    [("ResNetMLP", "from scratch", 79.46, 8.09, 6.96, 0.68, 4.81),
     ("ResNetMLP", "pretrained frozen", 93.31, 2.21, 3.13, 0.31, 1.04),
     ("ResNetMLP", "pretrained progressive", 92.20, 2.57, 3.91, 0.40, 0.92),
     ("ViTMLP", "from scratch", 0.13, 12.95, 75.68, 4.59, 6.65),
     ("ViTMLP", "pretrained frozen", 28.39, 8.73, 55.60, 3.03, 4.25),
     ("ViTMLP", "pretrained progressive", 5.53, 11.97, 71.84, 4.37, 6.29)],
    columns=["backbone", "setup", "vision", "age", "gender", "CHD", "PAD"],
)
# Table 4 (one relapse case). The gender cells of the ViT rows are illegible in the paper's text;
# they are given as 100 minus the other cells and marked so.
PAPER_TABLE4 = pd.DataFrame(
    [("ResNetMLP", "from scratch", 84.65, 1.29, 5.96, 0.00, 8.10, ""),
     ("ResNetMLP", "pretrained progressive", 82.40, 1.42, 8.50, 0.00, 7.68, ""),
     ("ViTMLP", "from scratch", 0.14, 4.66, 73.72, 0.00, 21.48, "gender = 100 - rest (illegible in the text)"),
     ("ViTMLP", "pretrained frozen", 54.28, 1.87, 35.94, 0.00, 7.91, "gender = 100 - rest (illegible in the text)")],
    columns=["backbone", "setup", "vision", "age", "gender", "CHD", "PAD", "note"],
)
PAPER_COHORT = {"pretraining pool": 491, "pretraining train": 393, "pretraining val": 98, "fine-tuning": 119,
                "fine-tuning train": 95, "train relapses": 32, "fine-tuning test": 24, "test relapses": 9}


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class P2Profile(Profile):
    """Sizes of one P2 run. ``full`` is the paper; ``quick`` and ``smoke`` shrink widths and epochs."""

    preset: str = "quick"  # cohort preset generated when data_dir holds no manifest
    spacing_mm: tuple[float, float, float] = (3.5, 3.5, 3.5)  # model input voxel size
    spatial_size: tuple[int, int, int] = (64, 64, 96)  # model input grid; divisible by 32 and the ViT patch
    hu_window: tuple[float, float] = (-200.0, 1000.0)  # HU mapped to [0, 1]: soft tissue, contrast, calcium
    resnet_widths: tuple[int, int, int, int] = (16, 32, 64, 128)
    resnet_layers: tuple[int, int, int, int] = (2, 2, 2, 2)  # paper (full): 3-4-6-3
    vit_patch: int = 16
    vit_hidden: int = 128
    vit_mlp: int = 512
    vit_layers: int = 8
    vit_heads: int = 8
    vit_head_channels: tuple[int, int] = (48, 16)
    vit_deconv: int = 16
    pretrain_epochs: int = 5
    pretrain_batch: int = 4
    pretrain_lr: float = 1e-3
    finetune_epochs: int = 25
    unfreeze_epochs: tuple[int, ...] = (5, 10, 15)  # paper: 50, 100, 150 of 250 (20%, 40%, 60%)
    finetune_batch: int = 8
    finetune_lr: float = 1e-3
    finetune_seeds: tuple[int, ...] = (0,)
    occlusion_mask: tuple[int, int, int] = (8, 8, 12)
    occlusion_batch: int = 64
    occlusion_cases: int = 6  # test relapses whose maps are scored against the plaque, per setup (~4 s a map in quick)
    n_boot: int = 500
    # fp32 | bf16 | auto (bf16 where the hardware runs it natively). CPU profiles use fp32: at these narrow 3D
    # convolutions oneDNN's bf16 kernels are slower (the quick notebook took 1,292 s in bf16 vs 570 s in fp32 on
    # a 2-core AMX Xeon; benchmarks/README.md). (An older reason, NaN losses of the ViTMLP under CPU bf16, no
    # longer holds: that run's losses were finite.)
    precision: str = "fp32"
    # mmlib.fast's fp32-exact options: SDPA attention in the ViTs, channels-last 3D convolutions, fused Adam
    # (same maths up to float rounding; benchmarks/bench_p2_pretrain.py measures them)
    fast: bool = True
    # torch.compile every model (mmlib.fast.maybe_compile, in place: checkpoint keys unchanged). Off: compiling
    # costs tens of seconds to minutes and pays back only on long GPU runs (`python -m mmlib train p2 --set compile=True`)
    compile: bool = False
    workers: int = 0  # volume-loading processes; 0 = all usable cores


PROFILES = ProfileSet(
    smoke=P2Profile(
        name="smoke", preset="smoke", spacing_mm=(7.0, 7.0, 7.0), spatial_size=(32, 32, 64),
        resnet_widths=(4, 8, 16, 32), resnet_layers=(1, 1, 1, 1), vit_hidden=32, vit_mlp=64, vit_layers=3,
        vit_heads=2, vit_head_channels=(8, 8), vit_deconv=4, pretrain_epochs=2, pretrain_batch=8,
        finetune_epochs=4, unfreeze_epochs=(1, 2, 3), occlusion_mask=(8, 8, 16), occlusion_cases=2, n_boot=100,
    ),
    quick=P2Profile(name="quick"),
    full=P2Profile(
        name="full", preset="full", spacing_mm=(1.0, 1.0, 1.0), spatial_size=(224, 224, 320),
        resnet_widths=(64, 128, 256, 512), resnet_layers=(3, 4, 6, 3), vit_hidden=768, vit_mlp=3072, vit_layers=8,
        vit_heads=8, vit_head_channels=(256, 64), vit_deconv=16, pretrain_epochs=300, pretrain_batch=1,
        pretrain_lr=1e-4, finetune_epochs=250, unfreeze_epochs=(50, 100, 150), finetune_batch=4, finetune_lr=1e-4,
        finetune_seeds=(0, 1, 2), occlusion_mask=(8, 8, 10), occlusion_batch=32, occlusion_cases=3, n_boot=2000,
        precision="auto",
    ),
)


# --------------------------------------------------------------------------- data


@dataclass
class P2Data:
    """Everything the models see, in memory.

    Attributes:
        table: one row per subject: ids, splits, attributes, ``rfs_days``, ``relapse``,
            ``label`` (relapse within kappa; NaN outside the fine-tuning subset).
        images: (N, 1, X, Y, Z) float16 CTA in [0, 1] (float16 halves the memory; batches are float32).
        tabular: (N, 5) float32: age z-scored over the pool, male, female, CHD, PAD.
        masks: (N, X, Y, Z) uint8 plaque masks on the model grid, or None (a cohort without them).
        spacing_mm: voxel size of ``images``.
    """

    table: pd.DataFrame
    images: torch.Tensor
    tabular: torch.Tensor
    masks: torch.Tensor | None
    spacing_mm: tuple[float, float, float]
    truth: dict[str, Any] = field(default_factory=dict)

    def index(self, which: str) -> np.ndarray:
        """Row positions of ``pretrain_train`` / ``pretrain_val`` (the whole pool's split), ``train`` / ``test``
        (the fine-tuning split) or ``finetune`` (both)."""
        t = self.table
        sel = {
            "pretrain_train": t["pretrain_split"] == "train",
            "pretrain_val": t["pretrain_split"] == "val",
            "train": t["split"] == "train",
            "test": t["split"] == "test",
            "finetune": t["split"].isin(["train", "test"]),
        }
        if which not in sel:
            raise ValueError(f"unknown subset {which!r}; choose one of {sorted(sel)}")
        return np.flatnonzero(sel[which].to_numpy())

    def to(self, device: torch.device | str, *, max_fraction: float = 0.5) -> P2Data:
        """The same data with the images (float16, decoded once) and tabular inputs held on ``device``.

        Batches are then cut, made float and corrupted where the model runs: no host work and no
        host-to-device copy per batch (at the paper's 224 x 224 x 320 a float32 volume is 64 MB; making
        it float (25 ms) and corrupting it (29 ms) on 2 CPU cores took twice the per-volume budget of
        the 34 volumes/s GPU target; ``mmlib.ssl.InputCorruption``).
        Returns ``self`` on the CPU, and (with a warning) when the images would take more than
        ``max_fraction`` of the device's free memory: 393 paper-size volumes are 12.6 GB.
        """
        device = torch.device(device)
        if device.type == "cpu" or self.images.device == device:
            return self
        need = self.images.numel() * self.images.element_size() + self.tabular.numel() * self.tabular.element_size()
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if need > max_fraction * free:
                warnings.warn(f"P2 images ({need / 2**30:.1f} GiB) exceed {max_fraction:.0%} of the free memory on "
                              f"{device} ({free / 2**30:.1f} GiB): they stay in host memory, and each batch is copied",
                              stacklevel=2)
                return self
        return replace(self, images=self.images.to(device), tabular=self.tabular.to(device))

    def batch(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        rfs = torch.as_tensor(self.table["rfs_days"].to_numpy(dtype=np.float32, copy=True))[idx]
        if self.images.device.type != "cpu":  # held on the device (P2Data.to): index there
            idx, rfs = idx.to(self.images.device), rfs.to(self.images.device)
        return {"image": self.images[idx].float(), "tabular": self.tabular[idx], "target": rfs / RFS_SCALE_DAYS}

    def batches(self, idx: np.ndarray, batch_size: int, *, shuffle_seed: int | None = None):
        from mmlib.train import index_batches

        for chunk in index_batches(idx, batch_size, shuffle_seed=shuffle_seed):
            yield self.batch(chunk)


REQUIRED_COLUMNS = ("age", "gender", "chd", "pad", "rfs_days", "relapse", "split", "pretrain_split")


def tabular_inputs(table: pd.DataFrame) -> np.ndarray:
    """The five tabular inputs (P2 2.3): age z-scored over ``table``, gender as two bits, CHD, PAD."""
    missing = [c for c in ("age", "gender", "chd", "pad") if c not in table.columns]
    if missing:
        raise ValueError(f"the subject table lacks column(s) {missing} needed for the tabular inputs")
    age = table["age"].astype(float).to_numpy()
    sd = age.std()
    if not np.isfinite(sd) or sd == 0:
        raise ValueError("column 'age' has no spread: cannot z-score it")
    gender = table["gender"].astype(str).str.upper().str[0]
    bad = sorted(set(gender) - {"M", "F"})
    if bad:
        raise ValueError(f"column 'gender' must be M or F, found {bad}")
    return np.stack([(age - age.mean()) / sd, (gender == "M").to_numpy(float), (gender == "F").to_numpy(float),
                     table["chd"].astype(float).to_numpy(), table["pad"].astype(float).to_numpy()], axis=1).astype(np.float32)


def load_data(cohort: Cohort, prof: P2Profile) -> P2Data:
    """Read the cohort's CTAs (and plaque masks) onto the profile's grid; build the tabular inputs.

    The fine-tuning label is ``relapse_within_kappa`` when the cohort has it, else derived from
    the paper's rule (relapse with RFS < kappa) on the ``train``/``test`` rows.
    """
    import os

    from torch.utils.data import DataLoader

    from mmlib.data.readers import volume_dataset, volume_transforms

    t = cohort.subjects.copy()
    missing = [c for c in REQUIRED_COLUMNS if c not in t.columns]
    if missing:
        raise ValueError(f"cohort {cohort.name!r} ({cohort.root}/subjects.csv) lacks column(s) {missing}; "
                         f"P2 needs {list(REQUIRED_COLUMNS)} (see data_manifest/real/p2_innsbruck_cta.md)")
    idc = cohort.manifest.id_column
    t = t.rename(columns={idc: "subject_id"})
    t["subject_id"] = t["subject_id"].astype(str)
    ft = t["split"].isin(["train", "test"])
    if "relapse_within_kappa" in t.columns:
        label = pd.to_numeric(t["relapse_within_kappa"], errors="coerce")
    else:
        label = ((t["relapse"].astype(int) == 1) & (t["rfs_days"].astype(float) < KAPPA_DAYS)).astype(float)
    t["label"] = label.where(ft)
    if ft.sum() == 0 or t.loc[t["split"] == "test", "label"].nunique() < 2:
        raise ValueError(f"cohort {cohort.name!r}: the fine-tuning test split needs both relapse and non-relapse patients")
    mods = {m.name for m in cohort.manifest.modalities}
    keys = {"image": "cta"} | ({"mask": "plaque_mask"} if "plaque_mask" in mods else {})
    tf = volume_transforms(kind="ct", spacing_mm=prof.spacing_mm, spatial_size=prof.spatial_size,
                           hu_window=prof.hu_window, mask_keys=["mask"] if "mask" in keys else [])
    ds = volume_dataset(cohort, keys, tf, cache=None)
    workers = prof.workers or max(1, min(8, len(os.sched_getaffinity(0))))
    loader = DataLoader(ds, batch_size=8, num_workers=workers if len(ds) > 32 else 0, shuffle=False)
    images, masks, ids = [], [], []
    for item in core.progress(loader, desc="load CTA", total=len(loader)):
        images.append(torch.as_tensor(item["image"]).as_subclass(torch.Tensor).half())
        if "mask" in item:
            masks.append(torch.as_tensor(item["mask"]).as_subclass(torch.Tensor)[:, 0].to(torch.uint8))
        ids += list(item["subject_id"])
    order = {s: i for i, s in enumerate(ids)}
    t = t[t["subject_id"].isin(order)].reset_index(drop=True)
    pos = torch.as_tensor([order[s] for s in t["subject_id"]])
    img = torch.cat(images)[pos]
    msk = torch.cat(masks)[pos] if masks else None
    return P2Data(table=t, images=img, tabular=torch.as_tensor(tabular_inputs(t)), masks=msk,
                  spacing_mm=tuple(prof.spacing_mm), truth=dict(cohort.truth or {}))


def cohort_table(data: P2Data) -> pd.DataFrame:
    """Counts of the pretraining pool and the fine-tuning subset, beside the paper's (P2 2.2, Table 1)."""
    t = data.table
    ft = t[t["split"].isin(["train", "test"])]
    run = {
        "pretraining pool": len(t), "pretraining train": int((t["pretrain_split"] == "train").sum()),
        "pretraining val": int((t["pretrain_split"] == "val").sum()), "fine-tuning": len(ft),
        "fine-tuning train": int((t["split"] == "train").sum()),
        "train relapses": int(t.loc[t["split"] == "train", "label"].sum()),
        "fine-tuning test": int((t["split"] == "test").sum()),
        "test relapses": int(t.loc[t["split"] == "test", "label"].sum()),
    }
    rows = [{"quantity": k, "paper reported": PAPER_COHORT[k], "this run": v} for k, v in run.items()]
    test_in_val = bool((t.loc[t["split"] == "test", "pretrain_split"] == "val").all())
    rows.append({"quantity": "test patients inside the pretraining validation split", "paper reported": "all",
                 "this run": "all" if test_in_val else "NOT all"})
    men = (ft["gender"].astype(str).str.upper().str[0] == "M").mean() * 100
    rows += [
        {"quantity": "men (%)", "paper reported": 66.4, "this run": round(men, 1)},
        {"quantity": "CHD (%; Table 1: CHD only + both)", "paper reported": 25.2, "this run": round(ft["chd"].astype(float).mean() * 100, 1)},
        {"quantity": "PAD (%; Table 1: PAD only + both)", "paper reported": 21.8, "this run": round(ft["pad"].astype(float).mean() * 100, 1)},
        {"quantity": "relapse (%)", "paper reported": 34.4, "this run": round(ft["label"].mean() * 100, 1)},
        {"quantity": "age (years, mean ± SD)", "paper reported": "69.10 ± 10.18",
         "this run": f"{ft['age'].astype(float).mean():.2f} ± {ft['age'].astype(float).std():.2f}"},
    ]
    return pd.DataFrame(rows).astype({"paper reported": str, "this run": str})


# --------------------------------------------------------------------------- models


def build_model(kind: str, prof: P2Profile) -> nn.Module:
    """``ResNetAutoEnc`` | ``ViTAutoEnc`` | ``ResNetMLP`` | ``ViTMLP`` at the profile's sizes.

    With ``prof.fast`` the ViTs' attention runs through ``scaled_dot_product_attention`` and the
    convolutions are stored channels-last (:mod:`mmlib.fast`); with ``prof.compile`` the model is
    compiled in place (lazily, at its first call). Parameters and checkpoint keys are the same
    either way.
    """
    if kind == "ResNetAutoEnc":
        model: nn.Module = ResNetAutoEnc(widths=prof.resnet_widths, layers=prof.resnet_layers)
    elif kind == "ResNetMLP":
        model = ResNetMLP(widths=prof.resnet_widths, layers=prof.resnet_layers)
    elif kind in ("ViTAutoEnc", "ViTMLP"):
        vit = dict(img_size=prof.spatial_size, patch_size=prof.vit_patch, hidden_size=prof.vit_hidden,
                   mlp_dim=prof.vit_mlp, num_layers=prof.vit_layers, num_heads=prof.vit_heads)
        model = (ViTAutoEnc(**vit, deconv_chns=prof.vit_deconv) if kind == "ViTAutoEnc" else
                 ViTMLP(**vit, head_channels=prof.vit_head_channels))
    else:
        raise ValueError(f"unknown model {kind!r}; choose ResNetAutoEnc, ViTAutoEnc, ResNetMLP or ViTMLP")
    if prof.fast:
        fast.set_sdpa(model, True)
        fast.channels_last(model)
    return fast.maybe_compile(model, prof.compile)


def _optimizer(model: nn.Module, lr: float, prof: P2Profile) -> torch.optim.Optimizer:
    """Adam (the paper's), with the fused update kernel where ``prof.fast`` and the device has one."""
    params = list(model.parameters())
    if prof.fast and fast.fused_adamw_supported(params):  # the fused kernels serve Adam and AdamW alike
        return torch.optim.Adam(params, lr=lr, fused=True)
    return torch.optim.Adam(params, lr=lr)


def _image(x: torch.Tensor, prof: P2Profile) -> torch.Tensor:
    return fast.to_channels_last(x) if prof.fast else x


def _arch(kind: str, prof: P2Profile) -> dict[str, Any]:
    keys = ("spatial_size", "spacing_mm", "hu_window") + (
        ("resnet_widths", "resnet_layers") if "ResNet" in kind else
        ("vit_patch", "vit_hidden", "vit_mlp", "vit_layers", "vit_heads"))
    return {"model": kind, **{k: getattr(prof, k) for k in keys}}


def pretrain(kind: str, data: P2Data, prof: P2Profile, *, ckpt_dir: str | Path, device: torch.device, seed: int = 0,
             resume: bool = False, corruption: InputCorruption | None = None) -> tuple[nn.Module, pd.DataFrame, Path]:
    """Self-supervised pretraining of ``kind`` on the whole pool (P2 3.1).

    Training uses the pool's ``pretrain_split == "train"``, validation its ``"val"`` (which holds
    every fine-tuning test patient). The validation inputs are corrupted with fixed draws, so
    the curve compares like with like. Returns the model at its best validation epoch, the
    per-epoch history and the best checkpoint's path.
    """
    corruption = corruption or InputCorruption()
    core.seed_everything(seed)
    model = build_model(kind, prof)
    tr, va = data.index("pretrain_train"), data.index("pretrain_val")

    def train_batches(epoch: int):
        for b, batch in enumerate(data.batches(tr, prof.pretrain_batch, shuffle_seed=seed * 7919 + epoch)):
            yield {"image": batch["image"], "corrupted": corruption(batch["image"], seed=seed * 1_000_003 + epoch * 1009 + b)}

    def val_batches():
        for b, batch in enumerate(data.batches(va, prof.pretrain_batch)):
            yield {"image": batch["image"], "corrupted": corruption(batch["image"], seed=10_000_019 + b)}

    def loss_fn(m: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.l1_loss(m(_image(batch["corrupted"], prof)).float(), batch["image"])

    stem = Path(ckpt_dir) / kind
    opt = _optimizer(model, prof.pretrain_lr, prof)
    hist = fit(model, loss_fn=loss_fn, train_batches=train_batches, val_batches=val_batches,
               epochs=prof.pretrain_epochs, optimizer=opt, checkpoint=stem, resume=resume, device=device,
               precision=prof.precision, seed=seed, meta=_arch(kind, prof), desc=f"pretrain {kind}")
    best = stem.with_name(stem.name + ".best")
    from mmlib.train import load_checkpoint

    state, _ = load_checkpoint(best)
    model.load_state_dict(state)
    model.eval()
    hist.insert(0, "model", kind)
    return model, hist, best.with_name(best.name + ".safetensors")


def schedule_for(setup: str, model: nn.Module, prof: P2Profile) -> FreezeSchedule:
    """The freezing schedule of a setup name (one of :data:`SETUPS`)."""
    if setup == "from scratch":
        return from_scratch()
    if setup == "pretrained frozen":
        return frozen_encoder(model)
    if setup == "pretrained progressive":
        return progressive_unfreeze(model, prof.unfreeze_epochs)
    raise ValueError(f"unknown setup {setup!r}; choose one of {SETUPS}")


def finetune(backbone: str, setup: str, data: P2Data, prof: P2Profile, *, encoder_ckpt: str | Path | None,
             device: torch.device, seed: int = 0, ckpt_dir: str | Path | None = None,
             resume: bool = False) -> tuple[nn.Module, pd.DataFrame, str]:
    """Fine-tune one setup on the fine-tuning ``train`` split: MSE on RFS (thousands of days), Adam.

    Pretrained setups load the autoencoder's encoder strictly (every key and shape) before
    training. The model after the last epoch is returned (the paper keeps no validation split
    in fine-tuning). Returns the model, the per-epoch history and the load report (or "").
    """
    core.seed_everything(seed)
    model = build_model(backbone, prof)
    report = ""
    if setup != "from scratch":
        if encoder_ckpt is None:
            raise ValueError(f"setup {setup!r} needs the pretrained encoder checkpoint")
        report = str(load_encoder(model.encoder, encoder_ckpt, prefix="encoder.", what=f"{AUTOENCODER[backbone]} -> {backbone}"))
    schedule = schedule_for(setup, model, prof)
    tr = data.index("train")

    def train_batches(epoch: int):
        return data.batches(tr, prof.finetune_batch, shuffle_seed=seed * 7919 + epoch)

    def loss_fn(m: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.mse_loss(m(dict(batch, image=_image(batch["image"], prof)))["rfs"].float(), batch["target"])

    opt = _optimizer(model, prof.finetune_lr, prof)
    stem = None if ckpt_dir is None else Path(ckpt_dir) / f"{backbone}-{setup.replace(' ', '_')}-seed{seed}"
    hist = fit(model, loss_fn=loss_fn, train_batches=train_batches, epochs=prof.finetune_epochs, optimizer=opt,
               schedule=schedule, checkpoint=stem, resume=resume, device=device, precision=prof.precision, seed=seed,
               meta={**_arch(backbone, prof), "setup": setup}, desc=f"{backbone} {setup}")
    hist = hist.drop(columns="val_loss")  # no validation split in fine-tuning: the column would be all NaN
    hist.insert(0, "setup", setup)
    hist.insert(0, "backbone", backbone)
    hist.insert(2, "seed", seed)
    return model, hist, report


# --------------------------------------------------------------------------- evaluation


def _forward(model: nn.Module, device: torch.device, precision: str):
    def f(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with core.autocast(device, precision):
            return model({k: v.to(device) for k, v in batch.items() if k in ("image", "tabular")})["rfs"].float()
    return f


def predict(model: nn.Module, data: P2Data, idx: np.ndarray, *, device: torch.device, precision: str = "fp32",
            batch_size: int = 16) -> np.ndarray:
    """Predicted RFS in days for rows ``idx``."""
    model.eval()
    f = _forward(model, device, precision)
    out = []
    with torch.no_grad():
        for batch in data.batches(idx, batch_size):
            out.append(f(batch).cpu().numpy())
    return np.concatenate(out) * RFS_SCALE_DAYS


def _auc(label: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(label, score)) if len(np.unique(label)) == 2 else float("nan")


def evaluate(model: nn.Module, data: P2Data, prof: P2Profile, *, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Metrics of one fine-tuned model.

    AUC uses the predicted RFS as score (shorter predicted RFS = more likely relapse) against
    the relapse-within-kappa label; the kappa rule turns it into a decision. The c-index uses
    the observed RFS and relapse flag of the fine-tuning test patients. The modality
    contribution is measured on the test split (as in the paper's Tables 2-3).
    """
    rows = {}
    for subset in ("train", "test"):
        idx = data.index(subset)
        pred = predict(model, data, idx, device=device, precision=prof.precision)
        rows[subset] = (idx, pred)
    t = data.table
    te_idx, te_pred = rows["test"]
    y_te = t["label"].to_numpy(float)[te_idx].astype(int)
    auc, lo, hi = metrics.bootstrap_ci(lambda y, s: _auc(y, s), y_te, -te_pred, n_boot=prof.n_boot, seed=seed, desc=None)
    ev, tm = t["relapse"].to_numpy(int)[te_idx].astype(bool), t["rfs_days"].to_numpy(float)[te_idx]
    cidx, clo, chi = metrics.bootstrap_ci(lambda e, ti, r: metrics.concordance_index(e, ti, r), ev, tm, -te_pred,
                                          n_boot=prof.n_boot, seed=seed, desc=None)
    tr_idx, tr_pred = rows["train"]
    y_tr = t["label"].to_numpy(float)[tr_idx].astype(int)
    decide = te_pred < KAPPA_DAYS
    cohort_mc, per_sample = modality_contribution(
        _forward(model, device, prof.precision), data.batches(te_idx, 16), GROUPS, device=device)
    per_sample.insert(0, "subject_id", t["subject_id"].to_numpy()[te_idx])
    preds = pd.DataFrame({
        "subject_id": t["subject_id"].to_numpy()[np.concatenate([tr_idx, te_idx])],
        "subset": ["train"] * len(tr_idx) + ["test"] * len(te_idx),
        "rfs_pred_days": np.concatenate([tr_pred, te_pred]),
        "rfs_days": t["rfs_days"].to_numpy(float)[np.concatenate([tr_idx, te_idx])],
        "label": np.concatenate([y_tr, y_te]),
    })
    return {
        "train AUC": _auc(y_tr, -tr_pred), "test AUC": auc, "test AUC lo": lo, "test AUC hi": hi,
        "test c-index": cidx, "c-index lo": clo, "c-index hi": chi,
        "sensitivity": float(decide[y_te == 1].mean()), "specificity": float((~decide)[y_te == 0].mean()),
        "accuracy": float((decide == (y_te == 1)).mean()),
        "contribution": cohort_mc, "per_sample": per_sample, "predictions": preds,
    }


def planted_shares(data: P2Data, subset: str = "finetune") -> pd.Series | None:
    """The planted share of each input in the log hazard: variance of each term / sum of variances.

    Terms: vision = ``lp_image`` (image_signal x z(plaque severity)); age, gender, CHD, PAD =
    their log hazard ratio x centred value. None for a cohort without a ground-truth card.
    (The attributes also act through the plaque -- a mediated path -- which counts as vision here.)
    """
    subj = data.truth.get("subjects")
    cm = data.truth.get("causal_model", {})
    if not subj or "hazard_log_hr" not in cm:
        return None
    lat = pd.DataFrame(subj).set_index("subject_id")
    t = data.table.iloc[data.index(subset)]
    beta = cm["hazard_log_hr"]
    ts = float(data.truth.get("knobs", {}).get("tabular_signal", 1.0))
    male = (t["gender"].astype(str).str.upper().str[0] == "M").astype(float)
    centre = cm.get("attributes_centred_at", {})
    age_z = (t["age"].astype(float) - centre.get("age_years", 68.0)) / centre.get("age_sd", 11.0)
    terms = pd.DataFrame({
        "vision": lat.loc[t["subject_id"], "lp_image"].to_numpy(float),
        "age": ts * beta["age_per_sd"] * age_z.to_numpy(),
        "gender": ts * beta["male"] * male.to_numpy(),
        "CHD": ts * beta["chd"] * t["chd"].astype(float).to_numpy(),
        "PAD": ts * beta["pad"] * t["pad"].astype(float).to_numpy(),
    })
    var = terms.var()
    return var / var.sum()


# --------------------------------------------------------------------------- occlusion


def occlusion_case(model: nn.Module, data: P2Data, row: int, prof: P2Profile, *, device: torch.device,
                   desc: str | None = None) -> tuple[OcclusionMap, dict[str, Any] | None]:
    """Occlusion map of subject ``row`` and, where a plaque mask exists, its localisation scores."""
    batch = data.batch([row])
    occ = occlusion_map(_forward(model, device, prof.precision), {"image": batch["image"], "tabular": batch["tabular"]},
                        mask_size=prof.occlusion_mask, batch_size=prof.occlusion_batch, device=device, desc=desc)
    scores = None
    if data.masks is not None and bool(data.masks[row].any()):
        scores = localisation_scores(occ.sensitivity, data.masks[row].numpy() > 0, patch=prof.occlusion_mask, seed=row)
    return occ, scores


# --------------------------------------------------------------------------- claims


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def claims_table(summary: pd.DataFrame, pretrain_hist: pd.DataFrame, diffs: Mapping[str, tuple[float, float, float]],
                 collapse_below: float = 0.10) -> pd.DataFrame:
    """Each of the paper's claims, with this run's numbers and whether it held. An AUC comparison with a
    paired CI in ``diffs`` is ``yes`` when the CI clears 0 and ``partly`` when only the estimate does
    (:func:`mmlib.metrics.ci_verdict`); the others compare point estimates.

    Args:
        summary: one row per (backbone, setup) with ``test AUC`` and ``vision`` (share).
        pretrain_hist: pretraining histories (``model``, ``val_loss``).
        diffs: paired-bootstrap AUC differences ``(estimate, lo, hi)`` keyed ``"<backbone>: <a> - <b>"``.
        collapse_below: a vision share below this counts as collapse onto the tabular data.
    """
    s = summary.set_index(["backbone", "setup"])
    rows = []

    def v(b: str, st: str, col: str) -> float:
        return float(s.loc[(b, st), col])

    def ci(key: str) -> str:
        if key not in diffs:
            return ""
        e, lo, hi = diffs[key]
        return f"; AUC difference {e:+.3f} (95% CI {lo:+.3f} to {hi:+.3f})"

    def verdict(key: str, ahead: bool) -> str:
        """From the paired CI where there is one (yes / partly / no), else from the point estimates."""
        return metrics.ci_verdict(*diffs[key]) if key in diffs else ("yes" if ahead else "no")

    # 1 pretraining raises the vision contribution
    for b in BACKBONES:
        sc, fr, pr = (v(b, st, "vision") for st in SETUPS)
        held = fr > sc and pr > sc
        rows.append({"claim": f"pretraining raises the vision contribution ({b})",
                     "paper reported": {"ResNetMLP": "79.5% -> 93.3% / 92.2%", "ViTMLP": "0.1% -> 28.4% / 5.5%"}[b],
                     "this run": f"scratch {_pct(sc)} -> frozen {_pct(fr)} / progressive {_pct(pr)}",
                     "held": "yes" if held else ("partly" if fr > sc or pr > sc else "no")})
    # 2 ViT from scratch collapses onto tabular
    vs = v("ViTMLP", "from scratch", "vision")
    rows.append({"claim": "the ViT trained from scratch collapses onto the tabular data",
                 "paper reported": "vision 0.13%", "this run": f"vision {_pct(vs)} (collapse: < {_pct(collapse_below)})",
                 "held": "yes" if vs < collapse_below else "no"})
    # 3 which autoencoder pretrains better (Figure 4)
    best_val = pretrain_hist.groupby("model")["val_loss"].min()
    if {"ResNetAutoEnc", "ViTAutoEnc"} <= set(best_val.index):
        r, t = best_val["ResNetAutoEnc"], best_val["ViTAutoEnc"]
        rows.append({"claim": "the ViTAutoEnc reconstructs better than the ResNetAutoEnc (Figure 4)",
                     "paper reported": "lower ViT L1, train and val", "this run": f"best val L1: ViT {t:.4f}, ResNet {r:.4f}",
                     "held": "yes" if t < r else "no"})
    # 4 frozen suits the better-pretrained encoder (ViT), progressive the weaker (ResNet)
    vf, vp = v("ViTMLP", "pretrained frozen", "test AUC"), v("ViTMLP", "pretrained progressive", "test AUC")
    rf, rp = v("ResNetMLP", "pretrained frozen", "test AUC"), v("ResNetMLP", "pretrained progressive", "test AUC")
    rows.append({"claim": "frozen suits the well-pretrained encoder: ViT frozen > ViT progressive (test AUC)",
                 "paper reported": "0.743 > 0.729", "this run": f"{vf:.3f} vs {vp:.3f}" + ci("ViTMLP: frozen - progressive"),
                 "held": verdict("ViTMLP: frozen - progressive", vf > vp)})
    rows.append({"claim": "progressive unfreezing suits the weaker encoder: ResNet progressive > ResNet frozen (test AUC)",
                 "paper reported": "0.715 > 0.653", "this run": f"{rp:.3f} vs {rf:.3f}" + ci("ResNetMLP: progressive - frozen"),
                 "held": verdict("ResNetMLP: progressive - frozen", rp > rf)})
    # 5 pretrained beats scratch
    for b in BACKBONES:
        sc = v(b, "from scratch", "test AUC")
        best_setup = max(SETUPS[1:], key=lambda st: v(b, st, "test AUC"))
        bp = v(b, best_setup, "test AUC")
        key = f"{b}: {best_setup.split()[-1]} - scratch"
        rows.append({"claim": f"the best pretrained {b} beats {b} from scratch (test AUC)",
                     "paper reported": {"ResNetMLP": "0.715 > 0.549", "ViTMLP": "0.743 > 0.722"}[b],
                     "this run": f"{bp:.3f} ({best_setup}) vs {sc:.3f}" + ci(key),
                     "held": verdict(key, bp > sc)})
    return pd.DataFrame(rows)


def auc_difference(data: P2Data, pred_a: np.ndarray, pred_b: np.ndarray, *, n_boot: int, seed: int = 0) -> tuple[float, float, float]:
    """Paired bootstrap of test AUC(a) - AUC(b) (same resampled patients for both)."""
    idx = data.index("test")
    y = data.table["label"].to_numpy(float)[idx].astype(int)
    return metrics.bootstrap_ci(lambda yy, a, b: _auc(yy, -a) - _auc(yy, -b), y, pred_a, pred_b,
                                n_boot=n_boot, seed=seed, desc=None)


# --------------------------------------------------------------------------- notebook-level stages


@dataclass
class Pretrained:
    """Both autoencoders after pretraining: models, histories, best-checkpoint paths."""

    models: dict[str, nn.Module]
    history: pd.DataFrame
    checkpoints: dict[str, Path]


def pretrain_both(data: P2Data, prof: P2Profile, *, ckpt_dir: str | Path, device: torch.device, seed: int = 0,
                  resume: bool = False) -> Pretrained:
    """:func:`pretrain` for ``ResNetAutoEnc`` and ``ViTAutoEnc``."""
    models, hists, ckpts = {}, [], {}
    for kind in ("ResNetAutoEnc", "ViTAutoEnc"):
        models[kind], h, ckpts[kind] = pretrain(kind, data, prof, ckpt_dir=ckpt_dir, device=device, seed=seed, resume=resume)
        hists.append(h)
    return Pretrained(models, pd.concat(hists, ignore_index=True), ckpts)


def reconstruction_figure(pre: Pretrained, data: P2Data, *, seed: int = 0):
    """Coronal maximum-intensity projections of one validation CTA: clean, corrupted, both reconstructions."""
    import matplotlib.pyplot as plt

    row = int(data.index("pretrain_val")[0])
    clean = data.batch([row])["image"].cpu()
    corrupted = InputCorruption()(clean, seed=10_000_019)
    panels = {"clean": clean, "corrupted input": corrupted}
    with torch.no_grad():
        for kind, m in pre.models.items():
            dev = next(m.parameters()).device
            panels[kind] = m(corrupted.to(dev)).float().cpu().clamp(0, 1)
    sx, _, sz = data.spacing_mm
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels) + 0.8, 3.6), layout="constrained")
    for ax, (name, vol) in zip(axes, panels.items()):
        im = ax.imshow(vol[0, 0].numpy().max(axis=1).T, cmap="gray", origin="lower", aspect=sz / sx, vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    fig.colorbar(im, ax=axes, shrink=0.8, label="model input (the HU window mapped to 0-1)")  # one scale for all
    fig.suptitle(f"{data.table['subject_id'].iloc[row]} (pretraining validation), coronal MIP", fontsize=10)
    return fig


def schedule_figure(prof: P2Profile):
    """P2 Figure 3 for this profile's models: trainable parameters per epoch; and the table behind it."""
    from mmlib import viz
    from mmlib.train import trainable_parameter_schedule

    curves, rows = {}, []
    for backbone in BACKBONES:
        with torch.device("meta"):  # parameter counts only: no memory, no initialisation
            model = build_model(backbone, prof)
        for setup in SETUPS:
            s = trainable_parameter_schedule(model, schedule_for(setup, model, prof), prof.finetune_epochs)
            rows.append(s.assign(backbone=backbone, setup=setup))
            if setup == "pretrained progressive":
                curves[f"{backbone} progressive"] = s
            if setup == "pretrained frozen":
                curves[f"{backbone} frozen"] = s
    prog = {k: v for k, v in curves.items() if "progressive" in k}
    fig = viz.parameter_schedule(prog, list(prof.unfreeze_epochs),
                                 title=f"Progressive unfreezing ({prof.finetune_epochs} epochs)")
    ax = fig.axes[0]
    for line, (k, v) in zip(ax.get_lines(), prog.items()):
        frozen = curves[k.replace("progressive", "frozen")]
        ax.step(frozen["epoch"], frozen["trainable"] / 1e6, where="post", ls=":", color=line.get_color(),
                label=k.replace("progressive", "frozen"))
    ax.set_yscale("log")
    ax.legend(frameon=False, fontsize=8, loc="center right")
    table = pd.concat(rows, ignore_index=True)[["backbone", "setup", "epoch", "trainable", "frozen", "unfrozen_now"]]
    return fig, table


@dataclass
class FineTuned:
    """All fine-tuned setups: per (backbone, setup, seed) the model, its evaluation and load report."""

    models: dict[tuple[str, str, int], nn.Module]
    evals: dict[tuple[str, str, int], dict[str, Any]]
    history: pd.DataFrame
    load_reports: list[str]
    seeds: list[int]

    @property
    def summary(self) -> pd.DataFrame:
        """One row per (backbone, setup) at the first seed: AUCs, c-index, shares (0-1)."""
        rows = []
        for b in BACKBONES:
            for st in SETUPS:
                ev = self.evals[(b, st, self.seeds[0])]
                rows.append({"backbone": b, "setup": st, **{k: v for k, v in ev.items() if isinstance(v, float)},
                             **ev["contribution"].to_dict()})
        return pd.DataFrame(rows)

    def predictions(self, backbone: str, setup: str, seed: int | None = None) -> np.ndarray:
        p = self.evals[(backbone, setup, self.seeds[0] if seed is None else seed)]["predictions"]
        return p.loc[p["subset"] == "test", "rfs_pred_days"].to_numpy()

    def auc_differences(self, data: P2Data, prof: P2Profile) -> dict[str, tuple[float, float, float]]:
        """Paired-bootstrap test-AUC differences for the comparisons the claims make."""
        out = {}
        for b in BACKBONES:
            for st in SETUPS[1:]:
                out[f"{b}: {st.split()[-1]} - scratch"] = auc_difference(
                    data, self.predictions(b, st), self.predictions(b, "from scratch"), n_boot=prof.n_boot)
        out["ViTMLP: frozen - progressive"] = auc_difference(
            data, self.predictions("ViTMLP", "pretrained frozen"), self.predictions("ViTMLP", "pretrained progressive"),
            n_boot=prof.n_boot)
        out["ResNetMLP: progressive - frozen"] = auc_difference(
            data, self.predictions("ResNetMLP", "pretrained progressive"), self.predictions("ResNetMLP", "pretrained frozen"),
            n_boot=prof.n_boot)
        return out


def finetune_all(data: P2Data, prof: P2Profile, pre: Pretrained, *, device: torch.device, seeds: Sequence[int],
                 ckpt_dir: str | Path | None = None, resume: bool = False) -> FineTuned:
    """The six setups x ``seeds``: fine-tune, then :func:`evaluate` each."""
    models, evals, hists, reports = {}, {}, [], []
    for sd in seeds:
        for b in BACKBONES:
            for st in SETUPS:
                m, h, rep = finetune(b, st, data, prof, encoder_ckpt=pre.checkpoints[AUTOENCODER[b]], device=device,
                                     seed=sd, ckpt_dir=ckpt_dir, resume=resume)
                if rep and sd == seeds[0]:
                    reports.append(f"{b} · {st}: {rep}")
                models[(b, st, sd)] = m
                evals[(b, st, sd)] = evaluate(m, data, prof, device=device, seed=sd)
                hists.append(h)
    return FineTuned(models, evals, pd.concat(hists, ignore_index=True), reports, list(seeds))


def table2(ft: FineTuned) -> pd.DataFrame:
    """P2 Table 2 regenerated: this run (first seed) beside the paper's reported numbers."""
    s = ft.summary
    paper = PAPER_TABLE2.set_index(["backbone", "setup"])
    rows = []
    for _, r in s.iterrows():
        p = paper.loc[(r["backbone"], r["setup"])]
        rows.append({
            "backbone": r["backbone"], "setup": r["setup"],
            "train AUC": round(r["train AUC"], 3),
            "test AUC": round(r["test AUC"], 3),
            "test AUC 95% CI": f"{r['test AUC lo']:.2f}-{r['test AUC hi']:.2f}",
            "test c-index": round(r["test c-index"], 3),
            "vision %": round(100 * r["vision"], 2),
            "paper train AUC": p["train AUC"], "paper test AUC": p["test AUC"], "paper vision %": p["vision %"],
        })
    return pd.DataFrame(rows)


def table3(ft: FineTuned) -> pd.DataFrame:
    """P2 Table 3 regenerated (%, test split), one block for this run and one for the paper."""
    s = ft.summary
    cols = list(GROUPS)
    ours = s[["backbone", "setup"] + cols].copy()
    ours[cols] = (100 * ours[cols]).round(2)
    ours.insert(0, "source", "this run")
    paper = PAPER_TABLE3.copy()
    paper.insert(0, "source", "paper reported")
    return pd.concat([ours, paper], ignore_index=True)


def contribution_figure(table3_df: pd.DataFrame):
    """Stacked contribution bars, this run above the paper's."""
    from mmlib import viz

    df = table3_df.assign(label=lambda d: d["source"].str.replace("paper reported", "paper") + " · " + d["backbone"] + " · " + d["setup"])
    return viz.stacked_shares(df.set_index("label")[list(GROUPS)], order=list(GROUPS),
                              title="Modality contribution on the test split (%)")


def dead_vision_features(ft: FineTuned, data: P2Data, *, device: torch.device) -> pd.DataFrame:
    """Per setup (first seed): how many of the image branch's output features are 0 for every test patient."""
    rows = []
    te = data.index("test")
    for b in BACKBONES:
        for st in SETUPS:
            model = ft.models[(b, st, ft.seeds[0])].eval()
            with torch.no_grad():
                feats = torch.cat([model.vision_features(batch["image"].to(device)).float().cpu()
                                   for batch in data.batches(te, 16)])
            rows.append({"backbone": b, "setup": st, "features": feats.shape[1],
                         "always zero": int((feats == 0).all(dim=0).sum()),
                         "spread across patients (max SD)": float(feats.std(dim=0).max())})
    return pd.DataFrame(rows)


def seed_spread(ft: FineTuned) -> pd.DataFrame:
    """Mean ± SD over the fine-tuning seeds of test AUC, c-index and vision share."""
    rows = []
    for b in BACKBONES:
        for st in SETUPS:
            evs = [ft.evals[(b, st, sd)] for sd in ft.seeds]
            auc = np.array([e["test AUC"] for e in evs])
            ci = np.array([e["test c-index"] for e in evs])
            vis = np.array([100 * e["contribution"]["vision"] for e in evs])
            rows.append({"backbone": b, "setup": st, "seeds": len(evs),
                         "test AUC": f"{auc.mean():.3f} ± {auc.std(ddof=1) if len(auc) > 1 else 0:.3f}",
                         "test c-index": f"{ci.mean():.3f} ± {ci.std(ddof=1) if len(ci) > 1 else 0:.3f}",
                         "vision %": f"{vis.mean():.1f} ± {vis.std(ddof=1) if len(vis) > 1 else 0:.1f}"})
    return pd.DataFrame(rows)


@dataclass
class OcclusionStudy:
    case_text: str
    figure: Any
    table4: pd.DataFrame
    localisation: pd.DataFrame
    localisation_summary: pd.DataFrame


# an occlusion map whose largest change is below this (output units: 1000 days, so 0.01 day) is
# batch-size round-off, not sensitivity: the image branch is constant
CONSTANT_MAP_TOL = 1e-5


def _best_setup(ft: FineTuned, backbone: str) -> str:
    s = ft.summary.set_index(["backbone", "setup"])
    return max(SETUPS, key=lambda st: (s.loc[(backbone, st), "test AUC"], -SETUPS.index(st)))


def occlusion_study(ft: FineTuned, data: P2Data, prof: P2Profile, *, device: torch.device) -> OcclusionStudy:
    """Figure 5 and Table 4 (best model per backbone by test AUC, as the paper) and the
    plaque-localisation scores of every setup on the first ``occlusion_cases`` test relapses.

    A setup whose image branch is constant (vision share 0) gives a map of float round-off
    (below ``CONSTANT_MAP_TOL``) on the first case; its other cases are skipped and its summary
    row says so.
    """
    from mmlib import viz

    seed0 = ft.seeds[0]
    best = {b: _best_setup(ft, b) for b in BACKBONES}
    t = data.table
    te = data.index("test")
    relapse_rows = [int(r) for r in te if t["label"].iloc[r] == 1]
    relapse_rows.sort(key=lambda r: t["subject_id"].iloc[r])
    called = {}
    for b, st in best.items():
        p = ft.evals[(b, st, seed0)]["predictions"].set_index("subject_id")["rfs_pred_days"]
        called[b] = {r for r in relapse_rows if p[t["subject_id"].iloc[r]] < KAPPA_DAYS}
    both = [r for r in relapse_rows if all(r in c for c in called.values())]
    case = both[0] if both else relapse_rows[0]
    sid = t["subject_id"].iloc[case]
    case_text = (f"{sid}, a test relapse (RFS {int(t['rfs_days'].iloc[case])} days), "
                 + ("predicted a relapse by both models" if both else "not called a relapse by both models (no such case)"))
    # scored cases: the first `occlusion_cases` test relapses by id, the figure's case first
    scored = [case] + [r for r in relapse_rows if r != case][: max(prof.occlusion_cases - 1, 0)]
    shares = ft.summary.set_index(["backbone", "setup"])
    loc_rows, sum_rows, maps = [], [], {}
    for b in BACKBONES:
        for st in SETUPS:
            model = ft.models[(b, st, seed0)]
            n_scored, constant = 0, False
            for r in core.progress(scored, desc=f"occlusion {b} · {st}"):
                occ, sc = occlusion_case(model, data, r, prof, device=device)
                if r == case:
                    maps[(b, st)] = occ.sensitivity
                if occ.sensitivity.max() < CONSTANT_MAP_TOL:
                    constant = True  # the image does not move the output: nothing to localise
                    break
                if sc is not None:
                    n_scored += 1
                    loc_rows.append({"backbone": b, "setup": st, "subject_id": t["subject_id"].iloc[r],
                                     "forward passes": occ.forward_passes, **sc})
            sum_rows.append({"backbone": b, "setup": st, "vision %": round(100 * float(shares.loc[(b, st), "vision"]), 2),
                             "note": "image branch constant: the map is round-off" if constant else ""})
    localisation = pd.DataFrame(loc_rows)
    summary = pd.DataFrame(sum_rows)
    if len(localisation):
        loc = localisation.assign(above=lambda d: d["mass_inside"] > d["chance_p95"])
        agg = loc.groupby(["backbone", "setup"], sort=False).agg(
            cases=("subject_id", "size"), mass_on_plaque=("mass_inside", "mean"), chance=("chance_mean", "mean"),
            ratio_to_chance=("ratio", "mean"), above_chance_p95=("above", "mean"),
            median_rank_percentile=("rank_percentile", "median"), pointing_game=("pointing_game", "mean")).reset_index()
        summary = summary.merge(agg, on=["backbone", "setup"], how="left")
        summary["cases"] = summary["cases"].fillna(0).astype(int)
        summary = summary[["backbone", "setup", "vision %", "cases", "mass_on_plaque", "chance", "ratio_to_chance",
                           "above_chance_p95", "median_rank_percentile", "pointing_game", "note"]]
    elif data.masks is None:
        summary = pd.DataFrame({"note": ["this cohort has no plaque masks: localisation not scored"]})
    # the figure: the best model per backbone (as the paper), and the best-localising setup if another
    shown = [(b, st) for b, st in best.items()]
    if "ratio_to_chance" in summary and summary["ratio_to_chance"].notna().any():
        top = summary.loc[summary["ratio_to_chance"].idxmax()]
        if (top["backbone"], top["setup"]) not in shown:
            shown.append((top["backbone"], top["setup"]))
    maps = {f"{b} · {st}": maps[(b, st)] for b, st in shown}
    vol = data.images[case, 0].float().cpu().numpy()
    mask = data.masks[case].numpy() > 0 if data.masks is not None else None
    if mask is not None and mask.any():
        point = [int(round(c)) for c in np.argwhere(mask).mean(axis=0)]
    else:
        first = next(iter(maps.values()))
        point = [int(i) for i in np.unravel_index(np.argmax(first), first.shape)]
    fig = viz.orthogonal_slices(vol, maps, point=point, contour=mask, spacing=data.spacing_mm,
                                title=f"Occlusion sensitivity, {sid} (mask {list(prof.occlusion_mask)} voxels)",
                                volume_label="CTA")
    # Table 4: per-case contribution of the scratch and best models, as in the paper
    rows = []
    for b in BACKBONES:
        for st in dict.fromkeys(["from scratch", best[b]]):
            ps = ft.evals[(b, st, seed0)]["per_sample"].set_index("subject_id")
            rows.append({"source": "this run", "backbone": b, "setup": st,
                         **{g: round(100 * float(ps.loc[sid, g]), 2) for g in GROUPS}})
    t4 = pd.concat([pd.DataFrame(rows), PAPER_TABLE4.assign(source="paper reported")], ignore_index=True)
    return OcclusionStudy(case_text, fig, t4, localisation, summary)


def localisation_verdict(summary: pd.DataFrame) -> str:
    """One computed sentence per scored setup, best localiser first, from :func:`occlusion_study`'s summary."""
    if "ratio_to_chance" not in summary or not summary["ratio_to_chance"].notna().any():
        return "Plaque localisation: nothing scored (no plaque masks, or no setup whose image branch varies)."
    lines = ["Plaque localisation (occlusion mass on the plaque patches vs shuffled maps), best first:"]
    for _, r in summary.dropna(subset=["ratio_to_chance"]).sort_values("ratio_to_chance", ascending=False).iterrows():
        n = int(r["cases"])
        lines.append(
            f"- {r['backbone']} · {r['setup']} (vision contribution {r['vision %']:.1f}%): "
            f"{r['ratio_to_chance']:.1f}x chance, above the shuffles' 95th percentile in "
            f"{round(r['above_chance_p95'] * n)} of {n} cases, plaque patch at median percentile "
            f"{r['median_rank_percentile']:.1f}, map maximum on the plaque in {round(r['pointing_game'] * n)} of {n}")
    for _, r in summary[summary["note"].astype(str) != ""].iterrows():
        lines.append(f"- {r['backbone']} · {r['setup']}: not scored ({r['note']})")
    return "\n".join(lines)


def truth_comparison(data: P2Data, table3_df: pd.DataFrame) -> pd.DataFrame | None:
    """Planted shares of the log-hazard variance (fine-tuning test split) beside each setup's measured contribution (%)."""
    planted = planted_shares(data, "test")
    if planted is None:
        return None
    ours = table3_df[table3_df["source"] == "this run"]
    rows = [{"what": "planted (variance share of the log hazard)", **(100 * planted).round(2).to_dict()}]
    for _, r in ours.iterrows():
        rows.append({"what": f"measured · {r['backbone']} · {r['setup']}", **{g: r[g] for g in GROUPS}})
    df = pd.DataFrame(rows)
    df["|vision - planted| (points)"] = (df["vision"] - 100 * planted["vision"]).abs().round(2)
    return df


def paper_vs_run(ft: FineTuned, claims: pd.DataFrame) -> pd.DataFrame:
    """The index's first table: test AUC per setup (held = the paper's value lies in this run's 95% CI) and the claims."""
    s = ft.summary.set_index(["backbone", "setup"])
    paper = PAPER_TABLE2.set_index(["backbone", "setup"])
    rows = []
    for b in BACKBONES:
        for st in SETUPS:
            r, p = s.loc[(b, st)], paper.loc[(b, st)]
            inside = r["test AUC lo"] <= p["test AUC"] <= r["test AUC hi"]
            rows.append({"quantity": f"test AUC, {b} {st}", "paper reported": f"{p['test AUC']:.3f}",
                         "this run": f"{r['test AUC']:.3f} ({r['test AUC lo']:.2f}-{r['test AUC hi']:.2f})",
                         "held on this data": "within CI" if inside else "outside CI"})
    for _, c in claims.iterrows():
        rows.append({"quantity": c["claim"], "paper reported": c["paper reported"], "this run": c["this run"],
                     "held on this data": c["held"]})
    return pd.DataFrame(rows)


def timed(fn, *args, **kwargs):
    """``(result, seconds)`` of a call."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
