"""Logic of ``notebooks/p4_ct_ehr_survival_fusion.py`` (P4: "Fusion is not one-size-fits-all").

Stages, each a plain function the notebook calls in order:

1. :func:`load_data` -- the CT volumes (HU window -> [0, 1] on the profile's grid), the EHR
   events table, survival times and the splits (train / val / internal test / external).
2. :func:`pretrain_encoders` -- the two frozen encoders, both trained without labels on the
   internal training split: P2's ResNet autoencoder for the CT (:func:`mmlib.pipelines.p2.pretrain`)
   and a CLMBR-like next-visit transformer for the EHR (:mod:`mmlib.ehr`); plus the one-hot /
   count EHR baseline.
3. :func:`embed` -- the frozen embeddings every survival model sees.
4. :func:`train_models` -- unimodal baselines and the four fusion strategies (x two EHR
   representations) with a Cox partial likelihood (:func:`mmlib.survival.fit_survival`).
5. :func:`cindex_table` -- Harrell's c with bootstrap CIs on the internal test and external
   sites, the paired bootstrap gain over the best unimodal model (chosen on validation).
6. :func:`balance_sweep` -- the paper's central claim under control: the generator's
   ``image_share`` knob moves the outcome's information from the EHR to the CT; the subjects,
   their CTs and EHRs stay the same (checked), only the outcomes change.
7. :func:`breast_cancer_benchmark` -- the same strategies on real data shipped with
   scikit-survival (gene expression + clinical), beside scikit-survival's own models.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from mmlib import core
from mmlib.core import Profile, ProfileSet
from mmlib.data import Cohort

__all__ = [
    "EHR_REPS", "PAPER_REPORTED", "PROFILES", "STRATEGIES", "UNIMODAL", "Embeddings", "Encoders", "P4Data", "P4Profile",
    "Trained", "balance_figure", "balance_outcomes", "balance_sweep", "best_unimodal", "breast_cancer_benchmark",
    "breast_figure", "build_model", "cindex_figure", "cindex_table", "claims_table", "cohort_table", "ct_tokens",
    "embed", "encoder_figure", "km_by_site_figure", "load_data", "model_specs", "paper_vs_run", "pretrain_encoders",
    "risk_group_figure", "stopping_table", "sweep_summary", "train_models", "truth_table",
]

log = core.get_logger(__name__)

SPLITS = ("train", "val", "test", "external")
REQUIRED_COLUMNS = ("site", "split", "time_days", "event")


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class P4Profile(Profile):
    """Sizes of one P4 run. ``full`` is the paper's cohort size; encoders stay small (they are frozen)."""

    preset: str = "quick"  # cohort preset generated when data_dir holds no manifest
    # subjects of the generated cohort (None: the preset's). Quick uses 1,500 instead of the preset's 500: with
    # 100 internal test subjects a c-index CI spans +-0.09, wider than the gains the paper reports.
    n_subjects: int | None = 1500
    spacing_mm: tuple[float, float, float] = (5.5, 5.5, 9.75)  # in-plane as the quick cohort; 48 slices -> 32
    spatial_size: tuple[int, int, int] = (64, 64, 32)  # divisible by 32 (the autoencoder's bottleneck)
    hu_window: tuple[float, float] = (-100.0, 500.0)  # clot (~45 HU) against contrast (~300 HU)
    resnet_widths: tuple[int, int, int, int] = (8, 16, 32, 64)
    resnet_layers: tuple[int, int, int, int] = (1, 1, 1, 1)
    pretrain_epochs: int = 6
    pretrain_batch: int = 8
    pretrain_lr: float = 1e-3
    precision: str = "fp32"
    # the CT autoencoder is P2's (p2.pretrain): its fast-path options (P2Profile.fast) stay off here, so P4's
    # numbers are those of the plain path
    fast: bool = False
    compile: bool = False  # P2Profile.compile for the CT autoencoder
    workers: int = 0  # volume-loading processes; 0 = all usable cores
    ehr_dim: int = 64
    ehr_layers: int = 2
    ehr_heads: int = 4
    ehr_epochs: int = 40
    ehr_lr: float = 2e-3
    ehr_batch: int = 32
    max_visits: int = 32
    max_codes: int = 48
    fusion_dim: int = 32  # width both modalities are projected to inside the attention models
    fusion_hidden: int = 32
    fusion_epochs: int = 300
    fusion_lr: float = 3e-3
    weight_decay: float = 1e-2
    dropout: float = 0.2
    patience: int = 40
    contrastive_weight: float = 0.5
    model_seeds: tuple[int, ...] = (0, 1, 2)  # risk = mean over seeds (a small ensemble steadies tiny cohorts)
    n_boot: int = 500
    balance_shares: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    sweep_seeds: tuple[int, ...] = (0,)  # model seeds at each share of the balance sweep (the main table: model_seeds)
    breast_folds: int = 5  # real-data benchmark: cross-validation folds
    breast_epochs: int = 200
    breast_seeds: tuple[int, ...] = (0,)

    @property
    def cohort_knobs(self) -> dict[str, Any]:
        """Generator knobs this profile overrides (passed to :func:`mmlib.cohorts.open_cohort`)."""
        return {} if self.n_subjects is None else {"n_subjects": self.n_subjects}

    @property
    def breast_kwargs(self) -> dict[str, Any]:
        """Arguments of :func:`breast_cancer_benchmark` at this profile's sizes."""
        return {"n_folds": self.breast_folds, "epochs": self.breast_epochs, "patience": self.patience,
                "model_seeds": self.breast_seeds}


PROFILES = ProfileSet(
    smoke=P4Profile(
        name="smoke", preset="smoke", n_subjects=None, spacing_mm=(11.0, 11.0, 13.0), spatial_size=(32, 32, 32),
        resnet_widths=(4, 8, 8, 16), pretrain_epochs=2, ehr_dim=16, ehr_layers=1, ehr_heads=2, ehr_epochs=2,
        max_visits=16, max_codes=32, fusion_dim=8, fusion_hidden=8, fusion_epochs=20, patience=10,
        model_seeds=(0,), n_boot=50, balance_shares=(0.0, 0.5, 1.0), breast_folds=3, breast_epochs=10,
    ),
    quick=P4Profile(name="quick"),
    full=P4Profile(
        name="full", preset="full", n_subjects=None, spacing_mm=(2.2, 2.2, 2.5), spatial_size=(160, 160, 128),
        resnet_widths=(32, 64, 128, 256), resnet_layers=(2, 2, 2, 2), pretrain_epochs=50, pretrain_batch=4,
        ehr_dim=128, ehr_layers=4, ehr_epochs=50, fusion_dim=64, fusion_hidden=64, n_boot=2000,
        precision="auto",
    ),
)


# --------------------------------------------------------------------------- data


