"""Base configuration: every field kforcing_jax reads, each one commented.

Not launched directly; the other files here override it. Example launch:
  python main.py --config=configs/synthetic.py --workdir=/tmp/kf
Any field can be overridden on the command line: --config.stages.teacher.steps=100
"""
import ml_collections

DISTILL_WINDOWS = (1, 2, 4, 8)  # a stages.distill_k<K> section exists for each


def optimizer(learning_rate: float = 3e-4, warmup_steps: int = 500):
  """AdamW with warm-up, a decay schedule and gradient clipping (one per stage)."""
  o = ml_collections.ConfigDict()
  o.learning_rate = learning_rate  # peak learning rate.
  o.warmup_steps = warmup_steps  # linear warm-up from 0.
  o.schedule = 'cosine'  # after warm-up: cosine | linear | constant.
  o.min_lr_ratio = 0.1  # final lr = min_lr_ratio * peak (cosine, linear).
  o.weight_decay = 0.1  # AdamW decay on matrices (not LayerNorm, biases).
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.grad_clip = 1.0  # clip by global norm; 0 disables.
  o.ema_decay = 0.0  # EMA of parameters used for eval, later stages and export; 0 = off.
  return o


def training_stage(steps: int, batch_size: int, opt: ml_collections.ConfigDict):
  """What every training stage (teacher, distill_k<K>) has of its own."""
  s = ml_collections.ConfigDict()
  s.steps = steps  # optimizer steps.
  s.batch_size = batch_size  # global batch (rows); must divide by mesh data*fsdp.
  # Sequential microbatches per step (gradient accumulation in a lax.scan): the same
  # update as the whole batch, with 1/microbatches of its activation memory.
  # batch_size must divide by mesh data*fsdp*microbatches.
  s.microbatches = 1
  s.log_every = 50  # steps between progress lines / train metrics.
  s.checkpoint_every = 1000  # steps between checkpoints (and at the end).
  s.keep_checkpoints = 2  # checkpoints kept.
  s.eval_batches = 8  # held-out batches of data.eval_batch_size per evaluation.
  s.opt = opt
  return s


def teacher_stage():
  """The AR teacher (kind 'teacher'): next-token cross-entropy from a fresh init."""
  s = training_stage(steps=10000, batch_size=64, opt=optimizer(3e-4, 500))
  s.kind = 'teacher'
  s.eval_every = 1000  # steps between validation NLL runs (and at the end).
  return s


def distill_stage(k: int, objective: str = 'progressive'):
  """A distillation stage (docs/design.md section 3): a push-forward student of window k.
  Its section name is only its directory's name: `c.stages.ar_k4 = distill_stage(4,
  'ar_rollout')` adds a second k=4 stage under another objective."""
  s = training_stage(steps=2000, batch_size=64, opt=optimizer(3e-4, 200))
  s.kind = 'distill'
  s.k = k  # the student's window: tokens per forward pass (a power of two).
  s.eval_batches = 4  # held-out batches for the stage's agreement summary.
  # The stage's teacher (its weights start the student): '' = the model stage before it in
  # `pipeline` (or, when it is the first listed: teacher for k=1, distill_k<k/2> else), or
  # a stage name, or an export directory.
  s.teacher_stage = ''
  # What the student learns (kforcing_jax/training/objectives.py): progressive (the
  # paper's: its teacher's argmax + rollout targets) | ar_rollout (the AR model's own k-token
  # inverse-CDF rollout) | mixed (ar_rollout's targets for a share ar_fraction of the
  # windows, else progressive's) | on_policy (the AR model's inverse-CDF token after the
  # student's own earlier tokens) | on_policy_soft (on_policy's targets as soft targets
  # over the CDF neighbourhood of u, cdf_margin wide on each side).
  s.objective = objective
  # The AR model of ar_rollout / mixed / on_policy: '' = the AR model at the root of the
  # chain of teachers (the run's teacher stage, or the AR export it started from).
  s.ar_teacher = ''
  s.ar_fraction = 0.5  # mixed: share of windows with ar_rollout targets at the start,
  s.ar_fraction_end = -1.0  # ... moving linearly to this by the last step (-1: constant).
  # Cross-entropy weight of window position i (1-based) ~ i^position_power, mean 1.
  s.position_power = 0.0
  s.cdf_margin = 0.02  # on_policy_soft: half-width of the noise neighbourhood, in (0, 0.5].
  # Blocks the student adds on top of its teacher's (which it copies, depth included; the
  # new blocks start as identities). A wide window's tokens depend on each other in
  # sequence, which a deeper student resolves better (BENCHMARKS.md, a deeper k=4 student).
  s.extra_layers = 0
  # Temperature conditioning: tau per sequence uniform in [tau_min, tau_max]; the teacher
  # is tempered by tau and the student sees it. 1,1 = the paper's setting.
  s.tau_min = 1.0
  s.tau_max = 1.0
  return s


