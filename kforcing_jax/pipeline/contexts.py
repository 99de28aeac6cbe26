"""Distillation contexts a chat model will actually see, built once offline.

A chat model is served on chat-formatted conversations, so its students are distilled on
them: user turns made from real sentences (an instruction template around each sentence),
rendered with the model's own chat template (system prompt and generation prompt
included), each followed by the teacher's own sampled answer; plus rows of the plain
sentences. The set is split by sentence before anything is generated (a held-out
sentence never appears in a training row, as a prompt or as plain text), and written as
a token cache (data.source=tokens) whose chat rows record their prompt length, so that
`evaluate` prompts with exactly the held-out conversations.

Deterministic: the same sentences, seed and teacher give byte-identical files (each
answer's sampling noise depends on its context's index and the seed, not on batching).

  python -m kforcing_jax.build_contexts --export=exports/smollm2 \
      --text=../shared/testdata/lm1b/news.en.heldout-00010+00011-of-00050.txt \
      --out=contexts/smollm2 --num_chat=448 --num_plain=64 --seq_len=192
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from kforcing_jax import errors
from kforcing_jax.data import datasets as data_lib
from kforcing_jax.data import token_cache
from kforcing_jax.data import tokenization

# Instruction forms around a real sentence: the kinds of requests a small chat model gets
# (explain, summarise, rewrite, continue, ask, classify), so answers vary in form and length.
TASKS = (
    'Explain what this sentence means in simple words: "{text}"',
    'Summarize this news sentence in one short sentence: "{text}"',
    'Rewrite this sentence in a more formal style: "{text}"',
    'Continue this news story with two more sentences: "{text}"',
    'What questions would a reader ask after reading this? "{text}"',
    'Is the tone of this sentence positive, negative or neutral? Explain briefly: "{text}"',
    'Give this sentence a short headline: "{text}"',
    'List the people, places and organisations mentioned here: "{text}"',
    'Explain the background a reader needs to understand this: "{text}"',
    'Write a short reply to a friend who sent you this: "{text}"',
    'Translate this sentence into plain English for a child: "{text}"',
    'What is the main point of this sentence? "{text}"',
    '{text}',
    'Tell me more about this: {text}',
    'Can you fact-check this statement? "{text}"',
    'Write a tweet about this news: "{text}"',
)


class ContextsError(errors.UserError):
  pass


@dataclasses.dataclass(frozen=True)
class ContextSpec:
  num_chat: int = 448  # chat contexts (prompt + the teacher's answer)
  num_plain: int = 64  # rows of plain sentences
  eval_fraction: float = 0.125  # sentences held out (eval split), chosen before generating
  seq_len: int = 192  # tokens per row (prompt + answer + EOS, padded)
  min_answer_tokens: int = 48  # sentences whose prompt leaves fewer answer slots are skipped
  temperature: float = 1.0  # the teacher's answers (1.0: its own distribution)
  top_p: float = 1.0
  seed: int = 0
  batch_size: int = 16  # answers generated together

  def validate(self) -> None:
    for field in ('num_chat', 'seq_len', 'batch_size'):
      if getattr(self, field) < 1:
        raise ContextsError(f'--{field} must be >= 1, got {getattr(self, field)}')
    if self.num_plain < 0:
      raise ContextsError(f'--num_plain must be >= 0, got {self.num_plain}')
    if not 0.0 < self.eval_fraction < 1.0:
      raise ContextsError(f'--eval_fraction must be in (0, 1), got {self.eval_fraction}')
    if not 1 <= self.min_answer_tokens < self.seq_len:
      raise ContextsError(f'--min_answer_tokens must be in [1, --seq_len), got '
                          f'{self.min_answer_tokens}')
    if self.temperature < 0 or not 0 < self.top_p <= 1:
      raise ContextsError('--temperature must be >= 0 and --top_p in (0, 1]')


def read_sentences(paths: str) -> list[str]:
  """Distinct non-empty lines (or JSONL texts) of the files, in file order."""
  seen, out = set(), []
  for s in data_lib.read_records(data_lib.list_files(paths, '--text'), 'line'):
    s = ' '.join(s.split())
    if s and s not in seen:
      seen.add(s)
      out.append(s)
  return out


def plan(sentences: list[str], tok, spec: ContextSpec) -> list[dict]:
  """The contexts, before any answer: [{'split', 'kind' (chat | plain), 'sentence',
  'prompt_ids' (chat), 'ids' (plain), 'index'}], train first. Sentences are shuffled with
  the seed, held out by a seeded mask, and each used at most once."""
  if not tok.chat_template:
    raise ContextsError('the teacher\'s tokenizer has no chat template; chat contexts need '
                        'one (an export of an instruction-tuned model)')
  order = np.random.default_rng([spec.seed, 11]).permutation(len(sentences))
  is_eval = data_lib.heldout_mask(len(sentences), spec.eval_fraction, spec.seed)
  task_rng = np.random.default_rng([spec.seed, 12])
  want = {'train': {'chat': round(spec.num_chat * (1 - spec.eval_fraction)),
                    'plain': round(spec.num_plain * (1 - spec.eval_fraction))}}
  want['eval'] = {'chat': spec.num_chat - want['train']['chat'],
                  'plain': spec.num_plain - want['train']['plain']}
  out = {'train': [], 'eval': []}
  have = {s: {'chat': 0, 'plain': 0} for s in out}
  for i in order:
    split = 'eval' if is_eval[i] else 'train'
    kind = 'chat' if have[split]['chat'] < want[split]['chat'] else 'plain'
    if have[split][kind] >= want[split][kind]:
      continue
    text = sentences[i]
    row = {'split': split, 'kind': kind, 'sentence': text}
    if kind == 'chat':
      task = TASKS[int(task_rng.integers(len(TASKS)))]
      messages = [{'role': 'user', 'content': task.format(text=text)}]
      row['prompt_ids'] = tok.encode_chat(messages, add_generation_prompt=True)
      if len(row['prompt_ids']) > spec.seq_len - spec.min_answer_tokens:
        continue
    else:
      row['ids'] = tok.encode(text)
    have[split][kind] += 1
    out[split].append(row)
  for split in out:
    for kind, n in want[split].items():
      if have[split][kind] < n:
        raise ContextsError(f'only {have[split][kind]} {split} sentences fit as {kind} '
                            f'contexts, {n} wanted: give more --text or lower the counts')
  rows = out['train'] + out['eval']
  for index, row in enumerate(rows):
    row['index'] = index
  return rows


def answer(sampler, rows: list[dict], spec: ContextSpec, log_every_s: float = 30.0) -> None:
  """Fills each chat row's 'answer_ids' with the teacher's sampled answer (up to and with
  its EOS, or as long as the row allows). Rows are batched by prompt length."""
  tok = sampler.require_tokenizer()
  chats = sorted((r for r in rows if r['kind'] == 'chat'), key=lambda r: len(r['prompt_ids']))
  t0, last, n_tokens = time.time(), time.time(), 0
  for b in range(0, len(chats), spec.batch_size):
    batch = chats[b:b + spec.batch_size]
    new = spec.seq_len - max(len(r['prompt_ids']) for r in batch)
    out = sampler.generate_ids([r['prompt_ids'] for r in batch], new,
                               temperature=spec.temperature, top_p=spec.top_p,
                               seed=spec.seed, row_seeds=[r['index'] for r in batch])
    for r, ids in zip(batch, out.tolist()):
      r['answer_ids'] = cut_answer(ids, tok.eos_id, spec.seq_len - len(r['prompt_ids']))
      n_tokens += len(r['answer_ids'])
    if time.time() - last > log_every_s or b + spec.batch_size >= len(chats):
      last = time.time()
      print(f'contexts: {min(b + spec.batch_size, len(chats))}/{len(chats)} answers, '
            f'{n_tokens / (last - t0):.1f} tokens/s', flush=True)


def cut_answer(ids: list[int], eos_id: int, room: int) -> list[int]:
  """An answer up to and without its EOS (the row writer appends one), at most `room`
  tokens."""
  if eos_id in ids:
    ids = ids[:ids.index(eos_id)]
  return ids[:room]


def write(out: str, rows: list[dict], tok, spec: ContextSpec, description: dict) -> dict:
  """The token cache of the contexts (atomic); its meta.json describes how it was built."""
  def records():
    for r in rows:
      if r['kind'] == 'chat':
        yield r['split'], r['prompt_ids'] + r['answer_ids'], len(r['prompt_ids'])
      else:
        yield r['split'], r['ids'], 0
  counts = {s: {k: sum(r['split'] == s and r['kind'] == k for r in rows)
                for k in ('chat', 'plain')} for s in token_cache.SPLITS}
  answers = [len(r['answer_ids']) for r in rows if r['kind'] == 'chat']
  desc = {'source': 'chat_contexts', 'spec': dataclasses.asdict(spec), 'contexts': counts,
          'mean_answer_tokens': float(np.mean(answers)) if answers else 0.0,
          'eval_sentences': [r['sentence'] for r in rows if r['split'] == 'eval'],
          **description}
  return token_cache.write_cache(out, records(), tok, spec.seq_len, 'pad', desc, prompts=True)


def build(sampler, sentences: list[str], out: str, spec: ContextSpec,
          description: dict | None = None) -> dict:
  """Plans, answers and writes the contexts of `sampler` (an AR teacher with a chat
  tokenizer); returns the cache's meta."""
  spec.validate()
  if sampler.k:
    raise ContextsError(f'the teacher must be an AR model (k=0), this one has k={sampler.k}')
  tok = sampler.require_tokenizer()
  if tok.name != tokenization.HF:
    raise ContextsError(f'chat contexts need a model\'s own tokenizer (hf), not {tok.name}')
  if spec.seq_len > sampler.arch.max_seq_len:
    raise ContextsError(f'--seq_len={spec.seq_len} is longer than the model\'s '
                        f'{sampler.arch.max_seq_len} positions')
  rows = plan(sentences, tok, spec)
  t0 = time.time()
  answer(sampler, rows, spec)
  return write(out, rows, tok, spec, {'generation_seconds': time.time() - t0,
                                      **(description or {})})
