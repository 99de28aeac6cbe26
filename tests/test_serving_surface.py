"""The sampling surface real clients use: AR and PFLM penalties and min_tokens (served ==
decoded alone, and the penalty rule checked against the model's own logits), log-
probabilities (== the log-softmax of the distribution each token was drawn from, computed
from a full causal forward), prompt scoring with echo as lm-evaluation-harness requests it
(== the offline log-likelihood), and incremental detokenization (== decoding the whole
completion) on real text."""
import json
import queue

import numpy as np
import pytest

from kforcing_jax.data import tokenization
from kforcing_jax.serving import api
from kforcing_jax.serving import engine as engine_lib
from kforcing_jax.serving import scheduler as scheduler_lib
from tests.test_serving import TOK, V, sampler, serve_staggered
from tests.test_serving import live_ar, models  # noqa: F401  (fixtures shared with that file)

N_TOP = engine_lib.MAX_LOGPROBS


def alone(models, kind, req):
  """The request decoded by itself with the offline engine (its banned ids held back for
  min_tokens), cut after its first stop id."""
  s = sampler(models, kind)
  p = req.params
  out = s.generate_ids([req.prompt], req.max_tokens, K=4 if kind == 'pflm' else None,
                       temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                       freq_penalty=p.freq_penalty, presence_penalty=p.presence_penalty,
                       min_new_tokens=p.min_tokens, banned_ids=p.banned, seed=p.seed,
                       stop_at_eos=False)[0].tolist()
  stop = next((i for i, t in enumerate(out) if t in req.stop_ids), None)
  return out if stop is None else out[:stop + 1]


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def causal_logits(models, kind, ids):
  """float64 next-token logits of a full causal forward over ids (right-padded to 64, one
  compile): row t predicts token t + 1."""
  s = sampler(models, kind)
  toks = np.zeros((1, 64), np.int32)
  toks[0, :len(ids)] = ids
  return s.logits(toks)[0, :len(ids)].astype(np.float64)


@pytest.mark.parametrize('kind', ['ar', 'pflm'])
def test_penalties_and_min_tokens_served_equal_alone(models, kind):
  """Frequency and presence penalties (AR sampled and greedy; PFLM) and min_tokens over
  stop ids: 6 requests on 2 slots, each equal to its offline decode; min_tokens holds the
  stop id back (the same request without it stops earlier)."""
  arch, _, params = models[kind]
  pflm = kind == 'pflm'
  rng = np.random.default_rng(4)
  prompts = [rng.integers(1, V - 1, int(rng.integers(2, 9))).tolist() for _ in range(6)]
  free = scheduler_lib.Request(prompts[0], 12, engine_lib.SamplingParams(
      temperature=0.0 if not pflm else 1.0, seed=3), None)
  stop_id = alone(models, kind, free)[1]  # the unconstrained request emits it second
  settings = [dict(freq_penalty=0.7), dict(presence_penalty=1.5),
              dict(freq_penalty=-0.4, presence_penalty=0.6)]
  reqs = []
  for i, p in enumerate(prompts):
    kw = dict(settings[i % 3], seed=10 + i)
    if not pflm:
      kw['temperature'] = (0.0, 1.0)[i % 2]
    if i == 0:
      kw = dict(temperature=0.0 if not pflm else 1.0, seed=3, min_tokens=6,
                banned=(stop_id,))
    reqs.append(scheduler_lib.Request(p, 12, engine_lib.SamplingParams(**kw), None,
                                      stop_ids=frozenset({stop_id})))
  eng = engine_lib.SlotEngine(arch, params, k=4 if pflm else 0, K=4 if pflm else 1,
                              max_slots=2)
  got = serve_staggered(eng, reqs, -1)
  for r, (toks, _) in zip(reqs, got):
    assert toks == alone(models, kind, r), r.params
  held = got[0][0]
  assert stop_id not in held[:6] and len(held) > 2  # without min_tokens: 2 tokens


