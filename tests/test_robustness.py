"""State that outlives its call, models that cannot be saved, limits that differ by backend, tables that
crash the forward: each class checked against an oracle (the row run alone, float64 math, the bytes
before), on both backends where both apply (Triton through the interpreter on CPU)."""

from __future__ import annotations

import copy
import io
import json
import pickle
import warnings

import pytest
import torch
from safetensors.torch import load_model, save_model

from lora_triton import LoRALinear4bit, inject_lora
from lora_triton.integration import lora_layers
from lora_triton.integration.mixed_batch import route_adapters
from lora_triton.modules import NF4Linear
from lora_triton.ops import dispatch
from lora_triton.testing import relative_error, tiny_llama
from lora_triton.training import causal_lm_loss

BASE = "__base__"
IDS = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(3))


def _model(backend: str = "torch"):
    """A tiny Llama with adapters ``a`` and ``b`` (random non-zero B) on q and v, mixed batches on."""
    model = tiny_llama(seed=4)
    torch.manual_seed(5)
    inject_lora(model, r=4, init_lora_weights=False, adapter_name=["a", "b"], target_modules=["q_proj", "v_proj"],
                backend=backend)
    return model.eval()


def _row_alone(model, row: torch.Tensor, name: str) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=row[None], adapter_names=[name]).logits[0]


# ----------------------------------------------------------------------------- class 1: caches
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_mixed_batch_sees_an_adapter_edited_through_data(backend):
    """``weight.data.copy_`` moves neither the address nor the version counter of the weight."""
    model = _model(backend)
    names = ["a", "b", BASE]
    with torch.no_grad():
        model(input_ids=IDS, adapter_names=names)
        for layer in lora_layers(model).values():
            layer.lora_B["b"].weight.data.copy_(torch.randn_like(layer.lora_B["b"].weight))
        mixed = model(input_ids=IDS, adapter_names=names).logits
    for i, name in enumerate(names):
        assert relative_error(mixed[i], _row_alone(model, IDS[i], name)) < 1e-5, name


