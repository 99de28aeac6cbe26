"""Evaluation metrics against hand-computed values, a planted bad student, report files."""
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kforcing_jax.pipeline import run_dir
from kforcing_jax import Sampler
from kforcing_jax.data import datasets as data_lib
from kforcing_jax.evaluation import evaluate
from kforcing_jax.evaluation import misses
from kforcing_jax.pipeline import run as pipeline
from tests.conftest import synthetic_config
from tests.helpers import causal_logits, tiny_model


def test_unigram_entropy_by_hand():
  assert evaluate.unigram_entropy([3, 3, 3]) == 0.0
  assert evaluate.unigram_entropy([1, 2]) == pytest.approx(math.log(2))
  p = np.array([2, 1, 1]) / 4
  assert evaluate.unigram_entropy([5, 5, 6, 7]) == pytest.approx(-(p * np.log(p)).sum())


def test_gen_nll_of_ragged_rows_by_hand():
  """Evaluators score rows of different prompt and completion lengths in one padded call:
  the mean over rows of each completion's mean NLL, by hand from each row's own forward
  (teacher) and from the source's forward algorithm (exact)."""
  cfg = synthetic_config()
  source = data_lib.make_source(cfg)
  arch, model, params = tiny_model(vocab=source.tokenizer.vocab_size, seed=3)
  teacher = Sampler(arch, params, k=0, tokenizer=source.tokenizer)
  prompts = [[0, 3, 4], [0, 7], [0, 1, 2, 5]]
  completions = [[6, 8, 9, 2], [11], [4, 4, 0, 12, 13]]
  got = evaluate.Evaluators(source, teacher)(prompts, completions, width=16)
  want_t, want_x = [], []
  for p, c in zip(prompts, completions):
    row = np.asarray([p + c])
    logp = np.asarray(jax.nn.log_softmax(causal_logits(model, params, jnp.asarray(row))[0], -1))
    want_t.append(-np.mean([logp[t - 1, row[0, t]] for t in range(len(p), row.shape[1])]))
    want_x.append(-np.mean(source.hmm.token_logprobs(row)[0, len(p) - 1:]))
  assert got['teacher'] == pytest.approx(np.mean(want_t), rel=1e-5)
  assert got['exact'] == pytest.approx(np.mean(want_x), rel=1e-9)


def test_misses_binned_by_hand():
  hit = [True, False, True, True, False, True]
  value = [0.0, 0.002, 0.0025, 0.5, 1.0, 0.05]
  got = misses.binned(hit, value, (0.0, 0.002, 0.1, 1.0))
  assert [(b['lo'], b['hi']) for b in got] == [(0.0, 0.002), (0.002, 0.1), (0.1, 1.0)]
  assert [b['share'] for b in got] == pytest.approx([1 / 6, 3 / 6, 2 / 6])
  # [lo, hi) except the last bin, which holds its upper end
  assert [b['agreement'] for b in got] == pytest.approx([1.0, 2 / 3, 0.5])
  empty = misses.binned([True], [0.5], (0.0, 0.1, 1.0))
  assert empty[0] == {'lo': 0.0, 'hi': 0.1, 'share': 0.0, 'agreement': None}
  with pytest.raises(ValueError, match='differ in shape'):
    misses.binned([True, False], [0.1], (0.0, 1.0))


def test_misses_count_position_i_where_the_earlier_tokens_match():
  hit = np.array([[1, 1], [1, 0], [0, 1], [1, 1], [0, 0]], bool)
  ok = np.array([True, True, True, True, False])
  prob = np.full((5, 2), 0.5)
  edge = np.array([[0.1, 0.001], [0.1, 0.001], [0.001, 0.1], [0.1, 0.1], [0.1, 0.1]])
  got = misses.breakdown(hit, ok, prob, edge)
  # position 1: the 4 valid windows; position 2: the 3 whose first token matches
  (pos1, pos2) = (sum(b['share'] * (b['agreement'] or 0) for b in per)
                  for per in got['target_prob'])
  assert (pos1, pos2) == pytest.approx((3 / 4, 2 / 3))
  assert pos1 * pos2 == pytest.approx(evaluate.all_k_agreement(hit[ok][None], ok[ok][None])[1])
  near, far = got['edge_distance'][1][0], got['edge_distance'][1][-1]
  assert (near['share'], near['agreement']) == pytest.approx((2 / 3, 0.5))
  assert (far['share'], far['agreement']) == pytest.approx((1 / 3, 1.0))


def test_windows_are_the_asked_ks_up_to_each_students_window():
  def windows(asked, k):
    return evaluate.windows(ml_collections.ConfigDict({'windows': asked}), k)
  assert windows((), 4) == [1, 2, 3, 4] and windows((), 1) == [1]
  assert windows((8, 1, 3), 4) == [1, 3, 4] and windows((1, 3, 8), 8) == [1, 3, 8]
  assert windows((8,), 2) == [2] and windows((1,), 4) == [1, 4]  # and the window itself
  assert evaluate.windows(ml_collections.ConfigDict({}), 2) == [1, 2]  # an older config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  d = tmp_path_factory.mktemp('eval')
  cfg = synthetic_config(steps=150, pipeline=('teacher', 'distill_k1', 'evaluate'))
  cfg.stages.teacher.opt.learning_rate = 3e-3
  cfg.stages.distill_k1.opt.learning_rate = 3e-3
  cfg.stages.distill_k1.batch_size = 8
  cfg.stages.teacher.log_every = 50
  cfg.stages.distill_k1.log_every = 50
  cfg.evaluate.num_prompts = 4
  cfg.evaluate.max_new_tokens = 12
  cfg.evaluate.agreement_rows = 8
  cfg.evaluate.seed = 7  # not the default: the report must record the config's
  pipeline.run(cfg, str(d))
  return d, cfg