def test_ar_penalties_and_min_tokens_follow_their_rule(models):
  """Greedy AR with both penalties and min_new_tokens=m: token j is the argmax of the
  model's logits minus lambda * count - mu * [count > 0] over the tokens before it, with
  the banned id at -inf while j < m; and greedy with the ban alone for m = 1..3, where the
  ban ends exactly at token m."""
  prompt, lam, mu = [5, 9, 2], 0.9, 1.3
  s = sampler(models, 'ar')
  plain = s.generate_ids([prompt], 16, temperature=0.0, stop_at_eos=False)[0].tolist()
  banned = plain[0]
  at_boundary = 0
  for m, (f, p) in [(3, (lam, mu)), (1, (0.0, 0.0)), (2, (0.0, 0.0)), (3, (0.0, 0.0))]:
    out = s.generate_ids([prompt], 16, temperature=0.0, freq_penalty=f, presence_penalty=p,
                         min_new_tokens=m, banned_ids=[banned], stop_at_eos=False)[0].tolist()
    logits = causal_logits(models, 'ar', prompt + out)
    counts = np.zeros(V)
    for j, t in enumerate(out):
      want = logits[len(prompt) - 1 + j] - f * counts - p * (counts > 0)
      if j < m:
        want[banned] = -np.inf
      assert t == int(np.argmax(want)), (m, j)
      counts[t] += 1
    assert banned not in out[:m]
    at_boundary += out[m] == banned
    if f:
      assert len(set(out)) > len(set(plain))  # the penalties matter: plain greedy repeats
  assert at_boundary  # some m: the banned id is the first token after the ban


def served_logprobs(models, kind, params_list, n=10):
  arch, _, weights = models[kind]
  pflm = kind == 'pflm'
  eng = engine_lib.SlotEngine(arch, weights, k=4 if pflm else 0, K=4 if pflm else 1,
                              max_slots=2)
  sched = scheduler_lib.Scheduler(eng).start()
  out = []
  try:
    for i, sp in enumerate(params_list):
      q = queue.Queue()
      prompt = [3 + i, 7, 11]
      sched.submit(scheduler_lib.Request(prompt, n, sp, q.put))
      toks, lps = [], []
      while True:
        ev = q.get(timeout=120)
        toks += ev.token_ids
        if ev.logprobs is not None:
          lps.append(ev.logprobs)
        if ev.finish_reason:
          break
      out.append((prompt, toks, scheduler_lib.Logprobs(
          *(np.concatenate([getattr(l, f) for l in lps]) for f in
            ('token_n', 'top_ids_nxN', 'top_nxN')))))
  finally:
    sched.shutdown()
  return out


def test_ar_logprobs_are_those_of_the_distribution_sampled_from(models):
  """Greedy: log-softmax of the model's logits (temperature 1); sampled at T=0.7 with
  top_k=5: of the tempered, filtered logits (outside the top 5: -inf); with a frequency
  penalty: of the penalised logits. Each checked against a full causal forward."""
  cases = [(dict(temperature=0.0), lambda l, c: l),
           (dict(temperature=0.7, top_k=5, seed=1), lambda l, c: np.where(
               l >= np.sort(l)[-5], l / 0.7, -np.inf)),
           (dict(temperature=1.0, freq_penalty=0.8, seed=2), lambda l, c: l - 0.8 * c)]
  got = served_logprobs(models, 'ar', [engine_lib.SamplingParams(logprobs=True, **kw)
                                       for kw, _ in cases])
  for (kw, rule), (prompt, toks, lp) in zip(cases, got):
    logits = causal_logits(models, 'ar', prompt + toks)
    counts = np.zeros(V)
    assert len(lp) == len(toks) == 10
    for j, t in enumerate(toks):
      ref = log_softmax(rule(logits[len(prompt) - 1 + j], counts))
      np.testing.assert_allclose(lp.token_n[j], ref[t], atol=2e-4, err_msg=str(kw))
      order = np.argsort(-ref, kind='stable')[:N_TOP]
      finite = np.isfinite(ref[order])
      np.testing.assert_allclose(lp.top_nxN[j][finite], ref[order][finite], atol=2e-4)
      assert set(lp.top_ids_nxN[j][:3]) == set(order[:3])
      counts[t] += 1


