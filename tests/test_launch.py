"""Tests for launch/: the local cluster launcher, the Slurm script, the Kubernetes manifests and their entrypoint.

No cluster is needed: local_cluster.py runs stand-in trainers (a `trainer` package in a temporary folder that shadows
the real one, whose `trainer.distribute` it still uses), the Slurm script runs against a stand-in `srun`, and Slurm's
and Kubernetes' environments are simulated with environment variables.
"""

import configparser
import contextlib
import importlib.util
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import tensorflow as tf

from trainer import distribute
from trainer import preemption

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch'


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


local_cluster = _load(LAUNCH / 'local_cluster.py')
tf_config_from_index = _load(LAUNCH / 'kubernetes' / 'tf_config_from_index.py')

# The stand-in trainer: `--fake=MODE` picks what worker `--fake_worker` (default: every worker) does.
FAKE_MAIN = '''
import json, os, sys, time
flags = dict(a[2:].split('=', 1) for a in sys.argv[1:] if a.startswith('--') and '=' in a)
task = json.loads(os.environ['TF_CONFIG'])['task']['index']
mode = flags['fake'] if flags.get('fake_worker', str(task)) == str(task) else flags.get('fake_others', 'sleep')
print('argv', sys.argv[1:], 'task', task, 'gpus', repr(os.environ['CUDA_VISIBLE_DEVICES']), flush=True)
if mode == 'fail':
  sys.exit(3)
if mode == 'fail_later':
  time.sleep(2)
  sys.exit(3)
if mode == 'noisy':  # What a chief does when a peer dies: line after line of a collective's error.
  while True:
    print('noise', flush=True)
    time.sleep(0.01)
if mode == 'sleep':
  print('sleeping', flush=True)
  time.sleep(600)
if mode == 'stubborn':  # A worker that takes no notice of SIGTERM (still importing TensorFlow, or stuck in a C call).
  import signal

  def ignore(signum, frame):
    try:
      print('ignoring SIGTERM', flush=True)
    except OSError:  # the launcher is gone, and its pipe with it
      pass
  signal.signal(signal.SIGTERM, ignore)
  print('sleeping', flush=True)
  while True:
    time.sleep(600)
if mode == 'mwms':
  import tensorflow as tf
  from trainer import distribute
  strategy = distribute.get_strategy('multi_worker')

  @tf.function
  def step():
    ctx = tf.distribute.get_replica_context()
    return ctx.all_reduce('SUM', tf.cast(ctx.replica_id_in_sync_group + 1, tf.float32))

  total = strategy.experimental_local_results(strategy.run(step))[0]
  print('replicas', strategy.num_replicas_in_sync, 'sum', float(total), 'chief', distribute.is_chief(strategy),
        'dir', distribute.worker_dir(flags['model_dir'], strategy), flush=True)
'''


@pytest.fixture
def fake_trainer(tmp_path):
  """A folder to run the launcher from, whose `trainer.main` is FAKE_MAIN (`python -m` looks in the cwd first)."""
  package = tmp_path / 'trainer'
  package.mkdir()
  # Keep the real package's other modules (trainer.distribute) importable beside the stand-in main.
  (package / '__init__.py').write_text(f'__path__.append({str(REPO / "trainer")!r})\n')
  (package / 'main.py').write_text(FAKE_MAIN)
  return tmp_path


def _launch(cwd, *args, sigint_ignored=False):
  """Starts local_cluster.py; `sigint_ignored` starts it as a non-interactive shell starts `command &`."""
  env = {k: v for k, v in os.environ.items() if k != 'TF_CONFIG'}
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  command = [sys.executable, str(LAUNCH / 'local_cluster.py'), *args]
  if sigint_ignored:  # An ignored signal stays ignored through exec; `exec` keeps the launcher's pid the Popen's.
    command = ['sh', '-c', 'trap "" INT && exec "$@"', 'sh', *command]
  return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _until_lines(proc, text, count=2):
  """The launcher's lines up to the `count`-th that ends with `text` (e.g. both workers are up)."""
  lines = []
  while sum(line.endswith(text + '\n') for line in lines) < count:
    lines.append(proc.stdout.readline())
    assert lines[-1], ''.join(lines)
  return lines


