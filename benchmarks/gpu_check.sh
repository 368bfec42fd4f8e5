#!/usr/bin/env bash
# The speed issue's GPU figures in one call, for a session lent a GPU machine for a few minutes:
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine (the device tool runs it in the repository root)
#   bash benchmarks/gpu_check.sh --quick    # a dry run of the same steps with tiny settings (any machine)
#
# Runs claim 22 (training_speed: sandwich, largest alone and torchvision's mobilenet_v3_small in images/s
# and MACs/s; candidates per minute; the SVHN experiment projected) and claim 27 (compile_speed: whether
# --compile pays), each under its own time limit so that one that overruns leaves the other's figures,
# then the profile (torch.profiler of the three steps; its Ray Tune part needs Ray and may fail there).
# Records go to $OUT/benchmarks/ (the device tool brings $OUT back; elsewhere results/gpu_check/):
# copy them into docs/benchmarks/ and run `python benchmarks/report.py` to rebuild docs/benchmarks.md.
# Limits: about 9 minutes in all, inside the 10 a device command may take.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu_check}
mkdir -p "$OUT/benchmarks"
quick=()
[ "${1:-}" = "--quick" ] && quick=(--quick)
python - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(no GPU: CPU figures)", flush=True)
EOF
step() {  # step SECONDS SCRIPT [ARGS…]: one benchmark under a time limit; its status is printed, not fatal
    local limit=$1; shift
    echo "== $* (limit ${limit} s)"
    timeout "$limit" python "$@" --docs-dir "$OUT/benchmarks" "${quick[@]}"
    echo "== $1: exit status $?"
}
step 270 benchmarks/training_speed.py
step 200 benchmarks/compile_speed.py
echo "== benchmarks/profile_steps.py (limit 90 s)"
timeout 90 python benchmarks/profile_steps.py --steps 4 --candidates 4
echo "== benchmarks/profile_steps.py: exit status $?"
cp results/benchmarks/profile/*.md "$OUT/" 2>/dev/null
ls -l "$OUT" "$OUT/benchmarks"
