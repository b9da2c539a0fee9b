// Fused kernels for XLA:CPU, as XLA FFI custom calls: scaled dot-product attention, GroupNorm (with an
// optional SiLU) and GEGLU, each forward and backward. Built at first use by layerdiff_jax/models/cpu_kernels.py
// (g++ -O3 -march=native -ffast-math, which lets the exponentials vectorise through glibc's libmvec). Work is
// split on XLA's intra-op thread pool.
//
// Attention. XLA:CPU has no fused attention: it materialises the (B, N, T, S) logits and runs the softmax and
// both matrix products as separate passes over them, forward and again backward. Here each (batch, head) pair
// keeps its keys and values (transposed to (H, S), so every inner loop runs over keys and vectorises) in cache
// and streams the queries through them: logits, softmax and output for one query row at a time, flash-attention
// style, never writing the logits out. The backward recomputes each row's probabilities from the saved
// log-sum-exp instead of storing them.
//
// Tensors are float32, (B, T, N, H) for queries and outputs and (B, S, N, H) for keys and values, the layout
// the projections produce, so no transposes are needed around the call. key_valid (B, S) masks keys: a masked
// logit is float32's lowest value, as in the XLA path, so a row with every key masked averages the values there
// too. Work is split over (batch, head) pairs.

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// The handlers' bindings are read from their signatures (XLA_FFI_DEFINE_HANDLER_SYMBOL without one), and a
// ThreadPool parameter binds to the context's intra-op pool: ffi.h decodes one but does not declare the binding.
template <>
struct xla::ffi::CtxBinding<ffi::ThreadPool> {
  using Ctx = ffi::ThreadPool;
};

namespace {

using F32 = ffi::Buffer<ffi::F32>;
using F32Result = ffi::ResultBuffer<ffi::F32>;

// The attributes' names, as cpu_kernels.py passes them.
constexpr char kScaleName[] = "scale", kGroupsName[] = "groups", kEpsilonName[] = "epsilon", kSiluName[] = "silu";

// Runs fn(begin, end) over [0, n) in chunks on the pool and the calling thread; returns when all are done.
// Helpers that start after the last chunk is claimed do nothing, so a busy pool cannot deadlock the caller.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, Fn fn) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = std::max<int64_t>(1, n / (threads * 8));
  const int64_t chunks = (n + chunk - 1) / chunk;
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, chunk, chunks, fn]() {
    for (int64_t c; (c = state->next.fetch_add(1)) < chunks;) {
      fn(c * chunk, std::min(n, (c + 1) * chunk));
      if (state->done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (int64_t i = 1; i < std::min(threads, chunks); ++i) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == chunks; });
}

// One vector register of floats: 16 with AVX-512, else 8 (AVX2's ymm). A wider vector type is split into several
// registers, and a block of kBlock accumulators then no longer fits in the register file and spills to the stack.
#ifdef __AVX512F__
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
constexpr int64_t kBlock = 8;  // queries per pass over the keys: each key vector loaded serves eight rows

