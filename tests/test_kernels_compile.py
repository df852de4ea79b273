"""The fused kernels compile for a GPU (sm_90: Triton frontend, LLVM, the bundled ptxas) without one.

The interpreter that runs the other kernel tests does not type-check like the compiler (loop-carried types,
constexpr specialisation), so this compiles the LANTERN and GSD variants (they contain every exact path too)
in a subprocess without ``TRITON_INTERPRET``. It checks code generation only, not results on a GPU.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mmspec.kernels import triton_verify as tv
    assert not tv.INTERPRETED

    PTR = {"draft_ptr": "*i64", "u_ptr": "*fp64", "e_ptr": "*fp64", "greedy_ptr": "*i8", "params_ptr": "*fp64",
           "argmax_ptr": "*i32", "accept_ptr": "*i8", "tab_ptr": "*i64", "emb_ptr": "*bf16", "jn_ptr": "*i32",
           "ids_ptr": "*i64", "moved_ptr": "*i8", "num_accepted_ptr": "*i64", "next_ptr": "*i64",
           "tokens_ptr": "*i64"}

    def build(kernel, consts):
        sig = {}
        for name in kernel.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = PTR.get(name, "*fp32")
            else:
                sig[name] = "i64" if name.startswith("s_") else "i32"
        triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 8, "enable_fp_fusion": False})

    row = dict(HAS_UNCOND=True, APPLY_TEMP=True, TOP_K=True, TOP_P=True, HAS_Q=True, WRITE_PROBS=True,
               DT=tl.float32, RATIO_DT=tl.float32, LAM=True, HAS_EMB=True, FINITE_D=True, EMB_DT=tl.float32,
               BLOCK_V=2048, BLOCK_S=512, BLOCK_W=128, BLOCK_G=32, BLOCK_D=64, NPIV=16, LOG2_NPIV=4)
    emit = dict(HAS_UNCOND=True, APPLY_TEMP=True, HAS_Q=True, DT=tl.float32, RATIO_DT=tl.float32, BLOCK_V=2048,
                BLOCK_K=16, BLOCK_W=128)
    for crit in (1, 2):
        build(tv._row_kernel, dict(row, CRIT=crit))
        build(tv._emit_kernel, dict(emit, CRIT=crit))
    print("compiled")
''')


@pytest.mark.slow
def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
