"""Readers for the real formats: DICOM/WFDB ECG, NIfTI volumes through MONAI, 2D images, feature bags."""

from __future__ import annotations

import json
import pickle

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from mmlib.data import load_cohort
from mmlib.data.readers import (
    ECG,
    STANDARD_LEADS,
    normalise_lead_name,
    preprocess_ecg,
    read_ecg_dicom,
    read_feature_bag,
    read_image_2d,
    read_text,
    read_wfdb,
    volume_dataset,
    volume_transforms,
)

# --------------------------------------------------------------------------- ECG


def test_pydicom_12_lead_ecg_in_millivolts():
    path = get_testdata_file("waveform_ecg.dcm")
    ecg = read_ecg_dicom(path)
    assert ecg.leads == list(STANDARD_LEADS)
    assert ecg.fs == 1000.0  # the file's SamplingFrequency
    assert ecg.signal.shape == (12, 10000) and ecg.signal.dtype == np.float32
    peak = np.abs(ecg.signal).max(axis=1)
    assert np.all((peak > 0.1) & (peak < 10.0)), peak  # mV, physiological
    # the same numbers pydicom gives in the file's unit (uV), divided by 1000
    raw_uv = pydicom.dcmread(path).waveform_array(0)
    np.testing.assert_allclose(ecg.signal, raw_uv.T / 1000.0, rtol=1e-6)
    median = read_ecg_dicom(path, group="MEDIAN BEAT")
    assert median.signal.shape == (12, 1200)


def test_dicom_without_waveform_is_named():
    path = get_testdata_file("CT_small.dcm")
    with pytest.raises(ValueError, match=r"CT_small\.dcm.*no waveform"):
        read_ecg_dicom(path)


@pytest.mark.parametrize(
    ("raw", "name"),
    [("Lead I (Einthoven)", "I"), ("Lead aVR", "aVR"), ("AVL", "aVL"), ("MDC_ECG_LEAD_V3", "V3"), ("v6", "V6"),
     ("Pleth", "Pleth")],
)
def test_lead_names_are_normalised(raw, name):
    assert normalise_lead_name(raw) == name


def test_wfdb_round_trip(tmp_path):
    import wfdb

    rng = np.random.default_rng(0)
    fs, n = 500, 5000
    t = np.arange(n) / fs
    sig = 0.8 * np.sin(2 * np.pi * 1.2 * t)[:, None] * rng.uniform(0.3, 1.5, 12) + 0.05 * rng.normal(size=(n, 12))
    names = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]  # PTB-XL spelling
    wfdb.wrsamp("rec", fs=fs, units=["mV"] * 12, sig_name=names, p_signal=sig, fmt=["16"] * 12, write_dir=str(tmp_path))
    ecg = read_wfdb(tmp_path / "rec")
    assert ecg.leads == list(STANDARD_LEADS) and ecg.fs == fs and ecg.signal.shape == (12, n)
    gain = np.array(wfdb.rdheader(str(tmp_path / "rec")).adc_gain)
    err = np.abs(ecg.signal - sig.T).max(axis=1)
    assert np.all(err <= 0.5 / gain + 1e-6), (err, 1 / gain)  # within half a quantisation step
    assert read_wfdb(tmp_path / "rec.hea").signal.shape == (12, n)  # extension accepted

    # a record stored in uV comes back in mV
    wfdb.wrsamp("rec_uv", fs=fs, units=["uV"] * 2, sig_name=["I", "II"], p_signal=sig[:, :2] * 1000, fmt=["16"] * 2,
                write_dir=str(tmp_path))
    np.testing.assert_allclose(read_wfdb(tmp_path / "rec_uv").signal, sig[:, :2].T, atol=0.01)
    with pytest.raises(FileNotFoundError, match="missing.hea"):
        read_wfdb(tmp_path / "missing")


def test_ecg_reorder():
    ecg = ECG(signal=np.arange(6, dtype=float).reshape(3, 2), fs=100, leads=["aVF", "aVL", "I"])
    out = ecg.reorder(["I", "aVL", "aVF"])
    assert out.leads == ["I", "aVL", "aVF"] and out.signal[:, 0].tolist() == [4, 2, 0]
    with pytest.raises(ValueError, match=r"\['II'\]"):
        ecg.reorder(["I", "II"])


