#!/usr/bin/env bash
# One device call (<= 10 min) that checks on a GPU what was built on CPU-only machines, most important first:
#   whole-file quantization (CUDA pipeline, then the numpy pool on all cores) vs llama.cpp on the same host,
#   convert --device cuda == cpu bytes, host-resident frozen weights at the 8B shape, GRPO, SFT and vision on CUDA,
#   CUDA graphs per layer (graphs_test; not in the default list).
# Run from the repo root with the device tool, carrying ".wheels" (gguf, diskcache, llama-cpp-python wheels; Pillow
# under .wheels/vision) and ".anchors" (../shared/anchors/gpu-train):   DEADLINE_S=560 bash benchmarks/gpu_verify.sh
# Every step gets min(its own limit, what is left of DEADLINE_S); outputs go to $OUT. VERIFY_STEPS picks and orders
# the steps (default: all, in the order below), e.g. VERIFY_STEPS="quantize_both bench8b" (quantize_both: cuda + numpy in one run).
# QUANTS picks quantize_cuda's mixtures; GPU_RUN_8B the gpu_run.sh steps of bench8b (e.g. "bench-8b profile-8b").
# fp8_check: the FP8 base-matmul kernels' bytes and error at real sizes, and their speed vs the exact fused nodes.
# chunk_check: the chunked MLP backward vs the one-pass backward at 8B sizes; host_weights_check also checks and times
# the embedding rows read from pinned host memory by a kernel.
T0=$(date +%s); END=$((T0 + ${DEADLINE_S:-575}))
lim() { local l=$(( END - $(date +%s) )); [ "$l" -gt "$1" ] && l=$1; echo $l; }
python3 -m pip install -q --no-deps --target /tmp/site .wheels/*.whl
nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv,noheader | tee $OUT/gpu.txt
export PYTHONPATH=/tmp/site:$PWD
step() { echo "== $1 rc=$2 at $(( $(date +%s) - T0 ))s"; }
quantize_cuda() {
  uptime; timeout $(lim 200) python3 benchmarks/quantize.py --layers 22 --backends cuda --quants ${QUANTS:-q4_k_m,q6_k,q8_0} --dir /dev/shm --repeat 2 --probe --gpu-settings ${GPU_SETTINGS:-12x32,12x32xnoalloc,12x32xmmap,16x32xmmap} --out $OUT/quantize_gpu.txt > $OUT/quantize_gpu.log 2>&1
  step quantize_cuda $?; rm -rf /dev/shm/tmp* 2>/dev/null; cat $OUT/quantize_gpu.txt
}
quantize_both() {   # one f32 build and one llama.cpp run per mixture for the CUDA pipeline and the numpy pool
  uptime; timeout $(lim 230) python3 benchmarks/quantize.py --layers 22 --backends cuda,numpy --quants q4_k_m,q6_k,q8_0 --dir /dev/shm --repeat 2 --probe --gpu-settings 12x32,12x32xnoalloc,12x32xmmap --out $OUT/quantize_both.txt > $OUT/quantize_both.log 2>&1
  step quantize_both $?; uptime; rm -rf /dev/shm/tmp* 2>/dev/null; cat $OUT/quantize_both.txt
}
quantize_numpy() {
  timeout $(lim 110) python3 benchmarks/quantize.py --layers 22 --backends numpy --quants q4_k_m,q6_k,q8_0 --dir /dev/shm --repeat 1 --out $OUT/quantize_numpy.txt > $OUT/quantize_numpy.log 2>&1; uptime
  step quantize_numpy $?; rm -rf /dev/shm/tmp* 2>/dev/null; cat $OUT/quantize_numpy.txt
}
convert_bytes() {
  timeout $(lim 160) python3 -m pytest -q -s -rA -p no:cacheprovider -p no:warnings "tests/test_convert_device.py::test_cuda_writes_the_cpu_bytes" > $OUT/convert_pytest.txt 2>&1
  step convert_bytes $?; tail -8 $OUT/convert_pytest.txt; cat $OUT/convert_gpu.txt 2>/dev/null
}
host_weights_check() {
  timeout $(lim 60) python3 benchmarks/gpu_kernels_check.py --host-weights --json $OUT/host_weights_check.json > $OUT/host_weights_check.log 2>&1
  step host_weights_check $?; grep -a -E '^\||^(PASS|FAIL)|Error' $OUT/host_weights_check.log | tail -16
}
anchor_wheels() {   # bitsandbytes & co. from the anchor kit, as gpu_run.sh installs them (once per machine)
  [ -f /tmp/site/.llmforge_installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --upgrade \
    --target /tmp/site .anchors/gpu-train/whl/*.whl && touch /tmp/site/.llmforge_installed; }
}
fp8_check() {
  anchor_wheels
  timeout $(lim 120) python3 benchmarks/gpu_kernels_check.py --fp8 --json $OUT/fp8_check.json > $OUT/fp8_check.log 2>&1
  step fp8_check $?; grep -a -E '^\||^(PASS|FAIL)|Error' $OUT/fp8_check.log | tail -24
}
chunk_check() {   # the chunked MLP backward (LLMFORGE_MLP_CHUNK_MIB) vs the one-pass one at 8B sizes
  anchor_wheels
  timeout $(lim 120) python3 benchmarks/gpu_kernels_check.py --chunked-mlp --json $OUT/chunk_check.json > $OUT/chunk_check.log 2>&1
  step chunk_check $?; grep -a -E '^\||^(PASS|FAIL)|Error' $OUT/chunk_check.log | tail -18
}
bench8b() {
  local B=$(lim ${BENCH_S:-230}) OUT_SAVE=$OUT
  OUT=$OUT/gpu_run GPU_BUDGET_S=$B GPU_RUN="${GPU_RUN_8B:-bench-8b}" GPU_CONFIGS_8B="${GPU_CONFIGS_8B:-llmforge-8b-hostw llmforge-8b}" bash benchmarks/gpu_run.sh > $OUT_SAVE/gpu_run_stdout.txt 2>&1
  local rc=$?; OUT=$OUT_SAVE; step bench8b $rc; tail -12 $OUT/gpu_run_stdout.txt
}
grpo() {
  timeout $(lim 130) python3 -m pytest -q -s -rA -p no:cacheprovider -p no:warnings tests/test_grpo_gpu.py > $OUT/grpo_pytest.txt 2>&1
  step grpo $?; tail -4 $OUT/grpo_pytest.txt; cat $OUT/grpo_gpu.txt 2>/dev/null | tail -5
}
trainer() {   # QLoRA SFT on CUDA through `llmforge train` (the loop's pinned, non-blocking batch copies)
  anchor_wheels
  timeout $(lim 150) python3 -m pytest -q -s -rA -p no:cacheprovider -p no:warnings tests/test_trainer_gpu.py > $OUT/trainer_pytest.txt 2>&1
  step trainer $?; grep -E "passed|failed|error|Error" $OUT/trainer_pytest.txt | tail -4
}
graphs_test() {   # CUDA graphs per layer, captured for real: same losses and gradients as without graphs
  anchor_wheels
  timeout $(lim 120) python3 -m pytest -q -s -rA -p no:cacheprovider -p no:warnings tests/test_layer_graphs_gpu.py > $OUT/graphs_pytest.txt 2>&1
  step graphs_test $?; grep -E "layer graphs|passed|failed|Error" $OUT/graphs_pytest.txt | tail -6
}
vision() {
  (python3 -c "import PIL" 2>/dev/null || python3 -m pip install -q --no-deps --target /tmp/site --no-index --find-links .wheels/vision pillow)
  timeout $(lim 200) python3 -m pytest -q -s -rA -p no:cacheprovider -p no:warnings tests/test_vision_gpu.py > $OUT/vision_pytest.txt 2>&1
  step vision $?; grep -E "passed|failed|error" $OUT/vision_pytest.txt | tail -3; cat $OUT/vision_gpu.txt 2>/dev/null
}
for s in ${VERIFY_STEPS:-quantize_cuda quantize_numpy convert_bytes host_weights_check bench8b grpo vision}; do
  [ "$(lim 100000)" -lt 20 ] && { echo "== $s skipped (no time left)"; continue; }
  $s
done
