#!/usr/bin/env bash
# llama.cpp's llama-server beside `phi-onnx serve` on the same checkpoint: the load test of issue 11.
#
#   bash benchmarks/llama_server_anchor.sh CHECKPOINT_DIR EXPORT_DIR [WORK_DIR]
#
# Builds llama-server and llama-quantize and converts CHECKPOINT_DIR to GGUF Q4_0
# (benchmarks/llama_cpp_common.sh; WORK_DIR defaults to /tmp/llama-server-anchor), then for each N in
# $CLIENTS (default 1,2,4,8,16) runs, one after the other:
#   llama-server -m model-Q4_0.gguf -np N -c N*512 -t $THREADS
#   phi-onnx serve EXPORT_DIR --max-batch 16 --threads $THREADS
# each on a free 127.0.0.1 port, loaded by benchmarks/serve_load.py --url with N concurrent streaming
# clients, $REQUESTS requests each (default 2): $PROMPT_TOKENS-token prompts of random ids (the same
# ids for both servers) and exactly $NEW_TOKENS greedy tokens, EOS ignored (defaults 128 and 128).
# Alternating per N spreads the machine's drift over both. Prints one side-by-side table; per-run
# JSON and server logs stay in WORK_DIR/results. Each server is stopped after its run and on exit;
# each run is limited to $LIMIT seconds (default 1200). THREADS defaults to 2.
set -euo pipefail
CKPT=$(realpath "$1")
EXPORT=$(realpath "$2")
WORK=$(realpath -m "${3:-/tmp/llama-server-anchor}")
CLIENTS=${CLIENTS:-1,2,4,8,16}
THREADS=${THREADS:-2}
REQUESTS=${REQUESTS:-2}
PROMPT_TOKENS=${PROMPT_TOKENS:-128}
NEW_TOKENS=${NEW_TOKENS:-128}
LIMIT=${LIMIT:-1200}
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/llama_cpp_common.sh"
RESULTS="$WORK/results"
mkdir -p "$RESULTS"
rm -f "$RESULTS"/llama-server-*.json "$RESULTS"/phi-onnx-*.json  # only this script's: a stale one would show as a result

llama_cpp_build "$WORK" llama-server llama-quantize
llama_cpp_convert "$WORK" "$CKPT"
llama_cpp_quantize "$WORK" Q4_0

SERVER_PID=
LOAD_PID=
stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    kill "$SERVER_PID" 2> /dev/null || true
    for _ in $(seq 60); do kill -0 "$SERVER_PID" 2> /dev/null || break; sleep 0.5; done
    kill -9 "$SERVER_PID" 2> /dev/null || true
    wait "$SERVER_PID" 2> /dev/null || true
    SERVER_PID=
}
cleanup() {
    [ -z "$LOAD_PID" ] || kill "$LOAD_PID" 2> /dev/null || true
    stop_server
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# run NAME N PORT: load the server already started on PORT with N clients, then stop it. The load runs
# in the background so that a signal reaches the trap at once (bash defers traps while a foreground
# child runs).
run() {
    echo "## N=$2 $1" >&2
    timeout "$LIMIT" "$PYTHON" "$HERE/serve_load.py" "$EXPORT" --url "http://127.0.0.1:$3" --clients "$2" \
        --requests-per-client "$REQUESTS" --prompt-tokens "$PROMPT_TOKENS" --new-tokens "$NEW_TOKENS" \
        --json "$RESULTS/$1-$2.json" > "$RESULTS/$1-$2.out" 2>&1 &
    LOAD_PID=$!
    wait "$LOAD_PID" || echo "$1 N=$2 failed: see $RESULTS/$1-$2.out" >&2
    LOAD_PID=
    stop_server
}

for n in ${CLIENTS//,/ }; do
    port=$(free_port)
    "$WORK/llama.cpp/build/bin/llama-server" -m "$WORK/model-Q4_0.gguf" -np "$n" -c $((n * 512)) -t "$THREADS" \
        --host 127.0.0.1 --port "$port" > "$RESULTS/llama-server-$n.log" 2>&1 &
    SERVER_PID=$!
    run llama-server "$n" "$port"

    port=$(free_port)
    "$PYTHON" -m phi_onnx serve "$EXPORT" --host 127.0.0.1 --port "$port" --max-batch 16 --threads "$THREADS" \
        --max-context $((PROMPT_TOKENS + NEW_TOKENS + 16)) > "$RESULTS/phi-onnx-$n.log" 2>&1 &
    SERVER_PID=$!
    run phi-onnx "$n" "$port"
done

"$PYTHON" - "$RESULTS" "$CLIENTS" "$NEW_TOKENS" <<'PY'
import json, os, sys
results, clients, new_tokens = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
print("| N | runner | output tok/s | vs llama-server | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | tokens/request |")
print("|---|---|---|---|---|---|---|---|")
for n in clients:
    base = None
    for runner in ("llama-server", "phi-onnx"):
        path = f"{results}/{runner}-{n}.json"
        if not os.path.exists(path):
            print(f"| {n} | {runner} | failed | | | | | |")
            continue
        r = json.load(open(path))["levels"][0]
        base = r["output_tok_s"] if runner == "llama-server" else base
        ratio = f"{r['output_tok_s'] / base:.2f}x" if base and runner != "llama-server" else ""
        per_request = r["output_tokens"] / r["requests"]
        check = "" if per_request == new_tokens else " (!)"
        print(f"| {n} | {runner} | {r['output_tok_s']} | {ratio} | {r['req_s']} | {r['ttft_p50_ms']} / "
              f"{r['ttft_p99_ms']} | {r['itl_p50_ms']} / {r['itl_p99_ms']} | {per_request:g}{check} |")
PY
