"""The chest_xray_pneumonia builder on the dummy data: TFDS's own checks, both forms, splits, shards, CLI."""

import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cxr_tfds import build as build_lib
from cxr_tfds.chest_xray_pneumonia import chest_xray_pneumonia_dataset_builder as builder_lib

DUMMY = pathlib.Path(builder_lib.__file__).parent / 'dummy_data'
# The dummy release: 18 images; the truncated JPEG and the pneumonia image without a subtype are skipped.
SPLITS = {'train': 9, 'validation': 3, 'test': 4}
SKIPPED = {'train/NORMAL/IM-0900-0001.jpeg', 'train/PNEUMONIA/person900_5.jpeg'}


class KaggleZipTest(tfds.testing.DatasetBuilderTestCase):
  """The Kaggle zip as downloaded: nested copy, __MACOSX, .DS_Store, a corrupt file."""

  DATASET_CLASS = builder_lib.Builder
  EXAMPLE_DIR = str(DUMMY / 'kaggle')
  BUILDER_CONFIG_NAMES_TO_TEST = ['original', '224']
  SPLITS = SPLITS


class MendeleyFolderTest(tfds.testing.DatasetBuilderTestCase):
  """The Mendeley layout, extracted: no val folder, macOS junk beside it."""

  DATASET_CLASS = builder_lib.Builder
  EXAMPLE_DIR = str(DUMMY / 'mendeley')
  BUILDER_CONFIG_NAMES_TO_TEST = ['512']
  SPLITS = SPLITS


def _build(config, manual_dir, data_dir, **download_kwargs):
  builder = tfds.builder(f'chest_xray_pneumonia/{config}', data_dir=str(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir), **download_kwargs))
  return builder


def _examples(builder):
  """{split: {file_name: (jpeg bytes, label, finding, patient_id)}}, with the images undecoded."""
  out = {}
  for split in SPLITS:
    ds = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
    out[split] = {ex['file_name'].decode(): (ex['image'], ex['label'], ex['finding'], ex['patient_id'].decode())
                  for ex in tfds.as_numpy(ds)}
  return out


@pytest.fixture(scope='module')
def built_224(tmp_path_factory):
  """{form: builder} for the 224 config built from the Kaggle zip, that zip extracted, and Mendeley."""
  tmp = tmp_path_factory.mktemp('forms')
  with zipfile.ZipFile(DUMMY / 'kaggle' / 'archive.zip') as zf:
    zf.extractall(tmp / 'extracted')
  manual_dirs = {'zip': DUMMY / 'kaggle', 'extracted': tmp / 'extracted', 'mendeley': DUMMY / 'mendeley'}
  return {form: _build('224', manual_dir, tmp / form) for form, manual_dir in manual_dirs.items()}


def test_zip_form_equals_extracted_folder(built_224):
  from_zip = _examples(built_224['zip'])
  assert {split: len(examples) for split, examples in from_zip.items()} == SPLITS
  assert from_zip == _examples(built_224['extracted'])


def test_patient_split_is_disjoint_and_stable_across_rebuilds(built_224):
  kaggle, mendeley = _examples(built_224['zip']), _examples(built_224['mendeley'])
  patients = {split: {ex[3] for ex in examples.values()} for split, examples in kaggle.items()}
  assert not patients['train'] & patients['validation']
  assert 'pneumonia/person3' in patients['validation']  # Both its images: one from val/, one from train/.
  # Another layout of the same images, built again: the same examples in the same splits.
  assert {split: {ex[3] for ex in examples.values()} for split, examples in mendeley.items()} == patients
  assert ({split: sorted(ex[:3] for ex in examples.values()) for split, examples in kaggle.items()} ==
          {split: sorted(ex[:3] for ex in examples.values()) for split, examples in mendeley.items()})


def test_sized_configs_store_grayscale_and_original_keeps_source_bytes(built_224, tmp_path):
  for jpeg, *_ in _examples(built_224['zip'])['train'].values():
    assert tf.io.decode_jpeg(jpeg, channels=0).shape == (224, 224, 1)
  original = _examples(_build('original', DUMMY / 'kaggle', tmp_path))
  name = 'train/NORMAL/IM-0001-0002.jpeg'  # An RGB source: still RGB in the bytes.
  assert original['train'][name][0] == (DUMMY / 'mendeley' / 'chest_xray' / name).read_bytes()
  ds = tfds.load('chest_xray_pneumonia/original', split='train', data_dir=str(tmp_path))
  shapes = {tuple(ex['image'].shape) for ex in ds}
  assert len(shapes) > 1 and {shape[-1] for shape in shapes} == {1}


