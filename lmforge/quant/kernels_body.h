// One code path of the quantized kernels, included by kernels.cpp once per instruction set inside its own
// namespace (LMF_NS) and `#pragma GCC target` region, so the same source becomes the generic, AVX2, AVX-512 and
// VNNI paths and the CPU picks one at run time (kernels.cpp: detect()). Macros set by the includer:
//   LMF_NS       the namespace of this path
//   LMF_X86      1: 256-bit intrinsics (AVX2 + FMA + F16C at least); 0: portable C++ only (auto-vectorised)
//   LMF_DOT      how 32 u8 x s8 products are summed into 8 int32 lanes: 0 maddubs+madd (AVX2),
//                1 vpdpbusd (AVX-512 VNNI with VL, EVEX), 2 vpdpbusd (AVX-VNNI, VEX)
//   LMF_R        activation rows sharing one decode of a weight block (4 on every path)
// Nothing here may #include: a header pulled in inside a target region would compile its inline functions
// for that ISA, and the linker could hand those to the generic path.
// Everything here reads the packed weights and never writes them (they may be a read-only mmap).
//
// Integer types: the activation rows are quantized once per call to int8 blocks (BlockQ8 for the 32-value
// types, BlockQ8K for the K-quants; see kernels.cpp), so a weight block costs integer multiply-adds and one
// float multiply-add per block and activation row. A weight block is decoded in registers once per group of
// up to LMF_R activation rows, and weight rows go in L2-sized tiles that meet every group (mm_rows), so memory
// traffic is one read of the packed weights whatever the number of rows.

namespace LMF_NS {

constexpr int R = LMF_R;  // activation rows sharing one decode of a weight block

#if LMF_X86
inline float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}
inline __m256i load32(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
inline __m256i mask4() { return _mm256_set1_epi8(0x0F); }

// acc (8 x int32) += sums of 4 adjacent u8 x s8 products of u and s.
inline __m256i dot_acc(__m256i acc, __m256i u, __m256i s) {
#if LMF_DOT == 1
  return _mm256_dpbusd_epi32(acc, u, s);
#elif LMF_DOT == 2
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// 8 x int32: u8 x s8 products summed in pairs (int16, no saturation for |u| * 127 * 2 < 32768), then weighted
// by the int16 scales in `sc` and summed in pairs again (the K-quants' per-sub-block scales).
inline __m256i dot_scaled(__m256i u, __m256i s, __m256i sc) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), sc);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 32 bits -> 32 bytes, byte j = 0x10 where bit j is set (the fifth bit of Q5_0/Q5_1 codes).
inline __m256i bits_to_0x10(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32((int)bits),
      _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0));
  const __m256i pick = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, pick), pick);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}
#else
inline float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return half_to_float(h);
}
#endif

// ---------------------------------------------------------------------------------------------------------
// The 32-value types. Each gives its block's codes as 32 bytes in value order (unsigned 0..15 / 0..31, or
// signed for Q8_0), its scale d, and how the codes map to values: v = d * (q - offset) + m.

struct TQ8_0 { static constexpr int bytes = 34, offset = 0; static constexpr bool sign = true, min = false; };
struct TQ4_0 { static constexpr int bytes = 18, offset = 8; static constexpr bool sign = false, min = false; };
struct TQ4_1 { static constexpr int bytes = 20, offset = 0; static constexpr bool sign = false, min = true; };
struct TQ5_0 { static constexpr int bytes = 22, offset = 16; static constexpr bool sign = false, min = false; };
struct TQ5_1 { static constexpr int bytes = 24, offset = 0; static constexpr bool sign = false, min = true; };

// Codes of one block into q[32] (value order), portable.
template <class T> inline void codes(const uint8_t* b, int8_t* q);
template <> inline void codes<TQ8_0>(const uint8_t* b, int8_t* q) { std::memcpy(q, b + 2, 32); }
inline void nibbles(const uint8_t* qs, int8_t* q) {
  for (int j = 0; j < 16; ++j) { q[j] = (int8_t)(qs[j] & 0x0F); q[j + 16] = (int8_t)(qs[j] >> 4); }
}
inline void fifth_bits(const uint8_t* qh, int8_t* q) {
  uint32_t h;
  std::memcpy(&h, qh, 4);
  for (int j = 0; j < 32; ++j) q[j] = (int8_t)(q[j] | (((h >> j) & 1) << 4));
}
template <> inline void codes<TQ4_0>(const uint8_t* b, int8_t* q) { nibbles(b + 2, q); }
template <> inline void codes<TQ4_1>(const uint8_t* b, int8_t* q) { nibbles(b + 4, q); }
template <> inline void codes<TQ5_0>(const uint8_t* b, int8_t* q) { nibbles(b + 6, q); fifth_bits(b + 2, q); }
template <> inline void codes<TQ5_1>(const uint8_t* b, int8_t* q) { nibbles(b + 8, q); fifth_bits(b + 4, q); }

