"""The decoding engine: PFLM == training-layout readout, AR greedy == full forwards,
batch invariance, ragged prompts, EOS, the slot engine's rows == the offline engine's,
traced sampling settings (no recompilation), one length rule, bad requests."""
import concurrent.futures
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax.decoding import engine as decode
from kforcing_jax.models import transformer as model_lib
from kforcing_jax.models import precision as precision_lib
from kforcing_jax.models import sampling
from kforcing_jax.serving import engine as slot_lib
from tests.helpers import causal_logits, jit_window, tiny_model


@pytest.fixture(scope='module')
def pflm():
  return tiny_model(pflm=True, never_emit=(52,), seed=7, noise=0.5)


def serving(cfg, model, params, precision):
  """(arch, model, params, exe) in a serving precision (precision.SERVE_DTYPES)."""
  exe = precision_lib.exec_config(precision)
  params = precision_lib.cast_params(params, exe)
  return cfg, model_lib.build(cfg, exe), params, exe


def engine(arch, params, exe=None, k=None, buckets=True):
  return decode.Engine(arch, params, exe, k=(4 if arch.pflm else 0) if k is None else k,
                       buckets=buckets)


@pytest.mark.parametrize('precision, readout', [('float32', 'argmax'), ('mixed', 'argmax'),
                                               ('float32', 'inverse_cdf')])
def test_pflm_tokens_equal_training_layout_readout(pflm, precision, readout):
  """Each step's K tokens are the training layout's readout (argmax, or the inverse CDF of
  the same u) after the tokens emitted so far."""
  cfg, model, params, exe = serving(dataclasses.replace(pflm[0], readout=readout), *pflm[1:],
                                    precision)
  eng = engine(cfg, params, exe)
  K = 4
  prompt = [3, 4, 5, 6, 7, 8]
  spec = decode.DecodeSpec(K=K, pflm=True, max_new_tokens=12)
  out, steps = eng.generate([prompt], spec, seed=3, row_seeds=[11])
  assert steps == 3
  u = decode.noise_for_tokens(jax.random.key(3), jnp.asarray([11]), jnp.arange(12))
  seq, other = list(prompt), 0
  for s in range(3):
    ctx = jnp.asarray([seq])
    n = ctx.shape[1]
    u_win = jnp.broadcast_to(u[:, None, s * K:(s + 1) * K], (1, n, K))
    logits = jit_window(model)(params, ctx, None, u_win)
    block = np.asarray(sampling.pflm_readout(readout, logits[0, -1], u_win[0, -1]))
    np.testing.assert_array_equal(out[0, s * K:(s + 1) * K], block)
    other += np.sum(block != np.asarray(jnp.argmax(logits[0, -1], -1)))
    seq += block.tolist()
  assert (other > 0) == (readout == 'inverse_cdf')  # the readouts differ on these weights


def test_pflm_smaller_K_and_frequency_penalty(pflm):
  cfg, model, params = pflm
  eng = engine(cfg, params)
  prompt = [[3, 4, 5, 6, 7, 8]]
  out2, steps = eng.generate(prompt, decode.DecodeSpec(K=2, pflm=True, max_new_tokens=8))
  assert steps == 4 and out2.shape == (1, 8)
  # penalty: a token repeated without it is discouraged with it
  plain, _ = eng.generate(prompt, decode.DecodeSpec(K=4, pflm=True, max_new_tokens=24))
  pen, _ = eng.generate(prompt, decode.DecodeSpec(K=4, pflm=True, max_new_tokens=24,
                                                  freq_penalty=50.0))
  assert len(set(pen[0].tolist())) > len(set(plain[0].tolist()))
  assert len(set(pen[0].tolist())) == 24  # with a huge penalty no token repeats
  assert 52 not in pen[0]


@pytest.mark.parametrize('precision', ['float32', 'mixed'])
def test_ar_greedy_equals_full_forward_decoding(precision):
  cfg, model, params, exe = serving(*tiny_model(seed=2, noise=0.5), precision)
  eng = engine(cfg, params, exe)
  out, _ = eng.generate([[1, 2, 3]], decode.DecodeSpec(K=1, pflm=False, max_new_tokens=10,
                                                       temperature=0.0))
  seq = [1, 2, 3]
  for _ in range(10):  # full causal forwards over one padded length (one compile)
    logits = causal_logits(model, params, jnp.asarray([seq + [0] * (13 - len(seq))]))
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  assert out[0].tolist() == seq[3:]


