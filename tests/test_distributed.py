"""Data-parallel fit (mmlib.distributed + mmlib.train.fit): torchrun on 2 CPU processes vs one process."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from mmlib import distributed
from mmlib.train import fit, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_ddp_worker.py")
WORLD = 2


def _worker_module():
    spec = importlib.util.spec_from_file_location("_ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- helpers on one process


def test_shard_takes_contiguous_rows_and_rejects_indivisible_batches():
    batch = {"x": torch.arange(12).reshape(6, 2), "y": np.arange(6) * 10, "ids": [f"s{i}" for i in range(6)],
             "cuts": torch.tensor([1.0, 2.0]), "scale": 3.0}
    parts = [distributed.shard(batch, r, 3) for r in range(3)]
    assert [p["x"].tolist() for p in parts] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9], [10, 11]]]
    assert parts[2]["y"].tolist() == [40, 50] and parts[1]["ids"] == ["s2", "s3"]
    assert all(p["cuts"] is batch["cuts"] and p["scale"] == 3.0 for p in parts)  # not batched: passed through
    assert torch.equal(torch.cat([p["x"] for p in parts]), batch["x"])
    assert distributed.shard(batch, 0, 1)["x"] is batch["x"]
    with pytest.raises(ValueError, match=r"batch of 6 rows .* world size of 4"):
        distributed.shard(batch, 0, 4)
    with pytest.raises(ValueError, match="rank=2, world=2"):
        distributed.shard(batch, 2, 2)
    with pytest.raises(ValueError, match="without a batched tensor"):
        distributed.shard({"scale": 3.0}, 0, 2)


def test_trim_cuts_every_batched_value_to_a_multiple_of_the_world_size():
    batch = {"x": torch.arange(14).reshape(7, 2), "y": np.arange(7), "ids": [f"s{i}" for i in range(7)],
             "cuts": torch.tensor([1.0, 2.0]), "scale": 3.0}
    cut = distributed.trim(batch, 3)
    assert distributed.batch_rows(cut) == 6 and cut["ids"] == [f"s{i}" for i in range(6)]
    assert torch.equal(cut["x"], batch["x"][:6]) and np.array_equal(cut["y"], np.arange(6))
    assert cut["cuts"] is batch["cuts"] and cut["scale"] == 3.0  # not batched: untouched
    assert [len(distributed.shard(cut, r, 3)["ids"]) for r in range(3)] == [2, 2, 2]
    assert distributed.trim(batch, 7) == batch and distributed.trim(batch, 8) is None
    assert distributed.trim(batch, 1) == batch


def test_helpers_are_no_ops_on_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.is_initialized()
    assert distributed.setup() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert not distributed.is_initialized()  # nothing was initialised
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.all_reduce_sums({"loss": 1.5, "n": 4}) == {"loss": 1.5, "n": 4.0}
    distributed.barrier()
    distributed.cleanup()
    with pytest.raises(ValueError, match="backend"):
        distributed.setup("mpi")


def test_fit_on_one_process_is_one_plain_sgd_step():
    """Golden values: the logged loss is the loss before the step and the weights move by -lr * gradient."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 1).double()
    w0, b0 = model.weight.detach().clone()[0], model.bias.detach().clone()[0]
    lr = 0.1
    hist = fit(model, loss_fn=lambda m, b: nn.functional.mse_loss(m(b["x"])[:, 0], b["y"]),
               train_batches=lambda e: [{"x": x, "y": y}], epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=lr))
    residual = x @ w0 + b0 - y  # by hand: d/dw mean(r^2) = 2/B X^T r, d/db = 2/B sum(r)
    assert list(hist.columns) == ["epoch", "train_loss", "val_loss", "trainable", "seconds", "best"]
    assert hist["train_loss"].iloc[0] == pytest.approx(float((residual**2).mean()), abs=1e-12)
    torch.testing.assert_close(model.weight.detach()[0], w0 - lr * 2 / 6 * x.T @ residual, atol=1e-12, rtol=0)
    torch.testing.assert_close(model.bias.detach()[0], b0 - lr * 2 / 6 * residual.sum(), atol=1e-12, rtol=0)
    assert not distributed.is_initialized()  # one process: no process group, no DDP


