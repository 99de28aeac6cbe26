"""One jitted, KV-cached decoding engine for the AR teacher and PFLM students (design.md 4).

AR (K = 1, no hints): each step feeds the last emitted token and samples the next one by
the inverse CDF of the tempered, top-k/top-p-filtered softmax at noise u (so AR sampling
is the same push-forward map the students are distilled from).
PFLM (K tokens per step): each step feeds [K tokens emitted last step | K fresh hints]
(2K queries) with causal attention over the cache; hint i's argmax (after an optional
frequency penalty applied token by token within the block) is token i. Hint K/V land in
the slots the next step's tokens overwrite.

RoPE angles come from a table made once per generation (see model.Transformer's rope_cs).
With DecodeSpec.cache_phases > 1 the loop is a chain of loops over a growing cache, each
reading only its prefix of slots (the attention cost then follows the filled length).
A model with decode_attention='pallas' reads only the filled slots in one loop instead
(kforcing_jax.flash_decode; GPU).

Prompts are left-padded to one length P; row b's RoPE positions are slot - pad_b and its
padding slots are masked, so a row decodes the same alone or in any batch. Noise for
token j of the row with seed r is drawn from fold_in(fold_in(seed, r), j): a sample does
not depend on batch size, batch position or K.
"""
from __future__ import annotations

from kforcing_jax import errors

import dataclasses
import functools
import threading
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import flash_decode
from kforcing_jax import model as model_lib
from kforcing_jax import targets as targets_lib


class DecodeError(errors.UserError):
  pass


# Cache lengths are multiples of this: XLA:GPU pads bf16 dot dimensions to multiples of 8
# for the tensor cores, and with the PFLM's natural 1030 slots (OWT shape) it added pad
# fusions around every step's attention products (H100: the PFLM step 3-4% faster at
# batch 64 and 256 with 1032 slots). The few extra slots are masked like unwritten ones.
CACHE_ALIGN = 8


