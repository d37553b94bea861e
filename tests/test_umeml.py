"""P5 UMEML models (mmlib.models.umeml): shapes, padding, registers, modularity wiring, training, errors."""

import pytest
import torch
import torch.nn.functional as F

from mmlib.models.umeml import (
    UMEML,
    GenomicEncoder,
    GenomicsOnly,
    GroupedMLP,
    MCATFusion,
    PatchCNN,
    PathologyEncoder,
    PathologyOnly,
    SimpleFusion,
    risk_from_hazard_logits,
)
from mmlib.modularity import cosine_assignment, modularity_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IN = 6
GROUPS = [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9], [2, 4]]  # overlapping groups are allowed
N_GENES, G = 10, len(GROUPS)
TASKS = {"grade": 3, "subtype": 6, "survival": 4}
SMALL = dict(dim=16, n_heads=2)

MODELS = {
    "umeml": lambda **kw: UMEML(IN, GROUPS, TASKS, n_prototypes=3, **SMALL, **kw),
    "umeml_r0": lambda **kw: UMEML(IN, GROUPS, TASKS, n_prototypes=3, n_registers=0, **SMALL, **kw),
    "pathology": lambda **kw: PathologyOnly(IN, TASKS, n_prototypes=3, **SMALL, **kw),
    "genomics": lambda **kw: GenomicsOnly(GROUPS, TASKS, **SMALL, **kw),
    "add": lambda **kw: SimpleFusion(IN, GROUPS, TASKS, "add", n_prototypes=3, **SMALL, **kw),
    "concat": lambda **kw: SimpleFusion(IN, GROUPS, TASKS, "concat", n_prototypes=3, **SMALL, **kw),
    "bilinear": lambda **kw: SimpleFusion(IN, GROUPS, TASKS, "bilinear", n_prototypes=3, **SMALL, **kw),
    "mcat": lambda **kw: MCATFusion(IN, GROUPS, TASKS, **SMALL, **kw),
}
WITH_PATCHES = [k for k in MODELS if k != "genomics"]


