"""LoRA adapters on Phi-3-small and Phi-3.5-MoE: merged (attention, MLP, experts, router) and switchable.

Neither family's hub layout can be adapted by peft on a transformers model: Phi-3-small has no
transformers implementation (remote code), and transformers 5 fuses Phi-3.5-MoE's experts into
stacked parameters (peft silently skips `w1`/`w2`/`w3` there). Their adapters come from the hub's
remote code, whose modules carry the checkpoint's names, so peft is run on a stand-in with exactly
those `nn.Linear` modules (`hub_modules`), holding the checkpoint's weights. The reference is peft's
own merge (`merge_and_unload`) run through tests/export/phi3small_reference.py or transformers'
PhimoeForCausalLM; attention-only adapters are also made by peft on PhimoeForCausalLM itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import prompt_then_decode, random_ids, save_tiny_checkpoint

from phi_onnx.export import ExportOptions, export

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

TOL = 1e-4  # tests/export/test_parity.py's
SMALL_TARGETS = ["query_key_value", "dense", "up_proj", "down_proj"]
MOE_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MOE_EXPERTS = ["w1", "w2", "w3"]


def hub_modules(weights: dict[str, Any], names: list[str]) -> Any:
    """An `nn.Module` tree with an `nn.Linear` (no bias) at each `<name>.weight` of `weights`, holding it."""
    root = torch.nn.Module()
    for name in names:
        parent = root
        *path, leaf = name.removesuffix(".weight").split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        out, inp = weights[name].shape
        linear = torch.nn.Linear(inp, out, bias=False)
        linear.weight.data.copy_(torch.as_tensor(np.asarray(weights[name]), dtype=torch.float32))
        parent.add_module(leaf, linear)
    return root


def adapt(weights: dict[str, Any], names: list[str], folder: Path, seed: int,
          **config: Any) -> dict[str, np.ndarray]:
    """Save a peft LoRA adapter (random, non-zero A and B) on the hub modules `names` to `folder`; returns
    the merged weights peft computes for them ({name: W + scale * B @ A})."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(hub_modules(weights, names), peft.LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(folder)
    merged = model.merge_and_unload().state_dict()
    return {name: merged[name].detach().numpy().copy() for name in names}


def read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(folder / "model.safetensors")


def adapter_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(folder / "adapter_model.safetensors", "np") as handle:
        return sorted(handle.keys())


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-m", "phi_onnx", *args], capture_output=True, text=True, env=env,
                          timeout=120)


# -- Phi-3-small --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Any]:
    """The GQA Phi-3-small test checkpoint (block-sparse and dense layers) and an adapter on its four projections."""
    from safetensors.torch import save_file
    from test_phi3small import make_config, weights_for

    root = tmp_path_factory.mktemp("lora-small")
    cfg = make_config("gqa")
    weights = weights_for(cfg, seed=7)
    checkpoint = root / "checkpoint"
    checkpoint.mkdir()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(checkpoint / "model.safetensors"))
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    for item in tokenizer_dir.iterdir():  # a tokenizer for generate (the hub's is tiktoken; not needed here)
        shutil.copy2(item, checkpoint / item.name)
    names = [n for n in weights if n.endswith(".weight") and n.rsplit(".", 2)[-2] in SMALL_TARGETS]
    merged = adapt(weights, names, root / "adapter", 11, r=4, lora_alpha=8, target_modules=SMALL_TARGETS)
    adapted = {**weights, **{k: torch.from_numpy(v) for k, v in merged.items()}}
    return {"checkpoint": checkpoint, "cfg": cfg, "weights": weights, "adapted": adapted,
            "adapter": root / "adapter", "root": root}


def small_greedy(cfg: dict[str, Any], weights: dict[str, Any], prompt: list[int], new: int) -> list[int]:
    from phi3small_reference import forward

    ids = list(prompt)
    for _ in range(new):
        ids.append(int(forward(cfg, weights, np.array([ids], dtype=np.int64))[0, -1].argmax()))
    return ids[len(prompt):]


