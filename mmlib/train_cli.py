"""``python -m mmlib train``: a pipeline's training stages without a notebook.

For long ``full``-profile runs, on one process or several::

    python -m mmlib train p2 --profile full --data-dir data --out results/train_p2
    torchrun --standalone --nproc_per_node=4 -m mmlib train p2 --profile full --data-dir data

The stages are the ones the pipeline's notebook runs, every network trained through
:func:`mmlib.train.fit`, so under torchrun each global batch is split over the ranks with
DistributedDataParallel:

- P1: the five pretraining objectives, then every compared method's fine-tuning;
- P2: both autoencoders, then every backbone x setup x seed;
- P3: MoRE's contrastive pre-training (the main run), then every ablation's pre-training;
- P4: the CT autoencoder and the EHR foundation model, then the survival models on their
  embeddings (small networks on precomputed features, trained by their own early-stopping loop:
  every rank trains the same ones, and only rank 0 writes);
- P5: every model of the cross-validation, fold by fold.

Checkpoints land in ``<out>/checkpoints`` under the names the notebook uses (P1, P2, P4's
encoders): point the notebook's ``out_dir`` at ``<out>`` with ``resume=True`` and it picks them
up instead of training again. Rank 0 generates a missing cohort (the others wait), writes the
checkpoints, the tables and ``run.json`` (commit, versions, parameters, seed, device, world size,
seconds per stage).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmlib import core, distributed, results

__all__ = ["TRAINABLE", "resolve_profile", "train_pipeline"]

log = core.get_logger(__name__)


@dataclass(frozen=True)
class _Trainer:
    notebook: str  # the notebook whose out_dir layout the checkpoints follow
    cohort: str
    run: Callable[..., None]  # (cohort, prof, ckpt_dir, device, seed, resume, run or None off rank 0)


def _no_clock(history):
    """A history without its wall-clock ``seconds``: the same seed writes identical tables (run.json keeps the times)."""
    return history.drop(columns="seconds", errors="ignore")


def _p1(cohort, prof, ckpt_dir: Path, dev: torch.device, seed: int, resume: bool, run: results.Run | None) -> None:
    from mmlib.pipelines import p1

    data = p1.load_data(cohort, prof)
    with _stage(run, "pretrain"):
        pre = p1.pretrain_all(data, prof, ckpt_dir=ckpt_dir, device=dev, seed=seed, resume=resume)
    with _stage(run, "finetune"):
        ft = p1.finetune_all(data, prof, pre, ckpt_dir=ckpt_dir, device=dev, seed=seed, resume=resume)
    if run is not None:
        run.table(_no_clock(pre.history), "pretraining_history", caption="Pretraining losses per epoch and objective")
        run.table(_no_clock(ft.history), "finetuning_history", caption="Fine-tuning losses per epoch and method")
        run.table(p1.comparison_table(ft), "comparison", caption="Test ROC-AUC and balanced accuracy per method")


def _p2(cohort, prof, ckpt_dir: Path, dev: torch.device, seed: int, resume: bool, run: results.Run | None) -> None:
    from mmlib.pipelines import p2

    data = p2.load_data(cohort, prof).to(dev)
    with _stage(run, "pretrain"):
        pre = p2.pretrain_both(data, prof, ckpt_dir=ckpt_dir, device=dev, seed=seed, resume=resume)
    with _stage(run, "finetune"):
        ft = p2.finetune_all(data, prof, pre, device=dev, seeds=[seed + s for s in prof.finetune_seeds],
                             ckpt_dir=ckpt_dir, resume=resume)
    if run is not None:
        run.table(_no_clock(pre.history), "pretraining_history", caption="Pretraining L1 loss per epoch, both autoencoders")
        run.table(p2.table2(ft), "table2", caption="Test AUC per backbone and setup (P2 Table 2)")


def _p3(cohort, prof, ckpt_dir: Path, dev: torch.device, seed: int, resume: bool, run: results.Run | None) -> None:
    from mmlib.pipelines import p3

    data = p3.load_data(cohort, prof)
    with _stage(run, "pretrain"):
        model, history = p3.pretrain(data, prof, seed=seed, device=dev)
    with _stage(run, "ablations"):
        ablations, histories = p3.run_ablations(data, prof, seed=seed, device=dev, main=(model, history))
    if run is not None:
        run.table(_no_clock(history), "pretraining_history", caption="Contrastive loss per epoch (train and validation)")
        run.table(p3.retrieval_table(model, data), "retrieval", caption="Recall@k in every direction (test split)")
        run.table(ablations, "ablations", caption="Every ablation's pre-training, summarised on the test split")
        run.table(p3.ablation_differences(ablations, seed=seed), "ablation_differences",
                  caption="Ablation comparisons, paired over the test subjects (difference a - b, bootstrap 95% CI)")
        run.table(_no_clock(histories), "ablation_histories", caption="Pre-training history of every variant")


def _p4(cohort, prof, ckpt_dir: Path, dev: torch.device, seed: int, resume: bool, run: results.Run | None) -> None:
    from mmlib.pipelines import p4

    data = p4.load_data(cohort, prof)
    with _stage(run, "pretrain"):
        enc = p4.pretrain_encoders(data, prof, ckpt_dir=ckpt_dir, device=dev, seed=seed, resume=resume)
    with _stage(run, "survival"):
        emb = p4.embed(data, enc, device=dev)
        trained = p4.train_models(emb, data, prof, device=dev, seed=seed)
    if run is not None:
        run.table(_no_clock(enc.ct_history), "ct_pretraining_history", caption="CT autoencoder: L1 loss per epoch")
        run.table(_no_clock(enc.ehr_history), "ehr_pretraining_history", caption="EHR foundation model: loss per epoch")
        run.table(_no_clock(trained.history), "training_history", caption="Cox loss per epoch, model and seed")
        run.table(p4.cindex_table(trained, data, prof, seed=seed), "cindex",
                  caption="Harrell's c-index (95% bootstrap CI), internal test and external site")


def _p5(cohort, prof, ckpt_dir: Path, dev: torch.device, seed: int, resume: bool, run: results.Run | None) -> None:
    from mmlib.pipelines import p5

    data = p5.load_data(cohort, prof, seed=seed)
    with _stage(run, "cross-validation"):
        cv = p5.cross_validate(data, prof, seed=seed, device=dev)
    if run is not None:
        per_fold = p5.fold_metrics(cv, data)
        run.table(_no_clock(cv.history), "training_history", caption="Training losses per epoch, model and fold")
        run.table(per_fold, "per_fold_metrics", caption="Every model's metrics on every held-out fold")
        run.table(p5.comparison_table(per_fold), "comparison", caption="Mean and sd over folds per model")


TRAINABLE: dict[str, _Trainer] = {
    "p1": _Trainer("p1_stroke_mri_clip_itm", "stroke_mri", _p1),
    "p2": _Trainer("p2_stroke_cta_ssl_freezing", "stroke_cta", _p2),
    "p3": _Trainer("p3_more_xray_ecg_text", "xray_ecg", _p3),
    "p4": _Trainer("p4_ct_ehr_survival_fusion", "ct_ehr", _p4),
    "p5": _Trainer("p5_umeml_histology_genomics", "glioma", _p5),
}


def _stage(run: results.Run | None, name: str) -> contextlib.AbstractContextManager:
    """``run.stage(name)`` on rank 0; nothing elsewhere."""
    return run.stage(name) if run is not None else contextlib.nullcontext()


def resolve_profile(pipeline: str, profile: str, overrides: dict[str, Any] | None = None) -> Any:
    """``pipeline``'s profile ``profile`` with ``overrides`` applied (``ValueError`` naming an unknown pipeline or field)."""
    if pipeline not in TRAINABLE:
        raise ValueError(f"unknown pipeline {pipeline!r}; `python -m mmlib train` runs {sorted(TRAINABLE)}")
    from importlib import import_module

    return import_module(f"mmlib.pipelines.{pipeline}").PROFILES.get_profile(profile, **(overrides or {}))


