// Exact dense linear assignment on the GPU: the shortest-augmenting-path method of
// csrc/kernels/lap.h (Jonker-Volgenant), one thread block per problem. The block solves the rows
// one after another, as the sequential algorithm does, but every pass over the columns (column
// reduction, each Dijkstra step, the price update) runs across the block's threads with a block
// reduction for the minimum. Batches of small problems (attention heads) run one block each, side
// by side; one large problem gets a whole block of 1024 threads.
//
// Duals are explicit (row u, column v), as in SciPy's solver, so the price update is a parallel
// pass over the scanned columns (each updates its own owner row). Square problems start from the
// column reduction (v = column minima, each column offered to its cheapest row, lowest column per
// row kept), which keeps every reduced cost non-negative and leaves about a third of the rows free;
// rectangular ones start from u = v = 0. Ties prefer an unassigned column, then the lowest index,
// like the CPU solver, so degenerate inputs (all-equal costs) end each search at once.
//
// Per-column state (v, shortest-path costs, predecessors, owners, scanned flags) lives in shared
// memory when it fits and in a global workspace otherwise; the code is the same, only the pointers
// differ. Everything is double precision. Preconditions (checked by the caller): rows <= cols,
// finite costs, row-major dense double costs.
#pragma once

#include <cfloat>
#include <climits>

#include "kernels/cuda/common.cuh"

