"""The one writer of tables, figures and ``run.json``.

A notebook opens a :class:`Run` on its ``out_dir`` and saves everything through it::

    run = results.Run(out_dir, notebook="p2_...", title="...", params=params,
                      seed=seed, device=dev, profile=prof)
    with run.stage("pretrain"):
        ...
    run.table(df, "table2_auc", caption="...")
    run.figure(fig, "fig3_trainable_params", caption="...")
    run.paper_vs_run(rows)          # the table results/index.html shows first
    run.finish()

Layout written under ``out_dir``::

    tables/<name>.csv   tables/<name>.md
    figures/<name>.png  figures/<name>.svg
    run.json            (git commit, versions, parameters, seed, device, wall time per stage,
                         and the list of artifacts with their captions)

Every file is written to a temporary name and renamed, so a crash never leaves half a file.
Tables are written with fixed formatting so two runs with the same seed give identical bytes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "PAPER_VS_RUN", "Run", "atomic_write_bytes", "atomic_write_text", "environment_info", "environment_table", "git_commit",
]

#: Name of the table that compares a paper's reported numbers with this run.
PAPER_VS_RUN = "paper_vs_run"
PAPER_VS_RUN_COLUMNS = ("quantity", "paper reported", "this run", "held on this data")

#: Packages whose versions every run.json records.
RECORDED_PACKAGES = (
    "mmlib", "torch", "monai", "numpy", "pandas", "scipy", "scikit-learn", "scikit-survival",
    "nibabel", "captum", "umap-learn", "matplotlib", "seaborn", "papermill", "jupytext", "safetensors",
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------- provenance


def git_commit(repo: str | os.PathLike | None = None) -> dict[str, Any]:
    """The commit of the checkout holding ``repo`` (default: this package) and whether it is dirty."""
    where = Path(repo) if repo is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=where, capture_output=True, text=True, check=True, timeout=10,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": sha, "dirty": dirty}


def package_versions(names: Sequence[str] = RECORDED_PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def environment_info(device: Any = None) -> dict[str, Any]:
    """Python, platform, package versions and (if given) the device and its hardware."""
    import torch

    from mmlib import core

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": core.device_name(torch.device("cpu")),
        "cpu_bf16": core.cpu_supports_bf16(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "packages": package_versions(),
    }
    if device is not None:
        dev = torch.device(device)
        info["device"] = str(dev)
        info["device_name"] = core.device_name(dev)
        dtype = core.autocast_dtype(dev)
        info["autocast"] = str(dtype).replace("torch.", "") if dtype is not None else "fp32"
    return info


def environment_table(device: Any) -> pd.DataFrame:
    """:func:`environment_info` as a two-column table (``item``, ``value``) for a notebook to show."""
    env = environment_info(device)
    rows = [
        ("device", f"{env['device']} ({env['device_name']})"),
        ("autocast", env["autocast"]),
        ("CPU bf16 instructions", env["cpu_bf16"]),
        ("torch threads", env["torch_threads"]),
        ("python", env["python"]),
        *env["packages"].items(),
    ]
    return pd.DataFrame([(k, str(v)) for k, v in rows], columns=["item", "value"])


def _jsonable(obj: Any) -> Any:
    """Turn dataclasses, numpy scalars, paths and devices into plain JSON values."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


# --------------------------------------------------------------------------- tables


def _format_table(df: pd.DataFrame, float_digits: int) -> pd.DataFrame:
    """Round floats to ``float_digits`` significant digits so bytes do not depend on noise below that."""
    out = df.copy()
    for col in out.columns:
        if pd.api.types.is_float_dtype(out[col]):
            out[col] = out[col].map(lambda v: v if pd.isna(v) else float(f"{v:.{float_digits}g}"))
    return out


def _markdown(df: pd.DataFrame, caption: str | None) -> str:
    body = df.to_markdown(index=False, floatfmt="g")
    return (f"{caption}\n\n{body}\n" if caption else f"{body}\n")


# --------------------------------------------------------------------------- the run


