"""Explanations and their scoring against planted truth.

- :func:`modality_contribution`: occlusion-based share of each modality (or column group) in a
  model's output (Gapp et al. 2025, used by P2): replace one input group with a baseline,
  ``d_i = sum |f(x) - f(x with group i occluded)|`` over samples and outputs,
  ``m_i = d_i / sum_j d_j``; also per sample.
- :func:`occlusion_map`: occlusion sensitivity of one volume, patch by patch, many occluded
  copies per forward pass (P2 Appendix A uses mask [8, 8, 10] on 224x224x320: 25,088 passes).
  It equals MONAI's ``OcclusionSensitivity`` with ``overlap=0`` and a constant baseline, but
  builds each batch with one vectorised mask instead of a Python loop per copy.
- :func:`localisation_scores`: how much of a map's mass falls where the truth says the signal
  is, against what a random map gives, and the pointing game.
- :func:`grad_cam`: Grad-CAM of one sample at any layer (P1: the last ResNet stage of a 3D
  volume), upsampled to the input grid; equal to captum's ``LayerGradCam`` + interpolation.
  With ``weighting="elementwise"`` it is HiResCAM (captum's ``LayerGradientXActivation`` summed
  over channels); :func:`grad_cam_layers` takes several layers and weightings in one pass.
- :func:`input_gradient`: the gradient with respect to the input, plain (saliency) or guided
  (guided backpropagation; times Grad-CAM it is Guided Grad-CAM); equal to captum's
  ``Saliency`` (before abs) and ``GuidedBackprop``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmlib import core

__all__ = ["GradCamMap", "OcclusionMap", "grad_cam", "grad_cam_layers", "grid_ceiling", "input_gradient",
           "localisation_scores", "modality_contribution", "occlusion_map", "patch_grid", "upsample_layer_map"]

Forward = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


def _occlude(batch: Mapping[str, torch.Tensor], key: str, columns: Sequence[int] | None, baseline: float) -> dict:
    out = dict(batch)
    x = batch[key].clone()
    if columns is None:
        x.fill_(baseline)
    else:
        x[:, list(columns)] = baseline
    out[key] = x
    return out


def modality_contribution(
    forward: Forward,
    batches: Iterable[Mapping[str, torch.Tensor]],
    groups: Mapping[str, tuple[str, Sequence[int] | None]],
    *,
    baseline: float = 0.0,
    device: torch.device | str = "cpu",
) -> tuple[pd.Series, pd.DataFrame]:
    """Occlusion-based modality contribution, cohort level and per sample.

    Args:
        forward: ``forward(batch) -> (B,) or (B, K)`` model output (e.g. ``lambda b: model(b)["rfs"]``).
        batches: batch dicts (inputs only are used).
        groups: name -> ``(batch key, columns)``; ``columns=None`` occludes the whole input
            (P2: ``h_vision = 1``), a list occludes those columns together (gender's two bits).
        baseline: value the occluded input is set to (P2: zeros).
        device: where to run.

    Returns:
        ``(cohort, per_sample)``: ``cohort`` is a Series of shares summing to 1 (index = group
        names, ``m_i = d_i / sum_j d_j`` with ``d_i`` summed over all samples); ``per_sample``
        has one row per sample, shares per group (rows sum to 1; NaN where no group changes
        the output) and the raw ``d_<group>``.
    """
    if not groups:
        raise ValueError("modality_contribution needs at least one group")
    device = torch.device(device)
    d_rows = []
    with torch.no_grad():
        for batch in batches:
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            for name, (key, _) in groups.items():
                if key not in batch:
                    raise KeyError(f"group {name!r} occludes batch key {key!r}, which the batch lacks ({sorted(batch)})")
            ref = forward(batch).float()
            ref = ref.reshape(ref.shape[0], -1)
            d = torch.zeros(ref.shape[0], len(groups), dtype=torch.float64)
            for j, (name, (key, cols)) in enumerate(groups.items()):
                occ = forward(_occlude(batch, key, cols, baseline)).float().reshape(ref.shape[0], -1)
                d[:, j] = (ref - occ).abs().sum(dim=1).double().cpu()
            d_rows.append(d)
    if not d_rows:
        raise ValueError("modality_contribution got no batches")
    d = torch.cat(d_rows).numpy()
    names = list(groups)
    total = d.sum()
    cohort = pd.Series(d.sum(axis=0) / total if total > 0 else np.full(len(names), np.nan), index=names, name="share")
    row_tot = d.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(row_tot > 0, d / row_tot, np.nan)
    per_sample = pd.DataFrame(shares, columns=names)
    for j, n in enumerate(names):
        per_sample[f"d_{n}"] = d[:, j]
    return cohort, per_sample


def patch_grid(spatial: Sequence[int], mask_size: Sequence[int]) -> list[np.ndarray]:
    """Patch start indices per axis: 0, m, 2m, ...; a last patch ends at the edge when m does not divide the size."""
    starts = []
    for s, m in zip(spatial, mask_size):
        if not 0 < m <= s:
            raise ValueError(f"mask size {tuple(mask_size)} must be positive and fit the image {tuple(spatial)}")
        st = list(range(0, s - m + 1, m))
        if st[-1] + m < s:
            st.append(s - m)
        starts.append(np.asarray(st))
    return starts


@dataclass
class OcclusionMap:
    """Result of :func:`occlusion_map`.

    Attributes:
        reference: model output on the intact input, (K,).
        occluded: output with each patch occluded, on the patch grid (Px, Py, Pz, K).
        voxel_occluded: ``occluded`` spread back to voxels (X, Y, Z, K); where a last patch
            overlaps its neighbour the values are averaged (as MONAI does).
        sensitivity: ``|reference - occluded|`` summed over outputs, per voxel (X, Y, Z): the
            importance map P2 shows (bright = occluding here changes the prediction).
        starts: patch start indices per axis.
        mask_size: patch size.
        forward_passes: number of occluded copies evaluated.
    """

    reference: np.ndarray
    occluded: np.ndarray
    voxel_occluded: np.ndarray
    sensitivity: np.ndarray
    starts: list[np.ndarray]
    mask_size: tuple[int, ...]
    forward_passes: int


def occlusion_map(
    forward: Forward,
    inputs: Mapping[str, torch.Tensor],
    *,
    key: str = "image",
    mask_size: Sequence[int] = (8, 8, 10),
    baseline: float = 0.0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    desc: str | None = "occlusion",
) -> OcclusionMap:
    """Occlusion sensitivity of one sample: each patch of ``inputs[key]`` set to ``baseline`` in turn.

    Args:
        forward: ``forward(batch) -> (B,) or (B, K)``.
        inputs: one sample's batch dict, ``inputs[key]`` of shape (1, C, X, Y, Z); the other
            entries (e.g. the tabular row) are repeated along the batch.
        key: the volume to occlude.
        mask_size: patch edge per axis (voxels); patches tile the volume without overlap
            except a last patch that ends at the edge.
        baseline: value of an occluded patch.
        batch_size: occluded copies per forward pass.
        device: where to run.
        desc: progress-bar label (None hides it).
    """
    device = torch.device(device)
    x = inputs[key]
    if x.ndim != 5 or x.shape[0] != 1:
        raise ValueError(f"occlusion_map needs inputs[{key!r}] of shape (1, C, X, Y, Z), got {tuple(x.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    spatial = tuple(x.shape[2:])
    mask_size = tuple(int(m) for m in mask_size)
    if len(mask_size) != len(spatial):
        raise ValueError(f"mask_size {mask_size} needs one value per spatial axis of {spatial}")
    starts = patch_grid(spatial, mask_size)
    corners = np.stack(np.meshgrid(*starts, indexing="ij"), axis=-1).reshape(-1, len(spatial))
    base = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
    xs = base[key]
    axes = [torch.arange(s, device=device) for s in spatial]
    outs = []
    with torch.no_grad():
        ref = forward(base).float().reshape(1, -1)
        chunks = range(0, len(corners), batch_size)
        for i in core.progress(chunks, desc=desc, disable=desc is None, leave=False):
            c = torch.as_tensor(corners[i:i + batch_size], device=device)
            b = c.shape[0]
            inside = torch.ones((b, *spatial), dtype=torch.bool, device=device)
            for ax, (grid, m) in enumerate(zip(axes, mask_size)):
                lo = c[:, ax].view(b, *([1] * len(spatial)))
                g = grid.view(*[-1 if j == ax else 1 for j in range(len(spatial))]).unsqueeze(0)
                inside &= (g >= lo) & (g < lo + m)
            occ = torch.where(inside.unsqueeze(1), torch.as_tensor(baseline, dtype=xs.dtype, device=device),
                              xs.expand(b, *xs.shape[1:]))
            batch = {k: (v.expand(b, *v.shape[1:]) if torch.is_tensor(v) else v) for k, v in base.items()}
            batch[key] = occ
            outs.append(forward(batch).float().reshape(b, -1).cpu())
    occluded = torch.cat(outs).numpy()
    k = occluded.shape[1]
    grid_shape = tuple(len(s) for s in starts)
    occluded_grid = occluded.reshape(*grid_shape, k)
    acc = np.zeros((*spatial, k), dtype=np.float64)
    cnt = np.zeros(spatial, dtype=np.float64)
    for idx, corner in enumerate(corners):
        sl = tuple(slice(int(c0), int(c0) + m) for c0, m in zip(corner, mask_size))
        acc[sl] += occluded[idx]
        cnt[sl] += 1
    voxel = (acc / cnt[..., None]).astype(np.float32)
    reference = ref.cpu().numpy()[0]
    sens = np.abs(reference - voxel).sum(axis=-1).astype(np.float32)
    return OcclusionMap(reference=reference, occluded=occluded_grid, voxel_occluded=voxel, sensitivity=sens,
                        starts=starts, mask_size=mask_size, forward_passes=len(corners))


def localisation_scores(
    attribution: np.ndarray,
    truth_mask: np.ndarray,
    *,
    patch: Sequence[int] | None = None,
    n_random: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Score a non-negative attribution map against a binary truth mask.

    Args:
        attribution: (X, Y, Z) importance, >= 0 (e.g. :attr:`OcclusionMap.sensitivity`).
        truth_mask: (X, Y, Z) bool/0-1: where the planted signal is.
        patch: the map's resolution. With a patch size the truth is taken at that resolution
            (every patch touching the mask counts as "inside"), which is fair to a map that
            cannot be finer than its patches.
        n_random: random maps for the chance level: the map's own patch values (or voxels)
            shuffled over the grid, which keeps its value distribution.
        seed: of the shuffles.

    Returns:
        dict with ``mass_inside`` (share of attribution mass inside the truth region),
        ``chance_mean`` / ``chance_p95`` (of shuffled maps), ``ratio`` (mass / chance mean),
        ``region_fraction`` (share of the volume in the region), ``pointing_game`` (the map's
        maximum lies in the region), ``rank_percentile`` (of the region's best value among all
        cells; 100 = the top cell).
    """
    a = np.asarray(attribution, dtype=np.float64)
    m = np.asarray(truth_mask).astype(bool)
    if a.shape != m.shape:
        raise ValueError(f"attribution {a.shape} and truth_mask {m.shape} differ in shape")
    if (a < 0).any():
        raise ValueError("attribution must be non-negative (take abs() of a signed map first)")
    if not m.any():
        raise ValueError("truth_mask is empty: nothing to localise")
    if patch is not None:
        starts = patch_grid(a.shape, patch)
        corners = np.stack(np.meshgrid(*starts, indexing="ij"), axis=-1).reshape(-1, a.ndim)
        vals, inside, sizes = [], [], []
        for c in corners:
            sl = tuple(slice(int(c0), int(c0) + p) for c0, p in zip(c, patch))
            vals.append(a[sl].mean())
            inside.append(m[sl].any())
            sizes.append(a[sl].size)
        cells, region, w = np.asarray(vals), np.asarray(inside), np.asarray(sizes, dtype=float)
    else:
        cells, region, w = a.ravel(), m.ravel(), np.ones(a.size)
    mass = cells * w
    total = mass.sum()
    if total <= 0:
        return {"mass_inside": float("nan"), "chance_mean": float(region.mean()), "chance_p95": float("nan"),
                "ratio": float("nan"), "region_fraction": float((w * region).sum() / w.sum()),
                "pointing_game": False, "rank_percentile": float("nan")}
    inside_share = float(mass[region].sum() / total)
    rng = np.random.default_rng(seed)
    chance = np.empty(n_random)
    if patch is None:
        # Equal cell sizes: a shuffled map puts on the region the values of a uniformly random set of
        # as many cells, and its total is unchanged. Drawing that set is ~100x faster than permuting
        # every voxel of a volume (the same distribution).
        k = int(region.sum())
        for i in range(n_random):
            chance[i] = cells[rng.choice(len(cells), size=k, replace=False)].sum() / total
    else:
        for i in range(n_random):
            perm = rng.permutation(len(cells))
            pm = cells[perm] * w
            chance[i] = pm[region].sum() / pm.sum()
    best_in_region = cells[region].max()
    rank = float((cells <= best_in_region).mean() * 100)
    return {
        "mass_inside": inside_share,
        "chance_mean": float(chance.mean()),
        "chance_p95": float(np.quantile(chance, 0.95)),
        "ratio": inside_share / float(chance.mean()) if chance.mean() > 0 else float("nan"),
        "region_fraction": float((w * region).sum() / w.sum()),
        "pointing_game": bool(region[int(np.argmax(cells))]),
        "rank_percentile": rank,
    }


def grid_ceiling(grid: Sequence[int], truth_mask: np.ndarray) -> dict[str, Any]:
    """The best ``ratio`` (:func:`localisation_scores`, per voxel) any map on a layer's grid can reach.

    A map computed on a coarse grid and upsampled to the input (as :func:`grad_cam` does) cannot
    be sharper than the grid: on a 2 x 2 x 2 grid even a perfect map spreads its mass over an
    octant. Its ratio to a shuffled map is, in expectation over the shuffles,
    ``(mass on the truth / total mass) / (truth share of the voxels)``. Upsampling is linear, so for
    a non-negative map ``a`` on the grid that ratio is an average of the per-cell ratios
    ``(U^T m)_c / (U^T 1)_c / share`` weighted by ``a_c (U^T 1)_c`` (``U`` the upsampling, ``m`` the
    mask); the maximum is the map that is one cell, the best one. ``U^T`` is the gradient of the
    upsampling, taken by autograd.

    Args:
        grid: the layer's spatial shape, e.g. ``(2, 2, 2)``.
        truth_mask: (X, Y, Z) bool/0-1 on the input grid, not empty.

    Returns:
        dict with ``ceiling_ratio`` (the exact best expected ratio; ``1 / share`` when the grid is the
        input grid and one voxel lies in the truth) and ``best_cell`` (its index on the grid).
    """
    m = torch.as_tensor(np.asarray(truth_mask, dtype=np.float64))
    if not bool(m.any()):
        raise ValueError("truth_mask is empty: nothing to localise")
    grid = tuple(int(g) for g in grid)
    if len(grid) != m.ndim:
        raise ValueError(f"a {len(grid)}-d grid {grid} does not match a {m.ndim}-d mask {tuple(m.shape)}")
    cells = torch.zeros(1, 1, *grid, dtype=torch.float64, requires_grad=True)
    up = _upsample(cells, m.shape)[0, 0]
    inside = torch.autograd.grad((up * m).sum(), cells, retain_graph=True)[0][0, 0].numpy()  # U^T m
    total = torch.autograd.grad(up.sum(), cells)[0][0, 0].numpy()  # U^T 1: each cell's mass once upsampled
    share = float(m.mean())
    with np.errstate(divide="ignore", invalid="ignore"):
        per_cell = np.where(total > 0, inside / total, 0.0) / share
    best = int(np.argmax(per_cell))
    return {"ceiling_ratio": float(per_cell.ravel()[best]), "best_cell": tuple(int(i) for i in np.unravel_index(best, grid))}


# --------------------------------------------------------------------------- Grad-CAM (P1)


@dataclass
class GradCamMap:
    """Result of :func:`grad_cam` for one sample.

    Attributes:
        cam: Grad-CAM on the input grid (X, Y, Z), float32, >= 0 (signed with ``relu=False``): ``layer_cam`` upsampled
            trilinearly (``align_corners=False``) to the spatial size of ``inputs[key]``; equal to
            ``layer_cam`` when ``upsample=False``. Not normalised (MONAI min-max scales its map,
            captum does not).
        layer_cam: ``ReLU(sum_c w_c A_c)`` on the layer's grid, float32, >= 0 (without the ReLU
            when ``relu=False``; ``ReLU(sum_c dy/dA_c * A_c)`` for HiResCAM).
        score: the explained output (the scalar whose gradient was taken).
        target: the class column explained (None for a (B,) output).
        weights: the per-channel weights ``w_c`` (C,): gradients averaged over space (Grad-CAM's
            weights, also for HiResCAM, which does not use them).
    """

    cam: np.ndarray
    layer_cam: np.ndarray
    score: float
    target: int | None
    weights: np.ndarray


def _explained_score(y: torch.Tensor, target: int | None) -> torch.Tensor:
    """The scalar an explanation differentiates: ``y[0]`` of a (1,) output, ``y[0, target]`` of a (1, K) one."""
    if not torch.is_tensor(y):
        raise TypeError(f"forward must return a tensor, got {type(y).__name__}")
    if y.shape[0] != 1:
        raise ValueError(f"forward returned batch size {y.shape[0]} for one sample")
    if y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1 and target is None):
        if target not in (None, 0):
            raise ValueError(f"target={target} given for a single-output model (output shape {tuple(y.shape)})")
        return y.reshape(-1)[0]
    if y.ndim == 2:
        if target is None:
            raise ValueError(f"forward returns {y.shape[1]} columns: pass target= to pick one")
        if not -y.shape[1] <= target < y.shape[1]:
            raise IndexError(f"target {target} out of range for {y.shape[1]} columns")
        return y[0, target]
    raise ValueError(f"forward must return (B,) or (B, K), got {tuple(y.shape)}")


