"""LoRA adapters made by peft: merged at export, or switchable beside the base (one run, rows may differ)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import make_adapter, prompt_then_decode, random_ids, save_tiny_checkpoint

from phi_onnx.errors import PhiOnnxError
from phi_onnx.export import ExportOptions, export

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

TOL = 1e-4  # tests/export/test_parity.py's
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def peft_model(checkpoint: Path, adapter: Path) -> Any:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return peft.PeftModel.from_pretrained(base, adapter).eval()


def peft_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def peft_greedy(model: Any, ids: list[int], new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def phi3(make_checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The phi3-gqa checkpoint and two adapters: all projections r=4; rslora r=8 on o/down of layer 1 only."""
    checkpoint = make_checkpoint("phi3-gqa")
    root = tmp_path_factory.mktemp("lora")
    a1 = make_adapter(checkpoint, root / "a1", 1, r=4, lora_alpha=8, target_modules=PHI3_TARGETS)
    a2 = make_adapter(checkpoint, root / "a2", 2, r=8, lora_alpha=4, use_rslora=True,
                      target_modules=["o_proj", "down_proj"], layers_to_transform=[1])
    return {"checkpoint": checkpoint, "a1": a1, "a2": a2, "root": root}


@pytest.fixture(scope="module")
def switchable(phi3: dict[str, Any]) -> Path:
    out = phi3["root"] / "switchable"
    export(phi3["checkpoint"], out, ExportOptions(precision="fp32", adapters=(("a1", str(phi3["a1"])),
                                                                              ("a2", str(phi3["a2"])))))
    return out


def test_merged_export_matches_peft_and_records_the_adapter(phi3):
    out = phi3["root"] / "merged"
    export(phi3["checkpoint"], out, ExportOptions(precision="fp32", merge_adapter=str(phi3["a1"])))
    reference = peft_model(phi3["checkpoint"], phi3["a1"])
    ids = random_ids(24, seed=3)
    got = prompt_then_decode(out, ids, 16)
    expected = peft_logits(reference, ids)
    assert np.abs(got - expected).max() <= TOL
    with reference.disable_adapter():
        assert np.abs(peft_logits(reference, ids) - expected).max() > 0.1  # the adapter changes the output
    import phi_onnx

    prompt = ids[0, :10].tolist()
    with phi_onnx.load(out, backend="ort") as model:
        assert model.generate(prompt, max_new_tokens=8, min_new_tokens=8).token_ids == \
            peft_greedy(reference, prompt, 8)
    manifest = json.loads((out / "phi_onnx.json").read_text())
    from phi_onnx.source.checkpoint import file_sha256

    assert manifest["merged_adapter"]["sha256"] == file_sha256(phi3["a1"] / "adapter_model.safetensors")
    assert manifest["options"]["merge_adapter"] == str(phi3["a1"])
    assert not (out / "adapters.json").exists()


def test_switchable_export_matches_peft_for_each_adapter_and_the_base(phi3, switchable):
    import phi_onnx

    assert {p.name for p in switchable.glob("*.onnx_adapter")} == {"a1.onnx_adapter", "a2.onnx_adapter"}
    ids = random_ids(12, seed=5)
    prompt = ids[0].tolist()
    with phi_onnx.load(switchable, backend="ort") as model:
        assert model.adapters == ("a1", "a2")
        for name in ("a1", "a2", None):
            reference = peft_model(phi3["checkpoint"], phi3[name or "a1"])
            if name is None:
                with reference.disable_adapter():
                    expected, tokens = peft_logits(reference, ids), peft_greedy(reference, prompt, 8)
            else:
                expected, tokens = peft_logits(reference, ids), peft_greedy(reference, prompt, 8)
            logits, _ = model.engine.start([prompt], 64, adapter=name)
            assert np.abs(logits[0] - expected[0, -1]).max() <= TOL, name
            assert model.generate(prompt, adapter=name, max_new_tokens=8, min_new_tokens=8).token_ids == tokens
        # The plain base graph (no LoRA inputs bound: their zero-rank defaults) is the base model.
        with reference.disable_adapter():
            assert np.abs(prompt_then_decode(switchable, ids, 8) - peft_logits(reference, ids)).max() <= TOL


