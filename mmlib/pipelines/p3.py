"""Logic of the P3 pipeline (MoRE: contrastive pre-training on chest X-rays, 12-lead ECGs and reports).

The notebook `notebooks/p3_more_xray_ecg_text.py` calls these stages in order.

Stages, each a plain function called in order:

1. :data:`PROFILES` -- the ``smoke`` / ``quick`` / ``full`` sizes (:class:`P3Profile`).
2. :func:`load_data` -- the X-rays (PNG -> [0, 1], resized to the profile's side), the ECGs
   (WFDB -> :func:`mmlib.data.readers.preprocess_ecg`: 100 Hz, 10 s, each lead scaled to [-1, 1]),
   one text per patient (:func:`compose_text`), the 4 X-ray and 5 ECG labels and the split.
3. :func:`build_model` -- :class:`MoRE`: :class:`~mmlib.models.more.XrayViT`,
   :class:`~mmlib.models.more.ECGTransformer` (both with DropKey), the LoRA
   :class:`~mmlib.text.TextEncoder` and one :class:`~mmlib.models.clip.ProjectionHead` per
   modality into a shared, L2-normalised space.
4. :func:`pretrain` -- AdamW on :class:`~mmlib.losses.TriModalLoss` (text-X-ray and text-ECG
   InfoNCE; ``modalities=("xray",)`` or ``("ecg",)`` for the two-modality ablation), train and
   validation loss per epoch; the loop is :func:`mmlib.train.fit`, so it runs data-parallel under
   ``torchrun --nproc_per_node=N``.
5. Evaluation on the test split: :func:`embed` (the embeddings of some rows),
   :func:`zero_shot_table` (AUROC of prompt scores per finding / superclass),
   :func:`retrieval_table` (recall@k in every direction among text, X-ray and ECG, with the
   chance level) and :func:`linear_probe_table` (AUROC of a logistic regression on the frozen
   embeddings, fitted on the training split); :func:`zero_shot_ci` adds bootstrap intervals,
   :func:`supervised_table` trains the same encoders from scratch on the labels, and
   :func:`classification_table` puts the three side by side.
6. :func:`text_parameter_table` (trainable text parameters: full, LoRA, frozen) and
   :func:`run_ablations` (DropKey off / constant / linear, text encoder LoRA / frozen / full,
   two vs three modalities; every variant pre-trained with the same seed and scored alike), and
   :func:`ablation_differences` (each comparison paired over the test subjects, from
   :func:`subject_scores`, with a bootstrap 95% CI).
7. Ground truth: :func:`attention_scores` (X-ray attention rollout mass inside the planted
   finding masks, :func:`load_finding_masks`, against a random map), :func:`ecg_attention`,
   :func:`umap_figure` coloured by the hidden conditions; :func:`real_ecg_demo` sends pydicom's
   real 12-lead recording through the same path.
8. :func:`paper_vs_run` and :func:`claims_table`.

The text of a patient is the FINDINGS section of the radiology report followed by the machine ECG
statement (:func:`compose_text`): one text per patient, so one text embedding is contrasted with
both the X-ray and the ECG (TriModalLoss's design). The report's EXAMINATION / INDICATION /
COMPARISON header carries no label and its IMPRESSION repeats the FINDINGS; with them the text is
~120 MiniLM tokens on average (up to 200) and a 128-token cut would drop the ECG statement. Without
them it is at most ~120 tokens on the smoke cohort, so ``max_length = 128`` keeps all of it.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from mmlib import core
from mmlib.core import Profile, ProfileSet
from mmlib.data import Cohort

__all__ = [
    "ABLATIONS", "ECG_CLASSES", "MODALITIES", "NONINFERIORITY_MARGIN", "PAPER_REPORTED", "PROFILES", "PROMPTS",
    "SCORE_COLUMNS", "SPLITS", "XRAY_FINDINGS",
    "MoRE", "P3Data", "P3Profile", "SubjectScores", "ablation_differences", "attention_figure", "attention_scores",
    "build_model", "claims_table",
    "classification_figure", "classification_table", "compose_text", "condition_labels", "ecg_attention", "embed",
    "linear_probe_table", "load_data", "load_finding_masks", "paper_vs_run", "pretrain", "real_ecg_demo",
    "retrieval_figure", "retrieval_table", "run_ablations", "run_summary", "score_components", "standardise_xray",
    "subject_scores", "supervised_table",
    "text_parameter_table", "training_figure", "umap_figure", "xray_attention_maps", "xray_saliency_maps",
    "zero_shot_ci", "zero_shot_table",
]

log = core.get_logger(__name__)

XRAY_FINDINGS = ("atelectasis", "cardiomegaly", "edema", "pleural_effusion")  # = mmlib.cohorts.xray_ecg's
ECG_CLASSES = ("NORM", "MI", "STTC", "CD", "HYP")  # PTB-XL diagnostic superclasses
MODALITIES = ("xray", "ecg")
SPLITS = ("train", "val", "test")
TEXT_COLUMNS = ("report", "ecg_statement")

# Zero-shot prompts: class -> (positive prompt, negative prompt). The reports negate absent X-ray
# findings ("no pleural effusion"), so an X-ray finding's negative prompt is its negation. ECG
# statements never negate; they end in "Normal ECG" or "Abnormal ECG", so the negative prompt of an
# ECG superclass is "Normal ECG" (of NORM itself: "Abnormal ECG").
PROMPTS: dict[str, tuple[str, str]] = {
    "atelectasis": ("atelectasis", "no atelectasis"),
    "cardiomegaly": ("cardiomegaly, the heart is enlarged", "the heart size is normal, no cardiomegaly"),
    "edema": ("pulmonary edema", "no pulmonary edema"),
    "pleural_effusion": ("pleural effusion", "no pleural effusion"),
    "NORM": ("Normal ECG", "Abnormal ECG"),
    "MI": ("infarct", "Normal ECG"),
    "STTC": ("ST-T wave changes, ST depression, T wave abnormality", "Normal ECG"),
    "CD": ("bundle branch block", "Normal ECG"),
    "HYP": ("left ventricular hypertrophy, LVH", "Normal ECG"),
}


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class P3Profile(Profile):
    """Sizes of one P3 run; ``full`` is MoRE's (ViT-B/16 at 224 px, a 12-layer ECG transformer, patch 5)."""

    preset: str = "quick"  # cohort preset generated when data_dir holds no manifest
    n_subjects: int | None = None  # subjects of the generated cohort (None: the preset's)
    image_size: int = 64  # X-ray side fed to the ViT (the quick cohort's 128 px PNGs are resized)
    patch_size: int = 8  # ViT patch side (64 / 8 -> 8 x 8 = 64 patches)
    dim: int = 64
    depth: int = 4
    heads: int = 4
    ecg_samples: int = 1000  # 10 s at 100 Hz
    ecg_fs: float = 100.0
    ecg_patch: int = 10  # 1000 / 10 -> 100 tokens
    dropkey: float = 0.3  # public code: 0.3 in every layer
    dropkey_mode: str = "constant"  # "constant" (public code), "linear" (paper text) or "off"
    text_mode: str = "lora"  # "lora", "frozen" or "full"
    # adapt only the last n of MiniLM's 6 layers, the frozen part cached once per report (None: all, as MoRE)
    text_train_layers: int | None = None
    lora_r: int = 16
    lora_alpha: float = 8
    lora_dropout: float = 0.1
    max_length: int = 128  # tokens; FINDINGS + ECG statement fit (see the module docstring)
    proj_dim: int = 128
    # MoRE's epoch count is not in our sources (neither the paper text nor the public code we read give it);
    # full's 50 is our choice.
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3  # X-ray / ECG encoders and the three projection heads
    text_lr: float = 3e-4  # trainable text-encoder weights (the LoRA adapters; all weights in "full" mode)
    weight_decay: float = 0.1
    temperature: float = 0.02  # public code: 0.02, declared learnable but never updated
    learnable_temperature: bool = False
    eval_batch_size: int = 64

    @property
    def cohort_knobs(self) -> dict[str, Any]:
        """Generator knobs this profile overrides (passed to :func:`mmlib.cohorts.open_cohort`)."""
        return {} if self.n_subjects is None else {"n_subjects": self.n_subjects}


# smoke cuts the texts at 64 tokens (losing most ECG statements) to stay fast: it only proves the code runs.
# full uses the lr of PAPERS.md (AdamW 3e-5, wd 0.1); its batch of 32 and 50 epochs are our choice (not in our sources).
PROFILES = ProfileSet(
    smoke=P3Profile(name="smoke", preset="smoke", image_size=32, patch_size=8, dim=16, depth=1, heads=2,
                    ecg_patch=50, lora_r=4, max_length=64, proj_dim=128, epochs=1, batch_size=16, text_train_layers=1),
    # quick departs from the public code's temperature and weight decay. Measured on the quick cohort (seed 0, 2 CPU
    # threads, encoders trained from scratch on 350 pairs): with tau 0.02 and wd 0.1 the loss sat at chance
    # (ln 32) for 8 epochs at lr 5e-4 and retrieval stayed at chance; with tau 0.1 and wd 0.01 it left chance at
    # epoch 4 and text -> ECG recall@5 reached 0.15 (chance 0.05) by epoch 6. The paper pretrains on far more pairs.
    # quick also adapts only MiniLM's last layer (LoRA there; the 5 frozen layers run once per report and are
    # cached): LoRA in all 6 layers cost 1.7 s per batch of 32 reports on 2 cores, in the last one 0.3 s, and seven
    # pre-training runs (the ablations) must fit in the 10-minute budget. With it, 10 epochs reached text -> X-ray
    # and text -> ECG recall@5 of 0.09 (chance 0.05) and zero-shot AUROC 0.78-0.99 on all but atelectasis (measured).
    quick=P3Profile(name="quick", lr=5e-4, text_lr=5e-4, temperature=0.1, weight_decay=0.01, text_train_layers=1),
    full=P3Profile(name="full", preset="full", image_size=224, patch_size=16, dim=768, depth=12, heads=12,
                   ecg_patch=5, max_length=256, epochs=50, lr=3e-5, text_lr=3e-5, eval_batch_size=128),
)


# --------------------------------------------------------------------------- data


