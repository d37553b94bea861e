"""CLIP + image-tabular matching (ITM) networks of P1 (stroke risk from 3D brain MRI + clinical table).

P1 pretrains an image encoder (3D ResNet-50 on T2-FLAIR) and a tabular encoder (an MLP over the
clinical fields) so that their projected embeddings align (CLIP loss), and a multimodal
interaction module that tells matched from mismatched image-table pairs (ITM loss with hard
negatives, ALBEF style). Downstream, an ensemble of three linear heads (image, tabular,
multimodal) classifies stroke risk. The losses live elsewhere; this module holds the networks:

- :class:`ResNet3dEncoder`: MONAI's 3D ``ResNet`` with bottleneck blocks, without the
  classifier. Gives the globally average-pooled features (B, 2048) and the last stage's feature
  map as tokens (B, N, 2048) for the interaction module. ``gradcam_layer`` is the last stage.
- :class:`TabularEncoder`: mixed categorical / continuous fields with explicit missingness ->
  Linear(in -> 2048) + [BatchNorm, ReLU, Dropout 0.3, Linear(2048 -> 2048)].
- :class:`ProjectionHead`: Linear -> ReLU -> Linear (2048 -> 2048 -> 128), one per modality.
- :class:`InteractionModule`: the tabular token attends to itself, then to the image tokens
  (pre-LN MONAI ``TransformerBlock`` with cross-attention), MLP ratio 4; its output is the
  tabular token (public example: d = 256, 2 layers, 4 heads).
- :class:`EnsembleClassifier`: the mean of the logits of three linear heads.
- :class:`ImageTabularCLIP`: the pretraining model composing all but the ensemble.

Models take and return dicts: ``{"image": (B, 1, X, Y, Z), "categorical": (B, n_cat) long,
"continuous": (B, n_cont) float} -> {"image_features", "image_tokens", "tabular_features",
"image_embedding", "tabular_embedding"}``. Embeddings are *not* L2-normalised here (the CLIP loss
normalises them).

Missing values. A categorical code of ``-1`` is a missing value and gets its own level (an extra
one-hot position or an extra embedding row); a ``NaN`` continuous value is set to 0 and a
missing-indicator bit per continuous field is appended, so a missing value and an observed 0
reach the MLP as different inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mmlib.models.autoencoders import ResNetEncoder

__all__ = [
    "EnsembleClassifier",
    "ImageTabularCLIP",
    "InteractionModule",
    "ProjectionHead",
    "ResNet3dEncoder",
    "TabularEncoder",
]


def _check_2d(x: torch.Tensor, width: int, name: str, owner: str) -> None:
    if x.ndim != 2 or x.shape[1] != width:
        raise ValueError(f"{owner} expects {name} of shape (B, {width}), got {tuple(x.shape)}")


# --------------------------------------------------------------------------- image encoder


class ResNet3dEncoder(ResNetEncoder):
    """3D ResNet (MONAI ``ResNet``, bottleneck blocks, classifier removed) giving features and tokens.

    Default: ResNet-50, blocks 3-4-6-3, widths 64-128-256-512 (bottleneck expansion 4, so the
    output has 2048 channels), conv1 kernel 7 stride 2, max pooling; ~46.2M parameters. The last
    stage's feature map is ``(B, 2048, X/32, Y/32, Z/32)`` (with ``conv1_stride=2``).

    Args:
        in_channels: input channels (1 for FLAIR).
        widths: inner widths of the four stages; the output has ``4 * widths[-1]`` channels.
        layers: bottleneck blocks per stage.
        conv1_kernel: kernel of the first convolution.
        conv1_stride: stride of the first convolution.

    Attributes:
        out_features: channels of the features and tokens (``4 * widths[-1]``).
        gradcam_layer: the last stage (``layer4``), the target layer of Grad-CAM.
    """

    default_block = "bottleneck"

    @property
    def out_features(self) -> int:
        """Channels of the features and tokens (``4 * widths[-1]``)."""
        return self.out_channels

    @property
    def gradcam_layer(self) -> nn.Module:
        """The last stage, whose output (B, C, x, y, z) Grad-CAM weighs by its gradients."""
        return self.layer4

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Encode a volume.

        Args:
            image: (B, in_channels, X, Y, Z).

        Returns:
            ``features``: (B, out_features), the last feature map averaged over space;
            ``tokens``: (B, N, out_features), the last feature map flattened over space
            (N = x * y * z, row-major over the three spatial axes).
        """
        fmap = super().forward(image)
        return {"features": fmap.mean(dim=(2, 3, 4)), "tokens": fmap.flatten(2).transpose(1, 2)}


