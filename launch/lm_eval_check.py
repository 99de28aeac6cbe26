"""lm-evaluation-harness against the server: its scores must equal the model's offline
log-likelihoods.

  python -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install "lm-eval[api]==0.4.13"
  python launch/lm_eval_check.py --lm_eval=/tmp/lmeval/bin/lm_eval --export=exports/smollm2 \
      --out=DIR [--docs=40]

Builds two local tasks from real LM1B sentences ($KFORCING_TESTDATA/lm1b): `kf_textmc`
(multiple choice by log-likelihood: after a sentence's first half, its own second half or
the next sentence's) and `kf_textppl` (loglikelihood_rolling: whole-sentence perplexity).
Serves the export (`python -m kforcing_jax.serve`, float32), runs `lm_eval --model local-completions` with
the server's own tokenizer (tokenizer_backend=remote: /tokenizer_info, /tokenize,
/detokenize) and token-id prompts, then recomputes every sample offline -- lm-eval's
tokenization rules (context/continuation split, rolling windows after the BOS-or-EOS
prefix) on the model's causal forward (kforcing_jax.load(...).logits) -- and reports the
largest difference. Writes DIR/lm_eval_check.json; exits 1 when a score differs by more
than --atol or a greedy flag differs.
"""
import glob
import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

import kforcing_jax
from kforcing_jax.data import tokenization
from kforcing_jax.serving import launcher

FLAGS = flags.FLAGS
flags.DEFINE_string('lm_eval', 'lm_eval', 'the lm_eval executable (its own venv)')
flags.DEFINE_string('export', None, 'an AR export (e.g. the imported SmolLM2)')
flags.DEFINE_string('out', 'lm_eval_out', 'output directory')
flags.DEFINE_integer('docs', 40, 'sentences in each task')
flags.DEFINE_integer('batch_size', 4, 'prompts per request (lm_eval --batch_size)')
flags.DEFINE_float('atol', 1e-4, 'largest allowed |server - offline| log-likelihood')
flags.mark_flag_as_required('export')


def sentences(n: int) -> list[str]:
  path = os.path.join(os.environ.get('KFORCING_TESTDATA', '../shared/testdata'), 'lm1b',
                      'lingvo_lm1b_100.txt')
  out = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      words = line.split()
      if 8 <= len(words) <= 40:
        out.append(' '.join(words))
      if len(out) == n:
        break
  return out


