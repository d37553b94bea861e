"""UMEML: histology patch bags + grouped genomics in one decoder (P5, arXiv 2406.07078).

UMEML ("unified modeling enhanced multimodal learning") grades and subtypes gliomas and predicts
survival from a whole-slide image, given as a bag of patch features, and RNA expression grouped
by functional gene sets. Its parts, as the paper names them:

- :class:`PathologyEncoder`: "query-based cross-attention": K learnable prototypes are the
  queries of ``cross_layers`` cross-attention blocks over the patch tokens (public code K = 5,
  2 blocks); then a CLS token joins the prototypes in ``self_layers`` self-attention blocks.
  The prototypes summarise the bag in K tokens, which balances thousands of patches against a
  handful of gene-group tokens ("mitigate unimodal bias").
- :class:`GenomicEncoder`: one small MLP per gene group (SNN/MCAT style) gives one token per
  group; a CLS token and self-attention model the relations among groups.
- "Prototype assignment and modularity": ``assign_path`` S_p = ReLU(cos(patch, prototype)),
  ``assign_gen`` S_g = ReLU(cos(patch, gene-group token)), scored by the modularity of the patch
  graph (:mod:`mmlib.modularity`); the training loss is ``task + gamma * modularity_loss``.
- "Registration mechanism": R learnable register tokens (public code R = 3) sit between the
  pathology and the genomic tokens in the unified decoder, a transformer over
  ``[pathology CLS + prototypes | registers | genomic CLS + groups]``; the decoder outputs at
  the two CLS positions, concatenated, feed one linear head per task (:class:`UMEML`).

The ablations and fusion baselines of the paper reuse the encoders: :class:`PathologyOnly`,
:class:`GenomicsOnly`, :class:`SimpleFusion` (add / concat / Kronecker "bilinear") and
:class:`MCATFusion` (genomic-guided co-attention as in MCAT, Chen et al., 2021).
:class:`PatchCNN` is an optional front-end from RGB patches to patch features, and
:func:`risk_from_hazard_logits` turns the survival head's discrete-time hazard logits into a
risk score for the c-index.

Batches are dicts::

    {"patches": (B, N, Dp) float patch features,
     "patches_mask": optional (B, N) bool, True = padding,
     "rna": (B, n_genes) float}

Bags may have any length N >= 1; a batch of bags of different lengths is padded to the longest
with a mask. Padded patches never reach an output: they are zeroed on entry (so huge, infinite
or NaN padding values are harmless), are masked out as attention keys, have all-zero assignment
rows and are isolated nodes of the modularity graph. A bag that is all padding is an error.
Every model returns at least ``{"logits": {task: (B, n_outputs)}}``.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mmlib.core import positive_int
from mmlib.models._checks import dtype_suffix as _dtype
from mmlib.models._checks import positive_ints as _pos
from mmlib.models._checks import shape_of as _shape
from mmlib.models.fusion import CrossAttentionBlock, feed_forward
from mmlib.modularity import cosine_assignment, modularity_loss, subsample_nodes

__all__ = [
    "UMEML",
    "GatedAttentionPool",
    "GenomicEncoder",
    "GenomicsOnly",
    "GroupedMLP",
    "MCATFusion",
    "PatchCNN",
    "PathologyEncoder",
    "PathologyOnly",
    "SelfAttentionBlock",
    "SimpleFusion",
    "risk_from_hazard_logits",
]

FUSION_MODES = ("add", "concat", "bilinear")
ASSIGN_TO = ("queries", "outputs")


# --------------------------------------------------------------------------- checks


def _nonneg(owner: str, **values: object) -> None:
    for name, v in values.items():
        zero = not isinstance(v, bool) and isinstance(v, int) and v == 0
        if not zero and positive_int(v) is None:
            raise ValueError(f"{owner}: {name} must be a non-negative integer, got {v!r}")


def _check_dropout(owner: str, dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{owner}: dropout must be in [0, 1), got {dropout!r}")


def _check_heads(owner: str, dim: int, n_heads: int) -> None:
    if dim % n_heads:
        raise ValueError(f"{owner}: dim ({dim}) must be divisible by n_heads ({n_heads})")


def _check_tasks(owner: str, tasks: object) -> dict[str, int]:
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError(f"{owner} expects tasks as a non-empty mapping task name -> number of outputs, got {tasks!r}")
    out = {}
    for name, n in tasks.items():
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"{owner}: task names must be non-empty strings without '.', got {name!r}")
        out[name] = _pos(owner, **{f"tasks[{name!r}]": n})[0]
    return out


def _check_groups(owner: str, group_index: object, n_genes: int | None) -> tuple[list[list[int]], int]:
    """Validated gene groups (lists of column indices) and the RNA width they index."""
    if isinstance(group_index, (str, bytes)) or not isinstance(group_index, Sequence) or not group_index:
        raise ValueError(f"{owner} expects group_index as a non-empty sequence of gene-index sequences, "
                         f"got {type(group_index).__name__}")
    groups = []
    for g, idx in enumerate(group_index):
        if hasattr(idx, "tolist"):  # a tensor or numpy array of indices
            idx = idx.tolist()
        if isinstance(idx, (str, bytes)) or not isinstance(idx, Sequence) or not idx:
            raise ValueError(f"{owner}: group_index[{g}] must be a non-empty sequence of column indices, got {idx!r}")
        try:
            cols = [operator.index(i) for i in idx if not isinstance(i, bool)]
        except TypeError:
            cols = []
        if len(cols) != len(idx) or min(cols) < 0:
            raise ValueError(f"{owner}: group_index[{g}] must hold non-negative integer column indices, got {idx!r}")
        groups.append(cols)
    needed = 1 + max(max(idx) for idx in groups)
    if n_genes is None:
        return groups, needed
    width = _pos(owner, n_genes=n_genes)[0]
    if width < needed:
        raise ValueError(f"{owner}: group_index refers to column {needed - 1} but n_genes is {width}")
    return groups, width


def _bag(batch: object, in_dim: int, owner: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch["patches"]`` (B, N, in_dim) with padding zeroed, and its (B, N) mask (all False if none given)."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"{owner} expects a dict batch, got {type(batch).__name__}")
    if "patches" not in batch:
        raise ValueError(f"{owner} needs batch key 'patches' (present: {sorted(map(str, batch))})")
    x = batch["patches"]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 3 or x.shape[-1] != in_dim:
        raise ValueError(f"{owner} expects batch['patches'] of shape (B, N, {in_dim}) floats, got {_shape(x)}"
                         + _dtype(x))
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{owner}: batch['patches'] has no bags or no patches, shape {tuple(x.shape)}")
    mask = batch.get("patches_mask")
    if mask is None:
        return x, torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{owner} expects batch['patches_mask'] as a bool tensor of shape {tuple(x.shape[:2])} "
                         f"(True = padding) for batch['patches'] {tuple(x.shape)}, got {_shape(mask)}" + _dtype(mask))
    empty = mask.all(dim=1)
    if empty.any():
        raise ValueError(f"{owner}: batch['patches_mask'] {tuple(mask.shape)} marks every patch of bag(s) "
                         f"{empty.nonzero().flatten().tolist()} as padding; each bag needs at least one patch")
    return x.masked_fill(mask.unsqueeze(-1), 0.0), mask


def _rna(batch: object, n_genes: int, owner: str, b: int | None = None) -> torch.Tensor:
    """``batch["rna"]`` checked to be (B, n_genes) floats (B = ``b`` when given)."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"{owner} expects a dict batch, got {type(batch).__name__}")
    if "rna" not in batch:
        raise ValueError(f"{owner} needs batch key 'rna' of shape (B, {n_genes}) (present: {sorted(map(str, batch))})")
    rna = batch["rna"]
    if not isinstance(rna, torch.Tensor) or not rna.is_floating_point() or rna.ndim != 2 or rna.shape[1] != n_genes:
        raise ValueError(f"{owner} expects batch['rna'] of shape (B, {n_genes}) floats ({n_genes} = the columns "
                         f"group_index refers to), got {_shape(rna)}" + _dtype(rna))
    if b is not None and rna.shape[0] != b:
        raise ValueError(f"{owner}: batch['rna'] {tuple(rna.shape)} and batch['patches'] have different batch sizes "
                         f"({rna.shape[0]} vs {b})")
    return rna


