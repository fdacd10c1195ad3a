"""Tests of trainer.files: the one write-aside-and-rename, on local disks and on TF's in-memory filesystem."""

import json
import os

import pytest
import tensorflow as tf

from trainer import files
from trainer import report as report_lib


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_partial(tmp_path):
  path = tmp_path / 'model.keras'
  path.write_bytes(b'the previous model')

  def write_half(partial):
    with open(partial, 'wb') as f:
      f.write(b'half of a')
    raise OSError(28, 'No space left on device')

  with pytest.raises(OSError) as error:
    with files.replacing(str(path)) as partial:
      assert partial == str(tmp_path / 'model.partial.keras')
      write_half(partial)
  assert str(error.value) == f'Cannot write {path}: No space left on device. Its previous version, if any, is kept.'
  assert path.read_bytes() == b'the previous model'
  assert os.listdir(tmp_path) == ['model.keras']

  folder = tmp_path / 'saved_model'
  folder.mkdir()
  (folder / 'saved_model.pb').write_bytes(b'previous')
  with pytest.raises(OSError, match='Cannot write .*saved_model: No space left on device'):
    with files.replacing(str(folder)) as partial:
      os.makedirs(os.path.join(partial, 'variables'))
      raise tf.errors.ResourceExhaustedError(
          None, None, '{{function_node __wrapped__SaveV2}} /x/part-0.tempstate1; No space left on device [Op:SaveV2]')
  assert (folder / 'saved_model.pb').read_bytes() == b'previous'
  assert sorted(os.listdir(tmp_path)) == ['model.keras', 'saved_model']


def test_write_atomic_writes_bytes_and_text_and_replaces(tmp_path):
  path = str(tmp_path / 'run.json')
  assert files.write_atomic(path, '{"a": 1}') == path
  assert json.loads(open(path).read()) == {'a': 1}
  files.write_atomic(path, b'\x00\x01')
  assert open(path, 'rb').read() == b'\x00\x01'
  assert os.listdir(tmp_path) == ['run.json']


def test_a_partial_name_of_the_callers_own_is_used_and_removed(tmp_path):
  path = str(tmp_path / 'ensemble.json')
  seen = []
  real_rename = tf.io.gfile.rename

  def rename(source, target, overwrite=False):
    seen.append(source)
    real_rename(source, target, overwrite)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tf.io.gfile, 'rename', rename)
    files.write_atomic(path, '{}', partial=f'{path}.123.partial')
  assert seen == [f'{path}.123.partial']
  assert os.listdir(tmp_path) == ['ensemble.json']


def test_files_and_reports_are_written_on_a_tf_filesystem():
  # ram:// is TF's in-memory filesystem: what works here goes through tf.io.gfile, not the local os calls.
  folder = 'ram://test_files/out'
  path = files.write_atomic(f'{folder}/a.txt', 'first')
  files.write_atomic(path, 'second')
  with tf.io.gfile.GFile(path) as f:
    assert f.read() == 'second'
  assert sorted(tf.io.gfile.listdir(folder)) == ['a.txt']
  report = {'n_images': 1}
  with pytest.raises(KeyError):  # report.md needs a whole report; report.json is written before it.
    report_lib.write_report(report, f'{folder}/report')
  with tf.io.gfile.GFile(f'{folder}/report/report.json') as f:
    assert json.load(f) == report
  files.remove(folder)
  assert not tf.io.gfile.exists(folder)
