"""Pretraining losses of P1: CLIP image-tabular contrast and image-tabular matching (ITM).

- :func:`clip_logits`: cosine similarities divided by a temperature,
  ``normalize(z_a) @ normalize(z_b).T / tau``.
- :class:`ClipLoss` (the paper's ``L_ITC``): symmetric InfoNCE over a batch of B paired image
  and tabular embeddings. Row i of the logits scores image i against every table, and the
  matching table i is the correct class: ``L_ITC = 0.5 CE(logits, arange(B)) + 0.5 CE(logits.T,
  arange(B))``. The temperature is fixed (P1: 0.1; the public configs pretrain with 0.08) or
  learnable (CLIP style: ``log(1 / tau)`` is a parameter, the scale ``1 / tau`` is clamped at
  ``max_logit_scale``). Under ``torch.distributed`` the embeddings of every rank are gathered,
  so every rank contrasts its own rows against the whole global batch (the open_clip recipe
  with ``local_loss=True``).
- :func:`sample_hard_negatives`: ALBEF-style hard-negative mining. For row i of the ITC logits
  draw one column ``j != i`` with probability ``softmax(logits[i])`` after removing the diagonal
  and renormalising: other subjects the contrastive model finds most similar are drawn most often.
- :class:`ImageTabularMatchingLoss` (the paper's ``L_ITM``): B positive pairs (image i, table i),
  B pairs (image i, a hard-negative table) and B pairs (a hard-negative image, table i) all go
  through the multimodal interaction module in one call; a ``Linear(dim, 2)`` head says "match"
  (1) or "no match" (0) and is trained with cross-entropy.

The paper's total pretraining loss is ``(L_ITC + L_ITM) / 2``; the caller combines the two, so
that each can also be trained alone (MMCL, the "CLIP without ITM" baseline, uses ``L_ITC`` only)::

    itc = clip_loss(z_img, z_tab)
    itm = itm_loss(fuse, image_tokens, tabular_features, itc["local_logits"])
    loss = (itc["loss"] + itm["loss"]) / 2

Survival losses of P4 (time-to-event heads on fused CT + EHR features):

- :func:`cox_ph_loss`: negative Cox partial log-likelihood of a batch of
  log-hazard scores, Breslow or Efron handling of tied event times, computed with log-sum-exps
  over risk sets sorted by time; a batch without events gives a graph-connected zero.
- :func:`discrete_time_nll`: discrete-time alternative, the logistic-hazard (Nnet-survival /
  LogisticHazard) negative log-likelihood over K intervals; a censoring in interval j survives j.
- :func:`discretize_times`: times to interval indices for K+1 cut points, intervals
  ``(c_j, c_{j+1}]``, out-of-range times clamped to the first or last interval.

Tri-modal contrast of P3 (MoRE: reports aligned with chest X-rays and 12-lead ECGs):

- :func:`info_nce`: one direction of InfoNCE, ``CE(clip_logits(a, b, tau), arange(B))``.
- :class:`TriModalLoss`: ``1/2 L(text, xray) + 1/2 L(text, ecg)``, each ``L`` the mean of its two
  InfoNCE directions; fixed (a buffer, MoRE: 0.02) or learnable temperature; one signal modality
  may be left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmlib.distributed import GatherWithGrad, collective_world, gather_local_slot, local_only

__all__ = [
    "ClipLoss",
    "ImageTabularMatchingLoss",
    "TriModalLoss",
    "clip_logits",
    "cox_ph_loss",
    "discrete_time_nll",
    "discretize_times",
    "info_nce",
    "local_only",
    "sample_hard_negatives",
]

Fuse = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def clip_logits(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``z_a`` with every row of ``z_b``, divided by ``temperature``.

    Args:
        z_a: (B_a, D) embeddings (rows of the result).
        z_b: (B_b, D) embeddings (columns of the result); B_b may differ from B_a (a gathered
            global batch, for instance).
        temperature: positive float or scalar tensor (a tensor keeps its gradient).

    Returns:
        (B_a, B_b) tensor ``normalize(z_a) @ normalize(z_b).T / temperature``.

    Raises:
        ValueError: if an input is not 2-D, the embedding sizes differ, or a float temperature
            is not positive.
    """
    if not isinstance(z_a, torch.Tensor) or z_a.ndim != 2:
        raise ValueError(f"clip_logits expects z_a of shape (B, D), got {_shape(z_a)}")
    if not isinstance(z_b, torch.Tensor) or z_b.ndim != 2:
        raise ValueError(f"clip_logits expects z_b of shape (B, D), got {_shape(z_b)}")
    if z_a.shape[1] != z_b.shape[1]:
        raise ValueError(
            f"clip_logits needs the same embedding size, got z_a {tuple(z_a.shape)} and z_b {tuple(z_b.shape)}"
        )
    if not isinstance(temperature, torch.Tensor) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.normalize(z_a, dim=1) @ F.normalize(z_b, dim=1).T / temperature


