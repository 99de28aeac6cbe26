"""Imports a released K-Forcing PyTorch checkpoint as a kforcing_jax export.

  python -m kforcing_jax.import_official --ckpt=PATH --out=DIR \
      [--tokenizer=gpt2|bert-base-uncased|none] [--tokenizer_path=DIR] [--k=4] \
      [--mask_id=ID] [--max_seq_len=N] [--trust_pickle]

PATH is a `.ckpt` / `.pt` / `.bin` file (a Lightning-style dict whose `state_dict` holds
`backbone.`-prefixed names, or a bare state dict; read with torch), a `.npz` of the same
tensors under their names, or `hf://zwave/K-Forcing/<file>` (downloaded through
huggingface_hub). Shapes are inferred as the released loader infers them (V, D from the
embedding, L from the block indices, the head dim from `rotary_emb.inv_freq`); every
tensor is mapped (the fused qkv split per head, PyTorch's [out, in] kernels transposed),
none may be missing or left over, the checkpoint's `ema` entry is ignored as the released
loader ignores it, and values are cast to float32. The result is the self-describing
export `python -m kforcing_jax.export` writes (kforcing_jax.load reads it), with the
source file and its sha256 as provenance.
"""
from __future__ import annotations

import hashlib
import os
import re

import numpy as np

from kforcing_jax import errors
from kforcing_jax.data import tokenization
from kforcing_jax.interop import export as export_lib
from kforcing_jax.models import arch as arch_lib


HF_PREFIX = 'hf://'
TORCH_SUFFIXES = ('.ckpt', '.pt', '.pth', '.bin')
# tokenizer -> (vocabulary incl. the reserved id, mask id never emitted, sequence length)
RELEASED = {'gpt2': (50258, 50257, 1024), 'bert-base-uncased': (30522, 103, 128)}


class ImportFailed(errors.UserError):
  """A released checkpoint that cannot be imported; the message names the file or flag."""


def resolve(path: str) -> str:
  """A local file for PATH; hf://OWNER/REPO/FILE is downloaded (cached) when online."""
  if not path.startswith(HF_PREFIX):
    if not os.path.isfile(path):
      raise ImportFailed(f'--ckpt={path!r} is not a file')
    return path
  parts = path[len(HF_PREFIX):].split('/')
  if len(parts) < 3:
    raise ImportFailed(f'--ckpt={path!r}: expected hf://OWNER/REPO/FILE, e.g. '
                       'hf://zwave/K-Forcing/pflm_owt_k4.ckpt')
  repo, filename = '/'.join(parts[:2]), '/'.join(parts[2:])
  try:
    import huggingface_hub
    return huggingface_hub.hf_hub_download(repo_id=repo, filename=filename)
  except Exception as e:  # offline, unknown file, no huggingface_hub: one clear message
    raise ImportFailed(
        f'could not download {filename} from the Hugging Face repository {repo} '
        f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); download it '
        f'where there is a network (https://huggingface.co/{repo}/blob/main/{filename}) and '
        'pass the local file: --ckpt=/path/to/' + os.path.basename(filename)) from None


def _torch_load(path: str, trust_pickle: bool):
  try:
    import torch
  except ImportError:
    raise ImportFailed(f'reading {path} needs torch (pip install -r requirements-external.txt)'
                       '; or pass the same tensors as a .npz') from None
  import pickle
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    if not trust_pickle:
      raise ImportFailed(
          f'{path} holds Python objects beyond tensors, which only a full pickle load can '
          f'read (and a pickle can run code): pass --trust_pickle if you trust this file '
          f'({str(e).splitlines()[0]})') from None
    return torch.load(path, map_location='cpu', weights_only=False)


