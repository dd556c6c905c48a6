// The GGML quantized matmul and dequantize kernels behind quant/kernels.py, compiled on first use by
// lmforge/native.py (which splices kernels_body.h in where it is included, and keys the cache on the result).
//
// Built WITHOUT -march=native: one library serves every x86-64 CPU. kernels_body.h is compiled once per
// instruction set, each copy in its own namespace under `#pragma GCC target(...)`, and `detect()` picks the
// best copy this CPU *and* OS can run: CPUID says what the core implements, XCR0 (xgetbv) whether the OS saves
// the wider registers (YMM for AVX2; opmask + ZMM for AVX-512), and for AMX Linux must also grant the tile data
// state to the process (arch_prctl ARCH_REQ_XCOMP_PERM) -- a CPU that has AMX is not enough, which is how a
// natively built llama.cpp died of an illegal instruction on one of our machines. Code for an ISA is only ever
// called after that check. Pointers and sizes come from Python, which checks them.
#include <Python.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define LMF_HAVE_X86 1
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#else
#define LMF_HAVE_X86 0
#endif

namespace {

// GGML type ids (gguf.GGMLQuantizationType).
enum : int { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12,
             Q5_K = 13, Q6_K = 14, BF16 = 30 };

inline bool has_dot(int t) {
  return t == Q8_0 || t == Q4_0 || t == Q4_1 || t == Q5_0 || t == Q5_1 || t == Q4_K || t == Q5_K || t == Q6_K ||
         t == F16 || t == BF16;
}
inline bool has_decoder(int t) { return has_dot(t) || t == F32 || t == Q2_K || t == Q3_K; }

// An activation row quantized for the 32-value types: s = d * sum(q) serves the offset (Q4_0, Q5_0) and min
// (Q4_1, Q5_1) terms without touching the codes again.
struct BlockQ8 {
  float d, s;
  int8_t q[32];
};
// ... and for the K-quants: 256 values, with the sums of each 16 (for the mins of Q4_K/Q5_K, Q6_K's offset).
struct BlockQ8K {
  float d;
  int16_t bsums[16];
  int8_t q[256];
};

inline float half_to_float(uint16_t h) {
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
}

}  // namespace

// ---- the code paths ---------------------------------------------------------------------------------------

#define LMF_NS lmf_generic
#define LMF_X86 0
#define LMF_DOT 0
#define LMF_R 4
#include "kernels_body.h"
#undef LMF_NS
#undef LMF_X86
#undef LMF_DOT
#undef LMF_R

#if LMF_HAVE_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define LMF_NS lmf_avx2
#define LMF_X86 1
#define LMF_DOT 0
#define LMF_R 4
#include "kernels_body.h"
#undef LMF_NS
#undef LMF_X86
#undef LMF_DOT
#undef LMF_R
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#define LMF_NS lmf_avxvnni
#define LMF_X86 1
#define LMF_DOT 2
#define LMF_R 4
#include "kernels_body.h"
#undef LMF_NS
#undef LMF_X86
#undef LMF_DOT
#undef LMF_R
#pragma GCC pop_options

// The AVX-512 paths keep 256-bit vectors (a 32-value block is one ymm): what they gain is EVEX encodings and
// 32 registers for the compiler, and VNNI's one-instruction u8 x s8 dot product. Sharing a decoded block among
// 8 activation rows instead of 4 measured within noise here and cost 7 s more compile time (R = 8 instantiates
// twice the kernels), so every path groups 4 rows.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#define LMF_NS lmf_avx512
#define LMF_X86 1
#define LMF_DOT 0
#define LMF_R 4
#include "kernels_body.h"
#undef LMF_NS
#undef LMF_X86
#undef LMF_DOT
#undef LMF_R
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#define LMF_NS lmf_avx512vnni
#define LMF_X86 1
#define LMF_DOT 1
#define LMF_R 4
#include "kernels_body.h"
#undef LMF_NS
#undef LMF_X86
#undef LMF_DOT
#undef LMF_R
#pragma GCC pop_options
#endif

