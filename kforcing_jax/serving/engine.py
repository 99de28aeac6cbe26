"""A continuous-batching slot engine for AR and PFLM models (JetStream's method set:
prefill, insert, generate).

A fixed number of slots share one donated, fixed-shape decode state: the KV cache of every
slot ([slots, heads, ...] per layer, slots along the mesh's data axis), and per slot its
next cache slot, left padding, last fed tokens, decoding step, noise key, sampling settings
and penalty counts. `prefill` computes a prompt's KV cache in a length bucket (one compile
per bucket); `insert` puts it into a free slot between steps; `generate` advances every
slot by K tokens (AR: 1) at its own position in one jitted call (optionally several steps
per call). Stopping (EOS, max tokens, stop strings, cancellation) is the caller's: it reads
each step's tokens and frees slots (kforcing_jax.serving.scheduler).

Exactness: a slot computes what `decode.Engine.generate` computes for its request alone --
the same left padding to at least K + 1 prompt tokens, RoPE positions, masked attention,
noise (token j of a request with seed s uses fold_in(fold_in(key(s), 0), j)) and
samplers -- so its tokens do not depend on what else is being served.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from kforcing_jax.models import attention as attn_lib
from kforcing_jax.decoding import engine as decode
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.models import transformer as model_lib
from kforcing_jax.models import sampling

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """One request's settings (AR: temperature / top_k / top_p; PFLM: freq_penalty)."""
  temperature: float = 1.0  # 0 = greedy
  top_k: int = 0
  top_p: float = 1.0
  freq_penalty: float = 0.0
  seed: int = 0


@flax.struct.dataclass
class SlotState:
  cache: Any  # {'k': L x [B, heads, head_dim, S], 'v': L x [B, heads, S, head_dim]}
  slot_B: jax.Array  # int32: cache slot of the next step's first input
  pad_B: jax.Array  # int32: first valid cache slot (left padding)
  last_BxF: jax.Array  # int32: tokens fed next step
  step_B: jax.Array  # int32: decoding steps done (indexes keys and noise)
  key_B: jax.Array  # uint32 [B, 2]: key data of fold_in(key(seed), 0)
  temperature_B: jax.Array
  top_k_B: jax.Array
  top_p_B: jax.Array
  penalty_B: jax.Array
  counts_BxV: jax.Array  # int32 generated-token counts (PFLM penalty; [B, 1] for AR)


@flax.struct.dataclass
class Prefix:
  """A prefilled prompt: its KV cache [L][1, ..., bucket], padding and the fed tail."""
  cache: Any
  pad: jax.Array
  prefill: jax.Array  # cache slot of the first step's first input
  tail_F: jax.Array


def row_filter(logits_BxV, top_k_B, top_p_B, use_top_k: bool, use_top_p: bool):
  """decode.filter_logits with per-row top_k (0 = off) and top_p (1 = off)."""
  V = logits_BxV.shape[-1]
  if use_top_k:
    kth = jnp.take_along_axis(jnp.sort(logits_BxV, axis=-1)[:, ::-1],
                              jnp.clip(top_k_B - 1, 0, V - 1)[:, None], axis=-1)
    filtered = jnp.where(logits_BxV < kth, model_lib.NEG_INF, logits_BxV)
    logits_BxV = jnp.where((top_k_B > 0)[:, None], filtered, logits_BxV)
  if use_top_p:
    sorted_l = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_l, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    cutoff_idx = jnp.sum(cum - probs < top_p_B[:, None], axis=-1, keepdims=True) - 1
    cutoff = jnp.take_along_axis(sorted_l, cutoff_idx, axis=-1)
    filtered = jnp.where(logits_BxV < cutoff, model_lib.NEG_INF, logits_BxV)
    logits_BxV = jnp.where((top_p_B < 1.0)[:, None], filtered, logits_BxV)
  return logits_BxV


