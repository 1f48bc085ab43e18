// Uni-LoRA's shared projection: θ_D = P·θ_d (gather) and g_d = Pᵀ·g_D (scatter).
//
// P has one nonzero per row: row i of θ_D takes column j(i) of θ_d, scaled by
// 1/sqrt(n_j) where n_j counts the rows that chose j. j(i) is a function of
// (seed, i) (src/projection.rs documents it and holds the CPU twin), so no
// index buffer is read; an explicit user index array is supported too.
//
// Work layout shared by gather and scatter. The rows of θ_D live in up to
// PROJ_MAX_SEGMENTS caller buffers (one per layer tensor), described by a
// segment table in kernel parameter space. Each segment is cut into tiles of
// PROJ_TILE = 1024 threads × 8 rows; a thread owns 8 consecutive rows, one
// 16-byte access for f16/bf16 (two for f32). Vectors start at the segment's
// first 16-byte boundary (`lead` rows before it are done one by one), so any
// buffer offset gets full-width accesses. A block finds its tile's segment
// by a binary search over the table (7 steps, once per 8192 rows, never per
// row). Grids are persistent: one 1024-thread block per SM (regs ≤ 64 by
// __launch_bounds__, 50 % occupancy), walking tiles grid-stride, so the
// per-block costs below are paid 132 times on an H100, not once per tile.
//
// Gather (one launch, no scratch): every block first writes the d column
// values T(θ_j·scale_j) into shared memory (d·sizeof(T) bytes: d ≤ 24,576 in
// bf16 within 48 KiB; up to ~113K columns with the opt-in), then each row is a
// 2- or 4-byte shared-memory lookup, and 8 rows are packed into one 16-byte
// store. Bytes: D·sizeof(T) written once; 8·d read from L2 per block. The
// row's column comes from SplitMix64, whose counter (key + (i+1)·γ) advances
// by one add per row; only the top 32 bits of the hash are formed (the range
// reduction uses nothing else). Estimate from the sm_90a SASS of the hash
// path: ~12 IMAD and ~10 LOP3/SHF per row, which at 64 integer ops/clk/SM is
// ~40–60 µs for D = 64M on an H100: the same order as the 45 µs write floor,
// so the hash, not HBM, may bound large gathers. When
// the column table does not fit shared memory, each row reads θ_j and scale_j
// through the read-only cache (random 4-byte loads: correct, much slower).
//
// Scatter, deterministic (reads g_D once in the steady state): column sums
// are exact int64 fixed-point sums, so their order does not matter. The
// fixed-point scale 2^S must make every |g|·2^S < 2^(61 - ceil_log2 n_max);
// S is a function of max|g| alone, bucketed to 4 binades so it rarely
// changes between training steps. Pass 1 accumulates at the S the previous
// call found (stored in the workspace) while it also computes max|g|; its
// last block checks that max|g| gives the same S. If it does, pass 2 only
// converts the sums (one pass over d). If not (first call, or max|g| moved
// to another bucket), pass 2 accumulates again at the right S. Either way
// the result is accumulate(S(max|g|)): the same bits whatever the history.
// Bytes in the steady state: D·sizeof(T) read once, plus per block d
// flush atomics (8-byte, coalesced) and 24·d bytes for the conversion.
// Per-block sums live in shared memory as two 32-bit words per column
// (8·d bytes, d ≤ ~29K with the opt-in) because only 32-bit integer shared
// atomics are native (64-bit ones are CAS loops on sm_80/sm_90): the low
// word's carry-out is detected from the atomic's return value and added to
// the high word, which keeps the 64-bit sum exact. Larger d accumulates with
// native 64-bit atomics in global memory. The workspace is left zeroed by
// every call, so no memset precedes one.
#include "common.cuh"

// PROJ_* sizes, ProjMode, SegmentTable (where θ_D's rows land, passed by
// value as a __grid_constant__ parameter) and ColumnMap (how j(i) is drawn)
// are in abi.h, shared with src/cuda/projection.rs.

// Hash and balanced columns come from common.cuh's projection_column (the
// one definition multi_adapter.cu's in-kernel θ gather shares); explicit
// assignments read their index table.
__device__ __forceinline__ uint32_t column_of(const ColumnMap& m, uint64_t i) {
    if (m.mode == PROJ_EXPLICIT) return reinterpret_cast<const uint32_t*>(m.index)[i];
    return projection_column(m.key, m.rows, m.cols, m.mode, m.half_bits, i);
}

