#!/usr/bin/env bash
# Build .gpu-carry/ (ignored by git): what benchmarks/gpu_suite.py needs on a GPU machine without network, and
# print the command to run there from the copied checkout.
#
#   .gpu-carry/data/cifar10-jpeg/cifar10-jpeg.tar.gz   the CIFAR-10 archive (19 MB), from $FASTROBUST_DATA
#   .gpu-carry/site/pyautoattack/*.py                  the official AutoAttack attack files (no examples, no
#                                                      model file): the reference for benchmarks/autoattack.py
#   .gpu-carry/COMMIT                                  the commit the copy was made from (a copy may have no .git)
#
# Usage, in the checkout you will copy to the GPU machine:
#   FASTROBUST_DATA=/path/to/data benchmarks/prepare_gpu_carry.sh [BUDGET_SECONDS]
# PYTHON (default python) is the interpreter that has pyautoattack installed; without it the wheel is
# downloaded with pip and only its attack files are kept (GPU_CARRY_DOWNLOAD=0: no download, skip them).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
budget=${1:-}
data=${FASTROBUST_DATA:-$HOME/.cache/fastrobust/data}  # where fastrobust looks without it
python=${PYTHON:-python}
carry=.gpu-carry
archive="$data/cifar10-jpeg/cifar10-jpeg.tar.gz"
[ -f "$archive" ] || archive="$data/cifar10-jpeg.tar.gz"
if [ ! -f "$archive" ]; then
  echo "no CIFAR-10 archive at $data/cifar10-jpeg/cifar10-jpeg.tar.gz: set FASTROBUST_DATA to the data folder" >&2
  exit 2
fi
grep -qx '/.gpu-carry/' .gitignore 2>/dev/null || grep -qx '.gpu-carry/' .gitignore 2>/dev/null \
  || echo '/.gpu-carry/' >> "$(git rev-parse --git-path info/exclude)"
rm -rf "$carry"
mkdir -p "$carry/data/cifar10-jpeg" "$carry/site/pyautoattack"
cp "$archive" "$carry/data/cifar10-jpeg/cifar10-jpeg.tar.gz"

# pyautoattack: the installed package's top-level .py files (the wheel, 45 MB, embeds a model file)
pkg=$("$python" -c 'import os, pyautoattack; print(os.path.dirname(pyautoattack.__file__))' 2>/dev/null || true)
if [ -z "$pkg" ] && [ "${GPU_CARRY_DOWNLOAD:-1}" != 0 ]; then
  tmp=$(mktemp -d)
  if "$python" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "pyautoattack==0.2.0" 2>/dev/null; then
    "$python" - "$tmp" "$carry/site" <<'PY'
import sys, zipfile, glob
wheel = glob.glob(sys.argv[1] + "/pyautoattack-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("pyautoattack/") and name.endswith(".py") and name.count("/") == 1:
            z.extract(name, sys.argv[2])
PY
  fi
  rm -rf "$tmp"
elif [ -n "$pkg" ]; then
  cp "$pkg"/*.py "$carry/site/pyautoattack/"
fi
if [ -z "$(ls "$carry/site/pyautoattack" 2>/dev/null)" ]; then
  rmdir "$carry/site/pyautoattack"
  echo "note: pyautoattack not found (pip install pyautoattack==0.2.0): the suite will time fastrobust's AutoAttack alone" >&2
fi

commit=$(git rev-parse HEAD 2>/dev/null || echo "no commit yet")
[ -n "$(git status --porcelain --untracked-files=no)" ] && commit="$commit (with uncommitted changes)"
echo "$commit" > "$carry/COMMIT"
echo "built $carry ($(du -sh "$carry" | cut -f1)); copy the checkout with it to the GPU machine"
budget_flag=${budget:+--budget-seconds $budget }
cat <<CMD

command:     export PYTHONPATH=src:.gpu-carry/site FASTROBUST_DATA=.gpu-carry/data PYTHONUNBUFFERED=1; python3 benchmarks/gpu_suite.py ${budget_flag}--out gpu-suite-out
ends within: ${budget:-530} s of its start (plus the interpreter's start-up); results in gpu-suite-out/
CMD