def nucleus(p, top_p):
  order = np.argsort(-p)
  return set(order[:np.searchsorted(np.cumsum(p[order]), top_p) + 1].tolist())


@pytest.mark.parametrize('sampler', decode.SAMPLERS)
def test_ar_sampling_follows_the_tempered_filtered_distribution(sampler):
  """Both AR samplers draw softmax(logits / T); top-k and top-p filter that tempered
  distribution (temperature first): at T = 2 the nucleus is wider than at T = 1."""
  cfg, model, params = tiny_model(seed=5, vocab=8, noise=0.5)
  eng = engine(cfg, params)
  logits = np.asarray(causal_logits(model, params, jnp.asarray([[1, 2]]))[0, -1], np.float64)
  soft = lambda l: np.exp(l - l.max()) / np.exp(l - l.max()).sum()
  n = 4000
  for T in (1.0, 2.0):
    p = soft(logits / T)
    out, _ = eng.generate([[1, 2]] * n, decode.DecodeSpec(K=1, max_new_tokens=1, temperature=T,
                                                         sampler=sampler), seed=0)
    freq = np.bincount(out[:, 0], minlength=8) / n
    assert np.abs(freq - p).max() < 4 * np.sqrt(p.max() / n), (T, freq, p)
  top1, _ = eng.generate([[1, 2]] * 50, decode.DecodeSpec(K=1, max_new_tokens=1, top_k=1,
                                                          sampler=sampler))
  assert np.all(top1[:, 0] == np.argmax(logits))
  for T in (1.0, 2.0):
    keep = nucleus(soft(logits / T), 0.5)
    out, _ = eng.generate([[1, 2]] * 600, decode.DecodeSpec(K=1, max_new_tokens=1, top_p=0.5,
                                                            temperature=T, sampler=sampler))
    seen = set(out[:, 0].tolist())
    assert seen <= keep and len(seen) == len(keep), (T, seen, keep)
  assert len(nucleus(soft(logits / 2.0), 0.5)) > len(nucleus(soft(logits), 0.5))


@pytest.mark.parametrize('pflm_mode', [True, False])
def test_rows_do_not_depend_on_batch_or_padding(pflm, pflm_mode):
  cfg, model, params = pflm
  eng = engine(cfg, params, buckets=False)  # each call in its own shapes
  spec = decode.DecodeSpec(K=4 if pflm_mode else 1, pflm=pflm_mode, max_new_tokens=8)
  prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16], [17]]
  batch, _ = eng.generate(prompts, spec, seed=1, row_seeds=[5, 6, 7, 8])
  for i, p in enumerate(prompts):
    alone, _ = eng.generate([p], spec, seed=1, row_seeds=[5 + i])
    np.testing.assert_array_equal(batch[i], alone[0])
  flipped, _ = eng.generate(prompts[::-1], spec, seed=1, row_seeds=[8, 7, 6, 5])
  np.testing.assert_array_equal(flipped[::-1], batch)


def test_eos_stops_a_row_and_pads(pflm):
  cfg, model, params = pflm
  eng = engine(cfg, params)
  free, _ = eng.generate([[3, 4, 5, 6, 7]], decode.DecodeSpec(K=4, pflm=True, max_new_tokens=16))
  eos = int(free[0, 5])
  spec = decode.DecodeSpec(K=4, pflm=True, max_new_tokens=16, eos_id=eos, pad_id=0)
  out, steps = eng.generate([[3, 4, 5, 6, 7]], spec)
  first = free[0].tolist().index(eos)
  assert out[0, :first + 1].tolist() == free[0, :first + 1].tolist()
  assert np.all(out[0, first + 1:] == 0)
  assert steps == first // 4 + 1  # the loop stops once every row is done


