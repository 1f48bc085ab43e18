/* The contract between the CUDA kernels and their Rust launchers: every
 * constant and argument struct both sides must agree on, defined once.
 *
 * Read by three compilers: nvcc (kernels/common.cuh includes it), the host
 * C++ compiler of the kernel emulator (scripts/kernel-emu/), and bindgen,
 * which turns it into src/abi/bindings.rs (scripts/gen-abi.sh; build.rs with
 * the `regen-abi` feature fails when the committed file is stale). So it is
 * plain C: fixed-width integer types, no CUDA types, no pointers (a device
 * address is a uint64_t, which is what the Rust side holds; kernels cast it),
 * object-like macros for constants and enums for small sets of values.
 * Formulas the kernels evaluate per template instance are function-like
 * macros here; what the host needs from them is spelled out per instance as
 * a `static const` value, so the Rust side never repeats a formula.
 *
 * Layouts are checked three times: bindgen's size/offset tests on the Rust
 * side, and the static_asserts at the end of this file in nvcc and the
 * emulator's compiler. */
#ifndef LORAFUSE_ABI_H
#define LORAFUSE_ABI_H

#include <stdint.h>

/* ---- projection (kernels/projection.cu, src/cuda/projection.rs) -------- */

/** Segments one gather/scatter launch takes (SegmentTable's capacity). */
#define PROJ_MAX_SEGMENTS 128
/** Threads per block; a thread owns PROJ_VEC consecutive rows of a tile. */
#define PROJ_THREADS 1024
#define PROJ_VEC 8
/** Rows per tile. */
#define PROJ_TILE (PROJ_THREADS * PROJ_VEC)
/** Bytes of flag words at the start of every projection kernel's dynamic
 * shared memory (θ staging, when used, follows them). */
#define PROJ_FLAG_BYTES 16

/** How a row's column j(i) is drawn (ColumnMap.mode). */
enum ProjMode { PROJ_HASH = 0, PROJ_BALANCED = 1, PROJ_EXPLICIT = 2 };

/** Where θ_D's rows land: one entry per destination buffer (a layer's A or B).
 * Passed by value in kernel parameter space (__grid_constant__, so indexing it
 * never copies it to local memory): no host-to-device copy per call. */
typedef struct SegmentTable {
    uint64_t dst[PROJ_MAX_SEGMENTS];            /**< device address of the segment */
    uint64_t start[PROJ_MAX_SEGMENTS];          /**< first row of θ_D it holds */
    uint32_t len[PROJ_MAX_SEGMENTS];            /**< rows it holds */
    uint32_t tile_start[PROJ_MAX_SEGMENTS + 1]; /**< prefix sum of tiles per segment */
    uint32_t count;
} SegmentTable;

/** How j(i) is drawn; the CPU twin is crate::projection::Projection. */
typedef struct ColumnMap {
    uint64_t key;       /**< derived from the seed */
    uint64_t rows;      /**< D */
    uint64_t index;     /**< PROJ_EXPLICIT only: device address of a uint32_t[D] */
    uint32_t cols;      /**< d */
    uint32_t mode;      /**< enum ProjMode */
    uint32_t half_bits; /**< PROJ_BALANCED: Feistel half width */
    uint32_t pad;
} ColumnMap;

/** Per-projection scatter state after the d accumulators in the workspace
 * (uint64_t[d + SCATTER_STATE_U64]); the host creates it with guess and
 * final_shift SHIFT_NONE and every other field 0. */
typedef struct ScatterState {
    uint32_t absmax_bits; /**< max |g| of the running SPECULATE pass, as float bits */
    uint32_t ticket;      /**< blocks of the running pass that have finished */
    int32_t guess;        /**< S the next SPECULATE pass accumulates at */
    int32_t final_shift;  /**< S (or SHIFT_ZERO / SHIFT_NONFINITE) SETTLE converts with */
    uint32_t redo;        /**< 1: SETTLE must accumulate again at final_shift */
    uint32_t pad[3];
} ScatterState;
#define SCATTER_STATE_U64 4

