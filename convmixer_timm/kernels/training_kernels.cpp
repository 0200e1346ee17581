// CPU kernels for ConvMixer on channels_last (NHWC) float tensors, with a plain C ABI (no torch headers
// keeps the build to seconds and the binary free of torch's ABI). Threads are OpenMP's, over row bands.
//
// 1. Weight gradient of a stride-1 depthwise k x k convolution.
//
//   grad_weight[i][j][c] = sum over n, y, x of grad_out[n][y][x][c] * input[n][y + i - pad][x + j - pad][c]
//
// oneDNN computes this 3.6-5x slower than the forward convolution on CPU (the largest single cost of a ConvMixer
// training step). Here each thread walks a band of input rows once: it copies a row into a zero-padded buffer,
// then, for every kernel row i that reads it, streams the matching grad_out row past k register accumulators per
// channel block, so every multiply-add loads one vector. Threads keep private k x k x C sums, added at the end.
//
// 2. BatchNorm training forward and backward over rows of C channels, two passes each way (PyTorch's CPU kernels
// take more passes over these tensors, which never fit in cache: ConvMixer does not downsample). Per-channel
// sums are accumulated in double per thread: float32 results measured 100x closer to a float64 reference than
// PyTorch's float32 BatchNorm.
//
// 3. Inference: one spatial-mixing step with both neighbouring BatchNorms folded (spatial_mixing_f32, below).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Runs fn(thread, begin, end) over [0, rows) split into contiguous bands, one per OpenMP thread; returns the
// number of threads used. Built with -fopenmp, this library binds to the libgomp PyTorch has already loaded, so
// it shares PyTorch's thread pool instead of competing with its spinning workers for the same cores.
template <typename Fn>
int parallel_bands(int64_t rows, int threads, Fn fn) {
    threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows)));
    int used = 1;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        if (t == 0) used = n;
        fn(t, rows * t / n, rows * (t + 1) / n);
    }
    return used;
}

// A zero-filled scratch buffer whose data is 64-byte aligned: vector loads from std::vector's 16-byte alignment
// straddle cache lines and ran the depthwise loops at half their rate.
template <typename T>
class AlignedBuffer {
  public:
    explicit AlignedBuffer(size_t count) : storage_(count + 64 / sizeof(T), T(0)) {
        const auto address = reinterpret_cast<uintptr_t>(storage_.data());
        data_ = storage_.data() + ((64 - address % 64) % 64) / sizeof(T);
    }
    T* data() { return data_; }

  private:
    std::vector<T> storage_;
    T* data_;
};

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorBytes = 32;
constexpr int kVectorRegisters = 16;
#endif

// GCC/Clang vector types: the accumulators must be named registers, which plain arrays did not become.
template <typename T>
struct Vector {
    typedef T type __attribute__((vector_size(kVectorBytes)));
    static constexpr int lanes = kVectorBytes / sizeof(T);
};

template <typename T>
inline typename Vector<T>::type load(const T* p) {
    typename Vector<T>::type v;
    __builtin_memcpy(&v, p, sizeof(v));
    return v;
}

template <typename T>
inline void store(T* p, typename Vector<T>::type v) {
    __builtin_memcpy(p, &v, sizeof(v));
}

// Accumulates one grad_out row against one padded input row for channels [c0, c0 + V vectors), kernel width K.
template <typename T, int K, int V>
inline void row_block(const T* __restrict g_row, const T* __restrict padded_row, T* __restrict sums_i,
                      int64_t width, int64_t channels, int64_t c0) {
    using vec = typename Vector<T>::type;
    constexpr int L = Vector<T>::lanes;
    vec acc[K][V];
#pragma GCC unroll 16
    for (int j = 0; j < K; ++j)
        for (int v = 0; v < V; ++v) acc[j][v] = load(sums_i + j * channels + c0 + v * L);
    for (int64_t x = 0; x < width; ++x) {
        vec gv[V];
        for (int v = 0; v < V; ++v) gv[v] = load(g_row + x * channels + c0 + v * L);
#pragma GCC unroll 16
        for (int j = 0; j < K; ++j)
            for (int v = 0; v < V; ++v) acc[j][v] += gv[v] * load(padded_row + (x + j) * channels + c0 + v * L);
    }
#pragma GCC unroll 16
    for (int j = 0; j < K; ++j)
        for (int v = 0; v < V; ++v) store(sums_i + j * channels + c0 + v * L, acc[j][v]);
}

