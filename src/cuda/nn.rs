//! Launch wrappers for `kernels/nn.cu`: the non-GEMM ops of a transformer
//! ([`NnOps`]) on the GPU, in the compute dtype `T` with an f32 residual
//! stream.
//!
//! Shapes are checked here exactly as the CPU twin checks them. Token and
//! target ranges are checked on the host copy a [`TokenIds`] carries, so a
//! bad token is an `Error::Index` without a download (no stall of the
//! stream); the kernels guard every index as well. The embedding backward
//! groups rows by token on the device (a stable counting sort in workspace
//! scratch), so its sums are deterministic and it needs no host work.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};

use super::{blocks_for, grid, kernels, u32_arg, ArgOrNull, Gpu};
use crate::abi::{self, AdamWArgs, AdamWEntry};
use crate::backend::Backend;
use crate::error::check_len;
use crate::nn::{
    check, optim_state, AdamWStep, AdamWTensor, CrossEntropyOut, GradScale, NnOps, OptimConsts, SeqShape, TokenIds,
};
use crate::Element;
use crate::{Error, Result};

const THREADS: u32 = abi::TRAIN_THREADS;
const WARPS: u32 = THREADS / 32;
/// Grid-stride kernels never need more blocks than this to fill the GPU.
const MAX_BLOCKS: u32 = 65_535;
/// Threads per cross-entropy row.
const CE_THREADS: u32 = abi::CE_THREADS;
/// Rows per partial sum in the LayerNorm parameter gradients.
const LN_ROWS_PER_CHUNK: u32 = 64;

impl AdamWArgs {
    /// The shared part of `hp` (its `lr` and `weight_decay` too, which the
    /// multi-tensor kernel ignores).
    fn new(hp: &AdamWStep) -> Self {
        let step = hp.step.min(i32::MAX as u64) as i32;
        AdamWArgs {
            lr: hp.lr,
            beta1: hp.beta1,
            beta2: hp.beta2,
            eps: hp.eps,
            weight_decay: hp.weight_decay,
            grad_scale: hp.grad_scale,
            correction1: 1.0 - hp.beta1.powi(step),
            correction2: 1.0 - hp.beta2.powi(step),
        }
    }
}

/// The run's optimizer constants as the kernels read them.
fn optim_args(c: &OptimConsts) -> abi::OptimArgs {
    abi::OptimArgs {
        clip_norm: c.clip_norm,
        beta1: c.beta1,
        beta2: c.beta2,
        eps: c.eps,
        min_lr_ratio: c.min_lr_ratio,
        warmup: c.warmup,
        total: c.total,
        decay: c.decay as u32,
        pad: 0,
    }
}

/// An AdamW table entry as the 64-bit words of its C layout, for
/// [`Gpu::device_table`].
fn entry_words(e: &AdamWEntry) -> [u64; 7] {
    bytemuck::cast(*e)
}

/// Most tensors one multi-tensor launch takes (`gridDim.y`'s limit).
const MAX_TENSORS_PER_LAUNCH: usize = 65_535;
/// Blocks per tensor in the multi-tensor launches: enough to stream a
/// large tensor at full bandwidth, while a small one's extra blocks exit at
/// once.
const MULTI_BLOCKS: u32 = 512;

fn launch_err(name: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
    move |e| Error::cuda(format!("launching {name}"), e)
}

fn grid_stride(n: u64) -> u32 {
    blocks_for(n, THREADS).min(MAX_BLOCKS)
}

/// Grid of a kernel that moves `n` elements of `T` in 16-byte packs (one
/// pack per thread per stride).
fn packed_grid<T: Element>(n: u64) -> u32 {
    grid_stride(n.div_ceil((16 / std::mem::size_of::<T>()) as u64))
}

/// `<base>_<dtype>`: the exported name of a kernel instantiated per dtype.
fn typed<T: Element>(base: &str) -> String {
    format!("{base}_{}", T::DTYPE.suffix())
}

/// Rows per chunk of the embedding backward's grouping: one per thread of
/// `embedding_group_count_u32`, whose chunk table has a row per chunk.
const EMB_CHUNK: usize = THREADS as usize;