#if LMF_X86
inline __m256i nibbles_v(const uint8_t* qs) {
  const __m128i v = _mm_loadu_si128((const __m128i*)qs);
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
  return _mm256_and_si256(both, mask4());
}
inline uint32_t u32(const uint8_t* p) { uint32_t h; std::memcpy(&h, p, 4); return h; }
template <class T> inline __m256i codes_v(const uint8_t* b);
template <> inline __m256i codes_v<TQ8_0>(const uint8_t* b) { return load32(b + 2); }
template <> inline __m256i codes_v<TQ4_0>(const uint8_t* b) { return nibbles_v(b + 2); }
template <> inline __m256i codes_v<TQ4_1>(const uint8_t* b) { return nibbles_v(b + 4); }
template <> inline __m256i codes_v<TQ5_0>(const uint8_t* b) {
  return _mm256_or_si256(nibbles_v(b + 6), bits_to_0x10(u32(b + 2)));
}
template <> inline __m256i codes_v<TQ5_1>(const uint8_t* b) {
  return _mm256_or_si256(nibbles_v(b + 8), bits_to_0x10(u32(b + 4)));
}
#endif

// rr activation rows (rr <= R) of nb BlockQ8 each, starting at xs, against one packed weight row w; out[r].
template <class T, int RR>
inline void dot32(const uint8_t* w, const BlockQ8* xs, int64_t nb, float* out) {
  float corr[RR];
  for (int r = 0; r < RR; ++r) corr[r] = 0.f;
#if LMF_X86
  // U independent accumulators per row: with one or two rows, a single chain of dependent FMAs (4 cycles
  // each) would cap a core at one block per 4 cycles, below what memory delivers for the 4-bit types.
  constexpr int U = RR >= 4 ? 1 : 2;
  __m256 acc[RR][U];
  for (int r = 0; r < RR; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = _mm256_setzero_ps();
  auto one = [&](int64_t b, int u) __attribute__((always_inline)) {
    const uint8_t* blk = w + b * T::bytes;
    const float dw = h2f(blk);
    const __m256i v = codes_v<T>(blk);
    const __m256i uv = T::sign ? _mm256_sign_epi8(v, v) : v;  // |q| for the signed type (s8 x s8 as u8 x s8)
    for (int r = 0; r < RR; ++r) {
      const BlockQ8& x = xs[r * nb + b];
      __m256i s = load32(x.q);
      if (T::sign) s = _mm256_sign_epi8(s, v);
      const __m256i dot = dot_acc(_mm256_setzero_si256(), uv, s);
      acc[r][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * x.d), acc[r][u]);
      if (T::offset) corr[r] += dw * x.s;
      if (T::min) corr[r] -= h2f(blk + 2) * x.s;
    }
  };
  int64_t b = 0;
  for (; b + U <= nb; b += U)
    for (int u = 0; u < U; ++u) one(b + u, u);
  for (; b < nb; ++b) one(b, 0);
  for (int r = 0; r < RR; ++r) {
    __m256 t = acc[r][0];
    for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[r][u]);
    out[r] = hsum(t) - (float)(T::offset ? T::offset : 1) * corr[r];
  }
#else
  float acc[RR];
  for (int r = 0; r < RR; ++r) acc[r] = 0.f;
  int8_t q[32];
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * T::bytes;
    const float dw = h2f(blk);
    codes<T>(blk, q);
    for (int r = 0; r < RR; ++r) {
      const BlockQ8& x = xs[r * nb + b];
      int32_t s = 0;
      for (int j = 0; j < 32; ++j) s += (int32_t)q[j] * (int32_t)x.q[j];
      acc[r] += (float)s * (dw * x.d);
      if (T::offset) corr[r] += dw * x.s;
      if (T::min) corr[r] -= h2f(blk + 2) * x.s;
    }
  }
  for (int r = 0; r < RR; ++r) out[r] = acc[r] - (float)(T::offset ? T::offset : 1) * corr[r];