def test_preprocess_ecg_removes_baseline_wander_and_scales():
    fs, dur = 500, 12.0
    t = np.arange(int(fs * dur)) / fs
    clean = np.stack([np.sin(2 * np.pi * 8 * t) + 0.5 * np.sin(2 * np.pi * 17 * t),
                      -2.0 * np.sin(2 * np.pi * 6 * t), np.zeros_like(t)])
    wander = 1.5 * np.sin(2 * np.pi * 0.15 * t + 0.3)  # breathing-like drift, larger than the waves
    raw = ECG(signal=clean + wander * np.array([[1.0], [1.0], [0.0]]), fs=fs, leads=["I", "II", "III"])
    out = preprocess_ecg(raw, target_fs=100, duration_s=10, highpass_hz=0.5)
    ref = preprocess_ecg(ECG(signal=clean, fs=fs, leads=["I", "II", "III"]), target_fs=100, duration_s=10)
    assert out.signal.shape == (3, 1000) and out.fs == 100.0
    assert np.allclose(np.abs(out.signal[:2]).max(axis=1), 1.0)
    assert np.all(out.signal[2] == 0)  # a flat lead stays flat (no division by zero)
    # with the drift removed the result equals the drift-free preprocessing
    assert np.abs(out.signal - ref.signal).max() < 0.05
    # the drift's share of the input vs the output: projection on the 0.15 Hz sine
    t100 = np.arange(1000) / 100
    basis = np.stack([np.sin(2 * np.pi * 0.15 * t100), np.cos(2 * np.pi * 0.15 * t100)], 1)
    coef = np.linalg.lstsq(basis, out.signal[0], rcond=None)[0]
    assert np.hypot(*coef) < 0.02
    # per-lead scaling keeps the sign: lead II is -sin, so it starts going negative
    assert out.signal[1, 1:5].mean() < 0
    # too short: zero-padded to the full length
    short = preprocess_ecg(ECG(signal=clean[:, : fs * 4], fs=fs, leads=["I", "II", "III"]))
    assert short.signal.shape == (3, 1000) and np.all(short.signal[:, 420:] == 0)


# --------------------------------------------------------------------------- volumes


def _lps_volume(path, *, shape=(20, 16, 10), value=2000.0):
    """A CT-like volume in LPS orientation, 1 x 1 x 2 mm, air everywhere and a bright block."""
    vol = np.full(shape, -1000.0, np.float32)
    vol[2:5, 3:6, 1:3] = value
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])  # x grows to the left, y to posterior: LPS
    img = nib.Nifti1Image(vol, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    mask = (vol > 0).astype(np.uint8)
    mimg = nib.Nifti1Image(mask, affine)
    mimg.set_qform(affine, code=1)
    mimg.set_sform(affine, code=1)
    mpath = str(path).replace(".nii.gz", "_mask.nii.gz")
    nib.save(mimg, mpath)
    return vol, affine, mpath


def test_volume_transforms_are_built_without_monais_gpu_dicom_reader_noise(caplog):
    import logging
    import warnings

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        volume_transforms(kind="mri", spacing_mm=(4, 4, 4), spatial_size=(8, 8, 8))
    assert not [w for w in caught if "NvImgCodec" in str(w.message)]
    assert "nvImageCodec" not in caplog.text
    assert logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").level == logging.NOTSET  # put back


def test_volume_transforms_orientation_spacing_and_hu_window(tmp_path):
    path = tmp_path / "ct.nii.gz"
    vol, affine, mpath = _lps_volume(path)
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    tf = volume_transforms(kind="ct", spacing_mm=(1, 1, 1), spatial_size=(20, 16, 20), hu_window=(-1000, 1000),
                           mask_keys=("mask",))
    out = tf({"image": str(path), "mask": mpath})
    img, mask = out["image"], out["mask"]
    assert tuple(img.shape) == (1, 20, 16, 20) and img.dtype == torch.float32
    aff = np.asarray(img.affine)
    assert nib.aff2axcodes(aff) == ("R", "A", "S")
    np.testing.assert_allclose(np.abs(np.diag(aff)[:3]), (1, 1, 1))  # resampled to 1 mm
    a = img[0].numpy()
    # HU window: air (-1000) -> 0 exactly, 2000 HU (above the window) -> clipped to 1
    assert a.min() == 0.0 and a.max() == 1.0
    assert np.isclose(a[0, 0, 0], 0.0)
    # the block was at LPS voxels x 2..4, y 3..5; in RAS the first two axes are flipped,
    # so it sits at x 15..17 and y 10..12; z (2 mm -> 1 mm) doubles: 2..4 mm
    block = np.argwhere(a > 0.99)
    assert block.min(0).tolist() == [15, 10, 2] and block.max(0).tolist() == [17, 12, 4]
    # the same place in world coordinates (mm) before and after
    world_in = (affine @ np.array([3, 4, 1.5, 1]))[:3]
    world_out = (aff @ np.array([*block.mean(0), 1]))[:3]
    np.testing.assert_allclose(world_out, world_in, atol=1e-6)
    # the mask follows the image with nearest interpolation: labels stay 0/1
    m = mask[0].numpy()
    assert set(np.unique(m).tolist()) <= {0.0, 1.0}
    assert np.argwhere(m > 0).min(0).tolist()[:2] == [15, 10]


def test_volume_transforms_mri_percentiles_and_crop(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.gamma(2.0, 200.0, size=(30, 30, 12)).astype(np.float32)
    vol[0, 0, 0] = 1e6  # one hot voxel must not squash the rest
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 3.0, 1.0])), tmp_path / "mri.nii.gz")
    tf = volume_transforms(kind="mri", spacing_mm=(2, 2, 2), spatial_size=(8, 8, 8))
    a = tf({"image": str(tmp_path / "mri.nii.gz")})["image"]
    assert tuple(a.shape) == (1, 8, 8, 8)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert 0.15 < float(a.mean()) < 0.6  # the bulk of the intensities spreads over [0, 1]
    with pytest.raises(ValueError, match="hu_window"):
        volume_transforms(kind="ct")
    with pytest.raises(ValueError, match="kind"):
        volume_transforms(kind="pet")


