#!/usr/bin/env bash
# Create .venv with the CPU build of torch, then adaptopt with the extras named in $1 (default: experiments).
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-experiments}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet "torch==${ADAPTOPT_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
