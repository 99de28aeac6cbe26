"""The sampling CLI / stage and the speed benchmark's outputs."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import kforcing_jax
from kforcing_jax import Sampler
from kforcing_jax import benchmark
from kforcing_jax.evaluation import benchmark as benchmark_lib
from kforcing_jax.decoding import engine as decode
from kforcing_jax import errors
from kforcing_jax.interop import export
from kforcing_jax.pipeline import sample
from kforcing_jax import sharding as sharding_lib
from kforcing_jax.pipeline import run_dir as run_dir_lib
from tests.conftest import synthetic_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run_dir(distilled_run):
  """teacher -> k1 -> k2 -> sample (conftest's run, shared across test files)."""
  return distilled_run[0]


def test_sample_stage_writes_every_model(run_dir):
  files = sorted(os.listdir(run_dir / 'sample'))
  assert files == ['distill_k1_K1.jsonl', 'distill_k2_K2.jsonl', 'summary.json',
                   'teacher_K1.jsonl']
  with open(run_dir / 'sample' / 'distill_k2_K2.jsonl', encoding='utf-8') as f:
    recs = [json.loads(l) for l in f]
  assert len(recs) == 2 and recs[0]['K'] == 2
  assert all(set(r) >= {'prompt', 'completion', 'completion_ids', 'prompt_ids'} for r in recs)


def test_sample_cli(run_dir, tmp_path):
  prompts = tmp_path / 'p.jsonl'
  prompts.write_text('{"prefix": "| s1 s2"}\n{"prefix": "| s3"}\n')
  out = tmp_path / 'o.jsonl'
  r = subprocess.run([sys.executable, '-m', 'kforcing_jax.sample', f'--workdir={run_dir}',
                      '--stage=distill_k2', '--K=2', '--freq_penalty=0.5',
                      f'--prompts={prompts}', '--num_samples=3', '--max_new_tokens=6',
                      f'--out={out}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  recs = [json.loads(l) for l in out.read_text().splitlines()]
  assert len(recs) == 6 and recs[0]['prompt_ids'] == [0, 1, 2]
  assert all(len(x['completion_ids']) <= 6 for x in recs)


def test_sample_errors(run_dir):
  k1 = run_dir_lib.load_sampler(str(run_dir), 'distill_k1')
  with pytest.raises(decode.DecodeError, match="K=2 is larger than the model's window k=1"):
    sample.sample_records(k1, ['| s1'], 1, K=2)
  with pytest.raises(run_dir_lib.StageError, match="'distill_k4' has no finished checkpoint"):
    run_dir_lib.load_sampler(str(run_dir), 'distill_k4')
  with pytest.raises(run_dir_lib.StageError, match='not a model stage'):
    run_dir_lib.load_sampler(str(run_dir), 'student')
  teacher = run_dir_lib.load_sampler(str(run_dir), 'teacher')
  with pytest.raises(decode.DecodeError, match='encodes to no tokens'):
    sample.sample_records(teacher, [''], 1)
  with pytest.raises(decode.DecodeError, match='exceeds'):
    sample.sample_records(teacher, ['| ' + 's1 ' * 40], 1, max_new_tokens=8)
  with pytest.raises(decode.DecodeError, match='freq_penalty is a PFLM setting'):
    teacher.generate(['| s1'], 4, freq_penalty=0.5)


def test_benchmark_outputs(tmp_path):
  cfg = synthetic_config()
  cfg.model.vocab_size = 64
  cfg.data.seq_len = 24
  result = benchmark.run_benchmark(cfg, None, True, [2], 4, 3, str(tmp_path), dtype='float32')
  with open(tmp_path / 'benchmark.json', encoding='utf-8') as f:
    saved = json.load(f)
  assert saved['rows'] == json.loads(json.dumps(result['rows']))
  for row in saved['rows']:
    assert row['new_tokens'] == 18 and row['K'] == 4
    assert row['pf_steps'] == 5 and row['ar_steps'] == 18 and row['ar_greedy_steps'] == 18
    for name in ('ar_categorical', 'ar_inverse_cdf', 'ar_greedy', 'pf'):
      assert row[f'{name}_tokens_per_s'] > 0
    assert row['ar_tokens_per_s'] == row[f'ar_{row["ar_sampler"]}_tokens_per_s']
  assert (tmp_path / 'benchmark.md').read_text().count('\n| ') == 2  # header + one batch
  assert (tmp_path / 'benchmark.png').stat().st_size > 1000
  assert saved['config']['dtype'] == 'float32'
  with pytest.raises(errors.UserError, match="--dtype='fp8': allowed: auto, bfloat16"):
    benchmark.run_benchmark(cfg, None, True, [1], 4, 3, str(tmp_path), dtype='fp8')
  with pytest.raises(decode.DecodeError, match="--decode_attention='flash': allowed: xla, pallas"):
    benchmark.run_benchmark(cfg, None, True, [1], 4, 3, str(tmp_path), decode_attention='flash')
  if jax.default_backend() == 'cpu':
    with pytest.raises(decode.DecodeError, match='--decode_attention=pallas needs a GPU'):
      benchmark.run_benchmark(cfg, None, True, [1], 4, 3, str(tmp_path), decode_attention='pallas')


def test_benchmark_speedups_from_fixed_timings(monkeypatch, tmp_path):
  """The row arithmetic on fixed timings: tokens/s = batch x new tokens / seconds; the AR
  baseline is the faster sampled AR; the speedups are PFLM over it and over greedy AR."""
  order = ('ar_categorical', 'ar_inverse_cdf', 'ar_greedy', 'pf')
  fixed = {'ar_categorical': (2.5, 18), 'ar_inverse_cdf': (2.0, 18), 'ar_greedy': (1.5, 18),
           'pf': (0.5, 5)}
  monkeypatch.setattr(benchmark_lib, 'time_decode',
                      lambda jobs, b, r, v: [fixed[n] for n in order])
  monkeypatch.setattr(benchmark_lib, 'precompile', lambda jobs: None)
  cfg = synthetic_config()
  cfg.model.vocab_size = 64
  cfg.data.seq_len = 24
  row = benchmark.run_benchmark(cfg, None, True, [4], 4, 3, str(tmp_path), dtype='float32')['rows'][0]
  assert row['ar_sampler'] == 'inverse_cdf' and row['ar_tokens_per_s'] == 4 * 18 / 2.0
  assert row['pf_tokens_per_s'] == 4 * 18 / 0.5
  assert row['speedup'] == 4.0 and row['speedup_vs_greedy'] == 3.0


def test_benchmark_on_trained_stages(run_dir, tmp_path):
  cfg = synthetic_config()
  result = benchmark.run_benchmark(cfg, str(run_dir), False, [2], 2, 3, str(tmp_path), dtype='float32')
  assert result['config']['k_model'] == 2 and result['rows'][0]['pf_steps'] == 13
  with pytest.raises(run_dir_lib.StageError, match='no finished distill_k<k> stage with k >= 4'):
    benchmark.run_benchmark(cfg, str(run_dir), False, [2], 4, 3, str(tmp_path))


def test_export_round_trip_decodes_identically(run_dir, tmp_path):
  for stage, K in (('teacher', 1), ('distill_k2', 2)):
    out = tmp_path / stage
    export.export(str(run_dir), stage, str(out))
    loaded = kforcing_jax.load(str(out))
    assert isinstance(loaded, Sampler) and loaded.k == (0 if stage == 'teacher' else 2)
    assert loaded.tokenizer.name == 'synthetic'
    direct = run_dir_lib.load_sampler(str(run_dir), stage)
    prompts = [[0, 1, 2], [0, 5]]
    a = direct.generate_ids(prompts, 10, K=K, seed=4)
    np.testing.assert_array_equal(a, loaded.generate_ids(prompts, 10, K=K, seed=4))
    assert loaded.generate(['| s1 s2'], 6, seed=4) == direct.generate(['| s1 s2'], 6, seed=4)
    # onto a 2-device tensor-parallel mesh
    many = sharding_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 2})
    sharded = kforcing_jax.load(str(out), mesh=many)
    assert len(sharded.params['head']['kernel'].sharding.device_set) == 2
    np.testing.assert_array_equal(a, sharded.generate_ids(prompts, 10, K=K, seed=4))
  with pytest.raises(run_dir_lib.StageError, match='already exists'):
    export.export(str(run_dir), 'teacher', str(tmp_path / 'teacher'))


def test_sample_cli_errors_are_one_line(run_dir, tmp_path):
  base = [sys.executable, '-m', 'kforcing_jax.sample', f'--workdir={run_dir}',
          f'--out={tmp_path / "o.jsonl"}']
  for extra, msg in ((['--stage=distill_k2', '--prompt='], 'give exactly one of'),
                     (['--stage=distill_k2', '--prompt= '], 'empty prompt'),
                     (['--stage=student', '--prompt=| s1'], '--stage'),
                     (['--stage=distill_k4', '--prompt=| s1'], 'no finished checkpoint'),
                     (['--stage=distill_k2', '--K=4', '--prompt=| s1'], 'allowed: 1..2'),
                     (['--stage=teacher', '--top_p=0', '--prompt=| s1'], 'top_p=0.0')):
    r = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and msg in r.stderr, (extra, r.stderr[-500:])
    assert 'Traceback' not in r.stderr


def test_exports_serve_the_sample_cli_evaluate_and_benchmark(run_dir, tmp_path):
  """An export directory (e.g. an imported released checkpoint) is accepted wherever a
  run's stage is: the sample CLI, the evaluators and the speed benchmark."""
  from kforcing_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  dirs = {}
  for stage in ('teacher', 'distill_k2'):
    dirs[stage] = str(tmp_path / stage)
    export.export(str(run_dir), stage, dirs[stage])
  out = tmp_path / 'o.jsonl'
  r = subprocess.run([sys.executable, '-m', 'kforcing_jax.sample', f'--export={dirs["distill_k2"]}',
                      '--prompt=| s1 s2', '--num_samples=2', '--max_new_tokens=6', '--seed=3',
                      f'--out={out}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  recs = [json.loads(l) for l in out.read_text().splitlines()]
  direct = sample.sample_records(run_dir_lib.load_sampler(str(run_dir), 'distill_k2'), ['| s1 s2'],
                                 2, max_new_tokens=6, seed=3, K=None, temperature=1.0,
                                 top_k=0, top_p=1.0, sampler='categorical', freq_penalty=0.0)
  assert [x['completion_ids'] for x in recs] == [x['completion_ids'] for x in direct]

  cfg = synthetic_config()
  from kforcing_jax.data import datasets as data_lib  # pylint: disable=g-import-not-at-top
  source = data_lib.make_source(cfg)
  mesh = sharding_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})
  by_export = evaluate.evaluate(cfg, source, *evaluate.export_models(
      dirs['teacher'], [dirs['distill_k2']], mesh))
  by_run = evaluate.evaluate(cfg, source, *run_dir_lib.stage_samplers(str(run_dir), mesh))
  strip = lambda rows: [{k: v for k, v in r.items() if k != 'stage'} for r in rows]
  assert strip(by_export['rows']) == [r for r in strip(by_run['rows']) if r['model'] != 'k1']
  with pytest.raises(run_dir_lib.StageError, match='the evaluators need an AR model'):
    evaluate.export_models(dirs['distill_k2'], [], mesh)

  result = benchmark.run_benchmark(cfg, None, False, [2], 2, 3, str(tmp_path / 'b'), dtype='float32',
                         exports=(dirs['teacher'], dirs['distill_k2']))
  assert result['config']['k_model'] == 2 and result['rows'][0]['pf_steps'] == 13
