"""Tests for trainer.predict: predictions on files, bad files, DICOM, Grad-CAM, ensembles, the CLI."""

import io
import json
import os
import pathlib
import sys

import keras
import numpy as np
from PIL import Image
import pydicom
from pydicom.dataset import Dataset
from pydicom.dataset import FileMetaDataset
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from trainer import data
from trainer import runs as runs_lib
from trainer import export
from trainer import models
from trainer import predict
from trainer import train
from trainer.config import Config

SIZE = 32
OTHER_SIZE = 24  # The ensemble's second member's, smaller than the run's.


@pytest.fixture(scope='module')
def run(synthetic_data_dir, tmp_path_factory):
  """One short CNN run on the synthetic config (the test split's pneumonia images get probabilities near 1).

  Without augmentation: what these tests need is a model that learned, sooner (its validation ROC-AUC is 1 at the
  4th epoch); with contrast jitter in both directions, 4 epochs at 64 pixels left the test ROC-AUC at 0.97 and some
  test images mislabelled.
  """
  config = Config(model='cnn', dataset='chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir,
                  model_dir=str(tmp_path_factory.mktemp('run')), image_size=SIZE, epochs=4, fine_tune_epochs=0,
                  batch_size=32, cnn_filters=16, cnn_depth=4, learning_rate=1e-3, seed=1, weights='none',
                  augment_strength=0).validate()
  keras.utils.set_random_seed(config.seed)
  train.run(config, tf.distribute.OneDeviceStrategy('/cpu:0'))
  return runs_lib.load_run(config.model_dir)


@pytest.fixture(scope='module')
def split_images(synthetic_data_dir, tmp_path_factory):
  """Eight synthetic test images as JPEG files (their stored bytes), four of each class, and their labels."""
  folder = tmp_path_factory.mktemp('images')
  ds = tfds.builder('chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir).as_dataset(
      'test', decoders={'image': tfds.decode.SkipDecoding()})
  files, labels = [], []
  for example in ds:
    label = int(example['label'])
    if labels.count(label) < 4:
      files.append(folder / f'{len(files)}_{predict.CLASS_NAMES[label]}.jpeg')
      files[-1].write_bytes(example['image'].numpy())
      labels.append(label)
  return [str(f) for f in files], np.array(labels)


def _png(pixels):
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format='PNG')
  return out.getvalue()


def _write_dicom(path, pixels, photometric='MONOCHROME2'):
  """A minimal 12-bit digital X-ray DICOM file of `pixels`."""
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = pydicom.uid.DigitalXRayImageStorageForPresentation
  meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
  meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality = 'DX'
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
  ds.PixelData = pixels.astype(np.uint16).tobytes()
  ds.save_as(path, enforce_file_format=True)


def _predict(files, runs, **kwargs):
  threshold = kwargs.pop('threshold', runs[0].threshold)
  return list(predict.predict_files(files, runs, threshold=threshold, **kwargs))


def test_predictions_match_the_model_and_the_savedmodel(run, split_images):
  files, labels = split_images
  results = _predict(files, [run], batch_size=3)  # batches of 3: a short last batch too
  assert [r['file'] for r in results] == files
  encoded = [pathlib.Path(f).read_bytes() for f in files]
  images = np.stack([data.decode_image(b, SIZE) for b in encoded])
  expected = run.model(images, training=False).numpy()[:, 0]
  probs = np.array([r['probability'] for r in results])
  np.testing.assert_allclose(probs, expected, atol=1e-6)
  served = tf.saved_model.load(export.saved_model_path(run.model_dir)).signatures[export.SERVING_ENDPOINT]
  np.testing.assert_allclose(served(image_bytes=tf.constant(encoded))['probability'].numpy(), probs, atol=1e-5)

  threshold = json.loads(pathlib.Path(run.model_dir, 'run.json').read_text())['threshold']
  assert all(r['threshold'] == pytest.approx(threshold) for r in results)
  assert [r['label'] for r in results] == [predict.CLASS_NAMES[int(p >= threshold)] for p in probs]
  # The model learned: its labels are the true ones on these images.
  assert [r['label'] for r in results] == [predict.CLASS_NAMES[y] for y in labels]


def test_dicom_reads_like_the_same_pixels_in_a_png(run, split_images, tmp_path, monkeypatch):
  files, labels = split_images
  pixels = data.decode_image(pathlib.Path(files[int(np.argmax(labels))]).read_bytes(), 100).numpy()[..., 0]
  pixels[0, 0], pixels[0, 1] = 0, 255  # The full 8-bit range, so stretching it to 0-255 changes nothing.
  (tmp_path / 'same.png').write_bytes(_png(pixels))
  _write_dicom(tmp_path / 'same.dcm', pixels.astype(np.uint16) * 16)
  _write_dicom(tmp_path / 'inverted.dcm', (255 - pixels.astype(np.uint16)) * 16, photometric='MONOCHROME1')
  png, dicom, inverted = _predict([str(tmp_path / n) for n in ('same.png', 'same.dcm', 'inverted.dcm')], [run])
  assert png['probability'] > 0.5
  assert dicom['probability'] == pytest.approx(png['probability'], abs=1e-6)
  assert inverted['probability'] == pytest.approx(png['probability'], abs=1e-6)

  monkeypatch.setitem(sys.modules, 'pydicom', None)  # As if the dicom extra were not installed.
  [result] = _predict([str(tmp_path / 'same.dcm')], [run])
  assert 'pip install .[dicom]' in result['error']


