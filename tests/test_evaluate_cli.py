"""Tests for `python -m trainer.evaluate`, `evaluate_model` and `load_run` on a saved run."""

import json
import os
import re

import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator

from conftest import reference_predictions  # pylint: disable=g-importing-member
from trainer import data
from trainer import gallery
from trainer import inference
from trainer import metrics
from trainer import runs as runs_lib

SIZE = 32
FIGURES = ('confusion_matrix', 'roc_curve', 'pr_curve', 'reliability')


@pytest.fixture(scope='module')
def model_dir(untrained_run):
  return untrained_run(SIZE)


def test_cli_writes_the_report_the_figures_and_tensorboard_images(model_dir, synthetic_data_dir, run_program):
  code, _, stderr = run_program('trainer.evaluate', f'--model_dir={model_dir}', '--n_resamples=200')
  assert code == 0, stderr
  out = model_dir / 'eval_test'
  report = json.loads((out / 'report.json').read_text())
  assert report['n_images'] == 120 and report['split'] == 'test' and report['image_size'] == SIZE
  assert report['at_val_threshold']['threshold'] == 0.5
  assert report['bootstrap']['n_resamples'] == 200 and report['bootstrap']['unit'] == 'patient'
  markdown = (out / 'report.md').read_text()
  for name in FIGURES:
    assert f'![{name}]({name}.png)' in markdown
    assert Image.open(out / f'{name}.png').size[0] > 100

  # The gallery of mistakes: each group's cases, most wrong first, as the model's own probabilities sort them.
  labels, probs = reference_predictions([model_dir], synthetic_data_dir)
  called = probs >= 0.5
  expected = {'false_positives': sorted(np.flatnonzero((labels == 0) & called), key=lambda i: -probs[i]),
              'false_negatives': sorted(np.flatnonzero((labels == 1) & ~called), key=lambda i: probs[i]),
              'least_certain_correct': sorted(np.flatnonzero((labels == 1) == called),
                                              key=lambda i: abs(probs[i] - 0.5))}
  page = (out / 'gallery.html').read_text()
  sections = dict(re.findall(r'<h2>([^<]*?): \d+</h2>\n(.*?)(?=\n<h2>|\n</body>)', page, flags=re.S))
  shown = {group: [int(i) for i in re.findall(r'<figcaption>#(\d+): ', sections[title])]
           for group, title in gallery.TITLES.items()}
  assert sum(map(len, shown.values())) > 0
  for group in gallery.GROUPS:
    # Ties in probability may come in either order: compare the probabilities, not the indices, in order.
    np.testing.assert_allclose(probs[shown[group]], probs[expected[group][:gallery.PER_GROUP]], atol=1e-6)
  assert page.count('<img src="data:image/png;base64,') == 2 * sum(map(len, shown.values()))
  assert '[gallery.html](gallery.html)' in markdown

  events = event_accumulator.EventAccumulator(str(out), size_guidance={'tensors': 0})
  events.Reload()
  assert set(events.Tags()['tensors']) == set(FIGURES) | {f'gallery/{group}' for group in gallery.GROUPS
                                                          if shown[group]}

  # The same numbers as the library function on the same split: the CLI adds nothing of its own.
  run = runs_lib.load_run(str(model_dir))
  builder = data.prepare('chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir, manual_dir=None)
  again = inference.evaluate_model(run.model, data.eval_dataset(builder, 'test', image_size=SIZE, batch_size=32),
                                  threshold=run.threshold, out_dir=str(model_dir / 'again'), n_resamples=200)
  assert again['ranking'] == report['ranking']
  assert again['at_val_threshold']['confusion_matrix'] == report['at_val_threshold']['confusion_matrix']


def test_evaluate_model_on_validation(model_dir, synthetic_data_dir, tmp_path):
  run = runs_lib.load_run(str(model_dir))
  builder = data.prepare('chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir, manual_dir=None)
  dataset = data.eval_dataset(builder, 'validation', image_size=SIZE, batch_size=16)
  report = inference.evaluate_model(run.model, dataset, threshold=0.3, out_dir=str(tmp_path), n_resamples=100,
                                   extra={'split': 'validation'})
  predictions = inference.predict_split(run.model, dataset)
  assert report['n_images'] == predictions['labels'].size == builder.info.splits['validation'].num_examples
  assert report['positives'] == int(predictions['labels'].sum())
  assert report['ranking']['roc_auc'] == metrics.ranking_metrics(predictions['labels'],
                                                                  predictions['probs'])['roc_auc']
  assert report['at_val_threshold']['threshold'] == 0.3
  assert sorted(os.listdir(tmp_path)) == sorted([*(f'{n}.png' for n in FIGURES), 'report.json', 'report.md'])
  images = np.stack([batch for batch in dataset.map(lambda b: b['image']).unbatch().take(4)])
  np.testing.assert_allclose(predictions['probs'][:4], run.model(images, training=False).numpy()[:, 0], atol=1e-6)


def test_cli_errors_are_one_line(model_dir, tmp_path, run_program):
  code, _, stderr = run_program('trainer.evaluate', f'--model_dir={model_dir}', '--split=val')
  assert code == 1
  assert stderr.strip().splitlines()[-1] == ('error: --split=val is not a split of chest_xray_pneumonia/'
                                                  'synthetic: choose one of test, train, validation.')
  code, _, stderr = run_program('trainer.evaluate', f'--model_dir={tmp_path}')
  assert code == 1
  assert stderr.strip().splitlines()[-1].startswith(f'error: {tmp_path / "model.keras"}: no such file')


def test_load_run(model_dir, tmp_path):
  run = runs_lib.load_run(str(model_dir))
  assert (run.image_size, run.threshold, run.config['model']) == (SIZE, 0.5, 'cnn')
  assert run.model.get_layer('probability').output.shape == (None, 1)
  with pytest.raises(FileNotFoundError, match='model.keras: no such file'):
    runs_lib.load_run(str(tmp_path))
  os.symlink(model_dir / 'model.keras', tmp_path / 'model.keras')
  (tmp_path / 'run.json').write_text('{"threshold": 0.5}')
  with pytest.raises(ValueError, match='is not a run.json written by the trainer'):
    runs_lib.load_run(str(tmp_path))


def test_cli_reports_an_ensemble_at_its_own_validation_threshold(model_dir, untrained_run, synthetic_data_dir,
                                                                 tmp_path, run_program):
  # A second member at another input size, with other weights and another threshold.
  other_dir = untrained_run(48, seed=1, threshold=0.7)

  code, _, stderr = run_program('trainer.evaluate', f'--model_dir={model_dir},{other_dir}', '--n_resamples=100')
  assert code == 1
  assert stderr.strip().splitlines()[-1] == ('error: --model_dir names 2 runs: give the ensemble\'s report a '
                                                  'folder with --out_dir.')

  out = tmp_path / 'ensemble'
  code, _, stderr = run_program('trainer.evaluate', f'--model_dir={model_dir},{other_dir}', f'--out_dir={out}',
                                '--n_resamples=100')
  assert code == 0, stderr
  report = json.loads((out / 'report.json').read_text())

  runs = [runs_lib.load_run(str(d)) for d in (model_dir, other_dir)]
  builder = data.prepare('chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir, manual_dir=None)
  members = [runs_lib.predict_runs([run], builder, split)['probs'] for run in runs for split in ('validation', 'test')]
  labels = {split: runs_lib.predict_runs(runs[:1], builder, split)['labels'] for split in ('validation', 'test')}
  threshold = metrics.choose_threshold(labels['validation'], (members[0] + members[2]) / 2)
  assert report['at_val_threshold']['threshold'] == pytest.approx(threshold)
  assert threshold not in (0.5, 0.7)  # the ensemble's own, not a member's
  assert report['ranking']['roc_auc'] == pytest.approx(
      metrics.ranking_metrics(labels['test'], (members[1] + members[3]) / 2)['roc_auc'])
  assert report['ensemble']['members'] == [str(model_dir), str(other_dir)]
  assert report['ensemble']['member_thresholds'] == [0.5, 0.7]
  assert report['image_sizes'] == [SIZE, 48] and report['n_images'] == 120


def test_cli_reports_at_the_runs_stored_threshold_and_on_another_config(untrained_run, synthetic_data_dir,
                                                                        real_224_data_dir, real_data, run_program):
  builder = data.prepare('chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir, manual_dir=None)
  probe = runs_lib.load_run(str(untrained_run(SIZE, seed=3)))
  test = runs_lib.predict_runs([probe], builder, 'test')
  threshold = float(np.median(test['probs']))  # Where 0.5 would label the split differently.
  expected = metrics.metrics_at(test['labels'], test['probs'], threshold)['confusion_matrix']
  assert expected != metrics.metrics_at(test['labels'], test['probs'], 0.5)['confusion_matrix']
  model_dir = untrained_run(SIZE, seed=3, threshold=threshold)  # The same weights: the same seed.

  code, _, stderr = run_program('trainer.evaluate', f'--model_dir={model_dir}', '--n_resamples=50')
  assert code == 0, stderr
  report = json.loads((model_dir / 'eval_test' / 'report.json').read_text())
  assert report['at_val_threshold']['threshold'] == pytest.approx(threshold)
  assert report['at_val_threshold']['confusion_matrix'] == expected

  # --dataset: the real test folder, stored at 224 px, resized to the run's 32 px input.
  code, _, stderr = run_program('trainer.evaluate', f'--model_dir={model_dir}', '--dataset=chest_xray_pneumonia/224',
                                f'--data_dir={real_224_data_dir}', f'--out_dir={model_dir / "real"}', '--n_resamples=50')
  assert code == 0, stderr
  real = json.loads((model_dir / 'real' / 'report.json').read_text())
  assert real['dataset'] == 'chest_xray_pneumonia/224' and real['image_size'] == SIZE
  assert real['n_images'] == sum(1 for path in (real_data / 'test').glob('*/*') if not path.name.startswith('.'))
  # Scored on real images, the model is still one of the synthetic images, and says so.
  assert real['trained_on'] == 'chest_xray_pneumonia/synthetic' and real['warning'].startswith('trained on')
