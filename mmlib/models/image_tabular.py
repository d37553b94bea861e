"""Image + tabular fusion models of P2 (XSRD-net): ResNetMLP and ViTMLP.

Both regress relapse-free survival (RFS) from a 3D CTA and the 5 tabular inputs (age z-scored,
gender 2 bits, CHD, PAD). A vision branch and a tabular MLP each give a few features, a fusion
MLP maps their concatenation to one number (P2 Figures 1-2, section 3.2). The paper then
classifies "RFS < kappa" as relapse.

Sizes. PAPERS.md (the spec) gives a vision head to 4 features and a tabular MLP 5->16->4. The
paper's parameter counts (vision head "2.56k", tabular MLP 225, fusion 850) fit 5 features
(512*5+5 = 2,565) and 5->20->5 (225) instead; both are a keyword away
(``vision_features=5, tabular_hidden=20, tabular_features=5``). ``fusion_hidden = 85`` gives
the paper's ~850 fusion parameters for 8 inputs (8*85+85 + 85+1 = 851).

Models take and return dicts: ``{"image": (B, 1, X, Y, Z), "tabular": (B, 5)} -> {"rfs": (B,)}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mmlib.models.autoencoders import ResNetEncoder, ViTEncoder

__all__ = ["FusionMLP", "ImageTabularRegressor", "ResNetMLP", "TabularMLP", "ViTMLP"]


class TabularMLP(nn.Module):
    """Tabular branch: Linear -> GELU -> Linear -> ReLU (one hidden layer)."""

    def __init__(self, *, in_features: int = 5, hidden: int = 16, out_features: int = 4) -> None:
        super().__init__()
        self.in_features = in_features
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, out_features), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_features) -> (B, out_features)."""
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"TabularMLP expects (B, {self.in_features}), got {tuple(x.shape)}")
        return self.net(x)


class FusionMLP(nn.Module):
    """Fusion: concatenated features -> Linear -> GELU -> Linear(-> 1)."""

    def __init__(self, *, in_features: int = 8, hidden: int = 85) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_features) -> (B,)."""
        return self.net(x).squeeze(-1)


class ImageTabularRegressor(nn.Module):
    """``encoder`` -> ``vision_head`` and ``tabular`` MLP -> concatenation -> ``fusion`` -> RFS.

    Subclasses build the encoder and the vision head; the rest is shared. ``encoder_stages()``
    lists the encoder's stages as model-level prefixes (``"encoder.layer4"``), the units the
    freezing schedules act on; everything outside ``encoder.`` (heads, MLPs) always trains.
    """

    encoder: nn.Module
    vision_head: nn.Module

    def __init__(self, *, tabular_features: int, tabular_hidden: int, vision_features: int, fusion_hidden: int,
                 tabular_inputs: int = 5) -> None:
        super().__init__()
        self.tabular = TabularMLP(in_features=tabular_inputs, hidden=tabular_hidden, out_features=tabular_features)
        self.fusion = FusionMLP(in_features=vision_features + tabular_features, hidden=fusion_hidden)

    def encoder_stages(self) -> list[str]:
        return [f"encoder.{s}" for s in self.encoder.stages()]

    def stage_modules(self, stage: str) -> list[nn.Module]:
        """The modules of a stage named by :meth:`encoder_stages`, or any submodule path."""
        if stage.startswith("encoder."):
            return self.encoder.stage_modules(stage.removeprefix("encoder."))
        return [self.get_submodule(stage)]

    def vision_features(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"image": (B, 1, X, Y, Z), "tabular": (B, F)}`` -> ``{"rfs": (B,)}`` (regression output)."""
        missing = [k for k in ("image", "tabular") if k not in batch]
        if missing:
            raise KeyError(f"{type(self).__name__} needs batch keys 'image' and 'tabular'; missing {missing}")
        v = self.vision_features(batch["image"])
        t = self.tabular(batch["tabular"])
        return {"rfs": self.fusion(torch.cat([v, t], dim=1))}


