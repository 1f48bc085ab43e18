//! Launch wrappers for `kernels/attention.cu`: causal multi-head attention
//! in the memory-saving ("flash") form, with f32, f16 or bf16 storage and
//! f32 accumulation ([`AttentionOps`] for [`Gpu`]). The f64 twin is
//! [`crate::cpu::attention`]; the layouts and the math are in
//! [`crate::attention`].
//!
//! The forward keeps one log-sum-exp per query instead of the
//! batch·heads·seq·seq probabilities; the backward recomputes them. Every
//! output element has one writer and every sum runs in a fixed order, so
//! two runs on the same inputs give the same bits.
//!
//! f16 and bf16 run FlashAttention-2-style tensor-core kernels (`mma.sync`
//! m16n8k16, head dims padded to 64 or 128); f32 runs CUDA-core kernels
//! (head dims padded to 32, 64 or 128). Any `head_dim` in
//! `1..=`[`MAX_HEAD_DIM`] works.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{blocks_for, kernels, u32_arg, Gpu};
use crate::abi::{self, AttnArgs};
use crate::attention::{check_lengths, AttentionOps, AttnShape};
use crate::dtype::{DType, Element};
use crate::{Error, Result};

/// The largest `head_dim` the CUDA attention kernels support.
pub const MAX_HEAD_DIM: usize = 128;

/// Rows (queries, or keys for dK/dV) per block of the tensor-core kernels.
const TC_ROWS: u32 = abi::ATTN_TC_ROWS;
/// Threads per block of the delta kernel: one warp per query.
const DELTA_THREADS: u32 = 256;
/// The CUDA limit on `gridDim.y` (query or key tiles per head).
const MAX_GRID_Y: usize = 65_535;
/// The CUDA limit on `gridDim.x` (batch·heads, or delta blocks).
const MAX_GRID_X: usize = i32::MAX as usize;

/// The kernels' head-dim bucket for `head_dim` (1..=128): the CUDA-core
/// (f32) kernels have 32, 64 and 128, the tensor-core ones 64 and 128.
fn bucket(head_dim: usize, tensor_cores: bool) -> u32 {
    match head_dim {
        0..=32 if !tensor_cores => 32,
        0..=64 => 64,
        _ => 128,
    }
}

/// Dynamic shared memory (bytes) of the tensor-core (forward, dQ, dK/dV)
/// kernels for bucket `d`, from abi.h (16-bit tiles of pitch d + 8, the
/// streamed ones double-buffered).
fn tc_smem_bytes(d: u32) -> [u32; 3] {
    match d {
        64 => [abi::ATTN_TC_HD64_FWD_SMEM_BYTES, abi::ATTN_TC_HD64_DQ_SMEM_BYTES, abi::ATTN_TC_HD64_DKV_SMEM_BYTES],
        _ => [abi::ATTN_TC_HD128_FWD_SMEM_BYTES, abi::ATTN_TC_HD128_DQ_SMEM_BYTES, abi::ATTN_TC_HD128_DKV_SMEM_BYTES],
    }
}

/// Rows (queries, or keys for dK/dV) per block of the CUDA-core (forward,
/// dQ, dK/dV) kernels for bucket `d`: 16 per row of a lane group (abi.h's
/// `ATTN_HD<d>_*_R`).
fn tile_rows(d: u32) -> [u32; 3] {
    use abi::*;
    let [f, q, k] = match d {
        32 => [ATTN_HD32_FWD_R, ATTN_HD32_DQ_R, ATTN_HD32_DKV_R],
        64 => [ATTN_HD64_FWD_R, ATTN_HD64_DQ_R, ATTN_HD64_DKV_R],
        _ => [ATTN_HD128_FWD_R, ATTN_HD128_DQ_R, ATTN_HD128_DKV_R],
    };
    [16 * f, 16 * q, 16 * k]
}

/// Dynamic shared memory in bytes of each CUDA-core kernel for bucket `d`,
/// from abi.h's per-bucket values of the formulas the kernels check (they
/// trap when launched with less).
fn smem_bytes(d: u32) -> [u32; 3] {
    use abi::*;
    match d {
        32 => [ATTN_HD32_FWD_SMEM_BYTES, ATTN_HD32_DQ_SMEM_BYTES, ATTN_HD32_DKV_SMEM_BYTES],
        64 => [ATTN_HD64_FWD_SMEM_BYTES, ATTN_HD64_DQ_SMEM_BYTES, ATTN_HD64_DKV_SMEM_BYTES],
        _ => [ATTN_HD128_FWD_SMEM_BYTES, ATTN_HD128_DQ_SMEM_BYTES, ATTN_HD128_DKV_SMEM_BYTES],
    }
}

