"""Readers for the real formats the five pipelines meet, built on MONAI, pydicom and wfdb.

- 3D volumes (NIfTI: UK Biobank FLAIR for P1, CTA for P2, CT for P4): :func:`volume_transforms`
  builds the MONAI chain, :func:`volume_dataset` turns a :class:`~mmlib.data.manifest.Cohort`
  into a cached MONAI dataset.
- ECGs (P3): :func:`read_ecg_dicom` (DICOM waveform, e.g. 12-lead ECG IODs), :func:`read_wfdb`
  (PTB-XL, MIMIC-IV-ECG), both returning an :class:`ECG` in mV; :func:`preprocess_ecg` is the
  P3 preprocessing (resample to 100 Hz, baseline-wander removal, per-lead scaling, 10 s).
- 2D images (CXR, P3): :func:`read_image_2d` for PNG/JPEG and DICOM.
- Reports (P3): :func:`read_text`.
- Patch-feature bags (P5): :func:`read_feature_bag` for ``.npy``/``.pt``/``.h5``; user files are
  never unpickled.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from mmlib.core import get_logger
from mmlib.data.manifest import Cohort

__all__ = [
    "ECG",
    "STANDARD_LEADS",
    "normalise_lead_name",
    "preprocess_ecg",
    "read_ecg_dicom",
    "read_feature_bag",
    "read_image_2d",
    "read_text",
    "read_wfdb",
    "volume_dataset",
    "volume_transforms",
]

log = get_logger(__name__)

#: The 12 standard leads in their conventional order.
STANDARD_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")

# --------------------------------------------------------------------------- volumes


def _nifti_loader(mt: Any, keys: list[str]) -> Any:
    """``LoadImaged`` with nibabel, quietly.

    MONAI 1.6 instantiates every default reader, even with an explicit one. Its GPU DICOM reader
    then logs "nvImageCodec is not available" and warns that its plugin did not register, in
    every process and notebook. Neither reader is used here (volumes are NIfTI, read by
    nibabel), so those two messages are silenced while the loader is built, and nothing else.
    """
    import logging
    import warnings

    plugin_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = plugin_log.level
    plugin_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)
            return mt.LoadImaged(keys=keys, reader="NibabelReader", image_only=True)
    finally:
        plugin_log.setLevel(level)


def volume_transforms(
    *,
    kind: Literal["mri", "ct"],
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    spatial_size: Sequence[int] = (96, 96, 96),
    hu_window: tuple[float, float] | None = None,
    keys: Sequence[str] = ("image",),
    mask_keys: Sequence[str] = (),
    augment: bool = False,
    mri_percentiles: tuple[float, float] = (0.5, 99.5),
):
    """The MONAI chain that turns NIfTI paths into fixed-size, RAS, normalised tensors.

    Order, and why:

    1. ``LoadImaged`` (nibabel, ``image_only``): the array plus its affine as a ``MetaTensor``.
    2. ``EnsureChannelFirstd``: ``(C, X, Y, Z)`` whatever the file stores.
    3. ``Orientationd("RAS")``: every scanner's axis order and flips mapped to one convention
       (index 0 grows to the subject's right, 1 to anterior, 2 to superior) *before* any
       resampling, so spacing is applied along the final axes.
    4. ``Spacingd(spacing_mm)``: resampled to the requested voxel size, trilinear for images,
       nearest for masks (labels must stay labels).
    5. Intensity, on the whole field of view before any padding (so statistics do not see the
       padding, and padding value 0 means "air"/"background" after scaling):
       CT: ``ScaleIntensityRanged`` maps ``hu_window`` (HU) linearly to [0, 1] and clips;
       MRI (arbitrary units that differ per scanner): ``ScaleIntensityRangePercentilesd`` maps
       the volume's own ``mri_percentiles`` to [0, 1] and clips, which is robust to a few very
       bright voxels. Masks are never rescaled.
    6. ``ResizeWithPadOrCropd(spatial_size)``: symmetric centre crop / zero pad to the network's
       input size; the affine follows.
    7. Random augmentation when ``augment`` (flips, small affine, gamma; spatial ones applied to
       masks too). They come after every deterministic step, so a ``CacheDataset`` caches the
       deterministic part once and re-draws only the augmentation each epoch.
    8. ``EnsureTyped(float32)``.

    Args:
        kind: ``"ct"`` (needs ``hu_window``) or ``"mri"``.
        spacing_mm: output voxel size (mm) along R, A, S.
        spatial_size: output grid ``(X, Y, Z)``; items are ``(1, X, Y, Z)`` tensors.
        hu_window: ``(lo, hi)`` in Hounsfield units for CT, e.g. ``(-1000, 1000)`` or a vessel
            window for CTA; ``lo`` maps to 0 and ``hi`` to 1.
        keys: image keys of the item dicts.
        mask_keys: label/mask keys (nearest interpolation, no intensity scaling).
        augment: add random flips, affine and gamma (training only).
        mri_percentiles: lower/upper percentiles mapped to 0/1 for MRI.

    Returns:
        A :class:`monai.transforms.Compose`.

    Raises:
        ValueError: for an unknown ``kind``, CT without a valid ``hu_window``, or bad sizes.
    """
    from monai import transforms as mt

    if kind not in ("mri", "ct"):
        raise ValueError(f"kind must be 'mri' or 'ct', got {kind!r}")
    if kind == "ct":
        if hu_window is None or len(hu_window) != 2 or not hu_window[0] < hu_window[1]:
            raise ValueError(f"CT needs hu_window=(lo, hi) with lo < hi in HU, got {hu_window!r}")
    spacing_mm = tuple(float(s) for s in spacing_mm)
    spatial_size = tuple(int(s) for s in spatial_size)
    if len(spacing_mm) != 3 or min(spacing_mm) <= 0:
        raise ValueError(f"spacing_mm must be three positive numbers (mm), got {spacing_mm!r}")
    if len(spatial_size) != 3 or min(spatial_size) <= 0:
        raise ValueError(f"spatial_size must be three positive integers, got {spatial_size!r}")
    keys, mask_keys = list(keys), list(mask_keys)
    if not keys:
        raise ValueError("keys must name at least one image key")
    overlap = sorted(set(keys) & set(mask_keys))
    if overlap:
        raise ValueError(f"keys and mask_keys overlap: {overlap}")
    every = keys + mask_keys

    chain: list[Any] = [
        _nifti_loader(mt, every),
        mt.EnsureChannelFirstd(keys=every),
        # explicit nibabel/NIfTI labels (L->R, P->A, I->S); MONAI warns that its default will change
        mt.Orientationd(keys=every, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        mt.Spacingd(
            keys=every,
            pixdim=spacing_mm,
            mode=["bilinear"] * len(keys) + ["nearest"] * len(mask_keys),
        ),
    ]
    if kind == "ct":
        lo, hi = hu_window  # type: ignore[misc]
        chain.append(
            mt.ScaleIntensityRanged(keys=keys, a_min=float(lo), a_max=float(hi), b_min=0.0, b_max=1.0, clip=True)
        )
    else:
        lo_p, hi_p = mri_percentiles
        chain.append(
            mt.ScaleIntensityRangePercentilesd(
                keys=keys, lower=float(lo_p), upper=float(hi_p), b_min=0.0, b_max=1.0, clip=True, channel_wise=True
            )
        )
    chain.append(mt.ResizeWithPadOrCropd(keys=every, spatial_size=spatial_size))
    if augment:
        chain += [
            mt.RandFlipd(keys=every, prob=0.5, spatial_axis=0),  # left-right symmetry of the body
            mt.RandAffined(
                keys=every,
                prob=0.5,
                rotate_range=(0.1, 0.1, 0.1),
                scale_range=(0.1, 0.1, 0.1),
                mode=["bilinear"] * len(keys) + ["nearest"] * len(mask_keys),
                padding_mode="zeros",
            ),
            mt.RandAdjustContrastd(keys=keys, prob=0.5, gamma=(0.7, 1.5)),
        ]
    chain.append(mt.EnsureTyped(keys=every, dtype=np.float32))
    return mt.Compose(chain)


def _python_scalar(value: Any) -> Any:
    """A cell of the typed subject table as a plain Python value (collates cleanly)."""
    if value is pd.NA or value is pd.NaT or (isinstance(value, float) and np.isnan(value)):
        return float("nan")
    if isinstance(value, np.generic):
        return value.item()
    return value


def volume_dataset(
    cohort: Cohort,
    modalities: Mapping[str, str],
    transforms: Any,
    *,
    subjects: Iterable[str] | pd.DataFrame | None = None,
    cache: Literal["memory", "disk"] | None = "memory",
    cache_dir: str | os.PathLike | None = None,
    extra_columns: Sequence[str] = (),
    num_workers: int = 0,
):
    """A MONAI dataset over a cohort's volume files.

    Each item is a dict: one entry per key of ``modalities`` (the transformed tensor, e.g.
    ``(1, X, Y, Z)``), ``"subject_id"``, and the values of ``extra_columns`` (e.g. the label).

    Args:
        cohort: a loaded cohort (:func:`mmlib.data.load_cohort`).
        modalities: item key -> modality name in the manifest, e.g. ``{"image": "flair"}``
            or ``{"image": "cta", "mask": "lesion_mask"}``.
        transforms: usually :func:`volume_transforms` with matching ``keys``/``mask_keys``.
        subjects: subject ids, or a subset of ``cohort.subjects`` (e.g. ``cohort.split("train")``);
            default all subjects. Subjects lacking one of the requested files (an optional
            modality) are skipped with a warning.
        cache: ``"memory"``: :class:`monai.data.CacheDataset`, every volume decoded and put
            through the deterministic transforms once per run; ``"disk"``:
            :class:`monai.data.PersistentDataset` under ``cache_dir`` (reused across runs);
            ``None``: a plain :class:`monai.data.Dataset` (decode on every access).
        cache_dir: folder for ``cache="disk"``.
        extra_columns: subject-table columns copied into each item.
        num_workers: threads filling the memory cache (0 or 1: one thread).

    Returns:
        A :class:`monai.data.Dataset` (or subclass), in the order of ``subjects``.

    Raises:
        ValueError: a modality the cohort lacks, an unknown column or subject id, or a bad
            ``cache``/``cache_dir``.
    """
    from monai.data import CacheDataset, Dataset, PersistentDataset

    if not modalities:
        raise ValueError("modalities must map at least one item key to a modality name")
    have = [m.name for m in cohort.manifest.modalities]
    for key, name in modalities.items():
        if name not in have:
            raise ValueError(
                f"cohort {cohort.name!r} has no modality {name!r} (asked for item key {key!r}); "
                f"its modalities are {have}"
            )
    reserved = {"subject_id"} & (set(modalities) | set(extra_columns))
    if reserved:
        raise ValueError("'subject_id' is added to every item and cannot be a modality key or extra column")
    unknown = [c for c in extra_columns if c not in cohort.subjects.columns]
    if unknown:
        raise ValueError(f"extra_columns {unknown} are not columns of cohort {cohort.name!r}")
    if cache not in ("memory", "disk", None):
        raise ValueError(f"cache must be 'memory', 'disk' or None, got {cache!r}")

    idc = cohort.manifest.id_column
    table = cohort.subjects
    if subjects is None:
        rows = table
    else:
        ids = subjects[idc].astype(str).tolist() if isinstance(subjects, pd.DataFrame) else [str(s) for s in subjects]
        by_id = table.set_index(table[idc].astype(str), drop=False)
        missing = [s for s in ids if s not in by_id.index]
        if missing:
            raise ValueError(f"cohort {cohort.name!r} has no subject(s) {missing[:10]}")
        rows = by_id.loc[ids]

    items: list[dict[str, Any]] = []
    skipped: list[str] = []
    for _, row in rows.iterrows():
        item: dict[str, Any] = {"subject_id": str(row[idc])}
        complete = True
        for key, name in modalities.items():
            rel = row[cohort.manifest.modality(name).column]
            if pd.isna(rel) or not str(rel).strip():
                complete = False
                break
            item[key] = str(cohort.root / str(rel).strip())
        if not complete:
            skipped.append(item["subject_id"])
            continue
        for col in extra_columns:
            item[col] = _python_scalar(row[col])
        items.append(item)
    if skipped:
        log.warning(
            "%s: %d subject(s) lack a requested modality and are skipped: %s", cohort.name, len(skipped), skipped[:10]
        )

    if cache == "memory":
        show = os.environ.get("MMLIB_PROGRESS", "1") != "0"
        return CacheDataset(items, transform=transforms, cache_rate=1.0, num_workers=max(1, num_workers), progress=show)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("cache='disk' needs cache_dir (a folder for the decoded volumes)")
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        return PersistentDataset(items, transform=transforms, cache_dir=cache_dir)
    return Dataset(items, transform=transforms)


# --------------------------------------------------------------------------- ECG


@dataclass
class ECG:
    """A multi-lead ECG.

    Attributes:
        signal: ``(leads, samples)`` float32, millivolts (after :func:`preprocess_ecg`: unitless,
            scaled to [-1, 1] per lead).
        fs: sampling frequency in Hz.
        leads: lead names, normalised to ``I, II, III, aVR, aVL, aVF, V1..V6`` where recognised.
        source: the file it was read from.
    """

    signal: np.ndarray
    fs: float
    leads: list[str]
    source: str = ""
    units: str = "mV"
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.signal = np.asarray(self.signal, dtype=np.float32)
        if self.signal.ndim != 2:
            raise ValueError(f"ECG signal must be (leads, samples), got shape {self.signal.shape}")
        if len(self.leads) != self.signal.shape[0]:
            raise ValueError(f"{len(self.leads)} lead names for {self.signal.shape[0]} leads")
        if not self.fs > 0:
            raise ValueError(f"sampling frequency must be > 0 Hz, got {self.fs!r}")

    @property
    def duration_s(self) -> float:
        return self.signal.shape[1] / self.fs

    def reorder(self, order: Sequence[str] = STANDARD_LEADS) -> ECG:
        """The same ECG with leads in ``order`` (MIMIC-IV-ECG stores aVF before aVL, for one).

        Raises:
            ValueError: naming the leads this record lacks.
        """
        missing = [name for name in order if name not in self.leads]
        if missing:
            raise ValueError(f"{self.source or 'ECG'}: leads {missing} not found; it has {self.leads}")
        idx = [self.leads.index(name) for name in order]
        return replace(self, signal=self.signal[idx], leads=list(order))


_LEAD_ALIASES = {name.upper(): name for name in STANDARD_LEADS}


def normalise_lead_name(name: str) -> str:
    """``'Lead I (Einthoven)'``, ``'MDC_ECG_LEAD_AVR'``, ``'avr'`` -> ``'I'``, ``'aVR'``, ``'aVR'``.

    Names that are not one of the 12 standard leads are returned stripped but otherwise as-is.
    """
    text = str(name).strip()
    core = re.sub(r"\(.*?\)", "", text)  # "(Einthoven)", "(Goldberger)"
    core = re.sub(r"^(MDC_ECG_LEAD_|LEAD\s*)", "", core.strip(), flags=re.IGNORECASE).strip()
    return _LEAD_ALIASES.get(core.upper(), text)


_TO_MV = {"uv": 1e-3, "µv": 1e-3, "mv": 1.0, "v": 1e3, "nv": 1e-6}
_ECG_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.9.1.1",  # 12-lead ECG waveform
    "1.2.840.10008.5.1.4.1.1.9.1.2",  # general ECG waveform
    "1.2.840.10008.5.1.4.1.1.9.1.3",  # ambulatory ECG waveform
}


def _unit_factor(unit: str, where: str) -> float:
    key = unit.strip().replace("μ", "µ").lower()
    if key not in _TO_MV:
        raise ValueError(f"{where}: unknown ECG unit {unit!r}; expected uV, mV or V")
    return _TO_MV[key]


def read_ecg_dicom(path: str | os.PathLike, *, group: int | str | None = None) -> ECG:
    """Read a DICOM ECG waveform (e.g. a 12-lead ECG IOD).

    ``Dataset.waveform_array`` applies each channel's sensitivity, correction factor and
    baseline; the values are then converted from the channel sensitivity units (UCUM, e.g.
    ``uV``) to mV.

    Args:
        path: the ``.dcm`` file.
        group: which multiplex group: an index, a label such as ``"MEDIAN BEAT"``, or ``None``
            for the first group labelled ``RHYTHM`` (else the first group).

    Returns:
        An :class:`ECG` with ``signal`` ``(leads, samples)`` in mV and lead names from the
        channel source sequence.

    Raises:
        ValueError: naming the file if it holds no waveform, is not an ECG, or the group is absent.
    """
    import pydicom

    path = Path(path)
    ds = pydicom.dcmread(path)
    if "WaveformSequence" not in ds or len(ds.WaveformSequence) == 0:
        raise ValueError(f"{path}: no waveform in this DICOM file (no WaveformSequence)")
    modality = str(ds.get("Modality", "")).upper()
    sop = str(ds.get("SOPClassUID", ""))
    if modality != "ECG" and sop not in _ECG_SOP_CLASSES:
        raise ValueError(f"{path}: waveform is not an ECG (Modality {modality!r}, SOP class {sop!r})")
    labels = [str(w.get("MultiplexGroupLabel", "")).strip().upper() for w in ds.WaveformSequence]
    if group is None:
        index = next((i for i, lab in enumerate(labels) if "RHYTHM" in lab), 0)
    elif isinstance(group, str):
        if group.strip().upper() not in labels:
            raise ValueError(f"{path}: no multiplex group {group!r}; groups are {labels}")
        index = labels.index(group.strip().upper())
    else:
        if not 0 <= group < len(labels):
            raise ValueError(f"{path}: multiplex group {group} out of range; it has {len(labels)}: {labels}")
        index = int(group)
    item = ds.WaveformSequence[index]
    data = np.asarray(ds.waveform_array(index), dtype=np.float64)  # (samples, channels), sensitivity applied
    leads: list[str] = []
    factors = np.ones(data.shape[1])
    for c, chan in enumerate(item.ChannelDefinitionSequence):
        source = chan.get("ChannelSourceSequence")
        meaning = str(source[0].get("CodeMeaning", "")) if source else ""
        leads.append(normalise_lead_name(meaning or str(chan.get("ChannelLabel", f"ch{c}"))))
        units = chan.get("ChannelSensitivityUnitsSequence")
        unit = str(units[0].get("CodeValue", "uV")) if units else "uV"  # the ECG IODs' default
        factors[c] = _unit_factor(unit, f"{path} channel {c}")
    signal = (data * factors).T
    return ECG(signal=signal, fs=float(item.SamplingFrequency), leads=leads, source=str(path))


def read_wfdb(path: str | os.PathLike) -> ECG:
    """Read a WFDB record (PTB-XL, MIMIC-IV-ECG) as physical values in mV.

    Args:
        path: the record path, with or without ``.hea``/``.dat``.

    Returns:
        An :class:`ECG`, ``signal`` ``(leads, samples)`` in mV; samples WFDB marks missing are NaN.

    Raises:
        FileNotFoundError: naming the header if it is absent.
        ValueError: for a unit other than uV/mV/V.
    """
    import wfdb

    path = Path(path)
    record = path.with_suffix("") if path.suffix in (".hea", ".dat") else path
    header = record.with_name(record.name + ".hea")
    if not header.is_file():
        raise FileNotFoundError(f"{header}: WFDB header not found")
    fast = _read_format16(record, header)
    if fast is not None:
        data, fs, units, names = fast
    else:
        rec = wfdb.rdrecord(str(record))
        data, fs, units, names = np.asarray(rec.p_signal, dtype=np.float64), float(rec.fs), rec.units, rec.sig_name
    factors = np.array([_unit_factor(u or "mV", f"{header} signal {n!r}") for u, n in zip(units, names)])
    leads = [normalise_lead_name(n) for n in names]
    return ECG(signal=(data * factors).T, fs=fs, leads=leads, source=str(record))


def _read_format16(record: Path, header: Path) -> tuple[np.ndarray, float, list[str], list[str]] | None:
    """The common case read directly: one ``.dat`` file, format 16, no skew or byte offset.

    ``wfdb.rdrecord`` takes ~0.1 s per record (most of it validating the header through
    pandas); reading PTB-XL-style records directly is ~100x faster. Anything else returns None
    and goes through ``wfdb.rdrecord``. Missing samples (-32768) become NaN, as there.
    """
    lines = [ln.split() for ln in header.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    try:
        n_sig, fs = int(lines[0][1]), float(lines[0][2].split("/")[0].split("(")[0])
        specs = lines[1 : n_sig + 1]
        simple = len(specs) == n_sig and all(
            sp[0] == specs[0][0] and sp[1] == "16" and "x" not in sp[1] and ":" not in sp[1] for sp in specs
        )
        if not simple:
            return None
        gains, baselines, units = [], [], []
        for sp in specs:
            gain_field = sp[2] if len(sp) > 2 else "200"
            gain, _, rest = gain_field.partition("(")
            baseline = float(rest.split(")")[0]) if rest else 0.0
            unit = gain_field.split("/")[1] if "/" in gain_field else "mV"
            gain = float(gain.split("/")[0]) or 200.0  # WFDB: gain 0 means the default 200
            gains.append(gain)
            baselines.append(baseline)
            units.append(unit)
        names = [" ".join(sp[8:]) if len(sp) > 8 else f"sig{i}" for i, sp in enumerate(specs)]
    except (IndexError, ValueError):
        return None
    digital = np.fromfile(record.parent / specs[0][0], dtype="<i2")
    if digital.size % n_sig:
        return None
    digital = digital.reshape(-1, n_sig)
    data = (digital - np.array(baselines)) / np.array(gains)
    data[digital == -32768] = np.nan
    return data, fs, units, names


def preprocess_ecg(
    ecg: ECG,
    *,
    target_fs: float = 100.0,
    duration_s: float = 10.0,
    highpass_hz: float = 0.5,
    filter_order: int = 3,
) -> ECG:
    """The P3 (MoRE) ECG preprocessing of an :class:`ECG`: resample, remove baseline wander, fix length, scale.

    Non-finite samples (WFDB gaps) are set to 0, then the array goes through
    :func:`mmlib.ecg.preprocess_ecg`: polyphase resampling to ``target_fs`` (low-pass before
    decimating), a zero-phase Butterworth high-pass at ``highpass_hz`` whose ends are extended
    along a fitted line (so a record ending inside a QRS gets no ringing step), the first
    ``duration_s`` seconds (zero-padded at the end when shorter), and each lead divided by its
    maximum absolute value (sign and zero line kept; an all-zero lead stays zero).

    Args:
        ecg: the raw ECG (mV).
        target_fs: output sampling frequency (Hz); P3 uses 100.
        duration_s: output length in seconds; P3 uses 10 (1000 samples at 100 Hz).
        highpass_hz: cut-off of the high-pass (Hz); 0 or None to skip.
        filter_order: Butterworth order (applied twice by the zero-phase filter).

    Returns:
        A new :class:`ECG`, ``signal`` ``(leads, round(target_fs * duration_s))``, unitless in [-1, 1].
    """
    from mmlib.ecg import preprocess_ecg as preprocess_array

    if not target_fs > 0 or not duration_s > 0:
        raise ValueError(f"target_fs and duration_s must be > 0, got {target_fs!r}, {duration_s!r}")
    if highpass_hz and not 0 < highpass_hz < target_fs / 2:
        raise ValueError(f"highpass_hz must be in (0, {target_fs / 2}) Hz, got {highpass_hz!r}")
    x = np.nan_to_num(ecg.signal.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    x = preprocess_array(x, ecg.fs, target_fs=target_fs, n_samples=int(round(target_fs * duration_s)),
                         cutoff_hz=highpass_hz or None, order=filter_order)
    return replace(
        ecg,
        signal=x.astype(np.float32),
        fs=float(target_fs),
        units="scaled",
        notes=[*ecg.notes, f"preprocess_ecg(fs={target_fs}, {duration_s}s, highpass {highpass_hz} Hz)"],
    )


# --------------------------------------------------------------------------- 2D images, text, feature bags


def read_image_2d(path: str | os.PathLike, *, normalize: bool = True) -> np.ndarray:
    """Read a greyscale 2D image (a chest X-ray) from PNG/JPEG or DICOM.

    PNG/JPEG: colour images are converted to greyscale (PIL ``"L"``); 16-bit PNGs keep 16 bits.
    DICOM: the modality LUT (rescale slope/intercept) then the VOI LUT (window centre/width)
    are applied where the file has them, and ``MONOCHROME1`` is inverted so that dense is bright.

    Args:
        path: the image file.
        normalize: scale to [0, 1] (8-bit / 255, 16-bit / 65535, 32-bit float and DICOM:
            min-max, DICOM after windowing); if False, the values in the file's own units
            (DICOM: after the rescale slope/intercept).

    Returns:
        ``(H, W)`` float32.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found")
    with open(path, "rb") as fh:
        head = fh.read(132)
    if path.suffix.lower() in (".dcm", ".dicom") or head[128:132] == b"DICM":
        return _read_dicom_image(path, normalize=normalize)
    from PIL import Image

    with Image.open(path) as img:
        mode = img.mode
        if mode.startswith("I") or mode == "F":  # 16-bit PNGs open as "I;16" (older Pillow: "I")
            arr = np.asarray(img, dtype=np.float32)
        else:
            arr = np.asarray(img.convert("L"), dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2D greyscale image, got shape {arr.shape}")
    if not normalize:
        return arr
    if mode == "F":
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return np.clip(arr / (65535.0 if mode.startswith("I") else 255.0), 0.0, 1.0)


def _read_dicom_image(path: Path, *, normalize: bool) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise ValueError(f"{path}: DICOM file has no pixel data")
    arr = ds.pixel_array
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a single greyscale frame, got pixel array of shape {arr.shape}")
    arr = apply_modality_lut(arr, ds).astype(np.float32)
    if not normalize:
        return arr
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        arr = apply_voi_lut(arr, ds, prefer_lut=True).astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = 1.0 - arr
    return arr.astype(np.float32)


def read_text(path: str | os.PathLike) -> str:
    """A report as text (UTF-8, byte-order mark dropped, line endings ``\\n``, outer whitespace stripped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def read_feature_bag(path: str | os.PathLike, *, key: str = "features") -> np.ndarray:
    """A whole-slide image's bag of patch features, ``(N patches, D)``.

    Formats: ``.npy`` (``allow_pickle=False``), ``.pt`` (``torch.load(weights_only=True)``: a
    tensor, or a dict holding ``key``), ``.h5`` (dataset ``key``, as CLAM writes it; needs
    ``h5py``). Nothing is ever unpickled: a pickled object array or a ``.pt`` holding arbitrary
    Python objects is refused.

    Args:
        path: the feature file.
        key: the dataset/dict entry holding the features in ``.pt`` dicts and ``.h5`` files.

    Returns:
        ``(N, D)`` array (dtype as stored, usually float32).

    Raises:
        ValueError: naming the file for a pickled or malformed file or an unknown extension.
        ImportError: for ``.h5`` without ``h5py``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: feature bag not found")
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ValueError(
                f"{path}: refused: the .npy holds Python objects that would need unpickling ({exc}); "
                "save a numeric array instead (np.save(..., allow_pickle=False))"
            ) from None
    elif suffix in (".pt", ".pth"):
        import pickle

        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError) as exc:
            raise ValueError(
                f"{path}: refused: not loadable with torch.load(weights_only=True) (it holds arbitrary "
                f"Python objects; save a tensor or a dict of tensors): {str(exc).splitlines()[0]}"
            ) from None
        if isinstance(obj, dict):
            if key not in obj:
                raise ValueError(f"{path}: dict without a {key!r} entry; keys are {sorted(map(str, obj))}")
            obj = obj[key]
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"{path}: expected a tensor, got {type(obj).__name__}")
        arr = obj.detach().cpu().numpy()
    elif suffix in (".h5", ".hdf5"):
        try:
            import h5py
        except ImportError:
            raise ImportError(
                f"{path}: reading .h5 feature bags needs the 'h5py' package, which is not installed"
            ) from None
        with h5py.File(path, "r") as fh:
            if key not in fh:
                raise ValueError(f"{path}: no dataset {key!r}; it has {sorted(fh.keys())}")
            arr = np.asarray(fh[key][()])
    else:
        raise ValueError(f"{path}: unknown feature-bag format {suffix!r}; use .npy, .pt or .h5")
    if arr.dtype == object:
        raise ValueError(f"{path}: refused: object array")
    if arr.ndim == 3 and arr.shape[0] == 1:  # (1, N, D) as some extractors save
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{path}: a feature bag must be (N patches, D), got shape {arr.shape}")
    return arr
