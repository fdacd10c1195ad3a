"""The files a user of the project expects beside the code, and that the documents agree with setup.cfg."""

import configparser
import importlib.util
import pathlib
import re
import subprocess
import sys

import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
SETUP = configparser.ConfigParser()
SETUP.read(REPO / 'setup.cfg')
VERSION = SETUP['metadata']['version']
USER_DOCUMENTS = ('README.md', 'BUILD.md', 'BENCHMARKS.md', 'EXPERIMENTS.md', 'CHANGELOG.md', 'launch/README.md',
                  'cxr_tfds/chest_xray_pneumonia/README.md',
                  *sorted(str(path.relative_to(REPO)) for path in (REPO / 'docs').glob('*.md')))


def test_license_is_the_apache_license_setup_cfg_names():
  assert SETUP['metadata']['license'] == 'Apache-2.0'
  text = (REPO / 'LICENSE').read_text()
  assert 'Apache License' in text and 'Version 2.0, January 2004' in text
  assert 'TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION' in text


def test_citation_and_changelog_name_this_version():
  citation = yaml.safe_load((REPO / 'CITATION.cff').read_text())
  assert citation['cff-version'] == '1.2.0' and citation['version'] == VERSION
  assert citation['license'] == SETUP['metadata']['license']
  assert citation['preferred-citation']['doi'] == '10.1016/j.cell.2018.02.010'
  assert f'\n## {VERSION}\n' in (REPO / 'CHANGELOG.md').read_text()


def test_dockerfile_builds_on_the_tensorflow_release_setup_cfg_allows():
  dockerfile = (REPO / 'Dockerfile').read_text()
  major, minor = map(int, re.search(r'ARG TF_IMAGE=tensorflow/tensorflow:(\d+)\.(\d+)\.\d+-gpu', dockerfile).groups())
  requirement = next(line.strip() for line in SETUP['options']['install_requires'].splitlines()
                     if line.strip().startswith('tensorflow>='))
  low, high = re.fullmatch(r'tensorflow>=(\d+\.\d+),<(\d+\.\d+)', requirement).groups()
  assert tuple(map(int, low.split('.'))) <= (major, minor) < tuple(map(int, high.split('.')))
  assert 'WORKDIR /app' in dockerfile
  for ignored in ('.git', 'runs'):
    assert ignored in (REPO / '.dockerignore').read_text().split()


def test_user_documents_name_no_development_machine_path():
  for name in USER_DOCUMENTS:
    text = (REPO / name).read_text()
    for path in ('/work/', '../shared', '/root/', '/tmp/pytest'):
      assert path not in text, f'{name} names {path}'


def test_readme_start_here_has_the_two_commands_and_the_first_names_the_synthetic_config():
  readme = (REPO / 'README.md').read_text()
  start = readme.index('## Start here')
  section = readme[start:readme.index('\n## ', start + 1)]
  quickstart, tests = re.findall(r'```sh\n(.*?)\n```', section, flags=re.S)
  assert quickstart.startswith('python -m pip install -e . && python -m trainer.main ')
  assert '--dataset=chest_xray_pneumonia/synthetic' in quickstart
  assert tests == 'python -m pip install -e ".[test]" && python -m pytest'


# The image's tag, wherever the project names it: the Dockerfile's build line, the manifests, the Slurm script.
IMAGE_TAGGED = ('Dockerfile', 'launch/kubernetes/tfjob.yaml', 'launch/kubernetes/indexed-job.yaml',
                'launch/slurm_multinode.sbatch')


def test_the_image_tags_are_the_package_version():
  for name in IMAGE_TAGGED:
    tags = re.findall(r'cxr-trainer:([\w.\-]+)', (REPO / name).read_text())
    assert tags and set(tags) == {VERSION}, f'{name} tags {tags}, setup.cfg says {VERSION}'


def _console_scripts() -> dict[str, str]:
  lines = SETUP['options.entry_points']['console_scripts'].strip().splitlines()
  return dict((part.strip() for part in line.split('=', 1)) for line in lines)


def test_every_program_has_a_console_script_that_runs_what_python_m_runs():
  scripts = _console_scripts()
  assert set(scripts) >= {'cxr-train', 'cxr-evaluate', 'cxr-export', 'cxr-predict', 'cxr-shift', 'cxr-build',
                          'cxr-serve'}
  programs = {'trainer.main', 'trainer.evaluate', 'trainer.export.__main__', 'trainer.predict.__main__',
              'trainer.shift.__main__', 'cxr_tfds.build', 'trainer.serve.__main__'}
  assert {target.split(':')[0] for target in scripts.values()} >= programs
  for name, target in scripts.items():
    module_name, _, function = target.partition(':')
    source = (REPO / (module_name.replace('.', '/') + '.py')).read_text()
    # The module's own `python -m` runs the same function, so the two cannot drift apart.
    assert f'def {function}():' in source, f'{name}: {module_name} has no {function}()'
    assert source.rstrip().endswith(f"if __name__ == '__main__':\n  {function}()"), f'{name}: {module_name}'


_IMPORT_EACH = """
import importlib, sys
from absl import flags
for target in sys.argv[1:]:
  module_name, _, function = target.partition(':')
  assert callable(getattr(importlib.import_module(module_name), function)), target
  # Each program defines its flags on import, and two programs' flags share names (--model_dir): the next one
  # imports as into a process of its own.
  for name in list(flags.FLAGS):
    if not (flags.FLAGS.find_module_defining_flag(name) or 'absl').startswith('absl'):
      delattr(flags.FLAGS, name)
  print('imported', target, flush=True)
"""


def test_console_script_targets_import_and_are_callable():
  # One process for all of them (TensorFlow's import takes seconds), each program's flags removed before the next.
  targets = list(_console_scripts().values())
  done = subprocess.run([sys.executable, '-c', _IMPORT_EACH, *targets], cwd=REPO, capture_output=True, text=True,
                        check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.splitlines() == [f'imported {target}' for target in targets]


def test_the_package_reports_its_version_and_commit():
  import trainer  # pylint: disable=import-outside-toplevel
  from trainer import version  # pylint: disable=import-outside-toplevel
  assert trainer.__version__ == version.version()
  assert re.fullmatch(r'\d+\.\d+\.\d+.*', trainer.__version__), trainer.__version__
  provenance = version.provenance()
  if (REPO / '.git').exists():
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True, check=False)
    if head.returncode == 0:  # git on PATH
      assert provenance['git_commit'] == head.stdout.strip()


def test_a_copy_outside_git_has_no_commit_and_an_uninstalled_one_a_placeholder_version(tmp_path, monkeypatch):
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  from trainer import version  # pylint: disable=import-outside-toplevel
  copy = tmp_path / 'trainer'
  copy.mkdir()
  (copy / 'version.py').write_text((REPO / 'trainer' / 'version.py').read_text())
  spec = importlib.util.spec_from_file_location('copied_version', copy / 'version.py')
  copied = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(copied)
  assert copied.git_commit() is None and 'git_commit' not in copied.provenance()

  def not_installed(name):
    raise importlib.metadata.PackageNotFoundError(name)
  monkeypatch.setattr(importlib.metadata, 'version', not_installed)
  assert version.version() == version.UNKNOWN
