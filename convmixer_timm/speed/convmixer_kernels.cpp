// ConvMixer's CPU kernels (kernels_body.inc) in one shared library with run-time dispatch on CPU features, the
// way numpy ships its SIMD loops: the body is compiled once per instruction set, each copy in a namespace of
// its own under `#pragma GCC target`, and exported with the ISA as a suffix (`spatial_mixing_f32__avx2`).
// convmixer_timm/speed/loader.py asks `cmx_cpu_supports` which copies this CPU can run and binds the best one
// (or the one CONVMIXER_TIMM_CPU_ISA forces). Built with a plain C ABI and no torch headers: the build takes
// seconds and the binary does not depend on torch's C++ ABI.
//
// The standard headers are included before any target pragma, so the library code they instantiate
// (std::vector, <cmath>) is compiled for the baseline ISA and safe to call from every copy.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <omp.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CMX_X86_64 1
#else
#define CMX_X86_64 0
#endif

#define CMX_EXPORT __attribute__((visibility("default")))

#define CMX_ENTRY_POINTS(ISA)                                                                                      \
    extern "C" CMX_EXPORT void depthwise_weight_grad_f32__##ISA(const float* g, const float* x, float* gw, int64_t n,        \
                                                     int64_t h, int64_t w, int64_t c, int k, int pad, int t) {   \
        cmx_##ISA::depthwise_weight_grad_f32(g, x, gw, n, h, w, c, k, pad, t);                                     \
    }                                                                                                              \
    extern "C" CMX_EXPORT void depthwise_weight_grad_f64__##ISA(const double* g, const double* x, double* gw, int64_t n,     \
                                                     int64_t h, int64_t w, int64_t c, int k, int pad, int t) {   \
        cmx_##ISA::depthwise_weight_grad_f64(g, x, gw, n, h, w, c, k, pad, t);                                     \
    }                                                                                                              \
    CMX_BATCH_NORM_EXPORTS(ISA, float, f32)                                                                        \
    CMX_BATCH_NORM_EXPORTS(ISA, double, f64)                                                                       \
    CMX_ACT_BATCH_NORM_EXPORTS(ISA, float, f32)                                                                    \
    CMX_ACT_BATCH_NORM_EXPORTS(ISA, double, f64)                                                                   \
    extern "C" CMX_EXPORT void spatial_mixing_f32__##ISA(int act, const float* u, const float* s_in, const float* t_in,      \
                                              const float* weight, const float* bias, const float* s1, float* z,  \
                                              int64_t n, int64_t h, int64_t w, int64_t c, int k, int pad, int t) { \
        cmx_##ISA::spatial_mixing_f32(act, u, s_in, t_in, weight, bias, s1, z, n, h, w, c, k, pad, t);             \
    }                                                                                                              \
    extern "C" CMX_EXPORT void depthwise_conv_f32__##ISA(const float* x, const float* weight, const float* bias,  \
                                                         float* z, int64_t n, int64_t h, int64_t w, int64_t c,    \
                                                         int k, int pad, int t) {                                 \
        cmx_##ISA::depthwise_conv_f32(x, weight, bias, z, n, h, w, c, k, pad, t);                                  \
    }                                                                                                              \
    extern "C" CMX_EXPORT void spatial_mixing_bf16__##ISA(int act, int input_bf16, const void* u,                 \
                                                          const float* s_in, const float* t_in,                   \
                                                          const float* weight, const float* bias,                 \
                                                          const float* s1, uint16_t* z, int64_t n, int64_t h,      \
                                                          int64_t w, int64_t c, int k, int pad, int t) {          \
        cmx_##ISA::spatial_mixing_bf16(act, input_bf16, u, s_in, t_in, weight, bias, s1, z, n, h, w, c, k, pad, t); \
    }

#define CMX_BATCH_NORM_EXPORTS(ISA, T, S)                                                                          \
    extern "C" CMX_EXPORT void batch_norm_forward_##S##__##ISA(const T* y, const T* gamma, const T* beta, T* out, T* mean,   \
                                                    T* invstd, T* var, int64_t rows, int64_t c, double eps,       \
                                                    int t) {                                                       \
        cmx_##ISA::batch_norm_forward_##S(y, gamma, beta, out, mean, invstd, var, rows, c, eps, t);               \
    }                                                                                                              \
    extern "C" CMX_EXPORT void batch_norm_backward_##S##__##ISA(const T* g, const T* y, const T* mean, const T* invstd,      \
                                                     const T* gamma, T* gy, T* gg, T* gb, int64_t rows,           \
                                                     int64_t c, int t) {                                          \
        cmx_##ISA::batch_norm_backward_##S(g, y, mean, invstd, gamma, gy, gg, gb, rows, c, t);                    \
    }

