"""Execute the jupytext notebooks headlessly with papermill (what ``make reproduce`` calls).

The ``.py`` files in ``notebooks/`` (jupytext percent format) are the source of truth. For each
one the runner:

1. reads it with jupytext and checks it has exactly one cell tagged ``parameters`` and a
   kernelspec with a language (papermill refuses a notebook without one);
2. executes it with papermill into ``results/<name>.running/``, injecting ``profile``,
   ``seed``, ``device``, ``data_dir`` and ``out_dir``;
3. renders the executed notebook to HTML beside it;
4. on success replaces ``results/<name>/`` with the new folder in one rename; on failure moves
   it to ``results/<name>.failed/`` and raises :class:`NotebookFailed`, whose message names the
   notebook, the cell and the error. A previous good result is never half overwritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nbformat

from mmlib.core import get_logger
from mmlib.results import atomic_write_text

log = get_logger("runner")

__all__ = [
    "KERNEL_NAME",
    "REQUIRED_PARAMETERS",
    "NotebookFailed",
    "find_notebooks",
    "parameters_cells",
    "read_notebook",
    "run_notebook",
]

KERNEL_NAME = "mmlib"
KERNEL_DISPLAY_NAME = "Python (mmlib)"
REQUIRED_PARAMETERS = ("profile", "seed", "device", "data_dir", "out_dir")


class NotebookFailed(RuntimeError):
    """A notebook raised during execution; the message names the notebook, cell and error."""


def find_notebooks(notebook_dir: str | Path, prefix: str = "") -> list[Path]:
    """The jupytext ``.py`` notebooks in ``notebook_dir`` whose names start with ``prefix``, sorted."""
    notebook_dir = Path(notebook_dir)
    found = sorted(p for p in notebook_dir.glob("*.py") if p.name.startswith(prefix) and not p.name.startswith("_"))
    if not found:
        raise FileNotFoundError(f"no notebook in {notebook_dir} starts with {prefix!r}")
    return found


def parameters_cells(nb: nbformat.NotebookNode) -> list[int]:
    """Indices of the cells tagged ``parameters``."""
    return [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]


def _assigned_names(source: str) -> set[str]:
    import ast

    names = set()
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Name):
                names.add(t.id)
    return names


def read_notebook(path: str | Path) -> nbformat.NotebookNode:
    """Read a jupytext ``.py`` notebook, check its parameters cell and set the kernelspec.

    Raises:
        ValueError: naming the file, if it has no or several ``parameters`` cells, or the
            parameters cell lacks one of :data:`REQUIRED_PARAMETERS`.
    """
    import jupytext

    path = Path(path)
    nb = jupytext.read(path)
    cells = parameters_cells(nb)
    if len(cells) != 1:
        raise ValueError(f"{path}: expected exactly one cell tagged 'parameters', found {len(cells)}")
    assigned = _assigned_names(nb.cells[cells[0]].source)
    missing = [p for p in REQUIRED_PARAMETERS if p not in assigned]
    if missing:
        raise ValueError(f"{path}: the parameters cell does not set {missing}")
    # papermill refuses a notebook without a kernel language; jupytext only sets it if the
    # header says so, so set it here whatever the header holds.
    nb.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": KERNEL_DISPLAY_NAME, "language": "python"}
    nb.metadata.setdefault("language_info", {"name": "python"})
    return nb


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _error_summary(err: Exception, nb: nbformat.NotebookNode | None) -> str:
    """'cell N (In [k]): <first source line> -> EName: value' from a papermill error."""
    cell_index = getattr(err, "cell_index", None)
    ename = getattr(err, "ename", type(err).__name__)
    evalue = getattr(err, "evalue", str(err))
    if cell_index is None:
        return f"{ename}: {evalue}"
    exec_count = getattr(err, "exec_count", None)
    source = (getattr(err, "source", "") or "").strip().splitlines()
    first = source[0] if source else ""
    # papermill counts the injected-parameters cell; report the position in the source file.
    injected = 0
    if nb is not None:
        injected = sum(
            1 for c in nb.cells[:cell_index] if "injected-parameters" in c.get("metadata", {}).get("tags", [])
        )
    where = f"cell {cell_index - injected + 1}"
    if exec_count:
        where += f" (In [{exec_count}])"
    return f"{where} `{first}` raised {ename}: {evalue}"


def render_html(nb_path: Path, html_path: Path) -> None:
    from nbconvert import HTMLExporter

    nb = nbformat.read(nb_path, as_version=4)
    body, _ = HTMLExporter().from_notebook_node(nb)
    atomic_write_text(html_path, body)


@contextlib.contextmanager
def _kernel_sockets() -> Iterator[Any]:
    """Kernel-manager config: the kernel talks to the runner over Unix sockets in a private folder.

    Jupyter's default is TCP on localhost, unencrypted, which the kernel warns about at every
    start: any user of a shared machine (a cluster's login or compute node) can connect to the
    ports. IPC sockets live in a folder only this user can enter (``mkdtemp`` makes it 0700)
    and are removed with it. Windows has no IPC transport, so it keeps TCP.
    """
    import tempfile

    from traitlets.config import Config

    if os.name == "nt":
        yield Config()
        return
    with tempfile.TemporaryDirectory(prefix="mmlib-kernel-") as folder:
        yield Config({"KernelManager": {"transport": "ipc", "ip": os.path.join(folder, "kernel")}})


def run_notebook(
    path: str | Path,
    results_dir: str | Path,
    *,
    profile: str = "quick",
    seed: int | None = None,
    device: str | None = None,
    data_dir: str | Path | None = None,
    extra_parameters: Mapping[str, Any] | None = None,
    kernel_name: str = KERNEL_NAME,
    progress_bar: bool = False,
    timeout_s: int | None = None,
    threads: int | None = None,
) -> Path:
    """Execute one notebook into ``results_dir/<name>/`` (see the module docstring).

    Args:
        path: the jupytext ``.py`` notebook.
        results_dir: the results root (``results/``).
        profile: ``smoke``, ``quick`` or ``full``.
        seed, device, data_dir: override the notebook's defaults when given.
        extra_parameters: further parameters to inject.
        kernel_name: the Jupyter kernel (``make setup`` registers ``mmlib`` in ``.venv``).
        progress_bar: show papermill's per-cell progress bar.
        timeout_s: per-cell timeout.
        threads: CPU threads of the kernel's torch and BLAS (``OMP_NUM_THREADS`` and
            ``MKL_NUM_THREADS``); ``None`` leaves torch's default (every usable core). CPU
            results depend on it in the last digits (parallel reductions add in another order),
            so ``make reproduce`` fixes it (``THREADS``, default 1) and runs notebooks side by
            side instead; the run record keeps it.

    Returns:
        The final results folder.

    Raises:
        NotebookFailed: if a cell raises; ``results/<name>.failed/`` then holds the executed
            notebook (with the traceback) and its HTML.
    """
    import papermill
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    path = Path(path).resolve()
    name = path.stem
    results_dir = Path(results_dir).resolve()
    final = results_dir / name
    running = results_dir / f"{name}.running"
    failed = results_dir / f"{name}.failed"

    try:
        KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel:
        raise NotebookFailed(
            f"{name}: the Jupyter kernel {kernel_name!r} is not registered; run `make setup`"
        ) from None

    if threads is not None and (isinstance(threads, bool) or int(threads) != threads or threads < 1):
        raise ValueError(f"threads must be a whole number >= 1, got {threads!r}")
    nb = read_notebook(path)
    if running.exists():
        shutil.rmtree(running)
    running.mkdir(parents=True)
    src_ipynb = running / f".{name}.source.ipynb"
    nbformat.write(nb, src_ipynb)

    params: dict[str, Any] = {"profile": profile, "out_dir": str(running)}
    if seed is not None:
        params["seed"] = int(seed)
    if device is not None:
        params["device"] = device
    if data_dir is None and os.environ.get("MMLIB_DATA_DIR"):
        data_dir = os.environ["MMLIB_DATA_DIR"]
    if data_dir is not None:
        params["data_dir"] = str(Path(data_dir).expanduser().resolve())
    params.update(extra_parameters or {})

    out_ipynb = running / f"{name}.ipynb"
    log.info("executing %s (profile %s)", path.name, profile)
    started = datetime.now(UTC)
    start = time.perf_counter()
    error: Exception | None = None
    env = {"MMLIB_PROGRESS": os.environ.get("MMLIB_PROGRESS", "0")}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(int(threads)), MKL_NUM_THREADS=str(int(threads)))
    try:
        # The kernel inherits these variables (set for the call only). Progress bars would only
        # leave redraw debris in the executed notebook; mmlib.core.progress honours MMLIB_PROGRESS.
        with _environ(**env), _kernel_sockets() as config:
            papermill.execute_notebook(
                str(src_ipynb),
                str(out_ipynb),
                parameters=params,
                kernel_name=kernel_name,
                cwd=str(path.parent),
                progress_bar=progress_bar,
                execution_timeout=timeout_s,
                config=config,
            )
    except Exception as err:  # papermill raises PapermillExecutionError, or kernel errors
        error = err
    wall = time.perf_counter() - start
    src_ipynb.unlink(missing_ok=True)
    executed = nbformat.read(out_ipynb, as_version=4) if out_ipynb.exists() else None
    if out_ipynb.exists():
        render_html(out_ipynb, running / f"{name}.html")

    if error is None and not (running / "run.json").exists():
        error = RuntimeError("the notebook never opened an mmlib.results.Run, so it wrote no run.json")
    if error is None:
        record = json.loads((running / "run.json").read_text(encoding="utf-8"))
        if record.get("status") != "complete":
            error = RuntimeError("the notebook did not call run.finish()")
    if error is not None:
        summary = _error_summary(error, executed)
        atomic_write_text(running / "ERROR.txt", f"{name}: {summary}\n")
        if failed.exists():
            shutil.rmtree(failed)
        running.rename(failed)
        raise NotebookFailed(
            f"notebook {path.name} failed: {summary}\n  executed notebook with traceback: {failed / (name + '.ipynb')}"
        ) from error

    # Record how the notebook was executed, with the final (not the temporary) out_dir.
    record.setdefault("params", {})["out_dir"] = str(final)
    record["execution"] = {"runner": "papermill", "kernel": kernel_name, "notebook_wall_s": round(wall, 3),
                           "threads": threads, "started": started.isoformat(timespec="seconds"),
                           "finished": datetime.now(UTC).isoformat(timespec="seconds")}
    atomic_write_text(running / "run.json", json.dumps(record, indent=2) + "\n")

    # Swap in the new results with renames only; the old folder is removed last.
    old = results_dir / f".{name}.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    running.rename(final)
    if old.exists():
        shutil.rmtree(old)
    if failed.exists():
        shutil.rmtree(failed)
    log.info("%s done in %.1f s -> %s", name, wall, final)
    return final
