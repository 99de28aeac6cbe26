"""The sampling CLI / stage, exports, and the speed benchmark's outputs."""
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
from kforcing_jax import errors
from kforcing_jax import evaluate as evaluate_cli
from kforcing_jax import export
from kforcing_jax import sample as sample_cli
from kforcing_jax import sharding as sharding_lib
from kforcing_jax.data import datasets as data_lib
from kforcing_jax.decoding import engine as decode
from kforcing_jax.evaluation import benchmark as benchmark_lib
from kforcing_jax.evaluation import evaluate
from kforcing_jax.pipeline import run_dir as run_dir_lib
from kforcing_jax.pipeline import sample
from kforcing_jax.training import checkpoint as ckpt_lib
from tests.conftest import synthetic_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMED = ('ar_categorical', 'ar_inverse_cdf', 'ar_greedy', 'pf')  # benchmark_lib.measure's order


@pytest.fixture
def run_dir(distilled_run):
  """teacher -> k1 -> k2 -> sample (conftest's run, shared across test files)."""
  return distilled_run[0]


def read_jsonl(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(l) for l in f]


def test_sample_stage_writes_every_model(run_dir):
  files = sorted(os.listdir(run_dir / 'sample'))
  assert files == ['distill_k1_K1.jsonl', 'distill_k2_K2.jsonl', 'summary.json',
                   'teacher_K1.jsonl']
  recs = read_jsonl(run_dir / 'sample' / 'distill_k2_K2.jsonl')
  assert len(recs) == 2 and recs[0]['K'] == 2
  assert all(set(r) >= {'prompt', 'completion', 'completion_ids', 'prompt_ids'} for r in recs)


