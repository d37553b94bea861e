"""Command line: ``python -m mmlib run|replicate|claims|train|index|list|generate|validate|schema`` (the Makefile calls these).

Examples::

    python -m mmlib run notebooks/00_overview.py --profile quick
    python -m mmlib replicate notebooks/p5_umeml_histology_genomics.py --seeds 0 1 2
    python -m mmlib claims results/replicates/seed*/p5_umeml_histology_genomics
    python -m mmlib claims results/replicates/seed*/p1_stroke_mri_clip_itm --table gradcam_by_stage \
        --key method stage map --verdict verdict --value ratio_to_random --ceiling grid_ceiling
    python -m mmlib train p2 --profile full
    torchrun --standalone --nproc_per_node=2 -m mmlib train p1 --profile full
    python -m mmlib index results
    python -m mmlib list --prefix p2
    python -m mmlib generate stroke_cta --preset quick --seed 0 --set image_signal=0
    python -m mmlib validate data/stroke_cta-quick-seed0
"""

from __future__ import annotations

import argparse
import sys


def _fail(err: Exception) -> int:
    """Print the error; exit status 1 for a notebook that failed, 2 for bad input."""
    from mmlib.runner import NotebookFailed

    print(f"ERROR: {err}", file=sys.stderr)
    return 1 if isinstance(err, NotebookFailed) else 2


def _cmd_run(args: argparse.Namespace) -> int:
    from mmlib.runner import NotebookFailed, run_notebook

    try:
        final = run_notebook(
            args.notebook,
            args.results,
            profile=args.profile,
            seed=args.seed,
            device=args.device,
            data_dir=args.data_dir,
            progress_bar=sys.stderr.isatty() if args.progress is None else args.progress,
            timeout_s=args.timeout,
            threads=args.threads,
        )
    except (NotebookFailed, FileNotFoundError, ValueError) as err:
        return _fail(err)
    return 0 if final.exists() else 1


def _print_claims(table, paths) -> None:
    from mmlib.replicates import claims_caption

    print(claims_caption(table))
    print(table.drop(columns=["paper reported"], errors="ignore").to_string(index=False, max_colwidth=70))
    print("written: " + ", ".join(map(str, paths)) + "\n")


def _cmd_replicate(args: argparse.Namespace) -> int:
    from mmlib.replicates import replicate
    from mmlib.runner import NotebookFailed

    try:
        tables = replicate(args.notebook, args.seeds, args.results, profile=args.profile, threads=args.threads,
                           device=args.device, data_dir=args.data_dir, rerun=args.rerun, timeout_s=args.timeout,
                           reuse=args.reuse, jobs=args.jobs)
    except (NotebookFailed, FileNotFoundError, ValueError) as err:
        return _fail(err)
    for table in tables.values():
        _print_claims(table, table.attrs["written"])
    return 0


