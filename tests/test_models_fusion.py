"""P4 fusion heads (mmlib.models.fusion): shapes, padding, batch equivariance, wiring, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmlib.models.fusion import (
    CoAttentionFusion,
    ContrastiveFusion,
    CrossAttentionBlock,
    CrossAttentionFusion,
    LateFusion,
    UnimodalSurvival,
    masked_mean,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DC, DE = 12, 10
DIMS = {"ct": DC, "ehr": DE}
ATT = dict(dim=16, heads=2, hidden=8)

MODELS = {
    "unimodal_ct": lambda: UnimodalSurvival("ct", DC, hidden=8),
    "unimodal_ehr": lambda: UnimodalSurvival("ehr", DE, hidden=8),
    "late": lambda: LateFusion(DIMS, hidden=8),
    "contrastive": lambda: ContrastiveFusion(DIMS, proj_dim=8, hidden=8),
    "cross_ct_ehr": lambda: CrossAttentionFusion(DIMS, direction="ct->ehr", **ATT),
    "cross_ehr_ct": lambda: CrossAttentionFusion(DIMS, direction="ehr->ct", **ATT),
    "coattention": lambda: CoAttentionFusion(DIMS, **ATT),
    "image_guided": lambda: CoAttentionFusion(DIMS, guided_by="ct", **ATT),
}
USE_EHR = [k for k in MODELS if k != "unimodal_ct"]
USE_CT = [k for k in MODELS if k != "unimodal_ehr"]


def _model(name: str, seed: int = 0, train: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().train(train)


def _batch(b: int = 4, nc: int = 5, ne: int = 6, *, pooled_ct=False, pooled_ehr=False, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ct = torch.randn(b, DC, generator=g) if pooled_ct else torch.randn(b, nc, DC, generator=g)
    ehr = torch.randn(b, DE, generator=g) if pooled_ehr else torch.randn(b, ne, DE, generator=g)
    batch = {"ct": ct, "ehr": ehr}
    if not pooled_ehr:
        lengths = torch.tensor([ne - (i % 3) for i in range(b)])  # some rows padded, every row >= 1 visit
        batch["ehr_mask"] = torch.arange(ne)[None, :] >= lengths[:, None]
    return batch


def _outputs(model, batch) -> dict[str, torch.Tensor]:
    """Tensor outputs, LateFusion's per-modality risks flattened to ``risks.<m>``."""
    with torch.no_grad():
        out = model(batch)
    flat = {}
    for k, v in out.items():
        if isinstance(v, dict):
            flat.update({f"{k}.{m}": r for m, r in v.items()})
        else:
            flat[k] = v
    return flat


def _pad_ehr(batch: dict, extra: int, fill: str = "randn") -> dict:
    """Append ``extra`` padded EHR tokens (mask True) holding garbage."""
    b, ne, de = batch["ehr"].shape
    g = torch.Generator().manual_seed(99)
    junk = {"randn": 100 * torch.randn(b, extra, de, generator=g),
            "nan": torch.full((b, extra, de), float("nan")),
            "inf": torch.full((b, extra, de), float("inf"))}[fill]
    mask = batch.get("ehr_mask", torch.zeros(b, ne, dtype=torch.bool))
    return {**batch, "ehr": torch.cat([batch["ehr"], junk], dim=1),
            "ehr_mask": torch.cat([mask, torch.ones(b, extra, dtype=torch.bool)], dim=1)}


# --------------------------------------------------------------------------- shapes, batch of one, pooled inputs


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("train", [False, True])
def test_risk_shape_for_tokens_and_pooled_inputs_and_a_batch_of_one(name, b, train):
    model = _model(name, train=train)
    for pooled_ct in (False, True):
        for pooled_ehr in (False, True):
            batch = _batch(b, pooled_ct=pooled_ct, pooled_ehr=pooled_ehr)
            out = model(batch)
            assert out["risk"].shape == (b,), (pooled_ct, pooled_ehr)
            assert torch.isfinite(out["risk"]).all()
            if name == "contrastive":
                assert out["contrastive"].shape == ()
                assert out["ct_embedding"].shape == out["ehr_embedding"].shape == (b, 8)
            if name.startswith("cross") or name in ("coattention", "image_guided"):
                nc, ne = (1 if pooled_ct else 5), (1 if pooled_ehr else 6)
                shapes = {k: tuple(v.shape) for k, v in out.items() if k.endswith("attention")}
                expect = {"cross_ct_ehr": {"attention": (b, 2, nc, ne)},
                          "cross_ehr_ct": {"attention": (b, 2, ne, nc)},
                          "coattention": {"ct_attention": (b, 2, nc, ne), "ehr_attention": (b, 2, ne, nc)},
                          "image_guided": {"ehr_attention": (b, 2, ne, nc)}}[name]
                assert shapes == expect


