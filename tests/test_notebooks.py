"""Notebooks: structure, headless execution at the smoke profile, failures, determinism."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jupytext
import nbformat
import pandas as pd
import pytest

from mmlib import runner

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.py") if not p.name.startswith("_"))
SMOKE_CELL_TIMEOUT_S = 120


def test_there_are_notebooks_and_the_overview_is_first():
    assert NOTEBOOKS, "notebooks/ holds no jupytext notebook"
    assert NOTEBOOKS[0].name == "00_overview.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_one_parameters_cell_with_the_required_names(path):
    text = path.read_text()
    # jupytext must see exactly one tagged cell in the source file itself ...
    assert text.count('tags=["parameters"]') == 1, f"{path.name}: want exactly one cell tagged parameters"
    nb = runner.read_notebook(path)
    # ... and the tag must survive the conversion to .ipynb and back.
    again = jupytext.reads(jupytext.writes(nb, fmt="ipynb"), fmt="ipynb")
    assert len(runner.parameters_cells(again)) == 1
    assert nb.metadata["kernelspec"]["language"] == "python"
    assert nb.metadata["kernelspec"]["name"] == runner.KERNEL_NAME
    # papermill must parse every line of it (an "=" inside a comment defeats its parser)
    from papermill.translators import PythonTranslator

    cell = nb.cells[runner.parameters_cells(nb)[0]]
    assigned = [ln.split("=")[0].strip() for ln in cell.source.splitlines() if ln.strip() and not ln.startswith("#")]
    parsed = [p.name for p in PythonTranslator.inspect(cell)]
    assert parsed == assigned, f"{path.name}: papermill parsed {parsed} from the parameters cell, expected {assigned}"


def test_notebook_names_follow_the_convention():
    import re

    for path in NOTEBOOKS:
        assert re.match(r"^(00_overview|01_data_tour|p[1-5]_[a-z0-9_]+)\.py$", path.name), path.name


def _write_notebook(folder: Path, name: str, body: str, n_params: int = 1) -> Path:
    params = textwrap.dedent("""
        # %% tags=["parameters"]
        profile = "quick"
        seed = 0
        device = "auto"
        data_dir = "../data"
        out_dir = "../results/x"
    """)
    text = "# %% [markdown]\n# A test notebook\n" + params * n_params + textwrap.dedent(body)
    path = folder / f"{name}.py"
    path.write_text(text)
    return path


@pytest.mark.parametrize("n_params", [0, 2])
def test_read_notebook_refuses_zero_or_two_parameters_cells(tmp_path, n_params):
    path = _write_notebook(tmp_path, "bad", "# %%\nx = 1\n", n_params=n_params)
    with pytest.raises(ValueError, match=f"bad.py: expected exactly one cell tagged 'parameters', found {n_params}"):
        runner.read_notebook(path)


def test_read_notebook_names_missing_parameters(tmp_path):
    path = tmp_path / "short.py"
    path.write_text('# %% tags=["parameters"]\nprofile = "quick"\nseed = 0\n')
    with pytest.raises(ValueError, match=r"short.py: the parameters cell does not set \['device', 'data_dir', 'out_dir'\]"):
        runner.read_notebook(path)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_at_smoke_profile(path, tmp_path):
    final = runner.run_notebook(
        path, tmp_path / "results", profile="smoke", data_dir=tmp_path / "data", timeout_s=SMOKE_CELL_TIMEOUT_S
    )
    assert final == tmp_path / "results" / path.stem
    record = json.loads((final / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["params"]["profile"] == "smoke"
    assert record["profile"]["name"] == "smoke", "the notebook must resolve the profile it was given"
    assert record["params"]["out_dir"] == str(final)
    for art in record["artifacts"]:
        for f in art["files"]:
            assert (final / f).exists(), f
    assert (final / f"{path.stem}.ipynb").exists() and (final / f"{path.stem}.html").exists()
    assert not list((tmp_path / "results").glob("*.running"))
    # wall-clock times belong in run.json: a table that holds one differs between two runs of one seed
    for table in final.glob("tables/*.csv"):
        header = table.read_text(encoding="utf-8").splitlines()[0].split(",")
        assert "seconds" not in header, f"{table.name} writes wall-clock seconds"
    # a reader sees what the kernel wrote to stderr: a Python warning there is noise to silence or a bug to fix
    assert not _warnings_in(final / f"{path.stem}.ipynb")


def _warnings_in(ipynb: Path) -> list[str]:
    """``file:line: SomethingWarning: message`` lines in a notebook's stderr outputs, with their cell."""
    found = []
    for i, cell in enumerate(nbformat.read(ipynb, as_version=4).cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                found += [f"cell {i}: {line}" for line in out["text"].splitlines()
                          if re.search(r":\d+: \w*Warning: ", line)]
    return found


_GOOD = """
    # %%
    from mmlib import results
    run = results.Run(out_dir, notebook="demo", params={"profile": profile})
    # %%
    import pandas as pd
    run.table(pd.DataFrame({"v": [VALUE]}), "t")
    run.finish()
"""
_BAD = """
    # %%
    from mmlib import results
    run = results.Run(out_dir, notebook="demo", params={"profile": profile})
    # %%
    x = 1
    # %%
    y = x / 0
    # %%
    run.finish()
"""


def test_failed_notebook_is_named_with_its_cell_and_keeps_the_old_results(tmp_path):
    nbdir, res = tmp_path / "notebooks", tmp_path / "results"
    nbdir.mkdir()
    good = runner.run_notebook(_write_notebook(nbdir, "demo", _GOOD.replace("VALUE", "1")), res, profile="smoke")
    assert (good / "tables" / "t.csv").read_text() == "v\n1\n"

    _write_notebook(nbdir, "demo", _BAD)
    with pytest.raises(runner.NotebookFailed) as info:
        runner.run_notebook(nbdir / "demo.py", res, profile="smoke")
    msg = str(info.value)
    assert "demo.py" in msg and "ZeroDivisionError" in msg
    # cells of the source: markdown, parameters, import, x = 1, y = x / 0
    assert "cell 5" in msg and "y = x / 0" in msg
    failed = res / "demo.failed"
    assert (failed / "demo.ipynb").exists() and (failed / "demo.html").exists()
    assert "ZeroDivisionError" in (failed / "ERROR.txt").read_text()
    executed = nbformat.read(failed / "demo.ipynb", as_version=4)
    assert any(o.get("ename") == "ZeroDivisionError" for c in executed.cells for o in c.get("outputs", []))
    # the last good result is untouched
    assert (good / "tables" / "t.csv").read_text() == "v\n1\n"

    # a later success replaces the results and clears the failure
    runner.run_notebook(_write_notebook(nbdir, "demo", _GOOD.replace("VALUE", "2")), res, profile="smoke")
    assert (good / "tables" / "t.csv").read_text() == "v\n2\n"
    assert not failed.exists()


def test_notebook_that_never_finishes_its_run_fails(tmp_path):
    path = _write_notebook(tmp_path, "nofinish", """
        # %%
        from mmlib import results
        run = results.Run(out_dir, notebook="nofinish")
    """)
    with pytest.raises(runner.NotebookFailed, match=r"run.finish\(\)"):
        runner.run_notebook(path, tmp_path / "results", profile="smoke")


def _make(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_make_reproduce_exits_nonzero_naming_notebook_and_cell(tmp_path):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _write_notebook(nbdir, "p9_ok", _GOOD.replace("VALUE", "3"))
    _write_notebook(nbdir, "p9_bad", _BAD)
    res = tmp_path / "results"
    for jobs in ("1", "2"):
        proc = _make("reproduce", f"JOBS={jobs}", f"NOTEBOOK_DIR={nbdir}", f"RESULTS={res}", "NB=p9", "PROFILE=smoke")
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out
        assert "p9_bad.py failed: cell 5" in out and "ZeroDivisionError" in out
        assert (res / "index.html").exists(), "the index is built even when a notebook fails"
        assert "p9_bad" in (res / "index.html").read_text()
        # one failure does not stop the others: p9_ok runs after p9_bad (sorted), even one at a time
        assert (res / "p9_ok" / "tables" / "t.csv").read_text() == "v\n3\n", out
        # a fixed thread count whatever the machine and JOBS: the same tables everywhere
        assert json.loads((res / "p9_ok" / "run.json").read_text())["execution"]["threads"] == 2
        shutil.rmtree(res / "p9_ok")

    proc = _make("reproduce", f"NOTEBOOK_DIR={nbdir}", f"RESULTS={res}", "NB=p9_ok", "PROFILE=smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (res / "p9_ok" / "tables" / "t.csv").read_text() == "v\n3\n"

    proc = _make("reproduce", f"NOTEBOOK_DIR={nbdir}", f"RESULTS={res}", "NB=zz")
    assert proc.returncode != 0 and "no notebook" in proc.stdout + proc.stderr


def test_threads_reach_the_kernel_and_are_recorded(tmp_path):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    path = _write_notebook(nbdir, "threads", """
        # %%
        import torch
        from mmlib import results
        run = results.Run(out_dir, notebook="threads", params={"profile": profile})
        # %%
        import pandas as pd
        run.table(pd.DataFrame({"threads": [torch.get_num_threads()]}), "t")
        run.finish()
    """)
    for n in (1, 2):
        final = runner.run_notebook(path, tmp_path / "results", profile="smoke", threads=n)
        assert (final / "tables" / "t.csv").read_text() == f"threads\n{n}\n"
        record = json.loads((final / "run.json").read_text())
        assert record["execution"]["threads"] == n and record["environment"]["torch_threads"] == n
        assert record["execution"]["started"] <= record["execution"]["finished"]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            runner.run_notebook(path, tmp_path / "results", profile="smoke", threads=bad)


@pytest.mark.skipif(os.name == "nt", reason="Windows has no IPC transport; the runner keeps TCP there")
def test_the_kernel_talks_to_the_runner_over_private_unix_sockets(tmp_path):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    path = _write_notebook(nbdir, "sockets", """
        # %%
        import os, stat
        from ipykernel.kernelapp import IPKernelApp
        from mmlib import results
        run = results.Run(out_dir, notebook="sockets", params={"profile": profile})
        # %%
        import pandas as pd
        app = IPKernelApp.instance()
        folder = os.path.dirname(app.ip)
        sockets = sorted(f for f in os.listdir(folder) if stat.S_ISSOCK(os.stat(os.path.join(folder, f)).st_mode))
        run.table(pd.DataFrame({"transport": [app.transport], "folder": [folder], "sockets": [len(sockets)],
                                "mode": [oct(os.stat(folder).st_mode & 0o777)]}), "t")
        run.finish()
    """)
    final = runner.run_notebook(path, tmp_path / "results", profile="smoke")
    t = pd.read_csv(final / "tables" / "t.csv", dtype=str)
    assert t.loc[0, "transport"] == "ipc" and int(t.loc[0, "sockets"]) >= 5  # shell, iopub, stdin, control, hb
    assert t.loc[0, "mode"] == "0o700"  # only this user may connect
    assert not Path(t.loc[0, "folder"]).exists()  # removed with the run


def test_importing_mmlib_silences_tqdms_ipywidgets_advice_in_a_kernel(tmp_path):
    """MONAI and transformers import tqdm.auto; in a kernel without ipywidgets it advised updating jupyter,
    in every notebook whose cohort was already on disk (with a fresh cohort, mmlib's own bars came first)."""
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    path = _write_notebook(nbdir, "quiet", """
        # %%
        import mmlib
        from mmlib import results
        run = results.Run(out_dir, notebook="quiet", params={"profile": profile})
        # %%
        import tqdm.auto  # the first import of it in this kernel
        run.finish()
    """)
    final = runner.run_notebook(path, tmp_path / "results", profile="smoke")
    assert not _warnings_in(final / "quiet.ipynb")


def test_cli_list_selects_by_prefix():
    out = subprocess.run([sys.executable, "-m", "mmlib", "list", "--notebooks", str(ROOT / "notebooks"), "--prefix", "00"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["00_overview"]


@pytest.fixture(scope="module")
def overview_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    nb = ROOT / "notebooks" / "00_overview.py"
    a = runner.run_notebook(nb, root / "a", profile="smoke", seed=0)
    b = runner.run_notebook(nb, root / "b", profile="smoke", seed=0)
    c = runner.run_notebook(nb, root / "c", profile="smoke", seed=1)
    return a, b, c


def test_same_seed_gives_byte_identical_tables_and_figures(overview_runs):
    a, b, _ = overview_runs
    files = sorted(p.relative_to(a) for p in a.glob("tables/*")) + sorted(p.relative_to(a) for p in a.glob("figures/*"))
    assert any(str(f).endswith(".csv") for f in files) and any(str(f).endswith(".png") for f in files)
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs between two runs with seed 0"


def test_a_different_seed_changes_the_seeded_results(overview_runs):
    a, _, c = overview_runs
    assert (a / "tables" / "cindex.csv").read_bytes() != (c / "tables" / "cindex.csv").read_bytes()
    assert json.loads((c / "run.json").read_text())["seed"] == 1
