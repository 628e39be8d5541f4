// The torch backend's CPU kernels (`flashsae.kernels.cpu_native` builds and loads them):
//   - the encoder's exact threshold select over one chunk of pre-activations, into each row's best k so far;
//   - the lazy Adam step of `flashsae.optim.SparseAdam` over the touched rows, in one pass.
// Both do in one loop what the torch ops do in tens of passes over memory.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------
// Threshold select. A row's state is its best `size` <= k candidates so far (value > 0, feature
// index), unordered. Per chunk, the values are the product pre[c] plus an offset[c] (the bias, -inf
// where a feature is kept out), and each row:
//   1. reduces its products to the maxima of GROUP-column groups (one vectorized pass over the row);
//      with the range of the group's offsets, each group gets an upper and a lower bound of its
//      largest value;
//   2. takes the chunk's own bound: a value that at least k groups' lower bounds reach, so at least k
//      entries do; an entry below it has k larger ones in this chunk and can never be chosen;
//   3. reads entry by entry only the groups whose upper bound reaches the bound and the row's floor
//      (its k-th best kept, once k are kept), appending the entries that pass to a candidate list;
//   4. keeps the best k of state + candidates (an exact selection: larger value first, then the lower
//      index, so ties go to the lower index whatever order entries arrive in).
// NaN never passes a comparison, so it never enters (it counts as -inf: a zero after the ReLU).

template <typename T>
struct Candidate {
  T value;
  int64_t index;
};

template <typename T>
inline bool better(const Candidate<T>& a, const Candidate<T>& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

// Columns per group: group j holds columns j, j + n_groups, ... (strided, so the maxima are an
// elementwise pass over contiguous memory).
constexpr int64_t GROUP = 8;
// The chunk's own bound is the k-th largest of this many times k coarse maxima: more makes it tighter
// and its selection costlier.
constexpr int64_t COARSE_PER_K = 2;
// ... and of at least this many (a vector's worth of lanes per pass, whatever k).
constexpr int64_t MIN_COARSE = 16;

// Vectors of the maxima pass (GCC/Clang vector extensions): 16 bytes everywhere (SSE on x86-64, NEON
// on arm64), 32 where the CPU has AVX2 (chosen at run time, so one build runs on any x86-64).
template <typename T, int Bytes>
struct Simd {
  typedef T type __attribute__((vector_size(Bytes)));
};

// out[j] = the largest of values[j + g * stride] over g < n_members, for j < stride; NaN ignored (-inf
// when all are).
template <typename T, int Bytes>
__attribute__((always_inline)) inline void strided_maxima_with(const T* values, int64_t n_members, int64_t stride,
                                                               T* out) {
  using V = typename Simd<T, Bytes>::type;
  constexpr int64_t lanes = Bytes / sizeof(T);
  const T lowest = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + lanes <= stride; j += lanes) {
    V acc = V{} + lowest;
    for (int64_t g = 0; g < n_members; ++g) {
      V member;
      std::memcpy(&member, values + g * stride + j, sizeof(V));
      acc = member > acc ? member : acc;
    }
    std::memcpy(out + j, &acc, sizeof(V));
  }
  for (; j < stride; ++j) {
    T acc = lowest;
    for (int64_t g = 0; g < n_members; ++g) acc = values[g * stride + j] > acc ? values[g * stride + j] : acc;
    out[j] = acc;
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
template <typename T>
__attribute__((target("avx2"))) void strided_maxima_avx2(const T* values, int64_t n_members, int64_t stride, T* out) {
  strided_maxima_with<T, 32>(values, n_members, stride, out);
}

// Read once, at the first call (not in a static initializer, which may run before the CPU is probed).
bool has_avx2() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("avx2"));
  return yes;
}
#endif

template <typename T>
void strided_maxima(const T* values, int64_t n_members, int64_t stride, T* out) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (has_avx2()) return strided_maxima_avx2(values, n_members, stride, out);
#endif
  strided_maxima_with<T, 16>(values, n_members, stride, out);
}

// A value that at least k of values [n] (n >= k, NaN-free) reach, at most their k-th largest: the
// k-th largest of at most COARSE_PER_K * k coarse maxima (coarse group c: values c, c + n_coarse, ...).
// Each of those k coarse groups has a value that reaches it. scratch: as many values as coarse maxima.
template <typename T>
T kth_lower_bound(const T* values, int64_t n, int64_t k, T* scratch) {
  const int64_t n_coarse = std::min(n, std::max(COARSE_PER_K * k, MIN_COARSE));
  strided_maxima(values, n / n_coarse, n_coarse, scratch);  // the n % n_coarse last values take no part
  std::nth_element(scratch, scratch + (k - 1), scratch + n_coarse, std::greater<T>());
  return scratch[k - 1];
}

