"""The kernel-efficiency report (lora_triton/bench/static.py): quick mode compiles for sm_90 on
this CPU machine, and its PTX/TTIR readers on small known inputs."""

from __future__ import annotations

import csv

from lora_triton.bench import static, static_analysis

PTX = """
.visible .entry k(
)
{
	mov.u32 	%r1, 0;
$L__BB0_1:
	shfl.sync.idx.b32 	%r2, %r3, %r4, 31, -1;
	mul.f32 	%f1, %f2, %f3;
	wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%f4, %f5}, {%r5, %r6, %r7, %r8}, %rd1, %p1, 1, 1, 0;
	st.shared.b16 	[%r9], %rs1;
	@%p2 bra 	$L__BB0_1;
	ret;
}
"""


def test_main_loop_and_its_operands():
    loop = static_analysis.main_loop(PTX)
    assert len(loop) == 5
    ops = static_analysis.opcode_counts(loop)
    assert ops["shfl.sync.idx.b32"] == 1 and ops["bra"] == 1
    assert static_analysis.wgmma_from_registers(loop) is True
    descriptor = [line.replace("{%r5, %r6, %r7, %r8}", "%rd7") for line in loop]
    assert static_analysis.wgmma_from_registers(descriptor) is False
    assert static_analysis.wgmma_from_registers(["mul.f32 %f1, %f2, %f3;"]) is None
    assert static_analysis.main_loop("ret;") is None


def test_a_wait_for_every_wgmma_in_the_loop_is_seen():
    loop = static_analysis.main_loop(PTX)
    assert static_analysis.waits_for_every_wgmma(loop) is False  # no wait at all: the MMA runs on
    assert static_analysis.waits_for_every_wgmma(loop + ["wgmma.wait_group.sync.aligned 1;"]) is False
    assert static_analysis.waits_for_every_wgmma(loop + ["wgmma.wait_group.sync.aligned 0;"]) is True
    assert static_analysis.waits_for_every_wgmma(["wgmma.wait_group.sync.aligned 0;", "ret;"]) is None


# The shape of triton.tools.disasm.get_sass's text: control codes, a tab, the instruction; labels.
SASS = """
--:-:-:-:2	MOV R1, c[0x0][0x28] ;
LBB0:
--:-:-:-:1	SHFL.IDX PT, R2, R3, R4, 0x1f ;
--:-:-:-:4	FMUL R5, R2, R6 ;
--:-:-:-:5	@P0 BRA LBB1;
--:-:-:-:1	IADD3 R7, R7, 0x1, RZ ;
--:-:-:-:5	@!P1 BRA LBB0;
LBB1:
--:-:-:Y:0	EXIT ;
"""


def test_sass_main_loop_is_the_span_back_to_its_label():
    loop = static_analysis.sass_main_loop(SASS)
    assert [line.split()[0] for line in loop] == ["SHFL.IDX", "FMUL", "@P0", "IADD3", "@!P1"]
    assert static_analysis.sass_main_loop("--:-:-:-:1\tEXIT ;") is None


def test_loop_loads_of_the_code_table_are_counted():
    ttir = """
    %0 = tt.splat %code_ptr : !tt.ptr<f32> -> tensor<64x64x!tt.ptr<f32>>
    %t = tt.splat %code_ptr : !tt.ptr<f32> -> tensor<16x!tt.ptr<f32>>
    %9 = tt.load %t : tensor<16x!tt.ptr<f32>>
    %r:2 = scf.for %k = %a to %b step %c iter_args(%x = %y) -> (tensor<64x64xf32>) {
      %1 = tt.addptr %0, %idx : tensor<64x64x!tt.ptr<f32>>, tensor<64x64xi32>
      %2 = tt.load %1 : tensor<64x64x!tt.ptr<f32>>
      %3 = tt.load %other : tensor<64x64x!tt.ptr<f32>>
      scf.yield %2 : tensor<64x64xf32>
    }
    %4 = tt.load %1 : tensor<64x64x!tt.ptr<f32>>
    """
    assert static_analysis.loop_loads_of(ttir, "code_ptr", 2) == 1


