// The torch backend's CPU kernels (`flashsae.kernels.cpu_native` builds and loads them):
//   - the encoder's exact threshold select over one chunk of pre-activations, into each row's best k so far;
//   - the lazy Adam step of `flashsae.optim.SparseAdam` over the touched rows, in one pass.
// Both do in one loop what the torch ops do in tens of passes over memory.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------
// Threshold select. A row's state is its best `size` <= k candidates so far (value > 0, feature
// index), unordered. Per chunk, the values are the product pre[c] plus an offset[c] (the bias, -inf
// where a feature is kept out), and each row:
//   1. takes the chunk's own bound: the k-th largest of the maxima of 2k strided column groups (at
//      least k). k distinct entries reach it, so an entry below it has k larger ones in this chunk and
//      can never be chosen;
//   2. compares every value with the threshold (that bound, and the row's floor: its k-th best kept,
//      once k are kept), a vector at a time, noting which vectors have a passing lane (most have none)
//      and then appending the entries that pass to a candidate list;
//   3. keeps the best k of state + candidates (an exact selection: larger value first, then the lower
//      index, so ties go to the lower index whatever order entries arrive in).
// NaN never passes a comparison, so it never enters (it counts as -inf: a zero after the ReLU).
// Steps 1 and 2 are vector loops, compiled for 16-byte vectors everywhere (SSE on x86-64, NEON on
// arm64) and again for 32-byte ones, run where the CPU has AVX2 (chosen at run time, so one build runs
// on any x86-64).

template <typename T>
struct Candidate {
  T value;
  int64_t index;
};

template <typename T>
inline bool better(const Candidate<T>& a, const Candidate<T>& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

// The chunk's own bound is the k-th largest of this many times k group maxima (each group: the columns
// j, j + n_groups, ...): more makes it tighter and its selection costlier.
constexpr int64_t GROUPS_PER_K = 2;
// ... and of at least this many (whatever k).
constexpr int64_t MIN_GROUPS = 16;
// The k-th largest of at most this many values is found by counting ranks (n^2 / lanes vector
// comparisons, no branch to mispredict); of more, by std::nth_element.
constexpr int64_t RANK_COUNT_LIMIT = 128;
// Vectors in a unit: compared with the threshold together, their passing lanes noted as one word of bits.
constexpr int64_t UNIT = 4;
// Units compared with the threshold before the entries that passed are appended.
constexpr int64_t SEGMENT = 16;
// Most lanes of any vector below.
constexpr int64_t MAX_LANES = 8;

// Vectors (GCC/Clang vector extensions) of Bytes bytes; Mask: a comparison's result (lanes of all ones
// where true).
template <typename T, int Bytes>
struct Simd {
  typedef T Vector __attribute__((vector_size(Bytes)));
  using Mask = decltype(Vector{} > Vector{});
  using MaskLane = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  static constexpr int64_t lanes = Bytes / sizeof(T);

  __attribute__((always_inline)) static inline Vector load(const T* at) {
    Vector v;
    std::memcpy(&v, at, sizeof(Vector));
    return v;
  }
  // The mask's lanes as bits (lane l: bit l): one instruction on x86-64 (the 32-byte one is a GCC builtin, not
  // an intrinsic: it is compiled only where inlined, into the AVX2 build of the row scan).
  __attribute__((always_inline)) static inline uint32_t bits(const Mask& mask) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    if constexpr (Bytes == 32) {
      __m256 lanes_;
      std::memcpy(&lanes_, &mask, sizeof(lanes_));
      if constexpr (sizeof(T) == 4) return uint32_t(__builtin_ia32_movmskps256(lanes_));
      else return uint32_t(__builtin_ia32_movmskpd256(__m256d(lanes_)));
    }
#endif
#if defined(__x86_64__)
    if constexpr (Bytes == 16) {
      __m128 lanes_;
      std::memcpy(&lanes_, &mask, sizeof(lanes_));
      if constexpr (sizeof(T) == 4) return uint32_t(_mm_movemask_ps(lanes_));
      else return uint32_t(_mm_movemask_pd(_mm_castps_pd(lanes_)));
    }
#endif
    uint32_t result = 0;
    for (int64_t l = 0; l < lanes; ++l) result |= uint32_t(mask[l] & 1) << l;
    return result;
  }
};

