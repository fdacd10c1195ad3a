"""Tests for trainer.export: one operating point everywhere, exports that commit as a unit, TF Serving's layout and
request, the ensemble export and its model card."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_serving.apis import predict_pb2

import trainer
from trainer import metrics
from trainer import runs as runs_lib
from trainer import export
from trainer import figures
from trainer import predict
from trainer import tflite
from trainer import train
from trainer import version
from trainer.config import Config

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 32


def _train(data_dir, model_dir, seed):
  config = Config(model='cnn', dataset='chest_xray_pneumonia/synthetic', data_dir=data_dir, model_dir=str(model_dir),
                  image_size=SIZE, epochs=2, fine_tune_epochs=0, batch_size=32, cnn_filters=4, cnn_depth=2,
                  learning_rate=1e-3, seed=seed, weights='none').validate()
  keras.utils.set_random_seed(seed)
  train.run(config, tf.distribute.OneDeviceStrategy('/cpu:0'))
  return str(model_dir)


TITLES = []  # The titles of the confusion matrices the trained run's training drew.


@pytest.fixture(scope='module')
def runs(synthetic_data_dir, untrained_run, tmp_path_factory):
  """The two members of the ensemble: a tiny CNN run trained here (2 epochs at 32 pixels), and an untrained CNN of
  another seed saved as a run (conftest's untrained_run), of which only the model and run.json are read. One training
  run fewer: each ends in an export of its own."""
  drawn = figures.confusion_matrix_png

  def record(cm, *args, **kwargs):
    TITLES.append(kwargs.get('title'))
    return drawn(cm, *args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(figures, 'confusion_matrix_png', record)
    trained = _train(synthetic_data_dir, tmp_path_factory.mktemp('seed1'), 1)
  return [trained, str(untrained_run(SIZE, seed=2))]


def test_tensorboard_confusion_matrices_name_their_split_and_threshold(runs):
  run = json.loads(pathlib.Path(runs[0], 'run.json').read_text())
  validation, test = TITLES[:-1], TITLES[-1]
  assert len(validation) == 2
  for epoch, title in enumerate(validation, 1):
    assert re.fullmatch(rf'Validation, epoch {epoch}, threshold [01]\.\d{{3}} \(youden\)', title), title
  # The best epoch's validation matrix is drawn at the threshold the run keeps; test's is too.
  assert f'threshold {run["threshold"]:.3f} (youden)' in validation[run['best']['epoch'] - 1]
  assert test == f'Test, threshold {run["threshold"]:.3f} (youden)'


@pytest.fixture(scope='module')
def split_files(synthetic_data_dir, tmp_path_factory):
  """The synthetic test split as image files (their stored bytes), in the split's order, and their labels."""
  folder = tmp_path_factory.mktemp('test_images')
  ds = tfds.builder('chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir).as_dataset(
      'test', shuffle_files=False, decoders={'image': tfds.decode.SkipDecoding()})
  files, labels = [], []
  for i, example in enumerate(ds):
    files.append(str(folder / f'{i:04d}.png'))
    pathlib.Path(files[-1]).write_bytes(example['image'].numpy())
    labels.append(int(example['label']))
  return files, np.array(labels)


_ENSEMBLE = []  # The export the ensemble fixture made: one per module.


@pytest.fixture
def ensemble(runs, run_program, tmp_path_factory):
  """trainer.export's export of the runs, made once: in process (run_program is a test's fixture, so this one is)."""
  if not _ENSEMBLE:
    out = tmp_path_factory.mktemp('ensemble') / 'export'
    code, _, stderr = run_program('trainer.export', f'--model_dir={",".join(runs)}', f'--out_dir={out}',
                                  '--n_resamples=50')
    assert code == 0, stderr[-3000:]
    _ENSEMBLE.append(str(out))
  return _ENSEMBLE[0]


def _serve(saved_model_dir, encoded):
  """What TF Serving does with a gRPC PredictRequest for the `serve` signature: the request's tensors in, the
  signature's outputs back as a PredictResponse."""
  request = predict_pb2.PredictRequest()
  request.model_spec.name = 'pneumonia'
  request.model_spec.signature_name = export.SERVING_ENDPOINT
  request.inputs['image_bytes'].CopyFrom(tf.make_tensor_proto(encoded, dtype=tf.string))
  request = predict_pb2.PredictRequest.FromString(request.SerializeToString())  # As it travels.
  signature = tf.saved_model.load(saved_model_dir).signatures[request.model_spec.signature_name]
  outputs = signature(**{name: tf.constant(tf.make_ndarray(proto)) for name, proto in request.inputs.items()})
  response = predict_pb2.PredictResponse()
  for name, tensor in outputs.items():
    response.outputs[name].CopyFrom(tf.make_tensor_proto(tensor.numpy()))
  return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}


