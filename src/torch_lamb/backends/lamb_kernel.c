/* Fused LAMB step for CPU tensors, with the Keras gradient pipeline folded in.
 *
 * Compiled at first use by torch_lamb.backends.kernel_build (gcc -O3 -march=native -fopenmp), loaded
 * with ctypes. No torch headers: a bucket of tensors arrives as a `Bucket` of raw float pointers.
 * The Python side declares the struct too, and refuses to run unless `lamb_abi()` (the size, every
 * field's offset and size, the flag values and dtype codes, all read from this file's definitions)
 * agrees with it; so this file is the one source of the ABI. Per element the gradient the update uses is
 *
 *     t = round_g(g * unscale)                 (unscale: GradScaler's 1/scale, else 1; round_g: to
 *                                               bfloat16 for a bfloat16 g (bf16_unscale, as it is
 *                                               widened), as unscale_ writes it)
 *     t = t / loss_scale                       (F_LOSS_SCALE)
 *     t = (acc + t) / accumulation_steps       (F_ACCUMULATE; acc is then zeroed)
 *     t = clamp(t, -clipvalue, clipvalue)      (F_CLIPVALUE, NaN kept)
 *     t = t * clip_factor[i]                   (F_CLIP_FACTORS: clipnorm / global_clipnorm)
 *
 * and the LAMB update of tensor i (w' = p * decay) is
 *
 *     m = lerp(m, t, 1 - beta_1);  v = lerp(v, t*t, 1 - beta_2)
 *     u = (m / bc1) / (sqrt(v / bc2) + eps)  (+ awd * w' in the adaptive mode)
 *     p = w' - ratio_i * lr * u;   avg = lerp(avg, p, ema_weight)   (F_EMA)
 *
 * with ratio_i = ||w'|| / ||u|| (1 if either is 0; optional bounds; 1 where adapt_mask is 0).
 * With `group`, the n tensors are runs (contiguous pieces) of `slots` ratio units: run i belongs to
 * slot group[i] (the runs of a slot are consecutive), which has one ratio, one decay and adaptation
 * flag, one clip factor and one entry in sums, ratios and scale (a trust-ratio slice along a dim after
 * the first is strided: one run per outer index). Without it, each tensor is its own slot.
 * The norms need the whole tensor before p moves, so each tensor takes two passes: pass 1 updates
 * m, v and sums w'^2 and u^2 (in double, per block); pass 2 recomputes u and writes p.
 *
 * lamb_fused runs both passes segment by segment (consecutive tensors of about `segment`
 * elements), so that pass 2 finds the segment still in cache; each thread takes one contiguous share
 * of a segment's blocks (balanced by elements) in both passes, so that its pass 2 re-reads its own
 * pass 1's bytes (a thread that finishes first takes what is left of the others' shares); it forms
 * the trust ratios itself. Every pass splits its blocks that way.
 * lamb_pass1 / lamb_pass2 are the same passes over the whole bucket, for sharded tensors whose
 * squared norms must be summed across ranks (in torch) between the passes.
 * lamb_grad_sums (the clipping norms), lamb_accumulate and lamb_ema are single passes. Built with
 * -DLAMB_FLOOR (the benchmark's own library, never the production one), lamb_stream moves
 * lamb_fused's bytes in lamb_fused's order with no arithmetic: the benchmark's floor.
 *
 * The float32 forms follow torch_lamb.functional.lamb_update; lerp is torch's vectorised form
 * fma(w, end - start, start) for |w| < 0.5, else fma(w - 1, end - start, end).
 *
 * State (m, v, acc, avg) is float32. Parameters and gradients may be bfloat16 or float16
 * (p_dtype, g_dtype): they are widened to float32 a chunk at a time, all math is float32, and a
 * low-precision p is rounded back once (round to nearest even, as torch rounds); the EMA of such a
 * p follows the rounded value, as the foreach path's does. With master weights, p is the float32
 * master and pass 2 also writes its low-precision copy (`mirror`).
 */
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 16384 /* elements per work item: 64 KiB per stream */
#define CHUNK 1024  /* elements widened at a time for bfloat16/float16 tensors (a multiple of 64) */
#define INLINE static inline __attribute__((always_inline))

enum { F_DECAY = 1, F_ADAPTIVE_DECAY = 2, F_MIN_RATIO = 4, F_MAX_RATIO = 8, F_LOSS_SCALE = 16,
       F_ACCUMULATE = 32, F_CLIPVALUE = 64, F_CLIP_FACTORS = 128, F_EMA = 256, F_MIRROR = 512 };
enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
#define GRAD_FLAGS (F_LOSS_SCALE | F_ACCUMULATE | F_CLIPVALUE | F_CLIP_FACTORS)

typedef struct {
    int64_t n;                   /* tensors */
    float **p, **g, **m, **v;    /* parameters, gradients, moments */
    float **acc, **avg;          /* accumulators (F_ACCUMULATE), averages (F_EMA) */
    const int64_t *sizes;        /* elements per tensor */
    const uint8_t *decay_mask;   /* 1: the tensor takes weight decay */
    const uint8_t *adapt_mask;   /* 1: the tensor takes the trust ratio (NULL: all do) */
    const float *clip_factors;   /* per-tensor gradient multipliers (F_CLIP_FACTORS) */
    const float *scale;          /* lamb_pass2: per-tensor ratio * lr */
    double *sums;                /* out, per slot: [0, S) sum w'^2, [S, 2S) sum u^2 (lamb_grad_sums: sum t^2) */
    float *ratios;               /* out (lamb_fused): trust ratios */
    int64_t flags;
    int64_t nthreads;
    int64_t segment;             /* lamb_fused: elements per segment */
    float beta_1c, beta_2c;      /* 1 - beta_1, 1 - beta_2 */
    float bc1, bc2, eps;         /* 1 - beta_1**t, 1 - beta_2**t, epsilon */
    float decay, adaptive_decay; /* 1 - weight_decay * lr (decoupled), weight_decay (adaptive) */
    float lr, min_ratio, max_ratio;
    float loss_scale, accumulation_steps, clipvalue, ema_weight;
    void **mirror;               /* F_MIRROR: low-precision parameters copied from the float32 p */
    int64_t p_dtype, g_dtype, mirror_dtype;
    float limit;                 /* lamb_count_bad: a gradient element counts as bad unless |g| < limit */
    const int64_t *group;        /* run -> slot (NULL: each tensor is its own slot) */
    int64_t slots;               /* with group: the number of slots */
    float unscale;               /* GradScaler's 1/scale, applied before loss_scale (1: none, or bfloat16 g) */
    float bf16_unscale;          /* the same for a bfloat16 g, applied as it is widened (1: none) */
} Bucket;

