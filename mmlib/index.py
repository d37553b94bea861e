"""``results/index.html``: one offline page that links every notebook's tables and figures.

Built from what is on disk (each ``results/<notebook>/run.json`` and the files it lists), so
it can be rebuilt at any time with ``python -m mmlib index``. The page has no external
resources: styles are inline and figures are linked by relative path, so it opens from a
folder or a zip file without a network.
"""

from __future__ import annotations

import csv
import html
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmlib.results import PAPER_VS_RUN, atomic_write_text, git_commit

__all__ = ["build_index", "collect_runs"]

MAX_ROWS = 60
COLLAPSE_ROWS = 12

_CSS = """
:root { --fg:#1d2330; --muted:#5b6475; --line:#d9dee7; --bg:#ffffff; --panel:#f6f8fb;
        --ok:#1a7f37; --bad:#c62828; --warn:#9a6700; --accent:#2557a7; }
* { box-sizing: border-box; }
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: var(--fg); background: var(--bg); margin: 0; }
header { padding: 28px 40px 18px; border-bottom: 1px solid var(--line); background: var(--panel); }
header h1 { margin: 0 0 4px; font-size: 24px; }
header p { margin: 2px 0; color: var(--muted); }
main { padding: 8px 40px 60px; max-width: 1400px; }
h2 { margin-top: 40px; padding-top: 12px; border-top: 2px solid var(--line); font-size: 20px; }
h3 { font-size: 16px; margin: 22px 0 6px; }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
table { border-collapse: collapse; margin: 6px 0 4px; font-size: 13.5px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: var(--panel); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.caption { color: var(--muted); font-size: 13px; margin: 2px 0 2px; }
.meta { color: var(--muted); font-size: 13px; }
.status-complete { color: var(--ok); font-weight: 600; }
.status-failed { color: var(--bad); font-weight: 600; }
.held-yes { color: var(--ok); font-weight: 600; } .held-no { color: var(--bad); font-weight: 600; }
.held-partly { color: var(--warn); font-weight: 600; }
.error { background: #fdecea; border: 1px solid #f5c2c0; padding: 10px 14px; white-space: pre-wrap;
         font-family: ui-monospace, Menlo, monospace; font-size: 13px; }
.figs { display: flex; flex-wrap: wrap; gap: 18px; }
figure { margin: 0; max-width: 640px; border: 1px solid var(--line); padding: 8px; background: #fff; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
.pvr { border: 2px solid var(--accent); padding: 6px 14px 10px; background: #f3f7ff; }
.note { color: var(--muted); font-size: 12.5px; }
summary { cursor: pointer; color: var(--accent); font-size: 13px; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _display_number(text: str) -> str:
    """Four significant digits for reading; the CSV beside the page keeps the full value."""
    if re.fullmatch(r"[+-]?\d+", text.strip()):
        return text
    return f"{float(text):.4g}"


def _held_class(text: str) -> str:
    word = text.strip().lower().split(" ")[0].rstrip(",.;:") if text.strip() else ""
    return {"yes": "held-yes", "no": "held-no", "partly": "held-partly"}.get(word, "")


def _csv_table(path: Path, max_rows: int = MAX_ROWS, verdict_columns: Sequence[str] = ("held on this data",)) -> str:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return "<p class='note'>(empty table)</p>"
    header, body = rows[0], rows[1:]
    held_cols = {j for j, h in enumerate(header) if h in verdict_columns}
    out = ["<table><thead><tr>", *(f"<th>{_e(h)}</th>" for h in header), "</tr></thead><tbody>"]
    for row in body[:max_rows]:
        out.append("<tr>")
        for j, cell in enumerate(row):
            cls = "num" if _is_number(cell) else ""
            shown = _display_number(cell) if cls else cell
            if j in held_cols:
                cls = _held_class(cell)
            out.append(f"<td class='{cls}'>{_e(shown)}</td>" if cls else f"<td>{_e(shown)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    if len(body) > max_rows:
        out.append(f"<p class='note'>showing {max_rows} of {len(body)} rows; the CSV has all of them.</p>")
    return "".join(out)


def collect_runs(results_dir: str | Path) -> list[dict[str, Any]]:
    """One entry per notebook result under ``results_dir``: finished runs and failed ones."""
    results_dir = Path(results_dir)
    runs: dict[str, dict[str, Any]] = {}
    if not results_dir.exists():
        return []
    for sub in sorted(p for p in results_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name.endswith(".running"):
            continue
        failed = sub.name.endswith(".failed")
        name = sub.name[: -len(".failed")] if failed else sub.name
        record: dict[str, Any] = {}
        if (sub / "run.json").exists():
            try:
                record = json.loads((sub / "run.json").read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                record = {}
        elif not failed:
            continue
        entry = {"name": name, "dir": sub, "record": record, "failed": failed}
        if failed:
            err = sub / "ERROR.txt"
            entry["error"] = err.read_text(encoding="utf-8") if err.exists() else "failed (no message recorded)"
            runs.setdefault(name, {"name": name, "dir": None, "record": {}, "failed": False})["failure"] = entry
        else:
            runs.setdefault(name, {}).update(entry)
    return [runs[k] for k in sorted(runs)]


def _links(sub: Path, root: Path, name: str) -> str:
    links = []
    for label, fname in (("report (HTML)", f"{name}.html"), ("notebook (.ipynb)", f"{name}.ipynb"), ("run.json", "run.json")):
        if (sub / fname).exists():
            links.append(f"<a href='{_e((sub / fname).relative_to(root).as_posix())}'>{label}</a>")
    return " · ".join(links)


def _fmt_seconds(value: Any) -> str:
    try:
        s = float(value)
    except (TypeError, ValueError):
        return ""
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _section(entry: dict[str, Any], root: Path) -> str:
    name = entry["name"]
    parts = [f"<h2 id='{_e(name)}'>{_e(name)}</h2>"]
    failure = entry.get("failure")
    if failure:
        fdir = failure["dir"]
        parts.append(
            f"<p class='status-failed'>The last execution failed.</p><div class='error'>{_e(failure['error'])}</div>"
            f"<p class='meta'>{_links(fdir, root, name)}</p>"
        )
    if entry.get("dir") is None:
        return "\n".join(parts)
    sub, rec = entry["dir"], entry["record"]
    env = rec.get("environment", {})
    git = rec.get("git", {})
    commit = str(git.get("commit", "unknown"))[:10] + (" (uncommitted changes)" if git.get("dirty") else "")
    if rec.get("title"):
        parts.append(f"<p><strong>{_e(rec['title'])}</strong></p>")
    parts.append(
        "<p class='meta'>"
        f"profile <b>{_e(rec.get('params', {}).get('profile', '?'))}</b> · seed {_e(rec.get('seed'))} · "
        f"device {_e(env.get('device', '?'))} ({_e(env.get('device_name', ''))}, {_e(env.get('autocast', ''))}) · "
        f"{_e(env.get('torch_threads', '?'))} CPU threads · "
        f"commit {_e(commit)} · wall {_e(_fmt_seconds(rec.get('execution', {}).get('notebook_wall_s', rec.get('wall_s'))))}"
        f"<br>{_links(sub, root, name)}</p>"
    )
    artifacts = rec.get("artifacts") or []
    tables = [a for a in artifacts if a.get("kind") == "table"]
    figures = [a for a in artifacts if a.get("kind") == "figure"]
    pvr = [a for a in tables if a["name"] == PAPER_VS_RUN]
    if pvr and (sub / "tables" / f"{PAPER_VS_RUN}.csv").exists():
        parts.append(
            "<div class='pvr'><h3>Paper reported vs this run</h3>"
            f"{_csv_table(sub / 'tables' / f'{PAPER_VS_RUN}.csv')}"
            "<p class='note'>'paper reported' is copied from the paper; 'this run' was computed in the execution above.</p></div>"
        )
    if figures:
        parts.append("<h3>Figures</h3><div class='figs'>")
        for art in figures:
            png = sub / "figures" / f"{art['name']}.png"
            if not png.exists():
                continue
            rel = png.relative_to(root).as_posix()
            svg = rel[:-4] + ".svg"
            parts.append(
                f"<figure><a href='{_e(rel)}'><img src='{_e(rel)}' alt='{_e(art['name'])}' loading='lazy'></a>"
                f"<figcaption><b>{_e(art['name'])}</b>{(' — ' + _e(art['caption'])) if art.get('caption') else ''}"
                f" · <a href='{_e(svg)}'>SVG</a></figcaption></figure>"
            )
        parts.append("</div>")
    for art in tables:
        if art["name"] == PAPER_VS_RUN:
            continue
        csv_path = sub / "tables" / f"{art['name']}.csv"
        if not csv_path.exists():
            continue
        rel = csv_path.relative_to(root).as_posix()
        table = _csv_table(csv_path)
        n_rows = table.count("<tr>") - 1
        if n_rows > COLLAPSE_ROWS:
            table = f"<details><summary>{n_rows} rows (click to show)</summary>{table}</details>"
        parts.append(
            f"<h3>{_e(art['name'])}</h3>"
            + (f"<p class='caption'>{_e(art['caption'])}</p>" if art.get("caption") else "")
            + table
            + f"<p class='note'><a href='{_e(rel)}'>CSV</a> · <a href='{_e(rel[:-4] + '.md')}'>Markdown</a></p>"
        )
    stages = rec.get("stages_s") or {}
    if stages:
        parts.append(
            "<p class='meta'>wall time per stage: "
            + ", ".join(f"{_e(k)} {_e(_fmt_seconds(v))}" for k, v in stages.items())
            + "</p>"
        )
    return "\n".join(parts)


def _replicates_section(root: Path) -> str:
    """The tables ``make replicate`` wrote under ``root/replicates``: each verdict at every seed."""
    tables = sorted((root / "replicates").glob("*_by_seed.csv"))
    if not tables:
        return ""
    intro = ("<section id='replicates'><h2>Do the verdicts replicate?</h2>"
             "<p>Each notebook run at several seeds (<code>make replicate</code>): a new cohort draw, new initial "
             "weights and new batches each time. A verdict is only as firm as its agreement across seeds.</p>")
    out = [intro]
    for path in tables:
        md = path.with_suffix(".md")
        caption = md.read_text(encoding="utf-8").split("\n\n", 1)[0] if md.exists() else path.stem
        with path.open(newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
        verdicts = [h for h in header if h.startswith("seed ") or h == "same at every seed"]
        rel = path.relative_to(root).as_posix()
        out.append(f"<h3>{_e(path.stem)}</h3><p class='caption'>{_e(caption)} "
                   f"<a href='{_e(rel)}'>csv</a></p>{_csv_table(path, verdict_columns=verdicts)}")
    out.append("</section>")
    return "".join(out)


def build_index(results_dir: str | Path) -> Path:
    """Write ``results_dir/index.html`` from the runs found there; returns its path."""
    root = Path(results_dir)
    root.mkdir(parents=True, exist_ok=True)
    runs = collect_runs(root)
    summary = [
        "<table><thead><tr><th>notebook</th><th>title</th><th>status</th><th>profile</th>"
        "<th>device</th><th>wall time</th><th>tables</th><th>figures</th></tr></thead><tbody>"
    ]
    for entry in runs:
        rec = entry.get("record") or {}
        arts = rec.get("artifacts") or []
        if entry.get("failure") and entry.get("dir") is None:
            status = "<span class='status-failed'>failed</span>"
        elif entry.get("failure"):
            status = "<span class='status-failed'>last run failed</span> (older result shown)"
        else:
            st = rec.get("status", "?")
            status = f"<span class='status-{_e(st)}'>{_e(st)}</span>"
        summary.append(
            f"<tr><td><a href='#{_e(entry['name'])}'>{_e(entry['name'])}</a></td><td>{_e(rec.get('title', ''))}</td>"
            f"<td>{status}</td><td>{_e(rec.get('params', {}).get('profile', ''))}</td>"
            f"<td>{_e(rec.get('environment', {}).get('device', ''))}</td>"
            f"<td class='num'>{_e(_fmt_seconds(rec.get('execution', {}).get('notebook_wall_s', rec.get('wall_s'))))}</td>"
            f"<td class='num'>{sum(a.get('kind') == 'table' for a in arts)}</td>"
            f"<td class='num'>{sum(a.get('kind') == 'figure' for a in arts)}</td></tr>"
        )
    summary.append("</tbody></table>")
    git = git_commit()
    body = "\n".join(_section(e, root) for e in runs) if runs else "<p>No results yet: run <code>make reproduce</code>.</p>"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mmlib results</title><style>{_CSS}</style></head>
<body><header><h1>mmlib — results</h1>
<p>Reproducible companion to five multimodal medical-AI papers. Every number below was computed by the
notebook run it belongs to, on generated cohorts with planted ground truth unless stated otherwise.</p>
<p>code commit {_e(str(git.get('commit', 'unknown'))[:10])}{' (uncommitted changes)' if git.get('dirty') else ''} ·
{len(runs)} notebook(s)</p></header>
<main><h2 style="border-top:none">Notebooks</h2>
{''.join(summary)}
{body}
{_replicates_section(root)}
</main></body></html>
"""
    return atomic_write_text(root / "index.html", page)
