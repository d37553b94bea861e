"""The training cases of ``tests/test_distributed.py``, and the script torchrun runs on each rank.

``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_ddp_worker.py OUT`` runs
every case of :data:`CASES` through :func:`mmlib.train.fit` data-parallel and has each rank write
``OUT/<case>.rank<r>.pt`` (the trained state dict) and ``OUT/<case>.rank<r>.json`` (the history),
plus ``OUT/setup.rank<r>.json`` (what the process group looked like). The test runs the same
cases on one process, without a process group, and compares. Everything is float64 and free of
dropout, so the two runs differ only by the order of floating-point sums; the BatchNorm cases
(``bn``, ``bn_local``) check that fit's global BatchNorm is what makes that so.

Not a test module (no ``test_`` names): pytest imports it for :func:`run_case` only.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

GLOBAL_BATCH = 8
ROWS_SEEN: list[int] = []  # the batch sizes the loss functions were given (each rank's shard under DDP)


class ConvClassifier(nn.Module):
    """A Conv3d stage and a linear head over 3 classes (``conv`` can be frozen by name)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, kernel_size=3)
        self.head = nn.Linear(2 * 4 * 4 * 4, 3)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(torch.relu(self.conv(batch["image"])).flatten(1))


class TwoTower(nn.Module):
    """Image and tabular towers trained with a learnable-temperature :class:`~mmlib.losses.ClipLoss`."""

    def __init__(self) -> None:
        from mmlib.losses import ClipLoss

        super().__init__()
        self.image = nn.Linear(6, 4)
        self.tabular = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))
        self.clip = ClipLoss(temperature=0.5, learnable=True)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(batch["image"]), self.tabular(batch["tabular"])


class ThreeTower(nn.Module):
    """Report, X-ray and ECG towers trained with a learnable-temperature :class:`~mmlib.losses.TriModalLoss` (P3)."""

    def __init__(self) -> None:
        from mmlib.losses import TriModalLoss

        super().__init__()
        self.text = nn.Linear(5, 4)
        self.xray = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
        self.ecg = nn.Linear(3, 4)
        self.trimodal = TriModalLoss(temperature=0.5, learnable=True)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.text(batch["text"]), self.xray(batch["xray"]), self.ecg(batch["ecg"])


class NormNet(nn.Module):
    """Conv3d -> BatchNorm3d -> linear -> BatchNorm1d (cumulative running statistics) -> 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 3, kernel_size=3)
        self.bn3 = nn.BatchNorm3d(3)
        self.mid = nn.Linear(3 * 4 * 4 * 4, 5)
        self.bn1 = nn.BatchNorm1d(5, momentum=None)
        self.head = nn.Linear(5, 3)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.relu(self.bn3(self.conv(batch["image"]))).flatten(1)
        return self.head(torch.relu(self.bn1(self.mid(x))))


def _skewed_batch(seed: int) -> dict[str, Any]:
    """A conv batch whose second half is brighter: each rank's shard has other statistics than the whole."""
    batch = _conv_batch(seed)
    batch["image"][GLOBAL_BATCH // 2 :] += 1.5
    return batch


def _conv_batch(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(GLOBAL_BATCH, 1, 6, 6, 6, generator=g, dtype=torch.float64)
    label = torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)
    # a list of per-row ids rides along and must be sharded with the tensors
    return {"image": image, "label": label, "ids": [f"s{seed}-{i}" for i in range(GLOBAL_BATCH)]}


def _pair_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64),
            "tabular": torch.randn(GLOBAL_BATCH, 5, generator=g, dtype=torch.float64)}


def _tri_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(GLOBAL_BATCH, d, generator=g, dtype=torch.float64)
            for k, d in (("text", 5), ("xray", 6), ("ecg", 3))}