class ClipLoss(nn.Module):
    """Symmetric CLIP (InfoNCE) loss between paired image and tabular embeddings (P1's ``L_ITC``).

    ``loss = 0.5 CE(logits, labels) + 0.5 CE(logits_tab, labels)`` where ``logits`` scores this
    process's images against all tables and ``logits_tab`` this process's tables against all
    images. On one process ``labels = arange(B)`` and ``logits_tab = logits.T``.

    With ``torch.distributed`` initialised, a world size W > 1 and ``gather=True``, both
    embeddings are all-gathered (every rank must pass the same batch size B), rank r contrasts
    its B rows against the W*B global columns, and ``labels = arange(B) + r*B``. Rank r's loss
    covers rows ``r*B .. r*B+B-1`` of the global logits in the image-to-table direction and the
    same columns in the table-to-image direction, so the mean of the per-rank losses equals the
    single-process loss on the global batch.

    Args:
        temperature: softmax temperature tau (P1: 0.1), or the initial value when learnable.
        learnable: learn ``log(1 / tau)`` (CLIP); the scale ``1 / tau`` is clamped at
            ``max_logit_scale`` in the forward pass (no gradient once clamped).
        max_logit_scale: upper bound on ``1 / tau`` for a learnable temperature (CLIP: 100).
        gather: gather the global batch under ``torch.distributed`` (ignored on one process).
        gather_with_grad: when gathering, send the gradients of the other ranks' losses back to
            the local embeddings (all_reduce in backward), so that DDP's averaged gradient is
            exactly that of the global-batch loss. ``False`` is open_clip's default: other ranks'
            embeddings are constants and local embeddings only receive the gradient of this
            rank's own loss (all ranks must call ``backward`` when ``True``).

    Raises:
        ValueError: if ``temperature`` or ``max_logit_scale`` is not positive, or a learnable
            temperature would start clamped.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        learnable: bool = False,
        max_logit_scale: float = 100.0,
        gather: bool = True,
        *,
        gather_with_grad: bool = True,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not max_logit_scale > 0:
            raise ValueError(f"max_logit_scale must be > 0, got {max_logit_scale}")
        if learnable and 1.0 / temperature > max_logit_scale:
            raise ValueError(
                f"learnable temperature={temperature} gives logit scale {1.0 / temperature:g} > "
                f"max_logit_scale={max_logit_scale}: it would start clamped and never be learnt"
            )
        self.learnable = bool(learnable)
        self.max_logit_scale = float(max_logit_scale)
        self.gather = bool(gather)
        self.gather_with_grad = bool(gather_with_grad)
        if self.learnable:
            self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        else:
            self.log_logit_scale = None
            self._temperature = float(temperature)

    def logit_scale(self) -> torch.Tensor:
        """``1 / tau`` as a scalar tensor (clamped and differentiable when learnable)."""
        if self.log_logit_scale is None:
            return torch.tensor(1.0 / self._temperature)
        return self.log_logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, z_img: torch.Tensor, z_tab: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss of B paired embeddings (row i of each is subject i).

        Args:
            z_img: (B, D) image embeddings.
            z_tab: (B, D) tabular embeddings.

        Returns:
            Dict with ``loss`` (scalar), ``logits`` (B, W*B): local images against all tables,
            graph kept, ``local_logits`` (B, B): the block of ``logits`` against this rank's own
            tables (what :class:`ImageTabularMatchingLoss` samples hard negatives from; equal to
            ``logits`` on one process), and ``temperature`` (detached scalar float tensor).

        Raises:
            ValueError: if the inputs are not (B, D) tensors of equal shape with B >= 1.
        """
        for name, z in (("z_img", z_img), ("z_tab", z_tab)):
            if not isinstance(z, torch.Tensor) or z.ndim != 2:
                raise ValueError(f"ClipLoss expects {name} of shape (B, D), got {_shape(z)}")
        if z_img.shape != z_tab.shape:
            raise ValueError(
                f"ClipLoss needs paired embeddings of equal shape, got z_img {tuple(z_img.shape)} "
                f"and z_tab {tuple(z_tab.shape)}"
            )
        b = z_img.shape[0]
        if b < 1:
            raise ValueError(f"ClipLoss needs a batch of at least 1, got z_img {tuple(z_img.shape)}")

        scale = self.logit_scale().to(device=z_img.device, dtype=z_img.dtype)
        rank, world = collective_world()
        if self.gather and world > 1:
            gather = GatherWithGrad.apply if self.gather_with_grad else gather_local_slot
            all_img, all_tab = gather(z_img), gather(z_tab)
        else:
            rank, all_img, all_tab = 0, z_img, z_tab

        n_img, n_tab = F.normalize(z_img, dim=1), F.normalize(z_tab, dim=1)
        logits_img = scale * n_img @ F.normalize(all_tab, dim=1).T  # (B, W*B): local images vs all tables
        logits_tab = scale * n_tab @ F.normalize(all_img, dim=1).T  # (B, W*B): local tables vs all images
        labels = torch.arange(b, device=z_img.device) + rank * b
        loss = 0.5 * F.cross_entropy(logits_img, labels) + 0.5 * F.cross_entropy(logits_tab, labels)
        return {
            "loss": loss,
            "logits": logits_img,
            "local_logits": logits_img[:, rank * b : (rank + 1) * b],
            "temperature": (1.0 / scale).detach().float(),
        }


