"""Forgetting protection: exactness at energy 1.0, the drift bound below it, free dimension and
full layers, state save/load, the single fused call."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora_triton.modules import LoRALinear4bit
from lora_triton.testing import relative_error
from lora_triton.training import ContinualLoRA, ContinualLoRALinear4bit, extend_basis

K, HIDDEN, OUT = 48, 40, 12


def small_model(k: int = K) -> nn.Sequential:
    """Three NF4 LoRA layers with nonlinearities (everything but the adapters is frozen)."""
    torch.manual_seed(0)
    return nn.Sequential(LoRALinear4bit.from_linear(nn.Linear(k, HIDDEN)), nn.GELU(),
                         LoRALinear4bit.from_linear(nn.Linear(HIDDEN, HIDDEN)), nn.Tanh(),
                         LoRALinear4bit.from_linear(nn.Linear(HIDDEN, OUT)))


def train_task(model, params, x, y, steps: int = 40, lr: float = 3e-2) -> None:
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def run_tasks(energy: float, n_tasks: int = 3, rows: int = 2, r: int = 4):
    """Train ``n_tasks`` random regression tasks in turn; return (manager, inputs, outputs
    right after each task)."""
    model = small_model()
    cl = ContinualLoRA(model, energy=energy, r=r, lora_alpha=8)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(rows, 5, K, generator=gen) for _ in range(n_tasks)]
    ys = [torch.randn(rows, 5, OUT, generator=gen) for _ in range(n_tasks)]
    after = []
    for t in range(n_tasks):
        params = cl.begin_task(f"task{t}")
        train_task(model, params, xs[t], ys[t])
        cl.end_task([xs[t][:1], xs[t][1:]])  # two calibration batches (10 tokens per task)
        with torch.no_grad():
            after.append(model(xs[t]))
    return cl, xs, after


def test_energy_one_keeps_earlier_outputs_exactly():
    cl, xs, after = run_tasks(energy=1.0)
    with torch.no_grad():
        for t in range(len(xs) - 1):
            now = cl.model(xs[t])
            err = float((now - after[t]).abs().max() / after[t].abs().max())
            assert err < 1e-5, f"task {t}: outputs moved by {err:.2e} (relative)"
    # the later tasks did learn something (otherwise exactness would be trivial)
    assert not cl.full_layers()
    assert all(float(layer.lora_B["task2"].weight.abs().max()) > 1e-2 for layer in cl.layers.values())


def test_without_constraint_earlier_outputs_do_move():
    cl, xs, after = run_tasks(energy=0.0)  # plain stacked blocks: the test above can fail
    with torch.no_grad():
        err = float((cl.model(xs[0]) - after[0]).abs().max() / after[0].abs().max())
    assert err > 1e-2


@pytest.mark.parametrize("energy, rel_threshold, exclude_top", [(0.9, 0.0, False), (0.9, 0.0, True),
                                                                (0.0, 0.05, False)])
def test_drift_is_within_the_bound_below_energy_one(energy, rel_threshold, exclude_top):
    """Per layer, with the layer's own calibration inputs of task 0 fixed:
    ||dY||_F <= sqrt(e_0) * sum_{t>0} s_t ||B_t A_t^eff||_2, and e_0 <= (1-energy) ||X||_F^2 (energy
    rule), e_0 <= (1-energy) (||X||_F^2 - lambda_max) (exclude_top) or
    e_0 <= (K - d) * rel_threshold * lambda_max (relative spectral threshold), lambda_max of X^T X."""
    torch.manual_seed(3)
    layer = ContinualLoRALinear4bit.from_lora_layer(LoRALinear4bit.from_linear(nn.Linear(K, OUT)))
    cl = ContinualLoRA(layer, energy=energy, rel_threshold=rel_threshold, exclude_top=exclude_top, r=4, lora_alpha=8)
    # task 0 inputs with a decaying spectrum, so 90% energy leaves a real residual; a common
    # offset (like a mean activation) gives them one dominant direction
    x0 = torch.randn(64, K) @ torch.diag(torch.logspace(0, -1.5, K)) + 0.5
    cl.begin_task("t0")
    train_task(layer, cl.trainable_parameters(), x0, torch.randn(64, OUT))
    stats = cl.end_task([x0])[""]
    free_after_t0 = layer.free_dim
    before = layer(x0).detach()
    for t in (1, 2):
        params = cl.begin_task(f"t{t}")
        train_task(layer, params, torch.randn(64, K), torch.randn(64, OUT), steps=60)
        drift = float((layer(x0).detach() - before).norm())
        bound = layer.drift_bound("t0")
        assert 0 < drift <= bound * (1 + 1e-5) + 1e-6, (drift, bound)
        assert drift > 1e-3 * bound  # the bound is not vacuous here
        cl.end_task([torch.randn(64, K)])
    assert stats.discarded_energy > 0
    lam_max = float(torch.linalg.eigvalsh(x0.double().T @ x0.double())[-1])
    if exclude_top:
        assert stats.discarded_energy <= (1 - energy) * (stats.total_energy - lam_max) * (1 + 1e-6)
    if rel_threshold == 0.0:
        assert stats.discarded_energy <= (1 - energy) * stats.total_energy * (1 + 1e-9)
        norm_sum = layer.drift_bound("t0") / math.sqrt(stats.discarded_energy)
        assert layer.drift_bound("t0") <= math.sqrt(1 - energy) * float(x0.norm()) * norm_sum * (1 + 1e-6)
    else:
        assert stats.discarded_energy <= free_after_t0 * rel_threshold * lam_max * (1 + 1e-9)


def test_extend_basis_energy_and_nesting():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, 16, dtype=torch.float64)
    gram = x.T @ x
    empty = torch.zeros(16, 0, dtype=torch.float64)
    basis, stats = extend_basis(empty, gram, 0.95)
    kept = float(torch.trace(basis.T @ gram @ basis))
    assert kept >= 0.95 * stats.total_energy and 0 < basis.shape[1] < 16
    smaller, _ = extend_basis(empty, gram, 0.95 * kept / stats.total_energy - 1e-3)
    assert smaller.shape[1] < basis.shape[1]  # minimal: one direction fewer would not do
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-12)
    grown, _ = extend_basis(basis, torch.randn(30, 16, generator=gen, dtype=torch.float64).T.square() @
                            torch.ones(30, 1, dtype=torch.float64) @ torch.ones(1, 16, dtype=torch.float64), 1.0)
    assert torch.equal(grown[:, :basis.shape[1]], basis)  # earlier columns are kept as they were
    assert extend_basis(empty, gram, 0.0)[0].shape[1] == 0
    # relative spectral threshold: exactly the eigen-directions above rel_threshold * lambda_max
    eig = torch.linalg.eigvalsh(gram)
    tau = 0.5 * float(eig[-4] + eig[-5]) / float(eig[-1])  # between the 4th and 5th largest
    thresholded, t_stats = extend_basis(empty, gram, 0.0, rel_threshold=tau)
    assert thresholded.shape[1] == 4 and t_stats.discarded_energy <= 12 * tau * float(eig[-1])
    assert torch.allclose(thresholded @ thresholded.T, basis[:, :4] @ basis[:, :4].T, atol=1e-8)
    # exclude_top: the dominant (mean-like) direction is protected, energy counts the rest
    shifted = x + 3.0
    g2 = shifted.T @ shifted
    top = float(torch.linalg.eigvalsh(g2)[-1])
    plain, _ = extend_basis(empty, g2, 0.95)
    varied, v_stats = extend_basis(empty, g2, 0.95, exclude_top=True)
    assert varied.shape[1] > plain.shape[1]
    assert v_stats.discarded_energy <= 0.05 * (v_stats.total_energy - top) * (1 + 1e-9)
    low_rank = torch.randn(5, 16, generator=gen, dtype=torch.float64)
    assert extend_basis(empty, low_rank.T @ low_rank, 1.0)[0].shape[1] == 5  # numerical rank, not K


def test_free_dimension_and_full_layer_warning():
    model = small_model(k=8)
    cl = ContinualLoRA(model, energy=1.0, r=2)
    cl.begin_task("a")
    cl.end_task([torch.randn(20, 8)])  # 20 generic inputs span all of R^8
    free = cl.free_dims()
    assert free["0"] == 0 and free["2"] == HIDDEN - 20  # K = 8 is full; 20 tokens use 20 of 40
    assert "0" in cl.full_layers()
    assert "FULL" in cl.report().splitlines()[1]
    with pytest.warns(UserWarning, match="FULL"):
        cl.begin_task("b")
    layer = cl.layers["0"]
    a_eff = layer.stacked_adapter()[0].detach()
    assert float(a_eff[-2:].abs().max()) < 1e-6  # the new block's A is projected to zero


def test_stack_is_one_fused_call_of_the_summed_rank(monkeypatch):
    import lora_triton.training.continual as continual

    cl, xs, _ = run_tasks(energy=1.0, n_tasks=2)
    layer = cl.layers["4"]
    calls = []
    real = continual.lora_nf4_linear
    monkeypatch.setattr(continual, "lora_nf4_linear", lambda *a, **k: calls.append(a) or real(*a, **k))
    x = torch.randn(7, HIDDEN)
    y = layer(x)
    assert len(calls) == 1 and calls[0][2].shape == (8, HIDDEN) and calls[0][3].shape == (OUT, 8)
    expected = layer.base_layer(x) + sum(layer.scaling[n] * x @ layer.lora_A[n].weight.T @ layer.lora_B[n].weight.T
                                         for n in ("task0", "task1"))
    assert torch.allclose(y, expected, atol=1e-5)


def test_state_save_and_load_roundtrip(tmp_path):
    cl, xs, _ = run_tasks(energy=0.99, n_tasks=2)
    cl.begin_task("open")  # an open task is restored as open (trainable, constrained)
    path = tmp_path / "continual.safetensors"
    cl.save(str(path))
    fresh_model = small_model()  # same seed: same NF4 bases
    fresh = ContinualLoRA(fresh_model, energy=0.5)
    fresh.load(str(path))
    assert fresh.energy == 0.99 and fresh.tasks == ["task0", "task1", "open"]
    for name, layer in cl.layers.items():
        other = fresh.layers[name]
        assert torch.equal(other.basis, layer.basis) and other.open_task == "open"
        assert other.task_stats == layer.task_stats
    assert {id(p) for p in fresh.trainable_parameters()} == {id(fresh.layers[n].lora_A["open"].weight)
                                                            for n in fresh.layers} | \
        {id(fresh.layers[n].lora_B["open"].weight) for n in fresh.layers}
    x = torch.randn(4, K)
    assert torch.equal(fresh.model(x), cl.model(x))
    # the full module state dict (bases included) round-trips too
    again = ContinualLoRA(small_model(), energy=0.99)
    again.model.load_state_dict(cl.model.state_dict())
    assert torch.equal(again.model(x), cl.model(x))


def test_begin_task_twice_is_an_error():
    cl = ContinualLoRA(small_model())
    cl.begin_task("a")
    with pytest.raises(RuntimeError, match="still open"):
        cl.begin_task("b")


# ------------------------------------------------------------------ soft protection (drift penalty)
def old_task_subspace(k: int = 12, seed: int = 5):
    """float64 inputs of an old task ``x1 [80, k]`` (decaying spectrum) and a new one ``x2 [50, k]``
    (shifted), the old task's basis ``u1`` (energy 0.8) and residual factor ``f1`` (full rank)."""
    from lora_triton.training.subspace import residual_factor

    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn(80, k, generator=gen, dtype=torch.float64) * torch.logspace(0, -1, k, dtype=torch.float64)
    x2 = torch.randn(50, k, generator=gen, dtype=torch.float64) + 0.3
    u1, _ = extend_basis(torch.zeros(k, 0, dtype=torch.float64), x1.T @ x1, 0.8)
    return x1, x2, u1, residual_factor(u1, x1.T @ x1 / 80, torch.zeros(k, 0), max_rank=k)