def test_no_recompilation_for_same_shapes(pflm):
  cfg, model, params = pflm
  eng = engine(cfg, params)
  spec = decode.DecodeSpec(K=2, pflm=True, max_new_tokens=6)
  eng.generate([[1, 2, 3], [4, 5]], spec, seed=0)
  traces = eng.traces
  eng.generate([[6, 7, 8], [9]], spec, seed=1)
  assert eng.traces == traces
  eng.generate([[6, 7, 8, 9, 10], [9]], spec, seed=1, row_seeds=[0, 1])  # the same buckets
  assert eng.traces == traces
  eng.generate([list(range(1, 10)), [9]], spec, seed=1)  # 9 tokens: the next width bucket
  assert eng.traces == traces + 1
  # loops compiled ahead, from threads at once (the benchmark's precompile), are the ones
  # the calls then run: one trace per shape, none at the calls -- also in another Engine
  # of the same configs (batch sizes 6 and 12 are compiled by no other test)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    list(pool.map(lambda b: engine(cfg, params).compile(spec, 6 * b, 3), (1, 2)))
  assert eng.traces == traces + 3
  outs = {b: eng.generate([[6, 7, 8], [9]] * 3 * b, spec, seed=1)[0] for b in (1, 2)}
  assert eng.traces == traces + 3
  np.testing.assert_array_equal(outs[1][:2], eng.generate([[6, 7, 8], [9]], spec, seed=1)[0])


def test_bucket_sizes():
  assert [decode.bucket(n) for n in range(1, 18)] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 10, 12, 12,
                                                      14, 14, 16, 16, 20]
  assert [decode.bucket(n) for n in (33, 40, 41, 100, 1000, 1025)] == [40, 40, 48, 112, 1024,
                                                                       1280]
  assert [decode.bucket(n, 8) for n in (1, 8, 9, 60, 65, 129)] == [8, 8, 16, 64, 80, 160]
  assert all(n <= decode.bucket(n) <= 1.25 * n for n in range(9, 3000))


@pytest.mark.parametrize('mode', ['ar_categorical', 'ar_inverse_cdf', 'pflm_noise'])
def test_buckets_give_the_exact_shapes_tokens(pflm, mode):
  """generate() decodes a ragged batch in bucketed shapes (more rows, a wider prompt, more
  cache): the same tokens and steps as in the exact shapes, also where rows stop at EOS."""
  if mode.startswith('ar'):
    arch, _, params = tiny_model(seed=6)
    spec = decode.DecodeSpec(K=1, max_new_tokens=13, sampler=mode[3:], temperature=0.8,
                             top_p=0.95)
  else:
    arch, _, params = pflm
    spec = decode.DecodeSpec(K=4, pflm=True, max_new_tokens=13, freq_penalty=0.3)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 50, n).tolist() for n in (11, 1, 4, 9, 2, 7, 3, 10, 5)]
  exact, bucketed = engine(arch, params, buckets=False), engine(arch, params)
  assert exact.shapes(spec, 11, 9)[1:] == (11, 9)
  shape_spec, width, rows = bucketed.shapes(spec, 11, 9)
  assert (width, rows) == (16, 10) and shape_spec.max_new_tokens == (14 if spec.K == 1 else 16)
  kw = dict(seed=2, row_seeds=np.arange(9) + 30)
  if mode == 'pflm_noise':
    kw['noise_BxN'] = rng.uniform(size=(9, 16))
  free, _ = exact.generate(prompts, spec, **kw)
  # the EOS: a token early in some row r that most rows but not all emit, so that some rows
  # stop early and others never, and a batch of copies of row r stops early
  _, eos, r = max((int(np.sum(np.any(free == t, axis=1))), int(t), i)
                  for i in range(9) for t in free[i, :8] if not np.all(np.any(free == t, axis=1)))
  spec = dataclasses.replace(spec, eos_id=eos, pad_id=52)
  want, want_steps = exact.generate(prompts, spec, **kw)
  got, steps = bucketed.generate(prompts, spec, **kw)
  np.testing.assert_array_equal(got, want)
  assert steps == want_steps
  assert any(eos in row[:-1] for row in want.tolist())
  assert any(eos not in row for row in want.tolist())
  # every row stops early: so must the extra rows, for the loop to stop when the batch does
  same = dict(kw, row_seeds=[30 + r] * 9)
  if mode == 'pflm_noise':
    same['noise_BxN'] = np.repeat(kw['noise_BxN'][r:r + 1], 9, axis=0)
  want, want_steps = exact.generate([prompts[r]] * 9, spec, **same)
  got, steps = bucketed.generate([prompts[r]] * 9, spec, **same)
  np.testing.assert_array_equal(got, want)
  assert steps == want_steps < spec.n_steps


