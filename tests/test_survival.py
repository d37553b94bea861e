"""mmlib.survival: Cox fitting over embeddings, Breslow curves, risk groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mmlib import metrics
from mmlib.survival import breslow_survival, fit_survival, predict_risk, risk_groups

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Linear(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, 1, bias=False)

    def forward(self, batch):
        return {"risk": self.lin(batch["x"]).squeeze(-1)}


def planted(n: int, seed: int, beta=(1.0, -0.5, 0.0)):
    """Exponential times with hazard exp(x @ beta), uniform censoring."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(beta)))
    t = rng.exponential(1 / np.exp(x @ np.asarray(beta)))
    c = rng.uniform(0, 3, n)
    return {"x": torch.tensor(x, dtype=torch.float32), "time": torch.tensor(np.minimum(t, c), dtype=torch.float32),
            "event": torch.tensor(t <= c)}


def test_fit_recovers_planted_coefficients_and_ranks_held_out_subjects():
    train, val, test = planted(600, 0), planted(200, 1), planted(400, 2)
    torch.manual_seed(0)
    fit = fit_survival(Linear(3), train, val, epochs=400, lr=0.05, weight_decay=0.0, patience=None)
    coef = fit.model.lin.weight.detach().numpy().ravel()
    assert np.allclose(coef, [1.0, -0.5, 0.0], atol=0.2), coef
    r = predict_risk(fit.model, test)
    true = test["x"].numpy() @ np.array([1.0, -0.5, 0.0])
    c_model = metrics.concordance_index(test["event"].numpy(), test["time"].numpy(), r)
    c_true = metrics.concordance_index(test["event"].numpy(), test["time"].numpy(), true)
    assert c_model > c_true - 0.01


def test_keeps_the_epoch_with_the_lowest_validation_loss():
    train, val = planted(100, 3), planted(60, 4)
    torch.manual_seed(0)
    fit = fit_survival(_Overfit(3), train, val, epochs=150, lr=0.05, weight_decay=0.0, patience=None)
    h = fit.history
    assert fit.best_epoch == int(h["val_loss"].idxmin())
    assert h["best"].sum() >= 1 and h.loc[fit.best_epoch, "best"]
    from mmlib.losses import cox_ph_loss

    with torch.no_grad():
        vloss = float(cox_ph_loss(fit.model(val)["risk"], val["time"], val["event"]))
    assert vloss == pytest.approx(h["val_loss"].min(), rel=1e-5)
    assert fit.best_epoch < len(h) - 1, "an over-parameterised model should overfit before the last epoch"


class _Overfit(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))

    def forward(self, batch):
        return {"risk": self.net(batch["x"]).squeeze(-1)}


def test_patience_stops_early_and_same_seed_is_identical():
    train, val = planted(100, 5), planted(60, 6)
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        fit = fit_survival(_Overfit(3), train, val, epochs=300, lr=0.05, patience=5, seed=3, batch_size=32)
        runs.append((fit.history, predict_risk(fit.model, val)))
    assert len(runs[0][0]) < 300
    model = _Overfit(3)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit_survival(model, train, val, epochs=3, seed=9)
    assert torch.equal(torch.rand(3), expected), "fit_survival must leave the caller's global RNG state as it was"
    assert runs[0][0].equals(runs[1][0])
    assert np.array_equal(runs[0][1], runs[1][1])


def test_contrastive_term_is_added_with_its_weight():
    class WithAux(Linear):
        def forward(self, batch):
            out = super().forward(batch)
            out["contrastive"] = (self.lin.weight ** 2).sum()
            return out

    train = planted(80, 7)
    torch.manual_seed(0)
    plain = fit_survival(WithAux(3), train, epochs=50, lr=0.05, weight_decay=0.0, contrastive_weight=0.0)
    torch.manual_seed(0)
    shrunk = fit_survival(WithAux(3), train, epochs=50, lr=0.05, weight_decay=0.0, contrastive_weight=50.0)
    assert "train_contrastive" in shrunk.history
    assert shrunk.model.lin.weight.norm() < 0.5 * plain.model.lin.weight.norm()


def test_bad_input_is_named():
    good = planted(20, 8)
    with pytest.raises(KeyError, match="event"):
        fit_survival(Linear(3), {"x": good["x"], "time": good["time"]})
    with pytest.raises(ValueError, match="no events"):
        fit_survival(Linear(3), {**good, "event": torch.zeros(20, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"train\['x'\] has 19 rows"):
        fit_survival(Linear(3), {**good, "x": good["x"][:19]})


def test_breslow_curves_match_scikit_survival():
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    data = planted(150, 9)
    x, t, e = data["x"].numpy().astype(float), data["time"].numpy().astype(float), data["event"].numpy()
    y = np.array(list(zip(e, t)), dtype=[("event", bool), ("time", float)])
    cph = CoxPHSurvivalAnalysis().fit(x, y)
    times = np.quantile(t, [0.1, 0.3, 0.5, 0.7, 0.9])
    ours = breslow_survival(x @ cph.coef_, t, e, x[:10] @ cph.coef_, times)
    theirs = np.stack([f(times) for f in cph.predict_survival_function(x[:10])])
    assert np.allclose(ours, theirs, atol=1e-6)
    assert (np.diff(ours, axis=1) <= 1e-12).all()


def test_risk_groups_cut_at_training_tertiles():
    train = np.arange(9.0)  # tertile cut points 2.67 and 5.33
    assert risk_groups(train, np.array([-5.0, 2.0, 3.0, 5.0, 6.0, 100.0])).tolist() == [
        "low", "low", "intermediate", "intermediate", "high", "high"]
    with pytest.raises(ValueError, match="labels"):
        risk_groups(train, train, labels=("a", "b"))