def _confusion(labels, called):
  return [[int(np.sum((labels == 0) & ~called)), int(np.sum((labels == 0) & called))],
          [int(np.sum((labels == 1) & ~called)), int(np.sum((labels == 1) & called))]]


def test_ensemble_export_predict_evaluate_and_serving_agree_with_its_report(ensemble, runs, split_files, tmp_path,
                                                                           run_program):
  files, labels = split_files
  run_json = json.loads(pathlib.Path(ensemble, 'run.json').read_text())
  report = json.loads(pathlib.Path(ensemble, 'report.json').read_text())
  threshold = run_json['threshold']
  assert run_json['threshold_rule'] == 'youden' and run_json['members'] == runs
  assert report['operating_point'] == {'threshold': threshold, 'threshold_rule': 'youden'}
  assert report['threshold_rule'] == metrics.RULES['youden'].text
  assert report['n_images'] == len(files)
  expected = report['at_val_threshold']['confusion_matrix']

  # TF Serving's layout: a numbered version folder, found through the export's links.
  assert os.path.islink(os.path.join(ensemble, export.CURRENT))
  assert export.saved_model_path(ensemble) == os.path.join(export.current_dir(ensemble), 'saved_model', '1')
  assert os.path.isfile(os.path.join(ensemble, 'saved_model', '1', 'saved_model.pb'))

  # predict, with the export given like a run: the stored threshold and rule, the report's labels.
  code, stdout, stderr = run_program('trainer.predict', f'--model_dir={ensemble}', *files)
  assert code == 0, stderr[-3000:]
  lines = [json.loads(line) for line in stdout.splitlines()]
  assert [line['file'] for line in lines] == files
  assert {(line['threshold'], line['threshold_rule']) for line in lines} == {(threshold, 'youden')}
  called = np.array([line['label'] == 'pneumonia' for line in lines])
  assert _confusion(labels, called) == expected
  probs = np.array([line['probability'] for line in lines])

  # The export is the members' mean.
  members = [runs_lib.load_run(d) for d in runs]
  images = np.stack([np.asarray(predict.read_image(f, [SIZE])[SIZE]) for f in files])
  mean = np.mean([m.model(images, training=False).numpy()[:, 0] for m in members], axis=0)
  np.testing.assert_allclose(probs, mean, atol=1e-5)

  # evaluate, with the export given like a run: the same operating point and matrix.
  out = tmp_path / 'evaluated'
  code, _, stderr = run_program('trainer.evaluate', f'--model_dir={ensemble}', f'--out_dir={out}', '--n_resamples=20')
  assert code == 0, stderr[-3000:]
  evaluated = json.loads((out / 'report.json').read_text())
  assert evaluated['operating_point'] == {'threshold': threshold, 'threshold_rule': 'youden', 'chosen': 'stored'}
  assert evaluated['at_val_threshold']['confusion_matrix'] == expected

  # The SavedModel through a TF Serving PredictRequest: the same labels at the same threshold.
  served = _serve(export.saved_model_path(ensemble), [pathlib.Path(f).read_bytes() for f in files])
  np.testing.assert_allclose(served['probability'], probs, atol=1e-5)
  assert np.all(served['threshold'] == np.float32(threshold))
  assert served['pneumonia'].tolist() == called.tolist()