// Any kernel width: the same sums with the accumulators in memory (slower, used for widths not instantiated).
template <typename T>
inline void row_any_width(const T* __restrict g_row, const T* __restrict padded_row, T* __restrict sums_i,
                          int64_t width, int64_t channels, int64_t c0, int64_t c1, int k) {
    for (int64_t x = 0; x < width; ++x) {
        const T* g = g_row + x * channels;
        for (int j = 0; j < k; ++j) {
            const T* in = padded_row + (x + j) * channels;
            T* s = sums_i + j * channels;
            for (int64_t c = c0; c < c1; ++c) s[c] += g[c] * in[c];
        }
    }
}

template <typename T, int K>
void row_all_channels(const T* g_row, const T* padded_row, T* sums_i, int64_t width, int64_t channels) {
    constexpr int B = Vector<T>::lanes;
    int64_t c0 = 0;
    // Two vectors per step when 2K accumulators and the two grad_out vectors still fit in registers.
    constexpr bool kTwoVectors = 2 * K + 2 <= kVectorRegisters;
    for (; kTwoVectors && c0 + 2 * B <= channels; c0 += 2 * B)
        row_block<T, K, 2>(g_row, padded_row, sums_i, width, channels, c0);
    for (; c0 + B <= channels; c0 += B) row_block<T, K, 1>(g_row, padded_row, sums_i, width, channels, c0);
    if (c0 < channels) row_any_width<T>(g_row, padded_row, sums_i, width, channels, c0, channels, K);
}

template <typename T>
using RowFn = void (*)(const T*, const T*, T*, int64_t, int64_t);

template <typename T>
RowFn<T> row_function(int k) {
    switch (k) {
        case 1: return row_all_channels<T, 1>;
        case 2: return row_all_channels<T, 2>;
        case 3: return row_all_channels<T, 3>;
        case 4: return row_all_channels<T, 4>;
        case 5: return row_all_channels<T, 5>;
        case 6: return row_all_channels<T, 6>;
        case 7: return row_all_channels<T, 7>;
        case 8: return row_all_channels<T, 8>;
        case 9: return row_all_channels<T, 9>;
        case 10: return row_all_channels<T, 10>;
        case 11: return row_all_channels<T, 11>;
        case 12: return row_all_channels<T, 12>;
        case 13: return row_all_channels<T, 13>;
        case 14: return row_all_channels<T, 14>;
        case 15: return row_all_channels<T, 15>;
        default: return nullptr;
    }
}

// Input rows [row_begin, row_end) of the flattened (n, row) index, sums into sums[K][K][C].
template <typename T>
void band(const T* grad_out, const T* input, T* sums, int64_t row_begin, int64_t row_end, int64_t height,
          int64_t width, int64_t channels, int k, int pad) {
    const RowFn<T> row = row_function<T>(k);
    AlignedBuffer<T> padded(static_cast<size_t>((width + k - 1) * channels));
    const int64_t row_elems = width * channels;
    for (int64_t r = row_begin; r < row_end; ++r) {
        const int64_t n = r / height, in_y = r % height;
        std::memcpy(padded.data() + pad * channels, input + r * row_elems, sizeof(T) * row_elems);
        for (int i = 0; i < k; ++i) {
            const int64_t out_y = in_y - i + pad;
            if (out_y < 0 || out_y >= height) continue;
            const T* g_row = grad_out + (n * height + out_y) * row_elems;
            T* sums_i = sums + static_cast<int64_t>(i) * k * channels;
            if (row != nullptr) {
                row(g_row, padded.data(), sums_i, width, channels);
            } else {
                row_any_width<T>(g_row, padded.data(), sums_i, width, channels, 0, channels, k);
            }
        }
    }
}

template <typename T>
void weight_grad(const T* grad_out, const T* input, T* grad_weight, int64_t batch, int64_t height, int64_t width,
                 int64_t channels, int k, int pad, int threads) {
    const int64_t rows = batch * height;
    const int64_t sum_elems = static_cast<int64_t>(k) * k * channels;
    std::vector<std::vector<T>> partial(std::max(threads, 1), std::vector<T>(sum_elems, T(0)));
    const int used = parallel_bands(rows, threads, [&](int t, int64_t begin, int64_t end) {
        band<T>(grad_out, input, partial[t].data(), begin, end, height, width, channels, k, pad);
    });
    for (int64_t e = 0; e < sum_elems; ++e) {
        T total = 0;
        for (int t = 0; t < used; ++t) total += partial[t][e];
        grad_weight[e] = total;
    }
}