// reduce_range(mix64(z), cols), forming only the top 32 bits of mix64: the
// low half of the last product and of the last xor-shift are never used.
__device__ __forceinline__ uint32_t hash_column(uint64_t z, uint32_t cols) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    const uint32_t hi = (uint32_t)(z >> 32);
    const uint32_t top = hi ^ (hi >> 31);  // top 32 bits of z ^ (z >> 31)
    return (uint32_t)(((uint64_t)top * cols) >> 32);
}

// Columns of the n (≤ 8) consecutive rows from `row`. MODE is uniform per
// launch, so the hash path carries no branches on it.
template <uint32_t MODE>
__device__ __forceinline__ void columns8(const ColumnMap& m, uint64_t row, uint32_t n, uint32_t (&j)[PROJ_VEC]) {
    if (MODE == PROJ_HASH) {
        // splitmix_at(key, i) hashes key + (i + 1)·γ: one multiply per 8 rows.
        uint64_t z = m.key + (row + 1) * SPLITMIX_GAMMA;
#pragma unroll
        for (int k = 0; k < PROJ_VEC; ++k, z += SPLITMIX_GAMMA) j[k] = hash_column(z, m.cols);
    } else {
#pragma unroll
        for (int k = 0; k < PROJ_VEC; ++k) j[k] = (uint32_t)k < n ? column_of(m, row + k) : 0u;
    }
}

// Rows before the first 16-byte boundary of a segment buffer (at most len).
// The host computes the same number to size the tile count.
template <typename T> __device__ __forceinline__ uint32_t lead_of(uint64_t addr, uint32_t len) {
    return min((uint32_t)(((16u - (uint32_t)(addr & 15u)) & 15u) / sizeof(T)), len);
}

// This thread's share of `tile`: segment s, its first row e (relative to the
// segment), and n rows (8 = one aligned vector; fewer at the tail). Rows in
// [0, lead) belong to thread k < lead of the segment's first tile, n = 1.
struct TileWork {
    uint32_t s, e, n;
};

__device__ __forceinline__ uint32_t segment_of_tile(const SegmentTable& t, uint32_t tile) {
    uint32_t lo = 0, hi = t.count;  // tile_start[lo] <= tile < tile_start[hi]
    while (hi - lo > 1) {
        const uint32_t mid = (lo + hi) >> 1;
        if (t.tile_start[mid] <= tile) lo = mid; else hi = mid;
    }
    return lo;
}

template <typename T>
__device__ __forceinline__ TileWork tile_work(const SegmentTable& t, uint32_t tile, uint32_t* lead_out) {
    TileWork w;
    w.s = segment_of_tile(t, tile);
    const uint32_t len = t.len[w.s];
    const uint32_t lead = lead_of<T>(t.dst[w.s], len);
    const uint32_t local = tile - t.tile_start[w.s];
    const uint64_t e = (uint64_t)lead + ((uint64_t)local * PROJ_THREADS + threadIdx.x) * PROJ_VEC;
    w.e = e < len ? (uint32_t)e : len;
    w.n = min((uint32_t)PROJ_VEC, len - w.e);
    *lead_out = local == 0 ? lead : 0;
    return w;
}

// 8 elements of T as f32 from a 16-byte-aligned address.
template <typename T> __device__ __forceinline__ void load8(const T* p, float (&v)[PROJ_VEC]) {
    if constexpr (sizeof(T) == 2) {
        const uint4 raw = *reinterpret_cast<const uint4*>(p);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int k = 0; k < PROJ_VEC; ++k) v[k] = to_f32(e[k]);
    } else {
        const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    }
}

// ---- once per projection -------------------------------------------------

// n_j: how many rows chose each column. Integer atomics: order-independent.
extern "C" __global__ void projection_counts(ColumnMap map, uint32_t* __restrict__ counts) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < map.rows;
         i += (uint64_t)gridDim.x * blockDim.x)
        atomicAdd(&counts[column_of(map, i)], 1u);
}

// scale_j = 1/sqrt(n_j) (0 for unused columns), in double then rounded, so it
// matches the CPU's `(1.0 / (n as f64).sqrt()) as f32` bit for bit.
extern "C" __global__ void projection_scale(const uint32_t* __restrict__ counts, uint32_t cols,
                                            float* __restrict__ scale) {
    uint32_t j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < cols) scale[j] = counts[j] ? (float)(1.0 / sqrt((double)counts[j])) : 0.0f;
}

