"""Grad-CAM (P1): against captum and MONAI, planted-signal localisation, hook hygiene, eval mode."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmlib.explain import GradCamMap, grad_cam, grad_cam_layers, input_gradient, localisation_scores

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (1, 1, 12, 10, 14)


class TinyCNN3d(nn.Module):
    """Dict in, dict out: a stem, a conv stage (the explained layer), pooling, a head."""

    def __init__(self, n_out: int = 3, inplace_after_stage: bool = False, dropout: float = 0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv3d(4, 6, 3, padding=1, stride=2), nn.BatchNorm3d(6))
        self.act = nn.ReLU(inplace=inplace_after_stage)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(6, n_out)

    def forward(self, batch):
        a = self.act(self.stage(self.stem(batch["image"])))
        return {"logits": self.head(self.drop(a.mean(dim=(2, 3, 4))))}


def _model(seed: int = 2, **kw) -> TinyCNN3d:
    torch.manual_seed(seed)
    m = TinyCNN3d(**kw)
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval and train modes differ
        for bn in (m.stem[1], m.stage[1]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _image(seed: int = 1, shape=SHAPE) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _captum_cam(model, layer, x, target, relu=True):
    from captum.attr import LayerGradCam

    lgc = LayerGradCam(lambda t: model({"image": t})["logits"], layer)
    attr = lgc.attribute(x.clone(), target=target, relu_attributions=relu)
    return attr, F.interpolate(attr, size=x.shape[2:], mode="trilinear", align_corners=False)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("target", [0, 2])
def test_grad_cam_equals_captum_layer_grad_cam(target, inplace):
    model, x = _model(inplace_after_stage=inplace), _image()
    res = grad_cam(lambda b: model(b)["logits"], model.stage, {"image": x}, target=target, model=model)
    assert isinstance(res, GradCamMap)
    assert res.cam.shape == SHAPE[2:] and res.layer_cam.shape == (6, 5, 7)
    assert res.cam.dtype == np.float32 and (res.cam >= 0).all() and res.cam.max() > 0
    layer_attr, up = _captum_cam(model, model.stage, x, target)
    np.testing.assert_allclose(res.layer_cam, layer_attr[0, 0].detach().numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(res.cam, up[0, 0].detach().numpy(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert res.score == pytest.approx(float(model({"image": x})["logits"][0, target]), abs=1e-6)
    assert res.target == target


@pytest.mark.parametrize("target", [0, 2])
def test_signed_grad_cam_equals_captum_without_relu(target):
    """relu=False keeps the map's negative part (captum's relu_attributions=False); its positive
    part on the layer grid is the usual Grad-CAM."""
    model, x = _model(), _image()
    signed = grad_cam(lambda b: model(b)["logits"], model.stage, {"image": x}, target=target, model=model, relu=False)
    usual = grad_cam(lambda b: model(b)["logits"], model.stage, {"image": x}, target=target, model=model)
    assert (signed.layer_cam < 0).any() and (signed.layer_cam > 0).any()  # both signs on this model
    layer_attr, up = _captum_cam(model, model.stage, x, target, relu=False)
    np.testing.assert_allclose(signed.layer_cam, layer_attr[0, 0].detach().numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(signed.cam, up[0, 0].detach().numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(usual.layer_cam, np.maximum(signed.layer_cam, 0), atol=1e-7)
    np.testing.assert_array_equal(signed.weights, usual.weights)


def test_grad_cam_differs_between_targets():
    model, x = _model(), _image()
    maps = [grad_cam(lambda b: model(b)["logits"], model.stage, {"image": x}, target=t).cam for t in range(3)]
    assert not np.allclose(maps[0], maps[1]) and not np.allclose(maps[1], maps[2])


@pytest.mark.parametrize("target", [0, 2])
def test_hirescam_equals_captum_gradient_x_activation_summed_over_channels(target):
    from captum.attr import LayerGradientXActivation

    model, x = _model(), _image()
    res = grad_cam(lambda b: model(b)["logits"], model.stage, {"image": x}, target=target, model=model,
                   weighting="elementwise")
    attr = LayerGradientXActivation(lambda t: model({"image": t})["logits"], model.stage).attribute(x.clone(), target=target)
    ref = torch.relu(attr.sum(dim=1, keepdim=True))
    np.testing.assert_allclose(res.layer_cam, ref[0, 0].detach().numpy(), atol=1e-6, rtol=1e-5)
    up = F.interpolate(ref, size=x.shape[2:], mode="trilinear", align_corners=False)
    np.testing.assert_allclose(res.cam, up[0, 0].detach().numpy(), atol=1e-6, rtol=1e-5)
    usual = grad_cam(lambda b: model(b)["logits"], model.stage, {"image": x}, target=target, model=model)
    assert not np.allclose(res.layer_cam, usual.layer_cam)  # the ReLU after the stage makes the gradient vary
    np.testing.assert_array_equal(res.weights, usual.weights)


def test_hirescam_equals_grad_cam_when_the_gradient_is_constant_over_space():
    """Explained at the activation that global average pooling and the linear head read, every voxel
    of a channel has the same gradient, so HiResCAM and Grad-CAM are the same map (Draelos & Carin)."""
    model, x = _model(), _image()
    kw = {"target": 1, "model": model, "relu": False}
    hires = grad_cam(lambda b: model(b)["logits"], model.act, {"image": x}, weighting="elementwise", **kw)
    usual = grad_cam(lambda b: model(b)["logits"], model.act, {"image": x}, **kw)
    assert np.abs(usual.layer_cam).max() > 0
    np.testing.assert_allclose(hires.layer_cam, usual.layer_cam, atol=1e-6, rtol=1e-5)


class _SpatialReadout(nn.Module):
    """y = sum over voxels of readout * A, with A = x^2 + 1 > 0 and a readout of +1 inside a box and
    -0.25 elsewhere: the box raises y, yet the gradient averaged over the grid is negative."""

    def __init__(self, spatial, box):
        super().__init__()
        self.layer = nn.Identity()
        readout = torch.full((1, 1, *spatial), -0.25)
        readout[(0, 0, *box)] = 1.0
        self.register_buffer("readout", readout)

    def forward(self, batch):
        a = self.layer(batch["image"] ** 2 + 1.0)
        return (a * self.readout).sum(dim=(1, 2, 3, 4))


def test_hirescam_finds_the_region_grad_cam_averages_away():
    spatial, box = (8, 8, 8), (slice(1, 3), slice(2, 4), slice(5, 7))
    model = _SpatialReadout(spatial, box)
    x = _image(4, (1, 1, *spatial))
    inside = np.zeros(spatial, dtype=bool)
    inside[box] = True
    usual = grad_cam(model, model.layer, {"image": x})
    hires = grad_cam(model, model.layer, {"image": x}, weighting="elementwise")
    assert usual.weights[0] < 0 and not usual.layer_cam.any()  # the negative mean weight, then the ReLU: nothing
    a = (x[0, 0] ** 2 + 1.0).numpy()
    np.testing.assert_allclose(hires.layer_cam, np.where(inside, a, 0.0), rtol=1e-6)  # exactly the box's activations
    with pytest.raises(ValueError, match="weighting"):
        grad_cam(model, model.layer, {"image": x}, weighting="max")


class _TwoStages(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.stage1 = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv3d(4, 6, 3, padding=1, stride=2), nn.ReLU())
        self.head = nn.Linear(6, 3)
        self.calls = 0

    def forward(self, batch):
        self.calls += 1
        return {"logits": self.head(self.stage2(self.stage1(batch["image"])).amax(dim=(2, 3, 4)))}


@pytest.mark.parametrize("relu", [True, False])
def test_grad_cam_layers_equals_grad_cam_per_layer_and_weighting_in_one_pass(relu):
    model, x = _TwoStages().eval(), _image()
    layers = {"one": model.stage1, "two": model.stage2}
    maps = grad_cam_layers(lambda b: model(b)["logits"], layers, {"image": x}, target=2, model=model, relu=relu,
                           weightings=("mean", "elementwise"))
    assert model.calls == 1 and set(maps) == {(n, w) for n in layers for w in ("mean", "elementwise")}
    for (name, weighting), res in maps.items():
        ref = grad_cam(lambda b: model(b)["logits"], layers[name], {"image": x}, target=2, model=model, relu=relu,
                       weighting=weighting)
        np.testing.assert_allclose(res.layer_cam, ref.layer_cam, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(res.cam, ref.cam, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(res.weights, ref.weights)
    assert maps[("one", "mean")].layer_cam.shape == SHAPE[2:] and maps[("two", "mean")].layer_cam.shape == (6, 5, 7)
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="weighting"):
        grad_cam_layers(lambda b: model(b)["logits"], layers, {"image": x}, target=2, weightings=())
    with pytest.raises(RuntimeError, match="'unused' was not called"):
        grad_cam_layers(lambda b: model(b)["logits"], {"unused": nn.Conv3d(1, 1, 1)}, {"image": x}, target=2)


class _MonaiWrap(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m({"image": x})["logits"]


def test_grad_cam_agrees_with_monai_up_to_normalisation():
    from monai.visualize import GradCAM

    model, x = _model(), _image()
    ours = grad_cam(lambda b: model(b)["logits"], model.stage, {"image": x}, target=1, model=model).cam
    # MONAI leaves its hooks on the module: give it a copy of the model.
    wrap = _MonaiWrap(copy.deepcopy(model))
    raw = GradCAM(wrap, target_layers="m.stage", postprocessing=lambda t: t)(x.clone(), class_idx=1)
    np.testing.assert_allclose(ours, raw[0, 0].detach().numpy(), atol=1e-5, rtol=1e-5)
    # MONAI's default post-processing maps (min, max) to (1, 0): undo the flip, then compare in [0, 1].
    default = GradCAM(_MonaiWrap(copy.deepcopy(model)), target_layers="m.stage")(x.clone(), class_idx=1)
    monai01 = 1.0 - np.asarray(default[0, 0].detach().cpu())
    ours01 = (ours - ours.min()) / (ours.max() - ours.min())
    np.testing.assert_allclose(ours01, monai01, atol=1e-5)


class PlantedModel(nn.Module):
    """Logit 0 sees the input only inside box A, logit 1 only inside box B (grouped conv keeps them apart)."""

    def __init__(self, box_a, box_b, spatial):
        super().__init__()
        self.register_buffer("mask_a", torch.zeros(1, 1, *spatial))
        self.register_buffer("mask_b", torch.zeros(1, 1, *spatial))
        self.mask_a[(0, 0, *box_a)] = 1
        self.mask_b[(0, 0, *box_b)] = 1
        torch.manual_seed(3)
        self.stage = nn.Sequential(nn.Conv3d(2, 8, 3, padding=1, stride=2, groups=2, bias=False), nn.ReLU())
        self.head = nn.Linear(8, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0] * 4 + [0.0] * 4, [0.0] * 4 + [1.0] * 4]))

    def forward(self, batch):
        x = batch["image"]
        a = self.stage(torch.cat([x * self.mask_a, x * self.mask_b], dim=1))
        return self.head(a.mean(dim=(2, 3, 4)))


def test_grad_cam_localises_planted_signal_per_target():
    spatial = (16, 16, 16)
    box_a = (slice(2, 8), slice(2, 8), slice(8, 14))
    box_b = (slice(8, 14), slice(8, 14), slice(2, 8))
    model = PlantedModel(box_a, box_b, spatial).eval()
    x = torch.rand(1, 1, *spatial, generator=torch.Generator().manual_seed(0)) + 0.5
    truth_a, truth_b = np.zeros(spatial, bool), np.zeros(spatial, bool)
    truth_a[box_a], truth_b[box_b] = True, True
    # the output really depends only on the boxes
    noise = torch.randn(1, 1, *spatial) * (1 - model.mask_a - model.mask_b)
    with torch.no_grad():
        torch.testing.assert_close(model({"image": x + noise}), model({"image": x}))
    for target, truth, other in [(0, truth_a, truth_b), (1, truth_b, truth_a)]:
        cam = grad_cam(model, model.stage, {"image": x}, target=target).cam
        s = localisation_scores(cam, truth, n_random=200)
        assert s["region_fraction"] < 0.06
        # the layer's receptive field (3 voxels, stride 2) and the upsampling spread the map a
        # little beyond the box: ~45% of the mass inside a box of 5% of the volume
        assert s["mass_inside"] > 0.35 and s["ratio"] > 6 and s["mass_inside"] > 4 * s["chance_p95"]
        assert s["pointing_game"]
        near = np.zeros(spatial, bool)
        near[tuple(slice(max(b.start - 2, 0), b.stop + 2) for b in (box_a if target == 0 else box_b))] = True
        assert cam[near].sum() / cam.sum() > 0.9
        # the gradient weighting picks the target's features: the other box gets almost nothing
        assert cam[other].sum() / cam.sum() < 0.02


def test_grad_cam_removes_its_hook_also_on_error():
    model, x = _model(), _image()
    fwd = lambda b: model(b)["logits"]  # noqa: E731
    grad_cam(fwd, model.stage, {"image": x}, target=0)
    assert len(model.stage._forward_hooks) == 0 and len(model.stage._backward_hooks) == 0
    with pytest.raises(IndexError, match="out of range"):
        grad_cam(fwd, model.stage, {"image": x}, target=7)
    with pytest.raises(ValueError, match="pass target"):
        grad_cam(fwd, model.stage, {"image": x})
    assert len(model.stage._forward_hooks) == 0
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    with pytest.raises(RuntimeError, match="not called"):
        grad_cam(fwd, nn.Conv3d(1, 1, 1), {"image": x}, target=0)


def test_grad_cam_eval_mode_during_call_and_state_restored():
    model, x = _model(dropout=0.5), _image()
    model.train()
    model.stem[1].eval()  # a mixed state (e.g. a frozen batch-norm) must come back as it was
    before = {n: m.training for n, m in model.named_modules()}
    stats = model.stage[1].running_mean.clone()
    fwd = lambda b: model(b)["logits"]  # noqa: E731
    a = grad_cam(fwd, model.stage, {"image": x}, target=0, model=model)
    b = grad_cam(fwd, model.stage, {"image": x}, target=0, model=model)
    np.testing.assert_array_equal(a.cam, b.cam)  # dropout off: deterministic
    assert {n: m.training for n, m in model.named_modules()} == before
    torch.testing.assert_close(model.stage[1].running_mean, stats)  # no batch-norm update
    assert all(p.grad is None for p in model.parameters())  # autograd.grad, not backward
    ref = _model(dropout=0.5)  # same weights, eval mode
    c = grad_cam(lambda bt: ref(bt)["logits"], ref.stage, {"image": x}, target=0)
    np.testing.assert_allclose(a.cam, c.cam, atol=1e-6)


def test_grad_cam_dict_input_model_scalar_output_and_frozen_weights():
    class ImageTable(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(5)
            self.stage = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1, stride=2), nn.ReLU())
            self.img = nn.Linear(4, 1)
            self.tab = nn.Linear(3, 1)

        def forward(self, batch):
            a = self.stage(batch["image"]).mean(dim=(2, 3, 4))
            return {"risk": (self.img(a) + self.tab(batch["tabular"]))[:, 0]}

    model = ImageTable().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    batch = {"image": _image(), "tabular": torch.randn(1, 3), "id": ["s1"]}
    res = grad_cam(lambda b: model(b)["risk"], model.stage, batch)
    assert res.cam.shape == SHAPE[2:] and res.target is None
    with torch.no_grad():
        assert res.score == pytest.approx(float(model(batch)["risk"][0]), abs=1e-6)
    # the tabular row changes the score but not the map (Grad-CAM of a linear head is shift-invariant)
    other = grad_cam(lambda b: model(b)["risk"], model.stage, {**batch, "tabular": torch.randn(1, 3) * 5})
    assert other.score != pytest.approx(res.score)
    np.testing.assert_allclose(other.cam, res.cam, atol=1e-6)
    # by hand: w_c = head weight / n_cells, cam = ReLU(sum_c w_c A_c), upsampled
    with torch.no_grad():
        act = model.stage(batch["image"])
        w = model.img.weight[0] / act[0, 0].numel()
        lc = torch.relu((w.view(1, -1, 1, 1, 1) * act).sum(1, keepdim=True))
    np.testing.assert_allclose(res.layer_cam, lc[0, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(res.weights, w.numpy(), atol=1e-7)
    flat = grad_cam(lambda b: model(b)["risk"], model.stage, batch, upsample=False)
    np.testing.assert_array_equal(flat.cam, flat.layer_cam)


def test_grad_cam_rejects_batches_and_missing_keys():
    model = _model()
    fwd = lambda b: model(b)["logits"]  # noqa: E731
    with pytest.raises(ValueError, match="one sample"):
        grad_cam(fwd, model.stage, {"image": torch.randn(2, *SHAPE[1:])}, target=0)
    with pytest.raises(KeyError, match="volume"):
        grad_cam(fwd, model.stage, {"image": _image()}, target=0, key="volume")


# ----------------------------------------------------------------------------- input gradients


class TinyRelu3d(nn.Module):
    """Every ReLU its own module (captum's GuidedBackprop hooks each module once)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 5, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3, 4)))


@pytest.mark.parametrize("target", [0, 2])
def test_input_gradient_equals_captum_saliency_and_guided_backprop(target):
    from captum.attr import GuidedBackprop, Saliency

    torch.manual_seed(3)
    model = TinyRelu3d().eval()
    x = _image(5)
    plain = input_gradient(lambda b: model(b["image"]), {"image": x}, target=target, model=model)
    guided = input_gradient(lambda b: model(b["image"]), {"image": x}, target=target, model=model, guided=True)
    ref_plain = Saliency(model).attribute(x.clone(), target=target, abs=False)[0].numpy()
    ref_guided = GuidedBackprop(model).attribute(x.clone(), target=target)[0].detach().numpy()
    np.testing.assert_allclose(plain, ref_plain, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(guided, ref_guided, rtol=1e-5, atol=1e-7)
    assert not np.allclose(plain, guided)  # guided backprop does change the gradient on this net
    # the ReLUs are plain again afterwards: a second plain call gives the same map
    again = input_gradient(lambda b: model(b["image"]), {"image": x}, target=target, model=model)
    np.testing.assert_array_equal(plain, again)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_input_gradient_restores_relus_on_error_and_needs_relus_for_guided():
    torch.manual_seed(3)
    model = TinyRelu3d().train()

    def boom(b):
        model(b["image"])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        input_gradient(boom, {"image": _image()}, target=0, model=model, guided=True)
    assert all("forward" not in m.__dict__ for m in model.modules()) and model.training
    lin = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="nn.ReLU"):
        input_gradient(lambda b: lin(b["image"]), {"image": torch.randn(1, 4)}, target=0, model=lin, guided=True)
    with pytest.raises(ValueError, match="one floating-point sample"):
        input_gradient(lambda b: lin(b["image"]), {"image": torch.randn(2, 4)}, target=0, model=lin)