def _model(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS[name](**kw).eval()


def _batch(lengths=(5, 3), seed: int = 1, fill: float = 0.0) -> dict:
    """Bags of the given lengths padded to the longest (padding = ``fill``), and RNA."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    patches = torch.full((len(lengths), n, IN), fill)
    mask = torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]
    for i, length in enumerate(lengths):
        patches[i, :length] = torch.randn(length, IN, generator=g)
    return {"patches": patches, "patches_mask": mask, "rna": torch.randn(len(lengths), N_GENES, generator=g)}


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(list(model(batch)["logits"].values()), dim=1)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("k", [1, 5, 16])
@pytest.mark.parametrize("r", [0, 3])
def test_umeml_shapes_and_segments(k, r):
    torch.manual_seed(0)
    model = UMEML(IN, GROUPS, TASKS, n_prototypes=k, n_registers=r, **SMALL).eval()
    out = model(_batch((5, 3)))
    assert {t: v.shape for t, v in out["logits"].items()} == {t: (2, n) for t, n in TASKS.items()}
    length = 1 + k + r + 1 + G
    assert out["decoder_attention"].shape == (2, length, length)
    torch.testing.assert_close(out["decoder_attention"].sum(-1), torch.ones(2, length))
    assert out["segments"] == {"pathology": slice(0, 1 + k), "registers": slice(1 + k, 1 + k + r),
                               "genomics": slice(1 + k + r, length)}
    assert out["assign_path"].shape == (2, 5, k) and out["assign_gen"].shape == (2, 5, G)
    assert out["patch_tokens"].shape == (2, 5, 16) and out["attention"].shape == (2, k, 5)
    assert out["fused"].shape == (2, 32)
    assert "modularity_loss" not in out  # eval mode, not asked for


@pytest.mark.parametrize("n", [1, 10_000])
@pytest.mark.parametrize("name", WITH_PATCHES)
def test_bag_lengths_one_and_ten_thousand(name, n):
    torch.manual_seed(0)
    small = dict(dim=8, n_heads=2)
    model = {
        "umeml": lambda: UMEML(IN, GROUPS, TASKS, n_prototypes=2, **small),
        "umeml_r0": lambda: UMEML(IN, GROUPS, TASKS, n_prototypes=2, n_registers=0, **small),
        "pathology": lambda: PathologyOnly(IN, TASKS, n_prototypes=2, **small),
        "add": lambda: SimpleFusion(IN, GROUPS, TASKS, "add", n_prototypes=2, **small),
        "concat": lambda: SimpleFusion(IN, GROUPS, TASKS, "concat", n_prototypes=2, **small),
        "bilinear": lambda: SimpleFusion(IN, GROUPS, TASKS, "bilinear", n_prototypes=2, **small),
        "mcat": lambda: MCATFusion(IN, GROUPS, TASKS, **small),
    }[name]().eval()
    batch = {"patches": torch.randn(1, n, IN), "rna": torch.randn(1, N_GENES)}  # no mask given
    with torch.no_grad():
        out = model(batch)
    for t, m in TASKS.items():
        assert out["logits"][t].shape == (1, m) and torch.isfinite(out["logits"][t]).all()
    assert out["patch_tokens"].shape == (1, n, 8)
    assert out["patches_mask"].shape == (1, n) and not out["patches_mask"].any()
    if "attention" in out:
        assert out["attention"].shape == (1, 2, n)


def test_single_patch_bag_modularity_is_zero_not_nan():
    model = _model("umeml")
    out = model({"patches": torch.randn(2, 1, IN), "rna": torch.randn(2, N_GENES)}, compute_modularity=True)
    assert out["modularity_loss"].item() == 0.0


def test_genomics_only_and_encoder_shapes():
    out = _model("genomics")({"rna": torch.randn(3, N_GENES)})
    assert {t: v.shape for t, v in out["logits"].items()} == {t: (3, n) for t, n in TASKS.items()}
    enc = GenomicEncoder(GROUPS, 16, n_heads=2, layers=0).eval()
    res = enc(torch.randn(3, N_GENES))
    assert res["tokens"].shape == (3, 1 + G, 16) and torch.equal(res["groups"], res["tokens"][:, 1:])


def test_patch_cnn_shapes():
    torch.manual_seed(0)
    cnn = PatchCNN(12)
    assert cnn(torch.randn(5, 3, 16, 16)).shape == (5, 12)
    assert cnn(torch.randn(2, 3, 3, 20, 33)).shape == (2, 3, 12)  # (B, N, C, H, W) bags
    one = cnn(torch.randn(1, 3, 16, 16))
    assert one.shape == (1, 12) and torch.isfinite(one).all()
    with pytest.raises(ValueError, match=r"\(M, 3, H, W\).*\(4, 3, 15, 16\)"):
        cnn(torch.randn(4, 3, 15, 16))
    with pytest.raises(ValueError, match=r"\(4, 1, 16, 16\)"):
        cnn(torch.randn(4, 1, 16, 16))


# --------------------------------------------------------------------------- attention and masking


def test_prototype_and_coattention_rows_sum_to_one_and_skip_padding():
    batch = _batch((6, 2), fill=1e6)
    real = ~batch["patches_mask"]
    att = _model("umeml")(batch)["attention"]  # (B, K, N)
    co = _model("mcat")(batch)["coattention"]  # (B, G, N)
    assert co.shape == (2, G, 6)
    for w in (att, co):
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:2]))
        assert (w[1, :, 2:] == 0).all()
        assert (w[real[:, None, :].expand_as(w)] > 0).all()


@pytest.mark.parametrize("name", WITH_PATCHES)
@pytest.mark.parametrize("fill", [1e6, float("inf"), float("nan")])
def test_padding_does_not_change_outputs(name, fill):
    model = _model(name)
    alone = _batch((4,), seed=7)
    del alone["patches_mask"]
    padded = {"patches": torch.cat([alone["patches"], torch.full((1, 9, IN), fill)], dim=1),
              "patches_mask": torch.tensor([[False] * 4 + [True] * 9]), "rna": alone["rna"]}
    ref, got = _logits(model, alone), _logits(model, padded)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    if name.startswith("umeml"):
        with torch.no_grad():
            a, b = model(alone, compute_modularity=True), model(padded, compute_modularity=True)
        torch.testing.assert_close(b["modularity_loss"], a["modularity_loss"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(b["assign_path"][:, :4], a["assign_path"], atol=1e-6, rtol=1e-5)
        assert (b["assign_path"][:, 4:] == 0).all() and (b["assign_gen"][:, 4:] == 0).all()
    # without the mask the padding values would matter (so the masking above is what protects the output)
    if fill == 1e6:
        assert not torch.allclose(_logits(model, {k: v for k, v in padded.items() if k != "patches_mask"}), ref,
                                  atol=1e-3)


@pytest.mark.parametrize("name", ["umeml", "pathology", "mcat"])
def test_padding_does_not_change_gradients(name):
    """Training on a padded batch (padding = nan / inf) gives the same, finite, parameter gradients."""
    alone = _batch((4,), seed=9)
    del alone["patches_mask"]
    grads = []
    for fill in (None, float("nan"), float("inf")):
        model = _model(name, dropout=0.0).train()
        batch = alone if fill is None else {
            "patches": torch.cat([alone["patches"], torch.full((1, 3, IN), fill)], dim=1),
            "patches_mask": torch.tensor([[False] * 4 + [True] * 3]), "rna": alone["rna"]}
        out = model(batch)
        loss = sum(v.square().sum() for v in out["logits"].values()) + out.get("modularity_loss", 0.0)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], atol=1e-5, rtol=1e-4)


def test_attention_outputs_are_the_last_blocks_head_means():
    model = _model("umeml")
    seen = {}
    model.pathology.cross[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("cross", o[1]))
    model.decoder[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("decoder", o[1]))
    with torch.no_grad():
        out = model(_batch((5, 3)))
    assert seen["cross"].shape == (2, 2, 3, 5)  # (B, heads, K, N)
    assert not torch.allclose(seen["cross"][:, 0], seen["cross"][:, 1])  # the heads differ, so the mean matters
    torch.testing.assert_close(out["attention"], seen["cross"].mean(dim=1))
    torch.testing.assert_close(out["decoder_attention"], seen["decoder"].mean(dim=1))


@pytest.mark.parametrize("name", list(MODELS))
def test_batch_of_two_bags_equals_each_alone(name):
    model = _model(name)
    batch = _batch((7, 3), seed=2, fill=-5e5)
    both = _logits(model, batch)
    for i, length in enumerate((7, 3)):
        alone = {"patches": batch["patches"][i:i + 1, :length], "rna": batch["rna"][i:i + 1]}
        torch.testing.assert_close(both[i:i + 1], _logits(model, alone), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both[0], both[1])


# --------------------------------------------------------------------------- registers and the decoder


def _manual_umeml(model: UMEML, batch: dict, registers: torch.Tensor | None) -> torch.Tensor:
    """UMEML's logits recomputed from its parts: decoder over [path, (registers,) gen] tokens."""
    path = model.pathology(batch["patches"], batch.get("patches_mask"))["tokens"] + model.path_embed
    gen = model.genomics(batch["rna"])["tokens"] + model.gen_embed
    parts = [path] + ([registers.expand(path.shape[0], -1, -1)] if registers is not None else []) + [gen]
    h = torch.cat(parts, dim=1)
    for block in model.decoder:
        h, _ = block(h)
    h = model.decoder_norm(h)
    fused = torch.cat([h[:, 0], h[:, h.shape[1] - gen.shape[1]]], dim=1)
    return torch.cat([model.heads[t](fused) for t in TASKS], dim=1)


def test_registers_are_the_only_difference():
    dim, r = 16, 3
    with_r = _model("umeml")  # default n_registers=3
    assert with_r.registers.shape == (r, dim)
    without = _model("umeml_r0", seed=1)
    assert without.registers is None
    assert not any("register" in name for name, _ in without.named_parameters())
    n_with = sum(p.numel() for p in with_r.parameters())
    n_without = sum(p.numel() for p in without.parameters())
    assert n_with - n_without == r * dim
    state = {k: v for k, v in with_r.state_dict().items() if k != "registers"}
    without.load_state_dict(state, strict=True)  # every other weight has the same name and shape

    batch = _batch((5, 4), seed=3)
    with torch.no_grad():
        out0 = without(batch)
        assert out0["decoder_attention"].shape[-1] == 1 + 3 + 1 + G
        manual0 = _manual_umeml(with_r, batch, registers=None)  # the R=3 model's weights, registers removed
        manual3 = _manual_umeml(with_r, batch, registers=with_r.registers)
    logits0 = torch.cat([out0["logits"][t] for t in TASKS], dim=1)
    torch.testing.assert_close(logits0, manual0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(without, batch), logits0)  # deterministic in eval
    logits3 = _logits(with_r, batch)
    torch.testing.assert_close(logits3, manual3, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits3, logits0, atol=1e-4)  # the registers do take part in attention


def test_decoder_reads_both_modalities():
    model = _model("umeml")
    batch = _batch((5, 4), seed=4)
    ref = _logits(model, batch)
    other_rna = dict(batch, rna=torch.randn(2, N_GENES))
    other_patches = dict(batch, patches=torch.randn(2, 5, IN))
    assert not torch.allclose(_logits(model, other_rna), ref, atol=1e-4)
    assert not torch.allclose(_logits(model, other_patches), ref, atol=1e-4)


# --------------------------------------------------------------------------- modularity wiring and gradients


def test_modularity_loss_flag_and_value():
    torch.manual_seed(0)
    model = UMEML(IN, GROUPS, TASKS, n_prototypes=3, modularity_weights=(0.7, 0.2), dropout=0.0, **SMALL)
    batch = _batch((6, 4), seed=5)
    assert "modularity_loss" in model.train()(batch)
    assert "modularity_loss" not in model.train()(batch, compute_modularity=False)
    assert "modularity_loss" not in model.eval()(batch)
    with torch.no_grad():
        out = model(batch, compute_modularity=True)
        gen_groups = model.genomics(batch["rna"])["groups"]
    mask = batch["patches_mask"]
    assert torch.equal(out["patches_mask"], mask)
    torch.testing.assert_close(out["assign_gen"], cosine_assignment(out["patch_tokens"], gen_groups, mask))
    expected = modularity_loss(out["patch_tokens"], [(out["assign_path"], 0.7), (out["assign_gen"], 0.2)], mask,
                               normalise=True)
    torch.testing.assert_close(out["modularity_loss"], expected)
    assert out["modularity_loss"].ndim == 0 and out["modularity_loss"].item() != 0.0
    # S_p is against the learned prototype queries by default, against the bag's output prototypes on request
    torch.testing.assert_close(out["assign_path"],
                               cosine_assignment(out["patch_tokens"], model.pathology.prototypes, mask))
    literal = UMEML(IN, GROUPS, TASKS, n_prototypes=3, modularity_weights=(0.7, 0.2), dropout=0.0,
                    assign_to="outputs", normalise_assignment=False, **SMALL)
    literal.load_state_dict(model.state_dict())
    with torch.no_grad():
        lit = literal.eval()(batch, compute_modularity=True)
        protos = literal.pathology(batch["patches"], mask)["prototypes"]
    torch.testing.assert_close(lit["assign_path"], cosine_assignment(lit["patch_tokens"], protos, mask))
    assert not torch.allclose(lit["assign_path"], out["assign_path"])
    torch.testing.assert_close(lit["modularity_loss"], modularity_loss(
        lit["patch_tokens"], [(lit["assign_path"], 0.7), (lit["assign_gen"], 0.2)], mask))
    with pytest.raises(ValueError, match="assign_to"):
        UMEML(IN, GROUPS, TASKS, assign_to="patches")


def test_modularity_on_a_patch_subsample_is_seeded_and_exact_when_the_bag_fits():
    torch.manual_seed(0)
    model = UMEML(IN, GROUPS, TASKS, n_prototypes=3, dropout=0.0, modularity_patches=3, **SMALL).eval()
    full = UMEML(IN, GROUPS, TASKS, n_prototypes=3, dropout=0.0, modularity_patches=50, **SMALL).eval()
    full.load_state_dict(model.state_dict())
    batch = _batch((6, 4), seed=5)
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(batch, compute_modularity=True)["modularity_loss"]
        torch.manual_seed(1)
        b = model(batch, compute_modularity=True)["modularity_loss"]
        torch.manual_seed(2)
        c = model(batch, compute_modularity=True)["modularity_loss"]
        f = full(batch, compute_modularity=True)
    assert a == b and a != c  # seeded by torch's global RNG; another draw, another subset of the 6-patch bag
    mask = batch["patches_mask"]
    expected = modularity_loss(f["patch_tokens"], [(f["assign_path"], 1.0), (f["assign_gen"], 1.0)], mask,
                               normalise=True)
    torch.testing.assert_close(f["modularity_loss"], expected)  # bags of at most 50 patches: the whole graph


def test_gradients_reach_every_part():
    torch.manual_seed(0)
    model = UMEML(IN, GROUPS, TASKS, n_prototypes=3, dropout=0.0, **SMALL).train()
    out = model(_batch((6, 4), seed=6))
    loss = sum((v**2).sum() for v in out["logits"].values()) + out["modularity_loss"]
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # the modularity loss alone trains the prototypes (S_p) and the genomic encoder (S_g), not the registers
    model.zero_grad(set_to_none=True)
    model(_batch((6, 4), seed=6))["modularity_loss"].backward()
    assert model.pathology.prototypes.grad.abs().sum() > 0
    assert model.genomics.group_mlp.weight1.grad.abs().sum() > 0
    assert model.registers.grad is None and model.heads["grade"].weight.grad is None


def test_group_tokens_use_only_their_own_genes():
    torch.manual_seed(0)
    mlp = GroupedMLP(GROUPS, 8, dropout=0.0)
    rna = torch.randn(3, N_GENES)
    base = mlp(rna)
    assert base.shape == (3, G, 8)
    for gene in range(N_GENES):
        bumped = rna.clone()
        bumped[:, gene] += 1.0
        changed = (mlp(bumped) - base).abs().amax(dim=(0, 2)) > 1e-6
        assert changed.tolist() == [gene in idx for idx in GROUPS], gene
    # each group is an MLP of its own with nn.Linear's fan-in scale: Linear(len(g), dim) -> ELU -> Linear -> ELU
    assert sum(p.numel() for p in mlp.parameters()) == sum((len(idx) + 1) * 8 + 8 * 8 + 8 for idx in GROUPS)
    for g, idx in enumerate(GROUPS):
        w1 = mlp.weight1[mlp.offsets[g]:mlp.offsets[g + 1]]
        assert w1.abs().max() <= len(idx) ** -0.5
        ref = F.elu(F.elu(rna[:, idx] @ w1 + mlp.bias1[g]) @ mlp.weight2[g] + mlp.bias2[g])
        torch.testing.assert_close(base[:, g], ref)


def test_simple_fusion_modes():
    batch = _batch((5, 2), seed=8)
    for mode, width in (("add", 16), ("concat", 32), ("bilinear", 16)):
        model = _model(mode)
        with torch.no_grad():
            out = model(batch)
            p = model.pathology(batch["patches"], batch["patches_mask"])["tokens"][:, 0]
            g = model.genomics(batch["rna"])["tokens"][:, 0]
        assert out["fused"].shape == (2, width)
        if mode == "add":
            torch.testing.assert_close(out["fused"], p + g)
        if mode == "concat":
            torch.testing.assert_close(out["fused"], torch.cat([p, g], dim=1))
        if mode == "bilinear":
            assert model.bilinear[0].in_features == 17 * 17
            # the appended 1s keep the unimodal terms: with the genomic side reduced to zeros, the
            # Kronecker product still holds the pathology vector, so the output still varies with it
            with torch.no_grad():
                model.reduce_gen[0].weight.zero_()
                model.reduce_gen[0].bias.zero_()
                z = model.fuse(p, g)
            assert not torch.allclose(z[0], z[1])  # two bags, two pathology vectors, two outputs


# --------------------------------------------------------------------------- training on a planted problem


def _planted_bags(seed: int, n_bags: int = 48, n: int = 10) -> tuple[dict, torch.Tensor]:
    """Bag label = whether it holds 3 patches from a distinct cluster; the RNA is noise."""
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(n_bags, n, IN, generator=g)
    label = torch.arange(n_bags) % 2
    patches[label == 1, :3, 0] += 8.0  # the planted cluster
    lengths = torch.randint(6, n + 1, (n_bags,), generator=g)
    mask = torch.arange(n)[None, :] >= lengths[:, None]
    return {"patches": patches, "patches_mask": mask, "rna": torch.randn(n_bags, N_GENES, generator=g)}, label


def test_training_learns_planted_bags():
    train, y_train = _planted_bags(0)
    test, y_test = _planted_bags(1)
    torch.manual_seed(0)
    model = UMEML(IN, GROUPS, {"y": 2}, n_prototypes=3, dropout=0.0, **SMALL).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(train)
        task = F.cross_entropy(out["logits"]["y"], y_train)
        opt.zero_grad()
        (task + 0.1 * out["modularity_loss"]).backward()
        opt.step()
        losses.append(task.item())
    assert losses[-1] < 0.3 * losses[0]
    # held-out bags: the model found the patch cluster (memorising the noise RNA would give chance, 0.5)
    model.eval()
    assert (_logits(model, test).argmax(1) == y_test).float().mean() >= 0.85


# --------------------------------------------------------------------------- survival risk


def test_risk_from_hazard_logits():
    # hazards 1/2, 1/2: S = (1/2, 1/4), risk = -3/4; certain early event: risk 0; no event: risk -K
    logits = torch.tensor([[0.0, 0.0], [50.0, 0.0], [-50.0, -50.0]])
    torch.testing.assert_close(risk_from_hazard_logits(logits), torch.tensor([-0.75, 0.0, -2.0]))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=g)
    h = torch.sigmoid(z)
    surv = torch.stack([torch.prod(1 - h[:, : k + 1], dim=1) for k in range(4)], dim=1)
    torch.testing.assert_close(risk_from_hazard_logits(z), -surv.sum(1))
    higher = z.clone()
    higher[:, 2] += 1.0  # a larger hazard in any bin means a higher risk
    assert (risk_from_hazard_logits(higher) > risk_from_hazard_logits(z)).all()
    with pytest.raises(ValueError, match=r"\(B, K\).*\(4,\)"):
        risk_from_hazard_logits(torch.zeros(4))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["umeml", "pathology", "add", "mcat"])