// Per-channel sums over rows of two row-major [rows][channels] expressions, in double, across threads.
template <typename T, typename First, typename Second>
void channel_sums(int64_t rows, int64_t channels, int threads, double* first_sum, double* second_sum,
                  First first, Second second) {
    std::vector<std::vector<double>> partial(std::max(threads, 1), std::vector<double>(2 * channels, 0.0));
    const int used = parallel_bands(rows, threads, [&](int t, int64_t begin, int64_t end) {
        double* __restrict a = partial[t].data();
        double* __restrict b = a + channels;
        for (int64_t r = begin; r < end; ++r) {
            for (int64_t c = 0; c < channels; ++c) {
                a[c] += first(r * channels + c, c);
                b[c] += second(r * channels + c, c);
            }
        }
    });
    for (int64_t c = 0; c < channels; ++c) {
        double a = 0.0, b = 0.0;
        for (int t = 0; t < used; ++t) {
            a += partial[t][c];
            b += partial[t][channels + c];
        }
        first_sum[c] = a;
        second_sum[c] = b;
    }
}

// BatchNorm in training: mean, invstd (written, [channels]) and the biased variance of x, then
// out = (x - mean) * invstd * gamma + beta.
template <typename T>
void batch_norm_forward(const T* y, const T* gamma, const T* beta, T* out, T* mean, T* invstd, T* variance,
                            int64_t rows, int64_t channels, double eps, int threads) {
    // Shifting by the first row keeps the sum of squares free of cancellation when |mean| >> std.
    std::vector<double> shift(channels), sum(channels), sum_sq(channels);
    for (int64_t c = 0; c < channels; ++c) shift[c] = y[c];
    const double* s = shift.data();
    channel_sums<T>(rows, channels, threads, sum.data(), sum_sq.data(),
                    [&](int64_t i, int64_t c) { return static_cast<double>(y[i]) - s[c]; },
                    [&](int64_t i, int64_t c) {
                        const double d = static_cast<double>(y[i]) - s[c];
                        return d * d;
                    });
    std::vector<T> scale(channels);
    for (int64_t c = 0; c < channels; ++c) {
        const double shifted_mean = sum[c] / rows;
        const double var = std::max(sum_sq[c] / rows - shifted_mean * shifted_mean, 0.0);
        const double inv = 1.0 / std::sqrt(var + eps);
        mean[c] = static_cast<T>(shifted_mean + s[c]);
        invstd[c] = static_cast<T>(inv);
        variance[c] = static_cast<T>(var);
        scale[c] = static_cast<T>(inv * static_cast<double>(gamma[c]));
    }
    const T* __restrict m = mean;
    const T* __restrict sc = scale.data();
    const T* __restrict b = beta;
    parallel_bands(rows, threads, [&](int, int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const T* __restrict yr = y + r * channels;
            T* __restrict outr = out + r * channels;
            for (int64_t c = 0; c < channels; ++c) outr[c] = (yr[c] - m[c]) * sc[c] + b[c];
        }
    });
}

// grad_gamma, grad_beta ([channels]) and, when grad_y is not null, grad_y ([rows][channels]) of BatchNorm(y).
template <typename T>
void batch_norm_backward(const T* grad_out, const T* y, const T* mean, const T* invstd, const T* gamma,
                             T* grad_y, T* grad_gamma, T* grad_beta, int64_t rows, int64_t channels, int threads) {
    std::vector<double> sum_dy(channels), sum_dy_xmu(channels);
    channel_sums<T>(rows, channels, threads, sum_dy.data(), sum_dy_xmu.data(),
                    [&](int64_t i, int64_t) { return static_cast<double>(grad_out[i]); },
                    [&](int64_t i, int64_t c) {
                        return static_cast<double>(grad_out[i]) * (static_cast<double>(y[i]) - mean[c]);
                    });
    std::vector<T> mean_dy(channels), proj(channels), scale(channels);
    for (int64_t c = 0; c < channels; ++c) {
        const double inv = invstd[c];
        grad_beta[c] = static_cast<T>(sum_dy[c]);
        grad_gamma[c] = static_cast<T>(sum_dy_xmu[c] * inv);
        mean_dy[c] = static_cast<T>(sum_dy[c] / rows);
        proj[c] = static_cast<T>(sum_dy_xmu[c] / rows * inv * inv);
        scale[c] = static_cast<T>(inv * static_cast<double>(gamma[c]));
    }
    if (grad_y == nullptr) return;
    const T* __restrict m = mean;
    const T* __restrict mdy = mean_dy.data();
    const T* __restrict pj = proj.data();
    const T* __restrict sc = scale.data();
    parallel_bands(rows, threads, [&](int, int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const T* __restrict gr = grad_out + r * channels;
            const T* __restrict yr = y + r * channels;
            T* __restrict dr = grad_y + r * channels;
            for (int64_t c = 0; c < channels; ++c) dr[c] = (gr[c] - mdy[c] - (yr[c] - m[c]) * pj[c]) * sc[c];
        }
    });
}

