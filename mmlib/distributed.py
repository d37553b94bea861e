"""Data-parallel training under ``torchrun``: process-group setup, ranks and batch sharding.

:func:`mmlib.train.fit` uses these helpers to run unchanged under
``torchrun --nproc_per_node=N script.py``: every process builds the same global batches (the
pipelines seed them by the epoch), trains on its own contiguous :func:`shard` inside
:class:`torch.nn.parallel.DistributedDataParallel`, and all-reduces what it logs
(:func:`all_reduce_sums`). With equal shards, DDP's average of the per-rank mean-loss gradients
is the gradient of the mean loss over the global batch, so one step on N processes is one step
of the single-process run (up to floating-point summation order); the contrastive losses of
:mod:`mmlib.losses` gather their negatives across ranks for the same reason.

- :func:`setup` initialises the default process group from torchrun's environment variables
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and returns the
  device this process should use; on a single process it initialises nothing.
- :func:`rank`, :func:`world_size`, :func:`is_main`, :func:`barrier` and :func:`cleanup` are
  safe to call with or without a process group (one process is rank 0 of a world of 1).
- :class:`GlobalBatchNorm` (:func:`global_batchnorm` swaps it in for a model's BatchNorm layers,
  as ``fit`` does under several processes) normalises over the global batch on any backend,
  gloo included, where :class:`torch.nn.SyncBatchNorm` accepts GPU tensors only.
- :func:`shard` takes this rank's rows of a global batch and refuses a batch that does not
  divide evenly: unequal shards would weight the ranks' mean losses unequally and make the
  gathered contrastive losses fail.

A sketch of a script (``fit`` calls :func:`setup` itself when launched by torchrun, so the
explicit call only matters for picking the device)::

    device = distributed.setup()          # cuda:LOCAL_RANK, or cpu with gloo
    history = fit(model, ..., device=device)
    distributed.cleanup()
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "GatherWithGrad",
    "GlobalBatchNorm",
    "all_reduce_sums",
    "barrier",
    "batch_rows",
    "cleanup",
    "collective_device",
    "collective_world",
    "gather_local_slot",
    "global_batchnorm",
    "is_initialized",
    "is_main",
    "launched_world_size",
    "local_only",
    "rank",
    "restore_batchnorm",
    "setup",
    "shard",
    "trim",
    "world_size",
]


def is_initialized() -> bool:
    """Whether a default process group exists (``False`` where torch has no distributed support)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def launched_world_size() -> int:
    """The world size torchrun announced in ``WORLD_SIZE`` (1 when not launched by torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def setup(backend: str = "auto") -> torch.device:
    """Initialise the default process group from torchrun's environment; return this process's device.

    Under torchrun with ``WORLD_SIZE > 1`` (and no process group yet) this calls
    ``init_process_group(backend, init_method="env://")``, which reads ``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR`` and ``MASTER_PORT``. With CUDA available the current CUDA device is set to
    ``LOCAL_RANK`` first, so that NCCL and any ``"cuda"`` tensor land on this process's GPU.
    Calling it again, or with a group already initialised, changes nothing.

    Args:
        backend: ``"auto"`` (NCCL when CUDA is available, else gloo), ``"nccl"`` or ``"gloo"``.

    Returns:
        ``cuda:LOCAL_RANK`` under torchrun with CUDA, ``cuda`` on a single process with CUDA,
        else ``cpu``.

    Raises:
        ValueError: for an unknown ``backend``.
        RuntimeError: if torchrun asks for several processes but torch lacks distributed support.
    """
    backend = backend.lower()
    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"backend must be 'auto', 'nccl' or 'gloo', got {backend!r}")
    cuda = torch.cuda.is_available()
    world = launched_world_size()
    if world == 1 and not is_initialized():
        return torch.device("cuda" if cuda else "cpu")
    if not torch.distributed.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed support")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not is_initialized():
        if backend == "auto":
            backend = "nccl" if cuda else "gloo"
        torch.distributed.init_process_group(backend, init_method="env://")
    return device


def _current_rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return _current_rank()


def world_size() -> int:
    """The number of processes in the default group (1 without one)."""
    return torch.distributed.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Whether this is rank 0: the process that writes checkpoints and shows progress bars."""
    return _current_rank() == 0


