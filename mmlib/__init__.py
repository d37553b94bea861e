"""mmlib: the thin library behind the notebooks of the multimodal medical-AI companion.

Layers (each imports only from layers below it)::

    mmlib.pipelines.*   one module per notebook: its stages as plain functions
    mmlib.runner        executes notebooks with papermill (make reproduce)
    mmlib.index         results/index.html
    mmlib.results       the one writer of tables, figures and run.json
    mmlib.metrics       metrics as plain functions
    mmlib.papers        the five papers and their notebooks
    mmlib.core          device, precision, seeding, profiles, logging, progress bars
"""

import warnings as _warnings
from importlib import metadata as _metadata

# tqdm.auto, imported by MONAI's and transformers' modules inside a Jupyter kernel, warns
# "IProgress not found. Please update jupyter and ipywidgets" and falls back to a text bar. The
# notebooks' bars are text bars by design (mmlib.core.progress; off under `make reproduce`),
# so the advice is noise in every executed notebook.
_warnings.filterwarnings("ignore", message="IProgress not found")

try:
    __version__ = _metadata.version("mmlib")
except _metadata.PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