#define SHIFT_NONE INT32_MIN            /* no previous S: pass 1 only measures */
#define SHIFT_ZERO (INT32_MIN + 1)      /* max |g| = 0: every sum is 0 */
#define SHIFT_NONFINITE (INT32_MIN + 2) /* a NaN or ±inf: every output is NaN */

/** The two launches of one scatter. */
enum ScatterPhase { SCATTER_SPECULATE = 0, SCATTER_SETTLE = 1 };

/* ---- multi_adapter (kernels/multi_adapter.cu, src/multi_adapter.rs) ----- */

#define MA_THREADS 256
/** Rows of one tile: the rows of one adapter a block serves together. */
#define MA_TILE_ROWS 8
/** Ranks one shrink block computes, one warp each. */
#define MA_SHRINK_RANKS 8
/** Output columns one expand block covers, 8 per thread. */
#define MA_EXPAND_COLS 2048
/** The largest rank an adapter in a pool may have. */
#define MA_MAX_RANK 128
/** uint32_t words of one (slot, layer) descriptor. */
#define MA_DESC_WORDS 24

/** Word offsets in a descriptor (64-bit values take two words, low first). */
enum MaDescWord {
    MA_D_KIND = 0,         /**< enum MaKind */
    MA_D_RANK = 1,
    MA_D_SCALE = 2,        /**< f32 bits */
    MA_D_U_OFF = 3,        /**< MA_OFF_NONE: no vector (ones) */
    MA_D_V_OFF = 4,
    MA_D_BASE = 5,         /**< factors: first rank row; θ: θ_d's offset in the float arena */
    MA_D_COLSCALE_OFF = 6, /**< θ: 1/√n_j's offset in the float arena */
    MA_D_COLS = 7,
    MA_D_KEY = 8,          /**< two words */
    MA_D_ROWS = 10,        /**< two words */
    MA_D_MODE = 12,        /**< enum ProjMode (hash or balanced) */
    MA_D_HALF_BITS = 13,
    MA_D_A_START = 14,     /**< two words */
    MA_D_B_START = 16      /**< two words */
};
/** MA_D_KIND values. */
enum MaKind { MA_KIND_EMPTY = 0, MA_KIND_FACTORS = 1, MA_KIND_THETA = 2 };
/** MA_D_U_OFF / MA_D_V_OFF when the vector is absent. */
#define MA_OFF_NONE 0xFFFFFFFFu

/* ---- attention (kernels/attention.cu, src/cuda/attention.rs) ------------ */

/** Threads per block of the CUDA-core (f32) and tensor-core kernels. */
#define ATTN_THREADS 128
#define ATTN_TC_THREADS 128
/** Rows (queries, or keys for dK/dV) per block of the tensor-core kernels. */
#define ATTN_TC_ROWS 64

typedef struct AttnArgs {
    uint32_t batch, seq, heads, hd;
    float scale;      /**< 1/sqrt(hd) */
    float scale_log2; /**< scale·log2(e): scores go straight into exp2 */
} AttnArgs;

/** CUDA-core tiles per head-dim bucket (32, 64, 128): R rows per 8-lane
 * group (16·R rows a block), C columns per streamed tile. Chosen so
 * accumulators and score tiles stay well under 255 registers and the shared
 * tiles allow 2-3 blocks per SM on A100/H100. */
#define ATTN_HD32_FWD_R 4
#define ATTN_HD32_FWD_C 64
#define ATTN_HD32_DQ_R 4
#define ATTN_HD32_DQ_C 64
#define ATTN_HD32_DKV_R 4
#define ATTN_HD32_DKV_C 64
#define ATTN_HD64_FWD_R 4
#define ATTN_HD64_FWD_C 64
#define ATTN_HD64_DQ_R 4
#define ATTN_HD64_DQ_C 32
#define ATTN_HD64_DKV_R 4
#define ATTN_HD64_DKV_C 32
#define ATTN_HD128_FWD_R 4
#define ATTN_HD128_FWD_C 32
#define ATTN_HD128_DQ_R 2
#define ATTN_HD128_DQ_C 32
#define ATTN_HD128_DKV_R 2
#define ATTN_HD128_DKV_C 32

