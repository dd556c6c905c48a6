// The batch-1 decode kernel behind fastpath.py, which compiles this file on first use (load_inline) into lmforge's
// kernel cache under a name keyed by a hash of this text among other things (see fastpath.py), so any edit here
// rebuilds it. Pointers and sizes come from Python (checked there), which keeps the build light: no pybind11, no
// torch/extension.h, just the CPython API and at::parallel_for. The LMF_* tuning macros come from fastpath.py's
// _TUNING as -D flags.
#include <Python.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LMF_AVX2 1
#include <immintrin.h>
#endif

namespace {

enum : int { F32 = 0, BF16 = 1, F16 = 2 };

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_f32(uint16_t h) {
#ifdef LMF_AVX2
  return _cvtsh_ss(h);
#else
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);  // normal
  } else if (man == 0) {
    u = sign;  // zero
  } else {  // subnormal: renormalise
    exp = 113;
    while (!(man & 0x400)) { man <<= 1; --exp; }
    u = sign | (exp << 23) | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

template <int D> inline float cvt1(const void* p, int64_t i);
template <> inline float cvt1<F32>(const void* p, int64_t i) { return ((const float*)p)[i]; }
template <> inline float cvt1<BF16>(const void* p, int64_t i) { return bf16_to_f32(((const uint16_t*)p)[i]); }
template <> inline float cvt1<F16>(const void* p, int64_t i) { return f16_to_f32(((const uint16_t*)p)[i]); }

template <int D> constexpr int64_t elem_size() { return D == F32 ? 4 : 2; }

#ifdef LMF_AVX2
// 8 consecutive weights -> 8 fp32 lanes.
template <int D> inline __m256 load8(const void* p, int64_t i);
template <> inline __m256 load8<F32>(const void* p, int64_t i) { return _mm256_loadu_ps((const float*)p + i); }
template <> inline __m256 load8<BF16>(const void* p, int64_t i) {
  __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)p + i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
template <> inline __m256 load8<F16>(const void* p, int64_t i) {
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)p + i)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Software prefetch distance in bytes ahead of the row being read (every cache line is prefetched once).
template <int D> constexpr int prefetch_bytes() { return D == F32 ? LMF_PF_F32 : LMF_PF_16; }

// R rows starting at row r0 (one contiguous block of R * n weights) dotted with x. A accumulators per row,
// i.e. 8 * A weights per row per iteration, so that consecutive FMAs don't wait on each other.
template <int D, int R, int A>
inline void dot_rows(const void* w, int64_t r0, int64_t n, const float* x, float* y) {
  const char* base = (const char*)w + r0 * n * elem_size<D>();
  constexpr int step_bytes = 8 * A * (int)elem_size<D>();
  __m256 acc[R][A];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < A; ++j) acc[r][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * A <= n; k += 8 * A) {
    __m256 xv[A];
    for (int j = 0; j < A; ++j) xv[j] = _mm256_loadu_ps(x + k + 8 * j);
    for (int r = 0; r < R; ++r) {
      const void* wr = base + r * n * elem_size<D>();
      if (prefetch_bytes<D>() > 0)  // a prefetch never faults, so running past the end is harmless
        for (int c = 0; c < step_bytes; c += 64)
          _mm_prefetch((const char*)wr + k * elem_size<D>() + prefetch_bytes<D>() + c, _MM_HINT_T0);
      for (int j = 0; j < A; ++j) acc[r][j] = _mm256_fmadd_ps(load8<D>(wr, k + 8 * j), xv[j], acc[r][j]);
    }
  }
  for (; k + 8 <= n; k += 8) {
    __m256 xv = _mm256_loadu_ps(x + k);
    for (int r = 0; r < R; ++r)
      acc[r][0] = _mm256_fmadd_ps(load8<D>(base + r * n * elem_size<D>(), k), xv, acc[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    __m256 t = acc[r][0];
    for (int j = 1; j < A; ++j) t = _mm256_add_ps(t, acc[r][j]);
    float s = hsum(t);
    const void* wr = base + r * n * elem_size<D>();
    for (int64_t kk = k; kk < n; ++kk) s += cvt1<D>(wr, kk) * x[kk];
    y[r] = s;
  }
}
#else
template <int D, int R, int A>
inline void dot_rows(const void* w, int64_t r0, int64_t n, const float* x, float* y) {
  for (int r = 0; r < R; ++r) {
    const void* wr = (const char*)w + (r0 + r) * n * elem_size<D>();
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < n; ++k) s += cvt1<D>(wr, k) * x[k];
    y[r] = s;
  }
}
#endif

constexpr int kRows = LMF_ROWS;  // rows per block
constexpr int kAcc = LMF_ACC;    // accumulators per row
constexpr int64_t kGrainBytes = LMF_GRAIN_BYTES;  // least weight bytes worth waking a second thread for

