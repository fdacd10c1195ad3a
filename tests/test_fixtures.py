"""The suite's own shared builds (tests/conftest.py): built once per run, whichever worker asks first."""

import pathlib
import threading
import time

import conftest
import pytest


class _Factory:
  """What `_built_once` uses of pytest's tmp_path_factory, for one worker: its own folder in the run's folder."""

  def __init__(self, run_folder, worker):
    self.basetemp = run_folder / f'popen-{worker}'
    self.basetemp.mkdir(parents=True, exist_ok=True)

  def getbasetemp(self):
    return self.basetemp

  def mktemp(self, name):
    folder = self.basetemp / name
    folder.mkdir()
    return folder


def _counting_build(calls, *, fail=False, seconds=0.0):
  """A build that records its call; it fails, if asked to, halfway: its folder exists, half-written."""
  def build(folder):
    calls.append(folder)
    (pathlib.Path(folder) / 'data').mkdir(parents=True)  # Fails on a failed build's leftovers.
    time.sleep(seconds)
    if fail:
      raise RuntimeError('the build failed')
    (pathlib.Path(folder) / 'data' / 'done').touch()
  return build


def test_workers_share_one_build_even_when_they_ask_at_once(tmp_path):
  calls, folders = [], {}

  def worker(name):
    folders[name] = conftest._built_once(_Factory(tmp_path, name), name, 'tfds', _counting_build(calls, seconds=0.3))

  threads = [threading.Thread(target=worker, args=(name,)) for name in ('gw0', 'gw1', 'gw2')]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert len(calls) == 1
  assert set(folders.values()) == {str(tmp_path / 'tfds')}
  assert (tmp_path / 'tfds' / 'data' / 'done').exists()
  # A later ask, from a worker that had none, reads the same build.
  later = conftest._built_once(_Factory(tmp_path, 'gw3'), 'gw3', 'tfds', _counting_build(calls))
  assert later == str(tmp_path / 'tfds') and len(calls) == 1


def test_a_failed_build_is_built_again_by_the_next_worker(tmp_path):
  calls = []
  with pytest.raises(RuntimeError, match='the build failed'):
    conftest._built_once(_Factory(tmp_path, 'gw0'), 'gw0', 'tfds', _counting_build(calls, fail=True))
  folder = conftest._built_once(_Factory(tmp_path, 'gw1'), 'gw1', 'tfds', _counting_build(calls))
  assert len(calls) == 2 and (pathlib.Path(folder) / 'data' / 'done').exists()


def test_without_workers_each_session_builds_its_own(tmp_path):
  calls = []
  first, second = (conftest._built_once(_Factory(tmp_path, f'session{i}'), 'master', 'tfds', _counting_build(calls))
                   for i in (0, 1))
  assert len(calls) == 2 and first != second
  assert not (tmp_path / 'tfds').exists()
