"""launch/ scripts validate their arguments and print exact commands with --dry_run."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
  return subprocess.run(['bash', os.path.join('launch', script), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)


def test_tpu_vm_dry_run_prints_every_step():
  r = run('tpu_vm.sh', '--name=kf', '--zone=us-central2-b', '--accelerator=v4-8',
          '--config=configs/owt.py', '--workdir=gs://b/kf', '--create', '--dry_run', '--',
          '--config.stages.teacher.steps=10')
  assert r.returncode == 0, r.stderr
  lines = [l for l in r.stdout.splitlines() if l.startswith('+ ')]
  assert len(lines) == 4
  assert 'tpu-vm create kf --zone=us-central2-b --accelerator-type=v4-8' in lines[0]
  assert '--worker=all' in lines[3] and 'KFORCING_DISTRIBUTED=1 python3 main.py ' \
      '--config=configs/owt.py --workdir=gs://b/kf --config.stages.teacher.steps=10' in lines[3]


def test_slurm_dry_run_script():
  r = run('slurm_gpu.sh', '--nodes=2', '--gpus_per_node=8', '--config=configs/owt.py',
          '--workdir=/shared/kf', '--partition=a100', '--dry_run')
  assert r.returncode == 0, r.stderr
  assert '#SBATCH --nodes=2' in r.stdout and '#SBATCH --ntasks-per-node=8' in r.stdout
  assert '#SBATCH --partition=a100' in r.stdout
  assert 'srun --kill-on-bad-exit=1 python3 main.py --config=configs/owt.py' in r.stdout


def test_multi_gpu_dry_run():
  r = run('multi_gpu.sh', '--config=configs/owt.py', '--workdir=/x', '--gpus=0,1',
          '--tensor=2', '--dry_run')
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == ('+ env CUDA_VISIBLE_DEVICES=0,1 python3 main.py '
                              '--config=configs/owt.py --workdir=/x --config.mesh.data=-1 '
                              '--config.mesh.fsdp=1 --config.mesh.tensor=2')
  # without mesh flags the config's own mesh (FSDP 4 x tensor 2) is kept
  r = run('multi_gpu.sh', '--config=configs/owt_8xh100.py', '--workdir=/x', '--dry_run')
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == '+  python3 main.py --config=configs/owt_8xh100.py --workdir=/x'


@pytest.mark.parametrize('script,args,msg', [
    ('tpu_vm.sh', ['--zone=z', '--accelerator=v4-8', '--config=configs/owt.py',
                   '--workdir=w'], '--name is required'),
    ('tpu_vm.sh', ['--name=n', '--zone=z', '--accelerator=a100', '--config=configs/owt.py',
                   '--workdir=w'], 'not a TPU type'),
    ('slurm_gpu.sh', ['--nodes=0', '--gpus_per_node=8', '--config=configs/owt.py',
                      '--workdir=w'], '--nodes must be a positive integer'),
    ('slurm_gpu.sh', ['--nodes=1', '--gpus_per_node=8', '--config=configs/nope.py',
                      '--workdir=w'], 'does not exist'),
    ('multi_gpu.sh', ['--config=configs/owt.py', '--workdir=w', '--gpus=a,b'], '--gpus'),
    ('multi_gpu.sh', ['--config=configs/owt.py', '--workdir=w', '--bogus'], 'unknown argument'),
])
def test_bad_arguments(script, args, msg):
  r = run(script, *args, '--dry_run')
  assert r.returncode == 2 and msg in r.stderr, r.stderr


@pytest.mark.parametrize('env,args,msg', [
    ({'SCALE': '0'}, [], 'SCALE=0: give a whole number >= 1'),
    ({'SCALE': '2x'}, [], 'SCALE=2x: give a whole number >= 1'),
    ({}, ['ten'], 'SECONDS=ten: give the whole run'),
])
def test_gpu_fidelity_refuses_bad_settings(env, args, msg, tmp_path):
  r = subprocess.run(['bash', os.path.join('launch', 'gpu_fidelity.sh'), *args], cwd=ROOT,
                     env={**os.environ, 'OUT': str(tmp_path / 'out'), **env},
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 2 and msg in r.stderr, r.stderr
  assert not (tmp_path / 'out').exists()  # refused before anything is written
