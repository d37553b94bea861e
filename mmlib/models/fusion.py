"""Time-to-event fusion of frozen CT and EHR embeddings (P4: "Fusion is not one-size-fits-all").

P4 encodes a CT volume and a longitudinal EHR independently with frozen foundation models and
compares four ways of fusing the two embeddings for time-to-event prediction ("late fusion,
contrastive alignment, cross-attention, and co-attention", abstract) against unimodal
baselines. The encoders are not part of these modules: the inputs are the precomputed
embeddings, and every module maps them to a log-hazard score, so that a Cox partial likelihood
(or any other survival loss) is applied by the caller.

- :class:`UnimodalSurvival`: one modality, masked mean over its tokens, MLP -> risk. The
  unimodal baseline and the branch of late fusion.
- :class:`LateFusion`: one :class:`UnimodalSurvival` per modality; the risk is a learned
  weighted sum of the unimodal risks (weights start equal).
- :class:`ContrastiveFusion`: both pooled modalities are projected to a shared space; the risk
  comes from an MLP on the concatenated projections, and the symmetric InfoNCE between the two
  projections (:class:`mmlib.losses.ClipLoss`) is returned for the caller to add to the
  survival loss with a weight.
- :class:`CrossAttentionFusion`: one modality's tokens (the queries) attend to the other's
  (keys and values) in a pre-LN block; the updated query tokens are pooled -> risk.
- :class:`CoAttentionFusion`: each modality attends to the other (two cross-attentions in
  parallel), the two pooled streams are concatenated -> risk; ``guided_by`` gives the
  one-sided "image-guided" variant (see the class docstring for what that means here).

Batches are dicts keyed by modality name (P4: ``"ct"`` and ``"ehr"``)::

    {"ct": (B, Nc, Dc) tokens or (B, Dc) pooled,
     "ehr": (B, Ne, De) tokens (e.g. one per visit) or (B, De) pooled,
     "ehr_mask": optional (B, Ne) bool, True = padding}

A ``"<key>_mask"`` entry works for any modality given as tokens (a (B, D) input is one token and
takes no mask). Padded tokens never reach the output: they are zeroed on entry (so NaN or
infinite padding values are harmless), excluded from every pooling and masked out as attention
keys. A sample whose tokens are all padding pools to zeros, and as a key set it contributes
nothing (its attention update is zero, its attention weights are all zero).

Every module returns at least ``{"risk": (B,)}``; the extra outputs are listed per class.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mmlib.core import positive_int
from mmlib.losses import ClipLoss
from mmlib.models.clip import ProjectionHead

__all__ = [
    "CoAttentionFusion",
    "ContrastiveFusion",
    "CrossAttentionBlock",
    "CrossAttentionFusion",
    "LateFusion",
    "UnimodalSurvival",
    "feed_forward",
    "masked_mean",
]


# --------------------------------------------------------------------------- helpers


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the token axis, leaving out padded tokens.

    Args:
        x: (B, N, D) tokens.
        mask: optional (B, N) bool, True = padding. A row of all padding gives zeros.

    Returns:
        (B, D); padded tokens (whatever their values, NaN included) do not enter the mean.
    """
    if mask is None:
        return x.mean(dim=1)
    pad = mask.unsqueeze(-1)
    count = (~pad).sum(dim=1).clamp(min=1).to(x.dtype)
    return x.masked_fill(pad, 0.0).sum(dim=1) / count


def _check_dims(dims: Mapping[str, int], owner: str, count: int | None) -> dict[str, int]:
    """Validated ``{name: width}``; ``count`` = the number of modalities required (None: two or more)."""
    if not isinstance(dims, Mapping):
        raise ValueError(f"{owner} expects dims as a mapping modality -> embedding width, got {type(dims).__name__}")
    out: dict[str, int] = {}
    for name, d in dims.items():
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"{owner}: modality names must be non-empty strings without '.', got {name!r}")
        width = positive_int(d)
        if width is None:
            raise ValueError(f"{owner}: dims[{name!r}] must be a positive integer, got {d!r}")
        out[name] = width
    if count is not None and len(out) != count:
        noun = "modality" if count == 1 else "modalities"
        raise ValueError(f"{owner} takes exactly {count} {noun}, got dims for {list(out)}")
    if count is None and len(out) < 2:
        raise ValueError(f"{owner} fuses at least two modalities, got dims for {list(out)}")
    return out


