#!/usr/bin/env bash
# The GPU checks, in one short run (< 10 min on one GPU): the device physics tests, then the MD
# speed and replica benchmarks on CUDA. Run from the repository root on a machine with a CUDA GPU:
#     bash benchmarks/gpu_check.sh [cuda]
# Tables land in benchmarks/results/{md_speed_gpu,replicas_gpu}.md with the GPU named in them;
# the test log in benchmarks/results/gpu_tests.log. Needs the package installed (pip install -e .).
set -uo pipefail
DEVICE="${1:-cuda}"
cd "$(dirname "$0")/.."
OUT=benchmarks/results
mkdir -p "$OUT"
python - <<PY || { echo "no CUDA device visible to torch: nothing to check"; exit 1; }
import torch, sys
ok = torch.cuda.is_available()
print("torch", torch.__version__, "CUDA", torch.version.cuda, "device:", torch.cuda.get_device_name(0) if ok else None)
sys.exit(0 if ok else 1)
PY
status=0
echo "== device physics tests on $DEVICE"
MFCALC_TEST_DEVICE="$DEVICE" timeout 240 python -m pytest -q tests/test_device.py tests/test_neighbors.py 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -5 || status=1
grep -q " failed\| error" "$OUT/gpu_tests.log" && status=1
echo "== MD speed on $DEVICE"
timeout 180 python benchmarks/md_speed.py --device "$DEVICE" --quick --systems ethanol,water --out md_speed_gpu || status=1
echo "== replicas on $DEVICE"
timeout 120 python benchmarks/replicas.py --device "$DEVICE" --replicas 1 16 256 --rounds 3 --out replicas_gpu || status=1
exit $status
