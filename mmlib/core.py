"""Device, precision, seeding, profiles, logging and progress bars.

One way to do each of these, shared by every pipeline:

- :func:`select_device` turns ``"auto"``/``"cpu"``/``"cuda"``/``"cuda:1"`` into a
  :class:`torch.device`, with a clear error when the request cannot be met.
- :func:`autocast_dtype` and :func:`autocast` decide whether mixed precision is used
  (bf16 where the hardware runs it natively; see ``benchmarks/bench_precision.py``).
- :func:`seed_everything` is the single seeding/determinism switch.
- :class:`Profile` and :class:`ProfileSet` hold the ``smoke``/``quick``/``full`` sizes each
  pipeline defines, with overrides checked against the dataclass fields.
- :func:`get_logger` and :func:`progress` give uniform logging and ``tqdm`` bars.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import os
import random
from collections.abc import Iterable, Iterator, Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that need it: the cohort generators use this module
# (profiles, logging, progress bars) in worker processes that never touch torch, and importing
# it costs seconds and hundreds of MB per process.

__all__ = [
    "PROFILE_NAMES",
    "Profile",
    "ProfileSet",
    "autocast",
    "autocast_dtype",
    "cpu_supports_bf16",
    "get_logger",
    "positive_int",
    "progress",
    "seed_everything",
    "select_device",
]

PROFILE_NAMES = ("smoke", "quick", "full")


def positive_int(value: object) -> int | None:
    """``value`` as an int if it is an integer >= 1 (any type with ``__index__``, bool excluded), else None,
    so the caller can raise an error that names the argument."""
    if isinstance(value, bool):
        return None
    try:
        n = operator.index(value)
    except TypeError:
        return None
    return n if n >= 1 else None


# --------------------------------------------------------------------------- device


def select_device(device: str | torch.device = "auto") -> torch.device:
    """Resolve a device request.

    Args:
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or
            ``"cuda:N"``, or a :class:`torch.device`.

    Returns:
        The :class:`torch.device` to use.

    Raises:
        ValueError: if the request is malformed or names a GPU this machine does not have.
    """
    import torch

    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"device must be a string such as 'auto', 'cpu' or 'cuda', got {device!r}")
    request = device.strip().lower()
    if request == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(request)
    except RuntimeError as err:
        raise ValueError(f"device {device!r} is not a valid torch device: {err}") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} was requested but CUDA is not available on this machine; "
                "use device='auto' or 'cpu'"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {device!r} was requested but only {count} CUDA device(s) exist")
        return resolved
    raise ValueError(f"device {device!r} is not supported: use 'auto', 'cpu' or 'cuda[:N]'")


def device_name(device: torch.device) -> str:
    """A human-readable name of the hardware behind ``device`` (GPU model or CPU model)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


@lru_cache(maxsize=1)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_supports_bf16() -> bool:
    """True if the CPU executes bf16 natively (AVX512-BF16 or AMX-BF16).

    Without these instructions bf16 is emulated and slower than fp32, so autocast is
    not worth it.
    """
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


# --------------------------------------------------------------------------- precision


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype to autocast to on ``device``, or ``None`` for plain fp32.

    Args:
        device: where the model runs.
        precision: ``"auto"`` (bf16 where the hardware runs it natively: a CUDA GPU that
            supports bf16, or a CPU with AVX512-BF16/AMX), ``"bf16"`` (force it) or
            ``"fp32"`` (no autocast).

    On the development CPU (AVX512-BF16, 2 threads) ``benchmarks/bench_precision.py`` measured
    bf16 autocast 1.4x-3.9x faster than fp32 for matmuls, 3D convolutions and a training step.
    """
    import torch

    precision = precision.lower()
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else None
    return None


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """A context manager for mixed precision on ``device`` (a no-op for fp32)."""
    import torch

    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- seeding


def seed_everything(seed: int, *, deterministic: bool = True) -> np.random.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA) and make kernels deterministic.

    Args:
        seed: a non-negative integer.
        deterministic: ask torch for deterministic algorithms (warn-only, since a few CUDA
            kernels have no deterministic version) and turn off cuDNN autotuning.

    Returns:
        A fresh :class:`numpy.random.Generator` seeded with ``seed``, for code that
        prefers an explicit generator over global state.
    """
    import torch

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        # cuBLAS needs this to be deterministic; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- profiles