def distill_stages(c):
  """The config's stages.distill_k<K> sections, to override them together."""
  return [c.stages[f'distill_k{k}'] for k in DISTILL_WINDOWS]


def from_released(c, tokenizer: str, max_seq_len: int, teacher_export: str):
  """Distil k=8 from an imported released k=4 export, with the released vocabulary,
  length and noise encoder (configs/*_from_released.py)."""
  c.pipeline = ('distill_k8',)
  c.data.tokenizer = tokenizer
  c.model.max_seq_len = max_seq_len
  c.model.noise_freq_scale = 1.0
  c.model.noise_encoder = 'released'
  c.stages.distill_k8.teacher_stage = teacher_export
  return c


def set_microbatches(c, n: int):
  """Every training stage accumulates gradients over n sequential microbatches."""
  for s in c.stages.values():
    s.microbatches = n


def get_config():
  c = ml_collections.ConfigDict()
  # The stages run in order by main.py; each writes WORKDIR/<stage>/ and is skipped when
  # its summary.json exists. Known: every section of `stages` (its `kind` says what it
  # trains), sample, evaluate. On the command line a comma-separated string also works:
  # --config.pipeline=teacher,distill_k1
  c.pipeline = ('teacher',)
  c.seed = 0  # model init, dropout, distillation noise.

  # The model: architecture (saved with the weights) and the run's execution settings.
  c.model = m = ml_collections.ConfigDict()
  m.d_model = 768  # residual width D.
  m.n_layers = 12  # number of pre-LN blocks L.
  m.n_heads = 12  # attention (query) heads.
  m.mlp_ratio = 4  # MLP hidden width = mlp_ratio * d_model (unless mlp_dim is set).
  # Llama-family architecture (the defaults are the paper's backbone). A student distilled
  # from a teacher takes these from the teacher (e.g. an imported Llama or Qwen model).
  m.n_kv_heads = 0  # key/value heads of grouped-query attention; 0: n_heads.
  m.head_dim = 0  # per-head width; 0: d_model / n_heads.
  m.mlp_dim = 0  # MLP hidden width; 0: mlp_ratio * d_model.
  # One activation per MLP input projection, their outputs multiplied: ('gelu_tanh',) the
  # paper's MLP; ('silu', 'linear') SwiGLU (gate, up). Allowed: gelu_tanh, gelu, silu,
  # relu, linear.
  m.mlp_activations = ('gelu_tanh',)
  m.mlp_bias = True  # biases of the MLP projections.
  m.norm = 'layernorm'  # layernorm (scale-only) | rmsnorm; both computed in float32.
  m.norm_eps = 1e-5
  m.qkv_bias = False  # q/k/v projection biases (Qwen2).
  m.out_bias = False  # attention output projection bias.
  m.qk_norm = False  # per-head RMSNorm of q and k before RoPE (Qwen3).
  m.tie_embeddings = False  # the output head multiplies by the embedding table.
  m.head_bias = True  # the output head's bias.
  # RoPE scaling as transformers computes it: () | ('linear', factor) | ('llama3', factor,
  # low_freq_factor, high_freq_factor, original_max_position_embeddings).
  m.rope_scaling = ()
  # Vocabulary incl. the reserved never-emitted id. -1: take it from the data source's
  # tokenizer (the usual case); a positive value must then equal it.
  m.vocab_size = -1
  m.max_seq_len = -1  # longest sequence the model accepts; -1: data.seq_len.
  m.rope_base = 10000.0  # RoPE base, theta (rotate-half / NeoX style, whole head dim).
  # Push-forward students: the noise sinusoid's frequencies are
  # noise_freq_scale * 10000^(-j/(D/2)). 1.0 is the paper's encoder (released checkpoints);
  # larger values give the encoder features that oscillate within (0, 1), which makes
  # narrow CDF intervals much quicker to learn for small models.
  m.noise_freq_scale = 1.0
  # Noise encoder form of new students: released (LayerNorm with bias, exact erf GELU: the
  # released checkpoints' encoder) | scale_only_tanh (kforcing_jax's form before
  # architecture version 3). A student of a PFLM teacher keeps its teacher's form.
  m.noise_encoder = 'released'
  # How a student reads its tokens from its logits: argmax (the paper's, the released
  # checkpoints') | inverse_cdf (the token is the inverse CDF of its noise u under the
  # position's softmax: the logits are the next token's distribution; train it with
  # objective on_policy_kl). A student of a PFLM teacher keeps its teacher's readout.
  m.readout = 'argmax'
  # Execution (not saved with the weights):
  m.dtype = 'bfloat16'  # compute dtype: bfloat16 | float32. LayerNorm/softmax/logits stay f32.
  m.param_dtype = 'float32'  # parameter dtype: float32 | bfloat16.
  # Operand dtype of the weight products: '' (= dtype) | bfloat16 | float32. 'bfloat16'
  # with dtype 'float32' multiplies in bf16 with float32 results and keeps everything else
  # (activations, KV cache, softmax) in float32: fast on CPUs with bf16 dot instructions.
  m.dot_dtype = ''
  m.dropout = 0.0  # dropout after attention and MLP outputs during training.
  # Causal full-sequence attention: auto (cuDNN on GPU with bfloat16, XLA otherwise) |
  # xla | cudnn.
  m.attention_impl = 'auto'
  # Cached attention while decoding: xla (masked, over the whole cache) | pallas (a
  # flash-decoding kernel over the filled slots only; GPU).
  m.decode_attention = 'xla'
  # Products of the xla cached attention: dot | reduce (multiply-reduce for steps of 2..16
  # queries) | kernel (as reduce, and one-query steps in the CPU kernel of
  # kforcing_jax/kernels) | auto (kernel on a one-device CPU with a C++ compiler, reduce on
  # other CPUs, dots elsewhere).
  m.cache_products = 'auto'

  c.data = d = ml_collections.ConfigDict()
  d.source = 'synthetic'  # synthetic | lm1b | openwebtext | text
  d.seq_len = 128  # tokens per training row.
  d.eval_batch_size = 64  # global batch for validation and held-out agreement.
  # Tokenizer: '' = the source's default (lm1b: bert-base-uncased, openwebtext: gpt2,
  # synthetic: synthetic). Others: bert-base-uncased | gpt2.
  d.tokenizer = ''
  d.tokenizer_path = ''  # local directory with the tokenizer files (offline); '' = by name.
  # Row layout: pad = one sentence/record per row, padded with a loss mask (lm1b);
  # concat = documents joined with EOS and cut into seq_len blocks (openwebtext);
  # '' = the source's default.
  d.packing = ''
  d.path = ''  # openwebtext / text: files, a directory or a glob of local files.
  d.eval_path = ''  # text: separate held-out files; '' = split off eval_fraction.
  d.eval_fraction = 0.01  # openwebtext / text: seeded held-out share of documents/rows.
  d.tfds_data_dir = ''  # lm1b: tensorflow-datasets data_dir ('' = TFDS default).
  # openwebtext / text: directory of the tokenized corpus (memory-mapped arrays written
  # once by process 0, read by every host); '' = tokenize in memory on every run.
  d.cache_dir = ''
  d.shuffle = True  # seeded reshuffle every epoch (indexable sources).
  d.max_examples = -1  # use only the first N records of a file source (-1: all).
  # synthetic: the seeded hidden Markov source of docs/design.md section 7.
  d.synthetic = s = ml_collections.ConfigDict()
  s.seed = 1234  # the source itself (transition/emission tables).
  s.n_states = 32  # hidden states (plus one sentence-end state).
  s.n_symbols = 128  # emitted symbols; vocab = n_symbols + EOS + reserved id.
  s.branching = 2  # successor states per state (sparse transitions).
  s.symbols_per_state = 6  # each state's Zipf emission support.
  s.zipf_exponent = 1.5  # emission weights ~ 1 / rank^exponent.
  s.mean_sentence_len = 24  # expected tokens between EOS ids.
  # probability mass spread over EOS and all symbols in every state, so that any sample
  # that starts with EOS has a finite exact likelihood (generative NLL under the source).
  s.emission_floor = 0.001

  # Training stages, each with its own steps, batch, cadences and optimizer (`opt`).
  c.stages = st = ml_collections.ConfigDict()
  st.teacher = teacher_stage()  # the AR teacher
  for k in DISTILL_WINDOWS:  # progressive self-forcing distillation (docs/design.md section 3)
    st[f'distill_k{k}'] = distill_stage(k)

  # The `sample` stage: samples of every finished model stage from held-out prompts.
  c.sample = sp = ml_collections.ConfigDict()
  sp.num_prompts = 8  # held-out rows whose first tokens are the prompts.
  sp.prompt_len = 6  # prompt tokens taken from each row.
  sp.num_samples = 2  # samples per prompt.
  sp.max_new_tokens = 64
  sp.freq_penalty = 0.0  # PFLM frequency penalty lambda (released default 0.5).

  # The `evaluate` stage (docs/design.md section 5); fixed so two runs give the same numbers.
  c.evaluate = ev = ml_collections.ConfigDict()
  # held-out rows whose first prompt_len tokens are the prompts (rows of a chat-context
  # set, data.source=tokens, prompt with their own conversation instead).
  ev.num_prompts = 32
  ev.prompt_len = 6
  ev.num_samples = 2  # samples per prompt.
  ev.show_samples = 3  # prompts whose decoded samples the report shows (text sources).
  # The AR teacher models are compared with: '' = the run's teacher stage, or, in a run
  # that distils an export, the first distill stage's teacher export.
  ev.teacher = ''
  ev.max_new_tokens = 58  # capped at the model length minus the prompt.
  ev.freq_penalty = 0.5  # the second lambda evaluated for students (0 is always run).
  # The K values (tokens per pass) each student decodes at: those listed up to its window,
  # and its window itself; () = every K from 1 to its window. E.g. (1,) for K = 1 and k
  # only (each K is a compile and a decoding run).
  ev.windows = ()
  ev.seed = 2024  # decoding / agreement noise.
  ev.agreement_rows = 32  # held-out rows whose every position is a shared-noise context.
  # External evaluator LM (optional extra: requirements-external.txt): a Hugging Face name
  # ('gpt2-large', the field's convention) or a local save_pretrained directory; samples
  # are decoded to text and re-tokenized for it. '' = none.
  ev.external_lm = ''
  ev.external_batch_size = 8  # rows per external LM forward.

  # Device mesh: product of the three must equal the device count; one -1 fills.
  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = -1
  ms.fsdp = 1
  ms.tensor = 1
  return c