def _align(n: int) -> int:
  return -(-n // CACHE_ALIGN) * CACHE_ALIGN


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
  """Static decoding settings (a new value compiles a new loop)."""
  K: int = 1  # tokens per step; 1 with pflm=False is AR decoding
  pflm: bool = False
  max_new_tokens: int = 32
  temperature: float = 1.0  # AR only; 0 = greedy
  top_k: int = 0  # AR only; 0 = off
  top_p: float = 1.0  # AR only; 1 = off
  freq_penalty: float = 0.0  # PFLM: lambda * count(v) subtracted token by token
  eos_id: int = -1  # -1: never stop early
  pad_id: int = 0  # written after EOS
  tau: float = 1.0  # PFLM temperature input of the noise encoder
  # > 1: the loop runs in this many phases over a cache that grows between them (zero
  # padded), so attention reads only about the filled part instead of the whole cache.
  # Same tokens; costs a copy of the cache per phase and up to ~2x its memory at the switch.
  cache_phases: int = 1

  @property
  def feed(self) -> int:
    """Tokens fed per step: the K emitted last step (PFLM) or the last one (AR)."""
    return self.K if self.pflm else 1

  @property
  def queries(self) -> int:
    """Inputs per step: the fed tokens plus, for a PFLM, K hints."""
    return 2 * self.K if self.pflm else 1

  @property
  def n_steps(self) -> int:
    return -(-self.max_new_tokens // self.K)

  def first_slot(self, prompt_len: int) -> int:
    """Cache slot of the first step's first input (prompts are left-padded to at least
    feed + 1 tokens; all but the last `feed` are prefilled)."""
    return max(prompt_len, self.feed + 1) - self.feed

  def cache_len(self, prompt_len: int) -> int:
    # prompt + all emitted blocks + the last step's hints, rounded up (see CACHE_ALIGN)
    return _align(max(prompt_len, self.feed + 1) + self.n_steps * self.K +
                  (self.K if self.pflm else 0))

  def phase_lengths(self, prompt_len: int) -> list[int]:
    """Cache length of each phase: cache_phases equal spans from the slots the first step
    writes up to, to cache_len(prompt_len), each rounded up to a multiple of CACHE_ALIGN."""
    first_end = self.first_slot(prompt_len) + self.queries
    cache_len = self.cache_len(prompt_len)
    n = max(1, self.cache_phases)
    return sorted({min(cache_len, _align(first_end + -(-(cache_len - first_end) * j // n)))
                   for j in range(1, n + 1)})

  def mean_cache_read(self, prompt_len: int, filled_only: bool = False) -> float:
    """Mean cache slots each decoding step's attention reads (no early EOS, no padding): the
    whole cache with one phase, the current phase's length with several; with filled_only
    (decode_attention='pallas') the slots written before the step plus the step's own."""
    if filled_only:
      return self.first_slot(prompt_len) + self.K * (self.n_steps - 1) / 2 + self.queries
    slot = self.first_slot(prompt_len)
    bounds, phase, total = self.phase_lengths(prompt_len), 0, 0
    for _ in range(self.n_steps):
      while slot + self.queries > bounds[phase]:
        phase += 1
      total += bounds[phase]
      slot += self.K
    return total / self.n_steps


@flax.struct.dataclass
class LoopState:
  step: jax.Array  # [] int32: decoding steps done
  # {'k': L x [B, n_heads, head_dim, S], 'v': L x [B, n_heads, S, head_dim]}, S = the
  # current phase's cache length (the full cache_len with one phase)
  cache: Any
  slot: jax.Array  # [] int32: first cache slot the next step writes
  last_BxF: jax.Array  # [B, F] int32: tokens fed next step (F = K for PFLM, 1 for AR)
  out_BxN: jax.Array  # [B, n_steps * K] int32: generated tokens (pad after EOS)
  done_B: jax.Array  # [B] bool: row has emitted EOS
  counts_BxV: jax.Array  # [B, V] int32 generated-token counts ([B, 1] when no penalty)


def left_pad(prompts: list[list[int]], pad_id: int, min_len: int = 1):
  """[B, P] int32 left-padded prompts and [B] pad counts."""
  if not prompts:
    raise DecodeError('no prompts given')
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise DecodeError(f'prompt {i} is empty: give at least one token (e.g. the EOS/BOS id)')
  P = max(min_len, max(len(p) for p in prompts))
  arr = np.full((len(prompts), P), pad_id, np.int32)
  pads = np.zeros(len(prompts), np.int32)
  for i, p in enumerate(prompts):
    arr[i, P - len(p):] = p
    pads[i] = P - len(p)
  return arr, pads


def noise_for_tokens(seed_key, row_seeds_B, token_idx_N):
  """u [B, N] for token indices token_idx_N of each row: fold_in(fold_in(seed, row), j)."""
  def row(r):
    rk = jax.random.fold_in(seed_key, r)
    return jax.vmap(lambda j: targets_lib.uniform_noise(jax.random.fold_in(rk, j), ()))(
        token_idx_N)
  return jax.vmap(row)(row_seeds_B)


def first_argmax(logits_BxV):  # [..., V] -> [...] int32
  """jnp.argmax (first index of the maximum) as a max and a masked min: two plain
  reductions, ~3x faster on CPU than XLA's (value, index) argmax reduction."""
  V = logits_BxV.shape[-1]
  top = jnp.max(logits_BxV, axis=-1, keepdims=True)
  return jnp.min(jnp.where(logits_BxV == top, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


def filter_logits(logits_BxV, top_k: int, top_p: float):
  if top_k > 0:
    kth = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth, model_lib.NEG_INF, logits_BxV)
  if top_p < 1.0:
    sorted_l = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_l, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    # keep the smallest set whose mass reaches top_p (always at least the top token)
    cutoff_idx = jnp.sum(cum - probs < top_p, axis=-1, keepdims=True) - 1
    cutoff = jnp.take_along_axis(sorted_l, cutoff_idx, axis=-1)
    logits_BxV = jnp.where(logits_BxV < cutoff, model_lib.NEG_INF, logits_BxV)
  return logits_BxV


def _mask(slot, Q, S, pads_B):
  q_slots = slot + jnp.arange(Q)
  k_slots = jnp.arange(S)
  return (k_slots[None, None, :] <= q_slots[None, :, None]) & \
         (k_slots[None, None, :] >= pads_B[:, None, None])


def cache_lengths(cfg: model_lib.ModelConfig, spec: DecodeSpec, prompt_len: int) -> list[int]:
  """The cache length of each phase: spec.phase_lengths, or with decode_attention='pallas'
  (one phase: the kernel reads only the filled slots anyway) the full length rounded up to
  the kernel's split size."""
  if cfg.decode_attention == 'pallas':
    return [flash_decode.cache_length(spec.cache_len(prompt_len))]
  return spec.phase_lengths(prompt_len)


def _generate(model, spec: DecodeSpec, params, prompt_BxP, pads_B, row_seeds_B, seed_key):
  cfg = model.cfg
  B, P = prompt_BxP.shape
  K = spec.K
  bounds = cache_lengths(cfg, spec, P)
  S = bounds[-1]
  prefill = spec.first_slot(P)  # = P - spec.feed: P >= feed + 1 (left_pad's min_len)
  Q = spec.queries
  cache = model_lib.init_cache(cfg, B, bounds[0])
  if prefill > 0:
    pos = jnp.maximum(jnp.arange(prefill)[None, :] - pads_B[:, None], 0)
    _, cache = model.apply({'params': params}, prompt_BxP[:, :prefill], pos,
                           _mask(0, prefill, bounds[0], pads_B), cache=cache, cache_slot=0,
                           logits_from=prefill, cache_start_B=pads_B)
  V = cfg.vocab_size
  penalize = spec.pflm and spec.freq_penalty != 0.0
  state = LoopState(step=jnp.zeros((), jnp.int32), cache=cache,
                    slot=jnp.asarray(prefill, jnp.int32),
                    last_BxF=prompt_BxP[:, prefill:],
                    out_BxN=jnp.full((B, spec.n_steps * K), spec.pad_id, jnp.int32),
                    done_B=jnp.zeros((B,), bool),
                    counts_BxV=jnp.zeros((B, V if penalize else 1), jnp.int32))
  tau_B = jnp.full((B,), spec.tau, jnp.float32)
  # The noise of the whole generation is drawn (and, for a PFLM, encoded into hint
  # embeddings) before the loop in one batched call: the same values as drawing each
  # step's, without per-step RNG and encoder work on the sequential path.
  n_tokens = spec.n_steps * K
  u_BxN = noise_for_tokens(seed_key, row_seeds_B, jnp.arange(n_tokens))
  if spec.pflm:
    hints_BxNxD = model_lib.encode_noise(cfg, params, u_BxN, tau_B)

  cos_SxF, sin_SxF = model_lib.rope_cos_sin(jnp.arange(S)[None], cfg.head_dim, cfg.rope_base)

  def body(st: LoopState) -> LoopState:
    s_now = st.cache['v'][0].shape[2]
    q_slots = st.slot + jnp.arange(Q)
    pos_BxQ = jnp.maximum(q_slots[None, :] - pads_B[:, None], 0)
    rope_cs = (cos_SxF[0][pos_BxQ], sin_SxF[0][pos_BxQ])
    mask = _mask(st.slot, Q, s_now, pads_B)
    if spec.pflm:
      hints = jax.lax.dynamic_slice_in_dim(hints_BxNxD, st.step * K, K, axis=1)
      logits, cache = model.apply({'params': params}, st.last_BxF, pos_BxQ[:, :K], mask,
                                  hint_emb_BxHxD=hints, hint_pos_BxH=pos_BxQ[:, K:],
                                  cache=st.cache, cache_slot=st.slot, logits_from=K,
                                  rope_cs=rope_cs, cache_start_B=pads_B)
      counts = st.counts_BxV
      if penalize:
        toks = []
        for i in range(K):
          yi = first_argmax(logits[:, i] - spec.freq_penalty * counts.astype(jnp.float32))
          counts = counts + jax.nn.one_hot(yi, V, dtype=jnp.int32)
          toks.append(yi)
        new_BxK = jnp.stack(toks, axis=1)
      else:
        new_BxK = first_argmax(logits)
    else:
      logits, cache = model.apply({'params': params}, st.last_BxF, pos_BxQ, mask,
                                  cache=st.cache, cache_slot=st.slot, rope_cs=rope_cs,
                                  cache_start_B=pads_B)
      l = logits[:, 0]
      if spec.temperature == 0.0:
        y = first_argmax(l)
      else:
        l = filter_logits(l, spec.top_k, spec.top_p)
        u_B = jax.lax.dynamic_index_in_dim(u_BxN, st.step, axis=1, keepdims=False)
        y = targets_lib.inverse_cdf(l, u_B, spec.temperature)
      new_BxK = y[:, None]
      counts = st.counts_BxV
    # EOS: a row is done after its first EOS; everything after it becomes padding
    if spec.eos_id >= 0:
      is_eos = new_BxK == spec.eos_id
      after = jnp.cumsum(is_eos.astype(jnp.int32), axis=1) - is_eos.astype(jnp.int32)
      dead = st.done_B[:, None] | (after > 0)
      written = jnp.where(dead, spec.pad_id, new_BxK)
      done = st.done_B | jnp.any(is_eos, axis=1)
    else:
      written, done = new_BxK, st.done_B
    out = jax.lax.dynamic_update_slice(st.out_BxN, written, (0, st.step * K))
    return LoopState(step=st.step + 1, cache=cache, slot=st.slot + K, last_BxF=new_BxK,
                     out_BxN=out, done_B=done, counts_BxV=counts)

  def cond(st: LoopState):
    s_now = st.cache['v'][0].shape[2]
    return (st.step < spec.n_steps) & ~jnp.all(st.done_B) & (st.slot + Q <= s_now)

  for j, bound in enumerate(bounds):
    if j:
      state = state.replace(cache=model_lib.grow_cache(state.cache, bound))
    state = jax.lax.while_loop(cond, body, state)
  return state.out_BxN[:, :spec.max_new_tokens], state.step


class Engine:
  """Holds a model and compiles one decoding loop per (DecodeSpec, shapes)."""

  def __init__(self, model_cfg: model_lib.ModelConfig, params, max_len: int | None = None):
    self.cfg = model_cfg
    self.model = model_lib.Transformer(model_cfg)
    self.params = params
    self.max_len = max_len or model_cfg.max_seq_len
    self._fns = {}
    self._lock = threading.Lock()
    self.traces = 0  # how many times a loop was traced (tests: no recompilation)

  def _fn(self, spec: DecodeSpec):
    with self._lock:  # one jitted loop per spec, also when threads compile (compile())
      if spec not in self._fns:
        def run(params, prompt, pads, row_seeds, seed_key):
          self.traces += 1
          return _generate(self.model, spec, params, prompt, pads, row_seeds, seed_key)
        self._fns[spec] = jax.jit(run)
      return self._fns[spec]

  def check(self, spec: DecodeSpec, prompt_len: int, batch: int, k_model: int) -> int:
    if spec.K < 1:
      raise DecodeError(f'K={spec.K}: K must be >= 1')
    if spec.cache_phases < 1:
      raise DecodeError(f'cache_phases={spec.cache_phases}: must be >= 1 (1 = one cache of '
                        f'the full length)')
    if spec.cache_phases > 1 and self.cfg.decode_attention == 'pallas':
      raise DecodeError(f"cache_phases={spec.cache_phases} with decode_attention='pallas': "
                        f"allowed: 1 (the kernel already reads only the filled slots)")
    if spec.pflm and spec.K > k_model:
      raise DecodeError(f'K={spec.K} is larger than the model\'s window k={k_model}; allowed: '
                        f'1..{k_model}')
    if not spec.pflm and spec.K != 1:
      raise DecodeError('AR decoding emits one token per step: K must be 1')
    total = prompt_len + spec.max_new_tokens
    if prompt_len >= self.max_len or total > self.max_len + spec.K:
      raise DecodeError(f'prompt length {prompt_len} + {spec.max_new_tokens} new tokens exceeds '
                        f'the model\'s maximum length {self.max_len}')
    return self.memory_check(spec, prompt_len, batch)

  def memory_check(self, spec: DecodeSpec, prompt_len: int, batch: int) -> int:
    """Cache bytes; raises before compiling when cache + weights cannot fit the device."""
    lengths = cache_lengths(self.cfg, spec, prompt_len)
    S = lengths[-1]
    need = model_lib.cache_bytes(self.cfg, batch, S)
    # growing the cache between phases holds the old and the new one for a moment
    peak = need + (model_lib.cache_bytes(self.cfg, batch, lengths[-2]) if len(lengths) > 1 else 0)
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params))
    limit = device_memory_bytes()
    if limit and peak + weights > 0.9 * limit:
      grow = (f' (up to {peak / 2**30:.2f} GiB while growing it between {len(lengths)} cache '
              f'phases)' if peak > need else '')
      raise DecodeError(
          f'batch {batch} needs a {need / 2**30:.2f} GiB KV cache ([{self.cfg.n_layers}, {batch}, '
          f'{S}, {self.cfg.n_heads}, {self.cfg.head_dim}] x 2){grow} plus {weights / 2**30:.2f} GiB '
          f'of weights, more than 90% of the device\'s {limit / 2**30:.2f} GiB: lower the batch'
          f'{" or cache_phases" if peak > need else ""}')
    return need

  def generate(self, prompts, spec: DecodeSpec, seed: int = 0, row_seeds=None, k_model=None):
    """prompts: list of token-id lists (ragged). Returns ([B, max_new] int32 numpy, steps)."""
    arr, pads = left_pad(prompts, spec.pad_id, min_len=spec.feed + 1)
    self.check(spec, max(len(p) for p in prompts), len(prompts),
               k_model if k_model is not None else spec.K)
    row_seeds = np.arange(len(prompts)) if row_seeds is None else np.asarray(row_seeds)
    out, steps = self._fn(spec)(self.params, jnp.asarray(arr), jnp.asarray(pads),
                                jnp.asarray(row_seeds, jnp.int32), jax.random.key(seed))
    return np.asarray(out), int(steps)

  def compile(self, spec: DecodeSpec, batch: int, prompt_width: int):
    """Compiles the loop for [batch, prompt_width] prompts ahead of the first call, which
    then reuses it (jit's lowering and compilation caches). Thread-safe: benchmarks compile
    several loops at once on hosts with many cores (a GPU's ~25 s per loop at OWT size)."""
    int_B = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return self._fn(spec).lower(self.params, jax.ShapeDtypeStruct((batch, prompt_width),
                                                                  jnp.int32),
                                int_B, int_B, jax.random.key(0)).compile()

  def generate_arrays(self, spec, prompt_BxP, pads_B, row_seeds_B, seed: int = 0):
    """The jitted loop on already padded device arrays (benchmarks); returns device arrays."""
    return self._fn(spec)(self.params, prompt_BxP, pads_B, row_seeds_B, jax.random.key(seed))


@functools.lru_cache(maxsize=1)
def device_memory_bytes() -> int | None:
  try:
    stats = jax.devices()[0].memory_stats()
    if stats and 'bytes_limit' in stats:
      return int(stats['bytes_limit'])
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    import os  # pylint: disable=g-import-not-at-top
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    return None