def sample_hard_negatives(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One hard negative column per row, drawn from the softmax of the row without its diagonal (ALBEF).

    Row i draws ``j != i`` with probability ``exp(logits[i, j]) / sum_{k != i} exp(logits[i, k])``.
    Computed without gradient and stably (row maximum subtracted): a row with ``+inf`` entries
    draws uniformly among them, a row whose off-diagonal entries are all ``-inf`` draws
    uniformly among all ``j != i``.

    Args:
        logits: (B, B) similarities, row i = subject i (e.g. ``ClipLoss``'s ``local_logits`` for
            negative tables, its transpose for negative images).
        generator: optional ``torch.Generator`` on ``logits``' device, for reproducible draws.

    Returns:
        (B,) long tensor of column indices, never equal to the row index.

    Raises:
        ValueError: if ``logits`` is not square (B, B), B < 2, or it contains NaN.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"sample_hard_negatives expects square (B, B) logits, got {_shape(logits)}")
    b = logits.shape[0]
    if b < 2:
        raise ValueError(f"hard negatives need a batch of at least 2, got logits of shape {tuple(logits.shape)}")
    with torch.no_grad():
        w = logits.detach().float()
        if torch.isnan(w).any():
            raise ValueError("sample_hard_negatives got NaN logits")
        neg_inf = torch.tensor(float("-inf"), device=w.device)
        zero = torch.zeros((), device=w.device)
        eye = torch.eye(b, dtype=torch.bool, device=w.device)
        w = w.masked_fill(eye, float("-inf"))
        pos_inf = torch.isposinf(w)
        w = torch.where(pos_inf.any(1, keepdim=True), torch.where(pos_inf, zero, neg_inf), w)
        peak = w.amax(dim=1, keepdim=True)
        dead = torch.isneginf(peak)  # every off-diagonal entry -inf: draw uniformly
        w = torch.where(dead & ~eye, zero, w)
        peak = torch.where(dead, zero, peak)
        weights = torch.exp(w - peak)  # diagonal: exp(-inf) = 0; row maximum: 1
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)


