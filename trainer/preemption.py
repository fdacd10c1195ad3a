"""Graceful preemption: SIGTERM or SIGUSR1 stops a run at a step boundary, with a checkpoint, for a requeue.

`scancel`, a pod eviction and a spot reclaim send SIGTERM first and SIGKILL a grace period later; Slurm's
`--signal=USR1@120` sends SIGUSR1 two minutes before the time limit. Either makes `Watcher.requested` true at the next
step boundary where every worker agrees, the training loop saves a checkpoint of that step, and the process exits
with REQUEUE_EXIT_CODE. The run started again continues from that step, with the same data order.

Why not tf.distribute.experimental.PreemptionCheckpointHandler (TF 2.21): it does the same agreement through the
coordination service, but (1) on a Google Cloud CPU VM its `run` does nothing at all (failure_handling.py: "does not
support usage with TPU or CPU device on GCP"), so a CPU job there would be killed with nothing saved; (2) it probes
the GCE metadata server over HTTP when it starts (up to 5 s per process off GCP); (3) it restores the newest
checkpoint of its own directory when it is built and adds its own counter to the checkpoint object, which fights the
trainer's restore (checkpoints found by their files, a torn one skipped, old runs resumable). Here the agreement is
one scalar all-reduce every LOG_EVERY steps of a multi-worker job, which needs nothing but the strategy.
"""

import signal
import threading

from absl import logging
import tensorflow as tf

# 128 + SIGTERM: what a process killed by SIGTERM reports, which Kubernetes' and the Kubeflow operator's ExitCode
# restart policy count as retryable (128-255; 1-127 are permanent errors), and launch/slurm_multinode.sbatch requeues.
REQUEUE_EXIT_CODE = 143
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Watcher:
  """Catches SIGNALS while it is entered, and says when every worker should stop."""

  def __init__(self, strategy: tf.distribute.Strategy):
    # A plain attribute, not a threading.Event: the handler runs in the main thread between two of its bytecodes, and
    # Event.set takes a lock that a second signal's handler, landing inside the first set, would wait on forever.
    self._received = False
    self.signal_name = None
    self._previous = {}
    resolver = strategy.cluster_resolver
    self._multi_worker = bool(resolver and resolver.cluster_spec().jobs)
    if self._multi_worker:
      def count(flag):
        # tf.identity places the flag on the replica's device: MultiWorkerMirroredStrategy's all-reduce rejects a
        # tensor without one ("destinations can not be empty").
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(flag))

      @tf.function
      def any_worker(flag):
        return strategy.experimental_local_results(strategy.run(count, args=(flag,)))[0]
      self._any_worker = any_worker

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # Python takes signals in the main thread only.
      for sig in SIGNALS:
        # After the strategy: it replaces the handler TensorFlow's coordination service installs, which only logs
        # "SIGTERM caught" and trains on.
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      if previous is not None:  # None: a handler installed outside Python, which cannot be put back.
        signal.signal(sig, previous)
    self._previous.clear()

  def _handle(self, signum, frame):
    del frame
    if not self._received:
      self.signal_name = signal.Signals(signum).name
      self._received = True

  def requested(self, sync_point: bool) -> bool:
    """Whether to stop after this step. Every worker must call it after every step, with the same `sync_point`.

    A single process stops at the first step boundary after the signal. The workers of a multi-worker job compare
    their flags at sync points only (each comparison is an all-reduce), so that all stop at the same step.
    """
    if not self._multi_worker:
      return self._received
    if not sync_point:
      return False
    stop = float(self._any_worker(tf.constant(float(self._received)))) > 0
    if stop and self.signal_name is None:
      self.signal_name = 'a signal to another worker'
    return stop
