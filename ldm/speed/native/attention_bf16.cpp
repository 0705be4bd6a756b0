// Flash attention in bf16 for CPUs with AVX512-BF16 (built and loaded by ldm/speed/native/__init__.py).
//
// Why: PyTorch's CPU flash kernel spends most of its time outside the products for SD's head size 40 (on a
// Zen 4 core, 0.46 s for one [2, 8, 4096, 40] self-attention, where the products need about 0.1 s). Here both
// products run on vdpbf16ps with register tiles of 8 (or 4) query rows, keys and values are packed once per
// head into the instruction's pair layout, and the online softmax runs in fp32 with a short exp2 polynomial.
// Numerics match PyTorch's bf16 flash kernel: fp32 scores and sums, probabilities rounded to bf16 for P.V.
#include <immintrin.h>
#include <pthread.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

using bf16 = uint16_t;
constexpr int KB = 256;  // keys per block (multiple of 32)

inline __m512 exp2_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(x, n);  // [-0.5, 0.5]
    __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);  // Taylor of e^(r ln2), degree 6: rel err < 2e-7
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.618129107628477e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.550410866482158e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.2402265069591007f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.6931471805599453f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }

inline __m512bh broadcast_pair(const bf16* p) {  // (p[0], p[1]) in every 32-bit lane
    int32_t x;
    std::memcpy(&x, p, 4);
    return as_bh(_mm512_set1_epi32(x));
}

struct Args {
    const bf16 *q, *k, *v;
    bf16* out;
    int B, H, Nq, Nk, D;
    long qs[3], ks[3], vs[3], os[3];  // strides (elements) of batch, head, token; the last dim is contiguous
    float c;                           // scale * log2(e)
};

// Kp[Nk/16][D/2][16][2]: 16 keys' (d, d+1) pairs side by side, one zmm per pair index.
void pack_k(const bf16* k, long sn, int Nk, int D, bf16* Kp) {
    const int P = D / 2;
    for (int kb = 0; kb < Nk / 16; ++kb)
        for (int j = 0; j < 16; ++j) {
            const bf16* row = k + (long)(kb * 16 + j) * sn;
            for (int p = 0; p < P; ++p) {
                bf16* dst = Kp + ((long)(kb * P + p) * 16 + j) * 2;
                dst[0] = row[2 * p];
                dst[1] = row[2 * p + 1];
            }
        }
}

// Vp[Nk/2][DV][2]: for each key pair, every d's (v[2j][d], v[2j+1][d]), d padded with zeros to DV.
void pack_v(const bf16* v, long sn, int Nk, int D, int DV, bf16* Vp) {
    for (int jp = 0; jp < Nk / 2; ++jp) {
        const bf16* r0 = v + (long)(2 * jp) * sn;
        const bf16* r1 = r0 + sn;
        bf16* dst = Vp + (long)jp * DV * 2;
        for (int d = 0; d < DV; ++d) {
            dst[2 * d] = d < D ? r0[d] : 0;
            dst[2 * d + 1] = d < D ? r1[d] : 0;
        }
    }
}

template <int R, int NV>
void rows(const Args& a, const bf16* q, long sqn, const bf16* Kp, const bf16* Vp, bf16* out, long son, float* S,
          bf16* Pb) {
    const int P = a.D / 2, Nk = a.Nk;
    float m[R], l[R];
    __m512 acc[R][NV];
    const bf16* qr[R];
    for (int r = 0; r < R; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
        qr[r] = q + r * sqn;
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
    }
    const __m512 vc = _mm512_set1_ps(a.c);
    for (int k0 = 0; k0 < Nk; k0 += KB) {
        const int kb = std::min(KB, Nk - k0);
        __m512 vmax[R];
        for (int r = 0; r < R; ++r) vmax[r] = _mm512_set1_ps(-INFINITY);
        for (int j = 0; j < kb; j += 32) {
            __m512 s[R][2];
            for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm512_setzero_ps();
            const bf16* kp0 = Kp + (long)((k0 + j) / 16) * P * 32;
            const bf16* kp1 = kp0 + P * 32;
            for (int p = 0; p < P; ++p) {
                const __m512bh b0 = as_bh(_mm512_loadu_si512(kp0 + p * 32));
                const __m512bh b1 = as_bh(_mm512_loadu_si512(kp1 + p * 32));
                for (int r = 0; r < R; ++r) {
                    const __m512bh x = broadcast_pair(qr[r] + 2 * p);
                    s[r][0] = _mm512_dpbf16_ps(s[r][0], x, b0);
                    s[r][1] = _mm512_dpbf16_ps(s[r][1], x, b1);
                }
            }
            for (int r = 0; r < R; ++r) {
                const __m512 s0 = _mm512_mul_ps(s[r][0], vc), s1 = _mm512_mul_ps(s[r][1], vc);
                _mm512_storeu_ps(S + r * KB + j, s0);
                _mm512_storeu_ps(S + r * KB + j + 16, s1);
                vmax[r] = _mm512_max_ps(vmax[r], _mm512_max_ps(s0, s1));
            }
        }
        for (int r = 0; r < R; ++r) {
            const float mn = std::max(m[r], _mm512_reduce_max_ps(vmax[r]));
            const float alpha = std::exp2(m[r] - mn);
            m[r] = mn;
            const __m512 vm = _mm512_set1_ps(mn);
            __m512 sum = _mm512_setzero_ps();
            for (int j = 0; j < kb; j += 16) {
                const __m512 e = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(S + r * KB + j), vm));
                sum = _mm512_add_ps(sum, e);
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(Pb + r * KB + j), (__m256i)_mm512_cvtneps_pbh(e));
            }
            l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);
            const __m512 va = _mm512_set1_ps(alpha);
            for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_mul_ps(acc[r][v], va);
        }
        const bf16* vbase = Vp + (long)(k0 / 2) * NV * 32;
        for (int jp = 0; jp < kb / 2; ++jp) {
            __m512bh vv[NV];
            for (int v = 0; v < NV; ++v) vv[v] = as_bh(_mm512_loadu_si512(vbase + ((long)jp * NV + v) * 32));
            for (int r = 0; r < R; ++r) {
                const __m512bh x = broadcast_pair(Pb + r * KB + 2 * jp);
                for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, vv[v]);
            }
        }
    }
    for (int r = 0; r < R; ++r) {
        const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
        for (int v = 0; v < NV; ++v) {
            const __m256i o = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][v], inv));
            const int left = a.D - 16 * v;
            const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            _mm256_mask_storeu_epi16(out + r * son + 16 * v, mask, o);
        }
    }
}