def test_gradcam_of_the_trained_cnn(run, split_images, tmp_path):
  files, labels = split_images
  images = np.stack([data.decode_image(pathlib.Path(f).read_bytes(), SIZE) for f in files])
  maps = predict.make_gradcam(run.model, SIZE)(images).numpy()
  assert maps.shape == (len(files), SIZE, SIZE)
  assert maps.min() >= 0 and maps.max() <= 1
  for heatmap in maps[labels == 1]:
    assert heatmap.max() == pytest.approx(1) and heatmap.std() > 0.05

  results = _predict(files[:2], [run], gradcam_dir=str(tmp_path / 'cams'))
  for result in results:
    assert result['gradcam'] == str(tmp_path / 'cams' / (os.path.basename(result['file']) + '.gradcam.png'))
    overlay = np.asarray(Image.open(result['gradcam']))
    assert overlay.shape == (SIZE, SIZE, 3) and overlay.std() > 0


@pytest.mark.parametrize('name, size', [('resnet50', 64), ('vgg16', 32)])
def test_gradcam_of_the_backbones(name, size):
  keras.utils.set_random_seed(0)
  model = models.build(name, image_size=size, weights=None)
  images = np.random.default_rng(0).integers(0, 256, (2, size, size, 1), dtype=np.uint8)
  maps = predict.make_gradcam(model, size)(images).numpy()
  assert maps.shape == (2, size, size)
  assert np.all(maps.std(axis=(1, 2)) > 0.01)