# ----------------------------------------------------------------------------- torchrun, 2 CPU processes


def _gloo_missing() -> str | None:
    if not torch.distributed.is_available():
        return "this torch build has no torch.distributed"
    if not torch.distributed.is_gloo_available():
        return "this torch build has no gloo backend"
    return None


def _torchrun(args: list[str], timeout: int = 120) -> str:
    """``torchrun --standalone --nproc_per_node=2 <args>`` (gloo, 1 thread); fails the test unless it exits 0."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", MMLIB_PROGRESS="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *args]
    # own session: on a timeout the whole group (launcher and workers) is killed, not just torchrun
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{log[-4000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{log[-4000:]}"
    return log


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory) -> Path:
    """Run every case of tests/_ddp_worker.py under ``torchrun --nproc_per_node=2`` once (gloo, CPU)."""
    if reason := _gloo_missing():
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("ddp")
    _torchrun([str(WORKER), str(out)])
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The same cases on this one process, without a process group."""
    worker = _worker_module()
    ckpt = tmp_path_factory.mktemp("single")
    return {name: worker.run_case(name, ckpt / name) for name in worker.CASES}


def _ranks(out: Path, case: str) -> list[tuple[dict[str, torch.Tensor], list[dict]]]:
    return [(torch.load(out / f"{case}.rank{r}.pt", weights_only=True),
             json.loads((out / f"{case}.rank{r}.json").read_text())) for r in range(WORLD)]


