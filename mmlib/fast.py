"""The fast training path: building blocks that make 3D pretraining cheaper without changing the math.

P2 pretrains two 3D autoencoders for 300 epochs at 224x224x320 (about four GPU days in the
paper). The plain loop of MONAI's tutorials spends that time on three avoidable costs: it
decodes and resamples every NIfTI volume again each epoch on the CPU, it runs every layer in
fp32, and it leaves the fused kernels of PyTorch unused. Each block below removes one of these
costs, each is safe on a CPU (it falls back to the plain behaviour where the hardware lacks the
feature), and none changes parameters or ``state_dict`` keys, so checkpoints stay
interchangeable with the plain path:

- :func:`channels_last` / :func:`to_channels_last`: ``torch.channels_last_3d`` memory format
  for Conv3d models and their inputs (oneDNN and cuDNN convolution kernels prefer it, above all
  under bf16 autocast).
- :func:`adamw`: ``torch.optim.AdamW`` with the fused kernel where the parameters' device has
  one, else the multi-tensor (``foreach``) kernel.
- :func:`maybe_compile`: optional ``torch.compile`` (off by default), with a clear fallback.
- :func:`set_sdpa`: ``scaled_dot_product_attention`` in MONAI's attention blocks.
- :func:`fp32_thin_convs`: convolutions that read a single channel stay in fp32 under CPU bf16
  autocast, where oneDNN's bf16 kernels for them are several times slower.
- :class:`VolumeCache` + :class:`Augment`: volumes decoded once, kept compact (fp16, or uint8
  with a per-volume scale) on the training device, batched and augmented there with torch ops.
- :class:`FastPath`: the switches together; :meth:`FastPath.for_device` turns on what the
  hardware supports, :meth:`FastPath.plain` is the tutorial loop's settings.

``benchmarks/bench_p2_pretrain.py`` measures the path against the plain loop for both P2
autoencoders; ``tests/test_fast.py`` checks that it trains the same model (same loss curve
within bf16 tolerance).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from mmlib import core

__all__ = [
    "Augment",
    "FastPath",
    "VolumeCache",
    "adamw",
    "channels_last",
    "fp32_thin_convs",
    "fused_adamw_supported",
    "maybe_compile",
    "set_sdpa",
    "to_channels_last",
]

_CONV3D = (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, nn.MaxPool3d, nn.AvgPool3d)


# --------------------------------------------------------------------------- memory format


def channels_last(model: nn.Module) -> nn.Module:
    """Convert ``model``'s 5-D parameters and buffers to ``torch.channels_last_3d`` (in place; returns it).

    Why: the convolution kernels of oneDNN (CPU) and cuDNN (GPU) work on channels-last
    (N, X, Y, Z, C) data; a channels-first model pays a layout conversion around every
    convolution, forward and backward. When it helps: ResNet-style Conv3d networks, most under
    bf16 autocast (the P2 quick ResNetAutoEnc step, batch 4, on a 1-thread AMD EPYC: bf16 0.136 s ->
    bf16 + channels-last 0.117 s). A model without Conv3d layers (the ViT's transformer blocks) is
    returned unchanged apart from its 5-D conv weights. Feed it :func:`to_channels_last`
    inputs. Values, parameter identities and ``state_dict`` keys do not change; checkpoint code
    that needs contiguous tensors must call ``.contiguous()`` (:mod:`mmlib.train` does).
    """
    if any(isinstance(m, _CONV3D) for m in model.modules()):
        model.to(memory_format=torch.channels_last_3d)
    return model


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A 5-D batch (B, C, X, Y, Z) in ``channels_last_3d`` layout (other tensors pass through)."""
    if torch.is_tensor(x) and x.ndim == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


# --------------------------------------------------------------------------- optimiser


def _param_tensors(params: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for p in params:
        if isinstance(p, dict):
            out += list(p["params"]) if not torch.is_tensor(p["params"]) else [p["params"]]
        else:
            out.append(p)
    return out


def fused_adamw_supported(params: Iterable[torch.Tensor]) -> bool:
    """True if torch has a fused AdamW kernel for every tensor of ``params`` (device and dtype).

    CUDA has had one since torch 2.0 and the CPU since torch 2.4 (checked here, not assumed:
    torch lists the devices in ``torch.optim.optimizer._get_fused_kernels_supported_devices``).
    """
    params = list(params)
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except (ImportError, AttributeError):  # older or newer torch without the helper
        devices = {"cuda"}
    return bool(params) and all(p.device.type in devices and p.is_floating_point() for p in params)


def adamw(params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 1e-2, *,
          fused: bool | str = "auto", **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with the fastest update kernel the parameters' device has.

    Why: the default (on a CPU) updates parameter by parameter in Python; the multi-tensor
    ``foreach`` kernel updates all at once, and the fused kernel does the whole Adam update in
    one pass over memory. When it helps: models with many parameter tensors (ResNet34: ~110)
    or many parameters (ViT-B: 90 M), above all on a GPU; on P2's quick sizes the update is a
    few ms of a ~0.1 s step. The maths is AdamW's either way (same parameters after a few steps
    within 1e-6, ``tests/test_fast.py``).

    Args:
        params: parameters or parameter-group dicts, as for ``torch.optim.AdamW``. Place them
            on their training device first: the kernel is chosen from their device.
        lr, weight_decay: AdamW's (torch's defaults).
        fused: ``"auto"`` (fused where :func:`fused_adamw_supported`, else ``foreach``), ``True``
            (fused, error where unsupported) or ``False`` (``foreach``).
        kwargs: further ``torch.optim.AdamW`` arguments (betas, eps, ...).
    """
    params = list(params)
    if fused == "auto":
        fused = fused_adamw_supported(_param_tensors(params))
    elif not isinstance(fused, bool):
        raise ValueError(f"fused must be 'auto', True or False, got {fused!r}")
    if fused:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True, **kwargs)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True, **kwargs)


# --------------------------------------------------------------------------- compile / attention


def maybe_compile(model: nn.Module, enabled: bool = False, *, example: Any = None, **options: Any) -> nn.Module:
    """``model.compile(**options)`` when ``enabled`` (off by default); returns ``model``.

    Why: TorchInductor fuses the elementwise tails of convolutions and attention (BatchNorm,
    ReLU, residual adds, LayerNorm, GELU) into generated kernels, which saves memory traffic on
    a GPU. When it helps: long runs on a GPU (the paper's 300 epochs), where the compilation
    (tens of seconds to minutes) is paid back; rarely on a CPU or for a short run, hence off.
    The in-place ``nn.Module.compile`` keeps ``state_dict`` keys (``torch.compile(model)``
    would prefix them with ``_orig_mod.``).

    Compilation is lazy: errors (no C++ compiler, an unsupported op) appear at the first call.
    Pass ``example`` (a batch, or a tuple of positional inputs) to compile now: a failure is
    then reported with a warning that names the error and the model is returned eager.
    """
    if not enabled:
        return model
    try:
        model.compile(**options)
        if example is not None:
            args = example if isinstance(example, tuple) else (example,)
            with torch.no_grad():
                model(*args)
    except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
        if hasattr(model, "_compiled_call_impl"):
            model._compiled_call_impl = None  # undo nn.Module.compile
        warnings.warn(f"torch.compile failed for {type(model).__name__} ({type(e).__name__}: {str(e)[:300]}); "
                      "training the eager model instead", RuntimeWarning, stacklevel=2)
    return model


def set_sdpa(model: nn.Module, enabled: bool = True) -> int:
    """Switch MONAI's attention blocks (``SABlock``) in ``model`` to (or from) ``scaled_dot_product_attention``.

    Why: SDPA runs flash / memory-efficient attention kernels that never materialise the
    (B, heads, N, N) attention matrix: at the paper's 224x224x320 with 16^3 patches that is
    3,920 tokens, ~0.5 GB per layer in fp32 that the plain einsum path stores for backward.
    When it helps: long token sequences (paper size, any GPU); at P2's quick size (96 tokens)
    it is neutral. Same parameters, same outputs up to float rounding (1e-5 in fp32). Blocks
    that keep their attention matrix (``save_attn``) or use attention dropout are refused (MONAI
    applies SDPA dropout in eval mode too). Returns the number of blocks switched.
    """
    from monai.networks.blocks.selfattention import SABlock

    blocks = [m for m in model.modules() if isinstance(m, SABlock)]
    if enabled:
        for b in blocks:
            if getattr(b, "save_attn", False):
                raise ValueError("an attention block keeps its attention matrix (save_attn=True); SDPA cannot")
            if getattr(b, "dropout_rate", 0.0) > 0:
                raise ValueError("SDPA with attention dropout would also drop in eval mode (MONAI); use dropout_rate=0")
            if getattr(b, "rel_positional_embedding", None) is not None:
                raise ValueError("MONAI's SDPA path has no relative position embedding")
    for b in blocks:
        b.use_flash_attention = bool(enabled)
    return len(blocks)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _fp32_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return type(self).forward(self, x.float(), *args, **kwargs)
    return type(self).forward(self, x, *args, **kwargs)


def fp32_thin_convs(model: nn.Module, max_in_channels: int = 1, enabled: bool = True) -> int:
    """Run ``model``'s thin convolutions (at most ``max_in_channels`` input channels) in fp32 even
    under autocast (in place); ``enabled=False`` undoes it. Returns how many convolutions are (or
    were) switched.

    Why: a 3D network's first layer reads a one-channel volume (ResNet stem, ViT patch
    embedding). On a CPU with AMX (Intel Xeon, torch 2.13) oneDNN's bf16 kernels for a
    one-channel input are far slower than fp32: a 1 -> 64 Conv3d k7 s2 forward took 230 ms in
    bf16 vs 60 ms in fp32 (2 threads, ``benchmarks/bench_precision.py``); a 1 -> 32 k4 s4 patch
    embedding, forward and backward, 2.4 vs 0.8 ms; the quick ViTAutoEnc's convolution backward
    263 vs 32 ms per step, which made its whole bf16 step slower than fp32. From two input
    channels up bf16 wins (1.35x at 2, 2.1x at 16; 1 thread, 3x3x3 on 2x32x32x48), and a conv
    that *writes* one channel is fast in bf16 too. The first layer holds a tiny share of the
    FLOPs, so fp32 there costs little wherever bf16 is fast. The module keeps its parameters and ``state_dict`` keys; only its
    ``forward`` is wrapped (autocast off, input cast to fp32; the output is fp32 and the next
    layer's autocast casts it again).
    """
    n = 0
    for m in model.modules():
        if not isinstance(m, _CONVS) or m.in_channels > max_in_channels:
            continue
        n += 1
        if enabled:
            m.forward = _fp32_forward.__get__(m)  # an instance attribute: keys and parameters untouched
        else:
            m.__dict__.pop("forward", None)
    return n


# --------------------------------------------------------------------------- volume cache


@dataclasses.dataclass(frozen=True)
class Augment:
    """Batched on-device augmentation: random flips and an intensity scale/shift, per sample.

    Drawn from a torch ``Generator`` seeded by ``(seed, epoch)`` (on the CPU, so the draws do not
    depend on the device), applied to the whole batch at once with ``torch.where`` / ``flip``:
    no per-sample CPU transform.

    Args:
        flip_prob: probability of flipping each sample along each of ``flip_axes``.
        flip_axes: spatial axes (0 = X, 1 = Y, 2 = Z) that may be flipped.
        scale: intensities are multiplied by ``1 + U(-scale, scale)`` (per sample).
        shift: then ``U(-shift, shift)`` is added (per sample).
        seed: base seed; the epoch's draws depend on ``(seed, epoch)`` only.
    """

    flip_prob: float = 0.5
    flip_axes: tuple[int, ...] = (0, 1, 2)
    scale: float = 0.1
    shift: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.flip_prob <= 1 or self.scale < 0 or self.shift < 0:
            raise ValueError(f"invalid augmentation settings: {self}")
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise ValueError(f"flip_axes are spatial axes 0, 1, 2, got {self.flip_axes}")

    def generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(epoch) * 7919 + 17)

    def draw(self, g: torch.Generator, n: int) -> dict[str, torch.Tensor]:
        """Per-sample draws for ``n`` samples: ``flip`` (n, len(flip_axes)) bool, ``scale``, ``shift`` (n,)."""
        flip = torch.rand(n, len(self.flip_axes), generator=g) < self.flip_prob
        scale = 1 + (torch.rand(n, generator=g) * 2 - 1) * self.scale
        shift = (torch.rand(n, generator=g) * 2 - 1) * self.shift
        return {"flip": flip, "scale": scale, "shift": shift}

    def apply(self, x: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        """Apply ``draws`` to a batch (B, C, X, Y, Z) on its device."""
        b = x.shape[0]
        view = (b,) + (1,) * (x.ndim - 1)
        flip_cpu = draws["flip"].cpu()
        flip = flip_cpu.to(x.device)
        for j, axis in enumerate(self.flip_axes):
            if bool(flip_cpu[:, j].any()):  # decided on the CPU copy: no device sync
                x = torch.where(flip[:, j].view(view), x.flip(axis + 2), x)
        if self.scale or self.shift:
            x = x * draws["scale"].to(x.device, x.dtype).view(view) + draws["shift"].to(x.device, x.dtype).view(view)
        return x


class VolumeCache:
    """Volumes decoded once and kept compactly on a chosen device, served as float batches.

    Why: the plain loop decodes every NIfTI (gunzip, reorientation, resampling, intensity
    window) again each epoch on the CPU, per sample; P2's volumes do not change between epochs
    (the randomness is in the augmentation and the corruption, done on batches). Storage:

    - ``"fp16"``: 2 bytes a voxel, relative error <= 2^-11 (about 5e-4 for values in [0, 1]);
    - ``"uint8"``: 1 byte a voxel, each volume mapped linearly from its own [min, max] to
      0..255: absolute error <= (max - min) / 510. Good for [0, 1]-windowed CT, whose contrast
      is far coarser than 1/255 of the window;
    - ``"fp32"``: exact.

    When it helps: whenever decoding is a visible part of the step (P2 quick on a CPU), and on a
    GPU, where the cache lives in GPU memory so batches never cross PCIe. Sizes: P2 quick pool
    (491 x 64x64x96) is 0.4 GB in fp16; the paper's pool (491 x 224x224x320) is 15.8 GB in
    uint8, 31.5 GB in fp16: it fits on an H100/H200, or use ``device="cpu"`` and pinned
    transfers.

    Args:
        volumes: a (N, C, X, Y, Z) tensor / array, or a sequence of (C, X, Y, Z) ones.
        device: where the cache lives and batches are made.
        storage: ``"fp16"``, ``"uint8"`` or ``"fp32"``.
        dtype: dtype of the batches (float32).
    """

    STORAGE: ClassVar[dict[str, torch.dtype]] = {"fp16": torch.float16, "uint8": torch.uint8, "fp32": torch.float32}

    def __init__(self, volumes: Any, *, device: torch.device | str = "cpu", storage: str = "fp16",
                 dtype: torch.dtype = torch.float32) -> None:
        if storage not in self.STORAGE:
            raise ValueError(f"storage must be one of {sorted(self.STORAGE)}, got {storage!r}")
        self.device = torch.device(device)
        self.storage = storage
        self.dtype = dtype
        vols = [torch.as_tensor(v) for v in volumes]  # a (N, ...) tensor / array iterates over its volumes
        if not vols:
            raise ValueError("VolumeCache needs at least one volume")
        shape = tuple(vols[0].shape)
        if len(shape) != 4 or any(tuple(v.shape) != shape for v in vols):
            raise ValueError(f"volumes must all be (C, X, Y, Z) of one shape, got {[tuple(v.shape) for v in vols[:4]]}...")
        n = len(vols)
        self.data = torch.empty((n, *shape), dtype=self.STORAGE[storage], device=self.device)
        self.offset = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.scale = torch.ones(n, dtype=torch.float32, device=self.device)
        for i, v in enumerate(vols):
            v = v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v
            v = v.detach().to(self.device, torch.float32)
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"volume {i} has non-finite values")
            if storage == "uint8":
                lo, hi = float(v.min()), float(v.max())
                step = (hi - lo) / 255 if hi > lo else 1.0
                self.offset[i], self.scale[i] = lo, step
                self.data[i] = torch.round((v - lo) / step).clamp_(0, 255).to(torch.uint8)
            else:
                self.data[i] = v.to(self.data.dtype)

    @classmethod
    def decode(cls, items: Iterable[Any], key: str = "image", **kwargs: Any) -> VolumeCache:
        """Build the cache from decoded items: a MONAI dataset / DataLoader of dicts (``item[key]``) or of
        tensors. Batched items (B, C, X, Y, Z) are split; MONAI ``MetaTensor`` become plain tensors."""
        vols: list[torch.Tensor] = []
        for item in items:
            t = torch.as_tensor(item[key] if isinstance(item, dict) else item).as_subclass(torch.Tensor)
            vols += list(t) if t.ndim == 5 else [t]
        return cls(vols, **kwargs)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def max_error(self) -> float:
        """The largest round-trip error the storage allows for the cached values (0 for fp32)."""
        if self.storage == "uint8":
            return float(self.scale.max()) / 2
        if self.storage == "fp16":
            return float(self.get(range(len(self))).abs().max()) * 2.0**-11
        return 0.0

    def get(self, idx: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Volumes ``idx`` as a float batch (B, C, X, Y, Z) on the cache's device."""
        i = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=self.device)
        x = self.data.index_select(0, i).to(self.dtype)
        if self.storage == "uint8":
            view = (len(i),) + (1,) * (x.ndim - 1)
            x = x * self.scale[i].to(self.dtype).view(view) + self.offset[i].to(self.dtype).view(view)
        return x

    def batches(self, idx: Sequence[int] | np.ndarray, batch_size: int, shuffle_seed: int | None = None, *,
                augment: Augment | None = None, epoch: int = 0, memory_format: torch.memory_format | None = None,
                ) -> Iterator[torch.Tensor]:
        """Float batches of the volumes ``idx`` on the cache's device.

        The order is :func:`mmlib.train.index_batches`'s (the same chunks as
        :meth:`mmlib.pipelines.p2.P2Data.batches` for the same ``shuffle_seed``). With ``augment``,
        each batch is augmented on the device with draws from ``augment.generator(epoch)``, so an
        epoch's batches depend on ``(shuffle_seed, augment.seed, epoch)`` only.
        """
        from mmlib.train import index_batches

        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        g = augment.generator(epoch) if augment is not None else None
        for chunk in index_batches(np.asarray(idx), batch_size, shuffle_seed=shuffle_seed):
            x = self.get(chunk)
            if augment is not None:
                x = augment.apply(x, augment.draw(g, x.shape[0]))
            if memory_format is not None:
                x = x.contiguous(memory_format=memory_format)
            yield x


# --------------------------------------------------------------------------- the switches together


@dataclasses.dataclass(frozen=True)
class FastPath:
    """Which fast-path options a training run uses.

    Attributes:
        precision: ``"auto"`` (bf16 autocast where :func:`mmlib.core.autocast_dtype` says the
            hardware runs it natively), ``"bf16"`` or ``"fp32"``.
        channels_last: :func:`channels_last` model and inputs.
        fused: :func:`adamw` with the fused kernel where supported (``foreach`` otherwise); off =
            torch's default AdamW.
        compile: :func:`maybe_compile`.
        sdpa: :func:`set_sdpa` in MONAI attention blocks, except when the model runs on a CPU under
            bf16 autocast: there the blocks keep MONAI's einsum attention. torch 2.13's CPU
            flash-attention kernel is slow in bf16: forward + backward of 4 x 8 heads x 96 tokens x
            16 took 5.4 ms in bf16 vs 0.9 ms in fp32 and 1.0 ms for einsum attention in bf16; at
            960 tokens x 96, 23 ms vs 43 ms (fp32) and 16 ms (einsum, bf16); 2 threads, Intel Xeon
            with AMX. It made the quick ViTAutoEnc's bf16 step 0.095 s against 0.062 s with einsum
            attention. The price is memory: einsum stores each layer's (B, heads, N, N) attention
            matrix for backward.
        thin_convs_fp32: :func:`fp32_thin_convs` when the model runs on a CPU under bf16 (on a
            GPU the bf16 kernels for thin convolutions are not slow).
    """

    precision: str = "auto"
    channels_last: bool = True
    fused: bool = True
    compile: bool = False
    sdpa: bool = True
    thin_convs_fp32: bool = True

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")

    @classmethod
    def for_device(cls, device: torch.device | str) -> FastPath:
        """Every option the hardware supports on: bf16 autocast only where
        :func:`mmlib.core.autocast_dtype` picks it (CUDA with bf16; a CPU with AVX512-BF16/AMX),
        channels-last on CPU and CUDA (oneDNN / cuDNN), fused AdamW where torch has the kernel,
        SDPA (where :meth:`prepare` finds its kernels fast: not under CPU bf16); ``torch.compile``
        stays off (opt in)."""
        device = torch.device(device)
        bf16 = core.autocast_dtype(device, "auto") is not None
        return cls(
            precision="bf16" if bf16 else "fp32",
            channels_last=device.type in ("cpu", "cuda"),
            fused=fused_adamw_supported([torch.empty(0, device=device)]),
            compile=False,
            sdpa=True,
        )

    @classmethod
    def plain(cls) -> FastPath:
        """The tutorial loop: fp32, channels-first, torch's default AdamW, eager, einsum attention."""
        return cls(precision="fp32", channels_last=False, fused=False, compile=False, sdpa=False,
                   thin_convs_fp32=False)

    def autocast(self, device: torch.device | str) -> contextlib.AbstractContextManager:
        """The autocast context of :attr:`precision` on ``device`` (a no-op for fp32)."""
        return core.autocast(torch.device(device), self.precision)

    def prepare(self, model: nn.Module, device: torch.device | str, *, example: Any = None) -> nn.Module:
        """Move ``model`` to ``device`` and apply the layout / attention / compile options (in place)."""
        model.to(device)
        device = torch.device(device)
        cpu_bf16 = device.type == "cpu" and core.autocast_dtype(device, self.precision) is not None
        if self.sdpa:
            set_sdpa(model, not cpu_bf16)
        if self.channels_last:
            channels_last(model)
        if self.thin_convs_fp32 and cpu_bf16:
            fp32_thin_convs(model)
        if example is not None and self.channels_last:
            example = to_channels_last(example)
        return maybe_compile(model, self.compile, example=example)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A batch in the layout the prepared model wants."""
        return to_channels_last(x) if self.channels_last else x

    def optimizer(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 1e-2,
                  **kwargs: Any) -> torch.optim.AdamW:
        """:func:`adamw` (fused where supported) or, with ``fused=False``, torch's default AdamW."""
        if self.fused:
            return adamw(params, lr, weight_decay, fused="auto", **kwargs)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)