@dataclass
class P4Data:
    """Everything the encoders see, in memory.

    Attributes:
        table: one row per subject: ``subject_id``, ``site``, ``split``, ``time_days``, ``event``
            (and ``age``, ``sex`` where present).
        images: (N, 1, X, Y, Z) float16 CT in [0, 1] on the profile's grid.
        events: the EHR events table (long format: ``subject_id``, ``days_before_index``,
            ``visit_id``, ``code_system``, ``code``, ``value``, ``unit``).
        truth: the generated cohort's ``truth.json`` ({} for real data).
        latents: per-subject latents of a generated cohort (``u_img``, ``z_ehr``, ...), or None.
        record: a generated cohort's ``cohort.json`` (generator, seed, knobs), {} for real data.
    """

    table: pd.DataFrame
    images: torch.Tensor
    events: pd.DataFrame
    truth: dict[str, Any] = field(default_factory=dict)
    latents: pd.DataFrame | None = None
    record: dict[str, Any] = field(default_factory=dict)

    def index(self, which: str) -> np.ndarray:
        """Row positions of a split (``train``, ``val``, ``test``, ``external``); ``pretrain_train`` and
        ``pretrain_val`` (the encoders' self-supervised training) are ``train`` and ``val``."""
        which = {"pretrain_train": "train", "pretrain_val": "val"}.get(which, which)
        if which not in SPLITS:
            raise ValueError(f"unknown subset {which!r}; choose one of {list(SPLITS)}")
        return np.flatnonzero((self.table["split"] == which).to_numpy())

    @property
    def subject_ids(self) -> list[str]:
        return self.table["subject_id"].tolist()

    def batch(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        return {"image": self.images[torch.as_tensor(np.asarray(idx), dtype=torch.long)].float()}

    def batches(self, idx: np.ndarray, batch_size: int, *, shuffle_seed: int | None = None):
        from mmlib.train import index_batches

        for chunk in index_batches(idx, batch_size, shuffle_seed=shuffle_seed):
            yield self.batch(chunk)

    def survival(self, idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(event bool, time float)`` of the rows ``idx`` (all rows by default)."""
        t = self.table if idx is None else self.table.iloc[idx]
        return t["event"].to_numpy().astype(bool), t["time_days"].to_numpy().astype(float)


def load_data(cohort: Cohort, prof: P4Profile) -> P4Data:
    """Read the cohort's CTs onto the profile's grid, its EHR events and its survival table.

    Raises:
        ValueError: naming the file and column when the subject table or the events table lacks
            what P4 needs, or a split lacks events.
    """
    from torch.utils.data import DataLoader

    from mmlib.data.readers import volume_dataset, volume_transforms

    t = cohort.subjects.copy()
    where = f"{cohort.root}/subjects.csv"
    missing = [c for c in REQUIRED_COLUMNS if c not in t.columns]
    if missing:
        raise ValueError(f"cohort {cohort.name!r} ({where}) lacks column(s) {missing}; P4 needs "
                         f"{list(REQUIRED_COLUMNS)} (see data_manifest/real/p4_ct_ehr.md)")
    t = t.rename(columns={cohort.manifest.id_column: "subject_id"})
    t["subject_id"] = t["subject_id"].astype(str)
    bad = sorted(set(t["split"].astype(str)) - set(SPLITS))
    if bad:
        raise ValueError(f"{where}: column 'split' has value(s) {bad}; allowed: {list(SPLITS)}")
    for split in ("train", "val", "test"):
        ev = t.loc[t["split"] == split, "event"].astype(int)
        if len(ev) == 0 or ev.sum() == 0:
            raise ValueError(f"{where}: split {split!r} has {len(ev)} subjects and no events; P4 needs events in "
                             "train, val and test")
    if "ehr_events" not in cohort.tables:
        raise ValueError(f"cohort {cohort.name!r} ({cohort.root}) has no 'ehr_events' table in its manifest")
    events = cohort.tables["ehr_events"]
    events = events.copy()
    events["subject_id"] = events["subject_id"].astype(str)

    tf = volume_transforms(kind="ct", spacing_mm=prof.spacing_mm, spatial_size=prof.spatial_size,
                           hu_window=prof.hu_window)
    ds = volume_dataset(cohort, {"image": "ct"}, tf, cache=None)
    workers = prof.workers or max(1, min(8, len(os.sched_getaffinity(0))))
    loader = DataLoader(ds, batch_size=8, num_workers=workers if len(ds) > 32 else 0, shuffle=False)
    images, ids = [], []
    for item in core.progress(loader, desc="load CT", total=len(loader)):
        images.append(torch.as_tensor(item["image"]).as_subclass(torch.Tensor).half())
        ids += list(item["subject_id"])
    order = {s: i for i, s in enumerate(ids)}
    t = t[t["subject_id"].isin(order)].reset_index(drop=True)
    img = torch.cat(images)[torch.as_tensor([order[s] for s in t["subject_id"]])]
    truth: dict[str, Any] = {}
    latents = None
    if cohort.manifest.truth:
        truth = dict(cohort.truth)
        latents = cohort.latents()
        latents["subject_id"] = latents["subject_id"].astype(str)
        latents = latents.set_index("subject_id").loc[t["subject_id"]].reset_index()
    record_path = cohort.root / "cohort.json"
    record = json.loads(record_path.read_text()) if truth and record_path.is_file() else {}
    return P4Data(table=t, images=img, events=events, truth=truth, latents=latents, record=record)


# --------------------------------------------------------------------------- encoders (frozen) and embeddings


@dataclass
class Encoders:
    """The label-free encoders and the one-hot baseline, all fitted on the internal training split.

    Attributes:
        ct: the CT autoencoder (P2's ``ResNetAutoEnc``) at its best validation epoch; only
            ``ct.encoder`` is used afterwards, frozen.
        ct_history: the autoencoder's per-epoch L1 losses.
        ehr: the next-visit transformer (:class:`mmlib.ehr.EHRFoundationModel`), frozen afterwards.
        ehr_history: its per-epoch next-visit losses.
        tokenizer: visit tokens of the EHR model.
        counts: the one-hot / count EHR baseline (:class:`mmlib.ehr.EHRCountEncoder`).
        sequences: the tokenised EHR of every subject.
    """

    ct: nn.Module
    ct_history: pd.DataFrame
    ehr: nn.Module
    ehr_history: pd.DataFrame
    tokenizer: Any
    counts: Any
    sequences: Any


def pretrain_encoders(data: P4Data, prof: P4Profile, *, ckpt_dir: str | os.PathLike, device: torch.device,
                      seed: int = 0, resume: bool = False) -> Encoders:
    """Train both encoders without labels on the internal ``train`` split (``val`` picks the epoch).

    The CT encoder is P2's autoencoder (corrupted input -> L1 against the clean volume) at this
    profile's sizes; the EHR encoder predicts each visit's codes from the visits before it
    (CLMBR's objective, in miniature). Neither sees a survival time, and neither sees the
    internal test or the external site.
    """
    from pathlib import Path

    from mmlib import ehr
    from mmlib.pipelines import p2

    ct, ct_hist, _ = p2.pretrain("ResNetAutoEnc", data, prof, ckpt_dir=ckpt_dir, device=device, seed=seed,
                                 resume=resume)
    ids = data.subject_ids
    train_ids = [ids[i] for i in data.index("train")]
    counts = ehr.EHRCountEncoder().fit(data.events, train_ids)
    tokenizer = ehr.EHRTokenizer().fit(data.events, train_ids)
    seqs = tokenizer.transform(data.events, ids, max_visits=prof.max_visits, max_codes=prof.max_codes)
    model, ehr_hist = ehr.pretrain_foundation_model(
        seqs, data.index("train"), data.index("val"), dim=prof.ehr_dim, layers=prof.ehr_layers, heads=prof.ehr_heads,
        epochs=prof.ehr_epochs, lr=prof.ehr_lr, batch_size=prof.ehr_batch, seed=seed, device=device,
        checkpoint=Path(ckpt_dir) / "ehr_foundation_model", resume=resume,
    )
    return Encoders(ct=ct, ct_history=ct_hist, ehr=model, ehr_history=ehr_hist, tokenizer=tokenizer, counts=counts,
                    sequences=seqs)


@torch.no_grad()
def ct_tokens(encoder: nn.Module, images: torch.Tensor, *, batch_size: int = 16,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Multi-scale tokens of a frozen :class:`mmlib.models.ResNetEncoder`: one token per position of
    the last stage, holding that position's last-stage features concatenated with the average of
    stages 2 and 3 over the same region.

    The autoencoder compresses the volume into a 2 x 2 x 1 grid of the last stage; a clot of a few
    voxels leaves little trace there, while the earlier stages still see it. The mean over the
    tokens is exactly the concatenated global average of stages 2-4 (a standard way to read a
    frozen CNN), and the attention models see the same features by region.

    Returns:
        (N, T, C2 + C3 + C4) float32 tokens on the CPU, T = the number of last-stage positions.
    """
    device = torch.device(device)
    encoder = encoder.eval().to(device)
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].float().to(device)
        x = encoder.layer1(encoder.maxpool(encoder.act(encoder.bn1(encoder.conv1(x)))))
        f2 = encoder.layer2(x)
        f3 = encoder.layer3(f2)
        f4 = encoder.layer4(f3)
        grid = f4.shape[2:]
        maps = [nn.functional.adaptive_avg_pool3d(f, grid) for f in (f2, f3)] + [f4]
        out.append(torch.cat(maps, dim=1).flatten(2).transpose(1, 2).cpu())
    return torch.cat(out)


def _standardise(x: torch.Tensor, train_idx: np.ndarray, mask: torch.Tensor | None = None) -> torch.Tensor:
    """z-score the last axis with the training rows' statistics (over their unpadded tokens)."""
    ref = x[torch.as_tensor(train_idx)]
    if ref.ndim == 3:
        keep = ~mask[torch.as_tensor(train_idx)] if mask is not None else torch.ones(ref.shape[:2], dtype=torch.bool)
        ref = ref[keep]
    mean, sd = ref.mean(0), ref.std(0)
    sd = torch.where(sd > 1e-6, sd, torch.ones_like(sd))  # a constant feature stays 0 (e.g. a code never seen)
    z = (x - mean) / sd
    if mask is not None:
        z = z.masked_fill(mask.unsqueeze(-1), 0.0)
    return z.float()


@dataclass
class Embeddings:
    """The frozen inputs of every survival model, standardised with training statistics.

    Attributes:
        ct: (N, T, Dc) CT tokens (:func:`ct_tokens`).
        ehr: representation name -> ``{"ehr": tensor, "ehr_mask": tensor, "ehr_patient": tensor}``
            (the last two for sequences only): ``"one-hot"`` (N, F) counts / last labs;
            ``"foundation model"`` (N, V, De) per-visit states with the visit padding mask, and
            ``ehr_patient`` (N, De), the state at the last (index) visit: CLMBR's patient
            representation, which the models that pool the EHR use.
    """

    ct: torch.Tensor
    ehr: dict[str, dict[str, torch.Tensor]]

    def inputs(self, idx: np.ndarray, ehr_rep: str | None, *, ehr_tokens: bool = False) -> dict[str, torch.Tensor]:
        """Rows ``idx`` of the CT tokens and, if ``ehr_rep`` names a representation (None or NaN: none), its EHR:
        per-visit tokens and their mask with ``ehr_tokens`` (the attention models), else the patient-level vector."""
        i = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        batch = {"ct": self.ct[i]}
        if isinstance(ehr_rep, str):
            rep = self.ehr[ehr_rep]
            if "ehr_patient" in rep and not ehr_tokens:
                batch["ehr"] = rep["ehr_patient"][i]
            else:
                batch.update({k: v[i] for k, v in rep.items() if k != "ehr_patient"})
        return batch


EHR_REPS = ("one-hot", "foundation model")


def embed(data: P4Data, enc: Encoders, *, device: torch.device | str = "cpu") -> Embeddings:
    """Frozen embeddings of every subject (the encoders are not trained further)."""
    from mmlib import ehr

    tr = data.index("train")
    ct = _standardise(ct_tokens(enc.ct.encoder, data.images, device=device), tr)
    onehot = torch.as_tensor(enc.counts.transform(data.events, data.subject_ids))
    fm = ehr.embed_sequences(enc.ehr, enc.sequences, device=device)
    return Embeddings(ct=ct, ehr={
        "one-hot": {"ehr": _standardise(onehot, tr)},
        "foundation model": {"ehr": _standardise(fm["tokens"], tr, fm["mask"]), "ehr_mask": fm["mask"],
                             "ehr_patient": _standardise(fm["pooled"], tr)},
    })


# --------------------------------------------------------------------------- survival models

STRATEGIES = ("late fusion", "contrastive", "cross-attention CT->EHR", "cross-attention EHR->CT", "co-attention",
              "co-attention image-guided")
UNIMODAL = {"CT only": (None, "ct"), "EHR one-hot only": ("one-hot", "ehr"),
            "EHR foundation model only": ("foundation model", "ehr")}
SHORT_REP = {"one-hot": "one-hot", "foundation model": "FM"}


def build_model(strategy: str, dims: Mapping[str, int], prof: P4Profile) -> nn.Module:
    """A unimodal model (``strategy`` = ``"ct"`` or ``"ehr"``) or one of :data:`STRATEGIES` over ``dims``."""
    from mmlib.models import fusion

    h, d, p = prof.fusion_hidden, prof.fusion_dim, prof.dropout
    heads = 4 if d % 4 == 0 else 1
    if strategy in ("ct", "ehr"):
        return fusion.UnimodalSurvival(strategy, dims[strategy], hidden=h, dropout=p)
    if strategy == "late fusion":
        return fusion.LateFusion(dims, hidden=h, dropout=p)
    if strategy == "contrastive":
        return fusion.ContrastiveFusion(dims, proj_dim=d, hidden=h, dropout=p)
    if strategy.startswith("cross-attention"):
        direction = "ct->ehr" if strategy.endswith("CT->EHR") else "ehr->ct"
        return fusion.CrossAttentionFusion(dims, dim=d, heads=heads, direction=direction, hidden=h, dropout=p)
    if strategy == "co-attention":
        return fusion.CoAttentionFusion(dims, dim=d, heads=heads, hidden=h, dropout=p)
    if strategy == "co-attention image-guided":
        return fusion.CoAttentionFusion(dims, dim=d, heads=heads, guided_by="ct", hidden=h, dropout=p)
    raise ValueError(f"unknown strategy {strategy!r}; choose 'ct', 'ehr' or one of {list(STRATEGIES)}")


def model_specs(strategies: Sequence[str] = STRATEGIES, ehr_reps: Sequence[str] = EHR_REPS) -> pd.DataFrame:
    """One row per model: ``model`` name, ``family`` (unimodal | fusion), ``strategy``, ``ehr`` representation."""
    rows = [{"model": name, "family": "unimodal", "strategy": mod, "ehr": rep}
            for name, (rep, mod) in UNIMODAL.items() if rep is None or rep in ehr_reps]
    rows += [{"model": f"{s} · {SHORT_REP[r]}", "family": "fusion", "strategy": s, "ehr": r}
             for r in ehr_reps for s in strategies]
    return pd.DataFrame(rows)


@dataclass
class Trained:
    """Risk scores of every model on every subject (mean over the profile's model seeds).

    Attributes:
        specs: :func:`model_specs` rows.
        risk: model name -> (N,) log-hazard scores, rows as ``data.table``.
        permuted: (fusion model, ``"ct"`` | ``"ehr"``) -> its scores with that modality's inputs shuffled
            across subjects (the same permutation for every model; scaled as ``risk``): how much the
            model uses each modality (a c-index that does not fall when the CT is shuffled means the
            model does not use the CT).
        history: every fit's per-epoch losses (``model``, ``seed`` columns added).
        time, event: the outcomes the models were trained and scored on.
    """

    specs: pd.DataFrame
    risk: dict[str, np.ndarray]
    history: pd.DataFrame
    time: np.ndarray
    event: np.ndarray
    permuted: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)


def train_models(emb: Embeddings, data: P4Data, prof: P4Profile, *, specs: pd.DataFrame | None = None,
                 outcome: pd.DataFrame | None = None, device: torch.device | str = "cpu", seed: int = 0,
                 desc: str = "survival models") -> Trained:
    """Fit every model of ``specs`` on ``train`` (``val`` stops it) with the Cox partial likelihood.

    Late fusion combines the unimodal risk scores, as the paper describes it: its branches are
    the trained unimodal models of the same seed (CT only and the EHR model of its
    representation), frozen, and only the two weights are fitted. ``specs`` must therefore hold
    those unimodal models before any late-fusion row (as :func:`model_specs` orders them).

    Args:
        outcome: ``time_days`` and ``event`` per row of ``data.table`` to use instead of the
            cohort's own (the balance sweep); default: the cohort's.
    """
    from mmlib.models.fusion import LateFusion
    from mmlib.survival import fit_survival, frozen_copy, predict_risk

    specs = model_specs() if specs is None else specs
    src = data.table if outcome is None else outcome
    time = src["time_days"].to_numpy().astype(np.float32)
    event = src["event"].to_numpy().astype(bool)
    tr, va = data.index("train"), data.index("val")
    everyone = np.arange(len(data.table))
    unimodal = {(rep if isinstance(rep, str) else None): name for name, (rep, _) in UNIMODAL.items()}
    risks, hists, fitted_models, permuted = {}, [], {}, {}
    shuffle = torch.as_tensor(np.random.default_rng(seed + 12345).permutation(len(everyone)))
    for spec in core.progress(specs.itertuples(index=False), desc=desc, total=len(specs)):
        inputs = emb.inputs(everyone, spec.ehr, ehr_tokens="attention" in spec.strategy)
        if spec.family == "unimodal":
            inputs = {k: v for k, v in inputs.items() if k.startswith(spec.strategy)}
        dims = {k: int(v.shape[-1]) for k, v in inputs.items() if k in ("ct", "ehr")}

        def part(idx: np.ndarray) -> dict[str, torch.Tensor]:
            i = torch.as_tensor(idx)
            return {**{k: v[i] for k, v in inputs.items()}, "time": torch.as_tensor(time[idx]),
                    "event": torch.as_tensor(event[idx])}

        scores = []
        for s in prof.model_seeds:
            torch.manual_seed(seed * 1000 + s)
            if spec.strategy == "late fusion":
                need = [unimodal[None], unimodal[spec.ehr]]
                missing = [m for m in need if (m, s) not in fitted_models]
                if missing:
                    raise ValueError(f"{spec.model}: late fusion combines trained unimodal models; train {missing} "
                                     "first (list them before it in specs)")
                model = LateFusion.from_unimodal({"ct": frozen_copy(fitted_models[need[0], s]),
                                                  "ehr": frozen_copy(fitted_models[need[1], s])})
                lr = 10 * prof.fusion_lr  # two weights: a few epochs at a larger step
            else:
                model = build_model(spec.strategy, dims, prof)
                lr = prof.fusion_lr
            fitted = fit_survival(model, part(tr), part(va), epochs=prof.fusion_epochs, lr=lr,
                                  weight_decay=prof.weight_decay, patience=prof.patience,
                                  contrastive_weight=prof.contrastive_weight, seed=seed * 1000 + s, device=device)
            if spec.family == "unimodal":
                fitted_models[spec.model, s] = fitted.model
            r = predict_risk(fitted.model, inputs, device=device)
            mean, sd = r[tr].mean(), max(r[tr].std(), 1e-8)
            scores.append((r - mean) / sd)  # seeds on one scale before averaging
            hists.append(fitted.history.assign(model=spec.model, seed=s))
            if spec.family == "fusion":
                for mod in ("ct", "ehr"):
                    shuffled = {k: v[shuffle] if k.startswith(mod) else v for k, v in inputs.items()}
                    rp = (predict_risk(fitted.model, shuffled, device=device) - mean) / sd
                    permuted.setdefault((spec.model, mod), []).append(rp)
        risks[spec.model] = np.mean(scores, axis=0)
    return Trained(specs=specs.reset_index(drop=True), risk=risks, history=pd.concat(hists, ignore_index=True),
                   time=time, event=event, permuted={k: np.mean(v, axis=0) for k, v in permuted.items()})


# --------------------------------------------------------------------------- the balance sweep


def balance_outcomes(data: P4Data, shares: Sequence[float]) -> dict[float, pd.DataFrame]:
    """Outcomes of the same subjects under other values of the generator's ``image_share`` knob.

    The generator draws age, the clot burden ``u_img`` and the EHR state ``z_ehr`` before the
    outcome, so re-planning the cohort with the same seed and another ``image_share`` gives the
    same subjects with other survival times (the CTs, the EHRs and the splits of ``data`` are
    kept as they are). Checked here: the re-planned latents equal ``data``'s to 1e-12.

    Returns:
        share -> DataFrame with ``time_days``, ``event`` in the rows of ``data.table``.

    Raises:
        ValueError: for a cohort that was not generated (no ``cohort.json`` record), or if the
            re-planned subjects differ from ``data``'s.
    """
    from mmlib.cohorts import generator

    rec = data.record
    if not rec or "generator" not in rec or data.latents is None:
        raise ValueError("the balance sweep needs a generated ct_ehr cohort (its cohort.json and truth.json); "
                         "real data have no knob to turn")
    knobs = dict(rec["knobs"])
    preset = knobs.pop("name")
    name = rec["generator"].rsplit(".", 1)[0].rsplit(".", 1)[-1]  # mmlib.cohorts.ct_ehr.CTEHR -> ct_ehr
    out = {}
    for share in shares:
        plan = generator(name, preset, **{**knobs, "image_share": float(share)}).plan_for_seed(int(rec["seed"]))
        df = plan.subjects.set_index("subject_id").loc[data.table["subject_id"]]
        for col in ("u_img", "z_ehr"):
            if not np.allclose(df[col].to_numpy(), data.latents[col].to_numpy(), rtol=0, atol=1e-12):
                raise ValueError(f"re-planning with image_share={share} changed the latent {col!r}: the generator no "
                                 "longer draws the subjects before their outcomes")
        if not np.array_equal(df["age"].to_numpy(), data.table["age"].to_numpy()):
            raise ValueError(f"re-planning with image_share={share} changed the ages")
        out[float(share)] = df[["time_days", "event"]].reset_index(drop=True)
    return out


def balance_sweep(emb: Embeddings, data: P4Data, prof: P4Profile, *, ehr_rep: str = "foundation model",
                  strategies: Sequence[str] = STRATEGIES, device: torch.device | str = "cpu",
                  seed: int = 0) -> pd.DataFrame:
    """Train the unimodal models and every fusion strategy at each ``prof.balance_shares`` value
    (``prof.sweep_seeds`` model seeds each: the sweep trains five times as many models as the main table).

    Returns:
        One row per (share, site, model): ``c_index`` of the model, ``best_unimodal`` (the unimodal
        model with the higher validation c-index at that share), its ``c_index``, and the paired
        bootstrap ``gain`` of the model over it with ``gain_lower`` / ``gain_upper`` / ``p_value``; plus
        rows of family ``"planted"``: the c-index of the latents ``u_img`` and ``z_ehr`` themselves.
    """
    from mmlib import metrics

    outcomes = balance_outcomes(data, prof.balance_shares)
    specs = model_specs(strategies, [ehr_rep])
    specs = specs[(specs["family"] == "fusion") | (specs["ehr"].isna()) | (specs["ehr"] == ehr_rep)]
    rows = []
    sweep_prof = replace(prof, model_seeds=prof.sweep_seeds)
    for share, outcome in outcomes.items():
        trained = train_models(emb, data, sweep_prof, specs=specs, outcome=outcome, device=device, seed=seed,
                               desc=f"image share {share:.2f}")
        best = best_unimodal(trained, data)
        for site, split in (("internal", "test"), ("external", "external")):
            sc = _scored(trained, data.index(split), specs["model"].tolist(), best, prof, seed)
            for spec in specs.itertuples(index=False):
                row = {"image_share": share, "site": site, "model": spec.model, "family": spec.family,
                       "strategy": spec.strategy, "c_index": sc[spec.model]["c"], "best_unimodal": best,
                       "best_unimodal_c": sc[best]["c"]}
                if spec.family == "fusion":
                    d = sc[spec.model]["diff"]
                    row.update(gain=d["estimate"], gain_lower=d["lower"], gain_upper=d["upper"], p_value=d["p_value"])
                    i = data.index(split)
                    for mod in ("ct", "ehr"):
                        row[f"c_{mod}_shuffled"] = metrics.concordance_index(
                            trained.event[i], trained.time[i], trained.permuted[spec.model, mod][i])
                rows.append(row)
            idx = data.index(split)
            for latent in ("u_img", "z_ehr"):  # the ceilings: what a perfect CT-only / EHR-only model would reach
                rows.append({"image_share": share, "site": site, "model": f"{latent} (planted)", "family": "planted",
                             "strategy": latent, "best_unimodal": best, "best_unimodal_c": sc[best]["c"],
                             "c_index": metrics.concordance_index(trained.event[idx], trained.time[idx],
                                                                  data.latents[latent].to_numpy()[idx])})
    return pd.DataFrame(rows)


#: colours of the CT-side and EHR-side unimodal curves (tab10's C8 and C9); the fusion strategies take C0-C7
_SIDE_COLOURS = {"CT": "tab:olive", "EHR": "tab:cyan"}


def balance_figure(sweep: pd.DataFrame):
    """Top: c-index gain of each fusion strategy over the best unimodal model against the image share.
    Bottom: the unimodal models' c-index beside the planted latents' (the ceilings of a perfect encoder)."""
    import matplotlib.pyplot as plt

    fus = sweep[sweep["family"] == "fusion"]
    sites = ("internal", "external")
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True, sharey="row")
    strategies = list(dict.fromkeys(fus["strategy"]))
    colors = [plt.get_cmap("tab10")(k) for k in range(8)]  # C8, C9: the unimodal curves below
    offsets = np.linspace(-0.025, 0.025, len(strategies))
    for col, site in enumerate(sites):
        ax = axes[0, col]
        part = fus[fus["site"] == site]
        for k, s in enumerate(strategies):
            d = part[part["strategy"] == s].sort_values("image_share")
            ax.errorbar(d["image_share"].to_numpy() + offsets[k], d["gain"],
                        yerr=[d["gain"] - d["gain_lower"], d["gain_upper"] - d["gain"]], marker="o", ms=4, lw=1.2,
                        capsize=2, color=colors[k % len(colors)], label=s)
        ax.axhline(0, color="k", lw=0.8, ls="--")
        ax.set_title(f"{site} ({'internal test' if site == 'internal' else 'external site'})")
        ax = axes[1, col]
        part = sweep[(sweep["site"] == site) & sweep["family"].isin(["unimodal", "planted"])]
        for (model, family), d in part.groupby(["model", "family"], sort=False):
            d = d.sort_values("image_share")
            color = _SIDE_COLOURS["CT" if ("CT" in model or "u_img" in model) else "EHR"]
            ax.plot(d["image_share"], d["c_index"], marker="o" if family == "unimodal" else "", ms=4, color=color,
                    ls="-" if family == "unimodal" else ":", label=model)
        ax.axhline(0.5, color="k", lw=0.6)
        ax.set_xlabel("image share of the outcome's information (0 = EHR only, 1 = CT only)")
    axes[0, 0].set_ylabel("c-index gain over the best unimodal model\n(paired bootstrap 95% CI)")
    axes[1, 0].set_ylabel("c-index")
    axes[0, 1].legend(fontsize=7, loc="best")
    axes[1, 1].legend(fontsize=7, loc="best")
    fig.suptitle("Balance sweep: when does fusion pay? (dotted: the planted latents, a perfect encoder's ceiling)")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- evaluation


def best_unimodal(trained: Trained, data: P4Data) -> str:
    """The unimodal model with the highest validation c-index (never chosen on test)."""
    from mmlib import metrics

    va = data.index("val")
    uni = trained.specs.loc[trained.specs["family"] == "unimodal", "model"]
    scores = {m: metrics.concordance_index(trained.event[va], trained.time[va], trained.risk[m][va]) for m in uni}
    return max(scores, key=scores.get)


def _scored(trained: Trained, idx: np.ndarray, models: Sequence[str], best: str, prof: P4Profile,
            seed: int) -> dict[str, dict[str, Any]]:
    """Per model on the rows ``idx``: c-index, its bootstrap CI, and (for every model but ``best``) the paired
    bootstrap difference to ``best``; every model is scored on the same resamples
    (:func:`mmlib.metrics.concordance_bootstrap`)."""
    from mmlib import metrics

    names = list(dict.fromkeys([*models, best]))
    est, smp = metrics.concordance_bootstrap(trained.event[idx], trained.time[idx],
                                             np.stack([trained.risk[m][idx] for m in names], axis=1),
                                             n_boot=prof.n_boot, seed=seed)
    b = names.index(best)
    out = {}
    for k, m in enumerate(names):
        values = smp[:, k][np.isfinite(smp[:, k])]
        lo, hi = np.quantile(values, [0.025, 0.975])
        out[m] = {"c": float(est[k]), "lower": float(lo), "upper": float(hi),
                  "diff": metrics.paired_summary(float(est[k]), float(est[b]), smp[:, k] - smp[:, b])}
    return out


def cindex_table(trained: Trained, data: P4Data, prof: P4Profile, *, seed: int = 0) -> pd.DataFrame:
    """Harrell's c-index with bootstrap CIs on the internal test and the external site, each fusion
    model's paired bootstrap gain over the best unimodal model (chosen on validation), and its
    c-index with the CT or the EHR inputs shuffled across subjects (what it loses without each)."""
    from mmlib import metrics

    best = best_unimodal(trained, data)
    va = data.index("val")
    models = trained.specs["model"].tolist()
    sites = (("internal", "test"), ("external", "external"))
    scored = {site: _scored(trained, data.index(split), models, best, prof, seed) for site, split in sites}
    rows = []
    for spec in trained.specs.itertuples(index=False):
        r = trained.risk[spec.model]
        row = {"model": spec.model, "family": spec.family, "EHR": spec.ehr if isinstance(spec.ehr, str) else "",
               "val c": metrics.concordance_index(trained.event[va], trained.time[va], r[va])}
        for site, split in sites:
            m = scored[site][spec.model]
            row[f"{site} c"], row[f"{site} 95% CI"] = m["c"], f"{m['lower']:.3f}-{m['upper']:.3f}"
            if spec.family == "fusion":
                d = m["diff"]
                row[f"{site} gain"] = d["estimate"]
                row[f"{site} gain 95% CI"] = f"{d['lower']:+.3f} to {d['upper']:+.3f}"
                row[f"{site} gain %"] = 100 * d["estimate"] / d["b"]
                row[f"{site} p"] = d["p_value"]
                i = data.index(split)
                for mod, label in (("ct", "CT"), ("ehr", "EHR")):
                    if (spec.model, mod) in trained.permuted:
                        row[f"{site} c, {label} shuffled"] = metrics.concordance_index(
                            trained.event[i], trained.time[i], trained.permuted[spec.model, mod][i])
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs["best_unimodal"] = best
    return table


# --------------------------------------------------------------------------- figures


def cohort_table(data: P4Data) -> pd.DataFrame:
    """Subjects, deaths and follow-up per split, beside the paper's PE-mortality cohort sizes."""
    paper = {"train": 3099, "val": "(in train)", "test": 1098, "external": 435}
    rows = []
    for split in SPLITS:
        t = data.table[data.table["split"] == split]
        rows.append({"split": split, "site": "external" if split == "external" else "internal", "subjects": len(t),
                     "deaths": int(t["event"].sum()), "deaths %": round(100 * t["event"].mean(), 1),
                     "median follow-up (days)": float(t["time_days"].median()),
                     "paper (PE mortality)": paper[split]})
    return pd.DataFrame(rows)


def km_by_site_figure(data: P4Data):
    """Kaplan-Meier curves per split: the internal site's train / val / test and the external site."""
    import matplotlib.pyplot as plt

    from mmlib.viz import km_curves

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"train": "tab:blue", "val": "tab:cyan", "test": "tab:green", "external": "tab:orange"}
    groups = []
    for split in SPLITS:
        ev, tm = data.survival(data.index(split))
        groups.append((f"{split} ({'external' if split == 'external' else 'internal'} site)", ev, tm, colors[split]))
    km_curves(ax, groups, title="Survival after the index CT, by split", xlabel="days after the index CT")
    fig.tight_layout()
    return fig


