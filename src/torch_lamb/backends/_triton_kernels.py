"""The Triton kernels of :mod:`torch_lamb.backends.triton` (imported at first use, see there).

Each program of a pass takes one chunk of one entry: its entry and start come from the chunk table,
the entry's addresses from the pointer tables (one int64 per entry and role). The scalar vector's
positions are those of :data:`torch_lamb.backends.compiled.SCALARS`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _narrow(x, T: tl.constexpr):
    """``x`` as dtype ``T``; to bfloat16 by round-to-nearest-even in integer arithmetic (NaN stays NaN)."""
    if T == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(T)


@triton.jit
def _div(a, b, S: tl.constexpr):
    """IEEE-rounded division (Triton's ``/`` on float32 is an approximation on NVIDIA GPUs)."""
    if S == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _sqrt(a, S: tl.constexpr):
    if S == tl.float32:
        return tl.sqrt_rn(a)
    else:
        return tl.sqrt(a)


@triton.jit
def _update(w, m, v, decayed, s, DECAY: tl.constexpr, ADAPTIVE: tl.constexpr, S: tl.constexpr):
    """``w' = w * decay`` and ``u = (m / bc1) / (sqrt(v / bc2) + eps)`` (+ ``wd * w'``), as the reference forms them."""
    if DECAY:
        w = tl.where(decayed, w * tl.load(s + 6).to(S), w)
    u = _div(_div(m, tl.load(s + 3).to(S), S), _sqrt(_div(v, tl.load(s + 4).to(S), S), S) + tl.load(s + 5).to(S), S)
    if ADAPTIVE:
        u = tl.where(decayed, u + tl.load(s + 7).to(S) * w, u)
    return w, u


@triton.jit
def _load(pointer, index, n, TAIL: tl.constexpr):
    """A block of ``pointer[index]``: masked only in a chunk's tail block (where ``index`` may reach ``n``),
    so that full blocks compile to unmasked, vectorizable loads."""
    if TAIL:
        return tl.load(pointer + index, mask=index < n, other=0.0)
    else:
        return tl.load(pointer + index)


@triton.jit
def _store(pointer, index, n, value, TAIL: tl.constexpr):
    if TAIL:
        tl.store(pointer + index, value, mask=index < n)
    else:
        tl.store(pointer + index, value)


@triton.jit
def _pass1_block(index, n, g_ptr, m_ptr, v_ptr, w_ptr, a_ptr, factor, decayed, s,
                 LOSS_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr, CLIP: tl.constexpr, DECAY: tl.constexpr,
                 ADAPTIVE: tl.constexpr, MEASURE: tl.constexpr, S_TYPE: tl.constexpr, BLOCK: tl.constexpr,
                 TAIL: tl.constexpr):
    """One block of pass 1; returns its squares of ``w'`` and ``u`` (of the formed gradient with MEASURE),
    float64, 0 outside the tensor."""
    t = _load(g_ptr, index, n, TAIL)
    if LOSS_SCALE >= 2:  # GradScaler's hand-off: g * (1/scale), rounded to a bfloat16 g's dtype as unscale_ writes
        if t.dtype == tl.float64:
            t = t * tl.load(s + 14).to(tl.float64)
        elif t.dtype == tl.bfloat16:
            t = _narrow(t.to(tl.float32) * tl.load(s + 14), tl.bfloat16)
        else:
            t = t.to(tl.float32) * tl.load(s + 14)
    t = t.to(S_TYPE)
    if LOSS_SCALE == 1 or LOSS_SCALE == 3:  # 1: loss_scale_factor; 2: the hand-off; 3: both
        t = _div(t, tl.load(s + 9).to(S_TYPE), S_TYPE)
    if ACCUMULATE:
        t = _div(_load(a_ptr, index, n, TAIL) + t, tl.load(s + 10).to(S_TYPE), S_TYPE)
        if not MEASURE:
            _store(a_ptr, index, n, tl.zeros([BLOCK], dtype=S_TYPE), TAIL)
    if CLIP == 1:
        limit = tl.load(s + 11).to(S_TYPE)
        t = tl.where(t != t, t, tl.minimum(tl.maximum(t, -limit), limit))  # clamp; NaN stays NaN
    elif CLIP == 2:
        t = t * factor
    if MEASURE:
        t64 = t.to(tl.float64)
        w_sq = t64 * t64
        u_sq = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        m = _load(m_ptr, index, n, TAIL)
        v = _load(v_ptr, index, n, TAIL)
        m = m + (t - m) * tl.load(s + 1).to(S_TYPE)
        v = v + (t * t - v) * tl.load(s + 2).to(S_TYPE)
        _store(m_ptr, index, n, m, TAIL)
        _store(v_ptr, index, n, v, TAIL)
        w = _load(w_ptr, index, n, TAIL).to(S_TYPE)
        w, u = _update(w, m, v, decayed, s, DECAY, ADAPTIVE, S_TYPE)
        w64, u64 = w.to(tl.float64), u.to(tl.float64)
        w_sq, u_sq = w64 * w64, u64 * u64
    if TAIL:
        inside = index < n
        w_sq, u_sq = tl.where(inside, w_sq, 0.0), tl.where(inside, u_sq, 0.0)
    return w_sq, u_sq


@triton.jit(do_not_specialize=["chunks"])  # as ready()'s one-chunk scratch: Triton specializes ints == 1
def lamb_pass1(chunk_entry, chunk_start, numels, decay_mask, grads, weights, momentums, velocities, accumulators,
               factors, s, partials, chunks,
               LOSS_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr, CLIP: tl.constexpr, DECAY: tl.constexpr,
               ADAPTIVE: tl.constexpr, MEASURE: tl.constexpr, G_TYPE: tl.constexpr, W_TYPE: tl.constexpr,
               S_TYPE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """The gradient pipeline and the moments of one chunk; its partial sums of ``w'²`` and ``u²`` (float64).
    With MEASURE: only the partial sums of the formed gradient's squares (nothing is written but them)."""
    c = tl.program_id(0)
    e = tl.load(chunk_entry + c)
    start = tl.multiple_of(tl.load(chunk_start + c), CHUNK)
    n = tl.load(numels + e)
    g_ptr = tl.load(grads + e).to(tl.pointer_type(G_TYPE))
    m_ptr = tl.load(momentums + e).to(tl.pointer_type(S_TYPE))
    v_ptr = tl.load(velocities + e).to(tl.pointer_type(S_TYPE))
    w_ptr = tl.load(weights + e).to(tl.pointer_type(W_TYPE))
    a_ptr = m_ptr  # a stand-in: without ACCUMULATE the accumulators' table is one placeholder entry
    if ACCUMULATE:
        a_ptr = tl.load(accumulators + e).to(tl.pointer_type(S_TYPE))
    if ALIGNED:  # every tensor of the bucket is 16-byte aligned (checked on the host): 128-bit loads and stores
        g_ptr, m_ptr, v_ptr = tl.multiple_of(g_ptr, 16), tl.multiple_of(m_ptr, 16), tl.multiple_of(v_ptr, 16)
        w_ptr, a_ptr = tl.multiple_of(w_ptr, 16), tl.multiple_of(a_ptr, 16)
    factor = tl.load(factors + e).to(S_TYPE) if CLIP == 2 else 1.0
    decayed = tl.load(decay_mask + e) != 0
    w_sum = tl.zeros([BLOCK], dtype=tl.float64)
    u_sum = tl.zeros([BLOCK], dtype=tl.float64)
    for offset in range(0, CHUNK, BLOCK):
        base = tl.multiple_of(start + offset, BLOCK)
        index = base + tl.arange(0, BLOCK)
        if base + BLOCK <= n:
            w_sq, u_sq = _pass1_block(index, n, g_ptr, m_ptr, v_ptr, w_ptr, a_ptr, factor, decayed, s, LOSS_SCALE,
                                      ACCUMULATE, CLIP, DECAY, ADAPTIVE, MEASURE, S_TYPE, BLOCK, False)
        else:
            w_sq, u_sq = _pass1_block(index, n, g_ptr, m_ptr, v_ptr, w_ptr, a_ptr, factor, decayed, s, LOSS_SCALE,
                                      ACCUMULATE, CLIP, DECAY, ADAPTIVE, MEASURE, S_TYPE, BLOCK, True)
        w_sum += w_sq
        u_sum += u_sq
    tl.store(partials + c, tl.sum(w_sum, axis=0))
    tl.store(partials + chunks + c, tl.sum(u_sum, axis=0))


@triton.jit(do_not_specialize=["chunks", "entries"])
def entry_sums(first_chunk, partials, sums, chunks, entries, BLOCK: tl.constexpr):
    """Per entry, its chunks' partial sums added up in chunk order (deterministic: no atomics)."""
    e = tl.program_id(0)
    first = tl.load(first_chunk + e)
    last = tl.load(first_chunk + e + 1)
    w_sum = tl.zeros([BLOCK], dtype=tl.float64)
    u_sum = tl.zeros([BLOCK], dtype=tl.float64)
    for c in range(first, last, BLOCK):
        index = c + tl.arange(0, BLOCK)
        inside = index < last
        w_sum += tl.load(partials + index, mask=inside, other=0.0)
        u_sum += tl.load(partials + chunks + index, mask=inside, other=0.0)
    tl.store(sums + e, tl.sum(w_sum, axis=0))
    tl.store(sums + entries + e, tl.sum(u_sum, axis=0))


@triton.jit
def _pass2_block(index, n, m_ptr, v_ptr, w_ptr, mirror_ptr, a_ptr, step, decayed, s, DECAY: tl.constexpr,
                 ADAPTIVE: tl.constexpr, W_TYPE: tl.constexpr, S_TYPE: tl.constexpr, MIRROR_TYPE: tl.constexpr,
                 EMA: tl.constexpr, EMA_ROUNDED: tl.constexpr, MIRROR: tl.constexpr, TAIL: tl.constexpr):
    m = _load(m_ptr, index, n, TAIL)
    v = _load(v_ptr, index, n, TAIL)
    w = _load(w_ptr, index, n, TAIL).to(S_TYPE)
    w, u = _update(w, m, v, decayed, s, DECAY, ADAPTIVE, S_TYPE)
    new = w - step * u
    stored = _narrow(new, W_TYPE)
    _store(w_ptr, index, n, stored, TAIL)
    if MIRROR:
        _store(mirror_ptr, index, n, _narrow(new, MIRROR_TYPE), TAIL)
    if EMA:
        average = _load(a_ptr, index, n, TAIL)
        target = stored.to(S_TYPE) if EMA_ROUNDED else new
        weight = tl.load(s + 8).to(S_TYPE)
        # torch's lerp: from the nearer end
        moved = tl.where(tl.abs(weight) < 0.5, average + weight * (target - average),
                         target - (target - average) * (1 - weight))
        _store(a_ptr, index, n, moved, TAIL)


@triton.jit
def lamb_pass2(chunk_entry, chunk_start, numels, decay_mask, weights, momentums, velocities, averages, mirrors,
               scale, s, DECAY: tl.constexpr, ADAPTIVE: tl.constexpr, W_TYPE: tl.constexpr, S_TYPE: tl.constexpr,
               MIRROR_TYPE: tl.constexpr, EMA: tl.constexpr, EMA_ROUNDED: tl.constexpr, MIRROR: tl.constexpr,
               ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """``p = w' - ratio * lr * u`` of one chunk, u re-formed from the new moments; the low-precision copy
    and the moving average (toward the rounded weights when there is no float32 master)."""
    c = tl.program_id(0)
    e = tl.load(chunk_entry + c)
    start = tl.multiple_of(tl.load(chunk_start + c), CHUNK)
    n = tl.load(numels + e)
    m_ptr = tl.load(momentums + e).to(tl.pointer_type(S_TYPE))
    v_ptr = tl.load(velocities + e).to(tl.pointer_type(S_TYPE))
    w_ptr = tl.load(weights + e).to(tl.pointer_type(W_TYPE))
    mirror_ptr = w_ptr  # stand-ins: a table the bucket lacks is one placeholder entry
    a_ptr = m_ptr
    if MIRROR:
        mirror_ptr = tl.load(mirrors + e).to(tl.pointer_type(MIRROR_TYPE))
    if EMA:
        a_ptr = tl.load(averages + e).to(tl.pointer_type(S_TYPE))
    if ALIGNED:  # as in pass 1 (a hint returned from a helper function is lost, so it is set here)
        m_ptr, v_ptr, w_ptr = tl.multiple_of(m_ptr, 16), tl.multiple_of(v_ptr, 16), tl.multiple_of(w_ptr, 16)
        mirror_ptr, a_ptr = tl.multiple_of(mirror_ptr, 16), tl.multiple_of(a_ptr, 16)
    decayed = tl.load(decay_mask + e) != 0
    step = tl.load(scale + e).to(S_TYPE)
    for offset in range(0, CHUNK, BLOCK):
        base = tl.multiple_of(start + offset, BLOCK)
        index = base + tl.arange(0, BLOCK)
        if base + BLOCK <= n:
            _pass2_block(index, n, m_ptr, v_ptr, w_ptr, mirror_ptr, a_ptr, step, decayed, s, DECAY, ADAPTIVE,
                         W_TYPE, S_TYPE, MIRROR_TYPE, EMA, EMA_ROUNDED, MIRROR, False)
        else:
            _pass2_block(index, n, m_ptr, v_ptr, w_ptr, mirror_ptr, a_ptr, step, decayed, s, DECAY, ADAPTIVE,
                         W_TYPE, S_TYPE, MIRROR_TYPE, EMA, EMA_ROUNDED, MIRROR, True)
