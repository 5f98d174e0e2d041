"""Mixed-adapter batches (PEFT's ``adapter_names``) and several adapters trained in one pass.

Every row of a mixed batch must equal that row run alone with its adapter (to dtype rounding),
``"__base__"`` rows must equal the base output of the same batch bit for bit, and gradients of a
mixed batch must equal training each adapter on its own rows. Checked on the layer (both
backends: plain torch, and Triton through the interpreter), on a tiny ``transformers`` Llama
(forward, greedy and beam-search ``generate``, gradient checkpointing, ``torch.compile``), against
PEFT's own mixed-batch forward on a bitsandbytes base, and for bad input.
"""

from __future__ import annotations

import contextlib
import copy
import itertools

import pytest
import torch

from lora_triton import LoRALinear4bit, disable_adapters, inject_lora, merge_into_nf4, set_adapter
from lora_triton.integration import (adapter_ids, adapter_slots, load_adapter, lora_layers, save_adapters,
                                     set_trainable_adapters)
from lora_triton.integration.mixed_batch import route_adapters
from lora_triton.ops import nf4_linear
from lora_triton.testing import REL_TOL, assert_like_torch, relative_error, tiny_llama

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BASE = "__base__"


def _layer(ranks=(4, 1, 16), k=40, n=24, seed=0, dtype=torch.float32, backend="torch") -> LoRALinear4bit:
    """A layer with adapters ``a0, a1, ...`` of ``ranks`` (different alpha, rsLoRA on odd ones),
    random non-zero B, in ``dtype``."""
    torch.manual_seed(seed)
    layer = LoRALinear4bit.from_linear(torch.nn.Linear(k, n), r=ranks[0], lora_alpha=3.0, init_lora_weights=False,
                                       adapter_name="a0", backend=backend)
    for i, r in enumerate(ranks[1:], start=1):
        layer.add_adapter(f"a{i}", r=r, lora_alpha=2.0 + i, use_rslora=bool(i % 2), init_lora_weights=False)
    return layer.to(dtype)


def _row_alone(layer: LoRALinear4bit, row: torch.Tensor, name: str) -> torch.Tensor:
    if name == BASE:
        with layer.disable_adapter():
            return layer(row)
    active = layer.active_adapter
    layer.set_adapter(name)
    try:
        return layer(row)
    finally:
        layer.set_adapter(active)


def _check_rows(layer, x, names, dtype):
    with torch.no_grad():
        y = layer(x, adapter_names=names)
        base = nf4_linear(x, layer.base_layer.nf4, layer.base_layer.bias, layer.backend)
        assert relative_error(base, layer.base_layer(x)) <= REL_TOL[dtype]
        for i, name in enumerate(names):
            if name == BASE:
                assert torch.equal(y[i], base[i]), "a __base__ row must be the base output of the batch, bit for bit"
            else:
                ref = _row_alone(layer, x[i:i + 1], name)[0]
                assert relative_error(y[i], ref) <= 2 * REL_TOL[dtype], (name, relative_error(y[i], ref))