def test_phi3small_merged_adapter_matches_the_reference(small):
    """query_key_value (rows regrouped), dense, up_proj (gegelu columns de-interleaved) and down_proj merged."""
    from phi3small_reference import forward

    import phi_onnx

    assert len(adapter_keys(small["adapter"])) == 2 * 4 * small["cfg"]["num_hidden_layers"]
    out = small["root"] / "merged"
    export(small["checkpoint"], out, ExportOptions(precision="fp32", merge_adapter=str(small["adapter"])))
    cfg = small["cfg"]
    keep = ~np.isin(np.arange(cfg["vocab_size"]), cfg["dummy_token_indices"])
    ids = random_ids(30, seed=4)
    expected = forward(cfg, small["adapted"], ids)
    got = prompt_then_decode(out, ids, 20)
    assert np.abs(got - expected)[..., keep].max() <= TOL
    assert np.abs(forward(cfg, small["weights"], ids) - expected)[..., keep].max() > 0.1  # the adapter matters
    prompt = ids[0, :12].tolist()
    with phi_onnx.load(out, backend="ort") as model:
        assert model.generate(prompt, max_new_tokens=6, min_new_tokens=6).token_ids == \
            small_greedy(cfg, small["adapted"], prompt, 6)
    manifest = json.loads((out / "phi_onnx.json").read_text())
    assert manifest["merged_adapter"]["modules"] == 4 * cfg["num_hidden_layers"]


def test_phi3small_switchable_adapter_matches_the_reference_and_the_base(small):
    from phi3small_reference import forward

    import phi_onnx

    out = small["root"] / "switch"
    export(small["checkpoint"], out, ExportOptions(precision="fp32", adapters=(("tuned", str(small["adapter"])),)))
    index = json.loads((out / "adapters.json").read_text())
    assert len(index["targets"]) == 4 * small["cfg"]["num_hidden_layers"]
    cfg = small["cfg"]
    ids = random_ids(26, seed=9)
    prompt = ids[0].tolist()
    with phi_onnx.load(out, backend="ort") as model:
        for adapter, weights in (("tuned", small["adapted"]), (None, small["weights"])):
            logits, _ = model.engine.start([prompt], 64, adapter=adapter)
            assert np.abs(logits[0] - forward(cfg, weights, ids)[0, -1]).max() <= TOL, adapter
            assert model.generate(prompt, adapter=adapter, max_new_tokens=5, min_new_tokens=5).token_ids == \
                small_greedy(cfg, weights, prompt, 5), adapter


# -- Phi-3.5-MoE --------------------------------------------------------------------------------------
#: Default rotary (transformers' Phimoe LongRoPE needs the patch in test_phimoe.py), GQA 4:2, q/k/v/o biases.
MOE_CONFIG: dict[str, Any] = {
    "vocab_size": 1040, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 96, "num_local_experts": 4, "num_experts_per_tok": 2,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "attention_bias": True, "bos_token_id": 1,
    "eos_token_id": 3, "pad_token_id": 3,
}


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Any]:
    """A tiny Phi-3.5-MoE in the hub layout, an adapter on attention, experts and router (hub module names), the
    checkpoint peft's merge of it makes, and an attention-only adapter made by peft on PhimoeForCausalLM."""
    from transformers import PhimoeConfig, PhimoeForCausalLM

    root = tmp_path_factory.mktemp("lora-moe")
    torch.manual_seed(5)
    model = PhimoeForCausalLM(PhimoeConfig(**MOE_CONFIG)).eval()
    checkpoint = save_tiny_checkpoint(model, root / "checkpoint", tokenizer_dir)
    weights = read_safetensors(checkpoint)
    targets = [*MOE_ATTENTION, *MOE_EXPERTS, "gate"]
    names = [n for n in weights if n.endswith(".weight") and n.rsplit(".", 2)[-2] in targets]
    merged = adapt(weights, names, root / "full", 12, r=4, lora_alpha=16, target_modules=targets)
    # peft's merged weights in the hub layout, loaded by transformers (which fuses the experts itself).
    reference = root / "reference"
    shutil.copytree(checkpoint, reference)
    from safetensors.numpy import save_file

    save_file({**weights, **merged}, str(reference / "model.safetensors"), metadata={"format": "pt"})
    attention = root / "attention"
    torch.manual_seed(13)
    peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, use_rslora=True,
                                               target_modules=MOE_ATTENTION)).save_pretrained(attention)
    return {"checkpoint": checkpoint, "full": root / "full", "reference": reference, "attention": attention,
            "weights": weights, "names": names, "root": root}