def test_masked_mean_ignores_padding_values_and_empty_rows_give_zero():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [float("nan"), 1e9]],
                      [[5.0, 6.0], [float("inf"), 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[False, False, True], [True, True, True]])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor([[2.0, 3.0], [0.0, 0.0]]))
    torch.testing.assert_close(masked_mean(x[:1, :2]), torch.tensor([[2.0, 3.0]]))


# --------------------------------------------------------------------------- padding invariance


@pytest.mark.parametrize("name", USE_EHR)
@pytest.mark.parametrize("fill", ["randn", "nan", "inf"])
def test_appended_padded_ehr_tokens_do_not_change_the_output(name, fill):
    model = _model(name)
    batch = _batch(4)
    base = _outputs(model, batch)
    padded = _outputs(model, _pad_ehr(batch, 3, fill))
    assert set(base) == set(padded)
    for k, v in base.items():
        w = padded[k]
        if k == "attention" and model.direction == "ct->ehr" or k == "ct_attention":
            assert (w[..., -3:] == 0).all()  # padded keys get no attention
            w = w[..., :-3]
        elif k == "attention" or k == "ehr_attention":
            w = w[..., :-3, :]  # padded queries: computed but never pooled
        torch.testing.assert_close(w, v, rtol=0, atol=1e-5, msg=k)
    # the check has teeth: the same values unmasked change the risk
    if fill == "randn":
        unmasked = _pad_ehr(batch, 3, fill)
        unmasked["ehr_mask"] = torch.zeros_like(unmasked["ehr_mask"])
        assert not torch.allclose(_outputs(model, unmasked)["risk"], base["risk"], atol=1e-3)


