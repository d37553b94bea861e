"""Command line: ``python -m mmlib run|index|list`` (the Makefile calls these).

Examples::

    python -m mmlib run notebooks/00_overview.py --profile quick
    python -m mmlib index results
    python -m mmlib list --prefix p2
"""

from __future__ import annotations

import argparse
import sys


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
        )
    except NotebookFailed as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    return 0 if final.exists() else 1


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
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="papermill's per-cell progress bar (default: when stderr is a terminal)")
    run.set_defaults(func=_cmd_run)

    index = sub.add_parser("index", help="(re)build results/index.html")
    index.add_argument("results", nargs="?", default="results")
    index.set_defaults(func=_cmd_index)

    lst = sub.add_parser("list", help="list notebooks whose name starts with a prefix")
    lst.add_argument("--notebooks", default="notebooks")
    lst.add_argument("--prefix", default="")
    lst.set_defaults(func=_cmd_list)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