def test_a_single_run_serves_through_a_predict_request_at_its_threshold(runs, split_files):
  files, _ = split_files
  run = runs_lib.load_run(runs[0])
  served = _serve(export.saved_model_path(runs[0]), [pathlib.Path(f).read_bytes() for f in files[:10]])
  results = list(predict.predict_files(files[:10], [run], threshold=run.threshold))
  np.testing.assert_allclose(served['probability'], [r['probability'] for r in results], atol=1e-5)
  assert served['pneumonia'].tolist() == [r['label'] == 'pneumonia' for r in results]
  # One unreadable image fails the whole request (README says so): the signature decodes the batch in one op.
  with pytest.raises(tf.errors.InvalidArgumentError):
    _serve(export.saved_model_path(runs[0]), [pathlib.Path(files[0]).read_bytes(), b'not an image'])


def test_every_command_takes_several_runs_as_model_dir_at_one_threshold(runs, ensemble, split_files, tmp_path,
                                                                        run_program):
  files, _ = split_files
  exported = json.loads(pathlib.Path(ensemble, 'run.json').read_text())['threshold']
  code, stdout, stderr = run_program('trainer.predict', f'--model_dir={",".join(runs)}', files[0])
  assert code == 0, stderr[-3000:]
  [line] = [json.loads(line) for line in stdout.splitlines()]
  # The runs' mean chosen now by the same rule on the same split: the export's threshold (the mean in float32 may
  # differ in the last bits).
  assert line['threshold'] == pytest.approx(exported, abs=1e-6) and line['threshold_rule'] == 'youden'
  code, _, stderr = run_program('trainer.shift', f'--model_dir={",".join(runs)}', f'--out={tmp_path / "shift.json"}')
  assert code == 0, stderr[-3000:]
  shifted = json.loads((tmp_path / 'shift.json').read_text())
  assert shifted['threshold'] == pytest.approx(exported, abs=1e-6) and shifted['threshold_rule'] == 'youden'
  assert shifted['threshold_chosen'] == 'now'  # An export gives 'stored' (the recipe's test).

  code, _, stderr = run_program('trainer.predict', f'--ensemble={",".join(runs)}', files[0])
  assert code == 1
  assert stderr.strip().splitlines()[-1] == f'error: --ensemble is now --model_dir: give --model_dir={",".join(runs)}.'



def test_model_card(ensemble):
  card = pathlib.Path(ensemble, export.MODEL_CARD).read_text()
  run_json = json.loads(pathlib.Path(ensemble, 'run.json').read_text())
  report = json.loads(pathlib.Path(ensemble, 'report.json').read_text())
  assert '**This is not a medical device.**' in card
  assert f'Threshold **{run_json["threshold"]:.4f}**, rule `youden`' in card
  roc = report['ranking']
  assert f'| ROC-AUC | {roc["roc_auc"]:.3f} | {roc["ci95"]["roc_auc"][0]:.3f}-{roc["ci95"]["roc_auc"][1]:.3f} |' in card
  assert f'Expected calibration error {report["calibration"]["ece"]:.3f}' in card
  assert 'Acquisition shift' in card and 'python -m trainer.export --model_dir=' in card
  assert f'tensorflow {tf.__version__}' in card
  # The synthetic data is not the Kermany population, and the card says so; a real config's card names it.
  assert 'Guangzhou' not in card and 'says nothing about real radiographs' in card
  real = export.model_card(report, {**run_json,
                                    'config': {**run_json['config'], 'dataset': 'chest_xray_pneumonia/224'}},
                           stress={'split': 'validation', 'worst': {'roc_auc': 0.9, 'roc_auc_normals_shifted': 0.85,
                                                                     'accuracy': 0.8, 'sensitivity': 0.7,
                                                                     'specificity': 0.6}})
  assert "children aged 1 to 5 from Guangzhou Women and Children's Medical Center" in real
  assert 'official test folder is the test split' in real
  assert 'ROC-AUC 0.900, accuracy 0.800, sensitivity 0.700, specificity 0.600' in real
  assert 'With only the normal images shifted (as if they came from another machine than the pneumonia images), ' \
         'the worst ROC-AUC is 0.850.' in real
  # With the stress test's rows, the card says what specificity to expect under a shift of the normals, and why.
  rows = {'none': {'specificity': 0.95}, 'a': {'specificity': 0.9}, 'b': {'specificity': 0.7}}
  shifted = export.model_card(report, run_json, stress={'split': 'validation', 'shifts': rows,
                                                        'worst': {'roc_auc': 0.9, 'roc_auc_normals_shifted': 0.85,
                                                                  'accuracy': 0.8, 'sensitivity': 0.7,
                                                                  'specificity': 0.7}})
  assert ('**Specificity to expect on normal images from another machine:** about 0.80 (the mean over the shifts; '
          'the worst 0.70), against 0.95 on the unshifted validation split. Why:') in shifted
  assert 'Specificity to expect' not in real