/** Dynamic shared memory, in floats, of the CUDA-core kernels for bucket D
 * and tile (R, C): f32 tiles of pitch D + 1, score tiles of pitch C + 8/R
 * (bank-conflict-free for the 4 lane groups); the kernels trap when launched
 * with less. */
#define ATTN_FWD_SMEM_FLOATS(D, R, C) \
    (16 * (R) * ((D) + 1) + (C) * ((D) + 1) + (C) * (D) + 16 * (R) * ((C) + 8 / (R)))
#define ATTN_DQ_SMEM_FLOATS(D, R, C) (2 * 16 * (R) * ((D) + 1) + 2 * (C) * ((D) + 1) + 16 * (R) * ((C) + 8 / (R)))
#define ATTN_DKV_SMEM_FLOATS(D, R, C) \
    (2 * 16 * (R) * ((D) + 1) + 2 * (C) * ((D) + 1) + 2 * (C) + 2 * 16 * (R) * ((C) + 8 / (R)))

/** Columns per streamed tile of the tensor-core kernels, buckets 64 and 128. */
#define ATTN_TC_FWD_C(D) 64
#define ATTN_TC_DQ_C(D) ((D) == 64 ? 64 : 32)
#define ATTN_TC_DKV_C(D) ((D) == 64 ? 64 : 32)

/** Dynamic shared memory, in bytes, of the tensor-core kernels: 16-bit tiles
 * of pitch D + 8, the streamed ones double-buffered, plus lse and delta of
 * the dK/dV kernel's query tiles. */
#define ATTN_TC_FWD_SMEM(D) ((ATTN_TC_ROWS + 4 * ATTN_TC_FWD_C(D)) * ((D) + 8) * 2)
#define ATTN_TC_DQ_SMEM(D) ((2 * ATTN_TC_ROWS + 4 * ATTN_TC_DQ_C(D)) * ((D) + 8) * 2)
#define ATTN_TC_DKV_SMEM(D) ((2 * ATTN_TC_ROWS + 4 * ATTN_TC_DKV_C(D)) * ((D) + 8) * 2 + 4 * ATTN_TC_DKV_C(D) * 4)