def test_residual_factor_is_the_second_moment_outside_the_basis():
    from lora_triton.training.subspace import residual_factor

    k = 12
    x1, x2, u1, f1 = old_task_subspace(k)
    p1 = torch.eye(k, dtype=torch.float64) - u1 @ u1.T
    assert torch.allclose(f1.double() @ f1.double().T, p1 @ (x1.T @ x1 / 80) @ p1, atol=1e-6)
    assert float((u1.T @ f1.double()).abs().max()) < 1e-6
    # a second task: the basis grows, the earlier residual is projected out of it and the two add
    u2, _ = extend_basis(u1, x2.T @ x2, 0.8)
    f2 = residual_factor(u2, x2.T @ x2 / 50, f1, max_rank=k)
    p2 = torch.eye(k, dtype=torch.float64) - u2 @ u2.T
    want = p2 @ (x1.T @ x1 / 80 + x2.T @ x2 / 50) @ p2
    assert torch.allclose(f2.double() @ f2.double().T, want, atol=1e-5)
    # truncation keeps the largest directions, largest first
    f_small = residual_factor(u2, x2.T @ x2 / 50, f1, max_rank=2)
    top2 = torch.linalg.eigvalsh(want).flip(0)[:2]
    assert f_small.shape == (k, 2) and torch.allclose(f_small.double().norm(dim=0) ** 2, top2, rtol=1e-5)


