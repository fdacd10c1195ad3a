"""Tests of trainer.report: the test report, its files and their atomic writes."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image
import tensorflow as tf

from conftest import ALL_METRICS, THRESHOLD_METRICS, patients as _patients  # pylint: disable=g-importing-member
from trainer import report as report_lib


# build_report / write_report


def _report(**extra):
  labels, probs, groups = _patients(120, 3, seed=11)
  return report_lib.build_report(test_labels=labels, test_probs=probs, test_groups=groups, val_threshold=0.42,
                               n_resamples=200, extra=extra or None)


def test_build_report_has_every_part_and_is_json():
  report = _report(model='cnn', dataset='chest_xray_pneumonia/synthetic')
  assert {'n_images', 'n_patients', 'positives', 'ranking', 'calibration', 'at_0.5', 'at_val_threshold',
          'threshold_rule', 'model', 'dataset'} <= set(report)
  assert (report['n_images'], report['n_patients']) == (360, 120)
  assert report['at_0.5']['threshold'] == 0.5 and report['at_val_threshold']['threshold'] == 0.42
  for part in ('at_0.5', 'at_val_threshold'):
    assert set(report[part]['ci95']) == set(THRESHOLD_METRICS)
  assert set(report['ranking']['ci95']) == {'roc_auc', 'pr_auc'}
  assert report['bootstrap']['unit'] == 'patient'
  assert json.loads(json.dumps(report, allow_nan=False)) == report
  with pytest.raises(ValueError, match='reuses report keys'):
    _report(positives=3)
  with pytest.raises(ValueError, match='JSON'):
    _report(array=np.zeros(2))


def test_write_report_writes_complete_files_and_figures(tmp_path):
  report = _report(model='cnn')
  png = _png(40, 30)
  out_dir = tmp_path / 'report'
  json_path, md_path = report_lib.write_report(report, str(out_dir), figures={'roc': png, 'confusion_matrix': png})
  assert (json_path, md_path) == (str(out_dir / 'report.json'), str(out_dir / 'report.md'))
  assert sorted(os.listdir(out_dir)) == ['confusion_matrix.png', 'report.json', 'report.md', 'roc.png']
  with open(json_path) as f:
    assert json.load(f) == report
  with open(md_path) as f:
    markdown = f.read()
  for name in ALL_METRICS + ('ece', 'brier', 'model'):
    assert name in markdown, name
  assert '![roc](roc.png)' in markdown and '0.4200' in markdown
  for name in ('roc', 'confusion_matrix'):
    with Image.open(out_dir / f'{name}.png') as image:
      assert image.size == (40, 30)
  # Writing again replaces the files and still leaves no temporary file.
  report_lib.write_report(report, str(out_dir))
  assert sorted(os.listdir(out_dir)) == ['confusion_matrix.png', 'report.json', 'report.md', 'roc.png']


def test_write_report_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
  report = _report()
  json_path, _ = report_lib.write_report(report, str(tmp_path))
  with open(json_path) as f:
    before = f.read()

  def killed(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(tf.io.gfile, 'rename', killed)
  with pytest.raises(KeyboardInterrupt):
    report_lib.write_report({**report, 'positives': -1}, str(tmp_path))
  with open(json_path) as f:
    assert f.read() == before
  assert sorted(os.listdir(tmp_path)) == ['report.json', 'report.md']


def test_write_report_rejects_bad_figures(tmp_path):
  report = _report()
  with pytest.raises(ValueError, match='plain file name'):
    report_lib.write_report(report, str(tmp_path), figures={'../roc': _png(4, 4)})
  with pytest.raises(ValueError, match='PNG bytes'):
    report_lib.write_report(report, str(tmp_path), figures={'roc': b'not a png'})
  assert os.listdir(tmp_path) == []


def _png(width, height):
  buffer = io.BytesIO()
  Image.fromarray(np.arange(width * height, dtype=np.uint8).reshape(height, width)).save(buffer, format='PNG')
  return buffer.getvalue()