class ImageTabularMatchingLoss(nn.Module):
    """Image-tabular matching with hard negatives (P1's ``L_ITM``, after ALBEF's image-text matching).

    For a batch of B subjects: B positive pairs (image i, table i); for each image a negative
    table drawn by :func:`sample_hard_negatives` from row i of the ITC logits; for each table a
    negative image drawn from row i of the transposed logits. The 3B pairs go through ``fuse``
    (the multimodal interaction module) in one call and a ``Linear(dim, 2)`` head classifies
    them, trained with cross-entropy against 1 (match) for the B positives and 0 for the 2B
    negatives.

    Args:
        dim: width of ``fuse``'s output (P1's public example: 256).

    Raises:
        ValueError: if ``dim`` < 1.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if int(dim) != dim or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim}")
        self.dim = int(dim)
        self.head = nn.Linear(self.dim, 2)

    def forward(
        self,
        fuse: Fuse,
        image_tokens: torch.Tensor,
        tabular_features: torch.Tensor,
        logits: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Sample hard negatives, fuse the 3B pairs and score them.

        Args:
            fuse: ``fuse(image_tokens (3B, N, C), tabular_features (3B, F)) -> (3B, dim)``.
            image_tokens: (B, N, C) image feature tokens, row i = subject i.
            tabular_features: (B, F) tabular features, row i = subject i.
            logits: (B, B) ITC logits, images in rows, tables in columns (``ClipLoss``'s
                ``local_logits``); only used to sample negatives, no gradient flows into them.
            generator: optional ``torch.Generator`` for the negative draws.

        Returns:
            Dict with ``loss`` (scalar), ``accuracy`` (float scalar, detached), ``logits_itm``
            (3B, 2), ``labels`` (3B,): B ones then 2B zeros, ``negative_tables`` (B,): the table
            paired with image i, ``negative_images`` (B,): the image paired with table i. The
            pairs are ordered: positives, (image i, negative table), (negative image, table i).

        Raises:
            ValueError: on inconsistent batch sizes, non-square logits, B < 2, or a ``fuse``
                output that is not (3B, dim).
        """
        if not isinstance(image_tokens, torch.Tensor) or image_tokens.ndim < 2:
            raise ValueError(f"image_tokens must be a (B, N, C) tensor, got {_shape(image_tokens)}")
        if not isinstance(tabular_features, torch.Tensor) or tabular_features.ndim < 2:
            raise ValueError(f"tabular_features must be a (B, F) tensor, got {_shape(tabular_features)}")
        b = image_tokens.shape[0]
        if tabular_features.shape[0] != b:
            raise ValueError(
                f"image_tokens {tuple(image_tokens.shape)} and tabular_features "
                f"{tuple(tabular_features.shape)} must have the same batch size"
            )
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (b, b):
            raise ValueError(f"logits must be ({b}, {b}) for a batch of {b}, got {_shape(logits)}")

        negative_tables = sample_hard_negatives(logits, generator)
        negative_images = sample_hard_negatives(logits.T, generator)
        images = torch.cat([image_tokens, image_tokens, image_tokens[negative_images]], dim=0)
        tables = torch.cat([tabular_features, tabular_features[negative_tables], tabular_features], dim=0)
        fused = fuse(images, tables)
        if not isinstance(fused, torch.Tensor) or tuple(fused.shape) != (3 * b, self.dim):
            raise ValueError(f"fuse must return ({3 * b}, {self.dim}) for 3B = {3 * b} pairs, got {_shape(fused)}")

        logits_itm = self.head(fused)
        labels = torch.zeros(3 * b, dtype=torch.long, device=fused.device)
        labels[:b] = 1
        loss = F.cross_entropy(logits_itm, labels)
        accuracy = (logits_itm.detach().argmax(dim=1) == labels).float().mean()
        return {
            "loss": loss,
            "accuracy": accuracy,
            "logits_itm": logits_itm,
            "labels": labels,
            "negative_tables": negative_tables,
            "negative_images": negative_images,
        }


# ----------------------------------------------------------------------------- survival losses (P4)


def _check_finite(name: str, x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} must be finite, got NaN or inf in a tensor of shape {tuple(x.shape)}")


def _check_event(event: object, b: int) -> torch.Tensor:
    """``event`` as a (B,) bool tensor; ValueError unless it is (B,) with values in {0, 1}."""
    if not isinstance(event, torch.Tensor) or tuple(event.shape) != (b,):
        raise ValueError(f"event must be a ({b},) tensor for a batch of {b}, got {_shape(event)}")
    if event.dtype != torch.bool:
        if event.is_floating_point() and not torch.isfinite(event).all():
            raise ValueError(f"event must be finite 0/1 values, got NaN or inf (shape {tuple(event.shape)})")
        if not ((event == 0) | (event == 1)).all():
            bad = event[(event != 0) & (event != 1)][0].item()
            raise ValueError(f"event must hold only 0/1 (or bool) values, got {bad}")
    return event.bool()


