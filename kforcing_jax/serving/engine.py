"""A continuous-batching slot engine for AR and PFLM models (JetStream's method set:
prefill, insert, generate).

A fixed number of slots share one donated, fixed-shape decode state: the KV cache of every
slot ([slots, kv_heads, ...] per layer, slots along the mesh's data axis), and per slot its
next cache slot, left padding, last fed tokens, decoding step, noise key, sampling settings,
penalty counts and (PFLM) the hint embeddings of all its steps. `prefill` computes a
prompt's KV cache in a length bucket (one compile per bucket); `insert` puts it into a free
slot between steps and draws and encodes the request's noise there, off the step;
`generate` advances slots [0, rows) by K tokens (AR: 1) each at its own position in one
jitted call (optionally several steps per call) with kforcing_jax.decoding.step's
decode_step, the step of the offline engine; `rows` is a slot-count bucket (the step
writes the live rows' keys and values into the whole cache in place and reads only their
rows), and `move` lets the caller keep its live requests in the front slots. Stopping
(EOS, max tokens, stop strings, cancellation) is the caller's: it reads each step's tokens
and frees slots (kforcing_jax.serving.scheduler). With ExecConfig.decode_attention=
'pallas' (GPU) each slot's attention reads only its own filled cache slots
(kforcing_jax.models.flash_decode with per-row lengths).

Sampling settings are traced per-slot values: no request compiles anything after the
first call of each prefill bucket, insert bucket and slot-count bucket (`warmup` compiles
them all). The jitted functions are
shared by every SlotEngine of the same configs.

Exactness: a slot computes what `decoding.engine.Engine.generate` computes for its request
alone -- the same left padding to at least K + 1 prompt tokens, RoPE positions, masked
attention, noise (token j of a request with seed s uses fold_in(fold_in(key(s), 0), j)) and
samplers -- so its tokens do not depend on what else is being served (bit for bit in
float32; with bf16 weight products, the dot kernels XLA picks for different row counts,
and a one-row AR step's float32 products, round differently).
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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from kforcing_jax.decoding import step as step_lib
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.models import flash_decode
from kforcing_jax.models import quantize
from kforcing_jax.models import sampling
from kforcing_jax.models import transformer as model_lib

MIN_BUCKET = 16
# Traces of the module's jitted functions, process-wide (tests: what recompiles).
TRACES = collections.Counter()


MAX_LOGPROBS = 20  # top alternatives a step can return per token


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """One request's settings (AR: temperature / top_k / top_p / sampler; both: the
  penalties, min_tokens and logprobs)."""
  temperature: float = 1.0  # 0 = greedy
  top_k: int = 0
  top_p: float = 1.0
  freq_penalty: float = 0.0
  seed: int = 0
  sampler: str = 'categorical'  # AR: step_lib.SAMPLERS
  presence_penalty: float = 0.0
  min_tokens: int = 0  # `banned` ids are held back until this many tokens are out
  banned: tuple[int, ...] = ()  # the request's stop ids (EOS included)
  logprobs: bool = False  # return each token's log-probability and top alternatives


@flax.struct.dataclass
class SlotState:
  cache: Any  # {'k': L x [B, kv_heads, head_dim, S], 'v': L x [B, kv_heads, S, head_dim]}
  slot_B: jax.Array  # int32: cache slot of the next step's first input
  pad_B: jax.Array  # int32: first valid cache slot (left padding)
  last_BxF: jax.Array  # int32: tokens fed next step
  step_B: jax.Array  # int32: decoding steps done (indexes keys and noise)
  key_data_B: jax.Array  # uint32 [B, 2]: key data of fold_in(key(seed), 0)
  settings: step_lib.Settings  # per slot
  counts_BxV: jax.Array  # int32 generated-token counts (the penalties)
  hints_BxNxD: jax.Array | None  # PFLM: float32 hint embeddings of every step (None: AR)
  logprobs_B: jax.Array  # bool: the slot's request wants log-probabilities


@flax.struct.dataclass
class Prefix:
  """A prefilled prompt: its KV cache [L][1, ..., bucket], padding and the fed tail."""
  cache: Any
  pad: jax.Array
  prefill: jax.Array  # cache slot of the first step's first input
  tail_F: jax.Array


@dataclasses.dataclass(frozen=True)
class SlotPlan:
  """What the slot engine's compiled functions are specialised on besides configs."""
  layout: step_lib.SlotLayout
  cache_len: int
  hint_tokens: int  # hint embeddings per slot (PFLM): the most a request can use
  steps_per_call: int
  mesh: Any  # jax.sharding.Mesh or None


