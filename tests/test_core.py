import dataclasses
import random

import numpy as np
import pytest
import torch

from mmlib import core


def test_select_device_auto_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert core.select_device("auto") == torch.device("cpu")
    assert core.select_device(" CPU ") == torch.device("cpu")


def test_select_device_auto_prefers_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert core.select_device("auto") == torch.device("cuda")


def test_select_device_rejects_missing_gpu_and_nonsense(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        core.select_device("cuda")
    with pytest.raises(ValueError, match="not a valid torch device"):
        core.select_device("gpu0")
    with pytest.raises(ValueError, match="string"):
        core.select_device(3)


def test_select_device_rejects_gpu_index_out_of_range(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="only 1 CUDA"):
        core.select_device("cuda:3")


def test_autocast_dtype_policy(monkeypatch):
    cpu = torch.device("cpu")
    assert core.autocast_dtype(cpu, "fp32") is None
    assert core.autocast_dtype(cpu, "bf16") is torch.bfloat16
    monkeypatch.setattr(core, "cpu_supports_bf16", lambda: True)
    assert core.autocast_dtype(cpu) is torch.bfloat16
    monkeypatch.setattr(core, "cpu_supports_bf16", lambda: False)
    assert core.autocast_dtype(cpu) is None
    with pytest.raises(ValueError, match="precision"):
        core.autocast_dtype(cpu, "fp16-ish")


def test_autocast_context_really_lowers_precision():
    cpu = torch.device("cpu")
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with core.autocast(cpu, "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with core.autocast(cpu, "fp32"):
        assert (a @ b).dtype == torch.float32


def test_seed_everything_repeats_every_generator():
    def draw():
        return random.random(), np.random.rand(), torch.rand(3).tolist(), rng.random()

    rng = core.seed_everything(123)
    first = draw()
    rng = core.seed_everything(123)
    second = draw()
    rng = core.seed_everything(124)
    third = draw()
    assert first == second
    assert first != third


def test_seed_everything_makes_training_repeatable():
    def train():
        core.seed_everything(7)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        x, y = torch.randn(32, 4), torch.randn(32, 1)
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return torch.cat([p.flatten() for p in model.parameters()])

    assert torch.equal(train(), train())


@pytest.mark.parametrize("bad", [-1, 1.5, "0", True])
def test_seed_everything_rejects_bad_seeds(bad):
    with pytest.raises(ValueError, match="seed"):
        core.seed_everything(bad)


@dataclasses.dataclass(frozen=True)
class _Prof(core.Profile):
    epochs: int = 1
    width: int = 8


def _set():
    return core.ProfileSet(
        smoke=_Prof(name="smoke", epochs=1), quick=_Prof(name="quick", epochs=5), full=_Prof(name="full", epochs=300)
    )


def test_profile_set_and_overrides():
    profiles = _set()
    assert list(profiles) == ["smoke", "quick", "full"]
    assert profiles.get_profile("quick").epochs == 5
    tuned = profiles.get_profile("full", width=64)
    assert (tuned.epochs, tuned.width, tuned.name) == (300, 64, "full")
    assert profiles["full"].width == 8, "overrides must not change the registered profile"
    assert tuned.as_dict() == {"name": "full", "epochs": 300, "width": 64}


def test_profile_errors_name_the_problem():
    profiles = _set()
    with pytest.raises(ValueError, match="unknown profile 'paper'"):
        profiles.get_profile("paper")
    with pytest.raises(ValueError, match=r"no field\(s\) \['epoch'\]"):
        profiles.get_profile("quick", epoch=3)
    with pytest.raises(ValueError, match="missing"):
        core.ProfileSet(smoke=_Prof(name="smoke"), quick=_Prof(name="quick"))
    with pytest.raises(ValueError, match="named"):
        core.ProfileSet(smoke=_Prof(name="smoke"), quick=_Prof(name="full"), full=_Prof(name="full"))


def test_logger_is_namespaced_and_configured_once():
    a = core.get_logger("train")
    b = core.get_logger("mmlib.train")
    assert a is b and a.name == "mmlib.train"
    core.get_logger("x")
    ours = [h for h in core.get_logger().handlers if getattr(h, "_mmlib", False)]
    assert len(ours) == 1


def test_progress_wraps_and_can_be_disabled(monkeypatch):
    monkeypatch.setenv("MMLIB_PROGRESS", "0")
    bar = core.progress(range(5), desc="x")
    assert list(bar) == [0, 1, 2, 3, 4]
    assert bar.disable


def test_positive_int_accepts_integers_from_one_only():
    from mmlib.core import positive_int

    assert positive_int(3) == 3 and positive_int(np.int64(7)) == 7
    for bad in (0, -2, 2.0, "3", True, None):
        assert positive_int(bad) is None, bad
