"""A Sampler: one object that owns a model, its parameters, its window k, its tokenizer and
its compiled decoding loops -- text in, text out.

  import kforcing_jax
  sampler = kforcing_jax.load('/tmp/kf_k4')            # an export, or
  sampler = kforcing_jax.load_stage('/tmp/kf', 'distill_k4')  # a stage of a run
  print(sampler.generate(['| s12 s40'], max_new_tokens=32, K=4, freq_penalty=0.5))
  ids = sampler.generate_ids([[0, 12, 40]], max_new_tokens=32, seed=1)

The compiled decoding loops are shared by every Sampler with the same model and execution
configs: a call compiles only for a new K or a new bucket of batch size, prompt width or
max_new_tokens (decode.bucket: exact up to 8, then four per doubling; the extra rows and
tokens are dropped, and the tokens are those of the exact shapes); the temperature, top_k,
top_p, sampler, freq_penalty and seed are traced values. K is checked against the model's
window inside the engine: a k=4 model refuses K=8.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax.decoding import engine as decode
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.models import transformer as model_lib
from kforcing_jax.models import precision
from kforcing_jax.models import quantize
from kforcing_jax import sharding as sharding_lib
from kforcing_jax.data import tokenization


def one_device_mesh():
  return sharding_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})


class Sampler:
  """Decodes one model: AR (k = 0) or a PFLM of window k."""

  def __init__(self, arch: arch_lib.ArchConfig, params, *, k: int, tokenizer=None,
               exe: arch_lib.ExecConfig | None = None, max_len: int | None = None,
               description: dict | None = None, buckets: bool = True):
    exe = exe or arch_lib.ExecConfig()
    self.engine = decode.Engine(arch, precision.cast_params(params, exe), exe, k=k,
                                max_len=max_len, buckets=buckets)
    self.tokenizer = tokenizer
    self.description = description or {}

  # ---- properties --------------------------------------------------------------------------
  @property
  def arch(self) -> arch_lib.ArchConfig:
    return self.engine.arch

  @property
  def params(self):
    return self.engine.params

  @property
  def k(self) -> int:
    """0 for an AR model, the window for a PFLM."""
    return self.engine.k

  @property
  def eos_id(self) -> int:
    return self.require_tokenizer().eos_id

  def require_tokenizer(self):
    """The tokenizer, or a clear error when its files were not found."""
    if self.tokenizer is None:
      raise decode.DecodeError('this sampler has no tokenizer (its files were not found): use '
                               'generate_ids, or load it with tokenizer_path=DIR')
    return self.tokenizer

  # ---- decoding ------------------------------------------------------------------------------
  def spec(self, *, max_new_tokens: int, K: int | None = None, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, freq_penalty: float = 0.0,
           presence_penalty: float = 0.0, min_new_tokens: int = 0, banned_ids=None,
           sampler: str = 'categorical', stop_at_eos: bool = True) -> decode.DecodeSpec:
    """The DecodeSpec of these settings (K defaults to the window; AR models: 1).
    banned_ids: what min_new_tokens holds back (default: the EOS when stopping at it)."""
    pflm = self.k > 0
    K = (self.k if pflm else 1) if K is None else int(K)
    eos = self.tokenizer.eos_id if (stop_at_eos and self.tokenizer is not None) else -1
    pad = self.tokenizer.pad_id if self.tokenizer is not None else 0
    if banned_ids is None:
      banned_ids = (eos,) if eos >= 0 else ()
    return decode.DecodeSpec(K=K, pflm=pflm, max_new_tokens=int(max_new_tokens),
                             temperature=float(temperature), top_k=int(top_k),
                             top_p=float(top_p), sampler=sampler,
                             freq_penalty=float(freq_penalty),
                             presence_penalty=float(presence_penalty),
                             min_new_tokens=int(min_new_tokens),
                             banned_ids=tuple(int(t) for t in banned_ids), eos_id=eos,
                             pad_id=pad)

  def generate_ids(self, prompts, max_new_tokens: int | None = None, *, K: int | None = None,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   freq_penalty: float = 0.0, presence_penalty: float = 0.0,
                   min_new_tokens: int = 0, banned_ids=None, seed: int = 0, row_seeds=None,
                   sampler: str = 'categorical', stop_at_eos: bool = True,
                   noise=None) -> np.ndarray:
    """[B, max_new_tokens] int32 new tokens of each prompt (a list of id lists); after a
    row's EOS (with stop_at_eos and a tokenizer) its remaining tokens are the pad id.
    max_new_tokens defaults to the model length minus the longest prompt.

    noise: optional uniforms [steps, B, K] in the released sampler's order (token j of row
    b uses noise[j // K, b, j % K]) instead of the seeded ones: a PFLM's hints, or with
    sampler='inverse_cdf' an AR model's u (K = 1)."""
    prompts = [[int(t) for t in p] for p in prompts]
    if max_new_tokens is None:
      max_new_tokens = self.engine.max_len - max((len(p) for p in prompts), default=0)
    spec = self.spec(max_new_tokens=max_new_tokens, K=K, temperature=temperature, top_k=top_k,
                     top_p=top_p, freq_penalty=freq_penalty, presence_penalty=presence_penalty,
                     min_new_tokens=min_new_tokens, banned_ids=banned_ids, sampler=sampler,
                     stop_at_eos=stop_at_eos)
    noise_BxN = None
    if noise is not None:
      u = np.asarray(noise)
      if u.ndim != 3 or u.shape[1] != len(prompts) or u.shape[2] != spec.K:
        raise decode.DecodeError(f'noise has shape {list(u.shape)}; needed [steps, '
                                 f'{len(prompts)}, K={spec.K}]')
      noise_BxN = u.transpose(1, 0, 2).reshape(len(prompts), -1)
    out, _ = self.engine.generate(prompts, spec, seed=seed, row_seeds=row_seeds,
                                  noise_BxN=noise_BxN)
    return out

  def generate(self, texts, max_new_tokens: int | None = None, **kw) -> list[str]:
    """Completions of each text (up to and without its EOS); keyword arguments as
    generate_ids."""
    tok = self.require_tokenizer()
    ids = self.encode_prompts(texts)
    out = self.generate_ids(ids, max_new_tokens, **kw)
    return [tok.decode(cut_at_eos(row, tok.eos_id, keep_eos=False)) for row in out.tolist()]

  def encode_prompts(self, texts, max_tokens: int = 0) -> list[list[int]]:
    return encode_prompts(self.require_tokenizer(), texts, max_tokens)

  def logits(self, tokens_BxT) -> np.ndarray:
    """float32 [B, T, V] next-token logits of the causal forward. Computed in the engine's
    buckets of B and T (rows repeated, tokens appended: a causal forward's earlier positions
    do not see them), so ragged calls compile a few shapes."""
    tokens = np.asarray(tokens_BxT, np.int32)
    if tokens.ndim != 2 or 0 in tokens.shape:
      raise decode.DecodeError(f'tokens have shape {list(tokens.shape)}; needed [B, T] with '
                               'B, T >= 1')
    B, T = tokens.shape
    if self.engine.buckets:
      width = max(T, min(decode.bucket(T, decode.CACHE_ALIGN), self.engine.max_len))
      tokens = np.pad(tokens[np.arange(decode.bucket(B)) % B], ((0, 0), (0, width - T)))
    return np.asarray(self._forward(self.params, jnp.asarray(tokens)))[:B, :T]

  @property
  def _forward(self):
    return _forward_fn(self.arch, self.engine.exe)


@functools.cache
def _forward_fn(arch: arch_lib.ArchConfig, exe: arch_lib.ExecConfig):
  """The jitted causal forward of these configs, shared by every Sampler."""
  model = model_lib.build(arch, exe)
  return jax.jit(lambda p, t: model.apply(
      quantize.variables(p), t, jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape),
      method=model_lib.Transformer.forward))


def encode_prompts(tokenizer, texts, max_tokens: int = 0) -> list[list[int]]:
  """Each prompt's ids (tokenization.encode_prompt), cut to the first max_tokens (0: all;
  the released batch_inference_with_prefix.py keeps 6)."""
  out = []
  for text in texts:
    ids = tokenization.encode_prompt(tokenizer, text)
    if not ids:
      raise decode.DecodeError(f'prompt {text!r} encodes to no tokens')
    out.append(ids[:max_tokens] if max_tokens > 0 else ids)
  return out


def cut_at_eos(ids, eos_id: int, keep_eos: bool = True) -> list[int]:
  ids = [int(t) for t in ids]
  if eos_id >= 0 and eos_id in ids:
    i = ids.index(eos_id)
    return ids[:i + 1] if keep_eos else ids[:i]
  return ids