def train_pipeline(pipeline: str, *, profile: str = "full", seed: int = 0, device: str = "auto",
                   data_dir: str | Path = "data", out_dir: str | Path | None = None, resume: bool = True,
                   overrides: dict[str, Any] | None = None) -> Path:
    """Run ``pipeline``'s training stages (see the module docstring); returns the output folder.

    Args:
        pipeline: a key of :data:`TRAINABLE`.
        profile: ``smoke`` / ``quick`` / ``full``.
        seed: cohort and training seed.
        device: ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` on one process; under torchrun each rank
            uses its own GPU (``LOCAL_RANK``) or the CPU.
        data_dir: folder of generated cohorts (or one with your own ``manifest.json``).
        out_dir: default ``results/train_<pipeline>``.
        resume: continue interrupted stages from ``<out_dir>/checkpoints``.
        overrides: profile fields to change (``--set compile=True``, ``--set precision='bf16'``); they
            are recorded in ``run.json`` with the resolved profile. Checkpoints store the
            architecture, so a changed size is not resumed from an older run's checkpoints.
    """
    from mmlib.cohorts import open_cohort

    prof = resolve_profile(pipeline, profile, overrides)
    spec = TRAINABLE[pipeline]
    out = Path(out_dir or Path("results") / f"train_{pipeline}")
    launched = distributed.launched_world_size() > 1
    dev = distributed.setup() if launched else core.select_device(device)
    try:
        core.seed_everything(seed)
        main = distributed.is_main()
        knobs = getattr(prof, "cohort_knobs", {})
        cohort = open_cohort(spec.cohort, data_dir, prof.preset, seed, **knobs) if main else None
        distributed.barrier()  # rank 0 has generated (or verified) the cohort; the others only read it
        if cohort is None:
            cohort = open_cohort(spec.cohort, data_dir, prof.preset, seed, show_progress=False, **knobs)
        run = None
        if main:
            run = results.Run(out, notebook=f"train_{pipeline}",
                              title=f"{pipeline.upper()} training stages ({profile}, {distributed.world_size()} "
                                    "process(es))",
                              params={"pipeline": pipeline, "profile": profile, "overrides": dict(overrides or {}),
                                      "seed": seed, "device": device,
                                      "data_dir": str(data_dir), "out_dir": str(out), "resume": resume,
                                      "world_size": distributed.world_size()},
                              seed=seed, device=dev, profile=prof)
        log.info("%s: profile %s on %s, rank %d of %d", pipeline, profile, core.device_name(dev), distributed.rank(),
                 distributed.world_size())
        spec.run(cohort, prof, out / "checkpoints", dev, seed, resume, run)
        distributed.barrier()
        if run is not None:
            run.finish()
    finally:
        if launched:
            distributed.cleanup()
    return out
