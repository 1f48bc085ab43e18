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
    /// Filled with [`crate::backend::poison`], never zeros: a CPU test
    /// that reads an element before its producer wrote it sees NaN.
    fn uninit<T: Scalar>(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![crate::backend::poison::<T>(); len])
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

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::Cpu;
    use crate::backend::{poison, Backend};
    use crate::lowrank::packed::{PackedLayout, PackedOps};
    use crate::lowrank::{Adapter, LinearShape};
    use crate::nn::NnOps;
    use crate::Element;

    fn poisoned<T: Element>(buf: &[T]) -> usize {
        buf.iter().filter(|v| v.to_f64().is_nan()).count()
    }

    #[test]
    fn poison_is_nan_in_every_float_and_a_sentinel_in_integers() {
        assert!(poison::<f32>().is_nan());
        assert!(poison::<f64>().is_nan());
        assert!(poison::<f16>().is_nan());
        assert!(poison::<bf16>().is_nan());
        assert_eq!(poison::<u32>(), u32::MAX - 1);
        assert_ne!(poison::<u32>(), crate::nn::IGNORE, "an unwritten target must not read as ignored");
        assert_eq!(poison::<u64>(), u64::MAX - 1);
        assert_eq!(poison::<u8>(), 0xFE);
    }

    #[test]
    fn cpu_uninit_is_poison_not_zeros() {
        let f: Vec<f32> = Cpu.uninit(7).unwrap();
        assert_eq!((f.len(), poisoned(&f)), (7, 7));
        let h: Vec<bf16> = Cpu.uninit(5).unwrap();
        assert_eq!(poisoned(&h), 5);
        let ids: Vec<u32> = Cpu.uninit(3).unwrap();
        assert_eq!(ids, vec![u32::MAX - 1; 3]);
    }

    /// Ops that overwrite their outputs leave no poison; a strided writer
    /// leaves it in the columns past its width, which is what the poison
    /// is there to show when a caller relies on them.
    #[test]
    fn overwriting_ops_leave_no_poison_strided_ones_leave_it_in_their_spare_columns() {
        let (rows, width, ld) = (3, 8, 11);
        let x: Vec<f32> = (0..rows * width).map(|i| (i as f32 * 0.37).sin()).collect();
        let (gamma, beta) = (vec![1.0f32; width], vec![0.1f32; width]);
        let (mut out, mut mean, mut rstd) =
            (Cpu.uninit::<f32>(rows * width).unwrap(), Cpu.uninit(rows).unwrap(), Cpu.uninit(rows).unwrap());
        Cpu.layernorm_forward(&x, &gamma, &beta, 1e-5, &mut out, &mut mean, &mut rstd).unwrap();
        assert_eq!((poisoned(&out), poisoned(&mean), poisoned(&rstd)), (0, 0, 0));

        let mut strided = Cpu.uninit::<f32>(rows * ld).unwrap();
        Cpu.gelu_forward_strided(&x, width, &mut strided, ld).unwrap();
        assert_eq!(poisoned(&strided), rows * (ld - width));
        assert!(strided.chunks(ld).all(|row| poisoned(&row[..width]) == 0));
    }

    /// The packed forward writes every spare column of `x_packed` (rank,
    /// bias and zero padding) before its GEMM reads them, so the trainer
    /// may leave the buffer unset and write only the first K columns.
    #[test]
    fn packed_forward_fills_every_spare_column_of_an_unset_x_packed() {
        let (m, k, n, r) = (5, 12, 7, 3);
        let layout = PackedLayout::new(LinearShape { m, k, n, r }, true).unwrap();
        let seq = |len: usize, f: f32| (0..len).map(|i| (i as f32 * f).cos() * 0.5).collect::<Vec<f32>>();
        let (w, bias, a, b) = (seq(n * k, 0.3), seq(n, 0.7), seq(r * k, 1.1), seq(n * r, 0.9));
        let adapter = Adapter::<Cpu> { a: &a, b: &b, u: None, v: None, scale: 2.0 };
        let mut w_packed = Cpu.uninit::<f32>(layout.w_len()).unwrap();
        Cpu.pack_weight(&layout, &w, Some(&bias), adapter, &mut w_packed).unwrap();
        assert_eq!(poisoned(&w_packed), 0, "pack_weight writes all of w_packed");
        let mut x_packed = Cpu.uninit::<f32>(layout.x_len()).unwrap();
        Cpu.pack_rows(m, k, layout.x_ld(), &seq(m * k, 0.5), &mut x_packed).unwrap();
        assert_eq!(poisoned(&x_packed), m * layout.pad());
        let (mut y, mut t) = (Cpu.uninit::<f32>(m * n).unwrap(), Cpu.uninit::<f32>(m * r).unwrap());
        Cpu.packed_forward(&layout, &mut x_packed, &w_packed, adapter, &mut y, Some(&mut t)).unwrap();
        assert_eq!((poisoned(&x_packed), poisoned(&y), poisoned(&t)), (0, 0, 0));
    }
}
