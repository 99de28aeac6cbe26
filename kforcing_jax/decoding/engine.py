"""One jitted, KV-cached decoding loop for the AR teacher and PFLM students
(docs/design.md section 4).

The loop is a lax.while_loop over kforcing_jax.decoding.step's decode_step with every row
at the same cache slot: AR feeds the last token and samples the next (greedy at
temperature 0; one-pass Gumbel-max `categorical`, the fastest correct sampler, or the
`inverse_cdf` of a shared u, the map the students are distilled from); a PFLM feeds its
last K tokens and K fresh hints and reads each hint's token out of its logits (argmax, or
the inverse CDF of the hint's u: ArchConfig.readout; after an optional frequency penalty).
Hint K/V land in the slots the next step's tokens overwrite.

A compiled loop is shared by every Engine with the same ArchConfig and ExecConfig (module
level, parameters as arguments) and serves every DecodeSpec with the same K, AR sampler,
eos/pad ids, cache phases and cache length -- prompt + max_new_tokens rounded up to
CACHE_ALIGN slots: the temperature, top_k, top_p, penalty and tau are traced per-row values
and max_new_tokens a traced step count. (The sampler selects the loop because each one
compiled in adds to the compile time; the inverse CDF's float-float scan most.)

RoPE angles come from a table made once per generation. A PFLM's noise for the whole
generation is drawn and encoded into hint embeddings before the loop in one batched call
(the same values as drawing each step's), keeping RNG and encoder work off the sequential
path; likewise the inverse CDF's u. With DecodeSpec.cache_phases > 1 the loop is a chain
of loops over a growing cache, each reading only its prefix of slots. An ExecConfig with
decode_attention='pallas' reads only the filled slots in one loop instead
(kforcing_jax.models.flash_decode; GPU).

Prompts are left-padded to one length P; row b's RoPE positions are slot - pad_b and its
padding slots are masked, so a row decodes the same alone or in any batch. Engine.generate
therefore rounds the batch, the prompt width and max_new_tokens up to compile buckets
(`bucket`: exact up to 8, then four per doubling) and drops the extra rows and tokens: a
stream of calls with ragged sizes compiles a few loops, not one per size. The randomness
of token j of the row with seed r comes from fold_in(fold_in(seed, r), j): a sample does
not depend on batch size, batch position or K.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import runtime
from kforcing_jax.decoding import step as step_lib
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.models import flash_decode
from kforcing_jax.models import quantize
from kforcing_jax.models import sampling
from kforcing_jax.models import transformer as model_lib

SAMPLERS = step_lib.SAMPLERS  # DecodeSpec.sampler (AR)
CACHE_ALIGN = step_lib.CACHE_ALIGN
DecodeError = step_lib.DecodeError
align = step_lib.align
# Traces of the module's jitted loop, process-wide (tests: what recompiles).
TRACES = collections.Counter()


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
  """Decoding settings. K, pflm, sampler, eos_id, pad_id, cache_phases and the cache length
  select a compiled loop; the others are traced (a new value compiles nothing)."""
  K: int = 1  # tokens per step; 1 with pflm=False is AR decoding
  pflm: bool = False
  max_new_tokens: int = 32
  temperature: float = 1.0  # AR only; 0 = greedy; applied before top_k / top_p
  top_k: int = 0  # AR only; 0 = off
  top_p: float = 1.0  # AR only; 1 = off; the nucleus of the tempered distribution
  sampler: str = 'categorical'  # AR only: categorical (Gumbel-max) | inverse_cdf
  freq_penalty: float = 0.0  # lambda * count(v) subtracted (a PFLM's token by token)
  presence_penalty: float = 0.0  # mu * [count(v) > 0] subtracted
  min_new_tokens: int = 0  # banned_ids get -inf until this many tokens are out
  banned_ids: tuple[int, ...] = ()  # e.g. the EOS and stop ids (see min_new_tokens)
  eos_id: int = -1  # -1: never stop early
  pad_id: int = 0  # written after EOS
  tau: float = 1.0  # PFLM temperature input of the noise encoder
  # > 1: the loop runs in this many phases over a cache that grows between them (zero
  # padded), so attention reads only about the filled part instead of the whole cache.
  # Same tokens; costs a copy of the cache per phase and up to ~2x its memory at the switch.
  cache_phases: int = 1

  @property
  def layout(self) -> step_lib.SlotLayout:
    return step_lib.SlotLayout(self.K, self.pflm)

  @property
  def feed(self) -> int:
    return self.layout.feed

  @property
  def queries(self) -> int:
    return self.layout.queries

  @property
  def n_steps(self) -> int:
    return self.layout.steps(self.max_new_tokens)

  def first_slot(self, prompt_len: int) -> int:
    return self.layout.first_slot(prompt_len)

  def cache_len(self, prompt_len: int) -> int:
    return self.layout.cache_len(prompt_len, self.max_new_tokens)

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


@dataclasses.dataclass(frozen=True)
class LoopPlan:
  """What a compiled loop is specialised on besides shapes and configs."""
  layout: step_lib.SlotLayout
  # AR: the sampler compiled into the loop (each adds to the loop's compile time; the slot
  # engine compiles both); () for a PFLM
  samplers: tuple[str, ...]
  phases: tuple[int, ...]  # cache length of each phase
  out_steps: int  # steps the output holds (the most that fit the cache)
  eos_id: int
  pad_id: int


@flax.struct.dataclass
class LoopState:
  step: jax.Array  # [] int32: decoding steps done
  # {'k': L x [B, kv_heads, head_dim, S], 'v': L x [B, kv_heads, S, head_dim]}, S = the
  # current phase's cache length (the full cache_len with one phase)
  cache: Any
  slot: jax.Array  # [] int32: first cache slot the next step writes
  last_BxF: jax.Array  # [B, F] int32: tokens fed next step (F = K for PFLM, 1 for AR)
  out_BxN: jax.Array  # [B, out_steps * K] int32: generated tokens (pad after EOS)
  done_B: jax.Array  # [B] bool: row has emitted EOS
  counts_BxV: jax.Array  # [B, V] int32 generated-token counts (the frequency penalty)


def bucket(n: int, multiple: int = 1) -> int:
  """The compile bucket of a size n >= 1: n rounded up to a multiple of `multiple`, and
  beyond 8 to one of four sizes per doubling (10, 12, 14, 16, 20, 24, ...), so at most 25%
  above n."""
  step = max(multiple, 1 << max(0, (n - 1).bit_length() - 3))
  return -(-n // step) * step


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


def cache_lengths(exe: arch_lib.ExecConfig, spec: DecodeSpec, prompt_len: int) -> list[int]:
  """The cache length of each phase: spec.phase_lengths, or with decode_attention='pallas'
  (one phase: the kernel reads only the filled slots anyway) the full length rounded up to
  the kernel's split size."""
  if exe.decode_attention == 'pallas':
    return [flash_decode.cache_length(spec.cache_len(prompt_len))]
  return spec.phase_lengths(prompt_len)


