#!/usr/bin/env bash
# The pure-Python wheels tvmgroup and its tests need beyond what the GPU machine and
# ../shared/gpu/pack.sh provide (tqdm; hypothesis with attrs and sortedcontainers), into
# .gpuwheels/extra/ (git-ignored, like .gpuwheels/a and b). scripts/gpu_check.sh installs them.
#
# Run from the project root, on the CPU machine:   bash scripts/gpu_pack_extra.sh
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.gpuwheels/' "$exclude" 2>/dev/null || echo '/.gpuwheels/' >> "$exclude"
rm -rf .gpuwheels/extra && mkdir -p .gpuwheels/extra
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
  --platform any -d .gpuwheels/extra tqdm hypothesis attrs sortedcontainers
du -sh .gpuwheels/extra