def test_budget_misses_name_what_is_over():
    budget = static.Budget(loop_ptx_per_weight_elem=3.0, spills=0, regs=128)
    row = dict(loop_ptx_per_weight_elem=3.5, spills=8, regs=130, wgmma_serialized=True)
    assert len(budget.misses(row)) == 4
    assert budget.misses(dict(loop_ptx_per_weight_elem=2.9, spills=0, regs=96, wgmma_serialized=False)) == []


def test_quick_report_compiles_every_dispatched_kernel_for_the_four_named_gpus(tmp_path, capsys):
    code = static.run_static(str(tmp_path), quick=True, workers=2)
    rows = list(csv.DictReader(open(tmp_path / "static.csv")))
    assert set(static.FIELDS) <= set(rows[0])
    assert {r["arch"] for r in rows} == {"sm_80", "sm_86", "sm_89", "sm_90"}
    dispatched = static.dispatched_kernels()
    assert {"dequant", "s", "uniform", "multi_shrink", "multi_expand"} <= dispatched
    for arch in ("sm_80", "sm_86", "sm_89", "sm_90"):
        here = [r for r in rows if r["arch"] == arch]
        assert {r["kernel"] for r in here if r["offered"] == "True"} >= dispatched | {"skinny", "skinny_m"}
        for r in here:
            assert not r["error"].startswith("compile failed"), r
            if r["offered"] == "True":  # what the package launches there fits there, within its own estimate
                assert r["fits"] == "True" and int(r["smem_bytes"]) <= int(r["smem_limit"]), r
                assert int(r["smem_bytes"]) <= int(r["smem_estimate"]) or r["smem_estimate"] == "0", r
    # ordinary QLoRA training on an RTX 4090 / A100: the S kernel with dropout at rank 128, half precision
    for arch, limit in (("sm_89", 101_376), ("sm_86", 101_376), ("sm_80", 166_912)):
        s_rows = [r for r in rows if r["kernel"] == "s" and r["arch"] == arch and "r=128" in r["variant"]]
        assert s_rows and all(int(r["smem_bytes"]) <= limit for r in s_rows)
    hopper = {r["kernel"]: r for r in rows if r["arch"] == "sm_90" and "dtype=bf16 r=16" in r["variant"]}
    assert hopper["skinny"]["weight_operand_from_registers"] == "True"  # swap-AB: the weight is wgmma's A
    assert hopper["skinny"]["wgmma_serialized"] == "False" and hopper["skinny"]["spills"] == "0"
    assert int(hopper["skinny"]["regs"]) <= 128
    medium = hopper["skinny_m"]
    assert medium["config"].startswith("BLOCK_M32 ") and medium["weight_operand_from_registers"] == "True"
    assert medium["wgmma_serialized"] == "False" and medium["spills"] == "0" and int(medium["regs"]) <= 168
    assert all(r["lut_global_gathers"] == "0" for r in rows)  # the table lives in registers
    failed = [r for r in rows if r["error"] and (r["offered"] == "True" or r["dispatched"] == "True")]
    assert code == (1 if failed else 0)
    assert "static:" in capsys.readouterr().out


def _row(**fields):
    row = dict(kernel="s", arch="sm_89", offered=True, dispatched=True, fits=True, smem_bytes=50_000,
               smem_estimate=60_000, smem_limit=101_376, regs=96, spills=0, error="")
    row.update(fields)
    return row


def test_the_report_fails_offered_rows_that_cannot_launch_or_spill():
    bf16 = static.Build("s", {}, 4, 3, dict(dtype="bf16", r=128))
    fp32 = static.Build("s", {}, 4, 3, dict(dtype="fp32", r=128))
    assert static.problems(_row(), bf16) == []
    assert "does not fit" in static.problems(_row(fits=False, smem_bytes=114_688), bf16)[0]
    assert "above the kernel's estimate" in static.problems(_row(smem_estimate=40_000), bf16)[0]
    assert "spills" in static.problems(_row(spills=8), bf16)[0]
    assert static.problems(_row(spills=8), fp32) == []  # fp32 (FMA dots) may spill; it is not the budget's case
    assert static.problems(_row(spills=8, dispatched=False), bf16) == []
    assert static.problems(_row(offered=False, fits=False), bf16) == []  # never launched there