def collective_device() -> torch.device:
    """Where small tensors for collectives must live: the current GPU under NCCL, else the CPU."""
    if is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (a no-op on one process), e.g. until rank 0 has written a checkpoint."""
    if world_size() > 1:
        if torch.distributed.get_backend() == "nccl":
            torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
        else:
            torch.distributed.barrier()


def cleanup() -> None:
    """Destroy the default process group if there is one (call it once at the end of a script)."""
    if is_initialized():
        torch.distributed.destroy_process_group()


def _rows(batch: Mapping[str, Any]) -> int:
    for v in batch.values():
        if (torch.is_tensor(v) or isinstance(v, np.ndarray)) and v.ndim > 0:
            return int(v.shape[0])
    raise ValueError(f"cannot shard a batch without a batched tensor (keys {sorted(batch)})")


def shard(batch: Mapping[str, Any], rank: int | None = None, world: int | None = None) -> dict[str, Any]:
    """Rank ``rank``'s contiguous slice of a global batch of ``world`` equal slices.

    The batch size B is the leading size of the first tensor (or array) with a batch dimension.
    Every tensor or NumPy array whose leading size is B, and every list or tuple of length B
    (subject ids, texts), is cut to rows ``rank * B/world .. (rank+1) * B/world - 1``; other
    values (scalars, per-batch constants of another size) pass through unchanged. Contiguous
    slices keep rank r's rows at ``r*b .. r*b+b-1`` of the global batch, which is where
    :class:`mmlib.losses.ClipLoss` expects them when it gathers.

    Args:
        batch: a dict batch as yielded by ``train_batches(epoch)``.
        rank: the slice to take (default: this process's rank).
        world: the number of slices (default: the world size).

    Returns:
        A new dict with the same keys (holding the same objects when ``world`` is 1).

    Raises:
        ValueError: if B is not divisible by ``world`` (equal shards are what make DDP's
            gradient average the global-batch gradient; drop the last incomplete batch or use
            a batch size that is a multiple of the world size), if ``rank`` is out of range,
            or if the batch has no batched tensor.
    """
    rank = _current_rank() if rank is None else int(rank)
    world = world_size() if world is None else int(world)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard: need 0 <= rank < world, got rank={rank}, world={world}")
    b = _rows(batch)
    if b % world:
        raise ValueError(
            f"a global batch of {b} rows cannot be split evenly over a world size of {world} processes; "
            f"use a batch size that is a multiple of {world} (and drop the last incomplete batch)"
        )
    if world == 1:
        return dict(batch)
    per = b // world
    lo, hi = rank * per, (rank + 1) * per
    out: dict[str, Any] = {}
    for k, v in batch.items():
        array = (torch.is_tensor(v) or isinstance(v, np.ndarray)) and v.ndim > 0 and v.shape[0] == b
        if array or (isinstance(v, (list, tuple)) and len(v) == b):
            out[k] = v[lo:hi]
        else:
            out[k] = v
    return out


def batch_rows(batch: Mapping[str, Any]) -> int:
    """B, the leading size of the batch's first tensor (or array) with a batch dimension (as :func:`shard` sees it)."""
    return _rows(batch)


def trim(batch: Mapping[str, Any], world: int | None = None) -> dict[str, Any] | None:
    """The batch cut to its first ``B - B mod world`` rows, so :func:`shard` splits it evenly.

    Cuts what :func:`shard` would slice (tensors, arrays, lists and tuples of length B) and leaves
    the rest; returns the batch unchanged (a new dict) when B already divides, and None when
    B < ``world`` (nothing to give every rank). Every rank builds the same global batch, so every
    rank makes the same choice.
    """
    world = world_size() if world is None else int(world)
    if world < 1:
        raise ValueError(f"trim: world must be >= 1, got {world}")
    b = _rows(batch)
    keep = b - b % world
    if keep == 0:
        return None
    if keep == b:
        return dict(batch)
    out: dict[str, Any] = {}
    for k, v in batch.items():
        array = (torch.is_tensor(v) or isinstance(v, np.ndarray)) and v.ndim > 0 and v.shape[0] == b
        out[k] = v[:keep] if array or (isinstance(v, (list, tuple)) and len(v) == b) else v
    return out


def all_reduce_sums(values: Mapping[str, float]) -> dict[str, float]:
    """Sum each named float over all ranks (in float64); the identity on one process.

    Every rank must pass the same keys (checked, so that a mismatch fails with a message
    instead of hanging in a collective of mismatched sizes). The result is bitwise the same on
    every rank, so histories built from it agree everywhere.
    """
    if world_size() == 1:
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    everyone: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(everyone, keys)
    if any(other != keys for other in everyone):
        raise RuntimeError(f"all_reduce_sums: ranks logged different keys: {everyone}")
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


# --------------------------------------------------------------------------- collectives inside a forward


_LOCAL_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("mmlib_local_only", default=False)


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Inside this block nothing a forward computes is gathered across ranks, even under ``torch.distributed``.

    The contrastive losses of :mod:`mmlib.losses` then see only this rank's rows, and
    :class:`GlobalBatchNorm` normalises over them. For code every rank runs on the same whole
    batch (validation and evaluation under torchrun, see :func:`mmlib.train.fit`): gathering
    would then count each row once per rank.
    """
    token = _LOCAL_ONLY.set(True)
    try:
        yield
    finally:
        _LOCAL_ONLY.reset(token)


def collective_world() -> tuple[int, int]:
    """(rank, world size) for a gather inside a forward; (0, 1) without a process group or inside :func:`local_only`."""
    if not _LOCAL_ONLY.get() and is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradients of all ranks into the local slice.

    Each rank's loss uses the other ranks' rows (a contrastive loss's negatives, BatchNorm's
    global statistics); summing the gradient of the gathered tensor over ranks (all_reduce) gives
    every local row the gradient of all ranks' losses, so that DDP's averaging yields exactly the
    gradient of the global-batch loss. Every rank must pass the same shape.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x.contiguous())
        ctx.rank, ctx.batch = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, op=torch.distributed.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def gather_local_slot(x: torch.Tensor) -> torch.Tensor:
    """open_clip's gather (``gather_with_grad=False``): no-grad all_gather, local tensor put back in its slot."""
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, over every rank.

    Under ``torchrun`` each rank holds a shard of the global batch; a plain BatchNorm normalises
    by the shard's mean and variance, so N processes train another model than one process on
    the same global batch (and a contrastive model can tell its shard's rows apart by their
    shared statistics: SimCLR's reason for global BatchNorm). This layer gathers each rank's
    count, mean and sum of squared deviations (:class:`GatherWithGrad`, so the gradient flows
    through the other ranks' statistics too), combines them exactly (Chan et al.'s pairwise
    formula, stable where the mean is large against the spread) and normalises with the global
    mean and biased variance; the running statistics take the unbiased global variance, as
    BatchNorm's do. Statistics are computed in float32 or wider whatever the input dtype.

    Without a process group, inside :func:`local_only`, in eval mode or without batch statistics
    it is BatchNorm. It works on any backend (:class:`torch.nn.SyncBatchNorm` accepts GPU
    tensors only). Every rank must call it with the same number of channels.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (N, C, ...) input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        _, world = collective_world()
        batch_stats = self.training or not self.track_running_stats
        if world == 1 or not batch_stats:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        stat_dtype = torch.promote_types(x.dtype, torch.float32)
        xs = x.to(stat_dtype)
        n = x.numel() // x.shape[1]
        mean = xs.mean(dims)
        m2 = ((xs - mean.view(1, -1, *[1] * (x.dim() - 2))) ** 2).sum(dims)
        count = torch.full_like(mean[:1], float(n))
        stats = GatherWithGrad.apply(torch.cat([count, mean, m2]).unsqueeze(0))  # (world, 1 + 2C)
        c = x.shape[1]
        counts, means, m2s = stats[:, :1], stats[:, 1 : 1 + c], stats[:, 1 + c :]
        total = counts.sum()
        g_mean = (counts * means).sum(0) / total
        g_m2 = m2s.sum(0) + (counts * (means - g_mean) ** 2).sum(0)
        g_var = g_m2 / total
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = g_m2 / (total - 1).clamp_min(1)
                self.running_mean.lerp_(g_mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        shape = (1, -1, *[1] * (x.dim() - 2))
        y = (xs - g_mean.view(shape)) * torch.rsqrt(g_var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.to(stat_dtype).view(shape) + self.bias.to(stat_dtype).view(shape)
        return y.to(x.dtype)


def _hand_over(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` the very Parameter and buffer objects of ``src`` (the optimizer keeps stepping them) and its mode."""
    dst.training = src.training
    dst._parameters.update(src._parameters)
    dst._buffers.update(src._buffers)


def global_batchnorm(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Swap every BatchNorm layer of ``model`` for a :class:`GlobalBatchNorm` sharing its weights and buffers.

    In place (the model object stays the caller's; a model that is itself a BatchNorm layer is
    left alone). Returns what was swapped, ``(parent, name, original)``, for
    :func:`restore_batchnorm`; the state dict keys and tensors are unchanged either way.
    """
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
                new = GlobalBatchNorm(child.num_features, eps=child.eps, momentum=child.momentum,
                                      affine=child.affine, track_running_stats=child.track_running_stats)
                _hand_over(child, new)
                setattr(parent, name, new)
                swapped.append((parent, name, child))
    return swapped


def restore_batchnorm(swapped: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Put back the layers :func:`global_batchnorm` replaced (their weights and statistics are the trained ones)."""
    for parent, name, original in reversed(swapped):
        _hand_over(getattr(parent, name), original)
        setattr(parent, name, original)
