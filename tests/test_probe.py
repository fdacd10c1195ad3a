"""The hostile probe's defects (issue 28), each one a test: racing writers, EXIF orientation, an optional output that
fails, a run.json not written by the trainer, folder walks, tracebacks instead of one line, and the minor ones."""

import errno
import gc
import io
import json
import logging
import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cxr_tfds.chest_xray_pneumonia import imaging
from cxr_tfds.chest_xray_pneumonia import sources
from trainer import cli
from trainer import control as control_lib
from trainer import data
from trainer import errors
from trainer import export
from trainer import lock
from trainer import predict
from trainer import runs as runs_lib

_ORIENTATION = 0x0112  # The EXIF tag.


def _holder(folder, what='training run'):
  """A process that holds the lock on `folder` until it is killed, as `what`."""
  process = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from trainer import lock\n'
       'with lock.hold(sys.argv[1], what=sys.argv[2]):\n  print("held", flush=True); time.sleep(600)', folder, what],
      stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline() == 'held\n'
  return process


# 1. Racing writers.


def test_an_export_into_a_folder_another_writer_holds_is_refused_and_deletes_nothing(tmp_path):
  out_dir = str(tmp_path)
  other = tmp_path / export.EXPORTS / '7.partial'  # What the other writer is filling.
  other.mkdir(parents=True)
  process = _holder(out_dir, 'export')
  try:
    with pytest.raises(lock.LockedError, match=rf'in use by another export \(pid {process.pid} on .*\)'):
      with export.committing(out_dir) as (folder, _):
        (tmp_path / 'written').touch()
  finally:
    process.kill()
    process.wait()
  assert other.is_dir() and not (tmp_path / 'written').exists()
  assert not os.path.islink(tmp_path / export.CURRENT)


def test_a_writer_that_holds_the_lock_commits_its_own_export(tmp_path):
  # Training holds its model dir's lock from start to finish, its final export included.
  with lock.hold(str(tmp_path)):
    with export.committing(str(tmp_path)) as (folder, number):
      with open(os.path.join(folder, 'run.json'), 'w') as f:
        f.write('{}')
    assert lock.held(str(tmp_path))
  assert os.path.realpath(tmp_path / export.CURRENT) == str(tmp_path / export.EXPORTS / str(number))
  assert not lock.held(str(tmp_path))


def test_the_export_program_is_refused_at_once_while_a_training_run_holds_its_out_dir(tmp_path, run_program):
  process = _holder(str(tmp_path))
  try:
    code, _, stderr = run_program('trainer.export', f'--model_dir={tmp_path / "run"}', f'--out_dir={tmp_path}')
  finally:
    process.kill()
    process.wait()
  assert code == 1 and 'Traceback' not in stderr, stderr[-2000:]
  [line] = [line for line in stderr.splitlines() if line.startswith('error:')]
  assert f'--out_dir={tmp_path} is in use by another training run (pid {process.pid} on ' in line, line


# 2. EXIF orientation.


