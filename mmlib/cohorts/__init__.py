"""Generated cohorts with planted, known ground truth: one structural causal model per paper.

``generate("stroke_mri", "quick", seed=0)`` writes (or verifies and reuses) a cohort under the
data folder and returns it loaded through the same :func:`mmlib.data.load_cohort` path a
user's real data takes. Each generator's knobs are fields of its ``Knobs`` dataclass; pass
them as keyword arguments to change one (``generate("stroke_cta", "quick", image_signal=0)``).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from mmlib.cohorts.base import CohortGenerator, CohortKnobs, CohortPlan, SubjectFiles
from mmlib.core import get_logger
from mmlib.data.manifest import MANIFEST_NAME, Cohort, load_cohort

log = get_logger(__name__)

__all__ = [
    "GENERATORS",
    "CohortGenerator",
    "CohortKnobs",
    "CohortPlan",
    "SubjectFiles",
    "generate",
    "generator",
    "open_cohort",
]

# cohort name -> "module:Class"; modules import lazily (nilearn, neurokit2 are slow to import)
GENERATORS: dict[str, str] = {
    "stroke_mri": "mmlib.cohorts.stroke_mri:StrokeMRI",
    "stroke_cta": "mmlib.cohorts.stroke_cta:StrokeCTA",
    "xray_ecg": "mmlib.cohorts.xray_ecg:XrayECGReports",
    "ct_ehr": "mmlib.cohorts.ct_ehr:CTEHR",
    "glioma": "mmlib.cohorts.glioma:Glioma",
}


def generator(name: str, preset: str = "quick", **knobs: Any) -> CohortGenerator:
    """The generator called ``name`` at ``preset`` with some knobs changed."""
    if name not in GENERATORS:
        raise ValueError(f"unknown cohort {name!r}; choose one of {sorted(GENERATORS)}")
    module, cls = GENERATORS[name].split(":")
    return getattr(importlib.import_module(module), cls)(preset, **knobs)


def generate(
    name: str,
    preset: str = "quick",
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    *,
    workers: int | None = None,
    show_progress: bool = True,
    **knobs: Any,
) -> Cohort:
    """Write (or verify and reuse) a generated cohort and return it loaded and validated."""
    return generator(name, preset, **knobs).generate(data_dir, seed, workers=workers, show_progress=show_progress)


def open_cohort(
    name: str,
    data_dir: str | os.PathLike | None,
    preset: str = "quick",
    seed: int = 0,
    *,
    show_progress: bool = True,
    **knobs: Any,
) -> Cohort:
    """What a pipeline notebook calls with its ``data_dir`` parameter.

    If ``data_dir`` holds a ``manifest.json``, it is the user's own cohort (real data in the
    manifest schema): it is loaded and validated, and ``preset``/``seed``/knobs are ignored.
    Otherwise ``data_dir`` is the folder of generated cohorts, and cohort ``name`` is generated
    there (or verified and reused).
    """
    if data_dir is not None and (Path(data_dir) / MANIFEST_NAME).is_file():
        cohort = load_cohort(data_dir)
        log.info("using the cohort in %s (%s, %d subjects); generator knobs do not apply", data_dir, cohort.name, len(cohort))
        return cohort
    return generate(name, preset, seed, data_dir, show_progress=show_progress, **knobs)