# ----------------------------------------------------------------------------- class 2: persistence
def _outputs(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits, model(input_ids=IDS, adapter_names=["b", BASE, "a"]).logits


def _nf4_bytes(model):
    return {name: layer.base_layer.nf4.packed.clone() for name, layer in lora_layers(model).items()}


def _torch_save(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["torch.save", "pickle", "deepcopy"])
def test_a_whole_model_survives_save_pickle_and_copy(how):
    model = _model()
    expected, nf4 = _outputs(model), _nf4_bytes(model)
    clone = {"torch.save": _torch_save, "pickle": lambda m: pickle.loads(pickle.dumps(m)),
             "deepcopy": copy.deepcopy}[how](model)
    got = _outputs(clone)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert all(torch.equal(b, nf4[name]) for name, b in _nf4_bytes(clone).items())
    with torch.no_grad():  # the copy routes on its own: the original's routing is not shared
        clone.generate(input_ids=IDS[:2, :4], adapter_names=["a", BASE], max_new_tokens=2, do_sample=False)


def test_safetensors_save_model_and_load_model_round_trip(tmp_path):
    model = _model()
    expected, nf4 = _outputs(model), _nf4_bytes(model)
    save_model(model, str(tmp_path / "model.safetensors"))
    other = _model()
    with torch.no_grad():
        for layer in lora_layers(other).values():
            layer.lora_A["a"].weight.zero_()
    missing, unexpected = load_model(other, str(tmp_path / "model.safetensors"))
    assert not unexpected
    got = _outputs(other)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert all(torch.equal(b, nf4[name]) for name, b in _nf4_bytes(other).items())


def test_a_layer_whose_storage_was_replaced_reads_the_new_bytes():
    """The layer's NF4 view is rebuilt when a parameter's storage changes (``.data =``)."""
    layer = NF4Linear.from_linear(torch.nn.Linear(64, 16), double_quant=False)
    other = NF4Linear.from_linear(torch.nn.Linear(64, 16), double_quant=False)
    x = torch.randn(3, 64)
    layer(x)
    layer.weight.data = other.weight.data.clone()  # the whole NF4 state without double quantization
    layer.weight_absmax.data = other.weight_absmax.data.clone()
    expected = x @ other.nf4.dequantize(torch.float32).t() + layer.bias
    assert relative_error(layer(x), expected) < 1e-6


# ----------------------------------------------------------------------------- class 3: routing
def test_routing_ends_with_its_call():
    """The routing of ``model(..., adapter_names=...)`` is not seen by the next call: not by
    ``causal_lm_loss`` (which runs the decoder body itself), nor by a batch of another size."""
    model = _model()
    with torch.no_grad():
        model(input_ids=IDS, adapter_names=["a", "b", BASE])
        assert float(causal_lm_loss(model, IDS, IDS)) == pytest.approx(float(model(input_ids=IDS, labels=IDS).loss),
                                                                       rel=1e-6)
        model(input_ids=IDS, adapter_names=["a", "b", BASE])
        assert model(input_ids=IDS[:2]).logits.shape[0] == 2  # no length error from the last call's mix


def test_causal_lm_loss_honours_adapter_names():
    """The mixed loss is the token-weighted mean of each row's loss with its own adapter alone."""
    model = _model()
    names = ["b", "a", BASE]
    with torch.no_grad():
        mixed = causal_lm_loss(model, IDS, IDS, adapter_names=names)
        rows = [causal_lm_loss(model, IDS[i:i + 1], IDS[i:i + 1], adapter_names=[name]) for i, name in
                enumerate(names)]
    assert float(mixed) == pytest.approx(float(sum(rows) / len(rows)), rel=1e-5)
    with pytest.raises(ValueError, match="non-existing adapter"):
        causal_lm_loss(model, IDS, IDS, adapter_names=["a", "nope", BASE])


def test_a_checkpointed_training_forward_refuses_unscoped_routing_and_trains_in_a_scope():
    model = _model().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    names = ["a", "b", BASE]
    with pytest.raises(ValueError, match="route_adapters"):
        model(input_ids=IDS, labels=IDS, adapter_names=names)
    with pytest.raises(ValueError, match="route_adapters"):
        causal_lm_loss(model, IDS, IDS, adapter_names=names)
    with route_adapters(model, names):
        model(input_ids=IDS, labels=IDS).loss.backward()
        with pytest.raises(ValueError, match="do not pass it"):
            model(input_ids=IDS, adapter_names=names)
    checkpointed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    plain = _model().train()
    plain(input_ids=IDS, labels=IDS, adapter_names=names).loss.backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert checkpointed.keys() == grads.keys() and checkpointed
    for name, grad in grads.items():
        assert relative_error(checkpointed[name], grad) < 1e-5, name


def test_a_failed_routed_forward_leaves_no_routing():
    model = _model()
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        model(input_ids=IDS, adapter_names=["a"])
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, _model()(input_ids=IDS).logits)


# ----------------------------------------------------------------------------- class 4: no dense W
def _saved_float_elements(fn) -> int:
    """Elements of the floating-point tensors autograd saves while ``fn()`` runs (the largest one)."""
    sizes = []

    def pack(t):
        if t.is_floating_point():
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes, default=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_disabled_adapter_and_a_bare_base_layer_keep_no_dense_weight(backend):
    layer = LoRALinear4bit.from_linear(torch.nn.Linear(256, 192), r=4, backend=backend)
    x = torch.randn(2, 3, 256, requires_grad=True)
    dense = 256 * 192
    with layer.disable_adapter():
        assert _saved_float_elements(lambda: layer(x)) < dense
        y = layer(x)
    assert torch.equal(y, layer.base_layer(x))
    assert _saved_float_elements(lambda: layer.base_layer(x)) < dense
    expected = x.detach() @ layer.base_layer.nf4.dequantize(torch.float32).t() + layer.base_layer.bias
    assert relative_error(layer.base_layer(x), expected) < 1e-6