impl Gpu {
    /// `dwte[tok] += Σ dout[row]` over the rows holding `tok`, each token's
    /// rows summed in ascending row order. The rows are grouped by token on
    /// the device (a stable counting sort, `kernels/nn.cu`) in scratch from
    /// the workspace: no host work, no allocation and no upload per call,
    /// so a captured step regroups each replay's ids. `tokens` is the
    /// device copy; the caller range-checked the host copy.
    fn embedding_backward_wte(
        &self,
        tokens: &CudaSlice<u32>,
        dout: &CudaSlice<f32>,
        vocab: usize,
        width32: u32,
        dwte: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let rows = tokens.len();
        if rows == 0 || vocab == 0 {
            return Ok(());
        }
        let (rows32, vocab32) = (u32_arg("token count", rows)?, u32_arg("vocab", vocab)?);
        let chunks = rows.div_ceil(EMB_CHUNK);
        let table_len = chunks.checked_mul(vocab).ok_or_else(|| {
            Error::invalid(
                "embedding_backward",
                format!(
                    "grouping {rows} tokens over {vocab} vocabulary rows overflows the address space; split the batch"
                ),
            )
        })?;
        let max_groups = rows.min(vocab);
        let ws = self.scratch()?;
        let mut table = ws.take::<u32>(table_len)?;
        let mut rank = ws.take::<u32>(rows)?;
        let mut offsets = ws.take::<u32>(vocab)?;
        let mut order = ws.take::<u32>(rows)?;
        let mut uniq = ws.take::<u32>(max_groups)?;
        let mut starts = ws.take::<u32>(max_groups + 1)?;
        let mut groups = ws.take::<u32>(1)?;
        let chunks32 = chunks as u32;
        let stream = self.stream();

        let name = "embedding_group_count_u32";
        let f = self.function(kernels::NN, name)?;
        // SAFETY: argument types match; `table` holds chunks × vocab and
        // `rank` rows elements, one block per chunk of EMB_CHUNK rows.
        unsafe {
            stream
                .launch_builder(&f)
                .arg(tokens)
                .arg(&rows32)
                .arg(&vocab32)
                .arg(&mut table)
                .arg(&mut rank)
                .launch(grid(chunks32, THREADS, 0))
        }
        .map_err(launch_err(name))?;

        let name = "embedding_group_prefix_u32";
        let f = self.function(kernels::NN, name)?;
        // SAFETY: argument types match; `table` holds chunks × vocab and
        // `offsets` vocab elements.
        unsafe {
            stream.launch_builder(&f).arg(&chunks32).arg(&vocab32).arg(&mut table).arg(&mut offsets).launch(grid(
                grid_stride(vocab as u64),
                THREADS,
                0,
            ))
        }
        .map_err(launch_err(name))?;

        let name = "embedding_group_scan_u32";
        let f = self.function(kernels::NN, name)?;
        // SAFETY: argument types match; there are at most min(rows, vocab)
        // groups, which `uniq` holds and `starts` holds plus one; one block.
        unsafe {
            stream
                .launch_builder(&f)
                .arg(&vocab32)
                .arg(&mut offsets)
                .arg(&mut uniq)
                .arg(&mut starts)
                .arg(&mut groups)
                .launch(grid(1, THREADS, 0))
        }
        .map_err(launch_err(name))?;

        let name = "embedding_group_scatter_u32";
        let f = self.function(kernels::NN, name)?;
        // SAFETY: argument types match; every place a row with a token
        // < vocab is written to is below the number of such rows ≤ rows.
        unsafe {
            stream
                .launch_builder(&f)
                .arg(tokens)
                .arg(&rows32)
                .arg(&vocab32)
                .arg(&table)
                .arg(&rank)
                .arg(&offsets)
                .arg(&mut order)
                .launch(grid(grid_stride(rows as u64), THREADS, 0))
        }
        .map_err(launch_err(name))?;

        let name = "embedding_backward_wte_f32";
        let f = self.function(kernels::NN, name)?;
        // SAFETY: argument types match; blocks past `groups` exit, and every
        // group's token is < vocab and its rows < rows.
        unsafe {
            stream
                .launch_builder(&f)
                .arg(&order)
                .arg(&uniq)
                .arg(&starts)
                .arg(&groups)
                .arg(&width32)
                .arg(dout)
                .arg(dwte)
                .launch(grid(max_groups as u32, THREADS, 0))
        }
        .map(drop)
        .map_err(launch_err(name))
    }
}

