"""Do a notebook's verdicts replicate? Its claims table, side by side over seeds.

Each pipeline notebook ends with a ``claims`` table: one row per claim of the paper, with the
verdict this run reached in the column ``held`` (yes, partly, no, ...). One run is one draw: the
seed picks the generated cohort, the initial weights and the batches. A verdict a reviewer can
lean on is one that comes out the same on other draws, so this module runs a notebook at several
seeds and lines the verdicts up::

    python -m mmlib replicate notebooks/p5_umeml_histology_genomics.py --seeds 0 1 2
    python -m mmlib claims results/replicates/seed*/p5_umeml_histology_genomics   # existing runs

Runs are only comparable when everything but the seed is equal, so :func:`claims_by_seed`
refuses runs of different notebooks, profiles or CPU thread counts (CPU results move with the
thread count), and records each run's git commit in the table's caption.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mmlib.core import get_logger
from mmlib.results import atomic_write_text, git_commit

log = get_logger("replicates")

__all__ = ["CLAIMS", "RunClaims", "VerdictTable", "claims_by_seed", "claims_caption", "read_run_claims", "replicate",
           "verdict_tables", "write_claims_table"]

CLAIMS_TABLE = "claims"
CLAIM_KEY = ("claim",)
VERDICT_COLUMN = "held"
#: Verdicts that test nothing: a claim with only these at every seed is left out of the caption's count.
UNTESTED = frozenset({"not tested", "not comparable", "n/a", "-"})


@dataclass(frozen=True)
class VerdictTable:
    """A results table with one verdict per row, to line up across seeds.

    Attributes:
        table: its name (``tables/<table>.csv``).
        key: the column(s) that name a row.
        verdict: the verdict column.
        value: a column shown beside each verdict (the number the verdict was read from).
        ceiling: a column shown after the value, ``value / ceiling``: the most the value could
            reach (P1's ``grid_ceiling``, the best ratio any map on a stage's grid could reach).
    """

    table: str
    key: tuple[str, ...]
    verdict: str
    value: str | None = None
    ceiling: str | None = None


#: Every pipeline notebook's claims table.
CLAIMS = VerdictTable(CLAIMS_TABLE, CLAIM_KEY, VERDICT_COLUMN)


def verdict_tables(notebook: str) -> list[VerdictTable]:
    """:data:`CLAIMS`, then the tables the notebook's pipeline module lists in ``VERDICT_TABLES``.

    The module is ``mmlib.pipelines.<prefix>`` for a notebook named ``<prefix>_...`` (``p1`` for
    ``p1_stroke_mri_clip_itm``); a notebook without one has only its claims.
    """
    import importlib

    prefix = Path(notebook).stem.split("_", 1)[0]
    try:
        module = importlib.import_module(f"mmlib.pipelines.{prefix}")
    except ModuleNotFoundError:
        return [CLAIMS]
    return [CLAIMS, *getattr(module, "VERDICT_TABLES", ())]


@dataclass
class RunClaims:
    """One finished notebook run's claims and what it was run with."""

    path: Path
    notebook: str
    profile: dict[str, Any]
    seed: int
    threads: int | None
    commit: str | None
    dirty: bool
    claims: pd.DataFrame  # columns: row (the key), verdict, value (when asked), paper reported (when present)
    table: str = CLAIMS_TABLE
    key_name: str = "claim"


