#!/usr/bin/env bash
# Issue 10's GPU figures in one prepared run on a lent GPU machine (../shared/gpu/README.md): every part
# writes its log and JSON under $OUT, and one part failing or running out of time does not stop the others.
#
# Here, once:   bash ../shared/gpu/prepare.sh
# Then run:     bash benchmarks/gpu_session.sh        (device `run`, carry=[".gpu"], timeout_s ~540)
# Smoke test on a CPU (the plumbing, not the figures):  OUT=/tmp/gpu_smoke SMOKE=1 bash benchmarks/gpu_session.sh
#
# Parts, in the order that matters most when time is short:
#   1. VGG16-BN train step, 224 px, bf16, batch 128, against PyTorch eager and torch.compile, with
#      the step's profile (per op and per part of the model) and the optimised HLO of the step;
#   2. plain VGG16, same, against PyTorch;
#   3. the input pipeline on a folder of 512-px JPEGs written on the machine, workers chosen by the host;
#   4. the real loop end to end on that folder, at the public set's cadence (validation and a checkpoint
#      every 155 steps: 22k images less the validation tenth, at batch 128), as a fraction of the step,
#      with the seconds validation and checkpoint saves held it up;
#   4b. the input pipeline again with the opt-in cache of decoded images (data.cache_decoded=True);
#   5. VGG16-BN's step again with nn.max_pool's own gradient instead of models.max_pool_2x2 (the GPU path
#      before session 18), and plain VGG16's with jax.nn.relu instead of models.relu (before session 19,
#      when cuDNN did not apply the ReLU), so the card measures what the compiled HLO predicts.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:?"set OUT to the folder the figures go to (the device machine sets it)"}
mkdir -p "$OUT"

if [[ -d .gpu/whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/.gpu/site:$PWD
fi
export PYTHONUNBUFFERED=1

if [[ ${SMOKE:-0} == 1 ]]; then
  config=configs/vgg16.py:cpu
  sizes=(--steps=2 --warmup=1 --rounds=1 --torch_timeout=300 --notorch_compile)
  per_class=24
  e2e=(--e2e_steps=10 --config.log_every_steps=2 --config.eval_every_steps=5 --config.checkpoint_every_steps=5)
else
  config=configs/vgg16.py
  sizes=(--steps=20 --warmup=3 --rounds=3 --torch_timeout=240)
  per_class=1000
  e2e=(--e2e_steps=240 --config.eval_every_steps=155 --config.checkpoint_every_steps=155)
fi

part() {  # part NAME SECONDS COMMAND...: runs COMMAND with a time limit, its output in $OUT/NAME.log
  local name=$1 seconds=$2
  shift 2
  local start=$SECONDS
  timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1
  local status=$?
  echo "== $name: exit $status after $((SECONDS - start)) s"
  # The benchmark's summary and profile tables are indented; so are tracebacks.
  grep -E -e '^ ' -e 'Error' "$OUT/$name.log" | tail -n 60
  grep '^{' "$OUT/$name.log" | tail -n 1 >"$OUT/$name.json"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  nproc
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git log -1 --format='project %h %s' 2>/dev/null
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

XLA_FLAGS="--xla_dump_to=$OUT/hlo --xla_dump_hlo_module_re=.*train_step.*" \
  part step_bn 200 python3 -m flax_detector.benchmark --config="$config" --parts=step,profile --compare_torch \
  "${sizes[@]}"
# Only the optimised HLO text of the step travels back; the dump's other files are large and not needed.
# Trimmed now, so a run cut short by its time limit still sends back what it measured.
find "$OUT/hlo" -type f ! -name '*after_optimizations.txt' -delete 2>/dev/null
part step_plain 120 python3 -m flax_detector.benchmark --config="$config" --config.model.batch_norm=False \
  --parts=step --compare_torch "${sizes[@]}"
part jpeg_folder 90 python3 -m benchmarks.jpeg_input folder /tmp/jpeg512 --per_class="$per_class"
part input 60 python3 -m flax_detector.benchmark --config="$config" --config.data.dir=/tmp/jpeg512 \
  --config.data.worker_count=-1 --parts=input "${sizes[@]}"
part e2e 120 python3 -m flax_detector.benchmark --config="$config" --config.data.dir=/tmp/jpeg512 \
  --config.data.worker_count=-1 --parts=step,e2e "${sizes[@]}" "${e2e[@]}"
part input_cached 90 python3 -m flax_detector.benchmark --config="$config" --config.data.dir=/tmp/jpeg512 \
  --config.data.worker_count=-1 --config.data.cache_decoded=True --parts=input "${sizes[@]}"
# The step with one attribute of flax_detector.models replaced by the code it replaced (part 5).
step_with() {  # step_with NAME SECONDS PYTHON-ASSIGNMENT [BENCHMARK ARGS...]
  local name=$1 seconds=$2 assignment=$3
  shift 3
  part "$name" "$seconds" python3 -c "
import flax.linen as nn
import jax
from absl import app
from flax_detector import benchmark, config_overrides, models
$assignment
app.run(benchmark.main, flags_parser=config_overrides.parse_flags)
" --config="$config" --parts=step "${sizes[@]}" "$@"
}
step_with step_bn_flax_pool 90 'models.max_pool_2x2 = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))'
step_with step_plain_jax_relu 90 'models.relu = jax.nn.relu' --config.model.batch_norm=False
ls -la "$OUT"
