"""One jitted, KV-cached decoding engine for the AR teacher and PFLM students (design.md 4).

AR (K = 1, no hints): each step feeds the last emitted token and samples the next one from
the tempered, then top-k/top-p-filtered softmax: by default with one-pass Gumbel-max
(`jax.random.categorical`), the fastest correct sampler; `sampler='inverse_cdf'` draws the
same distribution as the push-forward map of a shared u (the map the students are distilled
from; for agreement checks); temperature 0 is greedy.
PFLM (K tokens per step): each step feeds [K tokens emitted last step | K fresh hints]
(2K queries) with causal attention over the cache; hint i's argmax (after an optional
frequency penalty applied token by token within the block) is token i. Hint K/V land in
the slots the next step's tokens overwrite.

RoPE angles come from a table made once per generation. With DecodeSpec.cache_phases > 1
the loop is a chain of loops over a growing cache, each reading only its prefix of slots.
An ExecConfig with decode_attention='pallas' reads only the filled slots in one loop
instead (kforcing_jax.flash_decode; GPU).

Prompts are left-padded to one length P; row b's RoPE positions are slot - pad_b and its
padding slots are masked, so a row decodes the same alone or in any batch. The randomness
of token j of the row with seed r comes from fold_in(fold_in(seed, r), j): a sample does
not depend on batch size, batch position or K.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax.models import attention as attn_lib
from kforcing_jax import errors
from kforcing_jax.models import flash_decode
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.models import transformer as model_lib
from kforcing_jax import runtime
from kforcing_jax.models import sampling

SAMPLERS = ('categorical', 'inverse_cdf')  # DecodeSpec.sampler (AR)
# Cache lengths are multiples of this: XLA:GPU pads bf16 dot dimensions to multiples of 8
# for the tensor cores and otherwise adds pad fusions around every step's attention
# products. The extra slots are masked like unwritten ones.
CACHE_ALIGN = 8


class DecodeError(errors.UserError):
  pass


def align(n: int) -> int:
  return -(-n // CACHE_ALIGN) * CACHE_ALIGN


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
  """Static decoding settings (a new value compiles a new loop)."""
  K: int = 1  # tokens per step; 1 with pflm=False is AR decoding
  pflm: bool = False
  max_new_tokens: int = 32
  temperature: float = 1.0  # AR only; 0 = greedy; applied before top_k / top_p
  top_k: int = 0  # AR only; 0 = off
  top_p: float = 1.0  # AR only; 1 = off; the nucleus of the tempered distribution
  sampler: str = 'categorical'  # AR only: categorical (Gumbel-max) | inverse_cdf
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
    return align(max(prompt_len, self.feed + 1) + self.n_steps * self.K +
                  (self.K if self.pflm else 0))

  def phase_lengths(self, prompt_len: int) -> list[int]:
    """Cache length of each phase: cache_phases equal spans from the slots the first step
    writes up to, to cache_len(prompt_len), each rounded up to a multiple of CACHE_ALIGN."""
    first_end = self.first_slot(prompt_len) + self.queries
    cache_len = self.cache_len(prompt_len)
    n = max(1, self.cache_phases)
    return sorted({min(cache_len, align(first_end + -(-(cache_len - first_end) * j // n)))
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


def row_keys(seed_key, row_seeds_B):
  """[B] keys fold_in(seed, row): token j of row b draws from fold_in(row_keys[b], j)."""
  return jax.vmap(lambda r: jax.random.fold_in(seed_key, r))(row_seeds_B)


def noise_for_tokens(seed_key, row_seeds_B, token_idx_N):
  """u [B, N] for token indices token_idx_N of each row: fold_in(fold_in(seed, row), j)."""
  return jax.vmap(lambda rk: jax.vmap(lambda j: sampling.uniform_noise(
      jax.random.fold_in(rk, j), ()))(token_idx_N))(row_keys(seed_key, row_seeds_B))


def sample_ar(spec: DecodeSpec, logits_BxV, keys_B, u_B):
  """The AR token of one step: greedy, or a draw from the tempered, filtered softmax
  (Gumbel-max with per-row keys, or the inverse CDF at per-row u)."""
  if spec.temperature == 0.0:
    return sampling.first_argmax(logits_BxV)
  l = sampling.filter_logits(logits_BxV / spec.temperature, spec.top_k, spec.top_p)
  if spec.sampler == 'inverse_cdf':
    return sampling.inverse_cdf(l, u_B)
  return jax.vmap(jax.random.categorical)(keys_B, l).astype(jnp.int32)


def _mask(slot, Q, S, pads_B):
  q_slots = slot + jnp.arange(Q)
  k_slots = jnp.arange(S)
  return (k_slots[None, None, :] <= q_slots[None, :, None]) & \
         (k_slots[None, None, :] >= pads_B[:, None, None])


def cache_lengths(exe: arch_lib.ExecConfig, spec: DecodeSpec, prompt_len: int) -> list[int]:
  """The cache length of each phase: spec.phase_lengths, or with decode_attention='pallas'
  (one phase: the kernel reads only the filled slots anyway) the full length rounded up to
  the kernel's split size."""
  if exe.decode_attention == 'pallas':
    return [flash_decode.cache_length(spec.cache_len(prompt_len))]
  return spec.phase_lengths(prompt_len)


