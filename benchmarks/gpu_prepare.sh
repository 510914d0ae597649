#!/usr/bin/env bash
# Builds .gpu/, the folder the GPU benchmark carries to the lent GPU machine (see benchmarks/gpu.py):
#   .gpu/wheels/  the packages the stage code needs that the machine lacks, at this venv's versions, as wheels for
#                 CPython $PYVER on manylinux x86-64 (pydantic, pydantic_core, typing_inspection, annotated_types,
#                 typing_extensions, ruamel.yaml, pydot; ~3 MB)
#   .gpu/data/fashion_mnist/  the four Fashion-MNIST IDX files (30 MB)
# .gpu/ is in .gitignore; name it in the device tool's `carry`. On the machine:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/wheels/*.whl
#   PYTHONPATH=/tmp/site python3 benchmarks/gpu.py --data-root .gpu/data
#
# Usage: bash benchmarks/gpu_prepare.sh              (CPython 3.12, the GPU machine's)
#        PYVER=3.11 DEST=/tmp/x bash benchmarks/gpu_prepare.sh   (wheels for another Python, e.g. a CPU rehearsal)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
DEST=${DEST:-.gpu}
FASHION=${FASHION:-/usr/share/datasets/fashion-mnist}
PACKAGES="pydantic pydantic_core typing_inspection annotated_types typing_extensions ruamel.yaml pydot"

specs=$("$PY" - $PACKAGES <<'EOF'
import importlib.metadata as md
import sys
print(" ".join(f"{name}=={md.version(name)}" for name in sys.argv[1:]))
EOF
)
rm -rf "$DEST/wheels"
mkdir -p "$DEST/wheels" "$DEST/data/fashion_mnist"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$DEST/wheels" $specs
n=$(find "$DEST/wheels" -name '*.whl' | wc -l)
if [ "$n" -ne 7 ]; then
  echo "expected 7 wheels in $DEST/wheels, got $n" >&2
  exit 1
fi
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  cp "$FASHION/$f.gz" "$DEST/data/fashion_mnist/"
done
echo "$DEST: $specs"
du -sh "$DEST/wheels" "$DEST/data" "$DEST"
