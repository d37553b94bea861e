"""``python -m mmlib train``: a pipeline's training stages without a notebook.

For long ``full``-profile runs, on one process or several::

    python -m mmlib train p2 --profile full --data-dir data --out results/train_p2
    torchrun --standalone --nproc_per_node=4 -m mmlib train p2 --profile full --data-dir data

The stages are the ones the pipeline's notebook runs (P1: the five pretraining objectives, then
every compared method's fine-tuning; P2: both autoencoders, then every backbone x setup x seed),
through :func:`mmlib.train.fit`, so under torchrun each global batch is split over the ranks
with DistributedDataParallel. Checkpoints land in ``<out>/checkpoints`` under the names the
notebook uses: point the notebook's ``out_dir`` at ``<out>`` with ``resume=True`` and it
picks them up instead of training again. Rank 0 generates a missing cohort (the others wait),
writes the checkpoints, the loss histories and ``run.json`` (commit, versions, parameters, seed,
device, world size, seconds per stage).

Only pipelines whose training goes through :func:`mmlib.train.fit` are offered (P1, P2); P3,
P4 and P5 train in their own loops and run from their notebooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mmlib import core, distributed, results

__all__ = ["TRAINABLE", "train_pipeline"]

log = core.get_logger(__name__)


@dataclass(frozen=True)
class _Trainer:
    notebook: str  # the notebook whose out_dir layout the checkpoints follow
    cohort: str
    run: Callable[..., None]  # (cohort, prof, ckpt_dir, device, seed, resume, run or None off rank 0)


def _p1(cohort, prof, ckpt_dir: Path, dev: torch.device, seed: int, resume: bool, run: results.Run | None) -> None:
    from mmlib.pipelines import p1

    data = p1.load_data(cohort, prof)
    with _stage(run, "pretrain"):
        pre = p1.pretrain_all(data, prof, ckpt_dir=ckpt_dir, device=dev, seed=seed, resume=resume)
    with _stage(run, "finetune"):
        ft = p1.finetune_all(data, prof, pre, ckpt_dir=ckpt_dir, device=dev, seed=seed, resume=resume)
    if run is not None:
        run.table(pre.history, "pretraining_history", caption="Pretraining losses per epoch and objective")
        run.table(ft.history, "finetuning_history", caption="Fine-tuning losses per epoch and method")
        run.table(p1.comparison_table(ft), "comparison", caption="Test ROC-AUC and balanced accuracy per method")


def _p2(cohort, prof, ckpt_dir: Path, dev: torch.device, seed: int, resume: bool, run: results.Run | None) -> None:
    from mmlib.pipelines import p2

    data = p2.load_data(cohort, prof)
    with _stage(run, "pretrain"):
        pre = p2.pretrain_both(data, prof, ckpt_dir=ckpt_dir, device=dev, seed=seed, resume=resume)
    with _stage(run, "finetune"):
        ft = p2.finetune_all(data, prof, pre, device=dev, seeds=[seed + s for s in prof.finetune_seeds],
                             ckpt_dir=ckpt_dir, resume=resume)
    if run is not None:
        run.table(pre.history, "pretraining_history", caption="Pretraining L1 loss per epoch, both autoencoders")
        run.table(p2.table2(ft), "table2", caption="Test AUC per backbone and setup (P2 Table 2)")


TRAINABLE: dict[str, _Trainer] = {
    "p1": _Trainer("p1_stroke_mri_clip_itm", "stroke_mri", _p1),
    "p2": _Trainer("p2_stroke_cta_ssl_freezing", "stroke_cta", _p2),
}


def _stage(run: results.Run | None, name: str) -> contextlib.AbstractContextManager:
    """``run.stage(name)`` on rank 0; nothing elsewhere."""
    return run.stage(name) if run is not None else contextlib.nullcontext()


def train_pipeline(pipeline: str, *, profile: str = "full", seed: int = 0, device: str = "auto",
                   data_dir: str | Path = "data", out_dir: str | Path | None = None, resume: bool = True) -> Path:
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
    """
    if pipeline not in TRAINABLE:
        raise ValueError(f"unknown pipeline {pipeline!r}; `python -m mmlib train` runs {sorted(TRAINABLE)} "
                         "(P3-P5 train in their own loops: run their notebooks)")
    from importlib import import_module

    from mmlib.cohorts import open_cohort

    spec = TRAINABLE[pipeline]
    prof = import_module(f"mmlib.pipelines.{pipeline}").PROFILES.get_profile(profile)
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
                              params={"pipeline": pipeline, "profile": profile, "seed": seed, "device": device,
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