# --------------------------------------------------------------------------- building blocks


def risk_from_hazard_logits(logits: torch.Tensor) -> torch.Tensor:
    """Risk score from discrete-time logistic-hazard logits (higher = worse), e.g. for the c-index.

    With hazards ``h_i = sigmoid(logits[:, i])`` the survival function at the end of bin k is
    ``S_k = prod_{i <= k} (1 - h_i)``; the risk is ``-sum_k S_k`` (minus the expected number of
    bins survived), as in MCAT/UMEML's survival evaluation. Pairs with
    :func:`mmlib.losses.discrete_time_nll`.

    Args:
        logits: (B, K) hazard logits, K >= 1.

    Returns:
        (B,) risk in [-K, 0].

    Raises:
        ValueError: if ``logits`` is not a (B, K) float tensor with K >= 1.
    """
    ok = isinstance(logits, torch.Tensor) and logits.is_floating_point() and logits.ndim == 2 and logits.shape[1] > 0
    if not ok:
        raise ValueError(f"risk_from_hazard_logits expects logits as a (B, K) float tensor, K >= 1, got "
                         f"{_shape(logits)}" + _dtype(logits))
    survival = torch.cumprod(torch.sigmoid(-logits), dim=1)  # 1 - sigmoid(z) = sigmoid(-z)
    return -survival.sum(dim=1)