def test_skipped_files_are_recorded_in_the_saved_metadata(built_224):
  reloaded = tfds.builder('chest_xray_pneumonia/224', data_dir=str(built_224['zip'].data_dir_root))
  metadata = reloaded.info.metadata
  assert set(metadata['skipped_files']) == SKIPPED
  assert 'cannot decode' in metadata['skipped_files']['train/NORMAL/IM-0900-0001.jpeg']
  assert metadata['release'] is None
  assert metadata['source_counts']['val/PNEUMONIA'] == 1
  assert metadata['counts']['validation'] == {'normal': 1, 'viral': 2}


def test_at_least_8_shards_even_when_the_caller_asks_for_fewer(tmp_path):
  builder = _build('224', DUMMY / 'kaggle', tmp_path, num_shards=2)
  # 8 for train; a split with fewer examples gets one shard per example.
  assert {s: builder.info.splits[s].num_shards for s in SPLITS} == {'train': 8, 'validation': 3, 'test': 4}
  files = sorted(p.name for p in pathlib.Path(builder.data_dir).glob('*-train.tfrecord-*'))
  assert len(files) == 8


def test_build_function_and_summary(tmp_path):
  builder = build_lib.build('224', str(tmp_path), str(DUMMY / 'kaggle'))
  text = build_lib.summary(builder)
  assert 'train' in text and '9 examples in  8 shards' in text
  assert 'IM-0900-0001.jpeg: cannot decode' in text
  with pytest.raises(ValueError, match="Unknown config '1024'"):
    build_lib.build('1024', str(tmp_path), str(DUMMY / 'kaggle'))


def test_build_command(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'cxr_tfds.build', '--config', '224', '--data_dir', str(tmp_path),
       '--manual_dir', str(DUMMY / 'mendeley')],
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'test           4 examples in  4 shards' in result.stdout
  assert 'images/s' in result.stderr and 'Skipping train/NORMAL/IM-0900-0001.jpeg' in result.stderr
  assert (tmp_path / 'chest_xray_pneumonia' / '224' / '1.0.0' / 'metadata.json').exists()


def _damaged_copy(tmp_path, folder):
  """The Mendeley dummy release with every image of `folder` cut to 100 bytes; returns (manual dir, count cut)."""
  manual_dir = tmp_path / 'manual'
  shutil.copytree(DUMMY / 'mendeley', manual_dir)
  images = sorted((manual_dir / 'chest_xray' / folder).glob('*.jpeg'))
  for image in images:
    image.write_bytes(image.read_bytes()[:100])
  return manual_dir, len(images)


def test_a_class_emptied_by_unreadable_files_is_refused_naming_it(tmp_path):
  manual_dir, _ = _damaged_copy(tmp_path, 'train/NORMAL')
  with pytest.raises(ValueError, match=r'The (train|validation) split has no normal image: ([1-9]\d*) of its normal '
                                       r'files could not be used') as error:
    _build('224', manual_dir, tmp_path / 'data')
  # The count is that split's own: the normal images the patient split gave it, all of them unreadable.
  split, count = re.search(r'The (\w+) split has no normal image: (\d+)', str(error.value)).groups()
  assert int(count) == {'train': 6, 'validation': 1}[split]
  assert not tfds.builder('chest_xray_pneumonia/224', data_dir=str(tmp_path / 'data')).is_prepared()


def test_the_skipped_files_are_bounded(tmp_path):
  with pytest.raises(ValueError, match=r'More than 1 files could not be used \(the last: \S+\.jpeg: .*'
                                       r'--max_skipped_files'):
    build_lib.build('224', str(tmp_path), str(DUMMY / 'mendeley'), max_skipped_files=1)
  assert not tfds.builder('chest_xray_pneumonia/224', data_dir=str(tmp_path)).is_prepared()
  assert build_lib.build('224', str(tmp_path), str(DUMMY / 'mendeley'), max_skipped_files=2).is_prepared()


@pytest.mark.parametrize('damaged, flag, message', [
    ('train/PNEUMONIA', None, 'split has no pneumonia image'),
    (None, '--max_skipped_files=0', 'More than 0 files could not be used'),
])
def test_build_command_refuses_a_damaged_release_on_one_line(damaged, flag, message, tmp_path):
  manual_dir = _damaged_copy(tmp_path, damaged)[0] if damaged else DUMMY / 'mendeley'
  result = subprocess.run(
      [sys.executable, '-m', 'cxr_tfds.build', '--config', '224', '--data_dir', str(tmp_path / 'data'),
       '--manual_dir', str(manual_dir), *([flag] if flag else [])],
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1, result.stderr[-2000:]
  [line] = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert message in line and 'Traceback' not in result.stderr, result.stderr[-2000:]