@pytest.mark.parametrize("name", ["cross_ehr_ct", "coattention", "unimodal_ct"])
def test_padded_ct_tokens_are_ignored_too(name):
    model = _model(name)
    batch = _batch(3)
    b, nc, _ = batch["ct"].shape
    padded = {**batch, "ct": torch.cat([batch["ct"], 50 * torch.randn(b, 2, DC)], dim=1),
              "ct_mask": torch.cat([torch.zeros(b, nc, dtype=torch.bool), torch.ones(b, 2, dtype=torch.bool)], 1)}
    torch.testing.assert_close(_outputs(model, padded)["risk"], _outputs(model, batch)["risk"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["cross_ct_ehr", "cross_ehr_ct", "coattention", "image_guided", "late"])
def test_a_sample_with_only_padding_is_finite_and_its_padding_values_do_not_matter(name):
    model = _model(name)
    batch = _batch(3)
    batch["ehr_mask"] = batch["ehr_mask"].clone()
    batch["ehr_mask"][1] = True  # no visit at all for subject 1
    out = _outputs(model, batch)
    assert torch.isfinite(out["risk"]).all()
    other = {**batch, "ehr": batch["ehr"].clone()}
    other["ehr"][1] = torch.randn(6, DE) * 100
    torch.testing.assert_close(_outputs(model, other)["risk"], out["risk"], rtol=0, atol=1e-6)
    if name == "cross_ct_ehr":
        assert (out["attention"][1] == 0).all() and torch.isfinite(out["attention"]).all()


# --------------------------------------------------------------------------- batch permutation


@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_are_equivariant_to_a_permutation_of_the_batch(name):
    model = _model(name)
    batch = _batch(5)
    perm = torch.tensor([3, 0, 4, 1, 2])
    base = _outputs(model, batch)
    shuffled = _outputs(model, {k: v[perm] for k, v in batch.items()})
    for k, v in base.items():
        if k == "contrastive":  # a batch-level scalar: invariant
            torch.testing.assert_close(shuffled[k], v, rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(shuffled[k], v[perm], rtol=0, atol=1e-6, msg=k)


# --------------------------------------------------------------------------- late fusion


def test_late_fusion_risk_is_exactly_the_weighted_sum_of_the_unimodal_risks():
    model = _model("late")
    assert model.modality_weights() == {"ct": 0.5, "ehr": 0.5}  # equal at start
    batch = _batch(4)
    with torch.no_grad():
        model.weights.copy_(torch.tensor([1.75, -0.3]))
        out = model(batch)
        ct = model.branches["ct"](batch)["risk"]
        ehr = model.branches["ehr"](batch)["risk"]
    assert torch.equal(out["risks"]["ct"], ct) and torch.equal(out["risks"]["ehr"], ehr)
    assert torch.equal(out["risk"], model.weights[0] * ct + model.weights[1] * ehr)
    assert not torch.allclose(out["risk"], 0.5 * (ct + ehr))  # the weights are used
    assert model.modality_weights() == pytest.approx({"ct": 1.75, "ehr": -0.3})


def test_late_fusion_of_trained_unimodal_models_and_of_three_modalities():
    torch.manual_seed(0)
    uni = {"ct": UnimodalSurvival("ct", DC, hidden=8).eval(), "ehr": UnimodalSurvival("ehr", DE, hidden=8).eval()}
    late = LateFusion.from_unimodal(uni).eval()
    batch = _batch(3)
    with torch.no_grad():
        out = late(batch)
        expect = 0.5 * uni["ct"](batch)["risk"] + 0.5 * uni["ehr"](batch)["risk"]
    torch.testing.assert_close(out["risk"], expect, rtol=0, atol=1e-7)
    assert late.branches["ct"] is uni["ct"]

    three = LateFusion({"ct": DC, "ehr": DE, "lab": 3}, hidden=8)
    assert torch.allclose(three.weights, torch.full((3,), 1 / 3))
    assert three({**batch, "lab": torch.randn(3, 3)})["risk"].shape == (3,)
    with pytest.raises(ValueError, match="'lab'"):
        three(batch)
    with pytest.raises(ValueError, match="key 'ehr'"):
        LateFusion.from_unimodal({"ct": uni["ct"], "ehr": uni["ct"]})


# --------------------------------------------------------------------------- contrastive fusion


def _aligned_contrastive_model() -> ContrastiveFusion:
    """Both modalities of width 8 with identical projection heads: equal inputs give equal embeddings."""
    torch.manual_seed(0)
    model = ContrastiveFusion({"ct": 8, "ehr": 8}, proj_dim=6, temperature=0.1, hidden=8).eval()
    model.projections["ehr"].load_state_dict(model.projections["ct"].state_dict())
    return model


def test_contrastive_term_is_lower_for_aligned_than_for_shuffled_pairs():
    model = _aligned_contrastive_model()
    ct = torch.randn(6, 3, 8)
    aligned = _outputs(model, {"ct": ct, "ehr": ct.mean(1) + 0.01 * torch.randn(6, 8)})
    derangement = torch.tensor([1, 2, 3, 4, 5, 0])
    shuffled = _outputs(model, {"ct": ct, "ehr": ct.mean(1)[derangement]})
    assert aligned["contrastive"] < shuffled["contrastive"] - 1.0
    assert aligned["contrastive"] < math.log(6)  # better than chance


def test_contrastive_term_is_the_symmetric_infonce_of_the_embeddings_and_zero_for_one_sample():
    model = _model("contrastive")
    out = _outputs(model, _batch(5))
    za, zb = F.normalize(out["ct_embedding"], dim=1), F.normalize(out["ehr_embedding"], dim=1)
    logits = za @ zb.T / 0.1
    labels = torch.arange(5)
    expect = 0.5 * F.cross_entropy(logits, labels) + 0.5 * F.cross_entropy(logits.T, labels)
    torch.testing.assert_close(out["contrastive"], expect)
    assert out["contrastive"] > 0

    one = model.train()(_batch(1))
    assert one["contrastive"].item() == 0.0
    (one["risk"].sum() + one["contrastive"]).backward()  # the caller's sum still trains the risk


# --------------------------------------------------------------------------- cross-attention


def test_cross_attention_rows_sum_to_one_over_the_unpadded_keys():
    batch = _batch(4)
    for name, keys_padded in (("cross_ct_ehr", True), ("cross_ehr_ct", False)):
        att = _outputs(_model(name), batch)["attention"]
        torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[:-1]))
        if keys_padded:
            assert (att.masked_select(batch["ehr_mask"][:, None, None, :]) == 0).all()
            assert (att.masked_select(~batch["ehr_mask"][:, None, None, :]) > 0).all()


