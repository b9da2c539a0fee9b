// Fused scaled dot-product attention for XLA:CPU, forward and backward, as XLA FFI custom calls.
//
// XLA:CPU has no fused attention: it materialises the (B, N, T, S) logits and runs the softmax and both
// matrix products as separate passes over them, forward and again backward. Here each (batch, head) pair keeps
// its keys and values (transposed to (H, S), so every inner loop runs over keys and vectorises) in cache and
// streams the queries through them: logits, softmax and output for one query row at a time, flash-attention
// style, never writing the logits out. The backward recomputes each row's probabilities from the saved
// log-sum-exp instead of storing them.
//
// Tensors are float32, (B, T, N, H) for queries and outputs and (B, S, N, H) for keys and values, the layout
// the projections produce, so no transposes are needed around the call. key_valid (B, S) masks keys: a masked
// logit is float32's lowest value, as in the XLA path, so a row with every key masked averages the values there
// too. Work is split over (batch, head) pairs on XLA's intra-op thread pool.
//
// Built at first use by layerdiff_jax/models/cpu_attention.py (g++ -O3 -march=native -ffast-math, which lets
// the exponentials vectorise through glibc's libmvec).

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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

constexpr int64_t kLanes = 16;
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

  void Gather(const float* K, const float* V, const bool* valid, const Dims& d, int64_t b, int64_t n) {
    const int64_t row = d.row(), S = d.kv_len, P = d.padded;
    const float* kb = K + b * S * row + n * d.head_dim;
    const float* vb = V + b * S * row + n * d.head_dim;
    std::fill(kt.begin(), kt.end(), 0.0f);
    std::fill(vt.begin(), vt.end(), 0.0f);
    for (int64_t s = 0; s < S; ++s)
      for (int64_t h = 0; h < d.head_dim; ++h) {
        kt[h * P + s] = kb[s * row + h];
        vt[h * P + s] = vb[s * row + h];
      }
    const bool* mask = valid + b * S;
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

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> key_valid, float scale,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  const Dims d = MakeDims(q.dimensions(), k.dimensions());
  if (auto e = CheckDims(d, q.dimensions(), k.dimensions(), v.dimensions(), key_valid.dimensions()); e.failure())
    return e;
  const float* Q = q.typed_data();
  const float* K = k.typed_data();
  const float* V = v.typed_data();
  const bool* valid = key_valid.typed_data();
  float* O = out->typed_data();
  float* L = lse->typed_data();

  ParallelFor(pool, d.batch * d.heads, [&](int64_t begin, int64_t end) {
    KeysValues kv(d);
    std::vector<float> scratch(kBlock * (d.padded + d.head_dim));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / d.heads, n = item % d.heads;
      kv.Gather(K, V, valid, d, b, n);
      int64_t t = 0;
      for (; t + kBlock <= d.q_len; t += kBlock) ForwardBlock<kBlock>(Q, kv, d, scale, b, n, t, scratch.data(), O, L);
      for (; t < d.q_len; ++t) ForwardBlock<1>(Q, kv, d, scale, b, n, t, scratch.data(), O, L);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> key_valid, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, float scale,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  const Dims d = MakeDims(q.dimensions(), k.dimensions());
  if (auto e = CheckDims(d, q.dimensions(), k.dimensions(), v.dimensions(), key_valid.dimensions()); e.failure())
    return e;
  const float* Q = q.typed_data();
  const float* K = k.typed_data();
  const float* V = v.typed_data();
  const bool* valid = key_valid.typed_data();
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
      kv.Gather(K, V, valid, d, b, n);
      std::fill(dkt.begin(), dkt.end(), 0.0f);
      std::fill(dvt.begin(), dvt.end(), 0.0f);
      int64_t t = 0;
      for (; t + kBlock <= d.q_len; t += kBlock)
        BackwardBlock<kBlock>(Q, O, L, dO, kv, d, scale, b, n, t, scratch.data(), dQ, dkt.data(), dvt.data());
      for (; t < d.q_len; ++t)
        BackwardBlock<1>(Q, O, L, dO, kv, d, scale, b, n, t, scratch.data(), dQ, dkt.data(), dvt.data());
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

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LayerdiffCpuAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LayerdiffCpuAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