#define CMX_ACT_BATCH_NORM_EXPORTS(ISA, T, S)                                                                      \
    extern "C" CMX_EXPORT void act_batch_norm_forward_##S##__##ISA(int act, const T* a, const T* gamma,            \
                                                                   const T* beta, T* out, T* mean, T* invstd,      \
                                                                   T* var, int64_t rows, int64_t c, double eps,    \
                                                                   int t) {                                        \
        cmx_##ISA::act_batch_norm_forward_##S(act, a, gamma, beta, out, mean, invstd, var, rows, c, eps, t);       \
    }                                                                                                              \
    extern "C" CMX_EXPORT void act_batch_norm_backward_##S##__##ISA(int act, const T* g, const T* a,               \
                                                                    const T* mean, const T* invstd,                \
                                                                    const T* gamma, T* ga, T* gg, T* gb,           \
                                                                    int64_t rows, int64_t c, int t) {              \
        cmx_##ISA::act_batch_norm_backward_##S(act, g, a, mean, invstd, gamma, ga, gg, gb, rows, c, t);           \
    }

// AVX512_BF16's intrinsics and __builtin_cpu_supports("avx512bf16") arrived in GCC 10 and Clang 9; an older
// compiler builds the other copies.
#if CMX_X86_64 && (defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10)
#define CMX_HAS_AVX512_BF16 1
#else
#define CMX_HAS_AVX512_BF16 0
#endif

#if CMX_HAS_AVX512_BF16
// The AVX-512 copy again with AVX512_BF16 (AMD Zen 4 and later, Intel Cooper Lake and Sapphire Rapids and later):
// bf16 results are rounded by one instruction (vcvtneps2bf16) instead of five integer operations.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,bmi2,prefer-vector-width=512")
#define CMX_VECTOR_BYTES 64
#define CMX_VECTOR_REGISTERS 32
#define CMX_AVX512 1
#define CMX_AVX512_BF16 1
namespace cmx_avx512_bf16 {
#include "kernels_body.inc"
}  // namespace cmx_avx512_bf16
#undef CMX_VECTOR_BYTES
#undef CMX_VECTOR_REGISTERS
#undef CMX_AVX512
#undef CMX_AVX512_BF16
CMX_ENTRY_POINTS(avx512_bf16)
#pragma GCC pop_options
#endif

#if CMX_X86_64
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi2,prefer-vector-width=512")
#define CMX_VECTOR_BYTES 64
#define CMX_VECTOR_REGISTERS 32
#define CMX_AVX512 1
namespace cmx_avx512 {
#include "kernels_body.inc"
}  // namespace cmx_avx512
#undef CMX_VECTOR_BYTES
#undef CMX_VECTOR_REGISTERS
#undef CMX_AVX512
CMX_ENTRY_POINTS(avx512)
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi2")
#define CMX_VECTOR_BYTES 32
#define CMX_VECTOR_REGISTERS 16
#define CMX_AVX512 0
namespace cmx_avx2 {
#include "kernels_body.inc"
}  // namespace cmx_avx2
#undef CMX_VECTOR_BYTES
#undef CMX_VECTOR_REGISTERS
#undef CMX_AVX512
CMX_ENTRY_POINTS(avx2)
#pragma GCC pop_options
#endif

// The portable copy: the architecture's baseline (SSE2 on x86-64, NEON on aarch64), 16-byte vectors.
#define CMX_VECTOR_BYTES 16
#define CMX_VECTOR_REGISTERS 16
#define CMX_AVX512 0
namespace cmx_baseline {
#include "kernels_body.inc"
}  // namespace cmx_baseline
CMX_ENTRY_POINTS(baseline)

extern "C" {

// Bumped whenever an exported signature changes; the loader refuses a library with another number.
CMX_EXPORT int cmx_abi_version() { return 5; }

// Comma-separated ISA copies in this binary, best first.
CMX_EXPORT const char* cmx_compiled_isas() {
#if CMX_HAS_AVX512_BF16
    return "avx512_bf16,avx512,avx2,baseline";
#elif CMX_X86_64
    return "avx512,avx2,baseline";
#else
    return "baseline";
#endif
}

// 1 where this CPU (and OS) can run the named copy.
CMX_EXPORT int cmx_cpu_supports(const char* isa) {
    if (std::strcmp(isa, "baseline") == 0) return 1;
#if CMX_X86_64
    __builtin_cpu_init();
    if (std::strcmp(isa, "avx2") == 0)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
    if (std::strcmp(isa, "avx512") == 0)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#if CMX_HAS_AVX512_BF16
    if (std::strcmp(isa, "avx512_bf16") == 0)
        return cmx_cpu_supports("avx512") && __builtin_cpu_supports("avx512bf16");
#endif
#endif
    return 0;
}

}  // extern "C"