impl NnOps for Gpu {
    fn embedding_forward<T: Element>(
        &self,
        tokens: TokenIds<'_, Gpu>,
        wte: &CudaSlice<T>,
        wpe: &CudaSlice<T>,
        shape: SeqShape,
        width: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let lens = (tokens.device.len(), wte.len(), wpe.len(), out.len());
        let vocab = check::embedding_forward(lens, shape, width)?;
        check_len("embedding_forward", "host tokens", tokens.host.len(), tokens.device.len())?;
        check::tokens("embedding_forward", tokens.host, vocab)?;
        let name = typed::<T>("embedding_forward");
        let f = self.function(kernels::NN, &name)?;
        let (vocab32, seq, width32, total) =
            (u32_arg("vocab", vocab)?, u32_arg("seq", shape.seq)?, u32_arg("width", width)?, out.len() as u64);
        // SAFETY: argument types match; every buffer length was checked
        // against the shape and the kernel guards each token against vocab.
        unsafe {
            self.stream()
                .launch_builder(&f)
                .arg(tokens.device)
                .arg(wte)
                .arg(wpe)
                .arg(&vocab32)
                .arg(&seq)
                .arg(&width32)
                .arg(&total)
                .arg(out)
                .launch(grid(grid_stride(total), THREADS, 0))
        }
        .map(drop)
        .map_err(|e| Error::cuda(format!("launching {name}"), e))
    }

    fn embedding_backward(
        &self,
        tokens: TokenIds<'_, Gpu>,
        dout: &CudaSlice<f32>,
        shape: SeqShape,
        width: usize,
        dwte: Option<&mut CudaSlice<f32>>,
        dwpe: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        let lens = (tokens.device.len(), dout.len(), dwte.as_ref().map(|b| b.len()), dwpe.as_ref().map(|b| b.len()));
        let vocab = check::embedding_backward(lens, shape, width)?;
        check_len("embedding_backward", "host tokens", tokens.host.len(), tokens.device.len())?;
        let width32 = u32_arg("width", width)?;
        if let (Some(dwte), Some(vocab)) = (dwte, vocab) {
            check::tokens("embedding_backward", tokens.host, vocab)?;
            self.embedding_backward_wte(tokens.device, dout, vocab, width32, dwte)?;
        }
        if let Some(dwpe) = dwpe {
            let f = self.function(kernels::NN, "embedding_backward_wpe_f32")?;
            let (batch, seq) = (u32_arg("batch", shape.batch)?, u32_arg("seq", shape.seq)?);
            // SAFETY: argument types match; dwpe holds at least seq rows.
            unsafe {
                self.stream().launch_builder(&f).arg(dout).arg(&batch).arg(&seq).arg(&width32).arg(dwpe).launch(grid(
                    blocks_for((shape.seq * width) as u64, THREADS),
                    THREADS,
                    0,
                ))
            }
            .map(drop)
            .map_err(launch_err("embedding_backward_wpe_f32"))?;
        }
        Ok(())
    }

    fn layernorm_forward_strided<T: Element>(
        &self,
        x: &CudaSlice<f32>,
        gamma: &CudaSlice<T>,
        beta: &CudaSlice<T>,
        eps: f64,
        out: &mut CudaSlice<T>,
        out_ld: usize,
        mean: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (rows, d) =
            check::layernorm_forward((x.len(), gamma.len(), beta.len(), out.len(), mean.len(), rstd.len()), out_ld)?;
        let name = typed::<T>("layernorm_forward");
        let f = self.function(kernels::NN, &name)?;
        let (eps, rows32, d32, ld32) =
            (eps as f32, u32_arg("rows", rows)?, u32_arg("width", d)?, u32_arg("out_ld", out_ld)?);
        // SAFETY: argument types match; lengths checked above (out holds
        // rows·out_ld, out_ld ≥ d).
        unsafe {
            self.stream()
                .launch_builder(&f)
                .arg(x)
                .arg(gamma)
                .arg(beta)
                .arg(&eps)
                .arg(&rows32)
                .arg(&d32)
                .arg(out)
                .arg(&ld32)
                .arg(mean)
                .arg(rstd)
                .launch(grid(rows32.div_ceil(WARPS), THREADS, 0))
        }
        .map(drop)
        .map_err(|e| Error::cuda(format!("launching {name}"), e))
    }