// Keeps the best k of pending [n] (all of them when n <= k) in its first slots; returns how many.
template <typename T>
int64_t keep_best(Candidate<T>* pending, int64_t n, int64_t k) {
  if (n <= k) return n;
  std::nth_element(pending, pending + (k - 1), pending + n,
                   [](const Candidate<T>& a, const Candidate<T>& b) { return better(a, b); });
  return k;
}

// What every row of one chunk shares: the values' offset [width] and, per group, its smallest and largest
// offset.
template <typename T>
struct ChunkOffsets {
  const T* offset;
  std::vector<T> low, high;

  ChunkOffsets(const T* offset, int64_t width) : offset(offset), low(width / GROUP), high(width / GROUP) {
    const int64_t n_groups = width / GROUP;
    for (int64_t j = 0; j < n_groups; ++j) {
      T lo = offset[j], hi = offset[j];
      for (int64_t c = j + n_groups; c < GROUP * n_groups; c += n_groups) {
        lo = std::min(lo, offset[c]);
        hi = std::max(hi, offset[c]);
      }
      low[j] = lo;
      high[j] = hi;
    }
  }
};

// A thread's scratch for `scan_row`.
template <typename T>
struct RowScratch {
  std::vector<T> group_max, lower, coarse;
  std::vector<Candidate<T>> pending;

  RowScratch(int64_t width, int64_t k)
      : group_max(width / GROUP + 1), lower(width / GROUP + 1), coarse(std::max(COARSE_PER_K * k, MIN_COARSE)),
        pending(k + std::max<int64_t>(4 * k, 4 * GROUP)) {}
};

// Merges one row of a chunk, the values pre[c] + offset[c] [width] of features start + c, into the row's
// state: its best `size` <= k candidates so far in v, idx [k] (unordered).
template <typename T>
void scan_row(const T* pre, const ChunkOffsets<T>& shift, int64_t width, int64_t start, T* v, int64_t* idx,
              int64_t& size, int64_t k, RowScratch<T>& s) {
  const int64_t n_groups = width / GROUP, capacity = int64_t(s.pending.size());
  const T lowest = -std::numeric_limits<T>::infinity();
  T* top = s.group_max.data();
  strided_maxima(pre, GROUP, n_groups, top);
  T bound = lowest;
  if (n_groups >= k) {
    for (int64_t j = 0; j < n_groups; ++j) {  // a value each group reaches (NaN, from inf - inf: none)
      const T reached = top[j] + shift.low[j];
      s.lower[j] = reached == reached ? reached : lowest;
    }
    bound = kth_lower_bound(s.lower.data(), n_groups, k, s.coarse.data());
  }
  Candidate<T>* pending = s.pending.data();
  int64_t n = size;
  T floor = T(0);  // the k-th best kept: an entry below it never enters (equal ones are settled exactly)
  for (int64_t i = 0; i < n; ++i) pending[i] = {v[i], idx[i]};
  if (n == k) floor = std::min_element(v, v + k)[0];
  T threshold = std::max(bound, floor);
  const T* offset = shift.offset;
  auto make_room = [&] {
    if (n + GROUP <= capacity) return;
    n = keep_best(pending, n, k);
    threshold = std::max(threshold, pending[k - 1].value);
  };
  auto offer = [&](int64_t c) {  // appended, then kept only if it passes (no branch to mispredict)
    const T x = pre[c] + offset[c];
    pending[n] = {x, start + c};
    n += (x >= threshold) & (x > T(0));
  };
  auto read_group = [&](int64_t j) {
    make_room();
    for (int64_t c = j; c < GROUP * n_groups; c += n_groups) offer(c);
  };
  // The groups whose largest value may reach the threshold, a vector of them tested at once (most have none).
  using V = typename Simd<T, 16>::type;
  constexpr int64_t lanes = 16 / sizeof(T);
  const T* high = shift.high.data();
  int64_t j = 0;
  for (; j + lanes <= n_groups; j += lanes) {
    V t, h;
    std::memcpy(&t, top + j, sizeof(V));
    std::memcpy(&h, high + j, sizeof(V));
    const auto reach = t + h >= threshold;  // lanes of all ones where reached
    uint64_t words[2];
    std::memcpy(words, &reach, sizeof(words));
    if ((words[0] | words[1]) == 0) continue;
    for (int64_t l = 0; l < lanes; ++l)
      if (top[j + l] + high[j + l] >= threshold) read_group(j + l);
  }
  for (; j < n_groups; ++j)
    if (top[j] + high[j] >= threshold) read_group(j);
  for (int64_t c = n_groups * GROUP; c < width; ++c) {
    make_room();
    offer(c);
  }
  size = keep_best(pending, n, k);
  for (int64_t i = 0; i < size; ++i) {
    v[i] = pending[i].value;
    idx[i] = pending[i].index;
  }
}