#define SLOT(b, i) ((b)->group ? (b)->group[i] : (i))
#define SLOTS(b) ((b)->group ? (b)->slots : (b)->n)

/* ---------------------------------------------------------------- ABI */

#define BUCKET_FIELDS(X)                                                                            \
    X(n) X(p) X(g) X(m) X(v) X(acc) X(avg) X(sizes) X(decay_mask) X(adapt_mask) X(clip_factors)     \
    X(scale) X(sums) X(ratios) X(flags) X(nthreads) X(segment) X(beta_1c) X(beta_2c) X(bc1) X(bc2)   \
    X(eps) X(decay) X(adaptive_decay) X(lr) X(min_ratio) X(max_ratio) X(loss_scale)                 \
    X(accumulation_steps) X(clipvalue) X(ema_weight) X(mirror) X(p_dtype) X(g_dtype) X(mirror_dtype) X(limit) \
    X(group) X(slots) X(unscale) X(bf16_unscale)
#define FLAG_NAMES(X)                                                                               \
    X(F_DECAY) X(F_ADAPTIVE_DECAY) X(F_MIN_RATIO) X(F_MAX_RATIO) X(F_LOSS_SCALE) X(F_ACCUMULATE)     \
    X(F_CLIPVALUE) X(F_CLIP_FACTORS) X(F_EMA) X(F_MIRROR) X(DT_F32) X(DT_BF16)

/* "size=S;field=offset:size;...;FLAG=value;..." built from the definitions above (DT_F16 only where
 * the compiler has _Float16). The loader compares it with its own declaration before any call. */
const char *lamb_abi(void) {
    static char buf[4096];
    if (buf[0]) return buf;
    size_t at = (size_t)snprintf(buf, sizeof buf, "size=%zu", sizeof(Bucket));
#define FIELD(f) at += (size_t)snprintf(buf + at, sizeof buf - at, ";%s=%zu:%zu", #f, offsetof(Bucket, f), \
                                        sizeof(((Bucket *)0)->f));
    BUCKET_FIELDS(FIELD)
#undef FIELD
#define FLAG(f) at += (size_t)snprintf(buf + at, sizeof buf - at, ";%s=%d", #f, (int)(f));
    FLAG_NAMES(FLAG)
#undef FLAG
#if defined(__FLT16_MANT_DIG__)
    snprintf(buf + at, sizeof buf - at, ";DT_F16=%d", (int)DT_F16);
#endif
    return buf;
}

/* ---------------------------------------------------------------- low precision */

INLINE float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