def test_ragged_calls_in_one_bucket_compile_one_loop(pflm):
  cfg, model, params = pflm
  eng = engine(cfg, params)
  rng = np.random.default_rng(1)
  calls = [(rows, width, new) for rows in (11, 12) for width in (17, 24) for new in (9, 12)]
  for i, (rows, width, new) in enumerate(calls):
    prompts = [rng.integers(1, 50, rng.integers(1, width + 1)).tolist() for _ in range(rows)]
    prompts[0] = rng.integers(1, 50, width).tolist()
    eng.generate(prompts, decode.DecodeSpec(K=4, pflm=True, max_new_tokens=new), seed=i)
    if not i:
      traces = eng.traces
  assert eng.traces == traces  # rows 12, width 24, cache for 12 new tokens: one loop


def test_sampling_settings_and_lengths_do_not_recompile(pflm):
  """temperature, top_k, top_p, freq_penalty, tau and max_new_tokens within one cache
  length are traced: one compiled loop per AR sampler serves them all."""
  cfg, model, params = pflm
  ar = engine(*tiny_model(seed=6)[::2])
  prompts = [[1, 2, 3], [4, 5]]
  settings = (dict(), dict(temperature=0.5), dict(temperature=0.0), dict(top_k=3),
              dict(top_p=0.7), dict(freq_penalty=0.7), dict(max_new_tokens=12),
              dict(temperature=2.0, top_k=5, top_p=0.9, freq_penalty=1.0))
  for sampler in decode.SAMPLERS:
    base = decode.DecodeSpec(K=1, max_new_tokens=9, sampler=sampler)  # cache: 8 + 10 -> 24
    plan = ar.plan(*ar.shapes(base, 3, 2)[:2])
    ar.generate(prompts, base)
    traces = ar.traces
    size = decode.loop_fn(ar.arch, ar.exe, plan)._cache_size()  # pylint: disable=protected-access
    outs = set()
    for kw in settings:
      spec = dataclasses.replace(base, **kw)
      assert ar.plan(*ar.shapes(spec, 3, 2)[:2]) == plan
      outs.add(ar.generate(prompts, spec, seed=3)[0][:, :9].tobytes())
    assert ar.traces == traces
    assert decode.loop_fn(ar.arch, ar.exe, plan)._cache_size() == size  # pylint: disable=protected-access
    assert len(outs) >= 5  # the settings did change the tokens
  pf = engine(cfg, params)
  spec = decode.DecodeSpec(K=4, pflm=True, max_new_tokens=8)
  plain = pf.generate(prompts, spec)[0]
  traces = pf.traces
  penalized = pf.generate(prompts, dataclasses.replace(spec, freq_penalty=50.0))[0]
  pf.generate(prompts, dataclasses.replace(spec, tau=0.5))
  assert pf.traces == traces
  assert (plain != penalized).any()


def test_ar_frequency_penalty_and_the_length_rule():
  cfg, _, params = tiny_model(seed=2, noise=0.5)
  eng = engine(cfg, params)
  greedy = decode.DecodeSpec(K=1, max_new_tokens=30, temperature=0.0)
  plain = eng.generate([[1, 2, 3]], greedy)[0][0]
  pen = eng.generate([[1, 2, 3]], dataclasses.replace(greedy, freq_penalty=1e4))[0][0]
  assert len(set(plain.tolist())) < 30 and len(set(pen.tolist())) == 30  # no repeats
  # one rule for every engine: prompt + new tokens <= the model's length (64)
  eng.generate([[1] * 54], dataclasses.replace(greedy, max_new_tokens=10))
  with pytest.raises(decode.DecodeError, match=r"prompt of 55 tokens \+ max_new_tokens=10 "
                     r"exceeds the model's maximum length 64"):
    eng.generate([[1] * 55], dataclasses.replace(greedy, max_new_tokens=10))
  slots = slot_lib.SlotEngine(cfg, params, k=0, K=1, max_slots=1)
  slots.check(54, 10)
  with pytest.raises(decode.DecodeError, match=r"prompt of 55 tokens \+ max_tokens=10 "
                     r"exceeds the model's maximum length 64"):
    slots.check(55, 10)


