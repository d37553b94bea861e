"""mmlib.fast: the fast training path trains the same model as the plain loop, only faster."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mmlib import core
from mmlib.fast import (
    Augment,
    FastPath,
    VolumeCache,
    adamw,
    channels_last,
    fp32_thin_convs,
    fused_adamw_supported,
    maybe_compile,
    set_sdpa,
    to_channels_last,
)
from mmlib.models import ResNetAutoEnc, ViTAutoEnc
from mmlib.models.autoencoders import ViTEncoder

CPU = torch.device("cpu")


def _tiny(kind: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    if kind == "resnet":  # needs sizes divisible by 32
        return ResNetAutoEnc(widths=(4, 8, 8, 16), layers=(1, 1, 1, 1), **kw)
    return ViTAutoEnc(img_size=(16, 16, 16), patch_size=4, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4,
                      deconv_chns=4, **kw)


def _volumes(kind: str, n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    s = 32 if kind == "resnet" else 16
    return torch.rand(n, 1, s, s, s, generator=g)


def _curve(kind: str, path: FastPath, steps: int = 5) -> list[float]:
    """Per-step L1 reconstruction losses of a tiny autoencoder trained along ``path`` (same seed and data)."""
    model = path.prepare(_tiny(kind), CPU)
    opt = path.optimizer(model.parameters(), lr=1e-2, weight_decay=0.05)
    x = _volumes(kind)
    losses = []
    for _ in range(steps):
        with path.autocast(CPU):
            loss = nn.functional.l1_loss(model(path.inputs(x)).float(), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


# --------------------------------------------------------------------------- same training, fast or plain


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_fast_path_gives_the_plain_loss_curve(kind):
    plain = _curve(kind, FastPath.plain())
    # the curve must move well beyond the tolerances below, or the comparison would prove nothing
    assert plain[-1] < 0.9 * plain[0], plain  # 10% = 5x the bf16 tolerance
    # fp32-only options (channels-last, fused AdamW, SDPA) change summation order only: ~1e-7 per
    # op, grown over 5 Adam steps; 1e-5 relative leaves room for that and none for a wrong update.
    fp32 = _curve(kind, FastPath(precision="fp32", channels_last=True, fused=True, sdpa=True))
    np.testing.assert_allclose(fp32, plain, rtol=1e-5)
    # bf16 autocast keeps 8 mantissa bits (relative 2^-8 = 0.4% per rounding); a loss averages
    # thousands of voxels, so the curves agree to ~1% over a few steps: rtol 2e-2.
    bf16 = _curve(kind, FastPath(precision="bf16", channels_last=True, fused=True, sdpa=True))
    np.testing.assert_allclose(bf16, plain, rtol=2e-2)


def test_fast_path_defaults():
    p = FastPath.plain()
    assert (p.precision, p.channels_last, p.fused, p.compile, p.sdpa) == ("fp32", False, False, False, False)
    f = FastPath.for_device("cpu")
    assert (f.precision == "bf16") == (core.autocast_dtype(CPU, "auto") is not None)
    assert f.compile is False and f.sdpa and f.channels_last
    assert f.fused == fused_adamw_supported([torch.zeros(1)])
    with pytest.raises(ValueError):
        FastPath(precision="fp16")
    with FastPath(precision="bf16").autocast(CPU):  # the bf16 path really runs in bf16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with p.autocast(CPU):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_channels_last_keeps_values_and_keys():
    model = _tiny("resnet").eval()
    x = _volumes("resnet", 2)
    keys = list(model.state_dict())
    ref = model(x)
    channels_last(model)
    assert model.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    xc = to_channels_last(x)
    assert xc.is_contiguous(memory_format=torch.channels_last_3d)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(xc), ref, rtol=1e-5, atol=1e-5)


def test_thin_convolutions_stay_fp32_under_bf16_autocast_with_the_same_keys():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.ConvTranspose3d(8, 1, 2, stride=2))
    x = torch.randn(2, 1, 6, 6, 6)
    keys = list(model.state_dict())
    first_fp32 = model[0](x)  # reference: the first layer without autocast

    def run():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = [model[0](x)]
            for layer in model[1:]:
                outs.append(layer(outs[-1]))
        outs[-1].float().sum().backward()
        return outs

    plain = run()
    assert [o.dtype for o in (plain[0], plain[2], plain[4])] == [torch.bfloat16] * 3
    assert fp32_thin_convs(model) == 1  # the one that reads 1 channel; not 8 -> 8, not 8 -> 1
    assert list(model.state_dict()) == keys and all(p.dtype == torch.float32 for p in model.parameters())
    thin = run()
    assert [o.dtype for o in (thin[0], thin[2], thin[4])] == [torch.float32, torch.bfloat16, torch.bfloat16]
    torch.testing.assert_close(thin[0], first_fp32, rtol=0, atol=0)  # computed in fp32, not rounded
    assert model[0].weight.grad is not None and model[0].weight.grad.dtype == torch.float32
    torch.testing.assert_close(thin[4].float(), plain[4].float(), rtol=0.05, atol=0.05)  # bf16 tolerance
    with torch.no_grad():  # outside autocast the wrapped layer is the plain layer
        torch.testing.assert_close(model[0](x), first_fp32, rtol=0, atol=0)
    assert fp32_thin_convs(model, enabled=False) == 1
    assert run()[0].dtype == torch.bfloat16
    assert fp32_thin_convs(model, max_in_channels=8) == 3


@pytest.mark.parametrize("kind", ["resnet", "vit"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_fast_path_keeps_one_channel_convolutions_fp32_only_under_cpu_bf16(kind, precision):
    model = _tiny(kind)
    FastPath(precision=precision).prepare(model, CPU)
    wrapped = [m for m in model.modules() if "forward" in m.__dict__]
    if precision == "bf16":  # the ResNet stem / the ViT patch embedding: the only layer reading 1 channel
        assert len(wrapped) == 1 and isinstance(wrapped[0], nn.Conv3d) and wrapped[0].in_channels == 1
    else:
        assert wrapped == []
    FastPath.plain().prepare(fresh := _tiny("resnet"), CPU)
    assert not any("forward" in m.__dict__ for m in fresh.modules())


# --------------------------------------------------------------------------- volume cache


def test_volume_cache_round_trip_within_storage_precision():
    g = torch.Generator().manual_seed(0)
    vols = torch.rand(3, 1, 6, 7, 8, generator=g) * torch.tensor([1.0, 3.0, 0.2]).view(3, 1, 1, 1, 1) - 0.1
    exact = VolumeCache(vols, storage="fp32")
    assert torch.equal(exact.get([0, 1, 2]), vols)
    half = VolumeCache(vols, storage="fp16")
    assert half.nbytes == vols.numel() * 2
    err = (half.get(range(3)) - vols).abs()
    assert float(err.max()) <= float(vols.abs().max()) * 2.0**-11
    q = VolumeCache(list(vols), storage="uint8")
    assert q.data.dtype == torch.uint8 and q.nbytes == vols.numel()
    for i in range(3):  # per-volume scale: error <= (max - min) / 510 for each volume
        bound = float(vols[i].max() - vols[i].min()) / 510 + 1e-7
        assert float((q.get([i]) - vols[i : i + 1]).abs().max()) <= bound
        assert float((q.get([i]) - vols[i : i + 1]).abs().max()) > bound / 20  # really quantised
    assert q.max_error() <= 3.2 / 510
    with pytest.raises(ValueError):
        VolumeCache(vols, storage="int4")


def test_volume_cache_batches_are_deterministic_and_cover_the_subset():
    vols = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1, 1).expand(10, 1, 2, 2, 2).contiguous()
    cache = VolumeCache(vols, storage="fp32")
    idx = np.array([0, 2, 3, 5, 7, 9])

    def order(seed):
        return [int(v) for b in cache.batches(idx, 4, seed) for v in b[:, 0, 0, 0, 0]]

    assert order(3) == order(3)
    assert sorted(order(3)) == idx.tolist()
    assert order(3) != order(4)
    assert order(None) == idx.tolist()
    assert [b.shape[0] for b in cache.batches(idx, 4, 3)] == [4, 2]


def test_augment_identity_when_off_and_flips_known_fraction():
    g = torch.Generator().manual_seed(0)
    vols = torch.rand(400, 1, 3, 4, 5, generator=g)
    cache = VolumeCache(vols, storage="fp32")
    off = Augment(flip_prob=0.0, scale=0.0, shift=0.0)
    assert torch.equal(torch.cat(list(cache.batches(range(400), 64, augment=off))), vols)
    assert torch.equal(torch.cat(list(cache.batches(range(400), 64))), vols)
    always = Augment(flip_prob=1.0, scale=0.0, shift=0.0)
    assert torch.equal(torch.cat(list(cache.batches(range(400), 64, augment=always))), vols.flip(2, 3, 4))

    half = Augment(flip_prob=0.5, flip_axes=(2,), scale=0.0, shift=0.0, seed=7)
    out = torch.cat(list(cache.batches(range(400), 64, augment=half, epoch=1)))
    flipped = (out == vols.flip(4)).flatten(1).all(1)
    kept = (out == vols).flatten(1).all(1)
    assert bool((flipped ^ kept).all())  # each sample is one or the other
    assert 0.4 < float(flipped.float().mean()) < 0.6  # Binomial(400, 0.5): +-0.1 is 4 SD
    again = torch.cat(list(cache.batches(range(400), 64, augment=half, epoch=1)))
    other = torch.cat(list(cache.batches(range(400), 64, augment=half, epoch=2)))
    assert torch.equal(out, again) and not torch.equal(out, other)

    intensity = Augment(flip_prob=0.0, scale=0.2, shift=0.1, seed=1)
    y = next(cache.batches(range(400), 400, augment=intensity))
    a = (y[:, 0, 0, 0, 1] - y[:, 0, 0, 0, 0]) / (vols[:, 0, 0, 0, 1] - vols[:, 0, 0, 0, 0])
    b = y[:, 0, 0, 0, 0] - a * vols[:, 0, 0, 0, 0]
    assert float((a - 1).abs().max()) <= 0.2 + 1e-4 and float((a - 1).abs().max()) > 0.15
    assert float(b.abs().max()) <= 0.1 + 1e-4 and float(b.abs().max()) > 0.07
    torch.testing.assert_close(y, vols * a.view(-1, 1, 1, 1, 1) + b.view(-1, 1, 1, 1, 1), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- SDPA


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_fast_path_uses_sdpa_except_under_cpu_bf16(precision):
    # CPU bf16 flash attention is slower than einsum attention (FastPath's docstring): prepare switches
    # even a model built with SDPA back to einsum there, and to SDPA everywhere else
    for built_with_sdpa in (True, False):
        model = _tiny("vit", sdpa=built_with_sdpa)
        FastPath(precision=precision).prepare(model, CPU)
        assert {b.attn.use_flash_attention for b in model.encoder.blocks} == {precision == "fp32"}
    FastPath.plain().prepare(plain := _tiny("vit"), CPU)
    assert not any(b.attn.use_flash_attention for b in plain.encoder.blocks)


def test_sdpa_same_output_and_state_dict_keys():
    plain, fast = _tiny("vit").eval(), _tiny("vit", sdpa=True).eval()
    assert list(plain.state_dict()) == list(fast.state_dict())
    fast.load_state_dict(plain.state_dict(), strict=True)
    assert all(b.attn.use_flash_attention for b in fast.encoder.blocks)
    assert not any(b.attn.use_flash_attention for b in plain.encoder.blocks)
    x = _volumes("vit", 2)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
    assert set_sdpa(plain, True) == 2
    torch.testing.assert_close(plain(x), fast(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dropout"):
        ViTEncoder(img_size=(16, 16, 16), patch_size=4, hidden_size=32, num_heads=4, num_layers=1, dropout_rate=0.1,
                   sdpa=True)


def test_attention_matrix_still_retrievable_without_sdpa():
    enc = ViTEncoder(img_size=(16, 16, 16), patch_size=4, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4).eval()
    for b in enc.blocks:
        b.attn.save_attn = True
    enc(torch.rand(2, 1, 16, 16, 16))
    att = enc.blocks[0].attn.att_mat
    assert att.shape == (2, 4, 64, 64)
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 4, 64))
    with pytest.raises(ValueError, match="save_attn"):
        set_sdpa(enc, True)


# --------------------------------------------------------------------------- optimiser and compile


def test_fused_adamw_matches_foreach_and_default():
    if not fused_adamw_supported([torch.zeros(1)]):
        pytest.skip("this torch has no fused AdamW kernel for CPU tensors")
    finals = []
    for make in (lambda p: adamw(p, 1e-2, 0.05, fused=True), lambda p: adamw(p, 1e-2, 0.05, fused=False),
                 lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(7, 16), nn.GELU(), nn.Linear(16, 3))
        opt = make(model.parameters())
        x, y = torch.randn(32, 7, generator=torch.Generator().manual_seed(1)), torch.randn(32, 3)
        for _ in range(6):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert adamw([nn.Parameter(torch.zeros(2))]).defaults["fused"] is True  # "auto" picks it here
    torch.testing.assert_close(finals[0], finals[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(finals[0], finals[2], rtol=0, atol=1e-6)
    assert float((finals[0] - finals[2]).abs().max()) < 1e-6


def test_maybe_compile_off_by_default_and_falls_back_with_a_warning(monkeypatch):
    model = nn.Linear(3, 2)
    assert maybe_compile(model) is model and getattr(model, "_compiled_call_impl", None) is None

    def broken(**_):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(model, "compile", broken)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*no C\\+\\+ compiler"):
        out = maybe_compile(model, True, example=torch.zeros(1, 3))
    assert out is model and out(torch.zeros(1, 3)).shape == (1, 2)
