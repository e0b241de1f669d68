#!/usr/bin/env bash
# The main command: compare the whole adaptopt family on MNIST (or Fashion-MNIST) with the seed's CNN.
#
# On a fresh machine it creates .venv (scripts/setup.sh experiments: torch 2.13.0 CPU + adaptopt), makes
# sure a dataset is there (MNIST from the mirrors; where that is impossible, Fashion-MNIST from Debian's
# dataset-fashion-mnist, installed when running as root), then runs a short comparison sized to finish in
# well under 10 minutes on 2 busy cores, prints the table and says where the plots are.
# Options after the script's name go to `adaptopt mnist` and override these (e.g. --epochs 10).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${ADAPTOPT_COMPARE_OUT:-runs/compare}"

if ! .venv/bin/python -c "import adaptopt.experiments.cli, tqdm, matplotlib" 2>/dev/null; then
    echo "== setting up .venv (torch ${ADAPTOPT_TORCH_VERSION:-2.13.0} CPU + adaptopt[experiments])"
    bash scripts/setup.sh experiments
fi

if ! .venv/bin/adaptopt data; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        echo "== installing Fashion-MNIST from the distribution (dataset-fashion-mnist)"
        apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
        .venv/bin/adaptopt data
    else
        echo "No dataset here and MNIST cannot be downloaded. Run this, then run $0 again:" >&2
        echo "    sudo apt-get install -y dataset-fashion-mnist" >&2
        exit 1
    fi
fi

# 8000 training images x 2 epochs, the full test set every epoch, one thread: measured in docs/experiments.md.
.venv/bin/adaptopt mnist --limit-train 8000 --epochs 2 --batch-size 128 --threads 1 --out "$out" --overwrite "$@"
echo
echo "Open $out/loss.png, $out/loss_by_time.png and $out/accuracy.png for the curves; $out/results.md has the table."