def _interpolate_mode(ndim: int) -> str:
    modes = {1: "linear", 2: "bilinear", 3: "trilinear"}
    if ndim not in modes:
        raise ValueError(f"grad_cam supports 1-3 spatial dimensions, got {ndim}")
    return modes[ndim]


def _upsample(layer_map: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(1, 1, *S) -> (1, 1, *size): linear interpolation as Grad-CAM upsamples (``align_corners=False``)."""
    return torch.nn.functional.interpolate(layer_map, size=tuple(size), mode=_interpolate_mode(len(size)),
                                           align_corners=False)


def upsample_layer_map(layer_map: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """A map on a layer's grid (e.g. a part of :attr:`GradCamMap.layer_cam`) on the input grid ``size``,
    interpolated exactly as :func:`grad_cam` upsamples its ``cam``; float32."""
    t = torch.as_tensor(np.asarray(layer_map, dtype=np.float32))[None, None]
    if t.ndim - 2 != len(size):
        raise ValueError(f"a {t.ndim - 2}-d layer map cannot be upsampled to {tuple(size)}")
    return _upsample(t, size)[0, 0].numpy()


def grad_cam(
    forward: Forward,
    layer: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    *,
    target: int | None = None,
    key: str = "image",
    upsample: bool = True,
    model: torch.nn.Module | None = None,
    relu: bool = True,
    weighting: str = "mean",
) -> GradCamMap:
    """Grad-CAM (Selvaraju et al. 2017) of one sample at ``layer`` (P1: the last ResNet stage), or HiResCAM.

    A forward hook on ``layer`` captures its output ``A`` (1, C, *S) and hands a copy on to the
    rest of the network, so in-place operations after the layer cannot change the captured
    activations; the gradient of the explained output with respect to ``A`` is taken with
    :func:`torch.autograd.grad` (parameters' ``.grad`` are left untouched). Then
    ``w_c = mean over S of dy/dA_c`` and ``layer_cam = ReLU(sum_c w_c A_c)``, upsampled to
    the input's spatial size. This is captum's ``LayerGradCam(relu_attributions=True)`` and
    MONAI's ``GradCAM`` before its min-max scaling. The hook is removed afterwards, also on error.

    ``weighting="elementwise"`` gives HiResCAM (Draelos & Carin 2020) instead:
    ``layer_cam = ReLU(sum_c dy/dA_c * A_c)``, the gradient multiplied with the activations
    voxel by voxel rather than averaged over the grid first (captum's
    ``LayerGradientXActivation`` summed over channels). Grad-CAM's averaging can give a channel
    the sign of its gradient elsewhere in the volume, so a region that raises the output can
    vanish from the map; HiResCAM keeps each voxel's own contribution. When the layer is
    followed only by global average pooling and a linear head the gradient is the same at every
    voxel and the two maps are equal.

    Only batch size 1 is supported (a (1, C, X, Y, Z) volume): one call explains one sample.

    Args:
        forward: ``forward(batch) -> (B,) or (B, K)`` model output (e.g.
            ``lambda b: model(b)["logits"]``).
        layer: the module whose output is explained (a conv stage; its output must be a
            tensor of shape (1, C, *spatial)).
        inputs: one sample's batch dict; ``inputs[key]`` of shape (1, C, X, Y, Z).
        target: class column of a (B, K) output; None for a (B,) output (or (B, 1)).
        key: the volume the map is upsampled to.
        upsample: interpolate to the input grid (else ``cam`` is the layer-grid map).
        model: the model to put in eval mode during the call (dropout off, batch-norm running
            statistics); each submodule's train/eval flag is restored afterwards. When
            ``forward`` is itself an ``nn.Module`` it is used if ``model`` is None. Without
            either, the caller is responsible for eval mode.
        relu: Grad-CAM's ReLU (captum's ``relu_attributions``). ``False`` keeps the signed map
            ``sum_c w_c A_c``: its negative part is where the channel weights say the layer's
            activations lower the explained output.
        weighting: ``"mean"`` (Grad-CAM: each channel weighted by its gradient averaged over
            space) or ``"elementwise"`` (HiResCAM: each voxel by its own gradient).

    Returns:
        :class:`GradCamMap`.
    """
    name = type(layer).__name__
    return grad_cam_layers(forward, {name: layer}, inputs, target=target, key=key, upsample=upsample, model=model,
                           relu=relu, weightings=(weighting,))[(name, weighting)]


_WEIGHTINGS = ("mean", "elementwise")


def grad_cam_layers(
    forward: Forward,
    layers: Mapping[str, torch.nn.Module],
    inputs: Mapping[str, torch.Tensor],
    *,
    target: int | None = None,
    key: str = "image",
    upsample: bool = True,
    model: torch.nn.Module | None = None,
    relu: bool = True,
    weightings: Sequence[str] = ("mean",),
) -> dict[tuple[str, str], GradCamMap]:
    """:func:`grad_cam` at several layers and weightings from one forward and one backward pass.

    Every layer of ``layers`` (name -> module) is hooked at once and the explained output is
    differentiated with respect to all their outputs together, so a sweep over a network's
    stages costs one pass instead of one per stage and weighting. Each returned map equals what
    :func:`grad_cam` gives for that layer and weighting; the arguments are :func:`grad_cam`'s.

    Returns:
        ``{(layer name, weighting): GradCamMap}`` for every layer and every weighting.
    """
    bad = [w for w in weightings if w not in _WEIGHTINGS]
    if bad or not weightings:
        raise ValueError(f"weighting must be 'mean' (Grad-CAM) or 'elementwise' (HiResCAM), got {bad or weightings!r}")
    if not layers:
        raise ValueError("grad_cam_layers needs at least one layer")
    if key not in inputs:
        raise KeyError(f"grad_cam explains inputs[{key!r}], which the batch lacks ({sorted(inputs)})")
    x = inputs[key]
    if not torch.is_tensor(x) or x.ndim < 3 or x.shape[0] != 1:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"grad_cam explains one sample: inputs[{key!r}] must be (1, C, *spatial), got {shape}")
    if model is None and isinstance(forward, torch.nn.Module):
        model = forward
    batch = dict(inputs)
    if x.is_floating_point():
        # so the graph reaches the layer even when every parameter before it is frozen
        batch[key] = x.detach().clone().requires_grad_(True)

    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def hook_for(name: str):
        def hook(_module, _inp, out):
            if not torch.is_tensor(out):
                raise TypeError(f"grad_cam needs a layer whose output is a tensor, got {type(out).__name__} ({name})")
            captured[name].append(out)
            return out.clone()
        return hook

    modes = [(m, m.training) for m in model.modules()] if model is not None else []
    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers.items()]
    try:
        if model is not None:
            model.eval()
        with torch.enable_grad():
            score = _explained_score(forward(batch), target)
            acts = []
            for name, outs in captured.items():
                if not outs:
                    raise RuntimeError(f"the layer {name!r} was not called by forward: is it part of the model?")
                act = outs[-1]
                if act.ndim < 3 or act.shape[0] != 1:
                    raise ValueError(f"the layer's output must be (1, C, *spatial), got {tuple(act.shape)} ({name})")
                if not act.requires_grad:
                    raise RuntimeError(f"the layer's output does not require grad: nothing to differentiate ({name})")
                acts.append(act)
            grads = torch.autograd.grad(score, acts, allow_unused=False)
    finally:
        for h in handles:
            h.remove()
        for m, was_training in modes:
            m.train(was_training)
    size = tuple(x.shape[2:])
    out: dict[tuple[str, str], GradCamMap] = {}
    with torch.no_grad():
        for name, act, grad in zip(layers, acts, grads):
            act, grad = act.detach().float(), grad.detach().float()
            if upsample and len(size) != act.ndim - 2:
                raise ValueError(f"layer output {tuple(act.shape)} and input {tuple(x.shape)} differ in spatial dims")
            w = grad.mean(dim=tuple(range(2, act.ndim)), keepdim=True)
            for weighting in weightings:
                lcam = ((w if weighting == "mean" else grad) * act).sum(dim=1, keepdim=True)
                if relu:
                    lcam = torch.relu(lcam)
                cam = lcam
                if upsample:
                    cam = _upsample(lcam, size)
                    if relu:
                        cam = cam.clamp_min(0)
                out[(name, weighting)] = GradCamMap(
                    cam=cam[0, 0].cpu().numpy().astype(np.float32), layer_cam=lcam[0, 0].cpu().numpy().astype(np.float32),
                    score=float(score.detach()), target=target, weights=w.reshape(-1).cpu().numpy().astype(np.float32))
    return out


# --------------------------------------------------------------------------- input gradients


class _GuidedReLU(torch.autograd.Function):
    """ReLU whose backward passes only positive gradients through positive activations (Springenberg et al. 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = x.clamp_min(0)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return grad.clamp_min(0) * (y > 0).to(grad.dtype)


def input_gradient(
    forward: Forward,
    inputs: Mapping[str, torch.Tensor],
    *,
    target: int | None = None,
    key: str = "image",
    guided: bool = False,
    model: torch.nn.Module | None = None,
) -> np.ndarray:
    """Gradient of one sample's explained output with respect to ``inputs[key]`` (signed).

    ``guided=False`` is the plain gradient of saliency maps (Simonyan et al. 2014): take its
    absolute value for a map. ``guided=True`` is guided backpropagation (Springenberg et al.
    2015): every ``nn.ReLU`` module of ``model`` passes back only positive gradients, and only
    where its input was positive. Multiplied by an upsampled Grad-CAM it is the Grad-CAM paper's
    "Guided Grad-CAM". Guided maps are sharp, but Adebayo et al. (2018) showed that they change
    little when the network's weights are randomised: they largely reconstruct the image's edges
    and bright spots. Compare a map with the same map of an untrained network before reading it
    as what the model learned (P1 does).

    Args:
        forward, target, key, model: as for :func:`grad_cam` (one sample; ``model`` is put in
            eval mode during the call and restored). ``guided=True`` needs ``model`` (or an
            ``nn.Module`` ``forward``), whose ``nn.ReLU`` modules are switched for the call;
            ReLUs called as functions are not seen.

    Returns:
        float32 array shaped like ``inputs[key][0]`` (C, *spatial).
    """
    if key not in inputs:
        raise KeyError(f"input_gradient explains inputs[{key!r}], which the batch lacks ({sorted(inputs)})")
    x = inputs[key]
    if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim < 2 or x.shape[0] != 1:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"input_gradient explains one floating-point sample: inputs[{key!r}] must be (1, C, ...), "
                         f"got {shape}")
    if model is None and isinstance(forward, torch.nn.Module):
        model = forward
    relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU)] if model is not None else []
    if guided and not relus:
        raise ValueError("guided=True needs the model (model=...) and at least one nn.ReLU module in it")
    xg = x.detach().clone().requires_grad_(True)
    batch = dict(inputs, **{key: xg})
    modes = [(m, m.training) for m in model.modules()] if model is not None else []
    saved = [(m, m.__dict__.get("forward")) for m in relus] if guided else []
    try:
        if model is not None:
            model.eval()
        for m, _ in saved:
            m.forward = _GuidedReLU.apply
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(_explained_score(forward(batch), target), xg)
    finally:
        for m, own in saved:
            if own is None:
                del m.forward
            else:
                m.forward = own
        for m, was_training in modes:
            m.train(was_training)
    return grad[0].detach().float().cpu().numpy()
