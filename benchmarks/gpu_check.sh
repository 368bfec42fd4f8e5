#!/usr/bin/env bash
# The speed issue's GPU figures in one call of at most 8 minutes, on a bare lent GPU machine (issue 36):
#
#   bash benchmarks/gpu_check.sh                  # on the GPU machine (the device tool runs it in the repository root)
#   bash benchmarks/gpu_check.sh --quick          # a dry run of the same steps with tiny settings (any machine, CPU too)
#   bash benchmarks/gpu_check.sh --quick --static-on-cpu   # … measuring the static sandwich on the CPU too (slow)
#
# The machine has torch and numpy/pandas but neither Ray nor ptflops, and nothing can be installed there
# from a registry: wheels travel in .whl/ (git-ignored through .git/info/exclude). Here, once:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl ptflops==0.7.5
#
# and the device call names `.whl` in carry. This script installs .whl/*.whl into /tmp/site
# ($GPU_CHECK_SITE) itself and runs aebnas from this checkout (PYTHONPATH; the package is not installed
# there, and its torch may be older than pyproject asks: 2.11 was seen). Nothing it runs imports Ray.
#
# Steps, each under its own `timeout` (SIGTERM at the limit, SIGKILL 15 s later); the limits add up to
# 470 s with the set-up, inside the 480 s this check may take:
#   1. set-up (60 s): the wheels installed; torch, the GPU and every module the benchmarks import checked
#      (what is missing is named, with the command that fetches it, and nothing else runs);
#   2. claim 22, training_speed.py (300 s): eager and static sandwich, largest alone and torchvision's
#      mobilenet_v3_small in images/s and MACs/s at 32 px, batch 128 and 512; inherited candidates per
#      minute; the SVHN experiment projected. Each row is written to
#      $OUT/benchmarks/training_speed.partial.jsonl the moment it is measured; the static step's compiles
#      come last, and a time limit reached while compiling still leaves the record without them;
#   3. the profile, profile_steps.py (65 s): torch.profiler of a sandwich step, a fine-tuning step and an
#      inherited candidate's scoring, its page $OUT/profile/<device>.md rewritten after each section
#      (its Ray Tune part is skipped where Ray is missing);
#   4. a summary (15 s): the files written, and the rows of any step stopped before its record.
# Dropped to fit: claim 27 (compile_speed.py: two trainings with fresh inductor compiles need more than
# these 8 minutes; run it alone in a lease of its own), and the 1024-image batches and 72 px rows of claim 22.
# cuDNN's autotuning is off (benchmark=False, as in every aebnas command), so none lands in a timed step.
#
# Records go to $OUT/benchmarks/ (the device tool brings $OUT back; elsewhere results/gpu_check/), with
# the whole output in $OUT/gpu_check.log: copy training_speed.json into docs/benchmarks/ and run
# `python benchmarks/report.py` to rebuild docs/benchmarks.md (never a --quick record).
set -u
cd "$(dirname "$0")/.."
quick=()
speed_flags=()
for arg in "$@"; do
    case $arg in
        --quick) quick=(--quick) ;;
        --static-on-cpu) speed_flags=(--static-on-cpu) ;;
        *) echo "usage: bash benchmarks/gpu_check.sh [--quick] [--static-on-cpu]" >&2; exit 2 ;;
    esac
done
OUT=${OUT:-results/gpu_check}
mkdir -p "$OUT/benchmarks" "$OUT/profile"
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
GRACE=15  # seconds between a step's SIGTERM (it saves what it has) and SIGKILL
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