def test_runs_and_exports_record_the_project_version_and_commit(runs, ensemble):
  made_with = version.provenance()
  assert made_with['version'] == trainer.__version__
  for folder in (runs[0], ensemble):  # A training run's export, and trainer.export's.
    run_json = json.loads(pathlib.Path(folder, 'run.json').read_text())
    report = json.loads(pathlib.Path(folder, 'report.json').read_text())
    assert run_json['cxr_trainer'] == report['cxr_trainer'] == made_with
    card = pathlib.Path(folder, export.MODEL_CARD).read_text()
    assert f'cxr-trainer {trainer.__version__}' in card
    if 'git_commit' in made_with:  # Run from a checkout, as the suite is.
      assert f'commit {made_with["git_commit"]}' in card


def test_the_export_writes_a_tflite_model_that_agrees_with_keras(ensemble, split_files):
  run_json = json.loads(pathlib.Path(ensemble, 'run.json').read_text())
  entry = run_json['tflite']
  assert entry['float32']['select_tf_ops'] == [] and entry['float32']['max_difference'] <= tflite.FLOAT_TOLERANCE
  images = np.stack([predict.read_image(f, [SIZE])[SIZE] for f in split_files[0]])
  expected = export.load_model(os.path.join(ensemble, 'model.keras')).predict(images, verbose=0)[:, 0]
  got = tflite.load_export(export.current_dir(ensemble))(images)
  np.testing.assert_allclose(got, expected, atol=tflite.FLOAT_TOLERANCE)
  card = pathlib.Path(ensemble, export.MODEL_CARD).read_text()
  assert f'`model.tflite` (float32, {entry["float32"]["bytes"]:,} bytes)' in card
  assert "TFLite's built-in ops only" in card
  # The int8 variant is kept only within its tolerance, and the card says which way it went.
  int8 = entry['int8']
  if 'file' in int8:
    assert int8['max_difference'] <= tflite.INT8_TOLERANCE and f'`{int8["file"]}` (dynamic-range int8' in card
    assert pathlib.Path(export.current_dir(ensemble), int8['file']).is_file()
  else:
    assert int8['kept'] is False and f'No int8 variant: {int8["why"]}.' in card


# An export commits as a unit.


def _unit(model_dir):
  """What a reader pairs: the model's bytes, the threshold in run.json and in the report, the SavedModel's threshold."""
  folder = export.current_dir(model_dir)
  run = runs_lib.load_run(model_dir)
  report = json.loads(pathlib.Path(folder, 'report.json').read_text())
  served = tf.saved_model.load(export.saved_model_path(model_dir)).signatures[export.SERVING_ENDPOINT]
  image = tf.io.encode_png(np.full((SIZE, SIZE, 1), 128, np.uint8))
  return {'model': pathlib.Path(folder, 'model.keras').read_bytes(), 'threshold': run.threshold,
          'report': report['operating_point']['threshold'], 'rule': run.threshold_rule,
          'served': float(served(image_bytes=tf.stack([image]))['threshold'][0])}