# ----------------------------------------------------------------------------- class 5: one set of limits
@pytest.mark.parametrize("case", ["rank 256", "K not a multiple of the block size", "float64"])
def test_every_backend_runs_what_the_torch_backend_runs(case):
    """Forward and gradients on the Triton backend equal the torch backend's (no dropout: the two
    backends draw their masks from different generators) for what used to fail only on Triton."""
    torch.manual_seed(0)
    k, r, dtype, blocksize = {"rank 256": (128, 256, torch.float32, 64),
                              "K not a multiple of the block size": (100, 8, torch.float32, 64),
                              "float64": (128, 8, torch.float64, 64)}[case]
    layers = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(1)
        layers[backend] = LoRALinear4bit.from_linear(torch.nn.Linear(k, 48), r=r, init_lora_weights=False,
                                                     blocksize=blocksize, backend=backend).to(dtype)
    x = torch.randn(5, k, dtype=dtype)
    out = {}
    for backend, layer in layers.items():
        xb = x.clone().requires_grad_()
        y = layer(xb)
        y.square().sum().backward()
        out[backend] = (y.detach(), xb.grad, layer.lora_A["default"].weight.grad)
    for got, want in zip(out["triton"], out["torch"]):
        assert relative_error(got, want) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_a_rank_beyond_the_tile_kernels_is_refused_by_them_and_not_chosen():
    from lora_triton.ops import candidates
    from lora_triton.testing import random_lora_problem

    p = random_lora_problem(3, 32, 64, 200, seed=1)
    args = (p["x"], p["weight"], p["lora_a"], p["lora_b"], p["scale"])
    with pytest.raises(ValueError, match="r <= 128"):
        candidates.run_forward("skinny", *args)
    candidates.run_forward("dequant", *args)
    problem = dispatch.Problem(torch.device("cuda", 0), 1, 4096, 4096, 200)
    assert not candidates.FORWARD["skinny"].supports(problem)
    assert not candidates.DX["fused"].supports(problem)
    assert candidates.FORWARD["dequant"].supports(problem)


# ----------------------------------------------------------------------------- class 6: the table
def test_a_table_point_its_candidate_cannot_run_is_dropped_with_a_warning(tmp_path):
    good = {"m_bucket": 1, "n": 64, "k": 128, "r": 8, "candidate": "skinny", "config": {"split_k": 2}}
    bad = [{"m_bucket": 2, "n": 64, "k": 128, "r": 8, "candidate": "torch", "config": {"BLOCK_M": 32}},
           {"m_bucket": 4, "n": 64, "k": 128, "r": 8, "candidate": "skinny", "config": {"block_m": 7}},
           {"m_bucket": 8, "n": 64, "k": 128, "r": 8, "candidate": "skinny", "config": {"warps": 4}},
           {"m_bucket": 16, "n": 64, "k": 128, "r": 8, "candidate": "dequant", "config": {"split_k": 2}},
           {"m_bucket": 32, "n": 64, "k": 128, "r": 8, "candidate": "nope", "config": None}]
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"format": 1, "gpus": {"G": {"forward": [good, *bad]}}}))
    dispatch.load_table.cache_clear()
    with pytest.warns(RuntimeWarning, match="point dropped") as caught:
        table = dispatch.load_table(str(path))
    dispatch.load_table.cache_clear()
    assert table["gpus"]["G"]["forward"] == [good]
    assert len([w for w in caught if "point dropped" in str(w.message)]) == len(bad)
    with pytest.raises(ValueError, match="takes no config"):
        dispatch.write_table({"format": 1, "gpus": {"G": {"forward": [bad[0]]}}}, str(tmp_path / "out.json"))
    assert not (tmp_path / "out.json").exists()


def test_a_forward_with_a_broken_table_runs_the_rule(tmp_path, monkeypatch):
    """The module promises a warning and the rule, never a crash: every point of this table is bad, read
    through the loader (points dropped) or handed to ``choose`` as it is (points skipped)."""
    from lora_triton.ops import candidates

    from lora_triton.ops import configs

    monkeypatch.setattr(dispatch.Problem, "gpu", property(lambda self: "G"))
    monkeypatch.setattr(candidates, "gpu_limits", lambda device: configs.named_archs()[89])
    broken = {"format": 1, "gpus": {"G": {"forward": [
        {"m_bucket": 2, "n": 64, "k": 128, "r": 8, "candidate": "skinny", "config": {"block_m": 7}},
        {"m_bucket": 4, "n": 64, "k": 128, "r": 8, "candidate": "skinny", "config": {"block_m": 4096, "block_n": 4096,
                                                                                     "block_k": 4096}}]}}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(broken))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = dispatch.load_table(str(path))
    dispatch.load_table.cache_clear()
    rule = candidates.FORWARD[candidates.RULE["forward"][0]]
    for m in (2, 4):
        problem = dispatch.Problem(torch.device("cuda"), m, 64, 128, 8)
        assert dispatch.choose("forward", problem, table=loaded) == (rule, None)
        assert dispatch.choose("forward", problem, table=broken) == (rule, None)