// ---- gather: θ_D = P·θ_d -------------------------------------------------

// Dynamic shared memory of every projection kernel (one array, so the CPU
// kernel emulator can provide it). The first 16 bytes are flag words.
extern __shared__ __align__(16) unsigned char proj_smem[];

// Column j's output value: the f32 product θ_j·scale_j rounded once to T,
// exactly as the CPU twin computes it.
template <typename T, bool STAGED>
__device__ __forceinline__ T column_value(const T* staged, const float* __restrict__ theta,
                                          const float* __restrict__ scale, uint32_t j) {
    if (STAGED) return staged[j];
    return from_f32<T>(__ldg(theta + j) * __ldg(scale + j));
}

template <typename T, uint32_t MODE, bool STAGED>
__device__ void gather_tiles(const SegmentTable& table, const ColumnMap& map, const T* staged,
                             const float* __restrict__ theta, const float* __restrict__ scale) {
    const uint32_t tiles = table.tile_start[table.count];
    for (uint32_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        uint32_t lead;
        const TileWork w = tile_work<T>(table, tile, &lead);
        T* dst = reinterpret_cast<T*>(table.dst[w.s]);
        const uint64_t row0 = table.start[w.s];
        if (threadIdx.x < lead) {
            dst[threadIdx.x] =
                column_value<T, STAGED>(staged, theta, scale, column_of(map, row0 + threadIdx.x));
        }
        if (w.n == 0) continue;
        uint32_t j[PROJ_VEC];
        columns8<MODE>(map, row0 + w.e, w.n, j);
        if (w.n == PROJ_VEC) {
            // 16-byte aligned by construction of `lead`.
            if constexpr (sizeof(T) == 2) {
                alignas(16) T pack[PROJ_VEC];
#pragma unroll
                for (int k = 0; k < PROJ_VEC; ++k) pack[k] = column_value<T, STAGED>(staged, theta, scale, j[k]);
                *reinterpret_cast<uint4*>(dst + w.e) = *reinterpret_cast<const uint4*>(pack);
            } else {
                float v[PROJ_VEC];
#pragma unroll
                for (int k = 0; k < PROJ_VEC; ++k) v[k] = column_value<T, STAGED>(staged, theta, scale, j[k]);
                reinterpret_cast<float4*>(dst + w.e)[0] = make_float4(v[0], v[1], v[2], v[3]);
                reinterpret_cast<float4*>(dst + w.e)[1] = make_float4(v[4], v[5], v[6], v[7]);
            }
        } else {
#pragma unroll
            for (int k = 0; k < PROJ_VEC; ++k)
                if ((uint32_t)k < w.n) dst[w.e + k] = column_value<T, STAGED>(staged, theta, scale, j[k]);
        }
    }
}

template <typename T, bool STAGED>
__device__ void gather_mode(const SegmentTable& table, const ColumnMap& map, const T* staged,
                            const float* __restrict__ theta, const float* __restrict__ scale) {
    switch (map.mode) {
        case PROJ_HASH: gather_tiles<T, PROJ_HASH, STAGED>(table, map, staged, theta, scale); break;
        case PROJ_BALANCED: gather_tiles<T, PROJ_BALANCED, STAGED>(table, map, staged, theta, scale); break;
        default: gather_tiles<T, PROJ_EXPLICIT, STAGED>(table, map, staged, theta, scale); break;
    }
}

// `stage` != 0: θ·scale fits shared memory as d values of T (the launch
// passes 16 + d·sizeof(T) bytes of dynamic shared memory; the first 16 are
// the flag words every projection kernel reserves).
template <typename T>
__device__ void gather_impl(const SegmentTable& table, const ColumnMap& map, const float* __restrict__ theta,
                            const float* __restrict__ scale, uint32_t stage) {
    T* staged = reinterpret_cast<T*>(proj_smem + PROJ_FLAG_BYTES);
    if (stage) {
        for (uint32_t j = threadIdx.x; j < map.cols; j += blockDim.x) staged[j] = from_f32<T>(theta[j] * scale[j]);
        __syncthreads();
        gather_mode<T, true>(table, map, staged, theta, scale);
    } else {
        gather_mode<T, false>(table, map, staged, theta, scale);
    }
}

