#!/usr/bin/env bash
# One GPU call: kernel correctness at real sizes + QLoRA SFT benchmark (llmforge vs HF+PEFT+bnb vs Unsloth).
#
#   GPU_RUN="check bench-1b" bash benchmarks/gpu_run.sh      # first call  (~8-9 min on an H100)
#   GPU_RUN="bench-8b"       bash benchmarks/gpu_run.sh      # second call (~7-9 min)
#
# Steps (GPU_RUN, in order): check (benchmarks/gpu_kernels_check.py), steps (only its training-step
# checks, sizes from GPU_STEP_SIZES, extra arguments from GPU_STEP_ARGS, e.g. --graphs), bench-1b / bench-8b (configs
# llmforge-*, hf-*, unsloth-* each in its own process, same train_anchor.py loop), maxseq-1b / maxseq-8b
# (longest sequence per stack by search, slow), memscale-1b / memscale-8b (peak memory at two sequence
# lengths per stack -> estimated longest sequence; GPU_MEMSCALE_SEQS="4096 16384", GPU_MEMSCALE_STACKS), profile-1b /
# profile-8b (torch.profiler's top kernels of one step of each stack in GPU_PROFILE_STACK, default llmforge; batch GPU_PROFILE_BATCH, default 2). Needs the anchor kit in .anchors/gpu-train (carry ".anchors").
# Knobs: GPU_BUDGET_S (whole script, default 570), GPU_CONFIG_TIMEOUT_S (per config, default 200),
# GPU_CHECK_TIMEOUT_S (default 240), GPU_CONFIGS_1B / GPU_CONFIGS_8B (override the config lists),
# GPU_RUN_ARGS (extra args for every `run`), GPU_MODELS (/tmp/models), GPU_SITE (/tmp/site).
# Everything goes to $OUT (default /tmp/llmforge_gpu_out): driver.log, one log per step, results/*.json,
# table.txt. A failure in one step or config never stops the others.
set -u
T0=$(date +%s)
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
OUT="${OUT:-/tmp/llmforge_gpu_out}"
RUN="${GPU_RUN:-check bench-1b}"
BUDGET="${GPU_BUDGET_S:-570}"
PER_CONFIG="${GPU_CONFIG_TIMEOUT_S:-200}"
CHECK_TIMEOUT="${GPU_CHECK_TIMEOUT_S:-240}"
MODELS="${GPU_MODELS:-/tmp/models}"
SITE="${GPU_SITE:-/tmp/site}"
RUN_ARGS="${GPU_RUN_ARGS:-}"
DEVICE="${GPU_DEVICE:-cuda}"
ANCHOR="${LLMFORGE_ANCHOR:-$REPO/.anchors/gpu-train}"
[ -f "$ANCHOR/train_anchor.py" ] || ANCHOR="$REPO/../shared/anchors/gpu-train"
RES="$OUT/results"
WORK=/tmp/llmforge_gpu_work
mkdir -p "$OUT" "$RES" "$WORK"
DLOG="$OUT/driver.log"
say() { echo "[gpu_run +$(( $(date +%s) - T0 ))s] $*" | tee -a "$DLOG"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false DO_NOT_TRACK=1 \
       UNSLOTH_DISABLE_STATISTICS=1 UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled_cache \
       LLMFORGE_ANCHOR="$ANCHOR"

if [ ! -f "$ANCHOR/train_anchor.py" ]; then say "anchor kit not found (carry .anchors/gpu-train)"; exit 1; fi
if [ ! -f "$SITE/.llmforge_installed" ]; then
    say "installing the anchor's wheels into $SITE"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$ANCHOR"/whl/*.whl >>"$DLOG" 2>&1 && touch "$SITE/.llmforge_installed" \
        || say "wheel install FAILED (see driver.log); going on with the image's packages"
fi
export PYTHONPATH="$SITE:$REPO"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  python3 "$ANCHOR/train_anchor.py" env 2>&1; } >>"$DLOG"
say "GPU_RUN=\"$RUN\" budget ${BUDGET}s"