@dataclasses.dataclass(frozen=True)
class Profile:
    """Base class of a pipeline's run sizes.

    Each pipeline subclasses this with its own fields (subjects, epochs, widths, ...) and
    defines three instances in a :class:`ProfileSet`:

    - ``smoke``: tiny sizes and a couple of steps; proves the notebook runs (inside ``make test``).
    - ``quick``: the ``make reproduce`` default; minutes on a laptop CPU, large enough that
      planted effects are recovered.
    - ``full``: the paper's sizes, for a GPU.
    """

    name: str = "quick"

    def replace(self, **overrides: Any) -> Profile:
        """A copy with some fields changed; unknown field names raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"{type(self).__name__} has no field(s) {unknown}; known fields: {sorted(known)}"
            )
        return dataclasses.replace(self, **overrides)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


P = TypeVar("P", bound=Profile)


class ProfileSet(Mapping[str, P]):
    """The ``smoke``/``quick``/``full`` profiles of one pipeline.

    Example::

        PROFILES = ProfileSet(smoke=MyProfile(name="smoke", epochs=1), quick=..., full=...)
        prof = PROFILES.get_profile("quick", epochs=3)
    """

    def __init__(self, **profiles: P) -> None:
        missing = [n for n in PROFILE_NAMES if n not in profiles]
        if missing:
            raise ValueError(f"a ProfileSet needs the profiles {list(PROFILE_NAMES)}; missing {missing}")
        kinds = {type(p) for p in profiles.values()}
        if len(kinds) != 1:
            raise ValueError(f"all profiles of a set must share one class, got {sorted(k.__name__ for k in kinds)}")
        for key, prof in profiles.items():
            if prof.name != key:
                raise ValueError(f"profile registered as {key!r} is named {prof.name!r}")
        self._profiles = dict(profiles)

    def __getitem__(self, name: str) -> P:
        return self._profiles[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._profiles)

    def __len__(self) -> int:
        return len(self._profiles)

    def get_profile(self, name: str, **overrides: Any) -> P:
        """The profile called ``name``, with ``overrides`` applied (each checked by name)."""
        if name not in self._profiles:
            raise ValueError(f"unknown profile {name!r}; choose one of {sorted(self._profiles)}")
        prof = self._profiles[name]
        return prof.replace(**overrides) if overrides else prof


# --------------------------------------------------------------------------- logging


_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def get_logger(name: str = "mmlib") -> logging.Logger:
    """A logger under the ``mmlib`` hierarchy, printing timestamped lines to stderr once."""
    root = logging.getLogger("mmlib")
    if not any(getattr(h, "_mmlib", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler._mmlib = True  # type: ignore[attr-defined]  # marks the one handler we add
        handler.setFormatter(logging.Formatter(_LOG_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("MMLIB_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    if name != "mmlib" and not name.startswith("mmlib."):
        name = f"mmlib.{name}"
    return logging.getLogger(name)


# --------------------------------------------------------------------------- progress

T = TypeVar("T")


def progress(iterable: Iterable[T], *, desc: str | None = None, total: int | None = None, **kwargs: Any) -> Iterable[T]:
    """Wrap a loop that takes more than a few seconds in a ``tqdm.auto`` progress bar.

    Bars update at most every 2 s (so executed notebooks do not fill with redraws) and are
    switched off with ``MMLIB_PROGRESS=0``.
    """
    from tqdm.auto import tqdm  # its ipywidgets advice is filtered once, on import of mmlib

    disable = kwargs.pop("disable", False) or os.environ.get("MMLIB_PROGRESS", "1") == "0"
    kwargs.setdefault("mininterval", 2.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, desc=desc, total=total, disable=disable, **kwargs)
