"""Decoding speed of an imported Llama-family export beside the CPU engines a user would
otherwise run on the same file, in one run.

  python launch/hf_speed.py --export=EXPORT --reference=SRC [--pflm_export=DIR] \
      [--llama_cpp_python=PY] [--batch_sizes=1,16] [--new_tokens=128] [--repeats=3] \
      [--dtypes=float32,auto,int8] [--out=hf_speed.json]

SRC is what the export was imported from (a Hugging Face directory or a .gguf file, loaded by
transformers as the reference). Every engine decodes the same `--new_tokens` tokens after
the same 8-token prompt for every row (EOS ignored), compile / warm-up excluded; the median
of --repeats timed runs:
  ours AR      greedy, in each of --dtypes (kforcing_jax.models.precision; `auto`: the
               CPU's serving precision, `mixed` where it has native bf16 dot instructions;
               `int8`: weight-only int8 products in the CPU kernel);
  ours PFLM    --pflm_export (a K-Forcing student of the same model), K = its window, one
               forward per K tokens (sampled: a PFLM's tokens come from its noise);
  transformers float32 `generate`, greedy, torch's own threads;
  llama.cpp    --llama_cpp_python: a Python with llama-cpp-python (built from source in its
               own environment, BENCHMARKS.md), running launch/llama_cpp_speed.py on SRC
               as shipped (a .gguf, quantized or not), greedy, batched decoding, one thread
               per core. It runs in a child process after the others, alone on the CPU.
"""
import json
import os
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kforcing_jax  # noqa: E402
from kforcing_jax import runtime  # noqa: E402
from kforcing_jax.models import precision  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('export', None, 'the imported export')
flags.DEFINE_string('reference', None, 'the Hugging Face directory or .gguf it came from')
flags.DEFINE_string('batch_sizes', '1,16', 'comma-separated batch sizes')
flags.DEFINE_integer('new_tokens', 128, 'greedy tokens per row')
flags.DEFINE_integer('repeats', 3, 'timed runs per point (median)')
flags.DEFINE_string('out', 'hf_speed.json', 'JSON output')
flags.DEFINE_string('dtypes', 'float32,auto,int8', 'comma-separated precisions of our engines')
flags.DEFINE_string('pflm_export', None, 'a PFLM export of the same model (optional)')
flags.DEFINE_string('llama_cpp_python', None,
                    'a python with llama-cpp-python to time llama.cpp on --reference (a .gguf)')
PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345]  # 8 ids, valid in any V >= 4650


def median_seconds(fn, repeats: int) -> float:
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def reference_model(src: str):
  if src.endswith('.gguf'):
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(src), gguf_file=os.path.basename(src), dtype=torch.float32)
  return transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)


def llama_cpp_rows(python: str, gguf: str, sizes, n: int, repeats: int) -> dict:
  """launch/llama_cpp_speed.py's result under `python`: {'rows': [{batch_size,
  tokens_per_s, ...}], and the build's facts}."""
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'llama_cpp_speed.py')
  out = subprocess.run([python, worker, f'--model={gguf}',
                        f'--prompt={",".join(map(str, PROMPT))}',
                        f'--batch_sizes={",".join(map(str, sizes))}', f'--new_tokens={n}',
                        f'--repeats={repeats}'], check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if FLAGS.llama_cpp_python and not FLAGS.reference.endswith('.gguf'):
    raise SystemExit(f'error: --llama_cpp_python needs --reference to be a .gguf file, got '
                     f'{FLAGS.reference!r}')
  runtime.quiet_library_logs()
  sizes = [int(b) for b in FLAGS.batch_sizes.split(',')]
  n = FLAGS.new_tokens
  ref = reference_model(FLAGS.reference).eval()
  serving = precision.choose('auto')
  rows = []
  for b in sizes:
    row = {'batch_size': b, 'new_tokens': n}
    prompts = [PROMPT] * b
    for dtype in dict.fromkeys(precision.choose(d)[0] for d in FLAGS.dtypes.split(',')):
      m = kforcing_jax.load(FLAGS.export, dtype=dtype)
      s = median_seconds(lambda m=m: m.generate_ids(prompts, n, temperature=0.0,
                                                    stop_at_eos=False), FLAGS.repeats)
      row[f'ours_{dtype}_tokens_per_s'] = b * n / s
      if FLAGS.pflm_export:
        p = kforcing_jax.load(FLAGS.pflm_export, dtype=dtype)
        s = median_seconds(lambda p=p: p.generate_ids(prompts, n, K=p.k, stop_at_eos=False),
                           FLAGS.repeats)
        row[f'ours_pflm_K{p.k}_{dtype}_tokens_per_s'] = b * n / s
    ids = torch.tensor(prompts)

    def hf_generate():
      with torch.no_grad():
        ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                     min_new_tokens=n, do_sample=False, pad_token_id=0)
    row['transformers_float32_tokens_per_s'] = b * n / median_seconds(hf_generate,
                                                                        FLAGS.repeats)
    rows.append(row)
    print(json.dumps(row), flush=True)
  llama = None
  if FLAGS.llama_cpp_python:
    del ref  # the CPU and memory to llama.cpp alone
    llama = llama_cpp_rows(FLAGS.llama_cpp_python, FLAGS.reference, sizes, n, FLAGS.repeats)
    for row, got in zip(rows, llama.pop('rows')):
      row['llama_cpp_tokens_per_s'] = got['tokens_per_s']
      print(json.dumps({'batch_size': row['batch_size'], **got}), flush=True)
  result = {'cpu': runtime.cpu_model(), 'jax': jax.__version__,
            'torch': torch.__version__, 'transformers': transformers.__version__,
            'torch_threads': torch.get_num_threads(), 'serving_precision': serving,
            'date': time.strftime('%Y-%m-%d'), 'export': os.path.abspath(FLAGS.export),
            'pflm_export': FLAGS.pflm_export and os.path.abspath(FLAGS.pflm_export),
            'reference': FLAGS.reference, 'llama_cpp': llama, 'rows': rows}
  with open(FLAGS.out, 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)
  print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['export', 'reference'])
  app.run(main)