@dataclass
class P3Data:
    """Everything the model sees, in memory; row i of every field is subject i.

    Attributes:
        table: one row per subject: ``subject_id``, ``split`` and the 9 labels.
        xray: (N, 1, S, S) float32 X-rays in [0, 1] (S = the profile's ``image_size``).
        ecg: (N, 12, T) float32 ECGs after :func:`mmlib.data.readers.preprocess_ecg`, each lead in [-1, 1].
        texts: N strings, :func:`compose_text` of the report and the ECG statement.
        xray_labels: (N, 4) float32 0/1 labels, columns :data:`XRAY_FINDINGS`.
        ecg_labels: (N, 5) float32 0/1 labels, columns :data:`ECG_CLASSES`.
        root: the cohort folder.
    """

    table: pd.DataFrame
    xray: torch.Tensor
    ecg: torch.Tensor
    texts: list[str]
    xray_labels: np.ndarray
    ecg_labels: np.ndarray
    root: Any = None
    xray_classes: tuple[str, ...] = XRAY_FINDINGS
    ecg_classes: tuple[str, ...] = ECG_CLASSES
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def index(self, split: str) -> np.ndarray:
        """Row positions of ``split`` (``train``, ``val`` or ``test``)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
        return np.flatnonzero((self.table["split"] == split).to_numpy())

    def batch(self, idx: Sequence[int] | np.ndarray, modalities: Sequence[str] = MODALITIES) -> dict[str, Any]:
        """``{"text": [str], "xray": (B, 1, S, S), "ecg": (B, 12, T)}`` of the rows ``idx`` (only ``modalities``)."""
        rows = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        out: dict[str, Any] = {"text": [self.texts[int(i)] for i in rows]}
        if "xray" in modalities:
            out["xray"] = self.xray[rows]
        if "ecg" in modalities:
            out["ecg"] = self.ecg[rows]
        return out


def _section(report: str, name: str, stop: Sequence[str]) -> str | None:
    """The text after ``NAME:`` up to the next header in ``stop`` (None when the report has no such header)."""
    m = re.search(rf"(?m)^\s*{name}\s*:", report)
    if m is None:
        return None
    rest = report[m.end():]
    ends = [e.start() for h in stop if (e := re.search(rf"(?m)^\s*{h}\s*:", rest)) is not None]
    return rest[: min(ends)] if ends else rest


def compose_text(report: str, statement: str) -> str:
    """One text per patient: the report's FINDINGS section, a space, and the ECG statement, whitespace collapsed.

    A report without a ``FINDINGS:`` header is used whole. The statement's lines are joined with
    ". " (they are separate statements).
    """
    findings = _section(report, "FINDINGS", ("IMPRESSION",))
    body = " ".join((report if findings is None else findings).split())
    lines = [" ".join(ln.split()) for ln in statement.splitlines() if ln.strip()]
    ecg = ". ".join(ln.rstrip(".") for ln in lines) + ("." if lines else "")
    return f"{body} {ecg}".strip()


def _read_xray(path: Any, size: int) -> torch.Tensor:
    from mmlib.data.readers import read_image_2d

    try:
        img = torch.from_numpy(np.ascontiguousarray(read_image_2d(path)))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the X-ray (column 'xray'): {err}") from err
    if img.shape != (size, size):
        img = F.interpolate(img[None, None], size=(size, size), mode="bilinear", antialias=True,
                            align_corners=False)[0, 0].clamp_(0.0, 1.0)
    return img


def _read_ecg(path: Any, prof: P3Profile) -> np.ndarray:
    from mmlib.data.readers import STANDARD_LEADS, preprocess_ecg, read_wfdb

    try:
        ecg = read_wfdb(path).reorder(STANDARD_LEADS)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the ECG (column 'ecg'): {err}") from err
    x = preprocess_ecg(ecg, target_fs=prof.ecg_fs, duration_s=prof.ecg_samples / prof.ecg_fs).signal
    if x.shape != (12, prof.ecg_samples) or not np.isfinite(x).all():
        raise ValueError(f"{path}: the preprocessed ECG is {x.shape} (finite: {bool(np.isfinite(x).all())}), "
                         f"expected (12, {prof.ecg_samples}) finite values")
    return x


def _read_texts(cohort: Cohort, column: str) -> list[str]:
    out = []
    for rel in cohort.subjects[column]:
        path = cohort.root / str(rel)
        try:
            out.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: cannot read the text of column {column!r}: {err}") from err
    return out


def load_data(cohort: Cohort, prof: P3Profile) -> P3Data:
    """Read every subject's X-ray, ECG, report, ECG statement, labels and split.

    Raises:
        ValueError: naming ``subjects.csv`` and the column when a column is missing, a label is
            empty or not 0/1, or a split is unknown; naming the file when an X-ray, ECG or text
            cannot be read.
    """
    sub = cohort.subjects
    where = f"{cohort.root}/subjects.csv"
    id_col = cohort.manifest.id_column
    split_col = cohort.manifest.split_column or "split"
    needed = ["xray", "ecg", *TEXT_COLUMNS, *XRAY_FINDINGS, *ECG_CLASSES, split_col]
    missing = [c for c in needed if c not in sub.columns]
    if missing:
        raise ValueError(f"cohort {cohort.name!r} ({where}) lacks column(s) {missing}; P3 needs {needed} "
                         "(see data_manifest/cohorts/xray_ecg.md)")
    for col in ("xray", "ecg", *TEXT_COLUMNS, split_col):
        empty = np.flatnonzero(sub[col].isna().to_numpy())
        if len(empty):
            raise ValueError(f"{where}: column {col!r} is empty for subject(s) {sub[id_col].iloc[empty[:5]].tolist()}")
    t = pd.DataFrame({"subject_id": sub[id_col].astype(str).to_numpy(), "split": sub[split_col].astype(str).to_numpy()})
    bad = sorted(set(t["split"]) - set(SPLITS))
    if bad:
        raise ValueError(f"{where}: column {split_col!r} has value(s) {bad}; allowed: {list(SPLITS)}")
    labels = {}
    for col in (*XRAY_FINDINGS, *ECG_CLASSES):
        v = pd.to_numeric(sub[col], errors="coerce").astype(float).to_numpy()
        wrong = np.flatnonzero(~np.isin(v, (0.0, 1.0)))
        if len(wrong):
            raise ValueError(f"{where}: column {col!r} must be 0/1, got {sub[col].iloc[wrong[:5]].tolist()} for "
                             f"subject(s) {t['subject_id'].iloc[wrong[:5]].tolist()}")
        labels[col] = v
        t[col] = v.astype(int)

    xray_paths, ecg_paths = cohort.paths("xray"), cohort.paths("ecg")
    xrays = [_read_xray(p, prof.image_size) for p in core.progress(xray_paths, desc="read X-rays")]
    ecgs = [_read_ecg(p, prof) for p in core.progress(ecg_paths, desc="read ECGs")]
    reports, statements = (_read_texts(cohort, c) for c in TEXT_COLUMNS)
    texts = [compose_text(r, s) for r, s in zip(reports, statements)]
    return P3Data(
        table=t,
        xray=torch.stack(xrays)[:, None].float().contiguous(),
        ecg=torch.from_numpy(np.stack(ecgs).astype(np.float32)),
        texts=texts,
        xray_labels=np.stack([labels[c] for c in XRAY_FINDINGS], 1).astype(np.float32),
        ecg_labels=np.stack([labels[c] for c in ECG_CLASSES], 1).astype(np.float32),
        root=cohort.root,
    )


# --------------------------------------------------------------------------- model


@lru_cache(maxsize=2)
def _text_base(path: str | None = None) -> tuple[Any, nn.Module]:
    """The tokenizer and language model, loaded once per process (each model gets a deep copy)."""
    from mmlib.text import load_text_model

    return load_text_model(path)


class MoRE(nn.Module):
    """X-ray ViT, ECG transformer and text encoder, each followed by a projection head into one space.

    Args:
        xray: the X-ray encoder (returns ``{"pooled": (B, dim)}``).
        ecg: the ECG encoder (same).
        text: a :class:`~mmlib.text.TextEncoder`.
        proj_dim: width of the shared space.
    """

    def __init__(self, xray: nn.Module, ecg: nn.Module, text: nn.Module, proj_dim: int = 128) -> None:
        super().__init__()
        from mmlib.models.clip import ProjectionHead

        self.xray, self.ecg, self.text = xray, ecg, text
        self.proj_dim = int(proj_dim)
        self.heads = nn.ModuleDict({
            "xray": ProjectionHead(xray.dim, xray.dim, proj_dim),
            "ecg": ProjectionHead(ecg.dim, ecg.dim, proj_dim),
            "text": ProjectionHead(text.dim, text.dim, proj_dim),
        })

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """B strings -> (B, proj_dim) unit vectors."""
        return F.normalize(self.heads["text"](self.text(list(texts))), dim=-1)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``{"text": [B str], "xray": (B, 1, S, S), "ecg": (B, 12, T)}`` -> the L2-normalised (B, proj_dim)
        embedding of each modality present in ``batch`` (keys ``text``, ``xray``, ``ecg``)."""
        if not any(k in batch for k in ("text", *MODALITIES)):
            raise ValueError(f"MoRE.forward needs at least one of 'text', 'xray', 'ecg', got keys {sorted(batch)}")
        out: dict[str, torch.Tensor] = {}
        if "text" in batch:
            out["text"] = self.encode_text(batch["text"])
        for key in MODALITIES:
            if key in batch:
                x = standardise_xray(batch[key]) if key == "xray" else batch[key]
                out[key] = F.normalize(self.heads[key](getattr(self, key)(x)["pooled"]), dim=-1)
        return out