run_all() {
started=$SECONDS
echo "gpu_check: $(date -Is) in $PWD, OUT=$OUT${quick[*]:+ (quick)}"

# ---------------------------------------------------------------- 1. set-up (60 s)
if compgen -G ".whl/*.whl" >/dev/null; then
    echo "== wheels: $(cd .whl && echo *.whl) → $SITE"
    timeout -k 5 20 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl || echo "== wheels: pip install failed (status $?)"
    export PYTHONPATH="$PYTHONPATH:$SITE"
else
    echo "== no .whl/ folder: nothing installed (ptflops must then be importable already)"
fi
timeout -k 5 30 "$PY" - <<'EOF'
import importlib, importlib.util, sys
sys.path.insert(1, "benchmarks")  # `import harness`, as the scripts find it
missing = [m for m in ("torch", "torchvision", "numpy", "pandas", "ptflops") if importlib.util.find_spec(m) is None]
if missing:
    print(f"MISSING: {', '.join(missing)} cannot be imported; nothing was run.")
    if "ptflops" in missing:
        print("  ptflops travels as a wheel. Here, in the repository root:\n"
              "    echo /.whl/ >> .git/info/exclude\n"
              "    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
              "--platform manylinux_2_28_x86_64 -d .whl ptflops==0.7.5\n"
              "  and name .whl in the device call's carry.")
    sys.exit(2)
import torch
cuda = torch.cuda.is_available()
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {cuda}: "
      f"{torch.cuda.get_device_name(0) if cuda else 'no GPU (CPU figures)'}")
for name in ("harness.common", "harness.baseline", "aebnas.training.supernet", "aebnas.cost.macs"):
    importlib.import_module(name)  # a missing module or an API this torch lacks shows here, not half-way
print("ray:", "importable" if importlib.util.find_spec("ray") else "not importable (the profile's Ray Tune part is skipped)")
EOF
rc=$?
if [ $rc -ne 0 ]; then
    echo "== set-up failed (status $rc): no benchmark run"
    return $rc
fi

# ---------------------------------------------------------------- 2.-3. the benchmarks
statuses=()
step() {  # step LIMIT NAME COMMAND…: one benchmark under its time limit; its status is printed, not fatal
    local limit=$1 name=$2 t=$SECONDS rc note
    shift 2
    echo "== $name: $* (limit $limit s, SIGKILL $GRACE s later)"
    timeout -k "$GRACE" "$limit" "$@"
    rc=$?
    case $rc in
        124) note=" (stopped by its time limit)" ;;
        137) note=" (killed $GRACE s after its time limit)" ;;
        *) note="" ;;
    esac
    echo "== $name: exit status $rc after $((SECONDS - t)) s$note"
    statuses+=("$name: $rc$note")
}
step 300 training_speed "$PY" benchmarks/training_speed.py --docs-dir "$OUT/benchmarks" ${quick[@]+"${quick[@]}"} \
    ${speed_flags[@]+"${speed_flags[@]}"}
if [ ${#quick[@]} -gt 0 ]; then profile_args=(--steps 1 --candidates 1); else profile_args=(--steps 4 --candidates 4); fi
step 65 profile "$PY" benchmarks/profile_steps.py "${profile_args[@]}" --out "$OUT/profile"
echo "== compile_speed (claim 27): not run, dropped to fit: its two fresh inductor compiles need a lease of their own"

# ---------------------------------------------------------------- 4. summary (15 s)
echo "== summary after $((SECONDS - started)) s"
printf '   %s\n' "${statuses[@]}"
for f in "$OUT"/benchmarks/*.partial.jsonl; do
    [ -e "$f" ] || continue
    echo "== $f: a step stopped before its record; the rows it finished:"
    timeout -k 2 10 "$PY" benchmarks/harness/rows.py "$f"
done
find "$OUT" -type f | sort | while read -r f; do echo "   $f ($(wc -c <"$f") bytes)"; done
if [ ${#quick[@]} -gt 0 ]; then
    echo "== a --quick dry run: its records are not for docs/benchmarks/"
else
    echo "== next: copy $OUT/benchmarks/training_speed.json into docs/benchmarks/, then python benchmarks/report.py"
fi
}

set -o pipefail
run_all 2>&1 | tee "$OUT/gpu_check.log"