def _segment_logsumexp(
    values: torch.Tensor, segment: torch.Tensor, n_segments: int, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable ``log(sum(exp(values[k])))`` over the k with ``mask[k]`` in each segment.

    Returns ``(lse, nonempty)``: (n_segments,) values and a bool mask of segments that have at least one
    masked member; empty segments get 0 (not ``-inf``), so that no NaN can reach the gradient.
    """
    seg = segment[mask]
    vals = values[mask]
    peak = torch.zeros(n_segments, dtype=values.dtype, device=values.device)
    peak = peak.scatter_reduce(0, seg, vals.detach(), reduce="amax", include_self=False)
    total = torch.zeros(n_segments, dtype=values.dtype, device=values.device)
    total = total.scatter_add(0, seg, torch.exp(vals - peak[seg]))
    nonempty = torch.zeros(n_segments, dtype=torch.bool, device=values.device)
    nonempty[seg] = True
    total = torch.where(nonempty, total, torch.ones_like(total))
    return torch.log(total) + peak, nonempty


def cox_ph_loss(
    risk: torch.Tensor,
    time: torch.Tensor,
    event: torch.Tensor,
    *,
    ties: str = "efron",
    reduction: str = "mean",
) -> torch.Tensor:
    """Negative log partial likelihood of a Cox proportional-hazards model on one batch.

    Sample i has log-hazard ``eta_i = risk[i]`` (higher = earlier event). For each distinct event
    time t let D(t) be the d samples with an event at t and R(t) = {j : time_j >= t} its risk set
    (every sample still under observation at t, the tied events and samples censored at t
    included). With ``S_R = sum_{j in R} exp(eta_j)`` and ``S_D = sum_{i in D} exp(eta_i)``:

    - Breslow: ``log L = sum_t [ sum_{i in D} eta_i - d log S_R ]``.
    - Efron: ``log L = sum_t [ sum_{i in D} eta_i - sum_{l=0}^{d-1} log(S_R - (l/d) S_D) ]``.
      Both agree when no event times are tied.

    Computed in ``risk``'s dtype without exponentiating raw scores: samples are sorted by time
    (descending), risk-set log-sums come from ``logcumsumexp`` over the groups of equal times,
    and Efron's factor is ``log S_R + log1p(-(l/d) S_D / S_R)`` with ``S_D / S_R`` in (0, 1]. Cost
    O(B log B). Only the order of the times matters (ties are exact float equality).

    Args:
        risk: (B,) or (B, 1) log-hazard scores.
        time: (B,) event or censoring times, finite and >= 0 (only their order is used).
        event: (B,) bool or 0/1: 1 = event observed at ``time``, 0 = censored at ``time``.
        ties: ``"efron"`` (default) or ``"breslow"``.
        reduction: ``"mean"`` (the sum divided by the number of events), ``"sum"``, or
            ``"none"``: a (B,) tensor in input order holding each event's own term of ``-log L``
            (Efron: its share ``log(S_R - (l/d) S_D) - eta_i`` with l its rank among the tied
            events, in input order) and 0 for censored samples; it sums to the ``"sum"`` loss.

    Returns:
        The loss (scalar, or (B,) for ``"none"``). A batch without events (an empty batch
        included) has no partial likelihood: the result is ``risk.sum() * 0`` (or ``risk * 0``),
        zero, still attached to the graph, with zero gradient. A single event alone in its risk
        set contributes 0.

    Raises:
        ValueError: on a bad shape, NaN or inf in ``risk`` or ``time``, negative ``time``,
            ``event`` values other than 0/1, or an unknown ``ties`` or ``reduction``.
    """
    if ties not in ("efron", "breslow"):
        raise ValueError(f"ties must be 'efron' or 'breslow', got {ties!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not isinstance(risk, torch.Tensor) or not (
        risk.ndim == 1 or (risk.ndim == 2 and risk.shape[1] == 1)
    ):
        raise ValueError(f"risk must be a (B,) or (B, 1) tensor, got {_shape(risk)}")
    if not risk.is_floating_point():
        raise ValueError(f"risk must be a floating-point tensor, got dtype {risk.dtype}")
    eta = risk.reshape(-1)
    b = eta.shape[0]
    if not isinstance(time, torch.Tensor) or tuple(time.shape) != (b,):
        raise ValueError(f"time must be a ({b},) tensor for a batch of {b}, got {_shape(time)}")
    ev = _check_event(event, b)
    _check_finite("risk", eta)
    _check_finite("time", time.float() if not time.is_floating_point() else time)
    if (time < 0).any():
        raise ValueError(f"time must be >= 0, got minimum {time.min().item()}")

    ev = ev.to(eta.device)
    n_events = int(ev.sum())
    if n_events == 0:
        return eta * 0 if reduction == "none" else eta.sum() * 0

    order = torch.argsort(time.to(eta.device), descending=True, stable=True)
    t_s, eta_s, ev_s = time.to(eta.device)[order], eta[order], ev[order]
    _, group, counts = torch.unique_consecutive(t_s, return_inverse=True, return_counts=True)
    n_groups = counts.shape[0]

    everyone = torch.ones_like(ev_s)
    lse_group, _ = _segment_logsumexp(eta_s, group, n_groups, everyone)
    log_sr = torch.logcumsumexp(lse_group, dim=0)  # (G,): log S_R of each distinct time, latest first
    term = log_sr[group] - eta_s  # Breslow term of every sample (used for events only)

    if ties == "efron":
        lse_events, _ = _segment_logsumexp(eta_s, group, n_groups, ev_s)
        ev_long = ev_s.long()
        d = torch.zeros(n_groups, dtype=torch.long, device=eta.device).scatter_add(0, group, ev_long)
        events_before_group = torch.cumsum(d, 0) - d
        rank = torch.cumsum(ev_long, 0) - 1 - events_before_group[group]  # l among the tied events
        frac = rank.to(eta.dtype) / d[group].clamp_min(1).to(eta.dtype)
        ratio = torch.exp(lse_events - log_sr)[group]  # S_D / S_R in (0, 1]
        term = term + torch.log1p(-(frac * ratio).clamp(max=1.0))
        # frac <= (d-1)/d < 1, so the clamp only guards against rounding in ratio.

    per_sorted = torch.where(ev_s, term, torch.zeros_like(term))
    if reduction == "none":
        return torch.zeros_like(per_sorted).scatter(0, order, per_sorted)
    total = per_sorted.sum()
    return total / n_events if reduction == "mean" else total


def discrete_time_nll(
    logits: torch.Tensor,
    bin_index: torch.Tensor,
    event: torch.Tensor,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """Negative log-likelihood of discrete-time survival with logistic hazards (Nnet-survival / LogisticHazard).

    Follow-up is split into K intervals (see :func:`discretize_times`) and ``h_i = sigmoid(logits[:, i])``
    is the probability of the event in interval i given survival to its start. For a sample whose
    event or censoring time falls in interval j:

    - event in j: ``-[log h_j + sum_{i<j} log(1 - h_i)]`` (survived intervals 0..j-1, event in j);
    - censored in j: ``-sum_{i<=j} log(1 - h_i)``: censoring is treated as happening at the END of
      interval j, so the sample counts as having survived interval j too.

    Equivalently, binary cross-entropy of the hazards against target 0 before j and ``event`` at
    j, with the intervals after j masked out. ``log h = logsigmoid(z)`` and
    ``log(1 - h) = logsigmoid(-z)`` keep every value and gradient finite for finite logits.

    Args:
        logits: (B, K) hazard logits, K >= 1.
        bin_index: (B,) integer tensor, the interval j of each sample's event or censoring time,
            ``0 <= j < K``.
        event: (B,) bool or 0/1 (1 = event in interval j, 0 = censored in it).
        reduction: ``"mean"`` over the B samples, ``"sum"``, or ``"none"`` ((B,) per sample).

    Returns:
        The loss: a scalar, or (B,) for ``"none"``.

    Raises:
        ValueError: on a bad shape or dtype, non-finite logits, ``bin_index`` outside
            ``[0, K)``, ``event`` values other than 0/1, or an unknown ``reduction``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be a (B, K) tensor with K >= 1, got {_shape(logits)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    b, k = logits.shape
    if not isinstance(bin_index, torch.Tensor) or tuple(bin_index.shape) != (b,):
        raise ValueError(f"bin_index must be a ({b},) tensor for logits {tuple(logits.shape)}, got {_shape(bin_index)}")
    if bin_index.is_floating_point() or bin_index.is_complex() or bin_index.dtype == torch.bool:
        raise ValueError(f"bin_index must be an integer tensor, got dtype {bin_index.dtype}")
    if b and (bin_index.min() < 0 or bin_index.max() >= k):
        raise ValueError(
            f"bin_index must lie in [0, {k}) for K={k} intervals, got range "
            f"[{bin_index.min().item()}, {bin_index.max().item()}]"
        )
    ev = _check_event(event, b).to(logits.device)
    _check_finite("logits", logits)

    j = bin_index.to(logits.device).long()
    log_survive = F.logsigmoid(-logits)  # log(1 - h_i)
    before = torch.arange(k, device=logits.device)[None, :] < j[:, None]
    survived = (log_survive * before).sum(dim=1)  # sum_{i<j} log(1 - h_i)
    z_j = logits.gather(1, j[:, None]).squeeze(1)
    last = torch.where(ev, F.logsigmoid(z_j), F.logsigmoid(-z_j))  # event: log h_j, censored: log(1 - h_j)
    per_sample = -(survived + last)
    if reduction == "none":
        return per_sample
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def discretize_times(time: torch.Tensor, cuts: torch.Tensor | list[float]) -> torch.Tensor:
    """Interval index of each time for K+1 increasing cut points ``c_0 < c_1 < ... < c_K`` (K intervals).

    Intervals are closed on the right: interval j is ``(c_j, c_{j+1}]``, so a time exactly on
    the cut ``c_{j+1}`` belongs to interval j (it ends that interval; with
    :func:`discrete_time_nll` a censoring there counts as surviving interval j, an event there
    happens in it). The first interval also takes ``c_0`` itself and any time below it (index 0);
    times beyond the last cut ``c_K`` go to the last interval (index K-1).

    Args:
        time: tensor of event or censoring times (any shape), finite.
        cuts: 1-D strictly increasing tensor or list of K+1 >= 2 finite cut points. A list is
            built in ``time``'s dtype, so that equal values compare equal.

    Returns:
        Long tensor of ``time``'s shape with values in ``[0, K)``.

    Raises:
        ValueError: if ``cuts`` is not 1-D with at least 2 finite strictly increasing values, or
            ``time`` holds NaN or inf.
    """
    t = torch.as_tensor(time)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    c = cuts if isinstance(cuts, torch.Tensor) else torch.as_tensor(cuts, dtype=t.dtype)
    if c.ndim != 1 or c.shape[0] < 2:
        raise ValueError(f"cuts must be 1-D with at least 2 values (K+1 cut points), got shape {tuple(c.shape)}")
    if not c.is_floating_point():
        c = c.to(torch.float64)
    _check_finite("cuts", c)
    if not (c[1:] > c[:-1]).all():
        raise ValueError(f"cuts must be strictly increasing, got {c.tolist()}")
    _check_finite("time", t)
    dtype = torch.promote_types(t.dtype, c.dtype)
    t, c = t.to(dtype), c.to(device=t.device, dtype=dtype)
    k = c.shape[0] - 1
    idx = torch.searchsorted(c, t.contiguous(), right=False)  # number of cuts strictly below t
    return (idx - 1).clamp(0, k - 1).long()


# --------------------------------------------------------------------------- tri-modal contrast (P3)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """One direction of InfoNCE: each row ``a_i`` must pick its partner ``b_i`` among all rows of ``b``.

    ``mean_i -log softmax_j(cos(a_i, b_j) / tau)[i]``: cross-entropy of :func:`clip_logits`
    ``(a, b, tau)`` against the targets ``arange(B)``, on L2-normalised embeddings. The other
    direction is ``info_nce(b, a, tau)``.

    Args:
        a: (B, D) queries.
        b: (B, D) keys, row i paired with ``a[i]``.
        temperature: positive float or scalar tensor (a tensor keeps its gradient).

    Returns:
        Scalar loss.

    Raises:
        ValueError: if ``a`` and ``b`` are not (B, D) tensors of one shape with B >= 1, or a float
            temperature is not positive.
    """
    for name, z in (("a", a), ("b", b)):
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[0] < 1:
            raise ValueError(f"info_nce expects {name} of shape (B, D) with B >= 1, got {_shape(z)}")
    if a.shape != b.shape:
        raise ValueError(
            f"info_nce needs paired embeddings of one shape, got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    logits = clip_logits(a, b, temperature)
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


class TriModalLoss(nn.Module):
    """MoRE's contrastive loss between reports and two signal modalities (P3: chest X-ray and 12-lead ECG).

    ``loss = 1/2 L(text, xray) + 1/2 L(text, ecg)`` with the symmetric InfoNCE
    ``L(t, x) = 1/2 [info_nce(t, x) + info_nce(x, t)]``, the *mean* of the two directions
    (text -> signal and signal -> text). The X-ray and ECG embeddings are contrasted with the
    text only, never with each other. With ``xray=None`` or ``ecg=None`` the loss is the one
    remaining term (the "two vs three modalities" ablation).

    Temperature: MoRE's public code uses tau = 0.02 and declares it learnable but never updates
    it, so it is effectively fixed. ``learnable=False`` stores ``log(1 / tau)`` as a buffer (saved
    in the state dict, seen by no optimizer, so it never changes); ``learnable=True`` makes it a
    parameter and, as CLIP does, clamps the scale ``1 / tau`` to ``[1, max_logit_scale]`` in the
    forward pass (no gradient once clamped). Either way the state-dict key is ``log_logit_scale``.

    Under ``torch.distributed`` (world size W > 1, ``gather=True``) the embeddings are
    all-gathered as :class:`ClipLoss` does: rank r contrasts its B reports against all W*B
    signals and its B signals against all W*B reports, so the mean of the per-rank losses is the
    single-process loss of the global batch and, with ``gather_with_grad``, DDP's averaged
    gradient is that loss's gradient. Every rank must pass the same batch size.

    Args:
        temperature: tau (MoRE: 0.02), or the initial value when learnable.
        learnable: learn ``log(1 / tau)``.
        max_logit_scale: upper bound on ``1 / tau`` when learnable (CLIP: 100).
        gather: gather the global batch under ``torch.distributed`` (ignored on one process and
            inside :func:`local_only`).
        gather_with_grad: see :class:`ClipLoss`.

    Raises:
        ValueError: if ``temperature`` or ``max_logit_scale`` is not positive, or a learnable
            temperature would start clamped (``1 / tau`` outside ``[1, max_logit_scale]``).
    """

    def __init__(self, temperature: float = 0.02, learnable: bool = False, max_logit_scale: float = 100.0,
                 gather: bool = True, *, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.gather, self.gather_with_grad = bool(gather), bool(gather_with_grad)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not max_logit_scale >= 1:
            raise ValueError(f"max_logit_scale must be >= 1, got {max_logit_scale}")
        if learnable and not 1.0 <= 1.0 / temperature <= max_logit_scale:
            raise ValueError(
                f"learnable temperature={temperature} gives logit scale {1.0 / temperature:g} outside "
                f"[1, max_logit_scale={max_logit_scale:g}]: it would start clamped and never be learnt"
            )
        self.learnable = bool(learnable)
        self.max_logit_scale = float(max_logit_scale)
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if self.learnable:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)

    def logit_scale(self) -> torch.Tensor:
        """``1 / tau`` as a scalar tensor (clamped to ``[1, max_logit_scale]`` and differentiable when learnable)."""
        scale = self.log_logit_scale.exp()
        return scale.clamp(1.0, self.max_logit_scale) if self.learnable else scale

    def forward(
        self,
        text: torch.Tensor,
        xray: torch.Tensor | None = None,
        ecg: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss of B paired (report, X-ray, ECG) embeddings (row i of each is study i).

        Args:
            text: (B, D) report embeddings (projected).
            xray: (B, D) X-ray embeddings, or None to leave the X-ray term out.
            ecg: (B, D) ECG embeddings, or None to leave the ECG term out.

        Returns:
            Dict with ``loss`` (scalar), ``text_xray`` and ``text_ecg`` (the symmetric InfoNCE of
            each pair; a key is absent when its modality is None) and ``temperature`` (detached
            scalar float tensor).

        Raises:
            ValueError: if both ``xray`` and ``ecg`` are None, or the given embeddings are not
                (B, D) tensors of one shape with B >= 1.
        """
        if not isinstance(text, torch.Tensor) or text.ndim != 2 or text.shape[0] < 1:
            raise ValueError(f"TriModalLoss expects text of shape (B, D) with B >= 1, got {_shape(text)}")
        if xray is None and ecg is None:
            raise ValueError("TriModalLoss needs xray, ecg or both, got neither")
        for name, z in (("xray", xray), ("ecg", ecg)):
            if z is not None and (not isinstance(z, torch.Tensor) or z.shape != text.shape):
                raise ValueError(
                    f"TriModalLoss expects {name} of the text's shape {tuple(text.shape)}, got {_shape(z)}"
                )
        temperature = 1.0 / self.logit_scale().to(device=text.device, dtype=text.dtype)
        rank, world = collective_world()
        gathered = self.gather and world > 1
        b = text.shape[0]
        labels = torch.arange(b, device=text.device) + (rank * b if gathered else 0)
        gather = GatherWithGrad.apply if self.gather_with_grad else gather_local_slot
        all_text = gather(text) if gathered else None
        out: dict[str, torch.Tensor] = {}
        for key, z in (("text_xray", xray), ("text_ecg", ecg)):
            if z is None:
                continue
            if gathered:  # local rows against the global batch, in both directions
                to_signal = clip_logits(text, gather(z), temperature)
                to_text = clip_logits(z, all_text, temperature)
            else:
                to_signal = clip_logits(text, z, temperature)  # text -> signal rows; its transpose: signal -> text
                to_text = to_signal.T
            out[key] = 0.5 * F.cross_entropy(to_signal, labels) + 0.5 * F.cross_entropy(to_text, labels)
        terms = list(out.values())
        loss = terms[0] if len(terms) == 1 else 0.5 * terms[0] + 0.5 * terms[1]
        return {"loss": loss, **out, "temperature": temperature.detach().float()}
