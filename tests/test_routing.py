"""Routed per-task adapters (``training.routing``): the router on crafted inputs whose answer is
known, its scores against independent float64 formulas, a routed mixed batch against each row run
alone with its adapter, ``generate`` on mixed prompts, the save/load round trip and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora_triton import inject_lora
from lora_triton.integration import disable_adapters, lora_layers, read_adapter, set_adapter
from lora_triton.testing import tiny_llama
from lora_triton.training import RoutedLoRA, TaskRouter
from lora_triton.training.routing import BASE_ADAPTER, ROUTER_FILE, TaskSignature

BASE = BASE_ADAPTER


def _cluster(center: torch.Tensor, batches: int, b: int, t: int, spread: float, gen: torch.Generator) -> list:
    d = center.shape[0]
    return [center + spread * torch.randn(b, t, d, generator=gen, dtype=torch.float64) for _ in range(batches)]


# =============================================================================== the router alone
def test_gaussian_scores_match_the_log_likelihood_and_route_known_inputs():
    gen = torch.Generator().manual_seed(0)
    d = 5
    centers = {"a": torch.zeros(d, dtype=torch.float64), "b": torch.zeros(d, dtype=torch.float64)}
    centers["a"][0], centers["b"][1] = 4.0, 4.0
    router = TaskRouter("gaussian", shrinkage=0.2)
    calibration = {name: _cluster(c, 6, 4, 16, 1.0, gen) for name, c in centers.items()}
    for name in ("a", "b"):
        router.add_task(name, [(x, None) for x in calibration[name]])
    # independent float64 oracle: the shrunk Gaussian's per-token log-likelihood, averaged per sequence
    x = torch.cat([_cluster(centers["a"], 1, 3, 10, 1.0, gen)[0], _cluster(centers["b"], 1, 3, 10, 1.0, gen)[0]])
    expected = []
    for name in ("a", "b"):
        flat = torch.cat(calibration[name]).reshape(-1, d)
        mean = flat.mean(0)
        cov = (flat - mean).T @ (flat - mean) / flat.shape[0]
        cov = 0.8 * cov + 0.2 * torch.trace(cov) / d * torch.eye(d, dtype=torch.float64)
        dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
        expected.append(-(dist.log_prob(x).mean(1)) - 0.5 * d * math.log(2 * math.pi))
    scores = router.scores(x)
    torch.testing.assert_close(scores, torch.stack(expected, 1), rtol=1e-7, atol=1e-7)
    far = torch.full((2, 10, d), -20.0, dtype=torch.float64)  # no task has data there: the base
    assert router.route(torch.cat([x, far])) == ["a"] * 3 + ["b"] * 3 + [BASE] * 2


def test_subspace_router_routes_by_the_subspace_that_holds_the_input():
    gen = torch.Generator().manual_seed(1)
    d = 8

    def in_span(dims: list[int], batches: int, t: int = 12) -> list[torch.Tensor]:
        out = []
        for _ in range(batches):
            x = torch.zeros(3, t, d, dtype=torch.float64)
            x[..., dims] = torch.randn(3, t, len(dims), generator=gen, dtype=torch.float64)
            out.append(x + 1e-3 * torch.randn(3, t, d, generator=gen, dtype=torch.float64))
        return out

    router = TaskRouter("subspace", energy=0.99)
    router.add_task("low", [(x, None) for x in in_span([0, 1, 2], 5)])
    router.add_task("high", [(x, None) for x in in_span([3, 4, 5], 5)])
    probe = torch.cat(in_span([0, 1, 2], 1) + in_span([3, 4, 5], 1) + in_span([6, 7], 1))
    assert router.route(probe) == ["low"] * 3 + ["high"] * 3 + [BASE] * 3
    # the score is the residual energy fraction outside the task's basis, over the task's median
    basis = router._derive("low")[0]
    x = probe[:1]
    residual = (x.square().sum() - (x @ basis).square().sum()) / x.square().sum()
    assert router.scores(x)[0, 0].item() == pytest.approx(float(residual) / router.signatures["low"].scale, rel=1e-9)


def test_quantile_one_explains_every_calibration_sequence_and_short_inputs_get_a_wider_threshold():
    gen = torch.Generator().manual_seed(2)
    center = torch.zeros(4, dtype=torch.float64)
    calibration = _cluster(center, 5, 4, 20, 1.0, gen)
    router = TaskRouter("gaussian", quantile=1.0)
    router.add_task("only", [(x, None) for x in calibration])
    assert router.route(torch.cat(calibration)) == ["only"] * 20
    sig = router.signatures["only"]
    assert sig.cal_length == 20
    limits = sig.threshold(torch.tensor([5.0, 20.0, 80.0], dtype=torch.float64))
    assert limits[0] > limits[1] == pytest.approx(sig.cal_quantile) and limits[2] == pytest.approx(limits[1])
    # with quantile 0.5 about half the calibration sequences are not explained: they go to the base
    half = TaskRouter("gaussian", quantile=0.5)
    half.add_task("only", [(x, None) for x in calibration])
    based = half.route(torch.cat(calibration)).count(BASE)
    assert 6 <= based <= 10


def test_padding_does_not_count():
    gen = torch.Generator().manual_seed(3)
    a = torch.zeros(3, dtype=torch.float64)
    router = TaskRouter("gaussian")
    router.add_task("a", [(x, None) for x in _cluster(a, 40, 4, 8, 0.5, gen)])
    x = _cluster(a, 1, 2, 8, 0.5, gen)[0]
    x[:, 5:] = 50.0  # padding positions hold garbage
    mask = torch.ones(2, 8)
    mask[:, 5:] = 0
    torch.testing.assert_close(router.scores(x, mask), router.scores(x[:, :5]), rtol=1e-12, atol=1e-12)
    assert router.route(x, mask) == router.route(x[:, :5]) == ["a", "a"]
    assert router.route(x) == [BASE, BASE]
    mask[1] = 0  # a sequence without tokens: the base
    assert router.route(x, mask) == ["a", BASE]


def test_router_rejects_bad_input():
    with pytest.raises(ValueError, match="scoring"):
        TaskRouter("cosine")
    with pytest.raises(ValueError, match="quantile"):
        TaskRouter(quantile=0.0)
    router = TaskRouter()
    with pytest.raises(RuntimeError, match="no task"):
        router.scores(torch.zeros(1, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="base"):
        router.add_task(BASE, [(torch.zeros(1, 2, 3), None)])
    with pytest.raises(ValueError, match="no calibration tokens"):
        router.add_task("a", [])
    router.add_task("a", [(torch.randn(2, 4, 3, dtype=torch.float64), None)])
    with pytest.raises(ValueError, match="already"):
        router.add_task("a", [(torch.randn(2, 4, 3, dtype=torch.float64), None)])
    with pytest.raises(ValueError, match="dims"):
        router.add_task("b", [(torch.randn(2, 4, 5, dtype=torch.float64), None)])
    assert router.tasks == ["a"]
    with pytest.raises(ValueError, match="attention_mask"):
        router.route(torch.randn(2, 4, 3, dtype=torch.float64), torch.ones(2, 5))


# =============================================================================== on a model
VOCAB, HIDDEN = 96, 32
RANGES = {"a": (0, 30), "b": (30, 60)}  # each task's tokens; 60-95 belong to no task


def _model(seed: int = 0) -> nn.Module:
    """A tiny Llama whose input embeddings put each task's tokens in a cluster of its own."""
    model = tiny_llama(seed=seed, hidden=HIDDEN, vocab=VOCAB)
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(0.1 * torch.randn(emb.shape, generator=gen))
        for i, (low, high) in enumerate([RANGES["a"], RANGES["b"], (60, VOCAB)]):
            emb[low:high, i] += 1.0
    return model