def test_pflm_logprobs_are_each_hints_softmax_at_its_argmax(models):
  (prompt, toks, lp), = served_logprobs(models, 'pflm', [
      engine_lib.SamplingParams(logprobs=True, seed=5)], n=12)
  assert len(lp) == len(toks) == 12
  assert (lp.top_ids_nxN[:, 0] == np.asarray(toks)).all()  # the token is the argmax
  np.testing.assert_array_equal(lp.token_n, lp.top_nxN[:, 0])
  assert (np.exp(lp.top_nxN).sum(1) <= 1 + 1e-5).all() and (lp.token_n < 0).all()


def test_prompt_scores_equal_the_causal_forward(models):
  arch, _, params = models['ar']
  eng = engine_lib.SlotEngine(arch, params, k=0, K=1, max_slots=1)
  ids = [4, 8, 15, 16, 23, 42, 1, 2, 3]
  lp = eng.score(ids)
  ref = log_softmax(causal_logits(models, 'ar', ids))
  np.testing.assert_allclose(np.asarray(lp.token_BxK), ref[np.arange(8), ids[1:]], atol=2e-5)
  np.testing.assert_array_equal(np.asarray(lp.top_ids_BxKxN)[:, 0], ref[:8].argmax(-1))


def test_lm_eval_loglikelihood_requests_get_the_offline_scores(live_ar, models):
  """The body lm-evaluation-harness's local-completions sends for loglikelihood (token-id
  prompts of context + continuation, echo, max_tokens=1, logprobs=1, temperature 0): the
  sum of token_logprobs[ctxlen:-1] is the model's log-likelihood of the continuation and
  is_greedy (each scored log-probability == the max of its top_logprobs) agrees."""
  rng = np.random.default_rng(2)
  prompts = [rng.integers(1, V - 1, int(rng.integers(4, 20))).tolist() for _ in range(3)]
  r = live_ar.post('/completions', {'model': 'tiny', 'prompt': prompts, 'temperature': 0,
                                    'max_tokens': 1, 'logprobs': 1, 'seed': 1234,
                                    'echo': True})
  assert r.status_code == 200, r.text
  choices = sorted(r.json()['choices'], key=lambda c: c['index'])
  for ids, ch in zip(prompts, choices):
    lp = ch['logprobs']
    assert len(lp['token_logprobs']) == len(ids) + 1 and lp['token_logprobs'][0] is None
    assert lp['top_logprobs'][0] is None and lp['tokens'][:len(ids)] == [
        TOK.decode([t]) for t in ids]
    ref = log_softmax(causal_logits(models, 'ar', ids))
    ctxlen = len(ids) // 2
    want = sum(ref[j - 1, ids[j]] for j in range(ctxlen, len(ids)))
    assert abs(sum(lp['token_logprobs'][ctxlen:-1]) - want) < 1e-4
    greedy = all(ref[j - 1].argmax() == ids[j] for j in range(ctxlen, len(ids)))
    assert greedy == all(lp['token_logprobs'][j] == max(lp['top_logprobs'][j].values())
                         for j in range(ctxlen, len(ids)))
    assert ch['text'].startswith(TOK.decode(ids))
    # where each token's text delta begins: the prompt's, then the completion's after it
    assert lp['text_offset'] == [len(TOK.decode(ids[:j])) for j in range(len(ids) + 1)]


def test_echo_scores_with_max_tokens_0_and_streams_the_same(live_ar):
  body = {'prompt': [3, 9, 27, 1], 'max_tokens': 0, 'echo': True, 'logprobs': 2}
  whole = live_ar.post('/completions', body).json()['choices'][0]
  assert whole['finish_reason'] == 'length' and whole['token_ids'] == []
  assert whole['text'] == TOK.decode([3, 9, 27, 1]) and len(whole['logprobs']['tokens']) == 4
  assert all(len(d) in (2, 3) for d in whole['logprobs']['top_logprobs'][1:])
  gen = {'prompt': [3, 9, 27, 1], 'max_tokens': 7, 'logprobs': 3, 'seed': 4, 'echo': True}
  whole = live_ar.post('/completions', gen).json()['choices'][0]
  r = live_ar.post('/completions', {**gen, 'stream': True})
  chunks = [json.loads(line[6:]) for line in r.text.splitlines()
            if line.startswith('data: {')]
  parts = [c['choices'][0] for c in chunks]
  assert ''.join(p['text'] for p in parts) == whole['text']
  for field in ('tokens', 'token_logprobs', 'top_logprobs', 'text_offset'):
    assert sum((p['logprobs'][field] for p in parts), []) == whole['logprobs'][field]


