"""Graph modularity of soft prototype assignments (P5, UMEML: "prototype assignment and modularity strategy").

UMEML scores how well the patches of a slide are grouped by the pathology prototypes (and by
the genomic group tokens) with the modularity of community detection (Newman, 2006), computed
on a graph whose nodes are the patches:

- assignment ``S = ReLU(cos(patch, center))``, (N, K), one column per prototype or gene group
  (:func:`cosine_assignment`);
- affinity ``A = ReLU(cos(patch_i, patch_j))`` with a zero diagonal, (N, N)
  (:func:`patch_affinity`);
- modularity matrix ``W = A - d d^T / (2m)`` with degrees ``d = A 1`` and ``2m = 1^T d``;
- ``Q(S) = Tr(S^T W S) / (2m)`` (:func:`modularity`); for a one-hot S this is exactly the
  weighted-graph modularity of the partition (``networkx.algorithms.community.modularity``);
- ``L_mod = -1/(2m) [alpha Tr(S_p^T W S_p) + beta Tr(S_g^T W S_g)] = -(alpha Q(S_p) + beta Q(S_g))``
  (:func:`modularity_loss`, :class:`ModularityLoss`), where S_p assigns the patches to the
  pathology prototypes and S_g to the genomic group tokens, both against the same patch graph.
  The training loss is ``task + gamma * L_mod`` (public code: gamma = 5.0).

``W`` is never materialised: ``Tr(S^T W S) = Tr(S^T A S) - ||S^T d||^2 / (2m)``. ``A`` itself is
(B, N, N), so memory grows with the square of the bag size (10,000 patches: 400 MB per bag in
float32, more with its gradient); subsample the patches of very large bags for this loss.

Everything is batched, with an optional padding mask ``(B, N)`` bool, True = padding, as in
:mod:`mmlib.models.fusion`: padded patches are zeroed on entry (so huge, infinite or NaN padding
values are harmless), get an all-zero assignment row and are isolated nodes of the graph, so
they change neither the degrees, nor ``2m``, nor Q. A graph without edges (``2m = 0``: a single
patch, or patches whose cosines are all <= 0) has Q = 0 (not NaN), with a zero gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ModularityLoss",
    "cosine_assignment",
    "modularity",
    "modularity_loss",
    "normalise_assignment",
    "patch_affinity",
    "subsample_nodes",
]

_EPS = 1e-8  # norm floor of the cosine: a zero vector has cosine 0 with everything


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_tokens(x: object, name: str, owner: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or not x.is_floating_point():
        raise ValueError(f"{owner} expects {name} as a (B, N, D) float tensor, got {_shape(x)}"
                         + (f" {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    return x


def _check_mask(mask: object, b: int, n: int, owner: str) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (b, n):
        raise ValueError(f"{owner} expects mask as a bool tensor of shape {(b, n)} (True = padding), got "
                         f"{_shape(mask)}" + (f" {mask.dtype}" if isinstance(mask, torch.Tensor) else ""))
    return mask


def _unit_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``x`` scaled to unit norm, padded rows (and zero rows) set to 0."""
    if mask is not None:
        x = x.masked_fill(mask.unsqueeze(-1), 0.0)
    return F.normalize(x, dim=-1, eps=_EPS)


