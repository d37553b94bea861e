"""Survival losses of P4: Cox partial likelihood (Breslow/Efron), logistic-hazard NLL, time discretisation.

The Cox loss is checked against hand computations, a plain-Python reference and the coefficients
scikit-survival fits on its WHAS500 data; the discrete-time NLL against hand computations and an
independent binary cross-entropy formulation.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from mmlib.losses import cox_ph_loss, discrete_time_nll, discretize_times

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- plain-math references


def reference_cox_nll_sum(risk: list[float], time: list[float], event: list[int], ties: str) -> float:
    """-log partial likelihood by the textbook formulas, one distinct event time at a time."""
    total = 0.0
    for t in sorted({ti for ti, ei in zip(time, event) if ei}):
        tied = [i for i in range(len(time)) if time[i] == t and event[i]]
        s_r = sum(math.exp(risk[j]) for j in range(len(time)) if time[j] >= t)
        s_d = sum(math.exp(risk[i]) for i in tied)
        d = len(tied)
        total += sum(risk[i] for i in tied)
        if ties == "breslow":
            total -= d * math.log(s_r)
        else:
            total -= sum(math.log(s_r - l / d * s_d) for l in range(d))
    return -total


def t64(x: list) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# ----------------------------------------------------------------------------- Cox: hand computed


# Five samples: an event at t=1, two events tied at t=2 with a sample censored at t=2 (in the
# risk set but not among the tied events), and one censored at t=3.
HAND_RISK = [0.5, -0.3, 1.2, 0.1, -0.7]
HAND_TIME = [1.0, 2.0, 2.0, 2.0, 3.0]
HAND_EVENT = [1, 1, 1, 0, 0]


def _hand_values() -> tuple[float, float]:
    e = [math.exp(r) for r in HAND_RISK]
    s1 = sum(e)  # risk set at t=1: everyone
    s2 = e[1] + e[2] + e[3] + e[4]  # risk set at t=2
    sd = e[1] + e[2]  # tied events at t=2
    eta_events = HAND_RISK[0] + HAND_RISK[1] + HAND_RISK[2]
    breslow = -(eta_events - math.log(s1) - 2 * math.log(s2))
    efron = -(eta_events - math.log(s1) - math.log(s2) - math.log(s2 - 0.5 * sd))
    return breslow, efron


def test_cox_hand_computed_breslow_and_efron() -> None:
    breslow, efron = _hand_values()
    assert abs(breslow - efron) > 1e-3  # the example really distinguishes the two
    args = (t64(HAND_RISK), t64(HAND_TIME), torch.tensor(HAND_EVENT))
    assert cox_ph_loss(*args, ties="breslow", reduction="sum").item() == pytest.approx(breslow, rel=1e-12)
    assert cox_ph_loss(*args, ties="efron", reduction="sum").item() == pytest.approx(efron, rel=1e-12)
    # "mean" divides by the number of events (3), not by the batch size (5).
    assert cox_ph_loss(*args, ties="breslow").item() == pytest.approx(breslow / 3, rel=1e-12)
    assert cox_ph_loss(*args).item() == pytest.approx(efron / 3, rel=1e-12)  # efron is the default


def test_cox_reduction_none_is_per_event_and_sums_to_total() -> None:
    args = (t64(HAND_RISK), t64(HAND_TIME), torch.tensor(HAND_EVENT, dtype=torch.bool))
    for ties in ("breslow", "efron"):
        per = cox_ph_loss(*args, ties=ties, reduction="none")
        assert per.shape == (5,)
        assert per[3].item() == 0.0 and per[4].item() == 0.0  # censored samples contribute nothing
        assert (per[:3] > 0).all()
        assert per.sum().item() == pytest.approx(cox_ph_loss(*args, ties=ties, reduction="sum").item(), rel=1e-12)
    e = [math.exp(r) for r in HAND_RISK]
    per = cox_ph_loss(*args, ties="breslow", reduction="none")
    assert per[0].item() == pytest.approx(math.log(sum(e)) - HAND_RISK[0], rel=1e-12)


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_cox_matches_plain_python_reference_with_many_ties(ties: str) -> None:
    rng = random.Random(0)
    for trial in range(5):
        b = 40
        time = [float(rng.randint(1, 8)) for _ in range(b)]  # heavy ties
        event = [int(rng.random() < 0.6) for _ in range(b)]
        risk = [rng.gauss(0.0, 1.5) for _ in range(b)]
        want = reference_cox_nll_sum(risk, time, event, ties)
        got = cox_ph_loss(t64(risk), t64(time), torch.tensor(event), ties=ties, reduction="sum").item()
        assert got == pytest.approx(want, rel=1e-10), trial


def test_efron_equals_breslow_without_ties_and_differs_with_them() -> None:
    g = torch.Generator().manual_seed(1)
    risk = torch.randn(30, generator=g, dtype=torch.float64)
    time = torch.randperm(30, generator=g).double() + 1.0  # distinct times
    event = torch.rand(30, generator=g) < 0.7
    a = cox_ph_loss(risk, time, event, ties="breslow")
    b = cox_ph_loss(risk, time, event, ties="efron")
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    tied = torch.ceil(time / 5)
    a = cox_ph_loss(risk, tied, event, ties="breslow")
    b = cox_ph_loss(risk, tied, event, ties="efron")
    assert b.item() < a.item()  # Efron's shrinking risk sets give a larger likelihood


def test_cox_gradcheck() -> None:
    g = torch.Generator().manual_seed(2)
    time = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    event = torch.tensor([1, 1, 1, 0, 1, 1, 0, 1])
    risk = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    for ties in ("breslow", "efron"):
        assert torch.autograd.gradcheck(lambda r: cox_ph_loss(r, time, event, ties=ties), (risk,))


# ----------------------------------------------------------------------------- Cox: edge cases, invariances


@pytest.mark.parametrize("ties", ["breslow", "efron"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cox_batch_without_events_is_a_connected_zero(ties: str, reduction: str) -> None:
    risk = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    time, no_events = torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3, dtype=torch.bool)
    loss = cox_ph_loss(risk, time, no_events, ties=ties, reduction=reduction)
    assert loss.shape == () and torch.isfinite(loss) and loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert risk.grad is not None and torch.equal(risk.grad, torch.zeros(3))


def test_cox_no_events_reduction_none_and_empty_batch() -> None:
    risk = torch.tensor([0.3, -1.0], requires_grad=True)
    per = cox_ph_loss(risk, torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), reduction="none")
    assert torch.equal(per, torch.zeros(2)) and per.requires_grad
    empty = torch.zeros(0, requires_grad=True)
    loss = cox_ph_loss(empty, torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_cox_single_sample(ties: str) -> None:
    risk = torch.tensor([1.7], requires_grad=True)
    loss = cox_ph_loss(risk, torch.tensor([4.0]), torch.tensor([True]), ties=ties)
    assert loss.item() == 0.0  # the event is alone in its own risk set: log(e^r / e^r) = 0
    loss.backward()
    assert risk.grad.abs().item() < 1e-7
    assert cox_ph_loss(torch.tensor([1.7]), torch.tensor([4.0]), torch.tensor([False])).item() == 0.0


def test_cox_accepts_column_risk_and_integer_times() -> None:
    risk = t64(HAND_RISK)
    want = cox_ph_loss(risk, t64(HAND_TIME), torch.tensor(HAND_EVENT))
    got = cox_ph_loss(risk[:, None], torch.tensor([1, 2, 2, 2, 3]), torch.tensor(HAND_EVENT))
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_cox_shift_and_permutation_invariance(ties: str) -> None:
    g = torch.Generator().manual_seed(3)
    b = 64
    risk = torch.randn(b, generator=g)
    time = torch.randint(1, 12, (b,), generator=g).float()
    event = torch.rand(b, generator=g) < 0.5
    base = cox_ph_loss(risk, time, event, ties=ties)
    # A shift of 500 overflows exp() in float32: only a log-sum-exp formulation survives it.
    for shift in (3.0, -7.5, 500.0):
        shifted = cox_ph_loss(risk + shift, time, event, ties=ties)
        assert torch.isfinite(shifted)
        assert shifted.item() == pytest.approx(base.item(), rel=1e-4, abs=1e-4)
    for _ in range(3):
        p = torch.randperm(b, generator=g)
        assert cox_ph_loss(risk[p], time[p], event[p], ties=ties).item() == pytest.approx(base.item(), rel=1e-5)


def test_cox_stable_for_extreme_risks_float32() -> None:
    risk = torch.tensor([200.0, -200.0, 150.0, -150.0, 0.0, 90.0], requires_grad=True)
    time = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0])
    event = torch.tensor([1, 1, 1, 1, 1, 0])
    for ties in ("breslow", "efron"):
        loss = cox_ph_loss(risk, time, event, ties=ties, reduction="sum")
        (grad,) = torch.autograd.grad(loss, risk)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        want = reference_cox_nll_sum([200.0, -200.0, 150.0, -150.0, 0.0, 90.0], time.tolist(), event.tolist(), ties)
        assert loss.item() == pytest.approx(want, rel=1e-5)


def test_cox_validation_names_the_argument() -> None:
    r, t, e = torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 0, 1])
    with pytest.raises(ValueError, match="risk"):
        cox_ph_loss(torch.tensor([0.0, float("nan"), 1.0]), t, e)
    with pytest.raises(ValueError, match="risk"):
        cox_ph_loss(torch.tensor([0.0, float("inf"), 1.0]), t, e)
    with pytest.raises(ValueError, match="risk"):
        cox_ph_loss(torch.zeros(3, 2), t, e)
    with pytest.raises(ValueError, match="time"):
        cox_ph_loss(r, torch.tensor([1.0, float("nan"), 3.0]), e)
    with pytest.raises(ValueError, match="time"):
        cox_ph_loss(r, torch.tensor([1.0, float("inf"), 3.0]), e)
    with pytest.raises(ValueError, match="time"):
        cox_ph_loss(r, torch.tensor([1.0, -2.0, 3.0]), e)
    with pytest.raises(ValueError, match=r"time.*\(3,\)"):
        cox_ph_loss(r, torch.tensor([1.0, 2.0]), e)
    with pytest.raises(ValueError, match="event"):
        cox_ph_loss(r, t, torch.tensor([1, 2, 0]))
    with pytest.raises(ValueError, match="event"):
        cox_ph_loss(r, t, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="ties"):
        cox_ph_loss(r, t, e, ties="exact")
    with pytest.raises(ValueError, match="reduction"):
        cox_ph_loss(r, t, e, reduction="max")


# ----------------------------------------------------------------------------- Cox vs scikit-survival


def _fit_linear_cox(x: torch.Tensor, time: torch.Tensor, event: torch.Tensor, ties: str) -> torch.Tensor:
    beta = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [beta], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = cox_ph_loss(x @ beta, time, event, ties=ties)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return beta.detach()


WHAS_COLUMNS = ["age", "bmi", "hr", "sysbp", "diasbp"]


def _whas500() -> tuple:
    """(x standardised (n, 5) array, sksurv's structured y, time tensor, event tensor) of WHAS500."""
    sksurv_datasets = pytest.importorskip("sksurv.datasets")
    x_df, y = sksurv_datasets.load_whas500()
    x = x_df[WHAS_COLUMNS].to_numpy(dtype=float)
    x = (x - x.mean(0)) / x.std(0)
    time = torch.tensor(y["lenfol"].astype(float).tolist(), dtype=torch.float64)
    event = torch.tensor(y["fstat"].astype(bool).tolist())
    return x, y, time, event


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_cox_fit_matches_scikit_survival_whas500(ties: str) -> None:
    x, y, time, event = _whas500()
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    assert len(set(time[event].tolist())) < int(event.sum())  # tied event times: Breslow != Efron
    model = CoxPHSurvivalAnalysis(alpha=0, ties=ties, n_iter=200, tol=1e-12).fit(x, y)
    want = torch.as_tensor(model.coef_, dtype=torch.float64)
    got = _fit_linear_cox(torch.as_tensor(x), time, event, ties)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (got, want)
    assert (want.abs() > 0.05).sum() >= 3  # the comparison is not one of near-zero coefficients


def test_cox_breslow_and_efron_fits_differ_on_whas500() -> None:
    """Guards the comparison above: the two tie methods must give distinguishably different fits."""
    x, _, time, event = _whas500()
    b = _fit_linear_cox(torch.as_tensor(x), time, event, "breslow")
    e = _fit_linear_cox(torch.as_tensor(x), time, event, "efron")
    assert not torch.allclose(b, e, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- discrete-time NLL


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def test_discrete_time_nll_hand_computed() -> None:
    logits = [[0.2, -1.0, 0.5], [1.5, 0.3, -0.4]]
    # sample 0: event in bin 1; sample 1: censored in bin 1 (survives bins 0 and 1)
    h = [[_sig(z) for z in row] for row in logits]
    l0 = -(math.log(1 - h[0][0]) + math.log(h[0][1]))
    l1 = -(math.log(1 - h[1][0]) + math.log(1 - h[1][1]))
    z, j, e = t64(logits), torch.tensor([1, 1]), torch.tensor([True, False])
    per = discrete_time_nll(z, j, e, reduction="none")
    assert per[0].item() == pytest.approx(l0, rel=1e-12)
    assert per[1].item() == pytest.approx(l1, rel=1e-12)
    assert discrete_time_nll(z, j, e).item() == pytest.approx((l0 + l1) / 2, rel=1e-12)  # mean over samples
    assert discrete_time_nll(z, j, e, reduction="sum").item() == pytest.approx(l0 + l1, rel=1e-12)
    # event in the first bin, censoring in the last one
    per = discrete_time_nll(z, torch.tensor([0, 2]), torch.tensor([1, 0]), reduction="none")
    assert per[0].item() == pytest.approx(-math.log(h[0][0]), rel=1e-12)
    assert per[1].item() == pytest.approx(-sum(math.log(1 - p) for p in h[1]), rel=1e-12)


def test_discrete_time_nll_equals_masked_bce() -> None:
    g = torch.Generator().manual_seed(4)
    b, k = 50, 7
    logits = 2 * torch.randn(b, k, generator=g, dtype=torch.float64)
    j = torch.randint(0, k, (b,), generator=g)
    event = torch.rand(b, generator=g) < 0.5
    h = 1 / (1 + torch.exp(-logits))
    bins = torch.arange(k)[None, :]
    target = ((bins == j[:, None]) & event[:, None]).double()  # 0 before the bin, event at it
    mask = (bins <= j[:, None]).double()  # bins after the event/censoring bin are unobserved
    bce = -(target * torch.log(h) + (1 - target) * torch.log(1 - h))
    want = (bce * mask).sum(1)
    got = discrete_time_nll(logits, j, event.long(), reduction="none")
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_discrete_time_nll_extreme_logits() -> None:
    logits = torch.tensor([[50.0, -50.0, 50.0], [-50.0, 50.0, -50.0], [50.0, 50.0, 50.0]], requires_grad=True)
    j = torch.tensor([2, 1, 0])
    event = torch.tensor([0, 1, 0])
    per = discrete_time_nll(logits, j, event, reduction="none")
    (grad,) = torch.autograd.grad(per.sum(), logits)
    assert torch.isfinite(per).all() and torch.isfinite(grad).all()
    # censored after bins with hazard logits 50, -50, 50: -log(1 - sigmoid(50)) = 50 each (log(0) = inf naively)
    assert per[0].item() == pytest.approx(100.0, rel=1e-5)
    assert per[1].item() == pytest.approx(0.0, abs=1e-5)  # survived bin 0, event in bin 1: both near certain
    assert per[2].item() == pytest.approx(50.0, rel=1e-5)
    assert grad[0, 0].item() == pytest.approx(1.0, abs=1e-6)  # d/dz of -logsigmoid(-z) = sigmoid(z)
    assert torch.equal(grad[2, 1:], torch.zeros(2))  # bins after the censoring bin get no gradient


def test_discrete_time_nll_gradcheck_and_validation() -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    j, e = torch.tensor([0, 1, 2, 2]), torch.tensor([1, 0, 1, 0])
    assert torch.autograd.gradcheck(lambda z: discrete_time_nll(z, j, e), (logits,))
    z = logits.detach()
    with pytest.raises(ValueError, match="logits"):
        discrete_time_nll(z[0], j, e)
    with pytest.raises(ValueError, match="logits"):
        discrete_time_nll(torch.where(torch.eye(4, 3).bool(), float("nan"), z), j, e)
    with pytest.raises(ValueError, match="bin_index"):
        discrete_time_nll(z, torch.tensor([0, 1, 3, 2]), e)
    with pytest.raises(ValueError, match="bin_index"):
        discrete_time_nll(z, torch.tensor([0, -1, 2, 2]), e)
    with pytest.raises(ValueError, match="bin_index"):
        discrete_time_nll(z, j.double(), e)
    with pytest.raises(ValueError, match="event"):
        discrete_time_nll(z, j, torch.tensor([1, 0, 3, 0]))
    with pytest.raises(ValueError, match="reduction"):
        discrete_time_nll(z, j, e, reduction="avg")


# ----------------------------------------------------------------------------- discretize_times


def test_discretize_times_edges() -> None:
    cuts = [0.0, 1.0, 2.5, 4.0]  # K = 3 intervals: [..0, 1], (1, 2.5], (2.5, 4.0..]
    time = torch.tensor([-1.0, 0.0, 0.5, 1.0, 1.0001, 2.5, 3.0, 4.0, 4.5, 100.0])
    want = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    got = discretize_times(time, cuts)
    assert got.dtype == torch.long
    assert torch.equal(got, want)
    assert torch.equal(discretize_times(time, torch.tensor(cuts, dtype=torch.float64)), want)
    # float32 times that are not exactly representable still land on their own cut when cuts is a list
    t32 = torch.tensor([0.1, 0.2, 0.30001], dtype=torch.float32)
    assert torch.equal(discretize_times(t32, [0.0, 0.1, 0.2, 0.3]), torch.tensor([0, 1, 2]))
    # integer times, 2-D shape kept
    assert torch.equal(discretize_times(torch.tensor([[0, 1], [2, 9]]), [0, 1, 2]), torch.tensor([[0, 0], [1, 1]]))


def test_discretize_times_validation() -> None:
    with pytest.raises(ValueError, match="cuts"):
        discretize_times(torch.tensor([1.0]), [1.0])
    with pytest.raises(ValueError, match="cuts"):
        discretize_times(torch.tensor([1.0]), [0.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="cuts"):
        discretize_times(torch.tensor([1.0]), [0.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="time"):
        discretize_times(torch.tensor([float("nan")]), [0.0, 1.0])


def test_discretize_then_nll_roundtrip() -> None:
    """A censoring exactly on cut c_{j+1} survives interval j; just after it, it also enters j+1."""
    cuts = [0.0, 1.0, 2.0, 3.0]
    logits = torch.tensor([[0.3, -0.2, 0.8]], dtype=torch.float64)
    on_cut = discrete_time_nll(logits, discretize_times(torch.tensor([2.0]), cuts), torch.tensor([0]))
    after = discrete_time_nll(logits, discretize_times(torch.tensor([2.01]), cuts), torch.tensor([0]))
    s = [math.log(1 - _sig(z)) for z in logits[0].tolist()]
    assert on_cut.item() == pytest.approx(-(s[0] + s[1]), rel=1e-12)
    assert after.item() == pytest.approx(-(s[0] + s[1] + s[2]), rel=1e-12)