def encoder_figure(enc: Encoders):
    """The two label-free pretraining curves (CT autoencoder L1, EHR next-visit BCE), each with the
    epoch that is kept and frozen (the best validation loss) marked."""
    import matplotlib.pyplot as plt

    from mmlib import viz

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, hist, title, ylabel in ((axes[0], enc.ct_history, "CT autoencoder (frozen afterwards)",
                                     "L1 reconstruction"),
                                    (axes[1], enc.ehr_history, "EHR next-visit model (frozen afterwards)",
                                     "next-visit codes BCE")):
        ax.plot(hist["epoch"] + 1, hist["train_loss"], label="train")
        if "val_loss" in hist and hist["val_loss"].notna().any():
            ax.plot(hist["epoch"] + 1, hist["val_loss"], ls="--", label="validation")
        if "best" in hist and hist["best"].any():  # fit flags each new best; the last flag is the epoch kept
            kept = int(hist.loc[hist["best"].astype(bool), "epoch"].iloc[-1]) + 1
            ax.axvline(kept, color="k", ls=":", lw=1, label=f"kept: epoch {kept} (best validation)")
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        viz.epoch_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def cindex_figure(table: pd.DataFrame):
    """Forest plot: c-index with 95% CI per model, internal test and external site side by side."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(11, 0.33 * len(table) + 2.0), sharey=True, layout="constrained")
    y = np.arange(len(table))[::-1]
    family_colours = {"unimodal": "tab:gray", "fusion": "tab:blue"}
    colors = table["family"].map(family_colours).to_numpy()
    handles = [Line2D([], [], marker="o", ls="", ms=4, color=c, label=f"{f} model") for f, c in family_colours.items()
               if (table["family"] == f).any()]
    for ax, site in zip(axes, ("internal", "external")):
        c = table[f"{site} c"].to_numpy()
        lo, hi = np.array([list(map(float, s.split("-"))) for s in table[f"{site} 95% CI"]]).T
        for k in range(len(table)):
            ax.errorbar(c[k], y[k], xerr=[[c[k] - lo[k]], [hi[k] - c[k]]], fmt="o", color=colors[k], capsize=2, ms=4)
        best = table.attrs.get("best_unimodal")
        if best is not None:
            line = ax.axvline(float(table.loc[table["model"] == best, f"{site} c"].iloc[0]), color="tab:gray", ls="--",
                              lw=0.8, label=f"best unimodal ({best}, chosen on validation), its c-index")
        ax.axvline(0.5, color="k", lw=0.6)
        ax.set(title=f"{site} ({'internal test' if site == 'internal' else 'external site'})",
               xlabel="Harrell's c-index")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, table["model"])
    if table.attrs.get("best_unimodal") is not None:
        handles.append(line)
    # below both panels, where no row can sit under it
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    return fig


#: the smallest risk group the log-rank test of :func:`risk_group_figure` is shown for
MIN_LOGRANK_GROUP = 5


def risk_group_figure(trained: Trained, data: P4Data, model: str):
    """Kaplan-Meier curves of the low / intermediate / high risk tertiles of ``model`` (cut points: training-set
    tertiles), on the internal test and the external site, with the log-rank test across groups.

    Each panel's title gives the size of every group, empty ones included: on a shifted site the
    training cut points can put nearly everyone in one group. The log-rank test is shown only when
    every non-empty group holds at least ``MIN_LOGRANK_GROUP`` subjects.
    """
    import matplotlib.pyplot as plt
    from sksurv.compare import compare_survival

    from mmlib.survival import risk_groups
    from mmlib.viz import km_curves

    tr = data.index("train")
    r = trained.risk[model]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True, layout="constrained")
    colors = {"low": "tab:green", "intermediate": "tab:olive", "high": "tab:red"}
    for ax, (site, split) in zip(axes, (("internal test", "test"), ("external site", "external"))):
        i = data.index(split)
        grp = risk_groups(r[tr], r[i])
        ev, tm = trained.event[i], trained.time[i]
        km_curves(ax, [(f"{g} risk", ev[grp == g], tm[grp == g], colors[g]) for g in colors],
                  title=site, xlabel="days after the index CT", ylabel=None)
        counts = {g: int((grp == g).sum()) for g in colors}
        title = f"{site}, n low / intermediate / high = {' / '.join(map(str, counts.values()))}"
        present = [n for n in counts.values() if n]
        if len(present) > 1 and min(present) >= MIN_LOGRANK_GROUP:
            y = np.array(list(zip(ev, tm)), dtype=[("event", bool), ("time", float)])
            chi2, p = compare_survival(y, grp)
            title += f"\nlog-rank chi2 = {chi2:.1f}, p = {p:.2g}"
        else:
            title += f"\nno log-rank test: a group holds fewer than {MIN_LOGRANK_GROUP} subjects or all fall in one"
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("survival probability (95% CI)")
    fig.suptitle(f"Risk groups of {model} (tertile cut points from the training set)")
    return fig


# --------------------------------------------------------------------------- claims

PAPER_REPORTED = pd.DataFrame([
    ("fusion gain over unimodal when the modalities contribute comparably", "1.5-5.4% c-index (abstract; relative or "
     "points not stated)"),
    ("most consistent fusion for PE mortality", "contrastive fusion with CLMBR representations"),
    ("MACE, internal", "cross-attention (one-hot) best"),
    ("MACE, external", "image-guided co-attention best"),
    ("cohort (PE mortality)", "3,099 train / 1,098 internal test / 435 external"),
], columns=["what", "paper reported"])


def _fmt_gain(row: pd.Series, site: str) -> str:
    return f"{row[f'{site} gain']:+.3f} ({row[f'{site} gain 95% CI']}, p={row[f'{site} p']:.3f})"


def sweep_summary(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per image share and site: the best unimodal model and its c, late fusion's gain, and how many fusion
    models beat it with a 95% CI above 0."""
    rows = []
    for (share, site), part in sweep.groupby(["image_share", "site"], sort=True):
        fus = part[part["family"] == "fusion"]
        late = fus[fus["strategy"] == "late fusion"].iloc[0]
        top = fus.loc[fus["gain"].idxmax()]
        row = {"image share": share, "site": site, "best unimodal (val)": part["best_unimodal"].iloc[0],
               "its c": part["best_unimodal_c"].iloc[0],
               "late fusion gain": f"{late['gain']:+.3f} ({late['gain_lower']:+.3f} to {late['gain_upper']:+.3f})",
               "largest fusion gain": f"{top['gain']:+.3f} ({top['strategy']})",
               "fusion models with CI > 0": f"{int((fus['gain_lower'] > 0).sum())}/{len(fus)}"}
        if "c_ct_shuffled" in fus:
            row["c lost, CT shuffled (largest-gain model)"] = top["c_index"] - top["c_ct_shuffled"]
            row["c lost, EHR shuffled (largest-gain model)"] = top["c_index"] - top["c_ehr_shuffled"]
        rows.append(row)
    return pd.DataFrame(rows)