def _generate(model, plan: LoopPlan, params, prompt_BxP, pads_B, row_seeds_B, seed_key,
              settings: step_lib.Settings, n_steps, tau, noise_BxN=None):
  arch, lay = model.arch, plan.layout
  B, P = prompt_BxP.shape
  K = lay.K
  rope = step_lib.rope_table(arch, plan.phases[-1])
  prefill = lay.first_slot(P)  # = P - feed: P >= feed + 1 (left_pad's min_len)
  cache = step_lib.prefill(model, params, prompt_BxP[:, :prefill], pads_B, plan.phases[0],
                           rope) if prefill > 0 else model_lib.init_cache(
                               arch, model.exe, B, plan.phases[0])
  n_tokens = plan.out_steps * K
  state = LoopState(step=jnp.zeros((), jnp.int32), cache=cache,
                    slot=jnp.asarray(prefill, jnp.int32),
                    last_BxF=prompt_BxP[:, prefill:],
                    out_BxN=jnp.full((B, n_tokens), plan.pad_id, jnp.int32),
                    done_B=jnp.zeros((B,), bool),
                    counts_BxV=jnp.zeros((B, arch.vocab_size), jnp.int32))
  gates = step_lib.Gates.of(settings)
  keys_B = row_keys(seed_key, row_seeds_B)
  if noise_BxN is not None:  # the caller's uniforms (e.g. another implementation's draws)
    u_BxN = noise_BxN.astype(jnp.float32)
  elif lay.pflm or 'inverse_cdf' in plan.samplers:
    u_BxN = noise_for_tokens(seed_key, row_seeds_B, jnp.arange(n_tokens))
  if lay.pflm:
    hints_BxNxD = model.apply(quantize.variables(params), u_BxN, jnp.broadcast_to(tau, (B,)),
                              method=model_lib.Transformer.encode_noise)

  def body(st: LoopState) -> LoopState:
    kw = {}
    if lay.pflm:
      kw['hints_BxKxD'] = jax.lax.dynamic_slice_in_dim(hints_BxNxD, st.step * K, K, axis=1)
      kw['step_u'] = lambda: jax.lax.dynamic_slice_in_dim(u_BxN, st.step * K, K, axis=1)
    else:
      kw['step_keys'] = lambda: jax.vmap(lambda k: jax.random.fold_in(k, st.step))(keys_B)
      kw['step_u'] = lambda: jax.lax.dynamic_index_in_dim(u_BxN, st.step, axis=1,
                                                          keepdims=False)
      kw['samplers'] = plan.samplers
    new_BxK, cache, counts, _ = step_lib.decode_step(model, params, st.last_BxF, st.cache,
                                                     st.slot, pads_B, rope, settings, gates,
                                                     st.counts_BxV, n_out_B=st.step * K, **kw)
    # EOS: a row is done after its first EOS; everything after it becomes padding
    if plan.eos_id >= 0:
      is_eos = new_BxK == plan.eos_id
      after = jnp.cumsum(is_eos.astype(jnp.int32), axis=1) - is_eos.astype(jnp.int32)
      dead = st.done_B[:, None] | (after > 0)
      written = jnp.where(dead, plan.pad_id, new_BxK)
      done = st.done_B | jnp.any(is_eos, axis=1)
    else:
      written, done = new_BxK, st.done_B
    out = jax.lax.dynamic_update_slice(st.out_BxN, written, (0, st.step * K))
    return LoopState(step=st.step + 1, cache=cache, slot=st.slot + K, last_BxF=new_BxK,
                     out_BxN=out, done_B=done, counts_BxV=counts)

  def cond(st: LoopState):
    s_now = step_lib.cache_length(st.cache)
    return (st.step < n_steps) & ~jnp.all(st.done_B) & (st.slot + lay.queries <= s_now)

  for j, bound in enumerate(plan.phases):
    if j:
      state = state.replace(cache=model_lib.grow_cache(state.cache, bound))
    state = jax.lax.while_loop(cond, body, state)
  return state.out_BxN, state.step