def test_mixed_batch_through_the_scheduler_gives_each_request_its_solo_tokens(switchable, monkeypatch):
    import phi_onnx
    from phi_onnx.runtime.lora import LoraBank
    from phi_onnx.runtime.scheduler import Scheduler

    runs: list[tuple[Any, ...]] = []
    bind = LoraBank.bind
    monkeypatch.setattr(LoraBank, "bind", lambda self, binding, rows: (runs.append(tuple(rows)),
                                                                       bind(self, binding, rows))[1])

    with phi_onnx.load(switchable, backend="ort") as model:
        jobs = [(random_ids(n, seed=10 + i).ravel().tolist(), new, adapter)
                for i, (n, new, adapter) in enumerate([(7, 12, None), (20, 9, "a1"), (5, 14, "a2"), (13, 10, "a1"),
                                                      (9, 11, None), (17, 8, "a2")])]
        solo = [model.generate(p, adapter=a, max_new_tokens=n, min_new_tokens=n).token_ids for p, n, a in jobs]
        assert len({tuple(s) for s in solo}) == len(solo)
        scheduler = Scheduler(model, max_batch=4, max_queue=8, chunk=16)
        handles = []
        for i, (prompt, new, adapter) in enumerate(jobs):
            handles.append(scheduler.submit(prompt, model.options(max_new_tokens=new, min_new_tokens=new,
                                                                  adapter=adapter)))
            for _ in range(i % 2):
                scheduler.step()
        for _ in range(300):
            if all(h.finish for h in handles):
                break
            scheduler.step()
        assert [h.generated for h in handles] == solo
        assert any({None, "a1", "a2"} <= set(rows) for rows in runs)  # the base and both adapters in one run
        with pytest.raises(PhiOnnxError, match="no adapter 'nope'"):
            scheduler.submit([1, 2, 3], model.options(max_new_tokens=2).__class__(adapter="nope"))
        # Prefix reuse keys on the adapter: the same prompt again under another adapter reuses nothing
        # (its keys and values differ) and still gets its solo tokens; under the same adapter it reuses.
        scheduler.close()
        scheduler = Scheduler(model, max_batch=2, max_queue=8, chunk=16)
        prompt, new, _ = jobs[1]
        for adapter, reused in (("a1", False), ("a2", False), ("a1", True), (None, False)):
            handle = scheduler.submit(prompt, model.options(max_new_tokens=new, min_new_tokens=new, adapter=adapter))
            for _ in range(300):
                if handle.finish:
                    break
                scheduler.step()
            assert handle.generated == model.generate(prompt, adapter=adapter, max_new_tokens=new,
                                                      min_new_tokens=new).token_ids
            assert (handle.finish.cached_tokens > 0) == reused, adapter
        scheduler.close()


def test_onnxruntime_genai_runs_the_adapter_files(switchable):
    pytest.importorskip("onnxruntime_genai")
    import phi_onnx

    prompt = random_ids(9, seed=8).ravel().tolist()
    with phi_onnx.load(switchable, backend="ort") as ort_model, phi_onnx.load(switchable, backend="genai") as genai:
        assert genai.backend == "genai"
        for name in ("a1", "a2", None, "a1"):
            expected = ort_model.generate(prompt, adapter=name, max_new_tokens=10, min_new_tokens=10).token_ids
            assert genai.generate(prompt, adapter=name, max_new_tokens=10, min_new_tokens=10).token_ids == expected


def test_int4_base_with_an_adapter_runs_and_differs_from_the_base(phi3):
    import phi_onnx

    out = phi3["root"] / "int4"
    export(phi3["checkpoint"], out, ExportOptions(precision="int4", adapters=(("a1", str(phi3["a1"])),)))
    prompt = random_ids(10, seed=4).ravel().tolist()
    with phi_onnx.load(out, backend="ort") as model:
        base = model.engine.start([prompt], 32)[0]
        adapted = model.engine.start([prompt], 32, adapter="a1")[0]
        assert np.isfinite(adapted).all() and np.abs(adapted - base).max() > 0.1
        assert model.generate(prompt, adapter="a1", max_new_tokens=6).new_tokens == 6


def test_gptq_int4_with_switchable_and_merged_adapters(phi3):
    """GPTQ's calibration graphs are built by the family code too; they run without the LoRA branch."""
    import phi_onnx

    prompt = random_ids(10, seed=6).ravel().tolist()
    tokens = {}
    for kind, extra in (("switch", {"adapters": (("a1", str(phi3["a1"])),)}),
                        ("merged", {"merge_adapter": str(phi3["a1"])})):
        out = phi3["root"] / f"gptq-{kind}"
        export(phi3["checkpoint"], out, ExportOptions(precision="int4", algo="gptq", calibration_tokens=256, **extra))
        with phi_onnx.load(out, backend="ort") as model:
            tokens[kind] = model.generate(prompt, adapter="a1" if kind == "switch" else None, max_new_tokens=6,
                                          min_new_tokens=6).token_ids
    assert len(tokens["switch"]) == len(tokens["merged"]) == 6