inline Vec Load(const float* p) {
  Vec v;
  __builtin_memcpy(&v, p, sizeof(Vec));
  return v;
}
inline void Store(float* p, Vec v) { __builtin_memcpy(p, &v, sizeof(Vec)); }
inline float Sum(Vec v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

struct Dims {
  int64_t batch, q_len, kv_len, heads, head_dim;
  int64_t padded;  // kv_len rounded up to whole vectors; padded keys are masked
  int64_t row() const { return heads * head_dim; }
};

ffi::Error CheckDims(const Dims& d, ffi::Span<const int64_t> q, ffi::Span<const int64_t> k,
                     ffi::Span<const int64_t> v, ffi::Span<const int64_t> valid) {
  if (q.size() != 4 || k.size() != 4 || v.size() != 4 || valid.size() != 2)
    return ffi::Error::InvalidArgument("cpu attention: q, k, v must be (B, T, N, H) and key_valid (B, S)");
  for (int i : {0, 2, 3})
    if (k[i] != q[i] || v[i] != q[i])
      return ffi::Error::InvalidArgument("cpu attention: q, k, v disagree on batch, heads or head dim");
  if (v[1] != k[1] || valid[0] != d.batch || valid[1] != d.kv_len)
    return ffi::Error::InvalidArgument("cpu attention: k, v and key_valid disagree on the key length");
  return ffi::Error::Success();
}

Dims MakeDims(ffi::Span<const int64_t> q, ffi::Span<const int64_t> k) {
  return Dims{q[0], q[1], k[1], q[2], q[3], (k[1] + kLanes - 1) / kLanes * kLanes};
}

// One (batch, head) pair's keys and values, transposed to (H, padded) with zeros past the last key, and the
// additive mask: 0 for a key that may be attended to, float32's lowest value otherwise. With every key masked,
// XLA's softmax over equal logits is uniform: `uniform` says so, and the queries are then taken as zero.
struct KeysValues {
  std::vector<float> kt, vt, bias, open;  // open: 1 where gradients reach the logits, else 0
  bool uniform = false;

  explicit KeysValues(const Dims& d)
      : kt(d.head_dim * d.padded), vt(d.head_dim * d.padded), bias(d.padded), open(d.padded) {}

  void Gather(const F32& k, const F32& v, const ffi::Buffer<ffi::PRED>& key_valid, const Dims& d, int64_t b,
              int64_t n) {
    const int64_t row = d.row(), S = d.kv_len, P = d.padded;
    const float* kb = k.typed_data() + b * S * row + n * d.head_dim;
    const float* vb = v.typed_data() + b * S * row + n * d.head_dim;
    std::fill(kt.begin(), kt.end(), 0.0f);
    std::fill(vt.begin(), vt.end(), 0.0f);
    for (int64_t s = 0; s < S; ++s)
      for (int64_t h = 0; h < d.head_dim; ++h) {
        kt[h * P + s] = kb[s * row + h];
        vt[h * P + s] = vb[s * row + h];
      }
    const bool* mask = key_valid.typed_data() + b * S;
    uniform = std::none_of(mask, mask + S, [](bool x) { return x; });
    for (int64_t s = 0; s < P; ++s) {
      const bool real = s < S, attend = real && (uniform || mask[s]);
      bias[s] = attend ? 0.0f : -FLT_MAX;
      open[s] = real && mask[s] ? 1.0f : 0.0f;
    }
  }
};

// rows[i][s] = x_i . kt[:, s] + bias[s] for Q query rows x (each head_dim long, already scaled).
template <int Q>
void RowsTimesColumns(const float* const* x, const float* kt, const float* bias, const Dims& d, float* rows) {
  const int64_t P = d.padded;
  for (int64_t s = 0; s < P; s += kLanes) {
    Vec acc[Q];
    for (int i = 0; i < Q; ++i) acc[i] = Load(bias + s);
    for (int64_t h = 0; h < d.head_dim; ++h) {
      const Vec k = Load(kt + h * P + s);
      for (int i = 0; i < Q; ++i) acc[i] += x[i][h] * k;
    }
    for (int i = 0; i < Q; ++i) Store(rows + i * P + s, acc[i]);
  }
}

// out[i][h] = sum_s rows[i][s] * vt[h][s], times factor[i].
template <int Q>
void RowsTimesValues(const float* rows, const float* vt, const float* factor, const Dims& d, float* const* out) {
  const int64_t P = d.padded;
  for (int64_t h = 0; h < d.head_dim; ++h) {
    Vec acc[Q] = {};
    for (int64_t s = 0; s < P; s += kLanes) {
      const Vec v = Load(vt + h * P + s);
      for (int i = 0; i < Q; ++i) acc[i] += Load(rows + i * P + s) * v;
    }
    for (int i = 0; i < Q; ++i) out[i][h] = Sum(acc[i]) * factor[i];
  }
}

// Calls fn(rows, t) over the query rows t of a (batch, head) pair, in blocks of rows = kBlock, then rows = 1 for
// the rows left (rows is a std::integral_constant: decltype(rows)::value is the block's template argument).
template <typename Fn>
void ForQueryBlocks(const Dims& d, Fn fn) {
  int64_t t = 0;
  for (; t + kBlock <= d.q_len; t += kBlock) fn(std::integral_constant<int, kBlock>(), t);
  for (; t < d.q_len; ++t) fn(std::integral_constant<int, 1>(), t);
}

// A block of Q query rows (Q = kBlock, or 1 for the last rows), forward: out and log-sum-exp.
template <int Q>
void ForwardBlock(const float* Q_, const KeysValues& kv, const Dims& d, float scale, int64_t b, int64_t n, int64_t t0,
                  float* scratch, float* O, float* L) {
  const int64_t H = d.head_dim, P = d.padded;
  float* rows = scratch;                 // Q x P
  float* queries = scratch + Q * P;      // Q x H, scaled
  const float* x[Q];
  float* out[Q];
  float inv[Q];
  for (int i = 0; i < Q; ++i) {
    const int64_t offset = (b * d.q_len + t0 + i) * d.row() + n * H;
    for (int64_t h = 0; h < H; ++h) queries[i * H + h] = kv.uniform ? 0.0f : Q_[offset + h] * scale;
    x[i] = queries + i * H;
    out[i] = O + offset;
  }
  RowsTimesColumns<Q>(x, kv.kt.data(), kv.bias.data(), d, rows);
  for (int i = 0; i < Q; ++i) {
    float* r = rows + i * P;
    float m = -FLT_MAX;
    for (int64_t s = 0; s < P; ++s) m = std::max(m, r[s]);
    float sum = 0.0f;
    for (int64_t s = 0; s < P; ++s) {
      r[s] = std::exp(r[s] - m);
      sum += r[s];
    }
    inv[i] = 1.0f / sum;
    L[(b * d.heads + n) * d.q_len + t0 + i] = m + std::log(sum);
  }
  RowsTimesValues<Q>(rows, kv.vt.data(), inv, d, out);
}

// A block of Q query rows, backward: dq for the rows, and their share of dk and dv (accumulated transposed).
template <int Q>
void BackwardBlock(const float* Q_, const float* O, const float* L, const float* dO, const KeysValues& kv,
                   const Dims& d, float scale, int64_t b, int64_t n, int64_t t0, float* scratch, float* dQ,
                   float* dkt, float* dvt) {
  const int64_t H = d.head_dim, P = d.padded;
  float* p = scratch;                    // Q x P probabilities
  float* ds = scratch + Q * P;           // Q x P logit gradients
  float* queries = scratch + 2 * Q * P;  // Q x H, scaled
  const float* x[Q];
  const float* g[Q];
  float* dq[Q];
  float lse[Q], delta[Q], factor[Q];
  for (int i = 0; i < Q; ++i) {
    const int64_t offset = (b * d.q_len + t0 + i) * d.row() + n * H;
    for (int64_t h = 0; h < H; ++h) queries[i * H + h] = kv.uniform ? 0.0f : Q_[offset + h] * scale;
    x[i] = queries + i * H;
    g[i] = dO + offset;
    dq[i] = dQ + offset;
    lse[i] = L[(b * d.heads + n) * d.q_len + t0 + i];
    delta[i] = 0.0f;
    for (int64_t h = 0; h < H; ++h) delta[i] += g[i][h] * O[offset + h];
    factor[i] = scale;
  }
  RowsTimesColumns<Q>(x, kv.kt.data(), kv.bias.data(), d, p);
  RowsTimesColumns<Q>(g, kv.vt.data(), kv.bias.data(), d, ds);  // dO . v_s (bias: finite, zeroed below)
  for (int i = 0; i < Q; ++i) {
    float* pi = p + i * P;
    float* dsi = ds + i * P;
    for (int64_t s = 0; s < P; ++s) {
      pi[s] = std::exp(pi[s] - lse[i]);
      dsi[s] = kv.open[s] * pi[s] * (dsi[s] - delta[i]);  // the softmax's backward; masked keys pass nothing on
    }
  }
  RowsTimesValues<Q>(ds, kv.kt.data(), factor, d, dq);
  for (int64_t s = 0; s < P; s += kLanes) {
    Vec dsv[Q], pv[Q];
    for (int i = 0; i < Q; ++i) {
      dsv[i] = Load(ds + i * P + s);
      pv[i] = Load(p + i * P + s);
    }
    for (int64_t h = 0; h < H; ++h) {
      Vec dk = Load(dkt + h * P + s), dv = Load(dvt + h * P + s);
      for (int i = 0; i < Q; ++i) {
        dk += x[i][h] * dsv[i];
        dv += g[i][h] * pv[i];
      }
      Store(dkt + h * P + s, dk);
      Store(dvt + h * P + s, dv);
    }
  }
}

ffi::Error AttentionForward(ffi::ThreadPool pool, F32 q, F32 k, F32 v, ffi::Buffer<ffi::PRED> key_valid,
                            ffi::Attr<float, kScaleName> scale_attr, F32Result out, F32Result lse) {
  const Dims d = MakeDims(q.dimensions(), k.dimensions());
  if (auto e = CheckDims(d, q.dimensions(), k.dimensions(), v.dimensions(), key_valid.dimensions()); e.failure())
    return e;
  const float scale = *scale_attr;
  const float* Q = q.typed_data();
  float* O = out->typed_data();
  float* L = lse->typed_data();

  ParallelFor(pool, d.batch * d.heads, [&](int64_t begin, int64_t end) {
    KeysValues kv(d);
    std::vector<float> scratch(kBlock * (d.padded + d.head_dim));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / d.heads, n = item % d.heads;
      kv.Gather(k, v, key_valid, d, b, n);
      ForQueryBlocks(d, [&](auto rows, int64_t t) {
        ForwardBlock<decltype(rows)::value>(Q, kv, d, scale, b, n, t, scratch.data(), O, L);
      });
    }
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, F32 q, F32 k, F32 v, ffi::Buffer<ffi::PRED> key_valid, F32 out,
                             F32 lse, F32 dout, ffi::Attr<float, kScaleName> scale_attr, F32Result dq, F32Result dk,
                             F32Result dv) {
  const Dims d = MakeDims(q.dimensions(), k.dimensions());
  if (auto e = CheckDims(d, q.dimensions(), k.dimensions(), v.dimensions(), key_valid.dimensions()); e.failure())
    return e;
  const float scale = *scale_attr;
  const float* Q = q.typed_data();
  const float* O = out.typed_data();
  const float* L = lse.typed_data();
  const float* dO = dout.typed_data();
  float* dQ = dq->typed_data();
  float* dK = dk->typed_data();
  float* dV = dv->typed_data();
  const int64_t S = d.kv_len, H = d.head_dim, P = d.padded, row = d.row();

  ParallelFor(pool, d.batch * d.heads, [&](int64_t begin, int64_t end) {
    KeysValues kv(d);
    std::vector<float> dkt(H * P), dvt(H * P), scratch(kBlock * (2 * P + H));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / d.heads, n = item % d.heads;
      kv.Gather(k, v, key_valid, d, b, n);
      std::fill(dkt.begin(), dkt.end(), 0.0f);
      std::fill(dvt.begin(), dvt.end(), 0.0f);
      ForQueryBlocks(d, [&](auto rows, int64_t t) {
        BackwardBlock<decltype(rows)::value>(Q, O, L, dO, kv, d, scale, b, n, t, scratch.data(), dQ, dkt.data(),
                                             dvt.data());
      });
      // dk was accumulated against the scaled queries: it is already d(loss)/dk.
      float* dk_base = dK + b * S * row + n * H;
      float* dv_base = dV + b * S * row + n * H;
      for (int64_t s = 0; s < S; ++s)
        for (int64_t h = 0; h < H; ++h) {
          dk_base[s * row + h] = dkt[h * P + s];
          dv_base[s * row + h] = dvt[h * P + s];
        }
    }
  });
  return ffi::Error::Success();
}


// ---------------------------------------------------------------------------------------------------------
// GroupNorm, optionally followed by SiLU, on (B, L, C) float32 (an NHWC image with its pixels flattened).
//
// XLA:CPU reduces over a group's pixels and channels as a reduction over a non-minor axis of a reshaped
// (B, L, G, C/G) array, which it runs far slower than a loop over channels; and it writes the normalised
// tensor out before the SiLU reads it back, forward and again backward. Here every pass streams the rows of
// an image with the channels innermost (so each loop vectorises over channels), keeps per-channel sums, and
// folds them into group statistics afterwards. Statistics are two-pass, E[(x - mean)^2] as torch computes them.
// Work is split over (image, chunk of rows), so a batch of one still uses every thread.

struct NormDims {
  int64_t batch, length, channels, groups, chunks;
  int64_t per_group() const { return channels / groups; }
  int64_t chunk_rows() const { return (length + chunks - 1) / chunks; }
  double count() const { return static_cast<double>(length * per_group()); }
};

// x's dimensions, once x, scale and bias are checked against each other and the group count.
ffi::ErrorOr<NormDims> CheckedNormDims(ffi::ThreadPool& pool, const F32& x, const F32& gamma, const F32& beta,
                                       int64_t groups) {
  const auto fail = [](const char* what) { return ffi::Unexpected(ffi::Error::InvalidArgument(what)); };
  const ffi::Span<const int64_t> dims = x.dimensions();
  if (dims.size() != 3 || gamma.dimensions().size() != 1 || beta.dimensions().size() != 1)
    return fail("cpu group norm: x must be (B, L, C), scale and bias (C,)");
  if (gamma.dimensions()[0] != dims[2] || beta.dimensions()[0] != dims[2])
    return fail("cpu group norm: scale and bias must have x's channel count");
  if (groups <= 0 || dims[2] % groups != 0)
    return fail("cpu group norm: the channel count must be a multiple of the group count");
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t images = std::max<int64_t>(1, dims[0]);
  const int64_t chunks = std::min<int64_t>(dims[1], (4 * threads + images - 1) / images);
  return NormDims{dims[0], dims[1], dims[2], groups, std::max<int64_t>(1, chunks)};
}

// Calls fn(b, first_row, end_row) for every (image, chunk of rows) in parallel.
template <typename Fn>
void ForRows(ffi::ThreadPool& pool, const NormDims& d, Fn fn) {
  ParallelFor(pool, d.batch * d.chunks, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / d.chunks, first = (task % d.chunks) * d.chunk_rows();
      fn(b, first, std::min(d.length, first + d.chunk_rows()));
    }
  });
}

