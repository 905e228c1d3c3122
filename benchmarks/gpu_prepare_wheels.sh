#!/usr/bin/env bash
# Prepare vLLM 0.26.0 for the lent GPU machine (no network there): download the wheels listed in
# vllm-0.26.0-wheels.txt for CPython 3.12 / manylinux x86-64, pack them into one tar and split it into parts
# of at most 60 MiB (a device call carries at most 64 MiB), then print the device calls that reassemble and
# install them. Runs HERE, not on the GPU machine. vllm 0.26.0 is the newest release pinning torch 2.11.0,
# the GPU image's torch (see shared/docs/gpu.md).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: benchmarks/gpu_prepare_wheels.sh [--dry-run] [--full] [--list FILE] [--out DIR] [--part-mib N]

  --dry-run     print what would be downloaded (wheels, MiB, parts) and the device calls; download nothing
  --full        the whole closure (111 wheels, ~873 MiB) instead of the lean set (~376 MiB): the lean set
                leaves out the heavy optional kernel/toolchain wheels (cutlass-dsl libs, nvvm, nvcc, cccl, crt,
                nvdisasm, tokenspeed-*, tilelang, pynvvideocodec, z3-solver)
  --list FILE   wheel list, lines "BYTES FILENAME" (default: $WHEEL_LIST or /work/shared/docs/vllm-0.26.0-wheels.txt)
  --out DIR     output folder inside the repo, git-ignored (default: .whl)
  --part-mib N  part size in MiB (default 60)