def _finish(proc, timeout):
  """The launcher's remaining output once it has exited; if it has not within `timeout`, it and its workers are
  killed (the kernel's death signal is SIGTERM, which a stubborn worker ignores) before the TimeoutExpired goes on."""
  try:
    return proc.communicate(timeout=timeout)[0]
  except subprocess.TimeoutExpired:
    proc.kill()
    output = proc.communicate()[0]
    for pid in _worker_pids(output):
      with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    raise


def _worker_pids(output):
  return [int(line.rsplit(' ', 1)[1]) for line in output.splitlines() if line.startswith('[local_cluster] worker')
          and ': pid ' in line]


def _wait_gone(pid, timeout=30):
  """True once `pid` has exited (a zombie counts: it runs nothing), polling up to `timeout` seconds."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    try:
      state = pathlib.Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except FileNotFoundError:
      return True
    if state == 'Z':
      return True
    time.sleep(0.1)
  return False


# --- local_cluster.py: TF_CONFIG construction -------------------------------------------------------------------


def test_make_tf_configs_for_free_ports():
  ports = local_cluster.free_ports(3)
  assert len(set(ports)) == 3
  for port in ports:  # each is really free: it can be bound again
    with socket.socket() as s:
      s.bind(('localhost', port))
  configs = local_cluster.make_tf_configs(ports)
  assert len(configs) == 3
  expected_cluster = {'worker': [f'localhost:{p}' for p in ports]}
  for i, config in enumerate(configs):
    assert json.loads(json.dumps(config)) == {'cluster': expected_cluster, 'task': {'type': 'worker', 'index': i}}


@pytest.mark.parametrize('ports, message', [([], 'at least one'), ([5000, 5000], 'distinct'), ([0, 70000], '1..65535')])
def test_make_tf_configs_rejects_bad_ports(ports, message):
  with pytest.raises(ValueError, match=message):
    local_cluster.make_tf_configs(ports)


def test_worker_command_and_envs():
  command = local_cluster.worker_command(['--epochs=1', '--model_dir=/tmp/x'], python='py')
  assert command == ['py', '-m', 'trainer.main', '--strategy=multi_worker', '--epochs=1', '--model_dir=/tmp/x']
  with pytest.raises(ValueError, match='--strategy'):
    local_cluster.worker_command(['--strategy=mirrored'])

  configs = local_cluster.make_tf_configs([1111, 2222])
  envs = local_cluster.worker_envs(configs, gpus_per_worker=2, base_env={'PATH': '/bin'})
  assert [json.loads(env['TF_CONFIG'])['task']['index'] for env in envs] == [0, 1]
  assert [env['CUDA_VISIBLE_DEVICES'] for env in envs] == ['0,1', '2,3']
  assert envs[0]['PATH'] == '/bin'
  assert [env['CUDA_VISIBLE_DEVICES'] for env in local_cluster.worker_envs(configs)] == ['', '']
  with pytest.raises(ValueError, match='-1'):
    local_cluster.worker_envs(configs, gpus_per_worker=-1)


# --- local_cluster.py: the processes ----------------------------------------------------------------------------


def test_local_cluster_runs_every_worker_with_its_tf_config(fake_trainer):
  proc = _launch(fake_trainer, '--workers=2', '--', '--fake=ok', '--model_dir=/tmp/m')
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, output
  for i in range(2):
    assert (f"[worker {i}] argv ['--strategy=multi_worker', '--fake=ok', '--model_dir=/tmp/m'] task {i} gpus ''"
            in output)
  assert '[local_cluster] all 2 workers finished.' in output


def test_a_failed_worker_stops_the_others_and_sets_the_exit_code(fake_trainer):
  proc = _launch(fake_trainer, '--workers=2', '--', '--fake=fail', '--fake_worker=1')
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode == 3, output
  assert '[local_cluster] worker 1 failed with exit code 3' in output
  pids = _worker_pids(output)
  assert len(pids) == 2
  assert all(_wait_gone(pid) for pid in pids)


def test_after_a_worker_fails_one_line_names_it_and_the_others_are_not_shown(fake_trainer):
  proc = _launch(fake_trainer, '--workers=2', '--', '--fake=fail_later', '--fake_worker=1', '--fake_others=noisy')
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode == 3, output
  lines = output.splitlines()
  [verdict] = [n for n, line in enumerate(lines) if 'failed with exit code' in line]
  assert lines[verdict].startswith('[local_cluster] worker 1 failed with exit code 3; stopping the others')
  assert '[worker 0] noise' in lines[:verdict]
  assert not [line for line in lines[verdict:] if line.startswith('[worker 0]')], lines[verdict:]


def test_a_port_in_use_is_one_line_before_any_worker_starts(fake_trainer):
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
    taken.bind(('localhost', 0))
    taken.listen()
    port = taken.getsockname()[1]
    proc = _launch(fake_trainer, '--workers=2', f'--port_base={port}', '--', '--fake=ok')
    output, _ = proc.communicate(timeout=60)
  assert proc.returncode == 2
  assert f'Port {port} on localhost is in use' in output and '--port_base' in output
  assert not _worker_pids(output)


@pytest.mark.parametrize('sig, code', [(signal.SIGINT, 130), (signal.SIGKILL, -signal.SIGKILL)])
def test_no_worker_outlives_the_launcher(fake_trainer, sig, code):
  proc = _launch(fake_trainer, '--workers=2', '--', '--fake=sleep')
  lines = _until_lines(proc, 'sleeping')  # both workers are up
  proc.send_signal(sig)  # SIGINT is Ctrl-C; SIGKILL leaves no chance to clean up, the kernel's death signal acts
  _finish(proc, timeout=120)
  assert proc.returncode == code
  pids = _worker_pids(''.join(lines))
  assert len(pids) == 2
  assert all(_wait_gone(pid) for pid in pids)


def test_sigint_stops_a_launcher_started_with_sigint_ignored(fake_trainer):
  """`command &` in a script (no job control) starts the launcher with SIGINT ignored, and Python then installs no
  KeyboardInterrupt: the test above, run so, timed out with no output after its SIGINT, as it once did in CI."""
  proc = _launch(fake_trainer, '--workers=2', '--', '--fake=sleep', sigint_ignored=True)
  lines = _until_lines(proc, 'sleeping')
  proc.send_signal(signal.SIGINT)
  output = _finish(proc, timeout=120)
  assert proc.returncode == 130, output
  assert '[local_cluster] interrupted; all workers stopped.' in output
  assert all(_wait_gone(pid) for pid in _worker_pids(''.join(lines)))


def test_a_second_ctrl_c_kills_workers_that_ignore_sigterm_at_once(fake_trainer):
  proc = _launch(fake_trainer, '--workers=2', '--', '--fake=stubborn')
  lines = _until_lines(proc, 'sleeping')
  first = time.monotonic()
  proc.send_signal(signal.SIGINT)
  lines += _until_lines(proc, 'ignoring SIGTERM')  # the launcher's SIGTERM reached both; it waits out their grace
  assert proc.poll() is None
  proc.send_signal(signal.SIGINT)
  output = _finish(proc, timeout=local_cluster.GRACE_SECONDS)
  assert proc.returncode == 130, output
  assert time.monotonic() - first < local_cluster.GRACE_SECONDS  # killed at the second Ctrl-C, not after the grace
  pids = _worker_pids(''.join(lines))
  assert len(pids) == 2
  alive = [pid for pid in pids if not _wait_gone(pid, timeout=10)]
  for pid in alive:
    os.kill(pid, signal.SIGKILL)
  assert not alive


def test_stop_kills_a_process_that_ignores_sigterm_after_the_grace_period(monkeypatch):
  monkeypatch.setattr(local_cluster, 'GRACE_SECONDS', 1)
  stubborn = 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(600)'
  proc = subprocess.Popen([sys.executable, '-c', stubborn], stdout=subprocess.PIPE, start_new_session=True)
  proc.stdout.readline()  # SIGTERM is ignored from here on
  start = time.monotonic()
  local_cluster._stop([proc])
  proc.stdout.close()
  assert proc.returncode == -signal.SIGKILL
  assert 1 <= time.monotonic() - start < 10


def test_local_cluster_refuses_a_strategy_flag(fake_trainer):
  proc = _launch(fake_trainer, '--workers=2', '--', '--strategy=mirrored')
  output, _ = proc.communicate(timeout=60)
  assert proc.returncode == 2
  assert 'always runs --strategy=multi_worker' in output


def test_two_workers_all_reduce_through_get_strategy(fake_trainer, tmp_path):
  """A real two-worker MultiWorkerMirroredStrategy on CPU, from TF_CONFIGs made by local_cluster.py."""
  model_dir = tmp_path / 'run'
  proc = _launch(fake_trainer, '--workers=2', '--', '--fake=mwms', f'--model_dir={model_dir}')
  output, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, output[-3000:]
  # Replica ids 0 and 1, one per worker: the all-reduce of id + 1 is 3 on both.
  assert f'[worker 0] replicas 2 sum 3.0 chief True dir {model_dir}' in output
  assert f'[worker 1] replicas 2 sum 3.0 chief False dir {model_dir / ".workers" / "worker_1"}' in output


# --- Slurm ------------------------------------------------------------------------------------------------------

SBATCH = LAUNCH / 'slurm_multinode.sbatch'


def test_slurm_script_is_valid_bash_and_asks_for_one_task_per_node():
  subprocess.run(['bash', '-n', str(SBATCH)], check=True)
  text = SBATCH.read_text()
  sbatch = [line.split('#')[1].split()[1] for line in text.splitlines() if line.startswith('#SBATCH')]
  assert '--ntasks-per-node=1' in sbatch
  assert any(option.startswith('--nodes=') for option in sbatch)
  assert any(option.startswith('--gpus-per-node=') for option in sbatch)
  assert f'port {distribute.SLURM_PORT}' in text


def _fake_slurm(tmp_path, srun_exit=0):
  """Stand-ins for srun (records its argv and environment, exits with `srun_exit`) and scontrol (records argv)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  record = tmp_path / 'srun.json'
  (bin_dir / 'srun').write_text(textwrap.dedent(f'''\
      #!{sys.executable}
      import json, os, sys
      json.dump({{'argv': sys.argv[1:], 'TF_CONFIG': os.environ.get('TF_CONFIG'),
                 'SRUN_CPUS_PER_TASK': os.environ.get('SRUN_CPUS_PER_TASK')}}, open({str(record)!r}, 'w'))
      sys.exit({srun_exit})
  '''))
  (bin_dir / 'scontrol').write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.txt"}\n')
  for tool in ('srun', 'scontrol'):
    (bin_dir / tool).chmod(0o755)
  return bin_dir, record


