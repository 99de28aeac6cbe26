"""The built-in synthetic source: a seeded hidden Markov model with an exact likelihood.

Hidden states 0..S-1 emit symbols (ids 1..n_symbols) from Zipf-like distributions over a
state-specific support (plus a small floor on EOS and every symbol, so that every row that
starts with EOS has a finite exact likelihood) and move to a few successor states (sparse
transitions). State S
is the sentence end: it emits EOS (id 0) and restarts the chain from the initial
distribution, so sentences are separated by EOS. Every row starts in the end state, i.e.
with EOS, so the first token carries no information. Id n_symbols + 1 is reserved and
never emitted (docs/design.md section 2.1).
"""
from __future__ import annotations

import dataclasses

import numpy as np

EOS_ID = 0


@dataclasses.dataclass(frozen=True)
class HMMSource:
  init_S: np.ndarray  # start distribution over all S+1 states (0 on the end state).
  trans_SxS: np.ndarray  # row-stochastic, incl. the end state (last index).
  emit_SxV: np.ndarray  # row-stochastic emissions over the model vocabulary.

  @property
  def n_states(self) -> int:
    return self.trans_SxS.shape[0]

  @property
  def vocab_size(self) -> int:
    return self.emit_SxV.shape[1]

  @property
  def reserved_id(self) -> int:
    return self.vocab_size - 1

  # --- sampling -------------------------------------------------------------------
  def sample(self, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """[batch, length] int32 token rows, each starting with EOS."""
    trans_cdf = np.cumsum(self.trans_SxS, axis=1)
    emit_cdf = np.cumsum(self.emit_SxV, axis=1)
    end = self.n_states - 1
    state_B = np.full(batch, end)
    out = np.empty((batch, length), np.int32)
    u_trans = rng.random((length, batch))
    u_emit = rng.random((length, batch))
    for t in range(length):
      if t > 0:
        state_B = _inverse_cdf(trans_cdf[state_B], u_trans[t])
      out[:, t] = _inverse_cdf(emit_cdf[state_B], u_emit[t])
    return out

  # --- exact likelihood ---------------------------------------------------------------
  def token_logprobs(self, tokens_BxT: np.ndarray) -> np.ndarray:
    """log p(x_t | x_<t) for every t >= 1 ([B, T-1], float64), by the forward algorithm.

    The recursion is run on normalised beliefs; log p(x_t | x_<t) is the log of each
    step's normaliser, which is exact (the scaled forward algorithm) and never
    underflows. Position 0 is conditioned on the start (the end state emits EOS).
    """
    tokens_BxT = np.asarray(tokens_BxT)
    B, T = tokens_BxT.shape
    log_trans = self.trans_SxS.astype(np.float64)
    emit = self.emit_SxV.astype(np.float64)
    belief_BxS = np.zeros((B, self.n_states))
    belief_BxS[:, -1] = 1.0  # rows start in the end state
    # condition on the first token (EOS under the end state; otherwise renormalise)
    first = emit[:, tokens_BxT[:, 0]].T * belief_BxS
    belief_BxS = first / np.maximum(first.sum(1, keepdims=True), 1e-300)
    out = np.empty((B, T - 1))
    for t in range(1, T):
      pred_BxS = belief_BxS @ log_trans
      joint_BxS = pred_BxS * emit[:, tokens_BxT[:, t]].T
      norm_B = joint_BxS.sum(1)
      out[:, t - 1] = np.log(np.maximum(norm_B, 1e-300))
      belief_BxS = joint_BxS / np.maximum(norm_B, 1e-300)[:, None]
    return out

  def next_token_probs(self, tokens_BxT: np.ndarray) -> np.ndarray:
    """p(x_T | x_<=T-1) over the vocabulary, [B, V] float64 (the Bayes-optimal model)."""
    tokens_BxT = np.asarray(tokens_BxT)
    B, T = tokens_BxT.shape
    emit = self.emit_SxV.astype(np.float64)
    belief = np.zeros((B, self.n_states))
    belief[:, -1] = 1.0
    for t in range(T):
      if t > 0:
        belief = belief @ self.trans_SxS
      belief = belief * emit[:, tokens_BxT[:, t]].T
      belief /= np.maximum(belief.sum(1, keepdims=True), 1e-300)
    return (belief @ self.trans_SxS) @ emit

  def entropy_rate(self, seq_len: int, num_rows: int = 512, seed: int = 0) -> float:
    """Expected -log p(x_t | x_<t) per token over positions 1..seq_len-1 (nats).

    Monte-Carlo over rows, exact within each row: the number a perfect model reaches on
    this task's validation data (standard error ~ 0.01 nats at the default sizes).
    """
    rows = self.sample(np.random.default_rng([seed, 7777]), num_rows, seq_len)
    return float(-self.token_logprobs(rows).mean())

  def unigram_nll(self, seq_len: int, num_rows: int = 512, seed: int = 0) -> float:
    """Cross-entropy of the source's own unigram frequencies on held-out rows (nats)."""
    rng = np.random.default_rng([seed, 8888])
    fit = self.sample(rng, num_rows, seq_len)[:, 1:]
    test = self.sample(rng, num_rows, seq_len)[:, 1:]
    counts = np.bincount(fit.ravel(), minlength=self.vocab_size) + 0.5
    logp = np.log(counts / counts.sum())
    return float(-logp[test].mean())


def _inverse_cdf(cdf_BxN: np.ndarray, u_B: np.ndarray) -> np.ndarray:
  idx = (cdf_BxN < u_B[:, None] * cdf_BxN[:, -1:]).sum(1)
  return np.minimum(idx, cdf_BxN.shape[1] - 1)


def make_source(seed: int = 1234, n_states: int = 32, n_symbols: int = 128,
                branching: int = 2, symbols_per_state: int = 6,
                zipf_exponent: float = 1.5, mean_sentence_len: float = 24.0,
                emission_floor: float = 0.001) -> HMMSource:
  """Builds the seeded source. Vocabulary: EOS=0, symbols 1..n_symbols, reserved last."""
  for name, value, low in (('n_states', n_states, 1), ('n_symbols', n_symbols, 2),
                           ('branching', branching, 1),
                           ('symbols_per_state', symbols_per_state, 1)):
    if value < low:
      raise ValueError(f'data.synthetic.{name} must be >= {low}, got {value}')
  if branching > n_states:
    raise ValueError(f'data.synthetic.branching ({branching}) must be <= n_states ({n_states})')
  if symbols_per_state > n_symbols:
    raise ValueError(f'data.synthetic.symbols_per_state ({symbols_per_state}) must be <= '
                     f'n_symbols ({n_symbols})')
  if not 0.0 <= emission_floor < 1.0:
    raise ValueError(f'data.synthetic.emission_floor must be in [0, 1), got {emission_floor}')
  if mean_sentence_len <= 1:
    raise ValueError(f'data.synthetic.mean_sentence_len must be > 1, got {mean_sentence_len}')
  rng = np.random.default_rng(seed)
  S = n_states + 1  # + end state
  V = n_symbols + 2  # EOS + symbols + reserved
  p_end = 1.0 / mean_sentence_len
  trans = np.zeros((S, S))
  for s in range(n_states):
    succ = rng.choice(n_states, size=branching, replace=False)
    trans[s, succ] = rng.dirichlet(np.ones(branching)) * (1 - p_end)
    trans[s, -1] = p_end
  init = np.zeros(S)
  init[:n_states] = rng.dirichlet(np.ones(n_states))
  trans[-1] = init
  emit = np.zeros((S, V))
  zipf = 1.0 / np.arange(1, symbols_per_state + 1) ** zipf_exponent
  zipf /= zipf.sum()
  for s in range(n_states):
    support = 1 + rng.choice(n_symbols, size=symbols_per_state, replace=False)
    emit[s, support] = (1 - emission_floor) * zipf
    # every id but the reserved one stays possible (EOS too: without it EOS EOS had
    # probability 0, and one such token in a model's sample cost ~690 nats of exact NLL)
    emit[s, :n_symbols + 1] += emission_floor / (n_symbols + 1)
  emit[-1, EOS_ID] = 1.0
  return HMMSource(init_S=init, trans_SxS=trans, emit_SxV=emit)


def source_from_config(cfg) -> HMMSource:
  s = cfg.data.synthetic
  return make_source(seed=s.seed, n_states=s.n_states, n_symbols=s.n_symbols,
                     branching=s.branching, symbols_per_state=s.symbols_per_state,
                     zipf_exponent=s.zipf_exponent, mean_sentence_len=s.mean_sentence_len,
                     emission_floor=s.emission_floor)
