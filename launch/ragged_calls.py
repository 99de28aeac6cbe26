"""What compile buckets save a Sampler user whose calls come in ragged shapes: the same seeded
stream of calls (prompt lengths, and unless fixed, batch sizes and max_new_tokens drawn at
random) through a Sampler with buckets (the default) and one without, each after clearing
JAX's compile caches. Prints loops compiled, wall seconds and seconds per call; checks
that both give the same tokens.

  python launch/ragged_calls.py [--config=configs/synthetic.py] [--calls=40] [--K=4] \
      [--max_batch=16 | --batch=B] [--new_tokens=N] [--out=ragged_calls.json]

Random weights of the config's model (a PFLM of window K, or K=0 for an AR model).
"""
import dataclasses
import json
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from kforcing_jax import runtime
from kforcing_jax.data import datasets as data_lib
from kforcing_jax.decoding import sampler as sampler_lib
from kforcing_jax.models import random_init
from kforcing_jax.pipeline import config_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/synthetic.py', 'config file',
                                          lock_config=True)
flags.DEFINE_integer('calls', 40, 'calls in the stream')
flags.DEFINE_integer('K', 4, 'the model\'s window (0: an AR model); calls decode K per step')
flags.DEFINE_integer('max_batch', 16, 'batch sizes are drawn from 1..max_batch')
flags.DEFINE_integer('batch', 0, '> 0: every call has this many prompts (not drawn)')
flags.DEFINE_integer('new_tokens', 0, '> 0: every call asks for this many tokens (not drawn)')
flags.DEFINE_integer('seed', 0, 'seed of the stream\'s shapes')
flags.DEFINE_string('out', 'ragged_calls.json', 'JSON output')
FLAGS = flags.FLAGS


def stream(max_len: int, vocab: int):
  """The calls: (prompts, max_new_tokens), prompt + new tokens within max_len."""
  rng = np.random.default_rng(FLAGS.seed)
  calls = []
  for _ in range(FLAGS.calls):
    new = FLAGS.new_tokens or int(rng.integers(4, max_len // 2))
    rows = FLAGS.batch or int(rng.integers(1, FLAGS.max_batch + 1))
    prompts = [rng.integers(1, vocab - 1, int(rng.integers(1, max_len - new + 1))).tolist()
               for _ in range(rows)]
    calls.append((prompts, new))
  return calls


def run(arch, params, calls, buckets: bool):
  jax.clear_caches()  # no loop compiled by the other run
  s = sampler_lib.Sampler(arch, params, k=FLAGS.K, max_len=arch.max_seq_len, buckets=buckets)
  traces, outs, t0 = s.engine.traces, [], time.perf_counter()
  for i, (prompts, new) in enumerate(calls):
    outs.append(s.generate_ids(prompts, new, seed=i, stop_at_eos=False))
  seconds = time.perf_counter() - t0
  return {'buckets': buckets, 'loops_compiled': s.engine.traces - traces,
          'seconds': seconds, 'seconds_per_call': seconds / len(calls)}, outs


def main(argv):
  del argv
  cfg = _CONFIG.value
  vocab = data_lib.model_vocab_size(cfg)
  arch, params = random_init.random_model(cfg, vocab)
  arch = dataclasses.replace(arch, pflm=FLAGS.K > 0)  # K=0: its backbone as an AR model
  calls = stream(arch.max_seq_len, vocab)
  rows, outs = [], []
  for buckets in (False, True):
    row, out = run(arch, params, calls, buckets)
    rows.append(row)
    outs.append(out)
    print(f'buckets={buckets}: {row["loops_compiled"]} loops compiled, {row["seconds"]:.1f} s '
          f'({row["seconds_per_call"]:.2f} s a call)', flush=True)
  same = all(np.array_equal(a, b) for a, b in zip(*outs))
  print(f'same tokens: {same}')
  result = {**runtime.machine(), 'calls': FLAGS.calls, 'K': FLAGS.K,
            'max_batch': FLAGS.max_batch, 'batch': FLAGS.batch, 'new_tokens': FLAGS.new_tokens,
            'same_tokens': same, 'rows': rows}
  with open(FLAGS.out, 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)
  if not same:
    raise SystemExit('the bucketed Sampler gave other tokens than the exact one')


if __name__ == '__main__':
  app.run(main, flags_parser=config_lib.parse_flags)
