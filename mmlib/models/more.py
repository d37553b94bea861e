"""MoRE's X-ray and ECG encoders with DropKey ("linear attention dropping") and attention rollout (P3, 2410.16239).

MoRE aligns chest X-rays, 12-lead ECGs and reports contrastively. Its two signal encoders are the
same transformer over different patch embeddings; the projection heads (768 -> 768 -> 128) and
the text encoder live elsewhere. The parts, as the paper names them:

- "Linear attention dropping" is DropKey (Li et al., 2023): in training, each attention logit
  (per sample, head, query and key) is set to -inf with probability p *before* the softmax, so
  the kept weights of a row are renormalised by the softmax itself (no 1/(1 - p) rescaling, no
  dropout on the weights after the softmax). :class:`DropKeyAttention` implements it; it never
  drops the query's own key (the diagonal), so no row is ever fully masked and no NaN can arise.
  In evaluation, or with p = 0, nothing is dropped and the attention runs through PyTorch's
  fused ``F.scaled_dot_product_attention``.
- The drop rate per layer: the public code uses a constant p = 0.3 in every layer; the paper
  text describes a rate that grows linearly with depth. :func:`dropkey_schedule` gives both
  (``"constant"``, ``"linear"``: layer i of n gets ``p * (i + 1) / n``, the last layer p) and
  ``"off"``.
- X-ray encoder (:class:`XrayViT`): ViT-B/16 at 224 x 224 (768 wide, 12 pre-LN blocks of 12
  heads, MLP ratio 4): a convolutional patch embedding (kernel = stride = 16 -> 14 x 14 = 196
  patches), a CLS token and learned position embeddings. Greyscale by default (the X-rays are
  8-bit single-channel PNGs).
- ECG encoder (:class:`ECGTransformer`): the same transformer over a 1-D convolutional patch
  embedding of the 12 leads (kernel = stride = ``patch_size``; 1000 samples = 10 s at 100 Hz
  with patch 5 give 200 tokens, the paper's "about 196"). The ECG preprocessing and
  augmentations are in :mod:`mmlib.ecg`.
- "Attention-based explanations per modality": :func:`attention_rollout` (Abnar & Zuidema,
  2020) over the per-layer weights the encoders return with ``return_attention=True``;
  :func:`rollout_map_2d` puts the CLS row on the X-ray patch grid and :func:`rollout_over_time`
  spreads it over the ECG samples.

Both encoders return ``{"pooled": (B, dim) CLS output, "tokens": (B, 1 + P, dim)}`` (after the
final LayerNorm; token 0 is the CLS token), plus ``"attention"`` (one (B, heads, L, L) tensor per
layer, L = 1 + P) when asked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmlib.models._checks import dtype_suffix as _dtype
from mmlib.models._checks import positive_ints as _pos
from mmlib.models._checks import shape_of as _shape
from mmlib.models.fusion import feed_forward

__all__ = [
    "DROPKEY_MODES",
    "DropKeyAttention",
    "DropKeyBlock",
    "ECGTransformer",
    "TransformerEncoder",
    "XrayViT",
    "attention_rollout",
    "dropkey_schedule",
    "rollout_map_2d",
    "rollout_over_time",
]

DROPKEY_MODES = ("off", "constant", "linear")


# --------------------------------------------------------------------------- checks


def _rate(owner: str, name: str, value: object) -> float:
    """A probability in [0, 1) (a drop rate of 1 would leave only the diagonal), or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}: {name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_heads(owner: str, dim: int, n_heads: int) -> None:
    if dim % n_heads:
        raise ValueError(f"{owner}: dim ({dim}) must be divisible by n_heads ({n_heads})")


def _check_tokens(owner: str, name: str, x: object, dim: int) -> None:
    ok = isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim == 3 and x.shape[-1] == dim
    if not ok or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{owner} expects {name} of shape (B, L, {dim}) floats with B, L >= 1, got {_shape(x)}"
                         + _dtype(x))


# --------------------------------------------------------------------------- DropKey


