// moebench: moesim's calibration microbenchmark (CUDA C++, cuBLAS / cuBLASLt).
//
// Reads a plan on stdin (one directive per line, written by moesim.calibration.cuda):
//   repeats R | warmup W | copy_bytes N | host_copy_bytes N
//   case ID HIDDEN WIDTH MATRICES DTYPE E c_0 ... c_{E-1}
//   gemm ID M N K DTYPE
//   run
// and prints one JSON object per line on stdout:
//   {"device": ...}, {"case": ID, "samples": [...], "check_rel_error": x},
//   {"gemm": ID, "samples": [...], "check_rel_error": x}, {"memory": ...},
//   {"host_link": ...}, {"launch": ...}, {"peer": ...}.
//
// Expert FFN of one case: for every expert i with c_i > 0 tokens,
//   H = X_i W1_i^T (gate and up fused: W1_i is [up x hidden], up = 2*width when gated),
//   A = silu(H[:, :width]) * H[:, width:] (gated) or relu(H), rounded to the dtype,
//   Y = A W2_i^T (W2_i is [hidden x width]),
// A `gemm` directive is the first of these GEMMs alone: Y = X W^T with X [M x K] and
// W [N x K] (one expert of M tokens, hidden K, up width N, no activation or down GEMM), the
// points of the profile's dense GEMM tables.
// as cuBLASLt TN matmuls (weights stored [out, in] row-major, as nn.Linear), bf16 with float
// accumulation, or fp8 e4m3 with per-tensor scales and bf16 output (rows padded to 16).
// Before timing, the first rows of the first busy expert are checked against a float64
// reference computed on the host from the same (quantised) inputs. Inputs are random (a hash),
// never zeros; timings are CUDA events, medians taken by the caller over `repeats` samples,
// each sample on the next of several rotating weight and input sets. The experts' token rows lie
// one after another in X (each expert's padded to 16); layouts and cuBLASLt algorithms are
// chosen before timing, so the timed loop only launches. Every CUDA and cuBLAS status is
// checked; exit codes: 2 bad plan, 3 CUDA error, 4 cuBLAS error, 5 no cuBLASLt algorithm,
// 6 a copy's check failed, 7 a case does not fit in the GPU's free memory.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#define CUDA_OK(call)                                                                   \
  do {                                                                                  \
    cudaError_t err_ = (call);                                                          \
    if (err_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "moebench: %s failed at %s:%d: %s\n", #call, __FILE__, __LINE__, \
                   cudaGetErrorString(err_));                                           \
      std::exit(3);                                                                     \
    }                                                                                   \
  } while (0)

#define BLAS_OK(call)                                                                   \
  do {                                                                                  \
    cublasStatus_t st_ = (call);                                                        \
    if (st_ != CUBLAS_STATUS_SUCCESS) {                                                 \
      std::fprintf(stderr, "moebench: %s failed at %s:%d: status %d\n", #call, __FILE__, \
                   __LINE__, static_cast<int>(st_));                                    \
      std::exit(4);                                                                     \
    }                                                                                   \
  } while (0)

#define LAUNCH_OK() CUDA_OK(cudaGetLastError())