COMPOSITIONS = {
    "one row per adapter": ["a0", "a1", "a2"],
    "all rows one adapter": ["a1"] * 4,
    "unsorted with base": ["a2", BASE, "a0", "a2", "a1", BASE, "a0"],
    "an adapter absent": ["a2", "a0", "a2"],
    "all base": [BASE, BASE],
    "single row": ["a1"],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("composition", list(COMPOSITIONS))
def test_each_row_equals_running_it_alone_torch_backend(composition, dtype):
    layer = _layer(dtype=dtype)
    names = COMPOSITIONS[composition]
    x = torch.randn(len(names), 3, layer.in_features, dtype=dtype)
    _check_rows(layer, x, names, dtype)


def test_sixty_four_resident_adapters():
    layer = _layer(ranks=tuple(1 + (7 * i) % 64 for i in range(64)), k=64, n=32)
    gen = torch.Generator().manual_seed(11)
    names = [f"a{i}" for i in torch.randint(0, 64, (40,), generator=gen).tolist()] + [BASE, "a63", "a0"]
    _check_rows(layer, torch.randn(len(names), 2, layer.in_features), names, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_row_equals_running_it_alone_triton(dtype, device):
    """The Triton path (the interpreter on CPU, the GPU with ``--device cuda``)."""
    layer = _layer(ranks=(64, 1, 7, 33), k=192, n=130, dtype=dtype, backend="triton").to(device)  # ragged N, K
    names = ["a3", BASE, "a0", "a2", "a1", "a0"]
    x = torch.randn(len(names), 2, layer.in_features, dtype=dtype, device=device)
    _check_rows(layer, x, names, dtype)


def test_two_dim_input_and_empty_batch():
    layer = _layer()
    x = torch.randn(5, layer.in_features)
    names = ["a1", BASE, "a0", "a2", "a1"]
    _check_rows(layer, x[:, None, :], names, torch.float32)
    with torch.no_grad():
        assert torch.allclose(layer(x, adapter_names=names), layer(x[:, None], adapter_names=names)[:, 0])
        assert layer(torch.randn(0, 4, layer.in_features), adapter_names=[]).shape == (0, 4, layer.out_features)


def test_mixed_batches_follow_adapter_changes():
    """An in-place update (also through ``.data``, which moves neither the address nor the version
    counter), a replaced weight, a new scale, a new adapter or a dtype change must all show in the
    next mixed batch, each row equal to the row run alone."""
    layer = _layer()
    names = ["a1", "a0", BASE, "a2"]
    x = torch.randn(len(names), 2, layer.in_features)
    _check_rows(layer, x, names, torch.float32)
    with torch.no_grad():
        layer.lora_B["a1"].weight.mul_(3.0)  # what an optimizer step does: in place
    _check_rows(layer, x, names, torch.float32)
    layer.lora_B["a2"].weight.data.copy_(torch.randn_like(layer.lora_B["a2"].weight))
    _check_rows(layer, x, names, torch.float32)
    layer.lora_A["a1"].weight.data = torch.randn_like(layer.lora_A["a1"].weight)
    _check_rows(layer, x, names, torch.float32)
    layer.lora_A["a0"].weight = torch.nn.Parameter(torch.randn_like(layer.lora_A["a0"].weight))
    _check_rows(layer, x, names, torch.float32)
    layer.scaling["a2"] *= -2.0
    _check_rows(layer, x, names, torch.float32)
    layer.add_adapter("a3", r=5, init_lora_weights=False)
    _check_rows(layer, torch.randn(5, 2, layer.in_features), names + ["a3"], torch.float32)
    _check_rows(layer.to(torch.bfloat16), x.to(torch.bfloat16), names, torch.bfloat16)


def test_tensor_ids_equal_names():
    layer = _layer()
    x = torch.randn(4, 2, layer.in_features)
    names = ["a2", BASE, "a0", "a2"]
    ids = torch.tensor([list(layer.lora_A).index(n) if n != BASE else -1 for n in names])
    with torch.no_grad():
        assert torch.equal(layer(x, adapter_names=names), layer(x, adapter_names=ids))


@pytest.mark.parametrize("x_grad", [False, True])
@pytest.mark.parametrize("trainable", [("a0", "a1", "a2"), ("a1",), ()])
def test_mixed_gradients_equal_one_by_one(x_grad, trainable):
    """Every requires_grad combination: the loss is the sum over adapters of each one's own rows'
    loss, so the gradients must be those of running each sub-batch with its adapter alone."""
    layer = _layer()
    layer.set_trainable_adapters(list(trainable))
    names = ["a2", "a0", BASE, "a2", "a0"]  # a1 absent from the batch
    x = torch.randn(len(names), 3, layer.in_features, requires_grad=x_grad)
    target = torch.randn(len(names), 3, layer.out_features)
    y = layer(x, adapter_names=names)
    assert y.requires_grad == (x_grad or any(name in names for name in trainable))
    if not y.requires_grad:
        return
    ((y - target) ** 2).sum().backward()
    mixed = {n: (layer.lora_A[n].weight.grad, layer.lora_B[n].weight.grad) for n in layer.lora_A}
    dx_mixed = x.grad
    layer.zero_grad(set_to_none=True)
    x_ref = x.detach().clone().requires_grad_(x_grad)
    for name in set(names):
        rows = [i for i, n in enumerate(names) if n == name]
        if name == BASE:
            with layer.disable_adapter():
                out = layer(x_ref[rows])
        else:
            layer.set_adapter(name)
            layer.set_trainable_adapters(list(trainable))
            out = layer(x_ref[rows])
        if out.requires_grad:
            ((out - target[rows]) ** 2).sum().backward()
    for name in layer.lora_A:
        for got, want in zip(mixed[name], (layer.lora_A[name].weight.grad, layer.lora_B[name].weight.grad)):
            if name not in trainable or name not in names:
                assert got is None, f"adapter {name} must get no gradient"
            else:
                assert relative_error(got, want) < 1e-5, name
    if x_grad:
        assert relative_error(dx_mixed, x_ref.grad) < 1e-5


def test_dropout_per_adapter_in_training():
    layer = _layer()
    layer.lora_dropout["a2"] = 0.5
    layer.train()
    names = ["a2", "a0", "a2", BASE]
    x = torch.randn(len(names), 8, layer.in_features)
    with torch.no_grad():
        y_train = layer(x, adapter_names=names)
        layer.eval()
        y_eval = layer(x, adapter_names=names)
    assert torch.equal(y_train[1], y_eval[1]) and torch.equal(y_train[3], y_eval[3])  # no dropout on a0 / base
    assert not torch.allclose(y_train[0], y_eval[0]) and torch.isfinite(y_train).all()


def test_layer_bad_input():
    layer = _layer()
    x = torch.randn(3, 2, layer.in_features)
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs, "
                                         "but got 2 and 3"):
        layer(x, adapter_names=["a0", "a1"])
    with pytest.raises(ValueError, match="non-existing adapter.*nope"):
        layer(x, adapter_names=["a0", "nope", BASE])
    with pytest.raises(TypeError, match="list of adapter names"):
        layer(x, adapter_names="a0")
    with pytest.raises(TypeError, match="hold str names"):
        layer(x, adapter_names=["a0", 1, BASE])
    with pytest.raises(ValueError, match=r"adapter indices must be in \[-1, 3\)"):
        layer(x, adapter_names=torch.tensor([0, 3, -1]))
    with pytest.raises(TypeError, match="1-D int32/int64"):
        layer(x, adapter_names=torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="batch dimension"):
        layer(torch.randn(layer.in_features), adapter_names=["a0"])
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        layer.set_trainable_adapters(["a0", "zz"])


# ----------------------------------------------------------------------------- whole models
IDS = torch.randint(0, 128, (4, 7), generator=torch.Generator().manual_seed(5))
NAMES = ["b", BASE, "a", "b"]


def _model():
    model = tiny_llama(seed=1)
    inject_lora(model, r=4, init_lora_weights=False, adapter_name="a")
    inject_lora(model, target_modules=["q_proj", "v_proj", "down_proj"], r=8, lora_alpha=4, use_rslora=True,
                init_lora_weights=False, adapter_name="b")
    return model.eval()


def _alone(model, ids, name, fn):
    """``fn(ids)`` with adapter ``name`` alone: active where a layer has it, base elsewhere (PEFT's rule)."""
    if name == BASE:
        with disable_adapters(model):
            return fn(ids)
    set_adapter(model, name)
    with contextlib.ExitStack() as stack:
        for layer in lora_layers(model).values():
            if name not in layer.lora_A:
                stack.enter_context(layer.disable_adapter())
        return fn(ids)


def test_model_forward_rows_equal_alone():
    model = _model()
    with torch.no_grad():
        logits = model(input_ids=IDS, adapter_names=NAMES).logits
        for i, name in enumerate(NAMES):
            ref = _alone(model, IDS[i:i + 1], name, lambda ids: model(input_ids=ids).logits)
            assert relative_error(logits[i], ref[0]) < 1e-5, name
        # a call without adapter_names runs the active adapter again for every row
        set_adapter(model, "a")
        assert torch.equal(model(input_ids=IDS).logits, model(input_ids=IDS).logits)
        assert relative_error(model(input_ids=IDS).logits[0], logits[2]) > 1e-3


@pytest.mark.parametrize("beams", [1, 2])
def test_generate_with_adapter_names(beams):
    model = _model()
    kwargs = dict(max_new_tokens=4, do_sample=False, num_beams=beams, num_return_sequences=beams,
                  attention_mask=torch.ones_like(IDS), pad_token_id=0)
    with torch.no_grad():
        out = model.generate(IDS, adapter_names=NAMES, **kwargs)
        assert out.shape == (len(NAMES) * beams, IDS.shape[1] + 4)
        for i, name in enumerate(NAMES):
            one = dict(kwargs, attention_mask=kwargs["attention_mask"][i:i + 1])
            ref = _alone(model, IDS[i:i + 1], name, lambda ids: model.generate(ids, **one))
            assert torch.equal(out[i * beams:(i + 1) * beams], ref), name


def test_model_bad_input_leaves_model_unchanged():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="non-existing adapter.*typo"):
        model(input_ids=IDS, adapter_names=["a", "typo", BASE, "b"])
    with pytest.raises(ValueError, match="but got 3 and 4 respectively"):
        model(input_ids=IDS, adapter_names=["a", "b", BASE])
    with pytest.raises(ValueError, match="but got 3 and 4 respectively"):
        model.generate(IDS, adapter_names=["a", "b", BASE], max_new_tokens=2)
    with pytest.raises(ValueError, match="non-existing adapter.*typo"):
        model.generate(IDS, adapter_names=["a", "typo", BASE, "b"], max_new_tokens=2)
    set_adapter(model, "a")
    merge_into_nf4(model)
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
        model(input_ids=IDS, adapter_names=NAMES)
    from lora_triton import unmerge
    unmerge(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert adapter_slots(model) == ("a", "b")
    with pytest.raises(ValueError, match="no layer of the model has adapter"):
        set_trainable_adapters(model, ["a", "c"])


def test_compile_fullgraph_no_recompile_when_the_mix_changes():
    torch._dynamo.reset()
    model = _model()
    compiled = torch.compile(model, fullgraph=True)
    mixes = (NAMES, ["a", "a", BASE, "a"], [BASE, "b", "b", "a"])
    with torch.no_grad():
        for i, names in enumerate(mixes):
            got = compiled(input_ids=IDS, adapter_names=adapter_ids(model, names)).logits
            want = model(input_ids=IDS, adapter_names=names).logits
            assert relative_error(got, want) < 1e-5
            if i == 0:
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a new adapter mix recompiled"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_several_adapters_trained_in_one_pass_equal_one_by_one(checkpointing, tmp_path):
    """inject_lora with a list of names makes them all trainable; one AdamW step on a mixed batch
    (loss: each adapter's own rows' mean) equals a step per adapter on its rows; an adapter absent
    from the batch is not touched; each one saves in PEFT's format and reloads exactly."""
    def build():
        model = tiny_llama(seed=2)
        torch.manual_seed(7)  # the adapters' initialisation
        inject_lora(model, r=4, init_lora_weights=False, adapter_name=["x", "y", "z"])
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.train()

    names = ["y", "x", "y", BASE]
    mixed, alone = build(), build()
    assert {n.split(".")[-2] for n, p in mixed.named_parameters() if p.requires_grad} == {"x", "y", "z"}

    def loss_of(model, rows, **kw):
        return model(input_ids=IDS[rows], labels=IDS[rows], **kw).loss

    groups = {n: [i for i, m in enumerate(names) if m == n] for n in ("x", "y")}
    opt = torch.optim.AdamW([p for p in mixed.parameters() if p.requires_grad], lr=1e-2)
    if checkpointing:  # the recomputation in backward must see the routing: forward and backward in one scope
        with pytest.raises(ValueError, match="route_adapters"):
            mixed(input_ids=IDS, adapter_names=names)
    with route_adapters(mixed, names) if checkpointing else contextlib.nullcontext():
        logits = mixed(input_ids=IDS).logits if checkpointing else mixed(input_ids=IDS, adapter_names=names).logits
        loss = sum(torch.nn.functional.cross_entropy(logits[rows, :-1].flatten(0, 1), IDS[rows, 1:].flatten())
                   for rows in groups.values())
        loss.backward()
    opt.step()
    for name, rows in groups.items():
        set_adapter(alone, name)
        opt_alone = torch.optim.AdamW([p for p in alone.parameters() if p.requires_grad], lr=1e-2)
        loss_of(alone, rows).backward()
        opt_alone.step()
    ours, theirs = mixed.state_dict(), alone.state_dict()
    for key in ours:
        assert relative_error(ours[key].float(), theirs[key].float()) < 1e-5, key
    z_key = next(k for k in ours if ".z." in k)
    assert torch.equal(ours[z_key], build().state_dict()[z_key]), "an absent adapter must not move"
    folders = save_adapters(mixed, tmp_path)
    assert folders == {name: tmp_path / name for name in ("x", "y", "z")}  # PEFT's save_pretrained layout
    for name in ("x", "y"):
        fresh = tiny_llama(seed=2)
        load_adapter(fresh, folders[name], adapter_name=name)
        with torch.no_grad():
            set_adapter(mixed, name)
            assert relative_error(fresh.eval()(input_ids=IDS).logits, mixed.eval()(input_ids=IDS).logits) < 1e-6
        mixed.train()


def test_deepcopy_keeps_mixed_batches():
    model = _model()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(input_ids=IDS, adapter_names=NAMES).logits,
                           model(input_ids=IDS, adapter_names=NAMES).logits)


