#!/usr/bin/env bash
# cpet quick start on a fresh Debian 12 machine (as root, or with sudo):
#   bash cmake/quickstart.sh example   # build and run the main example (examples/quickstart.cpp)
#   bash cmake/quickstart.sh test      # build and run the whole test suite through CTest
#   bash cmake/quickstart.sh bench     # build the benchmarks (then run build/bench/bench_* yourself)
# Installs the Debian packages it needs when they are missing. BUILD_DIR (default: build) and JOBS override.
set -euo pipefail
mode=${1:-test}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BUILD_DIR:-$here/build}
jobs=${JOBS:-$(nproc)}

pkgs=(g++ cmake ninja-build libeigen3-dev libxsimd-dev doctest-dev libbenchmark-dev libopenblas-dev libdnnl-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "cpet: installing missing Debian packages: ${missing[*]}"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

configure() {
  cmake -S "$here" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@"
}
case "$mode" in
  example)
    configure -DCPET_BUILD_EXAMPLES=ON
    cmake --build "$build" -j "$jobs" --target quickstart
    "$build/examples/quickstart"
    ;;
  test)
    configure -DCPET_BUILD_TESTS=ON
    cmake --build "$build" -j "$jobs"
    ctest --test-dir "$build" --output-on-failure -j "$jobs"
    ;;
  bench)
    configure -DCPET_BUILD_BENCH=ON
    cmake --build "$build" -j "$jobs"
    ls "$build"/bench/bench_*
    ;;
  *)
    echo "usage: bash cmake/quickstart.sh example|test|bench" >&2
    exit 2
    ;;
esac