// Calls fn(b, first_row, end_row, sums) for every (image, chunk of rows) in parallel, sums being `width`
// zeroed floats of that task's own, and returns those sums added over each image's chunks: (B, width).
template <typename Fn>
std::vector<double> SumRows(ffi::ThreadPool& pool, const NormDims& d, int64_t width, Fn fn) {
  std::vector<float> partial(d.batch * d.chunks * width, 0.0f);
  ForRows(pool, d, [&](int64_t b, int64_t first, int64_t end) {
    const int64_t task = b * d.chunks + first / d.chunk_rows();
    fn(b, first, end, partial.data() + task * width);
  });
  std::vector<double> total(d.batch * width, 0.0);
  for (int64_t task = 0; task < d.batch * d.chunks; ++task)
    for (int64_t i = 0; i < width; ++i) total[task / d.chunks * width + i] += partial[task * width + i];
  return total;
}

// Per-channel sums (B, C) -> per-group sums (B, G).
std::vector<double> GroupSums(const NormDims& d, const std::vector<double>& sums, int64_t stride, int64_t offset,
                              const float* weight) {
  std::vector<double> out(d.batch * d.groups, 0.0);
  for (int64_t b = 0; b < d.batch; ++b)
    for (int64_t c = 0; c < d.channels; ++c)
      out[b * d.groups + c / d.per_group()] += sums[b * stride + offset + c] * (weight ? weight[c] : 1.0f);
  return out;
}