def test_drift_penalty_is_the_mean_squared_output_change_on_earlier_inputs():
    """With the full residual kept, ``penalty / drift_penalty`` equals sum over earlier tasks of
    mean_token ||dY||^2 on their calibration inputs, dY the change the open block makes."""
    torch.manual_seed(4)
    layer = ContinualLoRALinear4bit.from_lora_layer(LoRALinear4bit.from_linear(nn.Linear(K, OUT)))
    cl = ContinualLoRA(layer, energy=0.9, r=4, lora_alpha=8, drift_penalty=2.5, residual_rank=K, shrinkage=0.0)
    olds = [torch.randn(64, K) @ torch.diag(torch.logspace(0, -1.5, K)) + 0.5, torch.randn(40, K) - 0.2]
    for t, x in enumerate(olds):
        cl.begin_task(f"t{t}")
        if t == 0:
            assert float(cl.penalty()) == 0.0  # nothing to protect yet
        train_task(layer, cl.trainable_parameters(), x, torch.randn(x.shape[0], OUT))
        cl.end_task([x[:20], x[20:]])
    cl.begin_task("new")
    train_task(layer, cl.trainable_parameters(), torch.randn(64, K), torch.randn(64, OUT), steps=30)
    with torch.no_grad():
        open_a = layer.constrained(layer.lora_A["new"].weight.double())
        delta = layer.scaling["new"] * layer.lora_B["new"].weight.double() @ open_a
        expected = sum(float((x.double() @ delta.T).square().sum(1).mean()) for x in olds)
        got = float(cl.penalty()) / 2.5
    assert expected > 1e-4  # the open block does change the earlier outputs (energy 0.9 < 1)
    assert got == pytest.approx(expected, rel=1e-4)
    # shrinkage adds rho * mu * ||s B A_eff||_F^2, mu the mean residual eigenvalue on the free subspace
    cl.shrinkage = 0.5
    mu = float(layer.residual.double().square().sum()) / layer.free_dim
    shrunk = float(cl.penalty()) / 2.5
    assert shrunk == pytest.approx(expected + 0.5 * mu * float(delta.square().sum()), rel=1e-4)