def test_slurm_script_signals_and_requeues_a_preempted_job(tmp_path):
  sbatch = [line.split('#')[1].split()[1] for line in SBATCH.read_text().splitlines() if line.startswith('#SBATCH')]
  assert '--signal=USR1@120' in sbatch and '--requeue' in sbatch
  bin_dir, _ = _fake_slurm(tmp_path, srun_exit=preemption.REQUEUE_EXIT_CODE)
  env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'HOME': str(tmp_path), 'SLURM_JOB_ID': '77',
         'SLURM_JOB_NAME': 'cxr'}
  done = subprocess.run(['bash', str(SBATCH)], env=env, cwd=REPO, capture_output=True, text=True)
  assert done.returncode == preemption.REQUEUE_EXIT_CODE, done.stderr
  assert (tmp_path / 'scontrol.txt').read_text().split() == ['requeue', '77']
  # Any other failure is not requeued.
  (tmp_path / 'scontrol.txt').unlink()
  (tmp_path / 'bin' / 'srun').write_text('#!/bin/sh\nexit 1\n')
  assert subprocess.run(['bash', str(SBATCH)], env=env, cwd=REPO, capture_output=True).returncode == 1
  assert not (tmp_path / 'scontrol.txt').exists()


def test_slurm_script_runs_one_multi_worker_trainer_per_node(tmp_path):
  bin_dir, record = _fake_slurm(tmp_path)
  env = {k: v for k, v in os.environ.items() if k not in ('MODEL_DIR', 'DATA_DIR')}
  env.update(PATH=f'{bin_dir}:{os.environ["PATH"]}', HOME=str(tmp_path), SLURM_JOB_ID='77',
              SLURM_JOB_NAME='cxr', SLURM_CPUS_PER_TASK='16', TF_CONFIG='{"cluster": {}}')
  subprocess.run(['bash', str(SBATCH), '--epochs=1'], env=env, check=True, cwd=REPO)
  srun = json.loads(record.read_text())
  assert srun['argv'][:6] == ['--ntasks-per-node=1', '--kill-on-bad-exit=1', 'python', '-m', 'trainer.main',
                              '--strategy=multi_worker']
  assert f'--model_dir={tmp_path}/cxr_runs/cxr-77' in srun['argv']
  assert srun['argv'][-1] == '--epochs=1'  # the user's flags come last, so they win
  assert srun['TF_CONFIG'] is None  # an inherited TF_CONFIG would override the Slurm cluster
  assert srun['SRUN_CPUS_PER_TASK'] == '16'