build() {  # $1 = size
    [ -f "$MODELS/llama-$1-random/.anchor_complete" ] && return 0
    local t; t=$(left); [ "$t" -gt 300 ] && t=300
    [ "$t" -lt 40 ] && { say "no time to build $1"; return 1; }
    say "building random llama-$1 (timeout ${t}s)"
    timeout -k 10 "$t" python3 "$ANCHOR/train_anchor.py" build --sizes "$1" --out "$MODELS" --device "$DEVICE" \
        >>"$OUT/build-$1.log" 2>&1
    local rc=$?; say "build $1 rc=$rc"; [ $rc -eq 0 ]
}

run_config() {  # $1 = config name
    local cfg=$1 t script
    t=$(left); [ "$t" -gt "$PER_CONFIG" ] && t=$PER_CONFIG
    if [ "$t" -lt 60 ]; then say "$cfg: skipped (${t}s left)"; echo skipped > "$RES/$cfg.rc"; return; fi
    case "$cfg" in llmforge-*|trainer-*) script="$REPO/benchmarks/train_gpu.py" ;; *) script="$ANCHOR/train_anchor.py" ;; esac
    say "$cfg: start (timeout ${t}s)"
    ( cd "$WORK" && timeout -k 10 "$t" python3 "$script" run --config "$cfg" --models "$MODELS" \
        --result "$RES/$cfg.json" --budget-s $(( t - 8 )) --device "$DEVICE" $RUN_ARGS ) > "$OUT/$cfg.log" 2>&1
    local rc=$?; echo "$rc" > "$RES/$cfg.rc"
    say "$cfg: rc=$rc $(grep -a 'RESULT ' "$OUT/$cfg.log" | tail -1 | sed 's/.*RESULT //')"
    [ $rc -ne 0 ] && grep -a -E 'Error|error|Exception' "$OUT/$cfg.log" | tail -3 | tee -a "$DLOG"
    python3 "$REPO/benchmarks/train_gpu.py" table --results "$RES" --write "$OUT/table.txt" >/dev/null 2>>"$DLOG"
}

bench() {  # $1 = size
    local configs
    case "$1" in
        1b) configs="${GPU_CONFIGS_1B:-llmforge-1b hf-1b unsloth-1b}" ;;
        8b) configs="${GPU_CONFIGS_8B:-llmforge-8b hf-8b unsloth-8b}" ;;
        *)  configs="llmforge-$1 hf-$1" ;;  # tiny: CPU smoke test of this script
    esac
    build "$1" || { say "bench-$1: model build failed"; return; }
    for cfg in $configs; do run_config "$cfg"; done
}

maxseq() {  # $1 = size
    build "$1" || return
    for stack in llmforge hf unsloth; do
        local t; t=$(left); [ "$t" -gt 240 ] && t=240
        [ "$t" -lt 60 ] && { say "maxseq $stack-$1: skipped"; continue; }
        say "maxseq $stack-$1 (timeout ${t}s)"
        ( cd "$WORK" && timeout -k 10 "$t" python3 "$REPO/benchmarks/train_gpu.py" maxseq --stack "$stack" \
            --size "$1" --models "$MODELS" --budget-s $(( t - 30 )) --result "$RES/maxseq-$stack-$1.json" ) \
            > "$OUT/maxseq-$stack-$1.log" 2>&1
        say "maxseq $stack-$1: rc=$? $(grep -a 'MAXSEQ ' "$OUT/maxseq-$stack-$1.log" | tail -1 | sed 's/.*MAXSEQ //')"
    done
}