def _volume_cohort(tmp_path):
    root = tmp_path / "cohort"
    (root / "ct").mkdir(parents=True)
    rows = []
    for i, value in enumerate([2000.0, 300.0]):
        _lps_volume(root / "ct" / f"s{i}.nii.gz", value=value)
        rows.append({"subject_id": f"s{i}", "ct_path": f"ct/s{i}.nii.gz", "label": i})
    pd.DataFrame(rows).to_csv(root / "subjects.csv", index=False)
    manifest = {
        "name": "tiny-ct",
        "columns": [{"name": "label", "dtype": "int"}],
        "modalities": [{"name": "ct", "column": "ct_path", "format": "nifti"}],
        "labels": ["label"],
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return load_cohort(root)


def test_volume_dataset_caches_in_memory(tmp_path):
    cohort = _volume_cohort(tmp_path)
    tf = volume_transforms(kind="ct", spacing_mm=(2, 2, 2), spatial_size=(12, 12, 12), hu_window=(-1000, 1000))
    ds = volume_dataset(cohort, {"image": "ct"}, tf, extra_columns=("label",))
    plain = volume_dataset(cohort, {"image": "ct"}, tf, cache=None)
    for p in cohort.paths("ct"):
        p.unlink()  # decoded once at construction: the cache serves from now on
    assert len(ds) == 2
    item = ds[1]
    assert item["subject_id"] == "s1" and item["label"] == 1
    assert tuple(item["image"].shape) == (1, 12, 12, 12)
    assert np.isclose(float(item["image"].max()), 0.65)  # 300 HU in a (-1000, 1000) window
    with pytest.raises(RuntimeError, match="LoadImaged"):
        plain[0]  # the uncached dataset reads the (now deleted) file
    sub = volume_dataset(cohort, {"image": "ct"}, tf, subjects=["s1"], cache=None)
    assert len(sub) == 1


def test_volume_dataset_disk_cache_and_errors(tmp_path):
    cohort = _volume_cohort(tmp_path)
    tf = volume_transforms(kind="ct", spacing_mm=(2, 2, 2), spatial_size=(12, 12, 12), hu_window=(-1000, 1000))
    disk = volume_dataset(cohort, {"image": "ct"}, tf, cache="disk", cache_dir=tmp_path / "cache",
                          subjects=cohort.subjects.iloc[[1, 0]])
    first = disk[0]["image"]
    assert disk[0]["subject_id"] == "s1" and any((tmp_path / "cache").iterdir())
    again = volume_dataset(cohort, {"image": "ct"}, tf, cache="disk", cache_dir=tmp_path / "cache",
                           subjects=["s1"])
    assert torch.equal(torch.as_tensor(again[0]["image"]), torch.as_tensor(first))
    with pytest.raises(ValueError, match="'flair'"):
        volume_dataset(cohort, {"image": "flair"}, tf)
    with pytest.raises(ValueError, match="cache_dir"):
        volume_dataset(cohort, {"image": "ct"}, tf, cache="disk")
    with pytest.raises(ValueError, match="s9"):
        volume_dataset(cohort, {"image": "ct"}, tf, subjects=["s9"])


# --------------------------------------------------------------------------- 2D images, text, feature bags


def test_read_image_2d_png_8_and_16_bit(tmp_path):
    from PIL import Image

    a8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(a8).save(tmp_path / "a.png")
    Image.fromarray(np.stack([a8] * 3, -1)).save(tmp_path / "rgb.jpg", quality=100)
    a16 = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    Image.fromarray(a16).save(tmp_path / "b.png")
    x8, x16 = read_image_2d(tmp_path / "a.png"), read_image_2d(tmp_path / "b.png")
    assert x8.shape == (16, 16) and x8.dtype == np.float32
    np.testing.assert_allclose(x8, a8 / 255.0, atol=1e-6)
    np.testing.assert_allclose(x16, a16 / 65535.0, atol=1e-6)
    assert read_image_2d(tmp_path / "rgb.jpg").shape == (16, 16)
    assert read_image_2d(tmp_path / "a.png", normalize=False).max() == 255


def test_read_image_2d_dicom_rescale_window_and_monochrome1(tmp_path):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (20, 1))  # (20, 100), stored values
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 16, 15, 0
    ds.PhotometricInterpretation = "MONOCHROME1"  # high values are dark
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.WindowCenter, ds.WindowWidth = 900, 1000  # window on rescaled values 400..1400
    ds.PixelData = pixels.tobytes()
    path = tmp_path / "cxr.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = read_image_2d(path, normalize=False)
    np.testing.assert_allclose(raw[0, :3], [-100, -80, -60])  # rescale applied
    x = read_image_2d(path)
    assert x.shape == (20, 100) and 0 <= x.min() and x.max() <= 1
    # MONOCHROME1 inverted: the lowest stored values are the brightest; windowing saturates
    # both ends (below 400 and above 1400 rescaled)
    assert x[0, 0] == 1.0 and x[0, 10] == 1.0 and x[0, -1] == 0.0
    assert np.all(np.diff(x[0]) <= 1e-6)