def test_slurm_script_runs_the_dockerfile_image_when_given_one(tmp_path):
  bin_dir, record = _fake_slurm(tmp_path)
  env = {k: v for k, v in os.environ.items() if k not in ('MODEL_DIR', 'DATA_DIR')}
  env.update(PATH=f'{bin_dir}:{os.environ["PATH"]}', HOME=str(tmp_path), SLURM_JOB_ID='77', SLURM_JOB_NAME='cxr',
             CONTAINER_IMAGE='registry#cxr-trainer:0.2.0', DATA_DIR=str(tmp_path / 'tfds'))
  subprocess.run(['bash', str(SBATCH)], env=env, check=True, cwd=REPO)
  argv = json.loads(record.read_text())['argv']
  model_dir = f'{tmp_path}/cxr_runs/cxr-77'
  assert argv[2:5] == ['--container-image=registry#cxr-trainer:0.2.0', '--container-workdir=/app',
                       f'--container-mounts={model_dir}:{model_dir},{tmp_path / "tfds"}:{tmp_path / "tfds"}']
  assert argv[5:8] == ['python', '-m', 'trainer.main']
  # The image the launchers name is the Dockerfile's, at the project's version.
  version = configparser.ConfigParser()
  version.read(REPO / 'setup.cfg')
  for manifest in ('tfjob.yaml', 'indexed-job.yaml'):
    text = (LAUNCH / 'kubernetes' / manifest).read_text()
    assert f'cxr-trainer:{version["metadata"]["version"]}' in text and 'Dockerfile' in text
  assert 'WORKDIR /app' in (REPO / 'Dockerfile').read_text()