def _constrain(tree, mesh):
  """Every leaf split along its first axis (the slots) over the mesh's data axis."""
  if mesh is None:
    return tree
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, PartitionSpec('data', *([None] * (x.ndim - 1))))), tree)


_JIT_LOCK = threading.Lock()


@functools.cache
def _jitted(kind: str, arch: arch_lib.ArchConfig, exe: arch_lib.ExecConfig, plan: SlotPlan):
  model = model_lib.build(arch, exe)
  lay = plan.layout

  def prefill(params, toks_1xT, pad, n, tail):
    TRACES['prefill'] += 1
    T = toks_1xT.shape[1]
    pads_1 = jnp.reshape(pad, (1,))
    cache = step_lib.prefill(model, params, toks_1xT, pads_1, T, step_lib.rope_table(arch, T))
    return Prefix(cache=cache, pad=pad, prefill=n, tail_F=tail)

  def score(params, toks_1xT):
    TRACES['score'] += 1
    T = toks_1xT.shape[1]
    logits = model.apply(quantize.variables(params), toks_1xT, jnp.arange(T)[None],
                         method=model_lib.Transformer.forward)
    lp = step_lib.logprobs_of(logits[:, :-1], toks_1xT[:, 1:], MAX_LOGPROBS)
    return jax.tree.map(lambda x: x[0], lp)

  def insert(params, state: SlotState, prefix: Prefix, slot, settings: step_lib.Settings,
             seed, logprobs):
    TRACES['insert'] += 1
    def put(c, p):  # the prefix's slots 0..bucket of this slot's row
      return jax.lax.dynamic_update_slice(c, p.astype(c.dtype), [slot] + [0] * (c.ndim - 1))
    key = jax.random.fold_in(jax.random.key(seed), 0)
    hints = state.hints_BxNxD
    if lay.pflm:  # every step's noise of the request, drawn and encoded once
      u_1xN = jax.vmap(lambda j: sampling.uniform_noise(jax.random.fold_in(key, j), ()))(
          jnp.arange(plan.hint_tokens))[None]
      h_1xNxD = model.apply(quantize.variables(params), u_1xN, jnp.ones((1,), jnp.float32),
                            method=model_lib.Transformer.encode_noise)
      hints = jax.lax.dynamic_update_slice(hints, h_1xNxD.astype(hints.dtype), (slot, 0, 0))
    new = state.replace(
        cache=jax.tree.map(put, state.cache, prefix.cache),
        slot_B=state.slot_B.at[slot].set(prefix.prefill),
        pad_B=state.pad_B.at[slot].set(prefix.pad),
        last_BxF=state.last_BxF.at[slot].set(prefix.tail_F),
        step_B=state.step_B.at[slot].set(0),
        key_data_B=state.key_data_B.at[slot].set(jax.random.key_data(key)),
        settings=jax.tree.map(lambda a, v: a.at[slot].set(v), state.settings, settings),
        counts_BxV=state.counts_BxV.at[slot].set(0), hints_BxNxD=hints,
        logprobs_B=state.logprobs_B.at[slot].set(logprobs))
    return _constrain(new, plan.mesh)

  def generate(params, state: SlotState, rows: int):
    TRACES['generate'] += 1
    rope = step_lib.rope_table(arch, plan.cache_len)

    def one(st: SlotState, _):
      gates = step_lib.Gates.of(st.settings)
      keys_B = jax.vmap(jax.random.wrap_key_data)(st.key_data_B)
      kw = {}
      if lay.pflm:  # this step's K hints of each live row, read from the whole array
        h = st.hints_BxNxD
        kw['hints_BxKxD'] = jax.vmap(lambda b, s: jax.lax.dynamic_slice(
            h, (b, s * lay.K, 0), (1, lay.K, h.shape[2]))[0])(jnp.arange(rows), st.step_B)
        # the inverse-CDF readout's u of those hints, drawn again as insert drew them
        kw['step_u'] = lambda: jax.vmap(lambda k, s: jax.vmap(lambda i: sampling.uniform_noise(
            jax.random.fold_in(k, s * lay.K + i), ()))(jnp.arange(lay.K)))(keys_B, st.step_B)
      else:
        kw['step_keys'] = lambda: jax.vmap(jax.random.fold_in)(keys_B, st.step_B)
        kw['step_u'] = lambda: jax.vmap(lambda k, s: sampling.uniform_noise(
            jax.random.fold_in(k, s), ()))(keys_B, st.step_B)
      new, cache, counts, lp = step_lib.decode_step(
          model, params, st.last_BxF, st.cache, st.slot_B, st.pad_B, rope, st.settings, gates,
          st.counts_BxV, n_out_B=st.step_B * lay.K, logprobs=MAX_LOGPROBS,
          want_logprobs=jnp.any(st.logprobs_B), **kw)
      # a slot past its request's end keeps stepping (its output unread) without overflowing
      slot_B = jnp.minimum(st.slot_B + lay.K, plan.cache_len - lay.queries)
      return st.replace(cache=cache, slot_B=slot_B, last_BxF=new, step_B=st.step_B + 1,
                        counts_BxV=counts), (new, lp)

    # only the live slots [0, rows) are computed (the scheduler keeps them at the front);
    # the others keep their values. The cache and the hints stay whole (slicing them would
    # copy every live row's whole cache and hints per step): the step writes the live rows'
    # new keys and values in place and reads their rows (SlotCached) and step's hints.
    whole = {'cache': state.cache, 'hints_BxNxD': state.hints_BxNxD}
    live = jax.tree.map(lambda x: x[:rows], state.replace(**dict.fromkeys(whole))).replace(
        **whole)
    live, (toks, lp) = jax.lax.scan(one, live, length=plan.steps_per_call)
    if rows < state.slot_B.shape[0]:  # write back only what a step changes
      back = lambda full, part: jax.lax.dynamic_update_slice_in_dim(full, part, 0, axis=0)
      live = state.replace(cache=live.cache, **{
          name: back(getattr(state, name), getattr(live, name))
          for name in ('slot_B', 'last_BxF', 'step_B', 'counts_BxV')})
    return _constrain(live, plan.mesh), toks, lp

  def move(state: SlotState, src, dst):
    TRACES['move'] += 1
    return _constrain(jax.tree.map(lambda x: jax.lax.dynamic_update_slice_in_dim(
        x, jax.lax.dynamic_slice_in_dim(x, src, 1, axis=0), dst, axis=0), state), plan.mesh)

  if kind == 'prefill':
    return jax.jit(prefill)
  if kind == 'score':
    return jax.jit(score)
  if kind == 'insert':
    return jax.jit(insert, donate_argnums=1)
  if kind == 'move':
    return jax.jit(move, donate_argnums=0)
  return jax.jit(generate, donate_argnums=1, static_argnums=2)


