"""Per-device memory estimate of a training step (parameters, optimizer state, gradients,
activations) and of the decoding KV cache, printed at the start of every training stage.

    python launch/plan_memory.py --config=configs/owt_8xh100.py --devices=8 [--compile]

prints the estimate for a config's mesh without any accelerator (`--devices` fakes that
many CPU devices) and, with `--compile`, XLA's own buffer assignment of the teacher step
(`compiled.memory_analysis()`) beside it, so a config can be checked before it is launched.

Parameters and optimizer state are exact (their per-device shard shapes). Activations and
gradient buffers are an estimate whose constants were measured against XLA's buffer
assignment for this model without rematerialisation (XLA:CPU; tests/test_memory.py holds the
teacher step at the paper's shape and at a small Llama-family shape to 10% of it):
  per layer and token:  ACT_BYTES_PER_D x D  (f32 residual and norm copies, the output
                        projection, RoPE inputs)
                      + ACT_BYTES_PER_QKV x (heads + 2 kv_heads) x head_dim  (q, k, v)
                      + ACT_BYTES_PER_MLP x mlp_dim  (the MLP intermediates; a gated MLP's
                        two input projections measured no larger than one)
                      + SCORE_BYTES x heads x keys  (f32 scores and probabilities; 0 when a
                        fused attention kernel (cuDNN on GPU) never materialises them)
  per token:            LOGIT_BYTES x V  (logits, log-softmax and its gradient)
  per target (distill): TARGET_BYTES x V  (the teacher's f32 logits and the double-float
                        CDF of the inverse-CDF targets, alive while targets are drawn)
  per parameter:        a compute-dtype copy of the gathered weights, plus f32 gradients and
                        update temporaries for the device's shard.
Activations are split over every mesh axis (XLA shards the tensor-parallel intermediates
and the replicated residual stream alike).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from kforcing_jax.models import transformer as model_lib
from kforcing_jax import runtime

# At the paper's shape (mlp_dim 4D, heads x head_dim = D) the per-layer terms are 96 x D.
ACT_BYTES_PER_D = 74
ACT_BYTES_PER_QKV = 2
ACT_BYTES_PER_MLP = 4
SCORE_BYTES = 8
LOGIT_BYTES = 14
TARGET_BYTES = 16
GATHERED_WEIGHT_BYTES = 2
GRAD_BYTES = 8

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  params: int  # bytes per device (exact: the device's shards)
  optimizer: int  # Adam moments (+ EMA copy), exact
  gradients: int  # gathered compute-dtype weights + f32 gradient/update buffers (estimate)
  activations: int  # saved for the backward pass, one microbatch (estimate)
  kv_cache: int  # decoding cache for `cache_rows` rows of `cache_len` tokens
  rows_per_device: float  # rows of one microbatch on one device
  cache_rows: int
  cache_len: int

  @property
  def state(self) -> int:
    return self.params + self.optimizer

  @property
  def train_total(self) -> int:
    return self.params + self.optimizer + self.gradients + self.activations

  def summary(self, capacity: int | None = None) -> str:
    g = lambda b: f'{b / GiB:.2f}'
    line = (f'memory per device (GiB): params {g(self.params)}, optimizer {g(self.optimizer)}, '
            f'gradients ~{g(self.gradients)}, activations ~{g(self.activations)} '
            f'({self.rows_per_device:g} rows/microbatch) = train step ~{g(self.train_total)}; '
            f'KV cache {g(self.kv_cache)} for decoding {self.cache_rows} x {self.cache_len}')
    if capacity:
      line += f'; device has {g(capacity)}'
    return line


def tree_bytes_per_device(tree) -> int:
  """Bytes of one device's shards of a tree of arrays / ShapeDtypeStructs with shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.shape
    sharding = getattr(leaf, 'sharding', None)
    if sharding is not None:
      shape = sharding.shard_shape(shape)
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def activation_bytes(arch, rows: float, tokens: int, keys: int, fused_attention: bool = False,
                     window: int = 0, target_factor: float = 1.0) -> int:
  """Saved activations of `rows` rows of `tokens` query positions attending `keys` keys.

  window > 0: the distillation window layout, whose tokens + tokens*window queries attend
  the context (tokens keys) plus their own window, with the teacher's targets drawn first
  (target_factor: the [N, k, V] arrays they hold, in units of an AR teacher's k-token
  rollout: Objective.target_memory)."""
  queries = tokens * (1 + window)
  per_token_layer = (ACT_BYTES_PER_D * arch.d_model + ACT_BYTES_PER_MLP * arch.mlp_dim +
                     ACT_BYTES_PER_QKV * (arch.n_heads + 2 * arch.n_kv_heads) * arch.head_dim)
  score_keys = 0 if fused_attention else (keys + window)
  per_layer = queries * (per_token_layer + SCORE_BYTES * arch.n_heads * score_keys)
  logits = LOGIT_BYTES * arch.vocab_size * tokens * max(window, 1)
  targets = TARGET_BYTES * arch.vocab_size * tokens * window * target_factor
  return int(rows * (arch.n_layers * per_layer + logits + targets))


