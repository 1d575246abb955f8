#!/usr/bin/env bash
# The device check, one command, from the repository root of the copy on the device machine:
#
#     bash benchmarks/gpu_check.sh [gpu_check.py arguments]
#
# (through the device tool: run(command="bash benchmarks/gpu_check.sh",
#  carry=["benchmarks/.gpu_carry"], timeout_s=540), after benchmarks/gpu_prepare.sh here).
#
# It installs the carried wheels (benchmarks/.gpu_carry/wheels) into a --target folder put on
# PYTHONPATH (the image's site-packages is left alone), runs modelmap from src/, reads the carried
# data (benchmarks/.gpu_carry/data), prints nvidia-smi and JAX's devices, and runs
# benchmarks/gpu_check.py, which writes $OUT/gpu_check.json (else benchmarks/results/gpu/...);
# with $OUT set, the log goes to $OUT/gpu_check.log too.
# The whole run is kept under GPU_CHECK_BUDGET_S (default 470 s, i.e. under 8 minutes):
# gpu_check.py gets what is left after the install as its own budget.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)
# the whole log comes back with the JSON (the device tool returns what is under $OUT)
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then exec > >(tee "$OUT/gpu_check.log") 2>&1; fi
CARRY=benchmarks/.gpu_carry
PY="${PYTHON:-python3}"
SITE="${GPU_CHECK_SITE:-/tmp/modelmap_site}"
BUDGET="${GPU_CHECK_BUDGET_S:-470}"

if compgen -G "$CARRY/wheels/*.whl" > /dev/null; then
    echo "installing $(ls "$CARRY"/wheels/*.whl | wc -l) carried wheels into $SITE"
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$CARRY"/wheels/*.whl || { echo "installing the carried wheels failed" >&2; exit 2; }
else
    echo "no wheels in $CARRY/wheels: run benchmarks/gpu_prepare.sh first and carry benchmarks/.gpu_carry" >&2
fi
export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [ -f "$CARRY/data/README.md" ]; then export MODELMAP_TEST_DATA="$PWD/$CARRY/data"; fi
export PYTHONUNBUFFERED=1
# fail loudly if the CUDA plugin does not start, rather than fall back to the CPU (the CPU stays
# available for the NUFFT, whose PyPI wheel has no GPU kernel); --cpu dry runs leave it alone
case " $* " in *" --cpu "*) ;; *) export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda,cpu}" ;; esac

echo "== nvidia-smi"
nvidia-smi || echo "(nvidia-smi not available)"
echo "== python and jax"
"$PY" - <<'EOF' || echo "(jax failed to start)"
import sys, jax, jaxlib
print(sys.executable, sys.version.split()[0])
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "backend", jax.default_backend())
print("devices", jax.devices())
for name in ("gemmi", "mrcfile", "biotite", "jax_finufft", "equinox", "modelmap"):
    try:
        module = __import__(name)
        print(f"  {name} {getattr(module, '__version__', '?')} from {module.__file__}")
    except Exception as e:
        print(f"  {name}: {type(e).__name__}: {e}")
EOF

left=$((BUDGET - ($(date +%s) - start)))
echo "== benchmarks/gpu_check.py (budget ${left} s)"
# the script keeps to its budget (a watchdog saves the JSON and exits past it); timeout is the backstop
timeout --kill-after=10 $((left + 30)) "$PY" benchmarks/gpu_check.py --budget-s "$((left - 10))" "$@"
rc=$?
echo "== gpu_check.py exited with $rc after $(($(date +%s) - start)) s in all"
exit $rc