// A group statistic spread over the group's channels: (B, G) -> (B, C).
std::vector<float> PerChannel(const NormDims& d, const float* per_group) {
  std::vector<float> out(d.batch * d.channels);
  for (int64_t b = 0; b < d.batch; ++b)
    for (int64_t c = 0; c < d.channels; ++c) out[b * d.channels + c] = per_group[b * d.groups + c / d.per_group()];
  return out;
}

inline float Sigmoid(float z) { return 1.0f / (1.0f + std::exp(-z)); }

// The loops over one row's channels are functions of their own with restrict pointers and the SiLU as a
// template argument: as lambdas over captured pointers, or with a branch inside, they do not vectorise.

inline void AddRow(int64_t C, const float* __restrict x, float* __restrict sum) {
  for (int64_t c = 0; c < C; ++c) sum[c] += x[c];
}

inline void AddSquaredDeviationRow(int64_t C, const float* __restrict x, const float* __restrict m,
                                   float* __restrict sum) {
  for (int64_t c = 0; c < C; ++c) sum[c] += (x[c] - m[c]) * (x[c] - m[c]);
}

template <bool kSilu>
inline void NormalizeRow(int64_t C, const float* __restrict x, const float* __restrict m, const float* __restrict r,
                         const float* __restrict w, const float* __restrict bias, float* __restrict y) {
  for (int64_t c = 0; c < C; ++c) {
    const float z = (x[c] - m[c]) * r[c] * w[c] + bias[c];
    y[c] = kSilu ? z * Sigmoid(z) : z;
  }
}