def standardise_xray(images: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each image minus its mean, over its standard deviation (per image and channel).

    The cohort's radiographs vary in exposure (gamma, gain, offset): on [0, 1] inputs a small ViT
    trained from scratch on the quick cohort stayed at chance, contrastively and even supervised (4
    findings, 20 epochs: pleural-effusion AUROC 0.32, below chance, exposure being a confounder);
    standardised, the same run reached cardiomegaly 0.99, edema 0.89, effusion 0.68 (measured).
    """
    mean = images.mean(dim=(-2, -1), keepdim=True)
    std = images.std(dim=(-2, -1), keepdim=True)
    return (images - mean) / (std + eps)


def build_model(prof: P3Profile, text_mode: str | None = None, dropkey_mode: str | None = None) -> MoRE:
    """The :class:`MoRE` of ``prof`` (``text_mode`` / ``dropkey_mode`` override the profile's)."""
    from mmlib.models.more import ECGTransformer, XrayViT
    from mmlib.text import TextEncoder

    mode = prof.dropkey_mode if dropkey_mode is None else dropkey_mode
    common = dict(dim=prof.dim, depth=prof.depth, n_heads=prof.heads, dropkey=prof.dropkey, dropkey_mode=mode)
    xray = XrayViT(image_size=prof.image_size, patch_size=prof.patch_size, in_channels=1, **common)
    ecg = ECGTransformer(n_leads=12, n_samples=prof.ecg_samples, patch_size=prof.ecg_patch, **common)
    tokenizer, base = _text_base()
    tmode = prof.text_mode if text_mode is None else text_mode
    text = TextEncoder(tmode, r=prof.lora_r, lora_alpha=prof.lora_alpha, lora_dropout=prof.lora_dropout,
                       max_length=prof.max_length, cache_tokens=True, tokenizer=tokenizer, model=copy.deepcopy(base),
                       train_layers=prof.text_train_layers,
                       cache_frozen=prof.text_train_layers is not None or tmode == "frozen")
    return MoRE(xray, ecg, text, prof.proj_dim)


# --------------------------------------------------------------------------- pre-training


def _check_modalities(modalities: Sequence[str]) -> tuple[str, ...]:
    mods = tuple(modalities)
    if not mods or any(m not in MODALITIES for m in mods) or len(set(mods)) != len(mods):
        raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities!r}")
    return mods


class _PretrainLoss(nn.Module):
    """``loss_fn(model, batch)`` of :func:`mmlib.train.fit`: :class:`~mmlib.losses.TriModalLoss` on MoRE's embeddings.

    A module, so that ``fit`` puts it inside its DistributedDataParallel wrapper: a learnable
    temperature is then synchronised across ranks like the model's weights (a fixed one is a buffer).
    Returns ``loss`` and the per-pair terms (``text_xray`` / ``text_ecg``, those of the batch's
    modalities), which ``fit`` logs as ``train_<term>`` / ``val_<term>``.
    """

    def __init__(self, temperature: float, learnable: bool) -> None:
        super().__init__()
        from mmlib.losses import TriModalLoss

        self.trimodal = TriModalLoss(temperature, learnable=learnable)

    def forward(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        emb = model(batch)
        out = self.trimodal(emb["text"], emb.get("xray"), emb.get("ecg"))
        return {k: out[k] for k in ("loss", "text_xray", "text_ecg") if k in out}


def _frozen_stages(model: MoRE, untrained: Sequence[str]) -> tuple[str, ...]:
    """Submodule paths for a :class:`~mmlib.train.FreezeSchedule` that keeps ``fit`` from training what
    :func:`pretrain` does not train.

    ``fit`` sets ``requires_grad`` on every parameter of the model outside the schedule's frozen stages,
    which would unfreeze the pretrained text weights that LoRA (or ``"frozen"`` mode, or ``train_layers``)
    keeps fixed. The stages are the encoders and heads of ``untrained`` (modalities left out) and every
    module whose own parameters are all frozen now: those are leaves (Linear, LayerNorm, Embedding), so
    the eval mode ``fit`` gives frozen stages changes no dropout.
    """
    stages = [s for m in untrained for s in (m, f"heads.{m}")]
    for name, module in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in stages):
            continue
        own = list(module.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            stages.append(name)
        elif any(not p.requires_grad for p in own):
            raise RuntimeError(f"pretrain: module {name!r} mixes trainable and frozen parameters; "
                               "fit's freezing schedule cannot keep only some of them frozen")
    return tuple(stages)


def pretrain(data: P3Data, prof: P3Profile, *, modalities: Sequence[str] = MODALITIES, text_mode: str | None = None,
             dropkey_mode: str | None = None, seed: int = 0,
             device: str | torch.device = "cpu") -> tuple[MoRE, pd.DataFrame]:
    """Contrastive pre-training of :class:`MoRE` on the training split, validation loss per epoch.

    AdamW (encoders and heads at ``prof.lr``, the trainable text weights at ``prof.text_lr``, weight
    decay ``prof.weight_decay``), :class:`~mmlib.losses.TriModalLoss` at ``prof.temperature`` (a
    learnable one in the optimizer with the text head). Only the encoders of ``modalities`` (and the
    text side) are given to the optimizer: with ``modalities=("xray",)`` the ECG encoder and head are
    never updated and the loss has no ECG term.

    The loop is :func:`mmlib.train.fit`, so pre-training runs data-parallel under
    ``torchrun --nproc_per_node=N`` (one process otherwise). The batches are reshuffled every epoch by a
    generator seeded with ``seed * 100_003 + epoch``; the weights draw from torch's generator seeded
    with ``seed``, DropKey and LoRA dropout from the one ``fit`` seeds at each epoch with ``seed`` and
    the epoch; so two runs with one seed on one device give the same history. A training batch is
    skipped when it has fewer than 2 pairs per process (InfoNCE of one pair is 0, with no gradient)
    or, under data parallelism, when it does not divide by the world size (``fit`` gives each rank an
    equal contiguous shard): only the last batch of an epoch can be skipped, and ``prof.batch_size``
    must divide by the world size. Validation batches of one pair are skipped too; validation is not
    sharded (every rank scores every validation pair).

    Under data parallelism :class:`~mmlib.losses.TriModalLoss` gathers the other ranks' embeddings, so
    each rank's reports are contrasted with the whole global batch's signals (and the reverse): the
    negatives, the loss and its gradient are the single-process ones of the global batch.

    The epoch's ``train_*`` values are ``fit``'s means: each batch's loss weighted by its number of pairs
    (the pair-weighted mean the loop had before ``fit``); under data parallelism each rank's shard loss
    weighted by the shard's pairs, sums and counts all-reduced, so every rank logs the same global mean.

    Returns:
        ``(model, history)``: the model after the last epoch, in eval mode; one row per epoch with
        ``epoch`` (from 1), ``train_loss``, ``val_loss`` (NaN without two validation pairs), the
        per-pair terms ``train_text_xray`` / ``val_text_xray`` / ``train_text_ecg`` / ``val_text_ecg``
        (those of ``modalities`` only) and ``seconds``.
    """
    from mmlib import distributed
    from mmlib.train import FreezeSchedule, fit, index_batches

    mods = _check_modalities(modalities)
    device = core.select_device(device) if isinstance(device, str) else torch.device(device)
    if device.type == "cuda" and device.index is None and distributed.launched_world_size() > 1:
        device = distributed.setup("nccl")  # cuda:LOCAL_RANK: the loss module must sit on fit's device
    world = distributed.launched_world_size() if not distributed.is_initialized() else distributed.world_size()
    if prof.batch_size % world:
        raise ValueError(f"pretrain: batch_size {prof.batch_size} does not divide by the world size {world}; "
                         "every training batch must split into equal shards")
    torch.manual_seed(seed)
    model = build_model(prof, text_mode=text_mode, dropkey_mode=dropkey_mode).to(device)
    loss_fn = _PretrainLoss(prof.temperature, prof.learnable_temperature).to(device)
    groups: list[dict[str, Any]] = [
        {"params": [p for m in mods for p in (*getattr(model, m).parameters(), *model.heads[m].parameters())],
         "lr": prof.lr},
        {"params": list(model.heads["text"].parameters()) + list(loss_fn.parameters()), "lr": prof.lr},
        {"params": [p for p in model.text.parameters() if p.requires_grad], "lr": prof.text_lr},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=prof.weight_decay)
    requires_grad = [p.requires_grad for p in model.parameters()]
    schedule = FreezeSchedule("MoRE pre-training", frozen=_frozen_stages(model, [m for m in MODALITIES if m not in mods]))
    train, val = data.index("train"), data.index("val")

    def train_batches(epoch: int):
        for chunk in index_batches(train, prof.batch_size, shuffle_seed=seed * 100_003 + epoch):
            if len(chunk) >= 2 * world and len(chunk) % world == 0:
                yield data.batch(chunk, mods)

    def val_batches():
        for chunk in index_batches(val, prof.eval_batch_size):
            if len(chunk) >= 2:
                yield data.batch(chunk, mods)

    hist = fit(model, loss_fn=loss_fn, train_batches=train_batches, val_batches=val_batches if len(val) > 1 else None,
               epochs=prof.epochs, optimizer=opt, schedule=schedule, device=device, seed=seed,
               desc="MoRE pre-training")
    for p, flag in zip(model.parameters(), requires_grad):  # fit leaves the untrained modality frozen
        p.requires_grad_(flag)
    model.eval()
    if hist.empty:  # no epochs
        return model, pd.DataFrame(columns=["epoch", "train_loss", "val_loss", "seconds"])
    rows = pd.DataFrame({"epoch": hist["epoch"].astype(int) + 1, "train_loss": hist["train_loss"].astype(float),
                         "val_loss": pd.to_numeric(hist["val_loss"]).astype(float)})
    for key in ("text_xray", "text_ecg"):
        if f"train_{key}" in hist:
            rows[f"train_{key}"] = hist[f"train_{key}"].astype(float)
            rows[f"val_{key}"] = hist[f"val_{key}"].astype(float) if f"val_{key}" in hist else float("nan")
    rows["seconds"] = hist["seconds"].astype(float)
    for row in rows.to_dict("records"):
        log.debug("epoch %d: %s", row["epoch"], row)
    return model, rows


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def embed(model: MoRE, data: P3Data, idx: np.ndarray | Sequence[int], *, batch_size: int = 64,
          device: str | torch.device | None = None) -> dict[str, np.ndarray]:
    """The unit-norm embeddings of the rows ``idx``, in eval mode.

    Returns:
        ``{"text": (n, proj_dim), "xray": ..., "ecg": ...}`` float32 arrays, row j = subject ``idx[j]``.
    """
    device = next(model.parameters()).device if device is None else torch.device(device)
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"text": [], "xray": [], "ecg": []}
    idx = np.asarray(idx)
    for i in range(0, len(idx), batch_size):
        batch = data.batch(idx[i:i + batch_size])
        out = model({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()})
        for k in parts:
            parts[k].append(out[k].float().cpu())
    model.train(was_training)
    return {k: (torch.cat(v).numpy() if v else np.zeros((0, model.proj_dim), np.float32)) for k, v in parts.items()}


def _labels(data: P3Data) -> list[tuple[str, str, np.ndarray]]:
    """(modality, class, (N,) labels) of every class: X-ray findings on the X-ray, superclasses on the ECG."""
    return ([("xray", c, data.xray_labels[:, j]) for j, c in enumerate(data.xray_classes)]
            + [("ecg", c, data.ecg_labels[:, j]) for j, c in enumerate(data.ecg_classes)])


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if np.unique(y).size == 2 else float("nan")


@torch.no_grad()
def _prompt_scores(model: MoRE, data: P3Data, idx: np.ndarray, prompts: Mapping[str, tuple[str, str]],
                   emb: Mapping[str, np.ndarray] | None = None) -> tuple[list, np.ndarray, np.ndarray]:
    """``(classes, s_pos, s_neg)``: the classes of :func:`_labels` and, per row of ``idx`` (rows) and class
    (columns), the cosine of the class's signal embedding to its positive and to its negative prompt."""
    from mmlib.text import zero_shot_scores

    emb = embed(model, data, idx) if emb is None else emb
    classes = _labels(data)
    missing = [c for _, c, _ in classes if c not in prompts]
    if missing:
        raise ValueError(f"zero_shot_table: no prompts for class(es) {missing}")
    was_training = model.training
    model.eval()
    pos = model.encode_text([prompts[c][0] for _, c, _ in classes]).float().cpu()
    neg = model.encode_text([prompts[c][1] for _, c, _ in classes]).float().cpu()
    model.train(was_training)
    cols_pos, cols_neg = [], []
    for j, (mod, _, _) in enumerate(classes):
        x = torch.from_numpy(emb[mod])
        cols_pos.append(zero_shot_scores(x, pos[j:j + 1])[:, 0].numpy())
        cols_neg.append(zero_shot_scores(x, neg[j:j + 1])[:, 0].numpy())
    return classes, np.stack(cols_pos, 1), np.stack(cols_neg, 1)


def zero_shot_table(model: MoRE, data: P3Data, *, split: str = "test",
                    prompts: Mapping[str, tuple[str, str]] | None = None) -> pd.DataFrame:
    """Zero-shot AUROC per X-ray finding (scored on the X-ray embedding) and ECG superclass (on the ECG's).

    Each class has a positive and a negative prompt (:data:`PROMPTS`), embedded by the text encoder
    and its head. Two scores per sample: ``cos(signal, positive) - cos(signal, negative)`` (column
    ``auroc``, the main one: it cancels what both prompts share) and ``cos(signal, positive)``
    alone (column ``auroc_positive_only``).

    Returns:
        One row per class (4 + 5): ``modality``, ``class``, ``positive_prompt``, ``negative_prompt``,
        ``n``, ``n_positive``, ``auroc``, ``auroc_positive_only`` (NaN if the split holds one label value).
    """
    prompts = dict(PROMPTS if prompts is None else prompts)
    idx = data.index(split)
    classes, s_pos, s_neg = _prompt_scores(model, data, idx, prompts)
    rows = []
    for j, (mod, cls, y) in enumerate(classes):
        yt = y[idx]
        rows.append({"modality": mod, "class": cls, "positive_prompt": prompts[cls][0],
                     "negative_prompt": prompts[cls][1], "n": len(yt), "n_positive": int(yt.sum()),
                     "auroc": _auroc(yt, s_pos[:, j] - s_neg[:, j]), "auroc_positive_only": _auroc(yt, s_pos[:, j])})
    return pd.DataFrame(rows)


def retrieval_table(model: MoRE, data: P3Data, *, split: str = "test", ks: Sequence[int] = (1, 5, 10),
                    embeddings: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Recall@k of paired retrieval in all six directions among text, X-ray and ECG (cosine similarity).

    The k above the split's size are left out. Ranking and ties follow
    :func:`mmlib.text.cross_modal_recall` (pessimistic).

    Args:
        embeddings: precomputed :func:`embed` output of the split (else computed).

    Returns:
        One row per (direction, k): ``query``, ``target``, ``k``, ``recall``, ``chance`` (= k / n), ``n``.
    """
    from mmlib.text import cross_modal_recall

    emb = embed(model, data, data.index(split)) if embeddings is None else embeddings
    n = len(emb["text"])
    ks = tuple(k for k in ks if k <= n)
    if not ks:
        raise ValueError(f"retrieval_table: every k is larger than the {n} subjects of split {split!r}")
    rows = []
    for a, b in (("text", "xray"), ("text", "ecg"), ("xray", "ecg")):
        rec = cross_modal_recall(emb[a], emb[b], ks, names=(a, b))
        for q, t in ((a, b), (b, a)):
            for k in ks:
                rows.append({"query": q, "target": t, "k": k, "recall": rec[f"{q}->{t} R@{k}"],
                             "chance": rec[f"chance@{k}"], "n": n})
    return pd.DataFrame(rows)


def linear_probe_table(model: MoRE, data: P3Data, *, train_split: str = "train", split: str = "test",
                       C: float = 1.0, seed: int = 0) -> pd.DataFrame:
    """AUROC of a logistic regression on the frozen embeddings, per class.

    Each X-ray finding is probed on the X-ray embeddings, each ECG superclass on the ECG
    embeddings: standardised (scaler fitted on ``train_split``), L2-regularised logistic
    regression (``C``), fitted on ``train_split`` and scored on ``split``.

    Returns:
        One row per class (4 + 5): ``modality``, ``class``, ``n_train``, ``n``, ``n_positive``, ``auroc``
        (NaN when either split holds one label value).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tr, te = data.index(train_split), data.index(split)
    e_tr, e_te = embed(model, data, tr), embed(model, data, te)
    rows = []
    for mod, cls, y in _labels(data):
        ytr, yte = y[tr], y[te]
        auc = float("nan")
        if np.unique(ytr).size == 2:
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))
            clf.fit(e_tr[mod], ytr.astype(int))
            auc = _auroc(yte, clf.predict_proba(e_te[mod])[:, 1])
        rows.append({"modality": mod, "class": cls, "n_train": len(tr), "n": len(te), "n_positive": int(yte.sum()),
                     "auroc": auc})
    return pd.DataFrame(rows)