template <int R, int NV>
void head(const Args& a, int b, int h, bf16* Kp, bf16* Vp, float* S, bf16* Pb) {
    const bf16* q = a.q + b * a.qs[0] + h * a.qs[1];
    bf16* out = a.out + b * a.os[0] + h * a.os[1];
    pack_k(a.k + b * a.ks[0] + h * a.ks[1], a.ks[2], a.Nk, a.D, Kp);
    pack_v(a.v + b * a.vs[0] + h * a.vs[1], a.vs[2], a.Nk, a.D, NV * 16, Vp);
    int i = 0;
    for (; i + R <= a.Nq; i += R) rows<R, NV>(a, q + i * a.qs[2], a.qs[2], Kp, Vp, out + i * a.os[2], a.os[2], S, Pb);
    for (; i < a.Nq; ++i) rows<1, NV>(a, q + i * a.qs[2], a.qs[2], Kp, Vp, out + i * a.os[2], a.os[2], S, Pb);
}

struct Shared {
    const Args* a;
    std::atomic<int> next{0};  // the next (batch, head) item to take
};

template <int R, int NV>
void* worker(void* arg) {
    Shared* sh = static_cast<Shared*>(arg);
    const Args& a = *sh->a;
    const int DV = NV * 16;
    bf16* Kp = static_cast<bf16*>(std::aligned_alloc(64, (size_t)a.Nk * a.D * 2 + 64));
    bf16* Vp = static_cast<bf16*>(std::aligned_alloc(64, (size_t)a.Nk * DV * 2 + 64));
    float* S = static_cast<float*>(std::aligned_alloc(64, (size_t)R * KB * 4));
    bf16* Pb = static_cast<bf16*>(std::aligned_alloc(64, (size_t)R * KB * 2));
    if (Kp && Vp && S && Pb)  // else leave the items to threads that got memory (free(nullptr) is a no-op)
        for (int item; (item = sh->next.fetch_add(1)) < a.B * a.H;)
            head<R, NV>(a, item / a.H, item % a.H, Kp, Vp, S, Pb);
    std::free(Kp);
    std::free(Vp);
    std::free(S);
    std::free(Pb);
    return nullptr;
}

template <int R, int NV>
int run(const Args& a, int nthreads) {
    Shared sh;
    sh.a = &a;
    std::vector<pthread_t> threads;  // the ones that started; this thread works too, so none is needed
    for (int i = 1; i < nthreads; ++i) {
        pthread_t t;
        if (pthread_create(&t, nullptr, worker<R, NV>, &sh) == 0) threads.push_back(t);
    }
    worker<R, NV>(&sh);
    for (pthread_t t : threads) pthread_join(t, nullptr);
    return sh.next.load() < a.B * a.H ? 2 : 0;  // items left over: every thread lacked scratch memory
}

}  // namespace

// softmax(q k^T * scale) v for q [B, H, Nq, D], k and v [B, H, Nk, D], out [B, H, Nq, D], all bf16, given by
// pointer and strides (elements; batch, head, token for q, k, v, out in that order; the last dim contiguous).
// Returns 0; 1 for a shape it does not handle (D odd or over 80, Nk not a multiple of 32); 2 when out of memory.
extern "C" int ldm_attention_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, int B,
                                  int H, int Nq, int Nk, int D, const long* strides, float scale, int nthreads) {
    if (D % 2 || D > 80 || Nk % 32 || Nk <= 0 || Nq <= 0) return 1;
    Args a{q, k, v, out, B, H, Nq, Nk, D, {}, {}, {}, {}, scale * 1.4426950408889634f};
    for (int i = 0; i < 3; ++i) {
        a.qs[i] = strides[i];
        a.ks[i] = strides[3 + i];
        a.vs[i] = strides[6 + i];
        a.os[i] = strides[9 + i];
    }
    const int NV = (D + 15) / 16;
    switch (NV) {
        case 1: return run<8, 1>(a, nthreads);
        case 2: return run<8, 2>(a, nthreads);
        case 3: return run<8, 3>(a, nthreads);
        case 4: return run<4, 4>(a, nthreads);
        case 5: return run<4, 5>(a, nthreads);
        default: return 1;
    }
}