namespace {

using MatmulFn = bool (*)(int, const float*, int64_t, const uint8_t*, int64_t, int64_t, int64_t, float*);
using DequantFn = bool (*)(int, const uint8_t*, int64_t, int64_t, int64_t, float*);
using SumFn = uint64_t (*)(const uint8_t*, int64_t);

struct Path {
  const char* name;
  MatmulFn matmul;
  DequantFn dequantize;
  SumFn sum_bytes;
};

// Best first: the order kernels.py's LMFORGE_ISA cap counts down.
const Path kPaths[] = {
#if LMF_HAVE_X86
    {"avx512vnni", lmf_avx512vnni::matmul, lmf_avx512vnni::dequantize, lmf_avx512vnni::sum_bytes},
    {"avx512", lmf_avx512::matmul, lmf_avx512::dequantize, lmf_avx512::sum_bytes},
    {"avxvnni", lmf_avxvnni::matmul, lmf_avxvnni::dequantize, lmf_avxvnni::sum_bytes},
    {"avx2", lmf_avx2::matmul, lmf_avx2::dequantize, lmf_avx2::sum_bytes},
#endif
    {"generic", lmf_generic::matmul, lmf_generic::dequantize, lmf_generic::sum_bytes},
};
constexpr int kNumPaths = sizeof(kPaths) / sizeof(kPaths[0]);

struct Cpu {
  bool avx2 = false, fma = false, f16c = false, avx512f = false, avx512bw = false, avx512vl = false,
       avx512dq = false, avx512vnni = false, avxvnni = false, avx512bf16 = false, amx_tile = false,
       amx_int8 = false, amx_bf16 = false, os_ymm = false, os_zmm = false, os_amx = false, amx_granted = false;
};

Cpu detect_cpu() {
  Cpu c;
#if LMF_HAVE_X86
  unsigned a, b, cx, d;
  if (!__get_cpuid(1, &a, &b, &cx, &d)) return c;
  const bool osxsave = cx & (1u << 27), avx = cx & (1u << 28);
  c.fma = cx & (1u << 12);
  c.f16c = cx & (1u << 29);
  uint64_t xcr0 = 0;
  if (osxsave) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = ((uint64_t)hi << 32) | lo;
  }
  c.os_ymm = avx && (xcr0 & 0x6) == 0x6;             // XMM + YMM state
  c.os_zmm = c.os_ymm && (xcr0 & 0xE0) == 0xE0;      // opmask, ZMM_Hi256, Hi16_ZMM
  c.os_amx = (xcr0 & 0x60000) == 0x60000;            // XTILECFG, XTILEDATA
  unsigned max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf >= 7) {
    __cpuid_count(7, 0, a, b, cx, d);
    c.avx2 = b & (1u << 5);
    c.avx512f = b & (1u << 16);
    c.avx512dq = b & (1u << 17);
    c.avx512bw = b & (1u << 30);
    c.avx512vl = b & (1u << 31);
    c.avx512vnni = cx & (1u << 11);
    c.amx_bf16 = d & (1u << 22);
    c.amx_tile = d & (1u << 24);
    c.amx_int8 = d & (1u << 25);
    const unsigned sub = a;
    if (sub >= 1) {
      __cpuid_count(7, 1, a, b, cx, d);
      c.avxvnni = a & (1u << 4);
      c.avx512bf16 = a & (1u << 5);
    }
  }
#if defined(__linux__)
  if (c.amx_tile && c.os_amx) {
    // ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18): without it the first tile instruction faults.
    c.amx_granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }
#endif
#endif
  return c;
}

const Cpu& cpu() {
  static const Cpu c = detect_cpu();
  return c;
}

bool runnable(const char* name) {
  const Cpu& c = cpu();
  const bool avx2 = c.os_ymm && c.avx2 && c.fma && c.f16c;
  const bool avx512 = avx2 && c.os_zmm && c.avx512f && c.avx512bw && c.avx512vl && c.avx512dq;
  const std::string n = name;
  if (n == "generic") return true;
  if (n == "avx2") return avx2;
  if (n == "avxvnni") return avx2 && c.avxvnni;
  if (n == "avx512") return avx512;
  if (n == "avx512vnni") return avx512 && c.avx512vnni;
  return false;
}

std::atomic<int> g_path{-1};  // index into kPaths; -1: the best runnable

const Path& current() {
  int i = g_path.load(std::memory_order_relaxed);
  if (i < 0) {
    for (i = 0; i < kNumPaths - 1 && !runnable(kPaths[i].name); ++i) {
    }
    g_path.store(i, std::memory_order_relaxed);
  }
  return kPaths[i];
}

bool int_args(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t want, long long* out, const char* what) {
  if (nargs != want) {
    PyErr_Format(PyExc_TypeError, "%s expects %d integer arguments", what, (int)want);
    return false;
  }
  for (Py_ssize_t i = 0; i < want; ++i) {
    out[i] = PyLong_AsLongLong(args[i]);
    if (out[i] == -1 && PyErr_Occurred()) return false;
  }
  return true;
}

