/* Fused LAMB step for float32 CPU tensors, with the Keras gradient pipeline folded in.
 *
 * Compiled at first use by torch_lamb.fused (gcc -O3 -march=native -fopenmp), loaded with ctypes.
 * No torch headers: a bucket of tensors arrives as a `Bucket` of raw float pointers (fused.py
 * mirrors the struct with ctypes). Per element the gradient the update uses is
 *
 *     t = g / loss_scale                       (F_LOSS_SCALE)
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
 * The norms need the whole tensor before p moves, so each tensor takes two passes: pass 1 updates
 * m, v and sums w'^2 and u^2 (in double, per block); pass 2 recomputes u and writes p.
 *
 * lamb_fused runs both passes segment by segment (consecutive tensors of about `segment`
 * elements), so that pass 2 finds the segment still in cache, and runs pass 2 backwards, so that
 * even a segment larger than the cache starts on the blocks pass 1 touched last; it forms the
 * trust ratios itself.
 * lamb_pass1 / lamb_pass2 are the same passes over the whole bucket, for sharded tensors whose
 * squared norms must be summed across ranks (in torch) between the passes.
 * lamb_grad_sums (the clipping norms), lamb_accumulate and lamb_ema are single passes; lamb_stream
 * moves lamb_fused's bytes in lamb_fused's order with no arithmetic (the benchmark's floor).
 *
 * The float32 forms follow torch_lamb.functional.lamb_update; lerp is torch's vectorised form
 * fma(w, end - start, start) for |w| < 0.5, else fma(w - 1, end - start, end).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 16384 /* elements per work item: 64 KiB per stream */
#define INLINE static inline __attribute__((always_inline))

enum { F_DECAY = 1, F_ADAPTIVE_DECAY = 2, F_MIN_RATIO = 4, F_MAX_RATIO = 8, F_LOSS_SCALE = 16,
       F_ACCUMULATE = 32, F_CLIPVALUE = 64, F_CLIP_FACTORS = 128, F_EMA = 256 };
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
    double *sums;                /* out: [0, n) sum w'^2, [n, 2n) sum u^2 (lamb_grad_sums: sum t^2) */
    float *ratios;               /* out (lamb_fused): trust ratios */
    int64_t flags;
    int64_t nthreads;
    int64_t segment;             /* lamb_fused: elements per segment */
    float beta_1c, beta_2c;      /* 1 - beta_1, 1 - beta_2 */
    float bc1, bc2, eps;         /* 1 - beta_1**t, 1 - beta_2**t, epsilon */
    float decay, adaptive_decay; /* 1 - weight_decay * lr (decoupled), weight_decay (adaptive) */
    float lr, min_ratio, max_ratio;
    float loss_scale, accumulation_steps, clipvalue, ema_weight;
} Bucket;

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

/* The gradient the update uses (see the header); `gflags` is a compile-time constant at each use. */
INLINE float grad_value(const Bucket *b, float g, float a, float factor, int gflags) {
    float t = g;
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

INLINE void pass1_impl(const Bucket *b, Span s, double *out, int gflags, int adaptive) {
    const int64_t i = s.i;
    float *restrict pp = b->p[i] + s.off, *restrict gp = b->g[i] + s.off;
    float *restrict mp = b->m[i] + s.off, *restrict vp = b->v[i] + s.off;
    float *restrict ap = (gflags & F_ACCUMULATE) ? b->acc[i] + s.off : NULL;
    const int dec = b->decay_mask[i];
    const float df = ((b->flags & F_DECAY) && dec) ? b->decay : 1.0f;
    const float aw = b->adaptive_decay;
    const float factor = (gflags & F_CLIP_FACTORS) ? b->clip_factors[i] : 1.0f;
    const Lerp l1 = lerp_weight(b->beta_1c), l2 = lerp_weight(b->beta_2c);
    const float eps = b->eps;
    const float ibc1 = 1.0f / b->bc1, ibc2 = 1.0f / b->bc2;
    double ws = 0.0, us = 0.0;
    for (int64_t j0 = 0; j0 < s.len; j0 += 64) { /* float partial sums per 64 elements, then double */
        const int64_t j1 = j0 + 64 < s.len ? j0 + 64 : s.len;
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
        ws += wsf;
        us += usf;
    }
    out[0] = ws;
    out[1] = us;
}

#define PASS1_CASE(GF)                                                  \
    case GF:                                                           \
        if (adaptive) pass1_impl(b, s, out, GF, 1);                    \
        else pass1_impl(b, s, out, GF, 0);                             \
        break;

static void pass1_block(const Bucket *b, Span s, double *out) {
    const int adaptive = (b->flags & F_ADAPTIVE_DECAY) && b->decay_mask[s.i];
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
        default: out[0] = out[1] = NAN; /* clipvalue with clip factors: rejected in fused.py */
    }
}