def read_run_claims(run_dir: str | os.PathLike, *, table: str = CLAIMS_TABLE, key: Sequence[str] = CLAIM_KEY,
                    verdict: str = VERDICT_COLUMN, value: str | None = None, ceiling: str | None = None,
                    missing_ok: bool = False) -> RunClaims:
    """Read ``run.json`` and one verdict table (by default ``tables/claims.csv``) of one results folder.

    Args:
        run_dir: a notebook's results folder.
        table: the table's name (``tables/<table>.csv``).
        key: the column(s) that name a row; several are joined with " · ".
        verdict: the column holding the verdict; only the text before a colon counts ("partly:
            ahead, but the CI reaches 0" is "partly").
        value: a column shown beside each verdict (numbers to three significant digits), e.g. the
            ratio a verdict was read from.
        ceiling: a column shown after ``value`` as ``value / ceiling``; a run whose table lacks
            it (written before the column existed) shows the value alone.
        missing_ok: a run without the table, or whose table lacks the columns (P1 writes a note
            instead of its Grad-CAM summary when a model found no true-positive case), has no
            rows instead of raising.

    Raises:
        FileNotFoundError: naming the missing ``run.json`` or table.
        ValueError: naming the file when the run did not finish, or the table lacks a column
            asked for, or names a row twice.
    """
    run_dir = Path(run_dir)
    record_path = run_dir / "run.json"
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path}: no run record; is {run_dir} a notebook's results folder?")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{record_path}: not valid JSON ({err})") from None
    if record.get("status") != "complete":
        raise ValueError(f"{record_path}: status is {record.get('status')!r}, not 'complete'; the run did not finish")
    for field in ("notebook", "seed", "profile"):
        if record.get(field) is None:
            raise ValueError(f"{record_path}: records no {field!r}")
    key = [key] if isinstance(key, str) else list(key)
    table_path = run_dir / "tables" / f"{table}.csv"
    columns = [*key, verdict, *([value] if value else [])]
    if table_path.is_file():
        raw = pd.read_csv(table_path, dtype=str, keep_default_na=False)
    elif missing_ok:
        raw = pd.DataFrame(columns=columns, dtype=str)
    else:
        raise FileNotFoundError(f"{table_path}: notebook {record['notebook']!r} wrote no {table!r} table")
    missing = [c for c in columns if c not in raw.columns]
    if missing and missing_ok:
        raw = pd.DataFrame(columns=columns, dtype=str)
    elif missing:
        raise ValueError(f"{table_path}: lacks column(s) {missing}; has {list(raw.columns)}")
    # "partly: ahead, but the 95% CI reaches 0" is the verdict "partly" and this run's reason for it
    words = raw[verdict].str.split(":", n=1).str[0].str.strip()
    rows = raw[key].agg(" · ".join, axis=1) if len(raw) else pd.Series([], dtype=str)
    claims = pd.DataFrame({"row": rows, "verdict": words})
    if value:
        claims["value"] = raw[value]
        if ceiling and ceiling in raw.columns:
            claims["ceiling"] = raw[ceiling]
    if "paper reported" in raw.columns:
        claims["paper reported"] = raw["paper reported"]
    repeated = sorted(claims.loc[claims["row"].duplicated(), "row"])
    if repeated:
        raise ValueError(f"{table_path}: {' · '.join(key)} repeats {repeated}")
    profile = record["profile"] if isinstance(record["profile"], dict) else {"name": record["profile"]}
    git = record.get("git") or {}
    return RunClaims(path=run_dir, notebook=str(record["notebook"]), profile=profile, seed=int(record["seed"]),
                     threads=(record.get("execution") or {}).get("threads"), commit=git.get("commit"),
                     dirty=bool(git.get("dirty")), claims=claims, table=table, key_name=" · ".join(key))


def _same(runs: Sequence[RunClaims], what: str, value) -> None:
    first = value(runs[0])
    for r in runs[1:]:
        if value(r) != first:
            detail = ""
            if what == "profile":
                a, b = runs[0].profile, r.profile
                fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                detail = f" (fields {fields})"
            raise ValueError(f"runs differ in {what}{detail}: {runs[0].path} has {first!r}, {r.path} has "
                             f"{value(r)!r}; only the seed may differ between replicates")


def _short(text: str) -> str:
    """Three significant digits for a number shown beside a verdict; other text as it is."""
    try:
        return f"{float(text):.3g}"
    except ValueError:
        return text


