"""Shared fixtures."""

import os
import pathlib

import pytest
import tensorflow_datasets as tfds

import cxr_tfds  # pylint: disable=unused-import  # Registers chest_xray_pneumonia.


@pytest.fixture(scope='session')
def synthetic_data_dir(tmp_path_factory) -> str:
  """Builds chest_xray_pneumonia/synthetic once per session; returns its TFDS data_dir.

  Load it with `tfds.load('chest_xray_pneumonia/synthetic', split=..., data_dir=synthetic_data_dir)`.
  """
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  tfds.builder('chest_xray_pneumonia/synthetic', data_dir=data_dir).download_and_prepare()
  return data_dir


# The development copy of the real data sits beside the repository (../shared, in CI too); CXR_REAL_DATA_DIR
# points elsewhere, e.g. at a full Kaggle download.
REAL_DATA = pathlib.Path(os.environ.get(
    'CXR_REAL_DATA_DIR', pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'chest_xray'))


@pytest.fixture(scope='session')
def real_data() -> pathlib.Path:
  """The Kaggle-layout folder of real images; the test is skipped where there is none."""
  if not REAL_DATA.is_dir():
    pytest.skip(f'no real data at {REAL_DATA}')
  return REAL_DATA


@pytest.fixture(scope='session')
def real_224_data_dir(real_data, tmp_path_factory) -> str:
  """Builds chest_xray_pneumonia/224 from the real images once per session; returns its TFDS data_dir."""
  data_dir = str(tmp_path_factory.mktemp('tfds_real'))
  tfds.builder('chest_xray_pneumonia/224', data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(real_data)))
  return data_dir