void check_select_state(const at::Tensor& kept_vals, const at::Tensor& kept_idx, const at::Tensor& sizes) {
  TORCH_CHECK(kept_vals.dim() == 2 && kept_vals.is_contiguous(), "kept_vals must be a contiguous [B, k] tensor");
  TORCH_CHECK(kept_idx.sizes() == kept_vals.sizes() && kept_idx.scalar_type() == at::kLong && kept_idx.is_contiguous(),
              "kept_idx must be a contiguous int64 tensor shaped like kept_vals");
  TORCH_CHECK(sizes.dim() == 1 && sizes.size(0) == kept_vals.size(0) && sizes.scalar_type() == at::kLong &&
                  sizes.is_contiguous(),
              "sizes must be a contiguous int64 [B] tensor");
}

}  // namespace

// Merges one chunk of pre-activations into the rows' states (kept_vals [B, k] of pre's dtype, kept_idx
// [B, k] int64, sizes [B] int64, updated in place): the values pre [B, c] (row stride >= c, unit column
// stride) + offset[start .. start + c - 1] of features start .. start + c - 1. offset [F] of pre's dtype:
// the bias, -inf where a feature is kept out of this selection.
void select_chunk_(const at::Tensor& pre, int64_t start, const at::Tensor& offset, at::Tensor& kept_vals,
                   at::Tensor& kept_idx, at::Tensor& sizes) {
  TORCH_CHECK(pre.dim() == 2 && pre.stride(1) == 1, "pre must be a [B, c] tensor with unit column stride");
  TORCH_CHECK(pre.scalar_type() == kept_vals.scalar_type(), "pre and kept_vals must share a dtype");
  TORCH_CHECK(kept_vals.size(0) == pre.size(0), "pre and kept_vals must have the same rows");
  check_select_state(kept_vals, kept_idx, sizes);
  TORCH_CHECK(offset.dim() == 1 && offset.scalar_type() == pre.scalar_type() && offset.is_contiguous() &&
                  start >= 0 && offset.size(0) >= start + pre.size(1),
              "offset must be a contiguous [F] tensor of pre's dtype covering the chunk");
  const int64_t width = pre.size(1), k = kept_vals.size(1), row_stride = pre.stride(0);
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "select_chunk_", [&] {
    const scalar_t* pre_ptr = pre.data_ptr<scalar_t>();
    const scalar_t* offset_ptr = offset.data_ptr<scalar_t>() + start;
    scalar_t* v = kept_vals.data_ptr<scalar_t>();
    int64_t* idx = kept_idx.data_ptr<int64_t>();
    int64_t* size = sizes.data_ptr<int64_t>();
    const ChunkOffsets<scalar_t> shift(offset_ptr, width);
    at::parallel_for(0, pre.size(0), 16, [&](int64_t begin, int64_t end) {
      RowScratch<scalar_t> scratch(width, k);
      for (int64_t r = begin; r < end; ++r)
        scan_row(pre_ptr + r * row_stride, shift, width, start, v + r * k, idx + r * k, size[r], k, scratch);
    });
  });
}

