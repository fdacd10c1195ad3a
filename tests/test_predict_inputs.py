"""trainer.predict's input checks: what is found in folders, and images and run files it must not label."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from trainer import runs as runs_lib
from trainer import predict


def _save(path, image, **kwargs):
  image.save(path, **kwargs)
  return str(path)


def test_symlinked_folders_are_searched_once_even_in_a_loop(tmp_path):
  scans = tmp_path / 'elsewhere' / 'scans'
  scans.mkdir(parents=True)
  _save(scans / 'a.png', Image.new('L', (64, 64)))
  inputs = tmp_path / 'inputs'
  inputs.mkdir()
  _save(inputs / 'b.png', Image.new('L', (64, 64)))
  os.symlink(scans, inputs / 'linked')
  os.symlink(inputs, scans / 'back')  # A loop: inputs/linked/back is inputs again.
  assert predict.find_images([str(inputs)]) == [str(inputs / 'b.png'), str(inputs / 'linked' / 'a.png')]


@pytest.mark.parametrize('make, reason', [
    (lambda path: _save(path, Image.new('L', (1, 1)), format='PNG'), '1x1 pixels is too small for a chest X-ray'),
    (lambda path: _save(path, Image.new('L', (200, 8)), format='JPEG'), '200x8 pixels is too small'),
    (lambda path: _save(path, Image.new('CMYK', (64, 64), (0, 0, 0, 40)), format='JPEG'), 'a CMYK JPEG'),
])
def test_images_that_are_no_radiograph_are_refused_with_the_reason(make, reason, tmp_path):
  path = make(tmp_path / 'image')
  with pytest.raises(predict.BadImageError, match=reason):
    predict.read_image(path, [32])
  # A grey 64x64 image of the same kinds is read.
  assert predict.read_image(_save(tmp_path / 'ok.jpeg', Image.new('L', (64, 64)), format='JPEG'), [32])[32].shape == (
      32, 32, 1)


@pytest.mark.parametrize('threshold', [float('nan'), 1.5, -0.1])
def test_a_run_json_threshold_that_is_not_a_probability_is_refused(threshold, untrained_run):
  model_dir = untrained_run(32, threshold=threshold)
  assert np.isnan(json.loads((model_dir / 'run.json').read_text())['threshold']) == np.isnan(threshold)
  with pytest.raises(ValueError, match=rf'run.json is not a run.json written by the trainer \(ValueError: its '
                                       rf'threshold {threshold} is not a probability\)'):
    runs_lib.load_run(str(model_dir))