// out[j] = the largest of values[c] + offset[c] over c = j, j + n_groups, ... (n_members of them), for
// j < n_groups; NaN ignored (-inf when all are).
template <typename T, int Bytes>
__attribute__((always_inline)) inline void group_maxima(const T* values, const T* offset, int64_t n_members,
                                                        int64_t n_groups, T* out) {
  using S = Simd<T, Bytes>;
  using V = typename S::Vector;
  const T lowest = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  // Four vectors of groups at a time, member by member: each member's columns are contiguous, and the four
  // running maxima do not wait on one another.
  for (; j + 4 * S::lanes <= n_groups; j += 4 * S::lanes) {
    V acc[4] = {V{} + lowest, V{} + lowest, V{} + lowest, V{} + lowest};
    for (int64_t g = 0; g < n_members; ++g)
      for (int u = 0; u < 4; ++u) {
        const int64_t at = g * n_groups + j + u * S::lanes;
        const V x = S::load(values + at) + S::load(offset + at);
        acc[u] = x > acc[u] ? x : acc[u];
      }
    std::memcpy(out + j, acc, sizeof(acc));
  }
  for (; j + S::lanes <= n_groups; j += S::lanes) {
    V acc = V{} + lowest;
    for (int64_t g = 0; g < n_members; ++g) {
      const V x = S::load(values + g * n_groups + j) + S::load(offset + g * n_groups + j);
      acc = x > acc ? x : acc;
    }
    std::memcpy(out + j, &acc, sizeof(acc));
  }
  for (; j < n_groups; ++j) {
    T acc = lowest;
    for (int64_t g = 0; g < n_members; ++g) {
      const T x = values[g * n_groups + j] + offset[g * n_groups + j];
      acc = x > acc ? x : acc;
    }
    out[j] = acc;
  }
}

// The k-th largest of values [n] (NaN-free, 1 <= k <= n); values may be reordered, and has room for n
// rounded up to whole vectors.
template <typename T, int Bytes>
__attribute__((always_inline)) inline T kth_largest(T* values, int64_t n, int64_t k) {
  using S = Simd<T, Bytes>;
  using V = typename S::Vector;
  using M = typename S::Mask;
  if (n > RANK_COUNT_LIMIT) {
    std::nth_element(values, values + (k - 1), values + n, std::greater<T>());
    return values[k - 1];
  }
  // The k-th largest is the largest value that at least k values reach.
  const T lowest = -std::numeric_limits<T>::infinity();
  for (int64_t i = n; i % S::lanes != 0; ++i) values[i] = lowest;  // padding lanes: never above the answer
  V best = V{} + lowest;
  const typename S::MaskLane at_least = typename S::MaskLane(k);
  int64_t i = 0;
  for (; i + 4 * S::lanes <= n; i += 4 * S::lanes) {  // four vectors per broadcast value
    V these[4];
    M reached_by[4] = {};
    for (int u = 0; u < 4; ++u) these[u] = S::load(values + i + u * S::lanes);
    for (int64_t j = 0; j < n; ++j) {
      const V other = V{} + values[j];
      for (int u = 0; u < 4; ++u) reached_by[u] -= other >= these[u];  // a true lane is -1
    }
    for (int u = 0; u < 4; ++u) best = (reached_by[u] >= at_least) & (these[u] > best) ? these[u] : best;
  }
  for (; i < n; i += S::lanes) {
    const V these = S::load(values + i);
    M reached_by = M{};
    for (int64_t j = 0; j < n; ++j) reached_by -= (V{} + values[j]) >= these;
    best = (reached_by >= at_least) & (these > best) ? these : best;
  }
  T result = best[0];
  for (int64_t l = 1; l < S::lanes; ++l) result = std::max(result, T(best[l]));
  return result;
}

// A unit of columns with an entry that passed the threshold: its first column, and its passing columns as bits.
struct Hit {
  int64_t column;
  uint32_t passed;
};

// A thread's scratch for `scan_row`: the group maxima, the pending candidates (the state and the entries
// that passed), and room to sort them.
template <typename T>
struct RowScratch {
  std::vector<T> groups, values;
  std::vector<Candidate<T>> pending, equal;
  std::vector<Hit> hits = std::vector<Hit>(SEGMENT);