def _tokens(task: str | None, rows: int, t: int, gen: torch.Generator) -> torch.Tensor:
    low, high = RANGES[task] if task else (60, VOCAB)
    return torch.randint(low, high, (rows, t), generator=gen)


def _routed(seed: int = 0) -> tuple[RoutedLoRA, nn.Module]:
    """A routed tiny Llama with tasks a and b: adapters with random non-zero B (no training)."""
    model = _model(seed)
    inject_lora(model, r=4, lora_alpha=8, adapter_name="scratch")
    routed = RoutedLoRA(model, probe="embedding", r=4, lora_alpha=8)
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(seed)
    for task in ("a", "b"):
        params = routed.begin_task(task, init=False)
        assert all(p.requires_grad for p in params)
        routed.end_task([{"input_ids": _tokens(task, 4, 12, gen)} for _ in range(4)])
    return routed, model


def _row_alone(model: nn.Module, ids: torch.Tensor, name: str, call):
    if name == BASE:
        with disable_adapters(model):
            return call(ids)
    set_adapter(model, name)
    return call(ids)


def test_routed_mixed_batch_equals_each_row_alone_in_float64():
    routed, model = _routed()
    model.double()
    gen = torch.Generator().manual_seed(11)
    ids = torch.cat([_tokens("b", 1, 9, gen), _tokens("a", 1, 9, gen), _tokens(None, 1, 9, gen),
                     _tokens("a", 1, 9, gen)])
    names = routed.route(input_ids=ids)
    assert names == ["b", "a", BASE, "a"]  # each row's tokens come from its task's cluster
    with torch.no_grad():
        logits = routed(input_ids=ids).logits
        for i, name in enumerate(names):
            alone = _row_alone(model, ids[i:i + 1], name, lambda x: model(input_ids=x).logits)[0]
            torch.testing.assert_close(logits[i], alone, rtol=1e-10, atol=1e-10)
        # the adapters matter: the rows differ from the base output where routed to an adapter
        with disable_adapters(model):
            base = model(input_ids=ids).logits
    assert (logits[0] - base[0]).abs().max() > 1e-3 and torch.equal(logits[2], base[2])


