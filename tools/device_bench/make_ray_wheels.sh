#!/usr/bin/env bash
# Ray 2.60 for the GPU host (no package index there), in three parts, each small enough to share one call's carry
# (64 MiB) with .whl/common (29 MiB): DIR/c1, DIR/c2 (27 MB pieces of Ray's wheel), DIR/c3 (the last piece and the
# dependencies the image lacks). Usage: make_ray_wheels.sh [DIR]   (default .whl/ray; see run_on_device.sh)
set -euo pipefail
dir=${1:-.whl/ray}
rm -rf "$dir"; mkdir -p "$dir/all" "$dir/c1" "$dir/c2" "$dir/c3"
plat=(); for n in 39 35 34 31 28 27 26 24 17 5; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$dir/all" "$@" \
  2>&1 | grep -v '^WARNING' || true; }
dl ray==2.60.0 jsonschema jsonschema-specifications referencing rpds-py attrs msgpack protobuf
(cd "$dir" && split -b 27M all/ray-2.60.0-*.whl rpart- && mv rpart-aa c1/ && mv rpart-ab c2/ && mv rpart-a? c3/)
find "$dir/all" -name '*.whl' ! -name 'ray-2.60.0-*' -exec mv {} "$dir/c3/" \;
rm -rf "$dir/all"; du -sh "$dir"/c*
