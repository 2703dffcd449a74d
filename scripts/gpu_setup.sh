# Sourced by the GPU scripts: wheels from .carry (nox and its dependencies, nvidia-cutlass) on a
# machine without a package registry, then flashmux's packages, editable, without dependencies.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/flashmux-gpu}
mkdir -p "$OUT"
if [ -d .carry ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
    .carry/*.whl .carry/nox/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e packages/core -e packages/backend_cuda \
  -e packages/backend_triton -e packages/backend_pallas 2>&1 | grep -v -i warning
