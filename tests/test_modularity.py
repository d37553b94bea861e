"""P5 modularity (mmlib.modularity): networkx agreement, planted communities, padding, gradients, batching."""

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from networkx.algorithms.community import modularity as nx_modularity

from mmlib.modularity import (
    ModularityLoss,
    cosine_assignment,
    modularity,
    modularity_loss,
    normalise_assignment,
    patch_affinity,
    subsample_nodes,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_graph(n: int, density: float, isolated: int, seed: int) -> torch.Tensor:
    """Symmetric non-negative (n, n) weights, zero diagonal, the last ``isolated`` nodes without edges."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, n, generator=g, dtype=torch.float64) * (torch.rand(n, n, generator=g) < density)
    w = torch.triu(w, diagonal=1)
    w = w + w.T
    if isolated:
        w[-isolated:] = 0.0
        w[:, -isolated:] = 0.0
    return w


def _nx_graph(a: torch.Tensor) -> nx.Graph:
    graph = nx.Graph()
    graph.add_nodes_from(range(a.shape[0]))
    i, j = torch.triu_indices(a.shape[0], a.shape[0], offset=1)
    for u, v in zip(i.tolist(), j.tolist()):
        if a[u, v] > 0:
            graph.add_edge(u, v, weight=float(a[u, v]))
    return graph


def _one_hot(labels: torch.Tensor, k: int) -> torch.Tensor:
    return F.one_hot(labels, k).to(torch.float64)


def _clusters(n_per: int = 8, k: int = 3, d: int = 6, spread: float = 0.15, seed: int = 0):
    """Points around k orthogonal directions: (k * n_per, d) features and their cluster labels."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(d, dtype=torch.float64)[:k] * 3.0
    labels = torch.arange(k).repeat_interleave(n_per)
    x = centers[labels] + spread * torch.randn(k * n_per, d, generator=g, dtype=torch.float64)
    return x, labels


# --------------------------------------------------------------------------- networkx agreement


@pytest.mark.parametrize("n,density,isolated,k,seed", [(12, 0.5, 0, 2, 0), (15, 0.3, 2, 3, 1), (20, 0.8, 3, 4, 2),
                                                       (9, 0.2, 1, 5, 3)])
def test_one_hot_modularity_equals_networkx(n, density, isolated, k, seed):
    a = _random_graph(n, density, isolated, seed)
    graph = _nx_graph(a)
    g = torch.Generator().manual_seed(100 + seed)
    for trial in range(4):  # several partitions of the same graph, incl. one with empty communities
        labels = torch.randint(0, k, (n,), generator=g) if trial else torch.zeros(n, dtype=torch.long)
        communities = [set((labels == c).nonzero().flatten().tolist()) for c in range(k)]
        expected = nx_modularity(graph, [c for c in communities if c], weight="weight")
        q = modularity(_one_hot(labels, k)[None], a[None])
        assert q.shape == (1,)
        assert q.item() == pytest.approx(expected, abs=1e-6)


def test_networkx_agreement_on_patch_affinity_graph():
    x, labels = _clusters(n_per=5, k=3, spread=0.8, seed=4)
    a = patch_affinity(x[None])[0]
    expected = nx_modularity(_nx_graph(a), [set((labels == c).nonzero().flatten().tolist()) for c in range(3)])
    assert modularity(_one_hot(labels, 3)[None], a[None]).item() == pytest.approx(expected, abs=1e-6)


def test_graph_without_edges_gives_zero_not_nan():
    s = torch.rand(2, 4, 3, requires_grad=True)
    q = modularity(s, torch.zeros(2, 4, 4))
    assert torch.equal(q, torch.zeros(2))
    q.sum().backward()
    assert torch.isfinite(s.grad).all()
    # a single patch has no edges either (no self-loops)
    assert modularity_loss(torch.randn(1, 1, 5), [(torch.rand(1, 1, 2), 1.0)]).item() == 0.0


# --------------------------------------------------------------------------- affinity and assignment


def test_patch_affinity_and_cosine_assignment_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    centers = torch.randn(3, 4, generator=g, dtype=torch.float64)
    a = patch_affinity(x)
    cos = F.cosine_similarity(x[:, :, None, :], x[:, None, :, :], dim=-1)
    expected = cos.clamp(min=0) * (1 - torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(a, expected)
    assert torch.equal(a, a.transpose(1, 2))
    s = cosine_assignment(x, centers)
    torch.testing.assert_close(s, F.cosine_similarity(x[:, :, None, :], centers[None, None], dim=-1).clamp(min=0))
    # per-sample centers (B, K, D) give the same as shared ones repeated
    torch.testing.assert_close(cosine_assignment(x, centers.expand(2, -1, -1)), s)
    assert (s > 0).any() and (s == 0).any()  # the ReLU is active on random data


def test_padding_rows_and_columns_are_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, generator=g) + 2.0  # a shared direction: every real pair has a positive cosine
    mask = torch.tensor([[False, False, False, True, True], [False] * 5])
    a = patch_affinity(x, mask)
    s = cosine_assignment(x, torch.randn(2, 4, 3, generator=g), mask)
    assert (a[0, 3:] == 0).all() and (a[0, :, 3:] == 0).all()
    assert (s[0, 3:] == 0).all()
    assert (a[0, :3, :3] > 0).any() and (a[1, 3:] > 0).any()


# --------------------------------------------------------------------------- planted communities


def test_planted_partition_beats_random_and_all_in_one():
    x, labels = _clusters(n_per=8, k=3)
    a = patch_affinity(x[None])
    planted = modularity(_one_hot(labels, 3)[None], a).item()
    all_in_one = modularity(torch.ones(1, len(labels), 1, dtype=torch.float64), a).item()
    assert all_in_one == pytest.approx(0.0, abs=1e-12)
    assert planted > 0.55  # three equal, nearly disconnected communities: at most 1 - 3 * (1/3)^2 = 2/3
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        shuffled = labels[torch.randperm(len(labels), generator=g)]
        assert modularity(_one_hot(shuffled, 3)[None], a).item() < planted - 0.3
    # the soft assignment to the cluster centres (S = ReLU(cos)) recovers the same structure
    soft = cosine_assignment(x[None], torch.eye(6, dtype=torch.float64)[:3])
    assert modularity(soft, a).item() > 0.5
    # and the loss is the negative weighted modularity
    loss = modularity_loss(x[None], [(_one_hot(labels, 3)[None], 2.0), (soft, 0.5)])
    assert loss.item() == pytest.approx(-(2.0 * planted + 0.5 * modularity(soft, a).item()), abs=1e-9)


# --------------------------------------------------------------------------- padding, batching, gradients


def test_padding_invariance_with_huge_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 7, 5, generator=g)
    s = torch.rand(1, 7, 3, generator=g)
    w = torch.rand(1, 7, 2, generator=g)
    ref_q = modularity(s, patch_affinity(x))
    ref_loss = modularity_loss(x, [(s, 1.0), (w, 0.7)])
    for fill in (1e6, -3e7, float("inf"), float("nan")):
        xp = torch.cat([x, torch.full((1, 4, 5), fill)], dim=1)
        sp = torch.cat([s, torch.full((1, 4, 3), fill)], dim=1)
        wp = torch.cat([w, torch.full((1, 4, 2), fill)], dim=1)
        mask = torch.tensor([[False] * 7 + [True] * 4])
        torch.testing.assert_close(modularity(sp, patch_affinity(xp, mask), mask), ref_q)
        torch.testing.assert_close(modularity_loss(xp, [(sp, 1.0), (wp, 0.7)], mask), ref_loss)
        # the gradient too: padding must not poison the real rows' gradient (0 * inf = nan)
        xg, x_ref = xp.clone().requires_grad_(), x.clone().requires_grad_()
        modularity_loss(xg, [(sp, 1.0), (wp, 0.7)], mask).backward()
        modularity_loss(x_ref, [(s, 1.0), (w, 0.7)]).backward()
        torch.testing.assert_close(xg.grad[:, :7], x_ref.grad)
        assert (xg.grad[:, 7:] == 0).all()
        # without the mask the padding does change the graph (the test above is not vacuous)
        if fill == 1e6:
            assert not torch.allclose(modularity_loss(xp, [(sp, 1.0), (wp, 0.7)]), ref_loss)


