"""Compile one Triton kernel for a CUDA target on a CPU machine and read what the compiler made.

``compile_kernel`` builds the ``ASTSource`` exactly as ``JITFunction.run`` would for a launch
with the given argument values (argument types, 16-byte alignment and ``== 1``
specialization, ``do_not_specialize``) and compiles it for ``sm_<arch>`` with the triton that is
imported; no GPU is needed (the wheel ships ptxas). ``analyze`` turns the PTX, the TTIR and
ptxas' log into the numbers of the kernel-efficiency report (``static.py``).
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections import Counter
from dataclasses import dataclass

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_LABEL = re.compile(r"^(\$L__\w+):")
_BACK_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_OPCODE = re.compile(r"^(?:@!?%\w+\s+)?([a-z][\w.:]*)")
_SHARED_OPS = ("st.shared", "ld.shared", "ldmatrix", "stmatrix")
#: ptxas' warning that a wgmma pipeline is serialized (each MMA waits for the previous one).
WGMMA_SERIALIZED = "C7515"


def compile_kernel(fn, args: dict, num_warps: int, num_stages: int, arch: int = 90, options: dict | None = None):
    """``(CompiledKernel, ptxas log)`` of ``fn`` (a ``JITFunction``) for ``args`` (every parameter by
    name: tensors stand in for pointers, only their dtype and alignment matter)."""
    import triton
    from triton import knobs
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    signature, constexprs, attrs = {}, {}, {}
    for i, kp in enumerate(fn.params):
        value = args[kp.name]
        if kp.is_constexpr:
            signature[kp.name], constexprs[kp.name] = "constexpr", value
            continue
        ty, key = native_specialize_impl(CUDABackend, value, kp.is_const, not kp.do_not_specialize,
                                         not kp.do_not_specialize_on_alignment)
        signature[kp.name] = ty
        if ty == "constexpr":  # an int equal to 1
            constexprs[kp.name] = key
        elif isinstance(key, str):
            attrs[(i,)] = CUDABackend.parse_attr(key)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v (registers, spills, warnings) goes to stdout
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages, **(options or {})})
    return compiled, log.getvalue()


def _instructions(lines: list[str]) -> list[str]:
    """PTX instruction lines (no labels, directives, braces or comments)."""
    out = []
    for line in lines:
        text = line.strip()
        if not text or text.startswith(("//", ".", "{", "}")) or text.endswith(":") or not text.endswith(";"):
            continue
        out.append(text)
    return out


def _longest_loop(lines: list[str], label: re.Pattern, back_branch: re.Pattern, instructions) -> list[str] | None:
    """``instructions(span)`` of the longest span of ``lines`` from a label to a backward branch to
    it (Triton emits one basic-block chain per ``for``), or None when there is no loop."""
    labels, best = {}, None
    for i, line in enumerate(lines):
        if m := label.match(line.strip()):
            labels[m.group(1)] = i
        if (m := back_branch.search(line)) and labels.get(m.group(1), i) < i:
            body = instructions(lines[labels[m.group(1)]: i + 1])
            if best is None or len(body) > len(best):
                best = body
    return best


def main_loop(ptx: str) -> list[str] | None:
    """PTX instructions of the kernel's main loop, or None when the kernel has no loop."""
    return _longest_loop(ptx.splitlines(), _LABEL, _BACK_BRANCH, _instructions)


_SASS_LABEL = re.compile(r"^(\w+):$")
_SASS_BACK_BRANCH = re.compile(r"\bBRA\s+(\w+);")


def sass_main_loop(sass: str) -> list[str] | None:
    """SASS instructions of the main loop (as ``main_loop`` for PTX) in the text of Triton's
    ``triton.tools.disasm.get_sass``: ``control\tinstruction;`` lines and ``LBB<n>:`` labels."""
    return _longest_loop(sass.splitlines(), _SASS_LABEL, _SASS_BACK_BRANCH,
                         lambda span: [line.split("\t", 1)[1] for line in span if "\t" in line])


def sass_of(cubin: bytes) -> str:
    """The SASS of a cubin (cuobjdump from the imported triton's wheel; its nvdisasm note is dropped)."""
    from triton.tools.disasm import get_sass

    with contextlib.redirect_stderr(io.StringIO()):
        return get_sass(cubin)


def kernel_body(ptx: str) -> list[str]:
    """Every instruction of the kernel's entry function."""
    return _instructions(ptx.splitlines())


def opcode_counts(instructions: list[str]) -> Counter:
    return Counter(m.group(1) for line in instructions if (m := _OPCODE.match(line)))


def wgmma_from_registers(instructions: list[str]) -> bool | None:
    """True when every wgmma in ``instructions`` reads its A operand from registers (``{%r..}``),
    False when some read it through a shared-memory descriptor, None without wgmma."""
    flags = []
    for line in instructions:
        if ".mma_async" not in line:
            continue
        operands = line.split(None, 1)[1]
        after_acc = operands[operands.index("}") + 1:].lstrip(" ,")
        flags.append(after_acc.startswith("{"))
    return all(flags) if flags else None


