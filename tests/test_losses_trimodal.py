"""P3 (MoRE) tri-modal contrastive loss: one-direction InfoNCE by hand, the 1/2 + 1/2 formula, temperature handling."""

import math

import numpy as np
import pytest
import torch

from mmlib.losses import ClipLoss, TriModalLoss, info_nce

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _info_nce_by_hand(a: list[list[float]], b: list[list[float]], tau: float) -> float:
    """Plain-python InfoNCE: mean over rows i of -log(exp(s_ii / tau) / sum_j exp(s_ij / tau)), s = cosine."""

    def unit(v: list[float]) -> list[float]:
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    ua, ub = [unit(v) for v in a], [unit(v) for v in b]
    total = 0.0
    for i, q in enumerate(ua):
        logits = [sum(x * y for x, y in zip(q, k, strict=True)) / tau for k in ub]
        log_denominator = math.log(sum(math.exp(z) for z in logits))
        total += -(logits[i] - log_denominator)
    return total / len(ua)


def _sym(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    return 0.5 * info_nce(a, b, tau) + 0.5 * info_nce(b, a, tau)


def _random(seed: int, b: int = 8, d: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, d, generator=g, dtype=torch.float64) for _ in range(3))


# --------------------------------------------------------------------------- info_nce


def test_info_nce_closed_form_3x2():
    # rows e1, e2, -e1 against themselves, tau = 1: cosines [[1, 0, -1], [0, 1, 0], [-1, 0, 1]]
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    row0 = math.log(math.e + 1 + math.exp(-1)) - 1  # rows 0 and 2
    row1 = math.log(math.e + 2) - 1
    assert info_nce(a, a, 1.0).item() == pytest.approx((2 * row0 + row1) / 3, abs=1e-12)


def test_info_nce_equals_hand_computed_log_softmax_3x2():
    a = [[1.0, 2.0], [-0.5, 1.0], [3.0, -1.0]]
    b = [[0.8, 2.5], [1.0, 0.2], [-2.0, -1.0]]
    for tau in (0.02, 0.1, 1.0):
        expected = _info_nce_by_hand(a, b, tau)
        got = info_nce(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), tau).item()
        assert got == pytest.approx(expected, rel=1e-10)
        # the other direction is a different number here, and matches its own hand computation
        back = info_nce(torch.tensor(b, dtype=torch.float64), torch.tensor(a, dtype=torch.float64), tau).item()
        assert back == pytest.approx(_info_nce_by_hand(b, a, tau), rel=1e-10)
    assert not math.isclose(_info_nce_by_hand(a, b, 0.1), _info_nce_by_hand(b, a, 0.1), rel_tol=1e-3)


def test_info_nce_is_scale_invariant_and_rejects_bad_input():
    t, x, _ = _random(0)
    assert info_nce(3 * t, 0.5 * x, 0.1).item() == pytest.approx(info_nce(t, x, 0.1).item(), rel=1e-12)
    with pytest.raises(ValueError, match=r"a of shape \(B, D\)"):
        info_nce(t[0], x, 0.1)
    with pytest.raises(ValueError, match="one shape"):
        info_nce(t, x[:3], 0.1)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(t, x, 0.0)


# --------------------------------------------------------------------------- TriModalLoss


def test_trimodal_loss_is_the_half_half_formula_of_symmetric_terms():
    t, x, e = _random(1)
    loss = TriModalLoss(temperature=0.02)
    out = loss(t, x, e)
    assert set(out) == {"loss", "text_xray", "text_ecg", "temperature"}
    assert out["temperature"].item() == pytest.approx(0.02, rel=1e-6)
    tau = 1.0 / loss.logit_scale().double().item()  # 0.02 up to the float32 rounding of the stored log-scale
    # each term is the mean of its two directions, with the text on one side
    assert out["text_xray"].item() == pytest.approx(_sym(t, x, tau).item(), rel=1e-9)
    assert out["text_ecg"].item() == pytest.approx(_sym(t, e, tau).item(), rel=1e-9)
    assert out["loss"].item() == pytest.approx(0.5 * _sym(t, x, tau).item() + 0.5 * _sym(t, e, tau).item(), rel=1e-9)
    # the two signal modalities are never contrasted with each other
    assert out["loss"].item() != pytest.approx(0.5 * _sym(x, e, tau).item() + 0.5 * _sym(t, e, tau).item(), rel=1e-3)
    # the hand computation agrees on the whole loss
    tl, xl, el = t.tolist(), x.tolist(), e.tolist()
    hand = 0.25 * sum(_info_nce_by_hand(p, q, tau) for p, q in ((tl, xl), (xl, tl), (tl, el), (el, tl)))
    assert out["loss"].item() == pytest.approx(hand, rel=1e-9)


def test_trimodal_terms_are_symmetric_and_agree_with_clip_loss():
    t, x, _ = _random(2)
    loss = TriModalLoss(temperature=0.1)
    # swapping the roles of text and X-ray gives the same symmetric term
    assert loss(t, xray=x)["text_xray"].item() == pytest.approx(loss(x, xray=t)["text_xray"].item(), rel=1e-12)
    assert info_nce(t, x, 0.1).item() != pytest.approx(info_nce(x, t, 0.1).item(), rel=1e-3)  # the halves differ
    # P1's ClipLoss is the same symmetric InfoNCE
    clip = ClipLoss(temperature=0.1, learnable=False)(t, x)["loss"]
    assert loss(t, xray=x)["loss"].item() == pytest.approx(clip.item(), rel=1e-9)


