"""Shared fixtures."""

import contextlib
import dataclasses
import fcntl
import importlib
import importlib.util
import json
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import cxr_tfds  # pylint: disable=unused-import  # Registers chest_xray_pneumonia.

# The only tests that may be skipped in CI (.ci/run sets CXR_STRICT_SKIPS=1), by pytest node id, with why: what
# this machine cannot have. Any other skip, a missing package above all, fails the run there: the `test` extra
# installs everything the suite imports.
BY_DESIGN_SKIPS = {
    'tests/test_distribute.py::test_precision_auto_on_this_machines_gpus': 'needs a GPU (none on the CI machine)',
    # tf.test.TestCase's deprecated `test_session` context manager: pytest collects it by its name, TF skips it.
    'tests/test_dataset_builder.py::KaggleZipTest::test_session': 'not a test (tf.test.TestCase)',
    'tests/test_dataset_builder.py::MendeleyFolderTest::test_session': 'not a test (tf.test.TestCase)',
    # Mounts a tmpfs to fill it (CI runs as root, so it runs there).
    'tests/test_resilience.py::test_a_disk_that_fills_during_the_final_report_and_exports_keeps_the_previous_export':
        'needs root',
    # .ci/run installs Debian's chromium where apt exists; elsewhere (no apt, no root) there is no browser to drive.
    'tests/test_serve_page.py::test_the_page_shows_the_label_the_probability_the_overlay_and_the_warnings':
        'needs /usr/bin/chromium',
}


# The metrics a report gives at a threshold, and all of them (tests/test_metrics.py, tests/test_report.py).
THRESHOLD_METRICS = ('accuracy', 'sensitivity', 'specificity', 'precision', 'f1')
ALL_METRICS = THRESHOLD_METRICS + ('roc_auc', 'pr_auc')


def patients(n_patients, images_per_patient, seed):
  """Test data clustered by patient: every image of a patient shares its label and (almost) its probability, as
  repeat X-rays of one person do. Returns (labels, probs, groups)."""
  rng = np.random.default_rng(seed)
  patient_label = rng.integers(0, 2, n_patients)
  patient_prob = np.clip(rng.normal(0.4 + 0.2 * patient_label, 0.2), 0, 1)
  groups = np.repeat(np.arange(n_patients), images_per_patient)
  labels = patient_label[groups]
  probs = np.clip(patient_prob[groups] + rng.normal(0, 0.01, groups.size), 0, 1)
  return labels, probs, groups


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # pylint: disable=unused-argument
  """Under CXR_STRICT_SKIPS=1, the skip of a test not in BY_DESIGN_SKIPS is reported as a failure."""
  outcome = yield
  report = outcome.get_result()
  if (report.skipped and os.environ.get('CXR_STRICT_SKIPS') == '1' and not hasattr(report, 'wasxfail')
      and item.nodeid.split('[')[0] not in BY_DESIGN_SKIPS):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = 'failed'
    report.longrepr = f'skipped, and not listed in BY_DESIGN_SKIPS of tests/conftest.py: {reason}'


# The files that take longest, longest first (measured on 2 cores, three workers). The suite runs them first, so that
# pytest-xdist (`--dist loadfile --no-loadscope-reorder` in setup.cfg) hands the short files to whichever worker frees
# up, instead of ending on one long file while the others idle.
LONGEST_FILES = ('test_resilience.py', 'test_scale_out.py', 'test_benchmark.py', 'test_backbones.py', 'test_recipe.py',
                 'test_train.py', 'test_export.py', 'test_models.py', 'test_features.py', 'test_shift.py',
                 'test_augment.py', 'test_evaluate_cli.py', 'test_predict.py', 'test_logs.py', 'test_train_real.py')


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)
  items.sort(key=rank)  # Stable: each file's tests keep their order.