INLINE uint16_t f32_to_bf16(float f) { /* c10::BFloat16's round to nearest even */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint16_t rounded = (uint16_t)((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
    return f != f ? (uint16_t)0x7FC0 : rounded;
}

#if defined(__FLT16_MANT_DIG__)
INLINE float f16_to_f32(uint16_t h) {
    _Float16 x;
    memcpy(&x, &h, sizeof h);
    return (float)x;
}

INLINE uint16_t f32_to_f16(float f) { /* IEEE round to nearest even, as c10::Half */
    const _Float16 x = (_Float16)f;
    uint16_t h;
    memcpy(&h, &x, sizeof h);
    return h;
}

#else
INLINE float f16_to_f32(uint16_t h) { (void)h; return NAN; }
INLINE uint16_t f32_to_f16(float f) { (void)f; return 0x7E00; } /* no DT_F16 in lamb_abi: never called */
#endif

/* n elements of a tensor of dtype `dt` from element `off`, as float32: the tensor itself when it
 * is float32, else widened into buf. */
static float *widen(int64_t dt, void *base, int64_t off, int64_t n, float *buf) {
    if (dt == DT_F32) return (float *)base + off;
    const uint16_t *h = (const uint16_t *)base + off;
    if (dt == DT_BF16) {
#pragma omp simd
        for (int64_t j = 0; j < n; j++) buf[j] = bf16_to_f32(h[j]);
    } else {
#pragma omp simd
        for (int64_t j = 0; j < n; j++) buf[j] = f16_to_f32(h[j]);
    }
    return buf;
}

/* A gradient's n elements as float32 (see widen). A bfloat16 one is multiplied by GradScaler's bf16_unscale
 * and rounded back to bfloat16, as unscale_ writes it (the loop is the plain one without a hand-off). */
static float *widen_grad(const Bucket *b, void *base, int64_t off, int64_t n, float *buf) {
    if (b->g_dtype != DT_BF16 || b->bf16_unscale == 1.0f) return widen(b->g_dtype, base, off, n, buf);
    const uint16_t *h = (const uint16_t *)base + off;
    const float u = b->bf16_unscale;
#pragma omp simd
    for (int64_t j = 0; j < n; j++) buf[j] = bf16_to_f32(f32_to_bf16(bf16_to_f32(h[j]) * u));
    return buf;
}

/* Round n float32 values into a low-precision tensor from element `off`; buf takes the rounded
 * values (widened back), so that what follows sees what the tensor holds. */
static void narrow(int64_t dt, void *base, int64_t off, int64_t n, float *buf) {
    uint16_t *h = (uint16_t *)base + off;
    if (dt == DT_BF16) {
#pragma omp simd
        for (int64_t j = 0; j < n; j++) {
            h[j] = f32_to_bf16(buf[j]);
            buf[j] = bf16_to_f32(h[j]);
        }
    } else {
#pragma omp simd
        for (int64_t j = 0; j < n; j++) {
            h[j] = f32_to_f16(buf[j]);
            buf[j] = f16_to_f32(h[j]);
        }
    }
}

/* torch's lerp with a loop-invariant weight, split so that the element loop has no branch:
 * lerp(start, end) = fma(coef, end - start, small ? start : end). */
typedef struct { float coef; int small; } Lerp;

INLINE Lerp lerp_weight(float w) {
    Lerp l = {fabsf(w) < 0.5f ? w : w - 1.0f, fabsf(w) < 0.5f};
    return l;
}

INLINE float lerp(Lerp l, float start, float end) {
    return fmaf(l.coef, end - start, l.small ? start : end);
}

/* g times GradScaler's 1/scale (1 without its hand-off: exact). Every instantiation applies it, so that a
 * handed-over step and one on gradients unscaled beforehand run the same code: the same order of every
 * sum, the same bits. A bfloat16 g is unscaled (and rounded) where it is widened instead. */
INLINE float unscaled(const Bucket *b, float g) { return g * b->unscale; }

/* The gradient the update uses (see the header); `gflags` is a compile-time constant at each use. */
INLINE float grad_value(const Bucket *b, float g, float a, float factor, int gflags) {
    float t = unscaled(b, g);
    if (gflags & F_LOSS_SCALE) t = t / b->loss_scale;
    if (gflags & F_ACCUMULATE) t = (a + t) / b->accumulation_steps;
    if (gflags & F_CLIPVALUE) {
        const float c = b->clipvalue;
        t = t < -c ? -c : (t > c ? c : t);
    }
    if (gflags & F_CLIP_FACTORS) t = t * factor;
    return t;
}

/* ---------------------------------------------------------------- blocks */

static int64_t *build_blocks(const Bucket *b) {
    int64_t *starts = malloc(sizeof(int64_t) * (b->n + 1));
    if (!starts) return NULL;
    int64_t total = 0;
    for (int64_t i = 0; i < b->n; i++) {
        starts[i] = total;
        total += (b->sizes[i] + BLOCK - 1) / BLOCK;
    }
    starts[b->n] = total;
    return starts;
}

/* Elements before each block (blocks [0, nblocks], from build_blocks's starts): what the threads'
 * shares are balanced by. */
static int64_t *build_offsets(const Bucket *b, const int64_t *starts) {
    int64_t *before = malloc(sizeof(int64_t) * (starts[b->n] + 1));
    if (!before) return NULL;
    int64_t total = 0;
    for (int64_t i = 0; i < b->n; i++) {
        for (int64_t k = starts[i]; k < starts[i + 1]; k++) {
            before[k] = total;
            total += k + 1 < starts[i + 1] ? BLOCK : b->sizes[i] - (k - starts[i]) * BLOCK;
        }
    }
    before[starts[b->n]] = total;
    return before;
}

/* A call's block tables: block starts per tensor, elements before each block, two partial sums per block. */
typedef struct { int64_t *starts, *before; double *part; } Blocks;

static void free_blocks(Blocks *bl) {
    free(bl->part);
    free(bl->before);
    free(bl->starts);
}

static int make_blocks(const Bucket *b, Blocks *bl) {
    bl->starts = build_blocks(b);
    bl->before = bl->starts ? build_offsets(b, bl->starts) : NULL;
    bl->part = bl->before ? malloc(sizeof(double) * 2 * (bl->starts[b->n] + 1)) : NULL;
    if (bl->part) return 0;
    free_blocks(bl);
    return -1;
}

/* The first block k in [lo, hi] with before[k] >= target. */
static int64_t first_block_from(const int64_t *before, int64_t lo, int64_t hi, int64_t target) {
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (before[mid] < target) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* Thread `me` of `nt`'s share of blocks [b0, b1): one contiguous run of about 1/nt of the elements.
 * Contiguous shares stream faster than blocks dealt out one at a time (each thread's streams stay long,
 * which suits the hardware prefetchers), and in a segment each thread's pass 2 re-reads what its own
 * pass 1 left in its own cache. The shares depend only on the sizes. */
typedef struct { int64_t lo, hi; } Share;

static Share share_of(const int64_t *before, int64_t b0, int64_t b1, int me, int nt) {
    const int64_t e0 = before[b0], span = before[b1] - e0;
    Share s;
    s.lo = me == 0 ? b0 : first_block_from(before, b0, b1, e0 + span * me / nt);
    s.hi = me + 1 == nt ? b1 : first_block_from(before, b0, b1, e0 + span * (me + 1) / nt);
    return s;
}

/* What is left of one thread's share, on a cache line of its own. A thread runs its own share from the
 * front, then takes what is left of the others' (so a thread slowed by the machine is helped, as with a
 * dynamic schedule); which thread runs a block never changes the result (sums are per block). */
typedef struct { int64_t next, end; char pad[48]; } Cursor;
_Static_assert(sizeof(Cursor) == 64, "a cursor is one cache line (aligned_alloc takes multiples of 64)");

static void deal(Cursor *c, const int64_t *before, int64_t b0, int64_t b1, int nt) {
    for (int t = 0; t < nt; t++) {
        const Share s = share_of(before, b0, b1, t, nt);
        c[t].next = s.lo;
        c[t].end = s.hi;
    }
}

/* Thread me's next block from the cursors c (its own first; *v: how many shares it has finished), or -1. */
INLINE int64_t next_block(Cursor *c, int me, int nt, int *v) {
    while (*v < nt) {
        Cursor *cur = &c[(me + *v) % nt];
        const int64_t k = __atomic_fetch_add(&cur->next, 1, __ATOMIC_RELAXED);
        if (k < cur->end) return k;
        (*v)++;
    }
    return -1;
}

static int64_t find_tensor(int64_t n, const int64_t *starts, int64_t blk) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) { /* last i with starts[i] <= blk */
        int64_t mid = (lo + hi + 1) / 2;
        if (starts[mid] <= blk) lo = mid; else hi = mid - 1;
    }
    return lo;
}

typedef struct { int64_t i, off, len; } Span;

INLINE Span block_span(const Bucket *b, const int64_t *starts, int64_t blk) {
    Span s;
    s.i = find_tensor(b->n, starts, blk);
    s.off = (blk - starts[s.i]) * BLOCK;
    s.len = b->sizes[s.i] - s.off < BLOCK ? b->sizes[s.i] - s.off : BLOCK;
    return s;
}

/* ---------------------------------------------------------------- pass 1 */

/* A run of `len` elements of tensor i, as float32 pointers (widened copies for low precision;
 * pass 2 writes p in place, into the copy for a low-precision p). */
typedef struct {
    int64_t i, len;
    float *p;
    const float *g;
    float *acc, *m, *v, *avg;
} Run;

/* Pass 1 over a run; the squared sums are added to *ws and *us (float per 64 elements, then double). */
INLINE void pass1_impl(const Bucket *b, Run r, double *ws, double *us, int gflags, int adaptive) {
    const float *restrict pp = r.p, *restrict gp = r.g;
    float *restrict ap = r.acc, *restrict mp = r.m, *restrict vp = r.v;
    const int dec = b->decay_mask[SLOT(b, r.i)];
    const float df = ((b->flags & F_DECAY) && dec) ? b->decay : 1.0f;
    const float aw = b->adaptive_decay;
    const float factor = (gflags & F_CLIP_FACTORS) ? b->clip_factors[SLOT(b, r.i)] : 1.0f;
    const Lerp l1 = lerp_weight(b->beta_1c), l2 = lerp_weight(b->beta_2c);
    const float eps = b->eps;
    const float ibc1 = 1.0f / b->bc1, ibc2 = 1.0f / b->bc2;
    for (int64_t j0 = 0; j0 < r.len; j0 += 64) {
        const int64_t j1 = j0 + 64 < r.len ? j0 + 64 : r.len;
        float wsf = 0.0f, usf = 0.0f;
#pragma omp simd reduction(+ : wsf, usf)
        for (int64_t j = j0; j < j1; j++) {
            const float w = pp[j] * df;
            const float t = grad_value(b, gp[j], (gflags & F_ACCUMULATE) ? ap[j] : 0.0f, factor, gflags);
            if (gflags & F_ACCUMULATE) ap[j] = 0.0f;
            const float mm = lerp(l1, mp[j], t);
            const float vv = lerp(l2, vp[j], t * t);
            mp[j] = mm;
            vp[j] = vv;
            float u = (mm * ibc1) / (sqrtf(vv * ibc2) + eps);
            if (adaptive) u = u + aw * w;
            wsf += w * w;
            usf += u * u;
        }
        *ws += wsf;
        *us += usf;
    }
}

#define PASS1_CASE(GF)                                                  \
    case GF:                                                           \
        if (adaptive) pass1_impl(b, r, ws, us, GF, 1);                 \
        else pass1_impl(b, r, ws, us, GF, 0);                          \
        break;

static void pass1_run(const Bucket *b, Run r, double *ws, double *us) {
    const int adaptive = (b->flags & F_ADAPTIVE_DECAY) && b->decay_mask[SLOT(b, r.i)];
    switch (b->flags & GRAD_FLAGS) {
        PASS1_CASE(0)
        PASS1_CASE(F_LOSS_SCALE)
        PASS1_CASE(F_ACCUMULATE)
        PASS1_CASE(F_LOSS_SCALE | F_ACCUMULATE)
        PASS1_CASE(F_CLIPVALUE)
        PASS1_CASE(F_LOSS_SCALE | F_CLIPVALUE)
        PASS1_CASE(F_ACCUMULATE | F_CLIPVALUE)
        PASS1_CASE(F_LOSS_SCALE | F_ACCUMULATE | F_CLIPVALUE)
        PASS1_CASE(F_CLIP_FACTORS)
        PASS1_CASE(F_LOSS_SCALE | F_CLIP_FACTORS)
        PASS1_CASE(F_ACCUMULATE | F_CLIP_FACTORS)
        PASS1_CASE(F_LOSS_SCALE | F_ACCUMULATE | F_CLIP_FACTORS)
        default: *ws = *us = NAN; /* clipvalue with clip factors: never planned */
    }
}

enum { RUN_P = 1, RUN_G = 2 };

/* The run of tensor s.i from element `at`, `n` long, with p and g as `what` asks, widened into pbuf
 * and gbuf where they are low precision (a float32 tensor is used in place, whatever n is). */
INLINE Run make_run(const Bucket *b, Span s, int64_t at, int64_t n, float *pbuf, float *gbuf, int what) {
    const int64_t i = s.i, o = s.off + at;
    Run r = {i, n, NULL, NULL, NULL, NULL, NULL, NULL};
    if (what & RUN_P) r.p = widen(b->p_dtype, b->p[i], o, n, pbuf);
    if (what & RUN_G) r.g = widen_grad(b, b->g[i], o, n, gbuf);
    if (b->m) {
        r.m = b->m[i] + o;
        r.v = b->v[i] + o;
    }
    if (b->flags & F_ACCUMULATE) r.acc = b->acc[i] + o;
    if (b->flags & F_EMA) r.avg = b->avg[i] + o;
    return r;
}

INLINE int widens(const Bucket *b) { return b->p_dtype != DT_F32 || b->g_dtype != DT_F32; }

static void pass1_block(const Bucket *b, Span s, double *out) {
    double ws = 0.0, us = 0.0;
    float pbuf[CHUNK], gbuf[CHUNK];
    if (!widens(b)) {
        pass1_run(b, make_run(b, s, 0, s.len, pbuf, gbuf, RUN_P | RUN_G), &ws, &us);
    } else {
        for (int64_t at = 0; at < s.len; at += CHUNK) {
            const int64_t n = s.len - at < CHUNK ? s.len - at : CHUNK;
            pass1_run(b, make_run(b, s, at, n, pbuf, gbuf, RUN_P | RUN_G), &ws, &us);
        }
    }
    out[0] = ws;
    out[1] = us;
}

/* ---------------------------------------------------------------- pass 2 */

INLINE void pass2_impl(const Bucket *b, Run r, float scale, int adaptive, int ema) {
    float *restrict pp = r.p;
    const float *restrict mp = r.m, *restrict vp = r.v;
    float *restrict avp = r.avg;
    const int dec = b->decay_mask[SLOT(b, r.i)];
    const float df = ((b->flags & F_DECAY) && dec) ? b->decay : 1.0f;
    const float aw = b->adaptive_decay, eps = b->eps;
    const Lerp le = lerp_weight(b->ema_weight);
    const float ibc1 = 1.0f / b->bc1, ibc2 = 1.0f / b->bc2;
#pragma omp simd
    for (int64_t j = 0; j < r.len; j++) {
        const float w = pp[j] * df;
        float u = (mp[j] * ibc1) / (sqrtf(vp[j] * ibc2) + eps);
        if (adaptive) u = u + aw * w;
        const float np = w - scale * u;
        pp[j] = np;
        if (ema) avp[j] = lerp(le, avp[j], np);
    }
}

static void ema_run(const Bucket *b, float *restrict avp, const float *restrict pp, int64_t n) {
    const Lerp le = lerp_weight(b->ema_weight);
#pragma omp simd
    for (int64_t j = 0; j < n; j++) avp[j] = lerp(le, avp[j], pp[j]);
}

static void pass2_run(const Bucket *b, Run r, float scale, int ema) {
    const int adaptive = (b->flags & F_ADAPTIVE_DECAY) && b->decay_mask[SLOT(b, r.i)];
    if (ema) {
        if (adaptive) pass2_impl(b, r, scale, 1, 1); else pass2_impl(b, r, scale, 0, 1);
    } else {
        if (adaptive) pass2_impl(b, r, scale, 1, 0); else pass2_impl(b, r, scale, 0, 0);
    }
}

static void pass2_block(const Bucket *b, Span s, float scale) {
    const int ema = (b->flags & F_EMA) != 0;
    float pbuf[CHUNK];
    if (b->p_dtype == DT_F32 && !(b->flags & F_MIRROR)) {
        pass2_run(b, make_run(b, s, 0, s.len, pbuf, NULL, RUN_P), scale, ema);
        return;
    }
    for (int64_t at = 0; at < s.len; at += CHUNK) {
        const int64_t n = s.len - at < CHUNK ? s.len - at : CHUNK;
        const Run r = make_run(b, s, at, n, pbuf, NULL, RUN_P);
        if (b->p_dtype == DT_F32) { /* a float32 master: update it, then round its copy */
            pass2_run(b, r, scale, ema);
            memcpy(pbuf, r.p, sizeof(float) * n);
            narrow(b->mirror_dtype, b->mirror[s.i], s.off + at, n, pbuf);
        } else { /* a low-precision p: update in float32, round once; the EMA follows the rounded p */
            pass2_run(b, r, scale, 0);
            narrow(b->p_dtype, b->p[s.i], s.off + at, n, pbuf);
            if (ema) ema_run(b, r.avg, pbuf, n);
        }
    }
}

/* The trust ratio of slot i from its summed squares; the same float32 steps as
 * torch_lamb.functional.trust_ratio, in double where a sum exceeds float32's range. */
static float ratio_of(const Bucket *b, int64_t i, double wsum, double usum) {
    float r;
    if (isinf((float)wsum) || isinf((float)usum)) {
        const double wn = sqrt(wsum), un = sqrt(usum);
        r = (wn > 0.0 && un > 0.0) ? (float)(wn / un) : 1.0f;
    } else {
        const float wn = sqrtf((float)wsum), un = sqrtf((float)usum);
        r = (wn > 0.0f && un > 0.0f) ? wn / un : 1.0f;
    }
    if (b->flags & F_MIN_RATIO) r = r < b->min_ratio ? b->min_ratio : r; /* NaN kept, as clamp */
    if (b->flags & F_MAX_RATIO) r = r > b->max_ratio ? b->max_ratio : r;
    if (b->adapt_mask && !b->adapt_mask[i]) r = 1.0f;
    return r;
}

/* ---------------------------------------------------------------- entry points */

/* Squares summed in float per 64 elements overflow for |x| above about 1.8e19. A tensor whose sum
 * came out inf is summed again here, serially, squaring in double (rare: huge or non-finite values). */
enum { RESCUE_NONE = 0, RESCUE_PASS1 = 1, RESCUE_GRADS = 2 };

static void rescue_sums(const Bucket *b, int64_t i, int kind, double *ws_out, double *us_out) {
    double ws = 0.0, us = 0.0;
    float pbuf[CHUNK], gbuf[CHUNK];
    const Span whole = {i, 0, b->sizes[i]};
    const int dec = b->decay_mask[SLOT(b, i)];
    const float df = ((b->flags & F_DECAY) && dec) ? b->decay : 1.0f;
    const int adaptive = (b->flags & F_ADAPTIVE_DECAY) && dec;
    const float ibc1 = 1.0f / b->bc1, ibc2 = 1.0f / b->bc2;
    for (int64_t at = 0; at < whole.len; at += CHUNK) {
        const int64_t n = whole.len - at < CHUNK ? whole.len - at : CHUNK;
        const Run r = make_run(b, whole, at, n, pbuf, gbuf, kind == RESCUE_PASS1 ? RUN_P : RUN_G);
        for (int64_t j = 0; j < n; j++) {
            if (kind == RESCUE_PASS1) { /* p is unchanged until pass 2; m and v hold the new moments */
                const float w = r.p[j] * df;
                float u = (r.m[j] * ibc1) / (sqrtf(r.v[j] * ibc2) + b->eps);
                if (adaptive) u = u + b->adaptive_decay * w;
                ws += (double)w * w;
                us += (double)u * u;
            } else {
                const float t = grad_value(b, r.g[j], (b->flags & F_ACCUMULATE) ? r.acc[j] : 0.0f, 1.0f,
                                           b->flags & (F_LOSS_SCALE | F_ACCUMULATE));
                ws += (double)t * t;
            }
        }
    }
    *ws_out += ws;
    *us_out += us;
}

/* Sum the block partials of tensors [t0, t1) into the sums of their slots (rescuing overflowed sums of
 * `kind`: the slot is summed again, run by run). The runs of a slot lie in one [t0, t1). */
static void gather_sums(const Bucket *b, const int64_t *starts, const double *part, int64_t t0, int64_t t1,
                        int kind) {
    const int64_t S = SLOTS(b);
    for (int64_t i = t0; i < t1; i++) {
        const int64_t slot = SLOT(b, i);
        if (i == t0 || SLOT(b, i - 1) != slot) b->sums[slot] = b->sums[S + slot] = 0.0;
        double ws = 0.0, us = 0.0;
        for (int64_t k = starts[i]; k < starts[i + 1]; k++) {
            ws += part[2 * k];
            us += part[2 * k + 1];
        }
        b->sums[slot] += ws;
        b->sums[S + slot] += us;
    }
    if (kind == RESCUE_NONE) return;
    for (int64_t i = t0; i < t1; i++) {
        const int64_t slot = SLOT(b, i);
        if (i > t0 && SLOT(b, i - 1) == slot) continue; /* the slot's first run rescues the slot */
        if (!(isinf(b->sums[slot]) || (kind == RESCUE_PASS1 && isinf(b->sums[S + slot])))) continue;
        double ws = 0.0, us = 0.0;
        for (int64_t j = i; j < t1 && SLOT(b, j) == slot; j++) rescue_sums(b, j, kind, &ws, &us);
        b->sums[slot] = ws;
        if (kind == RESCUE_PASS1) b->sums[S + slot] = us;
    }
}

#ifdef LAMB_FLOOR
/* The memory traffic of the two passes with no LAMB arithmetic: the benchmark's floor. */
static void stream1_block(const Bucket *b, Span s, double *out) {
    const float *restrict pp = b->p[s.i] + s.off, *restrict gp = b->g[s.i] + s.off;
    float *restrict mp = b->m[s.i] + s.off, *restrict vp = b->v[s.i] + s.off;
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < s.len; j++) {
        mp[j] = mp[j] + gp[j];
        vp[j] = vp[j] - gp[j];
        total += pp[j];
    }
    out[0] = total;
    out[1] = 0.0;
}