def waits_for_every_wgmma(instructions: list[str]) -> bool | None:
    """True when ``instructions`` (a loop) wait for all their wgmma groups (``wgmma.wait_group 0``:
    the next step cannot decode while an MMA runs), False when they issue wgmma and wait only with
    groups left pending or not at all in the loop (the MMA overlaps the next step), None without
    wgmma."""
    if not any(".mma_async" in line for line in instructions):
        return None
    return any(re.match(r"wgmma\.wait_group\S*\s+0;", line) for line in instructions)


def loop_loads_of(ttir: str, param: str, param_index: int) -> int:
    """``tt.load`` ops inside an ``scf.for`` whose pointer derives from the kernel argument named
    ``param`` (TTIR calls it ``%<param>`` or ``%arg<param_index>``, by triton version); for the
    code table that is a gather from global memory in the K loop. A kernel without a loop counts
    the loads of its whole body."""
    derived = {f"%{param}", f"%arg{param_index}"}
    whole_body = "scf.for" not in ttir
    depth_of_loop, depth, count = [], 0, 0
    for line in ttir.splitlines():
        text = line.strip()
        lhs, _, rhs = text.partition(" = ")
        if rhs and any(re.search(rf"{re.escape(v)}\b", rhs) for v in derived) and "!tt.ptr" in rhs:
            derived.update(name.strip() for name in lhs.split(","))
        if "scf.for" in text:
            depth_of_loop.append(depth)
        if (whole_body or depth_of_loop) and "tt.load" in rhs:
            pointer = rhs.split("tt.load", 1)[1].strip().split(",")[0].split()[0]
            count += pointer in derived and _elements(rhs) > 16  # the 16-entry table itself is no gather
        depth += text.count("{") - text.count("}")
        while depth_of_loop and depth <= depth_of_loop[-1]:
            depth_of_loop.pop()
    return count


def _elements(op_text: str) -> int:
    """Elements of the first tensor type in an MLIR op's text (1 for a scalar)."""
    m = re.search(r"tensor<((?:\d+x)+)", op_text)
    return math.prod(int(d) for d in m.group(1).rstrip("x").split("x")) if m else 1


@dataclass
class Analysis:
    regs: int | None
    spill_bytes: int
    smem_bytes: int
    loop_ptx_per_weight_elem: float
    loop_sass_per_weight_elem: float | None
    loop_shared_ops_per_weight_elem: float
    wgmma_serialized: bool
    weight_operand_from_registers: bool | None
    wgmma_waits_each_step: bool | None
    lut_global_gathers: int
    has_loop: bool
    top_opcodes: str


def analyze(compiled, log: str, weight_elems_per_iter: int, num_warps: int, fn=None, code_param: str = "code_ptr",
            sass: bool = True) -> Analysis:
    """The report's numbers for one compile. ``weight_elems_per_iter``: weight elements one CTA
    decodes per main-loop iteration (per program when the kernel has no loop); ``fn`` the
    ``JITFunction`` (to find the code-table argument ``code_param``); ``sass``: also disassemble the
    cubin for the loop's machine instructions (``loop_sass_per_weight_elem``, else None)."""
    ptx = compiled.asm["ptx"]
    loop = main_loop(ptx)
    body = loop if loop is not None else kernel_body(ptx)
    per_thread = weight_elems_per_iter / (32 * num_warps)
    ops = opcode_counts(body)
    shared = sum(n for op, n in ops.items() if op.startswith(_SHARED_OPS))
    regs = _REGS.findall(log)
    spill = _SPILL.search(log)
    sass = sass_main_loop(sass_of(compiled.asm["cubin"])) if sass and loop is not None else None
    gathers = 0
    names = [p.name for p in fn.params if not p.is_constexpr] if fn is not None else []
    if code_param in names:
        gathers = loop_loads_of(compiled.asm["ttir"], code_param, names.index(code_param))
    return Analysis(
        regs=max(map(int, regs)) if regs else None,
        spill_bytes=int(spill.group(2)) if spill else 0,
        smem_bytes=int(compiled.metadata.shared),
        loop_ptx_per_weight_elem=round(len(body) / per_thread, 2),
        loop_sass_per_weight_elem=round(len(sass) / per_thread, 2) if sass else None,
        loop_shared_ops_per_weight_elem=round(shared / per_thread, 3),
        wgmma_serialized=WGMMA_SERIALIZED in log,
        weight_operand_from_registers=wgmma_from_registers(body),
        wgmma_waits_each_step=waits_for_every_wgmma(loop) if loop is not None else None,
        lut_global_gathers=gathers,
        has_loop=loop is not None,
        top_opcodes=" ".join(f"{op}:{n}" for op, n in ops.most_common(8)),
    )