def dropkey_schedule(p: float, depth: int, mode: str) -> list[float]:
    """The DropKey rate of each of ``depth`` layers.

    Args:
        p: the rate (public code: 0.3); in [0, 1).
        depth: number of layers.
        mode: ``"off"`` (all 0), ``"constant"`` (all ``p``, the public code) or ``"linear"``
            (the paper text: growing linearly with depth; layer i = 0 .. depth - 1 gets
            ``p * (i + 1) / depth``, so the first layer drops least, p / depth, and the last
            exactly ``p``; one layer gets ``p``).

    Returns:
        ``depth`` floats, input layer first.

    Raises:
        ValueError: naming ``p``, ``depth`` or ``mode``.
    """
    p = _rate("dropkey_schedule", "p", p)
    (depth,) = _pos("dropkey_schedule", depth=depth)
    if mode not in DROPKEY_MODES:
        raise ValueError(f"dropkey_schedule: mode must be one of {DROPKEY_MODES}, got {mode!r}")
    if mode == "off":
        return [0.0] * depth
    if mode == "constant":
        return [p] * depth
    return [p * (i + 1) / depth for i in range(depth)]


class DropKeyAttention(nn.Module):
    """Multi-head self-attention with DropKey: logits dropped (-inf) with probability ``p`` before the softmax.

    In training with ``p > 0`` an independent Bernoulli(p) mask is drawn (from torch's global
    generator) for every (sample, head, query, key) logit, except that a query's own key (the
    diagonal) is never dropped: each row keeps at least one finite logit, so the softmax is
    always defined (no NaN, even at p close to 1). The share of all logits dropped is thus
    ``p (L - 1) / L``; of the off-diagonal ones, p. The softmax over the kept logits is the
    attention; there is no rescaling.

    In evaluation, or with ``p = 0``, nothing is dropped and the attention is
    ``F.scaled_dot_product_attention`` (fused kernels). ``return_attention=True`` computes the
    weights explicitly (the same numbers up to rounding) and returns them, as used, masks
    included.

    Args:
        dim: token width.
        n_heads: heads (``dim`` must be divisible by it).
        p: DropKey rate in [0, 1); the attribute ``p`` may be changed later (e.g. a schedule).
    """

    def __init__(self, dim: int, n_heads: int, p: float = 0.0) -> None:
        super().__init__()
        dim, n_heads = _pos("DropKeyAttention", dim=dim, n_heads=n_heads)
        _check_heads("DropKeyAttention", dim, n_heads)
        self.p = _rate("DropKeyAttention", "p", p)
        self.dim, self.n_heads, self.head_dim = dim, n_heads, dim // n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_heads={self.n_heads}, p={self.p}"

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, L, dim) -> (B, L, dim); with ``return_attention`` also the weights (B, n_heads, L, L), rows sum to 1."""
        _check_tokens("DropKeyAttention", "x", x, self.dim)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        drop = self.training and self.p > 0
        weights = None
        if drop or return_attention:
            logits = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)  # (B, H, L, L)
            if drop:
                mask = torch.rand(logits.shape, device=logits.device) < self.p
                mask &= ~torch.eye(n, dtype=torch.bool, device=logits.device)  # keep each query's own key
                logits = logits.masked_fill(mask, float("-inf"))
            weights = logits.softmax(dim=-1)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(b, n, self.dim))
        return (out, weights) if return_attention else out


class DropKeyBlock(nn.Module):
    """Pre-LN transformer block: ``x <- x + Drop(Attn(LN(x))); x <- x + MLP(LN(x))`` with :class:`DropKeyAttention`.

    Args:
        dim, n_heads: as in :class:`DropKeyAttention`.
        mlp_ratio: MLP hidden width over ``dim`` (Linear -> GELU -> Linear).
        dropkey: this block's DropKey rate.
        dropout: dropout on the attention output and in the MLP (never on the attention weights).
    """

    def __init__(self, dim: int, n_heads: int, mlp_ratio: int = 4, dropkey: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        dim, n_heads, mlp_ratio = _pos("DropKeyBlock", dim=dim, n_heads=n_heads, mlp_ratio=mlp_ratio)
        dropout = _rate("DropKeyBlock", "dropout", dropout)
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = DropKeyAttention(dim, n_heads, dropkey)
        self.drop = nn.Dropout(dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = feed_forward(dim, mlp_ratio, dropout)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, L, dim) -> (B, L, dim); with ``return_attention`` also the weights (B, n_heads, L, L)."""
        h = self.norm_attn(x)
        weights = None
        if return_attention:
            update, weights = self.attn(h, return_attention=True)
        else:
            update = self.attn(h)
        x = x + self.drop(update)
        x = x + self.mlp(self.norm_mlp(x))
        return (x, weights) if return_attention else x