class ResNetMLP(ImageTabularRegressor):
    """XSRD-net: ResNet34 -> global average pool -> Dropout 0.1 -> Linear(-> vision_features) -> ReLU.

    Args:
        widths, layers, conv1_kernel, conv1_stride: of the :class:`ResNetEncoder` (paper: ResNet34).
        vision_features, tabular_hidden, tabular_features, fusion_hidden: head sizes (see module doc).
        dropout: before the vision head's linear layer.
    """

    def __init__(
        self,
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        layers: Sequence[int] = (3, 4, 6, 3),
        conv1_kernel: int = 7,
        conv1_stride: int = 2,
        vision_features: int = 4,
        tabular_hidden: int = 16,
        tabular_features: int = 4,
        fusion_hidden: int = 85,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(tabular_features=tabular_features, tabular_hidden=tabular_hidden,
                         vision_features=vision_features, fusion_hidden=fusion_hidden)
        self.encoder = ResNetEncoder(widths=widths, layers=layers, conv1_kernel=conv1_kernel, conv1_stride=conv1_stride)
        self.vision_head = nn.Sequential(
            nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(self.encoder.out_channels, vision_features), nn.ReLU(),
        )

    def vision_features(self, image: torch.Tensor) -> torch.Tensor:
        return self.vision_head(self.encoder(image))


class ViTMLP(ImageTabularRegressor):
    """ViT tokens -> 3D grid -> two Conv3d + InstanceNorm + GELU -> pool -> Linear -> ReLU.

    With the paper's sizes (hidden 768, head channels 256 and 64, kernel 3) the vision head has
    ~5.75M parameters, as reported.

    Pooling. The paper and the spec say "pool" without saying which. Global *average* pooling
    right after InstanceNorm + GELU is nearly blind to the input: the norm gives every channel
    zero mean and unit variance over space, so the spatial mean of GELU(z) depends only on the
    shape of each channel's value distribution. On P2's quick cohort that left the pooled
    features' spread across patients ~30x smaller than with max pooling, and the ReLU after the
    linear layer then output 0 for every patient (no vision signal, no gradient to the encoder).
    The default is therefore ``pool="max"``; ``pool="avg"`` builds the literal reading.

    Args:
        img_size, patch_size, hidden_size, mlp_dim, num_layers, num_heads: of the :class:`ViTEncoder`.
        head_channels: channels of the two head convolutions.
        pool: ``"max"`` (default) or ``"avg"``: the global pooling of the head (see above).
        vision_features, tabular_hidden, tabular_features, fusion_hidden: head sizes (see module doc).
    """

    def __init__(
        self,
        *,
        img_size: Sequence[int],
        patch_size: int | Sequence[int] = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 8,
        num_heads: int = 8,
        head_channels: Sequence[int] = (256, 64),
        pool: str = "max",
        vision_features: int = 4,
        tabular_hidden: int = 16,
        tabular_features: int = 4,
        fusion_hidden: int = 85,
    ) -> None:
        super().__init__(tabular_features=tabular_features, tabular_hidden=tabular_hidden,
                         vision_features=vision_features, fusion_hidden=fusion_hidden)
        self.encoder = ViTEncoder(img_size=img_size, patch_size=patch_size, hidden_size=hidden_size, mlp_dim=mlp_dim,
                                  num_layers=num_layers, num_heads=num_heads)
        pools = {"max": nn.AdaptiveMaxPool3d, "avg": nn.AdaptiveAvgPool3d}
        if pool not in pools:
            raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")
        c1, c2 = head_channels
        self.vision_head = nn.Sequential(
            nn.Conv3d(hidden_size, c1, kernel_size=3, padding=1), nn.InstanceNorm3d(c1), nn.GELU(),
            nn.Conv3d(c1, c2, kernel_size=3, padding=1), nn.InstanceNorm3d(c2), nn.GELU(),
            pools[pool](1), nn.Flatten(), nn.Linear(c2, vision_features), nn.ReLU(),
        )

    def vision_features(self, image: torch.Tensor) -> torch.Tensor:
        return self.vision_head(self.encoder.to_grid(self.encoder(image)))
