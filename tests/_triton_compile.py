"""Compiles the Triton backend's kernels for an H200 (sm_90) on a machine without a GPU (tests/test_triton.py).

Run without ``TRITON_INTERPRET``: the kernels must be the compiler's, not the interpreter's. Prints each
kernel's name once it has a cubin whose PTX keeps the reference's rounding.
"""

import os

import triton
from triton.backends.compiler import GPUTarget

assert not os.environ.get("TRITON_INTERPRET"), "run without the interpreter"

from torch_lamb.backends import triton as backend  # noqa: E402

k = backend.kernels()
tl = triton.language
POINTERS = ("grads", "weights", "momentums", "velocities", "accumulators", "averages", "mirrors")
TYPES = {"chunk_entry": "*i32", "chunk_start": "*i64", "numels": "*i64", "decay_mask": "*i8", "s": "*fp32",
         "factors": "*fp32", "partials": "*fp64", "chunks": "i32", "first_chunk": "*i64", "sums": "*fp64",
         "entries": "i32", "scale": "*fp32", **dict.fromkeys(POINTERS, "*i64")}

VARIANTS = (  # (weights, state, gradients, copies or None, CLIP, MEASURE, ALIGNED): every dtype, clip and mode
    (tl.float32, tl.float32, tl.float32, None, 2, False, True),
    (tl.float32, tl.float32, tl.float32, None, 0, False, False),
    (tl.float32, tl.float32, tl.bfloat16, tl.bfloat16, 1, True, True),
    (tl.bfloat16, tl.float32, tl.bfloat16, None, 0, False, True),
    (tl.float16, tl.float32, tl.float16, None, 1, False, False),
    (tl.float32, tl.float32, tl.float16, tl.float16, 0, False, True),
    (tl.float64, tl.float64, tl.float64, None, 2, False, True),
)


def compile_one(fn, constants):
    signature = {name: TYPES.get(name, "constexpr") for name in fn.arg_names}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})


def memory_ops(ptx):
    return {line.split()[1] if line.startswith("@") else line.split()[0]
            for line in map(str.strip, ptx.splitlines()) if "ld.global" in line or "st.global" in line}


compiled = compile_one(k.entry_sums, {"BLOCK": backend.BLOCK})
assert compiled.asm["cubin"]
print("entry_sums")
for w_type, s_type, g_type, mirror, clip, measure, aligned in VARIANTS:
    every = {"DECAY": True, "ADAPTIVE": True, "W_TYPE": w_type, "S_TYPE": s_type, "ALIGNED": aligned,
             "CHUNK": backend.CHUNK, "BLOCK": backend.BLOCK}
    bits = "f64" if s_type == tl.float64 else "f32"
    for fn, constants in (
        (k.lamb_pass1, {**every, "LOSS_SCALE": True, "ACCUMULATE": True, "CLIP": clip, "MEASURE": measure,
                        "G_TYPE": g_type}),
        (k.lamb_pass2, {**every, "MIRROR": mirror is not None, "MIRROR_TYPE": mirror or tl.float32, "EMA": True,
                        "EMA_ROUNDED": mirror is None and w_type in (tl.bfloat16, tl.float16)}),
    ):
        compiled = compile_one(fn, constants)
        ptx = compiled.asm["ptx"]
        assert compiled.asm["cubin"], fn.__name__
        assert f"fma.rn.{bits}" not in ptx, f"{fn.__name__}: contracted (FMA) arithmetic"
        assert f"div.rn.{bits}" in ptx, f"{fn.__name__}: approximate division"
        if not (fn is k.lamb_pass1 and measure):  # the measuring pass forms no update: no sqrt
            assert f"sqrt.rn.{bits}" in ptx, f"{fn.__name__}: approximate square root"
        ops = memory_ops(ptx)
        if aligned and s_type == tl.float32:  # the state streams move 128 bits per thread and access
            assert "ld.global.v4.b32" in ops and (measure or "st.global.v4.b32" in ops), (fn.__name__, ops)
        if not aligned:  # no alignment is claimed that the host did not check
            assert not any(".v4." in op for op in ops), (fn.__name__, ops)
        print(fn.__name__)
