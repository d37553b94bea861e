"""Freezing schedules, the training loop, safe checkpoints and strict encoder loading (mmlib.train)."""

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from mmlib.models import ResNetAutoEnc, ResNetMLP, ViTAutoEnc, ViTMLP
from mmlib.train import (
    CheckpointMismatchError,
    fit,
    from_scratch,
    frozen_encoder,
    load_checkpoint,
    load_encoder,
    progressive_unfreeze,
    save_checkpoint,
    trainable_parameter_schedule,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


RES = dict(widths=(4, 8, 16, 32), layers=(1, 1, 1, 1))
VIT = dict(img_size=(16, 16, 16), patch_size=4, hidden_size=32, mlp_dim=64, num_layers=4, num_heads=2)
SPATIAL = (16, 16, 16)


def _resnet(seed: int = 0, **kw) -> ResNetMLP:
    torch.manual_seed(seed)
    return ResNetMLP(**{**RES, **kw})


def _vit(seed: int = 0, **kw) -> ViTMLP:
    torch.manual_seed(seed)
    return ViTMLP(**{**VIT, **kw})


def _data(n_batches: int = 2, batch: int = 4, spatial=SPATIAL, seed: int = 123):
    """Fixed synthetic batches; the target depends on the image so the encoder has something to learn."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        image = torch.randn(batch, 1, *spatial, generator=g)
        tabular = torch.randn(batch, 5, generator=g)
        target = image.mean(dim=(1, 2, 3, 4)) * 10 + tabular[:, 0]
        out.append({"image": image, "tabular": tabular, "target": target})
    return out


def _mse(model, batch):
    return nn.functional.mse_loss(model(batch)["rfs"], batch["target"])


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# Independent description of which state_dict entries form each stage (by name, not by module identity).
RESNET_STAGE_PREFIXES = {
    "encoder.stem": ("encoder.conv1.", "encoder.bn1."),
    **{f"encoder.layer{i}": (f"encoder.layer{i}.",) for i in range(1, 5)},
}


def _vit_stage_prefixes(n_layers: int) -> dict[str, tuple[str, ...]]:
    out = {"encoder.patch_embedding": ("encoder.patch_embedding.",)}
    for i in range(n_layers):
        out[f"encoder.blocks.{i}"] = (f"encoder.blocks.{i}.",) + (("encoder.norm.",) if i == n_layers - 1 else ())
    return out


def _keys_of(state: dict, prefixes: tuple[str, ...]) -> list[str]:
    keys = [k for k in state if k.startswith(prefixes)]
    assert keys, prefixes
    return keys


# --------------------------------------------------------------------------- schedules


def test_progressive_unfreeze_resnet_frozen_at_each_epoch():
    model = _resnet()
    sched = progressive_unfreeze(model, (2, 4, 6))
    all5 = ["encoder.stem", "encoder.layer1", "encoder.layer2", "encoder.layer3", "encoder.layer4"]
    expected = {0: all5, 1: all5, 2: all5[:4], 3: all5[:4], 4: all5[:3], 5: all5[:3], 6: all5[:2], 7: all5[:2]}
    for e, want in expected.items():
        assert sched.frozen_at(e) == want, e
    assert sched.unfrozen_at(2) == ["encoder.layer4"]
    assert sched.unfrozen_at(4) == ["encoder.layer3"]
    assert sched.unfrozen_at(6) == ["encoder.layer2"]
    assert sched.unfrozen_at(3) == []


def test_progressive_unfreeze_vit_frozen_at_each_epoch():
    model = _vit()
    sched = progressive_unfreeze(model, (2, 4, 6))
    pe, b = "encoder.patch_embedding", [f"encoder.blocks.{i}" for i in range(4)]
    full = [pe, *b]
    expected = {0: full, 1: full, 2: [pe, *b[:3]], 3: [pe, *b[:3]], 4: [pe, *b[:2]], 5: [pe, *b[:2]],
                6: [pe, b[0]], 7: [pe, b[0]]}
    for e, want in expected.items():
        assert sched.frozen_at(e) == want, e
    assert [sched.unfrozen_at(e) for e in (2, 4, 6)] == [[b[3]], [b[2]], [b[1]]]


def test_schedule_validation():
    model = _resnet()
    with pytest.raises(ValueError, match="increasing"):
        progressive_unfreeze(model, (4, 2))
    with pytest.raises(ValueError, match="stages"):
        progressive_unfreeze(model, (1, 2, 3, 4, 5, 6))
    assert frozen_encoder(model).frozen_at(100) == model.encoder_stages()
    assert from_scratch().frozen_at(0) == []


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_trainable_parameter_schedule_counts(kind):
    model = _resnet() if kind == "resnet" else _vit()
    prefixes = RESNET_STAGE_PREFIXES if kind == "resnet" else _vit_stage_prefixes(4)
    sched = progressive_unfreeze(model, (2, 4, 6))
    # the caller's flags must survive: freeze the fusion MLP by hand beforehand
    for p in model.fusion.parameters():
        p.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    table = trainable_parameter_schedule(model, sched, 8)

    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    assert list(table["epoch"]) == list(range(8))
    for e in range(8):
        frozen_prefixes = tuple(pre for s in sched.frozen_at(e) for pre in prefixes[s])
        frozen = sum(p.numel() for n, p in params.items() if n.startswith(frozen_prefixes))
        assert table.loc[e, "frozen"] == frozen
        assert table.loc[e, "trainable"] == total - frozen
    steps = [e for e in range(1, 8) if table.loc[e, "trainable"] != table.loc[e - 1, "trainable"]]
    assert steps == [2, 4, 6]
    assert (table["trainable"].diff().fillna(0) >= 0).all()
    stage = {2: -1, 4: -2, 6: -3}
    for e in range(8):
        want = model.encoder_stages()[stage[e]] if e in stage else ""
        assert table.loc[e, "unfrozen_now"] == want


# --------------------------------------------------------------------------- the loop and freezing


def _fit_with_snapshots(model, schedule, epochs, data, **kw):
    """Run fit; snapshots[e] is the state at the start of epoch e, snapshots[epochs] the final state."""
    snaps = []

    def train_batches(epoch):
        snaps.append(_snapshot(model))
        return data

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    hist = fit(model, loss_fn=_mse, train_batches=train_batches, epochs=epochs, optimizer=opt, schedule=schedule,
               **kw)
    snaps.append(_snapshot(model))
    return hist, snaps


def _changed(a: dict, b: dict, keys) -> dict[str, bool]:
    return {k: not torch.equal(a[k], b[k]) for k in keys}


def test_fit_progressive_schedule_freezes_exactly_and_picks_up_unfrozen_stages():
    model = _resnet()
    sched = progressive_unfreeze(model, (1, 2, 3))  # layer4 at 1, layer3 at 2, layer2 at 3
    hist, snaps = _fit_with_snapshots(model, sched, 4, _data())
    assert len(snaps) == 5 and len(hist) == 4
    state0 = snaps[0]
    stage_keys = {s: _keys_of(state0, pre) for s, pre in RESNET_STAGE_PREFIXES.items()}
    head_params = [n for n, _ in model.named_parameters() if not n.startswith("encoder.")]
    for e in range(4):
        before, after = snaps[e], snaps[e + 1]
        frozen = set(sched.frozen_at(e))
        for stage, keys in stage_keys.items():
            ch = _changed(before, after, keys)
            if stage in frozen:
                # weights and BatchNorm running statistics (and num_batches_tracked) untouched
                assert not any(ch.values()), (e, stage, [k for k, v in ch.items() if v])
            else:
                # trains: every weight and every running statistic of the stage moved
                moved = [k for k in keys if not k.endswith("num_batches_tracked")]
                assert all(ch[k] for k in moved), (e, stage, [k for k in moved if not ch[k]])
        assert all(_changed(before, after, head_params).values()), e
    # trainable counts in the history step up at the named epochs
    t = list(hist["trainable"])
    assert t[0] < t[1] < t[2] < t[3]
    assert t == list(trainable_parameter_schedule(model, sched, 4)["trainable"])


def test_fit_frozen_encoder_trains_only_heads():
    model = _resnet(1)
    hist, snaps = _fit_with_snapshots(model, frozen_encoder(model), 2, _data())
    first, last = snaps[0], snaps[-1]
    enc = [k for k in first if k.startswith("encoder.")]
    assert enc and not any(_changed(first, last, enc).values())
    heads = [n for n, _ in model.named_parameters() if not n.startswith("encoder.")]
    assert {n.split(".")[0] for n in heads} == {"vision_head", "tabular", "fusion"}
    assert all(_changed(first, last, heads).values())
    assert not model.training  # fit leaves the model in eval mode


def test_fit_from_scratch_changes_encoder_and_lowers_loss():
    model = _resnet(2)
    hist, snaps = _fit_with_snapshots(model, None, 3, _data())
    assert all(_changed(snaps[0], snaps[-1], ["encoder.conv1.weight", "encoder.layer1.0.conv1.weight"]).values())
    assert hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]


def test_fit_raises_on_nan_loss():
    model = _resnet()

    def nan_loss(m, batch):
        return m(batch)["rfs"].mean() * float("nan")

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match="epoch 0"):
        fit(model, loss_fn=nan_loss, train_batches=lambda e: _data(1), epochs=2, optimizer=opt)


def test_fit_logs_every_term_of_a_dict_loss_and_follows_the_lr_factor():
    model = _resnet()
    seen = []

    def two_terms(m, batch):
        a = _mse(m, batch)
        b = m(batch)["rfs"].abs().mean()
        return {"loss": 0.5 * (a + b), "mse": a, "abs": b}

    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def factor(epoch):
        seen.append(opt.param_groups[0]["lr"])
        return [0.5, 1.0, 0.25][epoch]

    hist = fit(model, loss_fn=two_terms, train_batches=lambda e: _data(2, seed=e), val_batches=lambda: _data(1, seed=9),
               epochs=3, optimizer=opt, lr_factor=factor)
    assert list(hist["lr"]) == pytest.approx([0.05, 0.1, 0.025])  # factor times the initial rate, not compounded
    assert {"train_mse", "train_abs", "val_mse", "val_abs"} <= set(hist.columns)
    # the optimised loss is the dict's "loss": its epoch mean is the mean of the two terms' means
    np.testing.assert_allclose(hist["train_loss"], 0.5 * (hist["train_mse"] + hist["train_abs"]), rtol=1e-5)
    np.testing.assert_allclose(hist["val_loss"], 0.5 * (hist["val_mse"] + hist["val_abs"]), rtol=1e-5)
    with pytest.raises(KeyError, match="'loss'"):
        fit(model, loss_fn=lambda m, b: {"mse": _mse(m, b)}, train_batches=lambda e: _data(1), epochs=1, optimizer=opt)


# --------------------------------------------------------------------------- resume


class _Interrupt(Exception):
    pass


def _run(stem, *, epochs, model_seed=0, stop_at=None, meta=None, calls=None):
    model = _resnet(model_seed)
    sched = progressive_unfreeze(model, (1, 3))
    data = {e: _data(2, seed=1000 + e) for e in range(epochs)}  # depends only on the epoch

    def train_batches(epoch):
        if calls is not None:
            calls.append(epoch)
        if stop_at is not None and epoch == stop_at:
            raise _Interrupt
        return data[epoch]

    val = _data(1, seed=7)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    hist = fit(model, loss_fn=_mse, train_batches=train_batches, val_batches=lambda: val, epochs=epochs,
               optimizer=opt, schedule=sched, checkpoint=stem, meta=meta or {"arch": "tiny"})
    return model, hist


def test_fit_resume_reproduces_uninterrupted_run(tmp_path):
    ref_model, ref_hist = _run(tmp_path / "a" / "run", epochs=4)
    # <stem>.last and <stem>.best are two separate checkpoints
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {
        "run.last.safetensors", "run.last.json", "run.last.optim.safetensors", "run.best.safetensors", "run.best.json"}
    _, last_meta = load_checkpoint(tmp_path / "a" / "run.last")
    _, best_meta = load_checkpoint(tmp_path / "a" / "run.best")
    assert last_meta["epoch"] == 3 and len(last_meta["history"]) == 4
    assert best_meta["epoch"] == int(ref_hist["val_loss"].idxmin())
    assert best_meta["val_loss"] == ref_hist["val_loss"].min()

    stem = tmp_path / "b" / "run"
    with pytest.raises(_Interrupt):
        _run(stem, epochs=4, stop_at=2)  # dies after epochs 0 and 1 were saved
    calls = []
    model, hist = _run(stem, epochs=4, model_seed=99, calls=calls)  # fresh model (other init) + optimizer
    assert calls == [2, 3]  # resumed: only the remaining epochs ran
    assert len(hist) == 4 and list(hist["epoch"]) == [0, 1, 2, 3]
    for k, v in ref_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert list(hist["train_loss"]) == list(ref_hist["train_loss"])
    assert list(hist["val_loss"]) == list(ref_hist["val_loss"])


def test_fit_does_not_resume_with_other_meta(tmp_path):
    stem = tmp_path / "run"
    with pytest.raises(_Interrupt):
        _run(stem, epochs=4, stop_at=2, meta={"arch": "tiny"})
    calls = []
    model, hist = _run(stem, epochs=4, calls=calls, meta={"arch": "other"})
    assert calls == [0, 1, 2, 3]
    fresh, _ = _run(tmp_path / "fresh", epochs=4, meta={"arch": "other"})
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    # and resume=False ignores a matching checkpoint
    calls = []
    model = _resnet()
    fit(model, loss_fn=_mse, train_batches=lambda e: calls.append(e) or _data(1), epochs=4,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01), checkpoint=stem, resume=False,
        meta={"arch": "other"}, schedule=progressive_unfreeze(model, (1, 3)))
    assert calls == [0, 1, 2, 3]


def test_fit_step_lr_factor_follows_the_global_optimizer_step_and_resumes_its_count(tmp_path):
    n_batches = [3, 2, 4, 1]  # unequal epochs: the step is not epoch * a constant
    epoch_factor = [1.0, 0.5, 1.0, 0.25]

    def step_factor(step):
        return 1.0 / (1 + step)

    def run(stem, *, seen, stop_at=None, model_seed=0):
        torch.manual_seed(model_seed)
        model = nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def train_batches(epoch):
            if epoch == stop_at:
                raise _Interrupt
            g = torch.Generator().manual_seed(epoch)
            return [{"x": torch.randn(4, 3, generator=g)} for _ in range(n_batches[epoch])]

        def loss_fn(m, batch):
            seen.append(opt.param_groups[0]["lr"])  # the rate the coming optimizer step uses
            return (m(batch["x"]) - 1).pow(2).mean()

        hist = fit(model, loss_fn=loss_fn, train_batches=train_batches, epochs=4, optimizer=opt, checkpoint=stem,
                   step_lr_factor=step_factor, lr_factor=lambda e: epoch_factor[e])
        return model, hist

    epochs = [e for e, n in enumerate(n_batches) for _ in range(n)]
    expected = [0.1 * epoch_factor[e] * step_factor(s) for s, e in enumerate(epochs)]
    seen = []
    ref, hist = run(tmp_path / "a" / "run", seen=seen)
    assert seen == pytest.approx(expected, rel=1e-12)
    last = np.cumsum(n_batches) - 1
    assert list(hist["lr"]) == pytest.approx([expected[i] for i in last], rel=1e-12)  # the epoch's last step
    assert load_checkpoint(tmp_path / "a" / "run.last")[1]["steps"] == sum(n_batches)

    stem = tmp_path / "b" / "run"
    with pytest.raises(_Interrupt):
        run(stem, seen=[], stop_at=2)  # dies after epochs 0 and 1 (5 steps) were saved
    seen = []
    model, resumed = run(stem, seen=seen, model_seed=99)
    assert seen == pytest.approx(expected[5:], rel=1e-12)  # the count continues at step 5
    assert list(resumed["lr"]) == list(hist["lr"])
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_safetensors_and_json(tmp_path):
    model = _resnet()
    meta = {"arch": "ResNetMLP", "epoch": 3, "widths": [4, 8, 16, 32], "nested": {"lr": 0.001, "ok": True}}
    written = save_checkpoint(tmp_path / "ck", model, meta=meta)
    assert written == tmp_path / "ck.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.json", "ck.safetensors"]
    raw = written.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])  # safetensors: a JSON header, then raw tensor bytes
    assert set(header) - {"__metadata__"} == set(model.state_dict())
    assert raw[:1] != b"\x80"  # not a pickle stream
    assert json.loads((tmp_path / "ck.json").read_text())["meta"] == meta

    state, got_meta = load_checkpoint(tmp_path / "ck.json")  # either suffix (or none) names the checkpoint
    assert got_meta == meta
    assert set(state) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v) and state[k].dtype == v.dtype, k
    other = _resnet(5)
    other.load_state_dict(state, strict=True)
    x = _data(1, batch=2)[0]
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x)["rfs"], model.eval()(x)["rfs"], atol=0, rtol=0)


def test_checkpoint_stem_with_dots_keeps_its_name(tmp_path):
    """``run.last`` and ``run.best`` must not both collapse to ``run.safetensors``."""
    a, b = _resnet(1), _resnet(2)
    save_checkpoint(tmp_path / "run.last", a, meta={"which": "last"})
    save_checkpoint(tmp_path / "run.best", b, meta={"which": "best"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "run.best.json", "run.best.safetensors", "run.last.json", "run.last.safetensors"]
    state, meta = load_checkpoint(tmp_path / "run.last")
    assert meta == {"which": "last"} and torch.equal(state["fusion.net.0.weight"], a.fusion.net[0].weight)
    state, meta = load_checkpoint(tmp_path / "run.best.safetensors")
    assert meta == {"which": "best"} and torch.equal(state["fusion.net.0.weight"], b.fusion.net[0].weight)


def test_checkpoint_with_optimizer_writes_optimizer_state(tmp_path):
    model = _resnet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _mse(model, _data(1, batch=2)[0]).backward()
    opt.step()
    save_checkpoint(tmp_path / "ck", model, optimizer=opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.json", "ck.optim.safetensors", "ck.safetensors"]
    assert json.loads((tmp_path / "ck.json").read_text())["optimizer"]["class"] == "Adam"


def test_load_checkpoint_missing_file_names_path(tmp_path):
    path = tmp_path / "nowhere" / "ck"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path) + ".safetensors")):
        load_checkpoint(path)
    save_checkpoint(tmp_path / "half", _resnet())
    (tmp_path / "half.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "half.json"))):
        load_checkpoint(tmp_path / "half")


# --------------------------------------------------------------------------- strict encoder loading


def test_load_encoder_from_autoencoder_state_and_file(tmp_path):
    torch.manual_seed(10)
    ae = ResNetAutoEnc(**RES)
    model = _resnet(0)
    assert not torch.equal(model.encoder.conv1.weight, ae.encoder.conv1.weight)
    report = load_encoder(model.encoder, ae.state_dict())
    assert report.keys == len(model.encoder.state_dict())
    for k, v in ae.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v), k

    vit_ae, vit = ViTAutoEnc(**VIT), _vit(3)
    save_checkpoint(tmp_path / "vit_ae", vit_ae, meta={"pretext": "ssl"})
    report = load_encoder(vit.encoder, tmp_path / "vit_ae")
    assert report.meta == {"pretext": "ssl"}
    for k, v in vit_ae.encoder.state_dict().items():
        assert torch.equal(vit.encoder.state_dict()[k], v), k


def _assert_unchanged(module, before):
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_load_encoder_rejects_shape_mismatch_and_loads_nothing():
    torch.manual_seed(10)
    ae = ResNetAutoEnc(**RES, conv1_kernel=3)  # all keys match, only conv1.weight's shape differs
    model = _resnet(0)
    before = _snapshot(model.encoder)
    with pytest.raises(CheckpointMismatchError) as err:
        load_encoder(model.encoder, ae.state_dict())
    msg = str(err.value)
    assert "conv1.weight" in msg and "(4, 1, 3, 3, 3)" in msg and "(4, 1, 7, 7, 7)" in msg
    assert err.value.shapes == [("conv1.weight", (4, 1, 3, 3, 3), (4, 1, 7, 7, 7))]
    assert err.value.missing == [] and err.value.unexpected == []
    _assert_unchanged(model.encoder, before)

    vit_ae, vit = ViTAutoEnc(**{**VIT, "hidden_size": 48, "mlp_dim": 64}), _vit()
    before = _snapshot(vit.encoder)
    with pytest.raises(CheckpointMismatchError) as err:
        load_encoder(vit.encoder, vit_ae.state_dict())
    assert ("norm.weight", (48,), (32,)) in err.value.shapes
    assert "blocks.0.norm1.weight: (48,) vs (32,)" in str(err.value)
    _assert_unchanged(vit.encoder, before)


def test_load_encoder_rejects_missing_and_unexpected_keys():
    torch.manual_seed(10)
    state = ResNetAutoEnc(**RES).state_dict()
    model = _resnet(0)
    before = _snapshot(model.encoder)

    dropped = dict(state)
    del dropped["encoder.layer2.0.conv1.weight"]
    with pytest.raises(CheckpointMismatchError) as err:
        load_encoder(model.encoder, dropped)
    assert err.value.missing == ["layer2.0.conv1.weight"] and err.value.unexpected == []
    assert "layer2.0.conv1.weight" in str(err.value)
    _assert_unchanged(model.encoder, before)

    extra = dict(state)
    extra["encoder.layer5.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError) as err:
        load_encoder(model.encoder, extra)
    assert err.value.unexpected == ["layer5.weight"] and err.value.missing == []
    assert "layer5.weight" in str(err.value)
    _assert_unchanged(model.encoder, before)

    with pytest.raises(CheckpointMismatchError, match="no key starts with"):
        load_encoder(model.encoder, state, prefix="backbone.")
    _assert_unchanged(model.encoder, before)


def test_index_batches_chunks_and_shuffles_by_seed():
    from mmlib.train import index_batches

    idx = np.arange(10, 20)
    chunks = list(index_batches(idx, 4))
    assert [c.tolist() for c in chunks] == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19]]
    a = np.concatenate(list(index_batches(idx, 3, shuffle_seed=5)))
    b = np.concatenate(list(index_batches(idx, 3, shuffle_seed=5)))
    assert np.array_equal(a, b) and sorted(a.tolist()) == idx.tolist() and not np.array_equal(a, idx)
