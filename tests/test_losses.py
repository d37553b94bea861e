"""CLIP and image-tabular matching losses (P1): hand-computed values, invariants, 2-process gather."""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
from torch import nn

from mmlib.losses import ClipLoss, ImageTabularMatchingLoss, clip_logits, local_only, sample_hard_negatives

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- plain-math helpers


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _ce_row(row: list[float], target: int) -> float:
    """-log softmax(row)[target] with math only."""
    return math.log(sum(math.exp(x) for x in row)) - row[target]


def _clip_by_hand(a: list[list[float]], b: list[list[float]], tau: float) -> float:
    ua, ub = [_unit(r) for r in a], [_unit(r) for r in b]
    n = len(a)
    s = [[sum(x * y for x, y in zip(ua[i], ub[j])) / tau for j in range(n)] for i in range(n)]
    rows = sum(_ce_row(s[i], i) for i in range(n)) / n
    cols = sum(_ce_row([s[k][j] for k in range(n)], j) for j in range(n)) / n
    return 0.5 * rows + 0.5 * cols


A3 = [[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]
B3 = [[1.0, 1.0], [0.0, -1.0], [4.0, 3.0]]


# ----------------------------------------------------------------------------- clip_logits / ClipLoss


def test_clip_logits_are_cosines_over_temperature():
    a, b = torch.tensor(A3), torch.tensor(B3)
    got = clip_logits(a, b, 0.5)
    # image 2 = (0.6, 0.8), table 2 = (0.8, 0.6): cosine 0.96; image 1 = (0, 1), table 1 = (0, -1): -1
    assert got.shape == (3, 3)
    assert got[2, 2].item() == pytest.approx(0.96 / 0.5, abs=1e-6)
    assert got[1, 1].item() == pytest.approx(-2.0, abs=1e-6)
    assert got[0, 0].item() == pytest.approx((1 / math.sqrt(2)) / 0.5, abs=1e-6)
    # rows and columns may have different counts (a gathered global batch)
    assert clip_logits(a[:2], b, 1.0).shape == (2, 3)


def test_clip_loss_matches_hand_computation_3x2():
    tau = 0.5
    out = ClipLoss(temperature=tau)(torch.tensor(A3), torch.tensor(B3))
    assert out["loss"].item() == pytest.approx(_clip_by_hand(A3, B3, tau), abs=1e-5)
    assert out["logits"].shape == (3, 3)
    assert out["temperature"].item() == pytest.approx(tau)
    assert out["temperature"].dtype == torch.float32
    assert torch.equal(out["local_logits"], out["logits"])


def test_clip_loss_closed_form_two_orthogonal_pairs():
    # logits [[1, 0], [0, 1]]: every row and column CE is log(1 + e^-1)
    eye = torch.eye(2)
    assert ClipLoss(temperature=1.0)(eye, eye)["loss"].item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_clip_loss_is_symmetric_in_the_modalities():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    loss = ClipLoss(temperature=0.3)
    ab, ba = loss(a, b), loss(b, a)
    assert ab["loss"].item() == pytest.approx(ba["loss"].item(), abs=1e-6)
    assert torch.allclose(ab["logits"], ba["logits"].T, atol=1e-6)
    # but the two directions differ individually, so symmetry is not trivial
    rows = nn.functional.cross_entropy(ab["logits"], torch.arange(7))
    cols = nn.functional.cross_entropy(ab["logits"].T, torch.arange(7))
    assert abs(rows.item() - cols.item()) > 1e-3


def test_clip_loss_aligned_near_zero_random_near_log_b():
    z = 3.0 * torch.eye(8)
    assert ClipLoss(temperature=0.01)(z, z.clone())["loss"].item() < 1e-6
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, 256, generator=g), torch.randn(64, 256, generator=g)
    assert ClipLoss(temperature=1.0)(a, b)["loss"].item() == pytest.approx(math.log(64), abs=0.05)
    # swapping partners makes the loss large
    assert ClipLoss(temperature=0.01)(z, z.flip(0))["loss"].item() > 50