memscale() {  # $1 = size: peak memory at two sequence lengths per stack -> estimated longest sequence
    build "$1" || return
    for stack in ${GPU_MEMSCALE_STACKS:-llmforge hf unsloth}; do
        local t; t=$(left); [ "$t" -gt 150 ] && t=150
        [ "$t" -lt 50 ] && { say "memscale $stack-$1: skipped (${t}s left)"; continue; }
        say "memscale $stack-$1 (timeout ${t}s)"
        ( cd "$WORK" && timeout -k 10 "$t" python3 "$REPO/benchmarks/train_gpu.py" memscale --stack "$stack" \
            --size "$1" --models "$MODELS" --device "$DEVICE" ${GPU_MEMSCALE_SEQS:+--seqs $GPU_MEMSCALE_SEQS} \
            --result "$RES/memscale-$stack-$1.json" ) > "$OUT/memscale-$stack-$1.log" 2>&1
        say "memscale $stack-$1: rc=$? $(grep -a 'MEMSCALE ' "$OUT/memscale-$stack-$1.log" | tail -1 | sed 's/.*MEMSCALE //')"
    done
}

profile() {  # $1 = size: where one training step's GPU time goes (torch.profiler, top kernels), per stack
    build "$1" || return
    local stack t
    for stack in ${GPU_PROFILE_STACK:-llmforge}; do
        t=$(left); [ "$t" -gt 150 ] && t=150
        [ "$t" -lt 50 ] && { say "profile $stack-$1: skipped (${t}s left)"; continue; }
        say "profile $stack-$1 (timeout ${t}s)"
        ( cd "$WORK" && timeout -k 10 "$t" python3 "$REPO/benchmarks/train_gpu.py" profile --stack "$stack" \
            --size "$1" --models "$MODELS" --batch "${GPU_PROFILE_BATCH:-2}" ) > "$OUT/profile-$stack-$1.log" 2>&1
        say "profile $stack-$1: rc=$? $(grep -a "PROFILE $stack" "$OUT/profile-$stack-$1.log" | tail -1 | sed 's/.*PROFILE //')"
        grep -a -E "PROFILE (GPU busy|syncs|peak)" "$OUT/profile-$stack-$1.log" | sed 's/.*PROFILE /    /' | tee -a "$DLOG"
    done
}

for step in $RUN; do
    case "$step" in
        check)
            t=$(left); [ "$t" -gt "$CHECK_TIMEOUT" ] && t=$CHECK_TIMEOUT
            say "check: gpu_kernels_check.py (timeout ${t}s)"
            timeout -k 10 "$t" python3 "$REPO/benchmarks/gpu_kernels_check.py" --json "$OUT/kernels_check.json" \
                > "$OUT/kernels_check.log" 2>&1
            say "check: rc=$?"; grep -a -E '^\|' "$OUT/kernels_check.log" | tail -40 | tee -a "$DLOG" >/dev/null ;;
        steps)  # only the patched-vs-unpatched training-step checks
            t=$(left); [ "$t" -gt "$CHECK_TIMEOUT" ] && t=$CHECK_TIMEOUT
            say "steps: gpu_kernels_check.py --skip-kernels --sizes ${GPU_STEP_SIZES:-1b 8b} (timeout ${t}s)"
            timeout -k 10 "$t" python3 "$REPO/benchmarks/gpu_kernels_check.py" --skip-kernels ${GPU_STEP_ARGS:-} \
                --sizes ${GPU_STEP_SIZES:-1b 8b} --json "$OUT/steps_check.json" > "$OUT/kernels_check.log" 2>&1
            say "steps: rc=$?" ;;
        bench-1b) bench 1b ;;
        bench-8b) bench 8b ;;
        bench-tiny) bench tiny ;;
        memscale-1b) memscale 1b ;;
        memscale-8b) memscale 8b ;;
        memscale-tiny) memscale tiny ;;
        profile-1b) profile 1b ;;
        profile-8b) profile 8b ;;
        profile-tiny) profile tiny ;;
        maxseq-1b) maxseq 1b ;;
        maxseq-8b) maxseq 8b ;;
        *) say "unknown step $step" ;;
    esac
done

python3 "$REPO/benchmarks/train_gpu.py" table --results "$RES" --write "$OUT/table.txt" >/dev/null 2>>"$DLOG"
say "done in $(( $(date +%s) - T0 ))s"
echo; [ -f "$OUT/kernels_check.log" ] && grep -a -E '^\||^(PASS|FAIL)' "$OUT/kernels_check.log"
echo; cat "$OUT/table.txt" 2>/dev/null