// ---- scatter: g_d = Pᵀ·g_D, deterministic --------------------------------

// ScatterState (the per-projection state after the d accumulators in the
// workspace, which the host initialises), the SHIFT_* sentinels and the
// ScatterPhase of each launch are in abi.h.

// S for a max |g| given as float bits: every |g|·2^S < 2^(61 - headroom), so
// n_max ≤ 2^headroom terms sum below 2^61 in an int64. The exponent is
// rounded up to a multiple of 4 so S stays put while max |g| moves within a
// factor of 16 (costing at most 3 of the ~60 bits).
__device__ __forceinline__ int32_t canonical_shift(uint32_t absmax_bits, uint32_t headroom) {
    const float m = __uint_as_float(absmax_bits);
    if (m == 0.0f) return SHIFT_ZERO;
    if (!isfinite(m)) return SHIFT_NONFINITE;
    int e;
    frexpf(m, &e);  // 2^(e-1) ≤ m < 2^e
    e += (4 - (e & 3)) & 3;
    return 61 - (int32_t)headroom - e;
}

__device__ __forceinline__ bool is_shift(int32_t s) { return s > SHIFT_NONFINITE; }

// Adds the fixed-point value q to column j: shared (lo, hi) words or a global
// 64-bit word. The lo add's carry-out (its result wrapped below the old
// value) moves into hi, so hi·2^32 + lo is the exact sum modulo 2^64.
__device__ __forceinline__ void add_fixed(uint32_t* lo, int32_t* hi, unsigned long long* acc, uint32_t j,
                                          long long q) {
    if (lo) {
        const uint32_t l = (uint32_t)q;
        int32_t h = (int32_t)(q >> 32);
        const uint32_t old = atomicAdd(&lo[j], l);
        h += (uint32_t)(old + l) < old;
        if (h) atomicAdd(&hi[j], h);
    } else {
        atomicAdd(&acc[j], (unsigned long long)q);
    }
}

// One pass over every segment's gradient: with `shift` valid, adds the
// fixed-point rows into the accumulators; with `measure`, returns this
// thread's max |g| (NaN and ±inf fold to +inf so they reach the result).
template <typename T, uint32_t MODE>
__device__ float scatter_tiles(const SegmentTable& table, const ColumnMap& map, int32_t shift, bool measure,
                               uint32_t* lo, int32_t* hi, unsigned long long* acc) {
    const bool add = is_shift(shift);
    float m = 0.0f;
    const uint32_t tiles = table.tile_start[table.count];
    for (uint32_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        uint32_t lead;
        const TileWork w = tile_work<T>(table, tile, &lead);
        const T* g = reinterpret_cast<const T*>(table.dst[w.s]);
        const uint64_t row0 = table.start[w.s];
        float v[PROJ_VEC + 1];
        uint32_t j[PROJ_VEC];
        if (w.n == PROJ_VEC) {
            float x[PROJ_VEC];
            load8(g + w.e, x);
#pragma unroll
            for (int k = 0; k < PROJ_VEC; ++k) v[k] = x[k];
        } else {
#pragma unroll
            for (int k = 0; k < PROJ_VEC; ++k) v[k] = (uint32_t)k < w.n ? to_f32(g[w.e + k]) : 0.0f;
        }
        v[PROJ_VEC] = threadIdx.x < lead ? to_f32(g[threadIdx.x]) : 0.0f;
        if (measure) {
#pragma unroll
            for (int k = 0; k <= PROJ_VEC; ++k) {
                const float a = fabsf(v[k]);
                m = fmaxf(m, isfinite(a) ? a : INFINITY);
            }
        }
        if (!add) continue;
        if (w.n) columns8<MODE>(map, row0 + w.e, w.n, j);
#pragma unroll
        for (int k = 0; k < PROJ_VEC; ++k)
            if (v[k] != 0.0f) add_fixed(lo, hi, acc, j[k], __float2ll_rn(ldexpf(v[k], shift)));
        if (v[PROJ_VEC] != 0.0f)
            add_fixed(lo, hi, acc, column_of(map, row0 + threadIdx.x),
                      __float2ll_rn(ldexpf(v[PROJ_VEC], shift)));
    }
    return m;
}

