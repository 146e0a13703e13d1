#!/usr/bin/env bash
# Prepare what the GPU device machine lacks (it is offline; see /work/.library/device/README.md):
#   .whl/         cp312 manylinux wheels of the runtime packages its image does not have
#                 (trimesh, xatlas, fast-simplification; torch/numpy/scipy/pillow/safetensors/pytest are there)
#   .gpu_shared/  the parts of ../shared the GPU run reads (state-dict manifests, golden data);
#                 scripts/gpu_bench.sh points TRELLIS_SHARED at it
# Both are git-ignored (.git/info/exclude) and travel with `run(carry=[".whl", ".gpu_shared"])`.
#
#   scripts/gpu_wheels.sh            # wheels + .gpu_shared (~20 MiB)
#   scripts/gpu_wheels.sh --spconv   # also spconv-cu126 2.3.8 + cumm-cu126 (as one xz tarball) + pccm,
#                                    # ccimport, fire, lark, termcolor in .whl_spconv/ (~40 MiB; carry it too)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SHARED=${TRELLIS_SHARED:-../shared}
SPCONV=0
for a in "$@"; do
    case "$a" in
        --spconv) SPCONV=1 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "unknown argument $a" >&2; exit 2 ;;
    esac
done

for d in /.whl/ /.whl_spconv/ /.gpu_shared/; do
    grep -qxF "$d" .git/info/exclude || echo "$d" >> .git/info/exclude
done

pin() { grep -E "^$1==" backend/requirements.txt | sed 's/[[:space:]]*#.*//'; }
download() {  # download DIR SPEC... (the device README's command: cp312, manylinux x86_64, no deps)
    local dir=$1; shift
    PIP_FIND_LINKS= "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$dir" "$@" 2>&1 | grep -v 'is ignored' || true
}
requires() {  # print each wheel's non-extra Requires-Dist (to check nothing is missing on the device)
    for w in "$1"/*.whl; do
        echo "  $(basename "$w"): $(unzip -p "$w" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
            | sed 's/Requires-Dist: //' | tr '\n' ',' | sed 's/,$//')"
    done
}

rm -rf .whl && mkdir -p .whl
# numpy (their only need) is in the image
download .whl "$(pin trimesh)" "$(pin xatlas)" "$(pin fast-simplification)"
n=$(ls .whl/*.whl | wc -l)
[ "$n" -eq 3 ] || { echo "expected 3 wheels in .whl/, got $n" >&2; exit 1; }
echo "== .whl ($(du -sh .whl | cut -f1)):"; requires .whl

if [ "$SPCONV" = 1 ]; then
    # spconv 2.3.8 has no CUDA 13 build; the cu126 one bundles its own CUDA runtime. Its wheel (70.5 MB)
    # and cumm's (26.6 MB) are over the device's 64 MiB per call, so both are unpacked here and travel as
    # one xz tarball (~40 MB; xz takes a few minutes on 2 cores) that gpu_bench.sh unpacks into /tmp/site.
    # Needs beyond the image's (numpy, sympy, pybind11, ninja, requests, portalocker): pccm, ccimport,
    # fire, lark, termcolor (small wheels next to the tarball).
    rm -rf .whl_spconv && mkdir -p .whl_spconv
    tmp=$(mktemp -d)
    download "$tmp" spconv-cu126==2.3.8 "cumm-cu126>=0.7.11,<0.8.0"
    mkdir "$tmp/site" && for w in "$tmp"/*.whl; do unzip -q -o "$w" -d "$tmp/site"; done
    tar -C "$tmp/site" -cf - . | xz -9 -T0 > .whl_spconv/spconv_cumm_cu126.tar.xz
    rm -rf "$tmp"
    download .whl_spconv pccm==0.4.16 ccimport==0.4.4 fire lark termcolor
    echo "== .whl_spconv ($(du -sh .whl_spconv | cut -f1)):"; ls -l .whl_spconv; requires .whl_spconv
fi

rm -rf .gpu_shared && mkdir -p .gpu_shared
cp -r "$SHARED/official_state_dict" "$SHARED/golden" .gpu_shared/
mkdir -p .gpu_shared/golden_birefnet   # the rembg benchmark's manifest and photo (not the 26 MB of cases)
cp "$SHARED/golden_birefnet/manifest_swin_v1_l.json" "$SHARED/golden_birefnet/case_C_input.png" .gpu_shared/golden_birefnet/
chmod -R u+w .gpu_shared
echo "== .gpu_shared ($(du -sh .gpu_shared | cut -f1)): $(ls .gpu_shared | tr '\n' ' ')"

tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cb .whl .gpu_shared $( [ -d .whl_spconv ] && echo .whl_spconv) | tail -1 | cut -f1)
total=$(( tracked + ${untracked:-0} + carried ))
echo "== travels per call: tracked $((tracked / 1024)) KiB + untracked $((${untracked:-0} / 1024)) KiB" \
     "+ carried (.whl .gpu_shared$( [ -d .whl_spconv ] && echo ' .whl_spconv')) $((carried / 1024)) KiB = $((total / 1048576)) MiB (device limit 64 MiB)"
[ "$total" -lt $((62 * 1048576)) ] || { echo "too big for the device machine (limit 64 MiB)" >&2; exit 1; }