def test_phi2_unfused_qkv_dense_and_mlp_merged_and_switchable(tmp_path, tokenizer_dir):
    """Phi-2 adapts q_proj/k_proj/v_proj (packed into one projection here), dense, fc1 and fc2."""
    from transformers import PhiConfig, PhiForCausalLM

    import phi_onnx

    torch.manual_seed(0)
    config = PhiConfig(vocab_size=1040, hidden_size=160, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=384, partial_rotary_factor=0.4, max_position_embeddings=2048,
                       bos_token_id=1, eos_token_id=3, pad_token_id=3)
    checkpoint = save_tiny_checkpoint(PhiForCausalLM(config).eval(), tmp_path / "phi2", tokenizer_dir,
                                      eos=("<|endoftext|>",))
    adapter = make_adapter(checkpoint, tmp_path / "ad", 3, r=4, lora_alpha=16,
                           target_modules=["q_proj", "v_proj", "dense", "fc1", "fc2"])
    reference = peft_model(checkpoint, adapter)
    ids = random_ids(14, seed=2)
    expected = peft_logits(reference, ids)
    export(checkpoint, tmp_path / "merged", ExportOptions(precision="fp32", merge_adapter=str(adapter)))
    assert np.abs(prompt_then_decode(tmp_path / "merged", ids, 10) - expected).max() <= TOL
    export(checkpoint, tmp_path / "switch", ExportOptions(precision="fp32", adapters=(("x", str(adapter)),)))
    with phi_onnx.load(tmp_path / "switch", backend="ort") as model:
        logits, _ = model.engine.start([ids[0].tolist()], 32, adapter="x")
    assert np.abs(logits[0] - expected[0, -1]).max() <= TOL


# -- errors: exit 2, the message, nothing written --------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-m", "phi_onnx", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def assert_refused(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_wrong_shaped_missing_and_unsupported_adapters_are_refused(phi3, make_checkpoint, tmp_path):
    other = make_adapter(make_checkpoint("phi4mini"), tmp_path / "other", 4, r=2, lora_alpha=2,
                         target_modules=["o_proj"])
    out = tmp_path / "out"
    assert_refused(run_cli("export", str(phi3["checkpoint"]), "-o", str(out), "--precision", "fp32",
                           "--merge-adapter", str(other)),
                   "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight", "model.layers.0.self_attn.o_proj")
    assert not out.exists()
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "adapter_config.json").write_text((phi3["a1"] / "adapter_config.json").read_text())
    assert_refused(run_cli("export", str(phi3["checkpoint"]), "-o", str(out), "--adapter", f"m={missing}"),
                   "has no adapter_model.safetensors")
    assert_refused(run_cli("export", str(phi3["checkpoint"]), "-o", str(out), "--adapter", f"m={tmp_path}/nowhere"),
                   "does not exist")
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["o_proj"]}))
    (ia3 / "adapter_model.safetensors").write_bytes((phi3["a1"] / "adapter_model.safetensors").read_bytes())
    assert_refused(run_cli("export", str(phi3["checkpoint"]), "-o", str(out), "--merge-adapter", str(ia3)),
                   "PEFT type 'IA3' is not supported")
    dora = make_adapter(phi3["checkpoint"], tmp_path / "dora", 5, r=2, lora_alpha=2, use_dora=True,
                        target_modules=["o_proj"])
    assert_refused(run_cli("export", str(phi3["checkpoint"]), "-o", str(out), "--adapter", f"d={dora}"),
                   "DoRA (use_dora=true) is not supported")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