// g_d[j] = (Σ q)·2^-S·scale_j in f64, rounded once; the accumulator is
// zeroed for the next call. A non-finite input poisons every column (the
// fixed-point sum cannot carry it; the CPU twin does the same).
__device__ __forceinline__ void finish_column(unsigned long long* acc, const float* __restrict__ scale,
                                              int32_t shift, uint32_t j, float* __restrict__ out) {
    const long long sum = (long long)__ldcg(acc + j);
    acc[j] = 0;
    if (shift == SHIFT_NONFINITE) out[j] = __int_as_float(0x7fc00000);
    else if (!is_shift(shift)) out[j] = 0.0f;
    else out[j] = (float)(ldexp((double)sum, -shift) * (double)scale[j]);
}

// Whether this block is the last of the launch to get here; every thread's
// earlier global atomics are visible to that block when it returns true.
// `flag` is a word of shared memory.
__device__ __forceinline__ bool last_block(uint32_t* ticket, volatile uint32_t* flag) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) *flag = atomicAdd(ticket, 1u) == gridDim.x - 1;
    __syncthreads();
    const bool last = *flag != 0;
    if (last) __threadfence();
    return last;
}

// Both passes of the deterministic scatter (see the header):
//   SPECULATE: accumulate at state.guess (when known) and measure max|g|.
//     The last block sets final_shift = S(max|g|); if sums are needed and
//     were taken at another S, it sets redo = 1 and guess = S (and clears
//     the wrongly scaled sums).
//   SETTLE: redo = 0 → every block converts its share of the d columns.
//     redo = 1 → accumulate again at final_shift; the last block converts
//     all columns (the rare path: first call, or max|g| changed bucket).
// Dynamic shared memory: 16 bytes of flags, then with `stage` != 0 the
// block's sums as two 32-bit words per column (8·d bytes). A layout of more
// than PROJ_MAX_SEGMENTS segments takes several launches per pass; only the
// one with `last_launch` set decides and converts.
template <typename T>
__device__ void scatter_impl(const SegmentTable& table, const ColumnMap& map, unsigned long long* __restrict__ ws,
                             const float* __restrict__ scale, float* __restrict__ out, uint32_t headroom,
                             uint32_t stage, uint32_t phase, uint32_t last_launch) {
    const uint32_t cols = map.cols;
    unsigned long long* acc = ws;
    ScatterState* st = reinterpret_cast<ScatterState*>(ws + cols);
    const volatile ScatterState* vst = st;
    volatile uint32_t* flag = reinterpret_cast<uint32_t*>(proj_smem);
    const int32_t shift = phase == SCATTER_SPECULATE ? vst->guess : vst->final_shift;
    if (phase == SCATTER_SETTLE && vst->redo == 0) {
        if (!last_launch) return;
        for (uint32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < cols; j += gridDim.x * blockDim.x)
            finish_column(acc, scale, shift, j, out);
        return;
    }
    const bool measure = phase == SCATTER_SPECULATE;
    uint32_t* lo = stage ? reinterpret_cast<uint32_t*>(proj_smem + PROJ_FLAG_BYTES) : nullptr;
    int32_t* hi = stage ? reinterpret_cast<int32_t*>(proj_smem + PROJ_FLAG_BYTES) + cols : nullptr;
    if (stage) {
        for (uint32_t j = threadIdx.x; j < 2 * cols; j += blockDim.x) lo[j] = 0;
        __syncthreads();
    }
    float m;
    switch (map.mode) {
        case PROJ_HASH: m = scatter_tiles<T, PROJ_HASH>(table, map, shift, measure, lo, hi, acc); break;
        case PROJ_BALANCED: m = scatter_tiles<T, PROJ_BALANCED>(table, map, shift, measure, lo, hi, acc); break;
        default: m = scatter_tiles<T, PROJ_EXPLICIT>(table, map, shift, measure, lo, hi, acc); break;
    }
    if (measure) {
        m = warp_max(m);
        if ((threadIdx.x & 31) == 0) atomicMax(&st->absmax_bits, __float_as_uint(m));
    }
    if (stage && is_shift(shift)) {
        __syncthreads();
        for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
            const unsigned long long sum = ((unsigned long long)(uint32_t)hi[j] << 32) + lo[j];
            if (sum) atomicAdd(&acc[j], sum);
        }
    }
    if (!last_launch || !last_block(&st->ticket, flag)) return;

    // The last block: every other block has finished this launch, so the
    // state is this block's alone until it returns.
    if (phase == SCATTER_SPECULATE) {
        const int32_t actual = canonical_shift(vst->absmax_bits, headroom);
        const bool resum = is_shift(actual) && actual != shift;
        // Sums taken at a wrong S, or not needed at all, are cleared here.
        if (is_shift(shift) && actual != shift)
            for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) acc[j] = 0;
        __syncthreads();  // every thread has read the state
        if (threadIdx.x == 0) {
            st->absmax_bits = 0;
            st->ticket = 0;
            st->final_shift = actual;
            st->redo = resum;
            if (resum) st->guess = actual;
        }
        return;
    }
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) finish_column(acc, scale, shift, j, out);
    __syncthreads();
    if (threadIdx.x == 0) {
        st->ticket = 0;
        st->redo = 0;
    }
}

