#!/usr/bin/env bash
# Run every CPU benchmark with the arguments docs/BENCHMARKS.md quotes; each one's console output
# goes to benchmarks/results/NAME.txt under a header naming the machine and versions.
#   bash benchmarks/run_all.sh [NAME ...]     # e.g. bench_pipeline; default: all
set -euo pipefail
cd "$(dirname "$0")/.."
declare -A ARGS=(
  [bench_tokenize]="--mb 200"
  [bench_tokenize_process]="--mb 64"
  [bench_tokenizer_files]="--mb 64"
  [bench_pipeline]=""
  [bench_pipeline_cpu]="--cpu-ratio 64 --repeats 5"
  [bench_verify]=""
  [bench_streaming]=""
  [bench_moe]=""
  [bench_memory]=""
  [bench_train]=""
)
ORDER=(bench_tokenize bench_tokenize_process bench_tokenizer_files bench_pipeline bench_pipeline_cpu
       bench_verify bench_streaming bench_moe bench_memory bench_train)
mkdir -p benchmarks/results
for name in "${@:-${ORDER[@]}}"; do
  script="benchmarks/${name%_cpu}.py"
  out="benchmarks/results/$name.txt"
  {
    echo "\$ python $script ${ARGS[$name]}"
    echo "# $(date -u +%F), $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
         "python $(python -c 'import platform; print(platform.python_version())')," \
         "torch $(python -c 'import torch; print(torch.__version__)')"
    # shellcheck disable=SC2086
    python "$script" ${ARGS[$name]} 2>&1
  } | tee "$out"
done