def _simulate_slurm_step(monkeypatch, procid):
  """What srun sets in task `procid` of a step of 2 nodes x 1 task, with 4 GPUs per node."""
  monkeypatch.delenv('TF_CONFIG', raising=False)
  for name, value in {'SLURM_JOB_ID': '77', 'SLURM_PROCID': str(procid), 'SLURM_STEP_NUM_TASKS': '2',
                      'SLURM_STEP_NUM_NODES': '2', 'SLURM_STEP_NODELIST': 'node[01-02]',
                      'SLURM_STEP_TASKS_PER_NODE': '1(x2)', 'CUDA_VISIBLE_DEVICES': '0,1,2,3'}.items():
    monkeypatch.setenv(name, value)


def test_slurm_cluster_resolver_on_two_nodes_of_four_gpus(monkeypatch):
  _simulate_slurm_step(monkeypatch, procid=1)
  resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(port_base=distribute.SLURM_PORT)
  assert resolver.cluster_spec().as_dict() == {'worker': ['node01:8888', 'node02:8888']}
  assert resolver.get_task_info() == ('worker', 1)
  assert resolver.num_accelerators() == {'GPU': 4}
  assert os.environ['CUDA_VISIBLE_DEVICES'] == '0,1,2,3'  # one task per node keeps all of the node's GPUs


def test_distribute_builds_the_slurm_resolver_for_gpu_nodes(monkeypatch):
  _simulate_slurm_step(monkeypatch, procid=0)
  gpus = [tf.config.PhysicalDevice(name=f'/physical_device:GPU:{i}', device_type='GPU') for i in range(4)]
  real = tf.config.list_physical_devices
  monkeypatch.setattr(tf.config, 'list_physical_devices', lambda kind=None: gpus if kind == 'GPU' else real(kind))
  resolver = distribute.cluster_resolver_from_env()
  assert isinstance(resolver, tf.distribute.cluster_resolver.SlurmClusterResolver)
  assert resolver.cluster_spec().as_dict() == {'worker': ['node01:8888', 'node02:8888']}
  assert (resolver.task_type, resolver.task_id) == ('worker', 0)
  assert resolver.num_accelerators() == {'GPU': 4}


# --- Kubernetes -------------------------------------------------------------------------------------------------

