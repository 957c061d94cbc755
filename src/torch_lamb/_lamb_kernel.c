/* Fused LAMB step for float32 CPU tensors: two streaming passes over a bucket of tensors.
 *
 * Compiled at first use by torch_lamb.fused (gcc -O3 -march=native -fopenmp), loaded with ctypes.
 * No torch headers: tensors arrive as raw float pointers with their element counts.
 *
 * pass 1: m, v updated in place; per tensor, double sums of w'^2 and u^2 where
 *         w' = p * decay (p is not written) and u = m_hat / (sqrt(v_hat) + eps) (+ awd * w').
 * pass 2: u recomputed from the new m, v; p = w' - scale[i] * u with scale = ratio * lr (float32).
 *
 * The float32 expression forms follow torch_lamb.functional.lamb_update.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 16384 /* elements per work item: 64 KiB per stream, 4 streams fit in L2 */

/* Map block ids to (tensor, offset). starts[i] = first block of tensor i, starts[n] = total. */
static int64_t build_blocks(int n, const int64_t *sizes, int64_t *starts) {
    int64_t total = 0;
    for (int i = 0; i < n; i++) {
        starts[i] = total;
        total += sizes[i] > 0 ? (sizes[i] + BLOCK - 1) / BLOCK : 0;
    }
    starts[n] = total;
    return total;
}

static int find_tensor(int n, const int64_t *starts, int64_t b) {
    int lo = 0, hi = n - 1;
    while (lo < hi) { /* last i with starts[i] <= b and a block of its own */
        int mid = (lo + hi + 1) / 2;
        if (starts[mid] <= b) lo = mid; else hi = mid - 1;
    }
    return lo;
}

int lamb_pass1(int n, float **p, float **g, float **m, float **v, const int64_t *sizes,
               const uint8_t *decay_mask, const float *sc, double *sums, int nthreads) {
    /* sc: omb1, omb2, bc1, bc2, eps, decay, awd, has_decay, has_awd */
    const float omb1 = sc[0], omb2 = sc[1], bc1 = sc[2], bc2 = sc[3], eps = sc[4];
    const float dfac = sc[5], awd = sc[6], ibc1 = 1.0f / bc1, ibc2 = 1.0f / bc2;
    const int has_decay = sc[7] != 0.0f, has_awd = sc[8] != 0.0f;
    int64_t *starts = malloc(sizeof(int64_t) * (n + 1));
    if (!starts) return -1;
    int64_t total = build_blocks(n, sizes, starts);
    double *part = malloc(sizeof(double) * 2 * (total > 0 ? total : 1));
    if (!part) { free(starts); return -1; }

#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t b = 0; b < total; b++) {
        int i = find_tensor(n, starts, b);
        int64_t off = (b - starts[i]) * BLOCK;
        int64_t len = sizes[i] - off < BLOCK ? sizes[i] - off : BLOCK;
        float *restrict pp = p[i] + off, *restrict gp = g[i] + off;
        float *restrict mp = m[i] + off, *restrict vp = v[i] + off;
        const int dec = decay_mask[i];
        const float df = (has_decay && dec) ? dfac : 1.0f;
        const float aw = (has_awd && dec) ? awd : 0.0f;
        double ws = 0.0, us = 0.0;
        /* float partial sums per 64-element chunk, accumulated in double */
        for (int64_t j0 = 0; j0 < len; j0 += 64) {
            int64_t j1 = j0 + 64 < len ? j0 + 64 : len;
            float wsf = 0.0f, usf = 0.0f;
#pragma omp simd reduction(+ : wsf, usf)
            for (int64_t j = j0; j < j1; j++) {
                float w = pp[j] * df;
                float gg = gp[j];
                float mm = mp[j] + omb1 * (gg - mp[j]);
                float vv = vp[j] + omb2 * (gg * gg - vp[j]);
                mp[j] = mm;
                vp[j] = vv;
                float u = (mm * ibc1) / (sqrtf(vv * ibc2) + eps);
                u = u + aw * w;
                wsf += w * w;
                usf += u * u;
            }
            ws += wsf;
            us += usf;
        }
        part[2 * b] = ws;
        part[2 * b + 1] = us;
    }
    for (int i = 0; i < n; i++) {
        double ws = 0.0, us = 0.0;
        for (int64_t b = starts[i]; b < starts[i + 1]; b++) {
            ws += part[2 * b];
            us += part[2 * b + 1];
        }
        sums[i] = ws;
        sums[n + i] = us;
    }
    free(part);
    free(starts);
    return 0;
}

int lamb_pass2(int n, float **p, float **m, float **v, const int64_t *sizes, const uint8_t *decay_mask,
               const float *sc, const float *scale, int nthreads) {
    const float bc1 = sc[2], bc2 = sc[3], eps = sc[4];
    const float dfac = sc[5], awd = sc[6], ibc1 = 1.0f / bc1, ibc2 = 1.0f / bc2;
    const int has_decay = sc[7] != 0.0f, has_awd = sc[8] != 0.0f;
    int64_t *starts = malloc(sizeof(int64_t) * (n + 1));
    if (!starts) return -1;
    int64_t total = build_blocks(n, sizes, starts);

#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t b = 0; b < total; b++) {
        int i = find_tensor(n, starts, b);
        int64_t off = (b - starts[i]) * BLOCK;
        int64_t len = sizes[i] - off < BLOCK ? sizes[i] - off : BLOCK;
        float *restrict pp = p[i] + off;
        const float *restrict mp = m[i] + off, *restrict vp = v[i] + off;
        const int dec = decay_mask[i];
        const float df = (has_decay && dec) ? dfac : 1.0f;
        const float aw = (has_awd && dec) ? awd : 0.0f;
        const float s = scale[i];
#pragma omp simd
        for (int64_t j = 0; j < len; j++) {
            float w = pp[j] * df;
            float u = (mp[j] * ibc1) / (sqrtf(vp[j] * ibc2) + eps);
            u = u + aw * w;
            pp[j] = w - s * u;
        }
    }
    free(starts);
    return 0;
}