namespace {

constexpr int kFp8Rows = 16;
constexpr size_t kCacheBytes = size_t(64) << 20;
constexpr int kMaxSets = 8;

struct Case {
  int id = 0, hidden = 0, width = 0, matrices = 3, experts = 0;
  std::string dtype;
  std::vector<int> counts;
  bool gemm_only = false;  // a `gemm` directive: the up GEMM alone
};

struct Plan {
  int repeats = 20, warmup = 3;
  size_t copy_bytes = size_t(1) << 30, host_copy_bytes = size_t(256) << 20;
  std::vector<Case> cases;
  std::vector<Case> gemms;
};

__device__ __host__ inline float hash_uniform(uint64_t i, uint64_t seed) {
  uint64_t z = i + seed * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return float((z >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;  // uniform in [-1, 1)
}

template <typename T>
__global__ void fill_random(T* out, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    out[i] = T(hash_uniform(i, seed) * scale);
  }
}

// A = act(H) for `rows` rows; H is [rows x up] in bf16, A is [rows x width] in T.
template <typename T>
__global__ void activation(const __nv_bfloat16* h, T* a, int rows, int width, int gated) {
  size_t n = size_t(rows) * width;
  int up = gated ? 2 * width : width;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    size_t r = i / width, c = i % width;
    float g = __bfloat162float(h[r * up + c]);
    float v = gated ? g / (1.0f + __expf(-g)) * __bfloat162float(h[r * up + width + c])
                    : fmaxf(g, 0.0f);
    a[i] = T(v);
  }
}

__global__ void empty_kernel() {}

template <typename T>
void fill(T* p, size_t n, uint64_t seed, float scale) {
  fill_random<T><<<1024, 256>>>(p, n, seed, scale);
  LAUNCH_OK();
}

struct Buffers {
  void *w1 = nullptr, *w2 = nullptr, *x = nullptr;
};

// Rows of one expert's slice of X: its token count padded to 16, so that every slice starts
// aligned and fp8 GEMMs get the row multiple they need.
int padded(int n) { return (n + kFp8Rows - 1) / kFp8Rows * kFp8Rows; }

class ExpertFFN {
 public:
  ExpertFFN(cublasLtHandle_t lt, const Case& c, void* workspace, size_t ws_bytes)
      : lt_(lt), c_(c), ws_(workspace), ws_bytes_(ws_bytes) {
    fp8_ = c.dtype == "fp8";
    esize_ = fp8_ ? 1 : 2;
    up_ = c.matrices == 3 ? 2 * c.width : c.width;
    for (int n : c.counts) {  // X holds the experts' token rows one after another
      row_off_.push_back(rows_total_);
      rows_total_ += size_t(padded(n));
      rows_max_ = std::max(rows_max_, padded(n));
    }
    CUDA_OK(cudaMalloc(&h_, size_t(rows_max_) * up_ * 2));
    CUDA_OK(cudaMalloc(&a_, size_t(rows_max_) * c.width * esize_));
    CUDA_OK(cudaMalloc(&y_, size_t(rows_max_) * c.hidden * 2));
    CUDA_OK(cudaMalloc(&scales_, 3 * sizeof(float)));
    // fp8 values are uniform in [-1.7, 1.7] with per-tensor scales; bf16 values carry the scale.
    float host_scales[3] = {1.0f, fp8_ ? 1.0f / std::sqrt(float(c.hidden)) : 1.0f,
                            fp8_ ? 1.0f / std::sqrt(float(c.width)) : 1.0f};
    CUDA_OK(cudaMemcpy(scales_, host_scales, sizeof(host_scales), cudaMemcpyHostToDevice));
    cublasOperation_t t = CUBLAS_OP_T, n = CUBLAS_OP_N;
    for (int which = 0; which < 2; ++which) {  // 0: up (gate+up) GEMM, 1: down GEMM
      cublasLtMatmulDesc_t& d = desc_[which];
      BLAS_OK(cublasLtMatmulDescCreate(&d, CUBLAS_COMPUTE_32F, CUDA_R_32F));
      BLAS_OK(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof(t)));
      BLAS_OK(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSB, &n, sizeof(n)));
      if (fp8_) {
        float* a_scale = static_cast<float*>(scales_) + 1 + which;
        float* b_scale = static_cast<float*>(scales_);
        BLAS_OK(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale,
                                               sizeof(a_scale)));
        BLAS_OK(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale,
                                               sizeof(b_scale)));
      }
    }
    BLAS_OK(cublasLtMatmulPreferenceCreate(&pref_));
    BLAS_OK(cublasLtMatmulPreferenceSetAttribute(
        pref_, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes_, sizeof(ws_bytes_)));
  }
  ExpertFFN(const ExpertFFN&) = delete;
  ExpertFFN& operator=(const ExpertFFN&) = delete;
  ~ExpertFFN() {
    for (auto& [key, g] : gemms_) {
      BLAS_OK(cublasLtMatrixLayoutDestroy(g.a));
      BLAS_OK(cublasLtMatrixLayoutDestroy(g.b));
      BLAS_OK(cublasLtMatrixLayoutDestroy(g.c));
    }
    BLAS_OK(cublasLtMatmulPreferenceDestroy(pref_));
    for (auto& d : desc_) BLAS_OK(cublasLtMatmulDescDestroy(d));
    CUDA_OK(cudaFree(h_));
    CUDA_OK(cudaFree(a_));
    CUDA_OK(cudaFree(y_));
    CUDA_OK(cudaFree(scales_));
  }

  size_t w1_elems() const { return size_t(c_.experts) * up_ * c_.hidden; }
  size_t w2_elems() const { return size_t(c_.experts) * c_.hidden * c_.width; }
  size_t x_elems() const { return rows_total_ * c_.hidden; }
  size_t set_bytes() const { return (w1_elems() + w2_elems() + x_elems()) * esize_; }

  // One set of random weights and inputs (a hash of `seed`, never zeros), on the device.
  Buffers allocate(uint64_t seed) const {
    Buffers b;
    CUDA_OK(cudaMalloc(&b.w1, w1_elems() * esize_));
    CUDA_OK(cudaMalloc(&b.w2, w2_elems() * esize_));
    CUDA_OK(cudaMalloc(&b.x, x_elems() * esize_));
    float s1 = fp8_ ? 1.0f : 1.0f / std::sqrt(float(c_.hidden));
    float s2 = fp8_ ? 1.0f : 1.0f / std::sqrt(float(c_.width));
    if (fp8_) {
      fill(static_cast<__nv_fp8_e4m3*>(b.w1), w1_elems(), seed, 1.7f * s1);
      fill(static_cast<__nv_fp8_e4m3*>(b.w2), w2_elems(), seed + 1, 1.7f * s2);
      fill(static_cast<__nv_fp8_e4m3*>(b.x), x_elems(), seed + 2, 1.7f);
    } else {
      fill(static_cast<__nv_bfloat16*>(b.w1), w1_elems(), seed, 1.7f * s1);
      fill(static_cast<__nv_bfloat16*>(b.w2), w2_elems(), seed + 1, 1.7f * s2);
      fill(static_cast<__nv_bfloat16*>(b.x), x_elems(), seed + 2, 1.7f);
    }
    CUDA_OK(cudaDeviceSynchronize());  // the fills ran on the legacy stream
    return b;
  }
  static void release(Buffers& b) {
    CUDA_OK(cudaFree(b.w1));
    CUDA_OK(cudaFree(b.w2));
    CUDA_OK(cudaFree(b.x));
  }

  // Layouts and cuBLASLt algorithms of every GEMM the case runs, chosen before timing so
  // that the timed calls only launch.
  void prepare() {
    for (int e = 0; e < c_.experts; ++e) {
      if (c_.counts[e] == 0) continue;
      int m = rows_for(c_.counts[e]);
      gemm_for(0, up_, m, c_.hidden);
      if (!c_.gemm_only) gemm_for(1, c_.hidden, m, c_.width);
    }
  }

  // One grouped call: every busy expert's up GEMM, activation, down GEMM.
  void run(const Buffers& b, cudaStream_t s) {
    for (int e = 0; e < c_.experts; ++e) {
      int n = c_.counts[e];
      if (n == 0) continue;
      int m = rows_for(n);
      const char* w1 = static_cast<const char*>(b.w1) + size_t(e) * up_ * c_.hidden * esize_;
      const char* w2 = static_cast<const char*>(b.w2) + size_t(e) * c_.hidden * c_.width * esize_;
      const char* x = static_cast<const char*>(b.x) + row_off_[e] * c_.hidden * esize_;
      gemm(0, w1, x, h_, up_, m, c_.hidden, s);
      if (c_.gemm_only) continue;
      int blocks = int(std::min<size_t>(4096, (size_t(m) * c_.width + 255) / 256));
      if (fp8_) {
        activation<__nv_fp8_e4m3><<<blocks, 256, 0, s>>>(
            static_cast<__nv_bfloat16*>(h_), static_cast<__nv_fp8_e4m3*>(a_), m, c_.width,
            c_.matrices == 3);
      } else {
        activation<__nv_bfloat16><<<blocks, 256, 0, s>>>(
            static_cast<__nv_bfloat16*>(h_), static_cast<__nv_bfloat16*>(a_), m, c_.width,
            c_.matrices == 3);
      }
      LAUNCH_OK();
      gemm(1, w2, a_, y_, c_.hidden, m, c_.width, s);
    }
  }

  // Runs the first busy expert alone and compares its first `check_rows` output rows with a
  // float64 host reference computed from the same (quantised) inputs.
  double check(const Buffers& b, cudaStream_t s, int check_rows) {
    int first = -1;
    for (int e = 0; e < c_.experts && first < 0; ++e)
      if (c_.counts[e] > 0) first = e;
    Case one = c_;
    std::fill(one.counts.begin(), one.counts.end(), 0);
    one.counts[first] = c_.counts[first];
    std::swap(one, c_);
    run(b, s);
    std::swap(one, c_);
    CUDA_OK(cudaStreamSynchronize(s));
    int r = std::min(check_rows, c_.counts[first]);
    int H = c_.hidden, W = c_.width;
    const char* xs = static_cast<const char*>(b.x) + row_off_[first] * H * esize_;
    std::vector<double> x = fetch(xs, size_t(r) * H);
    std::vector<double> w1 = fetch(static_cast<const char*>(b.w1) + size_t(first) * up_ * H * esize_, size_t(up_) * H);
    std::vector<double> w2 = fetch(static_cast<const char*>(b.w2) + size_t(first) * H * W * esize_, size_t(H) * W);
    std::vector<uint16_t> yraw(size_t(r) * H);
    CUDA_OK(cudaMemcpy(yraw.data(), y_, yraw.size() * 2, cudaMemcpyDeviceToHost));
    std::vector<uint16_t> hraw(size_t(r) * up_);
    CUDA_OK(cudaMemcpy(hraw.data(), h_, hraw.size() * 2, cudaMemcpyDeviceToHost));
    double s1 = fp8_ ? 1.0 / std::sqrt(double(H)) : 1.0, s2 = fp8_ ? 1.0 / std::sqrt(double(W)) : 1.0;
    double num = 0, den = 0;
    std::vector<double> hrow(up_), arow(W);
    for (int i = 0; i < r; ++i) {
      for (int j = 0; j < up_; ++j) {
        double acc = 0;
        for (int k = 0; k < H; ++k) acc += x[size_t(i) * H + k] * w1[size_t(j) * H + k];
        hrow[j] = round_bf16(acc * s1);  // H is written in bf16
        if (c_.gemm_only) {  // the GEMM's own output is what is checked
          double got = bf16_bits_to_double(hraw[size_t(i) * up_ + j]);
          num += (got - acc * s1) * (got - acc * s1);
          den += acc * s1 * acc * s1;
        }
      }
      if (c_.gemm_only) continue;
      for (int j = 0; j < W; ++j) {
        double g = hrow[j];
        double v = c_.matrices == 3 ? g / (1.0 + std::exp(-g)) * hrow[W + j] : std::max(g, 0.0);
        arow[j] = fp8_ ? round_fp8(v) : round_bf16(v);
      }
      for (int j = 0; j < H; ++j) {
        double acc = 0;
        for (int k = 0; k < W; ++k) acc += arow[k] * w2[size_t(j) * W + k];
        acc *= s2;
        double got = bf16_bits_to_double(yraw[size_t(i) * H + j]);
        num += (got - acc) * (got - acc);
        den += acc * acc;
      }
    }
    return std::sqrt(num / std::max(den, 1e-300));
  }

 private:
  struct Gemm {
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };

  int rows_for(int n) const { return fp8_ ? padded(n) : n; }

  // C[m_out x n_tok] (column-major, i.e. row-major [n_tok x m_out]) = A^T B, A = W [m_out x k]
  // row-major (column-major k x m_out, transposed), B = X row-major [n_tok x k].
  const Gemm& gemm_for(int which, int m_out, int n_tok, int k) {
    auto key = std::make_tuple(which, m_out, n_tok, k);
    auto it = gemms_.find(key);
    if (it != gemms_.end()) return it->second;
    cudaDataType_t in = fp8_ ? CUDA_R_8F_E4M3 : CUDA_R_16BF;
    Gemm g;
    BLAS_OK(cublasLtMatrixLayoutCreate(&g.a, in, k, m_out, k));
    BLAS_OK(cublasLtMatrixLayoutCreate(&g.b, in, k, n_tok, k));
    BLAS_OK(cublasLtMatrixLayoutCreate(&g.c, CUDA_R_16BF, m_out, n_tok, m_out));
    cublasLtMatmulHeuristicResult_t heur{};
    int found = 0;
    BLAS_OK(cublasLtMatmulAlgoGetHeuristic(lt_, desc_[which], g.a, g.b, g.c, g.c, pref_, 1, &heur,
                                           &found));
    if (found == 0) {
      std::fprintf(stderr, "moebench: no cuBLASLt algorithm for %s %dx%dx%d\n", c_.dtype.c_str(),
                   m_out, n_tok, k);
      std::exit(5);
    }
    g.algo = heur.algo;
    return gemms_.emplace(key, g).first->second;
  }

  void gemm(int which, const void* w, const void* x, void* out, int m_out, int n_tok, int k,
            cudaStream_t s) {
    const Gemm& g = gemm_for(which, m_out, n_tok, k);
    float alpha = 1.0f, beta = 0.0f;
    BLAS_OK(cublasLtMatmul(lt_, desc_[which], &alpha, w, g.a, x, g.b, &beta, out, g.c, out, g.c,
                           &g.algo, ws_, ws_bytes_, s));
  }

  std::vector<double> fetch(const void* p, size_t n) const {
    std::vector<double> out(n);
    if (fp8_) {
      std::vector<__nv_fp8_e4m3> raw(n);
      CUDA_OK(cudaMemcpy(raw.data(), p, n, cudaMemcpyDeviceToHost));
      for (size_t i = 0; i < n; ++i) out[i] = double(float(raw[i]));
    } else {
      std::vector<uint16_t> raw(n);
      CUDA_OK(cudaMemcpy(raw.data(), p, n * 2, cudaMemcpyDeviceToHost));
      for (size_t i = 0; i < n; ++i) out[i] = bf16_bits_to_double(raw[i]);
    }
    return out;
  }
  static double bf16_bits_to_double(uint16_t bits) {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static double round_bf16(double v) { return double(__bfloat162float(__float2bfloat16(float(v)))); }
  static double round_fp8(double v) { return double(float(__nv_fp8_e4m3(float(v)))); }

  cublasLtHandle_t lt_;
  Case c_;
  void* ws_;
  size_t ws_bytes_;
  int up_ = 0, esize_ = 2, rows_max_ = 0;
  bool fp8_ = false;
  std::vector<size_t> row_off_;
  size_t rows_total_ = 0;
  void *h_ = nullptr, *a_ = nullptr, *y_ = nullptr, *scales_ = nullptr;
  cublasLtMatmulDesc_t desc_[2] = {nullptr, nullptr};
  cublasLtMatmulPreference_t pref_ = nullptr;
  std::map<std::tuple<int, int, int, int>, Gemm> gemms_;
};