def _hindsight(table: pd.DataFrame) -> str:
    """The best fusion model against the unimodal model that is best *on the test set*: an unfair choice (it
    peeks at the test set), shown so the reader sees how much of a gain the validation choice explains."""
    uni = table[table["family"] == "unimodal"].set_index("model")["internal c"]
    fus = table[table["family"] == "fusion"].set_index("model")["internal c"]
    if uni.idxmax() == table.attrs.get("best_unimodal"):
        return ""
    return (f". Against {uni.idxmax()}, the unimodal model best on the test set itself (hindsight, not a fair "
            f"choice): best fusion {fus.idxmax()} {fus.max() - uni.max():+.3f}")


def _listed(rows: pd.DataFrame) -> str:
    return ", ".join(f"{a} @ {b:g}" for a, b in zip(rows["strategy"], rows["image_share"])) or "none"


def claims_table(table: pd.DataFrame, sweep: pd.DataFrame | None, *, image_share: float | None) -> pd.DataFrame:
    """Which of the paper's claims held on this cohort, with the numbers that decide."""
    fus = table[table["family"] == "fusion"].set_index("model")
    rows = []
    gains = fus["internal gain"]
    above = fus[[float(s.split(" to ")[0]) > 0 for s in fus["internal gain 95% CI"]]]
    held = "yes" if (gains > 0).mean() >= 0.5 and len(above) else ("partly" if (gains > 0).any() else "no")
    rows.append({
        "claim": "fusion beats the best unimodal model when the modalities contribute comparably"
                 + (f" (this cohort: image share {image_share:g})" if image_share is not None else ""),
        "paper reported": "+1.5 to +5.4% c-index",
        "this run": f"{(gains > 0).sum()}/{len(gains)} fusion models above it, gains "
                                    f"{gains.min():+.3f} to {gains.max():+.3f} ({fus['internal gain %'].min():+.1f} to "
                                    f"{fus['internal gain %'].max():+.1f}%); CI above 0: {list(above.index) or 'none'}"
                                    + _hindsight(table),
        "held": held})
    worst = fus[["internal gain", "external gain"]].min(axis=1)
    key = "contrastive · FM"
    if key in fus.index:
        ok = worst.idxmax() == key and worst[key] > 0
        rows.append({"claim": "contrastive fusion with the EHR foundation model is the most consistent",
                     "paper reported": "contrastive + CLMBR most consistent (PE mortality)",
                     "this run": f"{key}: internal {_fmt_gain(fus.loc[key], 'internal')}, external "
                                                 f"{_fmt_gain(fus.loc[key], 'external')}; most consistent here "
                                                 f"(largest worse-site gain): {worst.idxmax()} ({worst.max():+.3f})",
                     "held": "yes" if ok else "no"})
    bi, be = fus["internal c"].idxmax(), fus["external c"].idxmax()
    rows.append({"claim": "the best fusion strategy changes under distribution shift",
                 "paper reported": "MACE: cross-attention best internally, image-guided co-attention externally",
                 "this run": f"best internal: {bi} ({fus.loc[bi, 'internal c']:.3f}); best external: {be} "
                                             f"({fus.loc[be, 'external c']:.3f})",
                 "held": "yes" if bi != be else "no"})
    uni = table[table["family"] == "unimodal"].set_index("model")
    if {"EHR foundation model only", "EHR one-hot only"} <= set(uni.index):
        fm, oh = uni.loc["EHR foundation model only"], uni.loc["EHR one-hot only"]
        rows.append({"claim": "foundation-model EHR representations beat one-hot ones",
                     "paper reported": "implied (CLMBR fusion most consistent)",
                     "this run": f"EHR only: FM {fm['internal c']:.3f} vs one-hot {oh['internal c']:.3f} "
                                                 f"internal; {fm['external c']:.3f} vs {oh['external c']:.3f} external",
                     "held": "yes" if fm["internal c"] > oh["internal c"] and fm["external c"] > oh["external c"]
                     else ("partly" if fm["internal c"] > oh["internal c"] or fm["external c"] > oh["external c"]
                           else "no")})
    if sweep is not None and len(sweep):
        fs = sweep[(sweep["family"] == "fusion") & (sweep["site"] == "internal")]
        top = fs.groupby("image_share")["gain"].max()
        mean_gain = fs.groupby("image_share")["gain"].mean()
        mid = top.index[np.argmin(np.abs(top.index.to_numpy() - 0.5))]
        ends = [top.index.min(), top.index.max()]
        ok = all(top[mid] > top[e] for e in ends)
        rows.append({"claim": "the benefit of fusion depends on the balance of the modalities' information",
                     "paper reported": "central claim (not varied on the paper's data)",
                     "this run": "largest fusion gain by image share: "
                                 + ", ".join(f"{k:g}: {v:+.3f}" for k, v in top.items())
                                 + "; mean over strategies: "
                                 + ", ".join(f"{k:g}: {v:+.3f}" for k, v in mean_gain.items()),
                     "held": "yes" if ok else "no"})
        late = sweep[(sweep["strategy"] == "late fusion") & (sweep["site"] == "internal")].set_index("image_share")
        if mid in late.index:
            r = late.loc[mid]
            rows.append({"claim": f"late fusion beats the best unimodal model when both modalities carry signal "
                                  f"(image share {mid:g})",
                         "paper reported": "(issue acceptance)",
                         "this run": f"{r['gain']:+.3f} ({r['gain_lower']:+.3f} to {r['gain_upper']:+.3f}), "
                                                     f"p={r['p_value']:.3f}",
                         "held": "yes" if r["gain_lower"] > 0 else ("partly" if r["gain"] > 0 else "no")})
        ext = fs[fs["image_share"].isin(ends)]
        beat = ext[ext["gain_lower"] > 0]
        rows.append({"claim": "when one modality carries nothing, fusion does not beat the informative unimodal model "
                              "beyond noise",
                     "paper reported": "(issue acceptance)",
                     "this run": f"image shares {ends[0]:g} and {ends[1]:g}: largest fusion gain "
                                                 f"{ext['gain'].max():+.3f}; CI above 0: "
                                                 f"{_listed(beat)}",
                     "held": "yes" if beat.empty else "no"})
    rows.append({"claim": "MACE (cardiovascular) results", "paper reported": "see above",
                 "this run": "not tested: no CVD cohort here", "held": "not tested"})
    return pd.DataFrame(rows)