# ----------------------------------------------------------------------------- class 7: the front door
def test_a_backend_typo_is_refused_when_the_layer_is_built():
    with pytest.raises(ValueError, match="backend must be one of"):
        LoRALinear4bit.from_linear(torch.nn.Linear(64, 16), backend="garbage")
    model = tiny_llama(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="backend must be one of"):
        inject_lora(model, r=4, backend="garbage")
    assert not lora_layers(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_merging_into_another_dtype_leaves_a_model_that_runs():
    from lora_triton import merge_to_linear

    model = _model()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    report = merge_to_linear(model, torch.bfloat16)
    assert report.path == "bfloat16" and not lora_layers(model)
    with torch.no_grad():
        got = model(input_ids=IDS).logits
    assert got.dtype == torch.bfloat16 and relative_error(got, expected) < 0.05
    same = _model()
    merge_to_linear(same)  # the model's own dtype
    assert next(same.parameters()).dtype == torch.float32


def _cli_error(capsys, argv) -> str:
    from lora_triton.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return f"{exit_info.value.code} {capsys.readouterr().err}"


def test_a_bad_number_says_what_is_expected(capsys):
    assert "--batch: must be a positive integer, got 'abc'" in _cli_error(capsys, ["memory", "--batch", "abc"])
    assert "must be a positive integer, got 0" in _cli_error(capsys, ["memory", "--seq", "0"])


@pytest.mark.parametrize("command, flag", [(["demo"], "--out-dir"), (["demo", "--quick"], "--out-dir"),
                                           (["forgetting", "--quick"], "--out-dir"),
                                           (["bench", "--what", "cpu", "--quick"], "--out")])
def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, capsys, command, flag):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    message = _cli_error(capsys, [*command, flag, str(blocker / "out")])
    assert "cannot write to the output folder" in message and f"writable folder with {flag}" in message


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="needs a CPU-only build of torch")
def test_a_cuda_device_on_a_cpu_build_of_torch_says_so(capsys):
    message = _cli_error(capsys, ["demo", "--quick", "--device", "cuda"])
    assert "needs a CUDA build of torch" in message and "CPU-only" in message
    assert "not a torch device" in _cli_error(capsys, ["demo", "--quick", "--device", "gpu0"])


def test_the_injection_report_counts_in_words_and_names_what_stays_full_precision():
    model = tiny_llama(seed=1)
    report = inject_lora(model, ["q_proj", "v_proj"], r=4)
    text = str(report)
    layers = len(report.converted)
    assert f"{layers} layers converted" in text
    assert set(report.full_precision) == {name for name, m in model.named_modules()
                                          if name.endswith(("k_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                                            "lm_head"))}
    assert f"{len(report.full_precision)} other linear layers stay in full precision" in text
    assert "1 layer converted" in str(inject_lora(tiny_llama(seed=1, layers=1), ["q_proj"], r=4))


def test_memory_tables_of_a_tiny_model_print_no_zeros_and_small_weights_say_nf4_is_larger(tmp_path, capsys):
    from lora_triton.cli import main

    config = tiny_llama(seed=1).config
    config.save_pretrained(tmp_path)
    assert main(["memory", str(tmp_path), "--seq", "16"]) == 0
    table = capsys.readouterr().out
    totals = next(line for line in table.splitlines() if line.startswith("total")).split()[1:]
    assert all(float(v) > 0 for v in totals), table
    main(["verify", "--out-features", "8", "--in-features", "64", "--rank", "4", "--tokens", "3"])
    out = capsys.readouterr().out
    assert "larger: at 512 weights" in out and "-" not in out.split("bits/weight, ")[1][:2], out


def test_the_readme_names_import_from_the_package():
    import lora_triton

    for name in ("save_adapters", "save_adapter", "load_adapter", "inject_lora", "route_adapters", "RoutedLoRA",
                 "causal_lm_loss", "set_trainable_adapters"):
        assert name in lora_triton.__all__ and getattr(lora_triton, name)
