"""Tiny Llama-family models that transformers builds and saves (one per family and feature),
a tiny ChatML tokenizer, and GGUF files written as llama.cpp's converter writes them: the
inputs of tests/test_import_hf.py and launch/hf_parity.py."""
import json
import os

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

import gguf
import torch
import transformers

V = 320
PROMPT_LEN = 520
TEXT = ('The quick brown fox jumps over the lazy dog. Numbers 12345 and café, naïve, 日本語! '
        'Chat models answer questions about the capital of France: it is Paris.\n\n  Spaces '
        'and\ttabs too. ')
TEMPLATE = ("{{ bos_token }}{% for m in messages %}\n"
            "  {% if loop.first and m['role'] != 'system' %}\n"
            "<|im_start|>system\nYou are helpful.<|im_end|>\n"
            "  {% endif %}\n"
            "  {% if m['role'] not in ['system', 'user', 'assistant'] %}\n"
            "{{ raise_exception('unknown role ' + m['role']) }}\n"
            "  {% endif %}\n"
            "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
            "{% endfor %}\n"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
             initializer_range=0.08, bos_token_id=0, eos_token_id=2)
# name -> (transformers config class, its fields, config.json form, shards)
FAMILIES = {
    'llama_gqa': ('LlamaConfig', {}, 'v5', False),
    'llama_mha_biases_llama3_rope': (
        'LlamaConfig', dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True,
                            rope_parameters={'rope_type': 'llama3', 'rope_theta': 5000.0,
                                             'factor': 8.0, 'low_freq_factor': 1.0,
                                             'high_freq_factor': 4.0,
                                             'original_max_position_embeddings': 64}),
        'v4', False),
    'llama_tied_linear_rope': (
        'LlamaConfig', dict(tie_word_embeddings=True, num_key_value_heads=1,
                            rope_parameters={'rope_type': 'linear', 'factor': 2.0,
                                             'rope_theta': 10000.0}), 'v4', False),
    'mistral_sharded': ('MistralConfig', dict(sliding_window=None), 'v5', True),
    'qwen2_biases_tied': ('Qwen2Config', dict(tie_word_embeddings=True), 'v5', False),
    'qwen3_qk_norm_head_dim': ('Qwen3Config', dict(head_dim=24, rope_parameters={
        'rope_type': 'default', 'rope_theta': 1e6}), 'v5', False),
}


def _perturb(model, seed):
  """Norm scales away from 1 and non-zero biases, so that a misplaced one shows."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.add_(0.2 * torch.randn(p.shape, generator=g))
      elif name.endswith('bias'):
        p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _to_v4_form(path):
  """Rewrites config.json's rope_parameters as transformers 4 wrote them."""
  file = os.path.join(path, 'config.json')
  with open(file) as f:
    cfg = json.load(f)
  rope = cfg.pop('rope_parameters')
  cfg['rope_theta'] = rope.pop('rope_theta')
  if rope.get('rope_type', 'default') != 'default':
    rope['type'] = rope.pop('rope_type')
    cfg['rope_scaling'] = rope
  with open(file, 'w') as f:
    json.dump(cfg, f)


def tiny_tokenizer(path):
  """A byte-level BPE with ChatML special tokens and a BOS-adding post-processor, saved
  by transformers with the chat template."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([TEXT] * 3, trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok.post_processor = processors.TemplateProcessing(
      single='<|endoftext|> $A', pair='<|endoftext|> $A <|endoftext|> $B',
      special_tokens=[('<|endoftext|>', 0)])
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token='<|endoftext|>', eos_token='<|im_end|>',
      pad_token='<|endoftext|>', chat_template=TEMPLATE).save_pretrained(path)


def make_hf_model(path, name, seed=0):
  cls, fields, form, shards = FAMILIES[name]
  torch.manual_seed(seed)
  cfg = getattr(transformers, cls)(**{**BASE, **fields})
  model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
  _perturb(model, seed)
  model.save_pretrained(path, max_shard_size='40KB' if shards else '1GB')
  if form == 'v4':
    _to_v4_form(path)
  tiny_tokenizer(path)
  return path


_GGUF_NAMES = {'input_layernorm': 'attn_norm', 'post_attention_layernorm': 'ffn_norm',
               'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k',
               'self_attn.v_proj': 'attn_v', 'self_attn.o_proj': 'attn_output',
               'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up', 'mlp.down_proj': 'ffn_down'}


def _llama_cpp_permute(w, n_heads):
  """llama.cpp's converter order of q/k rows for its interleaved RoPE."""
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def write_gguf(path, model, arch, quant=('Q8_0', 'Q4_1'), bad_type=None):
  """A GGUF file of a transformers model as llama.cpp's converter writes it: llama.cpp
  names, q/k permuted for 'llama', 2-D weights quantized (alternating the given types)."""
  cfg = model.config
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_freq_base(cfg.rope_parameters['rope_theta'])
  w.add_vocab_size(cfg.vocab_size)
  k = 0
  for name, t in model.state_dict().items():
    x = t.numpy().astype(np.float32)
    if name == 'lm_head.weight' and cfg.tie_word_embeddings:
      continue
    g = {'model.embed_tokens.weight': 'token_embd.weight', 'model.norm.weight':
         'output_norm.weight', 'lm_head.weight': 'output.weight'}.get(name)
    if g is None:
      layer, rest = name[len('model.layers.'):].split('.', 1)
      part, leaf = rest.rsplit('.', 1)
      g = f'blk.{layer}.{_GGUF_NAMES[part]}.{leaf}'
    if arch == 'llama' and '.attn_q.' in g:
      x = _llama_cpp_permute(x, cfg.num_attention_heads)
    if arch == 'llama' and '.attn_k.' in g:
      x = _llama_cpp_permute(x, cfg.num_key_value_heads)
    if x.ndim == 2 and g != 'token_embd.weight':
      kind = gguf.GGMLQuantizationType[bad_type or quant[k % len(quant)]]
      k += 1
      if bad_type:
        size = gguf.GGML_QUANT_SIZES[kind]
        data = np.zeros((x.shape[0], x.shape[1] // size[0] * size[1]), np.uint8)
      else:
        data = gguf.quants.quantize(x, kind)
      w.add_tensor(g, data, raw_shape=data.shape, raw_dtype=kind)
    else:
      w.add_tensor(g, x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


