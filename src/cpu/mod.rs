//! The CPU backend: plain, obviously-correct Rust, accumulating in f64.
//!
//! It is the oracle every kernel is tested against, and a working backend on
//! machines without a GPU. Each file here has the same name as the kernel
//! family it mirrors in `kernels/`.

pub mod adapter_sum;
pub mod attention;
pub mod gemm;
pub mod lowrank;
pub mod multi_adapter;
pub mod nn;
pub mod projection;

use std::time::Instant;

use crate::backend::{Backend, Scalar};
use crate::dtype::Element;
use crate::op_timing::{Breakdown, Timeline};
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
    fn upload_into<T: Scalar>(&self, host: &[T], buf: &mut Vec<T>) -> Result<()> {
        crate::error::check_len("upload_into", "host data", host.len(), buf.len())?;
        buf.copy_from_slice(host);
        Ok(())
    }
    fn copy_into<T: Scalar>(&self, src: &Vec<T>, dst: &mut Vec<T>) -> Result<()> {
        crate::error::check_len("copy_into", "source", src.len(), dst.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }
    fn copy_range<T: Scalar>(
        &self,
        src: &Vec<T>,
        src_off: usize,
        dst: &mut Vec<T>,
        dst_off: usize,
        n: usize,
    ) -> Result<()> {
        crate::backend::check_copy_range(src.len(), src_off, dst.len(), dst_off, n)?;
        dst[dst_off..dst_off + n].copy_from_slice(&src[src_off..src_off + n]);
        Ok(())
    }
    fn len<T: Scalar>(buf: &Vec<T>) -> usize {
        buf.len()
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn op_timing_start(&self) -> Result<()> {
        TIMELINE.with_borrow_mut(|t| *t = Some(Timeline::default()));
        Ok(())
    }
    fn op_mark(&self, label: &'static str) {
        TIMELINE.with_borrow_mut(|t| {
            if let Some(t) = t.as_mut() {
                t.push(label, Instant::now());
            }
        });
    }
    fn op_timing_finish(&self) -> Result<Breakdown> {
        self.op_mark("end");
        TIMELINE.with_borrow_mut(Option::take).map(|t| t.breakdown()).unwrap_or_else(|| Ok(Breakdown::default()))
    }
}

thread_local! {
    /// The CPU backend is a stateless `Copy` value, so its timeline lives
    /// with the thread that calls the ops: timing covers the work this
    /// thread issues (ops fan out to rayon inside and return before the
    /// next mark), and runs on other threads do not mix in.
    static TIMELINE: std::cell::RefCell<Option<Timeline<Instant>>> = const { std::cell::RefCell::new(None) };
}

/// `src` rounded into `dst`'s dtype (the twins' results, stored like a
/// kernel's).
pub(crate) fn store<T: Element>(dst: &mut [T], src: &[f64]) {
    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = T::from_f64(s));
}