# --------------------------------------------------------------------------- tabular encoder


class TabularEncoder(nn.Module):
    """MLP over categorical and continuous clinical fields with explicit missingness.

    Inputs are turned into one vector (:meth:`featurize`): each categorical field becomes a
    one-hot of size ``n + 1`` (``categorical="onehot"``, the last position is "missing") or an
    ``embedding_dim`` embedding with an extra "missing" row (``categorical="embedding"``); the
    continuous values follow (missing ones set to 0), then one missing-indicator bit per
    continuous field. Continuous values are expected standardised by the data pipeline.

    The MLP is Linear(in -> hidden) followed by ``blocks`` x [BatchNorm1d, ReLU, Dropout,
    Linear(hidden -> hidden)] (P1: hidden 2048, dropout 0.3, one block). In training mode the
    BatchNorm needs batches of two or more.

    Args:
        n_categories: number of observed levels of each categorical field (codes ``0 .. n - 1``).
        n_continuous: number of continuous fields.
        hidden: width of the MLP and of the output.
        dropout: dropout rate in each block.
        categorical: ``"onehot"`` or ``"embedding"``.
        embedding_dim: embedding width per categorical field (``categorical="embedding"`` only).
        blocks: number of [BatchNorm1d, ReLU, Dropout, Linear] blocks.

    Attributes:
        in_features: width of the featurized input vector.
        out_features: ``hidden``.
    """

    def __init__(
        self,
        n_categories: Sequence[int],
        n_continuous: int,
        hidden: int = 2048,
        dropout: float = 0.3,
        categorical: str = "onehot",
        embedding_dim: int = 8,
        *,
        blocks: int = 1,
    ) -> None:
        super().__init__()
        n_categories = [int(n) for n in n_categories]
        if any(n < 1 for n in n_categories):
            raise ValueError(f"n_categories must be positive level counts, got {n_categories}")
        if n_continuous < 0:
            raise ValueError(f"n_continuous must be >= 0, got {n_continuous}")
        if not n_categories and not n_continuous:
            raise ValueError("TabularEncoder needs at least one categorical or continuous field")
        if categorical not in ("onehot", "embedding"):
            raise ValueError(f"categorical must be 'onehot' or 'embedding', got {categorical!r}")
        if categorical == "embedding" and embedding_dim < 1:
            raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
        if hidden < 1 or blocks < 0:
            raise ValueError(f"hidden must be positive and blocks >= 0, got hidden={hidden}, blocks={blocks}")
        self.n_categories = tuple(n_categories)
        self.n_continuous = int(n_continuous)
        self.categorical = categorical
        self.n_levels = sum(n + 1 for n in n_categories)  # observed levels + one "missing" level per field
        offsets = [0]
        for n in n_categories[:-1]:
            offsets.append(offsets[-1] + n + 1)
        self.register_buffer("_offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.register_buffer("_levels", torch.tensor(n_categories, dtype=torch.long), persistent=False)
        if categorical == "embedding":
            self.embedding: nn.Embedding | None = nn.Embedding(self.n_levels, embedding_dim)
            cat_width = len(n_categories) * embedding_dim
        else:
            self.embedding = None
            cat_width = self.n_levels
        self.in_features = cat_width + 2 * self.n_continuous
        self.out_features = hidden
        layers: list[nn.Module] = [nn.Linear(self.in_features, hidden)]
        for _ in range(blocks):
            layers += [nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden)]
        self.net = nn.Sequential(*layers)

    def _check(self, categorical: torch.Tensor | None, continuous: torch.Tensor | None) -> int:
        n_cat, n_cont = len(self.n_categories), self.n_continuous
        batch = []
        if n_cat:
            if categorical is None:
                raise ValueError(f"TabularEncoder has {n_cat} categorical fields but categorical is None")
            if categorical.dtype.is_floating_point or categorical.dtype.is_complex or categorical.dtype == torch.bool:
                raise TypeError(f"categorical must be an integer tensor of codes (-1 = missing), "
                                f"got dtype {categorical.dtype}")
            _check_2d(categorical, n_cat, "categorical", "TabularEncoder")
            batch.append(categorical.shape[0])
        if n_cont:
            if continuous is None:
                raise ValueError(f"TabularEncoder has {n_cont} continuous fields but continuous is None")
            if not continuous.dtype.is_floating_point:
                raise TypeError(f"continuous must be a floating tensor (NaN = missing), got dtype {continuous.dtype}")
            _check_2d(continuous, n_cont, "continuous", "TabularEncoder")
            batch.append(continuous.shape[0])
        if len(set(batch)) > 1:
            raise ValueError(f"categorical {tuple(categorical.shape)} and continuous {tuple(continuous.shape)} "
                             "have different batch sizes")
        if n_cat:
            bad = (categorical < -1) | (categorical >= self._levels)
            if bool(bad.any()):
                row, col = (int(i) for i in bad.nonzero()[0])
                n = self.n_categories[col]
                raise ValueError(f"categorical column {col} has code {int(categorical[row, col])} (row {row}) outside "
                                 f"[-1, {n - 1}]: the column has {n} levels and -1 means missing")
        if n_cont:
            inf = torch.isinf(continuous)
            if bool(inf.any()):
                row, col = (int(i) for i in inf.nonzero()[0])
                raise ValueError(f"continuous column {col} has value {float(continuous[row, col])} (row {row}); "
                                 "use NaN for a missing value")
        return batch[0]

    def featurize(self, categorical: torch.Tensor | None, continuous: torch.Tensor | None) -> torch.Tensor:
        """The MLP's input: categorical one-hots or embeddings, continuous values, missing indicators.

        Args:
            categorical: (B, n_cat) integer codes, ``-1`` = missing (may be None when n_cat = 0).
            continuous: (B, n_cont) floats, ``NaN`` = missing (may be None when n_cont = 0).

        Returns:
            (B, in_features).
        """
        b = self._check(categorical, continuous)
        dtype = self.net[0].weight.dtype
        device = self.net[0].weight.device
        parts = []
        if self.n_categories:
            codes = torch.where(categorical < 0, self._levels, categorical.long()) + self._offsets
            if self.embedding is not None:
                parts.append(self.embedding(codes).flatten(1))
            else:
                onehot = torch.zeros(b, self.n_levels, dtype=dtype, device=device)
                parts.append(onehot.scatter_(1, codes, 1.0))
        if self.n_continuous:
            missing = torch.isnan(continuous)
            parts.append(torch.where(missing, torch.zeros((), dtype=continuous.dtype, device=continuous.device),
                                     continuous).to(dtype))
            parts.append(missing.to(dtype))
        return torch.cat(parts, dim=1)

    def forward(self, categorical: torch.Tensor | None, continuous: torch.Tensor | None) -> torch.Tensor:
        """(B, n_cat) codes and (B, n_cont) values -> features (B, hidden)."""
        return self.net(self.featurize(categorical, continuous))


