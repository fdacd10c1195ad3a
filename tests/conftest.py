"""Shared fixtures."""

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
