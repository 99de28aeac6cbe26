"""One decoding step, shared by the offline engine and the serving slot engine.

A step writes each row's inputs into its KV cache and chooses its next tokens:
- AR (K = 1): the last emitted token is fed; the next one is greedy (temperature 0) or
  drawn from the tempered, top-k- then top-p-filtered softmax by one-pass Gumbel-max
  ('categorical') or by the inverse CDF of a per-token u ('inverse_cdf');
- PFLM (K tokens per step): the K tokens emitted last step and K hint embeddings are fed
  (2K queries); token i is read out from hint i's logits by the model's readout: their
  argmax, or the inverse CDF of the hint's u under their softmax.
Penalties come first: a frequency penalty subtracts lambda * count(v) and a presence
penalty mu * [count(v) > 0] from the logits (a PFLM's token by token within its block,
counting the block's earlier tokens); while a row has emitted fewer than its min_new
tokens, its banned ids (its EOS and stop ids) get -inf. A step can also return the
log-probabilities of its tokens and the top-N alternatives (Logprobs): under the
distribution the token was drawn from (AR: penalised, tempered, filtered; greedy rows: the
penalised softmax at temperature 1; PFLM: each hint's penalised softmax, which the token
is read out from).

kforcing_jax.decoding.engine runs the step in a lax.while_loop with every row at the same
cache slot (one cache write for the batch, cache phases, the Pallas kernel);
kforcing_jax.serving.engine runs it with each row at its own slot. A row's inputs, mask,
RoPE positions (slot - left padding, from a table made once per call) and noise are the
same in both, so its tokens are too.

The sampling settings are per-row traced values (Settings): a new temperature, top_k,
top_p, penalty or (among the compiled `samplers`) sampler compiles nothing. What a batch
does not use costs nothing either: Gates says which paths any row needs (computed once per
call), and lax.cond skips the others.

The slot arithmetic of both engines is SlotLayout's.
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import errors
from kforcing_jax.models import attention as attn_lib
from kforcing_jax.models import quantize
from kforcing_jax.models import sampling
from kforcing_jax.models import transformer as model_lib

SAMPLERS = ('categorical', 'inverse_cdf')  # AR samplers; Settings.sampler_B indexes this
# Cache lengths are multiples of this: XLA:GPU pads bf16 dot dimensions to multiples of 8
# for the tensor cores and otherwise adds pad fusions around every step's attention
# products. The extra slots are masked like unwritten ones.
CACHE_ALIGN = 8


class DecodeError(errors.UserError):
  pass


def align(n: int) -> int:
  return -(-n // CACHE_ALIGN) * CACHE_ALIGN


@dataclasses.dataclass(frozen=True)
class SlotLayout:
  """Where a step's inputs go in the cache, for K tokens per step (AR: K = 1, no hints).

  Prompts are left-padded to at least feed + 1 tokens; all but the last `feed` are
  prefilled, so the first step writes at first_slot and each step K slots further."""
  K: int = 1
  pflm: bool = False

  @property
  def feed(self) -> int:
    """Tokens fed per step: the K emitted last step (PFLM) or the last one (AR)."""
    return self.K if self.pflm else 1

  @property
  def queries(self) -> int:
    """Inputs per step: the fed tokens plus, for a PFLM, K hints."""
    return 2 * self.K if self.pflm else 1

  def steps(self, new_tokens: int) -> int:
    return -(-new_tokens // self.K)

  def padded_len(self, prompt_len: int) -> int:
    return max(prompt_len, self.feed + 1)

  def first_slot(self, prompt_len: int) -> int:
    """Cache slot of the first step's first input."""
    return self.padded_len(prompt_len) - self.feed

  def cache_len(self, prompt_len: int, new_tokens: int) -> int:
    # prompt + all emitted blocks + the last step's hints, rounded up (see CACHE_ALIGN)
    return align(self.padded_len(prompt_len) + self.steps(new_tokens) * self.K +
                 (self.K if self.pflm else 0))

  def longest_cache(self, max_len: int) -> int:
    """The cache length that holds every request with prompt + new tokens <= max_len (a
    1-token prompt is padded the most)."""
    return self.cache_len(1, max_len - 1)

  def steps_that_fit(self, prompt_len: int, cache_len: int) -> int:
    """How many steps write inside a cache of cache_len slots."""
    return (cache_len - self.first_slot(prompt_len) - self.queries) // self.K + 1