def write_tasks(d: str, docs: list[str]) -> None:
  os.makedirs(d, exist_ok=True)
  data = os.path.join(d, 'kf_text.jsonl')
  with open(data, 'w', encoding='utf-8') as f:
    halves = []
    for text in docs:
      words = text.split()
      halves.append((' '.join(words[:len(words) // 2]), ' '.join(words[len(words) // 2:])))
    for i, text in enumerate(docs):
      f.write(json.dumps({'id': i, 'text': text, 'context': halves[i][0],
                          'choices': [halves[i][1], halves[(i + 1) % len(docs)][1]]}) + '\n')
  head = (f'dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n'
          'test_split: test\nmetadata:\n  version: 1.0\n')
  with open(os.path.join(d, 'kf_textmc.yaml'), 'w', encoding='utf-8') as f:
    f.write('task: kf_textmc\noutput_type: multiple_choice\n' + head +
            'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: 0\n'
            'target_delimiter: " "\nmetric_list:\n  - metric: acc\n    aggregation: mean\n'
            '    higher_is_better: true\n')
  with open(os.path.join(d, 'kf_textppl.yaml'), 'w', encoding='utf-8') as f:
    f.write('task: kf_textppl\noutput_type: loglikelihood_rolling\n' + head +
            'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
            '  - metric: word_perplexity\n  - metric: byte_perplexity\n'
            '  - metric: bits_per_byte\n')


class Offline:
  """The model's own scores under lm-eval's tokenization rules."""

  def __init__(self, export: str):
    self.s = kforcing_jax.load(export, dtype='float32')
    self.tok = self.s.tokenizer
    self.max_len = self.s.engine.max_len
    enc = lambda text: tokenization.encode_prompt(self.tok, text, add_special_tokens=False)
    self.enc = enc
    specials = self.tok.template_tokens
    bos = enc(specials['bos_token'])[0] if specials.get('bos_token') else None
    self.prefix = bos or enc(specials['eos_token'])[0]  # lm-eval: bos_token_id or eos_token_id

  def score(self, ids: list[int], n_scored: int) -> tuple[float, bool]:
    """(log-likelihood of the last n_scored ids after the ones before, all greedy)."""
    n = 64
    while n < len(ids):  # a few padded lengths: one compile each (causal: padding is after)
      n *= 2
    toks = np.zeros((1, min(n, self.max_len)), np.int32)
    toks[0, :len(ids)] = ids
    logits = self.s.logits(toks)[0, :len(ids)].astype(np.float64)
    lp = logits - logits.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    rows = range(len(ids) - n_scored - 1, len(ids) - 1)
    return (float(sum(lp[r, ids[r + 1]] for r in rows)),
            all(int(lp[r].argmax()) == ids[r + 1] for r in rows))

  def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = self.enc(context + continuation)
    n_ctx = len(self.enc(context))
    return self.score(whole, len(whole) - n_ctx)

  def rolling(self, text: str) -> float:
    ids = self.enc(text)
    if len(ids) >= self.max_len - 1:
      raise SystemExit(f'a sentence of {len(ids)} tokens needs several rolling windows; '
                       'use shorter ones')
    return self.score([self.prefix] + ids, len(ids))[0]


def samples(out: str, task: str) -> list[dict]:
  path = max(glob.glob(os.path.join(out, '**', f'samples_{task}_*.jsonl'), recursive=True),
             key=os.path.getmtime)  # this run's
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def main(argv):
  del argv
  out = os.path.abspath(FLAGS.out)
  os.makedirs(out, exist_ok=True)
  docs = sentences(FLAGS.docs)
  write_tasks(os.path.join(out, 'tasks'), docs)
  name = os.path.basename(FLAGS.export.rstrip('/'))
  offline = Offline(FLAGS.export)
  result = {'date': time.strftime('%Y-%m-%d'), 'command': ' '.join(sys.argv),
            'export': FLAGS.export, 'docs': len(docs)}
  with launcher.ServerProcess([f'--export={FLAGS.export}', '--dtype=float32', '--max_slots=4'],
                              os.path.join(out, 'server.log')) as srv:
    cmd = [FLAGS.lm_eval, '--model', 'local-completions', '--model_args',
           f'model={name},base_url={srv.url}/v1/completions,tokenizer_backend=remote,'
           f'tokenized_requests=True,max_length={offline.max_len},num_concurrent=1,'
           'max_retries=1', '--batch_size', str(FLAGS.batch_size), '--tasks',
           'kf_textmc,kf_textppl', '--include_path', os.path.join(out, 'tasks'),
           '--output_path', os.path.join(out, 'lm_eval'), '--log_samples']
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
    result['lm_eval_seconds'] = round(time.perf_counter() - t0, 1)
    result['lm_eval_command'] = ' '.join(cmd)
    if r.returncode:
      raise SystemExit(f'lm_eval failed ({r.returncode}):\n{r.stdout[-3000:]}\n'
                       f'{r.stderr[-3000:]}')
    result['lm_eval_table'] = r.stdout[r.stdout.find('|'):].strip()
  worst, greedy_mismatch, rows = 0.0, 0, []
  for s in samples(out, 'kf_textmc'):
    for j, resp in enumerate(s['resps']):
      args = s['arguments'][f'gen_args_{j}']
      served, served_greedy = resp[0]
      want, want_greedy = offline.loglikelihood(args['arg_0'], args['arg_1'])
      worst = max(worst, abs(float(served) - want))
      greedy_mismatch += (str(served_greedy) == 'True') != want_greedy
      rows.append({'task': 'kf_textmc', 'served': float(served), 'offline': want})
  for s in samples(out, 'kf_textppl'):
    served = s['resps'][0][0]
    want = offline.rolling(s['arguments']['gen_args_0']['arg_0'])
    worst = max(worst, abs(float(served) - want))
    rows.append({'task': 'kf_textppl', 'served': float(served), 'offline': want})
  result.update({'samples': len(rows), 'max_abs_diff': worst,
                 'greedy_flag_mismatches': greedy_mismatch, 'rows': rows})
  with open(os.path.join(out, 'lm_eval_check.json'), 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)
  print(result['lm_eval_table'])
  print(f'{len(rows)} samples: max |served - offline| = {worst:.2e} nats, greedy flags '
        f'differing: {greedy_mismatch}; lm_eval took {result["lm_eval_seconds"]} s')
  if worst > FLAGS.atol or greedy_mismatch:
    raise SystemExit(1)


if __name__ == '__main__':
  app.run(main)