def test_drift_penalty_reduces_drift_and_still_learns():
    """Same tasks with and without the penalty at energy 0.9: the penalty shrinks the change of
    task 0's outputs; the new task is still fitted better than by the frozen stack."""
    def run(penalty: float):
        torch.manual_seed(3)
        layer = ContinualLoRALinear4bit.from_lora_layer(LoRALinear4bit.from_linear(nn.Linear(K, OUT)))
        cl = ContinualLoRA(layer, energy=0.9, r=4, lora_alpha=8, drift_penalty=penalty, shrinkage=0.0)
        gen = torch.Generator().manual_seed(8)
        x0 = torch.randn(64, K, generator=gen) @ torch.diag(torch.logspace(0, -1.5, K)) + 0.5
        x1, y1 = torch.randn(64, K, generator=gen), torch.randn(64, OUT, generator=gen)
        cl.begin_task("t0")
        train_task(layer, cl.trainable_parameters(), x0, torch.randn(64, OUT, generator=gen))
        cl.end_task([x0])
        with torch.no_grad():
            before, fit_before = layer(x0), float(((layer(x1) - y1) ** 2).mean())
        params = cl.begin_task("t1")
        opt = torch.optim.Adam(params, lr=3e-2)
        for _ in range(60):
            loss = ((layer(x1) - y1) ** 2).mean() + cl.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return float((layer(x0) - before).norm() / before.norm()), fit_before, float(((layer(x1) - y1) ** 2).mean())

    free_drift, _, free_fit = run(0.0)
    drift, fit_before, fit = run(10.0)
    print(f"drift {drift:.3e} vs {free_drift:.3e} unpenalised; fit {fit:.3f} (from {fit_before:.3f}, "
          f"unpenalised {free_fit:.3f})")
    assert drift < 0.3 * free_drift, (drift, free_drift)
    assert fit < 0.9 * fit_before, (fit, fit_before)


def test_drift_penalty_settings_are_validated_and_saved(tmp_path):
    with pytest.raises(ValueError, match="drift_penalty"):
        ContinualLoRA(small_model(), drift_penalty=-1.0)
    model = small_model()
    cl = ContinualLoRA(model, energy=0.9, r=2, drift_penalty=3.0, residual_rank=6, shrinkage=0.25)
    cl.begin_task("a")
    cl.end_task([torch.randn(30, K)])
    cl.begin_task("b")
    assert all(layer.residual.shape[1] == 6 for layer in cl.layers.values())
    path = tmp_path / "cl.safetensors"
    cl.save(str(path))
    fresh = ContinualLoRA(small_model(), energy=0.5)
    fresh.load(str(path))
    assert fresh.drift_penalty == 3.0 and fresh.residual_rank == 6 and fresh.shrinkage == 0.25
    for name, layer in cl.layers.items():
        assert torch.equal(fresh.layers[name].residual, layer.residual)
    assert float(fresh.penalty()) == pytest.approx(float(cl.penalty()))