@pytest.mark.parametrize("direction", ["ct->ehr", "ehr->ct"])
@pytest.mark.parametrize("pooled_query", [False, True])
def test_cross_attention_direction_names_the_query_and_the_key_modality_matters(direction, pooled_query):
    torch.manual_seed(0)
    model = CrossAttentionFusion(DIMS, direction=direction, **ATT).eval()
    query, key = direction.split("->")
    assert (model.query, model.key, model.direction) == (query, key, direction)
    batch = _batch(3, pooled_ct=pooled_query and query == "ct", pooled_ehr=pooled_query and query == "ehr")
    out = _outputs(model, batch)
    nq = 1 if pooled_query else batch[query].shape[1]
    assert out["attention"].shape == (3, 2, nq, batch[key].shape[1])
    # new key tokens (same padding) -> new attention and new risk: the key modality is read
    changed = {**batch, key: batch[key] + torch.randn_like(batch[key])}
    new = _outputs(model, changed)
    assert not torch.allclose(new["attention"], out["attention"], atol=1e-4)
    assert not torch.allclose(new["risk"], out["risk"], atol=1e-4)
    # a pooled key set is a single key: every weight is 1
    one_key = _outputs(model, {query: batch[query], key: batch[key][:, 0]} | (
        {"ehr_mask": batch["ehr_mask"]} if query == "ehr" and "ehr_mask" in batch else {}))
    assert one_key["attention"].shape[-1] == 1 and torch.allclose(one_key["attention"], torch.ones(1))


def test_cross_attention_directions_read_different_streams():
    """"ct->ehr" pools the CT stream: padding CT queries matters there; "ehr->ct" pools the EHR stream."""
    torch.manual_seed(0)
    ct_q = CrossAttentionFusion(DIMS, direction="ct->ehr", **ATT).eval()
    batch = _batch(3)
    block_in = {}
    handle = ct_q.block.register_forward_hook(lambda m, args, out: block_in.update(q=args[0], k=args[1]))
    ct_q(batch)
    handle.remove()
    assert block_in["q"].shape[1] == batch["ct"].shape[1] and block_in["k"].shape[1] == batch["ehr"].shape[1]
    # a key modality that is all padding contributes nothing: the risk is that of the CT stream alone
    all_pad = {**batch, "ehr_mask": torch.ones_like(batch["ehr_mask"])}
    with torch.no_grad():
        q = ct_q.proj["ct"](batch["ct"])
        alone = ct_q.head(ct_q.norm(q + ct_q.block.mlp(ct_q.block.norm_mlp(q))).mean(1))
    torch.testing.assert_close(_outputs(ct_q, all_pad)["risk"], alone)


def test_cross_attention_block_matches_a_manual_single_head_computation():
    torch.manual_seed(0)
    blk = CrossAttentionBlock(4, heads=1, mlp_ratio=2, dropout=0.0).eval()
    x, c = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[False] * 5, [False, False, True, True, True]])
    with torch.no_grad():
        y, w = blk(x, c, mask)
        wq, wk, wv = blk.attn.in_proj_weight.chunk(3)
        bq, bk, bv = blk.attn.in_proj_bias.chunk(3)
        q, kc = blk.norm_query(x) @ wq.T + bq, blk.norm_context(c)
        k, v = kc @ wk.T + bk, kc @ wv.T + bv
        scores = (q @ k.transpose(1, 2) / 2.0).masked_fill(mask[:, None, :], float("-inf"))
        attn = scores.softmax(-1)
        h = x + blk.attn.out_proj(attn @ v)
        expect = h + blk.mlp(blk.norm_mlp(h))
    torch.testing.assert_close(w[:, 0], attn)
    torch.testing.assert_close(y, expect)


# --------------------------------------------------------------------------- co-attention


def test_co_attention_is_two_parallel_cross_attentions_then_concatenated_pools():
    model = _model("coattention")
    assert set(model.blocks) == {"ct", "ehr"}
    batch = _batch(3)
    with torch.no_grad():
        zeroed = batch["ehr"].masked_fill(batch["ehr_mask"][..., None], 0.0)  # padding is zeroed on entry
        ct, ehr = model.proj["ct"](batch["ct"]), model.proj["ehr"](zeroed)
        h_ct, a_ct = model.blocks["ct"](ct, ehr, batch["ehr_mask"])
        h_ehr, a_ehr = model.blocks["ehr"](ehr, ct, None)
        pooled = torch.cat([model.norms["ct"](h_ct).mean(1),
                            masked_mean(model.norms["ehr"](h_ehr), batch["ehr_mask"])], dim=1)
        expect = model.head(pooled)
    out = _outputs(model, batch)
    torch.testing.assert_close(out["risk"], expect)
    torch.testing.assert_close(out["ct_attention"], a_ct)
    torch.testing.assert_close(out["ehr_attention"], a_ehr)