class SelfAttentionBlock(nn.Module):
    """Pre-LN transformer block: ``x <- x + Attn(LN(x)); x <- x + MLP(LN(x))`` (no padding: used on token sets).

    Args:
        dim: token width.
        n_heads: attention heads (``dim`` must be divisible by it).
        mlp_ratio: MLP hidden width over ``dim`` (Linear -> GELU -> Linear).
        dropout: dropout on the attention output and in the MLP (none on the attention weights,
            so the returned weights are those used).
    """

    def __init__(self, dim: int, n_heads: int = 4, mlp_ratio: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        dim, n_heads, mlp_ratio = _pos("SelfAttentionBlock", dim=dim, n_heads=n_heads, mlp_ratio=mlp_ratio)
        _check_heads("SelfAttentionBlock", dim, n_heads)
        _check_dropout("SelfAttentionBlock", dropout)
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, n_heads, dropout=0.0, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = feed_forward(dim, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, dim) tokens -> updated tokens (B, L, dim) and attention weights (B, n_heads, L, L)."""
        h = self.norm_attn(x)
        update, weights = self.attn(h, h, h, need_weights=True, average_attn_weights=False)
        x = x + self.drop(update)
        return x + self.mlp(self.norm_mlp(x)), weights


class GroupedMLP(nn.Module):
    """One two-layer MLP per gene group, run for all groups at once: (B, n_genes) -> (B, G, dim).

    Group g maps its genes ``rna[:, group_index[g]]`` by ``Linear(len(g), dim) -> ELU -> AlphaDropout
    -> Linear(dim, dim) -> ELU`` (the self-normalising blocks of SNN/MCAT), with weights of its
    own, initialised like ``nn.Linear`` (uniform within 1/sqrt(fan-in)). The first layers of all
    groups are stored as one (T, dim) weight, row t for the t-th (group, gene) pair, T = the sum
    of the group sizes, so the parameters are exactly those of G separate MLPs; each gene's
    contribution ``rna[:, gene] * row`` is summed into its group (``index_add``), which costs
    (B, T, dim) memory. The second layers are one batched (G, dim, dim) matmul.

    Args:
        group_index: per group, the column indices of its genes in ``rna`` (groups may overlap).
        dim: output width per group.
        dropout: alpha-dropout rate after the first layer.

    Attributes:
        sizes: the number of genes of each group; ``weight1[offsets[g]:offsets[g + 1]]`` is group g's first layer
            (transposed, (len(g), dim)).
    """

    def __init__(self, group_index: Sequence[Sequence[int]], dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        groups, _ = _check_groups("GroupedMLP", group_index, None)
        (dim,) = _pos("GroupedMLP", dim=dim)
        _check_dropout("GroupedMLP", dropout)
        self.n_groups, self.dim = len(groups), dim
        self.sizes = [len(idx) for idx in groups]
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)
        sizes = torch.tensor(self.sizes)
        owner = torch.repeat_interleave(torch.arange(self.n_groups), sizes)
        self.register_buffer("gene_index", torch.tensor([i for idx in groups for i in idx]), persistent=False)
        self.register_buffer("gene_group", owner, persistent=False)
        bound = sizes.float().rsqrt()
        self.weight1 = nn.Parameter((torch.rand(len(owner), dim) * 2 - 1) * bound[owner, None])
        self.bias1 = nn.Parameter((torch.rand(self.n_groups, dim) * 2 - 1) * bound[:, None])
        self.weight2 = nn.Parameter((torch.rand(self.n_groups, dim, dim) * 2 - 1) * dim**-0.5)
        self.bias2 = nn.Parameter((torch.rand(self.n_groups, dim) * 2 - 1) * dim**-0.5)
        self.act = nn.ELU()
        self.drop = nn.AlphaDropout(dropout)

    def forward(self, rna: torch.Tensor) -> torch.Tensor:
        """(B, n_genes) -> (B, G, dim) group tokens."""
        contrib = rna[:, self.gene_index, None] * self.weight1  # (B, T, dim)
        h = contrib.new_zeros(rna.shape[0], self.n_groups, self.dim).index_add(1, self.gene_group, contrib)
        h = self.drop(self.act(h + self.bias1))
        return self.act(torch.einsum("bgi,gio->bgo", h, self.weight2) + self.bias2)


class GatedAttentionPool(nn.Module):
    """Gated attention pooling (Ilse et al., 2018): ``sum_n a_n h_n`` with learned weights a summing to 1.

    ``a = softmax_n (w^T (tanh(V h_n) * sigmoid(U h_n)))``.

    Args:
        dim: token width.
        hidden: width of the attention MLP.
    """

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        (dim,) = _pos("GatedAttentionPool", dim=dim)
        (hidden,) = _pos("GatedAttentionPool", hidden=dim if hidden is None else hidden)
        self.value = nn.Linear(dim, hidden)
        self.gate = nn.Linear(dim, hidden)
        self.score = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, dim) -> pooled (B, dim) and weights (B, L) summing to 1."""
        a = self.score(torch.tanh(self.value(x)) * torch.sigmoid(self.gate(x))).squeeze(-1).softmax(dim=-1)
        return (a.unsqueeze(-1) * x).sum(dim=1), a


class PatchCNN(nn.Module):
    """Small CNN from RGB patches to patch features: three strided conv stages + global average pool.

    An optional front-end when the bags are images rather than features (the paper uses features
    from a pathology foundation model). Each stage is Conv3x3 (stride 2) -> GroupNorm(1) -> ReLU
    with widths ``width, 2 width, 4 width``; GroupNorm keeps each patch's features independent of
    the other patches in the batch.

    Args:
        out_dim: feature width per patch.
        in_channels: image channels (3 for RGB).
        width: channels of the first stage.
    """

    def __init__(self, out_dim: int, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        out_dim, in_channels, width = _pos("PatchCNN", out_dim=out_dim, in_channels=in_channels, width=width)
        self.in_channels = in_channels
        layers: list[nn.Module] = []
        c_in = in_channels
        for c in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(1, c), nn.ReLU()]
            c_in = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.proj = nn.Linear(c_in, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(M, C, H, W) patches -> (M, out_dim); any leading dims work, e.g. (B, N, C, H, W) -> (B, N, out_dim).

        H, W >= 16 (three stride-2 stages).
        """
        c = self.in_channels
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 4 or x.shape[-3] != c \
                or x.shape[-1] < 16 or x.shape[-2] < 16:
            raise ValueError(f"PatchCNN expects patches of shape (M, {c}, H, W) floats with H, W >= 16, "
                             f"got {_shape(x)}" + _dtype(x))
        lead = x.shape[:-3]
        return self.proj(self.features(x.reshape(-1, *x.shape[-3:]))).reshape(*lead, -1)


def _patch_embedding(in_dim: int, dim: int) -> nn.Sequential:
    """LayerNorm -> Linear: patch features (in_dim) -> patch tokens (dim)."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, dim))


def _embed_patches(embed: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Patch tokens from patch features whose padding :func:`_bag` has zeroed; padded tokens are zeroed again
    (the embedding maps a zero row to its bias), so no attention or graph sees anything of the padding."""
    return embed(x).masked_fill(mask.unsqueeze(-1), 0.0)


# --------------------------------------------------------------------------- encoders


class PathologyEncoder(nn.Module):
    """Prototype encoder of a patch bag (P5: "query-based cross-attention in the pathology encoder").

    Patch features are embedded (LayerNorm -> Linear) into patch tokens, padded tokens zeroed.
    K learnable prototypes (initialised small, N(0, 0.02^2)) are the queries of ``cross_layers``
    pre-LN cross-attention blocks (:class:`mmlib.models.fusion.CrossAttentionBlock`: attention
    with the padding masked out as keys, then an MLP, both residual) over the patch tokens. A
    learnable CLS token is prepended and ``self_layers`` self-attention blocks run over
    ``[CLS, prototypes]``, followed by a LayerNorm.

    Args:
        in_dim: patch feature width (public code 512).
        dim: token width.
        n_prototypes: K (public code 5).
        n_heads: attention heads.
        cross_layers: cross-attention blocks (prototypes -> patches).
        self_layers: self-attention blocks over [CLS, prototypes] (0 allowed).
        dropout: dropout of the blocks.
        assign_to: what a patch is assigned to. ``"queries"`` (default): the K learned prototype
            queries, shared by every bag and living in the patch tokens' space, so the assignment
            is one clustering of all patches. ``"outputs"``: the bag's prototype tokens after
            cross- and self-attention (and a LayerNorm), which are specific to the bag and not in
            the patch tokens' space. The paper says only "cosine similarity between prototypes
            and patch instances"; on the generated glioma cohort the queries recover the planted
            tissue programs and the outputs do not (see the P5 notebook).
    """

    def __init__(self, in_dim: int, dim: int, n_prototypes: int = 5, n_heads: int = 4, cross_layers: int = 2,
                 self_layers: int = 1, dropout: float = 0.1, *, assign_to: str = "queries") -> None:
        super().__init__()
        owner = "PathologyEncoder"
        if assign_to not in ASSIGN_TO:
            raise ValueError(f"{owner}: assign_to must be one of {ASSIGN_TO}, got {assign_to!r}")
        self.assign_to = assign_to
        in_dim, dim, n_prototypes, n_heads, cross_layers = _pos(
            owner, in_dim=in_dim, dim=dim, n_prototypes=n_prototypes, n_heads=n_heads, cross_layers=cross_layers)
        _nonneg(owner, self_layers=self_layers)
        _check_heads(owner, dim, n_heads)
        _check_dropout(owner, dropout)
        self.in_dim, self.dim, self.n_prototypes = in_dim, dim, n_prototypes
        self.embed = _patch_embedding(in_dim, dim)
        self.prototypes = nn.Parameter(torch.randn(n_prototypes, dim) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.cross = nn.ModuleList(CrossAttentionBlock(dim, n_heads, 4, dropout) for _ in range(cross_layers))
        self.blocks = nn.ModuleList(SelfAttentionBlock(dim, n_heads, 4, dropout) for _ in range(self_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, patches: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Encode a batch of bags.

        Args:
            patches: (B, N, in_dim) patch features.
            mask: optional (B, N) bool, True = padding; every bag needs an unpadded patch.

        Returns:
            ``tokens`` (B, 1 + K, dim), CLS first; ``prototypes`` (B, K, dim) (= ``tokens[:, 1:]``);
            ``patch_tokens`` (B, N, dim), padded rows 0; ``attention`` (B, K, N), the last
            cross-attention block's weights averaged over heads (rows sum to 1, 0 on padding);
            ``assignment`` (B, N, K) = ``cosine_assignment(patch_tokens, P, mask)``, P the learned
            prototype queries (``assign_to="queries"``) or the bag's output prototypes ("outputs").

        Raises:
            ValueError: on a bad shape or a bag that is all padding.
        """
        batch = {"patches": patches} if mask is None else {"patches": patches, "patches_mask": mask}
        x, mask = _bag(batch, self.in_dim, "PathologyEncoder")
        patch_tokens = _embed_patches(self.embed, x, mask)
        q = self.prototypes.unsqueeze(0).expand(x.shape[0], -1, -1)
        for block in self.cross:
            q, weights = block(q, patch_tokens, mask)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), q], dim=1)
        for block in self.blocks:
            h, _ = block(h)
        tokens = self.norm(h)
        prototypes = tokens[:, 1:]
        return {
            "tokens": tokens,
            "prototypes": prototypes,
            "patch_tokens": patch_tokens,
            "attention": weights.mean(dim=1),
            "assignment": cosine_assignment(patch_tokens, self.prototypes if self.assign_to == "queries" else prototypes,
                                            mask),
        }