def _check_positive(owner: str, **values: float) -> None:
    for name, v in values.items():
        if not v > 0:
            raise ValueError(f"{owner}: {name} must be positive, got {v!r}")


def _check_dropout(owner: str, dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{owner}: dropout must be in [0, 1), got {dropout!r}")


def _tokens(
    batch: Mapping[str, torch.Tensor], key: str, dim: int, owner: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``batch[key]`` as (B, N, dim) tokens with padding zeroed, and its (B, N) mask or None."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"{owner} expects a dict batch, got {type(batch).__name__}")
    if key not in batch:
        raise ValueError(f"{owner} needs batch key {key!r} (present: {sorted(map(str, batch))})")
    x = batch[key]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim not in (2, 3) or x.shape[-1] != dim:
        raise ValueError(
            f"{owner} expects batch[{key!r}] of shape (B, N, {dim}) tokens or (B, {dim}) pooled "
            f"floats, got {_shape(x)}" + (f" {x.dtype}" if isinstance(x, torch.Tensor) else "")
        )
    mask = batch.get(f"{key}_mask")
    if x.ndim == 2:
        if mask is not None:
            raise ValueError(
                f"{owner}: batch[{key + '_mask'!r}] is given but batch[{key!r}] {tuple(x.shape)} is pooled "
                "(one token per sample, nothing to pad)"
            )
        return x.unsqueeze(1), None
    if x.shape[1] == 0:
        raise ValueError(f"{owner}: batch[{key!r}] has no tokens, shape {tuple(x.shape)}")
    if mask is None:
        return x, None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"{owner} expects batch[{key + '_mask'!r}] as a bool tensor of shape {tuple(x.shape[:2])} "
            f"(True = padding), got {_shape(mask)}" + (f" {mask.dtype}" if isinstance(mask, torch.Tensor) else "")
        )
    return x.masked_fill(mask.unsqueeze(-1), 0.0), mask


def _same_batch(owner: str, **tensors: torch.Tensor) -> None:
    sizes = {k: v.shape[0] for k, v in tensors.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{owner}: the modalities have different batch sizes {sizes}")


class _RiskHead(nn.Module):
    """Linear(in -> hidden) -> ReLU -> Dropout -> Linear(hidden -> 1): a (B, in) vector -> (B,) log-hazard."""

    def __init__(self, in_features: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


# --------------------------------------------------------------------------- unimodal and late fusion


class UnimodalSurvival(nn.Module):
    """Unimodal survival model on one frozen embedding: masked mean over tokens -> MLP -> risk.

    P4's unimodal baselines (CT only, EHR only) and the branches of :class:`LateFusion`.

    Args:
        key: the batch key of the modality (``"ct"``, ``"ehr"``); ``"<key>_mask"`` is its padding mask.
        dim: embedding width D of the modality.
        hidden: width of the MLP's hidden layer.
        dropout: dropout after the hidden layer.

    Raises:
        ValueError: on a non-positive ``dim`` or ``hidden``, or a dropout outside [0, 1).
    """

    def __init__(self, key: str, dim: int, hidden: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.key, self.dim = key, _check_dims({key: dim}, "UnimodalSurvival", count=1)[key]
        _check_positive("UnimodalSurvival", hidden=hidden)
        _check_dropout("UnimodalSurvival", dropout)
        self.head = _RiskHead(self.dim, hidden, dropout)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Score one modality.

        Args:
            batch: ``batch[key]`` (B, N, dim) or (B, dim), optional ``batch[key + "_mask"]`` (B, N) bool.

        Returns:
            ``risk`` (B,) log-hazard score; ``pooled`` (B, dim), the masked mean of the tokens.

        Raises:
            ValueError: if the key is missing or the embedding or mask has the wrong shape.
        """
        x, mask = _tokens(batch, self.key, self.dim, "UnimodalSurvival")
        pooled = masked_mean(x, mask)
        return {"risk": self.head(pooled), "pooled": pooled}


class LateFusion(nn.Module):
    """Late fusion: a learned weighted sum of unimodal risk scores (P4: "late fusion").

    ``risk = sum_m weights[m] * risk_m`` where ``risk_m`` is the output of modality m's
    :class:`UnimodalSurvival`. The weights are unconstrained (a Cox model is invariant to a shift
    of the risk but not to its scale, so the sum is not normalised) and start equal at ``1 / M``,
    i.e. at the mean of the unimodal risks. Branches trained alone can be combined with
    :meth:`from_unimodal` and then only the weights fitted.

    Args:
        dims: modality name -> embedding width, at least two (P4: ``{"ct": Dc, "ehr": De}``).
        hidden: hidden width of each branch's MLP.
        dropout: dropout of each branch's MLP.

    Attributes:
        modalities: the modality names in the order of ``dims`` (the order of ``weights``).
        branches: ``nn.ModuleDict`` modality -> :class:`UnimodalSurvival`.
        weights: (M,) learnable fusion weights.
    """

    def __init__(self, dims: Mapping[str, int], hidden: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        dims = _check_dims(dims, "LateFusion", count=None)
        self.modalities = tuple(dims)
        self.branches = nn.ModuleDict({m: UnimodalSurvival(m, d, hidden, dropout) for m, d in dims.items()})
        self.weights = nn.Parameter(torch.full((len(dims),), 1.0 / len(dims)))

    @classmethod
    def from_unimodal(cls, branches: Mapping[str, UnimodalSurvival]) -> LateFusion:
        """Late fusion of already built (e.g. separately trained) unimodal models, used as they are.

        Args:
            branches: modality name -> :class:`UnimodalSurvival` whose ``key`` is that name.

        Raises:
            ValueError: on fewer than two branches, a non-:class:`UnimodalSurvival` value or a key mismatch.
        """
        for name, branch in branches.items():
            if not isinstance(branch, UnimodalSurvival) or branch.key != name:
                raise ValueError(f"LateFusion.from_unimodal: branches[{name!r}] must be a UnimodalSurvival "
                                 f"with key {name!r}, got {branch!r}")
        model = cls({m: b.dim for m, b in branches.items()}, hidden=1, dropout=0.0)
        model.branches = nn.ModuleDict(dict(branches))
        return model

    def modality_weights(self) -> dict[str, float]:
        """The current fusion weights by modality name."""
        return {m: float(w) for m, w in zip(self.modalities, self.weights.detach())}

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Score every modality and combine the scores.

        Args:
            batch: one entry per modality (tokens or pooled) plus optional ``"<key>_mask"`` entries.

        Returns:
            ``risk`` (B,), the weighted sum; ``risks``: dict modality -> (B,) unimodal risk.

        Raises:
            ValueError: if a modality is missing or malformed, or the batch sizes differ.
        """
        risks = {m: self.branches[m](batch)["risk"] for m in self.modalities}
        _same_batch("LateFusion", **risks)
        risk = sum(w * risks[m] for w, m in zip(self.weights, self.modalities))
        return {"risk": risk, "risks": risks}


# --------------------------------------------------------------------------- contrastive fusion


class ContrastiveFusion(nn.Module):
    """Contrastive alignment + survival head (P4: "contrastive alignment").

    Each modality is pooled (masked mean over tokens), projected to ``proj_dim`` by a
    :class:`mmlib.models.clip.ProjectionHead` (Linear -> ReLU -> Linear); the risk is an MLP on
    the concatenated projections. ``contrastive`` is the symmetric InfoNCE between the two
    projections over the batch (:class:`mmlib.losses.ClipLoss`: cosine similarities over
    ``temperature``, cross-entropy against the matching pair in both directions, weights 0.5),
    which the caller adds to the survival loss::

        out = model(batch)
        loss = cox_loss(out["risk"], time, event) + lam * out["contrastive"]

    With a batch of one there are no negatives: ``contrastive`` is then 0 (a constant with no
    gradient), not the degenerate ``log 1 = 0`` computed through the loss. Under
    ``torch.distributed`` the loss is computed on each process's batch (no gathering).

    Args:
        dims: the two modalities' embedding widths, e.g. ``{"ct": Dc, "ehr": De}``; the first
            plays the "image" role of :class:`ClipLoss` (the loss is symmetric).
        proj_dim: width of the shared space.
        temperature: InfoNCE temperature.
        proj_hidden: hidden width of the projection heads (default: each modality's width).
        hidden: hidden width of the risk MLP.
        dropout: dropout of the risk MLP.
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        proj_dim: int = 64,
        temperature: float = 0.1,
        *,
        proj_hidden: int | None = None,
        hidden: int = 64,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        dims = _check_dims(dims, "ContrastiveFusion", count=2)
        _check_positive("ContrastiveFusion", proj_dim=proj_dim, hidden=hidden, temperature=temperature)
        _check_dropout("ContrastiveFusion", dropout)
        self.dims, self.modalities = dims, tuple(dims)
        self.projections = nn.ModuleDict({m: ProjectionHead(d, proj_hidden, proj_dim) for m, d in dims.items()})
        self.head = _RiskHead(2 * proj_dim, hidden, dropout)
        self.clip_loss = ClipLoss(temperature=temperature, gather=False)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Project both modalities, score the pair and contrast the projections.

        Args:
            batch: both modalities (tokens or pooled) plus optional ``"<key>_mask"`` entries.

        Returns:
            ``risk`` (B,); ``contrastive`` (scalar) symmetric InfoNCE, 0 for B = 1;
            ``<key>_embedding`` (B, proj_dim) per modality, not normalised.

        Raises:
            ValueError: if a modality is missing or malformed, or the batch sizes differ.
        """
        z = {}
        for m in self.modalities:
            x, mask = _tokens(batch, m, self.dims[m], "ContrastiveFusion")
            z[m] = self.projections[m](masked_mean(x, mask))
        _same_batch("ContrastiveFusion", **z)
        a, b = (z[m] for m in self.modalities)
        contrastive = self.clip_loss(a, b)["loss"] if a.shape[0] > 1 else a.new_zeros(())
        out = {"risk": self.head(torch.cat([a, b], dim=1)), "contrastive": contrastive}
        out.update({f"{m}_embedding": z[m] for m in self.modalities})
        return out


# --------------------------------------------------------------------------- attention fusion


def feed_forward(dim: int, mlp_ratio: int, dropout: float) -> nn.Sequential:
    """The transformer blocks' MLP: Linear -> GELU -> Dropout -> Linear -> Dropout, ``mlp_ratio * dim`` hidden."""
    return nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(mlp_ratio * dim, dim), nn.Dropout(dropout))


class CrossAttentionBlock(nn.Module):
    """Pre-LN cross-attention block: ``x <- x + Attn(LN(x), LN(c)); x <- x + MLP(LN(x))``.

    Queries come from ``x``, keys and values from the context ``c`` (torch
    ``nn.MultiheadAttention``; padded context tokens are masked out as keys). The MLP is
    Linear -> GELU -> Linear with ``mlp_ratio * dim`` hidden units. No dropout is applied to the
    attention weights, so the returned weights are those used and each row sums to 1 over the
    unpadded keys; ``dropout`` acts on the attention output and in the MLP. A sample whose
    context is all padding gets a zero attention update (and all-zero weights) instead of NaN.

    Args:
        dim: token width.
        heads: attention heads (``dim`` must be divisible by ``heads``).
        mlp_ratio: MLP hidden width over ``dim``.
        dropout: dropout on the attention output and in the MLP.
    """

    def __init__(self, dim: int, heads: int = 4, mlp_ratio: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        _check_positive("CrossAttentionBlock", dim=dim, heads=heads, mlp_ratio=mlp_ratio)
        _check_dropout("CrossAttentionBlock", dropout)
        if dim % heads:
            raise ValueError(f"CrossAttentionBlock: dim ({dim}) must be divisible by heads ({heads})")
        self.dim, self.heads = dim, heads
        self.norm_query = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = feed_forward(dim, mlp_ratio, dropout)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the query tokens with what they attend to in the context.

        Args:
            x: (B, Nq, dim) query tokens.
            context: (B, Nk, dim) key/value tokens.
            context_mask: optional (B, Nk) bool, True = padding (never attended to).

        Returns:
            The updated queries (B, Nq, dim) and the attention weights (B, heads, Nq, Nk).
        """
        c = self.norm_context(context)
        empty = None
        if context_mask is not None:
            empty = context_mask.all(dim=1)  # (B,): nothing to attend to
            context_mask = context_mask & ~empty.unsqueeze(1)  # unmask those rows to avoid NaN, zeroed below
        update, weights = self.attn(self.norm_query(x), c, c, key_padding_mask=context_mask,
                                    need_weights=True, average_attn_weights=False)
        if empty is not None:
            update = update.masked_fill(empty[:, None, None], 0.0)
            weights = weights.masked_fill(empty[:, None, None, None], 0.0)
        x = x + self.drop(update)
        return x + self.mlp(self.norm_mlp(x)), weights


def _parse_direction(direction: str, modalities: tuple[str, ...], owner: str) -> tuple[str, str]:
    parts = direction.split("->") if isinstance(direction, str) else []
    if len(parts) != 2 or set(parts) != set(modalities) or parts[0] == parts[1]:
        a, b = modalities
        raise ValueError(f"{owner}: direction must be {a + '->' + b!r} or {b + '->' + a!r} "
                         f"(query -> key modality), got {direction!r}")
    return parts[0], parts[1]


class CrossAttentionFusion(nn.Module):
    """Cross-attention fusion: one modality queries the other (P4: "cross-attention").

    ``direction="q->k"`` names the query modality first: with ``"ct->ehr"`` the CT tokens are
    the queries and attend to the EHR tokens (keys and values, EHR padding masked out); with
    ``"ehr->ct"`` each EHR token (visit) attends to the CT tokens. Both modalities are projected
    to ``dim`` (Linear); one :class:`CrossAttentionBlock` updates the query tokens; a final
    LayerNorm, a masked mean over the query tokens and an MLP give the risk. Only the query
    stream reaches the head, so the key modality enters only through attention.

    A pooled (B, D) modality is one token: a pooled query gives attention (B, heads, 1, Nk); a
    pooled key set makes the softmax trivial (every weight 1), the block then adds the same
    projected key value to every query token.

    Args:
        dims: the two modalities' embedding widths, e.g. ``{"ct": Dc, "ehr": De}``.
        dim: shared token width.
        heads: attention heads.
        direction: ``"<query>-><key>"``, e.g. ``"ct->ehr"`` or ``"ehr->ct"``.
        mlp_ratio: MLP ratio of the block.
        hidden: hidden width of the risk MLP.
        dropout: dropout of the block and of the risk MLP.
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        dim: int = 64,
        heads: int = 4,
        direction: str = "ct->ehr",
        *,
        mlp_ratio: int = 4,
        hidden: int = 64,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        dims = _check_dims(dims, "CrossAttentionFusion", count=2)
        _check_positive("CrossAttentionFusion", hidden=hidden)
        self.dims, self.modalities = dims, tuple(dims)
        self.query, self.key = _parse_direction(direction, self.modalities, "CrossAttentionFusion")
        self.direction = f"{self.query}->{self.key}"
        self.proj = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in dims.items()})
        self.block = CrossAttentionBlock(dim, heads, mlp_ratio, dropout)
        self.norm = nn.LayerNorm(dim)
        self.head = _RiskHead(dim, hidden, dropout)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Let the query modality attend to the key modality and score the result.

        Args:
            batch: both modalities (tokens or pooled) plus optional ``"<key>_mask"`` entries.

        Returns:
            ``risk`` (B,); ``attention`` (B, heads, Nq, Nk), rows summing to 1 over the unpadded keys.

        Raises:
            ValueError: if a modality is missing or malformed, or the batch sizes differ.
        """
        q, q_mask = _tokens(batch, self.query, self.dims[self.query], "CrossAttentionFusion")
        k, k_mask = _tokens(batch, self.key, self.dims[self.key], "CrossAttentionFusion")
        _same_batch("CrossAttentionFusion", **{self.query: q, self.key: k})
        h, attention = self.block(self.proj[self.query](q), self.proj[self.key](k), k_mask)
        pooled = masked_mean(self.norm(h), q_mask)
        return {"risk": self.head(pooled), "attention": attention}


class CoAttentionFusion(nn.Module):
    """Co-attention fusion: each modality attends to the other (P4: "co-attention").

    Both modalities are projected to ``dim`` (Linear). With ``guided_by=None`` two
    :class:`CrossAttentionBlock` run in parallel on the projected tokens: modality A's tokens
    attend to B's and B's attend to A's (each with the other's padding masked out). Each
    updated stream is layer-normalised and mean-pooled over its own unpadded tokens; the two
    pooled vectors, concatenated in the order of ``dims``, go to the risk MLP.

    Image-guided variant. The P4 text available here names it only in its results ("image-guided
    co-attention achieved the best external performance", abstract) without defining it. Here
    ``guided_by=g`` (``"ct"`` for the image-guided model) means: the guiding modality g is not
    modified by attention: its projected tokens are layer-normalised and pooled; the other
    modality's tokens attend to g's tokens (queries from the other modality, keys and values
    from g), so the image decides what is added to each EHR token, in the sense of the
    "guided-attention" unit of MCAN (Yu et al., 2019: Y guides the attention of X when X
    queries Y). Then both pooled vectors are concatenated -> risk as above. Note that MCAT
    (Chen et al., 2021) uses the opposite reading for "genomic-guided co-attention" (the guide
    supplies the queries); with a pooled guide (one token) the attention here is trivial (weight
    1) and the guidance reduces to adding the projected image value to every EHR token.

    Args:
        dims: the two modalities' embedding widths, e.g. ``{"ct": Dc, "ehr": De}``.
        dim: shared token width.
        heads: attention heads.
        guided_by: ``None`` (symmetric co-attention) or the name of the guiding modality (``"ct"``).
        mlp_ratio: MLP ratio of the blocks.
        hidden: hidden width of the risk MLP.
        dropout: dropout of the blocks and of the risk MLP.
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        dim: int = 64,
        heads: int = 4,
        guided_by: str | None = None,
        *,
        mlp_ratio: int = 4,
        hidden: int = 64,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        dims = _check_dims(dims, "CoAttentionFusion", count=2)
        _check_positive("CoAttentionFusion", hidden=hidden)
        if guided_by is not None and guided_by not in dims:
            raise ValueError(f"CoAttentionFusion: guided_by must be None or one of {list(dims)}, got {guided_by!r}")
        self.dims, self.modalities, self.guided_by = dims, tuple(dims), guided_by
        # modality -> the modality its tokens attend to; the guide attends to nothing
        self.attends_to = {m: o for m, o in zip(self.modalities, self.modalities[::-1]) if m != guided_by}
        self.proj = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in dims.items()})
        self.blocks = nn.ModuleDict({m: CrossAttentionBlock(dim, heads, mlp_ratio, dropout) for m in self.attends_to})
        self.norms = nn.ModuleDict({m: nn.LayerNorm(dim) for m in self.modalities})
        self.head = _RiskHead(2 * dim, hidden, dropout)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Co-attend and score.

        Args:
            batch: both modalities (tokens or pooled) plus optional ``"<key>_mask"`` entries.

        Returns:
            ``risk`` (B,); for each modality m that attends, ``<m>_attention`` (B, heads, N_m,
            N_other): m's tokens over the other's (only the non-guide's with ``guided_by``).

        Raises:
            ValueError: if a modality is missing or malformed, or the batch sizes differ.
        """
        tokens, masks = {}, {}
        for m in self.modalities:
            x, masks[m] = _tokens(batch, m, self.dims[m], "CoAttentionFusion")
            tokens[m] = self.proj[m](x)
        _same_batch("CoAttentionFusion", **tokens)
        out, pooled = {}, []
        for m in self.modalities:
            h = tokens[m]
            if m in self.attends_to:
                other = self.attends_to[m]
                h, out[f"{m}_attention"] = self.blocks[m](h, tokens[other], masks[other])
            pooled.append(masked_mean(self.norms[m](h), masks[m]))
        out["risk"] = self.head(torch.cat(pooled, dim=1))
        return out