#endif
}

// ---------------------------------------------------------------------------------------------------------
// The K-quants against BlockQ8K activations (256 values, d, sums of each 16).

// Q4_K / Q5_K: eight 6-bit scales and mins packed in 12 bytes (see ggml.py: _k_scale_min).
inline void scale_min_k4(const uint8_t* s, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    mn[j] = s[j + 4] & 63;
    sc[j + 4] = (uint8_t)((s[j + 8] & 0x0F) | ((s[j] >> 2) & 0x30));
    mn[j + 4] = (uint8_t)((s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30));
  }
}

// Q4_K (HQ = false) and Q5_K (HQ = true): value = d*sc*q - dmin*m per sub-block of 32.
template <bool HQ, int RR>
inline void dot_q45k(const uint8_t* w, const BlockQ8K* xs, int64_t nb, float* out) {
  constexpr int bytes = HQ ? 176 : 144;
  float corr[RR];
  for (int r = 0; r < RR; ++r) corr[r] = 0.f;
#if LMF_X86
  __m256 acc[RR];
  for (int r = 0; r < RR; ++r) acc[r] = _mm256_setzero_ps();
#else
  float acc[RR];
  for (int r = 0; r < RR; ++r) acc[r] = 0.f;
#endif
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * bytes;
    const float d = h2f(blk), dmin = h2f(blk + 2);
    uint8_t sc[8], mn[8];
    scale_min_k4(blk + 4, sc, mn);
    const uint8_t* qh = blk + 16;  // Q5_K only
    const uint8_t* qs = blk + (HQ ? 48 : 16);
#if LMF_X86
    __m256i sumi[RR];
    for (int r = 0; r < RR; ++r) sumi[r] = _mm256_setzero_si256();
    const __m256i hv = HQ ? load32(qh) : _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      const __m256i v = load32(qs + 32 * j);
      __m256i lo = _mm256_and_si256(v, mask4());
      __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask4());
      if (HQ) {
        const __m256i one = _mm256_set1_epi8(1);
        lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 2 * j), one), 4));
        hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 2 * j + 1), one), 4));
      }
      const __m256i slo = _mm256_set1_epi16(sc[2 * j]), shi = _mm256_set1_epi16(sc[2 * j + 1]);
      for (int r = 0; r < RR; ++r) {
        const int8_t* xq = xs[r * nb + b].q + 64 * j;
        sumi[r] = _mm256_add_epi32(sumi[r], dot_scaled(lo, load32(xq), slo));
        sumi[r] = _mm256_add_epi32(sumi[r], dot_scaled(hi, load32(xq + 32), shi));
      }
    }
    for (int r = 0; r < RR; ++r) {
      const BlockQ8K& x = xs[r * nb + b];
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[r]), _mm256_set1_ps(d * x.d), acc[r]);
    }
#else
    int8_t q[256];
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l) {
        q[64 * j + l] = (int8_t)(qs[32 * j + l] & 0x0F);
        q[64 * j + 32 + l] = (int8_t)(qs[32 * j + l] >> 4);
        if (HQ) {
          q[64 * j + l] = (int8_t)(q[64 * j + l] | (((qh[l] >> (2 * j)) & 1) << 4));
          q[64 * j + 32 + l] = (int8_t)(q[64 * j + 32 + l] | (((qh[l] >> (2 * j + 1)) & 1) << 4));
        }
      }
    for (int r = 0; r < RR; ++r) {
      const BlockQ8K& x = xs[r * nb + b];
      int32_t total = 0;
      for (int i = 0; i < 8; ++i) {
        int32_t s = 0;
        for (int l = 0; l < 32; ++l) s += (int32_t)q[32 * i + l] * (int32_t)x.q[32 * i + l];
        total += s * (int32_t)sc[i];
      }
      acc[r] += (float)total * (d * x.d);
    }
#endif
    for (int r = 0; r < RR; ++r) {
      const BlockQ8K& x = xs[r * nb + b];
      int32_t m = 0;
      for (int i = 0; i < 8; ++i) m += (int32_t)mn[i] * ((int32_t)x.bsums[2 * i] + (int32_t)x.bsums[2 * i + 1]);
      corr[r] += dmin * x.d * (float)m;
    }
  }
#if LMF_X86
  for (int r = 0; r < RR; ++r) out[r] = hsum(acc[r]) - corr[r];