class GenomicEncoder(nn.Module):
    """Gene-group encoder (P5: "self-attention for modeling interrelations among gene groups").

    Each functional gene group gets a token from its own MLP (:class:`GroupedMLP`); a learnable
    CLS token is prepended, ``layers`` self-attention blocks and a LayerNorm follow.

    Args:
        group_index: per group, the column indices of its genes in ``rna`` (public code: 6
            signature groups, or 331 pathways).
        dim: token width.
        n_heads: attention heads.
        layers: self-attention blocks (0 allowed).
        dropout: dropout of the group MLPs and the blocks.
        n_genes: the width of ``rna`` (default: the largest index in ``group_index`` + 1);
            ``rna`` of any other width is rejected.
    """

    def __init__(self, group_index: Sequence[Sequence[int]], dim: int, n_heads: int = 4, layers: int = 1,
                 dropout: float = 0.1, *, n_genes: int | None = None) -> None:
        super().__init__()
        owner = "GenomicEncoder"
        groups, self.n_genes = _check_groups(owner, group_index, n_genes)
        dim, n_heads = _pos(owner, dim=dim, n_heads=n_heads)
        _nonneg(owner, layers=layers)
        _check_heads(owner, dim, n_heads)
        _check_dropout(owner, dropout)
        self.dim, self.n_groups = dim, len(groups)
        self.group_mlp = GroupedMLP(groups, dim, dropout)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList(SelfAttentionBlock(dim, n_heads, 4, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, rna: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, n_genes) RNA -> ``tokens`` (B, 1 + G, dim), CLS first, and ``groups`` (B, G, dim) = ``tokens[:, 1:]``."""
        rna = _rna({"rna": rna}, self.n_genes, "GenomicEncoder")
        h = torch.cat([self.cls.expand(rna.shape[0], -1, -1), self.group_mlp(rna)], dim=1)
        for block in self.blocks:
            h, _ = block(h)
        tokens = self.norm(h)
        return {"tokens": tokens, "groups": tokens[:, 1:]}


def _heads(tasks: dict[str, int], in_features: int) -> nn.ModuleDict:
    return nn.ModuleDict({t: nn.Linear(in_features, n) for t, n in tasks.items()})


# --------------------------------------------------------------------------- UMEML


class UMEML(nn.Module):
    """UMEML: pathology prototypes + gene-group tokens + register tokens in a unified decoder (P5).

    The decoder is ``decoder_layers`` pre-LN self-attention blocks (and a LayerNorm) over::

        [pathology CLS, K prototypes | R registers | genomic CLS, G groups]   (L = 1 + K + R + 1 + G)

    The pathology and genomic segments get a learned embedding per position (which also tells
    the two segments apart); the registers are learnable tokens and need none, so a model with
    R registers has exactly ``R * dim`` more parameters than one with none. The fused vector
    is the decoder output at the pathology CLS concatenated with that at the genomic CLS; one
    linear head per task maps it to that task's outputs (for survival: discrete-time hazard
    logits, see :func:`risk_from_hazard_logits`).

    The modularity loss ``-(alpha Q(S_p) + beta Q(S_g))`` (:func:`mmlib.modularity.modularity_loss`,
    on the patch-token graph) is returned as ``modularity_loss`` when the model is in training
    mode, or whenever ``forward(..., compute_modularity=True)``; ``compute_modularity=False``
    skips it in training too. Its patch graph costs O(N^2) memory per bag. Train with
    ``loss = task_loss + gamma * out["modularity_loss"]`` (public code gamma = 5.0).

    Args:
        path_in_dim: patch feature width.
        group_index: per gene group, the column indices of its genes in ``rna``.
        tasks: task name -> number of outputs, e.g. ``{"grade": 3, "subtype": 6, "survival": 4}``.
        dim: token width.
        n_prototypes: K.
        n_registers: R (0 = no registers: the "without register tokens" ablation).
        n_heads: attention heads everywhere.
        cross_layers, self_layers: of the :class:`PathologyEncoder`.
        genomic_layers: self-attention blocks of the :class:`GenomicEncoder`.
        decoder_layers: blocks of the unified decoder.
        dropout: dropout everywhere.
        modularity_weights: (alpha, beta) of S_p and S_g in the modularity loss.
        n_genes: the width of ``rna`` (default: the largest index in ``group_index`` + 1).
        assign_to: S_p against the learned prototype queries (default) or the bag's output
            prototypes (see :class:`PathologyEncoder`).
        normalise_assignment: score S_p and S_g with rows summing to 1 in the modularity loss
            (default; :func:`mmlib.modularity.normalise_assignment` says why). False is the
            formula as printed, whose optimum piles every prototype onto one community.
        modularity_patches: build the loss's patch graph on this many random real patches per
            bag (torch's global RNG; None = all patches, O(N^2) memory per bag).
    """

    def __init__(
        self,
        path_in_dim: int,
        group_index: Sequence[Sequence[int]],
        tasks: Mapping[str, int],
        dim: int = 64,
        n_prototypes: int = 5,
        n_registers: int = 3,
        n_heads: int = 4,
        cross_layers: int = 2,
        self_layers: int = 1,
        genomic_layers: int = 1,
        decoder_layers: int = 1,
        dropout: float = 0.1,
        modularity_weights: tuple[float, float] = (1.0, 1.0),
        *,
        n_genes: int | None = None,
        assign_to: str = "queries",
        normalise_assignment: bool = True,
        modularity_patches: int | None = None,
    ) -> None:
        super().__init__()
        self.tasks = _check_tasks("UMEML", tasks)
        if modularity_patches is not None:
            (modularity_patches,) = _pos("UMEML", modularity_patches=modularity_patches)
        self.normalise_assignment, self.modularity_patches = bool(normalise_assignment), modularity_patches
        _nonneg("UMEML", n_registers=n_registers)
        (decoder_layers,) = _pos("UMEML", decoder_layers=decoder_layers)
        if not isinstance(modularity_weights, (tuple, list)) or len(modularity_weights) != 2:
            raise ValueError(f"UMEML: modularity_weights must be a pair (alpha, beta), got {modularity_weights!r}")
        self.modularity_weights = (float(modularity_weights[0]), float(modularity_weights[1]))
        self.pathology = PathologyEncoder(path_in_dim, dim, n_prototypes, n_heads, cross_layers, self_layers, dropout,
                                          assign_to=assign_to)
        self.genomics = GenomicEncoder(group_index, dim, n_heads, genomic_layers, dropout, n_genes=n_genes)
        self.dim, self.n_registers = self.pathology.dim, n_registers
        k, g = self.pathology.n_prototypes, self.genomics.n_groups
        self.path_embed = nn.Parameter(torch.randn(1 + k, dim) * 0.02)
        self.gen_embed = nn.Parameter(torch.randn(1 + g, dim) * 0.02)
        if n_registers:
            self.registers = nn.Parameter(torch.randn(n_registers, dim) * 0.02)
        else:
            self.register_parameter("registers", None)
        self.decoder = nn.ModuleList(SelfAttentionBlock(dim, n_heads, 4, dropout) for _ in range(decoder_layers))
        self.decoder_norm = nn.LayerNorm(dim)
        self.segments = {
            "pathology": slice(0, 1 + k),
            "registers": slice(1 + k, 1 + k + n_registers),
            "genomics": slice(1 + k + n_registers, 2 + k + n_registers + g),
        }
        self.heads = _heads(self.tasks, 2 * dim)

    def forward(self, batch: Mapping[str, torch.Tensor], compute_modularity: bool | None = None) -> dict:
        """Predict every task for a batch of (bag, RNA) pairs.

        Args:
            batch: ``patches`` (B, N, path_in_dim), optional ``patches_mask`` (B, N), ``rna`` (B, n_genes).
            compute_modularity: return ``modularity_loss``; None (default) = only in training mode.

        Returns:
            ``logits`` {task: (B, n)}; ``fused`` (B, 2 dim); ``assign_path`` S_p (B, N, K);
            ``assign_gen`` S_g (B, N, G); ``patch_tokens`` (B, N, dim); ``patches_mask`` (B, N)
            (all False if none was given); ``attention`` (B, K, N) prototype-over-patch weights;
            ``decoder_attention`` (B, L, L), the last decoder block's weights averaged over heads;
            ``segments`` {"pathology", "registers", "genomics"} -> slice of decoder positions;
            ``modularity_loss`` (scalar), only when computed (see ``compute_modularity``).

        Raises:
            ValueError: on a missing key, a bad shape or dtype, mismatched batch sizes or an all-padding bag.
        """
        x, mask = _bag(batch, self.pathology.in_dim, "UMEML")
        rna = _rna(batch, self.genomics.n_genes, "UMEML", x.shape[0])
        path = self.pathology(x, mask)
        gen = self.genomics(rna)
        b = x.shape[0]
        parts = [path["tokens"] + self.path_embed]
        if self.registers is not None:
            parts.append(self.registers.unsqueeze(0).expand(b, -1, -1))
        parts.append(gen["tokens"] + self.gen_embed)
        h = torch.cat(parts, dim=1)
        for block in self.decoder:
            h, weights = block(h)
        h = self.decoder_norm(h)
        fused = torch.cat([h[:, self.segments["pathology"].start], h[:, self.segments["genomics"].start]], dim=1)
        patch_tokens = path["patch_tokens"]
        out = {
            "logits": {t: head(fused) for t, head in self.heads.items()},
            "fused": fused,
            "assign_path": path["assignment"],
            "assign_gen": cosine_assignment(patch_tokens, gen["groups"], mask),
            "patch_tokens": patch_tokens,
            "patches_mask": mask,
            "attention": path["attention"],
            "decoder_attention": weights.mean(dim=1),
            "segments": dict(self.segments),
        }
        wanted = self.training if compute_modularity is None else bool(compute_modularity)
        if wanted:
            alpha, beta = self.modularity_weights
            nodes, sub_mask = [patch_tokens, out["assign_path"], out["assign_gen"]], mask
            if self.modularity_patches is not None:
                nodes, sub_mask = subsample_nodes(nodes, mask, self.modularity_patches)
            out["modularity_loss"] = modularity_loss(nodes[0], [(nodes[1], alpha), (nodes[2], beta)], sub_mask,
                                                     normalise=self.normalise_assignment)
        return out


# --------------------------------------------------------------------------- baselines


class PathologyOnly(nn.Module):
    """Pathology-only baseline: :class:`PathologyEncoder`, one linear head per task on its CLS token.

    Also returns ``assign_path``, ``patch_tokens`` and ``patches_mask``, so that the modularity
    loss on S_p alone (``modularity_loss(patch_tokens, [(assign_path, 1.0)], patches_mask)``) can
    be added by the caller.

    Args:
        path_in_dim, tasks, dim, n_prototypes, n_heads, cross_layers, self_layers, dropout: as in :class:`UMEML`.
    """

    def __init__(self, path_in_dim: int, tasks: Mapping[str, int], dim: int = 64, n_prototypes: int = 5,
                 n_heads: int = 4, cross_layers: int = 2, self_layers: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        self.tasks = _check_tasks("PathologyOnly", tasks)
        self.pathology = PathologyEncoder(path_in_dim, dim, n_prototypes, n_heads, cross_layers, self_layers, dropout)
        self.heads = _heads(self.tasks, self.pathology.dim)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict:
        """``logits`` {task: (B, n)}; ``assign_path`` (B, N, K); ``patch_tokens`` (B, N, dim); ``patches_mask`` (B, N);
        ``attention`` (B, K, N)."""
        x, mask = _bag(batch, self.pathology.in_dim, "PathologyOnly")
        path = self.pathology(x, mask)
        cls = path["tokens"][:, 0]
        return {"logits": {t: head(cls) for t, head in self.heads.items()}, "assign_path": path["assignment"],
                "patch_tokens": path["patch_tokens"], "patches_mask": mask, "attention": path["attention"]}


class GenomicsOnly(nn.Module):
    """Genomics-only baseline: :class:`GenomicEncoder`, one linear head per task on its CLS token.

    Args:
        group_index, tasks, dim, n_heads, dropout, n_genes: as in :class:`UMEML`; ``layers``: self-attention blocks.
    """

    def __init__(self, group_index: Sequence[Sequence[int]], tasks: Mapping[str, int], dim: int = 64,
                 n_heads: int = 4, layers: int = 1, dropout: float = 0.1, *, n_genes: int | None = None) -> None:
        super().__init__()
        self.tasks = _check_tasks("GenomicsOnly", tasks)
        self.genomics = GenomicEncoder(group_index, dim, n_heads, layers, dropout, n_genes=n_genes)
        self.heads = _heads(self.tasks, self.genomics.dim)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict:
        """``logits`` {task: (B, n)} from ``batch["rna"]`` (B, n_genes); ``groups`` (B, G, dim)."""
        gen = self.genomics(_rna(batch, self.genomics.n_genes, "GenomicsOnly"))
        cls = gen["tokens"][:, 0]
        return {"logits": {t: head(cls) for t, head in self.heads.items()}, "groups": gen["groups"]}


class SimpleFusion(nn.Module):
    """Fusion baselines of P5's ablation: the two encoders' CLS vectors fused by add, concat or bilinear.

    - ``"add"``: ``p + g`` (dim);
    - ``"concat"``: ``[p, g]`` (2 dim);
    - ``"bilinear"``: Kronecker fusion as in Pathomic Fusion (Chen et al., 2020): each vector is
      reduced to ``bilinear_width`` (Linear -> ReLU), a 1 is appended to each (so the product
      keeps the unimodal terms), the outer product (``(w + 1)^2``) is flattened -> Linear -> ReLU
      to dim.

    Then one linear head per task.

    Args:
        path_in_dim, group_index, tasks, dim, n_prototypes, n_heads, cross_layers, self_layers,
        genomic_layers, dropout, n_genes: as in :class:`UMEML`.
        mode: ``"add"``, ``"concat"`` or ``"bilinear"``.
        bilinear_width: reduced width of each vector in ``"bilinear"`` mode.
    """

    def __init__(self, path_in_dim: int, group_index: Sequence[Sequence[int]], tasks: Mapping[str, int],
                 mode: str = "concat", dim: int = 64, n_prototypes: int = 5, n_heads: int = 4, cross_layers: int = 2,
                 self_layers: int = 1, genomic_layers: int = 1, dropout: float = 0.1, *, bilinear_width: int = 16,
                 n_genes: int | None = None) -> None:
        super().__init__()
        self.tasks = _check_tasks("SimpleFusion", tasks)
        if mode not in FUSION_MODES:
            raise ValueError(f"SimpleFusion: mode must be one of {FUSION_MODES}, got {mode!r}")
        (bilinear_width,) = _pos("SimpleFusion", bilinear_width=bilinear_width)
        self.mode = mode
        self.pathology = PathologyEncoder(path_in_dim, dim, n_prototypes, n_heads, cross_layers, self_layers, dropout)
        self.genomics = GenomicEncoder(group_index, dim, n_heads, genomic_layers, dropout, n_genes=n_genes)
        dim = self.pathology.dim
        if mode == "bilinear":
            self.reduce_path = nn.Sequential(nn.Linear(dim, bilinear_width), nn.ReLU())
            self.reduce_gen = nn.Sequential(nn.Linear(dim, bilinear_width), nn.ReLU())
            self.bilinear = nn.Sequential(nn.Linear((bilinear_width + 1) ** 2, dim), nn.ReLU(), nn.Dropout(dropout))
        self.heads = _heads(self.tasks, 2 * dim if mode == "concat" else dim)

    def fuse(self, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """(B, dim) pathology and genomic vectors -> the fused vector."""
        if self.mode == "add":
            return p + g
        if self.mode == "concat":
            return torch.cat([p, g], dim=1)
        one = p.new_ones(p.shape[0], 1)
        p1 = torch.cat([self.reduce_path(p), one], dim=1)
        g1 = torch.cat([self.reduce_gen(g), one], dim=1)
        return self.bilinear(torch.einsum("bi,bj->bij", p1, g1).flatten(1))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict:
        """``logits`` {task: (B, n)}, ``fused``, ``assign_path`` (B, N, K), ``patch_tokens``, ``patches_mask``."""
        x, mask = _bag(batch, self.pathology.in_dim, "SimpleFusion")
        rna = _rna(batch, self.genomics.n_genes, "SimpleFusion", x.shape[0])
        path = self.pathology(x, mask)
        fused = self.fuse(path["tokens"][:, 0], self.genomics(rna)["tokens"][:, 0])
        return {"logits": {t: head(fused) for t, head in self.heads.items()}, "fused": fused,
                "assign_path": path["assignment"], "patch_tokens": path["patch_tokens"], "patches_mask": mask}


class MCATFusion(nn.Module):
    """Genomic-guided co-attention baseline in the manner of MCAT (Chen et al., 2021).

    The G gene-group tokens (:class:`GenomicEncoder` groups, after its self-attention) are the
    queries of one multi-head attention over the embedded patch tokens (LayerNorm -> Linear;
    padding masked out as keys); its output, G "genomic-guided" pathology tokens, holds only
    patch values (no residual from the queries, as in MCAT). The pathology side then gets
    ``self_layers`` self-attention blocks; each side is layer-normalised and pooled by gated
    attention (:class:`GatedAttentionPool`); the two pooled vectors are concatenated -> one
    linear head per task.

    Args:
        path_in_dim, group_index, tasks, dim, n_heads, dropout, n_genes: as in :class:`UMEML`.
        self_layers: self-attention blocks on the co-attended pathology tokens.
        genomic_layers: self-attention blocks of the genomic encoder.
    """

    def __init__(self, path_in_dim: int, group_index: Sequence[Sequence[int]], tasks: Mapping[str, int],
                 dim: int = 64, n_heads: int = 4, self_layers: int = 1, genomic_layers: int = 1,
                 dropout: float = 0.1, *, n_genes: int | None = None) -> None:
        super().__init__()
        owner = "MCATFusion"
        self.tasks = _check_tasks(owner, tasks)
        (self.in_dim,) = _pos(owner, path_in_dim=path_in_dim)
        _nonneg(owner, self_layers=self_layers)
        self.genomics = GenomicEncoder(group_index, dim, n_heads, genomic_layers, dropout, n_genes=n_genes)
        dim = self.genomics.dim
        self.embed = _patch_embedding(self.in_dim, dim)
        self.norm_query = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.coattn = nn.MultiheadAttention(dim, n_heads, dropout=0.0, batch_first=True)
        self.path_blocks = nn.ModuleList(SelfAttentionBlock(dim, n_heads, 4, dropout) for _ in range(self_layers))
        self.path_norm = nn.LayerNorm(dim)
        self.path_pool = GatedAttentionPool(dim)
        self.gen_pool = GatedAttentionPool(dim)
        self.heads = _heads(self.tasks, 2 * dim)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict:
        """``logits`` {task: (B, n)}; ``coattention`` (B, G, N) weights averaged over heads (rows sum to 1,
        0 on padding); ``patch_tokens`` (B, N, dim); ``patches_mask`` (B, N)."""
        x, mask = _bag(batch, self.in_dim, "MCATFusion")
        rna = _rna(batch, self.genomics.n_genes, "MCATFusion", x.shape[0])
        patch_tokens = _embed_patches(self.embed, x, mask)
        groups = self.genomics(rna)["groups"]
        c = self.norm_context(patch_tokens)
        h, coattention = self.coattn(self.norm_query(groups), c, c, key_padding_mask=mask,
                                     need_weights=True, average_attn_weights=True)
        for block in self.path_blocks:
            h, _ = block(h)
        p, _ = self.path_pool(self.path_norm(h))
        g, _ = self.gen_pool(groups)
        fused = torch.cat([p, g], dim=1)
        return {"logits": {t: head(fused) for t, head in self.heads.items()}, "fused": fused,
                "coattention": coattention, "patch_tokens": patch_tokens, "patches_mask": mask}