def slot_tokens(eng, requests):
  """Tokens of (prompt, n, SamplingParams) requests inserted into slots 0.. at once and
  stepped together by the slot engine."""
  state = eng.init_state()
  for slot, (prompt, _, sp) in enumerate(requests):
    state = eng.insert(state, eng.prefill(prompt), slot, sp)
  steps = []
  while len(steps) * eng.K < max(n for _, n, _ in requests):
    state, toks, _ = eng.generate(state)
    steps.append(np.asarray(toks)[0])
  toks = np.concatenate(steps, axis=1)  # [slots, steps * K]
  return [toks[i, :n].tolist() for i, (_, n, _) in enumerate(requests)]


@pytest.mark.parametrize('pflm_mode', [True, 'inverse_cdf', False])
def test_slot_engine_rows_equal_offline_rows(pflm, pflm_mode):
  """The slot engine's step is the offline loop's: each slot, with its own settings
  (sampler, filters, penalty) among others, gives its request's tokens alone (a PFLM with
  either readout); a second SlotEngine of the same configs compiles nothing."""
  cfg, _, params = pflm if pflm_mode else tiny_model(seed=5, noise=0.5, never_emit=(52,))
  if pflm_mode == 'inverse_cdf':
    cfg = dataclasses.replace(cfg, readout='inverse_cdf')
  k, K = (4, 4) if pflm_mode else (0, 1)
  SP = slot_lib.SamplingParams
  if pflm_mode:
    reqs = [([3, 4, 5], 12, SP(seed=1)), ([7], 9, SP(freq_penalty=0.5, seed=2)),
            ([8, 9, 10, 11, 12, 13, 14], 16, SP(freq_penalty=3.0, seed=3))]
  else:
    reqs = [([3, 4, 5], 12, SP(seed=1)),
            ([7], 9, SP(temperature=0.8, top_k=5, sampler='inverse_cdf', seed=2)),
            ([8, 9, 10, 11, 12, 13, 14], 16, SP(temperature=0.0, freq_penalty=2.0, seed=3)),
            ([15, 16], 10, SP(top_p=0.9, freq_penalty=0.5, seed=4))]
  got = slot_tokens(slot_lib.SlotEngine(cfg, params, k=k, K=K, max_slots=4), reqs)
  off = engine(cfg, params, k=k)
  for (prompt, n, sp), toks in zip(reqs, got):
    spec = decode.DecodeSpec(K=K, pflm=bool(pflm_mode), max_new_tokens=n,
                             temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p,
                             sampler=sp.sampler, freq_penalty=sp.freq_penalty)
    assert toks == eng_tokens(off, prompt, spec, sp.seed), (prompt, sp)
  traces = slot_lib.TRACES.copy()
  again = slot_tokens(slot_lib.SlotEngine(cfg, params, k=k, K=K, max_slots=4),
                      [(p, n, dataclasses.replace(sp, seed=sp.seed + 9, temperature=0.7))
                       for p, n, sp in reqs])
  assert slot_lib.TRACES == traces and len(again) == len(reqs)


def eng_tokens(eng, prompt, spec, seed):
  return eng.generate([prompt], spec, seed=seed, row_seeds=[0])[0][0].tolist()