def test_batch_equals_per_sample():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 4, generator=g)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = True
    s = torch.rand(2, 9, 3, generator=g)
    q = modularity(s, patch_affinity(x, mask), mask)
    q0 = modularity(s[:1], patch_affinity(x[:1]))
    q1 = modularity(s[1:, :6], patch_affinity(x[1:, :6]))
    torch.testing.assert_close(q, torch.cat([q0, q1]))
    assert not torch.allclose(q0, q1)
    loss = modularity_loss(x, [(s, 1.5)], mask)
    torch.testing.assert_close(loss, -1.5 * torch.cat([q0, q1]).mean())


def test_gradients_reach_assignment_and_features_and_padding_gets_none():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 8, 4, generator=g).requires_grad_()
    centers = torch.randn(3, 4, generator=g).requires_grad_()
    mask = torch.tensor([[False] * 6 + [True] * 2])
    s_free = torch.rand(1, 8, 2, generator=g).requires_grad_()
    loss = ModularityLoss(alpha=1.0, beta=0.5)(x, cosine_assignment(x, centers, mask), s_free, mask)
    loss.backward()
    for t in (x, centers, s_free):
        assert torch.isfinite(t.grad).all()
        assert t.grad.abs().sum() > 0
    assert (x.grad[0, 6:] == 0).all() and (s_free.grad[0, 6:] == 0).all()
    # the module matches the function
    with torch.no_grad():
        s_p = cosine_assignment(x, centers, mask)
        ref = modularity_loss(x, [(s_p, 1.0), (s_free, 0.5)], mask)
        assert ModularityLoss(1.0, 0.5)(x, s_p, s_free, mask).item() == pytest.approx(ref.item())
        assert ModularityLoss(2.0)(x, s_p, mask=mask).item() == pytest.approx(
            modularity_loss(x, [(s_p, 2.0)], mask).item())