#else
  for (int r = 0; r < RR; ++r) out[r] = acc[r] - corr[r];
#endif
}

// Q6_K: value = d * sc * (q - 32), q 6-bit from ql (low nibbles) and qh (2 bits), sc int8 per 16 values.
template <int RR>
inline void dot_q6k(const uint8_t* w, const BlockQ8K* xs, int64_t nb, float* out) {
  float corr[RR];
  for (int r = 0; r < RR; ++r) corr[r] = 0.f;
#if LMF_X86
  __m256 acc[RR];
  for (int r = 0; r < RR; ++r) acc[r] = _mm256_setzero_ps();
#else
  float acc[RR];
  for (int r = 0; r < RR; ++r) acc[r] = 0.f;
#endif
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * 210;
    const uint8_t* ql = blk;
    const uint8_t* qh = blk + 128;
    const int8_t* sc = (const int8_t*)(blk + 192);
    const float d = h2f(blk + 208);
#if LMF_X86
    __m256i sumi[RR];
    for (int r = 0; r < RR; ++r) sumi[r] = _mm256_setzero_si256();
    const __m256i three = _mm256_set1_epi8(3);
    for (int h = 0; h < 2; ++h) {
      const __m256i a = load32(ql + 64 * h), c = load32(ql + 64 * h + 32), hv = load32(qh + 32 * h);
      __m256i g[4];
      g[0] = _mm256_or_si256(_mm256_and_si256(a, mask4()), _mm256_slli_epi16(_mm256_and_si256(hv, three), 4));
      g[1] = _mm256_or_si256(_mm256_and_si256(c, mask4()),
                             _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 2), three), 4));
      g[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), mask4()),
                             _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 4), three), 4));
      g[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), mask4()),
                             _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 6), three), 4));
      for (int k = 0; k < 4; ++k) {
        const int s0 = sc[8 * h + 2 * k], s1 = sc[8 * h + 2 * k + 1];
        const __m256i scv = _mm256_set_m128i(_mm_set1_epi16((short)s1), _mm_set1_epi16((short)s0));
        for (int r = 0; r < RR; ++r)
          sumi[r] = _mm256_add_epi32(sumi[r], dot_scaled(g[k], load32(xs[r * nb + b].q + 128 * h + 32 * k), scv));
      }
    }
    for (int r = 0; r < RR; ++r) {
      const BlockQ8K& x = xs[r * nb + b];
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[r]), _mm256_set1_ps(d * x.d), acc[r]);
    }
#else
    int8_t q[256];
    for (int h = 0; h < 2; ++h)
      for (int l = 0; l < 32; ++l) {
        const uint8_t a = ql[64 * h + l], c = ql[64 * h + 32 + l], hb = qh[32 * h + l];
        q[128 * h + l] = (int8_t)((a & 0x0F) | ((hb & 3) << 4));
        q[128 * h + 32 + l] = (int8_t)((c & 0x0F) | (((hb >> 2) & 3) << 4));
        q[128 * h + 64 + l] = (int8_t)((a >> 4) | (((hb >> 4) & 3) << 4));
        q[128 * h + 96 + l] = (int8_t)((c >> 4) | (((hb >> 6) & 3) << 4));
      }
    for (int r = 0; r < RR; ++r) {
      const BlockQ8K& x = xs[r * nb + b];
      int32_t total = 0;
      for (int i = 0; i < 16; ++i) {
        int32_t s = 0;
        for (int l = 0; l < 16; ++l) s += (int32_t)q[16 * i + l] * (int32_t)x.q[16 * i + l];
        total += s * (int32_t)sc[i];
      }
      acc[r] += (float)total * (d * x.d);
    }
#endif
    for (int r = 0; r < RR; ++r) {
      const BlockQ8K& x = xs[r * nb + b];
      int32_t m = 0;
      for (int i = 0; i < 16; ++i) m += (int32_t)sc[i] * (int32_t)x.bsums[i];
      corr[r] += d * x.d * (float)(32 * m);
    }
  }
#if LMF_X86
  for (int r = 0; r < RR; ++r) out[r] = hsum(acc[r]) - corr[r];
#else
  for (int r = 0; r < RR; ++r) out[r] = acc[r] - corr[r];
#endif
}

// ---------------------------------------------------------------------------------------------------------
// F16 / BF16 weights against fp32 activations, fp32 accumulation (weights widened exactly).