class TransformerEncoder(nn.Module):
    """``depth`` :class:`DropKeyBlock` s and a final LayerNorm; block i drops at ``dropkey_schedule(...)[i]``.

    Args:
        dim: token width.
        depth: number of blocks.
        n_heads: heads per block.
        mlp_ratio: MLP hidden width over ``dim``.
        dropkey: the DropKey rate p in [0, 1).
        dropkey_mode: ``"constant"`` (p in every block, public code), ``"linear"`` (rising to p at
            the last block, paper text) or ``"off"``; see :func:`dropkey_schedule`.
        dropout: dropout on the attention outputs and in the MLPs.

    Attributes:
        dropkey_rates: the per-block rates used.
    """

    def __init__(self, dim: int, depth: int, n_heads: int, mlp_ratio: int = 4, dropkey: float = 0.0,
                 dropkey_mode: str = "constant", dropout: float = 0.0) -> None:
        super().__init__()
        dim, depth, n_heads = _pos("TransformerEncoder", dim=dim, depth=depth, n_heads=n_heads)
        _check_heads("TransformerEncoder", dim, n_heads)
        dropkey = _rate("TransformerEncoder", "dropkey", dropkey)
        if dropkey_mode not in DROPKEY_MODES:
            raise ValueError(f"TransformerEncoder: dropkey_mode must be one of {DROPKEY_MODES}, got {dropkey_mode!r}")
        self.dim = dim
        self.dropkey_rates = dropkey_schedule(dropkey, depth, dropkey_mode)
        self.blocks = nn.ModuleList(DropKeyBlock(dim, n_heads, mlp_ratio, p, dropout) for p in self.dropkey_rates)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, L, dim) -> normalised (B, L, dim); with ``return_attention`` also a list of (B, n_heads, L, L)."""
        _check_tokens("TransformerEncoder", "x", x, self.dim)
        attentions = []
        for block in self.blocks:
            if return_attention:
                x, weights = block(x, return_attention=True)
                attentions.append(weights)
            else:
                x = block(x)
        x = self.norm(x)
        return (x, attentions) if return_attention else x


# --------------------------------------------------------------------------- encoders


def _init_vit(module: nn.Module) -> None:
    """ViT initialisation: truncated-normal (SD 0.02) linear weights and zero biases; LayerNorm at 1 and 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class _TokenEncoder(nn.Module):
    """A CLS token and learned positions in front of :class:`TransformerEncoder`; subclasses embed the patches."""

    def __init__(self, n_patches: int, dim: int, depth: int, n_heads: int, mlp_ratio: int, dropkey: float,
                 dropkey_mode: str, dropout: float) -> None:
        super().__init__()
        self.dim, self.n_patches = dim, n_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n_patches, dim))
        self.encoder = TransformerEncoder(dim, depth, n_heads, mlp_ratio, dropkey, dropkey_mode, dropout)
        self.apply(_init_vit)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def _encode(self, patches: torch.Tensor, return_attention: bool) -> dict:
        """(B, P, dim) patch embeddings -> the output dict."""
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        x = torch.cat([cls, patches], dim=1) + self.pos_embed
        if return_attention:
            x, attentions = self.encoder(x, return_attention=True)
            return {"pooled": x[:, 0], "tokens": x, "attention": attentions}
        x = self.encoder(x)
        return {"pooled": x[:, 0], "tokens": x}


