"""The environment files agree with each other, and generated files stay out of git."""

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _requirement_name(req: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]).lower()


def test_every_declared_dependency_is_pinned_and_within_its_range():
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for req in reqs:
        name = _requirement_name(req)
        assert name in pins, f"{name} is declared in pyproject.toml but not pinned in constraints.txt"
        assert Requirement(req).specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {req}"


def test_torch_is_pinned_to_the_same_version_everywhere():
    pins = _pins()
    assert pins["torch"] == "2.13.0"
    env = (ROOT / "environment.yml").read_text()
    assert f"torch=={pins['torch']}" in env
    assert "-c constraints.txt" in env and "python=3.11" in env and "conda-forge" in env
    # torch comes before the package so no requirement can pull a CUDA build
    assert env.index("torch==") < env.index("-e .")
    make = (ROOT / "Makefile").read_text()
    assert make.index("torch==") < make.index('-e ".[dev]"')


def test_generated_paths_are_ignored_by_git():
    for path in ("results/x/run.json", ".venv/bin/python", "data/p2/sub-001.nii.gz", "notebooks/00_overview.ipynb",
                 "model.safetensors", "ckpt.pt"):
        proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert proc.returncode == 0, f"{path} is not ignored by git"
    for path in ("notebooks/00_overview.py", "mmlib/data/manifest.py", "data_manifest/schema.md", "tests/test_results.py"):
        proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert proc.returncode == 1, f"{path} is source and must be tracked"


def test_makefile_has_the_documented_targets():
    make = (ROOT / "Makefile").read_text()
    for target in ("setup", "data", "reproduce", "test", "lab", "sync", "clean"):
        assert re.search(rf"^{target}:", make, re.MULTILINE), f"Makefile lacks target {target}"
    readme = (ROOT / "README.md").read_text()
    assert "make reproduce" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_make_setup_is_up_to_date_after_setup():
    # make test depends on setup, so by now a second setup must have nothing to do.
    proc = subprocess.run(["make", "-q", "setup"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, "make setup would run again although nothing changed"


def test_jupyterlab_kernels_get_make_reproduces_thread_count():
    # CPU results move with the thread count: a notebook run in `make lab` must match results/ by default.
    def lab(*args: str) -> str:
        proc = subprocess.run(["make", "--no-print-directory", "-n", "lab", *args], cwd=ROOT, capture_output=True,
                              text=True, check=True)
        return proc.stdout.strip().splitlines()[-1]

    assert lab().startswith("OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 ") and lab().endswith("jupyter lab --notebook-dir=.")
    assert "THREADS" not in lab("THREADS=")  # every core on request
    assert lab("THREADS=3").startswith("OMP_NUM_THREADS=3 ")
