"""Logic of ``notebooks/01_data_tour.py``: generate the five cohorts and summarise each."""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from typing import Any

import pandas as pd

from mmlib.cohorts import GENERATORS
from mmlib.cohorts.base import recorded_checksums
from mmlib.core import Profile, ProfileSet
from mmlib.data import Cohort

__all__ = ["COHORTS", "PROFILES", "DataTourProfile", "cohort_module", "cohort_summary", "paper_sizes", "truth_table"]

# notebook order = paper order
COHORTS: tuple[str, ...] = ("stroke_mri", "stroke_cta", "xray_ecg", "ct_ehr", "glioma")


@dataclass(frozen=True)
class DataTourProfile(Profile):
    preset: str = "quick"  # the cohort preset generated (smoke | quick | full)
    workers: int = 0  # processes generating subjects; 0 = all usable cores


PROFILES = ProfileSet(
    smoke=DataTourProfile(name="smoke", preset="smoke"),
    quick=DataTourProfile(name="quick", preset="quick"),
    full=DataTourProfile(name="full", preset="full"),
)


def cohort_module(name: str) -> Any:
    """The generator module of cohort ``name`` (it holds ``tour_figures`` and ``planted_effect_checks``)."""
    return importlib.import_module(GENERATORS[name].split(":")[0])


def _folder_size(cohort: Cohort) -> tuple[int, int]:
    files = list(recorded_checksums(cohort.root))
    return len(files), sum(os.path.getsize(cohort.root / f) for f in files)


def cohort_summary(cohorts: dict[str, Cohort]) -> pd.DataFrame:
    """One row per cohort: subjects, modalities, typed columns, files and size on disk."""
    rows = []
    for name, cohort in cohorts.items():
        m = cohort.manifest
        n_files, size = _folder_size(cohort)
        split = cohort.subjects[m.split_column].value_counts().sort_index() if m.split_column else None
        rows.append(
            {
                "cohort": name,
                "paper": cohort.truth["paper"],
                "subjects": len(cohort),
                "modalities": ", ".join(f"{mod.name} ({mod.format})" for mod in m.modalities),
                "typed columns": len(m.columns),
                "long tables": ", ".join(f"{t.name} ({len(cohort.tables[t.name])} rows)" for t in m.tables) or "-",
                "splits": ", ".join(f"{k}: {v}" for k, v in split.items()) if split is not None else "-",
                "files": n_files,
                "size (MB)": round(size / 1e6, 1),
            }
        )
    return pd.DataFrame(rows)


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            _flatten(f"{prefix}[{i}]", v, out)
    else:
        text = value if isinstance(value, str) else json.dumps(value)
        out.append((prefix, text))


def truth_table(cohort: Cohort) -> pd.DataFrame:
    """The ground-truth card's causal model and knobs, one parameter per row."""
    rows: list[tuple[str, str]] = []
    _flatten("", cohort.truth["causal_model"], rows)
    knobs: list[tuple[str, str]] = []
    _flatten("", cohort.truth["knobs"], knobs)
    df = pd.DataFrame(
        [("causal model", k, v) for k, v in rows] + [("knob", k, v) for k, v in knobs],
        columns=["part", "parameter", "value"],
    )
    return df


def paper_sizes(cohorts: dict[str, Cohort]) -> list[dict[str, Any]]:
    """Rows for ``Run.paper_vs_run``: the paper's cohort proportions next to the generated ones.

    Only quantities the generators were built to match are listed (sizes are set by the preset,
    proportions by the causal model).
    """
    rows: list[dict[str, Any]] = []
    cta = cohorts.get("stroke_cta")
    if cta is not None and "finetune" in cta.subjects.columns:
        sub = cta.subjects
        ft = sub[sub["finetune"].astype(bool)]
        frac = len(ft) / len(sub)
        rel = ft["relapse_within_kappa"].astype(float).mean() if len(ft) else float("nan")
        rows.append(
            {
                "quantity": "P2: fine-tuning subset / pretraining pool (selection rule)",
                "paper reported": "119 / 491 = 24.2%",
                "this run": f"{len(ft)} / {len(sub)} = {100 * frac:.1f}%",
                "held on this data": "yes" if 0.15 <= frac <= 0.35 else "no",
            }
        )
        rows.append(
            {
                "quantity": "P2: relapses (RFS < 1642 d) in the fine-tuning subset",
                "paper reported": "41 / 119 = 34.5%",
                "this run": f"{int(ft['relapse_within_kappa'].astype(float).sum())} / {len(ft)} = {100 * rel:.1f}%",
                "held on this data": "yes" if 0.2 <= rel <= 0.5 else "no",
            }
        )
    return rows


def tour_cohort(run: Any, name: str, prof: DataTourProfile, seed: int, data_dir: str) -> dict[str, Any]:
    """Generate (or reuse) cohort ``name``, save its figures, truth card and planted-effect checks.

    Returns a dict with ``cohort``, ``checks`` (DataFrame), ``truth`` (DataFrame) and
    ``figures`` (name -> matplotlib Figure, already saved to the run; display them).
    """
    from mmlib.cohorts import generate

    module = cohort_module(name)
    with run.stage(f"generate {name}"):
        cohort = generate(name, prof.preset, seed, data_dir, workers=prof.workers or None)
    with run.stage(f"figures {name}"):
        figures = module.tour_figures(cohort)
        for fig_name, fig in figures.items():
            run.figure(fig, f"{name}_{fig_name}", caption=_caption(fig, name, fig_name))
    with run.stage(f"checks {name}"):
        checks = module.planted_effect_checks(cohort)
    checks = checks.assign(cohort=name)[["cohort", *[c for c in checks.columns if c != "cohort"]]]
    run.table(checks, f"{name}_planted_effects", caption=f"{name}: planted effects measured in the generated data")
    truth = truth_table(cohort)
    run.table(truth, f"{name}_truth", caption=f"{name}: ground-truth card (causal model parameters and knobs)")
    return {"cohort": cohort, "checks": checks, "truth": truth, "figures": figures}


def _caption(fig: Any, name: str, fig_name: str) -> str:
    title = fig._suptitle.get_text() if getattr(fig, "_suptitle", None) is not None else ""
    return f"{name}: {title or fig_name.replace('_', ' ')}"