class SlotEngine:
  """Serves one model (AR, or a PFLM of window k decoding K <= k tokens per step)."""

  def __init__(self, arch: arch_lib.ArchConfig, params, exe: arch_lib.ExecConfig | None = None,
               *, k: int, K: int, max_slots: int, max_len: int | None = None, mesh=None,
               steps_per_call: int = 1):
    self.pflm = k > 0
    if arch.pflm != self.pflm and self.pflm:
      raise decode.DecodeError(f'window k={k} given for a model without a noise encoder')
    if self.pflm and not 1 <= K <= k:
      raise decode.DecodeError(f'K={K}: allowed 1..{k} (the model\'s window k={k})')
    if not self.pflm and K != 1:
      raise decode.DecodeError(f'K={K}: an AR model decodes one token per step (K=1)')
    if max_slots < 1 or steps_per_call < 1:
      raise decode.DecodeError(f'max_slots={max_slots}, steps_per_call={steps_per_call}: '
                               'both must be >= 1')
    self.arch, self.k, self.K = arch, k, K
    self.model = model_lib.build(arch, exe)
    self.exe = self.model.exe
    if self.exe.decode_attention != 'xla':
      raise decode.DecodeError("the slot engine's cached attention is decode_attention='xla'")
    self.params = params
    self.feed = K if self.pflm else 1
    self.queries = 2 * K if self.pflm else 1
    self.max_len = max_len or arch.max_seq_len
    self.cache_len = decode.align(self.max_len + self.feed + 1 + 2 * K)
    self.max_slots = max_slots
    self.steps_per_call = steps_per_call
    self.mesh = mesh
    data = mesh.shape.get('data', 1) if mesh is not None else 1
    if max_slots % data:
      raise decode.DecodeError(f'max_slots={max_slots} must divide by the mesh data axis ({data})')
    self.traces = 0
    self._lock = threading.Lock()
    self._fns = {}

  # ---- validation ------------------------------------------------------------------------
  def check(self, prompt_len: int, max_tokens: int) -> None:
    if prompt_len < 1:
      raise decode.DecodeError('prompt: give at least one token')
    if max_tokens < 1:
      raise decode.DecodeError(f'max_tokens={max_tokens}: must be >= 1')
    if prompt_len + max_tokens > self.max_len:
      raise decode.DecodeError(f'prompt of {prompt_len} tokens + max_tokens={max_tokens} '
                               f'exceeds the model\'s maximum length {self.max_len}')

  # ---- state -----------------------------------------------------------------------------
  def _sharding(self, ndim: int):
    if self.mesh is None:
      return None
    return NamedSharding(self.mesh, PartitionSpec('data', *([None] * (ndim - 1))))

  def _state_shardings(self, state):
    return jax.tree.map(lambda x: self._sharding(x.ndim), state)

  def init_state(self) -> SlotState:
    B, V = self.max_slots, self.arch.vocab_size
    z = lambda dtype: jnp.zeros((B,), dtype)
    state = SlotState(
        cache=model_lib.init_cache(self.arch, self.exe, B, self.cache_len),
        slot_B=z(jnp.int32), pad_B=z(jnp.int32),
        last_BxF=jnp.zeros((B, self.feed), jnp.int32), step_B=z(jnp.int32),
        key_B=jnp.zeros((B, 2), jnp.uint32), temperature_B=jnp.ones((B,), jnp.float32),
        top_k_B=z(jnp.int32), top_p_B=jnp.ones((B,), jnp.float32), penalty_B=z(jnp.float32),
        counts_BxV=jnp.zeros((B, V if self.pflm else 1), jnp.int32))
    if self.mesh is not None:
      state = jax.device_put(state, self._state_shardings(state))
    return state

  def bucket(self, prompt_len: int) -> int:
    """Prefill length bucket (a power of two >= MIN_BUCKET) of a prompt."""
    n = max(prompt_len, self.feed + 1) - self.feed
    b = MIN_BUCKET
    while b < n:
      b *= 2
    return min(b, self.cache_len)

  # ---- compiled pieces -------------------------------------------------------------------
  def _jit(self, name, make):
    with self._lock:
      if name not in self._fns:
        self._fns[name] = make()
      return self._fns[name]

  def _rope(self, pos):
    cos, sin = model_lib.rope_cos_sin(pos, self.arch.head_dim, self.arch.rope_base)
    return cos, sin

  def prefill(self, prompt: list[int]) -> Prefix:
    """The KV cache of all but the last `feed` tokens of the (left-padded) prompt."""
    P = max(len(prompt), self.feed + 1)
    pad, n = P - len(prompt), P - self.feed
    bucket = self.bucket(len(prompt))
    toks = np.zeros((1, bucket), np.int32)
    full = np.zeros((P,), np.int32)
    full[pad:] = prompt
    toks[0, :n] = full[:n]

    def make():
      def run(params, toks, pad, n, tail):
        self.traces += 1
        T = toks.shape[1]
        slots = jnp.arange(T)
        mask = (slots[None, None, :] <= slots[None, :, None]) & (slots[None, None, :] >= pad)
        attend = attn_lib.Cached(jnp.int32(0), mask, jnp.reshape(pad, (1,)), 'xla',
                                 self.exe.cache_products)
        pos = jnp.maximum(slots - pad, 0)[None]
        cache = model_lib.init_cache(self.arch, self.exe, 1, T)
        _, cache = self.model.apply({'params': params}, toks, cache, attend, self._rope(pos),
                                    logits_from=T, method=model_lib.Transformer.decode_step)
        return Prefix(cache=cache, pad=pad, prefill=n, tail_F=tail)
      return jax.jit(run)
    fn = self._jit(('prefill', bucket), make)
    return fn(self.params, jnp.asarray(toks), jnp.int32(pad), jnp.int32(n),
              jnp.asarray(full[n:], jnp.int32))

  def insert(self, state: SlotState, prefix: Prefix, slot: int,
             sp: SamplingParams) -> SlotState:
    """`prefix` in slot `slot` with its sampling settings (state is donated)."""
    bucket = prefix.cache['v'][0].shape[2]

    def make():
      def run(state, prefix, slot, temperature, top_k, top_p, penalty, seed):
        self.traces += 1
        def put(c, p):  # the prefix's slots 0..bucket of this slot's row
          return jax.lax.dynamic_update_slice(c, p.astype(c.dtype), [slot] + [0] * (c.ndim - 1))
        cache = jax.tree.map(put, state.cache, prefix.cache)
        key = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 0))
        return state.replace(
            cache=cache, slot_B=state.slot_B.at[slot].set(prefix.prefill),
            pad_B=state.pad_B.at[slot].set(prefix.pad),
            last_BxF=state.last_BxF.at[slot].set(prefix.tail_F),
            step_B=state.step_B.at[slot].set(0), key_B=state.key_B.at[slot].set(key),
            temperature_B=state.temperature_B.at[slot].set(temperature),
            top_k_B=state.top_k_B.at[slot].set(top_k), top_p_B=state.top_p_B.at[slot].set(top_p),
            penalty_B=state.penalty_B.at[slot].set(penalty),
            counts_BxV=state.counts_BxV.at[slot].set(0))
      shardings = self._state_shardings(state) if self.mesh is not None else None
      return jax.jit(run, donate_argnums=0, out_shardings=shardings)
    fn = self._jit(('insert', bucket), make)
    return fn(state, prefix, jnp.int32(slot), jnp.float32(sp.temperature), jnp.int32(sp.top_k),
              jnp.float32(sp.top_p), jnp.float32(sp.freq_penalty), jnp.int32(sp.seed))

  def generate(self, state: SlotState, *, top_k: bool = False, top_p: bool = False):
    """Advances every slot by steps_per_call steps: (state, tokens [n, B, K] int32)."""
    key = ('generate', bool(top_k) and not self.pflm, bool(top_p) and not self.pflm)

    def make():
      def run(params, state):
        self.traces += 1
        return jax.lax.scan(lambda st, _: self._step(params, st, key[1], key[2]), state,
                            length=self.steps_per_call)
      shardings = self._state_shardings(state) if self.mesh is not None else None
      return jax.jit(run, donate_argnums=1,
                     out_shardings=None if shardings is None else (shardings, None))
    return self._jit(key, make)(self.params, state)

  def _step(self, params, st: SlotState, use_top_k: bool, use_top_p: bool):
    K, Q, S = self.K, self.queries, self.cache_len
    B = st.slot_B.shape[0]
    q_slots = st.slot_B[:, None] + jnp.arange(Q)
    k_slots = jnp.arange(S)
    mask = (k_slots[None, None] <= q_slots[:, :, None]) & (k_slots[None, None] >=
                                                           st.pad_B[:, None, None])
    attend = attn_lib.SlotCached(st.slot_B, mask, self.exe.cache_products)
    rope_cs = self._rope(jnp.maximum(q_slots - st.pad_B[:, None], 0))
    keys = jax.vmap(jax.random.wrap_key_data)(st.key_B)
    apply = lambda *a, **kw: self.model.apply({'params': params}, *a, **kw)
    counts = st.counts_BxV
    if self.pflm:
      idx_BxK = st.step_B[:, None] * K + jnp.arange(K)
      u = jax.vmap(lambda key, js: jax.vmap(lambda j: sampling.uniform_noise(
          jax.random.fold_in(key, j), ()))(js))(keys, idx_BxK)
      hints = apply(u, jnp.ones((B,), jnp.float32), method=model_lib.Transformer.encode_noise)
      logits, cache = apply(st.last_BxF, st.cache, attend, rope_cs, hints_BxHxD=hints,
                            logits_from=K, method=model_lib.Transformer.decode_step)
      rows = jnp.arange(B)
      out = []
      for i in range(K):
        yi = sampling.first_argmax(logits[:, i] - st.penalty_B[:, None] *
                                 counts.astype(jnp.float32))
        counts = counts.at[rows, yi].add(1)
        out.append(yi)
      new = jnp.stack(out, axis=1)
    else:
      logits, cache = apply(st.last_BxF, st.cache, attend, rope_cs,
                            method=model_lib.Transformer.decode_step)
      l = logits[:, 0]
      greedy = st.temperature_B == 0.0
      tempered = row_filter(l / jnp.where(greedy, 1.0, st.temperature_B)[:, None], st.top_k_B,
                            st.top_p_B, use_top_k, use_top_p)
      step_keys = jax.vmap(jax.random.fold_in)(keys, st.step_B)
      drawn = jax.vmap(jax.random.categorical)(step_keys, tempered).astype(jnp.int32)
      new = jnp.where(greedy, sampling.first_argmax(l), drawn)[:, None]
    # a slot past its request's end keeps stepping (its output unread) without overflowing
    return st.replace(cache=cache, slot_B=jnp.minimum(st.slot_B + K, S - Q), last_BxF=new,
                      step_B=st.step_B + 1, counts_BxV=counts), new