# ------------------------------------------------------------------ warm start of a new block
def test_free_directions_solve_the_generalized_eigenproblem():
    """Rows are unit, orthogonal to U, satisfy P C v = lambda (F F^T + floor P) v on the free
    subspace with descending lambda, and the best beats every random free direction."""
    from lora_triton.training.subspace import free_directions

    k = 16
    _, x_new, u, f = old_task_subspace(k, seed=9)
    gen = torch.Generator().manual_seed(10)
    floor = 0.05
    c = x_new.T @ x_new / x_new.shape[0]
    rows = free_directions(u, c, f, floor, count=3)
    p = torch.eye(k, dtype=torch.float64) - u @ u.T
    metric = f.double() @ f.double().T + floor * p
    assert rows.shape == (3, k)
    assert torch.allclose(rows.norm(dim=1), torch.ones(3, dtype=torch.float64))
    assert float((rows @ u).abs().max()) < 1e-10
    ratios = []
    for v in rows:
        lam = float(v @ c @ v) / float(v @ metric @ v)
        residual = p @ (c @ v - lam * metric @ v)
        assert float(residual.norm()) < 1e-8 * float((c @ v).norm()), lam
        ratios.append(lam)
    assert ratios == sorted(ratios, reverse=True) and ratios[0] > ratios[-1]
    random = torch.randn(200, k, generator=gen, dtype=torch.float64) @ p
    random_ratios = ((random @ c) * random).sum(1) / ((random @ metric) * random).sum(1)
    assert ratios[0] >= float(random_ratios.max())
    # no residual (penalty off): the new task's principal directions in the free subspace
    pca = free_directions(u, c, torch.zeros(k, 0), 0.0, count=2)
    top = torch.linalg.eigh(p @ c @ p).eigenvectors[:, -1]
    assert float((pca[0] @ top).abs()) == pytest.approx(1.0, abs=1e-8)


def test_warm_start_keeps_the_output_and_points_a_at_free_directions():
    torch.manual_seed(2)
    model = small_model()
    cl = ContinualLoRA(model, energy=0.9, r=3, lora_alpha=8, drift_penalty=1.0, shrinkage=0.35)
    x_old, x_new = torch.randn(4, 6, K) @ torch.diag(torch.logspace(0, -1, K)) + 0.3, torch.randn(4, 6, K)
    params = cl.begin_task("old")
    train_task(model, params, x_old, torch.randn(4, 6, OUT))
    cl.end_task([x_old[:2], x_old[2:]])
    with torch.no_grad():
        before = model(x_new)
    cl.begin_task("new", warm_start=[x_new[:2], x_new[2:]])
    with torch.no_grad():
        # B = 0: the output is unchanged at step 0 up to fp32 rounding (the new block changes the
        # shapes of the stacked adapter's matmuls, and so the BLAS summation order on some CPUs)
        assert relative_error(model(x_new), before) < 1e-6
    first = cl.layers["0"]
    a = first.lora_A["new"].weight.detach().double()
    assert float((a @ first.basis.double()).abs().max()) < 1e-6  # rows live in the free subspace
    assert float(a.norm(dim=1).min()) > 0.1  # not collapsed: Kaiming-sized rows
    # same directions as the solver gives for this layer's inputs on the new batches
    from lora_triton.training.subspace import free_directions

    xs = x_new.reshape(-1, K).double()
    floor = 0.35 * float(first.residual.double().square().sum()) / first.free_dim
    want = free_directions(first.basis, xs.T @ xs / xs.shape[0], first.residual, floor, 3)
    cos = (a / a.norm(dim=1, keepdim=True)) @ want.T
    assert torch.allclose(cos.diag().abs(), torch.ones(3, dtype=torch.float64), atol=1e-5)
    # the same from grams computed once (they serve free_energy too); not both at once
    cl.end_task([])
    grams = cl.input_grams([x_new[:2], x_new[2:]])
    assert cl.free_energy(grams=grams) == cl.free_energy([x_new[:2], x_new[2:]])
    with pytest.raises(ValueError, match="one of the two"):
        cl.free_energy()
    torch.manual_seed(9)
    cl.begin_task("again", warm_grams=grams)
    again = first.lora_A["again"].weight.detach().double()
    assert torch.allclose((again / again.norm(dim=1, keepdim=True)).abs(), (a / a.norm(dim=1, keepdim=True)).abs(),
                          atol=1e-5)
    cl.end_task([])
    with pytest.raises(ValueError, match="not both"):
        cl.begin_task("both", warm_start=[x_new], warm_grams=grams)