@pytest.mark.slow  # a dozen CLI subprocesses
def test_adapter_add_list_rm(phi3, switchable, tmp_path, make_checkpoint):
    import shutil

    import phi_onnx

    folder = tmp_path / "copy"
    shutil.copytree(switchable, folder)
    before = sorted((p.name, p.read_bytes()) for p in folder.iterdir())
    other = make_adapter(make_checkpoint("phi4mini"), tmp_path / "other", 4, r=2, lora_alpha=2,
                         target_modules=["o_proj"])
    assert_refused(run_cli("adapter", "add", str(folder), f"bad={other}"), "o_proj")
    assert_refused(run_cli("adapter", "add", str(folder), f"a1={phi3['a2']}"), "already has an adapter 'a1'")
    (folder / "mine.onnx_adapter").write_text("not ours")
    assert_refused(run_cli("adapter", "add", str(folder), f"mine={phi3['a2']}"), "does not replace files")
    (folder / "mine.onnx_adapter").unlink()
    assert sorted((p.name, p.read_bytes()) for p in folder.iterdir()) == before  # refusals changed nothing

    added = run_cli("adapter", "add", str(folder), f"late={phi3['a2']}")
    assert added.returncode == 0, added.stderr
    listed = run_cli("adapter", "list", str(folder), "--json")
    assert sorted(json.loads(listed.stdout)) == ["a1", "a2", "late"]
    manifest = json.loads((folder / "phi_onnx.json").read_text())
    assert "late.onnx_adapter" in manifest["files"]
    prompt = random_ids(8, seed=1).ravel().tolist()
    with phi_onnx.load(folder, backend="ort") as model:
        assert model.generate(prompt, adapter="late", max_new_tokens=6).token_ids == \
            model.generate(prompt, adapter="a2", max_new_tokens=6).token_ids
    generated = run_cli("generate", str(folder), "hello", "--adapter", "nope", "--max-new-tokens", "2")
    assert_refused(generated, "no adapter 'nope'")
    removed = run_cli("adapter", "rm", str(folder), "late")
    assert removed.returncode == 0, removed.stderr
    assert not (folder / "late.onnx_adapter").exists()
    assert "late.onnx_adapter" not in json.loads((folder / "phi_onnx.json").read_text())["files"]
    assert_refused(run_cli("adapter", "rm", str(folder), "late"), "has no adapter 'late'")
    plain = tmp_path / "plain"
    export(phi3["checkpoint"], plain, ExportOptions(precision="fp32"))
    assert_refused(run_cli("adapter", "add", str(plain), f"x={phi3['a1']}"), "has no LoRA inputs")


def test_a_bound_on_loaded_adapters_drops_the_least_recently_used(switchable):
    import phi_onnx

    with phi_onnx.load(switchable, backend="ort") as model:
        prompt = random_ids(9, seed=3).ravel().tolist()
        expected = {a: model.generate(prompt, adapter=a, max_new_tokens=6, min_new_tokens=6).token_ids
                    for a in ("a1", "a2")}
        bank = model.core.lora
        assert bank is not None and set(bank.loaded) == {"a1", "a2"}
        bank.max_loaded = 1
        for adapter in ("a1", "a2", "a1"):
            model.engine.forget()
            assert model.generate(prompt, adapter=adapter, max_new_tokens=6, min_new_tokens=6).token_ids == \
                expected[adapter]
            assert bank.loaded[-1] == adapter and len(bank.loaded) == 1


def test_the_server_selects_adapters_by_model_and_lists_them(switchable):
    """`model` picks the base or an adapter; concurrent requests for different ones each get their solo tokens."""
    import concurrent.futures

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    import phi_onnx
    from phi_onnx.serve import create_app

    sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))
    from serve_helpers import LiveServer

    with phi_onnx.load(switchable, backend="ort") as model:
        prompt = random_ids(11, seed=21).ravel().tolist()
        solo = {a: model.generate(prompt, adapter=a, max_new_tokens=8, min_new_tokens=8).token_ids
                for a in (None, "a1", "a2")}
        app = create_app(model, max_batch=3, capacity=128, model_name="base", max_adapters=1)
        with LiveServer(app) as server:
            listed = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]
            assert [m["id"] for m in listed] == ["base", "a1", "a2"]
            assert listed[1]["parent"] == "base" and "parent" not in listed[0]

            def ask(name: str) -> list[int]:
                body = {"model": name, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                        "return_token_ids": True}
                reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
                assert reply.status_code == 200, reply.text
                return reply.json()["choices"][0]["token_ids"]

            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                names = ["base", "a1", "a2", "a2", "a1", "base"]
                got = list(pool.map(ask, names))
            assert got == [solo[None if n == "base" else n] for n in names]
            assert model.core.lora is not None and len(model.core.lora.loaded) <= 1  # --max-adapters 1
            missing = httpx.post(f"{server.url}/v1/completions", json={"model": "a3", "prompt": "x"}, timeout=30)
            assert missing.status_code == 404 and "a1" in missing.json()["error"]["message"]