def test_gradient_ascent_on_centers_increases_modularity():
    x, _ = _clusters(n_per=6, k=3, d=6, spread=0.3, seed=2)
    x = x.float()[None]
    centers = torch.nn.Parameter(torch.randn(3, 6, generator=torch.Generator().manual_seed(0)))
    opt = torch.optim.Adam([centers], lr=0.05)
    a = patch_affinity(x)
    before = modularity(cosine_assignment(x, centers), a).item()
    for _ in range(30):
        opt.zero_grad()
        modularity_loss(x, [(cosine_assignment(x, centers), 1.0)]).backward()
        opt.step()
    assert modularity(cosine_assignment(x, centers), a).item() > before + 0.2


def test_bad_arguments():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"mask .*\(2, 5\).*\(2, 4\)"):
        patch_affinity(x, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"centers .*\(7, 4\)"):
        cosine_assignment(x, torch.randn(7, 4))
    with pytest.raises(ValueError, match=r"affinity .*\(2, 5, 5\).*\(2, 5, 4\)"):
        modularity(torch.rand(2, 5, 3), torch.rand(2, 5, 4))
    with pytest.raises(ValueError, match=r"assignments\[0\]\[0\] .*\(2, 4, 3\)"):
        modularity_loss(x, [(torch.rand(2, 4, 3), 1.0)])
    with pytest.raises(ValueError, match="non-empty sequence"):
        modularity_loss(x, [])


def test_normalised_assignments_are_a_partition_and_do_not_reward_collapse():
    x, labels = _clusters()
    a = patch_affinity(x[None])
    onehot = _one_hot(labels, 3)[None].to(x.dtype)
    # a one-hot S is already a partition: normalising changes nothing
    torch.testing.assert_close(modularity(normalise_assignment(onehot), a), modularity(onehot, a))
    # every prototype on the same cluster: the printed (unnormalised) form still scores it, the
    # normalised one sees one community holding every patch with a positive cosine (Q about 0;
    # patches with no positive cosine are rows of zeros, outside the partition)
    centre = x[labels == 0].mean(0)
    collapsed = cosine_assignment(x[None], centre.expand(3, -1))
    assert modularity(collapsed, a).item() > 0.1
    assert modularity(normalise_assignment(collapsed), a).abs().item() < 0.03
    soft = cosine_assignment(x[None], torch.stack([x[labels == k].mean(0) for k in range(3)]))
    q_soft = modularity(normalise_assignment(soft), a).item()
    assert 0.3 < q_soft <= modularity(onehot, a).item() + 1e-6 <= 1.0
    loss = modularity_loss(x[None], [(soft, 1.0)], normalise=True)
    assert loss.item() == pytest.approx(-q_soft)
    # padded rows (all zero) stay zero
    assert normalise_assignment(torch.zeros(1, 2, 3)).abs().sum() == 0


def test_subsample_nodes_keeps_real_rows_and_the_same_rows_in_every_tensor():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6, 1).expand(-1, -1, 3)
    s = x[..., :2] * 10
    mask = torch.tensor([[False] * 6, [False, False, True, True, True, True]])
    (xs, ss), ms = subsample_nodes([x, s], mask, 4, generator=g)
    assert xs.shape == (2, 4, 3) and ss.shape == (2, 4, 2) and ms.shape == (2, 4)
    torch.testing.assert_close(ss, xs[..., :2] * 10)  # the same rows
    assert len(set(xs[0, :, 0].tolist())) == 4  # no row twice
    assert set(xs[1, ~ms[1], 0].tolist()) == {6.0, 7.0}  # both real rows of the short bag kept
    (same,), m2 = subsample_nodes([x], mask, 6)
    assert same is x and m2 is mask
