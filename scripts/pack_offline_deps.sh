#!/usr/bin/env bash
# Pack the pure-Python dependencies of this checkout's .venv into one folder, for a GPU machine
# that has Python with CUDA torch, torchvision and Triton but no network (a lent or air-gapped
# box):
#
#   bash scripts/pack_offline_deps.sh DEST [PYTHON_VERSION]      # e.g. DEST = .deps (git-ignored)
#   # copy DEST (and the checkout) to the GPU machine, then there:
#   PYTHONPATH=DEST bash scripts/gpu_measure.sh
#
# DEST receives Detectron2 (without its compiled _C extension, built for this Python: nothing
# the focal_det2 models, tests or benchmarks run needs it), fvcore, iopath and the other pure-Python
# packages they import, pytest and its own (for the CUDA tests), and pycocotools, the one compiled
# dependency, unpacked from PyPI's wheel for PYTHON_VERSION (default 3.12, the lent GPU machines'
# Python; needs PyPI here).
# SKIP_WHEEL=1 skips that download.
set -euo pipefail
cd "$(dirname "$0")/.."

dest=${1:?usage: pack_offline_deps.sh DEST [PYTHON_VERSION]}
pyver=${2:-3.12}
python=.venv/bin/python
[[ -x $python ]] || { echo "pack_offline_deps.sh: $python not found: run 'make env' first" >&2; exit 1; }

# Pure-Python packages of Detectron2, fvcore and iopath that a CUDA torch install lacks (torch
# brings typing_extensions; numpy and Pillow come with torchvision or the machine's Python).
packages=(detectron2 fvcore iopath yacs yaml termcolor omegaconf hydra antlr4 portalocker tabulate
  tqdm cloudpickle packaging pytest _pytest py pluggy iniconfig pygments)
site=$($python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$dest"
for name in "${packages[@]}"; do
  src=$site/$name
  [[ -d $src ]] || src=$site/$name.py  # a one-file module (pytest's py.py)
  [[ -e $src ]] || { echo "pack_offline_deps.sh: $site/$name is missing" >&2; exit 1; }
  rm -rf "${dest:?}/$(basename "$src")"
  cp -r "$src" "$dest/"
done
# Compiled for this Python (and, for Detectron2's _C, this torch): the GPU machine's would differ.
find "$dest" \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +

if [[ ${SKIP_WHEEL:-0} != 1 ]]; then
  version=$($python -c 'import importlib.metadata as m; print(m.version("pycocotools"))')
  wheels=$(mktemp -d)
  $python -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" \
    --dest "$wheels" "pycocotools==$version"
  $python -m zipfile -e "$wheels"/pycocotools-*.whl "$dest"
  rm -rf "$wheels"
fi
echo "packed into $dest: ${packages[*]}$([[ ${SKIP_WHEEL:-0} != 1 ]] && echo " pycocotools (cp${pyver/./})")"