// dz, the gradient reaching the normalised value, and its running sums with and without the normalised input.
template <bool kSilu>
inline void GradientRow(int64_t C, const float* __restrict x, const float* __restrict dy, const float* __restrict m,
                        const float* __restrict r, const float* __restrict w, const float* __restrict bias,
                        float* __restrict dz, float* __restrict sum_dz, float* __restrict sum_dz_xhat) {
  for (int64_t c = 0; c < C; ++c) {
    const float xhat = (x[c] - m[c]) * r[c];
    float g = dy[c];
    if (kSilu) {
      const float z = xhat * w[c] + bias[c], s = Sigmoid(z);
      g *= s * (1.0f + z * (1.0f - s));
    }
    dz[c] = g;
    sum_dz[c] += g;
    sum_dz_xhat[c] += g * xhat;
  }
}

// dx = r w dz + slope (x - m) + offset, in place over dz.
inline void InputGradientRow(int64_t C, const float* __restrict x, const float* __restrict m,
                             const float* __restrict r, const float* __restrict w, const float* __restrict slope,
                             const float* __restrict offset, float* __restrict dz) {
  for (int64_t c = 0; c < C; ++c) dz[c] = r[c] * w[c] * dz[c] + slope[c] * (x[c] - m[c]) + offset[c];
}