_JIT_LOCK = threading.Lock()


@functools.cache
def _loop_fn_locked(arch: arch_lib.ArchConfig, exe: arch_lib.ExecConfig, plan: LoopPlan):
  model = model_lib.build(arch, exe)

  def run(params, prompt, pads, row_seeds, seed_key, settings, n_steps, tau, noise=None):
    TRACES['loop'] += 1
    return _generate(model, plan, params, prompt, pads, row_seeds, seed_key, settings,
                     n_steps, tau, noise)
  return jax.jit(run)


def loop_fn(arch: arch_lib.ArchConfig, exe: arch_lib.ExecConfig, plan: LoopPlan):
  """The jitted loop of (arch, exe, plan), one per process: every Engine with these configs
  shares its compilations."""
  with _JIT_LOCK:  # compile() from several threads must get the same jitted function
    return _loop_fn_locked(arch, exe, plan)


class Engine:
  """A model with its parameters and window k (0: AR); refuses specs the model cannot
  decode. Its loops are shared with every Engine of the same configs (loop_fn)."""

  def __init__(self, arch: arch_lib.ArchConfig, params, exe: arch_lib.ExecConfig | None = None,
               *, k: int = 0, max_len: int | None = None, buckets: bool = True):
    if arch.pflm != (k > 0):
      raise DecodeError(f'window k={k} does not fit the model: a PFLM (pflm=True) needs '
                        'k >= 1, an AR model k=0')
    self.arch = arch
    self.model = model_lib.build(arch, exe)
    self.exe = self.model.exe
    self.params = params
    self.k = k
    mismatch = quantize.weights_mismatch(self.exe.weights, params)
    if mismatch:
      raise DecodeError(mismatch)
    self.max_len = max_len or arch.max_seq_len
    # generate() decodes in bucketed shapes (see `bucket`); False: the exact ones
    self.buckets = buckets

  @property
  def traces(self) -> int:
    """Traces of the decoding loop in this process (every Engine's): a call that adds none
    reused a compiled loop."""
    return TRACES['loop']

  def plan(self, spec: DecodeSpec, prompt_len: int) -> LoopPlan:
    lengths = cache_lengths(self.exe, spec, prompt_len)
    return LoopPlan(spec.layout, () if spec.pflm else (spec.sampler,), tuple(lengths),
                    spec.layout.steps_that_fit(prompt_len, spec.cache_len(prompt_len)),
                    spec.eos_id, spec.pad_id)

  def _fn(self, spec: DecodeSpec, prompt_len: int):
    return loop_fn(self.arch, self.exe, self.plan(spec, prompt_len))

  def _traced_args(self, spec: DecodeSpec, batch: int):
    settings = step_lib.settings(batch, self.arch.vocab_size, temperature=spec.temperature,
                                 top_k=spec.top_k, top_p=spec.top_p,
                                 freq_penalty=spec.freq_penalty,
                                 presence_penalty=spec.presence_penalty,
                                 min_new_tokens=spec.min_new_tokens, banned=spec.banned_ids,
                                 sampler=spec.sampler)
    return settings, np.int32(spec.n_steps), np.float32(spec.tau)

  def check(self, spec: DecodeSpec, prompt_len: int, batch: int) -> int:
    """Raises DecodeError naming the field for a spec this model cannot decode; returns
    the KV cache's bytes."""
    if spec.K < 1:
      raise DecodeError(f'K={spec.K}: K must be >= 1')
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
    step_lib.check_sampling(spec.temperature, spec.top_k, spec.top_p, spec.freq_penalty,
                            spec.sampler, spec.presence_penalty, spec.min_new_tokens)
    step_lib.check_length(prompt_len, spec.max_new_tokens, self.max_len)
    return self.memory_check(spec, prompt_len, batch)

  def memory_check(self, spec: DecodeSpec, prompt_len: int, batch: int) -> int:
    """Cache bytes; raises before compiling when cache, hint embeddings, token counts and
    weights cannot fit the device."""
    lengths = cache_lengths(self.exe, spec, prompt_len)
    S = lengths[-1]
    need = model_lib.cache_bytes(self.arch, self.exe, batch, S)
    # growing the cache between phases holds the old and the new one for a moment
    peak = need + (model_lib.cache_bytes(self.arch, self.exe, batch, lengths[-2])
                   if len(lengths) > 1 else 0)
    tokens = spec.layout.steps_that_fit(prompt_len, spec.cache_len(prompt_len)) * spec.K
    hints = batch * tokens * self.arch.d_model * 4 if spec.pflm else 0
    counts = batch * self.arch.vocab_size * 4
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params))
    limit = runtime.device_memory_bytes()
    if limit and peak + hints + counts + weights > 0.9 * limit:
      grow = (f' (up to {peak / 2**30:.2f} GiB while growing it between {len(lengths)} cache '
              f'phases)' if peak > need else '')
      raise DecodeError(
          f'batch {batch} needs a {need / 2**30:.2f} GiB KV cache ([{self.arch.n_layers}, '
          f'{batch}, {S}, {self.arch.n_kv_heads}, {self.arch.head_dim}] x 2){grow}, '
          f'{(hints + counts) / 2**30:.2f} GiB of hint embeddings and token counts and '
          f'{weights / 2**30:.2f} GiB of weights, more than 90% of the device\'s '
          f'{limit / 2**30:.2f} GiB: lower the batch'
          f'{" or cache_phases" if peak > need else ""}')
    return need

  def generate(self, prompts, spec: DecodeSpec, seed: int = 0, row_seeds=None,
               noise_BxN=None):
    """prompts: list of token-id lists (ragged). Returns ([B, max_new] int32 numpy, steps).
    noise_BxN: optional uniforms, token j of row b uses noise_BxN[b, j] (PFLM hints, or the
    AR inverse-CDF sampler's u) instead of the seeded ones."""
    B = len(prompts)
    arr, pads = left_pad(prompts, spec.pad_id, min_len=spec.feed + 1)
    self.check(spec, max(len(p) for p in prompts), B)
    row_seeds = np.arange(B) if row_seeds is None else np.asarray(row_seeds)
    u = None if noise_BxN is None else self.check_noise(spec, noise_BxN, B)
    shape_spec, width, rows = self.shapes(spec, arr.shape[1], B)
    if width > arr.shape[1]:
      pads = pads + (width - arr.shape[1])
      arr = np.pad(arr, ((0, 0), (width - arr.shape[1], 0)), constant_values=spec.pad_id)
    if rows > B:
      # copies of the first row, with its seed and noise: they finish when it does, so the
      # steps taken are the batch's own
      take = np.concatenate([np.arange(B), np.zeros(rows - B, int)])
      arr, pads, row_seeds = arr[take], pads[take], row_seeds[take]
      u = None if u is None else u[take]
    fn = self._fn(shape_spec, width)
    # the noise argument only when given: compile()'s loops take none (same jit cache entry)
    extra = ()
    if u is not None:
      n = self.plan(shape_spec, width).out_steps * spec.K  # the loop's noise per row
      extra = (np.pad(u, ((0, 0), (0, n - u.shape[1])), constant_values=0.5),)
    out, steps = fn(self.params, arr, pads, np.asarray(row_seeds, np.int32),
                    jax.random.key(seed), *self._traced_args(spec, rows), *extra)
    return np.asarray(out)[:B, :spec.max_new_tokens], int(steps)

  def shapes(self, spec: DecodeSpec, width: int, batch: int) -> tuple[DecodeSpec, int, int]:
    """(the spec whose cache length the loop is compiled for, prompt width, rows) that
    generate() decodes [batch, width] prompts in: each rounded up to its `bucket` while the
    cache stays within the model's max_len and the device's memory; the exact ones
    without buckets. Only max_new_tokens of the returned spec differs from spec's (the loop
    still stops after spec's steps: they are traced)."""
    if not self.buckets:
      return spec, width, batch
    b_width = bucket(width, CACHE_ALIGN)
    if b_width + spec.max_new_tokens > self.max_len:
      b_width = width
    new = max(spec.max_new_tokens,
              min(bucket(spec.max_new_tokens, spec.K), self.max_len - b_width))
    shape_spec = dataclasses.replace(spec, max_new_tokens=new)
    rows = bucket(batch)
    try:
      self.memory_check(shape_spec, b_width, rows)
    except DecodeError:  # the exact shapes passed check(): decode in them
      return spec, width, batch
    return shape_spec, b_width, rows

  def check_noise(self, spec: DecodeSpec, noise_BxN, batch: int) -> np.ndarray:
    """The caller's uniforms as a [B, n_steps * K] float32 array, or DecodeError."""
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
    return u[:, :need].astype(np.float32)

  def compile(self, spec: DecodeSpec, batch: int, prompt_width: int, exact: bool = False):
    """Compiles the loop that generate() runs for [batch, prompt_width] prompts (in their
    buckets, see `shapes`; with exact, generate_arrays' loop for exactly these shapes) ahead
    of the first call, which then reuses it (jit's lowering and compilation caches).
    Thread-safe: benchmarks compile several loops at once on hosts with many cores."""
    if not exact:
      spec, prompt_width, batch = self.shapes(spec, prompt_width, batch)
    int_B = jax.ShapeDtypeStruct((batch,), jnp.int32)
    abstract = lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
    traced = jax.tree.map(abstract, self._traced_args(spec, batch))
    return self._fn(spec, prompt_width).lower(
        self.params, jax.ShapeDtypeStruct((batch, prompt_width), jnp.int32), int_B, int_B,
        jax.random.key(0), *traced).compile()

  def generate_arrays(self, spec, prompt_BxP, pads_B, row_seeds_B, seed: int = 0):
    """The jitted loop on already padded device arrays, in exactly their shapes and spec's
    cache length (benchmarks; compile(..., exact=True) prepares it); returns device arrays
    (tokens [B, >= max_new_tokens], steps)."""
    return self._fn(spec, prompt_BxP.shape[1])(
        self.params, prompt_BxP, pads_B, row_seeds_B, jax.random.key(seed),
        *self._traced_args(spec, prompt_BxP.shape[0]))
