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

for w_type, mirror in ((tl.float32, False), (tl.float32, True), (tl.bfloat16, False)):
    every = {"DECAY": True, "ADAPTIVE": True, "W_TYPE": w_type, "S_TYPE": tl.float32, "CHUNK": backend.CHUNK,
             "BLOCK": backend.BLOCK}
    for fn, constants in (
        (k.lamb_pass1, {**every, "LOSS_SCALE": True, "ACCUMULATE": True, "CLIP": 2, "MEASURE": False,
                        "G_TYPE": tl.bfloat16}),
        (k.entry_sums, {"BLOCK": backend.BLOCK}),
        (k.lamb_pass2, {**every, "MIRROR": mirror, "MIRROR_TYPE": tl.bfloat16, "EMA": True,
                        "EMA_ROUNDED": not mirror}),
    ):
        signature = {name: TYPES.get(name, "constexpr") for name in fn.arg_names}
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
        ptx = compiled.asm["ptx"]
        assert compiled.asm["cubin"], fn.__name__
        assert "fma.rn.f32" not in ptx, f"{fn.__name__}: contracted (FMA) arithmetic"
        if fn is not k.entry_sums:
            assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx, f"{fn.__name__}: approximate division or sqrt"
        print(fn.__name__)