template <int D>
void gemv_impl(const void* w, const float* x, float* y, const void* bias, int bias_dtype, int64_t m, int64_t n) {
  const int64_t blocks = (m + kRows - 1) / kRows;
  int64_t grain = kGrainBytes / ((n > 0 ? n : 1) * elem_size<D>() * kRows);
  if (grain < 1) grain = 1;
  at::parallel_for(0, blocks, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t r0 = i * kRows;
      if (r0 + kRows <= m) {
        dot_rows<D, kRows, kAcc>(w, r0, n, x, y + r0);
      } else {
        for (int64_t r = r0; r < m; ++r) dot_rows<D, 1, kAcc>(w, r, n, x, y + r);
      }
      if (bias) {
        const int64_t r1 = r0 + kRows < m ? r0 + kRows : m;
        for (int64_t r = r0; r < r1; ++r)
          y[r] += bias_dtype == F32 ? cvt1<F32>(bias, r)
                  : bias_dtype == BF16 ? cvt1<BF16>(bias, r) : cvt1<F16>(bias, r);
      }
    }
  });
}

// gemv(w_ptr, x_ptr, y_ptr, bias_ptr or 0, m, n, w_dtype, bias_dtype): y[m] = W[m, n] @ x[n] (+ bias).
PyObject* py_gemv(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 8) {
    PyErr_SetString(PyExc_TypeError, "gemv expects 8 integer arguments");
    return nullptr;
  }
  long long a[8];
  for (int i = 0; i < 8; ++i) {
    a[i] = PyLong_AsLongLong(args[i]);
    if (a[i] == -1 && PyErr_Occurred()) return nullptr;
  }
  const void* w = (const void*)(intptr_t)a[0];
  const float* x = (const float*)(intptr_t)a[1];
  float* y = (float*)(intptr_t)a[2];
  const void* bias = (const void*)(intptr_t)a[3];
  const int64_t m = a[4], n = a[5];
  const int dtype = (int)a[6], bias_dtype = (int)a[7];
  if (m < 0 || n < 0 || dtype < 0 || dtype > 2 || bias_dtype < 0 || bias_dtype > 2) {
    PyErr_SetString(PyExc_ValueError, "gemv: bad shape or dtype code");
    return nullptr;
  }
  bool failed = false;
  Py_BEGIN_ALLOW_THREADS
  try {
    if (dtype == F32) gemv_impl<F32>(w, x, y, bias, bias_dtype, m, n);
    else if (dtype == BF16) gemv_impl<BF16>(w, x, y, bias, bias_dtype, m, n);
    else gemv_impl<F16>(w, x, y, bias, bias_dtype, m, n);
  } catch (...) {
    failed = true;
  }
  Py_END_ALLOW_THREADS
  if (failed) {
    PyErr_SetString(PyExc_RuntimeError, "gemv kernel failed");
    return nullptr;
  }
  Py_RETURN_NONE;
}

// stream(ptr, n_floats) -> sum: the kernel's best case, a plain read of n floats (for bench/matvec.py).
PyObject* py_stream(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "stream expects 2 integer arguments");
    return nullptr;
  }
  const float* p = (const float*)(intptr_t)PyLong_AsLongLong(args[0]);
  const long long n = PyLong_AsLongLong(args[1]);
  if (PyErr_Occurred()) return nullptr;
  double total = 0.0;
  Py_BEGIN_ALLOW_THREADS
  const int64_t chunks = n / 64;
  float parts[256] = {0.f};
  at::parallel_for(0, chunks, 4096, [&](int64_t b, int64_t e) {
    float s = 0.f;
#ifdef LMF_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = b; i < e; ++i) {
      const float* q = p + i * 64;
      a0 = _mm256_add_ps(a0, _mm256_add_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(q + 8)));
      a1 = _mm256_add_ps(a1, _mm256_add_ps(_mm256_loadu_ps(q + 16), _mm256_loadu_ps(q + 24)));
      a2 = _mm256_add_ps(a2, _mm256_add_ps(_mm256_loadu_ps(q + 32), _mm256_loadu_ps(q + 40)));
      a3 = _mm256_add_ps(a3, _mm256_add_ps(_mm256_loadu_ps(q + 48), _mm256_loadu_ps(q + 56)));
    }
    s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#else
#pragma omp simd reduction(+ : s)
    for (int64_t i = b * 64; i < e * 64; ++i) s += p[i];
#endif
    parts[at::get_thread_num() & 255] += s;
  });
  for (int64_t i = chunks * 64; i < n; ++i) total += p[i];
  for (float v : parts) total += v;
  Py_END_ALLOW_THREADS
  return PyFloat_FromDouble(total);
}

PyObject* py_info(PyObject*, PyObject*) {
#ifdef LMF_AVX2
  return PyUnicode_FromString("avx2");
#else
  return PyUnicode_FromString("scalar");
#endif
}

PyMethodDef methods[] = {
    {"gemv", (PyCFunction)(void (*)(void))py_gemv, METH_FASTCALL, "gemv(w, x, y, bias, m, n, dtype, bias_dtype)"},
    {"stream", (PyCFunction)(void (*)(void))py_stream, METH_FASTCALL, "stream(ptr, n) -> sum of n floats"},
    {"info", (PyCFunction)py_info, METH_NOARGS, "which code path was compiled"},
    {nullptr, nullptr, 0, nullptr}};

#define LMF_STR2(a) #a
#define LMF_STR(a) LMF_STR2(a)
#define LMF_CAT2(a, b) a##b
#define LMF_CAT(a, b) LMF_CAT2(a, b)

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, LMF_STR(TORCH_EXTENSION_NAME), nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC LMF_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module_def); }