template <bool BF>
inline float w16(const uint8_t* p, int64_t i) {
  uint16_t h;
  std::memcpy(&h, p + 2 * i, 2);
  if (BF) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
#if LMF_X86
  return _cvtsh_ss(h);
#else
  return half_to_float(h);
#endif
}

template <bool BF, int RR>
inline void dot_16(const uint8_t* w, const float* xs, int64_t k, float* out) {
  int64_t i = 0;
#if LMF_X86
  __m256 acc[RR][2];
  for (int r = 0; r < RR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (; i + 16 <= k; i += 16) {
    __m256 wv[2];
    for (int j = 0; j < 2; ++j) {
      const __m128i h = _mm_loadu_si128((const __m128i*)(w + 2 * (i + 8 * j)));
      wv[j] = BF ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
    }
    for (int r = 0; r < RR; ++r)
      for (int j = 0; j < 2; ++j)
        acc[r][j] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(xs + r * k + i + 8 * j), acc[r][j]);
  }
  for (int r = 0; r < RR; ++r) out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
#else
  for (int r = 0; r < RR; ++r) out[r] = 0.f;
  for (int r = 0; r < RR; ++r) {
    float s = 0.f;
    for (int64_t j = 0; j < k; ++j) s += w16<BF>(w, j) * xs[r * k + j];
    out[r] = s;
  }
  i = k;
#endif
  for (; i < k; ++i) {
    const float wi = w16<BF>(w, i);
    for (int r = 0; r < RR; ++r) out[r] += wi * xs[r * k + i];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Activation rows -> int8 blocks, once per call. d = max|x| / 127 and q = round-half-even(x * (1/d)) in fp32
// (tests/quant/test_kernels.py repeats these exact operations to check the integer paths to rounding).

inline void quantize_q8(const float* x, int64_t k, BlockQ8* out) {
  for (int64_t b = 0; b < k / 32; ++b) {
    const float* v = x + 32 * b;
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(v[j]));
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    int32_t s = 0;
    for (int j = 0; j < 32; ++j) {
      const int8_t q = (int8_t)std::nearbyint(v[j] * id);
      out[b].q[j] = q;
      s += q;
    }
    out[b].d = d;
    out[b].s = d * (float)s;
  }
}

inline void quantize_q8k(const float* x, int64_t k, BlockQ8K* out) {
  for (int64_t b = 0; b < k / 256; ++b) {
    const float* v = x + 256 * b;
    float amax = 0.f;
    for (int j = 0; j < 256; ++j) amax = std::max(amax, std::fabs(v[j]));
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    for (int j = 0; j < 256; ++j) out[b].q[j] = (int8_t)std::nearbyint(v[j] * id);
    for (int g = 0; g < 16; ++g) {
      int32_t s = 0;
      for (int j = 0; j < 16; ++j) s += out[b].q[16 * g + j];
      out[b].bsums[g] = (int16_t)s;
    }
    out[b].d = d;
  }
}

void prepare_rows(bool kq, const float* x, int64_t k, char* buf, int64_t act_row, int64_t b, int64_t e) {
  for (int64_t r = b; r < e; ++r) {
    if (kq) quantize_q8k(x + r * k, k, (BlockQ8K*)(buf + r * act_row));
    else quantize_q8(x + r * k, k, (BlockQ8*)(buf + r * act_row));
  }
}

uint64_t sum_chunks(const uint8_t* p, int64_t b, int64_t e) {
#if LMF_X86
  __m256i acc = _mm256_setzero_si256();
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t i = b; i < e; ++i) {
    const uint8_t* q = p + 256 * i;
    __m256i s = _mm256_sad_epu8(load32(q), zero);
    for (int j = 1; j < 8; ++j) s = _mm256_add_epi64(s, _mm256_sad_epu8(load32(q + 32 * j), zero));
    acc = _mm256_add_epi64(acc, s);
  }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256((__m256i*)lanes, acc);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
#else
  uint64_t s = 0;
  for (int64_t i = 256 * b; i < 256 * e; ++i) s += p[i];
  return s;
#endif
}

// ---------------------------------------------------------------------------------------------------------
// The drivers: output rows split over threads; in each, every weight row against all activation rows in
// groups of up to R (the packed row is read from memory once, then from L1).