def check_length(prompt_len: int, new_tokens: int, max_len: int,
                 field: str = 'max_new_tokens') -> None:
  """The one length rule of both engines: prompt + new tokens <= the model's max_len."""
  if new_tokens < 1:
    raise DecodeError(f'{field}={new_tokens}: must be >= 1')
  if prompt_len < 1:
    raise DecodeError('prompt: give at least one token (e.g. the EOS/BOS id)')
  if prompt_len + new_tokens > max_len:
    raise DecodeError(f'prompt of {prompt_len} tokens + {field}={new_tokens} exceeds the '
                      f'model\'s maximum length {max_len} (allowed: prompt + {field} <= '
                      f'{max_len})')


def check_sampling(temperature: float, top_k: int, top_p: float, freq_penalty: float,
                   sampler: str, presence_penalty: float = 0.0, min_new_tokens: int = 0
                   ) -> None:
  if sampler not in SAMPLERS:
    raise DecodeError(f'sampler={sampler!r}: allowed: {", ".join(SAMPLERS)}')
  if not (np.isfinite(temperature) and temperature >= 0 and 0.0 < top_p <= 1.0 and
          top_k >= 0):
    raise DecodeError(f'temperature={temperature}, top_k={top_k}, top_p={top_p}: allowed: '
                      'temperature >= 0, top_k >= 0, 0 < top_p <= 1')
  for name, value in (('freq_penalty', freq_penalty), ('presence_penalty', presence_penalty)):
    if not np.isfinite(value):
      raise DecodeError(f'{name}={value}: must be a finite number')
  if not 0 <= min_new_tokens <= np.iinfo(np.int32).max:
    raise DecodeError(f'min_new_tokens={min_new_tokens}: allowed 0..{np.iinfo(np.int32).max}')


@flax.struct.dataclass
class Settings:
  """Per-row sampling settings, traced (changing them compiles nothing)."""
  temperature_B: jax.Array  # float32; 0 = greedy (AR; applied before top_k / top_p)
  top_k_B: jax.Array  # int32; 0 = off (AR)
  top_p_B: jax.Array  # float32; 1 = off (AR): the nucleus of the tempered distribution
  penalty_B: jax.Array  # float32 frequency penalty lambda; 0 = off
  sampler_B: jax.Array  # int32 index into SAMPLERS (AR)
  presence_B: jax.Array  # float32 presence penalty mu; 0 = off
  min_new_B: jax.Array  # int32: banned_BxV ids get -inf until this many tokens are out
  banned_BxV: jax.Array  # bool: the ids min_new_B holds back (EOS, stop ids)


def settings(batch: int, vocab_size: int, *, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, freq_penalty: float = 0.0, presence_penalty: float = 0.0,
             min_new_tokens: int = 0, banned=(), sampler: str = 'categorical') -> Settings:
  """The same settings for `batch` rows, as host arrays (top_k >= vocab_size keeps every
  token; banned: the ids held back until min_new_tokens tokens are out)."""
  full = lambda value, dtype: np.full((batch,), value, dtype)
  banned_BxV = np.zeros((batch, vocab_size), bool)
  banned_BxV[:, [int(t) for t in banned if 0 <= t < vocab_size]] = True
  return Settings(temperature_B=full(temperature, np.float32),
                  top_k_B=full(min(int(top_k), vocab_size), np.int32),
                  top_p_B=full(top_p, np.float32), penalty_B=full(freq_penalty, np.float32),
                  sampler_B=full(SAMPLERS.index(sampler), np.int32),
                  presence_B=full(presence_penalty, np.float32),
                  min_new_B=full(min_new_tokens if len(banned) else 0, np.int32),
                  banned_BxV=banned_BxV)


