"""The one table from Hugging Face tensor names to kforcing_jax parameters.

Each rule names a Hugging Face tensor (`{i}`: the layer), the parameter it fills, which
slice of it (fused q/k/v kernels take three tensors), and how the values are laid out.
The model's own parameter tree decides which rules apply: a rule whose parameter the
architecture does not have (a fused `qkv_kernel` under grouped-query attention, biases,
q/k norms, an untied head) is inactive. From the active rules follow both the tensors a
checkpoint must hold, with their shapes, and how each one is placed; reading is strict:
missing, unexpected and misshapen tensors are listed by name. GGUF files go through the
same table after their tensors are renamed (kforcing_jax.interop.gguf).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import numpy as np

from kforcing_jax import errors

COPY = 'copy'  # same shape
FLAT = 'flat'  # a vector reshaped to the slot ([H * hd] -> [H, hd])
LINEAR_IN1 = 'linear_in1'  # torch Linear [out, in] -> kernel [in, *out]
LINEAR_IN2 = 'linear_in2'  # torch Linear [out, in] -> kernel [*in (two axes), out]


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str  # Hugging Face name; {i} is the layer index
  param: str  # '/'-joined parameter path; {i} likewise
  layout: str  # COPY | FLAT | LINEAR_IN1 | LINEAR_IN2
  slot: tuple[int, int] | None = None  # (axis, index) of the parameter this tensor fills


_L = 'model.layers.{i}.'
_B = 'block_{i}/'
RULES = (
    Rule('model.embed_tokens.weight', 'embed/embedding', COPY),
    Rule('model.norm.weight', 'ln_f/scale', COPY),
    Rule('lm_head.weight', 'head/kernel', LINEAR_IN1),
    Rule(_L + 'input_layernorm.weight', _B + 'ln1/scale', COPY),
    Rule(_L + 'post_attention_layernorm.weight', _B + 'ln2/scale', COPY),
    # multi-head attention: one fused [D, 3, H, hd] kernel
    Rule(_L + 'self_attn.q_proj.weight', _B + 'attn/qkv_kernel', LINEAR_IN1, (1, 0)),
    Rule(_L + 'self_attn.k_proj.weight', _B + 'attn/qkv_kernel', LINEAR_IN1, (1, 1)),
    Rule(_L + 'self_attn.v_proj.weight', _B + 'attn/qkv_kernel', LINEAR_IN1, (1, 2)),
    Rule(_L + 'self_attn.q_proj.bias', _B + 'attn/qkv_bias', FLAT, (0, 0)),
    Rule(_L + 'self_attn.k_proj.bias', _B + 'attn/qkv_bias', FLAT, (0, 1)),
    Rule(_L + 'self_attn.v_proj.bias', _B + 'attn/qkv_bias', FLAT, (0, 2)),
    # grouped-query attention: q [D, H, hd] and a fused [D, 2, Hkv, hd] k/v kernel
    Rule(_L + 'self_attn.q_proj.weight', _B + 'attn/q_kernel', LINEAR_IN1),
    Rule(_L + 'self_attn.k_proj.weight', _B + 'attn/kv_kernel', LINEAR_IN1, (1, 0)),
    Rule(_L + 'self_attn.v_proj.weight', _B + 'attn/kv_kernel', LINEAR_IN1, (1, 1)),
    Rule(_L + 'self_attn.q_proj.bias', _B + 'attn/q_bias', FLAT),
    Rule(_L + 'self_attn.k_proj.bias', _B + 'attn/kv_bias', FLAT, (0, 0)),
    Rule(_L + 'self_attn.v_proj.bias', _B + 'attn/kv_bias', FLAT, (0, 1)),
    Rule(_L + 'self_attn.o_proj.weight', _B + 'attn/out_kernel', LINEAR_IN2),
    Rule(_L + 'self_attn.o_proj.bias', _B + 'attn/out_bias', COPY),
    Rule(_L + 'self_attn.q_norm.weight', _B + 'attn/q_norm/scale', COPY),
    Rule(_L + 'self_attn.k_norm.weight', _B + 'attn/k_norm/scale', COPY),
    # SwiGLU: silu(gate) * up
    Rule(_L + 'mlp.gate_proj.weight', _B + 'mlp/fc_in_0/kernel', LINEAR_IN1),
    Rule(_L + 'mlp.up_proj.weight', _B + 'mlp/fc_in_1/kernel', LINEAR_IN1),
    Rule(_L + 'mlp.down_proj.weight', _B + 'mlp/fc_out/kernel', LINEAR_IN1),
    Rule(_L + 'mlp.gate_proj.bias', _B + 'mlp/fc_in_0/bias', COPY),
    Rule(_L + 'mlp.up_proj.bias', _B + 'mlp/fc_in_1/bias', COPY),
    Rule(_L + 'mlp.down_proj.bias', _B + 'mlp/fc_out/bias', COPY),
)
# present in some checkpoints, not read by transformers either: the head of a model with
# tied embeddings (transformers uses the embedding), RoPE tables of old Llama checkpoints
IGNORED_WHEN_TIED = ('lm_head.weight',)
IGNORED_SUFFIXES = ('.rotary_emb.inv_freq',)


class WeightError(errors.UserError):
  pass


@dataclasses.dataclass(frozen=True)
class Placement:
  param: str
  slot: tuple[int, int] | None
  layout: str
  shape: tuple[int, ...]  # the Hugging Face tensor's shape


def _slot_shape(shape: tuple[int, ...], slot) -> tuple[int, ...]:
  if slot is None:
    return tuple(shape)
  axis, _ = slot
  return tuple(shape[:axis]) + tuple(shape[axis + 1:])


def _hf_shape(layout: str, slot_shape: tuple[int, ...]) -> tuple[int, ...]:
  if layout == COPY:
    return slot_shape
  if layout == FLAT:
    return (math.prod(slot_shape),)
  n_in = 1 if layout == LINEAR_IN1 else 2
  return (math.prod(slot_shape[n_in:]), math.prod(slot_shape[:n_in]))


def plan(param_shapes: dict[str, tuple[int, ...]], n_layers: int) -> dict[str, Placement]:
  """{Hugging Face name: Placement} for a model whose parameters have these shapes
  ('/'-joined paths). Every parameter must be filled completely by the active rules."""
  out: dict[str, Placement] = {}
  filled: dict[str, set] = {}
  for rule in RULES:
    layers = range(n_layers) if '{i}' in rule.hf else (None,)
    for i in layers:
      param = rule.param.format(i=i)
      if param not in param_shapes:
        continue
      name = rule.hf.format(i=i)
      if name in out:
        raise WeightError(f'internal: {name} maps to both {out[name].param} and {param}')
      shape = tuple(param_shapes[param])
      out[name] = Placement(param, rule.slot, rule.layout,
                            _hf_shape(rule.layout, _slot_shape(shape, rule.slot)))
      filled.setdefault(param, set()).add(rule.slot)
  for param, shape in param_shapes.items():
    slots = filled.get(param, set())
    if None in slots:
      continue
    axis = next(iter(slots))[0] if slots else 0
    if not slots or {s[1] for s in slots} != set(range(shape[axis])):
      raise WeightError(f'the model parameter {param} {list(shape)} has no complete source in '
                        'the Hugging Face mapping: this architecture cannot be imported')
  return out


def check_names(placements: dict[str, Placement], shapes: dict[str, tuple[int, ...]],
                tied: bool, describe=lambda name: name) -> list[str]:
  """The tensor names to read; raises WeightError listing missing, unexpected and
  misshapen tensors (named through `describe`, e.g. as the GGUF file names them)."""
  ignored = {n for n in shapes if n.endswith(IGNORED_SUFFIXES)
             or (tied and n in IGNORED_WHEN_TIED)}
  missing = sorted(set(placements) - set(shapes))
  unexpected = sorted(set(shapes) - set(placements) - ignored)
  problems = []
  if missing:
    problems.append('missing: ' + ', '.join(describe(n) for n in missing))
  if unexpected:
    problems.append('unexpected: ' + ', '.join(describe(n) for n in unexpected))
  wrong = [f'{describe(n)} {list(shapes[n])} (expected {list(p.shape)})'
           for n, p in placements.items() if n in shapes and tuple(shapes[n]) != p.shape]
  if wrong:
    problems.append('misshapen: ' + ', '.join(wrong))
  if problems:
    raise WeightError('the checkpoint does not match its config: ' + '; '.join(problems))
  return [n for n in shapes if n in placements]


def build(placements: dict[str, Placement], param_shapes: dict[str, tuple[int, ...]],
          tensors: Iterable[tuple[str, np.ndarray]], dtype=np.float32) -> dict:
  """The nested parameter tree, filled from (name, array) pairs read one at a time (each
  is cast into the tree and dropped, so memory stays about one copy of the model)."""
  flat = {p: np.empty(s, dtype) for p, s in param_shapes.items()}
  seen = set()
  for name, value in tensors:
    p = placements[name]
    seen.add(name)
    value = np.asarray(value)
    if tuple(value.shape) != p.shape:
      raise WeightError(f'{name} has shape {list(value.shape)}, expected {list(p.shape)}')
    target = flat[p.param]
    index = (slice(None),) * p.slot[0] + (p.slot[1],) if p.slot else ()
    slot = target[index]
    if p.layout in (LINEAR_IN1, LINEAR_IN2):
      value = value.T
    slot[...] = value.reshape(slot.shape)
  if set(placements) - seen:  # never leave a parameter uninitialised
    raise WeightError('tensors never read: ' + ', '.join(sorted(set(placements) - seen)))
  return unflatten(flat)


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def flatten_shapes(tree, prefix: str = '') -> dict[str, tuple[int, ...]]:
  """{'a/b/c': shape} of a nested dict of arrays or ShapeDtypeStructs."""
  out = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, dict) or hasattr(value, 'items'):
      out.update(flatten_shapes(value, path + '/'))
    else:
      out[path] = tuple(value.shape)
  return out

