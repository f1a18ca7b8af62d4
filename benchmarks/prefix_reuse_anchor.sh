#!/usr/bin/env bash
# Prefix reuse against llama-server (cache_prompt on, its default) on the same weights, in one run.
#
#   bash benchmarks/prefix_reuse_anchor.sh CHECKPOINT_DIR EXPORT_DIR [WORK_DIR]
#
# Builds llama-server and converts CHECKPOINT_DIR to GGUF Q4_0 (benchmarks/llama_cpp_common.sh), then for
# each user count U in $USERS (default 4,8) runs benchmarks/multiturn_load.py's `multiturn` workload
# (U users x $TURNS turns, a $SYSTEM-token shared system prompt, $TURN-token user turns, $REPLY-token replies,
# the whole conversation each turn, token ids) against `llama-server -np U` and then
# `phi-onnx serve EXPORT --max-batch U`, and finally the `burst` workload (16 requests sharing a 600-token
# prefix, 30-token questions, 8 at a time) against both with 8 slots. Servers run one at a time on free
# 127.0.0.1 ports with $THREADS threads (default 2) and are stopped after each run. Prints one JSON line
# per run; each run's results stay in a folder of their own, WORK_DIR/prefix-results/YYYYmmdd-HHMMSS.
#
# The VM this was written on drifts by 10-30 % within minutes, so the comparison runs in $ROUNDS rounds
# (default 3): each round runs every workload on both servers back to back, the first server alternating
# between rounds, and benchmarks/prefix_reuse_summary.py prints each round's ratios and their medians.
set -euo pipefail
CKPT=$(realpath "$1")
EXPORT=$(realpath "$2")
WORK=$(realpath -m "${3:-/tmp/llama-server-anchor}")
USERS=${USERS:-4,8}
TURNS=${TURNS:-4}
SYSTEM=${SYSTEM:-400}
TURN=${TURN:-60}
REPLY=${REPLY:-64}
THREADS=${THREADS:-2}
CONTEXT=${CONTEXT:-1024}
ROUNDS=${ROUNDS:-3}
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/llama_cpp_common.sh"
RESULTS="$WORK/prefix-results/$(date +%Y%m%d-%H%M%S)"  # a new folder: nothing earlier is overwritten
mkdir -p "$RESULTS"
VOCAB=$("$PYTHON" -c 'import sys; from phi_onnx.runtime.folder import read_folder; print(read_folder(sys.argv[1]).vocab_size)' "$EXPORT")

llama_cpp_build "$WORK" llama-server llama-quantize
llama_cpp_convert "$WORK" "$CKPT"
llama_cpp_quantize "$WORK" Q4_0

SERVER_PID=
stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    kill "$SERVER_PID" 2> /dev/null || true
    for _ in $(seq 60); do kill -0 "$SERVER_PID" 2> /dev/null || break; sleep 0.5; done
    kill -9 "$SERVER_PID" 2> /dev/null || true
    wait "$SERVER_PID" 2> /dev/null || true
    SERVER_PID=
}
trap stop_server EXIT
trap 'exit 130' INT TERM

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_healthy() {
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$1/health" > /dev/null 2>&1 && return 0
        kill -0 "$SERVER_PID" 2> /dev/null || return 1
        sleep 0.5
    done
    return 1
}

# start KIND SLOTS: start llama-server or phi-onnx serve with SLOTS slots; sets PORT
start() {
    PORT=$(free_port)
    if [ "$1" = llama ]; then
        "$WORK/llama.cpp/build/bin/llama-server" -m "$WORK/model-Q4_0.gguf" -np "$2" -c $(($2 * CONTEXT)) \
            -t "$THREADS" --host 127.0.0.1 --port "$PORT" > "$RESULTS/llama-$2.log" 2>&1 &
    else
        "$PYTHON" -m phi_onnx serve "$EXPORT" --host 127.0.0.1 --port "$PORT" --max-batch "$2" \
            --threads "$THREADS" --max-context "$CONTEXT" > "$RESULTS/phi-onnx-$2.log" 2>&1 &
    fi
    SERVER_PID=$!
    wait_healthy "$PORT" || { echo "$1 did not start: see $RESULTS" >&2; exit 1; }
}

# run KIND SLOTS NAME WORKLOAD ARGS...: one load against a fresh server, its JSON kept as NAME
run() {
    local kind=$1 slots=$2 name=$3
    shift 3
    start "$kind" "$slots"
    "$PYTHON" "$HERE/multiturn_load.py" --url "http://127.0.0.1:$PORT" --api "$kind" --vocab "$VOCAB" \
        --tokenizer "$EXPORT/tokenizer.json" --json "$RESULTS/$name.json" "$@"
    stop_server
}

for round in $(seq "$ROUNDS"); do
    # Alternate which server goes first, so a drift of the machine's speed does not favour one of them.
    if [ $((round % 2)) = 1 ]; then order="llama phi-onnx"; else order="phi-onnx llama"; fi
    for users in ${USERS//,/ }; do
        for kind in $order; do
            run "$kind" "$users" "multiturn-$kind-$users-r$round" multiturn --users "$users" --turns "$TURNS" \
                --system-tokens "$SYSTEM" --turn-tokens "$TURN" --reply-tokens "$REPLY"
        done
    done
    for kind in $order; do
        run "$kind" 8 "burst-$kind-r$round" burst --requests 16 --concurrency 8 --prefix-tokens 600 \
            --question-tokens 30 --reply-tokens 32
    done
done
"$PYTHON" "$HERE/prefix_reuse_summary.py" "$RESULTS"