    fn residual_layernorm_forward_strided<T: Element>(
        &self,
        x: &CudaSlice<f32>,
        y: &CudaSlice<T>,
        gamma: &CudaSlice<T>,
        beta: &CudaSlice<T>,
        eps: f64,
        resid: &mut CudaSlice<f32>,
        out: &mut CudaSlice<T>,
        out_ld: usize,
        mean: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (rows, d) =
            check::layernorm_forward((x.len(), gamma.len(), beta.len(), out.len(), mean.len(), rstd.len()), out_ld)?;
        check::same_len("residual_layernorm_forward", x.len(), &[("y", y.len()), ("resid", resid.len())])?;
        let name = typed::<T>("residual_layernorm_forward");
        let f = self.function(kernels::NN, &name)?;
        let (eps, rows32, d32, ld32) =
            (eps as f32, u32_arg("rows", rows)?, u32_arg("width", d)?, u32_arg("out_ld", out_ld)?);
        // SAFETY: argument types match; lengths checked above (x, y and
        // resid hold rows·d, out rows·out_ld with out_ld ≥ d, mean and rstd
        // rows).
        unsafe {
            self.stream()
                .launch_builder(&f)
                .arg(x)
                .arg(y)
                .arg(gamma)
                .arg(beta)
                .arg(&eps)
                .arg(&rows32)
                .arg(&d32)
                .arg(resid)
                .arg(out)
                .arg(&ld32)
                .arg(mean)
                .arg(rstd)
                .launch(grid(rows32.div_ceil(WARPS), THREADS, 0))
        }
        .map(drop)
        .map_err(|e| Error::cuda(format!("launching {name}"), e))
    }

