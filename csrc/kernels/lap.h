// Exact dense linear assignment (LAP) solver, Jonker-Volgenant style.
//
// Problem. Given a dense row-major cost matrix C with num_rows <= num_cols, find an injective
// map row -> column minimising sum_i C[i][x(i)]. Everything is done in double precision and
// the result is exactly optimal up to floating-point rounding of the dual variables.
//
// Duals and the invariant everything relies on. We keep one "price" v[j] per column and look
// at reduced costs r[i][j] = C[i][j] - v[j]. Row duals are implicit: u[i] = min_j r[i][j].
// Every phase below maintains
//
//   (I1) an assigned row sits on a column that minimises its reduced cost, i.e.
//        r[i][x(i)] = u[i]  (complementary slackness for the assigned pairs), and
//   (I2) for rectangular problems, every unassigned column has v[j] = 0 >= all other v.
//
// (I1) makes every reduced edge cost r[i][j] - u[i] non-negative, which is what lets the final
// phase run Dijkstra. When all rows are assigned, (I1) + (I2) are exactly the LP optimality
// conditions of  min sum c x  s.t. row sums = 1, column sums <= 1  (dual: u free, v <= 0,
// v = 0 on unused columns), so the assignment is optimal. (I2) is why the square-only
// initialisation below is skipped for rectangular inputs: column reduction gives every column
// its own price, which would be wrong for columns that end up unused.
//
// Phases (Jonker & Volgenant, "A shortest augmenting path algorithm for dense and sparse linear
// assignment problems", Computing 38, 1987):
//   1. Column reduction (square only): v[j] = min_i C[i][j]; each column is offered to its
//      cheapest row; a row that wins several columns keeps one. All reduced costs are >= 0 and
//      assigned rows sit on a zero, so (I1) holds.
//   2. Reduction transfer (square only): a row that won exactly one column j1 lowers v[j1] by
//      its second-smallest reduced cost. The row stays optimal on j1 (now tied with its second
//      choice) while j1 becomes less attractive to every other row, which makes the next phase
//      more effective.
//   3. Augmenting row reduction (ARR): each free row takes its cheapest column j1 and lowers
//      v[j1] by (second - first), which keeps it optimal there; the previous owner of j1 is
//      displaced and retried. This is a cheap auction-like pass that usually assigns most of
//      the remaining rows. For rectangular inputs it starts from v = 0 and is the whole
//      initialisation; it only lowers prices of columns it assigns, so (I2) holds.
//   4. Shortest augmenting paths: for each row still free, Dijkstra over reduced costs finds
//      the cheapest alternating path to an unassigned column, prices of the columns finalised
//      by the search are lowered so (I1) still holds, and the path is flipped.
//
// Known pitfall handled here: in exact arithmetic each immediate retry in ARR strictly lowers
// a price, but with floating point (or tiny gaps) the classic loop can cycle forever. We cap
// the number of immediate retries per pass and treat a price update that does not change the
// stored value as "no progress"; rows that are deferred this way are simply left to phase 4,
// which is always exact. The cap only affects speed, never correctness.
//
// Determinism and tie-breaking. The solver is a fixed sequence of IEEE additions, subtractions
// and comparisons (no multiplications, so no FMA contraction either, and all reductions are
// minima), so the same input always gives the same output, independent of the SIMD width it was
// compiled for and of what the workspace held before. Ties are broken towards the lowest index:
// column reduction gives a column to the lowest cheapest row; ARR and Dijkstra pick the lowest
// cheapest column, except that among equally cheap columns an unassigned one is taken first
// (lowest such index), because that ends a search without displacing anyone. This matters for
// degenerate inputs (e.g. all-equal costs), where always taking the lowest assigned column would
// make the augmentation phase cubic. The optimum total matches any other exact solver, but on
// inputs with several optimal assignments the particular assignment may differ from SciPy's.
//
// Performance notes. The Dijkstra phase dominates on hard inputs and is bound by streaming cost
// rows from memory, so instead of the usual list of unscanned columns we scan every row densely
// and contiguously: finished columns are parked with v = -inf and d = +inf, which makes them
// fail every comparison, so the loop needs no index indirection and vectorises. Updates of
// d / pred are rare after the first few scans, so blocks with no improvement skip the stores.
// The kernels use GCC/Clang vector extensions (SSE2 with plain -O3, AVX2 when enabled) and
// fall back to scalar code elsewhere (or when FASTMERGE_LAP_SCALAR is defined); all variants
// compute bit-identical results.
//
// Preconditions (the caller validates them): cost is dense and row-major with
// 0 <= num_rows <= num_cols, entries are finite, and differences of entries do not overflow
// (|C| well below 1e307). As a guard, num_rows > num_cols writes -1 for every row. A LapSolver
// instance is not thread-safe; use one per thread.

