"""Corrupted-input reconstruction pretext task (mmlib.ssl)."""

import pytest
import torch
from torch import nn

from mmlib.ssl import InputCorruption, reconstruction_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def _volumes(b: int = 2, shape=(16, 16, 16), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, *shape, generator=g) + 1.0  # strictly positive: a dropped box is visible


# None: the CPU recipe (every draw on one host generator); True: the device recipe (boxes drawn on the
# host, values and permutations on the images' device), run here on the CPU
RECIPES = pytest.mark.parametrize("on_device", [None, True], ids=["host-draws", "device-draws"])


@RECIPES
def test_corruption_returns_a_corrupted_copy_and_leaves_input_alone(on_device):
    x = _volumes()
    keep = x.clone()
    corr = InputCorruption(draws_on_device=on_device)
    out = corr(x, seed=1)
    assert torch.equal(x, keep)  # input untouched
    assert out.shape == x.shape and out.dtype == x.dtype
    assert type(out) is torch.Tensor  # a plain tensor, not a MONAI MetaTensor
    for i in range(len(x)):
        changed = (out[i] != x[i]).float().mean()
        assert 0 < changed < 1, i  # some voxels corrupted, not the whole volume


@RECIPES
def test_corruption_is_seeded_and_independent_per_sample(on_device):
    x = _volumes()
    corr = InputCorruption(draws_on_device=on_device)
    a, b = corr(x, seed=3), corr(x, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, corr(x, seed=4))
    same = x[:1].expand(2, -1, -1, -1, -1).clone()  # two identical volumes
    out = corr(same, seed=3)
    assert not torch.equal(out[0], out[1])  # drawn per sample


@RECIPES
def test_each_corruption_alone(on_device):
    x = _volumes(1)
    # dropout only: changed voxels form boxes and their values are replaced (not a permutation)
    out = InputCorruption(shuffle_holes=0, draws_on_device=on_device)(x, seed=0)
    assert (out != x).any()
    assert not torch.equal(torch.sort(out.flatten()).values, torch.sort(x.flatten()).values)
    # random fill values lie within the volume's intensity range
    assert out.min() >= x.min() and out.max() <= x.max()
    # shuffle only, always applied: voxels are permuted, so the multiset of values is unchanged
    out = InputCorruption(dropout_holes=0, shuffle_prob=1.0, draws_on_device=on_device)(x, seed=0)
    assert (out != x).any()
    assert torch.equal(torch.sort(out.flatten()).values, torch.sort(x.flatten()).values)
    # nothing enabled: an exact copy
    assert torch.equal(InputCorruption(dropout_holes=0, shuffle_holes=0)(x, seed=0), x)
    assert torch.equal(InputCorruption(dropout_holes=0, shuffle_prob=0.0)(x, seed=0), x)


def test_cpu_images_keep_the_host_recipe():
    # the default on a CPU draws everything from one host generator, as before the device recipe existed
    # (the CPU tables do not move); the device recipe draws its own values
    x = _volumes()
    default = InputCorruption()(x, seed=7)
    assert torch.equal(default, InputCorruption(draws_on_device=False)(x, seed=7))
    assert not torch.equal(default, InputCorruption(draws_on_device=True)(x, seed=7))


def test_reconstruction_loss_is_l1_against_clean_volume():
    x = _volumes()
    corrupted = InputCorruption()(x, seed=5)
    ident = nn.Identity()
    expected = (corrupted - x).abs().mean()
    assert expected > 0
    torch.testing.assert_close(reconstruction_loss(ident, x, corrupted), expected)
    assert reconstruction_loss(ident, x, x) == 0
    # a model that reconstructs the clean volume perfectly scores 0 on the corrupted input
    assert reconstruction_loss(lambda _: x, x, corrupted) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dropout_size": (0.3, 0.2)},  # min > max
        {"dropout_size": (0.0, 0.2)},  # zero
        {"dropout_size": (0.1, 1.0)},  # whole axis
        {"shuffle_size": (-0.1, 0.1)},
        {"shuffle_size": (0.2, 1.5)},
        {"shuffle_prob": 1.5},
        {"shuffle_prob": -0.1},
        {"dropout_holes": -1},
    ],
)
def test_invalid_settings_raise(kwargs):
    with pytest.raises(ValueError):
        InputCorruption(**kwargs)


def test_corruption_rejects_non_volume_batches():
    with pytest.raises(ValueError, match="B, C, X, Y, Z"):
        InputCorruption()(torch.rand(1, 16, 16, 16), seed=0)
