// CPU training kernels for ConvMixer on channels_last (NHWC) float tensors, with a plain C ABI (no torch headers
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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

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
    std::vector<T> padded(static_cast<size_t>((width + k - 1) * channels), T(0));
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

}