/// What one call launches: the kernel arguments, the bucket and grid sizes.
struct Plan {
    args: AttnArgs,
    d: u32,
    /// batch·heads: `gridDim.x` of the tiled kernels.
    heads_total: u32,
    /// The f16/bf16 tensor-core kernels (else the f32 CUDA-core ones).
    tensor_cores: bool,
}

impl Plan {
    /// Name, rows per block and dynamic shared memory of tiled kernel
    /// `which` (0 forward, 1 dQ, 2 dK/dV) for storage type `suffix`.
    fn kernel(&self, which: usize, suffix: &str) -> (String, u32, u32) {
        let kind = ["forward", "backward_dq", "backward_dkv"][which];
        if self.tensor_cores {
            (format!("attention_{kind}_tc_hd{}_{suffix}", self.d), TC_ROWS, tc_smem_bytes(self.d)[which])
        } else {
            (format!("attention_{kind}_hd{}_{suffix}", self.d), tile_rows(self.d)[which], smem_bytes(self.d)[which])
        }
    }
}

fn plan<T: Element>(op: &'static str, shape: AttnShape) -> Result<Plan> {
    if shape.head_dim > MAX_HEAD_DIM {
        return Err(Error::invalid(
            format!("{op} head_dim"),
            format!(
                "{} exceeds the CUDA attention kernels' limit of {MAX_HEAD_DIM} (supported: 1..={MAX_HEAD_DIM})",
                shape.head_dim
            ),
        ));
    }
    let too_big = |what: &str, v: usize, limit: usize| {
        Error::invalid(format!("{op} {what}"), format!("{v} exceeds the CUDA attention kernels' limit of {limit}"))
    };
    let (seq, heads_total) = (shape.seq.seq, shape.seq.batch * shape.heads);
    // The kernels index positions with i32 and tiles with gridDim.y; the
    // smallest tile (32 rows) gives the most tiles.
    let max_seq = (i32::MAX as usize).min(MAX_GRID_Y * 32);
    if seq > max_seq {
        return Err(too_big("sequence length", seq, max_seq));
    }
    if heads_total > MAX_GRID_X {
        return Err(too_big("batch·heads", heads_total, MAX_GRID_X));
    }
    let queries = heads_total * seq;
    if queries.div_ceil((DELTA_THREADS / 32) as usize) > MAX_GRID_X {
        return Err(too_big("batch·heads·seq", queries, MAX_GRID_X * (DELTA_THREADS / 32) as usize));
    }
    let scale = 1.0 / (shape.head_dim as f64).sqrt();
    let tensor_cores = T::DTYPE != DType::F32;
    Ok(Plan {
        args: AttnArgs {
            batch: shape.seq.batch as u32,
            seq: seq as u32,
            heads: shape.heads as u32,
            hd: shape.head_dim as u32,
            scale: scale as f32,
            scale_log2: (scale * std::f64::consts::LOG2_E) as f32,
        },
        d: bucket(shape.head_dim, tensor_cores),
        heads_total: heads_total as u32,
        tensor_cores,
    })
}

fn launch_err(name: &str) -> impl FnOnce(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::cuda(format!("launching {name}"), e)
}