template <int RR>
inline void dot_any(int type, const uint8_t* w, const char* xs, int64_t nbk, float* out) {
  switch (type) {
    case Q8_0: dot32<TQ8_0, RR>(w, (const BlockQ8*)xs, nbk, out); break;
    case Q4_0: dot32<TQ4_0, RR>(w, (const BlockQ8*)xs, nbk, out); break;
    case Q4_1: dot32<TQ4_1, RR>(w, (const BlockQ8*)xs, nbk, out); break;
    case Q5_0: dot32<TQ5_0, RR>(w, (const BlockQ8*)xs, nbk, out); break;
    case Q5_1: dot32<TQ5_1, RR>(w, (const BlockQ8*)xs, nbk, out); break;
    case Q4_K: dot_q45k<false, RR>(w, (const BlockQ8K*)xs, nbk, out); break;
    case Q5_K: dot_q45k<true, RR>(w, (const BlockQ8K*)xs, nbk, out); break;
    case Q6_K: dot_q6k<RR>(w, (const BlockQ8K*)xs, nbk, out); break;
    case F16: dot_16<false, RR>(w, (const float*)xs, nbk, out); break;
    case BF16: dot_16<true, RR>(w, (const float*)xs, nbk, out); break;
    default: break;
  }
}

template <int RR>
inline void store(float* y, int64_t m, int64_t i, int64_t r0, const float* out) {
  for (int r = 0; r < RR; ++r) y[(r0 + r) * m + i] = out[r];
}

// y (n, m) for output rows [i0, i1). act: n activation rows of act_row bytes (quantized blocks, or fp32).
// Weight rows go in tiles of ~kTileBytes: each tile meets every group of R activation rows while it is in L2,
// and a group (R rows of blocks, a few KB) stays in L1 -- rather than every weight row meeting all n
// activation rows, which makes every dot product read its activations from L2 once n x k no longer fits L1.
constexpr int64_t kTileBytes = 128 << 10;

template <int RR>
inline void rows_tile(int type, const char* xr, int64_t nbk, const uint8_t* w, int64_t row_bytes, float* y,
                      int64_t m, int64_t r0, int64_t i0, int64_t i1) {
  float out[RR];
  for (int64_t i = i0; i < i1; ++i) {
    dot_any<RR>(type, w + i * row_bytes, xr, nbk, out);
    store<RR>(y, m, i, r0, out);
  }
}

void mm_rows(int type, const char* act, int64_t act_row, int64_t n, const uint8_t* w, int64_t row_bytes,
             int64_t nbk, float* y, int64_t m, int64_t i0, int64_t i1) {
  int64_t tile = kTileBytes / (row_bytes > 0 ? row_bytes : 1);
  if (tile < 1) tile = 1;
  for (int64_t t0 = i0; t0 < i1; t0 += tile) {
    const int64_t t1 = t0 + tile < i1 ? t0 + tile : i1;
    int64_t r0 = 0;
    for (; r0 + R <= n; r0 += R) rows_tile<R>(type, act + r0 * act_row, nbk, w, row_bytes, y, m, r0, t0, t1);
    const char* xr = act + r0 * act_row;
    switch (n - r0) {
      case 1: rows_tile<1>(type, xr, nbk, w, row_bytes, y, m, r0, t0, t1); break;
      case 2: rows_tile<2>(type, xr, nbk, w, row_bytes, y, m, r0, t0, t1); break;
      case 3: rows_tile<3>(type, xr, nbk, w, row_bytes, y, m, r0, t0, t1); break;
#if LMF_R > 4
      case 4: rows_tile<4>(type, xr, nbk, w, row_bytes, y, m, r0, t0, t1); break;
      case 5: rows_tile<5>(type, xr, nbk, w, row_bytes, y, m, r0, t0, t1); break;
      case 6: rows_tile<6>(type, xr, nbk, w, row_bytes, y, m, r0, t0, t1); break;
      case 7: rows_tile<7>(type, xr, nbk, w, row_bytes, y, m, r0, t0, t1); break;
#endif
      default: break;
    }
  }
}

// Quantize the activations as `type` wants them into `buf` (resized), returning the bytes per row and the
// number of blocks (or values, for F16/BF16) per row.
void prepare(int type, const float* x, int64_t n, int64_t k, std::vector<char>& buf, int64_t* act_row,
             int64_t* nbk) {
  if (type == F16 || type == BF16) {
    *act_row = k * 4;
    *nbk = k;
    return;  // used as is
  }
  const bool kq = type == Q4_K || type == Q5_K || type == Q6_K;
  *nbk = k / (kq ? 256 : 32);
  *act_row = *nbk * (int64_t)(kq ? sizeof(BlockQ8K) : sizeof(BlockQ8));
  buf.resize((size_t)(*act_row * n));
  at::parallel_for(0, n, 8, [&](int64_t b, int64_t e) { prepare_rows(kq, x, k, buf.data(), *act_row, b, e); });
}