// The rows' top-k from their kept candidates: (vals [B, k] sorted descending, ties to the lower index; idx [B, k]).
// A row with fewer than k kept ends in zeros at the lowest feature indices it did not choose.
std::vector<at::Tensor> select_result(const at::Tensor& kept_vals, const at::Tensor& kept_idx,
                                      const at::Tensor& sizes, int64_t n_features) {
  check_select_state(kept_vals, kept_idx, sizes);
  const int64_t n_rows = kept_vals.size(0), k = kept_vals.size(1);
  TORCH_CHECK(k <= n_features, "k must be at most n_features");
  at::Tensor vals = at::empty_like(kept_vals), idx = at::empty_like(kept_idx);
  AT_DISPATCH_FLOATING_TYPES(kept_vals.scalar_type(), "select_result", [&] {
    const scalar_t* kept_v = kept_vals.data_ptr<scalar_t>();
    const int64_t* kept_i = kept_idx.data_ptr<int64_t>();
    const int64_t* size = sizes.data_ptr<int64_t>();
    scalar_t* out_v = vals.data_ptr<scalar_t>();
    int64_t* out_i = idx.data_ptr<int64_t>();
    at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<Candidate<scalar_t>> row;
      std::vector<char> taken;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = size[r];
        row.clear();
        for (int64_t s = 0; s < n; ++s) row.push_back({kept_v[r * k + s], kept_i[r * k + s]});
        std::sort(row.begin(), row.end(), better<scalar_t>);
        for (int64_t s = 0; s < n; ++s) {
          out_v[r * k + s] = row[s].value;
          out_i[r * k + s] = row[s].index;
        }
        if (n == k) continue;
        // The k - n fillers all lie below k + n <= 2k: the lowest indices not chosen.
        const int64_t pool = std::min(n_features, 2 * k);
        taken.assign(pool, 0);
        for (int64_t s = 0; s < n; ++s)
          if (row[s].index < pool) taken[row[s].index] = 1;
        int64_t next = 0;
        for (int64_t s = n; s < k; ++s) {
          while (taken[next]) ++next;
          out_v[r * k + s] = scalar_t(0);
          out_i[r * k + s] = next++;
        }
      }
    });
  });
  return {vals, idx};
}

// ---------------------------------------------------------------------------------------------
// Lazy Adam over touched rows (`flashsae.kernels.reference.sparse_adam_step_`'s semantics), one pass
// per row: read the weights (the exact fp32 master for bf16 + low bits), the moments and the
// gradient, update in fp32, write back. Rows not touched are never read or written.