class XrayViT(_TokenEncoder):
    """MoRE's X-ray encoder: a ViT (default ViT-B/16 at 224 x 224, greyscale) with DropKey.

    Args:
        image_size: side of the square input (pixels); must be a multiple of ``patch_size``.
        patch_size: side of the square patches (kernel = stride of the patch convolution).
        in_channels: image channels (1 for the cohort's greyscale X-rays, 3 for RGB).
        dim, depth, n_heads, mlp_ratio, dropout: the transformer (ViT-B: 768, 12, 12, 4).
        dropkey, dropkey_mode: DropKey rate and schedule (public code: 0.3, ``"constant"``).

    Attributes:
        grid: (rows, columns) of the patch grid; ``n_patches`` = rows x columns.
    """

    def __init__(self, image_size: int = 224, patch_size: int = 16, in_channels: int = 1, dim: int = 768,
                 depth: int = 12, n_heads: int = 12, dropkey: float = 0.3, dropkey_mode: str = "constant",
                 mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        owner = "XrayViT"
        image_size, patch_size, in_channels = _pos(owner, image_size=image_size, patch_size=patch_size,
                                                   in_channels=in_channels)
        if image_size % patch_size:
            raise ValueError(f"{owner}: image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        side = image_size // patch_size
        (dim,) = _pos(owner, dim=dim)
        super().__init__(side * side, dim, depth, n_heads, mlp_ratio, dropkey, dropkey_mode, dropout)
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        self.grid = (side, side)
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor, return_attention: bool = False) -> dict:
        """(B, in_channels, image_size, image_size) -> ``pooled`` (B, dim), ``tokens`` (B, 1 + P, dim)
        [, ``attention``: list per layer of (B, n_heads, 1 + P, 1 + P)]."""
        c, s = self.in_channels, self.image_size
        ok = isinstance(images, torch.Tensor) and images.is_floating_point() and images.ndim == 4
        if not ok or tuple(images.shape[1:]) != (c, s, s) or images.shape[0] == 0:
            raise ValueError(f"XrayViT expects images of shape (B, {c}, {s}, {s}) floats, got {_shape(images)}"
                             + _dtype(images))
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, P, dim), row-major over the grid
        return self._encode(patches, return_attention)