@flax.struct.dataclass
class Gates:
  """Which paths some row needs ([] bool each): the others are skipped."""
  penalty: jax.Array
  greedy: jax.Array
  sampled: jax.Array
  categorical: jax.Array
  inverse_cdf: jax.Array
  top_k: jax.Array
  top_p: jax.Array

  @classmethod
  def of(cls, s: Settings) -> Gates:
    sampled_B = s.temperature_B != 0.0
    # penalty: some row's logits are adjusted before choosing (penalties, a min_new ban)
    return cls(penalty=jnp.any((s.penalty_B != 0.0) | (s.presence_B != 0.0) |
                               (s.min_new_B > 0)),
               greedy=jnp.any(~sampled_B),
               sampled=jnp.any(sampled_B),
               categorical=jnp.any(sampled_B & (s.sampler_B == 0)),
               inverse_cdf=jnp.any(sampled_B & (s.sampler_B == 1)),
               top_k=jnp.any(sampled_B & (s.top_k_B > 0)),
               top_p=jnp.any(sampled_B & (s.top_p_B < 1.0)))


def rope_table(arch, length: int):
  """RoPE (cos, sin) of positions 0..length-1, each [1, length, head_dim / 2]: a step
  gathers its rows' positions instead of recomputing them (XLA would fuse the cos/sin
  into every consumer)."""
  return model_lib.arch_rope_cos_sin(arch, jnp.arange(length)[None])


def cache_length(cache) -> int:
  return cache['v'][0].shape[2]


def attention_mask(slot, n_queries: int, cache_len: int, pads_B):
  """[B, Q, S] bool: input q, at cache slot slot + q (slot: [] or one per row [B]), sees
  the slots from its row's left padding up to its own."""
  q_slots = jnp.asarray(slot)[..., None] + jnp.arange(n_queries)
  q_slots = q_slots if q_slots.ndim == 2 else q_slots[None]
  k_slots = jnp.arange(cache_len)
  return ((k_slots[None, None, :] <= q_slots[:, :, None]) &
          (k_slots[None, None, :] >= pads_B[:, None, None]))


def forward(model, params, tokens_BxT, cache, slot, pads_B, rope, *, hints_BxHxD=None,
            logits_from: int = 0):
  """[tokens | hints] written at cache slots slot.. of each row (slot: [] for every row, or
  [B]); returns (logits [B, T + H - logits_from, V], cache)."""
  B = tokens_BxT.shape[0]
  Q = tokens_BxT.shape[1] + (0 if hints_BxHxD is None else hints_BxHxD.shape[1])
  slot = jnp.asarray(slot, jnp.int32)
  q_slots = jnp.broadcast_to(slot[..., None] + jnp.arange(Q), (B, Q))
  pos_BxQ = jnp.maximum(q_slots - pads_B[:, None], 0)
  mask = attention_mask(slot, Q, cache_length(cache), pads_B)
  exe = model.exe
  if slot.ndim == 0:
    attend = attn_lib.Cached(slot, mask, pads_B, exe.decode_attention, exe.cache_products)
  else:
    attend = attn_lib.SlotCached(slot, mask, pads_B, exe.decode_attention, exe.cache_products)
  cos, sin = rope
  return model.apply(quantize.variables(params), tokens_BxT, cache, attend, (cos[0][pos_BxQ],
                                                                      sin[0][pos_BxQ]),
                     hints_BxHxD=hints_BxHxD, logits_from=logits_from,
                     method=model_lib.Transformer.decode_step)


def prefill(model, params, tokens_BxT, pads_B, cache_len: int, rope):
  """The KV cache (cache_len slots) of tokens_BxT written at slots 0..T-1."""
  cache = model_lib.init_cache(model.arch, model.exe, tokens_BxT.shape[0], cache_len)
  _, cache = forward(model, params, tokens_BxT, cache, 0, pads_B, rope,
                     logits_from=tokens_BxT.shape[1])
  return cache


def _gated(pred, fn, shape):
  """fn() where pred, else int32 zeros of `shape` (fn is not run)."""
  return jax.lax.cond(pred, fn, lambda: jnp.zeros(shape, jnp.int32))


def _penalized(logits_BxV, counts_BxV, s: Settings):
  return (logits_BxV - s.penalty_B[:, None] * counts_BxV.astype(jnp.float32) -
          s.presence_B[:, None] * (counts_BxV > 0).astype(jnp.float32))