/* ---------------------------------------------------------------- pass 2 */

INLINE void pass2_impl(const Bucket *b, Span s, float scale, int adaptive, int ema) {
    const int64_t i = s.i;
    float *restrict pp = b->p[i] + s.off;
    const float *restrict mp = b->m[i] + s.off, *restrict vp = b->v[i] + s.off;
    float *restrict avp = ema ? b->avg[i] + s.off : NULL;
    const int dec = b->decay_mask[i];
    const float df = ((b->flags & F_DECAY) && dec) ? b->decay : 1.0f;
    const float aw = b->adaptive_decay, eps = b->eps;
    const Lerp le = lerp_weight(b->ema_weight);
    const float ibc1 = 1.0f / b->bc1, ibc2 = 1.0f / b->bc2;
#pragma omp simd
    for (int64_t j = 0; j < s.len; j++) {
        const float w = pp[j] * df;
        float u = (mp[j] * ibc1) / (sqrtf(vp[j] * ibc2) + eps);
        if (adaptive) u = u + aw * w;
        const float np = w - scale * u;
        pp[j] = np;
        if (ema) avp[j] = lerp(le, avp[j], np);
    }
}

static void pass2_block(const Bucket *b, Span s, float scale) {
    const int adaptive = (b->flags & F_ADAPTIVE_DECAY) && b->decay_mask[s.i];
    if (b->flags & F_EMA) {
        if (adaptive) pass2_impl(b, s, scale, 1, 1); else pass2_impl(b, s, scale, 0, 1);
    } else {
        if (adaptive) pass2_impl(b, s, scale, 1, 0); else pass2_impl(b, s, scale, 0, 0);
    }
}

/* The trust ratio of tensor i from its summed squares; the same float32 steps as
 * torch_lamb.functional.trust_ratio. */
static float ratio_of(const Bucket *b, int64_t i, double wsum, double usum) {
    const float wn = sqrtf((float)wsum), un = sqrtf((float)usum);
    float r = (wn > 0.0f && un > 0.0f) ? wn / un : 1.0f;
    if (b->flags & F_MIN_RATIO) r = r < b->min_ratio ? b->min_ratio : r; /* NaN kept, as clamp */
    if (b->flags & F_MAX_RATIO) r = r > b->max_ratio ? b->max_ratio : r;
    if (b->adapt_mask && !b->adapt_mask[i]) r = 1.0f;
    return r;
}

/* ---------------------------------------------------------------- entry points */

/* Sum the block partials of tensors [t0, t1) into b->sums. */
static void gather_sums(const Bucket *b, const int64_t *starts, const double *part, int64_t t0, int64_t t1) {
    for (int64_t i = t0; i < t1; i++) {
        double ws = 0.0, us = 0.0;
        for (int64_t k = starts[i]; k < starts[i + 1]; k++) {
            ws += part[2 * k];
            us += part[2 * k + 1];
        }
        b->sums[i] = ws;
        b->sums[b->n + i] = us;
    }
}

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

/* Both passes segment by segment (see the header); `stream` runs the floor's bodies instead. */
static int run_segments(const Bucket *b, int stream) {
    int64_t *starts = build_blocks(b);
    double *part = starts ? malloc(sizeof(double) * 2 * (starts[b->n] + 1)) : NULL;
    int64_t *segs = part ? malloc(sizeof(int64_t) * (b->n + 1)) : NULL;
    if (!segs) {
        free(part);
        free(starts);
        return -1;
    }
    int64_t nseg = 0, filled = 0;
    segs[0] = 0;
    for (int64_t i = 0; i < b->n; i++) { /* consecutive tensors, about `segment` elements each */
        if (filled > 0 && filled + b->sizes[i] > b->segment) {
            segs[++nseg] = i;
            filled = 0;
        }
        filled += b->sizes[i];
    }
    segs[++nseg] = b->n;

#pragma omp parallel num_threads(b->nthreads)
    for (int64_t sg = 0; sg < nseg; sg++) {
        const int64_t t0 = segs[sg], t1 = segs[sg + 1];
#pragma omp for schedule(dynamic, 1)
        for (int64_t blk = starts[t0]; blk < starts[t1]; blk++) {
            const Span s = block_span(b, starts, blk);
            if (stream) stream1_block(b, s, part + 2 * blk); else pass1_block(b, s, part + 2 * blk);
        }
#pragma omp single
        {
            gather_sums(b, starts, part, t0, t1);
            for (int64_t i = t0; i < t1; i++)
                b->ratios[i] = stream ? 0.0f : ratio_of(b, i, b->sums[i], b->sums[b->n + i]);
        }
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t k = starts[t0]; k < starts[t1]; k++) { /* backwards: the last blocks are still cached */
            const Span s = block_span(b, starts, starts[t1] - 1 - (k - starts[t0]));
            if (stream) stream2_block(b, s, b->ratios[s.i]); else pass2_block(b, s, b->ratios[s.i] * b->lr);
        }
    }
    free(segs);
    free(part);
    free(starts);
    return 0;
}

