import numpy as np
import pytest

from kforcing_jax.data import synthetic


def tiny_source():
  # 2 hidden states + end state; vocab: EOS=0, symbols 1..2, reserved 3
  init = np.array([0.6, 0.4, 0.0])
  trans = np.array([[0.7, 0.2, 0.1],
                    [0.3, 0.5, 0.2],
                    init])
  emit = np.array([[0.0, 0.9, 0.1, 0.0],
                   [0.0, 0.2, 0.8, 0.0],
                   [1.0, 0.0, 0.0, 0.0]])
  return synthetic.HMMSource(init_S=init, trans_SxS=trans, emit_SxV=emit)


def test_hand_computed_probability():
  src = tiny_source()
  # sequence: EOS, 1, 2 ; p(1 | start) = sum_s init(s) emit(s,1)
  p1 = 0.6 * 0.9 + 0.4 * 0.2
  post = np.array([0.6 * 0.9, 0.4 * 0.2]) / p1
  pred = post @ np.array([[0.7, 0.2], [0.3, 0.5]])  # to states 0,1 (not end)
  p2 = pred @ np.array([0.1, 0.8])
  lp = src.token_logprobs(np.array([[0, 1, 2]]))
  np.testing.assert_allclose(lp[0], [np.log(p1), np.log(p2)], rtol=1e-12)
  # next-token distribution after [EOS, 1]: states 0/1 emit, end state emits EOS
  nxt = src.next_token_probs(np.array([[0, 1]]))[0]
  end_mass = post @ np.array([0.1, 0.2])
  np.testing.assert_allclose(nxt[0], end_mass, rtol=1e-12)
  np.testing.assert_allclose(nxt[2], p2, rtol=1e-12)
  np.testing.assert_allclose(nxt.sum(), 1.0, rtol=1e-12)


def test_exact_nll_matches_monte_carlo():
  """Exact sequence probabilities (forward algorithm) against sampled frequencies, and the
  exact entropy (by enumeration) against the Monte-Carlo mean NLL of samples."""
  src = synthetic.make_source(seed=3, n_states=6, n_symbols=8, symbols_per_state=4)
  V = src.vocab_size
  pairs = np.array([[0, a, b] for a in range(V) for b in range(V)])
  logp = src.token_logprobs(pairs).sum(1)
  p = np.exp(logp)
  np.testing.assert_allclose(p.sum(), 1.0, atol=1e-12)
  rows = src.sample(np.random.default_rng(0), 200_000, 3)
  freq = np.bincount(rows[:, 1] * V + rows[:, 2], minlength=V * V) / len(rows)
  se = np.sqrt(p * (1 - p) / len(rows))
  assert np.all(np.abs(freq - p) < 5 * se + 1e-6)
  exact_entropy = -(p[p > 0] * logp[p > 0]).sum()
  mc = -src.token_logprobs(rows[:20_000]).sum(1).mean()
  assert abs(mc - exact_entropy) < 0.03, (mc, exact_entropy)


def test_default_source_is_a_real_modelling_task():
  src = synthetic.make_source()
  h = src.entropy_rate(128)
  uni = src.unigram_nll(128)
  print(f'entropy rate {h:.3f} nats/token, unigram NLL {uni:.3f}')
  assert h >= 1.5
  assert uni >= 1.25 * h
  assert np.all(src.emit_SxV[:, src.reserved_id] == 0)


def test_sampling_is_seeded_and_starts_with_eos():
  src = synthetic.make_source()
  a = src.sample(np.random.default_rng(5), 4, 50)
  b = src.sample(np.random.default_rng(5), 4, 50)
  np.testing.assert_array_equal(a, b)
  assert np.all(a[:, 0] == synthetic.EOS_ID)
  assert (a == synthetic.EOS_ID).sum() > 4  # sentences end inside rows


def test_every_row_starting_with_eos_has_finite_likelihood():
  """The emission floor covers EOS and every symbol: any id sequence (reserved id aside)
  that starts with EOS -- EOS EOS included -- costs at most -log((1 - p_end) floor/(n+1))
  per token (the next state is a non-end one with probability >= 1 - p_end)."""
  src = synthetic.make_source()
  rng = np.random.default_rng(0)
  rows = rng.integers(0, src.reserved_id, (64, 40))
  rows[:, 0] = synthetic.EOS_ID
  rows[:, 5:7] = synthetic.EOS_ID  # EOS EOS
  lp = src.token_logprobs(rows)
  assert np.all(np.isfinite(lp))
  assert lp.min() >= np.log((1 - 1 / 24) * 0.001 / 129) - 1e-9


def test_bad_parameters_name_the_field():
  with pytest.raises(ValueError, match='data.synthetic.branching'):
    synthetic.make_source(n_states=2, branching=3)
  with pytest.raises(ValueError, match='symbols_per_state'):
    synthetic.make_source(n_symbols=4, symbols_per_state=5)