/// A launch of one block per `rows` rows (`gridDim.y`) over every head.
fn tiled_grid(plan: &Plan, seq: usize, rows: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (plan.heads_total, seq.div_ceil(rows as usize) as u32, 1),
        block_dim: (if plan.tensor_cores { abi::ATTN_TC_THREADS } else { abi::ATTN_THREADS }, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// Causal attention forward: `out` (tokens × W, W = heads·head_dim) and the
/// per-query log-sum-exp of the scaled scores `lse` (batch·heads·seq,
/// natural log) from `qkv` (tokens × 3W). Overwrites both.
///
/// Errors: lengths that do not match `shape` ([`check_lengths`]),
/// `head_dim` above [`MAX_HEAD_DIM`], shapes past the kernels' 32-bit grid
/// limits, or a build without kernels.
pub fn attention_forward<T: Element>(
    gpu: &Gpu,
    qkv: &CudaSlice<T>,
    shape: AttnShape,
    out: &mut CudaSlice<T>,
    lse: &mut CudaSlice<f32>,
) -> Result<()> {
    attention_forward_strided(gpu, qkv, shape, out, shape.width(), lse)
}

/// [`attention_forward`] writing the output's rows `out_ld` ≥ width apart
/// (a packed attn.c_proj's `x_packed`; the other columns are left alone).
pub fn attention_forward_strided<T: Element>(
    gpu: &Gpu,
    qkv: &CudaSlice<T>,
    shape: AttnShape,
    out: &mut CudaSlice<T>,
    out_ld: usize,
    lse: &mut CudaSlice<f32>,
) -> Result<()> {
    let op = "attention_forward";
    check_lengths(op, shape, qkv.len(), shape.seq.tokens() * shape.width(), lse.len())?;
    crate::attention::check_strided_out(op, shape, out.len(), out_ld)?;
    let out_ld32 = u32_arg("out_ld", out_ld)?;
    let plan = plan::<T>(op, shape)?;
    let (name, rows, smem) = plan.kernel(0, T::DTYPE.suffix());
    let f = gpu.function_with_shared(kernels::ATTENTION, &name, smem)?;
    // SAFETY: argument types match the kernel; every buffer length was
    // checked against the shape, and the grid covers each (head, query tile)
    // once with the shared memory the kernel carves up.
    unsafe {
        gpu.stream().launch_builder(&f).arg(qkv).arg(&plan.args).arg(out).arg(&out_ld32).arg(lse).launch(tiled_grid(
            &plan,
            shape.seq.seq,
            rows,
            smem,
        ))
    }
    .map(drop)
    .map_err(launch_err(&name))
}

/// Causal attention backward: overwrites `dqkv` (tokens × 3W, the same
/// layout as `qkv`) with the gradient of the forward's `out` given `dout`.
/// `out` and `lse` must be what [`attention_forward`] returned for this
/// `qkv`: the probabilities are recomputed as `exp(s − lse)` and the
/// softmax row sums taken as `dout_i · out_i`.
///
/// Runs three kernels: the per-query `dout_i · out_i` (into a scratch
/// buffer of batch·heads·seq floats allocated on the stream), dQ by query
/// tile, then dK and dV by key tile. No atomics: the result is bit-identical
/// from run to run.
///
/// Errors: as [`attention_forward`], plus a `dqkv` whose length differs
/// from `qkv`'s.
pub fn attention_backward<T: Element>(
    gpu: &Gpu,
    dout: &CudaSlice<T>,
    qkv: &CudaSlice<T>,
    out: &CudaSlice<T>,
    lse: &CudaSlice<f32>,
    shape: AttnShape,
    dqkv: &mut CudaSlice<T>,
) -> Result<()> {
    let w = shape.width();
    attention_backward_strided(gpu, dout, qkv, out, w, lse, shape, dqkv, 3 * w)
}

/// [`attention_backward`] reading `out` from rows `out_ld` ≥ width apart
/// (a packed attn.c_proj's `x_packed`; only the delta pre-pass reads it)
/// and writing `dqkv`'s rows `dqkv_ld` ≥ 3·width apart (a packed c_attn's
/// `dy_packed`; the columns past 3·width are not written).
///
/// Errors: as [`attention_backward`], plus `dqkv_ld` below 3·width or
/// above 2³² − 1, or a `dqkv` of other than tokens·`dqkv_ld` elements.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_strided<T: Element>(
    gpu: &Gpu,
    dout: &CudaSlice<T>,
    qkv: &CudaSlice<T>,
    out: &CudaSlice<T>,
    out_ld: usize,
    lse: &CudaSlice<f32>,
    shape: AttnShape,
    dqkv: &mut CudaSlice<T>,
    dqkv_ld: usize,
) -> Result<()> {
    let op = "attention_backward";
    check_lengths(op, shape, qkv.len(), dout.len(), lse.len())?;
    crate::attention::check_strided_out(op, shape, out.len(), out_ld)?;
    let out_ld32 = u32_arg("out_ld", out_ld)?;
    crate::attention::check_strided_dqkv(op, shape, dqkv.len(), dqkv_ld)?;
    let dqkv_ld32 = u32_arg("dqkv_ld", dqkv_ld)?;
    let plan = plan::<T>(op, shape)?;
    let suffix = T::DTYPE.suffix();

    // The delta pre-pass writes one float per query, every one, so the
    // scratch needs no zeroing and comes from the Gpu's workspace (no pool
    // call per layer per step).
    let ws = gpu.scratch()?;
    let mut delta = ws.take::<f32>(shape.lse_len())?;
    let name = format!("attention_backward_delta_{suffix}");
    let f = gpu.function(kernels::ATTENTION, &name)?;
    let queries = shape.lse_len() as u64;
    let blocks = blocks_for(queries, DELTA_THREADS / 32);
    // SAFETY: argument types match; dout holds tokens·W elements, out
    // tokens·out_ld with out_ld ≥ W, and delta one float per query, the warp
    // count the grid covers.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(dout)
            .arg(out)
            .arg(&out_ld32)
            .arg(&plan.args)
            .arg(&mut delta)
            .launch(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (DELTA_THREADS, 1, 1), shared_mem_bytes: 0 })
    }
    .map(drop)
    .map_err(launch_err(&name))?;

    for which in [1, 2] {
        let (name, rows, smem) = plan.kernel(which, suffix);
        let f = gpu.function_with_shared(kernels::ATTENTION, &name, smem)?;
        // SAFETY: argument types match; lengths were checked against the
        // shape (dqkv: tokens·dqkv_ld, dqkv_ld ≥ 3W); the dq kernel writes
        // only the q third of each dqkv row and the dkv kernel only the k and
        // v thirds, each element once, never the columns past 3W.
        unsafe {
            gpu.stream()
                .launch_builder(&f)
                .arg(dout)
                .arg(qkv)
                .arg(lse)
                .arg(&delta)
                .arg(&plan.args)
                .arg(&mut *dqkv)
                .arg(&dqkv_ld32)
                .launch(tiled_grid(&plan, shape.seq.seq, rows, smem))
        }
        .map(drop)
        .map_err(launch_err(&name))?;
    }
    Ok(())
}