K8S = LAUNCH / 'kubernetes'


def test_tfjob_manifest_runs_multi_worker_trainers():
  yaml = pytest.importorskip('yaml')
  (job,) = yaml.safe_load_all((K8S / 'tfjob.yaml').read_text())
  assert (job['apiVersion'], job['kind']) == ('kubeflow.org/v1', 'TFJob')
  specs = job['spec']['tfReplicaSpecs']
  assert list(specs) == ['Worker']  # no Chief replica: worker 0 is the chief
  assert specs['Worker']['replicas'] == 2
  (container,) = specs['Worker']['template']['spec']['containers']
  assert container['name'] == 'tensorflow'
  assert container['command'][:4] == ['python', '-m', 'trainer.main', '--strategy=multi_worker']
  assert 'REPLACE_ME' in container['image']
  # Preemption: time to save a step, and the requeue code restarts the pods.
  assert specs['Worker']['template']['spec']['terminationGracePeriodSeconds'] >= 60
  assert specs['Worker']['restartPolicy'] == 'ExitCode' and 128 <= preemption.REQUEUE_EXIT_CODE <= 255


def test_indexed_job_manifest_is_consistent_with_its_service_and_entrypoint():
  yaml = pytest.importorskip('yaml')
  service, job = yaml.safe_load_all((K8S / 'indexed-job.yaml').read_text())
  assert (service['kind'], job['kind']) == ('Service', 'Job')
  assert service['spec']['clusterIP'] == 'None'
  spec, pod = job['spec'], job['spec']['template']['spec']
  (container,) = pod['containers']
  env = {e['name']: e['value'] for e in container['env']}
  assert spec['completionMode'] == 'Indexed'
  assert spec['completions'] == spec['parallelism'] == int(env['NUM_WORKERS']) == 2
  assert service['spec']['selector'] == {'job-name': job['metadata']['name']} and env['JOB_NAME'] == 'cxr-train'
  assert pod['subdomain'] == service['metadata']['name'] == env['SERVICE_NAME']
  assert int(env['PORT']) == service['spec']['ports'][0]['port'] == container['ports'][0]['containerPort']
  command = container['command']
  assert command[:3] == ['python', 'launch/kubernetes/tf_config_from_index.py', '--']
  assert (REPO / command[1]).is_file()
  assert command[3:7] == ['python', '-m', 'trainer.main', '--strategy=multi_worker']
  assert pod['terminationGracePeriodSeconds'] >= 60
  [requeue] = [rule for rule in spec['podFailurePolicy']['rules'] if 'onExitCodes' in rule]
  assert requeue['action'] == 'Ignore' and requeue['onExitCodes']['values'] == [preemption.REQUEUE_EXIT_CODE]
  assert requeue['onExitCodes']['containerName'] == container['name']


def test_tf_config_from_index():
  assert tf_config_from_index.make_tf_config(1, 3, 'cxr-train', 'cxr-workers', 2222) == {
      'cluster': {'worker': ['cxr-train-0.cxr-workers:2222', 'cxr-train-1.cxr-workers:2222',
                             'cxr-train-2.cxr-workers:2222']},
      'task': {'type': 'worker', 'index': 1}}
  with pytest.raises(ValueError, match='JOB_COMPLETION_INDEX=3 is not in 0..2'):
    tf_config_from_index.make_tf_config(3, 3, 'cxr-train', 'cxr-workers', 2222)


def test_tf_config_from_index_entrypoint_execs_the_command_with_tf_config():
  entrypoint = str(K8S / 'tf_config_from_index.py')
  show = [sys.executable, '-c', 'import os; print(os.environ["TF_CONFIG"])']
  env = dict(os.environ, JOB_COMPLETION_INDEX='1', JOB_NAME='cxr-train', SERVICE_NAME='cxr-workers',
             NUM_WORKERS='2', PORT='2222')
  result = subprocess.run([sys.executable, entrypoint, '--', *show], env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout) == tf_config_from_index.make_tf_config(1, 2, 'cxr-train', 'cxr-workers', 2222)

  del env['NUM_WORKERS']
  result = subprocess.run([sys.executable, entrypoint, '--', *show], env=env, capture_output=True, text=True)
  assert result.returncode == 1
  assert 'NUM_WORKERS not set' in result.stderr
