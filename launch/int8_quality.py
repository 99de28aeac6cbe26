"""What weight-only int8 costs in quality: a model's next-token predictions on real text with
float32 weights and with int8 weights (`--dtype=int8`, kforcing_jax.models.quantize).

  python launch/int8_quality.py --export=exports/smollm2 --text=FILE[,FILE...] \
      [--max_tokens=512] [--out=int8_quality.json]

Each text file is one row, cut to --max_tokens tokens of the export's tokenizer. Prints and
writes, over every predicted position: the mean NLL of the text under each precision, the
mean KL(float32 || int8) of the next-token distributions, and how often the two argmax
tokens agree.
"""
import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kforcing_jax  # noqa: E402
from kforcing_jax import runtime  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('export', None, 'an exported or imported model (with its tokenizer)')
flags.DEFINE_string('text', None, 'comma-separated text files, one row each')
flags.DEFINE_integer('max_tokens', 512, 'tokens per row')
flags.DEFINE_string('out', 'int8_quality.json', 'JSON output')
flags.mark_flags_as_required(['export', 'text'])


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main(argv):
  del argv
  runtime.quiet_library_logs()
  models = {d: kforcing_jax.load(FLAGS.export, dtype=d) for d in ('float32', 'int8')}
  tok = models['float32'].require_tokenizer()
  rows = []
  for path in FLAGS.text.split(','):
    with open(path, encoding='utf-8') as f:
      ids = tok.encode(f.read())[:FLAGS.max_tokens]
    if len(ids) < 2:
      raise SystemExit(f'error: {path} has fewer than 2 tokens')
    lp = {d: log_softmax(m.logits([ids])[0, :-1].astype(np.float64))
          for d, m in models.items()}
    target = np.asarray(ids[1:])
    nll = {d: float(-v[np.arange(len(target)), target].mean()) for d, v in lp.items()}
    kl = float((np.exp(lp['float32']) * (lp['float32'] - lp['int8'])).sum(-1).mean())
    agree = float((lp['float32'].argmax(-1) == lp['int8'].argmax(-1)).mean())
    row = {'text': os.path.basename(path), 'tokens': len(ids), 'nll_float32': nll['float32'],
           'nll_int8': nll['int8'], 'kl_float32_int8': kl, 'argmax_agreement': agree}
    rows.append(row)
    print(json.dumps(row), flush=True)
  n = np.asarray([r['tokens'] - 1 for r in rows], float)
  mean = {k: float((np.asarray([r[k] for r in rows]) * n).sum() / n.sum())
          for k in ('nll_float32', 'nll_int8', 'kl_float32_int8', 'argmax_agreement')}
  print('over all positions:', json.dumps(mean))
  with open(FLAGS.out, 'w', encoding='utf-8') as f:
    json.dump({'export': os.path.abspath(FLAGS.export), 'cpu': runtime.cpu_model(),
               'jax': jax.__version__, 'date': time.strftime('%Y-%m-%d'), 'rows': rows,
               'mean': mean}, f, indent=1)
  print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  app.run(main)
