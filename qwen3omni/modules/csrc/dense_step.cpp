// One decode step of a dense float32 decoder stack (the code predictor's) on x86 CPUs with AVX-512, or AVX2 and
// FMA (the same source built with -mavx2 -mfma: 8-float vectors instead of 16).
//
// The step runs every layer for a few new tokens (rows), in one call:
//     x += o(attention(rope(q_norm(q(n))), rope(k_norm(k(n))), v(n)))   with n = rms_norm(x) * input_norm
//     x += down(silu(gate(m)) * up(m))                                   with m = rms_norm(x) * post_norm
// then out = rms_norm(x) * final_norm, and optionally logits = head(out) for each batch row's last token.
// Keys and values are written into the caller's cache at positions [start, start + T); token t attends
// causally over [0, start + t]. A second entry point runs a whole greedy code predictor frame (15 steps, each
// step's argmax embedded as the next step's input) in one call: the torch operations between per-step calls
// ran on caches the step had just flushed, ~0.5 ms a step.
//
// Why: the code predictor runs 15 such steps per speech frame, 5 layers and 300 MB of weights each. In torch
// each layer step is ~25 small operations whose fixed costs (dispatch, thread wake-ups, fresh buffers) add
// ~1 ms on top of the one-row products that stream the weights: 240 ms a frame, against 161 ms for the
// products alone (real widths, 2 threads). Here the products read each weight row once, straight from memory,
// and everything between them runs in the same threads, which meet at a barrier between phases (five per
// layer): 165 ms a frame.
//
// Threads split each product's output rows; every output value is one row's dot product summed in one fixed
// order, so the result does not depend on the thread count. Small per-row work (the norms) is repeated by
// every thread rather than shared, which saves a barrier.

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

extern "C" {
// Row-major float32 weights of one layer (torch's nn.Linear layout, [out, in]).
struct Q3oDenseLayer {
    const float *input_norm, *q, *k, *v, *q_norm, *k_norm, *o, *post_norm, *gate, *up, *down;
};

struct Q3oDenseStep {
    int64_t layers, C, H, Hk, D, I;  // widths: hidden, heads, key/value heads, head dim, MLP hidden
    float eps;
    const Q3oDenseLayer* layer;
    float *keys, *values;            // the cache, [layers, B, Hk, capacity, D]
    int64_t B, capacity;
    int64_t start, T;                // write offset and new tokens per batch row; rows = B * T <= 4
    const float *cos, *sin;          // [T, D]: the rotary table of the new positions
    float* x;                        // [B * T, C]: the inputs; on return, the stream after the last layer
    const float* final_norm;
    float* out;                      // [B * T, C]: x after the final norm
    const float* head;               // [V, C], or null: a head applied to each batch row's last token
    int64_t V;
    float* logits;                   // [B, V], rows `logits_stride` apart
    int64_t logits_stride;
    int threads;
};

// A whole greedy frame of the code predictor: `steps` steps, step i reading [hidden, embed(code 0)] (i = 0,
// positions 0-1) or the code chosen by step i-1 (position i + 1), applying head i, choosing its argmax (the
// first maximum, as torch.argmax) and embedding it with table i for the next step.
struct Q3oGreedyFrame {
    int64_t steps;
    const float* const* heads;       // [steps] of [V, C]
    const float* const* tables;      // [steps] of [V, C]
    float* seq;                      // [B, steps + 2, C]: rows 0-1 given; row i + 2 written with step i's embedding
    const float *cos, *sin;          // [steps + 1, D]: the rotary tables of positions 0..steps
    int64_t* codes;                  // [B, steps]
    float* logits;                   // [B, steps, V]
};
}