def test_matches_peft_mixed_batch_on_a_bitsandbytes_base():
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from lora_triton.integration import from_peft, quantize_with_bnb
    from lora_triton.testing import LLAMA_PROJECTIONS

    model = tiny_llama(seed=3)
    quantize_with_bnb(model, LLAMA_PROJECTIONS)
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                        init_lora_weights=False))
    theirs.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj"],
                                                init_lora_weights=False))
    theirs.eval()
    names = ["other", BASE, "default", "other"]
    with torch.no_grad():
        expected = theirs(input_ids=IDS, adapter_names=names).logits
        ours = from_peft(theirs).eval()
        got = ours(input_ids=IDS, adapter_names=names).logits
    assert relative_error(got, expected) < 1e-5


# ----------------------------------------------------------------------------- the op itself
def _op_operands(dtype=torch.float64, m=7, k=12, n=10, r=3, adapters=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    ids = torch.tensor([2, -1, 0, 2, 3, -1, 0][:m], dtype=torch.int64)
    return (make(m, n), make(m, k), make(adapters, r, k), make(adapters, n, r),
            torch.tensor([0.5, -1.0, 2.0, 0.25]), ids)


def test_op_gradients_in_float64():
    """torch.autograd.gradcheck of the grouped backward (base, x and both banks; adapter 1 absent)."""
    from lora_triton.ops.multi_lora import multi_lora_add

    base, x, bank_a, bank_b, scales, ids = _op_operands()
    inputs = [t.requires_grad_() for t in (base, x, bank_a, bank_b)]
    assert torch.autograd.gradcheck(lambda *t: multi_lora_add(*t, scales, ids), inputs)


def test_op_registration_passes_opcheck():
    """The custom op's schema, fake kernel and autograd registration (torch.compile's view of it)."""
    from lora_triton.ops.multi_lora import _forward_op

    base, x, bank_a, bank_b, scales, ids = _op_operands(torch.float32)
    seed = torch.tensor(7, dtype=torch.int32)
    for dropout in (None, torch.tensor([0.0, 0.5, 0.1, 0.25])):
        args = (base, x.requires_grad_(), bank_a.requires_grad_(), bank_b.requires_grad_(), scales, ids, dropout,
                seed, "torch")
        torch.library.opcheck(_forward_op, args)


def test_op_bad_operands():
    from lora_triton.ops.multi_lora import multi_lora_add

    base, x, bank_a, bank_b, scales, ids = _op_operands(torch.float32)
    with pytest.raises(ValueError, match=r"ids must be in \[-1, 4\)"):
        multi_lora_add(base, x, bank_a, bank_b, scales, ids.clone().fill_(4))
    with pytest.raises(ValueError, match="scales must be finite"):
        multi_lora_add(base, x, bank_a, bank_b, torch.tensor([1.0, float("nan"), 1.0, 1.0]), ids)
    with pytest.raises(ValueError, match=r"bank_b must have shape \[4, 10, 3\]"):
        multi_lora_add(base, x, bank_a, bank_b[:, :5], scales, ids)
    with pytest.raises(TypeError, match="share one float dtype"):
        multi_lora_add(base, x, bank_a.half(), bank_b, scales, ids)
    with pytest.raises(TypeError, match="scales must be float32 and ids int64"):
        multi_lora_add(base, x, bank_a, bank_b, scales, ids.int())
    with pytest.raises(ValueError, match="backend must be 'triton' or 'torch'"):
        multi_lora_add(base, x, bank_a, bank_b, scales, ids, backend="cuda")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        multi_lora_add(base, x.numpy(), bank_a, bank_b, scales, ids)


def test_compiled_mixed_training_step_equals_eager():
    """torch.compile(fullgraph=True) of a mixed-batch training step: the grouped backward runs as
    its own op inside the compiled backward; gradients equal eager's."""
    torch._dynamo.reset()
    model = tiny_llama(seed=8)
    inject_lora(model, r=4, init_lora_weights=False, adapter_name=["x", "y"])
    model.train()
    ids = adapter_ids(model, ["y", BASE, "x", "y"])

    def loss_of(forward):
        return forward(input_ids=IDS, labels=IDS, adapter_names=ids).loss

    loss_of(model).backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss_of(torch.compile(model, fullgraph=True)).backward()
    compiled = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert compiled.keys() == eager.keys() and len(eager) == 2 * 2 * 7 * model.config.num_hidden_layers
    for name in eager:
        assert relative_error(compiled[name], eager[name]) < 1e-4, name


@pytest.mark.parametrize("x_grad,bias_grad", [(True, True), (True, False), (False, True)])
def test_nf4_linear_against_float64(x_grad, bias_grad):
    """ops.nf4_linear (the mixed path's base product) vs float64 on the dequantized weight, odd shapes."""
    from lora_triton.format import NF4Weight

    weight = NF4Weight.quantize(torch.randn(17, 192), 64, True)
    dense = weight.dequantize(torch.float64)
    x = torch.randn(3, 5, 192, requires_grad=x_grad)
    bias = torch.randn(17, requires_grad=bias_grad)
    y = nf4_linear(x, weight, bias)
    ref = x.double() @ dense.t() + bias.double()
    assert relative_error(y, ref) < REL_TOL[torch.float32]
    dy = torch.randn_like(y)
    y.backward(dy)
    if x_grad:
        assert relative_error(x.grad, dy.double() @ dense) < REL_TOL[torch.float32]
    if bias_grad:
        assert relative_error(bias.grad, dy.double().sum((0, 1))) < REL_TOL[torch.float32]
    with pytest.raises(TypeError, match="weight must be an NF4Weight"):
        nf4_linear(x, dense)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        nf4_linear(x.tolist(), weight)
    with pytest.raises(ValueError, match="in_features=192"):
        nf4_linear(x[..., :100], weight)


def test_ids_as_a_tensor_train_like_names_without_reading_them():
    """Rows given as a tensor of ids: the bank holds every adapter (choosing the used ones would read the
    ids on the host), so an adapter absent from the batch gets a zero gradient instead of none; the
    others get the gradients the same rows give by name."""
    layer = _layer()
    layer.set_trainable_adapters(list(layer.lora_A))
    names = ["a2", "a0", BASE, "a2", "a0"]  # a1 absent
    slots = tuple(layer.lora_A)
    ids = torch.tensor([slots.index(n) if n != BASE else -1 for n in names])
    x = torch.randn(len(names), 3, layer.in_features)
    grads = {}
    for how in (names, ids):
        layer.zero_grad(set_to_none=True)
        layer(x, adapter_names=how).square().sum().backward()
        grads[isinstance(how, torch.Tensor)] = {n: layer.lora_B[n].weight.grad for n in slots}
    assert grads[False]["a1"] is None and torch.equal(grads[True]["a1"], torch.zeros_like(layer.lora_B["a1"].weight))
    for name in ("a0", "a2"):
        torch.testing.assert_close(grads[True][name], grads[False][name])


def test_a_mixed_batch_under_inference_mode_leaves_nothing_that_breaks_training():
    """The per-value constants (scales, ids, slot tables) are cached across calls: one made under
    ``torch.inference_mode`` must still be savable for a later training step's backward."""
    layer = _layer()
    layer.set_trainable_adapters(list(layer.lora_A))
    names = ["a2", "a0", BASE, "a1"]
    x = torch.randn(len(names), 3, layer.in_features)
    with torch.inference_mode():
        expected = layer(x, adapter_names=names)
    layer.train()
    y = layer(x, adapter_names=names)
    y.square().sum().backward()
    torch.testing.assert_close(y.detach(), expected)
    assert all(layer.lora_B[n].weight.grad is not None for n in ("a0", "a1", "a2"))


def _mixed_layer_reference(x, dense, bias, bank_a, bank_b, scales, ids):
    """``x @ dense^T + bias`` plus each row's own adapter term, written out adapter by adapter."""
    rows = ids[None, :] == torch.arange(bank_a.shape[0])[:, None]  # [n, M]
    lora = torch.stack([scales[i].to(x.dtype) * (x @ bank_a[i].t()) @ bank_b[i].t() for i in range(bank_a.shape[0])])
    return x @ dense.t() + bias + (lora * rows[:, :, None].to(x.dtype)).sum(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [0, 1, 3, 17])
@pytest.mark.parametrize("needs", list(itertools.product([False, True], repeat=4)))
def test_mixed_layer_node_against_float64(needs, m, dtype):
    """``mixed_nf4_linear`` (one autograd node: base product and each row's adapter term) for every
    requires_grad combination of x, bias and both banks, odd shapes (M = 0, 1, 3, 17; N = 17), against
    float64 within a small multiple of plain torch's error at the same dtype."""
    from lora_triton.format import NF4Weight
    from lora_triton.ops.multi_lora import mixed_nf4_linear

    gen = torch.Generator().manual_seed(m)
    weight = NF4Weight.quantize(torch.randn(17, 192, generator=gen), 64, True)
    values = dict(x=torch.randn(m, 192, generator=gen), bias=torch.randn(17, generator=gen),
                  bank_a=torch.randn(4, 3, 192, generator=gen) / 8, bank_b=torch.randn(4, 17, 3, generator=gen))
    scales = torch.tensor([0.5, -1.0, 2.0, 0.25])
    ids = torch.randint(-1, 4, (m,), generator=gen)
    dy = torch.randn(m, 17, generator=gen)

    def leaves(as_dtype):
        return {name: t.to(as_dtype, copy=True).requires_grad_(need) for (name, t), need in zip(values.items(), needs)}

    ours, plain, ref = leaves(dtype), leaves(dtype), leaves(torch.float64)
    y = mixed_nf4_linear(ours["x"], weight, ours["bias"], ours["bank_a"], ours["bank_b"], scales, ids,
                         training=True, backend="torch")
    y_plain = _mixed_layer_reference(plain["x"], weight.dequantize(dtype), plain["bias"], plain["bank_a"],
                                     plain["bank_b"], scales, ids)
    y_ref = _mixed_layer_reference(ref["x"], weight.dequantize(torch.float64), ref["bias"], ref["bank_a"],
                                   ref["bank_b"], scales, ids)
    assert y.dtype == dtype and y.shape == (m, 17) and y.requires_grad == any(needs)
    if m:
        assert_like_torch(y, y_ref, y_plain, what="y")
    if not any(needs):
        return
    for out in (y, y_plain, y_ref):
        out.backward(dy.to(out.dtype))
    for name, need in zip(values, needs):
        if not need:
            assert ours[name].grad is None, name
        elif m:
            assert_like_torch(ours[name].grad, ref[name].grad, plain[name].grad, what=f"d{name}")
        else:
            assert ours[name].grad.shape == values[name].shape and not ours[name].grad.any(), name


def test_mixed_layer_node_bad_input():
    from lora_triton.format import NF4Weight
    from lora_triton.ops.multi_lora import mixed_nf4_linear

    weight = NF4Weight.quantize(torch.randn(10, 64), 64, True)
    x, bank_a, bank_b = torch.randn(3, 64), torch.randn(4, 2, 64), torch.randn(4, 10, 2)
    scales, ids = torch.ones(4), torch.tensor([0, -1, 3])
    with pytest.raises(TypeError, match="weight must be an NF4Weight"):
        mixed_nf4_linear(x, weight.dequantize(torch.float32), None, bank_a, bank_b, scales, ids)
    with pytest.raises(ValueError, match="in_features=64"):
        mixed_nf4_linear(x[:, :32], weight, None, bank_a, bank_b, scales, ids)
    with pytest.raises(ValueError, match=r"bank_b must have shape \[4, 10, 2\]"):
        mixed_nf4_linear(x, weight, None, bank_a, bank_b[:, :5], scales, ids)
    with pytest.raises(TypeError, match="scales must be float32 and ids int64"):
        mixed_nf4_linear(x, weight, None, bank_a, bank_b, scales, ids.int())
    with pytest.raises(ValueError, match=r"bias must have shape \[10\]"):
        mixed_nf4_linear(x, weight, torch.zeros(9), bank_a, bank_b, scales, ids)
    with pytest.raises(ValueError, match=r"dropout must be a float32 tensor \[4\]"):
        mixed_nf4_linear(x, weight, None, bank_a, bank_b, scales, ids, dropout=torch.zeros(3), training=True)
