"""Damaged genai_config.json files: each loads and generates, or is a PhiOnnxError naming the key.

onnxruntime-genai trusts genai_config.json: before phi-onnx checked it, a wrong head size allocated
terabytes, a `%s` in a name template or `num_beams: 4` crashed the process (SIGSEGV), and 10 of 40
mutations ended in a raw RuntimeError or MemoryError. The cases run in one worker process (this file run
as a script), so a crash or a hang fails the test instead of killing pytest: the worker runs each case
on both backends under an address-space limit and reports one JSON line per case; the test bounds each
case's time, the worker's peak memory, and checks every refusal names what is wrong.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

DELETE = {"__delete__": True}
#: Bounds the worker runs under and the test asserts: a case that hangs or allocates for a model that
#: does not exist fails here, not on the machine.
CASE_SECONDS = 20
ADDRESS_SPACE = 8 << 30
PEAK_RSS_MB = 1500


def table(base: dict[str, Any]) -> list[tuple[str, list[str], Any, str]]:
    """(name, key path, new value, expected) for the phi3-gqa export's config `base`; `expected` is "ok"
    (loads and generates) or the fragments the refusal must name, separated by "|"."""
    model, decoder = base["model"], base["model"]["decoder"]
    vocab, layers = model["vocab_size"], decoder["num_hidden_layers"]
    kv, head = decoder["num_key_value_heads"], decoder["head_size"]
    context = model["context_length"]
    m, d, s, so = ["model"], ["model", "decoder"], ["search"], ["model", "decoder", "session_options"]
    return [
        ("unchanged", [], None, "ok"),
        ("eos beyond vocab", [*m, "eos_token_id"], [5000], "model.eos_token_id is [5000]|0 to"),
        ("eos one id beyond vocab", [*m, "eos_token_id"], vocab, f"eos_token_id is {vocab}"),
        ("eos negative", [*m, "eos_token_id"], -1, "eos_token_id is -1"),
        ("eos string", [*m, "eos_token_id"], "3", "eos_token_id is '3'"),
        ("eos null", [*m, "eos_token_id"], None, "eos_token_id is None"),
        ("eos bool", [*m, "eos_token_id"], True, "eos_token_id is True"),
        ("eos over int64", [*m, "eos_token_id"], 2**63, "eos_token_id is 9223372036854775808"),
        ("eos float", [*m, "eos_token_id"], 1.5, "eos_token_id is 1.5"),
        ("eos empty list", [*m, "eos_token_id"], [], "ok"),  # generation_config.json still names them
        ("bos beyond vocab", [*m, "bos_token_id"], 10**9, "bos_token_id is 1000000000"),
        ("bos null", [*m, "bos_token_id"], None, "bos_token_id is None"),
        ("bos removed", [*m, "bos_token_id"], DELETE, "ok"),
        ("pad list", [*m, "pad_token_id"], [3, 4], "pad_token_id is [3, 4]"),
        ("pad negative", [*m, "pad_token_id"], -7, "pad_token_id is -7"),
        ("context null", [*m, "context_length"], None, "context_length is None|positive"),
        ("context huge", [*m, "context_length"], 2**40, "context_length is 1099511627776|at most"),
        ("context string", [*m, "context_length"], "4096", "context_length is '4096'"),
        ("context fraction", [*m, "context_length"], 4096.5, "context_length is 4096.5"),
        ("context as float", [*m, "context_length"], float(context), "ok"),
        ("context bool", [*m, "context_length"], True, "context_length is True"),
        ("context below max_length", [*m, "context_length"], 8, "search.max_length is|model.context_length"),
        ("context removed", [*m, "context_length"], DELETE, "lacks the required field model.context_length"),
        ("vocab huge", [*m, "vocab_size"], 2**40, "vocab_size is 1099511627776"),
        ("vocab unlike graph", [*m, "vocab_size"], vocab * 2, f"model.onnx has {vocab}"),
        ("vocab zero", [*m, "vocab_size"], 0, "vocab_size is 0"),
        ("vocab string", [*m, "vocab_size"], str(vocab), f"vocab_size is '{vocab}'"),
        ("type unknown", [*m, "type"], "gpt2", "model.type is 'gpt2'|phi3"),
        ("type null", [*m, "type"], None, "model.type is None"),
        ("model a list", ["model"], [], "model is []|object"),
        ("model removed", ["model"], DELETE, 'lacks the required "model" section'),
        ("decoder null", [*d], None, "model.decoder is None"),
        ("head size huge", [*d, "head_size"], 2**31, "head_size is 2147483648"),
        ("head size a million", [*d, "head_size"], 10**6, "head_size is 1000000"),
        ("head size unlike graph", [*d, "head_size"], head * 2, f"model.onnx has {head}"),
        ("head size as float", [*d, "head_size"], float(head), "ok"),
        ("kv heads a million", [*d, "num_key_value_heads"], 10**6, "num_key_value_heads is 1000000"),
        ("kv heads unlike graph", [*d, "num_key_value_heads"], kv * 2, f"model.onnx has {kv}"),
        ("kv heads null", [*d, "num_key_value_heads"], None, "num_key_value_heads is None"),
        ("heads not a multiple", [*d, "num_attention_heads"], kv * 2 + 1, "multiple of"),
        ("heads zero", [*d, "num_attention_heads"], 0, "num_attention_heads is 0"),
        ("layers a million", [*d, "num_hidden_layers"], 10**6, "num_hidden_layers is 1000000"),
        ("layers more than graph", [*d, "num_hidden_layers"], layers + 1, f"model.onnx has {layers}"),
        ("layers fewer than graph", [*d, "num_hidden_layers"], layers - 1, f"model.onnx has {layers}"),
        ("hidden size huge", [*d, "hidden_size"], 10**9, "hidden_size is 1000000000"),
        ("hidden size removed", [*d, "hidden_size"], DELETE, "lacks the required field model.decoder.hidden_size"),
        ("filename elsewhere", [*d, "filename"], "../model.onnx", "filename is '../model.onnx'"),
        ("filename absolute", [*d, "filename"], "/etc/passwd", "filename is '/etc/passwd'"),
        ("filename number", [*d, "filename"], 5, "filename is 5"),
        ("inputs null", [*d, "inputs"], None, "model.decoder.inputs is None"),
        ("inputs empty", [*d, "inputs"], {}, "ok"),
        ("input name unknown", [*d, "inputs", "input_ids"], "nope", "model.onnx has no input 'nope'"),
        ("output name unknown", [*d, "outputs", "logits"], "nope", "model.onnx has no output 'nope'"),
        ("template %s", [*d, "outputs", "present_key_names"], "present.%s.key", "one %d"),
        ("template %n", [*d, "inputs", "past_key_names"], "%d%d%n", "one %d"),
        ("template off by name", [*d, "inputs", "past_value_names"], "past.%d.value", "no input 'past.0.value'"),
        ("session a list", [*so[:-1], "session_options"], [], "session_options is []"),
        ("threads a million", [*so, "intra_op_num_threads"], 10**6, "intra_op_num_threads is 1000000|CPU core"),
        ("threads 2**40", [*so, "intra_op_num_threads"], 2**40, "intra_op_num_threads is 1099511627776"),
        ("inter threads a million", [*so, "inter_op_num_threads"], 10**6, "inter_op_num_threads is 1000000"),
        ("threads a word", [*so, "intra_op_num_threads"], "four", "intra_op_num_threads is 'four'"),
        ("log id number", [*so, "log_id"], 5, "log_id is 5"),
        ("provider options string", [*so, "provider_options"], "x", "provider_options is 'x'"),
        ("unknown session key", [*so, "zz_unknown"], 1, "onnxruntime-genai could not load|ok"),
        ("search null", ["search"], None, "search is None"),
        ("search empty", ["search"], {}, "ok"),
        ("max_length null", [*s, "max_length"], None, "search.max_length is None"),
        ("max_length zero", [*s, "max_length"], 0, "search.max_length is 0"),
        ("max_length huge", [*s, "max_length"], 2**40, "search.max_length is 1099511627776"),
        ("max_length past context", [*s, "max_length"], context * 2, "model.context_length"),
        ("max_length one", [*s, "max_length"], 1, "ok"),
        ("min_length past max", [*s, "min_length"], 10**9, "search.min_length is 1000000000"),
        ("num_beams 4", [*s, "num_beams"], 4, "search.num_beams is 4|must be 1"),
        ("num_beams a million", [*s, "num_beams"], 10**6, "search.num_beams is 1000000"),
        ("num_beams zero", [*s, "num_beams"], 0, "search.num_beams is 0"),
        ("return sequences", [*s, "num_return_sequences"], 10**6, "num_return_sequences is 1000000"),
        ("batch size a million", [*s, "batch_size"], 10**6, "batch_size is 1000000"),
        ("top_k negative", [*s, "top_k"], -1, "search.top_k is -1"),
        ("do_sample string", [*s, "do_sample"], "yes", "do_sample is 'yes'"),
        ("do_sample true", [*s, "do_sample"], True, "ok"),
        ("temperature NaN", [*s, "temperature"], float("nan"), "temperature is nan"),
        ("top_p infinite", [*s, "top_p"], float("inf"), "top_p is inf"),
        ("share buffer string", [*s, "past_present_share_buffer"], "x", "past_present_share_buffer is 'x'"),
        ("unknown search key", [*s, "zz_unknown"], 1, "onnxruntime-genai could not load|ok"),
        ("whole file a list", [], [], "does not hold a JSON object"),
        ("whole file empty object", [], {}, 'lacks the required "model" section'),
    ]


RAW = [  # damaged bytes rather than damaged values
    ("truncated", lambda text: text[: len(text) // 2], "is not valid JSON"),
    ("not UTF-8", lambda text: "\udcff".join([text[:10], text[10:]]).encode("utf-8", "surrogateescape"),
     "is not valid JSON"),
    ("number of 5000 digits", lambda text: text.replace('"vocab_size": ', '"vocab_size": ' + "9" * 5000, 1),
     "is not JSON phi-onnx can read|digits"),
    ("nested 100k deep", lambda text: text.replace('"search": ', '"search": ' + "[" * 100_000 + "]" * 100_000
                                                   + ', "x": ', 1),
     "is not JSON phi-onnx can read|recursion"),
    ("empty file", lambda text: "", "is not valid JSON"),
]

HOSTILE = [None, True, False, -1, 0, 1, 2**31, 2**63, 10**30, -(2**63), 0.5, 1e308, float("nan"), float("-inf"), "",
           "%s%n", "x" * 10_000, [], [1, 2], [None], {}, {"a": 1}]


def random_cases(base: dict[str, Any], count: int, seed: int = 18) -> list[tuple[str, list[str], Any, str]]:
    """`count` mutations of random leaves of `base` to hostile values (seeded: the same each run)."""
    leaves: list[list[str]] = []

    def walk(node: Any, path: list[str]) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, [*path, key])
        if path:
            leaves.append(path)

    walk(base, [])
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        path = rng.choice(leaves)
        value = rng.choice(HOSTILE)
        cases.append((f"random {i}: {'.'.join(path)} = {value!r:.30}", path, value, "ok|refused"))
    return cases


def mutated(base: dict[str, Any], path: list[str], value: Any) -> Any:
    data = copy.deepcopy(base)
    if not path:
        return data if value is None else value
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


def run_worker(source: Path, work: Path, cases: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    """Run the cases in a fresh process; returns its report lines (the last one names the case it was on
    if it crashed or hung)."""
    spec = work / "cases.json"
    spec.write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                                                     os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, __file__, str(source), str(work), str(spec)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        lines = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        started = [json.loads(line) for line in lines.splitlines() if line.startswith("{")]
        pytest.fail(f"the worker hung on {started[-1] if started else 'its first case'}")
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, (f"the worker died (rc {done.returncode}) after {reports[-1:]}: "
                                  f"{done.stderr[-2000:]}")
    return reports


@pytest.fixture(scope="module")
def source(make_export) -> Path:
    return make_export("phi3-gqa")


def test_every_damaged_genai_config_loads_or_is_refused(source, tmp_path):
    base = json.loads((source / "genai_config.json").read_text())
    named = table(base)
    randomised = random_cases(base, 40)
    cases = [{"name": name, "config": mutated(base, path, value), "expect": expect}
             for name, path, value, expect in named + randomised]
    text = (source / "genai_config.json").read_text()
    for name, damage, expect in RAW:
        raw = damage(text)
        cases.append({"name": name, "raw": raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw,
                      "bytes": isinstance(raw, bytes), "expect": expect})
    assert len(named) + len(RAW) >= 40 and len(randomised) == 40
    started = time.monotonic()
    reports = run_worker(source, tmp_path, cases, timeout=CASE_SECONDS * 10 + 2 * len(cases))
    results = [r for r in reports if "outcome" in r]
    assert {(r["name"], r["backend"]) for r in results} == {(c["name"], b) for c in cases for b in ("ort", "genai")}
    wrong = [r for r in results if r["outcome"] not in ("ok", "refused")]
    assert not wrong, wrong  # every exception is a PhiOnnxError
    slow = [r for r in results if r["seconds"] > CASE_SECONDS]
    assert not slow, slow
    assert reports[-1]["peak_rss_mb"] < PEAK_RSS_MB, reports[-1]  # no case allocated for a giant model
    by_name = {c["name"]: c for c in cases}
    for report in results:
        expect = by_name[report["name"]]["expect"]
        if expect == "ok|refused":  # random: either is right, a refusal must still name the file
            assert report["outcome"] == "ok" or "genai_config.json" in report["message"], report
        elif expect == "ok":
            assert report["outcome"] == "ok", report
        elif expect.endswith("|ok"):  # an unknown key: the ort backend ignores it, onnxruntime-genai refuses it
            assert report["outcome"] == "ok" or expect.split("|")[0] in report["message"], report
        else:
            assert report["outcome"] == "refused", report
            assert all(fragment in report["message"] for fragment in expect.split("|")), report
            assert report["hint"] and report["type"] == "ModelFolderError", report
    refused = sum(r["outcome"] == "refused" for r in results)
    print(f"{len(cases)} mutations x 2 backends: {refused} refused, {len(results) - refused} ran; "
          f"{time.monotonic() - started:.1f} s, peak RSS {reports[-1]['peak_rss_mb']} MB")


# -- the worker ------------------------------------------------------------------------------------
def _worker(source: Path, work: Path, spec: Path) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    import phi_onnx
    from phi_onnx.errors import PhiOnnxError

    def emit(**fields: Any) -> None:
        print(json.dumps(fields), flush=True)

    for i, case in enumerate(json.loads(spec.read_text())):
        folder = work / f"case-{i}"
        folder.mkdir()
        for item in source.iterdir():
            if item.name != "genai_config.json":
                (folder / item.name).symlink_to(item)
        if "raw" in case:
            raw = case["raw"].encode("utf-8", "surrogateescape") if case["bytes"] else case["raw"].encode()
            (folder / "genai_config.json").write_bytes(raw)
        else:
            (folder / "genai_config.json").write_text(json.dumps(case["config"]))
        for backend in ("ort", "genai"):
            emit(started=case["name"], backend=backend)
            began = time.monotonic()
            try:
                with phi_onnx.load(folder, device="cpu", backend=backend) as model:
                    result = model.generate("hello", max_new_tokens=3)
                    assert result.token_ids, "no token"
                outcome, kind, message, hint = "ok", "", "", ""
            except PhiOnnxError as error:
                outcome, kind, message, hint = "refused", type(error).__name__, error.message, error.hint or ""
            except BaseException as error:  # what the test exists to catch: any other exception
                outcome, kind, message, hint = "other", type(error).__name__, str(error)[:500], ""
            emit(name=case["name"], backend=backend, outcome=outcome, type=kind, message=message[:600], hint=hint,
                 seconds=round(time.monotonic() - began, 3))
    # VmHWM, not getrusage's ru_maxrss: that one keeps the forking parent's high-water mark across exec
    # (an xdist worker holding many models reported 1.8 GB here while this process used 0.4 GB).
    with open("/proc/self/status") as status:
        hwm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    emit(peak_rss_mb=hwm_kb // 1024)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