static void stream2_block(const Bucket *b, Span s, float scale) {
    float *restrict pp = b->p[s.i] + s.off;
    const float *restrict mp = b->m[s.i] + s.off, *restrict vp = b->v[s.i] + s.off;
#pragma omp simd
    for (int64_t j = 0; j < s.len; j++) pp[j] = pp[j] + scale * (mp[j] + vp[j]);
}
#define PASS1_BLOCK(b, s, out) (stream ? stream1_block(b, s, out) : pass1_block(b, s, out))
#define PASS2_BLOCK(b, s, r) (stream ? stream2_block(b, s, r) : pass2_block(b, s, (r) * b->lr))
#define RATIO_OF(b, i, ws, us) (stream ? 0.0f : ratio_of(b, i, ws, us))
#else
#define PASS1_BLOCK(b, s, out) pass1_block(b, s, out)
#define PASS2_BLOCK(b, s, r) pass2_block(b, s, (r) * b->lr)
#define RATIO_OF(b, i, ws, us) ratio_of(b, i, ws, us)
#endif

/* The slot sums of runs [t0, t1) from their block partials, into sums[0, 2 * slots) for slots from
 * SLOT(t0), in gather_sums's order (so the same bits); returns whether one overflowed. */
static int segment_sums(const Bucket *b, const int64_t *starts, const double *part, int64_t t0, int64_t t1,
                        double *sums, int64_t slots) {
    const int64_t s0 = SLOT(b, t0);
    for (int64_t k = 0; k < 2 * slots; k++) sums[k] = 0.0;
    int overflow = 0;
    for (int64_t i = t0; i < t1; i++) {
        double ws = 0.0, us = 0.0;
        for (int64_t k = starts[i]; k < starts[i + 1]; k++) {
            ws += part[2 * k];
            us += part[2 * k + 1];
        }
        const int64_t at = SLOT(b, i) - s0;
        sums[at] += ws;
        sums[slots + at] += us;
    }
    for (int64_t k = 0; k < 2 * slots; k++) overflow |= isinf(sums[k]);
    return overflow;
}