def _asymmetric(size=(96, 64)):
  """A grey image with a bright band on its left and a mid one at its top: each rotation looks different."""
  pixels = np.full(size[::-1], 60, np.uint8)
  pixels[:, :size[0] // 4] = 230
  pixels[:size[1] // 5, :] = 150
  return Image.fromarray(pixels)


def _stored_rotated(image, fmt):
  """`image` as a phone stores it: the sensor's pixels turned, and EXIF Orientation 6 to turn them back."""
  exif = Image.Exif()
  exif[_ORIENTATION] = 6  # Display: rotate 90 degrees clockwise.
  out = io.BytesIO()
  image.transpose(Image.Transpose.ROTATE_90).save(out, format=fmt, exif=exif)
  return out.getvalue()


def _encoded(image, fmt):
  out = io.BytesIO()
  image.save(out, format=fmt)
  return out.getvalue()


@pytest.mark.parametrize('fmt, tolerance', [('PNG', 0), ('JPEG', 4)])
def test_predict_reads_an_image_the_way_up_its_exif_orientation_says(fmt, tolerance, tmp_path):
  upright, rotated = tmp_path / f'upright.{fmt.lower()}', tmp_path / f'rotated.{fmt.lower()}'
  upright.write_bytes(_encoded(_asymmetric(), fmt))
  rotated.write_bytes(_stored_rotated(_asymmetric(), fmt))
  expected = predict.read_image(str(upright), [32])[32].astype(int)
  got = predict.read_image(str(rotated), [32])[32].astype(int)
  assert np.abs(got - expected).mean() <= tolerance, np.abs(got - expected).mean()
  # The server's entry point: the same bytes, the way up, for the SavedModel's bytes-in signature.
  turned = data.decode_image(data.upright(_stored_rotated(_asymmetric(), fmt)), 32).numpy().astype(int)
  assert np.abs(turned - expected).mean() <= tolerance
  plain = _encoded(_asymmetric(), fmt)
  assert data.upright(plain) is plain  # No orientation tag: the bytes as they came.


def test_the_dataset_stores_an_image_the_way_up_its_exif_orientation_says():
  for size in (32, None):
    expected = np.asarray(Image.open(io.BytesIO(imaging.to_jpeg(_encoded(_asymmetric(), 'JPEG'), size))), int)
    got = np.asarray(Image.open(io.BytesIO(imaging.to_jpeg(_stored_rotated(_asymmetric(), 'JPEG'), size))), int)
    assert got.shape == expected.shape and np.abs(got - expected).mean() <= 4, size


def test_the_saved_models_contract_on_exif_is_in_its_signature_docs_and_model_card():
  # TF's decoders ignore EXIF: the bytes-in signature reads the stored pixels as they are, and says so.
  assert 'EXIF' in export.export_saved_model.__doc__ and 'trainer.data.upright' in export.export_saved_model.__doc__
  card = export.model_card(_REPORT, {'threshold': 0.5, 'threshold_rule': 'youden', 'config': {}})
  assert 'EXIF orientation' in card and 'trainer.data.upright' in card
  raw = _stored_rotated(_asymmetric(), 'PNG')
  as_stored = np.asarray(Image.open(io.BytesIO(raw)).convert('L'))
  np.testing.assert_array_equal(data.decode_image(raw, 64).numpy()[..., 0],
                                data.resize_uint8(as_stored[..., None], 64).numpy()[..., 0])


_INTERVALS = {name: [0.1, 0.9] for name in ('accuracy', 'sensitivity', 'specificity', 'precision', 'f1')}
_REPORT = {
    'at_val_threshold': {**{name: 0.5 for name in _INTERVALS}, 'ci95': _INTERVALS,
                         'confusion_matrix': [[1, 1], [1, 1]]},
    'ranking': {'roc_auc': 0.5, 'pr_auc': 0.5, 'ci95': {'roc_auc': [0.1, 0.9], 'pr_auc': [0.1, 0.9]}},
    'n_images': 4, 'n_patients': 4, 'positives': 2, 'threshold_rule': 'Youden.', 'bootstrap': {'n_resamples_used': 9},
    'calibration': {'ece': 0.1, 'n_bins': 10, 'brier': 0.2}}


# 3. A failed Grad-CAM overlay.


def _png(path, size=64):
  _asymmetric((size, size)).save(path, format='PNG')
  return str(path)


def test_a_failed_overlay_is_an_error_on_its_line_and_every_label_is_printed(untrained_run, tmp_path, monkeypatch):
  run = runs_lib.load_run(str(untrained_run(32)))
  files = [_png(tmp_path / f'{i}.png') for i in range(3)]
  write_atomic = predict.files_lib.write_atomic

  def full_disk_for_the_second(path, contents, partial=None):
    if path.endswith('1.png.gradcam.png'):
      raise errors.WriteFailed(f'Cannot write {path}: No space left on device. Its previous version, if any, is kept.')
    return write_atomic(path, contents, partial)

  monkeypatch.setattr(predict.files_lib, 'write_atomic', full_disk_for_the_second)
  results = list(predict.predict_files(files, [run], threshold=0.5, gradcam_dir=str(tmp_path / 'cam')))
  assert [r['file'] for r in results] == files
  assert all(r['label'] in predict.CLASS_NAMES and 0 <= r['probability'] <= 1 for r in results)
  assert 'error' not in results[0] and os.path.isfile(results[0]['gradcam'])
  assert 'gradcam' not in results[1] and results[1]['error'].startswith('Grad-CAM overlay not written: Cannot write ')
  assert 'No space left on device' in results[1]['error']


# 4. run.json validated when loaded.


@pytest.mark.parametrize('field, value, reason', [
    ('threshold', True, 'its threshold true is not a probability'),
    ('threshold', '0.5', 'its threshold "0.5" is not a probability'),
    ('image_size', 64, 'its image_size 64 is not the input size of its model.keras (32)'),
    ('image_size', 0, 'its image_size 0 is not a positive whole number'),
    ('image_size', -32, 'its image_size -32 is not a positive whole number'),
    ('image_size', 32.5, 'its image_size 32.5 is not a positive whole number'),
    ('image_size', True, 'its image_size true is not a positive whole number'),
    ('config', [], 'its config [] is not an object'),
    ('threshold_rule', 3, 'its threshold_rule 3 is not a name'),
])
def test_a_run_json_field_of_the_wrong_type_or_range_is_one_line_naming_the_file_and_field(
    field, value, reason, untrained_run):
  model_dir = untrained_run(32)
  run = json.loads((model_dir / 'run.json').read_text())
  (model_dir / 'run.json').write_text(json.dumps({**run, field: value}))
  with pytest.raises(errors.InvalidValue) as error:
    runs_lib.load_run(str(model_dir))
  message = str(error.value)
  assert message == f'{model_dir / "run.json"} is not a run.json written by the trainer (ValueError: {reason}).'


def test_a_run_json_that_is_not_an_object_is_one_line(untrained_run):
  model_dir = untrained_run(32)
  (model_dir / 'run.json').write_text('[1, 2]')
  with pytest.raises(errors.InvalidValue, match=r'run.json is not a run.json written by the trainer \(ValueError: '
                                                r'JSON list, not an object\)'):
    runs_lib.load_run(str(model_dir))


# 6, 7. Folder walks.


def _dicom(path):
  pydicom = pytest.importorskip('pydicom')
  from pydicom.dataset import FileDataset, FileMetaDataset  # pylint: disable=import-outside-toplevel
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # pylint: disable=import-outside-toplevel
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b'\0' * 128)
  dataset.Rows = dataset.Columns = 64
  dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, 'MONOCHROME2'
  dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
  dataset.PixelData = np.asarray(_asymmetric((64, 64))).tobytes()
  dataset.save_as(str(path), enforce_file_format=True)
  return str(path)


def test_a_folder_walk_reads_extensionless_dicom_and_counts_what_it_skips(tmp_path, caplog):
  scans = tmp_path / 'scans'
  scans.mkdir()
  dicom = _dicom(scans / 'IM00001')  # What PACS exports: no extension.
  png = _png(scans / 'a.png')
  for name in ('b.bmp', 'c.tiff', 'notes'):
    (scans / name).write_bytes(b'not read' * 20)
  with caplog.at_level(logging.DEBUG):
    found = predict.find_images([str(scans)])
  assert found == [dicom, png]
  assert predict.read_image(dicom, [32])[32].shape == (32, 32, 1)
  assert 'Skipped 3 files that are not JPEG, PNG or DICOM' in caplog.text
  assert all(str(scans / name) in caplog.text for name in ('b.bmp', 'c.tiff', 'notes'))


def test_a_folder_walk_skips_the_projects_own_overlays_and_gradcam_dir(tmp_path):
  scans = tmp_path / 'scans'
  scans.mkdir()
  png = _png(scans / 'a.png')
  (scans / 'cam').mkdir()
  _png(scans / 'cam' / 'a.png')  # In --gradcam_dir, whatever its name.
  _png(scans / 'b.png.gradcam.png')  # An overlay left by an earlier run.
  assert predict.find_images([str(scans)], skip=str(scans / 'cam')) == [png]


# 8. Tracebacks -> one line.


def _program(argv):
  """A program whose main raises OSError(int(argv[1])) from a write, run by trainer.cli as every program is."""
  code = int(argv[1])
  raise OSError(code, os.strerror(code), '/data/out/report.json')


def _run_cli(capsys, monkeypatch, *argv):
  """(exit code, stderr) of `cli.run(_program)` with ARGV, in this process."""
  monkeypatch.setattr(sys, 'argv', ['program', *argv])
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    cli.run(_program)
  return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize('code', [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_an_unwritable_or_full_output_folder_is_one_line(code, capsys, monkeypatch):
  exit_code, stderr = _run_cli(capsys, monkeypatch, str(code))
  assert exit_code == 1 and 'Traceback' not in stderr, stderr
  assert _error_line(stderr) == f'error: /data/out/report.json: {os.strerror(code)}.'


def test_a_binary_flagfile_is_one_line(tmp_path, capsys, monkeypatch):
  flagfile = tmp_path / 'flags.bin'
  flagfile.write_bytes(b'\xff\xfe\x00binary\x80')
  exit_code, stderr = _run_cli(capsys, monkeypatch, f'--flagfile={flagfile}')
  assert exit_code == 1 and 'Traceback' not in stderr, stderr
  assert _error_line(stderr).startswith(f'error: --flagfile={flagfile} is not a text file of flags')


def _error_line(stderr):
  [line] = [line for line in stderr.splitlines() if line.startswith('error:')]
  assert stderr.strip().endswith(line)
  return line


def test_a_full_disk_during_the_dataset_build_is_one_line(tmp_path, monkeypatch):
  def full(self, **kwargs):
    raise RuntimeError('Failed to write: ResourceExhaustedError: /data/tfds/x.tfrecord; No space left on device')
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', full)
  with pytest.raises(errors.WriteFailed, match=r'^Cannot build chest_xray_pneumonia/synthetic in .*: No space left on '
                                               r'device\.'):
    data.prepare('chest_xray_pneumonia/synthetic', data_dir=str(tmp_path), manual_dir=None)


def test_a_model_that_safe_mode_refuses_is_one_line(tmp_path):
  model = keras.Sequential([keras.Input((3,)), keras.layers.Lambda(lambda x: x * 2)])
  path = str(tmp_path / 'untrusted.keras')
  model.save(path)
  with pytest.raises(errors.InvalidValue) as error:
    export.load_model(path)
  assert str(error.value).startswith(f'{path} holds Python code (a Lambda layer') and '\n' not in str(error.value)


def test_cli_treats_only_the_users_os_errors_as_one_line():
  assert cli.is_user_error(OSError(errno.ENOSPC, 'No space left on device'))
  assert cli.is_user_error(RuntimeError('wrapped')) is False
  wrapped = RuntimeError('wrapped')
  wrapped.__cause__ = OSError(errno.EROFS, 'Read-only file system')
  assert cli.is_user_error(wrapped)
  assert not cli.is_user_error(OSError(errno.EBADF, 'Bad file descriptor'))  # A bug.


# 9. Quiet resumes.


def test_restoring_the_counters_logs_no_unmatched_values(tmp_path, caplog):
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.BatchNormalization()])
  control = control_lib.PhaseControl(patience=0, plateau=None)
  control.trained_epochs.assign(3)
  path = tf.train.Checkpoint(model=model, phase_control=control).save(str(tmp_path / 'ckpt'))
  restored = control_lib.PhaseControl(patience=0, plateau=None)
  with caplog.at_level(logging.WARNING):
    control_lib.restore_counters(restored, path, epoch=3)
    gc.collect()  # TF logs the unmatched values when the restore's status is deleted.
  assert int(restored.trained_epochs) == 3
  assert 'could not be found in the restored object' not in caplog.text


# 11. Minor.


def test_an_empty_model_dir_entry_is_named(tmp_path):
  with pytest.raises(errors.InvalidValue, match=r'^--model_dir has an empty entry \(a trailing or doubled comma\?'):
    runs_lib.load_run('')


def test_an_unread_archive_is_named_when_nothing_is_found(tmp_path):
  (tmp_path / 'chest-xray-pneumonia.tar.gz').write_bytes(b'\x1f\x8b not read')
  with pytest.raises(FileNotFoundError, match=r'found: nothing; chest-xray-pneumonia.tar.gz is not read: extract it'):
    sources.ManualSource.find(tmp_path)


def test_a_symlinked_zip_at_the_top_of_the_manual_dir_is_read(tmp_path):
  release = tmp_path / 'release'
  for name in ('train/NORMAL/IM-0001-0001.jpeg', 'train/PNEUMONIA/person1_virus_1.jpeg',
               'test/NORMAL/IM-0002-0001.jpeg', 'test/PNEUMONIA/person2_bacteria_2.jpeg'):
    (release / name).parent.mkdir(parents=True, exist_ok=True)
    (release / name).write_bytes(_encoded(_asymmetric((20, 16)), 'JPEG'))
  with zipfile.ZipFile(tmp_path / 'download.zip', 'w') as zf:
    for path in sorted(release.rglob('*.jpeg')):
      zf.write(path, 'chest_xray/' + path.relative_to(release).as_posix())
  (tmp_path / 'manual').mkdir()
  (tmp_path / 'manual' / 'archive.zip').symlink_to(tmp_path / 'download.zip')
  assert len(sources.ManualSource.find(tmp_path / 'manual').images) == 4
  # Deeper down, a link is still refused: it may lead out of the tree the user chose.
  (tmp_path / 'manual' / 'archive.zip').unlink()
  (tmp_path / 'manual' / 'sub').mkdir()
  (tmp_path / 'manual' / 'sub' / 'archive.zip').symlink_to(tmp_path / 'download.zip')
  with pytest.raises(ValueError, match='Refusing symlink'):
    sources.ManualSource.find(tmp_path / 'manual')


def test_a_file_name_that_is_not_utf8_is_a_valid_json_line(untrained_run, tmp_path):
  run = runs_lib.load_run(str(untrained_run(32)))
  name = os.fsdecode(b'scan-\xff.png')  # As os.walk gives it: a lone surrogate.
  path = _png(tmp_path / name)
  [result] = predict.predict_files([path], [run], threshold=0.5)
  line = json.dumps(result, ensure_ascii=False).encode('utf-8')  # Strict: a lone surrogate cannot be encoded.
  assert json.loads(line)['file'] == str(tmp_path / 'scan-\\xff.png')