class ECGTransformer(_TokenEncoder):
    """MoRE's ECG encoder: the ViT transformer over a 1-D convolutional patch embedding of the leads.

    Args:
        n_leads: input leads (12).
        n_samples: samples per lead (1000 = 10 s at 100 Hz); must be a multiple of ``patch_size``
            so every sample belongs to exactly one token.
        patch_size: kernel = stride of the ``Conv1d`` patch embedding (5 -> 200 tokens of 50 ms).
        dim, depth, n_heads, mlp_ratio, dropout: the transformer.
        dropkey, dropkey_mode: DropKey rate and schedule, as for :class:`XrayViT`.

    Attributes:
        n_patches: number of time tokens (``n_samples // patch_size``).
    """

    def __init__(self, n_leads: int = 12, n_samples: int = 1000, patch_size: int = 5, dim: int = 768,
                 depth: int = 12, n_heads: int = 12, dropkey: float = 0.3, dropkey_mode: str = "constant",
                 mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        owner = "ECGTransformer"
        n_leads, n_samples, patch_size, dim = _pos(owner, n_leads=n_leads, n_samples=n_samples,
                                                   patch_size=patch_size, dim=dim)
        if n_samples % patch_size:
            raise ValueError(f"{owner}: n_samples ({n_samples}) must be a multiple of patch_size ({patch_size})")
        super().__init__(n_samples // patch_size, dim, depth, n_heads, mlp_ratio, dropkey, dropkey_mode, dropout)
        self.n_leads, self.n_samples, self.patch_size = n_leads, n_samples, patch_size
        self.patch_embed = nn.Conv1d(n_leads, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, signals: torch.Tensor, return_attention: bool = False) -> dict:
        """(B, n_leads, n_samples) -> ``pooled`` (B, dim), ``tokens`` (B, 1 + P, dim)
        [, ``attention``: list per layer of (B, n_heads, 1 + P, 1 + P)]."""
        c, t = self.n_leads, self.n_samples
        ok = isinstance(signals, torch.Tensor) and signals.is_floating_point() and signals.ndim == 3
        if not ok or tuple(signals.shape[1:]) != (c, t) or signals.shape[0] == 0:
            raise ValueError(f"ECGTransformer expects signals of shape (B, {c}, {t}) floats (leads x samples), "
                             f"got {_shape(signals)}" + _dtype(signals))
        patches = self.patch_embed(signals).transpose(1, 2)  # (B, P, dim), in time order
        return self._encode(patches, return_attention)


# --------------------------------------------------------------------------- attention rollout


def attention_rollout(attentions: Sequence[torch.Tensor], discard_ratio: float = 0.0, *,
                      full: bool = False) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each input token reaches the CLS output.

    Per layer: the weights are averaged over heads; with ``discard_ratio`` the smallest
    ``floor(discard_ratio * L)`` weights of each row (never the diagonal) are set to 0; the
    identity is added (the residual path) and each row is renormalised to sum to 1. The layers
    are multiplied through, later layers on the left: ``R = A'_n ... A'_2 A'_1``.

    Args:
        attentions: per layer, input layer first, (B, n_heads, L, L) weights with rows summing to
            1, e.g. the ``"attention"`` list of :class:`XrayViT` / :class:`ECGTransformer`
            (token 0 = CLS).
        discard_ratio: share of each row's weights to drop as noise, in [0, 1).
        full: return the whole (B, L, L) rollout matrix instead of the CLS row.

    Returns:
        (B, L - 1): the CLS row of R over the patch tokens (CLS itself left out, not renormalised:
        the row sums to 1 minus the CLS token's share on itself); or (B, L, L) with ``full``.

    Raises:
        ValueError: for an empty list, tensors of other shapes or different shapes, or a bad ``discard_ratio``.
    """
    if isinstance(attentions, torch.Tensor) or not isinstance(attentions, Sequence) or not attentions:
        raise ValueError(f"attention_rollout expects attentions as a non-empty list of (B, H, L, L) tensors, "
                         f"got {_shape(attentions)}")
    first = attentions[0]
    for i, a in enumerate(attentions):
        ok = isinstance(a, torch.Tensor) and a.is_floating_point() and a.ndim == 4 and a.shape[-1] == a.shape[-2]
        if not ok or (isinstance(first, torch.Tensor) and a.shape != first.shape):
            raise ValueError(f"attention_rollout expects attentions[{i}] as a (B, H, L, L) float tensor of the same "
                             f"shape as attentions[0] {_shape(first)}, got {_shape(a)}" + _dtype(a))
    ratio = _rate("attention_rollout", "discard_ratio", discard_ratio)
    b, _, n, _ = first.shape
    eye = torch.eye(n, dtype=first.dtype, device=first.device)
    n_discard = min(int(ratio * n), n - 1)
    joint = eye.expand(b, n, n)
    for a in attentions:
        a = a.mean(dim=1)
        if n_discard:
            protected = a.masked_fill(eye.bool(), float("inf"))  # the diagonal is never discarded
            smallest = protected.topk(n_discard, dim=-1, largest=False).indices
            a = a.scatter(-1, smallest, 0.0)
        a = a + eye
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a @ joint
    return joint if full else joint[:, 0, 1:]


def rollout_map_2d(rollout: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, rows x columns) rollout over the patch tokens -> (B, rows, columns) map (patches row-major, as in XrayViT).

    Raises:
        ValueError: if ``grid`` is not two positive integers or ``rollout`` has another width.
    """
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or len(grid) != 2:
        raise ValueError(f"rollout_map_2d expects grid as (rows, columns), got {grid!r}")
    rows, cols = _pos("rollout_map_2d", **{"grid[0]": grid[0], "grid[1]": grid[1]})
    ok = isinstance(rollout, torch.Tensor) and rollout.ndim == 2 and rollout.shape[1] == rows * cols
    if not ok:
        raise ValueError(f"rollout_map_2d expects rollout of shape (B, {rows * cols}) for grid {tuple(grid)}, "
                         f"got {_shape(rollout)}")
    return rollout.reshape(rollout.shape[0], rows, cols)


def rollout_over_time(rollout: torch.Tensor, patch_size: int, n_samples: int) -> torch.Tensor:
    """(B, P) rollout over the ECG tokens -> (B, n_samples), each token's weight repeated over its samples.

    Raises:
        ValueError: if ``rollout`` is not (B, n_samples / patch_size).
    """
    patch_size, n_samples = _pos("rollout_over_time", patch_size=patch_size, n_samples=n_samples)
    if n_samples % patch_size:
        raise ValueError(f"rollout_over_time: n_samples ({n_samples}) must be a multiple of patch_size ({patch_size})")
    tokens = n_samples // patch_size
    if not isinstance(rollout, torch.Tensor) or rollout.ndim != 2 or rollout.shape[1] != tokens:
        raise ValueError(f"rollout_over_time expects rollout of shape (B, {tokens}) (n_samples {n_samples} / "
                         f"patch_size {patch_size}), got {_shape(rollout)}")
    return rollout.repeat_interleave(patch_size, dim=1)