def test_read_text(tmp_path):
    (tmp_path / "r.txt").write_bytes("\ufeffFINDINGS: clear.\r\nIMPRESSION: none.\r\n".encode("utf-8"))
    assert read_text(tmp_path / "r.txt") == "FINDINGS: clear.\nIMPRESSION: none."
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="bad.txt"):
        read_text(tmp_path / "bad.txt")


class _Payload:
    """An arbitrary object; unpickling one runs code chosen by whoever wrote the file."""


def test_feature_bags_never_unpickle(tmp_path):
    feats = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    np.save(tmp_path / "ok.npy", feats)
    np.testing.assert_array_equal(read_feature_bag(tmp_path / "ok.npy"), feats)

    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}, _Payload()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"pickled\.npy: refused"):
        read_feature_bag(tmp_path / "pickled.npy")

    torch.save(torch.from_numpy(feats), tmp_path / "bag.pt")
    np.testing.assert_array_equal(read_feature_bag(tmp_path / "bag.pt"), feats)
    torch.save({"features": torch.from_numpy(feats), "coords": torch.zeros(7, 2)}, tmp_path / "dict.pt")
    np.testing.assert_array_equal(read_feature_bag(tmp_path / "dict.pt"), feats)

    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump(_Payload(), fh, protocol=2)
    torch.save({"features": _Payload()}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(ValueError, match=rf"{name}: refused"):
            read_feature_bag(tmp_path / name)

    (tmp_path / "bag.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    try:
        import h5py  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="h5py"):
            read_feature_bag(tmp_path / "bag.h5")
    with pytest.raises(ValueError, match="format"):
        (tmp_path / "bag.csv").write_text("1,2\n")
        read_feature_bag(tmp_path / "bag.csv")