# --------------------------------------------------------------------------- heads


class ProjectionHead(nn.Module):
    """Linear(in -> hidden) -> ReLU -> Linear(hidden -> out): the CLIP projection (P1: 2048 -> 2048 -> 128).

    Args:
        in_features: input width.
        hidden: hidden width (default: ``in_features``).
        out_features: embedding width.
    """

    def __init__(self, in_features: int = 2048, hidden: int | None = None, out_features: int = 128) -> None:
        super().__init__()
        hidden = in_features if hidden is None else hidden
        self.in_features, self.out_features = in_features, out_features
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_features) -> (B, out_features)."""
        _check_2d(x, self.in_features, "x", "ProjectionHead")
        return self.net(x)


class InteractionModule(nn.Module):
    """Multimodal interaction: a tabular token attends to itself and to the image tokens.

    Image tokens are projected to ``dim`` and layer-normalised (the ResNet's post-ReLU features
    are unnormalised; each pre-LN block normalises only its query), the tabular feature is
    projected to one token. Each block is MONAI's pre-LN ``TransformerBlock`` with cross-attention:
    ``t = t + SelfAttn(LN(t)); t = t + CrossAttn(LN(t), image); t = t + MLP(LN(t))`` (MLP with
    GELU, ``mlp_ratio * dim`` hidden). A final LayerNorm; the output is the tabular token. The
    image tokens carry no position embedding, so the module is invariant to their order.

    Args:
        image_dim: width of the image tokens.
        tabular_dim: width of the tabular feature.
        dim: model width (public example: 256).
        layers: number of blocks.
        heads: attention heads (``dim`` must be divisible by it).
        mlp_ratio: MLP hidden width / ``dim``.
        dropout: dropout in attention and MLP.
    """

    def __init__(
        self,
        image_dim: int,
        tabular_dim: int,
        dim: int = 256,
        layers: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        from monai.networks.blocks import TransformerBlock

        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.image_dim, self.tabular_dim, self.dim, self.heads = image_dim, tabular_dim, dim, heads
        self.image_proj = nn.Linear(image_dim, dim)
        self.image_norm = nn.LayerNorm(dim)
        self.tabular_proj = nn.Linear(tabular_dim, dim)
        self.blocks = nn.ModuleList(
            [TransformerBlock(dim, mlp_ratio * dim, heads, dropout, qkv_bias=True, with_cross_attention=True)
             for _ in range(layers)]
        )
        for blk in self.blocks:
            blk.cross_attn.save_attn = True  # MONAI keeps the last (detached) attention in ``att_mat``
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, image_tokens: torch.Tensor, tabular_features: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Fuse one table with its image tokens.

        Args:
            image_tokens: (B, N, image_dim).
            tabular_features: (B, tabular_dim).
            return_attention: also return the cross-attention weights of each block.

        Returns:
            The tabular token (B, dim); with ``return_attention`` also a list (one per block) of
            detached cross-attention weights (B, heads, 1, N), each summing to 1 over N.
        """
        if image_tokens.ndim != 3 or image_tokens.shape[2] != self.image_dim:
            raise ValueError(f"InteractionModule expects image_tokens of shape (B, N, {self.image_dim}), "
                             f"got {tuple(image_tokens.shape)}")
        _check_2d(tabular_features, self.tabular_dim, "tabular_features", "InteractionModule")
        if image_tokens.shape[0] != tabular_features.shape[0]:
            raise ValueError(f"image_tokens {tuple(image_tokens.shape)} and tabular_features "
                             f"{tuple(tabular_features.shape)} have different batch sizes")
        context = self.image_norm(self.image_proj(image_tokens))
        t = self.tabular_proj(tabular_features).unsqueeze(1)
        attention = []
        for blk in self.blocks:
            t = blk(t, context=context)
            attention.append(blk.cross_attn.att_mat)
        out = self.norm(t[:, 0])
        return (out, attention) if return_attention else out


