#!/usr/bin/env bash
# The GPU check, at most 8 minutes on one H100-class GPU:
#   (a) CUDA equivalence (tests/test_cuda.py): single, a ring of 2 and of 4 ranks sharing the GPU through gloo's
#       pinned host staging, line and a star, fp32 with TF32 off, against the CPU reference (plain peft); and a
#       bf16 ring against a bf16 single process;
#   (b) the ring bench on the GPU (4 ranks sharing it, and single) on a model of SmolLM2-135M's shape, written to
#       OUT/bench.json (tdp is reported as not run where torch cannot run it);
#   (c) a short summary.
# Needs python3 with CUDA torch, transformers 5.23 and peft 0.21 (or their wheels in .whl/), and .gpu/ from
# `python scripts/gpu_assets.py prepare .gpu` (SmolLM2's config and Shakespeare token ids; see that script).
#   OUT=out/gpu-check scripts/gpu_check.sh     (BENCH=DIR keeps the bench's runs elsewhere; OUT gets its json)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-check}
BENCH=${BENCH:-$OUT/bench}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false NVIDIA_TF32_OVERRIDE=0
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ringada-site \
    .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/ringada-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -c "import torch, transformers, peft; print(f'{torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU(s), '
  f'torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')" \
  | tee "$OUT/device.txt" || exit 1

echo "== (a) CUDA equivalence"
timeout 240 $PY -m pytest -q -p no:cacheprovider -rA tests/test_cuda.py 2>&1 | tail -60 | tee "$OUT/cuda_tests.log"
tests_status=${PIPESTATUS[0]}

echo "== (b) ring bench on the GPU"
$PY scripts/gpu_assets.py build .gpu || exit 1
timeout 240 $PY -m ringada bench --suite ring --device cuda --world 4 --steps 8 --out "$BENCH" \
  --systems single,ring-earlystop,ring-full,tdp-1f1b,tdp-1f1b-full \
  --set model.path=.gpu/smollm2-shape --set data.train=.gpu/shakespeare-train.jsonl \
  --set data.eval=.gpu/shakespeare-eval.jsonl 2>&1 | tail -30
bench_status=${PIPESTATUS[0]}
cp "$BENCH/bench.json" "$BENCH/bench.md" "$OUT/" 2>/dev/null

echo "== (c) summary"
$PY - "$OUT" "$tests_status" "$bench_status" <<'PYEOF'
import json, sys
from pathlib import Path
out, tests, bench_rc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print((out / "device.txt").read_text().strip())
print("equivalence tests:", "passed" if tests == 0 else f"FAILED (exit {tests}); see cuda_tests.log")
if (out / "bench.json").is_file():
    bench = json.loads((out / "bench.json").read_text())
    for r in bench["results"]:
        ratio = r.get("vs_tdp_1f1b_same_trainable")
        print(f"  {r['system']:<16} {r['tokens_per_s']:>10.0f} tokens/s  step {r['step_s']:.3f} s  peak RSS "
              f"{r['peak_rss_bytes'] / 2**20:.0f} MiB" + (f"  x{ratio:.2f} tdp" if ratio else ""))
    for r in bench.get("not_run", []):
        print(f"  {r['system']:<16} {r['reason']}")
print("bench:", "written" if bench_rc == 0 else f"FAILED (exit {bench_rc})")
sys.exit(1 if tests or bench_rc else 0)
PYEOF
