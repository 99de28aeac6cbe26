"""Quality of every model in a run: the `evaluate` stage and its CLI (docs/design.md section 5).

  python -m kforcing_jax.evaluate --workdir=DIR
  python -m kforcing_jax.evaluate --config=CONFIG --teacher_export=AR_DIR \
      [--exports=PFLM_DIR,...] --out=DIR      # exported or imported models

For the AR teacher and every student k, every K <= k, with the frequency penalty off and
at evaluate.freq_penalty: generative NLL of sampled continuations under each evaluator
(`exact`: the synthetic source's forward algorithm; `teacher`: the AR teacher), mean
unigram entropy of the samples, agreement with the AR teacher on shared noise (held-out
contexts, same u), and NFE per token. Prompts, seeds and lengths are fixed and recorded.
Writes WORKDIR/evaluate/report.json, report.md and report.png (--out with exports; the
config then names the data the prompts come from, e.g. configs/owt_from_released.py).
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import errors
from kforcing_jax.data import datasets as data_lib
from kforcing_jax.decoding import engine as decode
from kforcing_jax.decoding import sampler as sampler_lib
from kforcing_jax.evaluation import external_lm
from kforcing_jax.evaluation import misses as misses_lib
from kforcing_jax.models import layouts
from kforcing_jax.models import quantize
from kforcing_jax.models import sampling
from kforcing_jax.models import transformer as model_lib
from kforcing_jax.training import targets as targets_lib
from kforcing_jax.training import writers


def unigram_entropy(tokens) -> float:
  """Entropy (nats) of the empirical token distribution of one sample."""
  tokens = np.asarray(tokens)
  if tokens.size == 0:
    return 0.0
  _, counts = np.unique(tokens, return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log(p)).sum())


def next_token_logprobs(model, params, tokens_BxT):
  """log p(token[t] | tokens[<t]) [B, T - 1] of a causal model, gathered inside the jit."""
  B, T = tokens_BxT.shape
  logits = model.apply(quantize.variables(params), tokens_BxT, jnp.broadcast_to(jnp.arange(T), (B, T)),
                       method=model_lib.Transformer.forward)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  return jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1)[..., 0]


class Evaluators:
  """gen-NLL of [prompt | completion] rows: 'exact' (synthetic source), 'teacher', and an
  external pretrained LM (kforcing_jax.external_lm) when one is given."""

  def __init__(self, source, teacher: sampler_lib.Sampler, external=None):
    self.source = source
    self.external = external
    self.params = teacher.params
    model = teacher.engine.model
    self._logprobs = jax.jit(lambda p, t: next_token_logprobs(model, p, t))

  def __call__(self, prompts, completions, width: int | None = None) -> dict:
    """Mean over rows of each row's mean NLL of its completion. All rows are scored in one
    call, right-padded to `width` (default: the longest row): one compile per width."""
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(width or 0, max(len(r) for r in rows))
    batch = np.zeros((len(rows), width), np.int32)
    valid = np.zeros((len(rows), width - 1), bool)  # target t + 1 of row i is scored
    for i, (r, p) in enumerate(zip(rows, prompts)):
      batch[i, :len(r)] = r
      valid[i, len(p) - 1:len(r) - 1] = True
    counts = np.maximum(valid.sum(1), 1)
    lp = np.asarray(self._logprobs(self.params, jnp.asarray(batch)))
    out = {'teacher': float(np.mean(-(lp * valid).sum(1) / counts))}
    if isinstance(self.source, data_lib.SyntheticSource):
      lp_exact = self.source.hmm.token_logprobs(batch)[:, :width - 1]  # target t >= 1
      out['exact'] = float(np.mean(-(lp_exact * valid).sum(1) / counts))
    if self.external is not None:
      tok = self.source.tokenizer
      ext = self.external.row_nlls([tok.decode(p) for p in prompts],
                                   [tok.decode(c) for c in completions])
      out[self.external.name] = float(np.nanmean(ext)) if np.isfinite(ext).any() else None
    return out


def eval_prompts(source, num_prompts: int, prompt_len: int, seed: int) -> list[list[int]]:
  """The first held-out rows' prompts: a row's own prompt where the source records one
  (chat contexts: the rendered conversation up to the assistant's turn), else its first
  prompt_len tokens."""
  it = data_lib.BatchIterator(source, 'eval', num_prompts, None, seed, False)
  batch = it.local_batch(0)
  lengths = None
  if hasattr(source, 'prompt_lengths'):  # indexable rows that may record their prompts
    lengths = source.prompt_lengths('eval', it.example_ids(np.arange(num_prompts)))
  prompts = []
  for r, (row, m) in enumerate(zip(batch['tokens'], batch['mask'])):
    n = int(lengths[r]) if lengths is not None and lengths[r] > 0 else prompt_len
    prompts.append(list(map(int, row[m][:n])))
  return [p for p in prompts if p]


def shared_noise_hits(student: sampler_lib.Sampler, teacher: sampler_lib.Sampler, batch,
                      seed: int):
  """The student's first-k tokens against the AR teacher's inverse-CDF rollout on the same
  contexts and noise: (hit [B, N, k], ok [B, N]: valid windows, the teacher's probability
  of its token [B, N, k], u's distance to that token's CDF interval end [B, N, k])."""
  k = student.k
  s_model, t_model = student.engine.model, teacher.engine.model
  ctx, mask = jnp.asarray(batch['tokens']), jnp.asarray(batch['mask'])

  @jax.jit
  def run(sp, tp, ctx, mask):
    u = sampling.uniform_noise(jax.random.key(seed), ctx.shape + (k,))
    y, prob, edge = targets_lib.ar_teacher_rollout(t_model, tp, ctx, u)
    pred = sampling.pflm_readout(student.arch.readout,
                                 layouts.apply_window(s_model, sp, ctx, None, u), u)
    ok = mask
    for i in student.arch.never_emit_ids:
      ok = ok & jnp.all(y != i, axis=-1)
    return pred == y, ok, prob, edge

  return jax.device_get(run(student.params, teacher.params, ctx, mask))


def all_k_agreement(hit_BxNxK, ok_BxN) -> list[float]:
  """All-K match rates for K = 1..k over the valid windows."""
  cum = np.cumprod(hit_BxNxK, axis=-1)  # all of the first K positions match
  return [float(cum[..., K - 1][ok_BxN].mean()) for K in range(1, hit_BxNxK.shape[-1] + 1)]


def shared_noise_agreement(student: sampler_lib.Sampler, teacher: sampler_lib.Sampler, batch,
                           seed: int) -> list[float]:
  """Per-position match of the student's first-k tokens with the AR teacher's inverse-CDF
  rollout on the same contexts and noise; returns all-K rates for K = 1..k."""
  hit, ok, _, _ = shared_noise_hits(student, teacher, batch, seed)
  return all_k_agreement(hit, ok)


def evaluate(cfg, source, teacher, models) -> dict:
  """models: [(name, callable returning its Sampler)], loaded one at a time."""
  e = cfg.evaluate
  tok = source.tokenizer
  external = None
  if e.external_lm:
    external = external_lm.ExternalLM(e.external_lm, e.external_batch_size)
  evaluators = Evaluators(source, teacher, external)
  prompts = eval_prompts(source, e.num_prompts, e.prompt_len, cfg.seed)
  longest = max(len(p) for p in prompts)
  new_tokens = min(e.max_new_tokens, teacher.arch.max_seq_len - longest)
  if new_tokens < 1:
    raise errors.StageError(f'the longest held-out prompt has {longest} tokens: no room '
                            f'for a completion within the model\'s {teacher.arch.max_seq_len}')
  synthetic = isinstance(source, data_lib.SyntheticSource)
  eos = -1 if synthetic else tok.eos_id  # synthetic EOS only separates sentences
  rows_in = [p for p in prompts for _ in range(e.num_samples)]
  row_seeds = list(range(len(rows_in)))
  width = longest + new_tokens
  agree_batch = data_lib.BatchIterator(source, 'eval', e.agreement_rows, None, cfg.seed + 1,
                                       False).local_batch(0)
  report_rows, student_misses = [], {}
  for stage, load in models:
    sampler = load()
    if sampler.arch.vocab_size != tok.vocab_size:
      raise errors.StageError(f'{stage} has {sampler.arch.vocab_size} ids, the data\'s '
                                  f'tokenizer {tok.name} {tok.vocab_size}')
    k = sampler.k
    agree = None
    if k:
      hit, ok, prob, edge = shared_noise_hits(sampler, teacher, agree_batch, e.seed)
      agree = all_k_agreement(hit, ok)
      student_misses[stage] = misses_lib.breakdown(hit, ok, prob, edge)
    settings = [(1, 0.0)] if k == 0 else [(K, lam) for K in windows(e, k)
                                          for lam in sorted({0.0, e.freq_penalty})]
    for K, lam in settings:
      spec = decode.DecodeSpec(K=K, pflm=k > 0, max_new_tokens=new_tokens, freq_penalty=lam,
                               eos_id=eos, pad_id=tok.pad_id)
      out, _ = sampler.engine.generate(rows_in, spec, seed=e.seed, row_seeds=row_seeds)
      completions = [sampler_lib.cut_at_eos(gen, eos) for gen in out.tolist()]
      row = {'model': 'teacher' if k == 0 else f'k{k}', 'stage': stage, 'K': K,
             'freq_penalty': lam, 'gen_nll': evaluators(rows_in, completions, width),
             'entropy': float(np.mean([unigram_entropy(c) for c in completions])),
             'agreement_all': None if agree is None else agree[K - 1],
             'nfe_per_token': 1.0 / K}
      if lam == 0.0 and e.show_samples > 0 and tok is not None and not synthetic:
        row['samples'] = [tok.decode(c) for c in completions[:e.show_samples * e.num_samples:
                                                               e.num_samples]]
      report_rows.append(row)
      print(f'evaluate {stage} K={K} lambda={lam}: gen_nll {row["gen_nll"]}, entropy '
            f'{row["entropy"]:.3f}, agreement {row["agreement_all"]}', flush=True)
  entropy_rate = source.hmm.entropy_rate(cfg.data.seq_len) if synthetic else None
  shown = [] if synthetic else [tok.decode(p) for p in prompts[:e.show_samples]]
  return {'source_entropy_rate': entropy_rate, 'rows': report_rows, 'sample_prompts': shown,
          'misses': student_misses,
          'protocol': {'num_prompts': len(prompts), 'prompt_len': e.prompt_len,
                       'num_samples': e.num_samples, 'max_new_tokens': new_tokens,
                       'seed': e.seed, 'agreement_rows': e.agreement_rows,
                       'eos_id': eos, 'data_seed': cfg.seed,
                       'windows': list(e.get('windows', ())) or None,  # None: 1..k
                       'external_lm': e.external_lm or None}}


def windows(e, k: int) -> list[int]:
  """The K values a student of window k is evaluated at: evaluate.windows' values up to k
  and k itself (its headline row); () = 1..k."""
  asked = e.get('windows', ())  # absent from configs written before the field
  if not asked:
    return list(range(1, k + 1))
  return sorted({K for K in asked if K <= k} | {k})


def markdown(report: dict, speed_md: str | None = None) -> str:
  evals = sorted({k for r in report['rows'] for k in r['gen_nll']})
  lines = []
  if report['source_entropy_rate'] is not None:
    lines.append(f'Source entropy rate: {report["source_entropy_rate"]:.4f} nats/token\n')
  # the fidelity figures: each row's NLL and entropy over those of the AR teacher's samples
  ref = next((r for r in report['rows'] if r['model'] == 'teacher'), None)

  def ratio(a, b):
    return '-' if a is None or not b else f'{a / b:.3f}'
  lines.append('| model | K | lambda | ' + ' | '.join(f'gen NLL ({e})' for e in evals) +
               ' | gen PPL (' + evals[0] + ') | NLL / teacher\'s | entropy | entropy / '
               'teacher\'s | agreement (all K) | NFE/token |')
  lines.append('|---' * (8 + len(evals)) + '|')
  for r in report['rows']:
    nll = [r['gen_nll'][e] for e in evals]
    agree = '-' if r['agreement_all'] is None else f'{r["agreement_all"]:.4f}'
    lines.append(f'| {r["model"]} | {r["K"]} | {r["freq_penalty"]} | ' +
                 ' | '.join('-' if v is None else f'{v:.4f}' for v in nll) +
                 f' | {"-" if nll[0] is None else f"{math.exp(nll[0]):.3f}"} | '
                 f'{ratio(nll[0], ref and ref["gen_nll"][evals[0]])} | '
                 f'{r["entropy"]:.4f} | {ratio(r["entropy"], ref and ref["entropy"])} | '
                 f'{agree} | {r["nfe_per_token"]:.3f} |')
  out = '\n'.join(lines) + '\n'
  if report.get('sample_prompts'):
    out += '\n## Samples (lambda = 0, the first held-out prompts)\n'
    for i, prompt in enumerate(report['sample_prompts']):
      out += f'\n### Prompt {i + 1}\n\n```\n{prompt.strip()}\n```\n'
      for r in report['rows']:
        if len(r.get('samples', ())) > i:
          out += f'\n**{r["model"]} K={r["K"]}:** {" ".join(r["samples"][i].split())}\n'
  if report.get('misses'):
    out += ('\n## Where the students miss the AR rollout (shared noise, the agreement rows)\n'
            + ''.join(misses_lib.markdown(stage, m) for stage, m in report['misses'].items()))
  if speed_md:
    out += '\n## Speed (benchmark in this workdir)\n\n' + speed_md
  return out


def write_report(report: dict, out_dir: str, workdir: str) -> None:
  writers.write_json(os.path.join(out_dir, 'report.json'), report)
  if jax.process_index() != 0:
    return
  speed = os.path.join(workdir, 'benchmark', 'benchmark.md')
  speed_md = open(speed, encoding='utf-8').read() if os.path.exists(speed) else None
  with open(os.path.join(out_dir, 'report.md'), 'w', encoding='utf-8') as f:
    f.write(markdown(report, speed_md))
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  key = 'exact' if 'exact' in report['rows'][0]['gen_nll'] else 'teacher'
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for r in report['rows']:
    marker = 'o' if r['freq_penalty'] == 0 else 's'
    ax.scatter(r['entropy'], math.exp(r['gen_nll'][key]), marker=marker)
    ax.annotate(f'{r["model"]} K={r["K"]}' + (f' λ={r["freq_penalty"]}' if r['freq_penalty']
                                               else ''),
                (r['entropy'], math.exp(r['gen_nll'][key])), fontsize=7)
  ax.set_yscale('log')  # one degenerate sample set must not flatten the rest
  ax.set_xlabel('unigram entropy of samples (nats)')
  ax.set_ylabel(f'generative perplexity ({key})')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, 'report.png'), dpi=120)
  plt.close(fig)