def test_warm_start_needs_an_open_task():
    layer = ContinualLoRALinear4bit.from_lora_layer(LoRALinear4bit.from_linear(nn.Linear(K, OUT)))
    with pytest.raises(RuntimeError, match="open task"):
        layer.warm_start(torch.eye(K, dtype=torch.float64))


def test_warm_start_rejects_a_wrong_or_non_finite_moment():
    layer = ContinualLoRALinear4bit.from_lora_layer(LoRALinear4bit.from_linear(nn.Linear(K, OUT)))
    layer.begin_task("t")
    with pytest.raises(ValueError, match=rf"\[{K}, {K}\].*got shape \({K - 1}, {K - 1}\)"):
        layer.warm_start(torch.eye(K - 1, dtype=torch.float64))
    bad = torch.eye(K, dtype=torch.float64)
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.warm_start(bad)


def test_free_energy_measures_the_new_inputs_outside_the_basis():
    """``free_energy``: tr(P C P) / tr(C) per layer (and the same for C less its top direction):
    0 for the protected task's own inputs at energy 1, 1 for inputs orthogonal to them, and the
    plain formula for a mix."""
    torch.manual_seed(4)
    layer = ContinualLoRALinear4bit.from_lora_layer(LoRALinear4bit.from_linear(nn.Linear(K, OUT)))
    cl = ContinualLoRA(layer, energy=1.0, r=2)
    seen = torch.randn(10, 6) @ torch.linalg.qr(torch.randn(K, K)).Q[:, :6].T  # rank 6
    cl.begin_task("a")
    cl.end_task([seen])
    name, = cl.layers
    assert cl.free_energy([seen])[name]["free_energy"] < 1e-6
    u = layer.basis.double()
    other = torch.randn(12, K, dtype=torch.float64)
    other = (other - other @ u @ u.T).float()
    assert cl.free_energy([other])[name] == pytest.approx({"free_energy": 1.0, "free_variation": 1.0}, abs=1e-5)
    mix = torch.cat([seen, 0.3 * other])
    c = mix.double().T @ mix.double()
    p = torch.eye(K, dtype=torch.float64) - u @ u.T
    values, vectors = torch.linalg.eigh(c)
    rest = c - values[-1] * torch.outer(vectors[:, -1], vectors[:, -1])
    got = cl.free_energy([mix])[name]
    assert got["free_energy"] == pytest.approx(float(torch.trace(p @ c @ p) / torch.trace(c)), rel=1e-6)
    assert got["free_variation"] == pytest.approx(float(torch.trace(p @ rest @ p) / torch.trace(rest)), rel=1e-6)
    assert 0.05 < got["free_energy"] < 0.95  # a real mix, so the comparison above can fail


# ------------------------------------------------------------------ a kept adapter as the first block
def test_a_kept_adapter_is_protected_under_its_task_name():
    """A task trained as a plain adapter, converted with ``keep_adapters`` and then calibrated with
    ``end_task(..., task=name)``, gets its stats and the exact guarantee like a block trained here."""
    model = small_model()
    gen = torch.Generator().manual_seed(5)
    x0, y0 = torch.randn(2, 5, K, generator=gen), torch.randn(2, 5, OUT, generator=gen)
    train_task(model, [p for p in model.parameters() if p.requires_grad], x0, y0)
    cl = ContinualLoRA(model, energy=1.0, r=4, lora_alpha=8, keep_adapters=True)
    with torch.no_grad():
        before = cl.model(x0)
    with pytest.raises(KeyError, match="no block named"):
        cl.end_task([x0], task="missing")
    cl.end_task([x0], task="default")
    assert all("default" in layer.task_stats for layer in cl.layers.values())
    params = cl.begin_task("next")
    with pytest.raises(RuntimeError, match="is open"):
        cl.end_task([x0], task="default")
    train_task(model, params, torch.randn(2, 5, K, generator=gen), torch.randn(2, 5, OUT, generator=gen))
    with torch.no_grad():
        assert float((cl.model(x0) - before).abs().max() / before.abs().max()) < 1e-5
    assert all(layer.drift_bound("default") >= 0 for layer in cl.layers.values())


