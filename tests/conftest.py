"""Shared fixtures."""

import dataclasses
import json
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


@pytest.fixture(scope='session')
def untrained_run(synthetic_data_dir, tmp_path_factory):
  """Makes a run's model_dir as training leaves it (model.keras, run.json), with an untrained CNN on the synthetic
  config: for tests of reports and tools, which need a run but no skill. Call it with the input size."""
  # Imported here: TensorFlow starts with them, and the dataset tests need neither.
  import keras

  from trainer import export
  from trainer import models
  from trainer.config import Config

  def make(image_size: int, *, seed: int = 0, threshold: float = 0.5) -> pathlib.Path:
    model_dir = tmp_path_factory.mktemp('run')
    config = Config(model='cnn', dataset='chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir,
                    model_dir=str(model_dir), image_size=image_size, cnn_filters=4, cnn_depth=2, weights='none')
    keras.utils.set_random_seed(seed)
    export.save_keras(models.build_model('cnn', image_size=image_size, cnn_filters=4, cnn_depth=2),
                      str(model_dir / 'model.keras'))
    (model_dir / 'run.json').write_text(json.dumps({'config': dataclasses.asdict(config), 'image_size': image_size,
                                                     'threshold': threshold}))
    return model_dir

  return make