// 3. Inference: one ConvMixer spatial-mixing step, z = y + s1 * act(depthwise_k(y) + b) with y = u * s_in + t_in,
// where u is the previous layer's output before its BatchNorm (folded to s_in, t_in) and zero padding applies to y,
// as in the model. PyTorch needs a depthwise convolution and two affine passes over memory for this; here each
// output row reads k affine-applied input rows from a per-thread ring of padded rows.
enum Activation { kIdentity = 0, kRelu = 1, kGelu = 2 };

// A Cephes-style exp (relative error ~1e-7) in operations GCC vectorises (std::floor would not be).
inline float exp_approx(float x) {
    x = std::min(std::max(x, -87.0f), 88.0f);
    constexpr float kRound = 12582912.0f;  // adding and subtracting 1.5 * 2^23 rounds to nearest
    const float n = (x * 1.44269504088896341f + kRound) - kRound;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    return p * __builtin_bit_cast(float, bits);
}

// Exact GELU, 0.5 y (1 + erf(y / sqrt 2)), with Abramowitz-Stegun 7.1.26 for erf (|error| < 1.5e-7), the
// formula of PyTorch's own vectorised CPU erf.
template <int Act>
inline float activation(float y) {
    if constexpr (Act == kRelu) return std::max(y, 0.0f);
    if constexpr (Act == kGelu) {
        const float x = std::fabs(y) * 0.70710678118654752f;
        const float t = 1.0f / (1.0f + 0.3275911f * x);
        const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f
                           + t * 1.061405429f))));
        const float erf_abs = 1.0f - poly * exp_approx(-x * x);
        return 0.5f * y * (1.0f + std::copysign(erf_abs, y));
    }
    return y;
}

struct MixingArgs {
    const float* u;        // [batch][height][width][channels]
    const float* s_in;     // [channels]
    const float* t_in;     // [channels]
    const float* weight;   // [k][k][channels]
    const float* bias;     // [channels]
    const float* s1;       // [channels]
    float* z;              // [batch][height][width][channels]
    int64_t height, width, channels;
    int k, pad;
};

// Fills the interior of a zero-padded row (width + k - 1 pixels) with y = u * s_in + t_in of input row in_y.
inline void load_row(const MixingArgs& a, float* row, int64_t n, int64_t in_y) {
    const int64_t C = a.channels;
    const float* __restrict src = a.u + (n * a.height + in_y) * a.width * C;
    float* __restrict dst = row + a.pad * C;
    const float* __restrict s = a.s_in;
    const float* __restrict t = a.t_in;
    for (int64_t x = 0; x < a.width; ++x)
        for (int64_t c = 0; c < C; ++c) dst[x * C + c] = src[x * C + c] * s[c] + t[c];
}

// The k x k taps of X outputs (stride C apart) for one vector of channels, into tmp[X][lanes]. rows[i] + offset is
// the first tap of the first output in padded input row i; weight and bias are offset to the channel block.
template <int K, int X>
inline void tile_taps(const float* const* rows, int64_t offset, const float* weight, const float* bias, int64_t C,
                      float* tmp) {
#if defined(__AVX512F__)
    if constexpr (X == 8) {
        // Eight independent accumulators in named registers: GCC's own vectorisation of this loop nest kept
        // one dependent chain per output and ran at a quarter of the rate.
        __m512 a0 = _mm512_loadu_ps(bias), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int i = 0; i < K; ++i) {
            const float* r = rows[i] + offset;
            const float* wi = weight + static_cast<int64_t>(i) * K * C;
            for (int j = 0; j < K; ++j) {
                const __m512 w = _mm512_loadu_ps(wi + j * C);
                const float* q = r + j * C;
                a0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(q), a0);
                a1 = _mm512_fmadd_ps(w, _mm512_loadu_ps(q + C), a1);
                a2 = _mm512_fmadd_ps(w, _mm512_loadu_ps(q + 2 * C), a2);
                a3 = _mm512_fmadd_ps(w, _mm512_loadu_ps(q + 3 * C), a3);
                a4 = _mm512_fmadd_ps(w, _mm512_loadu_ps(q + 4 * C), a4);
                a5 = _mm512_fmadd_ps(w, _mm512_loadu_ps(q + 5 * C), a5);
                a6 = _mm512_fmadd_ps(w, _mm512_loadu_ps(q + 6 * C), a6);
                a7 = _mm512_fmadd_ps(w, _mm512_loadu_ps(q + 7 * C), a7);
            }
        }
        _mm512_store_ps(tmp, a0);
        _mm512_store_ps(tmp + 16, a1);
        _mm512_store_ps(tmp + 32, a2);
        _mm512_store_ps(tmp + 48, a3);
        _mm512_store_ps(tmp + 64, a4);
        _mm512_store_ps(tmp + 80, a5);
        _mm512_store_ps(tmp + 96, a6);
        _mm512_store_ps(tmp + 112, a7);
        return;
    }