def claims_by_seed(run_dirs: Sequence[str | os.PathLike], *, table: str = CLAIMS_TABLE,
                   key: Sequence[str] = CLAIM_KEY, verdict: str = VERDICT_COLUMN,
                   value: str | None = None, ceiling: str | None = None, missing_ok: bool = False) -> pd.DataFrame:
    """The verdict of every claim at every seed, and whether it is the same at all of them.

    Args:
        run_dirs: results folders of one notebook (``results/<notebook>``), one per seed.
        table, key, verdict, value, ceiling, missing_ok: which table and columns, and whether a
            run may lack them (see :func:`read_run_claims`); by
            default the claims table and its ``held`` column. Any table with a verdict column
            works, e.g. P1's ``gradcam_localisation_summary`` keyed by method, map and truth.

    Returns:
        One row per claim, in the order of the lowest seed's table (claims that only other
        runs have come after): the key (``claim``), ``paper reported`` (when the notebooks
        write it), ``seed <k>`` with that run's verdict (``"-"`` where the run lacks the row;
        followed by the ``value`` in brackets when one is asked for, as ``value / ceiling`` with a
        ``ceiling``), ``verdicts`` (each
        verdict's count, most frequent first) and ``same at every seed`` (``yes``/``no``).
        ``attrs`` holds ``notebook``, ``table``, ``profile``, ``threads``, ``seeds``, ``commits``
        (seed to commit, ``+dirty`` when the tree had changes) and ``bracket`` (what the brackets
        hold, or None).

    Raises:
        ValueError: for fewer than two runs, a repeated seed, or runs that differ in notebook,
            profile or thread count (naming the folders).
    """
    runs = [read_run_claims(d, table=table, key=key, verdict=verdict, value=value, ceiling=ceiling,
                            missing_ok=missing_ok) for d in run_dirs]
    if len(runs) < 2:
        raise ValueError(f"need the runs of at least two seeds, got {len(runs)}")
    _same(runs, "notebook", lambda r: r.notebook)
    _same(runs, "profile", lambda r: r.profile)
    _same(runs, "threads", lambda r: r.threads)
    seen: dict[int, Path] = {}
    for r in runs:
        if r.seed in seen:
            raise ValueError(f"seed {r.seed} twice: {seen[r.seed]} and {r.path}")
        seen[r.seed] = r.path
    runs.sort(key=lambda r: r.seed)

    order: list[str] = []
    for r in runs:
        order += [c for c in r.claims["row"] if c not in order]
    out = pd.DataFrame({runs[0].key_name: order})
    paper: dict[str, str] = {}
    for r in runs:
        if "paper reported" in r.claims.columns:
            for c, p in zip(r.claims["row"], r.claims["paper reported"], strict=True):
                paper.setdefault(c, p)
    if paper:
        out["paper reported"] = [paper.get(c, "") for c in order]
    verdicts = []
    for r in runs:
        found = dict(zip(r.claims["row"], r.claims["verdict"], strict=True))
        verdicts.append([found.get(c, "-") for c in order])
        cells = verdicts[-1]
        if value:
            shown = {c: _short(x) for c, x in zip(r.claims["row"], r.claims["value"], strict=True)}
            if "ceiling" in r.claims:
                shown = {c: f"{x} / {_short(cap)}" for (c, x), cap in zip(shown.items(), r.claims["ceiling"], strict=True)}
            cells = [v if c not in shown else f"{v} ({shown[c]})" for c, v in zip(order, cells, strict=True)]
        out[f"seed {r.seed}"] = cells
    counts = [Counter(row) for row in zip(*verdicts, strict=True)]
    out["verdicts"] = [", ".join(f"{v} {n}" for v, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))
                       for c in counts]
    out["same at every seed"] = ["yes" if len(c) == 1 else "no" for c in counts]
    out.attrs.update(notebook=runs[0].notebook, table=table, profile=runs[0].profile.get("name"),
                     threads=runs[0].threads, seeds=[r.seed for r in runs],
                     bracket=None if not value else f"{value} / {ceiling}" if ceiling else value,
                     commits={r.seed: (r.commit or "unknown") + ("+dirty" if r.dirty else "") for r in runs})
    return out


def claims_caption(table: pd.DataFrame) -> str:
    """One paragraph: notebook, profile, threads, seeds, commits, and how many verdicts are the same at every seed."""
    a = table.attrs
    commits = sorted(set(a["commits"].values()))
    commit_text = (f"commit {commits[0][:12]}" if len(commits) == 1 else
                   "commits " + ", ".join(f"seed {s}: {c[:12]}" for s, c in a["commits"].items()))
    seeds = [f"seed {s}" for s in a["seeds"]]
    tested = ~table[seeds].isin(UNTESTED).all(axis=1) if len(table) else pd.Series([], dtype=bool)
    stable = int(((table["same at every seed"] == "yes") & tested).sum())
    what = "claims" if a["table"] == CLAIMS_TABLE else f"rows of {a['table']}"
    untested = f" ({len(table) - int(tested.sum())} not tested at any seed)" if not tested.all() else ""
    bracket = f" (in brackets: {a['bracket']})" if a.get("bracket") else ""
    return (f"{a['notebook']}, profile {a['profile']}, {a['threads'] or 'default'} thread(s), seeds "
            f"{', '.join(map(str, a['seeds']))} ({commit_text}): the verdict of each row of {a['table']} at every "
            f"seed{bracket}. {stable} of {int(tested.sum())} tested {what} reach the same verdict at every seed{untested}.")