namespace fastmerge {
namespace cuda_kernels {

constexpr int kLapMaxThreads = 1024;

// Bytes of per-problem state: u (rows), v, shortest (cols) doubles; col4row (rows), path,
// row4col (cols) ints; scanned flags (cols). Rounded to 16 bytes.
__host__ __device__ inline int64_t lap_state_bytes(int64_t rows, int64_t cols) {
  const int64_t bytes = 8 * (rows + 2 * cols) + 4 * (rows + 2 * cols) + cols;
  return (bytes + 15) / 16 * 16;
}

struct LapState {
  double* u;
  double* v;
  double* shortest;
  int* col4row;
  int* path;
  int* row4col;
  unsigned char* scanned;
};

__device__ inline LapState lap_carve(char* base, int64_t rows, int64_t cols) {
  LapState s;
  s.u = reinterpret_cast<double*>(base);
  s.v = s.u + rows;
  s.shortest = s.v + cols;
  s.col4row = reinterpret_cast<int*>(s.shortest + cols);
  s.path = s.col4row + rows;
  s.row4col = s.path + cols;
  s.scanned = reinterpret_cast<unsigned char*>(s.row4col + cols);
  return s;
}

// Candidate of the block's minimum: smaller value first, then an unassigned column, then the
// lower index.
struct LapCandidate {
  double value;
  int assigned;
  int column;
};

__device__ __forceinline__ bool lap_better(const LapCandidate& a, const LapCandidate& b) {
  if (a.value != b.value) return a.value < b.value;
  if (a.assigned != b.assigned) return a.assigned < b.assigned;
  return a.column < b.column;
}

__device__ __forceinline__ LapCandidate lap_shfl_down(const LapCandidate& c, int offset) {
  LapCandidate o;
  o.value = __shfl_down_sync(0xffffffffu, c.value, offset);
  o.assigned = __shfl_down_sync(0xffffffffu, c.assigned, offset);
  o.column = __shfl_down_sync(0xffffffffu, c.column, offset);
  return o;
}

// Block-wide minimum, valid in thread 0. All threads must call it.
__device__ __forceinline__ LapCandidate lap_block_min(LapCandidate c, LapCandidate* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const LapCandidate o = lap_shfl_down(c, offset);
    if (lap_better(o, c)) c = o;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warps = (blockDim.x + 31) >> 5;
  if (lane == 0) scratch[warp] = c;
  __syncthreads();
  if (warp == 0) {
    c = lane < warps ? scratch[lane] : LapCandidate{DBL_MAX * 2.0, 1, INT_MAX};
    for (int offset = 16; offset > 0; offset >>= 1) {
      const LapCandidate o = lap_shfl_down(c, offset);
      if (lap_better(o, c)) c = o;
    }
  }
  __syncthreads();
  return c;
}

// Solves problem blockIdx.x of a batch: cost (batch, rows, cols) row-major doubles, rows <= cols.
// Writes col4row (batch, rows) as int64. `global_state` holds lap_state_bytes(rows, cols) per
// problem and is used when `use_shared` is false; otherwise the state lives in dynamic shared memory.
__global__ void __launch_bounds__(kLapMaxThreads)
    lap_solve_kernel(const double* cost_all, int rows, int cols, bool use_shared, char* global_state,
                     int64_t* col4row_out) {
  extern __shared__ __align__(16) char shared_state[];
  __shared__ LapCandidate scratch[32];
  __shared__ int s_row, s_sink;
  __shared__ double s_min;

  const int64_t problem = blockIdx.x;
  const double* cost = cost_all + problem * static_cast<int64_t>(rows) * cols;
  LapState st = lap_carve(use_shared ? shared_state : global_state + problem * lap_state_bytes(rows, cols), rows, cols);
  const int tid = threadIdx.x, threads = blockDim.x;
  const double inf = DBL_MAX * 2.0;

  for (int i = tid; i < rows; i += threads) {
    st.u[i] = 0.0;
    st.col4row[i] = rows == cols ? INT_MAX : -1;
  }
  if (rows == cols) {
    // Column reduction: v[j] = min_i C[i][j] (lowest row on ties), remembered in path[j].
    for (int j = tid; j < cols; j += threads) {
      double best = inf;
      int best_row = 0;
      for (int i = 0; i < rows; ++i) {
        const double c = cost[static_cast<int64_t>(i) * cols + j];
        if (c < best) {
          best = c;
          best_row = i;
        }
      }
      st.v[j] = best;
      st.path[j] = best_row;
    }
    __syncthreads();
    for (int j = tid; j < cols; j += threads) atomicMin(st.col4row + st.path[j], j);  // each row keeps its lowest column
    __syncthreads();
    for (int j = tid; j < cols; j += threads) st.row4col[j] = st.col4row[st.path[j]] == j ? st.path[j] : -1;
    __syncthreads();
    for (int i = tid; i < rows; i += threads)
      if (st.col4row[i] == INT_MAX) st.col4row[i] = -1;
  } else {
    for (int j = tid; j < cols; j += threads) {
      st.v[j] = 0.0;
      st.row4col[j] = -1;
    }
  }
  __syncthreads();

  for (int cur = 0; cur < rows; ++cur) {
    if (st.col4row[cur] != -1) continue;  // uniform: read after a barrier
    for (int j = tid; j < cols; j += threads) {
      st.shortest[j] = inf;
      st.scanned[j] = 0;
    }
    if (tid == 0) {
      s_row = cur;
      s_min = 0.0;
      s_sink = -1;
    }
    __syncthreads();
    // Dijkstra over reduced costs, one column finalised per step.
    while (true) {
      const int i = s_row;
      const double min_value = s_min;
      const double ui = st.u[i];
      const double* row = cost + static_cast<int64_t>(i) * cols;
      LapCandidate best{inf, 1, INT_MAX};
      for (int j = tid; j < cols; j += threads) {
        if (st.scanned[j]) continue;
        const double r = min_value + row[j] - ui - st.v[j];
        double d = st.shortest[j];
        if (r < d) {
          st.path[j] = i;
          st.shortest[j] = d = r;
        }
        const LapCandidate c{d, st.row4col[j] != -1, j};
        if (lap_better(c, best)) best = c;
      }
      best = lap_block_min(best, scratch);
      if (tid == 0) {
        s_min = best.value;
        st.scanned[best.column] = 1;
        const int owner = st.row4col[best.column];
        if (owner == -1)
          s_sink = best.column;
        else
          s_row = owner;
      }
      __syncthreads();
      if (s_sink != -1) break;
    }
    const int sink = s_sink;
    const double min_value = s_min;
    // Prices: every scanned column (and its owner row) moves by min - shortest, keeping the
    // reduced costs non-negative and zero along the new path.
    for (int j = tid; j < cols; j += threads) {
      if (!st.scanned[j] || j == sink) continue;
      const double delta = min_value - st.shortest[j];
      st.u[st.row4col[j]] += delta;
      st.v[j] -= delta;
    }
    if (tid == 0) st.u[cur] += min_value;
    __syncthreads();
    if (tid == 0) {  // flip the alternating path
      int j = sink;
      while (true) {
        const int i = st.path[j];
        st.row4col[j] = i;
        const int previous = st.col4row[i];
        st.col4row[i] = j;
        j = previous;
        if (i == cur) break;
      }
    }
    __syncthreads();
  }
  for (int i = tid; i < rows; i += threads) col4row_out[problem * rows + i] = st.col4row[i];
}

}  // namespace cuda_kernels
}  // namespace fastmerge