def test_min_tokens_holds_a_stop_id_back_over_http(live_ar, models):
  """A stop id the request would emit second is held back for min_tokens tokens."""
  s = sampler(models, 'ar')
  prompt, free = next((p, f) for p in ([6, i, 2] for i in range(1, 40))
                      if len(set((f := s.generate_ids([p], 8, temperature=0.0,
                                                      stop_at_eos=False)[0].tolist())[:2])) == 2
                      and 0 not in f)
  body = {'prompt': prompt, 'max_tokens': 8, 'temperature': 0, 'stop_token_ids': [free[1]]}
  assert live_ar.post('/completions', body).json()['choices'][0]['token_ids'] == free[:2]
  held = live_ar.post('/completions', {**body, 'min_tokens': 5}).json()['choices'][0]
  want = s.generate_ids([prompt], 8, temperature=0.0, min_new_tokens=5,
                        banned_ids=[free[1], TOK.eos_id], stop_at_eos=False)[0].tolist()
  cut = next((i for i, t in enumerate(want) if t in (free[1], TOK.eos_id)), len(want) - 1)
  assert held['token_ids'] == want[:cut + 1] and free[1] not in want[:5]


class Bytes:
  """A byte tokenizer: id = byte."""

  def decode(self, ids):
    return bytes(ids).decode('utf-8', errors='replace')


def test_stop_strings_wait_for_min_tokens():
  """The first 'END' ends inside the first 8 tokens: it is text; the second stops."""
  s = api.TextStream(Bytes(), stop=('END',), min_tokens=8)
  text = ''.join(s.add([t])[0] for t in b'ab END cd END ef')
  assert text == 'ab END cd ' and s.stopped and len(s.ids) == 13


@pytest.mark.parametrize('name', ['gpt2', 'bert-base-uncased', 'hf'])
def test_incremental_text_equals_the_whole_decode(name, testdata, tmp_path):
  """Real text (with accents, CJK and an emoji) through each tokenizer family, fed in
  random chunk sizes: the concatenated deltas equal decoding all ids at once."""
  if name == 'hf':
    hf_fixtures = pytest.importorskip('tests.hf_fixtures')
    hf_fixtures.tiny_tokenizer(str(tmp_path))
    tok = tokenization.hf(str(tmp_path))
  else:
    tok = tokenization.load(name, f'{testdata}/tokenizers/{name}')
  text = open(f'{testdata}/lm1b/lingvo_lm1b_100.txt', encoding='utf-8').read()[:3000]
  ids = tok.encode(text + ' naïve café — 東京 😀')
  rng = np.random.default_rng(0)
  s, out, j = api.TextStream(tok), [], 0
  while j < len(ids):
    n = int(rng.integers(1, 5))
    out.append(s.add(ids[j:j + n], final=j + n >= len(ids))[0])
    j += n
  assert ''.join(out) == tok.decode(ids)


def test_after_warm_up_no_request_compiles_anything(live_ar):
  """serve.build's warm-up compiled every length bucket, slot-count bucket and path: prompt
  lengths 1..61, greedy / sampled / filtered / penalised, logprobs, prompt scoring, n up to
  the slot count, and 1..4 live slots add no trace."""
  traces = live_ar.engine.traces
  rng = np.random.default_rng(9)
  for n_prompt, body in [(1, {'temperature': 0}), (17, {'top_k': 3, 'top_p': 0.5}),
                         (33, {'presence_penalty': 1.0, 'logprobs': 2, 'echo': True}),
                         (61, {'frequency_penalty': 0.5, 'min_tokens': 2, 'n': 4}),
                         (40, {'max_tokens': 0, 'echo': True, 'logprobs': 0})]:
    prompt = rng.integers(1, V - 1, n_prompt).tolist()
    r = live_ar.post('/completions', {'prompt': prompt, 'max_tokens': 3, **body})
    assert r.status_code == 200, r.text
  assert live_ar.engine.traces == traces
