// Grouped float32 matrix products for the mixture-of-experts prefill on x86 CPUs with AVX-512.
//
// For each group g (an expert e and the run of `counts[g]` columns starting at `starts[g]`):
//     Y[m, p] = sum_k W_e[m, k] * x_p[k]      for m in [0, M), p in the group's columns,
// where W_e = W + e * w_stride is row-major [M, K] (the stored expert weight, read as it is), and x_p is row
// cols[p] of X (one row per token, row stride ldx) when `cols` is given, else row p.
// Y either goes to C[p, m] (row stride ldc) or is added to out[tokens[p], m] (row stride ldo).
//
// Why: at prefill an expert gets a few dozen tokens, and BLAS copies (packs) each weight block before
// multiplying it, so streaming the weights and computing take turns. Measured here (2 threads, real widths,
// 128 experts x 32 tokens): the products of one layer take 212 ms with BLAS, 130 ms when the weights are
// already in cache, and the difference is exactly the 2.4 GB of weights at the machine's bandwidth. This kernel
// reads each weight value once, straight from memory, and multiplies it (broadcast) by a panel of the group's
// tokens packed in L2; the hardware prefetchers stream the weight rows under the multiply-adds, and the next
// tile's rows are prefetched explicitly (a jump they cannot predict). A prefill MoE layer takes ~180 ms
// instead of ~290 ms (2 threads). Measured on 2 cores only: each thread packs every group's panels for itself
// (~3 + 1.3 ms per layer at those sizes), work that is repeated per thread on many-core machines.
//
// Rows are split between `threads` OpenMP threads, torch's own (see dense_step.cpp for why); each writes only its
// own rows of Y (or its own columns of `out`), so the result does not depend on the thread count, and each
// token's groups are summed in group order.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

namespace {

constexpr int kRows = 8;       // weight rows per tile
constexpr int kMaxWidth = 48;  // token columns per panel: up to three 16-float vectors (24 accumulators)

struct Job {
    const float* W;
    int64_t w_stride, K;
    const int64_t *experts, *starts, *counts;
    int64_t groups;
    const float* X;
    int64_t ldx;
    const int32_t* cols;
    float* C;
    int64_t ldc;
    float* out;
    int64_t ldo;
    const int64_t* tokens;
    int64_t m0, m1;
    int status;
};

// acc[r][0:16V] = sum_k w[r, k] * panel[k, 0:16V] for R rows of the weight.
// While it multiplies, it prefetches the next tile's rows (`next`, kRows rows of K) into L2, one cache line
// per row every 16 steps: the hardware prefetchers follow a row once it is being read, but not the jump to the
// next rows, which would otherwise arrive from memory only when the FMAs wait for them.
template <int R, int V>
void tile(const float* w, int64_t K, const float* panel, float (*acc)[kMaxWidth], const float* next) {
    __m512 sum[R][V];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v) sum[r][v] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
        if (next && (k & 15) == 0)
            for (int r = 0; r < kRows; ++r) _mm_prefetch((const char*)(next + r * K + k), _MM_HINT_T1);
        __m512 x[V];
        for (int v = 0; v < V; ++v) x[v] = _mm512_loadu_ps(panel + k * 16 * V + 16 * v);
        for (int r = 0; r < R; ++r) {
            const __m512 b = _mm512_set1_ps(w[r * K + k]);
            for (int v = 0; v < V; ++v) sum[r][v] = _mm512_fmadd_ps(b, x[v], sum[r][v]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v) _mm512_storeu_ps(acc[r] + 16 * v, sum[r][v]);
}

template <int V>
void tile_rows(int rows, const float* w, int64_t K, const float* panel, float (*acc)[kMaxWidth], const float* next) {
    switch (rows) {
        case 8: tile<8, V>(w, K, panel, acc, next); break;
        case 7: tile<7, V>(w, K, panel, acc, next); break;
        case 6: tile<6, V>(w, K, panel, acc, next); break;
        case 5: tile<5, V>(w, K, panel, acc, next); break;
        case 4: tile<4, V>(w, K, panel, acc, next); break;
        case 3: tile<3, V>(w, K, panel, acc, next); break;
        case 2: tile<2, V>(w, K, panel, acc, next); break;
        default: tile<1, V>(w, K, panel, acc, next); break;
    }
}

void tile_any(int vectors, int rows, const float* w, int64_t K, const float* panel, float (*acc)[kMaxWidth],
              const float* next) {
    if (vectors == 3) tile_rows<3>(rows, w, K, panel, acc, next);
    else if (vectors == 2) tile_rows<2>(rows, w, K, panel, acc, next);
    else tile_rows<1>(rows, w, K, panel, acc, next);
}

// Columns [first, first + n) as one compact panel[k, c] of `width` columns (zero beyond n), so a tile reads its
// operand from L1/L2 rather than from n scattered rows. Column c is X's row cols[first + c] (or first + c);
// 16 rows are read at a time, one gather per k, so the rows' current cache lines stay in L1 for 16 steps of k.
// (Element offsets are int32: the caller keeps X's rows * ldx below 2^31.)
void pack(const float* X, int64_t ldx, const int32_t* cols, int64_t first, int64_t n, int64_t width, int64_t K,
          float* panel) {
    for (int64_t c0 = 0; c0 < width; c0 += 16) {
        int32_t offsets[16] = {0};
        const int64_t valid = n - c0 < 0 ? 0 : (n - c0 < 16 ? n - c0 : 16);
        for (int64_t c = 0; c < valid; ++c) {
            const int64_t row = cols ? cols[first + c0 + c] : first + c0 + c;
            offsets[c] = (int32_t)(row * ldx);
        }
        const __m512i idx = _mm512_loadu_si512(offsets);
        const __mmask16 mask = (__mmask16)((1u << valid) - 1u);
        for (int64_t k = 0; k < K; ++k)
            _mm512_storeu_ps(panel + k * width + c0, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, idx, X + k, 4));
    }
}