def test_clip_loss_gradients_reach_both_embeddings():
    a = torch.tensor(A3, requires_grad=True)
    b = torch.tensor(B3, requires_grad=True)
    out = ClipLoss(temperature=0.5)(a, b)
    out["loss"].backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    assert out["logits"].requires_grad  # graph kept for the caller


def test_learnable_temperature_gradient_matches_finite_difference():
    loss = ClipLoss(temperature=0.2, learnable=True).double()
    params = list(loss.parameters())
    assert len(params) == 1 and params[0].item() == pytest.approx(math.log(5.0))
    a, b = torch.tensor(A3, dtype=torch.float64), torch.tensor(B3, dtype=torch.float64)
    out = loss(a, b)
    assert out["temperature"].item() == pytest.approx(0.2)
    out["loss"].backward()
    grad = loss.log_logit_scale.grad.item()
    assert grad != 0
    eps = 1e-6
    hand = []
    for s in (math.log(5.0) + eps, math.log(5.0) - eps):
        hand.append(_clip_by_hand(A3, B3, 1.0 / math.exp(s)))
    assert grad == pytest.approx((hand[0] - hand[1]) / (2 * eps), rel=1e-5)
    assert list(ClipLoss(temperature=0.2).parameters()) == []  # fixed temperature: no parameter


def test_learnable_temperature_respects_the_clamp():
    loss = ClipLoss(temperature=0.1, learnable=True, max_logit_scale=50.0)
    with torch.no_grad():
        loss.log_logit_scale.fill_(math.log(1000.0))  # as if the optimiser pushed it past the clamp
    a, b = torch.tensor(A3), torch.tensor(B3)
    out = loss(a, b)
    assert out["temperature"].item() == pytest.approx(1 / 50.0)
    assert torch.allclose(out["logits"], clip_logits(a, b, 1 / 50.0), atol=1e-5)
    out["loss"].backward()
    assert loss.log_logit_scale.grad.item() == 0.0
    with pytest.raises(ValueError, match="max_logit_scale"):
        ClipLoss(temperature=0.001, learnable=True)  # scale 1000 > 100 would start clamped
    # a fixed temperature is used as given
    assert ClipLoss(temperature=0.001)(a, b)["temperature"].item() == pytest.approx(0.001)


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "match"),
    [
        ((3, 4), (2, 4), r"equal shape.*\(3, 4\).*\(2, 4\)"),
        ((3, 4), (3, 5), "equal shape"),
        ((0, 4), (0, 4), "at least 1"),
        ((3,), (3,), r"z_img of shape \(B, D\), got \(3,\)"),
    ],
)
def test_clip_loss_validates_shapes(a_shape, b_shape, match):
    with pytest.raises(ValueError, match=match):
        ClipLoss()(torch.zeros(a_shape), torch.zeros(b_shape))