def test_image_guided_co_attention_ehr_attends_to_ct_and_ct_is_pooled_unchanged():
    model = _model("image_guided")
    assert set(model.blocks) == {"ehr"} and model.guided_by == "ct"
    batch = _batch(3)
    with torch.no_grad():
        zeroed = batch["ehr"].masked_fill(batch["ehr_mask"][..., None], 0.0)  # padding is zeroed on entry
        ct, ehr = model.proj["ct"](batch["ct"]), model.proj["ehr"](zeroed)
        h_ehr, att = model.blocks["ehr"](ehr, ct, None)
        pooled = torch.cat([model.norms["ct"](ct).mean(1),
                            masked_mean(model.norms["ehr"](h_ehr), batch["ehr_mask"])], dim=1)
        expect = model.head(pooled)
    out = _outputs(model, batch)
    assert set(out) == {"risk", "ehr_attention"}
    torch.testing.assert_close(out["risk"], expect)
    torch.testing.assert_close(out["ehr_attention"], att)
    # both modalities still matter
    for key in ("ct", "ehr"):
        changed = {**batch, key: batch[key] + torch.randn_like(batch[key])}
        assert not torch.allclose(_outputs(model, changed)["risk"], out["risk"], atol=1e-4), key


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_reach_every_parameter(name):
    model = _model(name, train=True)
    out = model(_batch(4, seed=3))
    loss = out["risk"].pow(2).sum() + out.get("contrastive", 0.0)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
        if pname.endswith("attn.in_proj_weight"):  # query, key and value maps each learn
            assert all(part.abs().sum() > 0 for part in p.grad.chunk(3)), pname


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", USE_EHR)
def test_clear_errors_for_missing_keys_and_wrong_shapes(name):
    model = _model(name)
    batch = _batch(2)
    with pytest.raises(ValueError, match="'ehr'"):
        model({"ct": batch["ct"]})
    with pytest.raises(ValueError, match=r"batch\['ehr'\].*\(B, N, 10\).*\(2, 6, 7\)"):
        model({**batch, "ehr": torch.randn(2, 6, 7)})
    with pytest.raises(ValueError, match=r"batch\['ehr'\].*\(2, 1, 6, 10\)"):
        model({**batch, "ehr": torch.randn(2, 1, 6, DE)})
    with pytest.raises(ValueError, match=r"'ehr_mask'.*bool.*\(2, 6\).*\(2, 5\)"):
        model({**batch, "ehr_mask": torch.zeros(2, 5, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"'ehr_mask'.*True = padding.*torch.int64"):
        model({**batch, "ehr_mask": torch.zeros(2, 6, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"'ehr_mask'.*pooled"):
        model({**batch, "ehr": torch.randn(2, DE)})
    if name != "unimodal_ehr":
        with pytest.raises(ValueError, match="different batch sizes"):
            model({**batch, "ct": torch.randn(3, 5, DC)})


def test_clear_errors_for_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"exactly 2 modalities.*'lab'"):
        ContrastiveFusion({"ct": 4, "ehr": 4, "lab": 4})
    with pytest.raises(ValueError, match=r"direction must be 'ct->ehr' or 'ehr->ct'.*'image->ehr'"):
        CrossAttentionFusion(DIMS, direction="image->ehr")
    with pytest.raises(ValueError, match=r"guided_by must be None or one of \['ct', 'ehr'\]"):
        CoAttentionFusion(DIMS, guided_by="image")
    with pytest.raises(ValueError, match=r"dim \(10\) must be divisible by heads \(4\)"):
        CoAttentionFusion(DIMS, dim=10, heads=4)
    with pytest.raises(ValueError, match=r"dims\['ehr'\] must be a positive integer, got 0"):
        LateFusion({"ct": 4, "ehr": 0})
    with pytest.raises(ValueError, match="at least two"):
        LateFusion({"ct": 4})
    with pytest.raises(ValueError, match="temperature must be positive"):
        ContrastiveFusion(DIMS, temperature=0.0)