// A group's columns go in panels of at most 48, each 16, 32 or 48 wide (a group of 33 tokens costs 48 columns
// of multiply-adds, not 64), and the panels in chunks of at most four: a chunk (up to 1.5 MB at K = 2048) stays
// in L2 while each weight tile runs over all of it, and the buffer does not grow with the group.
constexpr int kChunk = 4;

struct Panel {
    int64_t first, n;
    int vectors;
    float* data;
};

void run_chunk(const Job& j, const float* W, const Panel* panels, int count, const float* after) {
    alignas(64) float acc[kRows][kMaxWidth];
    for (int64_t m = j.m0; m < j.m1; m += kRows) {
        const int rows = (int)(j.m1 - m < kRows ? j.m1 - m : kRows);
        for (int p = 0; p < count; ++p) {
            const Panel& q = panels[p];
            const float* next = p ? nullptr : (m + kRows < j.m1 ? W + (m + kRows) * j.K : after);
            tile_any(q.vectors, rows, W + m * j.K, j.K, q.data, acc, next);
            if (j.tokens) {
                for (int64_t c = 0; c < q.n; ++c) {
                    float* o = j.out + j.tokens[q.first + c] * j.ldo + m;
                    for (int r = 0; r < rows; ++r) o[r] += acc[r][c];
                }
            } else {
                for (int64_t c = 0; c < q.n; ++c) {
                    float* o = j.C + (q.first + c) * j.ldc + m;
                    for (int r = 0; r < rows; ++r) o[r] = acc[r][c];
                }
            }
        }
    }
}

// `following`: where the next group's rows start (prefetched during this group's last tile).
void run_group(const Job& j, int64_t g, float* buffer, const float* following) {
    const int64_t n = j.counts[g], s = j.starts[g];
    const float* W = j.W + j.experts[g] * j.w_stride;
    Panel panels[kChunk];
    for (int64_t done = 0; done < n;) {
        int count = 0;
        float* data = buffer;
        for (; count < kChunk && done < n; ++count) {
            const int64_t left = n - done, take = left < kMaxWidth ? left : kMaxWidth;
            const int vectors = (int)((take + 15) / 16);
            panels[count] = Panel{s + done, take, vectors, data};
            pack(j.X, j.ldx, j.cols, s + done, take, 16 * vectors, j.K, data);
            data += j.K * 16 * vectors;
            done += take;
        }
        run_chunk(j, W, panels, count, done < n ? W + j.m0 * j.K : following);
    }
}

void run_job(Job& j) {
    if (j.m0 >= j.m1) return;
    const int64_t bytes = kChunk * kMaxWidth * j.K * (int64_t)sizeof(float);
    float* buffer = static_cast<float*>(aligned_alloc(64, (bytes + 63) / 64 * 64));
    if (!buffer) {
        j.status = 1;
        return;
    }
    for (int64_t g = 0; g < j.groups; ++g) {
        if (j.counts[g] <= 0) continue;
        int64_t h = g + 1;
        while (h < j.groups && j.counts[h] <= 0) ++h;
        run_group(j, g, buffer, h < j.groups ? j.W + j.experts[h] * j.w_stride + j.m0 * j.K : nullptr);
    }
    free(buffer);
    return;
}

}  // namespace

extern "C" int q3o_grouped_gemm(const float* W, int64_t w_stride, int64_t M, int64_t K, const int64_t* experts,
                                const int64_t* starts, const int64_t* counts, int64_t groups, const float* X,
                                int64_t ldx, const int32_t* cols, float* C, int64_t ldc, float* out, int64_t ldo,
                                const int64_t* tokens, int threads) {
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    const int64_t tiles = (M + kRows - 1) / kRows;
    int status = 0;
#pragma omp parallel num_threads(threads) reduction(| : status)
    {
        // the team may be smaller than asked for (nested in another parallel region, say): rows follow it
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        Job job{W, w_stride, K, experts, starts, counts, groups, X, ldx, cols, C, ldc, out, ldo, tokens, 0, 0, 0};
        const int64_t a = tiles * t / n, b = tiles * (t + 1) / n;
        job.m0 = a * kRows;
        job.m1 = b * kRows < M ? b * kRows : M;
        run_job(job);
        status |= job.status;
    }
    return status;
}
