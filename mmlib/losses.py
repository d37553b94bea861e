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
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ClipLoss", "ImageTabularMatchingLoss", "clip_logits", "sample_hard_negatives"]

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


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradients of all ranks into the local slice.

    Each rank's loss uses the other ranks' embeddings as negatives; summing the gradient of the
    gathered tensor over ranks (all_reduce) gives every local embedding the gradient of all
    ranks' losses, so that DDP's averaging yields exactly the gradient of the global-batch loss.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.batch = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def _gather_local_slot(x: torch.Tensor) -> torch.Tensor:
    """open_clip's gather (``gather_with_grad=False``): no-grad all_gather, local tensor put back in its slot."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


def _distributed_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
        rank, world = _distributed_world()
        if self.gather and world > 1:
            gather = _GatherWithGrad.apply if self.gather_with_grad else _gather_local_slot
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
