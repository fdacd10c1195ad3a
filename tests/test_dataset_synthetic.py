"""The synthetic config: counts, shapes, shards, patient split, determinism, and that it is learnable."""

import collections

import keras
import numpy as np
import pytest
from sklearn import metrics
import tensorflow_datasets as tfds

from cxr_tfds.chest_xray_pneumonia import sources
from cxr_tfds.chest_xray_pneumonia import synthetic

NAME = 'chest_xray_pneumonia/synthetic'


@pytest.fixture(scope='module')
def splits(synthetic_data_dir):
  """{split: list of numpy examples}, images decoded."""
  return {split: list(tfds.as_numpy(tfds.load(NAME, split=split, data_dir=synthetic_data_dir)))
          for split in sources.SPLITS}


def _arrays(examples):
  return (np.stack([ex['image'] for ex in examples]), np.array([ex['label'] for ex in examples]))


def test_builds_without_download(synthetic_data_dir):
  assert tfds.builder(NAME, data_dir=synthetic_data_dir).is_prepared()


def test_the_default_config_is_the_real_data_and_without_it_says_where_to_put_it(tmp_path):
  # As for TFDS's other manual-download datasets: a bare name means the real images, never fake ones silently.
  builder = tfds.builder('chest_xray_pneumonia', data_dir=str(tmp_path))
  assert builder.builder_config.name == '224'
  with pytest.raises(FileNotFoundError) as raised:
    builder.download_and_prepare()
  message = str(raised.value)
  assert '\n' not in message
  assert str(tmp_path / 'downloads' / 'manual') in message and 'kaggle datasets download' in message
  assert 'chest_xray_pneumonia/synthetic' in message


def test_counts_shapes_and_classes(splits):
  assert {split: len(examples) for split, examples in splits.items()} == {
      'train': 534, 'validation': 66, 'test': 120}
  for examples in splits.values():
    images, labels = _arrays(examples)
    assert images.shape[1:] == (128, 128, 1) and images.dtype == np.uint8
    assert 0.15 < 1 - labels.mean() < 0.35  # About 1 normal in 4.
  findings = collections.Counter(
      (ex['label'], ex['finding']) for examples in splits.values() for ex in examples)
  assert set(findings) == {(0, 0), (1, 1), (1, 2)}  # normal/normal, pneumonia/bacterial, pneumonia/viral.


def test_patients_have_several_images_and_never_cross_train_and_validation(splits):
  patients = {split: collections.Counter(ex['patient_id'] for ex in examples) for split, examples in splits.items()}
  assert not patients['train'].keys() & patients['validation'].keys()
  assert not patients['train'].keys() & patients['test'].keys()
  assert max(patients['train'].values()) >= 3
  for split in ('train', 'validation'):
    assert {sources.split_for_patient(p.decode()) for p in patients[split]} == {split}


def test_at_least_8_shards_per_split(synthetic_data_dir):
  builder = tfds.builder(NAME, data_dir=synthetic_data_dir)
  assert all(info.num_shards >= 8 for info in builder.info.splits.values())


def test_deterministic_stored_bytes_are_the_rendering(synthetic_data_dir):
  ds = tfds.load(NAME, split='test[:5]', data_dir=synthetic_data_dir,
                 decoders={'image': tfds.decode.SkipDecoding()})
  by_name = {image.file_name: image for image in synthetic.Source().images}
  for ex in tfds.as_numpy(ds):
    assert ex['image'] == synthetic.render(by_name[ex['file_name'].decode()])


def test_mean_brightness_does_not_give_the_class_away(splits):
  images, labels = _arrays(splits['train'])
  auc = metrics.roc_auc_score(labels, images.mean(axis=(1, 2, 3)))
  assert 0.35 < auc < 0.65, auc


def test_a_tiny_cnn_learns_it_in_two_epochs(splits):
  x_train, y_train = _arrays(splits['train'])
  x_val, y_val = _arrays(splits['validation'])
  keras.utils.set_random_seed(0)
  model = keras.Sequential([
      keras.Input((128, 128, 1)),
      keras.layers.Rescaling(1 / 127.5, offset=-1),
      keras.layers.Conv2D(16, 3, padding='same', activation='relu'),
      keras.layers.MaxPooling2D(4),
      keras.layers.Conv2D(32, 3, padding='same', activation='relu'),
      keras.layers.MaxPooling2D(4),
      keras.layers.Flatten(),
      keras.layers.Dense(1),
  ])
  model.compile(keras.optimizers.Adam(1e-3), keras.losses.BinaryCrossentropy(from_logits=True))
  model.fit(x_train, y_train, batch_size=16, epochs=2, verbose=0)
  auc = metrics.roc_auc_score(y_val, model.predict(x_val, verbose=0)[:, 0])
  assert auc > 0.9, auc


def test_tfds_tools_work_on_the_dataset(synthetic_data_dir):
  """tfds.as_dataframe, tfds.benchmark and tfds.show_examples, with what `pip install -e .` brings."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  builder = tfds.builder(NAME, data_dir=synthetic_data_dir)
  ds = builder.as_dataset('validation')
  frame = tfds.as_dataframe(ds.take(5), builder.info)
  assert len(frame) == 5 and {'label', 'finding', 'patient_id', 'file_name'} <= set(frame.columns)
  stats = tfds.benchmark(ds, batch_size=16).stats  # A pandas frame: the first batch, the rest, and both.
  assert stats.loc['first', 'num_examples'] == 16 and stats.loc['first+lasts', 'avg'] > 0
  figure = tfds.show_examples(ds, builder.info, rows=2, cols=2)
  assert len(figure.axes) == 4