def test_skinny_rows_are_dispatched_by_the_config_the_table_ships(monkeypatch):
    """A shipped skinny point makes exactly its config (merged over the default for its rank and M bucket)
    a dispatched row, compiled even in quick mode, under the budget of its token tile."""
    from lora_triton.ops import configs, dispatch

    shipped = dict(block_m=32, block_n=256, block_k=64, num_warps=8, num_stages=2, maxnreg=168, s_first=False,
                   scale_weights=True)
    table = {"format": 1, "gpus": {"NVIDIA H200": {"forward": [
        {"m_bucket": 64, "n": 4096, "k": 4096, "r": 16, "candidate": "skinny", "config": shipped},
        {"m_bucket": 4, "n": 4096, "k": 4096, "r": 16, "candidate": "skinny", "config": {"split_k": 8}}]}}}
    monkeypatch.setattr(dispatch, "load_table", lambda: table)
    limits = configs.named_archs()[90]
    assert static.shipped_skinny_configs(limits) == [dict(configs.skinny_default(16, 64, 2, limits), **shipped),
                                                     dict(configs.skinny_default(16, 4, 2, limits), split_k=8)]
    variant = dict(dtype="bf16", r=16, table="shfl")
    quick = static._skinny_builds(True, variant, limits)
    dispatched = static.dispatched_kernels()
    marked = [b for b in quick if static.is_dispatched(b, dispatched, limits)]
    assert [(b.kernel, b.config.get("SCALE_WEIGHTS", False)) for b in marked] == [("skinny", False), ("skinny_m", True)]
    decode_default = configs.configs().skinny["decode"]
    assert marked[0] == static._skinny_build(decode_default, variant)  # split_k is not a compile option
    medium_default = static._skinny_build(configs.skinny_default(16, 17), variant)
    assert medium_default in quick and not static.is_dispatched(medium_default, dispatched, limits)
    gather = static._skinny_build(shipped, dict(variant, table="gather"))
    assert not static.is_dispatched(gather, dispatched, limits)
    assert static.BUDGETS[marked[1].kernel].regs == 168


def test_every_candidate_says_which_kernels_it_launches():
    """The report's map of candidates to kernels covers each registry of ``ops.candidates`` exactly (a new
    candidate must say what it launches), and names only kernels the report compiles."""
    from lora_triton.ops import candidates

    assert set(static.OPERATION_KERNELS) == set(candidates.REGISTRIES)
    for operation, registry in candidates.REGISTRIES.items():
        assert set(static.OPERATION_KERNELS[operation]) == set(registry), operation
        assert set(candidates.RULE[operation]) <= set(registry), operation
        for kernels in static.OPERATION_KERNELS[operation].values():
            assert kernels <= set(static.KERNELS), (operation, kernels)
    assert static.ALWAYS_LAUNCHED <= set(static.KERNELS)


def test_the_tile_kernels_fixed_tile_is_compiled_and_offered_on_every_arch():
    """The fused and dx kernels run their fixed tile without autotuning: quick mode compiles it, the full
    report compiles it beside the autotune tiles, and it is an offered row on every named arch."""
    from lora_triton.ops import configs

    for limits in configs.named_archs().values():
        for kernel in ("fused", "dx"):
            for variant in static.QUICK_VARIANTS:
                variant = dict(variant, table="shfl")
                fixed = static.kernel_builds(kernel, True, variant, limits)
                assert len(fixed) == 1 and static.is_offered(fixed[0], limits), (kernel, variant, limits)
                assert fixed[0] in static.kernel_builds(kernel, False, variant, limits)