def zero_shot_ci(model: MoRE, data: P3Data, table: pd.DataFrame, *, split: str = "test", n_boot: int = 500,
                 seed: int = 0) -> pd.DataFrame:
    """``table`` (:func:`zero_shot_table`) with a percentile bootstrap 95% interval of each class's AUROC.

    Adds ``auroc_lo`` / ``auroc_hi`` (subjects resampled, ``n_boot`` times) and ``above_chance``
    (the interval's lower end above 0.5).
    """
    from mmlib.metrics import bootstrap_ci
    from mmlib.text import zero_shot_scores

    idx = data.index(split)
    emb = embed(model, data, idx)
    classes = {c: (mod, y) for mod, c, y in _labels(data)}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        pos = model.encode_text(table["positive_prompt"].tolist()).float().cpu()
        neg = model.encode_text(table["negative_prompt"].tolist()).float().cpu()
    model.train(was_training)
    lo, hi = [], []
    for j, cls in enumerate(table["class"]):
        mod, y = classes[cls]
        x = torch.from_numpy(emb[mod])
        s = (zero_shot_scores(x, pos[j:j + 1]) - zero_shot_scores(x, neg[j:j + 1]))[:, 0].numpy()
        _, a, b = bootstrap_ci(_auroc, y[idx], s, n_boot=n_boot, seed=seed, desc=None)
        lo.append(a)
        hi.append(b)
    out = table.copy()
    out["auroc_lo"], out["auroc_hi"] = lo, hi
    out["above_chance"] = out["auroc_lo"] > 0.5
    return out


# --------------------------------------------------------------------------- baselines and parameters