def _built_once(tmp_path_factory, worker_id: str, name: str, build) -> str:
  """A folder that `build(folder)` fills, built once per pytest run; returns its path.

  Each pytest-xdist worker is a session of its own, so a session fixture alone would build it once per worker (the
  synthetic config took 11 s here, the real data 6 s). The workers share the run's temporary folder: the first to
  take the lock builds there, the others wait for it and read. A build that failed is tried again by the next
  worker."""
  if worker_id == 'master':  # No workers: this session is the whole run.
    folder = str(tmp_path_factory.mktemp(name))
    build(folder)
    return folder
  shared = tmp_path_factory.getbasetemp().parent  # The run's folder; each worker's own is inside it.
  folder, built = shared / name, shared / f'{name}.built'
  with open(shared / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file is closed.
    if not built.exists():
      shutil.rmtree(folder, ignore_errors=True)  # A failed build's leftovers.
      build(str(folder))
      built.touch()
  return str(folder)


@pytest.fixture(scope='session')
def synthetic_data_dir(tmp_path_factory, worker_id) -> str:
  """Builds chest_xray_pneumonia/synthetic once per run; returns its TFDS data_dir. Tests read it and never write.

  Load it with `tfds.load('chest_xray_pneumonia/synthetic', split=..., data_dir=synthetic_data_dir)`.
  """
  def build(folder):
    tfds.builder('chest_xray_pneumonia/synthetic', data_dir=folder).download_and_prepare()
  return _built_once(tmp_path_factory, worker_id, 'tfds', build)


def _defined_by(flag_values, name: str) -> str:
  return flag_values.find_module_defining_flag(name) or 'absl'


@contextlib.contextmanager
def _only_the_flags_of(module: str):
  """Within the block, absl's FLAGS holds only absl's own flags and `module`'s; the others come back after it.

  Each program defines its flags when it is imported (trainer.main's --model_dir, trainer.evaluate's --model_dir, ...),
  so two programs cannot be imported in one process, and a worker process runs many test files."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  fv = flags.FLAGS
  stashed = {name: (fv[name], _defined_by(fv, name)) for name in list(fv)
             if _defined_by(fv, name) != module and not _defined_by(fv, name).startswith('absl')}
  for name in stashed:
    delattr(fv, name)
  kept = set(fv)
  try:
    yield
  finally:
    fv.unparse_flags()
    for name in set(fv) - kept:
      delattr(fv, name)
    for name, (flag, defined_by) in stashed.items():
      fv[name] = flag
      fv.register_flag_by_module(defined_by, flag)


@pytest.fixture
def run_program(capsys):
  """Runs `python -m MODULE ARGV` in this process, through the program's console-script function (`run`: absl's flag
  parsing, trainer.cli's one-line errors and exit codes) with its own flags. Returns (exit code, stdout, stderr); the
  code is 0 for a program that ended normally.

  For the tests of what a program does, not of what a process does (a signal, a kill, a fresh interpreter): each
  process started instead costs seconds of TensorFlow's import."""
  from trainer import progress  # pylint: disable=import-outside-toplevel

  def run(module: str, *argv: str) -> tuple[int, str, str]:
    # As `python -m` does: a package runs its __main__.
    name = f'{module}.__main__' if importlib.util.find_spec(module).submodule_search_locations else module
    imported = name in sys.modules
    capsys.readouterr()
    with _only_the_flags_of(name), pytest.MonkeyPatch.context() as patch:
      patch.setattr(sys, 'argv', [module, *argv])
      try:
        importlib.import_module(name).run()  # A first import defines the program's flags.
        code = 0
      except SystemExit as e:
        code = 0 if e.code is None else e.code
      finally:
        progress.report_to(None)  # The program pointed it at this test's captured stderr.
        if not imported:  # Its flags go with the block: a later import must define them again.
          del sys.modules[name]
          parent, _, child = name.rpartition('.')
          if getattr(sys.modules[parent], child, None) is not None:
            delattr(sys.modules[parent], child)
    out, err = capsys.readouterr()
    return code, out, err

  return run


# The development copy of the real data sits beside the repository (../shared, in CI too); CXR_REAL_DATA_DIR
# points elsewhere, e.g. at a full Kaggle download.
REAL_DATA = pathlib.Path(os.environ.get(
    'CXR_REAL_DATA_DIR', pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'chest_xray'))


@pytest.fixture(scope='session')
def real_data() -> pathlib.Path:
  """The Kaggle-layout folder of real images; the test is skipped where there is none."""
  if not REAL_DATA.is_dir():
    pytest.skip(f'no real data at {REAL_DATA}')
  return REAL_DATA


@pytest.fixture(scope='session')
def real_224_data_dir(real_data, tmp_path_factory, worker_id) -> str:
  """Builds chest_xray_pneumonia/224 from the real images once per run; returns its TFDS data_dir. Tests read it."""
  def build(folder):
    tfds.builder('chest_xray_pneumonia/224', data_dir=folder).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(real_data)))
  return _built_once(tmp_path_factory, worker_id, 'tfds_real', build)