# ------------------------------------------------------------------ gradient weighting
def test_gradient_moments_are_the_per_row_sums():
    """``collect_gradient_moments`` gives, per layer, sum x x^T, sum ||g||^2 x x^T and sum g g^T with
    ``g`` = M * (gradient of the mean loss at the layer's output rows), M rows: each row's own loss
    gradient when the loss is a mean over rows."""
    from lora_triton.training.continual import collect_gradient_moments

    model = small_model()
    x, y = torch.randn(7, K), torch.randn(7, OUT)
    with torch.enable_grad(), collect_gradient_moments({"0": model[0], "2": model[2]}) as moments:
        ((model(x) - y) ** 2).mean().backward()
    # the same by hand
    h0 = model[0](x.clone().requires_grad_())
    x2 = model[1](h0)
    h2 = model[2](x2)
    g0, g2 = torch.autograd.grad(((model[4](model[3](h2)) - y) ** 2).mean(), [h0, h2])
    for name, xin, g in (("0", x, g0), ("2", x2, g2)):
        xin, g = xin.detach().double(), 7 * g.double()
        m = moments[name]
        assert m["rows"] == 7
        assert torch.allclose(m["gram"], xin.T @ xin, rtol=1e-6, atol=1e-9)
        assert torch.allclose(m["weighted_gram"], (xin * g.square().sum(1, keepdim=True)).T @ xin, rtol=1e-5,
                              atol=1e-12)
        assert torch.allclose(m["output_moment"], g.T @ g, rtol=1e-5, atol=1e-12)
        assert float(m["output_moment"].abs().max()) > 0


def regression_tasks(n_tasks: int = 3):
    """Batches ``(x, y)`` of ``n_tasks`` random regression tasks for ``small_model``."""
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 5, K, generator=gen), torch.randn(2, 5, OUT, generator=gen)) for _ in range(n_tasks)]