def test_generate_routes_each_prompt():
    routed, model = _routed()
    gen = torch.Generator().manual_seed(12)
    ids = torch.cat([_tokens("a", 1, 6, gen), _tokens(None, 1, 6, gen), _tokens("b", 1, 6, gen)])
    mask = torch.ones_like(ids)
    assert routed.route(input_ids=ids, attention_mask=mask) == ["a", BASE, "b"]
    with torch.no_grad():
        out = routed.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        for i, name in enumerate(["a", BASE, "b"]):
            alone = _row_alone(model, ids[i:i + 1], name,
                               lambda x: model.generate(input_ids=x, max_new_tokens=5, do_sample=False))
            assert torch.equal(out[i], alone[0]), name
    assert out.shape == (3, 11)


def test_tasks_train_only_their_own_adapter_and_warm_start_copies():
    model = _model()
    inject_lora(model, r=4, lora_alpha=8, adapter_name="scratch")
    routed = RoutedLoRA(model, r=4, lora_alpha=8)
    gen = torch.Generator().manual_seed(3)
    params = routed.begin_task("a", init=False)
    layers = lora_layers(model)
    assert {id(p) for p in params} == {id(layer.lora_A["a"].weight) for layer in layers.values()} | \
        {id(layer.lora_B["a"].weight) for layer in layers.values()}
    assert [p for p in model.parameters() if p.requires_grad] and \
        all(any(p is q for q in params) for p in model.parameters() if p.requires_grad)
    with pytest.raises(RuntimeError, match="still open"):
        routed.begin_task("b")
    routed.end_task([{"input_ids": _tokens("a", 2, 8, gen)}])
    assert not any(p.requires_grad for p in model.parameters())
    routed.begin_task("b", warm_start="a")
    for layer in layers.values():
        assert torch.equal(layer.lora_B["b"].weight, layer.lora_B["a"].weight)
        assert layer.lora_B["a"].weight.abs().sum() > 0 and layer.lora_B["b"].weight.requires_grad
    with pytest.raises(RuntimeError, match="is open"):
        routed.end_task([{"input_ids": _tokens("a", 2, 8, gen)}], task="a")
    routed.end_task([{"input_ids": _tokens("b", 2, 8, gen)}])
    assert routed.tasks == ["a", "b"]
    for bad, match in (("a", "taken"), (BASE, "taken"), ("scratch", "already exists")):
        with pytest.raises(ValueError, match=match):
            routed.begin_task(bad)
    with pytest.raises(ValueError, match="rank"):
        routed.begin_task("c", warm_start="a", r=2)
    with pytest.raises(RuntimeError, match="no task is open"):
        routed.end_task([])
    with pytest.raises(KeyError, match="nope"):
        routed.end_task([{"input_ids": _tokens("a", 2, 8, gen)}], task="nope")
    # an adapter trained elsewhere joins as a routed task
    routed.end_task([{"input_ids": _tokens(None, 2, 8, gen)}], task="scratch")
    assert routed.tasks == ["a", "b", "scratch"]