// Opt-in fast path: float atomics straight into g_d (zeroed by the caller).
// Not deterministic: the summation order follows the hardware's.
template <typename T, uint32_t MODE>
__device__ void scatter_atomic_tiles(const SegmentTable& table, const ColumnMap& map, const float* __restrict__ scale,
                                     float* __restrict__ out) {
    const uint32_t tiles = table.tile_start[table.count];
    for (uint32_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        uint32_t lead;
        const TileWork w = tile_work<T>(table, tile, &lead);
        const T* g = reinterpret_cast<const T*>(table.dst[w.s]);
        const uint64_t row0 = table.start[w.s];
        if (threadIdx.x < lead) {
            const float v = to_f32(g[threadIdx.x]);
            const uint32_t j = column_of(map, row0 + threadIdx.x);
            if (v != 0.0f) atomicAdd(&out[j], v * scale[j]);
        }
        if (w.n == 0) continue;
        float v[PROJ_VEC];
        if (w.n == PROJ_VEC) {
            load8(g + w.e, v);
        } else {
#pragma unroll
            for (int k = 0; k < PROJ_VEC; ++k) v[k] = (uint32_t)k < w.n ? to_f32(g[w.e + k]) : 0.0f;
        }
        uint32_t j[PROJ_VEC];
        columns8<MODE>(map, row0 + w.e, w.n, j);
#pragma unroll
        for (int k = 0; k < PROJ_VEC; ++k)
            if (v[k] != 0.0f) atomicAdd(&out[j[k]], v[k] * __ldg(scale + j[k]));
    }
}

template <typename T>
__device__ void scatter_atomic_impl(const SegmentTable& table, const ColumnMap& map, const float* __restrict__ scale,
                                    float* __restrict__ out) {
    switch (map.mode) {
        case PROJ_HASH: scatter_atomic_tiles<T, PROJ_HASH>(table, map, scale, out); break;
        case PROJ_BALANCED: scatter_atomic_tiles<T, PROJ_BALANCED>(table, map, scale, out); break;
        default: scatter_atomic_tiles<T, PROJ_EXPLICIT>(table, map, scale, out); break;
    }
}

#define PROJECTION_KERNELS(SUFFIX, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(PROJ_THREADS, 1) projection_gather_##SUFFIX(           \
        const __grid_constant__ SegmentTable table, const __grid_constant__ ColumnMap map,               \
        const float* __restrict__ theta, const float* __restrict__ scale, uint32_t stage) {              \
        gather_impl<T>(table, map, theta, scale, stage);                                                 \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(PROJ_THREADS, 1) projection_scatter_##SUFFIX(          \
        const __grid_constant__ SegmentTable table, const __grid_constant__ ColumnMap map,               \
        unsigned long long* __restrict__ ws, const float* __restrict__ scale, float* __restrict__ out,   \
        uint32_t headroom, uint32_t stage, uint32_t phase, uint32_t last_launch) {                       \
        scatter_impl<T>(table, map, ws, scale, out, headroom, stage, phase, last_launch);                \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(PROJ_THREADS, 1) projection_scatter_atomic_##SUFFIX(   \
        const __grid_constant__ SegmentTable table, const __grid_constant__ ColumnMap map,               \
        const float* __restrict__ scale, float* __restrict__ out) {                                      \
        scatter_atomic_impl<T>(table, map, scale, out);                                                  \
    }

LORAFUSE_FOR_EACH_DTYPE(PROJECTION_KERNELS)