def read_state_dict(path: str, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """The released model's tensors (names without `backbone.`) as float32 numpy."""
  if path.endswith('.npz'):
    with np.load(path) as z:
      raw = {k: z[k] for k in z.files}
  elif path.endswith(TORCH_SUFFIXES):
    ckpt = _torch_load(path, trust_pickle)
    if not isinstance(ckpt, dict):
      raise ImportFailed(f'{path}: expected a dict (a checkpoint or a state dict), got '
                         f'{type(ckpt).__name__}')
    raw = ckpt.get('state_dict', ckpt)  # the released loader's rule; 'ema' is never read
    raw = {k: v.detach().float().numpy() for k, v in raw.items() if hasattr(v, 'detach')}
  else:
    raise ImportFailed(f'--ckpt={path!r}: unknown file type; allowed: '
                       f'{", ".join(TORCH_SUFFIXES)}, .npz')
  return {k.removeprefix('backbone.'): np.asarray(v, np.float32) for k, v in raw.items()}


def expected_shapes(V: int, D: int, L: int, head_dim: int, pflm: bool, mlp_ratio: int = 4):
  out = {'vocab_embed.embedding': (V, D), 'rotary_emb.inv_freq': (head_dim // 2,),
         'output_layer.norm_final.weight': (D,), 'output_layer.linear.weight': (V, D),
         'output_layer.linear.bias': (V,)}
  F = mlp_ratio * D
  for i in range(L):
    b = f'blocks.{i}.'
    out.update({b + 'norm1.weight': (D,), b + 'attn_qkv.weight': (3 * D, D),
                b + 'attn_out.weight': (D, D), b + 'norm2.weight': (D,),
                b + 'mlp.0.weight': (F, D), b + 'mlp.0.bias': (F,),
                b + 'mlp.2.weight': (D, F), b + 'mlp.2.bias': (D,)})
  if pflm:
    n = 'noise_encoder.'
    out.update({n + 'combined_proj.weight': (D, 2 * D), n + 'combined_proj.bias': (D,),
                n + 'norm.weight': (D,), n + 'norm.bias': (D,), n + 'mlp.0.weight': (F, D),
                n + 'mlp.0.bias': (F,), n + 'mlp.2.weight': (D, F), n + 'mlp.2.bias': (D,)})
  return out


def random_state(V: int, D: int, L: int, head_dim: int, pflm: bool, seed: int = 0,
                 rope_base: float = 10000.0, scale: float = 0.05) -> dict[str, np.ndarray]:
  """A random-weight state dict in the released layout (tests, speed checks of imports)."""
  rng = np.random.default_rng(seed)
  state = {k: (scale * rng.standard_normal(s)).astype(np.float32)
           for k, s in expected_shapes(V, D, L, head_dim, pflm).items()}
  state['rotary_emb.inv_freq'] = (1.0 / rope_base ** (np.arange(0, head_dim, 2) / head_dim)
                                  ).astype(np.float32)
  return state


def infer_arch(state: dict, *, mask_id: int, max_seq_len: int,
               rope_base: float = 10000.0) -> arch_lib.ArchConfig:
  """The architecture of a released state dict, checked tensor by tensor."""
  for name in ('vocab_embed.embedding', 'rotary_emb.inv_freq'):
    if name not in state:
      raise ImportFailed(f'the checkpoint has no {name}: it is not a released K-Forcing '
                         f'model (names seen: {", ".join(sorted(state)[:8])}, ...)')
  V, D = state['vocab_embed.embedding'].shape
  blocks = {int(m.group(1)) for k in state for m in [re.match(r'blocks\.(\d+)\.', k)] if m}
  L = max(blocks) + 1 if blocks else 0
  head_dim = 2 * state['rotary_emb.inv_freq'].shape[0]
  if L == 0 or D % head_dim:
    raise ImportFailed(f'cannot infer the architecture: {L} blocks, D={D}, head dim {head_dim}')
  pflm = any(k.startswith('noise_encoder.') for k in state)
  want = expected_shapes(V, D, L, head_dim, pflm)
  missing = sorted(set(want) - set(state))
  unexpected = sorted(set(state) - set(want))
  if missing or unexpected:
    raise ImportFailed(f'the checkpoint does not match a released {"PFLM" if pflm else "AR"} '
                       f'model with V={V}, D={D}, L={L}, head dim {head_dim}: missing: '
                       f'{", ".join(missing) or "none"}; unexpected: '
                       f'{", ".join(unexpected) or "none"}')
  wrong = [f'{k}: {list(state[k].shape)}, expected {list(s)}' for k, s in want.items()
           if tuple(state[k].shape) != s]
  if wrong:
    raise ImportFailed('tensors with unexpected shapes: ' + '; '.join(wrong))
  ours = 1.0 / (rope_base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if not np.allclose(state['rotary_emb.inv_freq'], ours, rtol=1e-6, atol=0):
    raise ImportFailed(f'rotary_emb.inv_freq is not the RoPE of base {rope_base} over head dim '
                       f'{head_dim} that this model computes (max difference '
                       f'{np.max(np.abs(state["rotary_emb.inv_freq"] - ours)):.3g}); pass '
                       'the right --rope_base')
  if not 0 <= mask_id < V:
    raise ImportFailed(f'--mask_id={mask_id} is outside the vocabulary 0..{V - 1}')
  return arch_lib.ArchConfig(vocab_size=int(V), d_model=int(D), n_layers=L,
                              n_heads=int(D // head_dim), mlp_ratio=4,
                              max_seq_len=int(max_seq_len), rope_base=float(rope_base),
                              never_emit_ids=(int(mask_id),), pflm=pflm,
                              noise_freq_scale=1.0, noise_encoder='released')


def to_params(state: dict, arch: arch_lib.ArchConfig) -> dict:
  """kforcing_jax parameters (float32 numpy) from the released tensors."""
  D, H, hd = arch.d_model, arch.n_heads, arch.head_dim

  def ln(name, bias=None):
    out = {'scale': state[name]}
    if bias:
      out['bias'] = state[bias]
    return {'LayerNorm_0': out}

  def dense(prefix):  # torch Linear [out, in] -> flax kernel [in, out]
    out = {'kernel': state[prefix + '.weight'].T}
    if prefix + '.bias' in state:
      out['bias'] = state[prefix + '.bias']
    return out

  params = {'embed': {'embedding': state['vocab_embed.embedding']},
            'ln_f': ln('output_layer.norm_final.weight'),
            'head': dense('output_layer.linear')}
  for i in range(arch.n_layers):
    b = f'blocks.{i}.'
    params[f'block_{i}'] = {
        'ln1': ln(b + 'norm1.weight'), 'ln2': ln(b + 'norm2.weight'),
        # qkv rows are ordered (three, head, dim); the output's input columns (head, dim)
        'attn': {'qkv_kernel': state[b + 'attn_qkv.weight'].T.reshape(D, 3, H, hd),
                 'out_kernel': state[b + 'attn_out.weight'].T.reshape(H, hd, D)},
        'mlp': {'fc_in': dense(b + 'mlp.0'), 'fc_out': dense(b + 'mlp.2')}}
  if arch.pflm:
    n = 'noise_encoder.'
    params['noise_encoder'] = {
        'proj': dense(n + 'combined_proj'), 'ln': ln(n + 'norm.weight', n + 'norm.bias'),
        'mlp': {'fc_in': dense(n + 'mlp.0'), 'fc_out': dense(n + 'mlp.2')}}
  return {k: _contiguous(v) for k, v in params.items()}


def _contiguous(tree):
  if isinstance(tree, dict):
    return {k: _contiguous(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree, np.float32)


def window_from_name(path: str) -> int:
  m = re.search(r'_k(\d+)(?:[._-]|$)', os.path.basename(path))
  return int(m.group(1)) if m else -1


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      h.update(chunk)
  return h.hexdigest()


def tokenizer_identity(name: str, path: str, vocab_size: int) -> dict:
  if name == 'none':
    return {'name': 'none', 'vocab_size': vocab_size, 'fingerprint': ''}
  try:
    tok = tokenization.load(name, path)
  except (OSError, ValueError) as e:
    raise ImportFailed(f'--tokenizer={name}: {e} (offline: pass --tokenizer_path=DIR with its '
                       'files, or --tokenizer=none to import ids only)') from None
  if tok.vocab_size != vocab_size:
    raise ImportFailed(f'--tokenizer={name} has {tok.vocab_size} ids, the checkpoint '
                       f'{vocab_size}')
  return tok.identity()


def import_checkpoint(ckpt: str, out: str, *, tokenizer: str = '', tokenizer_path: str = '',
                      mask_id: int = -1, k: int = -1, max_seq_len: int = -1,
                      rope_base: float = 10000.0, trust_pickle: bool = False) -> dict:
  """Writes the export of a released checkpoint to `out`; returns its description."""
  if os.path.exists(out):
    raise ImportFailed(f'--out={out} already exists; choose a new path')
  local = resolve(ckpt)
  state = read_state_dict(local, trust_pickle)
  V = int(state['vocab_embed.embedding'].shape[0]) if 'vocab_embed.embedding' in state else -1
  if not tokenizer:
    tokenizer = next((n for n, (v, _, _) in RELEASED.items() if v == V), 'none')
  allowed = tuple(RELEASED) + ('none',)
  if tokenizer not in allowed:
    raise ImportFailed(f'--tokenizer={tokenizer!r}; allowed: {", ".join(allowed)}')
  _, default_mask, default_len = RELEASED.get(tokenizer, (V, -1, 1024))
  mask_id = default_mask if mask_id < 0 else mask_id
  if mask_id < 0:
    raise ImportFailed('--mask_id is needed with --tokenizer=none (the id the model never '
                       'emits; the released models use 50257 with gpt2, 103 with '
                       'bert-base-uncased)')
  arch = infer_arch(state, mask_id=mask_id, rope_base=rope_base,
                    max_seq_len=default_len if max_seq_len <= 0 else max_seq_len)
  if arch.pflm:
    k = window_from_name(ckpt) if k < 0 else k
    if k < 1:
      raise ImportFailed(f'{ckpt}: a PFLM checkpoint does not record its window; pass --k '
                         '(the released ones have k=4)')
  elif k > 0:
    raise ImportFailed(f'--k={k} was given for an AR checkpoint (no noise encoder); allowed: 0')
  desc = {'stage': 'imported', 'k': max(k, 0), 'arch': arch.to_dict(),
          'tokenizer': tokenizer_identity(tokenizer, tokenizer_path, arch.vocab_size),
          'tokenizer_path': os.path.abspath(tokenizer_path) if tokenizer_path else '',
          'provenance': {'importer': 'kforcing_jax.import_official', 'source': ckpt,
                         'file': os.path.basename(local), 'sha256': sha256(local)}}
  return export_lib.write(out, to_params(state, arch), desc)