def _assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-10) -> None:
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        torch.testing.assert_close(got[k], w, atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def _assert_same_history(got: list[dict], want: list[dict], atol: float = 1e-10) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert list(g) == list(w)  # the same columns in the same order
        for k in w:
            if k == "seconds":
                continue
            if isinstance(w[k], float) and not math.isnan(w[k]):
                assert g[k] == pytest.approx(w[k], abs=atol), k
            else:
                assert g[k] == w[k] or (g[k] != g[k] and w[k] != w[k]), k


def test_fit_under_torchrun_initialises_gloo_shards_every_batch_resumes_and_stops_on_nan(ddp_out):
    for r in range(WORLD):
        setup = json.loads((ddp_out / f"setup.rank{r}.json").read_text())
        assert setup.pop("initialised_before_fit") is False
        assert setup.pop("initialised_after_fit") is True
        assert (setup.pop("backend"), setup.pop("world"), setup.pop("setup_device")) == ("gloo", WORLD, "cpu")
        assert setup.pop("resumed_conv_is_the_trained_one") is True  # every rank read rank 0's conv.last
        # rank 1's NaN loss stopped both ranks with an error instead of a hang
        assert "loss is not finite on some rank at epoch 0" in setup.pop("nan_error")
        # every training call saw this rank's half of the global batch of 8; validation (the conv case
        # only) saw the whole batch on every rank, with gathering off
        assert setup == {"rows_seen_conv": [8 // WORLD, 8], "rows_seen_clip": [8 // WORLD],
                         "rows_seen_unfreeze": [8 // WORLD], "rows_seen_trimodal": [8 // WORLD],
                         "rows_seen_trim": [6 // WORLD], "rows_seen_bn": [8 // WORLD],
                         "rows_seen_bn_local": [8 // WORLD]}


def test_ddp_step_of_conv_classifier_equals_single_process_step(ddp_out, single):
    want_state, want_hist = single["conv"]
    (state0, hist0), (state1, hist1) = _ranks(ddp_out, "conv")
    torch.manual_seed(0)
    init = _worker_module().ConvClassifier().double().state_dict()
    assert all(not torch.equal(init[k], v) for k, v in want_state.items())  # the step moved every weight
    _assert_same_state(state0, want_state)
    _assert_same_state(state1, state0, atol=0)  # replicas in sync
    # the logged train and validation losses are the global ones, the same on every rank
    _assert_same_history(hist0, want_hist)
    assert hist1 == hist0
    # rank 0 wrote the plain model's weights under the single-process key names
    for suffix in ("last", "best"):
        saved, meta = load_checkpoint(ddp_out / "ckpt" / f"conv.{suffix}")
        _assert_same_state(saved, want_state)
        assert meta["epoch"] == 0 and meta["case"] == "conv"


def _ddp_matches_single(ddp_out: Path, single: dict, case: str) -> tuple[dict, list[dict], list[dict]]:
    """Rank 0's trained state equals the single-process one, rank 1's equals rank 0's bitwise;
    returns (single-process state, single-process history, rank 0's history)."""
    want_state, want_hist = single[case]
    (state0, hist0), (state1, _) = _ranks(ddp_out, case)
    _assert_same_state(state0, want_state)
    _assert_same_state(state1, state0, atol=0)
    return want_state, want_hist, hist0


def test_ddp_step_with_gathered_clip_loss_equals_single_process_step(ddp_out, single):
    want_state, want_hist, hist0 = _ddp_matches_single(ddp_out, single, "clip")
    assert "clip.log_logit_scale" in want_state  # the learnable temperature is synchronised too
    # the contrastive loss logged by the 2-process run is the loss over the global batch of 8
    assert hist0[0]["train_loss"] == pytest.approx(want_hist[0]["train_loss"], abs=1e-12)
    _assert_same_history(hist0, want_hist)


def test_ddp_step_with_gathered_trimodal_loss_equals_single_process_step(ddp_out, single):
    """P3's loss: each rank's reports meet the whole global batch's X-rays and ECGs, and the reverse."""
    want_state, want_hist, hist0 = _ddp_matches_single(ddp_out, single, "trimodal")
    assert "trimodal.log_logit_scale" in want_state
    for row, want in zip(hist0, want_hist):  # both pair terms are the global batch's, every epoch
        for key in ("train_loss", "train_text_xray", "train_text_ecg"):
            assert row[key] == pytest.approx(want[key], abs=1e-12), key
    _assert_same_history(hist0, want_hist)


def test_ddp_drops_the_rows_an_indivisible_batch_cannot_share(ddp_out, single):
    """A global batch of 7 on 2 ranks trains on its first 6 rows: the single-process run of those 6 rows."""
    _, want_hist, hist0 = _ddp_matches_single(ddp_out, single, "trim")
    _assert_same_history(hist0, want_hist)


def test_ddp_follows_a_stage_unfrozen_in_a_later_epoch(ddp_out, single):
    want_state, want_hist = single["unfreeze"]
    (state0, hist0), (state1, _) = _ranks(ddp_out, "unfreeze")
    assert [h["trainable"] for h in want_hist] == [3 * 128 + 3, 3 * 128 + 3 + 2 * 27 + 2]
    _assert_same_state(state0, want_state)
    _assert_same_state(state1, state0, atol=0)
    _assert_same_history(hist0, want_hist)


def test_ddp_batchnorm_normalises_over_the_global_batch_as_one_process_does(ddp_out, single):
    """Two steps of BatchNorm3d + BatchNorm1d on shards with other statistics than their union: the
    weights and the running statistics equal the single-process run's; with each rank's own shard
    statistics (``global_batchnorm=False``) they do not."""
    want_state, want_hist, hist0 = _ddp_matches_single(ddp_out, single, "bn")
    _assert_same_history(hist0, want_hist)
    for key in ("bn3.running_mean", "bn3.running_var", "bn1.running_mean", "bn1.running_var"):
        assert not torch.allclose(want_state[key], torch.zeros_like(want_state[key]) + (key.endswith("var")))
    assert want_state["bn1.num_batches_tracked"].item() == 2
    (local, _), _ = _ranks(ddp_out, "bn_local")
    assert torch.equal(single["bn_local"][0]["conv.weight"], want_state["conv.weight"])  # one process: the same run
    for key in ("conv.weight", "mid.weight", "bn3.running_mean", "bn1.running_var"):
        assert (local[key] - want_state[key]).abs().max() > 1e-3, key


def test_global_batchnorm_swaps_in_place_and_restores_the_layers_with_their_trained_tensors():
    model = _worker_module().NormNet().double()
    weight, mean = model.bn3.weight, model.bn3.running_mean
    keys = list(model.state_dict())
    swapped = distributed.global_batchnorm(model)
    assert [name for _, name, _ in swapped] == ["bn3", "bn1"]
    assert isinstance(model.bn3, distributed.GlobalBatchNorm) and model.bn3.weight is weight
    assert model.bn1.momentum is None and list(model.state_dict()) == keys
    x = {"image": torch.randn(6, 1, 6, 6, 6, dtype=torch.float64)}
    ref = _worker_module().NormNet().double()
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), ref(x), atol=1e-12, rtol=0)  # one process: plain BatchNorm
    distributed.restore_batchnorm(swapped)
    assert type(model.bn3) is nn.BatchNorm3d and model.bn3.weight is weight and model.bn3.running_mean is mean
    torch.testing.assert_close(model.bn3.running_mean, ref.bn3.running_mean, atol=0, rtol=0)  # the step's statistics
    assert not torch.equal(mean, torch.zeros(3))


# ----------------------------------------------------------------------------- the command line


def test_cli_train_runs_a_pipeline_under_torchrun(tmp_path):
    """``torchrun -m mmlib train p1 --profile smoke``: every stage on 2 ranks, rank 0 writes what the notebook resumes from."""
    if reason := _gloo_missing():
        pytest.skip(reason)
    from mmlib.pipelines import p1

    out = tmp_path / "train_p1"
    _torchrun(["-m", "mmlib", "train", "p1", "--profile", "smoke", "--data-dir", str(tmp_path / "data"),
               "--out", str(out)], timeout=240)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and record["params"]["world_size"] == WORLD
    assert set(record["stages_s"]) == {"pretrain", "finetune"}
    ckpts = {f.name for f in (out / "checkpoints").iterdir()}
    for objective in p1.OBJECTIVES:
        assert f"pretrain-{objective}.best.safetensors" in ckpts
    assert sum(name.startswith("finetune-") and name.endswith(".best.safetensors") for name in ckpts) == len(
        p1.ALL_METHODS)
    hist = pd.read_csv(out / "tables" / "pretraining_history.csv")
    assert len(hist) == len(p1.OBJECTIVES) * p1.PROFILES.get_profile("smoke").pretrain_epochs
    assert np.isfinite(hist["train_loss"]).all() and np.isfinite(hist["val_loss"]).all()


@pytest.mark.parametrize("pipeline, tables", [
    ("p3", {"pretraining_history", "retrieval", "ablations", "ablation_differences", "ablation_histories"}),
    ("p4", {"ct_pretraining_history", "ehr_pretraining_history", "training_history", "cindex"}),
    ("p5", {"training_history", "per_fold_metrics", "comparison"}),
])
def test_cli_train_runs_p3_p4_p5_under_torchrun(tmp_path, pipeline, tables):
    """``torchrun -m mmlib train p3|p4|p5 --profile smoke`` on 2 ranks: every stage, rank 0 writes the tables."""
    if reason := _gloo_missing():
        pytest.skip(reason)
    out = tmp_path / f"train_{pipeline}"
    log = _torchrun(["-m", "mmlib", "train", pipeline, "--profile", "smoke", "--data-dir", str(tmp_path / "data"),
                     "--out", str(out)], timeout=400)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and record["params"]["world_size"] == WORLD, log[-2000:]
    written = {f.stem for f in (out / "tables").glob("*.csv")}
    assert tables <= written, f"missing {tables - written}"
    for name in tables:
        frame = pd.read_csv(out / "tables" / f"{name}.csv")
        assert len(frame), name
    hist = pd.read_csv(out / "tables" / f"{min(t for t in tables if 'history' in t)}.csv")
    losses = hist[[c for c in hist.columns if "loss" in c and "val" not in c]].to_numpy(float)
    # every epoch logged a training loss, and none is inf (NaN only where a row's model has no such term:
    # P5 trains one task at a time)
    assert np.isfinite(losses).any(axis=1).all() and not np.isinf(losses).any()
