#!/usr/bin/env bash
# Creates one virtual environment per peer simulator, from the package registry only:
#   benchmarks/peers/.venv-fedjax   FedJAX 0.0.17 (its last release; needs jax 0.4.20)
#   benchmarks/peers/.venv-fedjax-current   FedJAX 0.0.17 on the current JAX (its driver
#                                   restores two aliases that JAX removed since)
#   benchmarks/peers/.venv-pfl      pfl 0.6 (Apple pfl-research) with PyTorch
#   benchmarks/peers/.venv-flower   Flower simulation (Ray backend) with PyTorch
# Usage: benchmarks/peers/setup.sh [fedjax] [fedjax-current] [pfl] [flower]   (default: all)
# An existing environment is kept; delete its folder to rebuild it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3.11}"
peers=("$@")
[ ${#peers[@]} -eq 0 ] && peers=(fedjax fedjax-current pfl flower)

make_venv() {  # name, pip arguments; "--" starts a second pip install
  local venv="$here/.venv-$1"; shift
  if [ -x "$venv/bin/python" ] && [ -f "$venv/.complete" ]; then
    echo "$venv exists"; return
  fi
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  local group=()
  for arg in "$@" --; do
    if [ "$arg" = "--" ]; then
      "$venv/bin/pip" install --quiet "${group[@]}"; group=()
    else
      group+=("$arg")
    fi
  done
  touch "$venv/.complete"
  echo "$venv ready"
}

for peer in "${peers[@]}"; do
  case "$peer" in
    fedjax)
      make_venv fedjax fedjax==0.0.17 jax==0.4.20 jaxlib==0.4.20 "numpy<2" "scipy<1.13" \
        dm-haiku==0.0.11 optax==0.1.7 ;;
    fedjax-current)
      # FedJAX's requirements without its pins; FedJAX itself with --no-deps.
      make_venv fedjax-current jax optax scipy msgpack requests absl-py dm-haiku==0.0.17 \
        -- --no-deps fedjax==0.0.17 ;;
    pfl)
      # torch first, then pfl (pfl's own requirements would otherwise pick another torch).
      make_venv pfl torch==2.13.0 -- "pfl==0.6.*" ;;
    flower)
      make_venv flower torch==2.13.0 "flwr[simulation]" ;;
    *) echo "unknown peer: $peer (fedjax, fedjax-current, pfl, flower)" >&2; exit 2 ;;
  esac
done