@pytest.fixture(scope='session')
def untrained_run(synthetic_data_dir, tmp_path_factory):
  """Makes a run's model_dir as training leaves it (model.keras, run.json), with an untrained CNN on the synthetic
  config: for tests of reports and tools, which need a run but no skill. Call it with the input size."""
  # Imported here: TensorFlow starts with them, and the dataset tests need neither.
  import keras

  from trainer import export
  from trainer import models
  from trainer.config import Config

  def make(image_size: int, *, seed: int = 0, threshold: float = 0.5) -> pathlib.Path:
    model_dir = tmp_path_factory.mktemp('run')
    config = Config(model='cnn', dataset='chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir,
                    model_dir=str(model_dir), image_size=image_size, cnn_filters=4, cnn_depth=2, weights='none')
    keras.utils.set_random_seed(seed)
    export.save_keras(models.build('cnn', image_size=image_size, cnn_filters=4, cnn_depth=2),
                      str(model_dir / 'model.keras'))
    (model_dir / 'run.json').write_text(json.dumps({'config': dataclasses.asdict(config), 'image_size': image_size,
                                                     'threshold': threshold}))
    return model_dir

  return make


def reference_predictions(model_dirs, data_dir, *, dataset='chest_xray_pneumonia/synthetic', split='test'):
  """(labels, mean probability) of the runs' model.keras files on a split, computed here, apart from the code under
  test's own report: for checking a report's numbers against the model it names."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from trainer import data  # pylint: disable=import-outside-toplevel
  from trainer import export  # pylint: disable=import-outside-toplevel

  builder = tfds.builder(dataset, data_dir=data_dir)
  probs, labels = [], None
  for model_dir in model_dirs:
    image_size = json.loads((pathlib.Path(model_dir) / 'run.json').read_text())['image_size']
    model = export.load_model(str(pathlib.Path(model_dir) / 'model.keras'))
    batches = list(data.eval_dataset(builder, split, image_size=image_size, batch_size=64, cache=False))
    probs.append(np.concatenate([model.predict(b['image'], verbose=0).ravel() for b in batches]))
    labels = np.concatenate([b['label'].numpy() for b in batches])
  return labels, np.mean(probs, axis=0)


@pytest.fixture(scope='session')
def synthetic_test_images(synthetic_data_dir) -> list[bytes]:
  """The first 16 images of the synthetic test split, as their stored PNG bytes (8 of each class)."""
  ds = tfds.builder('chest_xray_pneumonia/synthetic', data_dir=synthetic_data_dir).as_dataset(
      'test', shuffle_files=False, decoders={'image': tfds.decode.SkipDecoding()})
  images, labels = [], []
  for example in ds:
    if labels.count(int(example['label'])) < 8:
      images.append(example['image'].numpy())
      labels.append(int(example['label']))
  return images


@pytest.fixture(scope='session')
def untrained_exports(untrained_run, synthetic_test_images, tmp_path_factory) -> dict[str, pathlib.Path]:
  """Export folders as trainer.export lays them out flat (model.keras, run.json, saved_model/1), of untrained CNNs:
  'run' (one, at 32 pixels, crop=content) and 'ensemble' (two members of 32 pixels, one crop=content, `export.ensemble_model`). Each
  threshold is the median of its probabilities on `synthetic_test_images`, so both labels occur."""
  import keras  # pylint: disable=import-outside-toplevel

  from trainer import export  # pylint: disable=import-outside-toplevel
  from trainer import models  # pylint: disable=import-outside-toplevel
  from trainer import predict  # pylint: disable=import-outside-toplevel

  images = np.stack([predict.decode_image_bytes(raw, [32])[32] for raw in synthetic_test_images])
  run = untrained_run(32, seed=1)
  keras.utils.set_random_seed(1)
  export.save_keras(models.build('cnn', image_size=32, cnn_filters=4, cnn_depth=2, crop='content'),
                    str(run / 'model.keras'))
  ensemble = tmp_path_factory.mktemp('ensemble')
  members = []
  for seed, crop in ((2, 'none'), (3, 'content')):  # Each member's map goes back through its own crop.
    keras.utils.set_random_seed(seed)
    members.append(models.build('cnn', image_size=32, cnn_filters=4, cnn_depth=2, crop=crop))
  export.save_keras(export.ensemble_model(members), str(ensemble / 'model.keras'))
  (ensemble / 'run.json').write_text((run / 'run.json').read_text())
  for folder in (run, ensemble):
    model = export.load_model(str(folder / 'model.keras'))
    threshold = float(np.median(model.predict(images, verbose=0)))
    info = json.loads((folder / 'run.json').read_text())
    (folder / 'run.json').write_text(json.dumps({**info, 'threshold': threshold, 'threshold_rule': 'youden'}))
    export.export_saved_model(model, str(folder / 'saved_model' / '1'), image_size=32, threshold=threshold)
  return {'run': run, 'ensemble': ensemble}