void print_samples(const std::vector<float>& ms) {
  std::printf("[");
  for (size_t i = 0; i < ms.size(); ++i) std::printf("%s%.9g", i ? ", " : "", ms[i] / 1e3);
  std::printf("]");
}

std::vector<float> time_events(int warmup, int repeats, cudaStream_t s,
                               const std::function<void(int)>& body) {
  for (int i = 0; i < warmup; ++i) body(i);
  CUDA_OK(cudaStreamSynchronize(s));
  std::vector<cudaEvent_t> ev(2 * repeats);
  for (auto& e : ev) CUDA_OK(cudaEventCreate(&e));
  for (int i = 0; i < repeats; ++i) {
    CUDA_OK(cudaEventRecord(ev[2 * i], s));
    body(i);
    CUDA_OK(cudaEventRecord(ev[2 * i + 1], s));
  }
  CUDA_OK(cudaStreamSynchronize(s));
  std::vector<float> ms(repeats);
  for (int i = 0; i < repeats; ++i) CUDA_OK(cudaEventElapsedTime(&ms[i], ev[2 * i], ev[2 * i + 1]));
  for (auto& e : ev) CUDA_OK(cudaEventDestroy(e));
  return ms;
}

void run_case(cublasLtHandle_t lt, const Case& c, const Plan& plan, void* ws, size_t ws_bytes,
              cudaStream_t s) {
  ExpertFFN ffn(lt, c, ws, ws_bytes);
  size_t set_bytes = ffn.set_bytes();
  int sets = int(std::min<size_t>(kMaxSets, std::max<size_t>(2, (2 * kCacheBytes + set_bytes - 1) / set_bytes)));
  size_t free_b = 0, total_b = 0;
  CUDA_OK(cudaMemGetInfo(&free_b, &total_b));
  size_t usable = free_b / 10 * 8;
  if (set_bytes > usable) {
    std::fprintf(stderr,
                 "moebench: case %d (%s, %d experts, hidden %d, width %d) needs %.2f GiB for one "
                 "set of weights and inputs, %.2f GiB of the GPU is free; lower --experts or "
                 "--max-tokens\n",
                 c.id, c.dtype.c_str(), c.experts, c.hidden, c.width, set_bytes / 1073741824.0,
                 free_b / 1073741824.0);
    std::exit(7);
  }
  while (sets > 1 && size_t(sets) * set_bytes > usable) --sets;
  std::vector<Buffers> bufs;
  for (int i = 0; i < sets; ++i) bufs.push_back(ffn.allocate(1000ull * c.id + 3ull * i));
  double err = ffn.check(bufs[0], s, 8);
  ffn.prepare();
  auto ms = time_events(plan.warmup, plan.repeats, s, [&](int i) { ffn.run(bufs[i % sets], s); });
  std::printf("{\"%s\": %d, \"sets\": %d, \"check_rel_error\": %.6g, \"samples\": ",
              c.gemm_only ? "gemm" : "case", c.id, sets, err);
  print_samples(ms);
  std::printf("}\n");
  std::fflush(stdout);
  for (auto& b : bufs) ExpertFFN::release(b);
}