int lamb_fused(const Bucket *b) { return run_segments(b, 0); }

int lamb_stream(const Bucket *b) { return run_segments(b, 1); }

/* ---------------------------------------------------------------- single passes */

typedef void (*BlockFn)(const Bucket *b, Span s, double *out);

/* Run `fn` over every block on b->nthreads threads; with `sums`, gather its partial sums into b->sums. */
static int run_blocks(const Bucket *b, BlockFn fn, int sums) {
    int64_t *starts = build_blocks(b);
    double *part = starts ? malloc(sizeof(double) * 2 * (starts[b->n] + 1)) : NULL;
    if (!part) {
        free(starts);
        return -1;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(b->nthreads)
    for (int64_t blk = 0; blk < starts[b->n]; blk++) fn(b, block_span(b, starts, blk), part + 2 * blk);
    if (sums) gather_sums(b, starts, part, 0, b->n);
    free(part);
    free(starts);
    return 0;
}

static void scaled_pass2_block(const Bucket *b, Span s, double *out) {
    (void)out;
    pass2_block(b, s, b->scale[s.i]);
}

INLINE double grad_sum_impl(const Bucket *b, Span s, int gflags) {
    const float *restrict gp = b->g[s.i] + s.off;
    const float *restrict ap = (gflags & F_ACCUMULATE) ? b->acc[s.i] + s.off : NULL;
    double total = 0.0;
    for (int64_t j0 = 0; j0 < s.len; j0 += 64) {
        const int64_t j1 = j0 + 64 < s.len ? j0 + 64 : s.len;
        float part = 0.0f;
#pragma omp simd reduction(+ : part)
        for (int64_t j = j0; j < j1; j++) {
            const float t = grad_value(b, gp[j], (gflags & F_ACCUMULATE) ? ap[j] : 0.0f, 1.0f, gflags);
            part += t * t;
        }
        total += part;
    }
    return total;
}

static void grad_sum_block(const Bucket *b, Span s, double *out) {
    switch (b->flags & (F_LOSS_SCALE | F_ACCUMULATE)) {
        case 0: out[0] = grad_sum_impl(b, s, 0); break;
        case F_LOSS_SCALE: out[0] = grad_sum_impl(b, s, F_LOSS_SCALE); break;
        case F_ACCUMULATE: out[0] = grad_sum_impl(b, s, F_ACCUMULATE); break;
        default: out[0] = grad_sum_impl(b, s, F_LOSS_SCALE | F_ACCUMULATE);
    }
    out[1] = 0.0;
}

INLINE void accumulate_impl(const Bucket *b, Span s, int scaled) {
    float *restrict ap = b->acc[s.i] + s.off;
    const float *restrict gp = b->g[s.i] + s.off;
    const float ls = b->loss_scale;
#pragma omp simd
    for (int64_t j = 0; j < s.len; j++) ap[j] = ap[j] + (scaled ? gp[j] / ls : gp[j]);
}

static void accumulate_block(const Bucket *b, Span s, double *out) {
    (void)out;
    if (b->flags & F_LOSS_SCALE) accumulate_impl(b, s, 1); else accumulate_impl(b, s, 0);
}

static void ema_block(const Bucket *b, Span s, double *out) {
    (void)out;
    float *restrict avp = b->avg[s.i] + s.off;
    const float *restrict pp = b->p[s.i] + s.off;
    const Lerp le = lerp_weight(b->ema_weight);
#pragma omp simd
    for (int64_t j = 0; j < s.len; j++) avp[j] = lerp(le, avp[j], pp[j]);
}

/* Pass 1 over the whole bucket (squared norms into b->sums, for a reduce across ranks). */
int lamb_pass1(const Bucket *b) { return run_blocks(b, pass1_block, 1); }

/* Pass 2 over the whole bucket with the per-tensor ratio * lr in b->scale. */
int lamb_pass2(const Bucket *b) { return run_blocks(b, scaled_pass2_block, 0); }

/* Squared norms of the gradients the update would use before norm clipping, into sums[0, n). */
int lamb_grad_sums(const Bucket *b) { return run_blocks(b, grad_sum_block, 1); }

/* acc += g (/ loss_scale): a micro-step of gradient accumulation. */
int lamb_accumulate(const Bucket *b) { return run_blocks(b, accumulate_block, 0); }

/* avg = lerp(avg, p, ema_weight): the moving average on a call that does not update p. */
int lamb_ema(const Bucket *b) { return run_blocks(b, ema_block, 0); }