def supervised_table(data: P3Data, prof: P3Profile, *, seed: int = 0, device: str | torch.device = "cpu",
                     split: str = "test") -> pd.DataFrame:
    """A supervised model trained from scratch on the same labels: the reference zero-shot is measured against.

    The same X-ray ViT and ECG transformer as MoRE (same sizes, DropKey), each with a linear head,
    trained on the training split with binary cross-entropy on the 4 findings (X-ray) or the 5
    superclasses (ECG), AdamW at ``prof.lr`` / ``prof.weight_decay`` for ``prof.epochs`` epochs,
    batches of ``prof.batch_size``; X-rays standardised as in :class:`MoRE`. Nothing is selected
    on the test split.

    Returns:
        One row per class: ``modality``, ``class``, ``auroc`` on ``split``.
    """
    from mmlib.models.more import ECGTransformer, XrayViT
    from mmlib.train import index_batches

    device = core.select_device(device) if isinstance(device, str) else device
    common = dict(dim=prof.dim, depth=prof.depth, n_heads=prof.heads, dropkey=prof.dropkey,
                  dropkey_mode=prof.dropkey_mode)
    tr, te = data.index("train"), data.index(split)
    rows = []
    for mod, classes, y in (("xray", data.xray_classes, data.xray_labels), ("ecg", data.ecg_classes, data.ecg_labels)):
        torch.manual_seed(seed)
        enc = (XrayViT(image_size=prof.image_size, patch_size=prof.patch_size, in_channels=1, **common) if mod == "xray"
               else ECGTransformer(n_leads=12, n_samples=prof.ecg_samples, patch_size=prof.ecg_patch, **common))
        net = nn.ModuleDict({"enc": enc, "head": nn.Linear(enc.dim, len(classes))}).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=prof.lr, weight_decay=prof.weight_decay)
        x_all = data.xray if mod == "xray" else data.ecg
        target = torch.from_numpy(y)

        def forward(rows_: np.ndarray, x_all=x_all, mod=mod, net=net) -> torch.Tensor:
            x = x_all[torch.as_tensor(rows_)].to(device)
            return net["head"](net["enc"](standardise_xray(x) if mod == "xray" else x)["pooled"])

        for epoch in core.progress(range(prof.epochs), desc=f"supervised {mod}", total=prof.epochs):
            net.train()
            for chunk in index_batches(tr, prof.batch_size, shuffle_seed=seed * 100_003 + epoch):
                loss = F.binary_cross_entropy_with_logits(forward(chunk), target[chunk].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            score = torch.cat([forward(te[i:i + prof.eval_batch_size]).float().cpu()
                               for i in range(0, len(te), prof.eval_batch_size)]).numpy()
        for j, cls in enumerate(classes):
            rows.append({"modality": mod, "class": cls, "auroc": _auroc(y[te, j], score[:, j])})
    return pd.DataFrame(rows)


def classification_table(zero_shot: pd.DataFrame, probe: pd.DataFrame, supervised: pd.DataFrame) -> pd.DataFrame:
    """Zero-shot (with its interval), linear probe and supervised-from-scratch AUROC side by side, per class."""
    cols = ["modality", "class", "n", "n_positive", "auroc"] + [c for c in ("auroc_lo", "auroc_hi") if c in zero_shot]
    out = zero_shot[cols].rename(columns={"auroc": "zero-shot", "auroc_lo": "zero-shot 95% lo",
                                          "auroc_hi": "zero-shot 95% hi"})
    out = out.merge(probe[["class", "auroc"]].rename(columns={"auroc": "linear probe"}), on="class", how="left")
    return out.merge(supervised[["class", "auroc"]].rename(columns={"auroc": "supervised from scratch"}),
                     on="class", how="left")


def text_parameter_table(prof: P3Profile) -> pd.DataFrame:
    """Trainable text-encoder parameters: full fine-tuning, LoRA (MoRE's: r 16, query/value, every layer), frozen,
    and what this profile trains when it adapts only the last layers.

    Columns ``trainable``, ``total``, ``% trainable`` and ``fewer than full`` (in percent: the
    paper's "99.4% fewer trainable parameters").
    """
    from mmlib.text import TextEncoder, parameter_table

    tokenizer, base = _text_base()

    def enc(mode: str, layers: int | None = None, r: int = prof.lora_r) -> TextEncoder:
        return TextEncoder(mode, r=r, lora_alpha=prof.lora_alpha, tokenizer=tokenizer, model=copy.deepcopy(base),
                           train_layers=layers)

    encoders = {"full fine-tuning (every layer)": enc("full"),
                f"LoRA r={prof.lora_r}, query/value, every layer (MoRE)": enc("lora"),
                "frozen": enc("frozen")}
    if prof.text_train_layers is not None:
        n = prof.text_train_layers
        encoders[f"LoRA r={prof.lora_r}, last {n} layer(s) (this profile)"] = enc("lora", n)
        encoders[f"full fine-tuning, last {n} layer(s) (this profile's 'full' ablation)"] = enc("full", n)
    table = parameter_table(encoders)
    full = next(iter(encoders.values())).full_parameters
    table["fewer than full (%)"] = 100.0 * (1.0 - table["trainable"] / full)
    return table


# --------------------------------------------------------------------------- ablations

# name -> pretrain() overrides; the first row is the main run (the profile as it is)
ABLATIONS: dict[str, dict[str, Any]] = {
    "MoRE (DropKey constant, LoRA, text + X-ray + ECG)": {},
    "DropKey off": {"dropkey_mode": "off"},
    "DropKey linear in depth (paper text)": {"dropkey_mode": "linear"},
    "text encoder frozen": {"text_mode": "frozen"},
    "text encoder fully fine-tuned": {"text_mode": "full"},
    "text + X-ray only": {"modalities": ("xray",)},
    "text + ECG only": {"modalities": ("ecg",)},
}
ABLATION_GROUP = {"DropKey off": "DropKey", "DropKey linear in depth (paper text)": "DropKey",
                  "text encoder frozen": "text encoder", "text encoder fully fine-tuned": "text encoder",
                  "text + X-ray only": "modalities", "text + ECG only": "modalities"}


# the ablation table's columns that the claims average (zero-shot AUROC per modality, recall@5 text<->modality)
SCORE_COLUMNS = ("zero-shot X-ray (mean AUROC)", "zero-shot ECG (mean AUROC)", "text<->X-ray R@5", "text<->ECG R@5")
# an ablation "keeps quality" when its paired 95% CI ends above minus this (non-inferiority margin)
NONINFERIORITY_MARGIN = 0.02


@dataclass(frozen=True)
class SubjectScores:
    """Per subject of a split, what one variant's :data:`SCORE_COLUMNS` average (:func:`subject_scores`).

    Attributes:
        labels: (n, C) 0/1 labels of the classes of :func:`_labels` (4 X-ray findings, then 5 ECG superclasses).
        values: (n, C + 4): each class's zero-shot score (cosine to the positive minus to the negative
            prompt), then whether the subject's own pair is within the top ``k`` (1 / 0) for text->X-ray,
            X-ray->text, text->ECG and ECG->text. NaN for a modality the variant did not train.
        class_modality: the modality of each of the C classes.
        k: the recall cut-off.
    """

    labels: np.ndarray
    values: np.ndarray
    class_modality: tuple[str, ...]
    k: int = 5

    def components(self) -> np.ndarray:
        """The four :data:`SCORE_COLUMNS` on all subjects (equal to the ablation table's row)."""
        return score_components(self.labels, self.values, self.class_modality)


def _auroc_columns(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of every column (Mann-Whitney with tied scores counted half, as roc_auc_score; NaN for a
    column holding one label value): fast enough to resample hundreds of times."""
    from scipy.stats import rankdata

    y = labels.astype(bool)
    n1 = y.sum(0).astype(float)
    n0 = len(y) - n1
    ranks = rankdata(scores, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * y).sum(0) - n1 * (n1 + 1) / 2) / (n1 * n0)
    return np.where((n1 > 0) & (n0 > 0), auc, np.nan)


def score_components(labels: np.ndarray, values: np.ndarray, class_modality: Sequence[str]) -> np.ndarray:
    """:data:`SCORE_COLUMNS` from per-subject scores (:class:`SubjectScores`): each modality's mean
    zero-shot AUROC over its classes (those with both labels among the subjects), and the mean hit
    rate of both text<->modality directions. A modality whose scores are NaN gives NaN."""
    c = len(class_modality)
    out = []
    for mod in ("xray", "ecg"):
        cols = [j for j, m in enumerate(class_modality) if m == mod]
        z = values[:, cols]
        auc = np.full(len(cols), np.nan) if np.isnan(z).any() else _auroc_columns(labels[:, cols], z)
        # the mean over the classes the subjects define (a class without positives drops out, as in run_summary)
        out.append(float(np.mean(auc[np.isfinite(auc)])) if np.isfinite(auc).any() else float("nan"))
    hits = values[:, c:]
    out += [float(np.mean(hits[:, 0:2])), float(np.mean(hits[:, 2:4]))]
    return np.asarray(out)


def subject_scores(model: MoRE, data: P3Data, modalities: Sequence[str] = MODALITIES, *, split: str = "test",
                   k: int = 5) -> SubjectScores:
    """Per subject of ``split``: zero-shot scores of every class and recall@``k`` hits text<->X-ray and
    text<->ECG, the per-subject parts of :func:`zero_shot_table` and :func:`retrieval_table` (same
    prompts, similarity and tie rule), so two variants can be compared on the same resampled subjects
    (:func:`ablation_differences`). A modality left out of ``modalities`` is NaN."""
    from mmlib.metrics import retrieval_ranks
    from mmlib.text import cross_modal_similarity

    idx = data.index(split)
    if k > len(idx):
        raise ValueError(f"subject_scores: k={k} is larger than the {len(idx)} subjects of split {split!r}")
    emb = embed(model, data, idx)
    classes, s_pos, s_neg = _prompt_scores(model, data, idx, dict(PROMPTS), emb=emb)
    mods = tuple(m for m, _, _ in classes)
    used = set(_check_modalities(modalities))
    zs = s_pos - s_neg
    zs[:, [j for j, m in enumerate(mods) if m not in used]] = np.nan
    hits = np.full((len(idx), 4), np.nan)
    for d, mod in enumerate(("xray", "ecg")):
        if mod in used:
            sim = cross_modal_similarity(emb["text"], emb[mod])  # as retrieval_table: text rows, mod columns
            hits[:, 2 * d] = retrieval_ranks(sim) < k
            hits[:, 2 * d + 1] = retrieval_ranks(sim.T) < k
    labels = np.stack([y[idx] for _, _, y in classes], 1).astype(np.int8)
    return SubjectScores(labels=labels, values=np.concatenate([zs, hits], 1), class_modality=mods, k=k)


# (claim group, variant a, variant b): a minus b; the first variant of ABLATIONS is the main run
_COMPARISONS = (
    ("text encoder", None, "text encoder fully fine-tuned"),
    ("text encoder", None, "text encoder frozen"),
    ("DropKey", None, "DropKey off"),
    ("DropKey", "DropKey linear in depth (paper text)", "DropKey off"),
    ("modalities", None, "text + X-ray only"),
    ("modalities", None, "text + ECG only"),
)


def ablation_differences(ablations: pd.DataFrame | Mapping[str, SubjectScores], *, n_boot: int = 500,
                         seed: int = 0) -> pd.DataFrame:
    """Each ablation comparison of the claims as a paired difference with a bootstrap 95% CI.

    The score is the mean of :data:`SCORE_COLUMNS` the two variants share (a two-modality run is
    compared on its own modality only). Test subjects are resampled with replacement, the same ones for
    both variants (:func:`mmlib.metrics.paired_bootstrap_diff`); retrieval keeps the whole split as the
    gallery. One pre-training seed: the interval covers the test subjects, not training noise.

    Args:
        ablations: :func:`run_ablations`'s table (its ``attrs["subject_scores"]``) or ``{variant: SubjectScores}``.

    Returns:
        One row per comparison present: ``group``, ``a``, ``b``, ``scores`` (which columns),
        ``difference`` (a minus b), ``95% lo``, ``95% hi``, ``p``, ``n``.
    """
    from mmlib.metrics import paired_bootstrap_diff

    scores = ablations.attrs.get("subject_scores") if isinstance(ablations, pd.DataFrame) else ablations
    if not scores:
        raise ValueError("ablation_differences needs per-subject scores: the table run_ablations returns carries "
                         "them in attrs['subject_scores'] (a table read back from CSV does not)")
    main = next(iter(scores))
    rows = []
    for group, a, b in _COMPARISONS:
        a = main if a is None else a
        if a not in scores or b not in scores or a == b:
            continue
        sa, sb = scores[a], scores[b]
        use = np.isfinite(sa.components()) & np.isfinite(sb.components())

        def metric(labels, values, use=use, mods=sa.class_modality):
            return float(np.mean(score_components(labels, values, mods)[use]))

        r = paired_bootstrap_diff(metric, sa.values, sb.values, sa.labels, n_boot=n_boot, seed=seed, desc=None)
        rows.append({"group": group, "a": a, "b": b,
                     "scores": ", ".join(c for c, u in zip(SCORE_COLUMNS, use) if u),
                     "difference": r["estimate"], "95% lo": r["lower"], "95% hi": r["upper"], "p": r["p_value"],
                     "n": len(sa.labels)})
    return pd.DataFrame(rows)


def run_summary(model: MoRE, data: P3Data, modalities: Sequence[str] = MODALITIES, *, split: str = "test",
                masks: np.ndarray | None = None, seed: int = 0) -> dict[str, float]:
    """One line of numbers for a pre-trained model: mean zero-shot and linear-probe AUROC per modality,
    recall@5 between text and each modality (mean of both directions), the X-ray rollout's peak / mean
    (1 = a flat map; lower = smoother), and with ``masks`` the X-ray attention's lift inside the
    planted findings (:func:`attention_scores`). A modality left out of pre-training gets NaN."""
    zs = zero_shot_table(model, data, split=split)
    lp = linear_probe_table(model, data, split=split, seed=seed)
    ret = retrieval_table(model, data, split=split, ks=(5,))
    out: dict[str, float] = {}
    for mod, name in (("xray", "X-ray"), ("ecg", "ECG")):
        used = mod in modalities
        out[f"zero-shot {name} (mean AUROC)"] = float(zs.loc[zs["modality"] == mod, "auroc"].mean()) if used else np.nan
        out[f"linear probe {name} (mean AUROC)"] = (float(lp.loc[lp["modality"] == mod, "auroc"].mean()) if used
                                                    else np.nan)
        pair = ret[((ret["query"] == "text") & (ret["target"] == mod))
                   | ((ret["query"] == mod) & (ret["target"] == "text"))]
        out[f"text<->{name} R@5"] = float(pair["recall"].mean()) if used else np.nan
    out["chance R@5"] = float(ret["chance"].iloc[0])
    if "xray" in modalities:  # how peaked the rollout is (1 = flat): DropKey's "smoother attention"
        flat = xray_attention_maps(model, data, data.index(split)).reshape(len(data.index(split)), -1)
        out["X-ray rollout peak / mean"] = float(np.mean(flat.max(1) / np.maximum(flat.mean(1), 1e-12)))
    else:
        out["X-ray rollout peak / mean"] = np.nan
    if masks is not None:
        att = attention_scores(model, data, masks, split=split)
        out["X-ray attention lift in findings"] = float(att["lift"].mean()) if "xray" in modalities else np.nan
    return out


def run_ablations(data: P3Data, prof: P3Profile, *, seed: int = 0, device: str | torch.device = "cpu",
                  main: tuple[MoRE, pd.DataFrame] | None = None, masks: np.ndarray | None = None,
                  split: str = "test") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pre-train every variant of :data:`ABLATIONS` (same seed, data and epochs) and summarise each.

    Args:
        main: the already pre-trained main run ``(model, history)`` (the first row), to not train it twice.
        masks: the planted X-ray finding masks (:func:`load_finding_masks`), for the attention column.

    Returns:
        ``(table, histories)``: one row per variant (``variant``, ``group``, :func:`run_summary`'s
        columns, ``seconds`` of pre-training) and every variant's per-epoch history (column ``variant``).
        ``table.attrs["subject_scores"]`` holds each variant's :func:`subject_scores` on ``split``, for
        :func:`ablation_differences`.
    """
    rows, hist, subjects = [], [], {}
    for name, kw in ABLATIONS.items():
        start = time.perf_counter()
        if main is not None and not kw:
            model, history = main
        else:
            log.info("ablation: %s", name)
            model, history = pretrain(data, prof, seed=seed, device=device, **kw)
        mods = tuple(kw.get("modalities", MODALITIES))
        row = {"variant": name, "group": ABLATION_GROUP.get(name, "main run")}
        row.update(run_summary(model, data, mods, split=split, masks=masks, seed=seed))
        subjects[name] = subject_scores(model, data, mods, split=split)
        row["seconds"] = float(history["seconds"].sum()) if main is not None and not kw else time.perf_counter() - start
        rows.append(row)
        hist.append(history.assign(variant=name))
    table = pd.DataFrame(rows)
    table.attrs["subject_scores"] = subjects
    return table, pd.concat(hist, ignore_index=True)


# --------------------------------------------------------------------------- attention


def load_finding_masks(cohort: Cohort, data: P3Data) -> np.ndarray | None:
    """The generated cohort's planted-finding masks, (N, H, W) uint8 bit codes (None when the cohort has none).

    Bit codes are :data:`mmlib.cohorts.xray_ecg.FINDING_BITS` (masks/<id>_findings.png); real
    cohorts have no such file.
    """
    from mmlib.data.readers import read_image_2d

    if "findings_mask" not in cohort.subjects.columns:
        return None
    out = []
    for path in cohort.paths("findings_mask"):
        try:
            m = read_image_2d(path, normalize=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: cannot read the findings mask (column 'findings_mask'): {err}") from err
        out.append(np.asarray(m).astype(np.uint8))
    masks = np.stack(out)
    if len(masks) != len(data):
        raise ValueError(f"{cohort.root}: {len(masks)} findings masks for {len(data)} subjects")
    return masks


@torch.no_grad()
def xray_attention_maps(model: MoRE, data: P3Data, idx: np.ndarray | Sequence[int], size: int | None = None,
                        discard_ratio: float = 0.0) -> np.ndarray:
    """Attention rollout of the X-ray encoder's CLS token over the patches, as (n, size, size) maps summing to 1.

    ``size`` (default: the model's input side) is reached by bilinear upsampling of the patch grid.
    """
    from mmlib.models.more import attention_rollout, rollout_map_2d

    idx = np.asarray(idx)
    vit = model.xray
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    maps = []
    for i in range(0, len(idx), 64):
        x = standardise_xray(data.xray[torch.as_tensor(idx[i:i + 64])].to(device))
        att = vit(x, return_attention=True)["attention"]
        m = rollout_map_2d(attention_rollout(att, discard_ratio), vit.grid)[:, None].float()
        m = F.interpolate(m, size=(size or vit.image_size,) * 2, mode="bilinear", align_corners=False)
        m = m[:, 0].clamp_min(0)
        maps.append((m / m.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)).cpu())
    model.train(was_training)
    return torch.cat(maps).numpy()


def xray_saliency_maps(model: MoRE, data: P3Data, idx: np.ndarray | Sequence[int], finding: str,
                       size: int | None = None, sigma: float = 1.5) -> np.ndarray:
    """Gradient saliency of a finding's zero-shot score: |d score / d pixel|, smoothed, as (n, size, size) maps
    summing to 1.

    The score is the X-ray embedding's cosine to the finding's positive prompt minus its cosine to
    the negative one (:func:`zero_shot_table`); its gradient with respect to the input pixels
    (Simonyan et al. 2014) is taken in absolute value, smoothed with a Gaussian of ``sigma`` pixels
    and upsampled bilinearly to ``size``. Unlike attention rollout, it asks which pixels move the
    score of this finding.
    """
    from scipy import ndimage

    if finding not in PROMPTS:
        raise ValueError(f"xray_saliency_maps: no prompts for finding {finding!r}; known: {sorted(PROMPTS)}")
    idx = np.asarray(idx)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        direction = (model.encode_text([PROMPTS[finding][0]]) - model.encode_text([PROMPTS[finding][1]]))[0]
    maps = []
    for i in range(0, len(idx), 64):
        x = data.xray[torch.as_tensor(idx[i:i + 64])].to(device).requires_grad_(True)
        (model({"xray": x})["xray"] @ direction).sum().backward()
        g = ndimage.gaussian_filter(x.grad[:, 0].abs().float().cpu().numpy(), (0, sigma, sigma))
        m = F.interpolate(torch.from_numpy(g)[:, None], size=(size or x.shape[-1],) * 2, mode="bilinear",
                          align_corners=False)[:, 0].clamp_min(0)
        maps.append(m / m.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12))
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return torch.cat(maps).numpy()


def attention_scores(model: MoRE, data: P3Data, masks: np.ndarray, *, split: str = "test",
                     methods: Sequence[str] = ("rollout",)) -> pd.DataFrame:
    """Does the X-ray map fall on the planted finding? Scored on the subjects of ``split`` who have it.

    ``methods``: ``"rollout"`` (:func:`xray_attention_maps`, the same map for every finding) and/or
    ``"saliency"`` (:func:`xray_saliency_maps` of each finding's zero-shot score). Per method and
    finding: ``mass in finding`` (share of the map inside the finding's mask, mean over subjects),
    ``area`` (the mask's share of the image: what a uniform or random map puts there on average),
    ``lift`` = mass / area (1 = no better than a random map), ``pointing game`` (the map's maximum
    inside the mask) beside ``pointing chance`` (= area), all per subject by
    :func:`mmlib.explain.localisation_scores` (the P1 Grad-CAM scoring), and ``peak / mean`` (the map's maximum over
    its mean, averaged over subjects: 1 for a flat map).
    """
    from mmlib.cohorts.xray_ecg import FINDING_BITS
    from mmlib.explain import localisation_scores

    bad = [m for m in methods if m not in ("rollout", "saliency")]
    if bad or not methods:
        raise ValueError(f"attention_scores: methods must be 'rollout' and/or 'saliency', got {list(methods)}")
    idx = data.index(split)
    size = masks.shape[-1]
    rollout = xray_attention_maps(model, data, idx, size=size) if "rollout" in methods else None
    rows = []
    for method in methods:
        for finding in data.xray_classes:
            inside = (masks[idx] & FINDING_BITS[finding]) > 0
            has = inside.reshape(len(idx), -1).any(1)
            if not has.any():
                continue
            m = rollout[has] if method == "rollout" else xray_saliency_maps(model, data, idx[has], finding, size=size)
            k = inside[has]
            flat = m.reshape(len(m), -1)
            scores = [localisation_scores(m[j], k[j], n_random=20, seed=j) for j in range(len(m))]
            mass = np.array([sc["mass_inside"] for sc in scores])
            area = np.array([sc["region_fraction"] for sc in scores])
            hit = np.array([sc["pointing_game"] for sc in scores], dtype=float)
            rows.append({"method": method, "finding": finding, "n": int(has.sum()),
                         "mass in finding": float(mass.mean()),
                         "area": float(area.mean()), "lift": float(mass.mean() / area.mean()),
                         "pointing game": float(hit.mean()), "pointing chance": float(area.mean()),
                         "peak / mean": float(np.mean(flat.max(1) / np.maximum(flat.mean(1), 1e-12)))})
    return pd.DataFrame(rows)


@torch.no_grad()
def ecg_attention(model: MoRE, data: P3Data, idx: np.ndarray | Sequence[int]) -> np.ndarray:
    """Attention rollout of the ECG encoder's CLS token over time, (n, samples), each row summing to 1."""
    from mmlib.models.more import attention_rollout, rollout_over_time

    idx = np.asarray(idx)
    enc = model.ecg
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    att = enc(data.ecg[torch.as_tensor(idx)].to(device), return_attention=True)["attention"]
    r = rollout_over_time(attention_rollout(att), enc.patch_size, enc.n_samples).float().cpu()
    model.train(was_training)
    return (r / r.sum(dim=1, keepdim=True)).numpy()


# --------------------------------------------------------------------------- figures

_FINDING_COLOURS = {"atelectasis": "#66c2a5", "cardiomegaly": "#fc8d62", "edema": "#8da0cb",
                    "pleural_effusion": "#e78ac3"}


def training_figure(histories: pd.DataFrame):
    """Validation loss per epoch of every pre-training run (``histories`` of :func:`run_ablations`, or one history),
    and the main run's text-X-ray and text-ECG terms on training and validation pairs."""
    import matplotlib.pyplot as plt

    from mmlib import viz

    h = histories if "variant" in histories else histories.assign(variant=next(iter(ABLATIONS)))
    main = h[h["variant"] == h["variant"].iloc[0]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for term, colour in (("text_xray", "tab:blue"), ("text_ecg", "tab:red")):
        if f"train_{term}" in main:
            label = term.replace("_", "-").replace("xray", "X-ray").replace("ecg", "ECG")
            axes[0].plot(main["epoch"], main[f"train_{term}"], color=colour, marker="o", ms=3,
                         label=f"{label}, training")
            axes[0].plot(main["epoch"], main[f"val_{term}"], color=colour, ls="--", marker="o", ms=3,
                         label=f"{label}, validation")
    axes[0].set(xlabel="epoch", ylabel="InfoNCE (both directions)", title=f"{h['variant'].iloc[0]}")
    axes[0].title.set_fontsize(9)
    axes[0].legend(fontsize=8)
    for j, (name, g) in enumerate(h.groupby("variant", sort=False)):
        axes[1].plot(g["epoch"], g["val_loss"], lw=2.4 if j == 0 else 1.2, marker="o", ms=3,
                     color="black" if j == 0 else None, label=name)
    axes[1].set(xlabel="epoch", ylabel="validation loss", title="every pre-training run (ablations)")
    for ax in axes:
        viz.epoch_axis(ax)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def classification_figure(table: pd.DataFrame, paper_range: tuple[float, float] = (0.65, 0.92)):
    """AUROC per class: zero-shot (with its bootstrap interval), linear probe and supervised from scratch,
    with the paper's reported range shaded."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.8), layout="constrained")
    x = np.arange(len(table))
    ax.axhspan(*paper_range, color="0.9", zorder=0, label=f"paper reported range {paper_range[0]}-{paper_range[1]}")
    ax.axhline(0.5, color="0.5", lw=0.8, ls=":")
    width = 0.26
    for k, (col, colour) in enumerate((("zero-shot", "tab:blue"), ("linear probe", "tab:orange"),
                                       ("supervised from scratch", "tab:green"))):
        if col not in table:
            continue
        label = f"{col} (black: 95% bootstrap CI)" if col == "zero-shot" and "zero-shot 95% lo" in table else col
        ax.bar(x + (k - 1) * width, table[col], width, color=colour, label=label)
    if "zero-shot 95% lo" in table:
        ax.errorbar(x - width, table["zero-shot"], yerr=[table["zero-shot"] - table["zero-shot 95% lo"],
                                                          table["zero-shot 95% hi"] - table["zero-shot"]],
                    fmt="none", ecolor="black", lw=1, capsize=2)
    ax.set_xticks(x, [f"{c}\n({m.replace('xray', 'X-ray').replace('ecg', 'ECG')})"
                      for c, m in zip(table["class"], table["modality"])], fontsize=8)
    ax.set(ylim=(0, 1.02), ylabel="AUROC (test split)", title="Zero-shot vs linear probe vs supervised from scratch")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, frameon=False)  # off the bars
    return fig


def retrieval_figure(table: pd.DataFrame):
    """Recall@k in every direction, with the chance level k / n."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for (q, t), g in table.groupby(["query", "target"], sort=False):
        ax.plot(g["k"], g["recall"], marker="o", label=f"{q} -> {t}")
    chance = table.drop_duplicates("k")
    ax.plot(chance["k"], chance["chance"], color="black", ls=":", label="chance (k / n)")
    ax.set(xlabel="k", ylabel="recall@k (test split)", xticks=sorted(table["k"].unique()),
           title=f"Cross-modal retrieval among {int(table['n'].iloc[0])} test subjects")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def attention_figure(model: MoRE, data: P3Data, masks: np.ndarray | None, *, split: str = "test", per_finding: int = 2):
    """X-ray attention rollout and gradient saliency on test X-rays with each planted finding (outlined), and ECG
    attention over time.

    One column per finding; ``per_finding`` test subjects who have it, each on two rows: the
    radiograph under the rollout map, then under the finding's saliency (:func:`xray_saliency_maps`),
    with the finding's mask contour. Bottom: lead II and V1 of one MI and one CD
    test ECG over the rollout across time (shaded, scaled to its own range).
    """
    import matplotlib.pyplot as plt

    from mmlib.cohorts.xray_ecg import FINDING_BITS
    from mmlib.data.readers import STANDARD_LEADS

    idx = data.index(split)
    findings = list(data.xray_classes)
    n_rows = 2 * per_finding  # each example twice: attention rollout, then the finding's gradient saliency
    fig = plt.figure(figsize=(3.2 * len(findings), 3.0 * n_rows + 3.2))
    grid = fig.add_gridspec(n_rows + 1, len(findings) + 1, height_ratios=(1,) * n_rows + (0.9,),
                            width_ratios=(1,) * len(findings) + (0.06,))
    drawn = {"xray": False, "ecg": False}  # which colour bars the figure needs
    for j, finding in enumerate(findings):
        if masks is not None:
            has = idx[((masks[idx] & FINDING_BITS[finding]) > 0).reshape(len(idx), -1).any(1)]
        else:
            has = idx[data.xray_labels[idx, data.xray_classes.index(finding)] > 0]
        for r in range(n_rows):
            ax = fig.add_subplot(grid[r, j])
            ax.set_axis_off()
            if r // 2 >= len(has):
                continue
            i = int(has[r // 2])
            img = data.xray[i, 0].numpy()
            size = masks.shape[-1] if masks is not None else img.shape[-1]
            if r % 2 == 0:
                amap, what = xray_attention_maps(model, data, [i], size=size)[0], "rollout"
            else:
                amap, what = xray_saliency_maps(model, data, [i], finding, size=size)[0], "saliency"
            ax.imshow(img, cmap="gray", extent=(0, size, size, 0))
            # each map stretched from its min to its max (a rollout is nearly flat: drawn from 0 it hides
            # where it is higher); the title gives its contrast, peak over mean
            lo, hi = float(amap.min()), float(amap.max())
            ax.imshow((amap - lo) / max(hi - lo, 1e-12), cmap="inferno", alpha=0.45, vmin=0.0, vmax=1.0,
                      extent=(0, size, size, 0))
            drawn["xray"] = True
            if masks is not None:
                ax.contour((masks[i] & FINDING_BITS[finding]) > 0, levels=[0.5], colors=[_FINDING_COLOURS[finding]],
                           linewidths=1.8)
            ax.set_title(f"{finding.replace('_', ' ')} · {data.table['subject_id'].iloc[i]} · {what}\n"
                         f"peak / mean {hi / max(float(amap.mean()), 1e-12):.2f}", fontsize=8)
    examples = [(c, idx[data.ecg_labels[idx, data.ecg_classes.index(c)] > 0]) for c in ("MI", "CD")]
    examples = [(c, int(e[0])) for c, e in examples if len(e)]
    half = len(findings) // 2
    for e, (cls, i) in enumerate(examples):
        ax = fig.add_subplot(grid[n_rows, e * half:(e + 1) * half])
        att = ecg_attention(model, data, [i])[0]
        seconds = data.ecg.shape[-1] / 100.0
        span = max(float(att.max() - att.min()), 1e-12)
        ax.imshow(((att - att.min()) / span)[None], aspect="auto", cmap="Reds", alpha=0.6, vmin=0.0, vmax=1.0,
                  extent=(0, seconds, -2.4, 2.4))
        drawn["ecg"] = True
        t = np.arange(data.ecg.shape[-1]) / 100.0
        for off, lead in ((1.2, "II"), (-1.2, "V1")):
            ax.plot(t, data.ecg[i, STANDARD_LEADS.index(lead)].numpy() + off, color="black", lw=0.7)
            ax.text(0.05, off + 0.6, lead, fontsize=8, va="center")
        ax.set(xlabel="time (s)", yticks=[], ylim=(-2.4, 2.4),
               title=f"ECG attention over time ({cls}, {data.table['subject_id'].iloc[i]}); "
                     f"max / min {att.max() / max(att.min(), 1e-12):.2f}")
        ax.title.set_fontsize(9)
    # both kinds of map are drawn from their own min to their own max; the bars show the colours
    # unblended (the overlays are translucent)
    for kind, rows, cmap, label in (("xray", slice(0, n_rows), "inferno", "X-ray map, each from its min to its max"),
                                    ("ecg", n_rows, "Reds", "ECG attention")):
        if drawn[kind]:
            scale = plt.cm.ScalarMappable(norm=plt.Normalize(0.0, 1.0), cmap=cmap)
            bar = fig.colorbar(scale, cax=fig.add_subplot(grid[rows, -1]), ticks=[0, 1])
            bar.ax.set_yticklabels(["min", "max"])
            bar.set_label(label, fontsize=8 if kind == "ecg" else 10)
    fig.suptitle("X-ray: attention rollout and the finding's gradient saliency (planted finding outlined); "
                 "ECG: attention rollout over time (red, scaled to its range)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    return fig


def condition_labels(cohort: Cohort, data: P3Data) -> np.ndarray | None:
    """Each subject's hidden condition(s) from the generated cohort's truth: a name, ``none`` or ``2+ conditions``
    (None for a cohort without the latents)."""
    from mmlib.cohorts.xray_ecg import CONDITIONS

    if not cohort.manifest.truth:
        return None
    lat = cohort.latents().set_index("subject_id")
    cols = [f"cond_{c}" for c in CONDITIONS]
    if not set(cols) <= set(lat.columns):
        return None
    cond = lat.loc[data.table["subject_id"], cols].to_numpy().astype(bool)
    names = np.array([c.replace("_", " ") for c in CONDITIONS], dtype=object)
    out = np.where(cond.sum(1) == 0, "none", np.where(cond.sum(1) > 1, "2+ conditions", ""))
    single = cond.sum(1) == 1
    out = out.astype(object)
    out[single] = names[cond[single].argmax(1)]
    return out


def umap_figure(model: MoRE, data: P3Data, conditions: np.ndarray | None, *, split: str = "test", seed: int = 0):
    """UMAP of the shared space (text, X-ray and ECG embeddings of the test subjects together):
    left by modality, right by hidden condition (or NORM / abnormal ECG without the truth)."""
    import matplotlib.pyplot as plt
    import umap

    idx = data.index(split)
    emb = embed(model, data, idx)
    mods = ("text", "xray", "ecg")
    xy = umap.UMAP(n_neighbors=15, min_dist=0.3, metric="cosine", random_state=seed, n_jobs=1).fit_transform(
        np.concatenate([emb[m] for m in mods]))
    n = len(idx)
    labels = (conditions[idx] if conditions is not None
              else np.where(data.ecg_labels[idx, data.ecg_classes.index("NORM")] > 0, "NORM ECG", "abnormal ECG"))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    markers = {"text": "o", "xray": "s", "ecg": "^"}
    for j, m in enumerate(mods):
        axes[0].scatter(*xy[j * n:(j + 1) * n].T, s=14, marker=markers[m], alpha=0.75,
                        label=m.replace("xray", "X-ray").replace("ecg", "ECG"))
    axes[0].set_title("shared space by modality")
    axes[0].legend(fontsize=8)
    cats = sorted(set(labels), key=lambda c: (c in ("none", "2+ conditions", "NORM ECG"), c))
    palette = plt.get_cmap("tab10").colors
    for c_i, cat in enumerate(cats):
        sel = np.tile(labels == cat, len(mods))
        for j, m in enumerate(mods):
            part = sel[j * n:(j + 1) * n]
            axes[1].scatter(*xy[j * n:(j + 1) * n][part].T, s=14, marker=markers[m], alpha=0.8,
                            color="0.75" if cat == "none" else palette[c_i % 10], label=cat if j == 0 else None)
    axes[1].set_title("by hidden condition (marker = modality)")
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- a real ECG


def real_ecg_demo(model: MoRE, data: P3Data, prof: P3Profile, *, split: str = "test", top: int = 5,
                  path: Any = None) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """A real 12-lead recording through the same preprocessing and encoder: its nearest reports and class scores.

    ``path`` defaults to the 12-lead ECG that pydicom ships as test data (``waveform_ecg.dcm``: 10 s
    at 1000 Hz). It is read with :func:`mmlib.ecg.read_dicom_ecg`, reordered to the standard leads,
    preprocessed like the cohort's ECGs (downsampled to ``prof.ecg_fs``, baseline removed, each lead
    scaled to [-1, 1]) and embedded by the ECG encoder.

    Returns:
        ``(nearest, scores, signal)``: the ``top`` texts of ``split`` closest to the recording (rank,
        cosine, subject, text), the zero-shot score of each ECG superclass (positive minus negative
        prompt) with its rank among ``split``'s ECGs, and the preprocessed (12, T) signal.
    """
    from pydicom.data import get_testdata_file

    from mmlib.data.readers import STANDARD_LEADS
    from mmlib.ecg import preprocess_ecg, read_dicom_ecg

    path = get_testdata_file("waveform_ecg.dcm") if path is None else path
    if path is None:
        raise ValueError("real_ecg_demo: pydicom's test file waveform_ecg.dcm is not installed")
    signal, fs, leads = read_dicom_ecg(path)
    missing = [ld for ld in STANDARD_LEADS if ld not in leads]
    if missing:
        raise ValueError(f"{path}: the ECG lacks lead(s) {missing} (has {leads})")
    x = signal[[leads.index(ld) for ld in STANDARD_LEADS]]
    x = preprocess_ecg(x, fs, target_fs=prof.ecg_fs, n_samples=prof.ecg_samples).astype(np.float32)
    device = next(model.parameters()).device
    idx = data.index(split)
    emb = embed(model, data, idx)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        z = model({"ecg": torch.from_numpy(x)[None].to(device)})["ecg"].float().cpu().numpy()[0]
        pos = model.encode_text([PROMPTS[c][0] for c in data.ecg_classes]).float().cpu().numpy()
        neg = model.encode_text([PROMPTS[c][1] for c in data.ecg_classes]).float().cpu().numpy()
    model.train(was_training)
    sim = emb["text"] @ z
    order = np.argsort(-sim, kind="stable")[:top]
    nearest = pd.DataFrame({"rank": np.arange(1, len(order) + 1), "cosine": sim[order],
                            "subject": data.table["subject_id"].to_numpy()[idx[order]],
                            "text": [data.texts[int(idx[o])] for o in order]})
    score = pos @ z - neg @ z
    cohort_scores = emb["ecg"] @ pos.T - emb["ecg"] @ neg.T  # (n, classes)
    scores = pd.DataFrame({"class": list(data.ecg_classes), "score": score,
                           "percentile among test ECGs": [(cohort_scores[:, j] < score[j]).mean() * 100
                                                          for j in range(len(score))]})
    return nearest, scores, x


# --------------------------------------------------------------------------- paper vs run, claims

PAPER_REPORTED = pd.DataFrame([
    ("downstream AUROC (zero-shot, linear probe, fine-tuning; MIMIC-CXR, CheXpert, edema severity, PTB-XL)",
     "0.65-0.92"),
    ("trainable text parameters with LoRA", "99.4% fewer than full fine-tuning"),
    ("linear attention dropping (DropKey)", "smoother attention, better transfer (no ablation numbers in our sources)"),
], columns=["what", "paper reported"])


def paper_vs_run(classification: pd.DataFrame, params: pd.DataFrame) -> pd.DataFrame:
    """The paper's reported AUROC range and parameter saving beside this run's."""
    zs = classification["zero-shot"]
    lora_rows = [i for i in params.index if i.startswith("LoRA") and "MoRE" in i]
    inside = int(((zs >= 0.65) & (zs <= 0.92)).sum())
    rows = [
        {"quantity": "zero-shot AUROC, 4 X-ray findings + 5 ECG superclasses", "paper reported": "0.65-0.92",
         "this run": f"{zs.min():.2f}-{zs.max():.2f} ({inside}/{len(zs)} inside the paper's range, "
                     f"{int((zs > 0.92).sum())} above)",
         "held on this data": "not comparable: generated cohort, a few hundred pre-training pairs, encoders from "
                               "scratch"},
        {"quantity": "linear-probe AUROC", "paper reported": "0.65-0.92 (all tasks)",
         "this run": f"{classification['linear probe'].min():.2f}-{classification['linear probe'].max():.2f}",
         "held on this data": "not comparable (as above)"},
    ]
    if lora_rows:
        rows.append({"quantity": "fewer trainable text parameters with LoRA", "paper reported": "99.4%",
                     "this run": f"{params.loc[lora_rows[0], 'fewer than full (%)']:.2f}% (MiniLM-L6, r 16, "
                                 "query/value, "
                                 "every layer)",
                     "held on this data": "comparable up to the language model (paper: a biomedical RoBERTa)"})
    return pd.DataFrame(rows)


def claims_table(classification: pd.DataFrame, retrieval: pd.DataFrame, ablations: pd.DataFrame,
                 params: pd.DataFrame, attention: pd.DataFrame | None = None,
                 differences: pd.DataFrame | None = None) -> pd.DataFrame:
    """Which of the paper's claims held in this run.

    The ablation claims read :func:`ablation_differences` (``differences``, else computed from
    ``ablations``): a variant beats another when the paired bootstrap 95% CI of the difference clears 0
    (:func:`mmlib.metrics.ci_verdict`); LoRA "keeps quality" when the CI of LoRA minus full fine-tuning
    ends above -:data:`NONINFERIORITY_MARGIN`.

    ``attention`` (:func:`attention_scores` with ``rollout``, optionally ``saliency``) adds the claim
    that the attention maps explain the findings: held when the rollout's lift inside the planted
    findings exceeds 1.5 for every finding, partly for some.
    """
    rows = []
    zs = classification
    n_above = int((zs["zero-shot 95% lo" if "zero-shot 95% lo" in zs else "zero-shot"] > 0.5).sum())
    in_range = int((zs["zero-shot"] >= 0.65).sum())
    best = retrieval[retrieval["k"] == retrieval["k"].max()]
    beats = best[best["recall"] > best["chance"]]
    rows.append({
        "claim": "tri-modal pre-training gives useful zero-shot classification",
        "paper reported": "AUROC 0.65-0.92 across tasks",
        "this run": f"zero-shot AUROC ≥ 0.65 for {in_range}/{len(zs)} classes, 95% interval above 0.5 for "
                    f"{n_above}/{len(zs)}; lowest: {zs.loc[zs['zero-shot'].idxmin(), 'class']} "
                    f"{zs['zero-shot'].min():.2f}; linear probe mean {zs['linear probe'].mean():.2f}, "
                    f"supervised from scratch {zs['supervised from scratch'].mean():.2f}, zero-shot "
                    f"{zs['zero-shot'].mean():.2f}",
        "held": "yes" if in_range >= len(zs) - 1 else ("partly" if in_range >= len(zs) / 2 else "no"),
    })
    rows.append({
        "claim": "retrieval across modalities works",
        "paper reported": "recall@1/5/10 between modalities (qualitative in our sources)",
        "this run": f"recall@{int(best['k'].iloc[0])} above chance ({best['chance'].iloc[0]:.2f}) in "
                    f"{len(beats)}/{len(best)} directions; text->X-ray {_recall(best, 'text', 'xray'):.2f}, "
                    f"text->ECG {_recall(best, 'text', 'ecg'):.2f}, X-ray->ECG {_recall(best, 'xray', 'ecg'):.2f}",
        "held": "yes" if len(beats) == len(best) else ("partly" if len(beats) else "no"),
    })
    from mmlib.metrics import ci_verdict

    ab = ablations.set_index("variant")
    diffs = ablation_differences(ablations) if differences is None else differences
    main_name = ab.index[0]

    def diff(a: str | None, b: str) -> pd.Series | None:
        sel = diffs[(diffs["a"] == (main_name if a is None else a)) & (diffs["b"] == b)]
        return sel.iloc[0] if len(sel) else None

    def fmt(d: pd.Series) -> str:
        return f"{d['difference']:+.3f} (95% CI {d['95% lo']:+.3f} to {d['95% hi']:+.3f})"

    def beats(d: pd.Series) -> bool:
        return ci_verdict(d["difference"], d["95% lo"], d["95% hi"]) == "yes"

    full, frozen = diff(None, "text encoder fully fine-tuned"), diff(None, "text encoder frozen")
    if full is not None:
        lora_rows = [i for i in params.index if i.startswith("LoRA") and "this profile" in i] or \
                    [i for i in params.index if i.startswith("LoRA")]
        m = NONINFERIORITY_MARGIN
        rows.append({
            "claim": "LoRA keeps quality with a tiny fraction of trainable text parameters",
            "paper reported": "99.4% fewer trainable parameters, state-of-the-art results",
            "this run": f"LoRA trains {params.loc[lora_rows[0], '% trainable']:.3f}% of the text encoder; mean of "
                        f"zero-shot AUROCs and R@5, paired over the test subjects: LoRA minus full fine-tuning "
                        f"{fmt(full)}" + (f", LoRA minus frozen {fmt(frozen)}" if frozen is not None else "")
                        + f"; non-inferiority margin {m}",
            "held": "yes" if full["95% lo"] > -m else (
                f"partly: within {m}, but the 95% CI reaches below -{m}" if full["difference"] > -m else "no"),
        })
    dk = [d for d in (diff(None, "DropKey off"), diff("DropKey linear in depth (paper text)", "DropKey off"))
          if d is not None]
    if dk:
        off = ab.loc["DropKey off"]
        smooth = "X-ray rollout peak / mean" in ab
        parts, wins, smoother = [], 0, 0
        for d in dk:
            wins += beats(d)
            # smoother: the map's excess over flat (peak / mean - 1) at least a quarter below DropKey-off's
            smoother += bool(smooth and (ab.loc[d["a"], "X-ray rollout peak / mean"] - 1)
                             < 0.75 * (off["X-ray rollout peak / mean"] - 1))
            parts.append(f"{'constant' if d['a'] == main_name else 'linear'} minus off {fmt(d)}")
        names = [d["a"] for d in dk]
        peaks = ("; rollout peak / mean (lower = smoother): " + ", ".join(
            f"{short} {ab.loc[n, 'X-ray rollout peak / mean']:.3f}"
            for short, n in zip(("constant", "linear", "off"), [*names, "DropKey off"])) if smooth else "")
        lift = ("; X-ray attention lift in findings " + ", ".join(
            f"{n.split(' (')[0]} {ab.loc[n, 'X-ray attention lift in findings']:.2f}" for n in [*names, "DropKey off"])
            if "X-ray attention lift in findings" in ab else "")
        better, smoothed = wins == len(dk), smooth and smoother == len(dk)
        rows.append({
            "claim": "attention dropping (DropKey) helps",
            "paper reported": "smoother attention and better results",
            "this run": "mean of zero-shot AUROCs and R@5, paired: " + ", ".join(parts) + peaks + lift,
            "held": "yes" if better and smoothed else ("partly" if wins or smoother else "no"),
        })
    two = [d for d in (diff(None, "text + X-ray only"), diff(None, "text + ECG only")) if d is not None]
    if two:
        wins = sum(beats(d) for d in two)
        rows.append({
            "claim": "three modalities in one space beat two",
            "paper reported": "tri-modal pre-training (the paper's premise)",
            "this run": "on the shared modality's zero-shot AUROC and R@5, paired: "
                        + ", ".join(f"three minus {d['b']} {fmt(d)}" for d in two),
            "held": "yes" if wins == len(two) else ("partly" if wins else "no"),
        })
    if attention is not None and len(attention):
        roll = attention[attention["method"] == "rollout"]
        sal = attention[attention["method"] == "saliency"]
        good = int((roll["lift"] > 1.5).sum())
        text = (f"rollout lift inside the planted findings {roll['lift'].min():.2f}-{roll['lift'].max():.2f} "
                f"(1 = a random map), peak / mean {roll['peak / mean'].mean():.2f}, pointing game "
                f"{roll['pointing game'].mean():.2f} vs chance {roll['pointing chance'].mean():.2f}")
        if len(sal):
            text += (f"; the findings' gradient saliency: lift {sal['lift'].min():.2f}-{sal['lift'].max():.2f}, "
                     f"pointing game {sal['pointing game'].mean():.2f}")
        rows.append({"claim": "attention maps show where the findings are",
                     "paper reported": "multimodal attention explanations (qualitative)",
                     "this run": text,
                     "held": "yes" if good == len(roll) else ("partly" if good else "no")})
    return pd.DataFrame(rows)


def _recall(table: pd.DataFrame, q: str, t: str) -> float:
    sel = table[(table["query"] == q) & (table["target"] == t)]
    return float(sel["recall"].iloc[0]) if len(sel) else float("nan")