// Exits (code 6) unless the first 8 KiB of `dst` on device `dst_dev` equal those of `src` on
// `src_dev`: a copy is checked before it is timed. Leaves device 0 current.
void check_copy(const void* src, int src_dev, const void* dst, int dst_dev, const char* what) {
  std::vector<unsigned char> sent(8192), got(8192);
  CUDA_OK(cudaSetDevice(src_dev));
  CUDA_OK(cudaMemcpy(sent.data(), src, sent.size(), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaSetDevice(dst_dev));
  CUDA_OK(cudaMemcpy(got.data(), dst, got.size(), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaSetDevice(0));
  if (sent != got) {
    std::fprintf(stderr, "moebench: %s copy check failed\n", what);
    std::exit(6);
  }
}

void run_memory(const Plan& plan, cudaStream_t s) {
  size_t n = plan.copy_bytes / 2;
  void *src, *dst;
  CUDA_OK(cudaMalloc(&src, n * 2));
  CUDA_OK(cudaMalloc(&dst, n * 2));
  fill(static_cast<__nv_bfloat16*>(src), n, 7, 1.0f);
  CUDA_OK(cudaDeviceSynchronize());  // the fill ran on the legacy stream, which `s` does not wait on
  CUDA_OK(cudaMemcpyAsync(dst, src, n * 2, cudaMemcpyDeviceToDevice, s));
  CUDA_OK(cudaStreamSynchronize(s));
  check_copy(src, 0, dst, 0, "device");
  auto ms = time_events(plan.warmup, plan.repeats, s, [&](int) {
    CUDA_OK(cudaMemcpyAsync(dst, src, n * 2, cudaMemcpyDeviceToDevice, s));
  });
  std::printf("{\"memory\": {\"bytes\": %zu, \"samples\": ", 2 * n * 2);
  print_samples(ms);
  std::printf("}}\n");
  CUDA_OK(cudaFree(src));
  CUDA_OK(cudaFree(dst));
}

void run_host_link(const Plan& plan, cudaStream_t s, cublasLtHandle_t lt, void* ws, size_t ws_bytes) {
  size_t n = plan.host_copy_bytes;
  unsigned char* host;
  void* dev;
  CUDA_OK(cudaMallocHost(&host, n));
  CUDA_OK(cudaMalloc(&dev, n));
  for (size_t i = 0; i < n; ++i) host[i] = static_cast<unsigned char>(hash_uniform(i, 11) * 127 + 128);
  CUDA_OK(cudaMemcpy(dev, host, n, cudaMemcpyHostToDevice));
  std::vector<unsigned char> back(4096);
  CUDA_OK(cudaMemcpy(back.data(), dev, 4096, cudaMemcpyDeviceToHost));
  if (!std::equal(back.begin(), back.end(), host)) {
    std::fprintf(stderr, "moebench: host copy check failed\n");
    std::exit(6);
  }
  auto h2d = time_events(plan.warmup, plan.repeats, s, [&](int) {
    CUDA_OK(cudaMemcpyAsync(dev, host, n, cudaMemcpyHostToDevice, s));
  });
  auto d2h = time_events(plan.warmup, plan.repeats, s, [&](int) {
    CUDA_OK(cudaMemcpyAsync(host, dev, n, cudaMemcpyDeviceToHost, s));
  });
  // H2D while a large bf16 expert FFN (Mixtral's shape, 8 experts x 4096 tokens) runs on
  // another stream: the offload path's contention.
  Case big;
  big.id = 999999;
  big.hidden = 4096;
  big.width = 14336;
  big.experts = 8;
  big.dtype = "bf16";
  big.counts.assign(8, 4096);
  ExpertFFN ffn(lt, big, ws, ws_bytes);
  Buffers b = ffn.allocate(21);
  ffn.prepare();
  cudaStream_t side;
  CUDA_OK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<float> during;
  for (int i = 0; i < plan.repeats; ++i) {
    ffn.run(b, side);
    auto one = time_events(0, 1, s, [&](int) {
      CUDA_OK(cudaMemcpyAsync(dev, host, n, cudaMemcpyHostToDevice, s));
    });
    during.push_back(one[0]);
    CUDA_OK(cudaDeviceSynchronize());
  }
  std::printf("{\"host_link\": {\"bytes\": %zu, \"h2d_samples\": ", n);
  print_samples(h2d);
  std::printf(", \"d2h_samples\": ");
  print_samples(d2h);
  std::printf(", \"h2d_during_gemm_samples\": ");
  print_samples(during);
  std::printf("}}\n");
  CUDA_OK(cudaStreamDestroy(side));
  ExpertFFN::release(b);
  CUDA_OK(cudaFreeHost(host));
  CUDA_OK(cudaFree(dev));
}

void run_launch(cudaStream_t s) {
  const int launches = 1000;
  auto ms = time_events(3, 7, s, [&](int) {
    for (int i = 0; i < launches; ++i) empty_kernel<<<1, 1, 0, s>>>();
    LAUNCH_OK();
  });
  for (auto& m : ms) m /= launches;
  std::printf("{\"launch\": {\"samples\": ");
  print_samples(ms);
  std::printf("}}\n");
}

void run_peer(const Plan& plan) {
  int count = 0;
  CUDA_OK(cudaGetDeviceCount(&count));
  if (count < 2) {
    std::printf("{\"peer\": {\"skipped\": \"%d CUDA device(s); peer copies need two or more\"}}\n", count);
    return;
  }
  int can = 0;
  CUDA_OK(cudaDeviceCanAccessPeer(&can, 0, 1));
  size_t n = plan.copy_bytes / 4;
  void *a, *b;
  CUDA_OK(cudaSetDevice(1));
  CUDA_OK(cudaMalloc(&b, n));
  CUDA_OK(cudaSetDevice(0));
  if (can) {
    cudaError_t e = cudaDeviceEnablePeerAccess(1, 0);
    if (e == cudaErrorPeerAccessAlreadyEnabled) {
      (void)cudaGetLastError();  // already enabled is fine; clear the error it recorded
    } else {
      CUDA_OK(e);
    }
  }
  CUDA_OK(cudaMalloc(&a, n));
  fill(static_cast<__nv_bfloat16*>(a), n / 2, 31, 1.0f);
  CUDA_OK(cudaDeviceSynchronize());
  cudaStream_t s;
  CUDA_OK(cudaStreamCreate(&s));
  CUDA_OK(cudaMemcpyPeerAsync(b, 1, a, 0, n, s));
  CUDA_OK(cudaStreamSynchronize(s));
  check_copy(a, 0, b, 1, "peer");
  auto ms = time_events(3, plan.repeats, s, [&](int) {
    CUDA_OK(cudaMemcpyPeerAsync(b, 1, a, 0, n, s));
  });
  std::printf("{\"peer\": {\"bytes\": %zu, \"p2p\": %d, \"samples\": ", n, can);
  print_samples(ms);
  std::printf("}}\n");
  CUDA_OK(cudaStreamDestroy(s));
  CUDA_OK(cudaFree(a));
  CUDA_OK(cudaSetDevice(1));
  CUDA_OK(cudaFree(b));
  CUDA_OK(cudaSetDevice(0));
}

Plan read_plan(std::istream& in) {
  Plan p;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string key;
    ls >> key;
    if (key == "repeats") ls >> p.repeats;
    else if (key == "warmup") ls >> p.warmup;
    else if (key == "copy_bytes") ls >> p.copy_bytes;
    else if (key == "host_copy_bytes") ls >> p.host_copy_bytes;
    else if (key == "case") {
      Case c;
      ls >> c.id >> c.hidden >> c.width >> c.matrices >> c.dtype >> c.experts;
      if (!ls || c.experts < 1 || c.hidden < 1 || c.width < 1 || c.experts > (1 << 20)) {
        std::fprintf(stderr, "moebench: bad plan line: %s\n", line.c_str());
        std::exit(2);
      }
      c.counts.resize(c.experts);
      for (auto& n : c.counts) ls >> n;
      bool counts_ok = std::all_of(c.counts.begin(), c.counts.end(), [](int n) { return n >= 0; }) &&
                       std::any_of(c.counts.begin(), c.counts.end(), [](int n) { return n > 0; });
      if (!ls || !counts_ok || (c.dtype != "bf16" && c.dtype != "fp8")) {
        std::fprintf(stderr, "moebench: bad plan line: %s\n", line.c_str());
        std::exit(2);
      }
      p.cases.push_back(c);
    } else if (key == "gemm") {
      Case c;
      ls >> c.id >> c.experts >> c.width >> c.hidden >> c.dtype;  // M N K: counts, up, hidden
      if (!ls || c.experts < 1 || c.width < 1 || c.hidden < 1 || (c.dtype != "bf16" && c.dtype != "fp8")) {
        std::fprintf(stderr, "moebench: bad plan line: %s\n", line.c_str());
        std::exit(2);
      }
      c.counts = {c.experts};
      c.experts = 1;
      c.matrices = 2;  // the up GEMM is then [width x hidden] = [N x K]
      c.gemm_only = true;
      p.gemms.push_back(c);
    } else if (key == "run") break;
    else if (!key.empty()) {
      std::fprintf(stderr, "moebench: unknown plan directive: %s\n", key.c_str());
      std::exit(2);
    }
  }
  return p;
}

}  // namespace

