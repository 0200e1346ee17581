// Weight gradient of a stride-1 depthwise k x k convolution on channels_last (NHWC) tensors.
//
//   grad_weight[i][j][c] = sum over n, y, x of grad_out[n][y][x][c] * input[n][y + i - pad][x + j - pad][c]
//
// oneDNN computes this 3.6-5x slower than the forward convolution on CPU (the largest single cost of a ConvMixer
// training step). Here each thread walks a band of input rows once: it copies a row into a zero-padded buffer,
// then, for every kernel row i that reads it, streams the matching grad_out row past k register accumulators per
// channel block, so every multiply-add loads one vector. Threads keep private k x k x C sums, added at the end.
//
// A plain C ABI (no torch headers) keeps the build to a second and the binary free of torch's ABI.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

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
    threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows)));
    std::vector<std::vector<T>> partial(threads, std::vector<T>(sum_elems, T(0)));
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
        const int64_t begin = rows * t / threads, end = rows * (t + 1) / threads;
        auto work = [&, t, begin, end] {
            band<T>(grad_out, input, partial[t].data(), begin, end, height, width, channels, k, pad);
        };
        if (t + 1 == threads) work(); else workers.emplace_back(work);
    }
    for (auto& w : workers) w.join();
    for (int64_t e = 0; e < sum_elems; ++e) {
        T total = 0;
        for (int t = 0; t < threads; ++t) total += partial[t][e];
        grad_weight[e] = total;
    }
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

}
