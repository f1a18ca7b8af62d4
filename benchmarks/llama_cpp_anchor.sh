#!/usr/bin/env bash
# llama.cpp on the same checkpoint, for a same-day anchor beside benchmarks/runtime_speed.py.
#
#   bash benchmarks/llama_cpp_anchor.sh CHECKPOINT_DIR [WORK_DIR [EXPORT_DIR ...]]
#
# Builds llama-bench and llama-quantize from the llama.cpp sources vendored in the llama-cpp-python
# sdist (pip reaches it where GitHub is not), converts CHECKPOINT_DIR to GGUF f16 with llama.cpp's
# own converter, quantizes to Q4_0 and Q4_K_M, and runs llama-bench with 2 threads: pp128 (prompt
# from empty) and tg128 @ d128 (128 new tokens after 128 in context), the workload phi-onnx's
# figures use. Each EXPORT_DIR (phi-onnx exports of the same checkpoint) is measured between the
# llama-bench runs with `runtime_speed.py --only "phi-onnx ort backend"`, $ROUNDS rounds (default 3),
# because the machine drifts. Needs cmake, a C++ compiler, and a Python with phi-onnx, torch,
# transformers and safetensors. Build and conversion steps: benchmarks/llama_cpp_common.sh.
set -euo pipefail
CKPT=$(realpath "$1")
WORK=$(realpath -m "${2:-/tmp/llama-cpp-anchor}")
EXPORTS=()
for export_dir in "${@:3}"; do EXPORTS+=("$(realpath "$export_dir")"); done
PYTHON=${PYTHON:-python}
ROUNDS=${ROUNDS:-3}
HERE="$(cd "$(dirname "$0")" && pwd)"
SPEED="$HERE/runtime_speed.py"
mkdir -p "$WORK"
cd "$WORK"

. "$HERE/llama_cpp_common.sh"
llama_cpp_build "$WORK" llama-bench llama-quantize
llama_cpp_convert "$WORK" "$CKPT"
for quant in Q4_0 Q4_K_M; do llama_cpp_quantize "$WORK" "$quant"; done
for round in $(seq "$ROUNDS"); do
    echo "## round $round"
    for quant in Q4_0 Q4_K_M; do
        llama.cpp/build/bin/llama-bench -m "model-$quant.gguf" -t 2 -p 128 -n 128 -d 0,128 -r 2 -o md 2> /dev/null
    done
    for export_dir in "${EXPORTS[@]}"; do
        echo "phi-onnx: $export_dir"
        "$PYTHON" "$SPEED" "$export_dir" --rounds 1 --runs 3 --only "phi-onnx ort backend" 2> /dev/null
    done
done
