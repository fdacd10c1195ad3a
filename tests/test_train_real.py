"""The trainer on real chest X-rays (the development copy beside the repository; skipped where there is none)."""

import json
import os

import keras
import tensorflow as tf

from trainer import train
from trainer.config import Config


def test_cnn_trains_on_real_images_and_reports(real_data, real_224_data_dir, tmp_path):
  # Small and short on purpose: this checks the real-data path end to end, not accuracy (EXPERIMENTS.md does that).
  # At 32 pixels one epoch still reaches a test ROC-AUC of 0.96 on the development copy (0.94 at 64).
  config = Config(model='cnn', dataset='chest_xray_pneumonia/224', data_dir=real_224_data_dir,
                  model_dir=str(tmp_path / 'run'), image_size=32, epochs=1, fine_tune_epochs=0, batch_size=64,
                  cnn_filters=8, cnn_depth=3, seed=1, weights='none').validate()
  keras.utils.set_random_seed(config.seed)
  report = train.run(config, tf.distribute.OneDeviceStrategy('/cpu:0'))
  with open(os.path.join(config.model_dir, 'report.json')) as f:
    on_disk = json.load(f)
  assert on_disk == json.loads(json.dumps(report))
  assert on_disk['n_images'] == sum(1 for path in (real_data / 'test').glob('*/*') if not path.name.startswith('.'))
  assert on_disk['ranking']['roc_auc'] > 0.75
  assert 'warning' not in on_disk and 'warning' not in json.load(open(os.path.join(config.model_dir, 'run.json')))