namespace {

inline float bf16_master(const at::BFloat16* high, const int16_t* low, int64_t at) {
  uint16_t high_bits;
  std::memcpy(&high_bits, high + at, 2);
  const uint32_t bits = (uint32_t(high_bits) << 16) + uint32_t(int32_t(low[at]));
  float w;
  std::memcpy(&w, &bits, 4);
  return w;
}

// w -> (bf16 rounded to nearest, ties away from zero; the int16 rest), as `split_master`.
inline void store_bf16_master(float w, at::BFloat16* high, int16_t* low, int64_t at) {
  uint32_t bits;
  std::memcpy(&bits, &w, 4);
  const int32_t rest = int32_t((bits + 0x8000u) & 0xFFFFu) - 0x8000;
  const uint16_t high_bits = uint16_t((bits - uint32_t(rest)) >> 16);
  std::memcpy(high + at, &high_bits, 2);
  low[at] = int16_t(rest);
}

struct AdamArgs {
  double lr, beta1, beta2, eps;
  bool unit_norm;
};

// sum a[j] * b[j] over j < n, accumulated in float64 over four lanes.
inline double dot(const float* a, const float* b, int64_t n) {
  double lanes[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t j = 0;
  for (; j + 4 <= n; j += 4)
    for (int64_t l = 0; l < 4; ++l) lanes[l] += double(a[j + l]) * double(b[j + l]);
  for (; j < n; ++j) lanes[0] += double(a[j]) * double(b[j]);
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

// One row: w [m] fp32 in place (the caller loads and stores it), m and v [m] fp32 in place, g [m].
void adam_row(float* w, float* m, float* v, const float* g, float* scratch, int64_t width, int64_t t,
              const AdamArgs& a) {
  const float step_size = float(a.lr / (1.0 - std::pow(a.beta1, double(t))));
  const float bc2_sqrt = float(std::sqrt(1.0 - std::pow(a.beta2, double(t))));
  const float w1 = float(1.0 - a.beta1), b2 = float(a.beta2), w2 = float(1.0 - a.beta2), eps = float(a.eps);
  const float* grad = g;
  if (a.unit_norm) {
    const float along = float(dot(g, w, width)) / std::max(float(dot(w, w, width)), FLT_MIN);
    for (int64_t j = 0; j < width; ++j) scratch[j] = g[j] - along * w[j];
    grad = scratch;
  }
  for (int64_t j = 0; j < width; ++j) {
    const float gj = grad[j];
    m[j] = m[j] + w1 * (gj - m[j]);
    v[j] = v[j] * b2 + w2 * gj * gj;
    const float denom = std::sqrt(v[j]) / bc2_sqrt + eps;
    w[j] = w[j] - m[j] * step_size / denom;
  }
  if (a.unit_norm) {
    const float norm = std::max(float(std::sqrt(dot(w, w, width))), FLT_MIN);
    for (int64_t j = 0; j < width; ++j) w[j] = w[j] / norm;
  }
}

}  // namespace

// One lazy Adam step, in place. param [n, m] fp32, or bf16 with low [n, m] int16 (the fp32 master's
// low bits); exp_avg, exp_avg_sq [n, m] fp32; step [n] int64; grad [U, m] fp32 holds the gradient of
// rows `rows` [U] int64 (None: U = n, entry u is row u), entry u taken only where valid [U] bool (None:
// all). Valid entries name distinct rows. Each taken row's step count goes up by one first.
void adam_rows_(at::Tensor& param, const std::optional<at::Tensor>& low, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                at::Tensor& step, const at::Tensor& grad, const std::optional<at::Tensor>& rows,
                const std::optional<at::Tensor>& valid, double lr, double beta1, double beta2, double eps,
                bool unit_norm) {
  TORCH_CHECK(param.dim() == 2 && param.is_contiguous(), "param must be a contiguous [n, m] tensor");
  const int64_t n = param.size(0), width = param.size(1);
  const bool master = low.has_value();
  TORCH_CHECK(master ? param.scalar_type() == at::kBFloat16 : param.scalar_type() == at::kFloat,
              "param must be fp32, or bf16 with its master low bits");
  if (master)
    TORCH_CHECK(low->sizes() == param.sizes() && low->scalar_type() == at::kShort && low->is_contiguous(),
                "low must be a contiguous int16 tensor shaped like param");
  for (const at::Tensor* moment : {&exp_avg, &exp_avg_sq})
    TORCH_CHECK(moment->sizes() == param.sizes() && moment->scalar_type() == at::kFloat && moment->is_contiguous(),
                "the moments must be contiguous fp32 tensors shaped like param");
  TORCH_CHECK(step.dim() == 1 && step.size(0) == n && step.scalar_type() == at::kLong && step.is_contiguous(),
              "step must be a contiguous int64 [n] tensor");
  const int64_t n_entries = rows.has_value() ? rows->numel() : n;
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == n_entries && grad.size(1) == width &&
                  grad.scalar_type() == at::kFloat && grad.is_contiguous(),
              "grad must be a contiguous fp32 [U, m] tensor, one row per entry");
  if (rows.has_value())
    TORCH_CHECK(rows->dim() == 1 && rows->scalar_type() == at::kLong && rows->is_contiguous(),
                "rows must be a contiguous int64 [U] tensor");
  if (valid.has_value())
    TORCH_CHECK(valid->scalar_type() == at::kBool && valid->numel() == n_entries && valid->is_contiguous(),
                "valid must be a contiguous bool tensor, one per entry");
  const int64_t* row_ptr = rows.has_value() ? rows->data_ptr<int64_t>() : nullptr;
  const bool* valid_ptr = valid.has_value() ? valid->data_ptr<bool>() : nullptr;
  for (int64_t e = 0; e < n_entries && row_ptr != nullptr; ++e)
    TORCH_CHECK((valid_ptr != nullptr && !valid_ptr[e]) || (row_ptr[e] >= 0 && row_ptr[e] < n),
                "rows holds an index outside the parameter's rows");
  float* m_ptr = exp_avg.data_ptr<float>();
  float* v_ptr = exp_avg_sq.data_ptr<float>();
  int64_t* step_ptr = step.data_ptr<int64_t>();
  const float* g_ptr = grad.data_ptr<float>();
  float* w_fp32 = master ? nullptr : param.data_ptr<float>();
  at::BFloat16* w_high = master ? param.data_ptr<at::BFloat16>() : nullptr;
  int16_t* w_low = master ? low->data_ptr<int16_t>() : nullptr;
  const AdamArgs args{lr, beta1, beta2, eps, unit_norm};
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(width, 1));
  at::parallel_for(0, n_entries, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> master_row(master ? width : 0), scratch(unit_norm ? width : 0);
    for (int64_t e = begin; e < end; ++e) {
      if (valid_ptr != nullptr && !valid_ptr[e]) continue;
      const int64_t r = row_ptr != nullptr ? row_ptr[e] : e, base = r * width;
      float* w = master ? master_row.data() : w_fp32 + base;
      if (master)
        for (int64_t j = 0; j < width; ++j) w[j] = bf16_master(w_high, w_low, base + j);
      adam_row(w, m_ptr + base, v_ptr + base, g_ptr + e * width, scratch.data(), width, ++step_ptr[r], args);
      if (master)
        for (int64_t j = 0; j < width; ++j) store_bf16_master(w[j], w_high, w_low, base + j);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("select_chunk_", &select_chunk_, "threshold select of one chunk into the rows' kept candidates");
  m.def("select_result", &select_result, "the rows' top-k from their kept candidates");
  m.def("adam_rows_", &adam_rows_, "lazy Adam over the touched rows");
}