def _consistent(unit):
  return unit['threshold'] == unit['report'] == pytest.approx(unit['served'], abs=1e-7)


def test_a_failed_block_keeps_the_previous_export_current(tmp_path):
  with export.committing(str(tmp_path)) as (folder, number):
    pathlib.Path(folder, 'run.json').write_text('old')
  assert number == 1 and (tmp_path / 'run.json').read_text() == 'old'
  with pytest.raises(OSError, match=r'^Cannot write an export in .*: No space left on device\. The previous export'):
    with export.committing(str(tmp_path)) as (folder, number):
      pathlib.Path(folder, 'run.json').write_text('new')
      raise OSError(28, 'No space left on device')
  assert (tmp_path / 'run.json').read_text() == 'old'
  assert sorted(os.listdir(tmp_path / export.EXPORTS)) == ['1']
  # The next export takes a new number (a server must see a new version; the failed one was never current), and the
  # old one goes, as does one a kill left unfinished.
  os.makedirs(tmp_path / export.EXPORTS / '2.partial')
  with export.committing(str(tmp_path)) as (folder, number):
    pathlib.Path(folder, 'run.json').write_text('newer')
  assert number == 3 and (tmp_path / 'run.json').read_text() == 'newer'
  assert sorted(os.listdir(tmp_path / export.EXPORTS)) == ['3']
  assert os.readlink(tmp_path / 'run.json') == os.path.join(export.CURRENT, 'run.json')


def _kill_inside_the_window(command, model_dir):
  """Runs `command` and SIGKILLs it once a new export has its model file, before that export is made current."""
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  partial = None
  while time.time() < deadline and process.poll() is None:
    partial = next((p for p in (model_dir / export.EXPORTS).glob('*.partial') if (p / 'model.keras').exists()), None)
    if partial:
      process.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  process.wait()
  assert partial is not None, 'the export ended before the kill'


def test_a_kill_at_the_end_of_an_extended_run_keeps_the_previous_model_with_its_threshold(runs, synthetic_data_dir,
                                                                                          tmp_path):
  # Issue 17's case: a finished 2-epoch run started again for more epochs, stopped while it exports.
  model_dir = tmp_path / 'extended'
  shutil.copytree(runs[0], model_dir, symlinks=True)
  before = _unit(str(model_dir))
  command = [sys.executable, '-m', 'trainer.main', f'--data_dir={synthetic_data_dir}', f'--model_dir={model_dir}',
             '--dataset=chest_xray_pneumonia/synthetic', f'--image_size={SIZE}', '--cnn_filters=4', '--cnn_depth=2',
             '--batch_size=32', '--epochs=3', '--fine_tune_epochs=0', '--weights=none', '--seed=1']
  _kill_inside_the_window(command, model_dir)
  assert _unit(str(model_dir)) == before
  assert json.loads((model_dir / 'run.json').read_text())['config']['epochs'] == 2