def _banned(logits_BxV, s: Settings, n_out_B):
  """-inf at each row's banned ids while it has emitted fewer than min_new tokens
  (n_out_B: tokens emitted before this one)."""
  hold_B = n_out_B < s.min_new_B
  return jnp.where(hold_B[:, None] & s.banned_BxV, -jnp.inf, logits_BxV)


@flax.struct.dataclass
class Logprobs:
  """Per emitted token: its log-probability and the top-N (ids, log-probabilities)."""
  token_BxK: jax.Array  # float32
  top_ids_BxKxN: jax.Array  # int32
  top_BxKxN: jax.Array  # float32


def logprobs_of(logits_BxKxV, tokens_BxK, n_top: int) -> Logprobs:
  lp = jax.nn.log_softmax(logits_BxKxV.astype(jnp.float32), axis=-1)
  top, ids = jax.lax.top_k(lp, n_top)
  return Logprobs(jnp.take_along_axis(lp, tokens_BxK[..., None], -1)[..., 0],
                  ids.astype(jnp.int32), top)


def _gated_logprobs(want, fn, B: int, K: int, n_top: int) -> Logprobs:
  """fn() where want (a [] bool, or True), else zeros: only steps with a request that
  asked for log-probabilities compute them."""
  if want is True:
    return fn()
  return jax.lax.cond(want, fn, lambda: Logprobs(
      jnp.zeros((B, K), jnp.float32), jnp.zeros((B, K, n_top), jnp.int32),
      jnp.zeros((B, K, n_top), jnp.float32)))


def pflm_tokens(logits_BxKxV, counts_BxV, s: Settings, g: Gates, n_out_B=0,
                logprobs: int = 0, want_logprobs=True, readout: str = 'argmax', u_BxK=None):
  """([B, K] int32 tokens, Logprobs or None): each hint's token read out (readout, from
  u_BxK where it is 'inverse_cdf') after the penalties of the counts so far (the block's
  earlier tokens included) and the min_new ban; logprobs: top-N of each hint's
  distribution (0: none; zeros unless want_logprobs)."""
  B, K, V = logits_BxKxV.shape
  n_out_B = jnp.broadcast_to(jnp.asarray(n_out_B, jnp.int32), (B,))
  if readout == 'inverse_cdf' and u_BxK is None:
    raise ValueError('the inverse-CDF readout needs the hints\' noise (u_BxK)')
  read = lambda l, i: sampling.pflm_readout(readout, l, None if u_BxK is None else u_BxK[:, i])

  def adjusted():
    vocab = jnp.arange(V, dtype=jnp.int32)
    counts, toks, rows = counts_BxV, [], []
    for i in range(K):
      l = _banned(_penalized(logits_BxKxV[:, i], counts, s), s, n_out_B + i)
      y = read(l, i)
      counts = counts + (vocab[None, :] == y[:, None])  # fuses: no copy of the counts
      toks.append(y)
      rows.append(l)
    return jnp.stack(toks, axis=1), jnp.stack(rows, axis=1)

  def plain():
    return sampling.pflm_readout(readout, logits_BxKxV, u_BxK)

  if not logprobs:
    return jax.lax.cond(g.penalty, lambda: adjusted()[0], plain), None

  def with_logprobs(choose):  # each branch its own: no [B, K, V] leaves the cond
    toks, logits = choose()
    return toks, _gated_logprobs(want_logprobs, lambda: logprobs_of(logits, toks, logprobs),
                                 B, K, logprobs)
  return jax.lax.cond(g.penalty, lambda: with_logprobs(adjusted), lambda: with_logprobs(
      lambda: (plain(), logits_BxKxV)))