bool matmul(int type, const float* x, int64_t n, const uint8_t* w, int64_t m, int64_t row_bytes, int64_t k,
            float* y) {
  if (!has_dot(type)) return false;
  std::vector<char> buf;
  int64_t act_row = 0, nbk = 0;
  prepare(type, x, n, k, buf, &act_row, &nbk);
  const char* act = (type == F16 || type == BF16) ? (const char*)x : buf.data();
  // A thread's share: at least ~32 KB of weight bytes times the work per byte (more rows, more work).
  int64_t grain = (32 << 10) / (row_bytes > 0 ? row_bytes : 1) / (1 + n / 4);
  if (grain < 1) grain = 1;
  at::parallel_for(0, m, grain, [&](int64_t i0, int64_t i1) {
    mm_rows(type, act, act_row, n, w, row_bytes, nbk, y, m, i0, i1);
  });
  return true;
}

// ---------------------------------------------------------------------------------------------------------
// Decoders: packed rows -> fp32, bit-identical to gguf-py (the same fp32 operations in the same order, no
// contraction into FMAs: the library is built with -ffp-contract=off). Plain loops the compiler vectorises
// for this path's instruction set.

inline void dq_row(int type, const uint8_t* src, int64_t k, float* dst) {
  switch (type) {
    case F32: std::memcpy(dst, src, (size_t)k * 4); break;
    case F16: case BF16: {
      const bool bf = type == BF16;
      int64_t i = 0;
#if LMF_X86
      for (; i + 8 <= k; i += 8) {
        const __m128i h = _mm_loadu_si128((const __m128i*)(src + 2 * i));
        _mm256_storeu_ps(dst + i, bf ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                                     : _mm256_cvtph_ps(h));
      }
#endif
      for (; i < k; ++i) dst[i] = bf ? w16<true>(src, i) : w16<false>(src, i);
      break;
    }
    case Q8_0:
      for (int64_t b = 0; b < k / 32; ++b) {
        const uint8_t* p = src + 34 * b;
        const float d = h2f(p);
        for (int j = 0; j < 32; ++j) dst[32 * b + j] = (float)(int8_t)p[2 + j] * d;
      }
      break;
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: {
      // Straight-line loops over 16 bytes (low nibble: value j, high nibble: value j + 16) vectorise; the
      // codes<T>() helpers used by the generic dot product did not.
      const bool five = type == Q5_0 || type == Q5_1, has_min = type == Q4_1 || type == Q5_1;
      const int bytes = type == Q4_0 ? 18 : type == Q4_1 ? 20 : type == Q5_0 ? 22 : 24;
      const int qs_at = 2 + (has_min ? 2 : 0) + (five ? 4 : 0), offset = has_min ? 0 : five ? 16 : 8;
      for (int64_t b = 0; b < k / 32; ++b) {
        const uint8_t* p = src + bytes * b;
        const uint8_t* qs = p + qs_at;
        const float d = h2f(p), mn = has_min ? h2f(p + 2) : 0.f;
        uint32_t h = 0;
        if (five) std::memcpy(&h, p + 2 + (has_min ? 2 : 0), 4);
        float* o = dst + 32 * b;
        for (int j = 0; j < 16; ++j) {
          const int lo = (qs[j] & 0x0F) | (int)(((h >> j) & 1) << 4);
          const int hi = (qs[j] >> 4) | (int)(((h >> (j + 16)) & 1) << 4);
          if (has_min) {
            o[j] = d * (float)lo + mn;
            o[j + 16] = d * (float)hi + mn;
          } else {
            o[j] = d * (float)(lo - offset);
            o[j + 16] = d * (float)(hi - offset);
          }
        }
      }
      break;
    }
    case Q2_K:
      for (int64_t b = 0; b < k / 256; ++b) {
        const uint8_t* p = src + 84 * b;
        const float d = h2f(p + 80), dmin = h2f(p + 82);
        float* o = dst + 256 * b;
        for (int v = 0; v < 256; ++v) {
          const int g = v / 128, sh = (v % 128) / 32, l = v % 32;
          const uint8_t s = p[v / 16];
          const float dl = d * (float)(s & 0x0F), ml = dmin * (float)(s >> 4);
          o[v] = dl * (float)((p[16 + 32 * g + l] >> (2 * sh)) & 3) - ml;
        }
      }
      break;
    case Q3_K:
      for (int64_t b = 0; b < k / 256; ++b) {
        const uint8_t* p = src + 110 * b;
        const uint8_t* s = p + 96;
        const float d = h2f(p + 108);
        int8_t sc[16];
        for (int i = 0; i < 16; ++i) {
          const int lo = i < 8 ? (s[i] & 0x0F) : (s[i - 8] >> 4);
          const int hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
          sc[i] = (int8_t)((lo | (hi << 4)) - 32);
        }
        float* o = dst + 256 * b;
        for (int v = 0; v < 256; ++v) {
          const int g = v / 128, sh = (v % 128) / 32, l = v % 32;
          const int ql = (p[32 + 32 * g + l] >> (2 * sh)) & 3;
          const int hb = (p[l] >> (v / 32)) & 1;
          const float dl = d * (float)sc[v / 16];
          o[v] = dl * (float)(ql - (hb ? 0 : 4));
        }
      }
      break;
    case Q4_K: case Q5_K: {
      const bool hq = type == Q5_K;
      const int bytes = hq ? 176 : 144;
      for (int64_t b = 0; b < k / 256; ++b) {
        const uint8_t* p = src + bytes * b;
        const float d = h2f(p), dmin = h2f(p + 2);
        uint8_t sc[8], mn[8];
        scale_min_k4(p + 4, sc, mn);
        const uint8_t* qh = p + 16;
        const uint8_t* qs = p + (hq ? 48 : 16);
        float* o = dst + 256 * b;
        for (int i = 0; i < 8; ++i) {
          const float dl = d * (float)sc[i], ml = dmin * (float)mn[i];
          const int j = i / 2, shift = 4 * (i % 2);
          for (int l = 0; l < 32; ++l) {
            int q = (qs[32 * j + l] >> shift) & 0x0F;
            if (hq) q |= ((qh[l] >> i) & 1) << 4;
            o[32 * i + l] = dl * (float)q - ml;
          }
        }
      }
      break;
    }
    case Q6_K:
      for (int64_t b = 0; b < k / 256; ++b) {
        const uint8_t* p = src + 210 * b;
        const int8_t* sc = (const int8_t*)(p + 192);
        const float d = h2f(p + 208);
        float* o = dst + 256 * b;
        for (int h = 0; h < 2; ++h)
          for (int g = 0; g < 4; ++g)
            for (int half = 0; half < 2; ++half) {
              const float dl = d * (float)sc[8 * h + 2 * g + half];
              const uint8_t* ql = p + 64 * h + 32 * (g & 1) + 16 * half;
              const uint8_t* qh = p + 128 + 32 * h + 16 * half;
              float* oo = o + 128 * h + 32 * g + 16 * half;
              const int lshift = 4 * (g >> 1), hshift = 2 * g;
              for (int l = 0; l < 16; ++l) {
                const int q = ((ql[l] >> lshift) & 0x0F) | (((qh[l] >> hshift) & 3) << 4);
                oo[l] = dl * (float)(q - 32);
              }
            }
      }
      break;
    default: break;
  }
}

bool dequantize(int type, const uint8_t* src, int64_t rows, int64_t row_bytes, int64_t k, float* dst) {
  if (!has_decoder(type)) return false;
  int64_t grain = (64 << 10) / (k > 0 ? 4 * k : 1);
  if (grain < 1) grain = 1;
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) dq_row(type, src + r * row_bytes, k, dst + r * k);
  });
  return true;
}

// A plain read of n bytes (their sum): the ceiling a matvec over the same bytes can reach.
uint64_t sum_bytes(const uint8_t* p, int64_t n) {
  const int64_t chunks = n / 256;
  uint64_t parts[256] = {0};
  at::parallel_for(0, chunks, 4096, [&](int64_t b, int64_t e) {
    parts[at::get_thread_num() & 255] += sum_chunks(p, b, e);  // one chunk range per thread
  });
  uint64_t total = 0;
  for (int64_t i = chunks * 256; i < n; ++i) total += p[i];
  for (uint64_t v : parts) total += v;
  return total;
}

}  // namespace LMF_NS
