"""Logic of the P3 pipeline (MoRE: contrastive pre-training on chest X-rays, 12-lead ECGs and reports).

The notebook `notebooks/p3_more_xray_ecg_text.py` is not written yet (issue #8); these stages are its core.

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
   validation loss per epoch.
5. Evaluation on the test split: :func:`embed` (the embeddings of some rows),
   :func:`zero_shot_table` (AUROC of prompt scores per finding / superclass),
   :func:`retrieval_table` (recall@k in every direction among text, X-ray and ECG, with the
   chance level) and :func:`linear_probe_table` (AUROC of a logistic regression on the frozen
   embeddings, fitted on the training split).

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
    "ECG_CLASSES", "MODALITIES", "PROFILES", "PROMPTS", "SPLITS", "XRAY_FINDINGS", "MoRE", "P3Data", "P3Profile",
    "build_model", "compose_text", "embed", "linear_probe_table", "load_data", "pretrain", "retrieval_table",
    "zero_shot_table",
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
# full's lr 1e-4 for the ViT-B-sized encoders is our choice (no warm-up or schedule is implemented).
PROFILES = ProfileSet(
    smoke=P3Profile(name="smoke", preset="smoke", image_size=32, patch_size=8, dim=16, depth=1, heads=2,
                    ecg_patch=50, lora_r=4, max_length=64, proj_dim=128, epochs=1, batch_size=16),
    # quick departs from the public code's temperature and weight decay. Measured on the quick cohort (seed 0, 2 CPU
    # threads, encoders trained from scratch on 350 pairs): with tau 0.02 and wd 0.1 the loss sat at chance
    # (ln 32) for 8 epochs at lr 5e-4 and retrieval stayed at chance; with tau 0.1 and wd 0.01 it left chance at
    # epoch 4 and text -> ECG recall@5 reached 0.15 (chance 0.05) by epoch 6. The paper pretrains on far more pairs.
    quick=P3Profile(name="quick", lr=5e-4, text_lr=5e-4, temperature=0.1, weight_decay=0.01),
    full=P3Profile(name="full", preset="full", image_size=224, patch_size=16, dim=768, depth=12, heads=12,
                   ecg_patch=5, max_length=256, epochs=50, lr=1e-4, text_lr=1e-4, eval_batch_size=128),
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
                out[key] = F.normalize(self.heads[key](getattr(self, key)(batch[key])["pooled"]), dim=-1)
        return out


def build_model(prof: P3Profile, text_mode: str | None = None, dropkey_mode: str | None = None) -> MoRE:
    """The :class:`MoRE` of ``prof`` (``text_mode`` / ``dropkey_mode`` override the profile's)."""
    from mmlib.models.more import ECGTransformer, XrayViT
    from mmlib.text import TextEncoder

    mode = prof.dropkey_mode if dropkey_mode is None else dropkey_mode
    common = dict(dim=prof.dim, depth=prof.depth, n_heads=prof.heads, dropkey=prof.dropkey, dropkey_mode=mode)
    xray = XrayViT(image_size=prof.image_size, patch_size=prof.patch_size, in_channels=1, **common)
    ecg = ECGTransformer(n_leads=12, n_samples=prof.ecg_samples, patch_size=prof.ecg_patch, **common)
    tokenizer, base = _text_base()
    text = TextEncoder(prof.text_mode if text_mode is None else text_mode, r=prof.lora_r,
                       lora_alpha=prof.lora_alpha, lora_dropout=prof.lora_dropout, max_length=prof.max_length,
                       cache_tokens=True, tokenizer=tokenizer, model=copy.deepcopy(base))
    return MoRE(xray, ecg, text, prof.proj_dim)


# --------------------------------------------------------------------------- pre-training


def _check_modalities(modalities: Sequence[str]) -> tuple[str, ...]:
    mods = tuple(modalities)
    if not mods or any(m not in MODALITIES for m in mods) or len(set(mods)) != len(mods):
        raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities!r}")
    return mods


def _epoch(model: MoRE, loss_fn: nn.Module, data: P3Data, idx: np.ndarray, mods: tuple[str, ...],
           batch_size: int, device: torch.device, opt: torch.optim.Optimizer | None,
           shuffle_seed: int | None) -> dict[str, float]:
    """One pass over ``idx`` (training when ``opt`` is given): sample-weighted means of the loss terms."""
    from mmlib.train import index_batches

    sums: dict[str, float] = {}
    n = 0
    for chunk in index_batches(idx, batch_size, shuffle_seed=shuffle_seed):
        if len(chunk) < 2:  # InfoNCE of one pair is 0 with no gradient
            continue
        batch = data.batch(chunk, mods)
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.set_grad_enabled(opt is not None):
            emb = model(batch)
            out = loss_fn(emb["text"], emb.get("xray"), emb.get("ecg"))
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
        for key in ("loss", "text_xray", "text_ecg"):
            if key in out:
                sums[key] = sums.get(key, 0.0) + float(out[key].detach()) * len(chunk)
        n += len(chunk)
    return {k: v / max(n, 1) for k, v in sums.items()}