def mse(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean()


@pytest.mark.parametrize("weighting", ["basis", "both"])
def test_gradient_weighted_basis_keeps_the_guarantee(weighting):
    """Basis chosen on gradient-weighted inputs: at energy 1 the earlier outputs are exact (every
    row has a non-zero gradient, so the weighted inputs span the same space); below 1 the stats
    measure the plain inputs and the per-layer bound ||dY|| <= sqrt(e) sum s ||B A_eff|| holds."""
    tasks = regression_tasks()
    for energy in (1.0, 0.8):
        model = small_model()
        cl = ContinualLoRA(model, energy=energy, r=4, lora_alpha=8, gradient_weighting=weighting, loss=mse,
                           forward=lambda m, batch: m(batch[0]), drift_penalty=1.0 if weighting == "both" else 0.0)
        after, inputs = [], []
        for t, (x, y) in enumerate(tasks):
            params = cl.begin_task(f"task{t}")
            train_task(model, params, x, y)
            for p in params:
                p.grad = None
            with torch.no_grad():
                inputs.append(model[0](x).detach())  # layer 1's output on this task
                cl.end_task([(x[:1], y[:1]), (x[1:], y[1:])])
                after.append((model(x), model[2](model[1](inputs[-1]))))
            assert all(p.grad is None for p in params)  # the calibration backward accumulates no gradient
        with torch.no_grad():
            for t in range(len(tasks) - 1):
                err = float((model(tasks[t][0]) - after[t][0]).abs().max() / after[t][0].abs().max())
                if energy == 1.0:
                    assert err < 1e-5, f"task {t}: outputs moved by {err:.2e}"
                else:
                    assert err > 1e-3  # the cut is real below energy 1
                    x_mid = model[1](inputs[t])  # layer 2 on its own task-t inputs as collected
                    drift = float((model[2](x_mid) - after[t][1]).norm())
                    stats = cl.layers["2"].task_stats[f"task{t}"]
                    assert stats.total_energy == pytest.approx(float(x_mid.double().square().sum()), rel=1e-5)
                    assert drift <= cl.layers["2"].drift_bound(f"task{t}") * (1 + 1e-5) + 1e-6


@pytest.mark.parametrize("output_shrinkage", [0.0, 0.25])
def test_output_weighted_penalty_is_the_kfac_fisher_form(output_shrinkage):
    """With ``gradient_weighting="penalty"``: ``penalty / drift_penalty`` = tr(G~ dW (F F^T + rho mu P)
    dW^T), dW = s B A_eff of the open block, G~ the mean over earlier tasks of each task's output-
    gradient second moment scaled to mean eigenvalue 1 and shrunk to the identity by
    ``output_shrinkage``; a model whose loss ignores some outputs puts only that floor on them."""
    torch.manual_seed(4)
    layer = ContinualLoRALinear4bit.from_lora_layer(LoRALinear4bit.from_linear(nn.Linear(K, OUT)))
    used = OUT // 2  # the loss reads only the first half of the outputs

    def loss(model, batch):
        return ((model(batch[0])[..., :used] - batch[1][..., :used]) ** 2).mean()

    cl = ContinualLoRA(layer, energy=0.9, r=4, lora_alpha=8, drift_penalty=2.0, residual_rank=K, shrinkage=0.3,
                       gradient_weighting="penalty", loss=loss, forward=lambda m, batch: m(batch[0]),
                       output_shrinkage=output_shrinkage)
    olds = [(torch.randn(64, K) @ torch.diag(torch.logspace(0, -1.5, K)) + 0.5, torch.randn(64, OUT)),
            (torch.randn(40, K) - 0.2, torch.randn(40, OUT))]
    metrics = []
    for t, (x, y) in enumerate(olds):
        cl.begin_task(f"t{t}")
        train_task(layer, cl.trainable_parameters(), x, y)
        # each row's loss gradient at the output, by hand: d/dy of ||y - target||^2 / used on `used`
        with torch.no_grad():
            g = torch.zeros(x.shape[0], OUT, dtype=torch.float64)
            g[:, :used] = 2 * (layer(x).double()[:, :used] - y.double()[:, :used]) / used
        gg = g.T @ g
        metrics.append((1 - output_shrinkage) * gg * OUT / torch.trace(gg) +
                       output_shrinkage * torch.eye(OUT, dtype=torch.float64))
        cl.end_task([(x[:20], y[:20]), (x[20:], y[20:])])
    g_mean = sum(metrics) / len(metrics)
    ignored = g_mean[used:, used:]
    assert torch.allclose(ignored, output_shrinkage * torch.eye(OUT - used, dtype=torch.float64), atol=1e-12)
    cl.begin_task("new")
    train_task(layer, cl.trainable_parameters(), torch.randn(64, K), torch.randn(64, OUT), steps=30)
    with torch.no_grad():
        delta = layer.scaling["new"] * layer.lora_B["new"].weight.double() @ layer.constrained(
            layer.lora_A["new"].weight.double())
        f = layer.residual.double()
        p_free = torch.eye(K, dtype=torch.float64) - layer.basis.double() @ layer.basis.double().T
        mu = float(f.square().sum()) / layer.free_dim
        metric_in = f @ f.T + 0.3 * mu * p_free
        expected = float(torch.trace(g_mean @ delta @ metric_in @ delta.T))
        got = float(cl.penalty()) / 2.0
    assert expected > 1e-6
    assert got == pytest.approx(expected, rel=1e-4)
    # the unweighted penalty of the same block prices the ignored outputs too
    unweighted = float(torch.trace(delta @ metric_in @ delta.T))
    assert unweighted > 0 and abs(unweighted - expected) > 1e-3 * unweighted


def test_gradient_weighting_settings_are_validated_and_saved(tmp_path):
    with pytest.raises(ValueError, match="gradient_weighting must be"):
        ContinualLoRA(small_model(), gradient_weighting="fisher")
    with pytest.raises(ValueError, match="needs loss"):
        ContinualLoRA(small_model(), gradient_weighting="basis")
    with pytest.raises(ValueError, match="output_shrinkage"):
        ContinualLoRA(small_model(), gradient_weighting="penalty", loss=mse, output_shrinkage=1.5)
    tasks = regression_tasks(2)
    cl = ContinualLoRA(small_model(), energy=0.9, r=2, drift_penalty=1.0, residual_rank=6,
                       gradient_weighting="both", loss=mse, forward=lambda m, batch: m(batch[0]),
                       output_shrinkage=0.4)
    cl.begin_task("a")
    cl.end_task([tasks[0]])
    cl.begin_task("b")
    assert all(layer.output_factor.shape == (layer.out_features, layer.out_features) for layer in cl.layers.values())
    path = tmp_path / "cl.safetensors"
    cl.save(str(path))
    fresh = ContinualLoRA(small_model(), energy=0.5)
    fresh.load(str(path))
    assert fresh.gradient_weighting == "both" and fresh.output_shrinkage == 0.4
    for name, layer in cl.layers.items():
        assert torch.equal(fresh.layers[name].output_factor, layer.output_factor)
    assert float(fresh.penalty()) == pytest.approx(float(cl.penalty()))
    with pytest.raises(ValueError, match="needs loss"):
        fresh.end_task([tasks[1]])  # the loss is code, not state: give it again after loading


def test_adapter_names_are_refused_after_the_conversion():
    """The stacked layers run every block on every row: a mixed batch must fail loudly, not be ignored."""
    from lora_triton import inject_lora
    from lora_triton.testing import tiny_llama

    model = tiny_llama(hidden=32, vocab=64)
    inject_lora(model, r=4, adapter_name="a")
    ids = torch.randint(0, 64, (2, 5))
    model(input_ids=ids, adapter_names=["a", "__base__"])  # before the conversion: a mixed batch
    ContinualLoRA(model, keep_adapters=True, r=4)
    with pytest.raises(ValueError, match="not supported by ContinualLoRALinear4bit"):
        model(input_ids=ids, adapter_names=["a", "__base__"])
    assert model(input_ids=ids).logits.shape == (2, 5, 64)