def test_sample_cli(run_dir, tmp_path):
  """The command itself, in a fresh process: its records are the library's."""
  prompts = tmp_path / 'p.jsonl'
  prompts.write_text('{"prefix": "| s1 s2"}\n{"prefix": "| s3"}\n')
  out = tmp_path / 'o.jsonl'
  r = subprocess.run([sys.executable, '-m', 'kforcing_jax.sample', f'--workdir={run_dir}',
                      '--stage=distill_k2', '--K=2', '--freq_penalty=0.5',
                      f'--prompts={prompts}', '--num_samples=3', '--max_new_tokens=6',
                      f'--out={out}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  recs = read_jsonl(out)
  assert len(recs) == 6 and recs[0]['prompt_ids'] == [0, 1, 2]
  assert all(len(x['completion_ids']) <= 6 for x in recs)
  direct = sample.sample_records(run_dir_lib.load_sampler(str(run_dir), 'distill_k2'),
                                 ['| s1 s2', '| s3'], 3, max_new_tokens=6, seed=0, K=2,
                                 freq_penalty=0.5)
  assert [x['completion_ids'] for x in recs] == [x['completion_ids'] for x in direct]


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
  with pytest.raises(decode.DecodeError, match='presence_penalty=nan: must be a finite'):
    teacher.generate(['| s1'], 4, presence_penalty=float('nan'))


def cli_error(main, *args) -> str:
  """The one line a command-line tool ends with for these flags (run in this process)."""
  with pytest.raises(SystemExit) as e:
    main(['prog', *args])
  text = str(e.value)
  assert text.startswith('error: ') and '\n' not in text, text
  return text


def test_sample_cli_errors_are_one_line(run_dir, tmp_path):
  base = [f'--workdir={run_dir}', f'--out={tmp_path / "o.jsonl"}']
  for extra, msg in ((['--stage=distill_k2', '--prompt='], 'give exactly one of'),
                     (['--stage=distill_k2', '--prompt= '], 'empty prompt'),
                     (['--stage=student', '--prompt=| s1'], '--stage'),
                     (['--stage=distill_k4', '--prompt=| s1'], 'no finished checkpoint'),
                     (['--stage=distill_k2', '--K=4', '--prompt=| s1'], 'allowed: 1..2'),
                     (['--stage=teacher', '--top_p=0', '--prompt=| s1'], 'top_p=0.0'),
                     (['--prompt=| s1'], 'give --workdir=RUN with --stage=STAGE')):
    assert msg in cli_error(sample_cli.main, *base, *extra), extra
  assert '--out' in cli_error(sample_cli.main, f'--export={run_dir}', '--prompt=| s1')
  assert not os.path.exists(tmp_path / 'o.jsonl')


def fixed_timings(monkeypatch, fixed):
  """benchmark_lib.time_decode answers `fixed` {name: (seconds, steps)} without timing."""
  monkeypatch.setattr(benchmark_lib, 'time_decode',
                      lambda jobs, b, r, v: [fixed[n] for n in TIMED])
  monkeypatch.setattr(benchmark_lib, 'precompile', lambda jobs: None)


def test_benchmark_files(monkeypatch, tmp_path):
  """benchmark.json holds the returned rows, benchmark.md one table line per batch size,
  benchmark.png a plot; bad --dtype / --decode_attention are named."""
  fixed_timings(monkeypatch, {'ar_categorical': (2.5, 18), 'ar_inverse_cdf': (2.0, 18),
                              'ar_greedy': (1.5, 18), 'pf': (0.5, 5)})
  cfg = synthetic_config()
  cfg.model.vocab_size = 64
  cfg.data.seq_len = 24
  result = benchmark.run_benchmark(cfg, None, True, [2, 8], 4, 3, str(tmp_path),
                                   dtype='float32')
  with open(tmp_path / 'benchmark.json', encoding='utf-8') as f:
    saved = json.load(f)
  assert saved['rows'] == json.loads(json.dumps(result['rows']))
  assert [(r['batch_size'], r['K'], r['new_tokens']) for r in saved['rows']] == [(2, 4, 18),
                                                                                 (8, 4, 18)]
  assert saved['config']['dtype'] == 'float32' and saved['config']['random_init']
  table = [l for l in (tmp_path / 'benchmark.md').read_text().splitlines() if l.startswith('|')]
  assert len(table) == 4 and table[2].startswith('| 2 | 4 | 18 |')  # header, rule, 2 rows
  assert (tmp_path / 'benchmark.png').stat().st_size > 1000
  with pytest.raises(errors.UserError, match="--dtype='fp8': allowed: auto, bfloat16"):
    benchmark.run_benchmark(cfg, None, True, [1], 4, 3, str(tmp_path), dtype='fp8')
  with pytest.raises(decode.DecodeError, match="--decode_attention='flash': allowed: xla, pallas"):
    benchmark.run_benchmark(cfg, None, True, [1], 4, 3, str(tmp_path), decode_attention='flash')
  if jax.default_backend() == 'cpu':
    with pytest.raises(decode.DecodeError, match='--decode_attention=pallas needs a GPU'):
      benchmark.run_benchmark(cfg, None, True, [1], 4, 3, str(tmp_path),
                              decode_attention='pallas')


def test_benchmark_speedups_from_fixed_timings(monkeypatch, tmp_path):
  """The row arithmetic on fixed timings: tokens/s = batch x new tokens / seconds; the AR
  baseline is the faster sampled AR; the speedups are PFLM over it and over greedy AR."""
  fixed_timings(monkeypatch, {'ar_categorical': (2.5, 18), 'ar_inverse_cdf': (2.0, 18),
                              'ar_greedy': (1.5, 18), 'pf': (0.5, 5)})
  cfg = synthetic_config()
  cfg.model.vocab_size = 64
  cfg.data.seq_len = 24
  row = benchmark.run_benchmark(cfg, None, True, [4], 4, 3, str(tmp_path),
                                dtype='float32')['rows'][0]
  assert row['ar_sampler'] == 'inverse_cdf' and row['ar_tokens_per_s'] == 4 * 18 / 2.0
  assert row['ar_steps'] == 18 and row['pf_steps'] == 5
  assert row['pf_tokens_per_s'] == 4 * 18 / 0.5
  assert row['speedup'] == 4.0 and row['speedup_vs_greedy'] == 3.0
  fixed_timings(monkeypatch, {'ar_categorical': (1.0, 18), 'ar_inverse_cdf': (2.0, 18),
                              'ar_greedy': (1.5, 18), 'pf': (0.5, 5)})
  row = benchmark.run_benchmark(cfg, None, True, [4], 4, 3, str(tmp_path),
                                dtype='float32')['rows'][0]
  assert row['ar_sampler'] == 'categorical' and row['speedup'] == 2.0


def test_benchmark_on_trained_stages(run_dir, tmp_path):
  """The one real timed benchmark: every loop decodes the whole length (AR one token per
  step, the k=2 PFLM two) and every timing is positive."""
  cfg = synthetic_config()
  result = benchmark.run_benchmark(cfg, str(run_dir), False, [2], 2, 3, str(tmp_path),
                                   dtype='float32')
  row = result['rows'][0]
  assert result['config']['k_model'] == 2 and row['new_tokens'] == 26
  assert row['ar_steps'] == row['ar_greedy_steps'] == 26 and row['pf_steps'] == 13
  for name in TIMED:
    assert row[f'{name}_tokens_per_s'] > 0
  with pytest.raises(run_dir_lib.StageError, match='no finished distill stage with k >= 4'):
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
  assert 'already exists' in cli_error(export.main, f'--workdir={run_dir}', '--stage=teacher',
                                       f'--out={tmp_path / "teacher"}')


def test_exports_serve_the_sample_cli_evaluate_and_benchmark(run_dir, tmp_path, monkeypatch):
  """An export directory (e.g. an imported released checkpoint) is accepted wherever a
  run's stage is: the sample CLI, the evaluators and the speed benchmark, with the run's
  very parameters."""
  dirs = {}
  for stage in ('teacher', 'distill_k2'):
    dirs[stage] = str(tmp_path / stage)
    export.main(['export', f'--workdir={run_dir}', f'--stage={stage}', f'--out={dirs[stage]}'])
  out = tmp_path / 'o.jsonl'
  sample_cli.main(['sample', f'--export={dirs["distill_k2"]}', '--prompt=| s1 s2',
                   '--num_samples=2', '--max_new_tokens=6', '--seed=3', f'--out={out}'])
  direct = sample.sample_records(run_dir_lib.load_sampler(str(run_dir), 'distill_k2'),
                                 ['| s1 s2'], 2, max_new_tokens=6, seed=3)
  assert [x['completion_ids'] for x in read_jsonl(out)] == [x['completion_ids'] for x in direct]

  cfg = synthetic_config()
  mesh = sharding_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})
  teacher, models = evaluate_cli.export_models(dirs['teacher'], [dirs['distill_k2']], mesh)
  loaded = {path: load() for path, load in models}
  for stage, path in dirs.items():  # the evaluators see the run's parameters
    run_model = run_dir_lib.load_sampler(str(run_dir), stage)
    assert loaded[path].arch == run_model.arch and loaded[path].k == run_model.k
    assert (ckpt_lib.params_fingerprint(loaded[path].params) ==
            ckpt_lib.params_fingerprint(run_model.params))
  report = evaluate.evaluate(cfg, data_lib.make_source(cfg), teacher,
                             [(p, lambda p=p: loaded[p]) for p in loaded])
  assert [(r['stage'], r['model'], r['K']) for r in report['rows']] == [
      (dirs['teacher'], 'teacher', 1), (dirs['distill_k2'], 'k2', 1),
      (dirs['distill_k2'], 'k2', 2)]
  assert all(np.isfinite(v) for r in report['rows'] for v in r['gen_nll'].values())
  with pytest.raises(run_dir_lib.StageError, match='the evaluators need an AR model'):
    evaluate_cli.export_models(dirs['distill_k2'], [], mesh)

  timed = []
  monkeypatch.setattr(benchmark_lib, 'time_decode', lambda jobs, b, r, v: timed.extend(
      jobs) or [(1.0, 26), (1.0, 26), (1.0, 26), (1.0, 13)])
  monkeypatch.setattr(benchmark_lib, 'precompile', lambda jobs: None)
  result = benchmark.run_benchmark(cfg, None, False, [2], 2, 3, str(tmp_path / 'b'),
                                   dtype='float32', exports=(dirs['teacher'],
                                                             dirs['distill_k2']))
  assert result['config']['k_model'] == 2 and result['config']['exports'] == [
      dirs['teacher'], dirs['distill_k2']]
  engines = [engine for engine, _ in timed]
  assert [e.k for e in engines] == [0, 0, 0, 2]
  assert (ckpt_lib.params_fingerprint(engines[-1].params) ==
          ckpt_lib.params_fingerprint(loaded[dirs['distill_k2']].params))
  assert 'must be an AR model' in cli_error(
      benchmark.main, '--config=synthetic', f'--ar_export={dirs["distill_k2"]}',
      f'--pflm_export={dirs["distill_k2"]}', '--K=2', '--batch_sizes=2', '--repeats=3',
      '--dtype=float32', f'--out={tmp_path / "c"}')
