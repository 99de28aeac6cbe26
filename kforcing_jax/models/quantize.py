"""Weight-only int8 for decoding: the weight products of the blocks and the head read int8
weights with one float32 scale per output column; activations, attention, norms, the KV
cache, the embedding lookup and the noise encoder stay float32.

A quantized kernel is a QuantizedKernel in the parameter tree in place of the float kernel
(quantize_params; for tied embeddings the head gets its own quantized copy of the table,
`head/kernel`, while the lookup keeps the float rows). The model reads it through the
'quantized' variable collection (`variables`), so the float checkpoint layout, training and
every other precision are unchanged.

Symmetric rounding, scale = max |w| / 127 per output column; the products accumulate in
float32. On the CPU they run in kforcing_jax.kernels.cpu (XLA:CPU would widen the
weights in full first, slower than float32); elsewhere XLA's own dequantize-and-dot.
"""
from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax.kernels import cpu as cpu_kernels

PANEL = cpu_kernels.PANEL
COLLECTION = 'quantized'
# parameters that are weight products' kernels: <module>/<name>, contracted leading axes
_KERNELS = {('attn', 'qkv_kernel'): 1, ('attn', 'q_kernel'): 1, ('attn', 'kv_kernel'): 1,
            ('attn', 'out_kernel'): 2, ('head', 'kernel'): 1}


@flax.struct.dataclass
class QuantizedKernel:
  """int8 weights of a product contracting in_shape into out_shape, packed in panels of
  PANEL output columns ([panels, prod(in_shape), PANEL]), and scale [panels * PANEL] (zero
  past the real columns)."""
  packed: jax.Array
  scale: jax.Array
  in_shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
  out_shape: tuple[int, ...] = flax.struct.field(pytree_node=False)

  @property
  def n(self) -> int:
    return math.prod(self.out_shape)

  @property
  def nbytes(self) -> int:
    return self.packed.size + 4 * self.scale.size

  def unpacked(self) -> jax.Array:
    """The int8 weights as [prod(in_shape), n] (the panels undone, padding dropped)."""
    P, K, _ = self.packed.shape
    return jnp.transpose(self.packed, (1, 0, 2)).reshape(K, P * PANEL)[:, :self.n]

  def dequantized(self) -> jax.Array:
    """The float32 kernel [*in_shape, *out_shape] these weights stand for."""
    w = self.unpacked().astype(jnp.float32) * self.scale[:self.n]
    return w.reshape(self.in_shape + self.out_shape)


def quantize(w, n_in: int = 1) -> QuantizedKernel:
  """A float kernel [*in, *out] (its first n_in axes contracted) as a QuantizedKernel."""
  w = np.asarray(jax.device_get(w), np.float32)
  in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
  K, N = math.prod(in_shape), math.prod(out_shape)
  w2 = w.reshape(K, N)
  amax = np.abs(w2).max(axis=0)
  scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
  q = np.clip(np.rint(w2 / scale), -127, 127).astype(np.int8)
  P = -(-N // PANEL)
  q_pad = np.zeros((K, P * PANEL), np.int8)
  q_pad[:, :N] = q
  s_pad = np.zeros((P * PANEL,), np.float32)
  s_pad[:N] = np.where(amax > 0, scale, 0.0)
  packed = np.ascontiguousarray(q_pad.reshape(K, P, PANEL).transpose(1, 0, 2))
  return QuantizedKernel(jnp.asarray(packed), jnp.asarray(s_pad), tuple(in_shape),
                         tuple(out_shape))


def is_quantized(x) -> bool:
  return isinstance(x, QuantizedKernel)


def holds_quantized(params) -> bool:
  """Whether a parameter tree holds int8 kernels (quantize_params' output)."""
  return any(map(is_quantized, jax.tree.leaves(params, is_leaf=is_quantized)))


def weights_mismatch(exe_weights: str, params) -> str | None:
  """Why an engine must refuse these parameters for ExecConfig.weights, or None: int8
  decoding on float parameters, or float decoding on int8 ones, would silently run the
  other precision."""
  held = 'int8' if holds_quantized(params) else 'float'
  if (exe_weights == 'int8') == (held == 'int8'):
    return None
  return (f'ExecConfig.weights={exe_weights!r} but the parameters are {held}: give '
          "precision.cast_params(params, exe)'s output")


def contracted_axes(path: tuple[str, ...]) -> int | None:
  """How many leading axes the weight product of the parameter at `path` contracts; None
  for parameters that are not a block's or the head's kernel (the noise encoder's own MLP
  included: it stays float32)."""
  if 'noise_encoder' in path or len(path) < 2:
    return None
  if path[-2:] in _KERNELS:
    return _KERNELS[path[-2:]]
  if path[-1] == 'kernel' and len(path) >= 3 and path[-3] == 'mlp':  # fc_in*, fc_out
    return 1
  return None


def quantize_params(params: dict, tie_embeddings: bool) -> dict:
  """The parameter tree with every block's and the head's weight-product kernels replaced by
  QuantizedKernels (the noise encoder, embeddings, norms and biases keep their values)."""
  def walk(tree, path):
    out = {}
    for name, value in tree.items():
      here = path + (name,)
      if hasattr(value, 'items'):
        out[name] = walk(value, here)
      else:
        n_in = contracted_axes(here)
        out[name] = value if n_in is None else quantize(value, n_in)
    return out

  q = walk(params, ())
  if tie_embeddings:
    table_VxD = params['embed']['embedding']
    q['head'] = dict(q.get('head', {}), kernel=quantize(np.asarray(table_VxD).T, 1))
  return q


def variables(params) -> dict:
  """model.apply's variables for `params`: {'params': ...} plus, where params hold
  QuantizedKernels, a 'quantized' collection with them at the same paths."""
  def split(tree):
    p, q = {}, {}
    for name, value in tree.items():
      if is_quantized(value):
        q[name] = value
      elif hasattr(value, 'items'):
        p[name], sub = split(value)
        if sub:
          q[name] = sub
      else:
        p[name] = value
    return p, q

  if hasattr(params, 'items'):
    p, q = split(params)
    if q:
      return {'params': p, COLLECTION: q}
  return {'params': params}


def product(x, w: QuantizedKernel, impl: str = 'kernel'):
  """x [..., *w.in_shape] @ w -> [..., *w.out_shape] float32. impl 'kernel': the CPU kernel;
  'xla': XLA's dequantize-and-dot (any backend)."""
  lead = x.shape[:x.ndim - len(w.in_shape)]
  x2 = x.reshape((-1, math.prod(w.in_shape))).astype(jnp.float32)
  if impl == 'kernel':
    y = cpu_kernels.int8_matmul(x2, w.packed, w.scale, w.n)
  else:  # scaled after the product: one multiply per output, not per weight
    y = jnp.dot(x2, w.unpacked().astype(jnp.float32),
                preferred_element_type=jnp.float32) * w.scale[:w.n]
  return y.reshape(lead + w.out_shape)


def weight_bytes(params) -> int:
  """Bytes the parameters take, int8 kernels with their scales (a batch-1 decoding step
  reads about all of them but the embedding table)."""
  total = 0
  for leaf in jax.tree.leaves(params, is_leaf=is_quantized):
    total += leaf.nbytes if is_quantized(leaf) else leaf.size * leaf.dtype.itemsize
  return total