@pytest.mark.parametrize('pflm_mode', [True, False])
def test_cache_phases_give_the_same_tokens(pflm, pflm_mode):
  # a cache grown in phases (attention over the filled prefix) == one full-length cache,
  # with ragged prompts, EOS stops, AR sampling and the PFLM's frequency penalty
  cfg, model, params = pflm
  eng = engine(cfg, params)
  prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16]]
  kw = dict(K=4, pflm=True, freq_penalty=0.5) if pflm_mode else dict(K=1, temperature=1.0)
  one, steps_one = eng.generate(prompts, decode.DecodeSpec(max_new_tokens=40, **kw), seed=2)
  stop = dict(eos_id=int(one[1, 9]), pad_id=0)
  one_eos, _ = eng.generate(prompts, decode.DecodeSpec(max_new_tokens=40, **stop, **kw), seed=2)
  # 4 phases: three growths, the last to the full length (each phase compiles its own loop)
  spec = decode.DecodeSpec(max_new_tokens=40, cache_phases=4, **kw)
  assert len(spec.phase_lengths(7)) == 4
  out, steps = eng.generate(prompts, spec, seed=2)
  np.testing.assert_array_equal(out, one)
  assert steps == steps_one
  np.testing.assert_array_equal(
      eng.generate(prompts, dataclasses.replace(spec, **stop), seed=2)[0], one_eos)
  with pytest.raises(decode.DecodeError, match='cache_phases=0'):
    eng.generate(prompts, decode.DecodeSpec(cache_phases=0, **kw))


def test_mean_cache_read_counts_each_steps_phase():
  # AR, prompt 3, 28 new tokens, 2 phases: the cache holds 3 + 28 = 31 slots, rounded up to
  # 32 (a multiple of 8); the first phase spans slots up to 3 + ceil(29 / 2) = 18, rounded to
  # 24. Steps write slots 2..29: 22 steps read 24 slots, the last 6 read 32.
  spec = decode.DecodeSpec(K=1, max_new_tokens=28, cache_phases=2)
  assert spec.cache_len(3) == 32
  assert spec.phase_lengths(3) == [24, 32]
  assert spec.mean_cache_read(3) == (22 * 24 + 6 * 32) / 28
  # one phase reads the whole cache every step; more phases read less, never below half
  for pflm, K in ((False, 1), (True, 4)):
    one = decode.DecodeSpec(K=K, pflm=pflm, max_new_tokens=1018)
    assert one.mean_cache_read(6) == one.cache_len(6)
    eight = dataclasses.replace(one, cache_phases=8)
    assert one.cache_len(6) / 2 < eight.mean_cache_read(6) < 0.6 * one.cache_len(6)
  # filled slots only (decode_attention='pallas'): AR, prompt 3: steps read 2 + i slots
  # (i = 0..27) plus the one each writes
  assert spec.mean_cache_read(3, filled_only=True) == np.mean(2 + np.arange(28)) + 1


def test_bad_requests(pflm):
  cfg, model, params = pflm
  eng = engine(cfg, params)
  with pytest.raises(decode.DecodeError, match='prompt 0 is empty'):
    eng.generate([[]], decode.DecodeSpec(K=1))
  # K > k is refused by the engine itself, whoever calls it
  with pytest.raises(decode.DecodeError, match="K=8 is larger than the model's window k=4"):
    eng.generate([[1, 2]], decode.DecodeSpec(K=8, pflm=True))
  ar = engine(*tiny_model()[::2])
  with pytest.raises(decode.DecodeError, match='this is an AR model'):
    ar.generate([[1, 2]], decode.DecodeSpec(K=1, pflm=True))
  with pytest.raises(decode.DecodeError, match='window k=2 does not fit'):
    engine(*tiny_model()[::2], k=2)
  with pytest.raises(decode.DecodeError, match='exceeds the model'):
    eng.generate([[1] * 60], decode.DecodeSpec(K=1, max_new_tokens=10))
  with pytest.raises(decode.DecodeError, match="sampler='gumbel': allowed: categorical, inverse_cdf"):
    eng.generate([[1, 2]], decode.DecodeSpec(K=1, sampler='gumbel'))
  with pytest.raises(decode.DecodeError, match='top_p=0.0'):
    eng.generate([[1, 2]], decode.DecodeSpec(K=1, top_p=0.0))
  with pytest.raises(decode.DecodeError, match='lower the batch'):
    eng.memory_check(decode.DecodeSpec(K=1, max_new_tokens=10), 10, 10**9)