class EnsembleClassifier(nn.Module):
    """Three linear heads (image, tabular, multimodal); the prediction is the mean of their logits.

    Args:
        image_dim: width of the image features (P1: 2048).
        tabular_dim: width of the tabular features (P1: 2048).
        dim: width of the multimodal token (P1: the interaction module's ``dim``).
        n_classes: number of classes (P1: 2).
    """

    def __init__(self, image_dim: int, tabular_dim: int, dim: int, n_classes: int = 2) -> None:
        super().__init__()
        self.image = nn.Linear(image_dim, n_classes)
        self.tabular = nn.Linear(tabular_dim, n_classes)
        self.multimodal = nn.Linear(dim, n_classes)

    def forward(
        self, image_features: torch.Tensor, tabular_features: torch.Tensor, multimodal: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """(B, image_dim), (B, tabular_dim), (B, dim) -> dict of (B, n_classes) logits.

        Returns:
            ``logits`` (the mean of the three heads' logits), ``image``, ``tabular``, ``multimodal``.
        """
        _check_2d(image_features, self.image.in_features, "image_features", "EnsembleClassifier")
        _check_2d(tabular_features, self.tabular.in_features, "tabular_features", "EnsembleClassifier")
        _check_2d(multimodal, self.multimodal.in_features, "multimodal", "EnsembleClassifier")
        shapes = {image_features.shape[0], tabular_features.shape[0], multimodal.shape[0]}
        if len(shapes) > 1:
            raise ValueError(f"EnsembleClassifier inputs have different batch sizes: {tuple(image_features.shape)}, "
                             f"{tuple(tabular_features.shape)}, {tuple(multimodal.shape)}")
        out = {"image": self.image(image_features), "tabular": self.tabular(tabular_features),
               "multimodal": self.multimodal(multimodal)}
        out["logits"] = torch.stack([out["image"], out["tabular"], out["multimodal"]]).mean(dim=0)
        return out


# --------------------------------------------------------------------------- the pretraining model


class ImageTabularCLIP(nn.Module):
    """P1's pretraining model: image and tabular encoders, projection heads, interaction module.

    ``forward`` gives the encoders' features and the projected embeddings (for the CLIP loss);
    :meth:`fuse` runs the interaction module on any pairing of image tokens and tabular features
    (for the ITM loss, which pairs positives and hard negatives; the ITM head Linear(dim -> 2)
    belongs to :class:`mmlib.losses.ImageTabularMatchingLoss`).

    Args:
        n_categories: observed levels of each categorical field (see :class:`TabularEncoder`).
        n_continuous: number of continuous fields.
        in_channels, widths, layers, conv1_kernel, conv1_stride: of the :class:`ResNet3dEncoder`
            (default ResNet-50).
        hidden: tabular MLP width (P1: 2048).
        dropout: tabular MLP dropout (P1: 0.3).
        categorical, embedding_dim: categorical encoding of the :class:`TabularEncoder`.
        proj_hidden: hidden width of both projection heads (default: each head's input width,
            2048 -> 2048 -> 128 in P1).
        proj_dim: embedding width (P1: 128).
        interaction_dim, interaction_layers, interaction_heads, interaction_dropout: of the
            :class:`InteractionModule` (public example: 256, 2, 4).
    """

    def __init__(
        self,
        *,
        n_categories: Sequence[int],
        n_continuous: int,
        in_channels: int = 1,
        widths: Sequence[int] = (64, 128, 256, 512),
        layers: Sequence[int] = (3, 4, 6, 3),
        conv1_kernel: int = 7,
        conv1_stride: int = 2,
        hidden: int = 2048,
        dropout: float = 0.3,
        categorical: str = "onehot",
        embedding_dim: int = 8,
        proj_hidden: int | None = None,
        proj_dim: int = 128,
        interaction_dim: int = 256,
        interaction_layers: int = 2,
        interaction_heads: int = 4,
        interaction_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.image_encoder = ResNet3dEncoder(in_channels=in_channels, widths=widths, layers=layers,
                                             conv1_kernel=conv1_kernel, conv1_stride=conv1_stride)
        self.tabular_encoder = TabularEncoder(n_categories, n_continuous, hidden=hidden, dropout=dropout,
                                              categorical=categorical, embedding_dim=embedding_dim)
        img_dim = self.image_encoder.out_features
        self.image_projection = ProjectionHead(img_dim, proj_hidden, proj_dim)
        self.tabular_projection = ProjectionHead(hidden, proj_hidden, proj_dim)
        self.interaction = InteractionModule(img_dim, hidden, dim=interaction_dim, layers=interaction_layers,
                                             heads=interaction_heads, dropout=interaction_dropout)

    @property
    def gradcam_layer(self) -> nn.Module:
        """The image encoder's last stage (Grad-CAM's target layer)."""
        return self.image_encoder.gradcam_layer

    def encoder_stages(self) -> list[str]:
        """The image encoder's stages as model-level prefixes (``"image_encoder.layer4"``), for freezing."""
        return [f"image_encoder.{s}" for s in self.image_encoder.stages()]

    def stage_modules(self, stage: str) -> list[nn.Module]:
        """The modules of a stage named by :meth:`encoder_stages`, or any submodule path."""
        if stage.startswith("image_encoder."):
            return self.image_encoder.stage_modules(stage.removeprefix("image_encoder."))
        return [self.get_submodule(stage)]

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encode and project both modalities.

        Args:
            batch: ``image`` (B, C, X, Y, Z); ``categorical`` (B, n_cat) integer codes, -1 =
                missing; ``continuous`` (B, n_cont) floats, NaN = missing. A key may be left out
                when the model has no field of that kind.

        Returns:
            ``image_features`` (B, 2048), ``image_tokens`` (B, N, 2048), ``tabular_features``
            (B, hidden), ``image_embedding`` and ``tabular_embedding`` (B, proj_dim), not normalised.
        """
        need = ["image"]
        need += ["categorical"] if self.tabular_encoder.n_categories else []
        need += ["continuous"] if self.tabular_encoder.n_continuous else []
        missing = [k for k in need if k not in batch]
        if missing:
            raise KeyError(f"ImageTabularCLIP needs batch keys {need}; missing {missing}")
        img = self.image_encoder(batch["image"])
        tab = self.tabular_encoder(batch.get("categorical"), batch.get("continuous"))
        if tab.shape[0] != img["features"].shape[0]:
            raise ValueError(f"image {tuple(batch['image'].shape)} and the table ({tab.shape[0]} rows) "
                             "have different batch sizes")
        return {
            "image_features": img["features"],
            "image_tokens": img["tokens"],
            "tabular_features": tab,
            "image_embedding": self.image_projection(img["features"]),
            "tabular_embedding": self.tabular_projection(tab),
        }

    def fuse(self, image_tokens: torch.Tensor, tabular_features: torch.Tensor) -> torch.Tensor:
        """Interaction module: (B, N, 2048) image tokens + (B, hidden) tabular features -> (B, dim)."""
        return self.interaction(image_tokens, tabular_features)