// detect() -> "path,path,...;feature,feature,...": the paths this CPU and OS can run (best first) and what
// was found (for kernels.info(); amx_granted means the OS let this process use AMX tiles).
PyObject* py_detect(PyObject*, PyObject*) {
  std::string out;
  for (int i = 0; i < kNumPaths; ++i)
    if (runnable(kPaths[i].name)) out += std::string(out.empty() ? "" : ",") + kPaths[i].name;
  out += ";";
  const Cpu& c = cpu();
  const std::pair<const char*, bool> feats[] = {
      {"avx2", c.avx2}, {"fma", c.fma}, {"f16c", c.f16c}, {"avx512f", c.avx512f}, {"avx512bw", c.avx512bw},
      {"avx512vl", c.avx512vl}, {"avx512dq", c.avx512dq}, {"avx512_vnni", c.avx512vnni},
      {"avx_vnni", c.avxvnni}, {"avx512_bf16", c.avx512bf16}, {"amx_tile", c.amx_tile},
      {"amx_int8", c.amx_int8}, {"amx_bf16", c.amx_bf16}, {"os_ymm", c.os_ymm}, {"os_zmm", c.os_zmm},
      {"os_amx", c.os_amx}, {"amx_granted", c.amx_granted}};
  bool first = true;
  for (const auto& f : feats)
    if (f.second) {
      out += std::string(first ? "" : ",") + f.first;
      first = false;
    }
  return PyUnicode_FromString(out.c_str());
}

// set_isa(name) -> bool: use that path from now on (False, and nothing changes, if it can't run here).
PyObject* py_set_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (!name) return nullptr;
  for (int i = 0; i < kNumPaths; ++i)
    if (std::strcmp(kPaths[i].name, name) == 0 && runnable(name)) {
      g_path.store(i, std::memory_order_relaxed);
      Py_RETURN_TRUE;
    }
  Py_RETURN_FALSE;
}

PyObject* py_isa(PyObject*, PyObject*) { return PyUnicode_FromString(current().name); }

// matmul(type, x, n, w, m, row_bytes, k, y) -> bool: y (n, m) = x (n, k) @ W.T for W's m packed rows.
PyObject* py_matmul(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  long long a[8];
  if (!int_args(args, nargs, 8, a, "matmul")) return nullptr;
  const Path& p = current();
  bool ok = false, failed = false;
  Py_BEGIN_ALLOW_THREADS
  try {
    ok = p.matmul((int)a[0], (const float*)(intptr_t)a[1], a[2], (const uint8_t*)(intptr_t)a[3], a[4], a[5], a[6],
                  (float*)(intptr_t)a[7]);
  } catch (...) {
    failed = true;
  }
  Py_END_ALLOW_THREADS
  if (failed) {
    PyErr_SetString(PyExc_RuntimeError, "quantized matmul kernel failed");
    return nullptr;
  }
  return PyBool_FromLong(ok);
}

// dequantize(type, src, rows, row_bytes, k, dst) -> bool: dst (rows, k) fp32.
PyObject* py_dequantize(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  long long a[6];
  if (!int_args(args, nargs, 6, a, "dequantize")) return nullptr;
  const Path& p = current();
  bool ok = false, failed = false;
  Py_BEGIN_ALLOW_THREADS
  try {
    ok = p.dequantize((int)a[0], (const uint8_t*)(intptr_t)a[1], a[2], a[3], a[4], (float*)(intptr_t)a[5]);
  } catch (...) {
    failed = true;
  }
  Py_END_ALLOW_THREADS
  if (failed) {
    PyErr_SetString(PyExc_RuntimeError, "dequantize kernel failed");
    return nullptr;
  }
  return PyBool_FromLong(ok);
}

// sum_bytes(ptr, n) -> int: a plain read of n bytes (bench/qmatmul.py's bandwidth ceiling).
PyObject* py_sum_bytes(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  long long a[2];
  if (!int_args(args, nargs, 2, a, "sum_bytes")) return nullptr;
  const Path& p = current();
  uint64_t total = 0;
  Py_BEGIN_ALLOW_THREADS
  total = p.sum_bytes((const uint8_t*)(intptr_t)a[0], a[1]);
  Py_END_ALLOW_THREADS
  return PyLong_FromUnsignedLongLong(total);
}

PyMethodDef methods[] = {
    {"detect", (PyCFunction)py_detect, METH_NOARGS, "runnable paths and CPU features"},
    {"set_isa", (PyCFunction)py_set_isa, METH_O, "set_isa(name) -> bool"},
    {"isa", (PyCFunction)py_isa, METH_NOARGS, "the path in use"},
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_FASTCALL, "matmul(type, x, n, w, m, row_bytes, k, y)"},
    {"dequantize", (PyCFunction)(void (*)(void))py_dequantize, METH_FASTCALL,
     "dequantize(type, src, rows, row_bytes, k, dst)"},
    {"sum_bytes", (PyCFunction)(void (*)(void))py_sum_bytes, METH_FASTCALL, "sum_bytes(ptr, n) -> int"},
    {nullptr, nullptr, 0, nullptr}};

#define LMF_STR2(a) #a
#define LMF_STR(a) LMF_STR2(a)
#define LMF_CAT2(a, b) a##b
#define LMF_CAT(a, b) LMF_CAT2(a, b)

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, LMF_STR(TORCH_EXTENSION_NAME), nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC LMF_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module_def); }