impl AttentionOps for Gpu {
    fn attention_forward_strided<T: Element>(
        &self,
        qkv: &CudaSlice<T>,
        shape: AttnShape,
        out: &mut CudaSlice<T>,
        out_ld: usize,
        lse: &mut CudaSlice<f32>,
    ) -> Result<()> {
        attention_forward_strided(self, qkv, shape, out, out_ld, lse)
    }

    fn attention_backward_strided<T: Element>(
        &self,
        dout: &CudaSlice<T>,
        qkv: &CudaSlice<T>,
        out: &CudaSlice<T>,
        out_ld: usize,
        lse: &CudaSlice<f32>,
        shape: AttnShape,
        dqkv: &mut CudaSlice<T>,
        dqkv_ld: usize,
    ) -> Result<()> {
        attention_backward_strided(self, dout, qkv, out, out_ld, lse, shape, dqkv, dqkv_ld)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte counts `scripts/kernel-emu` (attention) prints from the kernels'
    /// own `*_smem_floats` templates: each bucket launches with its own.
    #[test]
    fn shared_memory_matches_the_kernels() {
        assert_eq!(smem_bytes(32), [41_984, 50_688, 68_096]);
        assert_eq!(smem_bytes(64), [66_560, 58_624, 67_584]);
        assert_eq!(smem_bytes(128), [74_624, 70_656, 75_520]);
    }

    /// The tensor-core kernels' byte counts, as the emulator prints them from
    /// `tc_fwd_smem`, `tc_dq_smem` and `tc_dkv_smem`.
    #[test]
    fn tensor_core_shared_memory_matches_the_kernels() {
        assert_eq!(tc_smem_bytes(64), [46_080, 55_296, 56_320]);
        assert_eq!(tc_smem_bytes(128), [87_040, 69_632, 70_144]);
    }

    #[test]
    fn buckets_cover_every_supported_head_dim() {
        for tc in [false, true] {
            let smallest = if tc { 64 } else { 32 };
            for hd in 1..=MAX_HEAD_DIM {
                let d = bucket(hd, tc) as usize;
                assert!(hd <= d && (d == smallest || hd > d / 2), "hd {hd} tensor cores {tc} -> bucket {d}");
            }
        }
    }
}
