# Shared steps of the llama.cpp anchors (sourced by llama_cpp_anchor.sh and llama_server_anchor.sh).
#
#   llama_cpp_build WORK TARGET...   build llama.cpp tools into WORK/llama.cpp/build/bin
#   llama_cpp_convert WORK CKPT      WORK/model-f16.gguf from a Hugging Face checkpoint folder
#   llama_cpp_quantize WORK QUANT    WORK/model-QUANT.gguf from WORK/model-f16.gguf
#
# The sources are the llama.cpp vendored in the llama-cpp-python sdist (pip reaches PyPI where GitHub
# is not). Each step is skipped when its output is already there. Uses $PYTHON (default python).
PYTHON=${PYTHON:-python}

llama_cpp_build() {
    local work=$1 target missing=()
    shift
    for target in "$@"; do
        [ -x "$work/llama.cpp/build/bin/$target" ] || missing+=("$target")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ ! -f "$work/llama.cpp/CMakeLists.txt" ]; then
        "$PYTHON" -m pip download --quiet llama-cpp-python --no-deps --no-binary :all: -d "$work/sdist"
        local sdist
        sdist=$(ls -t "$work"/sdist/llama_cpp_python-*.tar.gz | head -1)
        tar xzf "$sdist" -C "$work"
        rm -rf "$work/llama.cpp" && mv "$work"/llama_cpp_python-*/vendor/llama.cpp "$work/llama.cpp"
        rm -rf "$work"/llama_cpp_python-*/
    fi
    # The server is built without its web page (no npm, no download) and without HTTPS: loopback only.
    [ -f "$work/llama.cpp/build/CMakeCache.txt" ] ||
        cmake -S "$work/llama.cpp" -B "$work/llama.cpp/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
            -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
            > "$work/cmake.log" 2>&1
    cmake --build "$work/llama.cpp/build" -j"$(nproc)" --target "${missing[@]}" > "$work/build.log" 2>&1
}

# A random test checkpoint's tokenizer is unknown to the converter's pre-tokenizer table; speed does
# not depend on it, so the converter is told to treat it as GPT-2's and the tokenizer class is set
# to GPT2Tokenizer in a linked copy of the folder.
llama_cpp_convert() {
    local work=$1 ckpt item
    ckpt=$(realpath "$2")
    [ -f "$work/model-f16.gguf" ] && return 0
    # Recreated on each run, so it must be a linked copy made here (symlinks and our tokenizer_config.json):
    # never a real folder, such as the checkpoint itself when it is WORK/checkpoint.
    if [ -L "$work/checkpoint" ] || { [ -e "$work/checkpoint" ] && [ -n "$(find "$work/checkpoint" -mindepth 1 \
            \( -type d -o \( -type f ! -name tokenizer_config.json \) -o -path "$work/checkpoint/*/*" \) -print -quit)" ]; }; then
        echo "error: $work/checkpoint is not a linked copy made by this script; choose another WORK_DIR" >&2
        return 2
    fi
    rm -rf "$work/checkpoint" && mkdir "$work/checkpoint"
    for item in "$ckpt"/*; do ln -s "$item" "$work/checkpoint/"; done
    rm "$work/checkpoint/tokenizer_config.json"
    "$PYTHON" - "$ckpt/tokenizer_config.json" "$work/checkpoint/tokenizer_config.json" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
config["tokenizer_class"] = "GPT2Tokenizer"
json.dump(config, open(sys.argv[2], "w"))
PY
    "$PYTHON" - "$work" <<'PY'
import runpy, sys
work = sys.argv[1]
root = f"{work}/llama.cpp"
sys.path[:0] = [root, f"{root}/gguf-py"]
import conversion.base as base
for obj in list(vars(base).values()):
    if isinstance(obj, type) and "get_vocab_base_pre" in vars(obj):
        obj.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", f"{work}/checkpoint", "--outfile", f"{work}/model-f16.gguf.partial",
            "--outtype", "f16"]
runpy.run_path(f"{root}/convert_hf_to_gguf.py", run_name="__main__")
PY
    mv "$work/model-f16.gguf.partial" "$work/model-f16.gguf"
}

llama_cpp_quantize() {
    local work=$1 quant=$2
    [ -f "$work/model-$quant.gguf" ] && return 0
    "$work/llama.cpp/build/bin/llama-quantize" "$work/model-f16.gguf" "$work/model-$quant.gguf.partial" "$quant" 2 \
        > "$work/quantize.log" 2>&1
    mv "$work/model-$quant.gguf.partial" "$work/model-$quant.gguf"
}
