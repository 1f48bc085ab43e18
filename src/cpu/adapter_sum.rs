//! CPU twin of `kernels/adapter_sum.cu`: `W += alpha·leftᵀ·right`, in f64
//! through [`crate::cpu::gemm::matmul`], a block of rows of W at a time so
//! the f64 copy of W never exceeds one block.

use super::gemm::{matmul, Op};
use super::Cpu;
use crate::adapter_sum::{check_merge, AdapterSumOps, MergeShape};
use crate::dtype::Element;
use crate::Result;

/// Rows of W widened to f64 at once (64 rows of an 11008-wide W = 5.6 MB).
const BLOCK_ROWS: usize = 64;

impl AdapterSumOps for Cpu {
    fn adapter_merge<T: Element>(
        &self,
        w: &mut Vec<T>,
        shape: MergeShape,
        left: &Vec<f32>,
        right: &Vec<f32>,
        alpha: f32,
    ) -> Result<()> {
        check_merge(shape, w.len(), left.len(), right.len(), alpha)?;
        let MergeShape { rows, cols, rank } = shape;
        if rank == 0 || rows == 0 || cols == 0 {
            return Ok(());
        }
        let right: Vec<f64> = right.iter().map(|&x| x as f64).collect();
        let mut block = Vec::with_capacity(BLOCK_ROWS * cols);
        let mut left_block = Vec::with_capacity(rank * BLOCK_ROWS);
        for (b, w_rows) in w.chunks_mut(BLOCK_ROWS * cols).enumerate() {
            let (r0, nr) = (b * BLOCK_ROWS, w_rows.len() / cols);
            // leftᵀ restricted to these rows: rank×nr, contiguous.
            left_block.clear();
            for k in 0..rank {
                left_block.extend(left[k * rows + r0..k * rows + r0 + nr].iter().map(|&x| x as f64));
            }
            block.clear();
            block.extend(w_rows.iter().map(|x| x.to_f64()));
            matmul((nr, rank, cols), &left_block, Op::T, &right, Op::N, &mut block, alpha as f64, 1.0)?;
            w_rows.iter_mut().zip(&block).for_each(|(d, &v)| *d = T::from_f64(v));
        }
        Ok(())
    }
}
