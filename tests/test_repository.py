"""The files a user of the project expects beside the code, and that the documents agree with setup.cfg."""

import configparser
import pathlib
import re

import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
SETUP = configparser.ConfigParser()
SETUP.read(REPO / 'setup.cfg')
VERSION = SETUP['metadata']['version']
USER_DOCUMENTS = ('README.md', 'BUILD.md', 'BENCHMARKS.md', 'launch/README.md',
                  'cxr_tfds/chest_xray_pneumonia/README.md')


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
