#!/usr/bin/env bash
# Prepare a device run of benchmarks/gpu_check.sh. Run it HERE (a machine with PyPI), in the
# checkout that the device tool sends, before the run:
#
#     bash benchmarks/gpu_prepare.sh [--with-finufft]
#
# It fills the ignored folder benchmarks/.gpu_carry/ with
#   wheels/  cp312 manylinux x86_64 wheels of what modelmap needs and the device image lacks
#            (the image has Python 3.12, jax 0.11 + CUDA 13 plugins, equinox, optax, optimistix,
#            jaxtyping, typer, rich, numpy, scipy, msgpack, networkx, requests, packaging; see
#            /work/.library/device/KINDS.md): gemmi, mrcfile, biotite and biotite's biotraj.
#            --with-finufft adds jax-finufft (the optional NufftRenderFn; PyPI's wheel is CPU-only,
#            so on the GPU it can only fail or run on the host's CPU) and pydantic, which it imports
#            and the image lacks, with pydantic's own needs: about 7.5 MB more.
#   data/    copies of the shared data files gpu_check.py reads, in the shared folder's layout, and
#            its README.md (so the folder is recognised as a data folder).
# and prints the sizes: the carried folder plus the repository's tracked and untracked-not-ignored
# files must stay under the device tool's 64 MiB limit. Then, on the device:
#
#     run(command="bash benchmarks/gpu_check.sh", carry=["benchmarks/.gpu_carry"], timeout_s=540)
#
# The shared data folder is $MODELMAP_TEST_DATA, else ../shared/data beside the repository (as
# tests/conftest.py looks for it). The Python that runs `pip download` is $PYTHON (default python3);
# any version works, the wheels are chosen for 3.12 by the flags below.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="$REPO/benchmarks/.gpu_carry"
PY="${PYTHON:-python3}"
LIMIT_MIB=64

# pinned: the versions the project's tests ran with, except biotite: 1.6's wheel is 57 MB (with
# the rest over the limit), 2.0.0's 42 MB; modelmap uses only biotite.structure.info.get_from_ccd
WHEELS=(gemmi==0.7.5 mrcfile==1.5.4 biotite==2.0.0 biotraj==1.2.2)
FINUFFT_WHEELS=(jax-finufft==1.3.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
                typing-inspection==0.4.5)
DATA_FILES=(
    README.md
    models/4YVS.cif.gz                              # 26k atoms (as deposited) and its 317k assembly
    emd20026_apoferritin/3ajo_fitted_refined.pdb     # gpu_check.py --cpu's small model
    emd30342_7cec/390_7cec.cif.gz                   # the batch: residue ranges of chains A-C
    emd30342_7cec/390_7cec_A.cif.gz                 # the refinement's model
    emd30342_7cec/390_emd_30342_A_z4.mrc.gz         # and its map
)

with_finufft=0
for arg in "$@"; do
    case "$arg" in
        --with-finufft) with_finufft=1 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

# the shared data folder, found as tests/conftest.py finds it
DATA=""
for cand in "${MODELMAP_TEST_DATA:-}" "$REPO/../shared/data" "$REPO/../../shared/data"; do
    if [ -n "$cand" ] && [ -f "$cand/README.md" ]; then DATA="$(cd "$cand" && pwd)"; break; fi
done
if [ -z "$DATA" ]; then
    echo "shared data folder not found: set MODELMAP_TEST_DATA (or put it at ../shared/data)" >&2
    exit 1
fi

rm -rf "$CARRY"  # one version of each wheel: two would stop the install there
mkdir -p "$CARRY/wheels" "$CARRY/data"

packages=("${WHEELS[@]}")
if [ "$with_finufft" = 1 ]; then packages+=("${FINUFFT_WHEELS[@]}"); fi
echo "downloading cp312 manylinux x86_64 wheels: ${packages[*]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$CARRY/wheels" "${packages[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

echo "copying data from $DATA"
for f in "${DATA_FILES[@]}"; do
    mkdir -p "$CARRY/data/$(dirname "$f")"
    cp "$DATA/$f" "$CARRY/data/$f"
done

{
    echo "prepared $(date -u +%Y-%m-%dT%H:%M:%SZ) by benchmarks/gpu_prepare.sh from $DATA"
    echo "wheels: ${packages[*]}"
    (cd "$CARRY" && find wheels data -type f ! -name MANIFEST.txt -print0 | sort -z | xargs -0 sha256sum)
} > "$CARRY/MANIFEST.txt"

# what travels: the carried folder, plus the repository's tracked and untracked-not-ignored files
carry_bytes=$(du -sb "$CARRY" | cut -f1)
repo_bytes=$(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
    | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo
du -sh "$CARRY"/wheels/* "$CARRY"/data | sed "s|$CARRY/||"
echo
echo "carried (benchmarks/.gpu_carry): $(mib "$carry_bytes")  ($carry_bytes bytes)"
echo "repository files that travel:    $(mib "$repo_bytes")"
total=$((carry_bytes + repo_bytes))
echo "total:                           $(mib "$total")  (limit $LIMIT_MIB MiB)"
if [ "$total" -ge $((LIMIT_MIB * 1048576)) ]; then
    echo "OVER THE LIMIT: drop --with-finufft or carry less" >&2
    exit 1
fi
echo
echo 'next, on the device: run(command="bash benchmarks/gpu_check.sh", carry=["benchmarks/.gpu_carry"], timeout_s=540)'
