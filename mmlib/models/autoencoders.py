"""3D encoders and the two autoencoders of P2 (self-supervised pretraining on CTA).

P2 section 3.1: a ResNet34 and an 8-layer, 8-head ViT are pretrained as autoencoders with an
L1 reconstruction loss, then their encoders become the vision backbones of the fine-tuning
models. Both encoders here are assembled from MONAI building blocks (its ``ResNet`` and its
``PatchEmbeddingBlock`` / ``TransformerBlock``), and each is one module shared by the
autoencoder and the fine-tuning model, so a pretrained encoder's ``state_dict`` loads into the
fine-tuning model key for key (checked strictly by :func:`mmlib.train.load_encoder`).

Each encoder names its **stages** in input-to-output order (:meth:`stages`): the units that the
freezing schedules of :mod:`mmlib.train` freeze and unfreeze.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["PatchUpsample3d", "ResNetAutoEnc", "ResNetEncoder", "ViTAutoEnc", "ViTEncoder"]


class PatchUpsample3d(nn.ConvTranspose3d):
    """A ``ConvTranspose3d`` whose kernel equals its stride (no overlap), computed as one matmul.

    With kernel == stride every input voxel writes its own output block, so the transposed
    convolution is a per-voxel linear map followed by a reshape. Same parameters and state-dict
    keys as ``nn.ConvTranspose3d`` (checkpoints are interchangeable), same result, but several
    times faster on CPU, where PyTorch's transposed 3D convolution is slow.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int]) -> None:
        k = _triple(kernel_size, "kernel_size")
        super().__init__(in_channels, out_channels, kernel_size=k, stride=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, _, d, h, w = x.shape
        k1, k2, k3 = self.kernel_size
        y = torch.einsum("bcdhw,coijk->bodihjwk", x, self.weight.to(x.dtype))
        y = y.reshape(b, self.out_channels, d * k1, h * k2, w * k3)
        return y + self.bias.to(y.dtype).view(1, -1, 1, 1, 1) if self.bias is not None else y


def _triple(v: int | Sequence[int], name: str) -> tuple[int, int, int]:
    t = (int(v),) * 3 if isinstance(v, int) else tuple(int(i) for i in v)
    if len(t) != 3 or min(t) <= 0:
        raise ValueError(f"{name} must be a positive int or three positive ints, got {v!r}")
    return t  # type: ignore[return-value]


def _check_input(x: torch.Tensor, in_channels: int, name: str) -> None:
    if x.ndim != 5 or x.shape[1] != in_channels:
        raise ValueError(f"{name} expects (B, {in_channels}, X, Y, Z), got {tuple(x.shape)}")


class ResNetEncoder(nn.Module):
    """3D ResNet feature extractor (MONAI ``ResNet`` without pooling and classifier).

    Default: ResNet34, basic blocks 3-4-6-3, widths 64-128-256-512, conv1 kernel 7 stride 2,
    then max pooling: the output is ``(B, widths[-1], X/32, Y/32, Z/32)``.

    Args:
        in_channels: input channels.
        widths: channels of the four stages.
        layers: basic blocks per stage.
        conv1_kernel: kernel of the first convolution.
        conv1_stride: stride of the first convolution.
        block: ``"basic"`` (ResNet18/34) or ``"bottleneck"`` (ResNet50+: 4 x widths[-1] output
            channels); default: the class's ``default_block``.
    """

    default_block = "basic"

    def __init__(
        self,
        *,
        in_channels: int = 1,
        widths: Sequence[int] = (64, 128, 256, 512),
        layers: Sequence[int] = (3, 4, 6, 3),
        conv1_kernel: int = 7,
        conv1_stride: int = 2,
        block: str | None = None,
    ) -> None:
        super().__init__()
        from monai.networks.nets import ResNet
        from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck

        if len(widths) != 4 or len(layers) != 4 or min(widths) <= 0 or min(layers) <= 0:
            raise ValueError(f"widths and layers need four positive ints each, got {widths!r}, {layers!r}")
        blocks = {"basic": ResNetBlock, "bottleneck": ResNetBottleneck}
        block = block or self.default_block
        if block not in blocks:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        net = ResNet(
            block, list(layers), list(widths), spatial_dims=3, n_input_channels=in_channels,
            conv1_t_size=conv1_kernel, conv1_t_stride=conv1_stride, feed_forward=False,
        )
        self.in_channels = in_channels
        self.out_channels = int(widths[-1]) * blocks[block].expansion
        self.downsample = 2 * conv1_stride * 8  # conv1, max pool, stages 2-4
        self.conv1, self.bn1, self.act, self.maxpool = net.conv1, net.bn1, net.act, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def stages(self) -> list[str]:
        """Submodule prefixes in input-to-output order (``stem`` = conv1 + bn1)."""
        return ["stem", "layer1", "layer2", "layer3", "layer4"]

    def stage_modules(self, stage: str) -> list[nn.Module]:
        return [self.conv1, self.bn1] if stage == "stem" else [getattr(self, stage)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) -> feature map (B, widths[-1], X/32, Y/32, Z/32)."""
        _check_input(x, self.in_channels, type(self).__name__)
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ResNetAutoEnc(nn.Module):
    """ResNet34 encoder + a decoder of four convolutions without skip connections (P2, 3.1).

    Decoder: transposed convolutions (kernel = stride) upsample by 2 and 4, a 1x1x1 convolution
    mixes channels at a quarter of the resolution, and a last transposed convolution upsamples
    by 4 straight to the output channels (32 in all), ReLU between them. Only the last layer
    works at full resolution, and with one channel, which keeps the decoder cheap. Without
    skips the reconstruction must pass through the bottleneck, which is the point of the
    pretext task.

    Args:
        in_channels: input (and output) channels.
        widths, layers, conv1_kernel, conv1_stride: of the :class:`ResNetEncoder`.
        decoder_channels: channels after the first three decoder layers (default: widths[-1] / 2,
            / 8, / 32 = 256, 64, 16, each at least 8: a ReLU layer of one or two channels can die
            at initialisation and leave a constant output).
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        widths: Sequence[int] = (64, 128, 256, 512),
        layers: Sequence[int] = (3, 4, 6, 3),
        conv1_kernel: int = 7,
        conv1_stride: int = 2,
        decoder_channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = ResNetEncoder(
            in_channels=in_channels, widths=widths, layers=layers, conv1_kernel=conv1_kernel, conv1_stride=conv1_stride
        )
        c = self.encoder.out_channels
        d1, d2, d3 = decoder_channels or (max(c // 2, 8), max(c // 8, 8), max(c // 32, 8))
        if self.encoder.downsample != 32:
            raise ValueError(f"the decoder upsamples by 32; conv1_stride must be 2, got {conv1_stride}")
        self.decoder = nn.Sequential(
            PatchUpsample3d(c, d1, 2), nn.ReLU(inplace=True),
            PatchUpsample3d(d1, d2, 4), nn.ReLU(inplace=True),
            nn.Conv3d(d2, d3, kernel_size=1), nn.ReLU(inplace=True),
            PatchUpsample3d(d3, in_channels, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) with X, Y, Z divisible by 32 -> reconstruction of the same shape."""
        _check_input(x, self.encoder.in_channels, "ResNetAutoEnc")
        if any(s % 32 for s in x.shape[2:]):
            raise ValueError(f"ResNetAutoEnc needs spatial sizes divisible by 32, got {tuple(x.shape[2:])}")
        return self.decoder(self.encoder(x))


class ViTEncoder(nn.Module):
    """3D Vision Transformer encoder from MONAI blocks (patch embedding, transformer blocks, norm).

    Default (P2): patch 16^3, hidden 768, MLP 3072, 8 layers, 8 heads, learnable position
    embedding, convolutional patch projection; the same layout as MONAI's ``ViTAutoEnc``
    encoder part, so :class:`ViTAutoEnc` reproduces MONAI's network exactly.

    Args:
        img_size: input spatial size ``(X, Y, Z)``, each divisible by the patch size.
        patch_size: patch edge (voxels), a square number (the decoder upsamples by its root twice).
        in_channels: input channels.
        hidden_size, mlp_dim, num_layers, num_heads: transformer sizes.
        dropout_rate: dropout in the transformer.
        sdpa: compute attention with ``torch.nn.functional.scaled_dot_product_attention`` (MONAI's
            ``use_flash_attention``) in every block: flash / memory-efficient kernels that never
            store the (heads x N x N) attention matrix, which matters at the paper's 3,920 tokens.
            Same parameters and ``state_dict`` keys, same outputs up to float rounding; but the
            attention matrix can no longer be kept (``save_attn`` / ``att_mat``), so it is off by
            default. Not with ``dropout_rate > 0``: MONAI passes the dropout to SDPA in eval mode
            too. Toggle later with :func:`mmlib.fast.set_sdpa`.
    """

    def __init__(
        self,
        *,
        img_size: Sequence[int],
        patch_size: int | Sequence[int] = 16,
        in_channels: int = 1,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 8,
        num_heads: int = 8,
        dropout_rate: float = 0.0,
        sdpa: bool = False,
    ) -> None:
        super().__init__()
        from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock

        self.img_size = _triple(img_size, "img_size")
        self.patch_size = _triple(patch_size, "patch_size")
        bad = [(s, p) for s, p in zip(self.img_size, self.patch_size) if s % p]
        if bad:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {self.patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if sdpa and dropout_rate > 0:
            raise ValueError("sdpa=True needs dropout_rate=0: MONAI's SDPA path drops attention weights in eval mode too")
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.grid = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.patch_embedding = PatchEmbeddingBlock(
            in_channels=in_channels, img_size=self.img_size, patch_size=self.patch_size, hidden_size=hidden_size,
            num_heads=num_heads, proj_type="conv", dropout_rate=dropout_rate, spatial_dims=3,
        )
        self.blocks = nn.ModuleList(
            [
                TransformerBlock(
                    hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias=False, use_flash_attention=bool(sdpa)
                )
                for _ in range(num_layers)
            ]
        )
        self.norm = nn.LayerNorm(hidden_size)

    def stages(self) -> list[str]:
        """Submodule prefixes in input-to-output order; the final norm belongs to the last block."""
        return ["patch_embedding"] + [f"blocks.{i}" for i in range(len(self.blocks))]

    def stage_modules(self, stage: str) -> list[nn.Module]:
        if stage == "patch_embedding":
            return [self.patch_embedding]
        i = int(stage.split(".")[1])
        return [self.blocks[i]] + ([self.norm] if i == len(self.blocks) - 1 else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) at ``img_size`` -> tokens (B, N, hidden), N = prod(img_size / patch)."""
        _check_input(x, self.in_channels, "ViTEncoder")
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"ViTEncoder was built for img_size {self.img_size}, got {tuple(x.shape[2:])}")
        x = self.patch_embedding(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, hidden) -> feature map (B, hidden, X/p, Y/p, Z/p)."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], self.hidden_size, *self.grid)


class ViTAutoEnc(nn.Module):
    """:class:`ViTEncoder` + two transposed convolutions without skips (P2, 3.1; MONAI ``ViTAutoEnc``).

    Each transposed convolution upsamples by the square root of the patch size (16 -> 4 x 4).

    Args:
        img_size, patch_size, in_channels, hidden_size, mlp_dim, num_layers, num_heads, dropout_rate, sdpa:
            of the :class:`ViTEncoder`.
        deconv_chns: channels between the two transposed convolutions.
    """

    def __init__(
        self,
        *,
        img_size: Sequence[int],
        patch_size: int | Sequence[int] = 16,
        in_channels: int = 1,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 8,
        num_heads: int = 8,
        dropout_rate: float = 0.0,
        deconv_chns: int = 16,
        sdpa: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = ViTEncoder(
            img_size=img_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads, dropout_rate=dropout_rate, sdpa=sdpa,
        )
        up = []
        for p in self.encoder.patch_size:
            r = math.isqrt(p)
            if r * r != p:
                raise ValueError(f"patch_size must be square numbers (the decoder upsamples by the root twice), got {p}")
            up.append(r)
        self.decoder = nn.Sequential(
            PatchUpsample3d(hidden_size, deconv_chns, up),
            PatchUpsample3d(deconv_chns, in_channels, up),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) at ``img_size`` -> reconstruction of the same shape."""
        return self.decoder(self.encoder.to_grid(self.encoder(x)))