def _generate(model, spec: DecodeSpec, params, prompt_BxP, pads_B, row_seeds_B, seed_key,
              noise_BxN=None):
  arch, exe = model.arch, model.exe
  B, P = prompt_BxP.shape
  K = spec.K
  bounds = cache_lengths(exe, spec, P)
  S = bounds[-1]
  prefill = spec.first_slot(P)  # = P - spec.feed: P >= feed + 1 (left_pad's min_len)
  Q = spec.queries
  cos_SxF, sin_SxF = model_lib.rope_cos_sin(jnp.arange(S)[None], arch.head_dim, arch.rope_base)

  def step(tokens, cache, slot, hints=None, logits_from=0):
    q_slots = slot + jnp.arange(tokens.shape[1] + (0 if hints is None else hints.shape[1]))
    pos = jnp.maximum(q_slots[None, :] - pads_B[:, None], 0)
    attend = attn_lib.Cached(slot, _mask(slot, pos.shape[1], cache['v'][0].shape[2], pads_B),
                             pads_B, exe.decode_attention, exe.cache_products)
    return model.apply({'params': params}, tokens, cache, attend, (cos_SxF[0][pos], sin_SxF[0][pos]),
                       hints_BxHxD=hints, logits_from=logits_from,
                       method=model_lib.Transformer.decode_step)

  cache = model_lib.init_cache(arch, exe, B, bounds[0])
  if prefill > 0:
    _, cache = step(prompt_BxP[:, :prefill], cache, 0, logits_from=prefill)
  V = arch.vocab_size
  penalize = spec.pflm and spec.freq_penalty != 0.0
  state = LoopState(step=jnp.zeros((), jnp.int32), cache=cache,
                    slot=jnp.asarray(prefill, jnp.int32),
                    last_BxF=prompt_BxP[:, prefill:],
                    out_BxN=jnp.full((B, spec.n_steps * K), spec.pad_id, jnp.int32),
                    done_B=jnp.zeros((B,), bool),
                    counts_BxV=jnp.zeros((B, V if penalize else 1), jnp.int32))
  keys_B = row_keys(seed_key, row_seeds_B)
  n_tokens = spec.n_steps * K
  # A PFLM's noise of the whole generation is drawn and encoded into hint embeddings
  # before the loop in one batched call (the same values as drawing each step's), keeping
  # RNG and encoder work off the sequential path; likewise the AR inverse CDF's u.
  u_BxN = None
  if noise_BxN is not None:  # the caller's uniforms (e.g. another implementation's draws)
    u_BxN = noise_BxN[:, :n_tokens].astype(jnp.float32)
  elif spec.pflm or spec.sampler == 'inverse_cdf':
    u_BxN = noise_for_tokens(seed_key, row_seeds_B, jnp.arange(n_tokens))
  if spec.pflm:
    hints_BxNxD = model.apply({'params': params}, u_BxN, jnp.full((B,), spec.tau, jnp.float32),
                              method=model_lib.Transformer.encode_noise)
  rows = jnp.arange(B)

  def body(st: LoopState) -> LoopState:
    counts = st.counts_BxV
    if spec.pflm:
      hints = jax.lax.dynamic_slice_in_dim(hints_BxNxD, st.step * K, K, axis=1)
      logits, cache = step(st.last_BxF, st.cache, st.slot, hints, logits_from=K)
      if penalize:
        toks = []
        for i in range(K):
          yi = sampling.first_argmax(logits[:, i] - spec.freq_penalty * counts.astype(jnp.float32))
          counts = counts.at[rows, yi].add(1)
          toks.append(yi)
        new_BxK = jnp.stack(toks, axis=1)
      else:
        new_BxK = sampling.first_argmax(logits)
    else:
      logits, cache = step(st.last_BxF, st.cache, st.slot)
      u_B = (None if u_BxN is None else
             jax.lax.dynamic_index_in_dim(u_BxN, st.step, axis=1, keepdims=False))
      keys = jax.vmap(lambda k: jax.random.fold_in(k, st.step))(keys_B)
      new_BxK = sample_ar(spec, logits[:, 0], keys, u_B)[:, None]
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
  """A model with its parameters and window k (0: AR); compiles one decoding loop per
  (DecodeSpec, shapes) and refuses specs the model cannot decode."""

  def __init__(self, arch: arch_lib.ArchConfig, params, exe: arch_lib.ExecConfig | None = None,
               *, k: int = 0, max_len: int | None = None):
    if arch.pflm != (k > 0):
      raise DecodeError(f'window k={k} does not fit the model: a PFLM (pflm=True) needs '
                        'k >= 1, an AR model k=0')
    self.arch = arch
    self.model = model_lib.build(arch, exe)
    self.exe = self.model.exe
    self.params = params
    self.k = k
    self.max_len = max_len or arch.max_seq_len
    self._fns = {}
    self._lock = threading.Lock()
    self.traces = 0  # how many times a loop was traced (tests: no recompilation)

  def _fn(self, spec: DecodeSpec):
    with self._lock:  # one jitted loop per spec, also when threads compile (compile())
      if spec not in self._fns:
        def run(params, prompt, pads, row_seeds, seed_key, noise=None):
          self.traces += 1
          return _generate(self.model, spec, params, prompt, pads, row_seeds, seed_key, noise)
        self._fns[spec] = jax.jit(run)
      return self._fns[spec]

  def check(self, spec: DecodeSpec, prompt_len: int, batch: int) -> int:
    """Raises DecodeError naming the field for a spec this model cannot decode; returns
    the KV cache's bytes."""
    if spec.K < 1:
      raise DecodeError(f'K={spec.K}: K must be >= 1')
    if spec.max_new_tokens < 1:
      raise DecodeError(f'max_new_tokens={spec.max_new_tokens}: must be >= 1')
    if spec.cache_phases < 1:
      raise DecodeError(f'cache_phases={spec.cache_phases}: must be >= 1 (1 = one cache of '
                        f'the full length)')
    if spec.cache_phases > 1 and self.exe.decode_attention == 'pallas':
      raise DecodeError(f"cache_phases={spec.cache_phases} with decode_attention='pallas': "
                        f"allowed: 1 (the kernel already reads only the filled slots)")
    if spec.pflm and not self.k:
      raise DecodeError('this is an AR model (k=0): it decodes one token per step, without '
                        'hints (pflm=False, K=1)')
    if spec.pflm and spec.K > self.k:
      raise DecodeError(f'K={spec.K} is larger than the model\'s window k={self.k}; allowed: '
                        f'1..{self.k}')
    if not spec.pflm and spec.K != 1:
      raise DecodeError('AR decoding emits one token per step: K must be 1')
    if spec.sampler not in SAMPLERS:
      raise DecodeError(f'sampler={spec.sampler!r}: allowed: {", ".join(SAMPLERS)}')
    if spec.temperature < 0 or not 0.0 < spec.top_p <= 1.0 or spec.top_k < 0:
      raise DecodeError(f'temperature={spec.temperature}, top_k={spec.top_k}, top_p='
                        f'{spec.top_p}: allowed: temperature >= 0, top_k >= 0, 0 < top_p <= 1')
    total = prompt_len + spec.max_new_tokens
    if prompt_len >= self.max_len or total > self.max_len + spec.K:
      raise DecodeError(f'prompt length {prompt_len} + {spec.max_new_tokens} new tokens exceeds '
                        f'the model\'s maximum length {self.max_len}')
    return self.memory_check(spec, prompt_len, batch)

  def memory_check(self, spec: DecodeSpec, prompt_len: int, batch: int) -> int:
    """Cache bytes; raises before compiling when cache, hint embeddings and weights cannot
    fit the device."""
    lengths = cache_lengths(self.exe, spec, prompt_len)
    S = lengths[-1]
    need = model_lib.cache_bytes(self.arch, self.exe, batch, S)
    # growing the cache between phases holds the old and the new one for a moment
    peak = need + (model_lib.cache_bytes(self.arch, self.exe, batch, lengths[-2])
                   if len(lengths) > 1 else 0)
    hints = batch * spec.n_steps * spec.K * self.arch.d_model * 4 if spec.pflm else 0
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params))
    limit = runtime.device_memory_bytes()
    if limit and peak + hints + weights > 0.9 * limit:
      grow = (f' (up to {peak / 2**30:.2f} GiB while growing it between {len(lengths)} cache '
              f'phases)' if peak > need else '')
      raise DecodeError(
          f'batch {batch} needs a {need / 2**30:.2f} GiB KV cache ([{self.arch.n_layers}, '
          f'{batch}, {S}, {self.arch.n_heads}, {self.arch.head_dim}] x 2){grow}, '
          f'{hints / 2**30:.2f} GiB of hint embeddings and {weights / 2**30:.2f} GiB of '
          f'weights, more than 90% of the device\'s {limit / 2**30:.2f} GiB: lower the batch'
          f'{" or cache_phases" if peak > need else ""}')
    return need

  def generate(self, prompts, spec: DecodeSpec, seed: int = 0, row_seeds=None,
               noise_BxN=None):
    """prompts: list of token-id lists (ragged). Returns ([B, max_new] int32 numpy, steps).
    noise_BxN: optional uniforms, token j of row b uses noise_BxN[b, j] (PFLM hints, or the
    AR inverse-CDF sampler's u) instead of the seeded ones."""
    arr, pads = left_pad(prompts, spec.pad_id, min_len=spec.feed + 1)
    self.check(spec, max(len(p) for p in prompts), len(prompts))
    row_seeds = np.arange(len(prompts)) if row_seeds is None else np.asarray(row_seeds)
    if noise_BxN is not None:
      noise_BxN = self.check_noise(spec, noise_BxN, len(prompts))
    # the noise argument only when given: compile()'s loops take none (same jit cache entry)
    extra = () if noise_BxN is None else (noise_BxN,)
    out, steps = self._fn(spec)(self.params, jnp.asarray(arr), jnp.asarray(pads),
                                jnp.asarray(row_seeds, jnp.int32), jax.random.key(seed), *extra)
    return np.asarray(out), int(steps)

  def check_noise(self, spec: DecodeSpec, noise_BxN, batch: int):
    """The caller's uniforms as a [B, n_steps * K] float32 device array, or DecodeError."""
    if not spec.pflm and spec.sampler != 'inverse_cdf':
      raise DecodeError("noise is used by a PFLM's hints or by the AR sampler "
                        "'inverse_cdf'; this AR spec has sampler="
                        f"{spec.sampler!r} (allowed with noise: inverse_cdf)")
    u = np.asarray(noise_BxN, np.float64)
    need = spec.n_steps * spec.K
    if u.ndim != 2 or u.shape[0] != batch or u.shape[1] < need:
      raise DecodeError(f'noise has shape {list(u.shape)}; needed [{batch}, >= {need}] (one u '
                        'per row and generated token, whole steps of K)')
    if not np.all((u >= 0.0) & (u <= 1.0)):
      raise DecodeError('noise values must lie in [0, 1]')
    return jnp.asarray(u[:, :need], jnp.float32)

  def compile(self, spec: DecodeSpec, batch: int, prompt_width: int):
    """Compiles the loop for [batch, prompt_width] prompts ahead of the first call, which
    then reuses it (jit's lowering and compilation caches). Thread-safe: benchmarks compile
    several loops at once on hosts with many cores."""
    int_B = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return self._fn(spec).lower(self.params, jax.ShapeDtypeStruct((batch, prompt_width),
                                                                  jnp.int32),
                                int_B, int_B, jax.random.key(0)).compile()

  def generate_arrays(self, spec, prompt_BxP, pads_B, row_seeds_B, seed: int = 0):
    """The jitted loop on already padded device arrays (benchmarks); returns device arrays."""
    return self._fn(spec)(self.params, prompt_BxP, pads_B, row_seeds_B, jax.random.key(seed))
