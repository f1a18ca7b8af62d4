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
# transformers and safetensors.
#
# A random test checkpoint's tokenizer is unknown to the converter's pre-tokenizer table; speed does
# not depend on it, so the converter is told to treat it as GPT-2's and the tokenizer class is set
# to GPT2Tokenizer in a linked copy of the folder.
set -euo pipefail
CKPT=$(realpath "$1")
WORK=$(realpath -m "${2:-/tmp/llama-cpp-anchor}")
EXPORTS=()
for export_dir in "${@:3}"; do EXPORTS+=("$(realpath "$export_dir")"); done
PYTHON=${PYTHON:-python}
ROUNDS=${ROUNDS:-3}
SPEED="$(cd "$(dirname "$0")" && pwd)/runtime_speed.py"
mkdir -p "$WORK"
cd "$WORK"

if [ ! -x llama.cpp/build/bin/llama-bench ]; then
    "$PYTHON" -m pip download --quiet llama-cpp-python --no-deps --no-binary :all: -d sdist
    tar xzf sdist/llama_cpp_python-*.tar.gz
    rm -rf llama.cpp && mv llama_cpp_python-*/vendor/llama.cpp llama.cpp
    cmake -S llama.cpp -B llama.cpp/build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_BUILD_TYPE=Release > cmake.log
    cmake --build llama.cpp/build -j"$(nproc)" --target llama-bench llama-quantize > build.log
fi

if [ ! -f model-f16.gguf ]; then
    rm -rf checkpoint && mkdir checkpoint
    for item in "$CKPT"/*; do ln -s "$item" checkpoint/; done
    rm checkpoint/tokenizer_config.json
    "$PYTHON" - "$CKPT/tokenizer_config.json" checkpoint/tokenizer_config.json <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
config["tokenizer_class"] = "GPT2Tokenizer"
json.dump(config, open(sys.argv[2], "w"))
PY
    "$PYTHON" - "$WORK" <<'PY'
import runpy, sys
work = sys.argv[1]
root = f"{work}/llama.cpp"
sys.path[:0] = [root, f"{root}/gguf-py"]
import conversion.base as base
for obj in list(vars(base).values()):
    if isinstance(obj, type) and "get_vocab_base_pre" in vars(obj):
        obj.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", f"{work}/checkpoint", "--outfile", f"{work}/model-f16.gguf", "--outtype", "f16"]
runpy.run_path(f"{root}/convert_hf_to_gguf.py", run_name="__main__")
PY
fi

for quant in Q4_0 Q4_K_M; do
    [ -f "model-$quant.gguf" ] || llama.cpp/build/bin/llama-quantize model-f16.gguf "model-$quant.gguf" "$quant" 2 > quantize.log 2>&1
done
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