template <bool kSilu>
void GroupNormForwardPasses(ffi::ThreadPool& pool, const NormDims& d, const float* X, const float* W,
                            const float* Bias, float epsilon, float* Y, float* M, float* R) {
  const int64_t C = d.channels;
  const auto sums = SumRows(pool, d, C, [&](int64_t b, int64_t first, int64_t end, float* acc) {
    for (int64_t l = first; l < end; ++l) AddRow(C, X + (b * d.length + l) * C, acc);
  });
  const auto group_sums = GroupSums(d, sums, C, 0, nullptr);
  for (int64_t i = 0; i < d.batch * d.groups; ++i) M[i] = static_cast<float>(group_sums[i] / d.count());
  const std::vector<float> mean_c = PerChannel(d, M);

  const auto squares = SumRows(pool, d, C, [&](int64_t b, int64_t first, int64_t end, float* acc) {
    for (int64_t l = first; l < end; ++l) AddSquaredDeviationRow(C, X + (b * d.length + l) * C, &mean_c[b * C], acc);
  });
  const auto group_squares = GroupSums(d, squares, C, 0, nullptr);
  for (int64_t i = 0; i < d.batch * d.groups; ++i)
    R[i] = static_cast<float>(1.0 / std::sqrt(group_squares[i] / d.count() + epsilon));
  const std::vector<float> rstd_c = PerChannel(d, R);

  ForRows(pool, d, [&](int64_t b, int64_t first, int64_t end) {
    for (int64_t l = first; l < end; ++l) {
      const int64_t offset = (b * d.length + l) * C;
      NormalizeRow<kSilu>(C, X + offset, &mean_c[b * C], &rstd_c[b * C], W, Bias, Y + offset);
    }
  });
}