namespace {

// The vector width: the build's instruction set picks it.
#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
#else
using Vec = __m256;
constexpr int kLanes = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(Vec v) {
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
}
#endif

// The threads are OpenMP's. Built with -fopenmp against libgomp.so.1, the kernel shares the OpenMP runtime torch
// has already loaded (torch's wheels bundle libgomp.so.1), so its threads are the ones torch's operations just
// used. Threads of our own would compete with those for the cores while they spin-wait after each torch
// operation: measured 3.5 ms lost per step with two cores.
inline void barrier() {
#pragma omp barrier
}

constexpr int kMaxRows = 4;
constexpr int kBlock = 4;  // weight rows read together

struct Shared {
    float *qkv, *attn, *act;  // [rows, H*D + 2*Hk*D], [rows, H*D], [rows, I]
};

struct Worker {
    Shared* shared;
    int index, count;
    float* normed;  // [rows, C]: this thread's copy of the normed stream
};

inline float dot(const float* a, const float* b, int64_t n) {
    Vec sum = vzero();
    for (int64_t k = 0; k < n; k += kLanes) sum = vfma(vload(a + k), vload(b + k), sum);
    return vsum(sum);
}

// y[r][j] = W[j] . x[r] for the n rows j of W and R rows of x. Four weight rows at a time: four memory
// streams for the prefetchers and 4R independent accumulators. K is a multiple of kLanes.
template <int R>
void products(const float* W, int64_t K, int64_t n, const float* x, int64_t ldx, float* y, int64_t ldy) {
    int64_t j = 0;
    for (; j + kBlock <= n; j += kBlock) {
        const float* w = W + j * K;
        Vec acc[kBlock][R];
        for (int i = 0; i < kBlock; ++i)
            for (int r = 0; r < R; ++r) acc[i][r] = vzero();
        for (int64_t k = 0; k < K; k += kLanes) {
            Vec xv[R];
            for (int r = 0; r < R; ++r) xv[r] = vload(x + r * ldx + k);
            for (int i = 0; i < kBlock; ++i) {
                const Vec wv = vload(w + i * K + k);
                for (int r = 0; r < R; ++r) acc[i][r] = vfma(wv, xv[r], acc[i][r]);
            }
        }
        for (int i = 0; i < kBlock; ++i)
            for (int r = 0; r < R; ++r) y[r * ldy + j + i] = vsum(acc[i][r]);
    }
    for (; j < n; ++j)
        for (int r = 0; r < R; ++r) y[r * ldy + j] = dot(W + j * K, x + r * ldx, K);
}

void products_rows(int rows, const float* W, int64_t K, int64_t n, const float* x, int64_t ldx, float* y,
                   int64_t ldy) {
    switch (rows) {
        case 1: products<1>(W, K, n, x, ldx, y, ldy); break;
        case 2: products<2>(W, K, n, x, ldx, y, ldy); break;
        case 3: products<3>(W, K, n, x, ldx, y, ldy); break;
        default: products<4>(W, K, n, x, ldx, y, ldy); break;
    }
}

// This thread's share [a, b) of n output rows, in blocks of four (so the split never changes a row's sums).
void share(const Worker& w, int64_t n, int64_t* a, int64_t* b) {
    const int64_t blocks = (n + 3) / 4;
    *a = blocks * w.index / w.count * 4;
    *b = blocks * (w.index + 1) / w.count * 4;
    if (*b > n) *b = n;
    if (*a > n) *a = n;
}

// dst[i] = src[i] / rms(src) * weight[i], in float32 (as torch's RMSNorm: normalise, then scale).
void rms_norm(const float* src, const float* weight, int64_t n, float eps, float* dst) {
    Vec acc = vzero();
    for (int64_t i = 0; i < n; i += kLanes) {
        const Vec v = vload(src + i);
        acc = vfma(v, v, acc);
    }
    const float inv = 1.0f / sqrtf(vsum(acc) / static_cast<float>(n) + eps);
    for (int64_t i = 0; i < n; ++i) dst[i] = (src[i] * inv) * weight[i];
}

// In place: rotate the two halves of a head (rotate_half layout), x * cos + rotate_half(x) * sin.
void rope(float* h, const float* cos, const float* sin, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < half; ++i) {
        const float a = h[i], b = h[i + half];
        h[i] = a * cos[i] - b * sin[i];
        h[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

// Keys/values of one (batch row, key head), then attention for the query heads that read it.
void attend_group(const Shared& sh, const Q3oDenseStep& s, const Q3oDenseLayer& L, float* keys, float* values,
                  int64_t b, int64_t g) {
    const int64_t D = s.D, T = s.T, width = s.H * D + 2 * s.Hk * D, groups = s.H / s.Hk;
    float* k_cache = keys + (b * s.Hk + g) * s.capacity * D;
    float* v_cache = values + (b * s.Hk + g) * s.capacity * D;
    for (int64_t t = 0; t < T; ++t) {
        const float* row = sh.qkv + (b * T + t) * width;
        float* k = k_cache + (s.start + t) * D;
        rms_norm(row + s.H * D + g * D, L.k_norm, D, s.eps, k);
        rope(k, s.cos + t * D, s.sin + t * D, D);
        const float* v = row + s.H * D + s.Hk * D + g * D;
        for (int64_t i = 0; i < D; ++i) v_cache[(s.start + t) * D + i] = v[i];
    }
    const float scale = 1.0f / sqrtf(static_cast<float>(D));
    float q[512], scores[4096];
    for (int64_t t = 0; t < T; ++t) {
        const int64_t seen = s.start + t + 1;
        for (int64_t j = 0; j < groups; ++j) {
            const int64_t h = g * groups + j;
            rms_norm(sh.qkv + (b * T + t) * width + h * D, L.q_norm, D, s.eps, q);
            rope(q, s.cos + t * D, s.sin + t * D, D);
            float top = -INFINITY;
            for (int64_t p = 0; p < seen; ++p) {
                scores[p] = dot(q, k_cache + p * D, D) * scale;
                top = scores[p] > top ? scores[p] : top;
            }
            float total = 0.0f;
            for (int64_t p = 0; p < seen; ++p) total += scores[p] = expf(scores[p] - top);
            float* o = sh.attn + (b * T + t) * s.H * D + h * D;
            for (int64_t i = 0; i < D; ++i) o[i] = 0.0f;
            for (int64_t p = 0; p < seen; ++p) {
                const float weight = scores[p] / total;
                for (int64_t i = 0; i < D; ++i) o[i] += weight * v_cache[p * D + i];
            }
        }
    }
}

void layer_step(Worker& w, const Q3oDenseStep& s, int64_t l) {
    Shared& sh = *w.shared;
    const Q3oDenseLayer& L = s.layer[l];
    const int rows = static_cast<int>(s.B * s.T);
    const int64_t C = s.C, HD = s.H * s.D, KD = s.Hk * s.D, width = HD + 2 * KD;
    float* keys = s.keys + l * s.B * s.Hk * s.capacity * s.D;
    float* values = s.values + l * s.B * s.Hk * s.capacity * s.D;
    int64_t a, b;

    // q, k and v as one row space [q rows | k rows | v rows]
    for (int r = 0; r < rows; ++r) rms_norm(s.x + r * C, L.input_norm, C, s.eps, w.normed + r * C);
    share(w, width, &a, &b);
    const float* mats[3] = {L.q, L.k, L.v};
    const int64_t edges[4] = {0, HD, HD + KD, width};
    for (int m = 0; m < 3; ++m) {
        const int64_t lo = a > edges[m] ? a : edges[m], hi = b < edges[m + 1] ? b : edges[m + 1];
        if (lo < hi) products_rows(rows, mats[m] + (lo - edges[m]) * C, C, hi - lo, w.normed, C, sh.qkv + lo, width);
    }
    barrier();

    for (int64_t item = w.index; item < s.B * s.Hk; item += w.count) attend_group(sh, s, L, keys, values, item / s.Hk,
                                                                                 item % s.Hk);
    barrier();

    // x += o(attn): each thread adds its own rows of the product
    float part[kMaxRows * 64];
    share(w, C, &a, &b);
    for (int64_t j = a; j < b; j += 64) {
        const int64_t e = j + 64 < b ? j + 64 : b;
        products_rows(rows, L.o + j * HD, HD, e - j, sh.attn, HD, part, 64);
        for (int r = 0; r < rows; ++r)
            for (int64_t i = j; i < e; ++i) s.x[r * C + i] += part[r * 64 + i - j];
    }
    barrier();

    for (int r = 0; r < rows; ++r) rms_norm(s.x + r * C, L.post_norm, C, s.eps, w.normed + r * C);
    share(w, s.I, &a, &b);
    float gate[kMaxRows * 64], up[kMaxRows * 64];
    for (int64_t j = a; j < b; j += 64) {
        const int64_t e = j + 64 < b ? j + 64 : b;
        products_rows(rows, L.gate + j * C, C, e - j, w.normed, C, gate, 64);
        products_rows(rows, L.up + j * C, C, e - j, w.normed, C, up, 64);
        for (int r = 0; r < rows; ++r)
            for (int64_t i = j; i < e; ++i) {
                const float g = gate[r * 64 + i - j];
                sh.act[r * s.I + i] = g / (1.0f + expf(-g)) * up[r * 64 + i - j];
            }
    }
    barrier();

    share(w, C, &a, &b);
    for (int64_t j = a; j < b; j += 64) {
        const int64_t e = j + 64 < b ? j + 64 : b;
        products_rows(rows, L.down + j * s.I, s.I, e - j, sh.act, s.I, part, 64);
        for (int r = 0; r < rows; ++r)
            for (int64_t i = j; i < e; ++i) s.x[r * C + i] += part[r * 64 + i - j];
    }
    barrier();
}

// Every layer, the final norm (into `out` when given) and the head. Ends without a barrier.
void run_step(Worker& w, const Q3oDenseStep& s) {
    for (int64_t l = 0; l < s.layers; ++l) layer_step(w, s, l);
    const int64_t rows = s.B * s.T;
    for (int64_t r = 0; r < rows; ++r) rms_norm(s.x + r * s.C, s.final_norm, s.C, s.eps, w.normed + r * s.C);
    if (w.index == 0 && s.out)
        for (int64_t i = 0; i < rows * s.C; ++i) s.out[i] = w.normed[i];
    if (s.head) {  // each batch row's last token: rows T-1, 2T-1, ... of the normed stream
        int64_t a, b;
        share(w, s.V, &a, &b);
        if (a < b)
            products_rows(static_cast<int>(s.B), s.head + a * s.C, s.C, b - a, w.normed + (s.T - 1) * s.C,
                          s.T * s.C, s.logits + a, s.logits_stride);
    }
}

// The greedy frame (see Q3oGreedyFrame): every thread runs the same sequence of steps, each with its own copy
// of the step's settings, and they meet at barriers around the shared parts (the inputs, the choices).
void run_frame(Worker& w, const Q3oDenseStep& base, const Q3oGreedyFrame& f) {
    const int64_t C = base.C, V = base.V, rows_in = f.steps + 2;
    for (int64_t i = 0; i < f.steps; ++i) {
        Q3oDenseStep s = base;
        s.start = i == 0 ? 0 : i + 1;
        s.T = i == 0 ? 2 : 1;
        s.cos = f.cos + s.start * s.D;
        s.sin = f.sin + s.start * s.D;
        s.head = f.heads[i];
        s.logits = f.logits + i * V;
        s.logits_stride = f.steps * V;
        s.out = nullptr;  // only the logits are read
        if (w.index == 0)  // the step's inputs: rows [start, start + T) of each batch row's sequence
            for (int64_t b = 0; b < s.B; ++b)
                for (int64_t t = 0; t < s.T; ++t)
                    for (int64_t c = 0; c < C; ++c)
                        s.x[(b * s.T + t) * C + c] = f.seq[(b * rows_in + s.start + t) * C + c];
        barrier();
        run_step(w, s);
        barrier();
        for (int64_t b = w.index; b < s.B; b += w.count) {
            const float* row = s.logits + b * s.logits_stride;
            int64_t best = 0;  // torch.argmax: the first maximum, a NaN counting as the maximum
            for (int64_t v = 0; v < V; ++v) {
                if (row[v] != row[v]) {
                    best = v;
                    break;
                }
                best = row[v] > row[best] ? v : best;
            }
            f.codes[b * f.steps + i] = best;
            const float* embedding = f.tables[i] + best * C;
            float* next = f.seq + (b * rows_in + i + 2) * C;
            for (int64_t c = 0; c < C; ++c) next[c] = embedding[c];
        }
        barrier();
    }
}

bool fits(const Q3oDenseStep* s, int64_t rows, int64_t last_position) {
    return rows >= 1 && rows <= kMaxRows && s->C % 16 == 0 && s->H * s->D % 16 == 0 && s->I % 16 == 0 &&
           s->D % 16 == 0 && s->D <= 512 && last_position < s->capacity && last_position < 4096 && s->H % s->Hk == 0;
}

// Runs `body(worker)` on the team, with scratch buffers for `rows` rows. Returns 0, or 2 when memory ran out.
template <typename Body>
int in_team(const Q3oDenseStep* s, int64_t rows, Body body) {
    const int threads = s->threads < 1 ? 1 : (s->threads > 64 ? 64 : s->threads);
    const int64_t width = s->H * s->D + 2 * s->Hk * s->D;
    const int64_t floats = rows * (width + s->H * s->D + s->I) + threads * rows * s->C;
    float* scratch = static_cast<float*>(aligned_alloc(64, sizeof(float) * ((floats + 15) / 16 * 16)));
    if (!scratch) return 2;
    Shared shared{scratch, scratch + rows * width, scratch + rows * width + rows * s->H * s->D};
    float* normed = shared.act + rows * s->I;
#pragma omp parallel num_threads(threads)
    {
        // the team may be smaller than asked for (nested in another parallel region, say): shares follow it
        const int t = omp_get_thread_num();
        Worker w{&shared, t, omp_get_num_threads(), normed + t * rows * s->C};
        body(w);
    }
    free(scratch);
    return 0;
}

}  // namespace

// Returns 0; 1 when the shapes are outside what the kernel handles, 2 when memory ran out.
extern "C" int q3o_dense_step(const Q3oDenseStep* s) {
    if (!fits(s, s->B * s->T, s->start + s->T - 1) || (s->head && (s->V < 1 || !s->logits)))
        return 1;
    return in_team(s, s->B * s->T, [s](Worker& w) { run_step(w, *s); });
}

// A greedy frame (see Q3oGreedyFrame) in one call: `s` gives the widths, weights, cache and threads (its
// start, T, cos, sin, head, logits and out are set per step). Returns as q3o_dense_step does.
extern "C" int q3o_dense_greedy_frame(const Q3oDenseStep* s, const Q3oGreedyFrame* f) {
    if (f->steps < 1 || !fits(s, s->B * 2, f->steps) || s->V < 1) return 1;
    return in_team(s, s->B * 2, [s, f](Worker& w) { run_frame(w, *s, *f); });
}