int main() {
  Plan plan = read_plan(std::cin);
  cudaDeviceProp prop{};
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  int runtime = 0, driver = 0;
  CUDA_OK(cudaRuntimeGetVersion(&runtime));
  CUDA_OK(cudaDriverGetVersion(&driver));
  std::printf("{\"device\": \"%s\", \"capability\": [%d, %d], \"sm_count\": %d, \"memory_bytes\": %zu, "
              "\"l2_bytes\": %d, \"cuda_runtime\": %d, \"cuda_driver\": %d, \"cublas\": %d}\n",
              prop.name, prop.major, prop.minor, prop.multiProcessorCount, prop.totalGlobalMem,
              prop.l2CacheSize, runtime, driver, int(cublasLtGetVersion()));
  std::fflush(stdout);
  cublasLtHandle_t lt;
  BLAS_OK(cublasLtCreate(&lt));
  size_t ws_bytes = size_t(32) << 20;
  void* ws;
  CUDA_OK(cudaMalloc(&ws, ws_bytes));
  cudaStream_t s;
  CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  for (const Case& c : plan.cases) run_case(lt, c, plan, ws, ws_bytes, s);
  for (const Case& c : plan.gemms) run_case(lt, c, plan, ws, ws_bytes, s);
  run_memory(plan, s);
  run_host_link(plan, s, lt, ws, ws_bytes);
  run_launch(s);
  run_peer(plan);
  CUDA_OK(cudaFree(ws));
  CUDA_OK(cudaStreamDestroy(s));
  BLAS_OK(cublasLtDestroy(lt));
  return 0;
}