def cosine_assignment(x: torch.Tensor, centers: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Soft assignment of tokens to centers: ``S[b, n, k] = ReLU(cos(x[b, n], centers[b, k]))``.

    Args:
        x: (B, N, D) tokens (patches).
        centers: (B, K, D) per-sample centers (prototypes, gene-group tokens) or (K, D) shared ones.
        mask: optional (B, N) bool, True = padding; padded rows of the result are 0.

    Returns:
        (B, N, K) in [0, 1]. A zero token or center has cosine 0 with everything.

    Raises:
        ValueError: on a bad shape, dtype or mask, or mismatched widths or batch sizes.
    """
    x = _check_tokens(x, "x", "cosine_assignment")
    b, n, d = x.shape
    if not isinstance(centers, torch.Tensor) or centers.ndim not in (2, 3) or centers.shape[-1] != d:
        raise ValueError(f"cosine_assignment expects centers of shape (B, K, {d}) or (K, {d}) for x {tuple(x.shape)}, "
                         f"got {_shape(centers)}")
    if centers.ndim == 3 and centers.shape[0] != b:
        raise ValueError(f"cosine_assignment: centers {tuple(centers.shape)} and x {tuple(x.shape)} have different "
                         "batch sizes")
    mask = _check_mask(mask, b, n, "cosine_assignment")
    c = F.normalize(centers, dim=-1, eps=_EPS)
    s = torch.relu(_unit_rows(x, mask) @ c.transpose(-1, -2))
    return s if mask is None else s.masked_fill(mask.unsqueeze(-1), 0.0)


def patch_affinity(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Patch graph ``A[b, i, j] = ReLU(cos(x[b, i], x[b, j]))`` with a zero diagonal (no self-loops).

    Args:
        x: (B, N, D) tokens (patches).
        mask: optional (B, N) bool, True = padding; padded rows and columns of A are 0.

    Returns:
        (B, N, N), symmetric, in [0, 1].
    """
    x = _check_tokens(x, "x", "patch_affinity")
    b, n, _ = x.shape
    mask = _check_mask(mask, b, n, "patch_affinity")
    u = _unit_rows(x, mask)  # padded rows are 0, hence so are their rows and columns of A
    a = torch.relu(u @ u.transpose(-1, -2))
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    return a.masked_fill(eye, 0.0)


def modularity(
    assignment: torch.Tensor, affinity: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Modularity ``Q = Tr(S^T W S) / (2m)`` of a (soft) assignment on a weighted graph, per sample.

    With ``d = A 1`` and ``2m = 1^T d``, ``Tr(S^T W S) = Tr(S^T A S) - ||S^T d||^2 / (2m)``, so the
    (N, N) modularity matrix W is not built. For a one-hot S (a partition of the nodes) Q is
    Newman's modularity ``sum_c [L_c / m - (d_c / 2m)^2]``, what networkx computes for the
    undirected graph of A with edge weights A_ij. A graph with ``2m = 0`` gives 0.

    Args:
        assignment: (B, N, K) S, node-to-community weights (one-hot for a hard partition).
        affinity: (B, N, N) A, symmetric non-negative edge weights (the diagonal is used as given:
            keep it 0, as :func:`patch_affinity` does).
        mask: optional (B, N) bool, True = padding: those nodes are removed (rows of S, rows and
            columns of A set to 0) whatever their values.

    Returns:
        (B,) modularity of each sample.

    Raises:
        ValueError: on bad shapes or dtypes, or if S and A disagree on B or N.
    """
    s = _check_tokens(assignment, "assignment", "modularity")
    b, n, _ = s.shape
    if (not isinstance(affinity, torch.Tensor) or not affinity.is_floating_point()
            or tuple(affinity.shape) != (b, n, n)):
        raise ValueError(f"modularity expects affinity as a float tensor of shape {(b, n, n)} for assignment "
                         f"{tuple(s.shape)}, got {_shape(affinity)}")
    a = affinity
    mask = _check_mask(mask, b, n, "modularity")
    if mask is not None:
        s = s.masked_fill(mask.unsqueeze(-1), 0.0)
        a = a.masked_fill(mask.unsqueeze(-1) | mask.unsqueeze(-2), 0.0)
    degree = a.sum(dim=-1)  # (B, N)
    two_m = degree.sum(dim=-1)  # (B,)
    has_edges = two_m > 0
    safe = torch.where(has_edges, two_m, torch.ones_like(two_m))
    within = ((a @ s) * s).sum(dim=(-2, -1))  # Tr(S^T A S)
    expected = torch.einsum("bnk,bn->bk", s, degree).square().sum(dim=-1) / safe  # ||S^T d||^2 / 2m
    q = (within - expected) / safe
    return torch.where(has_edges, q, torch.zeros_like(q))


def normalise_assignment(assignment: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rows of a soft assignment scaled to sum to 1 (a soft partition); all-zero rows (padding) stay 0.

    ``ReLU(cos)`` rows are not a partition: every column can grow on its own, so the modularity
    of an unnormalised S rewards all K prototypes piling onto the largest community (Q can
    exceed 1, which no partition reaches). With rows summing to 1, as in DMoN-style graph
    pooling, Q is at most 1 and is maximised by spreading the prototypes over the communities.
    """
    return assignment / assignment.sum(-1, keepdim=True).clamp_min(eps)


def subsample_nodes(
    tensors: Sequence[torch.Tensor], mask: torch.Tensor, max_nodes: int, generator: torch.Generator | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The same random ``max_nodes`` rows of every (B, N, ...) tensor, per bag, real rows first.

    A bag with fewer real rows keeps all of them (and some padding, still masked). The patch
    graph has N^2 edges; its modularity on a random node subset is a cheap stochastic estimate.

    Returns:
        (the gathered tensors, each (B, max_nodes, ...), the gathered mask (B, max_nodes)).
    """
    if mask.shape[1] <= max_nodes:
        return list(tensors), mask
    score = torch.rand(mask.shape, generator=generator).to(mask.device).masked_fill(mask, 2.0)
    keep = score.topk(max_nodes, dim=1, largest=False).indices
    out = [t.gather(1, keep.reshape(*keep.shape, *([1] * (t.ndim - 2))).expand(-1, -1, *t.shape[2:]))
           for t in tensors]
    return out, mask.gather(1, keep)


def modularity_loss(
    x: torch.Tensor,
    assignments: Sequence[tuple[torch.Tensor, float]],
    mask: torch.Tensor | None = None,
    *,
    normalise: bool = False,
) -> torch.Tensor:
    """UMEML's modularity loss ``-(sum_i w_i Q(S_i, A(x)))``, averaged over the batch.

    P5: ``L_mod = -1/(2m) [alpha Tr(S_p^T W S_p) + beta Tr(S_g^T W S_g)]`` with
    ``assignments = [(S_p, alpha), (S_g, beta)]``; all assignments share the patch graph
    ``A = patch_affinity(x, mask)``, which is not detached (the gradient reaches ``x``).

    Args:
        x: (B, N, D) patch tokens the graph is built from.
        assignments: pairs ``(S_i, w_i)``, each S_i (B, N, K_i), each w_i a float.
        mask: optional (B, N) bool, True = padding (those rows of x and of every S_i are ignored).
        normalise: score each S_i with its rows scaled to sum 1 (:func:`normalise_assignment`);
            False is the formula as printed.

    Returns:
        Scalar loss (lower = more modular assignments).

    Raises:
        ValueError: on an empty or malformed ``assignments``, or shapes that disagree with ``x``.
    """
    x = _check_tokens(x, "x", "modularity_loss")
    if isinstance(assignments, (str, bytes)) or not isinstance(assignments, Sequence) or not assignments:
        raise ValueError("modularity_loss expects assignments as a non-empty sequence of (S, weight) pairs, "
                         f"got {type(assignments).__name__}")
    affinity = patch_affinity(x, mask)
    total = x.new_zeros(x.shape[0])
    for i, pair in enumerate(assignments):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or isinstance(pair[1], torch.Tensor):
            raise ValueError(f"modularity_loss: assignments[{i}] must be a pair (S, weight: float), got {pair!r}")
        s, w = pair
        s = _check_tokens(s, f"assignments[{i}][0]", "modularity_loss")
        if s.shape[:2] != x.shape[:2]:
            raise ValueError(f"modularity_loss: assignments[{i}][0] has shape {tuple(s.shape)}, expected "
                             f"({x.shape[0]}, {x.shape[1]}, K) for x {tuple(x.shape)}")
        if normalise:
            s = normalise_assignment(s)
        total = total + float(w) * modularity(s, affinity, mask)
    return -total.mean()


class ModularityLoss(nn.Module):
    """``-(alpha Q(S_p) + beta Q(S_g))`` on the patch graph, as a module (P5; see :func:`modularity_loss`).

    Args:
        alpha: weight of the pathology-prototype assignment S_p.
        beta: weight of the genomic-group assignment S_g (ignored when S_g is not given).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0) -> None:
        super().__init__()
        self.alpha, self.beta = float(alpha), float(beta)

    def forward(
        self,
        patch_tokens: torch.Tensor,
        assign_path: torch.Tensor,
        assign_gen: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar loss from patch tokens (B, N, D), S_p (B, N, K), optional S_g (B, N, G) and mask (B, N)."""
        pairs = [(assign_path, self.alpha)]
        if assign_gen is not None:
            pairs.append((assign_gen, self.beta))
        return modularity_loss(patch_tokens, pairs, mask)
