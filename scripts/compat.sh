#!/usr/bin/env bash
# Run the whole test suite on one torch release: one entry of the compatibility matrix that CI runs.
#
#   bash scripts/compat.sh 2.7.1              # the declared floor
#   bash scripts/compat.sh 2.14.1 -k adam     # the newest release for this Python; extra options go to pytest
#
# PyPI's Linux wheels of torch come with several GB of CUDA libraries (they import and run on the CPU), so each
# release gets a virtual environment of its own outside the clone, kept between runs and keyed by torch and
# Python version: $ADAPTOPT_VENV_CACHE (default ~/.cache/adaptopt/venvs)/torch-VERSION-pyX.Y. One that an
# interrupted run left half-built (no `ready` mark) is built again. This checkout and its test extras are
# installed into it (editable) on every run, so a venv shared by several clones tests the one it is run from.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:?usage: scripts/compat.sh TORCH_VERSION [pytest options]}"
shift
python="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
venv="${ADAPTOPT_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/adaptopt/venvs}/torch-${version}-py${python}"

if [[ ! -f "$venv/ready" ]]; then
    echo "== building $venv (torch $version: a first run downloads it)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet "torch==${version}"
    "$venv/bin/python" -m pip install --quiet -e ".[test]"
    touch "$venv/ready"
fi
# This checkout, and whatever its test extras gained since the venv was built (quick when nothing did).
"$venv/bin/python" -m pip install --quiet -e ".[test]"
installed="$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
if [[ "$installed" != "$version" ]]; then
    echo "compat.sh: $venv holds torch $installed, not $version" >&2
    exit 1
fi
echo "== torch $version: the test suite"
"$venv/bin/python" -m pytest -q -n "${ADAPTOPT_TEST_WORKERS:-2}" "$@"