  explicit RowScratch(int64_t k)
      : groups(std::max(GROUPS_PER_K * k, MIN_GROUPS) + MAX_LANES),
        pending(k + std::max<int64_t>(4 * k, UNIT * MAX_LANES)) {
    values.resize(pending.size() + MAX_LANES);
    equal.resize(pending.size());
  }
};

// Keeps the best k of pending [n] (all of them when n <= k) in its first slots; returns how many.
template <typename T, int Bytes>
__attribute__((always_inline)) inline int64_t keep_best(Candidate<T>* pending, int64_t n, int64_t k,
                                                        RowScratch<T>& s) {
  if (n <= k) return n;
  if (n > RANK_COUNT_LIMIT) {
    std::nth_element(pending, pending + (k - 1), pending + n,
                     [](const Candidate<T>& a, const Candidate<T>& b) { return better(a, b); });
    return k;
  }
  // The k-th largest value t: every candidate above it is kept, and those equal to it by lower index.
  T* values = s.values.data();
  for (int64_t i = 0; i < n; ++i) values[i] = pending[i].value;
  const T t = kth_largest<T, Bytes>(values, n, k);
  Candidate<T>* equal = s.equal.data();
  int64_t above = 0, n_equal = 0;
  for (int64_t i = 0; i < n; ++i) {  // in place: above <= i
    const Candidate<T> candidate = pending[i];
    pending[above] = candidate;
    above += candidate.value > t;
    equal[n_equal] = candidate;
    n_equal += candidate.value == t;
  }
  const int64_t wanted = k - above;  // 1 <= wanted <= n_equal
  if (n_equal > wanted)
    std::nth_element(equal, equal + (wanted - 1), equal + n_equal,
                     [](const Candidate<T>& a, const Candidate<T>& b) { return a.index < b.index; });
  std::copy(equal, equal + wanted, pending + above);
  return k;
}

// Writes the candidates values [n], indices [n] (distinct) to out [n] best first: larger value, then lower
// index. Up to RANK_COUNT_LIMIT of them by counting each one's rank (no branch to mispredict); values has
// room for n rounded up to whole vectors.
template <typename T, int Bytes>
__attribute__((always_inline)) inline void sort_best(T* values, const int64_t* indices, int64_t n, Candidate<T>* out) {
  using S = Simd<T, Bytes>;
  using V = typename S::Vector;
  using M = typename S::Mask;
  using Lane = typename S::MaskLane;
  for (int64_t i = 0; i < n; ++i) out[i] = {values[i], indices[i]};
  if (n > RANK_COUNT_LIMIT) {
    std::sort(out, out + n, better<T>);
    return;
  }
  // Rank: how many come first, equal values taken in the order given; each run of equal values is then
  // put in index order.
  for (int64_t i = 0; i < n; i += S::lanes) {
    const V these = S::load(values + i);
    M position{}, rank{};
    for (int64_t l = 0; l < S::lanes; ++l) position[l] = Lane(i + l);
    for (int64_t j = 0; j < n; ++j) {
      const V other = V{} + values[j];
      rank -= (other > these) | ((other == these) & ((M{} + Lane(j)) < position));
    }
    for (int64_t l = 0; l < S::lanes && i + l < n; ++l) out[rank[l]] = {values[i + l], indices[i + l]};
  }
  for (int64_t first = 0, last; first < n; first = last) {
    for (last = first + 1; last < n && out[last].value == out[first].value; ++last) {
    }
    if (last - first > 1)
      std::sort(out + first, out + last, [](const Candidate<T>& a, const Candidate<T>& b) { return a.index < b.index; });
  }
}