/** The launch sizes the host passes, per bucket (bytes). */
static const uint32_t ATTN_HD32_FWD_SMEM_BYTES = 4 * ATTN_FWD_SMEM_FLOATS(32, ATTN_HD32_FWD_R, ATTN_HD32_FWD_C);
static const uint32_t ATTN_HD32_DQ_SMEM_BYTES = 4 * ATTN_DQ_SMEM_FLOATS(32, ATTN_HD32_DQ_R, ATTN_HD32_DQ_C);
static const uint32_t ATTN_HD32_DKV_SMEM_BYTES = 4 * ATTN_DKV_SMEM_FLOATS(32, ATTN_HD32_DKV_R, ATTN_HD32_DKV_C);
static const uint32_t ATTN_HD64_FWD_SMEM_BYTES = 4 * ATTN_FWD_SMEM_FLOATS(64, ATTN_HD64_FWD_R, ATTN_HD64_FWD_C);
static const uint32_t ATTN_HD64_DQ_SMEM_BYTES = 4 * ATTN_DQ_SMEM_FLOATS(64, ATTN_HD64_DQ_R, ATTN_HD64_DQ_C);
static const uint32_t ATTN_HD64_DKV_SMEM_BYTES = 4 * ATTN_DKV_SMEM_FLOATS(64, ATTN_HD64_DKV_R, ATTN_HD64_DKV_C);
static const uint32_t ATTN_HD128_FWD_SMEM_BYTES = 4 * ATTN_FWD_SMEM_FLOATS(128, ATTN_HD128_FWD_R, ATTN_HD128_FWD_C);
static const uint32_t ATTN_HD128_DQ_SMEM_BYTES = 4 * ATTN_DQ_SMEM_FLOATS(128, ATTN_HD128_DQ_R, ATTN_HD128_DQ_C);
static const uint32_t ATTN_HD128_DKV_SMEM_BYTES = 4 * ATTN_DKV_SMEM_FLOATS(128, ATTN_HD128_DKV_R, ATTN_HD128_DKV_C);
static const uint32_t ATTN_TC_HD64_FWD_SMEM_BYTES = ATTN_TC_FWD_SMEM(64);
static const uint32_t ATTN_TC_HD64_DQ_SMEM_BYTES = ATTN_TC_DQ_SMEM(64);
static const uint32_t ATTN_TC_HD64_DKV_SMEM_BYTES = ATTN_TC_DKV_SMEM(64);
static const uint32_t ATTN_TC_HD128_FWD_SMEM_BYTES = ATTN_TC_FWD_SMEM(128);
static const uint32_t ATTN_TC_HD128_DQ_SMEM_BYTES = ATTN_TC_DQ_SMEM(128);
static const uint32_t ATTN_TC_HD128_DKV_SMEM_BYTES = ATTN_TC_DKV_SMEM(128);

/* ---- nn, the trainer's non-GEMM ops (kernels/nn.cu, src/cuda/nn.rs) ---- */

/** Threads per block of every nn kernel but cross-entropy (the block
 * reductions size their shared arrays by it). */
#define TRAIN_THREADS 256
/** Threads per cross-entropy row (one row per block). */
#define CE_THREADS 1024

/** AdamW hyper-parameters of one step. */
typedef struct AdamWArgs {
    double lr, beta1, beta2, eps, weight_decay, grad_scale;
    double correction1, correction2; /**< 1 − β^step */
} AdamWArgs;

/** One tensor of a multi-tensor AdamW launch: its buffers (device addresses
 * of f32 arrays), length and its group's rate and decay. */
typedef struct AdamWEntry {
    uint64_t param, grad, m, v;
    uint64_t n;
    double lr, weight_decay;
} AdamWEntry;

/** The device optimizer state (an f64 array): header word offsets, then
 * Σx² of each tensor from OPTIM_HEADER on. */
#define OPTIM_NORM 0
#define OPTIM_SCALE 1
#define OPTIM_ACCEPTED 2
#define OPTIM_STEP 3
#define OPTIM_LR_FACTOR 4
#define OPTIM_CORRECTION1 5
#define OPTIM_CORRECTION2 6
#define OPTIM_FIRST_BAD 7
#define OPTIM_HEADER 8

/** A run's optimizer constants, as `optimizer_decide_f32` and
 * `adamw_multi_state_f32` read them. decay: 0 cosine, 1 linear, 2 constant. */
typedef struct OptimArgs {
    double clip_norm, beta1, beta2, eps, min_lr_ratio;
    uint64_t warmup, total;
    uint32_t decay, pad;
} OptimArgs;

/* ---- adapter_sum (kernels/adapter_sum.cu, src/cuda/adapter_sum.rs) ------ */

/** Threads per block of the merge: MERGE_DIM × MERGE_DIM over the block's
 * tile of W. */
#define MERGE_THREADS 256
#define MERGE_DIM 16
/** Merge tiles for W elements of E bytes: a thread owns MERGE_ROWS(E) rows ×
 * MERGE_VEC(E) columns (one 16-byte access per row; 32 f32 accumulators
 * either way), a block MERGE_TILE_M(E) × MERGE_TILE_N(E) of W, and L and R
 * are staged MERGE_KC(E) ranks at a time. */
