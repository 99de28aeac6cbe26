#!/usr/bin/env bash
# Every GPU check of kforcing_jax in one call, for a short lease of one GPU:
#   OUT=DIR bash launch/gpu_check.sh [SECONDS]          (default 560 s in all)
#   SMOKE=1 OUT=/tmp/g bash launch/gpu_check.sh      (checks this script on a CPU in ~1 min)
# Sections, in order of value, each capped by what is left of SECONDS (skipped when < 20 s):
#   bench1   python -m kforcing_jax.benchmark at the paper's OWT shape, batch 1,16,64,256, K=4
#            (AR sampled with Gumbel-max and greedy, PFLM)
#   flashtest  pytest tests/test_flash_decode.py: the Pallas kernel == masked attention, on the GPU
#   pallas   the same benchmark with --decode_attention=pallas (flash-decoding kernel over the filled
#            slots only; first run of its Triton kernel on a GPU)
#   serve    launch/serve_bench.py --client=inproc at the OWT shape (random weights, 64 slots,
#            concurrency 1/16/64, with --decode_attention=pallas): the slot engine's buckets
#            and per-slot kernel vs the offline engine (needs the fastapi, uvicorn, httpx2
#            and prometheus-client wheels in .whl besides ml-collections and clu)
#   lm1b     the benchmark at the paper's LM1B shape (V=30,522, 122 new tokens), batch
#            1,64,256,1024, never measured yet
#   profile  launch/decode_profile.py --trace at batch 64 (kernels per decoding step)
#   bench8   batch 64 and 256 with --cache_phases=8 (attention reads about the filled part)
#   tests    pytest tests/test_decode.py tests/test_model.py on the GPU
#   train    a short bf16 teacher + k=1 distillation run (synthetic source), then a
#            D=768/L=12/seq-1024 teacher run for tokens/s
# (One decoding loop at the OWT shape takes ~25 s to compile on an H100: the benchmark
# compiles its loops in parallel threads. Measured before and dropped from here: see
# BENCHMARKS.md, "Decoding on the GPU".)
# Logs and JSON go to DIR (a tarball DIR/gpu_check.tgz is refreshed after every section, so
# a run cut off by its time limit still returns what finished). Missing pure-Python
# packages (ml-collections, clu) are installed from ./.whl when that folder exists; fetch
# them once where pip works with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl ml-collections==1.1.0 clu==0.0.12
set -uo pipefail
OUT=${OUT:-gpu_out}
BUDGET=${1:-560}
STAGE=/tmp/gpu_check
rm -rf "$STAGE"; mkdir -p "$STAGE" "$OUT"
start=$SECONDS
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
OWT=(--config=configs/owt.py --config.model.vocab_size=50258)
LM1B=(--config=configs/lm1b.py --config.model.vocab_size=30522)
B_ALL=1,16,64,256 B_PROF=64 B_BIG=64,256 B_LM1B=1,64,256,1024
if [[ -n ${SMOKE:-} ]]; then  # a quick CPU run of this script itself (tiny model, no tests)
  OWT+=(--config.model.d_model=64 --config.model.n_layers=2 --config.model.n_heads=2
        --config.model.vocab_size=512 --config.data.seq_len=64)
  LM1B+=(--config.model.d_model=64 --config.model.n_layers=2 --config.model.n_heads=2
         --config.model.vocab_size=512 --config.data.seq_len=32)
  B_ALL=1,4 B_PROF=4 B_BIG=4 B_LM1B=1,4
fi

section() {  # name max_seconds command...
  local name=$1 max=$2; shift 2
  local left=$(( BUDGET - (SECONDS - start) ))
  if (( left < 20 )); then echo "== $name: skipped ($left s left)"; return; fi
  (( max > left )) && max=$left
  echo "== $name (<= ${max} s, at $(( SECONDS - start )) s)"
  timeout --signal=INT --kill-after=10 "$max" "$@" > "$STAGE/$name.log" 2>&1
  local rc=$?
  grep -vE "^(I|W)[0-9]{4} |Warning|warn\(|^ *$" "$STAGE/$name.log" | tail -n 40
  echo "== $name rc=$rc at $(( SECONDS - start )) s"
  tar czf "$OUT/gpu_check.tgz" -C /tmp gpu_check
}

