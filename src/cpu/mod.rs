//! The CPU backend: plain, obviously-correct Rust, accumulating in f64.
//!
//! It is the oracle every kernel is tested against, and a working backend on
//! machines without a GPU. Each file here has the same name as the kernel
//! family it mirrors in `kernels/`.

pub mod adapter_sum;
pub mod attention;
pub mod gemm;
pub mod lowrank;
pub mod projection;
pub mod train;

use crate::backend::{Backend, Scalar};
use crate::Result;

/// The CPU backend. Stateless; cheap to create.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Backend for Cpu {
    type Buf<T: Scalar> = Vec<T>;

    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }
    fn zeros<T: Scalar>(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::default(); len])
    }
    fn upload<T: Scalar>(&self, host: &[T]) -> Result<Vec<T>> {
        Ok(host.to_vec())
    }
    fn download<T: Scalar>(&self, buf: &Vec<T>) -> Result<Vec<T>> {
        Ok(buf.clone())
    }
    fn len<T: Scalar>(buf: &Vec<T>) -> usize {
        buf.len()
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
