#!/bin/sh
# tests/fuzz/run_fuzz.sh <seconds> [target ...] — builds every libFuzzer target of tests/fuzz (clang++ with
# -fsanitize=fuzzer,address,undefined) and runs each for <seconds> on a scratch copy of its committed corpus
# (tests/fuzz/corpus/<target>; new inputs stay in the scratch copy, the repository is not touched).
# Exits non-zero when a target crashes, leaks, trips a sanitizer or cannot be built; the reproducer is kept in
# $CPET_FUZZ_DIR/artifacts/<target>/ (replay: <binary> <file>).
#
#   CXX=clang++-14 tests/fuzz/run_fuzz.sh 60            # all targets, 60 s each
#   CPET_FUZZ_DIR=build-fuzz tests/fuzz/run_fuzz.sh 10 safetensors peft
#
# Environment: CXX (default: clang++-14, else clang++), CPET_FUZZ_DIR (build and scratch folder, default
# build-fuzz under the source root), CPET_FUZZ_JOBS (compile jobs, default 2).
set -eu

secs=${1:?usage: run_fuzz.sh <seconds> [target ...]}
shift
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${CPET_FUZZ_DIR:-$root/build-fuzz}
case "$out" in /*) ;; *) out=$root/$out ;; esac
jobs=${CPET_FUZZ_JOBS:-2}
if [ -z "${CXX:-}" ]; then
    if command -v clang++-14 >/dev/null 2>&1; then CXX=clang++-14; else CXX=clang++; fi
fi
command -v "$CXX" >/dev/null 2>&1 || { echo "run_fuzz.sh: $CXX not found (apt-get install clang libclang-rt-dev)" >&2; exit 2; }

if [ $# -gt 0 ]; then
    targets=$*
else
    targets=$(cd "$here" && ls fuzz_*.cpp | sed 's/^fuzz_//; s/\.cpp$//')
fi
mkdir -p "$out/bin"

eigen=""
for d in /usr/include/eigen3 /usr/local/include/eigen3; do [ -d "$d" ] && eigen="-I$d" && break; done
flags="-std=c++20 -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined"

# Build (in parallel, `jobs` at a time); a target is rebuilt when its source or any cpet header is newer.
build() {
    t=$1
    bin=$out/bin/fuzz_$t
    if [ -x "$bin" ] && [ -z "$(find "$here/fuzz_$t.cpp" "$here/fuzz_common.hpp" "$root/include" -newer "$bin" -print -quit)" ]; then
        return 0
    fi
    echo "build fuzz_$t"
    # shellcheck disable=SC2086
    $CXX $flags -DCPET_SOURCE_DIR="\"$root\"" -I"$root/include" $eigen "$here/fuzz_$t.cpp" -o "$bin.tmp" \
        >"$out/bin/fuzz_$t.log" 2>&1 || { cat "$out/bin/fuzz_$t.log" >&2; return 1; }
    mv -f "$bin.tmp" "$bin"
}
failed=""
running=0
pids=""
for t in $targets; do
    [ -f "$here/fuzz_$t.cpp" ] || { echo "run_fuzz.sh: no target $t" >&2; exit 2; }
    ( build "$t" ) &
    pids="$pids $!:$t"
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        for p in $pids; do wait "${p%%:*}" || failed="$failed build:${p#*:}"; done
        pids=""
        running=0
    fi
done
for p in $pids; do wait "${p%%:*}" || failed="$failed build:${p#*:}"; done
if [ -n "$failed" ]; then
    echo "run_fuzz.sh: FAILED to build:$failed" >&2
    exit 1
fi

for t in $targets; do
    work=$out/corpus/$t
    art=$out/artifacts/$t
    rm -rf "$work"
    mkdir -p "$work" "$art"
    [ -d "$here/corpus/$t" ] && cp "$here/corpus/$t"/* "$work"/ 2>/dev/null || true
    echo "fuzz_$t: ${secs}s"
    if ! "$out/bin/fuzz_$t" -max_total_time="$secs" -timeout=25 -rss_limit_mb=2560 -max_len=131072 \
            -print_final_stats=1 -artifact_prefix="$art/" "$work" >"$out/fuzz_$t.log" 2>&1; then
        echo "fuzz_$t: FAILED (log $out/fuzz_$t.log, reproducer in $art/)" >&2
        tail -n 40 "$out/fuzz_$t.log" >&2
        failed="$failed $t"
    else
        grep -E "stat::number_of_executed_units|cov:" "$out/fuzz_$t.log" | tail -n 2 | sed "s/^/  fuzz_$t: /"
    fi
done
if [ -n "$failed" ]; then
    echo "run_fuzz.sh: crashes in:$failed" >&2
    exit 1
fi
echo "run_fuzz.sh: all targets ran ${secs}s with no crash"