#endif
    using vec = Vector<float>::type;
    constexpr int L = Vector<float>::lanes;
    for (int x = 0; x < X; ++x) {
        vec acc = load(bias);
        for (int i = 0; i < K; ++i)
            for (int j = 0; j < K; ++j)
                acc += load(weight + (static_cast<int64_t>(i) * K + j) * C) * load(rows[i] + offset + (x + j) * C);
        store(tmp + x * L, acc);
    }
}

// Outputs [x0, x0 + X) x channels [c0, c0 + lanes) of one row.
template <int K, int X, int Act>
inline void mixing_tile(const MixingArgs& a, const float* const* rows, float* out_row, int64_t x0, int64_t c0) {
    constexpr int L = Vector<float>::lanes;
    const int64_t C = a.channels;
    alignas(64) float tmp[X * L];
    tile_taps<K, X>(rows, x0 * C + c0, a.weight + c0, a.bias + c0, C, tmp);
    const float* center = rows[a.pad] + (x0 + a.pad) * C + c0;
    const float* __restrict s1 = a.s1 + c0;
    for (int x = 0; x < X; ++x) {
        float* __restrict out = out_row + (x0 + x) * C + c0;
        for (int l = 0; l < L; ++l) out[l] = center[x * C + l] + s1[l] * activation<Act>(tmp[x * L + l]);
    }
}

// Any kernel size, channel count or width: the same sums, one output at a time (the fallback path).
template <int Act>
inline void mixing_any(const MixingArgs& a, const float* const* rows, float* out_row, int64_t x, int64_t c0,
                       int64_t c1) {
    const int64_t C = a.channels;
    for (int64_t c = c0; c < c1; ++c) {
        float acc = a.bias[c];
        for (int i = 0; i < a.k; ++i)
            for (int j = 0; j < a.k; ++j) acc += a.weight[(i * a.k + j) * C + c] * rows[i][(x + j) * C + c];
        const float center = rows[a.pad][(x + a.pad) * C + c];
        out_row[x * C + c] = center + a.s1[c] * activation<Act>(acc);
    }
}

template <int K, int Act>
void mixing_row(const MixingArgs& a, const float* const* rows, float* out_row) {
    constexpr int L = Vector<float>::lanes;
    constexpr int X = 8;
    const int64_t C = a.channels, W = a.width, full_c = C / L * L;
    for (int64_t c0 = 0; c0 < full_c; c0 += L) {
        int64_t x0 = 0;
        for (; x0 + X <= W; x0 += X) mixing_tile<K, X, Act>(a, rows, out_row, x0, c0);
        for (; x0 < W; ++x0) mixing_tile<K, 1, Act>(a, rows, out_row, x0, c0);
    }
    if (full_c < C)
        for (int64_t x = 0; x < W; ++x) mixing_any<Act>(a, rows, out_row, x, full_c, C);
}

template <int Act>
void mixing_row_any(const MixingArgs& a, const float* const* rows, float* out_row) {
    for (int64_t x = 0; x < a.width; ++x) mixing_any<Act>(a, rows, out_row, x, 0, a.channels);
}

template <int Act>
using MixingRowFn = void (*)(const MixingArgs&, const float* const*, float*);

template <int Act>
MixingRowFn<Act> mixing_row_function(int k) {
    switch (k) {
        case 3: return mixing_row<3, Act>;
        case 5: return mixing_row<5, Act>;
        case 7: return mixing_row<7, Act>;
        case 8: return mixing_row<8, Act>;
        case 9: return mixing_row<9, Act>;
        default: return mixing_row_any<Act>;
    }
}