def transformers_model(folder: Path, adapter: Path | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return peft.PeftModel.from_pretrained(model, adapter).eval() if adapter is not None else model


def logits_of(model: Any, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def greedy(model: Any, prompt: list[int], new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_phimoe_merged_adapter_on_attention_experts_and_router_matches_transformers(moe):
    import phi_onnx

    keys = adapter_keys(moe["full"])
    assert any(".block_sparse_moe.experts.3.w2.lora_B" in k for k in keys)
    assert any(".block_sparse_moe.gate.lora_A" in k for k in keys)
    assert len(keys) == 2 * len(moe["names"])
    out = moe["root"] / "merged"
    export(moe["checkpoint"], out, ExportOptions(precision="fp32", merge_adapter=str(moe["full"])))
    reference, base = transformers_model(moe["reference"]), transformers_model(moe["checkpoint"])
    ids = random_ids(24, seed=6)
    expected = logits_of(reference, ids)
    assert np.abs(prompt_then_decode(out, ids, 16) - expected).max() <= TOL
    assert np.abs(logits_of(base, ids) - expected).max() > 0.1
    prompt = ids[0, :10].tolist()
    with phi_onnx.load(out, backend="ort") as model:
        assert model.generate(prompt, max_new_tokens=8, min_new_tokens=8).token_ids == greedy(reference, prompt, 8)
    assert json.loads((out / "phi_onnx.json").read_text())["merged_adapter"]["modules"] == len(moe["names"])


def test_phimoe_merged_adapter_only_on_experts_changes_only_the_experts(moe, tmp_path):
    """An adapter on the experts alone (int4: QMoE quantizes the merged experts) runs and differs from the base."""
    import phi_onnx

    adapter = tmp_path / "experts"
    experts = [n for n in moe["names"] if ".experts." in n]
    adapt(moe["weights"], experts, adapter, 14, r=2, lora_alpha=8, target_modules=MOE_EXPERTS)
    out, base = tmp_path / "int4", tmp_path / "int4-base"
    export(moe["checkpoint"], out, ExportOptions(precision="int4", merge_adapter=str(adapter)))
    export(moe["checkpoint"], base, ExportOptions(precision="int4"))
    prompt = random_ids(10, seed=2).ravel().tolist()
    with phi_onnx.load(out, backend="ort") as merged, phi_onnx.load(base, backend="ort") as plain:
        adapted, original = merged.engine.start([prompt], 32)[0], plain.engine.start([prompt], 32)[0]
    assert np.isfinite(adapted).all() and np.abs(adapted - original).max() > 0.05


def test_phimoe_switchable_attention_adapter_matches_peft(moe):
    import phi_onnx

    out = moe["root"] / "switch"
    export(moe["checkpoint"], out, ExportOptions(precision="fp32", adapters=(("attn", str(moe["attention"])),)))
    reference = transformers_model(moe["checkpoint"], moe["attention"])
    ids = random_ids(20, seed=8)
    prompt = ids[0].tolist()
    with phi_onnx.load(out, backend="ort") as model:
        logits, _ = model.engine.start([prompt], 64, adapter="attn")
        assert np.abs(logits[0] - logits_of(reference, ids)[0, -1]).max() <= TOL
        assert model.generate(prompt, adapter="attn", max_new_tokens=6, min_new_tokens=6).token_ids == \
            greedy(reference, prompt, 6)
        with reference.disable_adapter():
            base_logits, _ = model.engine.start([prompt], 64)
            assert np.abs(base_logits[0] - logits_of(reference, ids)[0, -1]).max() <= TOL


def test_switchable_adapter_on_moe_experts_is_refused_with_the_module_named(moe, tmp_path):
    out = tmp_path / "out"
    result = run_cli("export", str(moe["checkpoint"]), "-o", str(out), "--precision", "fp32",
                     "--adapter", f"full={moe['full']}")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in result.stderr
    assert "--merge-adapter" in result.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    hint = result.stderr.split("Switchable adapters may adapt", 1)[1].split(";", 1)[0]
    assert "self_attn.q_proj" in hint and "self_attn.o_proj" in hint  # what is switchable here
    assert "block_sparse_moe" not in hint
    # Later too: `adapter add` refuses it on an export with LoRA inputs, and leaves the export as it was.
    folder = tmp_path / "switch"
    export(moe["checkpoint"], folder, ExportOptions(precision="fp32", adapters=(("attn", str(moe["attention"])),)))
    before = sorted((p.name, p.read_bytes()) for p in folder.iterdir())
    added = run_cli("adapter", "add", str(folder), f"full={moe['full']}")
    assert added.returncode == 2 and "Traceback" not in added.stderr, added.stderr
    assert "block_sparse_moe.experts.0.w1.weight" in added.stderr and "--merge-adapter" in added.stderr
    assert sorted((p.name, p.read_bytes()) for p in folder.iterdir()) == before


def test_merged_adapter_on_a_tied_lm_head_copy_is_refused_not_dropped(small, tmp_path):
    """A tied model's head reads the embedding, so a stored `lm_head.weight` copy is never read: an adapter on
    it would vanish from the merge. The export is refused, naming it (exit 2, nothing written)."""
    from safetensors.numpy import save_file

    checkpoint = tmp_path / "tied"
    shutil.copytree(small["checkpoint"], checkpoint)
    weights = read_safetensors(checkpoint)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].copy()
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    adapter = tmp_path / "head"
    adapt(weights, ["lm_head.weight", "model.layers.0.self_attn.dense.weight"], adapter, 3, r=2, lora_alpha=2,
          target_modules=["lm_head", "dense"])
    out = tmp_path / "out"
    plain = run_cli("export", str(checkpoint), "-o", str(tmp_path / "plain"), "--precision", "fp32")
    assert plain.returncode == 0, plain.stderr  # the copy itself is fine: only adapting it is refused
    result = run_cli("export", str(checkpoint), "-o", str(out), "--precision", "fp32", "--merge-adapter", str(adapter))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "'lm_head.weight'" in result.stderr and "ties its LM head" in result.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_lora_on_transformers5_fused_moe_expert_parameters_is_refused_by_name(moe, tmp_path):
    """peft on transformers 5's PhimoeForCausalLM adapts the fused experts through `target_parameters`
    (3-D LoRA on `gate_up_proj`/`down_proj`, no hub names): refused, not merged into the wrong weights."""
    from phi_onnx.source.adapter import AdapterError

    adapter = tmp_path / "fused"
    torch.manual_seed(2)
    peft.get_peft_model(transformers_model(moe["checkpoint"]), peft.LoraConfig(
        init_lora_weights=False, r=2, lora_alpha=4, target_modules=["o_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"])).save_pretrained(adapter)
    assert any(".mlp.experts." in k for k in adapter_keys(adapter))
    out = tmp_path / "out"
    with pytest.raises(AdapterError, match=r"LoRA on parameters \(target_parameters\) is not supported"):
        export(moe["checkpoint"], out, ExportOptions(precision="fp32", merge_adapter=str(adapter)))
    assert not out.exists()