def jitted(kind: str, arch: arch_lib.ArchConfig, exe: arch_lib.ExecConfig, plan: SlotPlan):
  """The jitted prefill / insert / generate of these configs, one per process."""
  with _JIT_LOCK:
    return _jitted(kind, arch, exe, plan)


class SlotEngine:
  """Serves one model (AR, or a PFLM of window k decoding K <= k tokens per step)."""

  def __init__(self, arch: arch_lib.ArchConfig, params, exe: arch_lib.ExecConfig | None = None,
               *, k: int, K: int, max_slots: int, max_len: int | None = None, mesh=None,
               steps_per_call: int = 1):
    self.pflm = k > 0
    if arch.pflm != self.pflm and self.pflm:
      raise step_lib.DecodeError(f'window k={k} given for a model without a noise encoder')
    if self.pflm and not 1 <= K <= k:
      raise step_lib.DecodeError(f'K={K}: allowed 1..{k} (the model\'s window k={k})')
    if not self.pflm and K != 1:
      raise step_lib.DecodeError(f'K={K}: an AR model decodes one token per step (K=1)')
    if max_slots < 1 or steps_per_call < 1:
      raise step_lib.DecodeError(f'max_slots={max_slots}, steps_per_call={steps_per_call}: '
                                 'both must be >= 1')
    if exe is not None and mesh is not None and mesh.size > 1:
      if exe.weights == 'int8':
        raise step_lib.DecodeError(f'int8 weights decode on one device; the mesh has '
                                   f'{mesh.size}: use another precision or one device')
      if exe.cache_products == 'kernel':
        raise step_lib.DecodeError(f"cache_products='kernel' runs on one device; the mesh "
                                   f'has {mesh.size}: choose auto, dot or reduce')
    self.arch, self.k, self.K = arch, k, K
    self.model = model_lib.build(arch, exe)
    self.exe = self.model.exe
    self.params = params
    mismatch = quantize.weights_mismatch(self.exe.weights, params)
    if mismatch:
      raise step_lib.DecodeError(mismatch)
    self.layout = step_lib.SlotLayout(K, self.pflm)
    self.max_len = max_len or arch.max_seq_len
    if self.max_len < 2:
      raise step_lib.DecodeError(f'max_len={self.max_len}: must be >= 2 (a prompt token and '
                                 'a new one)')
    self.cache_len = self.layout.longest_cache(self.max_len)
    # decode_attention='pallas' (GPU; interpret mode on CPU): each slot's step reads only
    # its filled cache slots; the kernel's cache lengths are whole blocks
    self.min_bucket = MIN_BUCKET
    if self.exe.decode_attention == 'pallas':
      self.cache_len = flash_decode.cache_length(self.cache_len)
      self.min_bucket = flash_decode.BLOCK_K
    self.max_slots = max_slots
    self.steps_per_call = steps_per_call
    self.mesh = mesh
    data = mesh.shape.get('data', 1) if mesh is not None else 1
    if max_slots % data:
      raise step_lib.DecodeError(f'max_slots={max_slots} must divide by the mesh data axis '
                                 f'({data})')
    hint_tokens = self.layout.steps(self.max_len - 1) * K if self.pflm else 0
    # An AR step of one row multiplies one activation row by each weight matrix. XLA:CPU
    # does that in float32, widening bf16 weights on every call (a one-row step of the CPU
    # decoding benchmark's model: ~2.9 ms in 'mixed' vs 1.4 in float32; two rows, with bf16
    # dots: 1.9); the offline loop widens them once, outside its loop. So in 'mixed' on a
    # CPU a one-row AR step runs on a float32 copy of the bf16 weights (their values; the
    # copy the offline batch-1 loop holds while it runs, here for the engine's life), with
    # float32 products and activations. With bf16 activations too ('bfloat16') the
    # smallest AR bucket is two rows instead.
    self.one_row_exe, self.one_row_params = None, None
    least = 1
    if not self.pflm and self.exe.params == jnp.bfloat16 and jax.default_backend() == 'cpu':
      if self.exe.compute == jnp.float32 and data == 1:
        self.one_row_exe = dataclasses.replace(self.exe, param_dtype='float32', dot_dtype='')
        self.one_row_params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
      else:
        least = 2
    # slot-count buckets: powers of two times the data axis (a bucket must split over it)
    self.buckets = tuple(sorted({min(max(data * 2 ** i, least), max_slots)
                                 for i in range(max_slots.bit_length() + 1)}))
    self.plan = SlotPlan(self.layout, self.cache_len, hint_tokens, steps_per_call, mesh)

  @property
  def feed(self) -> int:
    return self.layout.feed

  @property
  def queries(self) -> int:
    return self.layout.queries

  @property
  def traces(self) -> int:
    """Traces of the slot engine's functions in this process (every SlotEngine's)."""
    return sum(TRACES.values())

  # ---- validation ------------------------------------------------------------------------
  def check(self, prompt_len: int, max_tokens: int, params: SamplingParams | None = None
            ) -> None:
    """Raises DecodeError for a request this engine cannot serve (prompt + max_tokens >
    max_len, and with `params` a bad sampling setting)."""
    step_lib.check_length(prompt_len, max_tokens, self.max_len, 'max_tokens')
    if params is not None:
      step_lib.check_sampling(params.temperature, params.top_k, params.top_p,
                              params.freq_penalty, params.sampler, params.presence_penalty,
                              params.min_tokens)

  # ---- state -----------------------------------------------------------------------------
  def init_state(self) -> SlotState:
    """Free slots are greedy without penalty or filters: they make no sampling path run."""
    B, V = self.max_slots, self.arch.vocab_size
    z = lambda dtype: jnp.zeros((B,), dtype)
    settings = step_lib.Settings(temperature_B=z(jnp.float32), top_k_B=z(jnp.int32),
                                 top_p_B=jnp.ones((B,), jnp.float32),
                                 penalty_B=z(jnp.float32), sampler_B=z(jnp.int32),
                                 presence_B=z(jnp.float32), min_new_B=z(jnp.int32),
                                 banned_BxV=jnp.zeros((B, V), bool))
    hints = (jnp.zeros((B, self.plan.hint_tokens, self.arch.d_model), jnp.float32)
             if self.pflm else None)
    state = SlotState(
        cache=model_lib.init_cache(self.arch, self.exe, B, self.cache_len),
        slot_B=z(jnp.int32), pad_B=z(jnp.int32),
        last_BxF=jnp.zeros((B, self.feed), jnp.int32), step_B=z(jnp.int32),
        key_data_B=jnp.zeros((B, 2), jnp.uint32), settings=settings,
        counts_BxV=jnp.zeros((B, V), jnp.int32), hints_BxNxD=hints, logprobs_B=z(bool))
    if self.mesh is not None:
      state = jax.device_put(state, jax.tree.map(lambda x: NamedSharding(
          self.mesh, PartitionSpec('data', *([None] * (x.ndim - 1)))), state))
    return state

  def bucket(self, prompt_len: int) -> int:
    """Prefill length bucket (a power of two >= MIN_BUCKET) of a prompt."""
    n = self.layout.first_slot(prompt_len)
    b = self.min_bucket
    while b < n:
      b *= 2
    return min(b, self.cache_len)

  # ---- compiled pieces -------------------------------------------------------------------
  def prefill(self, prompt: list[int]) -> Prefix:
    """The KV cache of all but the last `feed` tokens of the (left-padded) prompt."""
    P = self.layout.padded_len(len(prompt))
    pad, n = P - len(prompt), self.layout.first_slot(len(prompt))
    bucket = self.bucket(len(prompt))
    toks = np.zeros((1, bucket), np.int32)
    full = np.zeros((P,), np.int32)
    full[pad:] = prompt
    toks[0, :n] = full[:n]
    fn = jitted('prefill', self.arch, self.exe, self.plan)
    return fn(self.params, toks, np.int32(pad), np.int32(n), full[n:])

  def insert(self, state: SlotState, prefix: Prefix, slot: int,
             sp: SamplingParams) -> SlotState:
    """`prefix` in slot `slot` with its sampling settings (state is donated)."""
    settings = step_lib.settings(1, self.arch.vocab_size, temperature=sp.temperature,
                                 top_k=sp.top_k, top_p=sp.top_p, freq_penalty=sp.freq_penalty,
                                 presence_penalty=sp.presence_penalty,
                                 min_new_tokens=sp.min_tokens, banned=sp.banned,
                                 sampler=sp.sampler)
    fn = jitted('insert', self.arch, self.exe, self.plan)
    return fn(self.params, state, prefix, np.int32(slot),
              jax.tree.map(lambda x: x[0], settings), np.int32(sp.seed), np.bool_(sp.logprobs))

  def score(self, prompt: list[int]) -> step_lib.Logprobs:
    """An AR model's log-probability of each prompt token after the previous ones, and
    the top MAX_LOGPROBS alternatives: ([T - 1], [T - 1, N], [T - 1, N]) as device arrays
    (one compile per prefill bucket)."""
    if self.pflm:
      raise step_lib.DecodeError('prompt log-probabilities are an AR model\'s (a push-forward '
                                 'model scores nothing without its noise)')
    T = len(prompt)
    b = self.min_bucket
    while b < T:
      b *= 2
    toks = np.zeros((1, min(b, self.cache_len)), np.int32)
    toks[0, :T] = prompt
    lp = jitted('score', self.arch, self.exe, self.plan)(self.params, toks)
    return jax.tree.map(lambda x: x[:T - 1], lp)

  def rows(self, live: int) -> int:
    """The slot-count bucket that computes slots [0, live): the smallest of `buckets`."""
    return next(b for b in self.buckets if b >= live)

  def generate(self, state: SlotState, rows: int | None = None):
    """Advances slots [0, rows) (a bucket; default all) by steps_per_call steps: (state,
    tokens [n, rows, K] int32, Logprobs [n, rows, K, ...] -- zeros unless some slot asked
    for them). The filters run when some slot's settings use them."""
    rows = self.max_slots if rows is None else rows
    if rows not in self.buckets:
      raise step_lib.DecodeError(f'rows={rows}: allowed {self.buckets}')
    fn, params = self.step_program(rows)
    return fn(params, state, rows)

  def step_program(self, rows: int):
    """(the jitted generate, the parameters it takes) of a `rows` bucket: a one-row AR
    step of a CPU engine in 'mixed' runs in float32 on one_row_params."""
    if rows == 1 and self.one_row_exe is not None:
      return jitted('generate', self.arch, self.one_row_exe, self.plan), self.one_row_params
    return jitted('generate', self.arch, self.exe, self.plan), self.params

  def move(self, state: SlotState, src: int, dst: int) -> SlotState:
    """Slot src's request copied into slot dst (state is donated): the scheduler keeps
    the live slots at the front so that a small bucket computes them."""
    return jitted('move', self.arch, self.exe, self.plan)(state, np.int32(src), np.int32(dst))

  def warmup(self) -> int:
    """Compiles, before serving, everything a request can reach: every prefill, insert
    and (AR) prompt-scoring length bucket, every slot-count bucket of generate, and move;
    returns the number of programs. With a persistent compilation cache
    (jax_compilation_cache_dir) a restart loads them instead."""
    lengths, b = [], self.min_bucket
    while True:
      lengths.append(min(b, self.cache_len))
      if b >= self.cache_len:
        break
      b *= 2
    state = self.init_state()
    n = 0
    for length in sorted(set(lengths)):
      # the longest prompt in this bucket that the engine accepts
      prompt_len = max(1, min(self.max_len - 1, length + self.feed))
      while prompt_len > 1 and self.bucket(prompt_len) > length:
        prompt_len -= 1
      state = self.insert(state, self.prefill([1] * prompt_len), 0, SamplingParams())
      n += 2
      if not self.pflm and length <= self.max_len:
        self.score([1] * max(2, min(length, self.max_len)))
        n += 1
    for rows in self.buckets:
      state, toks, _ = self.generate(state, rows)
      n += 1
    state = self.move(state, 0, self.max_slots - 1)
    jax.block_until_ready(state)
    return n + 1