// Notes in hits each unit (UNIT vectors) of columns begin .. end - 1 (whole units) with an entry whose value
// passes the threshold: its first column and its passing columns as bits; returns how many.
template <typename T, int Bytes>
__attribute__((always_inline)) inline int64_t note_passing(const T* pre, const T* offset, int64_t begin, int64_t end,
                                                           T threshold, Hit* hits) {
  using S = Simd<T, Bytes>;
  int64_t n_hits = 0;
  for (int64_t c = begin; c < end; c += UNIT * S::lanes) {
    uint32_t passed = 0;
    for (int64_t u = 0; u < UNIT; ++u) {
      const typename S::Vector x = S::load(pre + c + u * S::lanes) + S::load(offset + c + u * S::lanes);
      passed |= S::bits((x >= threshold) & (x > T(0))) << (u * S::lanes);
    }
    hits[n_hits] = {c, passed};  // written always, kept only if an entry passed (no branch)
    n_hits += passed != 0;
  }
  return n_hits;
}

// Cuts pending [n] to its best k (k < n), and raises the threshold to their k-th.
template <typename T, int Bytes>
__attribute__((always_inline)) inline void make_room(Candidate<T>* pending, int64_t& n, int64_t k, T& threshold,
                                                     RowScratch<T>& s) {
  n = keep_best<T, Bytes>(pending, n, k, s);
  T kth = pending[0].value;
  for (int64_t i = 1; i < k; ++i) kth = std::min(kth, pending[i].value);
  threshold = std::max(threshold, kth);
}