def test_bad_models_and_probes():
    with pytest.raises(ValueError, match="no LoRALinear4bit"):
        RoutedLoRA(_model())
    model = _model()
    inject_lora(model, r=4)
    with pytest.raises(ValueError, match="not a module"):
        RoutedLoRA(model, probe="model.nowhere")
    plain = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 4))
    inject_lora(plain, target_modules=["1"], r=2)
    with pytest.raises(ValueError, match="get_input_embeddings"):
        RoutedLoRA(plain)
    routed = RoutedLoRA(plain, probe="0", r=2)  # a module name: the embedding's output
    routed.begin_task("t")
    calibration = torch.randint(0, 8, (3, 5))
    routed.end_task([calibration])
    assert routed.route(calibration) == ["t"] * 3  # quantile 1: every calibration sequence is explained
    with pytest.raises(RuntimeError, match="not called"):
        RoutedLoRA(plain, probe="1.base_layer", r=2, forward=lambda m, b: None).features(torch.zeros(1, 2))


def test_save_and_load_round_trip(tmp_path):
    routed, model = _routed()
    routed.begin_task("c")
    with pytest.raises(RuntimeError, match="still open"):
        routed.save(tmp_path / "x")
    gen = torch.Generator().manual_seed(5)
    routed.end_task([{"input_ids": _tokens(None, 8, 12, gen)} for _ in range(4)])  # c: the other tokens
    folder = routed.save(tmp_path / "routed")
    for task in ("a", "b", "c"):
        config, pairs = read_adapter(folder / task)  # PEFT layout, one folder per task
        assert config["r"] == 4 and len(pairs) == len(lora_layers(model))
    assert (folder / ROUTER_FILE).is_file()
    fresh = _model()  # the same base weights, no adapters: load quantizes it as the saved model was
    loaded = RoutedLoRA.load(fresh, folder)
    assert loaded.tasks == ["a", "b", "c"] and loaded.probe == "embedding"
    assert not any(p.requires_grad for p in fresh.parameters())
    for name, sig in routed.router.signatures.items():
        other = loaded.router.signatures[name]
        assert torch.equal(sig.gram, other.gram) and torch.equal(sig.total, other.total)
        assert (sig.count, sig.cal_mean, sig.cal_quantile, sig.cal_length) == \
            (other.count, other.cal_mean, other.cal_quantile, other.cal_length)
    gen = torch.Generator().manual_seed(13)
    ids = torch.cat([_tokens("a", 2, 7, gen), _tokens("b", 1, 7, gen), _tokens(None, 1, 7, gen)])
    assert loaded.route(input_ids=ids) == routed.route(input_ids=ids) == ["a", "a", "b", "c"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, routed(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a lora-triton router"):
        TaskRouter.load(folder / "a" / "adapter_model.safetensors")


def test_signature_threshold_formula():
    sig = TaskSignature(10, torch.zeros(2), torch.zeros(2, 2), cal_mean=1.0, cal_quantile=3.0, cal_length=16.0)
    limits = sig.threshold(torch.tensor([4.0, 16.0, 64.0, 0.0]))
    torch.testing.assert_close(limits, torch.tensor([5.0, 3.0, 3.0, 1.0 + 2.0 * 4.0]))
