"""Serving precision: the execution config and parameter cast a decoding engine runs with.

  bfloat16  weights, activations and KV cache in bf16 (accelerators);
  mixed     bf16 weights, bf16 x bf16 -> float32 weight products, float32 activations, KV
            cache and softmax (CPUs with native bf16 dot instructions);
  float32   everything in float32.
  int8      weight-only int8 products (one float32 scale per output column), everything
            else float32: a quarter of float32's weight bytes per decoding step; on a CPU
            the products run in a kernel built for it (kforcing_jax.kernels.cpu).
`auto` picks bfloat16 on accelerators; on a CPU, mixed where it has native bf16 dot
instructions (AVX-512 BF16, AMX, Arm BF16) and float32 where bf16 would be emulated.
Logits are float32 in every mode (model.Head). The noise encoder keeps float32 weights:
it computes in float32 to resolve neighbouring CDF intervals, once per generation.
"""
from __future__ import annotations

import dataclasses

import jax

from kforcing_jax import errors
from kforcing_jax import runtime
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.models import quantize

SERVE_DTYPES = {
    'bfloat16': arch_lib.ExecConfig(dtype='bfloat16', param_dtype='bfloat16'),
    'mixed': arch_lib.ExecConfig(dtype='float32', param_dtype='bfloat16',
                                  dot_dtype='bfloat16'),
    'float32': arch_lib.ExecConfig(),
    'int8': arch_lib.ExecConfig(weights='int8'),
}


class PrecisionError(errors.UserError):
  pass


def choose(name: str = 'auto', backend: str | None = None, features=None) -> tuple[str, str]:
  """(a SERVE_DTYPES key, why it was chosen) for the requested `name`."""
  backend = backend or jax.default_backend()
  if name != 'auto':
    if name not in SERVE_DTYPES:
      raise PrecisionError(f'--dtype={name!r}: allowed: auto, {", ".join(SERVE_DTYPES)}')
    return name, 'requested'
  if backend != 'cpu':
    return 'bfloat16', f'auto on {backend}'
  native, why = runtime.native_bf16_dot(features)
  return ('mixed' if native else 'float32'), f'auto on CPU: {why}'


def exec_config(name: str, decode_attention: str = 'xla',
                cache_products: str = 'auto') -> arch_lib.ExecConfig:
  if name not in SERVE_DTYPES:
    raise PrecisionError(f'dtype={name!r}: allowed: {", ".join(SERVE_DTYPES)}')
  if decode_attention not in arch_lib.DECODE_ATTENTION:
    raise PrecisionError(f'decode_attention={decode_attention!r}: allowed: '
                         f'{", ".join(arch_lib.DECODE_ATTENTION)}')
  return dataclasses.replace(SERVE_DTYPES[name], decode_attention=decode_attention,
                             cache_products=cache_products)


def cast_params(params, exe: arch_lib.ExecConfig):
  """params in exe's parameter dtype, the noise encoder's left in float32; with int8
  weights the weight-product kernels quantized (quantize.quantize_params). Parameters
  quantized already are returned as they are, for int8 only."""
  if quantize.holds_quantized(params):
    if exe.weights != 'int8':
      raise PrecisionError('these parameters hold int8 weights: decode them with the int8 '
                           'precision, or load the float model again for another')
    return params
  dt = exe.params
  params = {k: (v if k == 'noise_encoder' else jax.tree.map(lambda x: x.astype(dt), v))
            for k, v in params.items()}
  if exe.weights == 'int8':
    tied = 'kernel' not in params.get('head', {})
    params = quantize.quantize_params(params, tie_embeddings=tied)
  return params