// Merges one row of a chunk, the values pre[c] + offset[c] [width] of features start + c, into the row's
// state: its best `size` <= k candidates so far in v, idx [k] (unordered).
template <typename T, int Bytes>
__attribute__((always_inline)) inline void scan_row_with(const T* pre, const T* offset, int64_t width, int64_t start,
                                                         T* v, int64_t* idx, int64_t& size, int64_t k,
                                                         RowScratch<T>& s) {
  using S = Simd<T, Bytes>;
  const int64_t n_groups = std::min(width, std::max(GROUPS_PER_K * k, MIN_GROUPS));
  const int64_t capacity = int64_t(s.pending.size());
  T bound = -std::numeric_limits<T>::infinity();
  if (n_groups >= k) {  // the last width % n_groups columns take no part in the bound
    group_maxima<T, Bytes>(pre, offset, width / n_groups, n_groups, s.groups.data());
    bound = kth_largest<T, Bytes>(s.groups.data(), n_groups, k);
  }
  Candidate<T>* pending = s.pending.data();
  int64_t n = size;
  for (int64_t i = 0; i < n; ++i) pending[i] = {v[i], idx[i]};
  // The k-th best kept: an entry below it never enters (equal ones are settled exactly).
  const T floor = n == k ? *std::min_element(v, v + k) : T(0);
  T threshold = std::max(bound, floor);
  // A segment of units at a time: each unit's vectors compared with the threshold, the units with a passing
  // entry noted (no branch), then those entries appended (compared again: the threshold may rise between
  // segments, and between the units of one).
  constexpr int64_t unit = UNIT * S::lanes;
  const int64_t whole = width - width % unit;
  int64_t c = 0;
  auto offer = [&](int64_t column) {  // appended, then kept only if it passes (no branch to mispredict)
    const T x = pre[column] + offset[column];
    pending[n] = {x, start + column};
    n += (x >= threshold) & (x > T(0));
  };
  while (c < whole) {
    const int64_t end = std::min(whole, c + SEGMENT * unit);
    const int64_t n_hits = note_passing<T, Bytes>(pre, offset, c, end, threshold, s.hits.data());
    c = end;
    for (int64_t h = 0; h < n_hits; ++h) {
      if (n + unit > capacity) make_room<T, Bytes>(pending, n, k, threshold, s);
      for (uint32_t passed = s.hits[h].passed; passed != 0; passed &= passed - 1)
        offer(s.hits[h].column + __builtin_ctz(passed));
    }
  }
  if (n + unit > capacity) make_room<T, Bytes>(pending, n, k, threshold, s);  // the tail: less than a unit
  for (; c < width; ++c) offer(c);
  size = keep_best<T, Bytes>(pending, n, k, s);
  for (int64_t i = 0; i < size; ++i) {
    v[i] = pending[i].value;
    idx[i] = pending[i].index;
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FLASHSAE_AVX2_BUILD 1
template <typename T>
__attribute__((target("avx2"))) void scan_row_avx2(const T* pre, const T* offset, int64_t width, int64_t start, T* v,
                                                   int64_t* idx, int64_t& size, int64_t k, RowScratch<T>& s) {
  scan_row_with<T, 32>(pre, offset, width, start, v, idx, size, k, s);
}

template <typename T>
__attribute__((target("avx2"))) void sort_best_avx2(T* values, const int64_t* indices, int64_t n, Candidate<T>* out) {
  sort_best<T, 32>(values, indices, n, out);
}
#endif

// Whether the CPU has AVX2: read once, at the first call (not in a static initializer, which may run before
// the CPU is probed).
bool cpu_has_avx2() {
#ifdef FLASHSAE_AVX2_BUILD
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("avx2"));
  return yes;
#else
  return false;
#endif
}

// Whether the row scan runs its AVX2 build: where the CPU has it, unless `use_avx2(false)` said otherwise.
std::atomic<bool> avx2_wanted{true};

bool avx2_in_use() { return avx2_wanted.load(std::memory_order_relaxed) && cpu_has_avx2(); }

template <typename T>
void scan_row(bool avx2, const T* pre, const T* offset, int64_t width, int64_t start, T* v, int64_t* idx,
              int64_t& size, int64_t k, RowScratch<T>& s) {
#ifdef FLASHSAE_AVX2_BUILD
  if (avx2) return scan_row_avx2(pre, offset, width, start, v, idx, size, k, s);
#endif
  scan_row_with<T, 16>(pre, offset, width, start, v, idx, size, k, s);
}

template <typename T>
void sort_row(bool avx2, T* values, const int64_t* indices, int64_t n, Candidate<T>* out) {
#ifdef FLASHSAE_AVX2_BUILD
  if (avx2) return sort_best_avx2(values, indices, n, out);
#endif
  sort_best<T, 16>(values, indices, n, out);
}

void check_select_state(const at::Tensor& kept_vals, const at::Tensor& kept_idx, const at::Tensor& sizes) {
  TORCH_CHECK(kept_vals.dim() == 2 && kept_vals.is_contiguous(), "kept_vals must be a contiguous [B, k] tensor");
  TORCH_CHECK(kept_idx.sizes() == kept_vals.sizes() && kept_idx.scalar_type() == at::kLong && kept_idx.is_contiguous(),
              "kept_idx must be a contiguous int64 tensor shaped like kept_vals");
  TORCH_CHECK(sizes.dim() == 1 && sizes.size(0) == kept_vals.size(0) && sizes.scalar_type() == at::kLong &&
                  sizes.is_contiguous(),
              "sizes must be a contiguous int64 [B] tensor");
  const int64_t* size = sizes.data_ptr<int64_t>();
  const int64_t k = kept_vals.size(1);
  TORCH_CHECK(std::all_of(size, size + sizes.size(0), [k](int64_t n) { return n >= 0 && n <= k; }),
              "sizes must hold counts between 0 and k");
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
    const bool avx2 = avx2_in_use();
    at::parallel_for(0, pre.size(0), 16, [&](int64_t begin, int64_t end) {
      RowScratch<scalar_t> scratch(k);
      for (int64_t r = begin; r < end; ++r)
        scan_row(avx2, pre_ptr + r * row_stride, offset_ptr, width, start, v + r * k, idx + r * k, size[r], k, scratch);
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
    const bool avx2 = avx2_in_use();
    at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> values(k + MAX_LANES);
      std::vector<Candidate<scalar_t>> row(k);
      std::vector<char> taken;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = size[r];
        std::copy(kept_v + r * k, kept_v + r * k + n, values.begin());
        sort_row(avx2, values.data(), kept_i + r * k, n, row.data());
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

// Lets the threshold select run its AVX2 build where the CPU has AVX2 (the default), or not (its 16-byte
// vector build, as on CPUs without it); returns whether it now runs the AVX2 build.
bool use_avx2(bool wanted) {
  avx2_wanted.store(wanted, std::memory_order_relaxed);
  return avx2_in_use();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("select_chunk_", &select_chunk_, "threshold select of one chunk into the rows' kept candidates");
  m.def("select_result", &select_result, "the rows' top-k from their kept candidates");
  m.def("adam_rows_", &adam_rows_, "lazy Adam over the touched rows");
  m.def("use_avx2", &use_avx2, "whether the threshold select may run its AVX2 build; returns whether it does");
}