def paper_vs_run(claims: pd.DataFrame) -> pd.DataFrame:
    """The index's table: every claim with the paper's wording, this run's numbers and the verdict."""
    return pd.DataFrame({"quantity": claims["claim"], "paper reported": claims["paper reported"],
                         "this run": claims["this run"], "held on this data": claims["held"]})


from mmlib.pipelines.p4_breast import breast_cancer_benchmark, breast_figure  # noqa: E402  (re-exported, see __all__)


def truth_table(data: P4Data, outcome: pd.DataFrame | None = None) -> pd.DataFrame | None:
    """c-index of the planted latents themselves: the ceiling of a CT-only model (clot burden ``u_img``), of an
    EHR-only model (state ``z_ehr``) and of any model (the true log hazard ``lp``). None for real data."""
    from mmlib import metrics

    if data.latents is None:
        return None
    src = data.table if outcome is None else outcome
    ev, tm = src["event"].to_numpy().astype(bool), src["time_days"].to_numpy().astype(float)
    rows = []
    for latent, what in (("u_img", "clot burden (what the CT shows)"), ("z_ehr", "EHR state (what the EHR shows)"),
                         ("lp", "true log hazard (both + age)")):
        row = {"planted latent": latent, "meaning": what}
        for site, split in (("internal", "test"), ("external", "external")):
            i = data.index(split)
            row[f"{site} c"] = metrics.concordance_index(ev[i], tm[i], data.latents[latent].to_numpy()[i])
        rows.append(row)
    return pd.DataFrame(rows)


def stopping_table(trained: Trained) -> pd.DataFrame:
    """Per model: the epoch early stopping kept (mean over seeds) and the epochs it ran. A fusion model that
    stops long before the CT-only model has reached its best epoch cannot have learned what the CT holds."""
    h = trained.history
    best = h[h["best"]].groupby(["model", "seed"])["epoch"].max().groupby("model").mean()
    ran = h.groupby(["model", "seed"])["epoch"].max().groupby("model").mean() + 1
    out = pd.DataFrame({"model": trained.specs["model"], "family": trained.specs["family"]})
    out["best epoch (mean over seeds)"] = out["model"].map(best)
    out["epochs run"] = out["model"].map(ran)
    return out
