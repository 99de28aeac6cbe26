"""What narrower weights buy a small-batch decode step on this backend: an MLP stack's weight
products at M rows, with float32, bfloat16 and int8 (per-output-channel scale) weights; the
int8 ones through XLA's dequantize-and-dot (`int8`) and through our CPU kernel
(`int8_kernel`, kforcing_jax.kernels).

  python launch/weight_dtype_bench.py [--rows=1,2,4,16] [--layers=30] [--d_model=576] \
      [--mlp_dim=1536] [--weights=float32,bfloat16,int8,int8_kernel] [--out=weight_dtype.json]

At batch 1 a decode step reads every weight once for a few flops per weight, so its speed is
the rate at which the backend streams weights: narrower weights only help where the backend
multiplies them without first widening the whole matrix in memory. Defaults: SmolLM2-135M's
MLP shapes (the bulk of its weights). Prints milliseconds per stack and effective GB/s of
weights read; the median of --repeats timings after a warm-up.
"""
import json
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import runtime
from kforcing_jax.models import quantize

FLAGS = flags.FLAGS
flags.DEFINE_string('rows', '1,2,4,16', 'comma-separated M (rows per product)')
flags.DEFINE_integer('layers', 30, 'MLP blocks')
flags.DEFINE_integer('d_model', 576, 'model width')
flags.DEFINE_integer('mlp_dim', 1536, 'MLP width')
flags.DEFINE_integer('repeats', 30, 'timed calls (median)')
flags.DEFINE_string('out', 'weight_dtype.json', 'JSON output')
flags.DEFINE_string('weights', 'float32,bfloat16,int8,int8_kernel', 'comma-separated weight forms')


def product(x, w, dtype):
  if dtype == 'float32':
    return x @ w
  if dtype == 'bfloat16':
    return jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)
  # int8: XLA's dequantize-and-dot (ExecConfig.int8_products='xla'); int8_kernel: ours
  return quantize.product(x, w, 'kernel' if dtype == 'int8_kernel' else 'xla')


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  shapes = [(FLAGS.d_model, FLAGS.mlp_dim), (FLAGS.mlp_dim, FLAGS.d_model)] * FLAGS.layers
  w32 = [rng.normal(size=s).astype(np.float32) * 0.02 for s in shapes]
  weights = {'float32': [jnp.asarray(w) for w in w32],
             'bfloat16': [jnp.asarray(w, jnp.bfloat16) for w in w32],
             'int8': [quantize.quantize(w) for w in w32]}
  weights['int8_kernel'] = weights['int8']
  weights = {k: v for k, v in weights.items() if k in FLAGS.weights.split(',')}
  results = []
  for m in (int(r) for r in FLAGS.rows.split(',')):
    x = jnp.ones((m, FLAGS.d_model), jnp.float32)
    for dtype, ws in weights.items():
      def stack(ws, x, dtype=dtype):
        for i in range(0, len(ws), 2):
          x = product(jax.nn.relu(product(x, ws[i], dtype)), ws[i + 1], dtype)
        return x
      fn = jax.jit(stack)
      fn(ws, x).block_until_ready()
      times = []
      for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        fn(ws, x).block_until_ready()
        times.append(time.perf_counter() - t0)
      s = statistics.median(times)
      nbytes = quantize.weight_bytes(ws)
      row = {'rows': m, 'weights': dtype, 'ms': s * 1e3, 'weight_gb_per_s': nbytes / s / 1e9}
      results.append(row)
      print(f'M={m:3d} {dtype:9s} {row["ms"]:8.2f} ms  {row["weight_gb_per_s"]:6.1f} GB/s',
            flush=True)
  out = {'cpu': runtime.cpu_model(), 'backend': jax.default_backend(), 'jax': jax.__version__,
         'date': time.strftime('%Y-%m-%d'), 'layers': FLAGS.layers, 'd_model': FLAGS.d_model,
         'mlp_dim': FLAGS.mlp_dim, 'results': results}
  with open(FLAGS.out, 'w', encoding='utf-8') as f:
    json.dump(out, f, indent=1)
  print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  app.run(main)