def _cross_entropy(m: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    assert len(batch["ids"]) == batch["image"].shape[0]
    ROWS_SEEN.append(batch["image"].shape[0])
    return nn.functional.cross_entropy(m(batch), batch["label"])


def _clip(m: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ROWS_SEEN.append(batch["image"].shape[0])
    out = m.clip(*m(batch))  # reaches a submodule of the plain model: fit hands loss_fn the model, not DDP
    return {"loss": out["loss"], "temperature": out["temperature"]}


def _trimodal(m: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ROWS_SEEN.append(batch["text"].shape[0])
    out = m.trimodal(*m(batch))
    return {k: out[k] for k in ("loss", "text_xray", "text_ecg")}


def _trim_batches(epoch: int) -> list[dict[str, Any]]:
    """7 rows under DDP (fit must drop the 7th), the same first 6 rows on one process (the reference),
    and a batch of one row that no rank can share (skipped under DDP, so left out of the reference)."""
    from mmlib import distributed

    rows = _conv_batch(500 + epoch)
    seven = {k: v[:7] for k, v in rows.items()}
    if distributed.world_size() > 1:
        return [seven, {k: v[7:] for k, v in rows.items()}]
    return [{k: v[:6] for k, v in rows.items()}]


CASES = ("conv", "clip", "unfreeze", "trimodal", "trim", "bn", "bn_local")
_PLAIN_SGD = {
    "clip": (TwoTower, _clip, 1, lambda epoch: [_pair_batch(200 + epoch)]),
    "trimodal": (ThreeTower, _trimodal, 2, lambda epoch: [_tri_batch(400 + epoch)]),
    "trim": (ConvClassifier, _cross_entropy, 1, _trim_batches),
    "bn": (NormNet, _cross_entropy, 2, lambda epoch: [_skewed_batch(600 + epoch)]),
    "bn_local": (NormNet, _cross_entropy, 2, lambda epoch: [_skewed_batch(600 + epoch)]),
}


def run_case(name: str, checkpoint: Path | None = None) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """One case through ``fit`` (on however many processes run it): ``(state dict, history rows)``.

    - ``conv``: one epoch of one SGD step with cross-entropy, a validation batch, checkpoints.
    - ``clip``: one epoch of one SGD step of a two-tower model with a gathered ClipLoss.
    - ``unfreeze``: two epochs of one SGD-with-momentum step each; ``conv`` is frozen in epoch 0
      and unfreezes in epoch 1, so it is only synchronised if fit rebuilds the DDP wrapper.
    - ``trim``: one SGD step on a batch of 7 rows, which 2 ranks cannot share evenly.
    - ``trimodal``: two epochs of one SGD step each of three towers with a gathered, learnable
      TriModalLoss (P3's objective).
    - ``bn``: two epochs of one SGD step each of a network with BatchNorm3d and BatchNorm1d,
      on batches whose two halves (the two ranks' shards) differ; ``bn_local`` is the same with
      ``global_batchnorm=False`` (each rank normalises over its shard).
    """
    from mmlib.train import FreezeSchedule, fit

    torch.manual_seed(0)  # the same initialisation on every rank (DDP would broadcast rank 0's anyway)
    schedule = None
    val_batches = None
    if name == "conv":
        model, loss_fn, epochs = ConvClassifier().double(), _cross_entropy, 1
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        train_batches = lambda epoch: [_conv_batch(100 + epoch)]
        val_batches = lambda: [_conv_batch(7), _conv_batch(8)]
    elif name in _PLAIN_SGD:  # plain SGD at lr 0.5, no validation: (model class, loss, epochs, batches)
        make, loss_fn, epochs, train_batches = _PLAIN_SGD[name]
        model = make().double()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
    elif name == "unfreeze":
        model, loss_fn, epochs = ConvClassifier().double(), _cross_entropy, 2
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        train_batches = lambda epoch: [_conv_batch(300 + epoch)]
        schedule = FreezeSchedule("conv late", frozen=("conv",), unfreeze=((1, "conv"),))
    else:
        raise ValueError(name)
    hist = fit(model, loss_fn=loss_fn, train_batches=train_batches, val_batches=val_batches, epochs=epochs,
               optimizer=opt, schedule=schedule, checkpoint=checkpoint, seed=3, meta={"case": name},
               **({"global_batchnorm": False} if name == "bn_local" else {}))  # bn: fit's default
    if name.startswith("bn"):  # fit put the model's own BatchNorm layers back
        assert type(model.bn3) is nn.BatchNorm3d and type(model.bn1) is nn.BatchNorm1d
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, hist.to_dict("records")


def main(out: Path) -> None:
    import torch.distributed as dist

    from mmlib import distributed

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    setup: dict[str, Any] = {"initialised_before_fit": dist.is_initialized()}
    for i, name in enumerate(CASES):
        ROWS_SEEN.clear()
        state, rows = run_case(name, out / "ckpt" / name)
        setup[f"rows_seen_{name}"] = sorted(set(ROWS_SEEN))
        if i == 0:  # fit initialised the process group itself from torchrun's environment
            setup.update(initialised_after_fit=dist.is_initialized(), backend=dist.get_backend(),
                         world=distributed.world_size(), setup_device=str(distributed.setup()))
        r = distributed.rank()
        torch.save(state, out / f"{name}.rank{r}.pt")
        (out / f"{name}.rank{r}.json").write_text(json.dumps(rows))
    # resuming: every rank reads conv.last, finds the run complete and returns its history
    state, rows = run_case("conv", out / "ckpt" / "conv")
    before = torch.load(out / f"conv.rank{r}.pt", weights_only=True)
    setup["resumed_conv_is_the_trained_one"] = (rows == json.loads((out / f"conv.rank{r}.json").read_text())
                                                and all(torch.equal(before[k], v) for k, v in state.items()))
    # a loss that is NaN on rank 1 only must stop both ranks (not leave rank 0 waiting in backward)
    from mmlib.train import fit

    model = ConvClassifier().double()
    try:
        fit(model, loss_fn=lambda m, b: _cross_entropy(m, b) * (math.nan if distributed.rank() == 1 else 1.0),
            train_batches=lambda epoch: [_conv_batch(1)], epochs=1,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        setup["nan_error"] = None
    except FloatingPointError as e:
        setup["nan_error"] = str(e)
    (out / f"setup.rank{r}.json").write_text(json.dumps(setup))
    distributed.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