def pretrain(data: P3Data, prof: P3Profile, *, modalities: Sequence[str] = MODALITIES, text_mode: str | None = None,
             dropkey_mode: str | None = None, seed: int = 0,
             device: str | torch.device = "cpu") -> tuple[MoRE, pd.DataFrame]:
    """Contrastive pre-training of :class:`MoRE` on the training split, validation loss per epoch.

    AdamW (encoders and heads at ``prof.lr``, the trainable text weights at ``prof.text_lr``, weight
    decay ``prof.weight_decay``), :class:`~mmlib.losses.TriModalLoss` at ``prof.temperature``. Only the
    encoders of ``modalities`` (and the text side) are given to the optimizer: with
    ``modalities=("xray",)`` the ECG encoder and head are never updated and the loss has no ECG term.
    The batches are reshuffled every epoch by a generator seeded with ``seed`` and the epoch; the
    weights, DropKey and LoRA dropout draw from torch's generator seeded with ``seed``; so two runs
    with one seed on one device give the same history. A last batch of one pair is skipped.

    Returns:
        ``(model, history)``: the model in eval mode; one row per epoch with ``epoch``, ``train_loss``,
        ``val_loss``, the per-pair terms ``train_text_xray`` / ``val_text_xray`` /
        ``train_text_ecg`` / ``val_text_ecg`` (those of ``modalities`` only) and ``seconds``.
    """
    from mmlib.losses import TriModalLoss

    mods = _check_modalities(modalities)
    device = core.select_device(device) if isinstance(device, str) else device
    torch.manual_seed(seed)
    model = build_model(prof, text_mode=text_mode, dropkey_mode=dropkey_mode).to(device)
    loss_fn = TriModalLoss(prof.temperature, learnable=prof.learnable_temperature).to(device)
    groups: list[dict[str, Any]] = [
        {"params": [p for m in mods for p in (*getattr(model, m).parameters(), *model.heads[m].parameters())],
         "lr": prof.lr},
        {"params": list(model.heads["text"].parameters()) + list(loss_fn.parameters()), "lr": prof.lr},
        {"params": [p for p in model.text.parameters() if p.requires_grad], "lr": prof.text_lr},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=prof.weight_decay)
    train, val = data.index("train"), data.index("val")
    rows = []
    for epoch in core.progress(range(prof.epochs), desc="MoRE pre-training", total=prof.epochs):
        start = time.perf_counter()
        model.train()
        tr = _epoch(model, loss_fn, data, train, mods, prof.batch_size, device, opt, seed * 100_003 + epoch)
        model.eval()
        va = _epoch(model, loss_fn, data, val, mods, prof.eval_batch_size, device, None, None) if len(val) > 1 else {}
        row: dict[str, float] = {"epoch": epoch + 1, "train_loss": tr.get("loss", float("nan")),
                                 "val_loss": va.get("loss", float("nan"))}
        for key in ("text_xray", "text_ecg"):
            if key in tr:
                row[f"train_{key}"] = tr[key]
                row[f"val_{key}"] = va.get(key, float("nan"))
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        log.debug("epoch %d: %s", epoch + 1, row)
    model.eval()
    return model, pd.DataFrame(rows)


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
    from mmlib.text import zero_shot_scores

    prompts = dict(PROMPTS if prompts is None else prompts)
    idx = data.index(split)
    emb = embed(model, data, idx)
    classes = _labels(data)
    missing = [c for _, c, _ in classes if c not in prompts]
    if missing:
        raise ValueError(f"zero_shot_table: no prompts for class(es) {missing}")
    was_training = model.training
    model.eval()
    pos = model.encode_text([prompts[c][0] for _, c, _ in classes]).float().cpu()
    neg = model.encode_text([prompts[c][1] for _, c, _ in classes]).float().cpu()
    model.train(was_training)
    rows = []
    for j, (mod, cls, y) in enumerate(classes):
        x = torch.from_numpy(emb[mod])
        s_pos = zero_shot_scores(x, pos[j:j + 1])[:, 0].numpy()
        s_neg = zero_shot_scores(x, neg[j:j + 1])[:, 0].numpy()
        yt = y[idx]
        rows.append({"modality": mod, "class": cls, "positive_prompt": prompts[cls][0],
                     "negative_prompt": prompts[cls][1], "n": len(yt), "n_positive": int(yt.sum()),
                     "auroc": _auroc(yt, s_pos - s_neg), "auroc_positive_only": _auroc(yt, s_pos)})
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