#pragma once

// Finished columns are parked at +-infinity (see relax_row), which finite-math-only
// optimisation would be allowed to break.
#if defined(__FAST_MATH__) || (defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__)
#error "csrc/kernels/lap.h needs IEEE infinities: do not compile it with -ffast-math or -ffinite-math-only"
#endif

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

// Every definition lives in an inline namespace named after the vector width, so translation
// units compiled with different ISA flags (e.g. one with -mavx2) get distinct symbols instead
// of silently sharing one inline definition (an ODR violation).
#if (defined(__GNUC__) || defined(__clang__)) && !defined(FASTMERGE_LAP_SCALAR)
#if defined(__AVX2__)
#define FASTMERGE_LAP_WIDTH 4
#define FASTMERGE_LAP_ISA_NAMESPACE lap_avx2
#else
#define FASTMERGE_LAP_WIDTH 2
#define FASTMERGE_LAP_ISA_NAMESPACE lap_vec2
#endif
#else
#define FASTMERGE_LAP_WIDTH 1
#define FASTMERGE_LAP_ISA_NAMESPACE lap_scalar
#endif

namespace fastmerge {
namespace kernels {
inline namespace FASTMERGE_LAP_ISA_NAMESPACE {
namespace lap_detail {

constexpr int kWidth = FASTMERGE_LAP_WIDTH;

// Minimal SIMD layer: VecD holds kWidth doubles, VecI the matching all-ones/all-zeros masks.
#if FASTMERGE_LAP_WIDTH > 1
typedef double VecD __attribute__((vector_size(8 * FASTMERGE_LAP_WIDTH)));
typedef int64_t VecI __attribute__((vector_size(8 * FASTMERGE_LAP_WIDTH)));
inline VecD splat(double x) {
  VecD r;
  for (int l = 0; l < kWidth; ++l) r[l] = x;
  return r;
}
inline VecI splat(int64_t x) {
  VecI r;
  for (int l = 0; l < kWidth; ++l) r[l] = x;
  return r;
}
// memcpy keeps the loads/stores unaligned and alias-safe; it compiles to a single move.
inline VecD load(const double* p) {
  VecD r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
inline VecI load(const int64_t* p) {
  VecI r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
inline void store(double* p, VecD x) { std::memcpy(p, &x, sizeof x); }
inline void store(int64_t* p, VecI x) { std::memcpy(p, &x, sizeof x); }
inline VecI less(VecD a, VecD b) { return a < b; }
inline VecI less(VecI a, VecI b) { return a < b; }
inline VecI equal(VecD a, VecD b) { return a == b; }
// The vector ternary (rather than bit masking) lets GCC emit min/blend instructions.
inline VecD select(VecI m, VecD a, VecD b) { return m ? a : b; }
inline VecI select(VecI m, VecI a, VecI b) { return m ? a : b; }
inline double lane(VecD x, int l) { return x[l]; }
inline bool any_lane(VecI m) {
  int64_t any = m[0];
  for (int l = 1; l < kWidth; ++l) any |= m[l];
  return any != 0;
}
inline void prefetch(const double* p) { __builtin_prefetch(p); }
#else
typedef double VecD;
typedef int64_t VecI;
inline VecD splat(double x) { return x; }
inline VecI splat(int64_t x) { return x; }
inline VecD load(const double* p) { return *p; }
inline VecI load(const int64_t* p) { return *p; }
inline void store(double* p, VecD x) { *p = x; }
inline void store(int64_t* p, VecI x) { *p = x; }
inline VecI less(VecD a, VecD b) { return a < b ? -1 : 0; }
inline VecI less(VecI a, VecI b) { return a < b ? -1 : 0; }
inline VecI equal(VecD a, VecD b) { return a == b ? -1 : 0; }
inline VecD select(VecI m, VecD a, VecD b) { return m ? a : b; }
inline VecI select(VecI m, VecI a, VecI b) { return m ? a : b; }
inline double lane(VecD x, int) { return x; }
inline bool any_lane(VecI m) { return m != 0; }
inline void prefetch(const double*) {}
#endif

inline VecD vmin(VecD a, VecD b) { return select(less(a, b), a, b); }
inline VecD vmax(VecD a, VecD b) { return select(less(b, a), a, b); }

constexpr double kInf = std::numeric_limits<double>::infinity();

// Loops process blocks of four vectors: one any_lane() test per block decides whether the rare
// "something improved" path runs, so the common path is just loads, arithmetic and compares.
constexpr int64_t kBlock = 4 * kWidth;

// Cost rows are visited in data-dependent order, so the hardware prefetcher only catches on a
// few lines into each row and then runs too close behind the loop. Prefetching 3 KiB ahead
// (measured best between 2 and 4 KiB on 4096-wide rows) keeps enough misses in flight.
constexpr int64_t kPrefetchAhead = 384;

inline void prefetch_ahead(const double* row, int64_t k, int64_t n) {
  if (k + kPrefetchAhead + kBlock <= n) {
    for (int64_t q = 0; q < kBlock; q += 8) prefetch(row + k + kPrefetchAhead + q);
  }
}

struct Top2 {
  double u1;  // smallest reduced cost of the row
  double u2;  // second smallest, counting multiplicity (u2 == u1 when the minimum is tied)
};

inline void top2_push(Top2& t, double x) {
  if (x < t.u1) {
    t.u2 = t.u1;
    t.u1 = x;
  } else if (x < t.u2) {
    t.u2 = x;
  }
}

// Two smallest values of row[k] - v[k]. Indices are not tracked here (that would cost blends
// on every element); callers recover them with find_reduced_equal, which usually stops early.
inline Top2 two_smallest(const double* row, const double* v, int64_t n) {
  VecD a1 = splat(kInf), a2 = a1;  // per-lane smallest / second smallest
  const int64_t n_blocked = n - n % kBlock;
  int64_t k = 0;
  for (; k < n_blocked; k += kBlock) {
    prefetch_ahead(row, k, n);
    VecD x[4];
    for (int b = 0; b < 4; ++b) x[b] = load(row + k + b * kWidth) - load(v + k + b * kWidth);
    // Only an element below a lane's second-smallest can change that lane's pair.
    const VecI hit = less(x[0], a2) | less(x[1], a2) | less(x[2], a2) | less(x[3], a2);
    if (any_lane(hit)) {
      for (int b = 0; b < 4; ++b) {
        a2 = vmin(a2, vmax(x[b], a1));
        a1 = vmin(a1, x[b]);
      }
    }
  }
  Top2 t{kInf, kInf};
  for (int l = 0; l < kWidth; ++l) {
    top2_push(t, lane(a1, l));
    top2_push(t, lane(a2, l));
  }
  for (; k < n; ++k) top2_push(t, row[k] - v[k]);
  return t;
}

// Lowest k != skip with row[k] - v[k] == value, recomputing the difference exactly as
// two_smallest did so the equality test is reliable. If owner is given, the lowest such k that
// is unassigned (owner[k] < 0) is preferred. Returns -1 when value does not occur.
inline int64_t find_reduced_equal(const double* row, const double* v, int64_t n, double value,
                                  int64_t skip, const int64_t* owner) {
  const VecD val = splat(value);
  const VecI none = splat(int64_t{0});
  auto matches = [&](int64_t q) {
    return q != skip && row[q] - v[q] == value && (owner == nullptr || owner[q] < 0);
  };
  const int64_t n_blocked = n - n % kBlock;
  int64_t k = 0;
  for (; k < n_blocked; k += kBlock) {
    VecI hit = none;
    for (int b = 0; b < 4; ++b) {
      VecI h = equal(load(row + k + b * kWidth) - load(v + k + b * kWidth), val);
      if (owner != nullptr) h &= less(load(owner + k + b * kWidth), none);
      hit |= h;
    }
    if (any_lane(hit)) {
      for (int64_t q = k; q < k + kBlock; ++q) {
        if (matches(q)) return q;
      }
    }
  }
  for (; k < n; ++k) {
    if (matches(k)) return k;
  }
  // No unassigned match: fall back to the lowest match of any owner.
  return owner != nullptr ? find_reduced_equal(row, v, n, value, skip, nullptr) : -1;
}

// Lowest k with d[k] == value, or -1.
inline int64_t find_equal(const double* d, int64_t n, double value) {
  const VecD val = splat(value);
  const int64_t n_blocked = n - n % kBlock;
  int64_t k = 0;
  for (; k < n_blocked; k += kBlock) {
    VecI hit = equal(load(d + k), val);
    for (int b = 1; b < 4; ++b) hit |= equal(load(d + k + b * kWidth), val);
    if (any_lane(hit)) break;
  }
  for (; k < n; ++k) {
    if (d[k] == value) return k;
  }
  return -1;
}

// One Dijkstra relaxation: for every column, d[k] = min(d[k], row[k] - v[k] - h) and pred[k] = i
// where that improved (kFirst: plain assignment, starting a new search). Returns the minimum of
// d afterwards. Finished columns hold v = -inf, d = +inf, so their candidate is +inf: they are
// never improved and never the minimum.
template <bool kFirst>
inline double relax_row(const double* row, const double* v, double* d, int64_t* pred, int64_t n,
                        double h, int64_t i) {
  const VecD hv = splat(h);
  const VecI iv = splat(i);
  VecD min_a = splat(kInf), min_b = min_a;  // two accumulators to shorten the dependency chain
  const int64_t n_blocked = n - n % kBlock;
  int64_t k = 0;
  for (; k < n_blocked; k += kBlock) {
    prefetch_ahead(row, k, n);
    VecD cand[4], dk[4];
    for (int b = 0; b < 4; ++b) {
      cand[b] = load(row + k + b * kWidth) - load(v + k + b * kWidth) - hv;
    }
    if (kFirst) {
      for (int b = 0; b < 4; ++b) {
        dk[b] = cand[b];
        store(d + k + b * kWidth, cand[b]);
        store(pred + k + b * kWidth, iv);
      }
    } else {
      for (int b = 0; b < 4; ++b) dk[b] = load(d + k + b * kWidth);
      const VecI any = less(cand[0], dk[0]) | less(cand[1], dk[1]) | less(cand[2], dk[2]) |
                       less(cand[3], dk[3]);
      if (any_lane(any)) {
        for (int b = 0; b < 4; ++b) {
          const VecI better = less(cand[b], dk[b]);
          dk[b] = select(better, cand[b], dk[b]);
          store(d + k + b * kWidth, dk[b]);
          store(pred + k + b * kWidth, select(better, iv, load(pred + k + b * kWidth)));
        }
      }
    }
    min_a = vmin(min_a, vmin(dk[0], dk[1]));
    min_b = vmin(min_b, vmin(dk[2], dk[3]));
  }
  min_a = vmin(min_a, min_b);
  double best = kInf;
  for (int l = 0; l < kWidth; ++l) best = lane(min_a, l) < best ? lane(min_a, l) : best;
  for (; k < n; ++k) {
    const double cand = row[k] - v[k] - h;
    if (kFirst || cand < d[k]) {
      d[k] = cand;
      pred[k] = i;
    }
    best = d[k] < best ? d[k] : best;
  }
  return best;
}

// v[j] = min_i cost[i][j] and imin[j] = the lowest row attaining it, scanning rows in memory
// order. After the first few rows an element rarely beats the running minimum, so the stores
// are skipped for blocks without an improvement.
inline void column_minima(const double* cost, int64_t n, double* v, int64_t* imin) {
  for (int64_t j = 0; j < n; ++j) {
    v[j] = cost[j];
    imin[j] = 0;
  }
  const int64_t n_blocked = n - n % kBlock;
  for (int64_t i = 1; i < n; ++i) {
    const double* row = cost + i * n;
    const VecI iv = splat(i);
    int64_t k = 0;
    for (; k < n_blocked; k += kBlock) {
      VecD c[4], vk[4];
      for (int b = 0; b < 4; ++b) {
        c[b] = load(row + k + b * kWidth);
        vk[b] = load(v + k + b * kWidth);
      }
      const VecI any =
          less(c[0], vk[0]) | less(c[1], vk[1]) | less(c[2], vk[2]) | less(c[3], vk[3]);
      if (any_lane(any)) {
        for (int b = 0; b < 4; ++b) {
          const VecI better = less(c[b], vk[b]);
          store(v + k + b * kWidth, select(better, c[b], vk[b]));
          store(imin + k + b * kWidth, select(better, iv, load(imin + k + b * kWidth)));
        }
      }
    }
    for (; k < n; ++k) {
      if (row[k] < v[k]) {
        v[k] = row[k];
        imin[k] = i;
      }
    }
  }
}

}  // namespace lap_detail

// Minimises sum_i cost[i * num_cols + col_for_row[i]] over injective assignments of every row to
// a distinct column (see the top of this file for preconditions, tie-breaking and determinism).
// The object only holds workspace, so reusing one instance across a batch of problems avoids
// reallocating; results never depend on what was solved before.
class LapSolver {
 public:
  void solve(const double* cost, int64_t num_rows, int64_t num_cols, int64_t* col_for_row);

 private:
  void column_reduction(const double* cost, int64_t n);
  void augmenting_row_reduction(const double* cost, int64_t n);
  void augment(const double* cost, int64_t n, int64_t free_row);

  std::vector<double> v_;            // column prices
  std::vector<int64_t> col_of_row_;  // -1 while the row is free
  std::vector<int64_t> row_of_col_;  // -1 while the column is free
  std::vector<int64_t> free_rows_;   // rows still to be assigned (first num_free_rows_)
  std::vector<int64_t> free_cols_;   // unassigned columns during phase 4 (first num_free_cols_)
  int64_t num_free_rows_ = 0;
  int64_t num_free_cols_ = 0;
  // Dijkstra state; pred_ and scratch_ double as scratch during initialisation.
  std::vector<double> d_;
  std::vector<int64_t> pred_;
  std::vector<int64_t> scratch_;  // finished columns of the current search, in order
  std::vector<double> done_d_;    // their distance when finished
  std::vector<double> done_v_;    // their price before the search (v is parked at -inf)
};

// Phases 1 and 2 (square problems only).
inline void LapSolver::column_reduction(const double* cost, int64_t n) {
  int64_t* imin = pred_.data();
  lap_detail::column_minima(cost, n, v_.data(), imin);
  int64_t* wins = scratch_.data();
  for (int64_t i = 0; i < n; ++i) wins[i] = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = imin[j];
    if (wins[i]++ == 0) {  // a row keeps the first (lowest) column it wins
      col_of_row_[i] = j;
      row_of_col_[j] = i;
    }
  }
  num_free_rows_ = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (wins[i] == 0) free_rows_[num_free_rows_++] = i;
  }
  // Reduction transfer costs a pass over most of the matrix and only pays off when there are
  // free rows to place. When column reduction alone leaves (almost) nobody free, as on
  // near-permutation similarity matrices, ARR fixes the few stragglers cheaply anyway.
  if (num_free_rows_ * 16 < n) return;
  for (int64_t i = 0; i < n; ++i) {
    if (wins[i] != 1) continue;
    // The row's reduced cost on its column is exactly 0 and all others are >= 0, so the second
    // smallest value is the smallest over the other columns.
    v_[col_of_row_[i]] -= lap_detail::two_smallest(cost + i * n, v_.data(), n).u2;
  }
}

// Phase 3. Two passes over the free list, as in the original algorithm.
inline void LapSolver::augmenting_row_reduction(const double* cost, int64_t n) {
  for (int pass = 0; pass < 2; ++pass) {
    const int64_t list_end = num_free_rows_;
    num_free_rows_ = 0;  // rows deferred to the next pass are written to the front of the list
    // Cap on immediate retries; see the note at the top of the file.
    int64_t retries_left = 4 * list_end + 16;
    int64_t k = 0;
    while (k < list_end) {
      const int64_t i = free_rows_[k++];
      const double* row = cost + i * n;
      const lap_detail::Top2 t = lap_detail::two_smallest(row, v_.data(), n);
      const bool unique_min = t.u1 < t.u2;
      // With a unique minimum only one column qualifies; otherwise prefer a free one so that
      // nobody has to be displaced.
      int64_t j = lap_detail::find_reduced_equal(row, v_.data(), n, t.u1, -1,
                                                 unique_min ? nullptr : row_of_col_.data());
      int64_t displaced = row_of_col_[j];
      bool progress = false;
      if (unique_min) {
        // Raise the row's reduced cost on j to its second choice: it stays optimal on j, and
        // whoever is displaced now finds j more expensive.
        const double before = v_[j];
        v_[j] -= t.u2 - t.u1;
        progress = v_[j] != before;
      } else if (displaced >= 0) {
        // Tied minimum and every tied column is taken: take the second one instead (the
        // reduced cost is the same, so the row is optimal there too).
        j = lap_detail::find_reduced_equal(row, v_.data(), n, t.u2, j, nullptr);
        displaced = row_of_col_[j];
      }
      col_of_row_[i] = j;
      row_of_col_[j] = i;
      if (displaced >= 0) {
        col_of_row_[displaced] = -1;
        if (progress && retries_left > 0) {
          --retries_left;
          free_rows_[--k] = displaced;  // retry at once: the slot just consumed is free
        } else {
          free_rows_[num_free_rows_++] = displaced;  // num_free_rows_ <= k, so this is safe
        }
      }
    }
  }
}

// Phase 4 for one free row f: Dijkstra from f over reduced costs until an unassigned column is
// reached, then price update and augmentation. d[j] is the length of the cheapest alternating
// path from f to column j using reduced edge costs r[i][j] - u[i] (>= 0 by (I1)).
inline void LapSolver::augment(const double* cost, int64_t n, int64_t f) {
  using lap_detail::kInf;
  double* v = v_.data();
  double* d = d_.data();
  int64_t* pred = pred_.data();
  int64_t free_slot = -1;
  // Next column to finish: a column with minimal d, preferring unassigned ones (the search can
  // stop there) and then the lowest index. Unassigned columns are checked through their list,
  // which is short on the hard square instances where this runs often.
  auto next_column = [&](double m) {
    int64_t best = -1;
    for (int64_t q = 0; q < num_free_cols_; ++q) {
      const int64_t c = free_cols_[q];
      if (d[c] == m && (best < 0 || c < best)) {
        best = c;
        free_slot = q;
      }
    }
    return best >= 0 ? best : lap_detail::find_equal(d, n, m);
  };

  double m = lap_detail::relax_row<true>(cost + f * n, v, d, pred, n, 0.0, f);
  int64_t j = next_column(m);
  int64_t num_done = 0;
  while (row_of_col_[j] >= 0) {
    // Column j is finished at distance m; continue the search through the row that owns it.
    const int64_t i = row_of_col_[j];
    const double* row = cost + i * n;
    // Reduced edge costs out of row i are r[i][k] - u[i], with u[i] = r[i][j] by (I1); fold
    // the offset into a single constant h so that the candidate is row[k] - v[k] - h.
    const double h = row[j] - v[j] - m;
    scratch_[num_done] = j;
    done_d_[num_done] = m;
    done_v_[num_done] = v[j];
    ++num_done;
    v[j] = -kInf;  // parks the column: see relax_row
    d[j] = kInf;
    m = lap_detail::relax_row<false>(row, v, d, pred, n, h, i);
    j = next_column(m);
  }
  // j is unassigned at distance m. Lowering each finished column's price by (m - d) keeps every
  // row optimal on its column after the flip below, i.e. (I1) holds again; unfinished columns,
  // including every unassigned one, keep their price, which preserves (I2).
  for (int64_t q = 0; q < num_done; ++q) v[scratch_[q]] = done_v_[q] + done_d_[q] - m;
  free_cols_[free_slot] = free_cols_[--num_free_cols_];
  for (;;) {  // flip the alternating path back to f
    const int64_t i = pred[j];
    row_of_col_[j] = i;
    const int64_t previous = col_of_row_[i];
    col_of_row_[i] = j;
    if (i == f) break;
    j = previous;
  }
}

inline void LapSolver::solve(const double* cost, int64_t num_rows, int64_t num_cols,
                             int64_t* col_for_row) {
  if (num_rows <= 0) return;
  if (num_rows > num_cols) {  // precondition violated: report "unassigned" rather than loop
    for (int64_t i = 0; i < num_rows; ++i) col_for_row[i] = -1;
    return;
  }
  const int64_t n = num_cols;
  if (n == 1) {  // then num_rows == 1; also keeps "second smallest" finite below
    col_for_row[0] = 0;
    return;
  }
  v_.assign(n, 0.0);
  col_of_row_.assign(num_rows, -1);
  row_of_col_.assign(n, -1);
  free_rows_.resize(num_rows);
  free_cols_.resize(n);
  d_.resize(n);
  pred_.resize(n);
  scratch_.resize(n);
  done_d_.resize(n);
  done_v_.resize(n);

  if (num_rows == n) {
    column_reduction(cost, n);
  } else {
    num_free_rows_ = num_rows;
    for (int64_t i = 0; i < num_rows; ++i) free_rows_[i] = i;
  }
  augmenting_row_reduction(cost, n);

  num_free_cols_ = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (row_of_col_[j] < 0) free_cols_[num_free_cols_++] = j;
  }
  for (int64_t q = 0; q < num_free_rows_; ++q) augment(cost, n, free_rows_[q]);

  for (int64_t i = 0; i < num_rows; ++i) col_for_row[i] = col_of_row_[i];
}

}  // inline namespace FASTMERGE_LAP_ISA_NAMESPACE
}  // namespace kernels
}  // namespace fastmerge

#undef FASTMERGE_LAP_WIDTH
#undef FASTMERGE_LAP_ISA_NAMESPACE