/* Both passes segment by segment (see the header); `stream` runs the floor's bodies instead.
 *
 * One barrier per segment (the end of its pass 1), and one per call, after the shares are dealt: then
 * every thread forms the segment's ratios itself,
 * from the shared block partials, in the same order (so the same bits), and thread 0 also writes them
 * out; a barrier costs a scheduler time slice whenever a thread is descheduled, so a step pays for as
 * few as the passes need. A segment whose sums overflowed float32 is summed again once, by one thread
 * (a second barrier, before pass 2 writes p). */
static int run_segments(const Bucket *b, int stream) {
    (void)stream; /* used only in the floor's build */
    Blocks bl;
    if (make_blocks(b, &bl) != 0) return -1;
    const int64_t *starts = bl.starts;
    double *part = bl.part;
    int64_t *segs = malloc(sizeof(int64_t) * (b->n + 1));
    if (!segs) {
        free_blocks(&bl);
        return -1;
    }
    int64_t nseg = 0, filled = 0;
    segs[0] = 0;
    for (int64_t i = 0; i < b->n; i++) { /* consecutive tensors, about `segment` elements each, whole slots */
        if (filled > 0 && filled + b->sizes[i] > b->segment && SLOT(b, i) != SLOT(b, i - 1)) {
            segs[++nseg] = i;
            filled = 0;
        }
        filled += b->sizes[i];
    }
    segs[++nseg] = b->n;
    int64_t width = 1; /* the most slots in one segment */
    for (int64_t sg = 0; sg < nseg; sg++) {
        const int64_t w = SLOT(b, segs[sg + 1] - 1) - SLOT(b, segs[sg]) + 1;
        width = w > width ? w : width;
    }
    const int nthreads = b->nthreads > 0 ? (int)b->nthreads : 1;
    double *own = malloc(sizeof(double) * 2 * width * nthreads); /* per thread: the segment's slot sums */
    float *own_ratios = malloc(sizeof(float) * width * nthreads);
    Cursor *cursors = aligned_alloc(64, sizeof(Cursor) * 2 * nseg * nthreads); /* per segment: pass 1, pass 2 */
    if (!own || !own_ratios || !cursors) {
        free(cursors);
        free(own_ratios);
        free(own);
        free(segs);
        free_blocks(&bl);
        return -1;
    }

#pragma omp parallel num_threads(nthreads)
    {
        const int me = omp_get_thread_num(), nt = omp_get_num_threads();
        double *sums = own + 2 * width * me;
        float *ratios = own_ratios + width * me;
#pragma omp single
        for (int64_t sg = 0; sg < nseg; sg++) { /* dealt before any thread starts (the single's barrier) */
            deal(cursors + 2 * sg * nthreads, bl.before, starts[segs[sg]], starts[segs[sg + 1]], nt);
            deal(cursors + (2 * sg + 1) * nthreads, bl.before, starts[segs[sg]], starts[segs[sg + 1]], nt);
        }
        for (int64_t sg = 0; sg < nseg; sg++) {
            const int64_t t0 = segs[sg], t1 = segs[sg + 1];
            const int64_t s0 = SLOT(b, t0), slots = SLOT(b, t1 - 1) - s0 + 1;
            int done = 0;
            for (int64_t blk; (blk = next_block(cursors + 2 * sg * nthreads, me, nt, &done)) >= 0;) {
                const Span s = block_span(b, starts, blk);
                PASS1_BLOCK(b, s, part + 2 * blk);
            }
#pragma omp barrier
            if (segment_sums(b, starts, part, t0, t1, sums, slots) && !stream) { /* the same on every thread */
#pragma omp single
                {
                    gather_sums(b, starts, part, t0, t1, RESCUE_PASS1);
                    for (int64_t i = s0; i < s0 + slots; i++)
                        b->ratios[i] = RATIO_OF(b, i, b->sums[i], b->sums[SLOTS(b) + i]);
                }
                for (int64_t i = 0; i < slots; i++) ratios[i] = b->ratios[s0 + i];
            } else {
                for (int64_t i = 0; i < slots; i++) ratios[i] = RATIO_OF(b, s0 + i, sums[i], sums[slots + i]);
                if (me == 0) {
                    for (int64_t i = 0; i < slots; i++) {
                        b->sums[s0 + i] = sums[i];
                        b->sums[SLOTS(b) + s0 + i] = sums[slots + i];
                        b->ratios[s0 + i] = ratios[i];
                    }
                }
            }
            done = 0; /* no barrier after pass 2: the next segment's pass 1 touches other tensors */
            for (int64_t blk; (blk = next_block(cursors + (2 * sg + 1) * nthreads, me, nt, &done)) >= 0;) {
                const Span s = block_span(b, starts, blk); /* mostly the blocks this thread's pass 1 read */
                PASS2_BLOCK(b, s, ratios[SLOT(b, s.i) - s0]);
            }
        }
    }
    free(cursors);
    free(own_ratios);
    free(own);
    free(segs);
    free_blocks(&bl);
    return 0;
}