def test_one_missing_modality_gives_the_two_modality_loss():
    t, x, e = _random(3)
    loss = TriModalLoss()
    only_xray = loss(t, xray=x)
    assert set(only_xray) == {"loss", "text_xray", "temperature"}
    assert only_xray["loss"].item() == pytest.approx(loss(t, x, e)["text_xray"].item(), rel=1e-12)
    assert only_xray["loss"].item() == pytest.approx(_sym(t, x, 0.02).item(), rel=1e-6)
    only_ecg = loss(t, ecg=e)
    assert set(only_ecg) == {"loss", "text_ecg", "temperature"}
    assert only_ecg["loss"].item() == pytest.approx(loss(t, x, e)["text_ecg"].item(), rel=1e-12)


def test_fixed_temperature_is_a_buffer_that_never_changes():
    loss = TriModalLoss(temperature=0.02, learnable=False)
    assert list(loss.parameters()) == []
    assert "log_logit_scale" in dict(loss.named_buffers())
    assert "log_logit_scale" in loss.state_dict()
    before = loss.log_logit_scale.clone()
    head = torch.nn.Linear(5, 5)
    model = torch.nn.ModuleDict({"head": head, "loss": loss})
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    t, x, e = (z.float() for z in _random(4))
    out = loss(head(t), x, e)
    out["loss"].backward()
    opt.step()
    assert torch.equal(loss.log_logit_scale, before)
    assert not loss.log_logit_scale.requires_grad
    assert loss(t, x, e)["temperature"].item() == pytest.approx(0.02, rel=1e-6)


def test_learnable_temperature_is_a_clamped_parameter_that_trains():
    loss = TriModalLoss(temperature=0.07, learnable=True)
    params = dict(loss.named_parameters())
    assert list(params) == ["log_logit_scale"]
    assert params["log_logit_scale"].item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    before = loss.log_logit_scale.detach().clone()
    opt = torch.optim.SGD(loss.parameters(), lr=0.5)
    t, x, e = (z.float() for z in _random(5))
    loss(t, x, e)["loss"].backward()
    assert loss.log_logit_scale.grad is not None and loss.log_logit_scale.grad.abs().item() > 0
    opt.step()
    assert not torch.equal(loss.log_logit_scale.detach(), before)
    # CLIP's clamp: 1 / tau never leaves [1, max_logit_scale], and a clamped scale gets no gradient
    with torch.no_grad():
        loss.log_logit_scale.fill_(math.log(1000.0))
    assert loss.logit_scale().item() == pytest.approx(100.0)
    assert loss(t, x, e)["temperature"].item() == pytest.approx(0.01, rel=1e-6)
    loss.zero_grad()
    loss(t, x, e)["loss"].backward()
    assert loss.log_logit_scale.grad.item() == 0.0
    with torch.no_grad():
        loss.log_logit_scale.fill_(-3.0)
    assert loss.logit_scale().item() == pytest.approx(1.0)


def test_aligned_embeddings_give_a_lower_loss_than_shuffled_ones():
    g = torch.Generator().manual_seed(6)
    t = torch.randn(16, 8, generator=g)
    x = t + 0.1 * torch.randn(16, 8, generator=g)
    e = t + 0.1 * torch.randn(16, 8, generator=g)
    perm = torch.roll(torch.arange(16), 1)
    loss = TriModalLoss()
    aligned = loss(t, x, e)
    assert aligned["loss"].item() < loss(t, x[perm], e)["loss"].item()
    assert aligned["loss"].item() < loss(t, x, e[perm])["loss"].item()
    assert aligned["loss"].item() < loss(t, x[perm], e[perm])["loss"].item()
    assert aligned["loss"].item() < 0.05  # near-identical pairs at tau = 0.02


def test_trimodal_loss_gradients_reach_all_three_inputs():
    t, x, e = (z.float().requires_grad_() for z in _random(7))
    TriModalLoss()(t, x, e)["loss"].backward()
    for z in (t, x, e):
        assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_trimodal_loss_rejects_bad_arguments():
    t, x, e = _random(8)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        TriModalLoss(temperature=0.0)
    with pytest.raises(ValueError, match="start clamped"):
        TriModalLoss(temperature=0.001, learnable=True)
    with pytest.raises(ValueError, match="start clamped"):
        TriModalLoss(temperature=2.0, learnable=True)
    TriModalLoss(temperature=2.0, learnable=False)  # a fixed temperature is never clamped
    loss = TriModalLoss()
    with pytest.raises(ValueError, match="neither"):
        loss(t)
    with pytest.raises(ValueError, match=r"ecg of the text's shape \(8, 5\), got \(4, 5\)"):
        loss(t, x, e[:4])
    with pytest.raises(ValueError, match=r"text of shape \(B, D\)"):
        loss(t[0], x[0])
    with pytest.raises(ValueError, match="xray"):
        loss(t, np.zeros((8, 5)))