    fn layernorm_backward<T: Element>(
        &self,
        dout: &CudaSlice<T>,
        x: &CudaSlice<f32>,
        gamma: &CudaSlice<T>,
        mean: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        dgamma: Option<&mut CudaSlice<f32>>,
        dbeta: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        let lens = (dout.len(), x.len(), gamma.len(), mean.len(), rstd.len(), dx.len());
        let (rows, d) =
            check::layernorm_backward(lens, dgamma.as_ref().map(|b| b.len()), dbeta.as_ref().map(|b| b.len()))?;
        let (rows32, d32) = (u32_arg("rows", rows)?, u32_arg("width", d)?);
        let name = typed::<T>("layernorm_backward_dx");
        let f = self.function(kernels::NN, &name)?;
        // SAFETY: argument types match; lengths checked above.
        unsafe {
            self.stream()
                .launch_builder(&f)
                .arg(dout)
                .arg(x)
                .arg(gamma)
                .arg(mean)
                .arg(rstd)
                .arg(&rows32)
                .arg(&d32)
                .arg(dx)
                .launch(grid(rows32.div_ceil(WARPS), THREADS, 0))
        }
        .map(drop)
        .map_err(|e| Error::cuda(format!("launching {name}"), e))?;
        if dgamma.is_none() && dbeta.is_none() {
            return Ok(());
        }
        let chunks = rows32.div_ceil(LN_ROWS_PER_CHUNK);
        let mut partial_g: CudaSlice<f32> = self.zeros(chunks as usize * d)?;
        let mut partial_b: CudaSlice<f32> = self.zeros(chunks as usize * d)?;
        let name = typed::<T>("layernorm_backward_params_partial");
        let f = self.function(kernels::NN, &name)?;
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (d32.div_ceil(THREADS), chunks, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types match; partials hold chunks·d.
        unsafe {
            self.stream()
                .launch_builder(&f)
                .arg(dout)
                .arg(x)
                .arg(mean)
                .arg(rstd)
                .arg(&rows32)
                .arg(&d32)
                .arg(&LN_ROWS_PER_CHUNK)
                .arg(&mut partial_g)
                .arg(&mut partial_b)
                .launch(cfg)
        }
        .map(drop)
        .map_err(|e| Error::cuda(format!("launching {name}"), e))?;
        let f = self.function(kernels::NN, "layernorm_backward_params_final_f32")?;
        // SAFETY: argument types match; a null address means "skip" in the
        // kernel, a present one holds d floats (checked above).
        unsafe {
            self.stream()
                .launch_builder(&f)
                .arg(&partial_g)
                .arg(&partial_b)
                .arg(&chunks)
                .arg(&d32)
                .arg_or_null(dgamma)
                .arg_or_null(dbeta)
                .launch(grid(d32.div_ceil(THREADS), THREADS, 0))
        }
        .map(drop)
        .map_err(launch_err("layernorm_backward_params_final_f32"))
    }

    fn gelu_forward_strided<T: Element>(
        &self,
        x: &CudaSlice<T>,
        cols: usize,
        out: &mut CudaSlice<T>,
        out_ld: usize,
    ) -> Result<()> {
        if check::strided_elementwise("gelu_forward", x.len(), cols, ("out", out.len()), out_ld)? == 0 {
            return Ok(());
        }
        let (name, n, cols, ld) = (typed::<T>("gelu_forward"), x.len() as u64, cols as u64, out_ld as u64);
        let f = self.function(kernels::NN, &name)?;
        // SAFETY: argument types match; x holds n = rows·cols, out rows·ld
        // with ld ≥ cols.
        unsafe {
            self.stream().launch_builder(&f).arg(x).arg(&n).arg(&cols).arg(&ld).arg(out).launch(grid(
                packed_grid::<T>(n),
                THREADS,
                0,
            ))
        }
        .map(drop)
        .map_err(|e| Error::cuda(format!("launching {name}"), e))
    }

    fn gelu_backward_strided<T: Element>(
        &self,
        dout: &CudaSlice<T>,
        x: &CudaSlice<T>,
        cols: usize,
        dx: &mut CudaSlice<T>,
        dx_ld: usize,
    ) -> Result<()> {
        check::same_len("gelu_backward", x.len(), &[("dout", dout.len())])?;
        if check::strided_elementwise("gelu_backward", x.len(), cols, ("dx", dx.len()), dx_ld)? == 0 {
            return Ok(());
        }
        let (name, n, cols, ld) = (typed::<T>("gelu_backward"), x.len() as u64, cols as u64, dx_ld as u64);
        let f = self.function(kernels::NN, &name)?;
        // SAFETY: argument types match; dout and x hold n = rows·cols, dx
        // rows·ld with ld ≥ cols.
        unsafe {
            self.stream().launch_builder(&f).arg(dout).arg(x).arg(&n).arg(&cols).arg(&ld).arg(dx).launch(grid(
                packed_grid::<T>(n),
                THREADS,
                0,
            ))
        }
        .map(drop)
        .map_err(|e| Error::cuda(format!("launching {name}"), e))
    }

    fn residual_add<T: Element>(&self, x: &CudaSlice<f32>, y: &CudaSlice<T>, out: &mut CudaSlice<f32>) -> Result<()> {
        check::same_len("residual_add", x.len(), &[("y", y.len()), ("out", out.len())])?;
        let (name, n) = (typed::<T>("residual_add"), x.len() as u64);
        let f = self.function(kernels::NN, &name)?;
        // SAFETY: argument types match; all buffers hold n.
        unsafe {
            self.stream().launch_builder(&f).arg(x).arg(y).arg(&n).arg(out).launch(grid(
                grid_stride(n.div_ceil(4)),
                THREADS,
                0,
            ))
        }
        .map(drop)
        .map_err(|e| Error::cuda(format!("launching {name}"), e))
    }

    fn cast_from_f32_strided<T: Element>(
        &self,
        x: &CudaSlice<f32>,
        cols: usize,
        out: &mut CudaSlice<T>,
        out_ld: usize,
    ) -> Result<()> {
        if check::strided_elementwise("cast_from_f32", x.len(), cols, ("out", out.len()), out_ld)? == 0 {
            return Ok(());
        }
        let (name, n, cols, ld) = (typed::<T>("cast_from_f32"), x.len() as u64, cols as u64, out_ld as u64);
        let f = self.function(kernels::NN, &name)?;
        // SAFETY: argument types match; x holds n = rows·cols, out rows·ld
        // with ld ≥ cols. (Packs of 4 per thread per stride.)
        unsafe {
            self.stream().launch_builder(&f).arg(x).arg(&n).arg(&cols).arg(&ld).arg(out).launch(grid(
                grid_stride(n.div_ceil(4)),
                THREADS,
                0,
            ))
        }
        .map(drop)
        .map_err(|e| Error::cuda(format!("launching {name}"), e))
    }

    fn cross_entropy_scaled<T: Element>(
        &self,
        logits: &mut CudaSlice<T>,
        targets: TokenIds<'_, Gpu>,
        vocab: usize,
        padded: usize,
        grad: Option<GradScale<'_, Gpu>>,
    ) -> Result<CrossEntropyOut<Gpu>> {
        check_len("cross_entropy", "host targets", targets.host.len(), targets.device.len())?;
        let rows = check::cross_entropy(logits.len(), targets.host, vocab, padded)?;
        let mut losses: CudaSlice<f32> = self.zeros(rows)?;
        let mut correct: CudaSlice<u32> = self.zeros(rows)?;
        if rows == 0 {
            return Ok(CrossEntropyOut { losses, correct });
        }
        let (vocab32, padded32, write_grad) =
            (u32_arg("vocab", vocab)?, u32_arg("padded vocab", padded)?, grad.is_some() as u32);
        let scale = match grad {
            Some(GradScale::Fixed(s)) => s as f32,
            _ => 0.0,
        };
        // The device-decided scale lives in this call's scratch: written by
        // ce_mean_scale, read by the cross-entropy right after it in stream
        // order (no allocation, and a captured graph recounts every replay).
        // A fixed scale or the forward alone takes no scratch.
        let ws = match grad {
            Some(GradScale::MeanOverScored(_)) => Some(self.scratch()?),
            _ => None,
        };
        let mut device_scale = match (grad, ws.as_ref()) {
            (Some(GradScale::MeanOverScored(over)), Some(ws)) => {
                let mut region = ws.take::<f32>(1)?;
                let count = u32_arg("scored-count targets", over.len())?;
                let f = self.function(kernels::NN, "ce_mean_scale")?;
                // SAFETY: argument types match; `over` holds `count` targets;
                // one block writes the region's one float.
                unsafe {
                    self.stream().launch_builder(&f).arg(over).arg(&count).arg(&mut region).launch(grid(1, THREADS, 0))
                }
                .map_err(launch_err("ce_mean_scale"))?;
                Some(region)
            }
            _ => None,
        };
        let name = typed::<T>("cross_entropy");
        let f = self.function(kernels::NN, &name)?;
        // SAFETY: argument types match; one block per row of `padded` logits
        // (the kernel picks 16-byte accesses only when rows are aligned);
        // the kernel guards each target against vocab; the scale pointer is
        // null or the region ce_mean_scale wrote.
        unsafe {
            self.stream()
                .launch_builder(&f)
                .arg(logits)
                .arg(targets.device)
                .arg(&vocab32)
                .arg(&padded32)
                .arg(&write_grad)
                .arg(&scale)
                .arg_or_null(device_scale.as_mut())
                .arg(&mut losses)
                .arg(&mut correct)
                .launch(grid(u32_arg("rows", rows)?, CE_THREADS, 0))
        }
        .map(drop)
        .map_err(|e| Error::cuda(format!("launching {name}"), e))?;
        Ok(CrossEntropyOut { losses, correct })
    }

    fn adamw(
        &self,
        param: &mut CudaSlice<f32>,
        grad: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        hp: &AdamWStep,
    ) -> Result<()> {
        check::adamw((param.len(), grad.len(), m.len(), v.len()), hp)?;
        let args = AdamWArgs::new(hp);
        let n = param.len() as u64;
        let f = self.function(kernels::NN, "adamw_f32")?;
        // SAFETY: argument types match; all four buffers hold n.
        unsafe {
            self.stream().launch_builder(&f).arg(param).arg(grad).arg(m).arg(v).arg(&n).arg(&args).launch(grid(
                grid_stride(n),
                THREADS,
                0,
            ))
        }
        .map(drop)
        .map_err(launch_err("adamw_f32"))
    }

    fn adamw_many(&self, tensors: &mut [AdamWTensor<'_, Gpu>], hp: &AdamWStep) -> Result<()> {
        for t in tensors.iter() {
            check::adamw((t.param.len(), t.grad.len(), t.m.len(), t.v.len()), hp)?;
        }
        let args = AdamWArgs::new(hp);
        let f = self.function(kernels::NN, "adamw_multi_f32")?;
        let stream = self.stream();
        for chunk in tensors.chunks_mut(MAX_TENSORS_PER_LAUNCH) {
            let longest = chunk.iter().map(|t| t.param.len() as u64).max().unwrap_or(0);
            if longest == 0 {
                continue;
            }
            // The guards order the kernel's accesses on this stream (cudarc
            // records them when they drop, after the launch is queued).
            let mut guards = Vec::with_capacity(4 * chunk.len());
            let mut table = Vec::with_capacity(chunk.len());
            for t in chunk.iter_mut() {
                let n = t.param.len() as u64;
                let (param, g1) = t.param.device_ptr_mut(stream);
                let (grad, g2) = t.grad.device_ptr(stream);
                let (m, g3) = t.m.device_ptr_mut(stream);
                let (v, g4) = t.v.device_ptr_mut(stream);
                guards.extend([g1, g2, g3, g4]);
                table.push(AdamWEntry { param, grad, m, v, n, lr: t.lr, weight_decay: t.weight_decay });
            }
            let entries = table.len() as u32;
            let table = self.device_table(table.iter().flat_map(entry_words).collect())?;
            let cfg = cudarc::driver::LaunchConfig {
                grid_dim: (grid_stride(longest).min(MULTI_BLOCKS), entries, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: argument types match; every entry holds live buffers of
            // n elements each (lengths checked above), which the guards keep
            // ordered on this stream; blockIdx.y < table.len().
            unsafe { stream.launch_builder(&f).arg(&*table).arg(&args).launch(cfg) }
                .map(drop)
                .map_err(launch_err("adamw_multi_f32"))?;
            drop(guards);
        }
        Ok(())
    }

    fn sum_squares_each(&self, xs: &[&CudaSlice<f32>]) -> Result<Vec<f64>> {
        let mut all = Vec::with_capacity(xs.len());
        let stream = self.stream();
        for chunk in xs.chunks(MAX_TENSORS_PER_LAUNCH) {
            let longest = chunk.iter().map(|x| x.len() as u64).max().unwrap_or(0);
            let blocks = grid_stride(longest).min(MULTI_BLOCKS);
            let tensors = chunk.len() as u32;
            let mut guards = Vec::with_capacity(chunk.len());
            let (mut ptrs, mut lens) = (Vec::with_capacity(chunk.len()), Vec::with_capacity(chunk.len()));
            for x in chunk {
                let (p, g) = x.device_ptr(stream);
                guards.push(g);
                ptrs.push(p);
                lens.push(x.len() as u64);
            }
            let ptrs = stream.clone_htod(&ptrs).map_err(|e| Error::cuda("uploading the norm table", e))?;
            let lens = stream.clone_htod(&lens).map_err(|e| Error::cuda("uploading the norm table", e))?;
            let mut partial: CudaSlice<f64> = self.zeros(blocks as usize * chunk.len())?;
            let mut totals: CudaSlice<f64> = self.zeros(chunk.len())?;
            let f = self.function(kernels::NN, "sum_squares_multi_partial_f32")?;
            let cfg = cudarc::driver::LaunchConfig {
                grid_dim: (blocks, tensors, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: argument types match; ptrs[y] addresses lens[y] live
            // f32s (ordered by the guards); partial holds blocks·tensors.
            unsafe { stream.launch_builder(&f).arg(&ptrs).arg(&lens).arg(&mut partial).launch(cfg) }
                .map(drop)
                .map_err(launch_err("sum_squares_multi_partial_f32"))?;
            drop(guards);
            let f = self.function(kernels::NN, "sum_squares_final_f32")?;
            // SAFETY: argument types match; block y adds partials
            // y·blocks..(y+1)·blocks into totals[y].
            unsafe {
                stream.launch_builder(&f).arg(&partial).arg(&blocks).arg(&mut totals).launch(grid(tensors, THREADS, 0))
            }
            .map(drop)
            .map_err(launch_err("sum_squares_final_f32"))?;
            // One download for the whole chunk: the step's only host sync
            // besides the loss.
            all.extend(self.download(&totals)?);
        }
        Ok(all)
    }

    fn fill_zero(&self, x: &mut CudaSlice<f32>) -> Result<()> {
        self.memset_zero(x)
    }

    fn optimizer_prepare(
        &self,
        xs: &[&CudaSlice<f32>],
        norm_tensors: usize,
        consts: &OptimConsts,
        state: &mut CudaSlice<f64>,
        scratch: &mut CudaSlice<f64>,
    ) -> Result<()> {
        check::optim_state("optimizer_prepare", (state.len(), scratch.len()), xs.len(), norm_tensors)?;
        let tensors = u32_arg("optimizer tensors", xs.len())?;
        if xs.len() > MAX_TENSORS_PER_LAUNCH {
            return Err(Error::invalid(
                "optimizer_prepare",
                format!("{} tensors: at most {MAX_TENSORS_PER_LAUNCH} in one state", xs.len()),
            ));
        }
        let stream = self.stream();
        let longest = xs.iter().map(|x| x.len() as u64).max().unwrap_or(0);
        // At most NORM_BLOCKS partials per tensor, the scratch `state` holds.
        let blocks = grid_stride(longest).clamp(1, optim_state::NORM_BLOCKS as u32);
        let mut guards = Vec::with_capacity(xs.len());
        let mut words = Vec::with_capacity(2 * xs.len());
        for x in xs {
            let (p, g) = x.device_ptr(stream);
            guards.push(g);
            words.push(p);
        }
        words.extend(xs.iter().map(|x| x.len() as u64));
        let table = self.device_table(words)?;
        let (base, state_guard) = state.device_ptr_mut(stream);
        let (partial, scratch_guard) = scratch.device_ptr_mut(stream);
        let (ptrs, table_guard) = table.device_ptr(stream);
        let lens = ptrs + 8 * xs.len() as u64;
        let sums = base + (8 * optim_state::HEADER) as u64;
        let c = optim_args(consts);
        if tensors > 0 {
            let f = self.function(kernels::NN, "sum_squares_multi_partial_f32")?;
            let cfg = cudarc::driver::LaunchConfig {
                grid_dim: (blocks, tensors, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: `ptrs` addresses `lens[y]` live f32s each (ordered by
            // the guards); `scratch` has room for blocks·tensors f64s (its
            // length was checked: NORM_BLOCKS ≥ blocks per tensor).
            unsafe { stream.launch_builder(&f).arg(&ptrs).arg(&lens).arg(&partial).launch(cfg) }
                .map(drop)
                .map_err(launch_err("sum_squares_multi_partial_f32"))?;
            let f = self.function(kernels::NN, "sum_squares_final_f32")?;
            // SAFETY: block y adds partials y·blocks..(y+1)·blocks into
            // sums[y], which lies inside `state`.
            unsafe {
                stream.launch_builder(&f).arg(&partial).arg(&blocks).arg(&sums).launch(grid(tensors, THREADS, 0))
            }
            .map(drop)
            .map_err(launch_err("sum_squares_final_f32"))?;
        }
        let f = self.function(kernels::NN, "optimizer_decide_f32")?;
        let norm_tensors = norm_tensors as u32;
        // SAFETY: argument types match; one block reads sums[..tensors] and
        // writes the header, both inside `state`.
        unsafe {
            stream.launch_builder(&f).arg(&base).arg(&tensors).arg(&norm_tensors).arg(&c).launch(grid(1, THREADS, 0))
        }
        .map(drop)
        .map_err(launch_err("optimizer_decide_f32"))?;
        drop((guards, state_guard, scratch_guard, table_guard));
        Ok(())
    }

    fn adamw_many_device(
        &self,
        tensors: &mut [AdamWTensor<'_, Gpu>],
        consts: &OptimConsts,
        state: &CudaSlice<f64>,
    ) -> Result<()> {
        let lens: Vec<_> = tensors.iter().map(|t| (t.param.len(), t.grad.len(), t.m.len(), t.v.len())).collect();
        check::adamw_many_device(state.len(), &lens)?;
        let longest = lens.iter().map(|l| l.0 as u64).max().unwrap_or(0);
        if longest == 0 {
            return Ok(());
        }
        if tensors.len() > MAX_TENSORS_PER_LAUNCH {
            return Err(Error::invalid(
                "adamw_many_device",
                format!("{} tensors: at most {MAX_TENSORS_PER_LAUNCH} in one state", tensors.len()),
            ));
        }
        let (stream, entries) = (self.stream(), tensors.len() as u32);
        let mut guards = Vec::with_capacity(4 * tensors.len());
        let mut words = Vec::with_capacity(7 * tensors.len());
        for t in tensors.iter_mut() {
            let n = t.param.len() as u64;
            let (param, g1) = t.param.device_ptr_mut(stream);
            let (grad, g2) = t.grad.device_ptr(stream);
            let (m, g3) = t.m.device_ptr_mut(stream);
            let (v, g4) = t.v.device_ptr_mut(stream);
            guards.extend([g1, g2, g3, g4]);
            words.extend(entry_words(&AdamWEntry { param, grad, m, v, n, lr: t.lr, weight_decay: t.weight_decay }));
        }
        let table = self.device_table(words)?;
        let f = self.function(kernels::NN, "adamw_multi_state_f32")?;
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (grid_stride(longest).min(MULTI_BLOCKS), entries, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let c = optim_args(consts);
        // SAFETY: argument types match; every entry holds live buffers of n
        // elements (checked above), ordered on this stream by the guards;
        // `state` holds at least the header.
        unsafe { stream.launch_builder(&f).arg(&*table).arg(state).arg(&c).launch(cfg) }
            .map(drop)
            .map_err(launch_err("adamw_multi_state_f32"))?;
        drop(guards);
        Ok(())
    }
}