def test_report_files_are_complete(trained):
  d, cfg = trained
  with open(d / 'evaluate' / 'report.json', encoding='utf-8') as f:
    report = json.load(f)
  assert report['source_entropy_rate'] > 1.5
  models = [(r['model'], r['K']) for r in report['rows']]
  assert models == [('teacher', 1), ('k1', 1)]
  for r in report['rows']:
    assert set(r['gen_nll']) == {'exact', 'teacher'}
    assert all(np.isfinite(v) for v in r['gen_nll'].values())
    assert r['nfe_per_token'] == 1.0 and r['entropy'] > 0
  assert report['rows'][0]['agreement_all'] is None
  assert 0 <= report['rows'][1]['agreement_all'] <= 1
  # the protocol is the config's, recorded (prompts, samples, lengths, seeds)
  p, e = report['protocol'], cfg.evaluate
  assert (p['num_prompts'], p['prompt_len'], p['num_samples'], p['max_new_tokens']) == (
      e.num_prompts, e.prompt_len, e.num_samples, e.max_new_tokens)
  assert (p['seed'], p['data_seed'], p['agreement_rows']) == (e.seed, cfg.seed,
                                                              e.agreement_rows)
  md = (d / 'evaluate' / 'report.md').read_text()
  assert '| k1 | 1 |' in md and 'gen NLL (exact)' in md
  # NLL and entropy relative to the teacher's own samples: exactly 1 on the teacher's row,
  # the student's own ratios on its row
  header, _, teacher_row, k1_row = md.splitlines()[2:6]
  cols = [c.strip() for c in header.split('|')]
  i, j = cols.index("NLL / teacher's"), cols.index("entropy / teacher's")
  t, k = [c.strip() for c in teacher_row.split('|')], [c.strip() for c in k1_row.split('|')]
  assert t[i] == t[j] == '1.000'
  k1, t0 = report['rows'][1], report['rows'][0]
  assert k[i] == f'{k1["gen_nll"]["exact"] / t0["gen_nll"]["exact"]:.3f}'
  assert k[j] == f'{k1["entropy"] / t0["entropy"]:.3f}'
  assert (d / 'evaluate' / 'report.png').stat().st_size > 1000
  # where k1 misses the AR rollout: every valid window in one bin of each breakdown, and
  # the bins' agreements add up to the row's
  per_stage = report['misses']
  assert list(per_stage) == ['distill_k1']
  for name in ('target_prob', 'edge_distance'):
    (bins,) = per_stage['distill_k1'][name]
    assert sum(b['share'] for b in bins) == pytest.approx(1.0)
    assert sum(b['share'] * (b['agreement'] or 0) for b in bins) == pytest.approx(
        k1['agreement_all'])
  assert 'distill_k1, by the distance from u to its token' in md


def test_planted_bad_student_is_caught(trained):
  """A student whose noise encoder is zeroed agrees far less with the teacher on
  shared noise, and its samples leave the teacher's (exact NLL, entropy) point: it
  collapses onto a few tokens. (With a source that gives every sample a finite
  likelihood, such repetition has a *lower* exact NLL than real samples, so NLL alone
  cannot flag it -- the report reads NLL next to entropy for this reason.)"""
  d, cfg = trained
  teacher = run_dir.load_sampler(str(d), 'teacher')
  student = run_dir.load_sampler(str(d), 'distill_k1')
  s_params = student.params
  bad = dict(s_params)  # the noise never reaches the model: every draw is the same token
  bad['noise_encoder'] = jax.tree.map(jnp.zeros_like, s_params['noise_encoder'])
  source = data_lib.make_source(cfg)
  batch = data_lib.BatchIterator(source, 'eval', 16, None, 0, False).local_batch(0)
  planted_student = Sampler(student.arch, bad, k=1, tokenizer=student.tokenizer)
  good = evaluate.shared_noise_agreement(student, teacher, batch, 0)
  planted = evaluate.shared_noise_agreement(planted_student, teacher, batch, 0)
  print('agreement trained', good, 'planted', planted)
  assert good[0] > planted[0] + 0.2
  prompts = [list(r[:4]) for r in batch['tokens']]
  ev = evaluate.Evaluators(source, teacher)
  point = {}
  for name, model in (('teacher', teacher), ('good', student), ('bad', planted_student)):
    out = model.generate_ids(prompts, 20, seed=1, stop_at_eos=False)
    point[name] = (ev(prompts, out.tolist())['exact'],
                   float(np.mean([evaluate.unigram_entropy(r) for r in out.tolist()])))
  print('(exact gen NLL, entropy)', point)
  dist = {n: abs(p[0] / point['teacher'][0] - 1) + abs(p[1] / point['teacher'][1] - 1)
          for n, p in point.items()}
  assert dist['good'] < 0.3
  assert dist['bad'] > dist['good'] + 0.5
  assert point['bad'][1] < 0.5 * point['teacher'][1]  # collapsed onto a few tokens