Outputs: DIR/dl/*.whl (downloads), DIR/vllm-wheels.tar.part-NN (what travels), DIR/MANIFEST (sha256 sums).
Environment: PYTHON (default /work/venv/bin/python, else python3) runs pip.
EOF
}

DRY=0; FULL=0; OUT=.whl; PART_MIB=60
LIST=${WHEEL_LIST:-/work/shared/docs/vllm-0.26.0-wheels.txt}
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY=1 ;;
    --full) FULL=1 ;;
    --list) LIST=$2; shift ;;
    --out) OUT=$2; shift ;;
    --part-mib) PART_MIB=$2; shift ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
[ -f "$LIST" ] || { echo "wheel list not found: $LIST" >&2; exit 2; }
PYTHON=${PYTHON:-/work/venv/bin/python}; command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

# heavy optional wheels left out of the lean set (file names use underscores)
HEAVY='^(nvidia_cutlass_dsl_libs_cu12|nvidia_cutlass_dsl_libs_cu13|nvidia_nvvm|nvidia_cuda_nvcc|tokenspeed_triton|tokenspeed_mla|tilelang|pynvvideocodec|z3_solver|nvidia_cuda_cccl|nvidia_cuda_crt|nvidia_cuda_nvdisasm)-'
SEL=$(grep -E '^[0-9]+ [^ ]+\.whl$' "$LIST" | { if [ $FULL = 1 ]; then cat; else awk -v re="$HEAVY" '$2 !~ re'; fi; })
COUNT=$(printf '%s\n' "$SEL" | wc -l)
BYTES=$(printf '%s\n' "$SEL" | awk '{s += $1} END {print s}')
PART_BYTES=$((PART_MIB * 1024 * 1024))
# tar adds 512 bytes of header per file plus padding; count that in the estimate
TAR_EST=$((BYTES + COUNT * 1024 + 10240))
PARTS=$(((TAR_EST + PART_BYTES - 1) / PART_BYTES))
printf '%s wheels, %s MiB -> %s parts of <= %s MiB (%s set)\n' "$COUNT" "$(awk -v b="$BYTES" 'BEGIN {printf "%.1f", b / 1048576}')" \
  "$PARTS" "$PART_MIB" "$([ $FULL = 1 ] && echo full || echo lean)"
printf '%s\n' "$SEL" | grep -q ' vllm-0\.26\.0-' || { echo "vllm-0.26.0 wheel missing from $LIST" >&2; exit 2; }

# wheel file name -> "name==version" (name and version are the first two dash-separated fields)
REQS=$(printf '%s\n' "$SEL" | awk '{split($2, f, "-"); print f[1] "==" f[2]}')
PLATFORMS=""
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_26 \
         manylinux_2_24 manylinux_2_17 manylinux_2_12 manylinux_2_5 manylinux2014 manylinux2010 manylinux1; do
  PLATFORMS="$PLATFORMS --platform ${p}_x86_64"
done
PIP="$PYTHON -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none$PLATFORMS -d $OUT/dl -r $OUT/requirements.txt"

print_device_calls() {
  local last=$((PARTS - 1)) i
  cat <<EOF

Device calls (run them back to back: the machine stays warm only ~30 s between calls; name each part in carry):
EOF
  for i in $(seq 0 "$last"); do
    local part; part=$(printf '%s/vllm-wheels.tar.part-%02d' "$OUT" "$i")
    if [ "$i" -lt "$last" ]; then
      echo "  carry [\"$part\"]: mkdir -p /tmp/wp && cp $part /tmp/wp/ && ls -l /tmp/wp"
    else
      echo "  carry [\"$part\", \"$OUT/MANIFEST\"]: mkdir -p /tmp/wp /tmp/whl && cp $part /tmp/wp/ && cat /tmp/wp/vllm-wheels.tar.part-* > /tmp/wp/vllm-wheels.tar && (cd /tmp/wp && grep ' vllm-wheels.tar\$' \$OLDPWD/$OUT/MANIFEST | sha256sum -c -) && tar -xf /tmp/wp/vllm-wheels.tar -C /tmp/whl && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/whl/*.whl && PYTHONPATH=/tmp/site python3 -c 'import vllm; print(vllm.__version__)'"
    fi
  done
  cat <<EOF
  then (still warm; carry the checkpoint folders, <= 64 MiB with the repo):
    export PYTHONPATH=/tmp/site:\$PWD; python3 benchmarks/gpu_vllm_check.py --pruned DIR --dense DIR --out \$OUT/vllm_check.json
  pip must not touch the image's torch/numpy: --no-deps --target keeps them as they are.
EOF
}

if [ $DRY = 1 ]; then
  echo "would write $OUT/requirements.txt ($COUNT lines, e.g. $(printf '%s\n' "$REQS" | head -n 2 | paste -sd' ')) and run:"
  echo "  $PIP"
  print_device_calls
  exit 0
fi

mkdir -p "$OUT/dl"
printf '%s\n' "$REQS" > "$OUT/requirements.txt"
$PIP
# pip may pick another build tag of the same version: report any file that is not the listed one
MISSING=0
while read -r size file; do
  if [ ! -f "$OUT/dl/$file" ]; then echo "not the listed file (or missing): $file" >&2; MISSING=1; fi
done <<< "$SEL"
[ $MISSING = 0 ] || echo "warning: some downloaded wheels differ from the list; check $OUT/dl before sending" >&2

# only the selected files go into the tar (dl/ may hold leftovers of an earlier --full run)
rm -f "$OUT"/vllm-wheels.tar "$OUT"/vllm-wheels.tar.part-*
printf '%s\n' "$SEL" | awk '{print $2}' | while read -r f; do [ -f "$OUT/dl/$f" ] && echo "$f"; done \
  > "$OUT/files.txt"
tar -cf "$OUT/vllm-wheels.tar" -C "$OUT/dl" -T "$OUT/files.txt"
split -b "${PART_MIB}m" -d -a 2 "$OUT/vllm-wheels.tar" "$OUT/vllm-wheels.tar.part-"
(cd "$OUT" && sha256sum vllm-wheels.tar vllm-wheels.tar.part-* > MANIFEST)
rm -f "$OUT/vllm-wheels.tar"
PARTS=$(ls "$OUT"/vllm-wheels.tar.part-* | wc -l)
ls -l "$OUT"/vllm-wheels.tar.part-*
print_device_calls