def ar_tokens(logits_BxV, counts_BxV, s: Settings, g: Gates, step_keys, step_u,
              samplers: tuple[str, ...] = SAMPLERS, n_out_B=0, logprobs: int = 0,
              want_logprobs=True):
  """([B] int32 AR tokens, Logprobs [B, 1, ...] or None). step_keys() / step_u(): the
  rows' keys (categorical) and u (inverse_cdf) of this step, made only when some row needs
  them. samplers: the ones rows may use (static: the others are not compiled). n_out_B:
  tokens each row emitted before this one (the min_new ban); logprobs: top-N (0: none;
  zeros unless want_logprobs)."""
  B = logits_BxV.shape[0]
  greedy_B = s.temperature_B == 0.0
  n_out_B = jnp.broadcast_to(jnp.asarray(n_out_B, jnp.int32), (B,))
  penalized = jax.lax.cond(
      g.penalty, lambda: _banned(_penalized(logits_BxV, counts_BxV, s), s, n_out_B),
      lambda: logits_BxV)

  def greedy():
    return sampling.first_argmax(penalized)

  def tempered_filtered():
    t = jnp.where(greedy_B, 1.0, s.temperature_B)[:, None]
    l = penalized / t
    # one copy of each filter and sampler keeps the loop's compile small; a filter no row
    # uses passes the logits through
    l = jax.lax.cond(g.top_k, lambda: sampling.filter_logits(l, top_k_B=s.top_k_B),
                     lambda: l)
    return jax.lax.cond(g.top_p, lambda: sampling.filter_logits(l, top_p_B=s.top_p_B),
                        lambda: l)

  def sampled():
    l = tempered_filtered()
    drawn = {}
    if 'categorical' in samplers:
      drawn['categorical'] = _gated(g.categorical, lambda: jax.vmap(jax.random.categorical)(
          step_keys(), l).astype(jnp.int32), (B,))
    if 'inverse_cdf' in samplers:
      drawn['inverse_cdf'] = _gated(g.inverse_cdf, lambda: sampling.inverse_cdf(l, step_u()),
                                    (B,))
    if len(drawn) == 1:
      return next(iter(drawn.values()))
    return jnp.where(s.sampler_B == SAMPLERS.index('inverse_cdf'), drawn['inverse_cdf'],
                     drawn['categorical'])

  toks = jnp.where(greedy_B, _gated(g.greedy, greedy, (B,)), _gated(g.sampled, sampled, (B,)))
  if not logprobs:
    return toks, None

  def drawn_logprobs():  # of the distribution each row drew from (its filters recomputed)
    drawn_from = jnp.where(greedy_B[:, None], penalized,
                           jax.lax.cond(g.sampled, tempered_filtered, lambda: penalized))
    return logprobs_of(drawn_from[:, None], toks[:, None], logprobs)
  return toks, _gated_logprobs(want_logprobs, drawn_logprobs, B, 1, logprobs)


def decode_step(model, params, tokens_BxF, cache, slot, pads_B, rope, s: Settings, g: Gates,
                counts_BxV, *, hints_BxKxD=None, step_keys=None, step_u=None,
                samplers: tuple[str, ...] = SAMPLERS, n_out_B=0, logprobs: int = 0,
                want_logprobs=True):
  """One step: (tokens [B, K] int32, cache, counts with them added, Logprobs or None).
  slot: [] (every row at the same slot) or [B]; hints_BxKxD: a PFLM's hint embeddings of
  this step; step_keys / step_u / samplers: see ar_tokens (a PFLM's step_u: [B, K], the
  hints' noise, read by the inverse-CDF readout only); n_out_B: tokens each row
  emitted before this step ([] or [B]); logprobs: top-N to return (static; 0: none),
  computed only when want_logprobs ([] bool, or True) -- otherwise zeros."""
  feed = tokens_BxF.shape[1]
  pflm = hints_BxKxD is not None
  logits, cache = forward(model, params, tokens_BxF, cache, slot, pads_B, rope,
                          hints_BxHxD=hints_BxKxD, logits_from=feed if pflm else 0)
  if pflm:
    readout = model.arch.readout
    new_BxK, lp = pflm_tokens(logits, counts_BxV, s, g, n_out_B, logprobs, want_logprobs,
                              readout, step_u() if readout == 'inverse_cdf' else None)
  else:
    toks, lp = ar_tokens(logits[:, 0], counts_BxV, s, g, step_keys, step_u, samplers,
                         n_out_B, logprobs, want_logprobs)
    new_BxK = toks[:, None]
  rows = jnp.arange(new_BxK.shape[0])[:, None]
  return new_BxK, cache, counts_BxV.at[rows, new_BxK].add(1), lp