#define MERGE_VEC(E) (16 / (E))
#define MERGE_ROWS(E) (32 / MERGE_VEC(E))
#define MERGE_TILE_N(E) (MERGE_DIM * MERGE_VEC(E))
#define MERGE_TILE_M(E) (MERGE_DIM * MERGE_ROWS(E))
#define MERGE_KC(E) (4 * MERGE_VEC(E))
/** The tiles the host sizes its grid by: f32 W, and f16/bf16 W. */
static const uint32_t MERGE_F32_TILE_M = MERGE_TILE_M(4);
static const uint32_t MERGE_F32_TILE_N = MERGE_TILE_N(4);
static const uint32_t MERGE_HALF_TILE_M = MERGE_TILE_M(2);
static const uint32_t MERGE_HALF_TILE_N = MERGE_TILE_N(2);

/* ---- lowrank (kernels/lowrank.cu, src/cuda/lowrank.rs) ------------------ */

/** Threads per block of the CUDA-core kernels. */
#define LR_THREADS 256
/** Tensor-core kernels: warps per block (each works alone, no
 * __syncthreads) and reduction elements per step of a warp. */
#define TC_WARPS 4
#define TC_KT 64
/** f32 shrink tiles: rows of x per block, ranks per block (grid.z walks the
 * rest), K per shared-memory tile. */
#define SH_ROWS 64
#define SH_RANKS 16
#define SH_KT 32
/** f32 dB tiles: rows per sub-tile, columns per tile, column tiles per block,
 * ranks per block (grid.z walks the rest). */
#define BD_ROWS 64
#define BD_COLS 128
#define BD_TILES 4
#define BD_RANKS 16
/** Columns per block of lowrank_backward_cols. */
#define COLS_W 32
/** Fused decode (lowrank_decode_fused): warps per block, output columns
 * per tile (two 8-column mma tiles), rows of its one m16 tile (the largest
 * M it takes), and the multiple of K its shrink slices are cut at (32 lanes
 * × 8 elements). */
#define DEC_WARPS 8
#define DEC_COLS 16
#define DEC_MAX_M 16
#define DEC_SLICE 256

/* ---- layout checks in the C++ compilers (nvcc, the emulator) ------------ */
#ifdef __cplusplus
#include <cstddef>
static_assert(sizeof(void*) == 8, "device addresses are 64-bit");
static_assert(sizeof(SegmentTable) == 8 * 2 * PROJ_MAX_SEGMENTS + 4 * (2 * PROJ_MAX_SEGMENTS + 2), "SegmentTable");
static_assert(offsetof(SegmentTable, tile_start) == 20 * PROJ_MAX_SEGMENTS, "SegmentTable.tile_start");
static_assert(sizeof(ColumnMap) == 40 && offsetof(ColumnMap, cols) == 24, "ColumnMap");
static_assert(sizeof(ScatterState) == 8 * SCATTER_STATE_U64, "ScatterState fills SCATTER_STATE_U64 words");
static_assert(offsetof(ScatterState, guess) == 8 && offsetof(ScatterState, redo) == 16, "ScatterState");
static_assert(sizeof(AttnArgs) == 24 && offsetof(AttnArgs, scale) == 16, "AttnArgs");
static_assert(sizeof(AdamWArgs) == 64, "AdamWArgs");
static_assert(sizeof(AdamWEntry) == 56 && offsetof(AdamWEntry, lr) == 40, "AdamWEntry");
static_assert(sizeof(OptimArgs) == 64 && offsetof(OptimArgs, decay) == 56, "OptimArgs");
static_assert(MA_D_B_START + 2 <= MA_DESC_WORDS, "descriptor words");
static_assert(MERGE_DIM * MERGE_DIM == MERGE_THREADS, "merge threads form a square");
static_assert(MERGE_ROWS(2) % 4 == 0 && MERGE_VEC(4) % 4 == 0, "merge reads L and R as float4");
#endif

#endif /* LORAFUSE_ABI_H */
