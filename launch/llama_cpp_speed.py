"""Greedy decoding speed of a GGUF file under llama.cpp (llama-cpp-python's C API), batch B.

  $LLAMA_PY launch/llama_cpp_speed.py --model=FILE.gguf --prompt=1,504,... \
      [--batch_sizes=1,16] [--new_tokens=128] [--repeats=3] [--threads=N]

Runs in its own environment (llama-cpp-python built from source, see BENCHMARKS.md), so it
imports nothing from this project; `launch/hf_speed.py --llama_cpp_python=$LLAMA_PY` calls
it and reads the JSON line it prints last. Every one of B sequences starts from the same
prompt and decodes --new_tokens tokens by argmax of its logits (EOS ignored), one
llama_decode per step for all B sequences: the batched decoding llama.cpp's own
batched-bench does. Prompt evaluation is included, as in the other engines' numbers; the
first run (warm-up) is not; the median of --repeats runs.
"""
import argparse
import ctypes
import json
import os
import statistics
import time

import llama_cpp
import numpy as np


# kept alive for the process: llama.cpp holds the pointer
_QUIET = llama_cpp.llama_log_callback(lambda level, text, user_data: None)


def load(path: str, batch: int, n_ctx: int, threads: int):
  mparams = llama_cpp.llama_model_default_params()
  model = llama_cpp.llama_model_load_from_file(path.encode(), mparams)
  if not model:
    raise SystemExit(f'error: --model={path!r}: llama.cpp could not load it')
  cparams = llama_cpp.llama_context_default_params()
  cparams.n_ctx = n_ctx
  cparams.n_batch = max(n_ctx, 512)
  cparams.n_ubatch = cparams.n_batch
  cparams.n_seq_max = batch
  cparams.n_threads = threads
  cparams.n_threads_batch = threads
  cparams.kv_unified = True  # all sequences in one buffer: equal lengths, no waste
  ctx = llama_cpp.llama_init_from_model(model, cparams)
  if not ctx:
    raise SystemExit('error: llama.cpp could not create a context')
  return model, ctx


def decode_greedy(ctx, vocab: int, prompt: list[int], batch: int, new_tokens: int) -> list:
  """[batch][new_tokens] greedy ids; each step is one llama_decode over every sequence."""
  llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
  cap = max(batch * len(prompt), batch)
  b = llama_cpp.llama_batch_init(cap, 0, batch)
  try:
    def submit(entries):  # entries: (token, position, sequence, wants_logits)
      b.n_tokens = len(entries)
      for i, (tok, pos, seq, want) in enumerate(entries):
        b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
        b.seq_id[i][0] = seq
        b.logits[i] = want
      if llama_cpp.llama_decode(ctx, b) != 0:
        raise SystemExit('error: llama_decode failed')

    n = len(prompt)
    submit([(t, p, s, p == n - 1) for s in range(batch) for p, t in enumerate(prompt)])
    rows = [n * s + n - 1 for s in range(batch)]  # batch index of each sequence's logits
    out = [[] for _ in range(batch)]
    for step in range(new_tokens):
      nxt = []
      for s, i in enumerate(rows):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(vocab,))
        nxt.append(int(np.argmax(logits)))
        out[s].append(nxt[-1])
      if step + 1 < new_tokens:
        submit([(t, n + step, s, True) for s, t in enumerate(nxt)])
        rows = list(range(batch))
    return out
  finally:
    llama_cpp.llama_batch_free(b)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', required=True)
  p.add_argument('--prompt', required=True, help='comma-separated token ids')
  p.add_argument('--batch_sizes', default='1,16')
  p.add_argument('--new_tokens', type=int, default=128)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--threads', type=int, default=os.cpu_count())
  a = p.parse_args()
  prompt = [int(t) for t in a.prompt.split(',')]
  llama_cpp.llama_backend_init()
  llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p())
  rows = []
  for batch in (int(x) for x in a.batch_sizes.split(',')):
    model, ctx = load(a.model, batch, batch * (len(prompt) + a.new_tokens) + 16, a.threads)
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    first = decode_greedy(ctx, vocab, prompt, batch, a.new_tokens)  # warm-up
    times = []
    for _ in range(a.repeats):
      t0 = time.perf_counter()
      decode_greedy(ctx, vocab, prompt, batch, a.new_tokens)
      times.append(time.perf_counter() - t0)
    rows.append({'batch_size': batch, 'tokens_per_s': batch * a.new_tokens /
                 statistics.median(times), 'first_row_ids': first[0][:16]})
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
  print(json.dumps({'llama_cpp_python': llama_cpp.__version__, 'threads': a.threads,
                    'system_info': llama_cpp.llama_print_system_info().decode(),
                    'rows': rows}))


if __name__ == '__main__':
  main()
