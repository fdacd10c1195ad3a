"""One check on real images: the 224 config built from a Kaggle-layout folder (skipped if absent).

The folder is the development copy beside the repository (../shared/data/chest_xray, see tests/conftest.py);
CXR_REAL_DATA_DIR points at another, e.g. the full Kaggle download.
"""

import collections

import tensorflow_datasets as tfds


def _files(real, *folders):
  return sum(1 for folder in folders for path in (real / folder).glob('*/*') if not path.name.startswith('.'))


def test_real_224_counts_split_and_patients(real_data, real_224_data_dir):
  builder = tfds.builder('chest_xray_pneumonia/224', data_dir=real_224_data_dir)
  splits = builder.info.splits
  metadata = builder.info.metadata
  assert not metadata['skipped_files']
  assert splits['train'].num_examples + splits['validation'].num_examples == _files(real_data, 'train', 'val')
  assert splits['test'].num_examples == _files(real_data, 'test')
  assert 0.08 < splits['validation'].num_examples / _files(real_data, 'train', 'val') < 0.12
  assert all(splits[split].num_shards >= 8 for split in ('train', 'validation', 'test'))

  patients = {}
  for split in splits:
    ds = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
    patients[split] = collections.Counter(ex['patient_id'] for ex in tfds.as_numpy(ds))
  assert not patients['train'].keys() & patients['validation'].keys()
  assert sum(patients['validation'].values()) == splits['validation'].num_examples
  ds = builder.as_dataset(split='validation').take(4)
  assert {tuple(ex['image'].shape) for ex in ds} == {(224, 224, 1)}