def test_bad_files_get_error_lines_and_the_others_go_on(run, split_images, tmp_path):
  good = split_images[0][:2]
  jpeg = pathlib.Path(good[0]).read_bytes()
  png = _png(np.full((40, 30), 128, np.uint8))
  bad = {
      'empty.jpeg': b'',
      'text.jpeg': b'not an image at all',
      'truncated.jpeg': jpeg[:len(jpeg) // 2],
      'truncated.png': png[:len(png) // 2],
      'wide.png': _png(np.zeros((1, predict.MAX_SIDE + 1), np.uint8)),
      'bomb.png': _png(np.zeros((8000, 8000), np.uint8)),  # 64 Mpx in ~60 KB.
  }
  for name, content in bad.items():
    (tmp_path / name).write_bytes(content)
  buffer = io.BytesIO()
  Image.new('L', (10, 10)).save(buffer, format='BMP')
  (tmp_path / 'picture.bmp').write_bytes(buffer.getvalue())
  files = [good[0], *[str(tmp_path / n) for n in [*bad, 'picture.bmp', 'missing.png']], good[1]]
  results = _predict(files, [run], batch_size=4)
  assert [r['file'] for r in results] == files
  assert 'probability' in results[0] and 'probability' in results[-1]
  errors = {os.path.basename(r['file']): r['error'] for r in results[1:-1]}
  assert errors['empty.jpeg'] == 'empty file (0 bytes)'
  assert errors['text.jpeg'] == 'not a JPEG, PNG or DICOM image'
  assert 'may be truncated' in errors['truncated.jpeg'] and 'may be truncated' in errors['truncated.png']
  assert 'beyond what is read' in errors['wide.png'] and 'decompression bomb' in errors['bomb.png']
  assert errors['picture.bmp'] == 'a BMP image; JPEG, PNG and DICOM are read'
  assert errors['missing.png'] == 'cannot read: No such file or directory'


def test_an_unreadable_file_gets_an_error_line(run, split_images, tmp_path, monkeypatch):
  locked = tmp_path / 'locked.jpeg'
  locked.write_bytes(pathlib.Path(split_images[0][0]).read_bytes())
  locked.chmod(0)
  if os.geteuid() == 0:  # Root reads files whatever their permissions (CI runs as root): the OS's refusal, simulated.
    def refusing_open(path, *args, **kwargs):
      if os.fspath(path) == str(locked):
        raise PermissionError(13, 'Permission denied', str(locked))
      return open(path, *args, **kwargs)
    monkeypatch.setattr(predict, 'open', refusing_open, raising=False)
  [result] = _predict([str(locked)], [run])
  assert result['error'] == 'cannot read: Permission denied'


def test_find_images_walks_folders(tmp_path):
  for name in ('b/2.PNG', 'b/1.jpeg', 'a.dcm', 'notes.txt', '.hidden.jpeg', '__MACOSX/b/._1.jpeg', '.cache/x.png'):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(b'x')
  found = predict.find_images([str(tmp_path), str(tmp_path / 'notes.txt'), 'missing.jpeg'])
  assert [os.path.relpath(f, tmp_path) for f in found[:3]] == ['a.dcm', 'b/1.jpeg', 'b/2.PNG']
  assert found[3:] == [str(tmp_path / 'notes.txt'), 'missing.jpeg']
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='No image files'):
    predict.find_images([str(tmp_path / 'empty')])
  with pytest.raises(ValueError, match='Give the images'):
    predict.find_images([])


def test_ensemble(run, split_images, tmp_path, monkeypatch):
  files, _ = split_images
  # A second member at another input size: an untrained CNN, saved as a run would be.
  other_dir = tmp_path / 'other'
  keras.utils.set_random_seed(2)
  other_model = models.build('cnn', image_size=OTHER_SIZE, cnn_filters=4, cnn_depth=2)
  other_dir.mkdir()
  export.save_keras(other_model, str(other_dir / 'model.keras'))
  (other_dir / 'run.json').write_text(json.dumps({'config': run.config, 'image_size': OTHER_SIZE, 'threshold': 0.5}))
  other = runs_lib.load_run(str(other_dir))

  twice = runs_lib.ensemble_threshold([run, run])
  assert twice['threshold'] == pytest.approx(run.threshold, abs=1e-6)
  assert twice['validation_images'] > 0 and twice['validation_roc_auc'] > 0.9

  pair = predict.cached_ensemble_threshold([run, other], str(tmp_path / 'ensemble'))
  assert json.loads((tmp_path / 'ensemble' / predict.ENSEMBLE_FILE).read_text())['threshold'] == pair['threshold']
  results = _predict(files, [run, other], threshold=pair['threshold'])
  alone = [_predict(files, [member]) for member in (run, other)]
  for i, result in enumerate(results):
    members = [alone[0][i]['probability'], alone[1][i]['probability']]
    np.testing.assert_allclose(result['member_probabilities'], members, atol=1e-6)
    assert result['probability'] == pytest.approx(np.mean(members), abs=1e-6)
    assert result['label'] == predict.CLASS_NAMES[int(result['probability'] >= pair['threshold'])]

  # The cache answers while the members are unchanged, and is redone when a member's weights change.
  def fail(*args, **kwargs):
    raise AssertionError('the cached threshold should have been used')

  monkeypatch.setattr(runs_lib, 'ensemble_threshold', fail)
  assert predict.cached_ensemble_threshold([run, other], str(tmp_path / 'ensemble')) == pair
  monkeypatch.undo()
  other_model.get_layer('probability').bias.assign([3.0])
  export.save_keras(other_model, str(other_dir / 'model.keras'))
  changed = predict.cached_ensemble_threshold([run, runs_lib.load_run(str(other_dir))], str(tmp_path / 'ensemble'))
  assert changed['fingerprints'] != pair['fingerprints']

  # Their Grad-CAM is the mean of the members' maps (trainer.gradcam), drawn over each image.
  drawn = _predict(files[:2], [run, other], threshold=0.5, gradcam_dir=str(tmp_path / 'cams'))
  images = {size: np.stack([predict.read_image(f, [size])[size] for f in files[:2]]) for size in (OTHER_SIZE, SIZE)}
  # The smaller member's map is put at the larger member's side before the mean.
  small = predict.make_gradcam(other.model, OTHER_SIZE)(images[OTHER_SIZE])
  expected = (predict.make_gradcam(run.model, SIZE)(images[SIZE]).numpy()
              + tf.image.resize(small[..., None], [SIZE, SIZE], method='bilinear')[..., 0].numpy()) / 2
  assert 0 < expected.max() <= 1
  for result, image, heat in zip(drawn, images[SIZE], expected):
    assert np.asarray(Image.open(result['gradcam'])).tolist() == np.asarray(
        Image.open(io.BytesIO(predict.overlay_png(image, heat)))).tolist()


def test_cli(run, split_images, tmp_path, run_program):
  good = split_images[0][:2]
  (tmp_path / 'broken.jpeg').write_bytes(b'\xff\xd8\xff broken')
  code, stdout, stderr = run_program('trainer.predict', f'--model_dir={run.model_dir}',
                                      f'--gradcam_dir={tmp_path / "cams"}', *good, str(tmp_path / 'broken.jpeg'))
  assert code == 1, stderr
  lines = [json.loads(line) for line in stdout.splitlines()]
  assert [line['file'] for line in lines] == [*good, str(tmp_path / 'broken.jpeg')]
  assert set(lines[0]) == {'file', 'label', 'probability', 'threshold', 'threshold_rule', 'gradcam', 'warning'}
  assert all(line['warning'].startswith('trained on chest_xray_pneumonia/synthetic') for line in lines[:2])
  assert (lines[0]['threshold'], lines[0]['threshold_rule']) == (run.threshold, 'youden')
  assert os.path.isfile(lines[0]['gradcam']) and 'error' in lines[2]
  assert 'error: 1 of 3 files could not be read' in stderr