def test_bad_patch_inputs(name):
    model = _model(name)
    ok = _batch((4, 2))
    with pytest.raises(ValueError, match=r"batch\['patches_mask'\] .*\(2, 4\).*\(2, 3\)"):
        model(dict(ok, patches_mask=torch.zeros(2, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"batch\['patches_mask'\].*torch.int64"):
        model(dict(ok, patches_mask=torch.zeros(2, 4, dtype=torch.long)))
    all_pad = ok["patches_mask"].clone()
    all_pad[1] = True
    with pytest.raises(ValueError, match=r"batch\['patches_mask'\] \(2, 4\).*bag\(s\) \[1\]"):
        model(dict(ok, patches_mask=all_pad))
    with pytest.raises(ValueError, match=r"batch\['patches'\] of shape \(B, N, 6\).*\(2, 4, 5\)"):
        model(dict(ok, patches=torch.randn(2, 4, 5)))
    with pytest.raises(ValueError, match="'patches'"):
        model({"rna": ok["rna"]})


@pytest.mark.parametrize("name", ["umeml", "genomics", "bilinear", "mcat"])
def test_bad_rna_inputs(name):
    model = _model(name)
    ok = _batch((4, 2))
    with pytest.raises(ValueError, match=r"needs batch key 'rna' of shape \(B, 10\)"):
        model({k: v for k, v in ok.items() if k != "rna"})
    with pytest.raises(ValueError, match=r"batch\['rna'\] of shape \(B, 10\).*\(2, 9\)"):
        model(dict(ok, rna=torch.randn(2, 9)))
    if name != "genomics":
        with pytest.raises(ValueError, match=r"batch\['rna'\] \(3, 10\).*different batch sizes"):
            model(dict(ok, rna=torch.randn(3, N_GENES)))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"dim \(10\) must be divisible by n_heads \(4\)"):
        UMEML(IN, GROUPS, TASKS, dim=10)
    with pytest.raises(ValueError, match=r"group_index\[1\]"):
        UMEML(IN, [[0], []], TASKS)
    with pytest.raises(ValueError, match=r"tasks\['grade'\]"):
        UMEML(IN, GROUPS, {"grade": 0})
    with pytest.raises(ValueError, match="n_registers"):
        UMEML(IN, GROUPS, TASKS, n_registers=-1)
    with pytest.raises(ValueError, match="n_prototypes"):
        PathologyEncoder(IN, 16, n_prototypes=0)
    with pytest.raises(ValueError, match="mode"):
        SimpleFusion(IN, GROUPS, TASKS, "sum")
    with pytest.raises(ValueError, match="n_genes is 5"):
        GenomicEncoder(GROUPS, 16, n_genes=5)
    # an explicit n_genes larger than the indices is the width rna must have
    enc = GenomicEncoder(GROUPS, 16, n_heads=2, n_genes=12)
    assert enc(torch.randn(1, 12))["tokens"].shape == (1, 1 + G, 16)
