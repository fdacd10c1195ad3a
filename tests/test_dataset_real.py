"""One check on real images: the 224 config built from a Kaggle-layout folder (skipped if absent).

The folder defaults to the development copy described in /work/shared/data/README.md; set
CXR_REAL_DATA_DIR to use another (e.g. the full Kaggle download).
"""

import collections
import os
import pathlib

import pytest
import tensorflow_datasets as tfds

REAL = pathlib.Path(os.environ.get('CXR_REAL_DATA_DIR', '/work/shared/data/chest_xray'))

pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f'no real data at {REAL}')


def _files(*folders):
  return sum(1 for folder in folders for path in (REAL / folder).glob('*/*') if not path.name.startswith('.'))


def test_real_224_counts_split_and_patients(tmp_path):
  builder = tfds.builder('chest_xray_pneumonia/224', data_dir=str(tmp_path))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(REAL)))
  splits = builder.info.splits
  metadata = builder.info.metadata
  assert not metadata['skipped_files']
  assert splits['train'].num_examples + splits['validation'].num_examples == _files('train', 'val')
  assert splits['test'].num_examples == _files('test')
  assert 0.08 < splits['validation'].num_examples / _files('train', 'val') < 0.12
  assert all(splits[split].num_shards >= 8 for split in ('train', 'validation', 'test'))

  patients = {}
  for split in splits:
    ds = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
    patients[split] = collections.Counter(ex['patient_id'] for ex in tfds.as_numpy(ds))
  assert not patients['train'].keys() & patients['validation'].keys()
  assert sum(patients['validation'].values()) == splits['validation'].num_examples
  ds = builder.as_dataset(split='validation').take(4)
  assert {tuple(ex['image'].shape) for ex in ds} == {(224, 224, 1)}