ffi::Error GroupNormForward(ffi::ThreadPool pool, F32 x, F32 gamma, F32 beta, ffi::Attr<int64_t, kGroupsName> groups,
                            ffi::Attr<float, kEpsilonName> epsilon, ffi::Attr<bool, kSiluName> silu, F32Result y,
                            F32Result mean, F32Result rstd) {
  ffi::ErrorOr<NormDims> d = CheckedNormDims(pool, x, gamma, beta, *groups);
  if (d.has_error()) return std::move(d).error();
  (*silu ? GroupNormForwardPasses<true> : GroupNormForwardPasses<false>)(
      pool, *d, x.typed_data(), gamma.typed_data(), beta.typed_data(), *epsilon, y->typed_data(), mean->typed_data(),
      rstd->typed_data());
  return ffi::Error::Success();
}

// dx, and the scale and bias gradients per image, (B, C): the caller sums those over the batch, so that a
// batch-sharded call needs nothing from other devices.
template <bool kSilu>
void GroupNormBackwardPasses(ffi::ThreadPool& pool, const NormDims& d, const float* X, const float* W,
                             const float* Bias, const float* M, const float* R, const float* dY, float* dX,
                             float* dW, float* dBias) {
  const int64_t C = d.channels;
  const std::vector<float> mean_c = PerChannel(d, M), rstd_c = PerChannel(d, R);

  // Pass 1: dz (parked in dx) and its per-channel sums, which are the bias and scale gradients.
  const auto sums = SumRows(pool, d, 2 * C, [&](int64_t b, int64_t first, int64_t end, float* acc) {
    for (int64_t l = first; l < end; ++l) {
      const int64_t offset = (b * d.length + l) * C;
      GradientRow<kSilu>(C, X + offset, dY + offset, &mean_c[b * C], &rstd_c[b * C], W, Bias, dX + offset, acc,
                         acc + C);
    }
  });
  for (int64_t i = 0; i < d.batch * C; ++i) {
    dBias[i] = static_cast<float>(sums[i / C * 2 * C + i % C]);
    dW[i] = static_cast<float>(sums[i / C * 2 * C + C + i % C]);
  }

  // Pass 2: dx = rstd (w dz - mean over the group of w dz - xhat mean over the group of w dz xhat).
  const auto sum_wdz = GroupSums(d, sums, 2 * C, 0, W);
  const auto sum_wdz_xhat = GroupSums(d, sums, 2 * C, C, W);
  std::vector<float> offset_g(d.batch * d.groups), slope_g(d.batch * d.groups);
  for (int64_t i = 0; i < d.batch * d.groups; ++i) {
    const double r = R[i];
    offset_g[i] = static_cast<float>(-r * sum_wdz[i] / d.count());
    slope_g[i] = static_cast<float>(-r * r * sum_wdz_xhat[i] / d.count());
  }
  const std::vector<float> offset_c = PerChannel(d, offset_g.data()), slope_c = PerChannel(d, slope_g.data());
  ForRows(pool, d, [&](int64_t b, int64_t first, int64_t end) {
    for (int64_t l = first; l < end; ++l) {
      const int64_t offset = (b * d.length + l) * C;
      InputGradientRow(C, X + offset, &mean_c[b * C], &rstd_c[b * C], W, &slope_c[b * C], &offset_c[b * C],
                       dX + offset);
    }
  });
}