def test_a_full_disk_or_a_kill_during_an_export_leaves_the_previous_one_whole(runs, tmp_path, run_program):
  model_dir = tmp_path / 'run'
  shutil.copytree(runs[0], model_dir, symlinks=True)
  before = _unit(str(model_dir))
  assert _consistent(before)
  # Re-exported at another rule's threshold: a new model.keras is not written (the same model), but the threshold
  # changes, so a mix would show.
  command = ['-m', 'trainer.export', f'--model_dir={model_dir}', f'--out_dir={model_dir}',
             '--threshold_rule=youden_with_shifts', '--n_resamples=20']
  # RLIMIT_FSIZE fails any write past the limit with EFBIG, as a full disk fails it with ENOSPC: room for the report
  # and its PNGs, none for the model file.
  limit = os.path.getsize(os.path.join(model_dir, 'model.keras')) // 2
  assert limit > max(os.path.getsize(os.path.join(model_dir, f)) for f in ('report.json', 'roc_curve.png'))
  limited = [sys.executable, '-c', 'import resource, runpy, sys\n'
             f'resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n'
             'sys.argv[0] = "trainer.export"\n'
             'runpy.run_module("trainer.export", run_name="__main__")', *command[2:]]
  done = subprocess.run(limited, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 1, done.stderr[-3000:]
  assert done.stderr.strip().splitlines()[-1] == (f'error: Cannot write an export in {model_dir}: File too large. '
                                                  'The previous export, if any, is kept.')
  assert _unit(str(model_dir)) == before
  assert not [name for name in os.listdir(model_dir / export.EXPORTS) if name.endswith('.partial')]

  _kill_inside_the_window([sys.executable, *command], model_dir)
  after = _unit(str(model_dir))
  assert after == before and _consistent(after)
  _, stdout, _ = run_program('trainer.predict', f'--model_dir={model_dir}',
                              str(REPO / 'docs' / 'images' / 'gradcam.png'))
  assert json.loads(stdout.splitlines()[0])['threshold'] == before['threshold']
  # (That an export run to its end replaces the whole set: the ensemble fixture and the recipe's test.)


# From Python.


def test_the_readme_python_snippet_classifies_files_and_arrays(ensemble, split_files, capsys):
  files, _ = split_files
  readme = (REPO / 'docs' / 'export-and-serving.md').read_text()
  snippet = readme.split('## Using the model from Python', 1)[1].split('```python\n', 1)[1].split('```', 1)[0]
  assert len(snippet.strip().splitlines()) <= 10
  snippet = (snippet.replace("'runs/recipe/model'", repr(ensemble))
             .replace("'scans/IM-0001.jpeg', 'scans/IM-0002.png'", f'{files[0]!r}, {files[1]!r}'))
  namespace = {}
  exec(snippet, namespace)  # pylint: disable=exec-used
  out = capsys.readouterr().out.splitlines()
  run = json.loads(pathlib.Path(ensemble, 'run.json').read_text())
  assert out[0] == f'{run["threshold"]} youden'
  model = namespace['model']
  expected = list(predict.predict_files(files[:2], model.runs, threshold=run['threshold']))
  assert out[1:3] == [f'{r["file"]} {r["label"]} {round(r["probability"], 3)}' for r in expected]
  # An array is the same image as its file, decoded.
  image = np.asarray(tf.io.decode_image(pathlib.Path(files[0]).read_bytes(), channels=1))
  [from_array] = model.classify([image[..., 0]])
  assert from_array['file'] == '<array 0>' and from_array['probability'] == pytest.approx(expected[0]['probability'],
                                                                                           abs=1e-6)
  assert namespace['result']['label'] in ('normal', 'pneumonia')
  with pytest.raises(ValueError, match='must be uint8 grayscale'):
    model.classify([np.zeros((8, 8, 3), np.uint8)])


def test_a_model_file_with_an_unknown_layer_is_one_line(runs, tmp_path):
  source = os.path.join(export.current_dir(runs[0]), 'model.keras')
  target = tmp_path / 'model.keras'
  with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, 'w') as new:
    for item in old.infolist():
      content = old.read(item.filename)
      if item.filename == 'config.json':
        assert b'cxr_trainer>PixelNoise' in content
        content = content.replace(b'cxr_trainer>PixelNoise', b'cxr_trainer>Gone').replace(b'"PixelNoise"', b'"Gone"')
      new.writestr(item, content)
  with pytest.raises(ValueError) as error:
    export.load_model(str(target))
  assert str(error.value) == (f'{target} uses the layer Gone, which no imported module registers: load it with '
                              'trainer.export.load_model or trainer.predict.load (or `import trainer.models` before '
                              'keras.saving.load_model), from a version of the trainer that has it.')
