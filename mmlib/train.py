"""One training loop, freezing schedules and safe checkpoints.

- :class:`FreezeSchedule` says which named stages of a model are frozen at each epoch. Three
  constructors cover P2's setups: :func:`from_scratch`, :func:`frozen_encoder` and
  :func:`progressive_unfreeze` (P2 Figure 3: the last encoder stage unfreezes at epoch 50, the
  second-last at 100, the third-last at 150 of 250). :func:`trainable_parameter_schedule`
  counts the trainable parameters per epoch.
- :func:`fit` runs epochs with validation, keeps the best checkpoint and resumes from the last.
  The optimizer is built over *all* parameters once; frozen ones carry no gradient, which
  torch's optimizers skip, so a stage unfrozen later is picked up with fresh optimizer state.
  Frozen stages are also put in eval mode (BatchNorm statistics and dropout stay fixed), so a
  frozen stage does not change at all.
- Under ``torchrun`` (or any initialised process group of several processes) :func:`fit` trains
  data-parallel with :class:`~torch.nn.parallel.DistributedDataParallel`: each rank takes its
  :func:`mmlib.distributed.shard` of every global batch, logs globally all-reduced sums, and
  rank 0 alone writes the checkpoints. On one process nothing of this runs.
- Checkpoints are safetensors plus a JSON sidecar; nothing is unpickled. :func:`load_encoder`
  loads pretrained encoder weights strictly: every key and every shape must match, or it raises
  :class:`CheckpointMismatchError` listing what did not (P2's public code loads by name and
  silently skips mismatches).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from mmlib import core, distributed
from mmlib.losses import local_only
from mmlib.results import atomic_write_bytes, atomic_write_text

__all__ = [
    "CheckpointMismatchError",
    "FreezeSchedule",
    "apply_freeze",
    "fit",
    "from_scratch",
    "frozen_encoder",
    "index_batches",
    "load_checkpoint",
    "load_encoder",
    "progressive_unfreeze",
    "save_checkpoint",
    "to_device",
    "trainable_parameter_schedule",
]

log = core.get_logger(__name__)

# --------------------------------------------------------------------------- freezing


@dataclass(frozen=True)
class FreezeSchedule:
    """Which stages are frozen when.

    Args:
        name: a label for tables and figures.
        frozen: stages frozen from epoch 0 (names the model's ``stage_modules`` understands,
            e.g. ``"encoder.layer4"``, or any submodule path).
        unfreeze: ``(epoch, stage)`` pairs: the stage trains from that epoch on (0-based).
    """

    name: str
    frozen: tuple[str, ...] = ()
    unfreeze: tuple[tuple[int, str], ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted({s for _, s in self.unfreeze} - set(self.frozen))
        if unknown:
            raise ValueError(f"schedule {self.name!r} unfreezes stages that are not frozen: {unknown}")
        bad = [e for e, _ in self.unfreeze if e < 0]
        if bad:
            raise ValueError(f"schedule {self.name!r}: unfreeze epochs must be >= 0, got {bad}")

    def frozen_at(self, epoch: int) -> list[str]:
        """Stages frozen during ``epoch``."""
        thawed = {s for e, s in self.unfreeze if e <= epoch}
        return [s for s in self.frozen if s not in thawed]

    def unfrozen_at(self, epoch: int) -> list[str]:
        """Stages that become trainable exactly at ``epoch``."""
        return [s for e, s in self.unfreeze if e == epoch]


def from_scratch() -> FreezeSchedule:
    """Everything trains from epoch 0 (random initialisation is the caller's business)."""
    return FreezeSchedule("from scratch")


def frozen_encoder(model: nn.Module) -> FreezeSchedule:
    """Every encoder stage frozen throughout; only the heads and MLPs train."""
    return FreezeSchedule("pretrained frozen", frozen=tuple(model.encoder_stages()))


def progressive_unfreeze(model: nn.Module, epochs: Sequence[int] = (50, 100, 150)) -> FreezeSchedule:
    """Encoder frozen, then the last stage unfreezes at ``epochs[0]``, the second-last at ``epochs[1]``, ...

    P2 (Figure 3): 50, 100, 150 of 250 epochs; the earlier stages stay frozen throughout.
    """
    stages = list(model.encoder_stages())
    epochs = [int(e) for e in epochs]
    if len(epochs) > len(stages):
        raise ValueError(f"{len(epochs)} unfreeze epochs for {len(stages)} encoder stages")
    if sorted(epochs) != epochs:
        raise ValueError(f"unfreeze epochs must be increasing, got {epochs}")
    unfreeze = tuple((e, stages[-1 - i]) for i, e in enumerate(epochs))
    return FreezeSchedule("pretrained progressive", frozen=tuple(stages), unfreeze=unfreeze)


def _stage_modules(model: nn.Module, stage: str) -> list[nn.Module]:
    if hasattr(model, "stage_modules"):
        return list(model.stage_modules(stage))
    return [model.get_submodule(stage)]


def _stage_params(model: nn.Module, stages: Iterable[str]) -> set[int]:
    ids: set[int] = set()
    for s in stages:
        for m in _stage_modules(model, s):
            ids.update(id(p) for p in m.parameters())
    return ids


def apply_freeze(model: nn.Module, schedule: FreezeSchedule, epoch: int, *, train: bool = True) -> int:
    """Set ``requires_grad`` (and train/eval mode) for ``epoch``; returns the trainable parameter count.

    With ``train=True`` the model is put in train mode except the frozen stages, which go to
    eval mode so their BatchNorm running statistics and dropout do not move.
    """
    frozen_stages = schedule.frozen_at(epoch)
    frozen = _stage_params(model, frozen_stages)
    n = 0
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
        n += p.numel() if p.requires_grad else 0
    model.train(train)
    if train:
        for s in frozen_stages:
            for m in _stage_modules(model, s):
                m.eval()
    return n


def trainable_parameter_schedule(model: nn.Module, schedule: FreezeSchedule, epochs: int) -> pd.DataFrame:
    """Trainable parameters per epoch: columns ``epoch``, ``trainable``, ``frozen``, ``unfrozen_now``.

    Leaves the model's ``requires_grad`` flags as they were.
    """
    before = {id(p): p.requires_grad for p in model.parameters()}
    total = sum(p.numel() for p in model.parameters())
    frozen_cache: dict[tuple[str, ...], int] = {}
    rows = []
    for e in range(epochs):
        key = tuple(schedule.frozen_at(e))
        if key not in frozen_cache:
            ids = _stage_params(model, key)
            frozen_cache[key] = sum(p.numel() for p in model.parameters() if id(p) in ids)
        rows.append({"epoch": e, "trainable": total - frozen_cache[key], "frozen": frozen_cache[key],
                     "unfrozen_now": ", ".join(schedule.unfrozen_at(e))})
    for p in model.parameters():
        p.requires_grad_(before[id(p)])
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- checkpoints


class CheckpointMismatchError(ValueError):
    """Pretrained weights that do not fit the target module; ``.missing``, ``.unexpected``, ``.shapes``."""

    def __init__(self, what: str, missing: list[str], unexpected: list[str], shapes: list[tuple[str, tuple, tuple]]):
        self.missing, self.unexpected, self.shapes = missing, unexpected, shapes
        lines = [f"{what}: the checkpoint does not fit the model"]
        if shapes:
            lines.append(f"  {len(shapes)} shape mismatch(es) (key: checkpoint vs model):")
            lines += [f"    {k}: {tuple(a)} vs {tuple(b)}" for k, a, b in shapes[:20]]
        if missing:
            lines.append(f"  {len(missing)} key(s) the model has but the checkpoint lacks: {missing[:20]}")
        if unexpected:
            lines.append(f"  {len(unexpected)} key(s) in the checkpoint the model lacks: {unexpected[:20]}")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_encoder` loaded: every key of the target, each with a matching shape."""

    keys: int
    parameters: int
    source: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"loaded {self.keys} tensors ({self.parameters:,} values) from {self.source or 'state dict'}: all keys and shapes matched"


def _stem(path: str | Path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def _file(stem: Path, suffix: str) -> Path:
    # not with_suffix: a stem like "run.best" must keep its ".best"
    return stem.with_name(stem.name + suffix)


def save_checkpoint(
    path: str | Path,
    model: nn.Module | Mapping[str, torch.Tensor],
    *,
    meta: Mapping[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write ``<path>.safetensors`` (+ ``<path>.optim.safetensors``) and ``<path>.json``, each atomically.

    ``meta`` (JSON-serialisable: architecture, epoch, losses, seed, ...) goes to the sidecar.
    Returns the ``.safetensors`` path.
    """
    from safetensors.torch import save

    stem = _stem(path)
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    sidecar: dict[str, Any] = {"format": "mmlib-checkpoint-1", "meta": dict(meta or {}), "keys": len(tensors)}
    if optimizer is not None:
        opt_state = optimizer.state_dict()
        flat = {}
        for idx, st in opt_state["state"].items():
            for name, value in st.items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                flat[f"{idx}.{name}"] = t.detach().cpu().contiguous()
        atomic_write_bytes(_file(stem, ".optim.safetensors"), save(flat))
        sidecar["optimizer"] = {"class": type(optimizer).__name__, "param_groups": opt_state["param_groups"]}
    atomic_write_bytes(_file(stem, ".safetensors"), save(tensors))
    atomic_write_text(_file(stem, ".json"), json.dumps(sidecar, indent=1, sort_keys=True, default=str))
    return _file(stem, ".safetensors")


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(state_dict, meta)`` (CPU tensors)."""
    from safetensors.torch import load_file

    stem = _stem(path)
    weights, sidecar = _file(stem, ".safetensors"), _file(stem, ".json")
    for f in (weights, sidecar):
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint file {f} not found (a checkpoint is <stem>.safetensors + <stem>.json)")
    try:
        info = json.loads(sidecar.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{sidecar}: not valid JSON ({e})") from None
    return load_file(str(weights)), dict(info.get("meta", {}))


def _load_optimizer(path: str | Path, optimizer: torch.optim.Optimizer) -> None:
    from safetensors.torch import load_file

    stem = _stem(path)
    info = json.loads(_file(stem, ".json").read_text())
    flat = load_file(str(_file(stem, ".optim.safetensors")))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["optimizer"]["param_groups"]})


def load_encoder(
    target: nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    *,
    prefix: str = "encoder.",
    what: str | None = None,
) -> LoadReport:
    """Load pretrained weights into ``target`` strictly, or raise :class:`CheckpointMismatchError`.

    Args:
        target: the module to fill (e.g. ``model.encoder`` of a fine-tuning model).
        source: a checkpoint path (:func:`save_checkpoint`) or a state dict, e.g. a whole
            autoencoder's; only keys starting with ``prefix`` are used, with the prefix removed.
        prefix: the target's key prefix inside ``source`` ("" for a bare encoder state dict).
        what: a name for the error message.

    Every key of ``target`` must be present with the same shape and every ``prefix`` key of the
    source must be used; otherwise nothing is loaded and the error lists each mismatch.
    """
    meta: dict[str, Any] = {}
    label = what or (str(source) if isinstance(source, (str, Path)) else type(target).__name__)
    if isinstance(source, (str, Path)):
        state, meta = load_checkpoint(source)
    else:
        state = dict(source)
    picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not picked:
        raise CheckpointMismatchError(label, sorted(target.state_dict()), [(f"(no key starts with {prefix!r}; "
                                      f"first keys: {sorted(state)[:5]})")], [])
    own = target.state_dict()
    missing = sorted(set(own) - set(picked))
    unexpected = sorted(set(picked) - set(own))
    shapes = [(k, tuple(picked[k].shape), tuple(own[k].shape)) for k in sorted(set(own) & set(picked))
              if tuple(picked[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(label, missing, unexpected, shapes)
    target.load_state_dict(picked, strict=True)
    return LoadReport(keys=len(picked), parameters=sum(v.numel() for v in picked.values()),
                      source=str(source) if isinstance(source, (str, Path)) else "", meta=meta)


# --------------------------------------------------------------------------- the loop


def index_batches(idx: np.ndarray, batch_size: int, *, shuffle_seed: int | None = None):
    """Consecutive chunks of ``batch_size`` row positions of ``idx`` (shuffled first by a generator seeded
    with ``shuffle_seed``, so an epoch's batches depend on that seed alone)."""
    idx = np.asarray(idx)
    if shuffle_seed is not None:
        idx = np.random.default_rng(shuffle_seed).permutation(idx)
    for i in range(0, len(idx), batch_size):
        yield idx[i:i + batch_size]


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a batch dict to ``device`` (other values pass through)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def fit(
    model: nn.Module,
    *,
    loss_fn: Callable[[nn.Module, dict[str, Any]], torch.Tensor],
    train_batches: Callable[[int], Iterable[Mapping[str, Any]]],
    epochs: int,
    optimizer: torch.optim.Optimizer,
    val_batches: Callable[[], Iterable[Mapping[str, Any]]] | None = None,
    schedule: FreezeSchedule | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = True,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    seed: int = 0,
    meta: Mapping[str, Any] | None = None,
    desc: str = "train",
    lr_factor: Callable[[int], float] | None = None,
    find_unused_parameters: bool = True,
    step_lr_factor: Callable[[int], float] | None = None,
    progress: bool = True,
    global_batchnorm: bool = True,
) -> pd.DataFrame:
    """Train ``model`` for ``epochs``; returns one row per epoch.

    Args:
        model: the network (moved to ``device``).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; the batch is already on ``device``.
            It may instead return a dict with the scalar ``"loss"`` to optimise and further
            scalar terms (e.g. ``{"loss": ..., "itc": ..., "itm": ...}``): each term's epoch mean
            is logged as ``train_<term>`` / ``val_<term>``.
        train_batches: ``train_batches(epoch)`` yields the epoch's batches (shuffle with a
            generator seeded by the epoch, so a resumed run sees the same batches).
        epochs: total epochs.
        optimizer: built over all of the model's parameters (frozen ones are skipped while frozen).
        val_batches: yields validation batches; the mean loss is logged and picks the best epoch.
        schedule: freezing schedule (default: nothing frozen).
        checkpoint: path stem; writes ``<stem>.last`` every epoch (model + optimizer + history,
            for resuming) and ``<stem>.best`` at each new best validation loss (or last epoch
            without validation).
        resume: continue from ``<stem>.last`` when it exists and has the same ``meta``.
        device: where to train.
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"`` (:func:`mmlib.core.autocast`).
        seed: each epoch starts from ``torch.manual_seed(seed, epoch)``: dropout and any
            torch-drawn augmentation depend on (seed, epoch) only, so resuming is exact.
        meta: JSON-able description stored in the checkpoints (architecture, setup, ...).
        desc: progress-bar label.
        lr_factor: ``lr_factor(epoch)`` multiplies each parameter group's initial learning rate
            for that epoch (warmup, cosine decay, ...); a function of the epoch alone, so a
            resumed run follows the same schedule. The epoch's rate is logged as ``lr``.
        step_lr_factor: ``step_lr_factor(step)`` multiplies each parameter group's initial
            learning rate at optimizer step ``step``: the number of optimizer steps this training
            has taken before this one (0 for the first batch of epoch 0, then 1, 2, ... across
            epochs; a per-step warmup or cosine decay). The count is written to ``<stem>.last``
            (meta ``steps``) and a resumed run continues it, so it follows the same schedule
            (a ``<stem>.last`` without that count is treated as having other settings). With
            ``lr_factor`` as well, the rate is ``lr0 * lr_factor(epoch) * step_lr_factor(step)``;
            ``lr`` then logs the rate of the epoch's last step.
        progress: show the per-epoch progress bar (rank 0 only); ``False`` for a caller that
            trains many small models under its own bar.
        global_batchnorm: under several processes, train with the model's BatchNorm layers swapped
            for :class:`mmlib.distributed.GlobalBatchNorm` (put back when ``fit`` returns or fails),
            so they normalise over the global batch, as on one process; ``False`` keeps each
            rank's shard statistics. Ignored on one process.
        find_unused_parameters: passed to DistributedDataParallel (ignored on one process).
            ``True`` tolerates trainable parameters that a loss leaves without a gradient (an
            unused head) at the cost of one graph traversal per step; ``False`` is faster when
            every trainable parameter always gets a gradient.

    Returns:
        DataFrame with ``epoch``, ``train_loss``, ``val_loss``, ``trainable``, ``seconds``, ``best``
        (plus ``lr`` with ``lr_factor`` or ``step_lr_factor``, and the extra loss terms of a
        dict-returning ``loss_fn``).

    Data-parallel training: launched by ``torchrun --nproc_per_node=N`` (``fit`` then calls
    :func:`mmlib.distributed.setup` itself: NCCL for a CUDA ``device``, gloo otherwise, and a bare
    ``"cuda"`` becomes ``cuda:LOCAL_RANK``), or under a process group the caller initialised, every
    rank must build the same global batches (seed them by the epoch, as the pipelines do) and each
    trains on its contiguous :func:`mmlib.distributed.shard`. A training batch whose size does not
    divide by the world size W loses its last ``B mod W`` rows (at most W - 1; a batch of fewer than
    W rows is skipped on every rank; :func:`mmlib.distributed.trim`, logged once), as a
    ``DistributedSampler(drop_last=True)`` would: equal shards are what make DDP's averaged gradient
    the global batch's. The call ``loss_fn(model, batch)`` runs inside the
    forward of a DistributedDataParallel wrapper around the model (and ``loss_fn`` itself when it is
    a module), so ``loss_fn`` still gets the plain model (attributes, ``m.training``, methods other
    than ``forward`` all work) while DDP sees the whole step and averages the gradients over ranks:
    with equal shards the average of the ranks' mean losses' gradients is the gradient of the
    global-batch mean, and :class:`mmlib.losses.ClipLoss` gathers the other ranks' embeddings to
    keep its negatives global. Validation is not sharded: every rank evaluates each whole validation
    batch with gathering off (:func:`mmlib.losses.local_only`), so any validation batch size works.
    DDP only synchronises the parameters that required a gradient when it was built, so the wrapper
    is rebuilt whenever the freezing schedule changes the trainable set (a stage unfrozen at epoch
    50 is then synchronised from epoch 50 on). Logged sums and counts are all-reduced, so the
    returned history is the global one on every rank (``seconds`` is the ranks' mean). Rank 0 writes
    the checkpoints (the plain model's state dict, keys as on one process; a rank given a different
    path, e.g. its own temporary directory, writes its own), followed by a barrier; every rank reads
    ``<stem>.last`` to resume, and all must resume from the same epoch. Only rank 0 shows a progress
    bar. BatchNorm normalises over the global batch (``global_batchnorm``). Caveats: dropout and
    torch-drawn augmentation use the same (seed, epoch) stream on every rank, which keeps the
    global torch RNG in step for batch generators that draw from it; parameters the optimizer
    holds outside the model (and outside a module ``loss_fn``) are not synchronised.
    """
    device = torch.device(device)
    if distributed.launched_world_size() > 1 and not distributed.is_initialized():
        distributed.setup("nccl" if device.type == "cuda" else "gloo")
    world, rank = distributed.world_size(), distributed.rank()
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    model.to(device)
    schedule = schedule or from_scratch()
    meta = dict(meta or {}, epochs=epochs, schedule=schedule.name, seed=seed)
    rows: list[dict[str, Any]] = []
    start = 0
    step = 0  # optimizer steps taken so far (step_lr_factor's argument), continued on resume
    best = math.inf
    base_lr = [g["lr"] for g in optimizer.param_groups]  # the initial rates, before a resume loads the last ones
    stem = _stem(checkpoint) if checkpoint is not None else None
    if stem is not None and resume and stem.with_name(stem.name + ".last.json").is_file():
        state, saved = load_checkpoint(stem.with_name(stem.name + ".last"))
        kept = {k: v for k, v in saved.items() if k not in ("history", "epoch", "steps")}
        same = kept == json.loads(json.dumps(meta, default=str))
        if same and step_lr_factor is not None and "steps" not in saved:
            same = False  # written before the step count was kept: the schedule cannot be continued
        if same:
            model.load_state_dict(state)
            _load_optimizer(stem.with_name(stem.name + ".last"), optimizer)
            rows = list(saved["history"])
            start = int(saved["epoch"]) + 1
            step = int(saved.get("steps", 0))
            best = min([r["val_loss"] if r["val_loss"] is not None else math.inf for r in rows] or [math.inf])
            if rank == 0:
                log.info("%s: resumed after epoch %d from %s", desc, start - 1, stem.with_name(stem.name + ".last"))
        elif rank == 0:
            log.info("%s: %s.last has other settings; starting afresh", desc, stem)
    writes_checkpoints = rank == 0
    replica: _Replica | None = None
    swapped: list = []
    if world > 1:
        writes_checkpoints = _check_ranks_agree(desc, start, stem)
        if global_batchnorm:  # before DDP wraps the model: its buffers are the swapped layers'
            swapped = distributed.global_batchnorm(model)
        replica = _Replica(model, loss_fn, device, find_unused_parameters)
    try:
        bar = core.progress(range(start, epochs), desc=desc, total=epochs, initial=start,
                            disable=rank != 0 or not progress)
        trimmed_rows = 0
        for epoch in bar:
            t0 = time.perf_counter()
            torch.manual_seed(seed * 100_003 + epoch)
            n_trainable = apply_freeze(model, schedule, epoch, train=True)
            if replica is not None:
                replica.follow_trainable()
            epoch_factor = 1.0 if lr_factor is None else float(lr_factor(epoch))
            if lr_factor is not None:
                for g, lr0 in zip(optimizer.param_groups, base_lr):
                    g["lr"] = lr0 * epoch_factor
            sums: dict[str, float] = {}
            count = 0
            for batch in train_batches(epoch):
                if replica is not None:
                    full = distributed.batch_rows(batch)
                    batch = distributed.trim(batch, world)
                    if trimmed_rows == 0 and (batch is None or distributed.batch_rows(batch) < full) and rank == 0:
                        log.info("%s: a batch of %d rows does not divide over %d processes; its last rows are dropped "
                                 "(every such batch loses at most %d)", desc, full, world, world - 1)
                    trimmed_rows += full - (0 if batch is None else distributed.batch_rows(batch))
                    if batch is None:
                        continue
                    batch = distributed.shard(batch, rank, world)
                batch = to_device(batch, device)
                if step_lr_factor is not None:
                    for g, lr0 in zip(optimizer.param_groups, base_lr):
                        g["lr"] = lr0 * epoch_factor * float(step_lr_factor(step))
                optimizer.zero_grad(set_to_none=True)
                with core.autocast(device, precision):
                    loss, terms = _loss_terms(loss_fn(model, batch) if replica is None else replica(batch))
                if replica is not None:
                    _raise_unless_finite_everywhere(desc, loss, epoch)
                elif not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: loss is {loss.item()} at epoch {epoch}; lower the learning rate?")
                loss.backward()
                optimizer.step()
                step += 1
                n = _batch_size(batch)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v * n
                count += n
            if replica is not None:
                replica.sync_buffers()
            val: dict[str, float] = {}
            vsums: dict[str, float] = {}
            vc = 0
            if val_batches is not None:
                apply_freeze(model, schedule, epoch, train=False)
                # under DDP every rank validates the whole batch (no shard, no gathering): identical
                # results on every rank, and no validation batch has to divide by the world size
                with torch.no_grad(), core.autocast(device, precision), local_only():
                    for batch in val_batches():
                        batch = to_device(batch, device)
                        _, terms = _loss_terms(loss_fn(model, batch))
                        n = _batch_size(batch)
                        for k, v in terms.items():
                            vsums[k] = vsums.get(k, 0.0) + v * n
                        vc += n
            seconds = None
            if replica is not None:  # global sums, counts and mean time, bitwise equal on every rank
                sums, count, vsums, vc, seconds = _global_sums(sums, count, vsums, vc, time.perf_counter() - t0)
            train = {k: v / max(count, 1) for k, v in sums.items()}
            if val_batches is not None:
                val = {k: v / max(vc, 1) for k, v in vsums.items()}
            train_loss, val_loss = train.get("loss", math.nan), val.get("loss")
            score = val_loss if val_loss is not None else (0.0 if epoch == epochs - 1 else math.inf)
            is_best = score < best
            best = min(best, score)
            row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "trainable": n_trainable,
                   "seconds": round(time.perf_counter() - t0 if seconds is None else seconds, 3), "best": is_best}
            if lr_factor is not None or step_lr_factor is not None:
                row["lr"] = optimizer.param_groups[0]["lr"]
            row.update({f"train_{k}": v for k, v in train.items() if k != "loss"})
            row.update({f"val_{k}": v for k, v in val.items() if k != "loss"})
            rows.append(row)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(train=f"{train_loss:.4f}", val="-" if val_loss is None else f"{val_loss:.4f}")
            if stem is not None:
                if writes_checkpoints:
                    if is_best:
                        save_checkpoint(stem.with_name(stem.name + ".best"), model, meta=dict(meta, epoch=epoch, val_loss=val_loss))
                    save_checkpoint(stem.with_name(stem.name + ".last"), model, optimizer=optimizer,
                                    meta=dict(meta, epoch=epoch, history=rows, steps=step))
                if replica is not None:
                    distributed.barrier()  # nobody reads a checkpoint before rank 0 has written it
    finally:
        if replica is not None:
            replica.release()
        distributed.restore_batchnorm(swapped)
    model.eval()
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- data parallel


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that DistributedDataParallel wraps the whole step.

    DDP synchronises gradients only for a backward that follows a call of *its* forward; loss
    functions call ``m(batch)``, ``m.next_visit_loss(batch)``, ``m.encoder(...)`` or read
    ``m.training``, which a DDP wrapper handed to them would not allow. Running the loss
    function inside this module's forward keeps the plain model in the loss function's hands.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict[str, Any]], Any]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn  # registered as a submodule (its parameters synchronised) when it is a module

    def forward(self, batch: dict[str, Any]) -> Any:
        return self.loss_fn(self.model, batch)


class _Replica:
    """The DDP wrapper of one ``fit`` call, rebuilt whenever the set of trainable parameters changes.

    DDP registers its gradient hooks and buckets for the parameters that require a gradient
    when it is constructed: a stage unfrozen later would be left out (each rank would step it
    with its own shard's gradient and the replicas would drift apart), and one frozen later
    would be waited for. Construction also broadcasts rank 0's parameters and buffers, so
    every rebuild starts from identical replicas.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, device: torch.device, find_unused: bool) -> None:
        self.module = _LossModule(model, loss_fn)
        self.device = device
        self.find_unused = find_unused
        self.trainable: tuple[bool, ...] | None = None
        self.ddp: nn.Module | None = None

    def follow_trainable(self) -> None:
        """(Re)build the DDP wrapper if ``requires_grad`` changed since it was built."""
        trainable = tuple(p.requires_grad for p in self.module.parameters())
        if trainable == self.trainable:
            return
        self.trainable = trainable
        self.ddp = None  # drop the old wrapper (its reducer removes its hooks) before building the next
        if any(trainable):  # DDP refuses a module without trainable parameters
            self.ddp = nn.parallel.DistributedDataParallel(
                self.module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.find_unused,
            )

    def __call__(self, batch: dict[str, Any]) -> Any:
        return (self.module if self.ddp is None else self.ddp)(batch)

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics) after an epoch's training.

        DDP broadcasts them at the start of each forward, so after the last step a rank may hold
        statistics of its own last shard (with ``global_batchnorm=False``, or buffers other
        than BatchNorm's); copying rank 0's makes validation on every rank use the model that
        rank 0 saves.
        """
        for b in self.module.buffers():
            torch.distributed.broadcast(b, src=0)

    def release(self) -> None:
        self.ddp = None
        self.trainable = None


def _check_ranks_agree(desc: str, start: int, stem: Path | None) -> bool:
    """Check that every rank resumes at the same epoch; return whether this rank writes checkpoints.

    A rank that could not read ``<stem>.last`` (a path not on a shared file system) would start
    at another epoch and then wait forever in a collective, so it fails here instead. Rank 0
    writes; a rank whose checkpoint path differs from rank 0's writes its own.
    """
    everyone: list[Any] = [None] * distributed.world_size()
    torch.distributed.all_gather_object(everyone, (start, None if stem is None else str(stem)))
    starts = [s for s, _ in everyone]
    if len(set(starts)) > 1:
        raise RuntimeError(f"{desc}: ranks would start at different epochs {starts} (checkpoints {[p for _, p in everyone]}); "
                           "every rank must be able to read <stem>.last to resume")
    me = distributed.rank()
    return me == 0 or everyone[me][1] != everyone[0][1]


def _raise_unless_finite_everywhere(desc: str, loss: torch.Tensor, epoch: int) -> None:
    """Raise :class:`FloatingPointError` on every rank if any rank's loss is not finite.

    Raising on one rank only would leave the others waiting in backward's all-reduce.
    """
    bad = torch.tensor([0.0 if bool(torch.isfinite(loss)) else 1.0], device=distributed.collective_device())
    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if bad.item():
        raise FloatingPointError(f"{desc}: loss is not finite on some rank at epoch {epoch} (here {loss.item()}); "
                                 "lower the learning rate?")


def _global_sums(sums: dict[str, float], count: int, vsums: dict[str, float], vc: int,
                 seconds: float) -> tuple[dict[str, float], int, dict[str, float], int, float]:
    """All-reduce one epoch's weighted loss sums and row counts (and the ranks' mean time)."""
    local = {f"train/{k}": v for k, v in sums.items()}
    local.update({"count/train": count, "seconds": seconds})
    total = distributed.all_reduce_sums(local)
    # keep each rank's term order, so the history's columns come in the order of one process; validation
    # ran on the whole batch on every rank, so its sums are already global
    return ({k: total[f"train/{k}"] for k in sums}, round(total["count/train"]), dict(vsums), vc,
            total["seconds"] / distributed.world_size())


def _loss_terms(out: torch.Tensor | Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """``(loss to optimise, {term: float})`` from a loss function's scalar or dict result."""
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise KeyError(f"a loss_fn returning a dict must include 'loss'; got keys {sorted(out)}")
        return out["loss"], {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()}
    return out, {"loss": float(out.detach())}


def _batch_size(batch: Mapping[str, Any]) -> int:
    for v in batch.values():
        if torch.is_tensor(v) and v.ndim > 0:
            return int(v.shape[0])
    return 1