ffi::Error GroupNormBackward(ffi::ThreadPool pool, F32 x, F32 gamma, F32 beta, F32 mean, F32 rstd, F32 dy,
                             ffi::Attr<int64_t, kGroupsName> groups, ffi::Attr<bool, kSiluName> silu, F32Result dx,
                             F32Result dgamma, F32Result dbeta) {
  ffi::ErrorOr<NormDims> d = CheckedNormDims(pool, x, gamma, beta, *groups);
  if (d.has_error()) return std::move(d).error();
  (*silu ? GroupNormBackwardPasses<true> : GroupNormBackwardPasses<false>)(
      pool, *d, x.typed_data(), gamma.typed_data(), beta.typed_data(), mean.typed_data(), rstd.typed_data(),
      dy.typed_data(), dx->typed_data(), dgamma->typed_data(), dbeta->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------------------
// GEGLU: value * gelu(gate) (exact gelu, with erf) on a (B, T, 2F) projection whose first half is the value and
// second the gate. XLA:CPU expands erf into a rational polynomial with range selects that it splits over
// several fusions, each a pass over the tensor, forward and again backward; here it is one pass each way.

constexpr float kSqrtHalf = 0.70710678118654752f, kInvSqrt2Pi = 0.39894228040143268f;

inline void GegluRow(int64_t F, const float* __restrict h, float* __restrict out) {
  for (int64_t f = 0; f < F; ++f) {
    const float gate = h[F + f];
    out[f] = h[f] * 0.5f * gate * (1.0f + std::erf(gate * kSqrtHalf));
  }
}

inline void GegluGradientRow(int64_t F, const float* __restrict h, const float* __restrict dout,
                             float* __restrict dh) {
  for (int64_t f = 0; f < F; ++f) {
    const float value = h[f], gate = h[F + f];
    const float cdf = 0.5f * (1.0f + std::erf(gate * kSqrtHalf));
    const float pdf = kInvSqrt2Pi * std::exp(-0.5f * gate * gate);
    dh[f] = dout[f] * gate * cdf;
    dh[F + f] = dout[f] * value * (cdf + gate * pdf);
  }
}

ffi::Error CheckGeglu(ffi::Span<const int64_t> h) {
  if (h.size() != 3 || h[2] % 2 != 0)
    return ffi::Error::InvalidArgument("cpu geglu: the projection must be (B, T, 2F)");
  return ffi::Error::Success();
}

ffi::Error GegluForward(ffi::ThreadPool pool, F32 h, F32Result out) {
  if (ffi::Error error = CheckGeglu(h.dimensions()); error.failure()) return error;
  const int64_t rows = h.dimensions()[0] * h.dimensions()[1], F = h.dimensions()[2] / 2;
  const float* H = h.typed_data();
  float* O = out->typed_data();
  ParallelFor(pool, rows, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) GegluRow(F, H + n * 2 * F, O + n * F);
  });
  return ffi::Error::Success();
}

ffi::Error GegluBackward(ffi::ThreadPool pool, F32 h, F32 dout, F32Result dh) {
  if (ffi::Error error = CheckGeglu(h.dimensions()); error.failure()) return error;
  const int64_t rows = h.dimensions()[0] * h.dimensions()[1], F = h.dimensions()[2] / 2;
  const float* H = h.typed_data();
  const float* dO = dout.typed_data();
  float* dH = dh->typed_data();
  ParallelFor(pool, rows, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) GegluGradientRow(F, H + n * 2 * F, dO + n * F, dH + n * 2 * F);
  });
  return ffi::Error::Success();
}

}  // namespace

// Each handler's binding (its arguments, attributes and results, in order) is read from its implementation's
// signature.
XLA_FFI_DEFINE_HANDLER_SYMBOL(LayerdiffCpuAttentionForward, AttentionForward);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LayerdiffCpuAttentionBackward, AttentionBackward);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LayerdiffCpuGroupNormForward, GroupNormForward);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LayerdiffCpuGroupNormBackward, GroupNormBackward);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LayerdiffCpuGegluForward, GegluForward);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LayerdiffCpuGegluBackward, GegluBackward);
