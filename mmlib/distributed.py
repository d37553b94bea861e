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

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "all_reduce_sums",
    "barrier",
    "batch_rows",
    "cleanup",
    "collective_device",
    "is_initialized",
    "is_main",
    "launched_world_size",
    "rank",
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