def _cmd_claims(args: argparse.Namespace) -> int:
    from mmlib.replicates import claims_by_seed, write_claims_table

    try:
        if args.ceiling and not args.value:
            raise ValueError("--ceiling needs --value: the ceiling is shown after the value")
        table = claims_by_seed(args.runs, table=args.table, key=args.key, verdict=args.verdict, value=args.value,
                               ceiling=args.ceiling)
        paths = write_claims_table(table, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    _print_claims(table, paths)
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from mmlib.index import build_index

    print(f"index: {build_index(args.results)}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from mmlib.runner import find_notebooks

    try:
        for p in find_notebooks(args.notebooks, args.prefix):
            print(p.stem)
    except FileNotFoundError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    return 0


def _parse_knob(text: str) -> tuple[str, object]:
    import ast

    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set expects NAME=VALUE, got {text!r}")
    try:
        return name.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name.strip(), value  # a bare string such as left


def _cmd_generate(args: argparse.Namespace) -> int:
    from mmlib.cohorts import GENERATORS, generate

    names = sorted(GENERATORS) if args.cohort == "all" else [args.cohort]
    for name in names:
        try:
            cohort = generate(name, args.preset, args.seed, args.data_dir, workers=args.workers, **dict(args.set))
        except ValueError as err:
            print(f"ERROR: {err}", file=sys.stderr)
            return 2
        print(f"{name}: {len(cohort)} subjects in {cohort.root}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from mmlib.data import ManifestError, load_cohort

    try:
        cohort = load_cohort(args.path)
    except ManifestError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    print(f"{cohort.root}: valid, {len(cohort)} subjects, modalities {[m.name for m in cohort.manifest.modalities]}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mmlib.train_cli import train_pipeline

    try:
        out = train_pipeline(args.pipeline, profile=args.profile, seed=args.seed, device=args.device,
                             data_dir=args.data_dir, out_dir=args.out, resume=args.resume, overrides=dict(args.set))
    except (FileNotFoundError, ValueError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    print(f"{args.pipeline}: checkpoints and histories in {out}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    import json

    from mmlib.data import Manifest
    from mmlib.results import atomic_write_text

    path = atomic_write_text(args.out, json.dumps(Manifest.model_json_schema(), indent=2) + "\n")
    print(f"schema: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmlib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="execute one notebook with papermill into results/<name>/")
    run.add_argument("notebook", help="a jupytext .py notebook")
    run.add_argument("--profile", default="quick", choices=("smoke", "quick", "full"))
    run.add_argument("--results", default="results", help="results root (default: results)")
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    run.add_argument("--data-dir", default=None)
    run.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    run.add_argument("--threads", type=int, default=None,
                     help="CPU threads of the notebook's torch (default: every usable core; make reproduce: its THREADS, 2 by default)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="papermill's per-cell progress bar (default: when stderr is a terminal)")
    run.set_defaults(func=_cmd_run)

    rep = sub.add_parser("replicate", help="run one notebook at several seeds and tabulate its claims' verdicts")
    rep.add_argument("notebook", help="a jupytext .py notebook that writes a claims table")
    rep.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    rep.add_argument("--profile", default="quick", choices=("smoke", "quick", "full"))
    rep.add_argument("--results", default="results/replicates",
                     help="runs go to <results>/seed<k>/<notebook>/ (default: results/replicates)")
    rep.add_argument("--threads", type=int, default=None,
                     help="CPU threads of every run (default: every usable core; make replicate: its THREADS, 2); "
                          "the runs of one table must agree")
    rep.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    rep.add_argument("--data-dir", default=None)
    rep.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    rep.add_argument("--rerun", action="store_true",
                     help="run every seed again, even those with a finished run of this commit")
    rep.add_argument("--reuse", nargs="*", default=[], metavar="RUN_DIR",
                     help="finished runs made elsewhere (a run folder, or a results folder holding <notebook>/ as make "
                          "reproduce leaves it); one stands in for its seed when made from this clean commit with "
                          "the same profile, threads, data folder and device")
    rep.add_argument("--jobs", type=int, default=1,
                     help="seeds run at once, each in its own process (default 1; make replicate: its JOBS, "
                          "cores / THREADS)")
    rep.set_defaults(func=_cmd_replicate)

    cl = sub.add_parser("claims", help="tabulate the claims of finished runs of one notebook, one per seed")
    cl.add_argument("runs", nargs="+", help="results folders (results/<notebook>), one per seed")
    cl.add_argument("--out", default=".", help="folder for <notebook>_<table>_by_seed.{csv,md} (default: .)")
    cl.add_argument("--table", default="claims", help="another table with a verdict column (default: claims)")
    cl.add_argument("--key", nargs="+", default=["claim"], help="column(s) naming a row (default: claim)")
    cl.add_argument("--verdict", default="held", help="the verdict column (default: held)")
    cl.add_argument("--value", default=None, help="a column to show beside each verdict, e.g. ratio_to_random")
    cl.add_argument("--ceiling", default=None, help="a column shown after the value as value / ceiling, e.g. grid_ceiling")
    cl.set_defaults(func=_cmd_claims)

    tr = sub.add_parser("train", help="a pipeline's training stages without a notebook (one process or torchrun)")
    tr.add_argument("pipeline", choices=("p1", "p2", "p3", "p4", "p5"))
    tr.add_argument("--profile", default="full", choices=("smoke", "quick", "full"))
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun: each rank's own GPU)")
    tr.add_argument("--data-dir", default="data")
    tr.add_argument("--out", default=None, help="default results/train_<pipeline>")
    tr.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                    help="continue interrupted stages from <out>/checkpoints (default: on)")
    tr.add_argument("--set", action="append", type=_parse_knob, default=[], metavar="FIELD=VALUE",
                    help="change one profile field, e.g. --set compile=True or --set precision=bf16 (repeatable)")
    tr.set_defaults(func=_cmd_train)

    index = sub.add_parser("index", help="(re)build results/index.html")
    index.add_argument("results", nargs="?", default="results")
    index.set_defaults(func=_cmd_index)

    lst = sub.add_parser("list", help="list notebooks whose name starts with a prefix")
    lst.add_argument("--notebooks", default="notebooks")
    lst.add_argument("--prefix", default="")
    lst.set_defaults(func=_cmd_list)

    gen = sub.add_parser("generate", help="write (or verify) generated cohorts under the data folder")
    gen.add_argument("cohort", help="stroke_mri, stroke_cta, xray_ecg, ct_ehr, glioma or all")
    gen.add_argument("--preset", default="quick", choices=("smoke", "quick", "full"))
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--data-dir", default=None, help="default: $MMLIB_DATA_DIR or data/ in this checkout")
    gen.add_argument("--workers", type=int, default=None, help="processes (default: usable cores)")
    gen.add_argument("--set", action="append", type=_parse_knob, default=[], metavar="KNOB=VALUE",
                     help="change one knob, e.g. --set image_signal=0 (repeatable)")
    gen.set_defaults(func=_cmd_generate)

    val = sub.add_parser("validate", help="check a cohort folder against its manifest.json")
    val.add_argument("path", help="cohort folder or its manifest.json")
    val.set_defaults(func=_cmd_validate)

    sch = sub.add_parser("schema", help="write the manifest JSON schema")
    sch.add_argument("--out", default="data_manifest/schema/manifest.schema.json")
    sch.set_defaults(func=_cmd_schema)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