def test_clip_validates_arguments():
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        ClipLoss(temperature=0)
    with pytest.raises(ValueError, match="max_logit_scale must be > 0"):
        ClipLoss(max_logit_scale=-1.0)
    with pytest.raises(ValueError, match="same embedding size"):
        clip_logits(torch.zeros(2, 3), torch.zeros(2, 4), 0.1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        clip_logits(torch.zeros(2, 3), torch.zeros(2, 3), -0.1)


# ----------------------------------------------------------------------------- distributed gather

WORLD, LOCAL_B, DIM, TAU = 2, 3, 4, 0.2


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.randn(WORLD * LOCAL_B, DIM, generator=g, dtype=torch.float64), torch.randn(
        WORLD * LOCAL_B, DIM, generator=g, dtype=torch.float64
    )


def _dist_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        img, tab = _global_batch()
        rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        result = {}
        for with_grad in (True, False):
            a = img[rows].clone().requires_grad_(True)
            b = tab[rows].clone().requires_grad_(True)
            out = ClipLoss(temperature=TAU, gather_with_grad=with_grad)(a, b)
            out["loss"].backward()
            result[with_grad] = {
                "loss": out["loss"].item(),
                "logits": out["logits"].detach(),
                "local_logits": out["local_logits"].detach(),
                "grad_img": a.grad,
                "grad_tab": b.grad,
            }
        no_gather = ClipLoss(temperature=TAU, gather=False)(img[rows], tab[rows])
        result["no_gather"] = no_gather["loss"].item()
        with local_only():  # every rank on the whole batch, nothing gathered (validation under DDP)
            result["local_only_whole"] = ClipLoss(temperature=TAU)(img, tab)["loss"].item()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_two_ranks(tmp_path) -> list[dict]:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _dist_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 60
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("2-process gloo run did not finish in 60 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def test_distributed_gather_matches_single_process_global_batch(tmp_path):
    ranks = _run_two_ranks(tmp_path)
    img, tab = _global_batch()

    # single process on the global batch
    a, b = img.clone().requires_grad_(True), tab.clone().requires_grad_(True)
    full = ClipLoss(temperature=TAU)(a, b)
    full["loss"].backward()
    logits = full["logits"].detach()
    labels = torch.arange(WORLD * LOCAL_B)

    for with_grad in (True, False):
        per_rank = [r[with_grad]["loss"] for r in ranks]
        # rank r covers rows r*B.. of the image->table CE and the same columns of table->image,
        # each a mean over B of the 2B terms of the global loss: mean over ranks = global loss
        assert sum(per_rank) / WORLD == pytest.approx(full["loss"].item(), abs=1e-6)
        for r, res in enumerate(ranks):
            rows = slice(r * LOCAL_B, (r + 1) * LOCAL_B)
            own = 0.5 * nn.functional.cross_entropy(logits[rows], labels[rows]) + 0.5 * nn.functional.cross_entropy(
                logits.T[rows], labels[rows]
            )
            assert res[with_grad]["loss"] == pytest.approx(own.item(), abs=1e-9)
            assert torch.allclose(res[with_grad]["logits"], logits[rows], atol=1e-9)  # local rows x global columns
            assert torch.allclose(res[with_grad]["local_logits"], logits[rows, rows], atol=1e-9)
    # the global negatives matter: a rank alone (gather=False) gives a different loss
    assert abs(ranks[0]["no_gather"] - ranks[0][True]["loss"]) > 1e-3
    # inside local_only() a rank's whole-batch loss is the single-process one (gathering would double the batch)
    for res in ranks:
        assert res["local_only_whole"] == pytest.approx(full["loss"].item(), abs=1e-9)

    # gather_with_grad: each rank's local embeddings receive the gradient of all ranks' losses,
    # i.e. WORLD x d(global loss)/d(its rows); DDP's mean over ranks then gives the exact gradient
    for r, res in enumerate(ranks):
        rows = slice(r * LOCAL_B, (r + 1) * LOCAL_B)
        assert torch.allclose(res[True]["grad_img"], WORLD * a.grad[rows], atol=1e-9)
        assert torch.allclose(res[True]["grad_tab"], WORLD * b.grad[rows], atol=1e-9)

    # open_clip's local-slot gather: only the gradient of this rank's own loss reaches its rows
    for r, res in enumerate(ranks):
        rows = slice(r * LOCAL_B, (r + 1) * LOCAL_B)
        ai, bi = img.clone().requires_grad_(True), tab.clone().requires_grad_(True)
        lg = clip_logits(ai, bi, TAU)
        own = 0.5 * nn.functional.cross_entropy(lg[rows], labels[rows]) + 0.5 * nn.functional.cross_entropy(
            lg.T[rows], labels[rows]
        )
        own.backward()
        assert res[False]["grad_img"].abs().sum() > 0
        assert torch.allclose(res[False]["grad_img"], ai.grad[rows], atol=1e-9)
        assert torch.allclose(res[False]["grad_tab"], bi.grad[rows], atol=1e-9)
        assert not torch.allclose(res[False]["grad_img"], WORLD * a.grad[rows], atol=1e-6)


# ----------------------------------------------------------------------------- hard negatives


def _offdiag_softmax(logits: torch.Tensor) -> torch.Tensor:
    n = logits.shape[0]
    p = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        z = sum(math.exp(logits[i, k].item()) for k in range(n) if k != i)
        for j in range(n):
            if j != i:
                p[i, j] = math.exp(logits[i, j].item()) / z
    return p


def test_hard_negatives_follow_renormalised_offdiagonal_softmax():
    # asymmetric, with a heavy diagonal (a sampler that kept it would be far off)
    logits = torch.tensor([[4.0, 1.0, 0.0, -1.0], [0.5, 3.0, 2.0, 0.0], [1.0, 1.0, 5.0, 1.5], [0.0, -2.0, 2.0, 6.0]])
    n, draws = logits.shape[0], 20_000
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(n, n, dtype=torch.float64)
    for _ in range(draws):
        j = sample_hard_negatives(logits, generator=g)
        counts[torch.arange(n), j] += 1
    assert counts.diagonal().sum() == 0  # never the positive itself
    freq = counts / draws
    expected = _offdiag_softmax(logits)
    assert (freq - expected).abs().max().item() < 0.02
    # and the frequencies are not those of the transposed logits
    assert (freq - _offdiag_softmax(logits.T)).abs().max().item() > 0.1


def test_hard_negatives_reproducible_and_never_diagonal():
    logits = torch.randn(16, 16, generator=torch.Generator().manual_seed(5))
    one = sample_hard_negatives(logits, generator=torch.Generator().manual_seed(7))
    two = sample_hard_negatives(logits, generator=torch.Generator().manual_seed(7))
    other = sample_hard_negatives(logits, generator=torch.Generator().manual_seed(8))
    assert one.dtype == torch.long and one.shape == (16,)
    assert torch.equal(one, two)
    assert not torch.equal(one, other)
    g = torch.Generator().manual_seed(9)
    big = torch.full((6, 6), 30.0) + 100.0 * torch.eye(6)  # the diagonal dominates the softmax
    for _ in range(300):
        assert (sample_hard_negatives(big, generator=g) != torch.arange(6)).all()


def test_hard_negatives_without_gradient():
    logits = torch.randn(4, 4, requires_grad=True)
    out = sample_hard_negatives(logits, generator=torch.Generator().manual_seed(0))
    assert not out.requires_grad


def test_hard_negatives_extreme_logits():
    inf = float("inf")
    logits = torch.tensor(
        [
            [5.0, 1e30, -inf, 0.0],  # a huge logit wins every time
            [-inf, 0.0, -inf, -inf],  # every off-diagonal -inf: uniform over j != 1
            [inf, inf, -3.0, 0.0],  # +inf entries: uniform among them
            [-1e30, -1e30, 0.0, 1e30],  # huge diagonal is ignored, the rest renormalised
        ]
    )
    g = torch.Generator().manual_seed(3)
    draws = torch.stack([sample_hard_negatives(logits, generator=g) for _ in range(600)])
    assert (draws[:, 0] == 1).all()
    assert set(draws[:, 1].tolist()) == {0, 2, 3}
    assert set(draws[:, 2].tolist()) == {0, 1}
    assert (draws[:, 3] == 2).all()


def test_hard_negatives_validation():
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r"square.*\(2, 3\)"):
        sample_hard_negatives(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        sample_hard_negatives(torch.tensor([[0.0, float("nan")], [0.0, 0.0]]))


# ----------------------------------------------------------------------------- image-tabular matching


class _RecordingFuse(nn.Module):
    """Fake interaction module: reads the subject id back from each input and records the pairs."""

    def __init__(self, channels: int, fields: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(channels + fields, dim)
        self.calls: list[tuple[list[int], list[int]]] = []

    def forward(self, image_tokens: torch.Tensor, tabular_features: torch.Tensor) -> torch.Tensor:
        self.calls.append(
            (image_tokens[:, 0, 0].round().long().tolist(), (tabular_features[:, 0] - 100).round().long().tolist())
        )
        return self.proj(torch.cat([image_tokens.mean(dim=1), tabular_features], dim=1))


def _subjects(b: int, n: int = 5, c: int = 3, f: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(b, dtype=torch.float32)
    g = torch.Generator().manual_seed(11)
    image_tokens = torch.randn(b, n, c, generator=g)
    image_tokens[:, 0, 0] = ids  # subject id encoded in the image
    tabular = torch.randn(b, f, generator=g)
    tabular[:, 0] = 100 + ids  # and in the table
    return image_tokens, tabular


def test_itm_pairs_labels_and_gradients():
    b, dim = 5, 8
    image_tokens, tabular = _subjects(b)
    image_tokens.requires_grad_(True)
    # image i is most similar to table i+1, so table i is most similar to image i-1
    logits = torch.zeros(b, b)
    logits[torch.arange(b), (torch.arange(b) + 1) % b] = 50.0
    fuse = _RecordingFuse(3, 4, dim)
    itm = ImageTabularMatchingLoss(dim)
    out = itm(fuse, image_tokens, tabular, logits, generator=torch.Generator().manual_seed(0))

    assert out["labels"].tolist() == [1] * b + [0] * (2 * b)
    assert out["logits_itm"].shape == (3 * b, 2)
    ids = list(range(b))
    assert out["negative_tables"].tolist() == [(i + 1) % b for i in ids]
    assert out["negative_images"].tolist() == [(i - 1) % b for i in ids]
    assert len(fuse.calls) == 1  # all 3B pairs in one call
    seen_images, seen_tables = fuse.calls[0]
    assert seen_images == ids + ids + [(i - 1) % b for i in ids]
    assert seen_tables == ids + [(i + 1) % b for i in ids] + ids

    # loss and accuracy recomputed by hand from the returned logits
    z, y = out["logits_itm"].detach(), out["labels"]
    lse = [math.log(math.exp(z[k, 0].item()) + math.exp(z[k, 1].item())) for k in range(3 * b)]
    hand = sum(lse[k] - z[k, y[k]].item() for k in range(3 * b)) / (3 * b)
    assert out["loss"].item() == pytest.approx(hand, abs=1e-5)
    assert math.isfinite(out["loss"].item())
    acc = sum(int((z[k, 1] > z[k, 0]).item() == bool(y[k])) for k in range(3 * b)) / (3 * b)
    assert out["accuracy"].item() == pytest.approx(acc)

    out["loss"].backward()
    assert itm.head.weight.grad.abs().sum() > 0
    assert fuse.proj.weight.grad.abs().sum() > 0
    assert image_tokens.grad.abs().sum() > 0


def test_itm_on_clip_logits_never_pairs_a_subject_with_itself_and_is_reproducible():
    b, dim = 6, 8
    image_tokens, tabular = _subjects(b)
    g = torch.Generator().manual_seed(2)
    clip = ClipLoss(temperature=0.1)(torch.randn(b, 4, generator=g), torch.randn(b, 4, generator=g))
    fuse = _RecordingFuse(3, 4, dim)
    itm = ImageTabularMatchingLoss(dim)
    for seed in range(50):
        out = itm(fuse, image_tokens, tabular, clip["local_logits"], generator=torch.Generator().manual_seed(seed))
        seen_images, seen_tables = fuse.calls[-1]
        assert [i == t for i, t in zip(seen_images, seen_tables)] == [True] * b + [False] * (2 * b)
        assert not out["negative_tables"].requires_grad
    r1 = itm(fuse, image_tokens, tabular, clip["local_logits"], generator=torch.Generator().manual_seed(4))
    r2 = itm(fuse, image_tokens, tabular, clip["local_logits"], generator=torch.Generator().manual_seed(4))
    assert torch.equal(r1["negative_tables"], r2["negative_tables"])
    assert torch.equal(r1["negative_images"], r2["negative_images"])
    assert r1["loss"].item() == pytest.approx(r2["loss"].item())


def test_itm_validation():
    image_tokens, tabular = _subjects(4)
    itm = ImageTabularMatchingLoss(8)
    fuse = _RecordingFuse(3, 4, 8)
    with pytest.raises(ValueError, match="same batch size"):
        itm(fuse, image_tokens, tabular[:3], torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"logits must be \(4, 4\).*\(4, 8\)"):
        itm(fuse, image_tokens, tabular, torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"fuse must return \(12, 8\).*\(12, 7\)"):
        itm(_RecordingFuse(3, 4, 7), image_tokens, tabular, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="at least 2"):
        itm(fuse, image_tokens[:1], tabular[:1], torch.zeros(1, 1))
    with pytest.raises(ValueError, match="dim must be a positive integer, got 0"):
        ImageTabularMatchingLoss(0)