class Run:
    """Everything one notebook execution saves, under ``out_dir``.

    Args:
        out_dir: folder of this notebook's results (``results/<notebook>``); created if needed.
        notebook: the notebook's name (``"00_overview"``).
        title: a one-line title shown in ``results/index.html``.
        params: the notebook's parameters as run (profile name, seed, device, paths, ...).
        seed: the seed used.
        device: the :class:`torch.device` used.
        profile: the resolved :class:`mmlib.core.Profile`; its fields are recorded.
        float_digits: significant digits kept in saved tables.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        notebook: str,
        title: str = "",
        params: Mapping[str, Any] | None = None,
        seed: int | None = None,
        device: Any = None,
        profile: Any = None,
        float_digits: int = 6,
    ) -> None:
        if not _NAME_RE.match(notebook):
            raise ValueError(f"notebook name {notebook!r} must be letters, digits, '_', '-' or '.'")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.notebook = notebook
        self.float_digits = float_digits
        self._t0 = time.perf_counter()
        self._stages: dict[str, float] = {}
        self._artifacts: list[dict[str, Any]] = []
        self._record: dict[str, Any] = {
            "notebook": notebook,
            "title": title,
            "status": "running",
            "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "git": git_commit(),
            "params": _jsonable(dict(params or {})),
            "seed": seed,
            "profile": _jsonable(profile) if profile is not None else None,
            "environment": environment_info(device),
        }
        self._write_record()

    # ---------------------------------------------------------------- timing

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage of the pipeline; its wall time lands in ``run.json`` (summed if repeated)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._stages[name] = self._stages.get(name, 0.0) + time.perf_counter() - start
            self._write_record()

    # ---------------------------------------------------------------- artifacts

    def _check_name(self, name: str) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"artifact name {name!r} must be letters, digits, '_', '-' or '.' (no folders)")

    def _register(self, kind: str, name: str, files: list[Path], caption: str | None) -> None:
        self._artifacts = [a for a in self._artifacts if not (a["kind"] == kind and a["name"] == name)]
        self._artifacts.append({
            "kind": kind,
            "name": name,
            "caption": caption or "",
            "files": [str(f.relative_to(self.out_dir)) for f in files],
        })
        self._write_record()

    def table(self, df: pd.DataFrame, name: str, *, caption: str | None = None, index: bool = False) -> Path:
        """Save ``df`` as ``tables/<name>.csv`` and a Markdown copy ``tables/<name>.md``.

        Floats are rounded to ``float_digits`` significant digits. Returns the CSV path.
        """
        self._check_name(name)
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"table {name!r}: expected a pandas DataFrame, got {type(df).__name__}")
        frame = df.reset_index() if index else df
        frame = _format_table(frame, self.float_digits)
        csv_path = self.out_dir / "tables" / f"{name}.csv"
        md_path = self.out_dir / "tables" / f"{name}.md"
        atomic_write_text(csv_path, frame.to_csv(index=False, lineterminator="\n"))
        atomic_write_text(md_path, _markdown(frame, caption))
        self._register("table", name, [csv_path, md_path], caption)
        return csv_path

    def paper_vs_run(self, rows: Sequence[Mapping[str, Any]] | pd.DataFrame, *, caption: str | None = None) -> Path:
        """Save the "paper reported vs this run" table.

        Each row needs ``quantity``, ``paper reported`` (the number as the paper printed it),
        ``this run`` (computed in this execution) and ``held on this data`` (yes/no/partly, or
        a short reason).
        """
        df = pd.DataFrame(rows) if not isinstance(rows, pd.DataFrame) else rows
        missing = [c for c in PAPER_VS_RUN_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"paper_vs_run rows lack column(s) {missing}; need {list(PAPER_VS_RUN_COLUMNS)}")
        return self.table(df, PAPER_VS_RUN, caption=caption or "Paper reported vs this run")

    def figure(self, fig: Any, name: str, *, caption: str | None = None, dpi: int = 150, close: bool = False) -> Path:
        """Save a matplotlib figure as ``figures/<name>.png`` and ``figures/<name>.svg``.

        Metadata that changes between runs (dates, random SVG ids) is fixed so the files are
        reproducible. Returns the PNG path.
        """
        import matplotlib as mpl

        self._check_name(name)
        paths = []
        for ext, meta in (("png", {"Software": None}), ("svg", {"Date": None, "Creator": None})):
            path = self.out_dir / "figures" / f"{name}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{ext}", dir=path.parent)
            os.close(fd)
            try:
                with mpl.rc_context({"svg.hashsalt": f"mmlib-{name}"}):
                    fig.savefig(tmp, format=ext, dpi=dpi, bbox_inches="tight", metadata=meta)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            paths.append(path)
        self._register("figure", name, paths, caption)
        if close:
            import matplotlib.pyplot as plt

            plt.close(fig)
        return paths[0]

    # ---------------------------------------------------------------- run.json

    def _write_record(self) -> None:
        record = dict(self._record)
        record["stages_s"] = {k: round(v, 3) for k, v in self._stages.items()}
        record["wall_s"] = round(time.perf_counter() - self._t0, 3)
        record["artifacts"] = self._artifacts
        atomic_write_text(self.out_dir / "run.json", json.dumps(record, indent=2) + "\n")

    def finish(self) -> dict[str, Any]:
        """Mark the run complete and write the final ``run.json``; returns its content."""
        self._record["status"] = "complete"
        self._write_record()
        return json.loads((self.out_dir / "run.json").read_text(encoding="utf-8"))