// Each thread walks a band of output rows with a ring of k padded input rows, so every input row is read and
// affine-transformed once per band, not k times.
template <int Act>
void spatial_mixing(const MixingArgs& a, int64_t batch, int threads) {
    const MixingRowFn<Act> row_fn = mixing_row_function<Act>(a.k);
    const int64_t padded = (a.width + a.k - 1) * a.channels;
    parallel_bands(batch * a.height, threads, [&](int, int64_t begin, int64_t end) {
        AlignedBuffer<float> ring(static_cast<size_t>(a.k * padded)), zeros(static_cast<size_t>(padded));
        std::vector<int64_t> held(a.k, -1);
        std::vector<const float*> rows(a.k);
        for (int64_t r = begin; r < end; ++r) {
            const int64_t n = r / a.height, y = r % a.height;
            for (int i = 0; i < a.k; ++i) {
                const int64_t in_y = y + i - a.pad;
                if (in_y < 0 || in_y >= a.height) {
                    rows[i] = zeros.data();
                    continue;
                }
                const int64_t key = n * a.height + in_y, slot = key % a.k;  // k consecutive keys: distinct slots
                float* row = ring.data() + slot * padded;
                if (held[slot] != key) {
                    load_row(a, row, n, in_y);
                    held[slot] = key;
                }
                rows[i] = row;
            }
            row_fn(a, rows.data(), a.z + r * a.width * a.channels);
        }
    });
}

}  // namespace

extern "C" {

// grad_out, input: [batch][height][width][channels]; grad_weight (written): [k][k][channels].
// pad is the zero padding before the first row and column; the output grid equals the input grid.
void depthwise_weight_grad_f32(const float* grad_out, const float* input, float* grad_weight, int64_t batch,
                               int64_t height, int64_t width, int64_t channels, int k, int pad, int threads) {
    weight_grad<float>(grad_out, input, grad_weight, batch, height, width, channels, k, pad, threads);
}

void depthwise_weight_grad_f64(const double* grad_out, const double* input, double* grad_weight, int64_t batch,
                               int64_t height, int64_t width, int64_t channels, int k, int pad, int threads) {
    weight_grad<double>(grad_out, input, grad_weight, batch, height, width, channels, k, pad, threads);
}


#define BATCH_NORM_ENTRY_POINTS(T, suffix)                                                                         \
    void batch_norm_forward_##suffix(const T* y, const T* gamma, const T* beta, T* out, T* mean, T* invstd,         \
                                     T* variance, int64_t rows, int64_t channels, double eps, int threads) {       \
        batch_norm_forward<T>(y, gamma, beta, out, mean, invstd, variance, rows, channels, eps, threads);          \
    }                                                                                                              \
    void batch_norm_backward_##suffix(const T* grad_out, const T* y, const T* mean, const T* invstd,               \
                                      const T* gamma, T* grad_y, T* grad_gamma, T* grad_beta, int64_t rows,        \
                                      int64_t channels, int threads) {                                             \
        batch_norm_backward<T>(grad_out, y, mean, invstd, gamma, grad_y, grad_gamma, grad_beta, rows, channels,    \
                               threads);                                                                           \
    }

// y, out, grad_out, grad_y: [rows][channels] (channels_last NCHW is [N*H*W][C]); the rest [channels].
BATCH_NORM_ENTRY_POINTS(float, f32)
BATCH_NORM_ENTRY_POINTS(double, f64)


// act: 0 identity, 1 ReLU, 2 GELU (exact form). u, z: [batch][height][width][channels] float32 (channels_last);
// weight: [k][k][channels]; s_in, t_in, bias, s1: [channels]. pad is the zero padding before the first row/column.
void spatial_mixing_f32(int act, const float* u, const float* s_in, const float* t_in, const float* weight,
                        const float* bias, const float* s1, float* z, int64_t batch, int64_t height, int64_t width,
                        int64_t channels, int k, int pad, int threads) {
    const MixingArgs a{u, s_in, t_in, weight, bias, s1, z, height, width, channels, k, pad};
    if (act == kGelu) spatial_mixing<kGelu>(a, batch, threads);
    else if (act == kRelu) spatial_mixing<kRelu>(a, batch, threads);
    else spatial_mixing<kIdentity>(a, batch, threads);
}

}