section env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv;
  python3 -c "import sys, jax, flax, optax, orbax.checkpoint; print(sys.version.split()[0], \"jax\",
  jax.__version__, \"flax\", flax.__version__, \"optax\", optax.__version__, jax.devices())"'
section bench1 240 python3 -m kforcing_jax.benchmark "${OWT[@]}" --random_init \
  --batch_sizes=$B_ALL --K=4 --repeats=3 --out="$STAGE/bench1"
[[ -z ${SMOKE:-} ]] && section flashtest 90 python3 -m pytest -q -x tests/test_flash_decode.py
[[ -z ${SMOKE:-} ]] && section pallas 200 python3 -m kforcing_jax.benchmark "${OWT[@]}" \
  --random_init --batch_sizes=$B_ALL --K=4 --repeats=3 --decode_attention=pallas \
  --out="$STAGE/pallas"
SERVE_SHAPE="--config.model.d_model=768 --config.model.n_layers=12 --config.model.n_heads=12
  --config.model.vocab_size=50258 --config.data.synthetic.n_symbols=50256 --config.data.seq_len=1024"
SERVE_EXTRA=(--max_slots=64 --concurrency=1,16,64 --output_len=250 --requests_per_point=64
             --prompt_vocab=50256)
if [[ -n ${SMOKE:-} ]]; then
  SERVE_SHAPE="--config.model.d_model=64 --config.model.n_layers=2 --config.model.n_heads=2
  --config.model.vocab_size=512 --config.data.synthetic.n_symbols=510 --config.data.seq_len=64"
  SERVE_EXTRA=(--max_slots=4 --concurrency=1,4 --output_len=40 --requests_per_point=4
               --prompt_vocab=500)
else
  SERVE_SHAPE+=" --decode_attention=pallas"
fi
section serve 200 python3 launch/serve_bench.py --client=inproc --model_flags="$SERVE_SHAPE" \
  "${SERVE_EXTRA[@]}" --out="$STAGE/serve"
section lm1b 150 python3 -m kforcing_jax.benchmark "${LM1B[@]}" --random_init \
  --batch_sizes=$B_LM1B --K=4 --repeats=3 --out="$STAGE/lm1b"
section profile 120 python3 launch/decode_profile.py "${OWT[@]}" --batch_sizes=$B_PROF --trace \
  --top=20 --label=default --out="$STAGE/profile"
section bench8 150 python3 -m kforcing_jax.benchmark "${OWT[@]}" --random_init \
  --batch_sizes=$B_BIG --K=4 --repeats=3 --cache_phases=8 --out="$STAGE/bench8"
[[ -n ${SMOKE:-} ]] && { echo "== smoke: done at $(( SECONDS - start )) s"; exit 0; }
section tests 70 python3 -m pytest -q -x tests/test_decode.py tests/test_model.py
section train 60 python3 main.py --config=configs/synthetic.py --workdir=/tmp/kf_gpu \
  --config.pipeline=teacher,distill_k1 --config.model.dtype=bfloat16 \
  --config.stages.teacher.steps=200 --config.stages.teacher.eval_every=200 --config.stages.teacher.log_every=50 \
  --config.stages.distill_k1.steps=100
section train_big 75 python3 main.py --config=configs/synthetic.py --workdir=/tmp/kf_gpu_big \
  --config.pipeline=teacher --config.model.dtype=bfloat16 --config.model.d_model=768 \
  --config.model.n_layers=12 --config.model.n_heads=12 --config.data.seq_len=1024 \
  --config.stages.teacher.batch_size=32 --config.stages.teacher.steps=60 --config.stages.teacher.log_every=20 \
  --config.stages.teacher.eval_every=1000000 --config.stages.teacher.checkpoint_every=1000000
echo "== done at $(( SECONDS - start )) s"
