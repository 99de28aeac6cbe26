"""Random-weight models at a config's shape: the benchmark's and the server's stand-ins for
trained weights (speed does not depend on the values)."""
from __future__ import annotations

import dataclasses

import flax.linen
import jax

from kforcing_jax.models import arch as arch_lib
from kforcing_jax.models import transformer as model_lib


def random_model(cfg, vocab_size: int):
  """(ArchConfig, float32 params) of a PFLM with random weights at the config's model
  fields (used as given); its backbone serves as the AR model too."""
  arch, _ = arch_lib.configs_from_run(cfg, vocab_size, pflm=True)
  arch = dataclasses.replace(arch, max_seq_len=cfg.data.seq_len)
  params = jax.jit(lambda r: flax.linen.unbox(
      model_lib.init_fn(model_lib.build(arch))(r)))(jax.random.key(0))
  # the head is zero-initialised; random values make argmax/sampling realistic (a tied
  # head is the random embedding table already)
  if not arch.tie_embeddings:
    head = params['head']['kernel']
    params['head']['kernel'] = 0.02 * jax.random.normal(jax.random.key(1), head.shape,
                                                        head.dtype)
  return arch, params
