"""The model dir's lock: one writer at a time, stale locks of killed runs taken over, leases without flock."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from trainer import lock


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
  with lock.hold(str(tmp_path)):
    with pytest.raises(lock.LockedError, match=rf'in use by another training run \(pid {os.getpid()} on '
                                               rf'{socket.gethostname()}\)'):
      with lock.hold(str(tmp_path)):
        pass
  # Released: the next run takes it, and nothing is left behind.
  with lock.hold(str(tmp_path)):
    pass
  assert not os.listdir(tmp_path)


def _holder(model_dir):
  """A process that holds the lock until it is killed."""
  process = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from trainer import lock\n'
       'with lock.hold(sys.argv[1]):\n  print("held", flush=True); time.sleep(600)', model_dir],
      stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline() == 'held\n'
  return process


def test_a_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
  process = _holder(str(tmp_path))
  with pytest.raises(lock.LockedError, match=f'pid {process.pid} '):
    with lock.hold(str(tmp_path)):
      pass
  process.send_signal(signal.SIGKILL)
  process.wait()
  with lock.hold(str(tmp_path)):
    with open(tmp_path / lock.LOCK_NAME) as f:
      assert json.load(f)['pid'] == os.getpid()
  assert 'Taking over the lock' in caplog.text and str(process.pid) in caplog.text


@pytest.fixture
def no_flock(monkeypatch):
  def flock(fd, operation):
    raise OSError(errno.ENOLCK, 'No locks available')
  monkeypatch.setattr(lock.fcntl, 'flock', flock)


def _write_lease(model_dir, host, pid, age=0.0):
  path = os.path.join(model_dir, lock.LOCK_NAME + '.lease')
  with open(path, 'w') as f:
    json.dump({'host': host, 'pid': pid}, f)
  os.utime(path, (time.time() - age, time.time() - age))
  return path


def test_without_flock_a_lease_refuses_a_second_holder(tmp_path, no_flock):
  with lock.hold(str(tmp_path)):
    with open(tmp_path / (lock.LOCK_NAME + '.lease')) as f:
      assert json.load(f) == {'host': socket.gethostname(), 'pid': os.getpid(), 'what': 'training run'}
    with pytest.raises(lock.LockedError, match=f'pid {os.getpid()} '):
      with lock.hold(str(tmp_path)):
        pass
  assert not os.path.exists(tmp_path / (lock.LOCK_NAME + '.lease'))


def test_without_flock_a_live_owner_holds_and_a_dead_or_silent_one_is_taken_over(tmp_path, no_flock, caplog):
  sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
  try:
    _write_lease(str(tmp_path), socket.gethostname(), sleeper.pid)
    with pytest.raises(lock.LockedError, match=f'pid {sleeper.pid} on {socket.gethostname()}'):
      with lock.hold(str(tmp_path)):
        pass
  finally:
    sleeper.kill()
    sleeper.wait()
  with lock.hold(str(tmp_path)):  # Its owner is dead now.
    pass
  # Another host's owner cannot be asked: its lease holds while it is refreshed, and goes stale when it is not.
  _write_lease(str(tmp_path), 'elsewhere', 1)
  with pytest.raises(lock.LockedError, match='pid 1 on elsewhere'):
    with lock.hold(str(tmp_path)):
      pass
  _write_lease(str(tmp_path), 'elsewhere', 1, age=lock.LEASE_STALE_SECONDS + 1)
  with lock.hold(str(tmp_path)):
    pass
  assert caplog.text.count('Taking over the stale lock') == 2
