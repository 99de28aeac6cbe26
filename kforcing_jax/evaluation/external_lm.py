"""An external pretrained LM as a generative-perplexity evaluator (docs/design.md section 5).

The field's convention is GPT-2 Large: samples are decoded to text with the run's own
tokenizer, re-tokenized with the evaluator's, and scored by the evaluator's NLL of the
continuation given the prompt. The model is loaded through Hugging Face `transformers`
(PyTorch), an optional extra (requirements-external.txt):

  --config.evaluate.external_lm=gpt2-large   # downloads from the Hub on first use
  --config.evaluate.external_lm=/models/gpt2-large   # a local save_pretrained directory

Its key in report.json's gen_nll is the last path component of external_lm.
"""
from __future__ import annotations

import os

import numpy as np

from kforcing_jax import errors


class ExternalLMError(errors.UserError):
  pass


def evaluator_name(name_or_path: str) -> str:
  return os.path.basename(os.path.normpath(name_or_path))


class ExternalLM:
  """NLL of text continuations under a Hugging Face causal LM (batched, right-padded)."""

  def __init__(self, name_or_path: str, batch_size: int = 8, device: str = ''):
    try:
      import torch  # pylint: disable=g-import-not-at-top
      import transformers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ExternalLMError(
          f'evaluate.external_lm={name_or_path!r} needs the optional extra: pip install -r '
          f'requirements-external.txt ({e})') from None
    self.torch = torch
    self.name = evaluator_name(name_or_path)
    self.batch_size = batch_size
    self.device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    try:
      self.tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
      self.model = transformers.AutoModelForCausalLM.from_pretrained(
          name_or_path, dtype=torch.float32).to(self.device).eval()
    except (OSError, ValueError) as e:
      raise ExternalLMError(f'evaluate.external_lm={name_or_path!r}: cannot load a causal LM '
                            f'and tokenizer from it ({e})') from None
    self.max_len = int(getattr(self.model.config, 'n_positions', 0) or
                       getattr(self.model.config, 'max_position_embeddings', 1024))
    # rows start with the model's BOS (GPT-2: <|endoftext|>), as in its own training
    bos = self.tokenizer.bos_token_id
    self.bos = [] if bos is None else [int(bos)]

  def encode_row(self, prompt: str, completion: str) -> tuple[list[int], int]:
    """(ids of [BOS | prompt | completion], index of the first completion id). Prompt and
    completion are tokenized apart so the scored tokens are exactly the completion's."""
    p = self.bos + self.tokenizer.encode(prompt, add_special_tokens=False)
    c = self.tokenizer.encode(completion, add_special_tokens=False)
    ids = (p + c)[:self.max_len]
    return ids, min(len(p), len(ids))

  def row_nlls(self, prompts: list[str], completions: list[str]) -> np.ndarray:
    """Mean NLL (nats per evaluator token) of each completion given its prompt; NaN for a
    completion that is empty after re-tokenization."""
    torch = self.torch
    rows = [self.encode_row(p, c) for p, c in zip(prompts, completions)]
    out = np.full(len(rows), np.nan)
    for lo in range(0, len(rows), self.batch_size):
      chunk = rows[lo:lo + self.batch_size]
      width = max(len(ids) for ids, _ in chunk)
      ids = torch.zeros((len(chunk), width), dtype=torch.long)
      attn = torch.zeros((len(chunk), width), dtype=torch.long)
      for i, (r, _) in enumerate(chunk):
        ids[i, :len(r)] = torch.tensor(r)
        attn[i, :len(r)] = 1
      with torch.no_grad():
        logits = self.model(input_ids=ids.to(self.device),
                            attention_mask=attn.to(self.device)).logits.float()
      logp = torch.log_softmax(logits, dim=-1).cpu().numpy()
      for i, (r, start) in enumerate(chunk):
        t = np.arange(max(start, 1), len(r))
        if len(t):
          out[lo + i] = -logp[i, t - 1, np.asarray(r)[t]].mean()
    return out