int lamb_fused(const Bucket *b) { return run_segments(b, 0); }

#ifdef LAMB_FLOOR
int lamb_stream(const Bucket *b) { return run_segments(b, 1); }
#endif

/* ---------------------------------------------------------------- single passes */

typedef void (*BlockFn)(const Bucket *b, Span s, double *out);

/* Run `fn` over every block on b->nthreads threads; with `sums` (a RESCUE_* kind + 1), gather its partial
 * sums into b->sums. */
static int run_blocks(const Bucket *b, BlockFn fn, int sums) {
    Blocks bl;
    if (make_blocks(b, &bl) != 0) return -1;
    const int nthreads = b->nthreads > 0 ? (int)b->nthreads : 1;
    Cursor *cursors = aligned_alloc(64, sizeof(Cursor) * nthreads);
    if (!cursors) {
        free_blocks(&bl);
        return -1;
    }
#pragma omp parallel num_threads(nthreads)
    {
        const int me = omp_get_thread_num(), nt = omp_get_num_threads();
#pragma omp single
        deal(cursors, bl.before, 0, bl.starts[b->n], nt);
        int done = 0;
        for (int64_t blk; (blk = next_block(cursors, me, nt, &done)) >= 0;)
            fn(b, block_span(b, bl.starts, blk), bl.part + 2 * blk);
    }
    if (sums) gather_sums(b, bl.starts, bl.part, 0, b->n, sums - 1);
    free(cursors);
    free_blocks(&bl);
    return 0;
}

