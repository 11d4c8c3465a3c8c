#!/usr/bin/env bash
# Downloads (here, where the package registry is reachable) the wheels that let the peers run
# on a machine with no network whose own Python 3.12 already has JAX and PyTorch for its
# accelerator (and absl-py, attrs, mpmath, numpy, optax, scipy, msgpack, requests):
#   FedJAX 0.0.17 (dm-haiku, jmp) and pfl 0.6 (dp-accounting, prv-accountant, multiprocess,
#   dill), about 2 MB, into benchmarks/peers/wheels/.
# There (see benchmarks/README.md, "GPU"):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/peers benchmarks/peers/wheels/*.whl
#   PYTHONPATH=/tmp/peers:$PWD PEER_PYTHON=python3 python3 benchmarks/suite.py gpu
# Flower is left out: Ray's wheel alone is about 70 MB.
# Usage: benchmarks/peers/gpu_wheels.sh [python version, default 3.12]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version="${1:-3.12}"
python="${PYTHON:-python3}"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$here/wheels" \
  fedjax==0.0.17 dm-haiku==0.0.17 jmp==0.0.4 \
  pfl==0.6.0 dp-accounting==0.5.1 prv-accountant==0.2.0 multiprocess==0.70.19 dill==0.4.1
ls "$here/wheels"
