"""Writes tests/data/format_v3 with the architecture-version-3 code (run from its tree)."""
import json, sys
import flax.linen as nn
import jax, jax.numpy as jnp, numpy as np
from kforcing_jax.models import arch as arch_lib, transformer as model_lib, layouts
assert arch_lib.ARCH_VERSION == 3
out = sys.argv[1]
rng = np.random.default_rng(0)
ctx = rng.integers(0, 23, (2, 7)).astype(np.int32)
u = rng.random((2, 7, 2)).astype(np.float32)
for name, pflm in (('ar', False), ('pflm', True)):
  arch = arch_lib.ArchConfig(vocab_size=23, d_model=16, n_layers=2, n_heads=2, max_seq_len=32,
                             never_emit_ids=(22,), pflm=pflm)
  model = model_lib.build(arch)
  params = nn.unbox(model_lib.init_fn(model)(jax.random.key(1)))
  params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(x.size), x.shape), params)
  flat = {'/'.join(k.key for k in path): np.asarray(v) for path, v in
          jax.tree_util.tree_flatten_with_path(params)[0]}
  np.savez(f'{out}/params_{name}.npz', **flat)
  with open(f'{out}/arch_{name}.json', 'w') as f:
    json.dump(arch.to_dict(), f, indent=1)
  T = ctx.shape[1]
  logits = model.apply({'params': params}, jnp.asarray(ctx), jnp.broadcast_to(jnp.arange(T), (2, T)),
                       method=model_lib.Transformer.forward)
  res = {'forward': np.asarray(logits)}
  if pflm:
    res['window'] = np.asarray(layouts.apply_window(model, params, jnp.asarray(ctx), None, jnp.asarray(u)))
  np.savez(f'{out}/logits_{name}.npz', ctx=ctx, u=u, **res)
  print(name, {k: v.shape for k, v in res.items()})
