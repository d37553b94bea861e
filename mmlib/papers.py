"""The five papers this companion re-implements, and the notebook that runs each.

The spec of every pipeline is ``shared/PAPERS.md`` (kept outside the package); this registry
is what the overview notebook and the results index need: titles, modalities and notebook
names. Numbers a paper reports live beside each pipeline and are always labelled
"paper reported".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

__all__ = ["PAPERS", "Paper", "pipeline_status"]


@dataclass(frozen=True)
class Paper:
    key: str
    title: str
    reference: str
    modalities: str
    task: str
    notebook: str


PAPERS: tuple[Paper, ...] = (
    Paper("P1", "Stroke risk prediction with a multimodal foundation model", "arXiv 2411.09822",
          "3D brain FLAIR MRI + clinical table", "stroke risk (binary); CLIP + image-tabular matching",
          "p1_stroke_mri_clip_itm"),
    Paper("P2", "Vision's potential unlocked: pretraining and strategic fine-tuning for stroke relapse",
          "MIDL 2026 submission", "3D CTA + 4 attributes", "relapse-free survival; SSL autoencoders, freezing, modality contribution",
          "p2_stroke_cta_ssl_freezing"),
    Paper("P3", "MoRE: contrastive pre-training on X-rays, ECGs and reports", "arXiv 2410.16239",
          "chest X-ray + 12-lead ECG + report text", "zero-shot classification, retrieval; LoRA text encoder",
          "p3_more_xray_ecg_text"),
    Paper("P4", "Fusion is not one-size-fits-all: cross-modal alignment for time-to-event modelling", "",
          "CT + longitudinal EHR", "time-to-event; late / contrastive / cross- / co-attention fusion",
          "p4_ct_ehr_survival_fusion"),
    Paper("P5", "UMEML: unified modelling for precision neuro-oncology", "arXiv 2406.07078",
          "histology patch features + RNA genomics", "grading, classification, survival; modularity loss, register tokens",
          "p5_umeml_histology_genomics"),
)


def pipeline_status(notebook_dir: str | Path) -> pd.DataFrame:
    """One row per paper: its notebook and whether that notebook exists yet in ``notebook_dir``."""
    notebook_dir = Path(notebook_dir)
    rows = []
    for p in PAPERS:
        present = (notebook_dir / f"{p.notebook}.py").exists()
        rows.append({
            "paper": p.key,
            "title": p.title,
            "reference": p.reference,
            "modalities": p.modalities,
            "task": p.task,
            "notebook": f"notebooks/{p.notebook}.py",
            "status": "available" if present else "planned",
        })
    return pd.DataFrame(rows)