static void scaled_pass2_block(const Bucket *b, Span s, double *out) {
    (void)out;
    pass2_block(b, s, b->scale[SLOT(b, s.i)]);
}

INLINE void grad_sum_impl(const Bucket *b, Run r, double *total, int gflags) {
    const float *restrict gp = r.g, *restrict ap = r.acc;
    for (int64_t j0 = 0; j0 < r.len; j0 += 64) {
        const int64_t j1 = j0 + 64 < r.len ? j0 + 64 : r.len;
        float part = 0.0f;
#pragma omp simd reduction(+ : part)
        for (int64_t j = j0; j < j1; j++) {
            const float t = grad_value(b, gp[j], (gflags & F_ACCUMULATE) ? ap[j] : 0.0f, 1.0f, gflags);
            part += t * t;
        }
        *total += part;
    }
}

INLINE void accumulate_impl(const Bucket *b, Run r, int scaled) {
    float *restrict ap = r.acc;
    const float *restrict gp = r.g;
#pragma omp simd
    for (int64_t j = 0; j < r.len; j++) {
        const float t = unscaled(b, gp[j]);
        ap[j] = ap[j] + (scaled ? t / b->loss_scale : t);
    }
}

/* The single passes below read g (or p) through runs of at most CHUNK elements, widened as needed. */
static void grad_sum_block(const Bucket *b, Span s, double *out) {
    float gbuf[CHUNK];
    double total = 0.0;
    for (int64_t at = 0; at < s.len; at += CHUNK) {
        const int64_t n = s.len - at < CHUNK ? s.len - at : CHUNK;
        const Run r = make_run(b, s, at, n, NULL, gbuf, RUN_G);
        switch (b->flags & (F_LOSS_SCALE | F_ACCUMULATE)) {
            case 0: grad_sum_impl(b, r, &total, 0); break;
            case F_LOSS_SCALE: grad_sum_impl(b, r, &total, F_LOSS_SCALE); break;
            case F_ACCUMULATE: grad_sum_impl(b, r, &total, F_ACCUMULATE); break;
            default: grad_sum_impl(b, r, &total, F_LOSS_SCALE | F_ACCUMULATE);
        }
    }
    out[0] = total;
    out[1] = 0.0;
}