def kv_cache_bytes(arch, exe, rows: int, length: int, mesh) -> int:
  split = mesh.shape['data'] * mesh.shape['fsdp'] * mesh.shape['tensor']
  return int(model_lib.cache_bytes(arch, exe, rows, length) / split)


def uses_fused_attention(exe) -> bool:
  return exe.resolved().attention_impl == 'cudnn'


def estimate(arch, exe, abstract_state, mesh, global_batch: int, seq_len: int,
             microbatches: int = 1, window: int = 0, cache_rows: int | None = None,
             fused_attention: bool | None = None, target_factor: float = 1.0) -> MemoryEstimate:
  """The estimate for one training step over `global_batch` rows of `seq_len` tokens.

  abstract_state: a TrainState of ShapeDtypeStructs with shardings (trainer.abstract_state).
  window: 0 for the AR teacher step; k for a distill step of window k (window layout)."""
  fsdp, tensor = mesh.shape['fsdp'], mesh.shape['tensor']
  n_devices = math.prod(mesh.shape.values())
  params = tree_bytes_per_device(abstract_state.params)
  optimizer = tree_bytes_per_device((abstract_state.opt_state, abstract_state.ema_params))
  gradients = int(n_params(abstract_state) * (GATHERED_WEIGHT_BYTES / tensor + GRAD_BYTES / (fsdp * tensor)))
  rows = global_batch / microbatches / n_devices
  if fused_attention is None:
    fused_attention = uses_fused_attention(exe) and window == 0
  acts = activation_bytes(arch, rows, seq_len, seq_len, fused_attention, window,
                          target_factor)
  cache_rows = global_batch if cache_rows is None else cache_rows
  return MemoryEstimate(params=params, optimizer=optimizer, gradients=gradients,
                        activations=acts,
                        kv_cache=kv_cache_bytes(arch, exe, cache_rows, seq_len, mesh),
                        rows_per_device=rows, cache_rows=cache_rows, cache_len=seq_len)


def n_params(abstract_state) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))


def compiled_bytes(compiled) -> dict | None:
  """XLA's per-device buffer sizes of a compiled step (None where the backend has none)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  out = {'arguments': int(m.argument_size_in_bytes), 'outputs': int(m.output_size_in_bytes),
         'aliased': int(m.alias_size_in_bytes), 'temp': int(m.temp_size_in_bytes)}
  out['total'] = out['arguments'] + out['outputs'] - out['aliased'] + out['temp']
  return out


def report(stage: str, est: MemoryEstimate, warn_fraction: float = 0.9) -> None:
  capacity = runtime.device_memory_bytes() if jax.default_backend() != 'cpu' else None
  if jax.process_index() == 0:
    print(f'{stage}: {est.summary(capacity)}')
    if capacity and est.train_total > warn_fraction * capacity:
      print(f'{stage}: WARNING the estimate exceeds {warn_fraction:.0%} of device memory; raise '
            'the stage\'s microbatches or mesh.fsdp, or lower its batch_size')