def write_claims_table(table: pd.DataFrame, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``<notebook>_<table>_by_seed.csv`` and ``.md`` under ``out_dir`` (each written whole, then renamed)."""
    out_dir = Path(out_dir)
    stem = f"{table.attrs['notebook']}_{table.attrs['table']}_by_seed"
    csv = atomic_write_text(out_dir / f"{stem}.csv", table.to_csv(index=False))
    md = atomic_write_text(out_dir / f"{stem}.md", f"{claims_caption(table)}\n\n{table.to_markdown(index=False)}\n")
    return csv, md


def _same_request(record: dict[str, Any], data_dir: str | os.PathLike | None, device: str | None) -> bool:
    """Did the run record come from the data folder and device this call asks for?

    The runner passes ``data_dir`` and ``device`` to the notebook only when given (the folder made
    absolute), so an omitted one is the notebook's own default, recorded as written there.
    """
    params = record.get("params") or {}
    if data_dir is None and os.environ.get("MMLIB_DATA_DIR"):
        data_dir = os.environ["MMLIB_DATA_DIR"]
    recorded = params.get("data_dir")
    if recorded is None:
        return False
    if data_dir is None:
        same_data = not Path(recorded).is_absolute()  # the notebook's default, relative to the notebook
    else:
        same_data = Path(recorded) == Path(data_dir).expanduser().resolve()
    same_device = params.get("device") == (device if device is not None else "auto")
    return same_data and same_device


def _reusable(run_dir: Path, profile: str, threads: int | None, commit: dict[str, Any], *,
              notebook: Path | None = None, data_dir: str | os.PathLike | None = None,
              device: str | None = None) -> RunClaims | None:
    """A finished run of this profile, thread count and clean commit (and, given ``notebook``, of
    that notebook, data folder and device): no need to run it again. Returns it, or None."""
    try:
        r = read_run_claims(run_dir)
    except (FileNotFoundError, ValueError):
        return None
    same = (r.profile.get("name") == profile and r.threads == threads and not r.dirty and not commit.get("dirty")
            and r.commit not in (None, "unknown") and r.commit == commit.get("commit"))
    if same and notebook is not None:
        record = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))
        same = r.notebook == notebook.stem and _same_request(record, data_dir, device)
    return r if same else None


def _run_in_processes(notebook: Path, seeds: Sequence[int], results_dir: Path, jobs: int, *, profile: str,
                      device: str | None, data_dir: str | os.PathLike | None, threads: int | None,
                      timeout_s: int | None) -> dict[int, Path]:
    """Each seed in its own ``python -m mmlib run`` process, ``jobs`` at a time; their run folders by seed.

    A process has its own environment (the thread count the runner hands its kernel), which
    threads of this one would share. Every seed runs even when another fails; then one error
    names each failed seed, its exit status and its log.
    """
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from mmlib.runner import NotebookFailed

    def run(seed: int) -> tuple[int, int, Path]:
        root = results_dir / f"seed{seed}"
        root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mmlib", "run", str(notebook.resolve()), "--profile", profile,
               "--results", str(root), "--seed", str(seed), "--no-progress"]
        for flag, value in (("--device", device), ("--data-dir", data_dir), ("--threads", threads),
                            ("--timeout", timeout_s)):
            if value is not None:
                cmd += [flag, str(Path(value).expanduser().resolve()) if flag == "--data-dir" else str(value)]
        log_path = root / f"{notebook.stem}.log"
        log.info("%s seed %d: running in a process of its own (output: %s)", notebook.stem, seed, log_path)
        with log_path.open("w", encoding="utf-8") as out:
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
        return seed, code, log_path

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        finished = list(pool.map(run, seeds))
    failed = [(seed, code, path) for seed, code, path in finished if code != 0]
    if failed:
        raise NotebookFailed(f"{notebook.stem}: " + "; ".join(f"seed {seed} failed (exit status {code}; see {path})"
                                                              for seed, code, path in failed))
    return {seed: results_dir / f"seed{seed}" / notebook.stem for seed, _, _ in finished}


def replicate(notebook: str | os.PathLike, seeds: Sequence[int], results_dir: str | os.PathLike, *,
              profile: str = "quick", threads: int | None = None, device: str | None = None,
              data_dir: str | os.PathLike | None = None, rerun: bool = False,
              timeout_s: int | None = None, reuse: Sequence[str | os.PathLike] = (),
              jobs: int = 1) -> dict[str, pd.DataFrame]:
    """Run ``notebook`` once per seed into ``results_dir/seed<k>/`` and tabulate its verdicts.

    A seed whose folder already holds a finished run of the same profile and thread count, made
    from the same clean git commit as now, is not run again (unless ``rerun``). ``reuse`` names
    finished runs made elsewhere, such as ``results/<notebook>`` from ``make reproduce`` (or a
    results folder, for its ``<notebook>`` subfolder): one that passes the same test (and used the
    same data folder and device) stands in for its seed, read where it is. A folder that does not
    exist is skipped.

    With ``jobs`` above 1 the seeds left to run go to separate ``python -m mmlib run`` processes,
    at most ``jobs`` at once (give each ``threads`` so they share the cores), each writing its
    output to ``results_dir/seed<k>/<notebook>.log``; with 1 they run one after another here.

    Each table of :func:`verdict_tables` is written to
    ``results_dir/<notebook>_<table>_by_seed.{csv,md}`` (their paths in the returned table's
    ``attrs["written"]``); a table no run wrote is skipped.

    Returns:
        The tables by name, the claims first.

    Raises:
        ValueError: for fewer than two distinct seeds, ``jobs`` below 1, or a notebook whose source
            names no claims table (checked before anything runs).
        mmlib.runner.NotebookFailed: when a run fails (the other seeds' runs stay on disk; under
            ``jobs`` the message names every failed seed and its log).
    """
    from mmlib.runner import run_notebook

    seeds = [int(s) for s in seeds]
    if len(set(seeds)) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"need at least two distinct seeds, got {seeds}")
    if isinstance(jobs, bool) or int(jobs) != jobs or jobs < 1:
        raise ValueError(f"jobs must be a whole number >= 1, got {jobs!r}")
    notebook = Path(notebook)
    if not notebook.is_file():
        raise FileNotFoundError(f"{notebook}: no such notebook")
    if f'"{CLAIMS_TABLE}"' not in notebook.read_text(encoding="utf-8"):
        # found before any seed is run, not after all of them (00_overview and 01_data_tour state no claims)
        raise ValueError(f"{notebook}: its source never names a {CLAIMS_TABLE!r} table, so there are no verdicts "
                         "to compare across seeds; make replicate is for the pipeline notebooks (p1-p5)")
    results_dir = Path(results_dir)
    commit = git_commit()  # what each run records: the checkout mmlib is imported from
    same = {"notebook": notebook, "data_dir": data_dir, "device": device}
    found: dict[int, Path] = {}
    for other in [] if rerun else map(Path, reuse):
        if (other / notebook.stem / "run.json").is_file():  # a results folder: its run of this notebook
            other = other / notebook.stem
        r = _reusable(other, profile, threads, commit, **same)
        if r is not None:
            found.setdefault(r.seed, other)
        elif other.exists():
            log.info("%s: not reusing %s (another commit, profile, thread count, data folder or device, a dirty "
                     "tree, or an unfinished run)", notebook.stem, other)
    runs: dict[int, Path] = {}
    pending = []
    for seed in seeds:
        run_dir = results_dir / f"seed{seed}" / notebook.stem
        if not rerun and _reusable(run_dir, profile, threads, commit, **same) is not None:
            runs[seed] = run_dir
        elif seed in found:
            runs[seed] = found[seed]
        else:
            pending.append(seed)
            continue
        log.info("%s seed %d: reusing the finished run in %s", notebook.stem, seed, runs[seed])
    options = {"profile": profile, "device": device, "data_dir": data_dir, "threads": threads, "timeout_s": timeout_s}
    if jobs > 1 and len(pending) > 1:
        runs.update(_run_in_processes(notebook, pending, results_dir, int(jobs), **options))
    for seed in [] if jobs > 1 and len(pending) > 1 else pending:
        log.info("%s seed %d: running into %s", notebook.stem, seed, results_dir / f"seed{seed}" / notebook.stem)
        runs[seed] = run_notebook(notebook, results_dir / f"seed{seed}", seed=seed, **options)
    dirs = [runs[seed] for seed in seeds]
    out = {}
    for vt in verdict_tables(notebook.stem):
        optional = vt != CLAIMS
        table = claims_by_seed(dirs, table=vt.table, key=vt.key, verdict=vt.verdict, value=vt.value,
                               ceiling=vt.ceiling, missing_ok=optional)
        if optional and table.empty:
            log.warning("%s: no run wrote the table %r with columns %s", notebook.stem, vt.table, vt.key)
            continue
        table.attrs["written"] = [str(p) for p in write_claims_table(table, results_dir)]
        out[vt.table] = table
    return out