static void count_bad_block(const Bucket *b, Span s, double *out) {
    float gbuf[CHUNK];
    double bad = 0.0;
    const float limit = b->limit;
    for (int64_t at = 0; at < s.len; at += CHUNK) {
        const int64_t n = s.len - at < CHUNK ? s.len - at : CHUNK;
        const float *gp = make_run(b, s, at, n, NULL, gbuf, RUN_G).g;
        float count = 0.0f; /* exact: at most CHUNK */
#pragma omp simd reduction(+ : count)
        for (int64_t j = 0; j < n; j++) count += fabsf(gp[j]) < limit ? 0.0f : 1.0f; /* NaN counts */
        bad += count;
    }
    out[0] = bad;
    out[1] = 0.0;
}

static void accumulate_block(const Bucket *b, Span s, double *out) {
    (void)out;
    float gbuf[CHUNK];
    for (int64_t at = 0; at < s.len; at += CHUNK) {
        const int64_t n = s.len - at < CHUNK ? s.len - at : CHUNK;
        Run r = make_run(b, s, at, n, NULL, gbuf, RUN_G);
        r.acc = b->acc[s.i] + s.off + at;
        if (b->flags & F_LOSS_SCALE) accumulate_impl(b, r, 1); else accumulate_impl(b, r, 0);
    }
}

static void ema_block(const Bucket *b, Span s, double *out) {
    (void)out;
    float pbuf[CHUNK];
    for (int64_t at = 0; at < s.len; at += CHUNK) {
        const int64_t n = s.len - at < CHUNK ? s.len - at : CHUNK;
        const float *pp = widen(b->p_dtype, b->p[s.i], s.off + at, n, pbuf);
        ema_run(b, b->avg[s.i] + s.off + at, pp, n);
    }
}

/* Pass 1 over the whole bucket (squared norms into b->sums, for a reduce across ranks). */
int lamb_pass1(const Bucket *b) { return run_blocks(b, pass1_block, 1 + RESCUE_PASS1); }

/* Pass 2 over the whole bucket with the per-tensor ratio * lr in b->scale. */
int lamb_pass2(const Bucket *b) { return run_blocks(b, scaled_pass2_block, 0); }

/* Squared norms of the gradients the update would use before norm clipping, into sums[0, n). */
int lamb_grad_sums(const Bucket *b) { return run_blocks(b, grad_sum_block, 1 + RESCUE_GRADS); }

/* Per tensor, how many gradient elements are NaN or at least b->limit in magnitude (inf too), into
 * sums[0, n) (skip_nonfinite's check: one read of g). */
int lamb_count_bad(const Bucket *b) { return run_blocks(b, count_bad_block, 1 + RESCUE_NONE); }

/* acc += g (/ loss_scale): a micro-step of gradient accumulation. */
int lamb_accumulate(const Bucket *b) { return run_blocks(b, accumulate_block, 0); }

/* avg = lerp(avg, p, ema_weight): the moving average on a call that does not update p. */
int lamb_ema(const Bucket *b) { return run_blocks(b, ema_block, 0); }
