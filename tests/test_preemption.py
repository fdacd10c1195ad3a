"""trainer.preemption.Watcher on one process: the signals it catches, and the handlers it puts back."""

import os
import signal

import pytest
import tensorflow as tf

from trainer import preemption


@pytest.mark.parametrize('sig', preemption.SIGNALS)
def test_a_signal_is_caught_until_the_watcher_exits(sig):
  before = signal.getsignal(sig)
  with preemption.Watcher(tf.distribute.OneDeviceStrategy('/cpu:0')) as watcher:
    assert not watcher.requested(sync_point=True)
    os.kill(os.getpid(), sig)  # Delivered to this, the main, thread before the next bytecode.
    assert watcher.requested(sync_point=False) and watcher.signal_name == sig.name
  assert signal.getsignal(sig) == before
