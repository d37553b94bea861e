"""Training and prediction for small Cox models over precomputed embeddings (P4, P5).

The fusion modules of :mod:`mmlib.models.fusion` map frozen embeddings to a log-hazard score.
Training them differs from :func:`mmlib.train.fit` in two ways that matter for survival:

- The Cox partial likelihood is a property of the whole risk set, so small minibatches bias it
  (a sample's risk set is cut to its batch). With a few hundred subjects the whole training set
  fits in one batch, which is the default here (``batch_size=None``).
- Hundreds of small models are trained per notebook (every strategy x every knob setting), so
  the best epoch is kept in memory (no checkpoint files) and training stops after ``patience``
  epochs without a better validation loss.

:func:`fit_survival` trains; :func:`predict_risk` scores; :func:`breslow_survival` turns Cox
scores into survival curves (for time-dependent metrics); :func:`risk_groups` cuts scores at
quantiles of the training scores (for risk-group Kaplan-Meier plots).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from mmlib import core, metrics
from mmlib.losses import cox_ph_loss

__all__ = ["SurvivalFit", "breslow_survival", "fit_survival", "frozen_copy", "predict_risk", "risk_groups"]

log = core.get_logger(__name__)


@dataclass
class SurvivalFit:
    """What :func:`fit_survival` returns.

    Attributes:
        model: the network at its best validation epoch (eval mode).
        history: one row per epoch: ``epoch``, ``train_loss`` (Cox, plus ``train_contrastive``
            when the model returns one), ``val_loss`` (Cox on the whole validation set),
            ``val_c_index`` (Harrell's), ``best``.
        best_epoch: the epoch whose weights ``model`` holds.
    """

    model: nn.Module
    history: pd.DataFrame
    best_epoch: int


def _check_data(data: Mapping[str, torch.Tensor], name: str) -> int:
    for key in ("time", "event"):
        if key not in data:
            raise KeyError(f"{name} lacks the key {key!r} (survival time and event indicator); has {sorted(data)}")
    n = int(data["time"].shape[0])
    for key, value in data.items():
        if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] != n:
            raise ValueError(f"{name}[{key!r}] has {value.shape[0]} rows, {name}['time'] has {n}")
    return n


def _rows(data: Mapping[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx] if torch.is_tensor(v) and v.ndim > 0 else v for k, v in data.items()}


def _to(data: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in data.items()}


def fit_survival(
    model: nn.Module,
    train: Mapping[str, torch.Tensor],
    val: Mapping[str, torch.Tensor] | None = None,
    *,
    epochs: int = 200,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int | None = None,
    contrastive_weight: float = 0.0,
    ties: str = "efron",
    patience: int | None = 30,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> SurvivalFit:
    """Fit ``model`` with the Cox partial likelihood (plus a weighted contrastive term).

    The loss of a batch is ``cox_ph_loss(out["risk"], time, event) + contrastive_weight *
    out["contrastive"]`` (the second term only when the model returns it, e.g.
    :class:`mmlib.models.fusion.ContrastiveFusion`). The model kept is the one with the lowest
    Cox loss on the whole validation set (the contrastive term does not choose the epoch); with
    no validation set, the last epoch's.

    Args:
        model: maps a batch dict to ``{"risk": (B,), ...}``.
        train: the model's inputs plus ``"time"`` (N,) and ``"event"`` (N,) tensors; every
            tensor has N rows.
        val: the same for validation (early stopping and model choice).
        epochs: maximum number of epochs.
        lr: Adam learning rate.
        weight_decay: AdamW weight decay.
        batch_size: rows per step; ``None`` = the whole training set (the Cox risk set intact).
        contrastive_weight: weight of ``out["contrastive"]``.
        ties: ``"efron"`` or ``"breslow"`` (:func:`mmlib.losses.cox_ph_loss`).
        patience: stop after this many epochs without a lower validation loss (``None``: never).
        seed: seeds dropout (torch's global generator, reseeded each epoch from ``seed`` and the
            epoch, then restored on return) and the batch order. The initial weights are the
            caller's: seed before building the model.
        device: where to train.

    Raises:
        KeyError: if ``time`` or ``event`` is missing.
        ValueError: on tensors of unequal length, or a training set without events.
        FloatingPointError: when the loss stops being finite.
    """
    n = _check_data(train, "train")
    if val is not None:
        _check_data(val, "val")
    if not bool(torch.as_tensor(train["event"]).bool().any()):
        raise ValueError("train has no events: a Cox model cannot be fitted")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    device = torch.device(device)
    model.to(device)
    tr = _to(train, device)
    va = _to(val, device) if val is not None else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    bs = n if batch_size is None else max(1, int(batch_size))
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG state is left as it was
        rows, best, best_state, best_epoch, since = [], math.inf, None, 0, 0
        for epoch in range(epochs):
            torch.manual_seed(seed * 100_003 + epoch)
            model.train()
            order = torch.randperm(n, generator=gen) if bs < n else torch.arange(n)
            sums = {"loss": 0.0}
            for start in range(0, n, bs):
                batch = _rows(tr, order[start:start + bs].to(device))
                out = model(batch)
                cox = cox_ph_loss(out["risk"], batch["time"], batch["event"], ties=ties)
                loss = cox
                if "contrastive" in out:
                    loss = loss + contrastive_weight * out["contrastive"]
                    term = float(out["contrastive"].detach()) * len(batch["time"])
                    sums["contrastive"] = sums.get("contrastive", 0.0) + term
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"fit_survival: loss is {loss.item()} at epoch {epoch}; "
                                             "lower the learning rate?")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums["loss"] += float(cox.detach()) * len(batch["time"])
            row = {"epoch": epoch, "train_loss": sums["loss"] / n}
            if "contrastive" in sums:
                row["train_contrastive"] = sums["contrastive"] / n
            if va is not None:
                model.eval()
                with torch.no_grad():
                    risk = model(va)["risk"]
                    vloss = float(cox_ph_loss(risk, va["time"], va["event"], ties=ties))
                row["val_loss"] = vloss
                try:
                    row["val_c_index"] = metrics.concordance_index(
                        va["event"].cpu().numpy(), va["time"].cpu().numpy(), risk.cpu().numpy())
                except ValueError:
                    row["val_c_index"] = math.nan
                score = vloss
            else:
                score = -epoch  # no validation: keep the last epoch
            row["best"] = score < best
            if score < best:
                best, best_state, best_epoch, since = score, copy.deepcopy(model.state_dict()), epoch, 0
            else:
                since += 1
            rows.append(row)
            if patience is not None and va is not None and since >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return SurvivalFit(model=model, history=pd.DataFrame(rows), best_epoch=best_epoch)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of a trained model with no trainable parameter and no dropout (eval mode): a fixed branch
    inside another model, e.g. the unimodal models that late fusion combines."""
    branch = copy.deepcopy(model).eval()
    for p in branch.parameters():
        p.requires_grad_(False)
    for m in branch.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return branch


@torch.no_grad()
def predict_risk(model: nn.Module, data: Mapping[str, torch.Tensor], *, batch_size: int = 4096,
                 device: torch.device | str = "cpu") -> np.ndarray:
    """Log-hazard scores of ``model`` on every row of ``data`` (eval mode, no gradient), as float64."""
    device = torch.device(device)
    model.eval().to(device)
    n = next(int(v.shape[0]) for v in data.values() if torch.is_tensor(v) and v.ndim > 0)
    out = []
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        out.append(model(_to(_rows(data, idx), device))["risk"].reshape(-1).double().cpu())
    return torch.cat(out).numpy()


def breslow_survival(train_risk: np.ndarray, train_time: np.ndarray, train_event: np.ndarray,
                     risk: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Survival curves ``S(t | x) = exp(-H0(t) exp(risk))`` with Breslow's baseline hazard.

    ``H0(t) = sum_{t_i <= t, event} 1 / sum_{j: t_j >= t_i} exp(risk_j)`` over the training set
    (scores centred on their mean for numerical range; the curves do not depend on the shift).

    Args:
        train_risk, train_time, train_event: the training set's scores, times and events.
        risk: (M,) scores of the subjects to predict.
        times: (T,) times at which to evaluate the curves.

    Returns:
        (M, T) survival probabilities, non-increasing in t.
    """
    r = np.asarray(train_risk, float).reshape(-1)
    t = np.asarray(train_time, float).reshape(-1)
    e = np.asarray(train_event).astype(bool).reshape(-1)
    if not (len(r) == len(t) == len(e)):
        raise ValueError(f"train_risk, train_time and train_event differ in length: {len(r)}, {len(t)}, {len(e)}")
    shift = r.mean()
    w = np.exp(r - shift)
    event_times = np.unique(t[e])
    at_risk = np.array([w[t >= u].sum() for u in event_times])
    deaths = np.array([(e & (t == u)).sum() for u in event_times])
    cum = np.cumsum(deaths / at_risk)
    times = np.asarray(times, float).reshape(-1)
    pos = np.searchsorted(event_times, times, side="right")
    h0 = np.where(pos > 0, cum[np.maximum(pos - 1, 0)], 0.0)
    rel = np.exp(np.asarray(risk, float).reshape(-1, 1) - shift)
    return np.exp(-rel * h0[None, :])


def risk_groups(train_risk: np.ndarray, risk: np.ndarray, quantiles: tuple[float, ...] = (1 / 3, 2 / 3),
                labels: tuple[str, ...] = ("low", "intermediate", "high")) -> np.ndarray:
    """Risk group of each score, cut at ``quantiles`` of the *training* scores (never the test's own)."""
    if len(labels) != len(quantiles) + 1:
        raise ValueError(f"{len(quantiles)} cut points need {len(quantiles) + 1} labels, got {len(labels)}")
    cuts = np.quantile(np.asarray(train_risk, float), quantiles)
    return np.asarray(labels, dtype=object)[np.searchsorted(cuts, np.asarray(risk, float), side="right")]
