"""The per-GPU memory model of `lora-triton memory --gpus N [--fsdp [--cpu-offload]]` and its
comparison with the published FSDP-QLoRA figures (Llama-2-70B on 2 x 24 GB)."""

from __future__ import annotations

import pytest

from lora_triton.cli import main
from lora_triton.memory.estimate import (GATHERED_LAYERS, METHODS, PRESETS, PUBLISHED_70B_2GPU, TrainingSetup,
                                         cpu_offload_bytes, estimate, estimate_distributed, layer_weight_bytes)

GB = 1e9


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_shards_every_stored_tensor(method):
    shape, setup = PRESETS["13b"], TrainingSetup(batch=2, seq=1024)
    single = estimate(shape, setup, method)
    for gpus in (2, 4, 8):
        per_gpu = estimate_distributed(shape, setup, method, gpus)
        working = GATHERED_LAYERS * layer_weight_bytes(shape, setup, method)
        if method == "qlora":
            working += 5120 * 13824 * setup.compute_bytes  # the largest projection, dequantized
        assert per_gpu.weights == -(-single.weights // gpus) + working
        for name in ("adapter", "gradients", "optimizer"):
            assert getattr(per_gpu, name) == -(-getattr(single, name) // gpus), name
        assert per_gpu.activations == single.activations  # each GPU its own batch
    assert estimate_distributed(shape, setup, method, 1).total == pytest.approx(single.total, rel=0)


def test_cpu_offload_leaves_the_gathered_layers_and_activations():
    shape, setup = PRESETS["70b"], TrainingSetup()
    off = estimate_distributed(shape, setup, "qlora", 2, cpu_offload=True)
    assert off.adapter == off.gradients == off.optimizer == 0
    assert off.weights < 1.5 * GB and off.activations == estimate(shape, setup, "qlora").activations
    assert cpu_offload_bytes(shape, setup, "qlora", 2) == pytest.approx(
        sum(getattr(estimate(shape, setup, "qlora"), n) for n in ("weights", "adapter", "gradients", "optimizer")) / 2,
        abs=1)


def test_ddp_replicates_and_adds_gradient_buckets():
    shape, setup = PRESETS["7b"], TrainingSetup()
    single, ddp = estimate(shape, setup, "qlora"), estimate_distributed(shape, setup, "qlora", 4, fsdp=False)
    assert (ddp.weights, ddp.optimizer, ddp.gradients) == (single.weights, single.optimizer, 2 * single.gradients)
    with pytest.raises(ValueError, match="cpu_offload needs fsdp"):
        estimate_distributed(shape, setup, "qlora", 2, fsdp=False, cpu_offload=True)


def test_70b_on_two_24gb_gpus_against_the_published_figures():
    """Published (PEFT's FSDP guide): 35.6 GB per GPU without CPU offload, 19.6 GB with it, at
    2 x 2048 tokens per GPU, r=8. The model counts only live tensors (no CUDA context, NCCL,
    allocator reserve), so it is lower, and it draws the same conclusion: offload is needed
    at this batch on 24 GB cards, and at 1 x 512 tokens 70B fits without it."""
    shape, pub = PRESETS["70b"], PUBLISHED_70B_2GPU
    no_offload = estimate_distributed(shape, pub["setup"], "qlora", 2).total / GB
    offload = estimate_distributed(shape, pub["setup"], "qlora", 2, cpu_offload=True).total / GB
    assert 0.7 * pub["gpu_gb_no_offload"] < no_offload < pub["gpu_gb_no_offload"]
    assert 0.4 * pub["gpu_gb_cpu_offload"] < offload < pub["gpu_gb_cpu_offload"]
    assert no_offload > 24 > offload
    assert estimate_distributed(shape, TrainingSetup(), "qlora", 2).total / GB < 24
    # the NF4 shard alone: half of 70B at 4.127 bits per weight, plus half the 16-bit embeddings and head
    weights = estimate(shape, pub["setup"], "qlora").weights / 2 / GB
    assert 17.5 < weights < 18.5


def test_cli_prints_the_per_gpu_table_and_the_published_figures(capsys):
    assert main(["memory", "70b", "--gpus", "2", "--fsdp", "--batch", "2", "--seq", "2048", "--rank", "8"]) == 0
    out = capsys.readouterr().out
    assert "per GPU, FSDP over 2 GPU(s):" in out and "batch 2 x seq 2048 per GPU" in out
    assert "35.6 GB measured, 28.5 GB estimated here" in out and "19.6 GB measured, 9.5 GB estimated here" in out
    assert main(["memory", "13b", "--gpus", "4", "--fsdp", "--cpu-offload"]) == 0
    out = capsys.readouterr().out
    assert "CPU offload" in out and "CPU memory per process" in out and "published" not in out
    assert main(["memory", "7b", "--gpus", "2"]) == 0 and "per GPU, DDP over 2 GPUs" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--cpu-offload needs --fsdp"):
        main(["memory", "7b", "--gpus", "2", "--cpu-offload"])
