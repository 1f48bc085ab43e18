//! CPU twin of `kernels/projection.cu`: the same column draws, the same f32
//! products in the gather (so results match the GPU bit for bit), and f64
//! sums in the scatter.

use rayon::prelude::*;

use super::Cpu;
use crate::dtype::Element;
use crate::projection::{
    check_theta, column_scale, PreparedProjection, Projection, ProjectionLayout, ProjectionOps, ScatterMode,
};
use crate::Result;

/// Rows per parallel work item: large enough that per-item histograms of d
/// counters stay cheap next to the hashing.
const ROWS_PER_TASK: u64 = 1 << 20;

/// `n_j` for every column, counted in parallel chunks.
pub fn projection_counts(projection: &Projection) -> Vec<u32> {
    let (rows, cols) = (projection.rows(), projection.cols() as usize);
    let tasks = rows.div_ceil(ROWS_PER_TASK);
    (0..tasks)
        .into_par_iter()
        .map(|t| {
            let mut counts = vec![0u32; cols];
            for i in t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(rows) {
                counts[projection.column(i) as usize] += 1;
            }
            counts
        })
        .reduce(
            || vec![0u32; cols],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

/// `θ ⊙ scale` in f32, exactly as `projection_prescale` computes it.
fn prescale(theta: &[f32], scale: &[f32]) -> Vec<f32> {
    theta.iter().zip(scale).map(|(t, s)| t * s).collect()
}

impl ProjectionOps for Cpu {
    fn projection_prepare(&self, projection: &Projection) -> Result<PreparedProjection<Cpu>> {
        let counts = projection_counts(projection);
        let scale = counts.iter().map(|&n| column_scale(n)).collect();
        Ok(PreparedProjection {
            projection: projection.clone(),
            max_count: counts.iter().copied().max().unwrap_or(0),
            counts,
            scale,
            index: projection.index().map(<[u32]>::to_vec),
            scatter_workspace: Default::default(),
        })
    }

    fn projection_gather<T: Element>(
        &self,
        prepared: &PreparedProjection<Cpu>,
        theta: &Vec<f32>,
        layout: &ProjectionLayout,
        segments: &mut [&mut Vec<T>],
    ) -> Result<()> {
        let p = &prepared.projection;
        check_theta("projection_gather", "theta", p, theta.len())?;
        layout.check_call::<T>("projection_gather", p, segments.iter().map(|s| s.len()))?;
        let scaled = prescale(theta, &prepared.scale);
        for (seg, dst) in layout.segments().iter().zip(segments.iter_mut()) {
            dst.par_iter_mut().enumerate().for_each(|(e, out)| {
                *out = T::from_f32(scaled[p.column(seg.start + e as u64) as usize]);
            });
        }
        Ok(())
    }

    fn projection_scatter<T: Element>(
        &self,
        prepared: &PreparedProjection<Cpu>,
        layout: &ProjectionLayout,
        grads: &[&Vec<T>],
        _mode: ScatterMode,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let p = &prepared.projection;
        check_theta("projection_scatter", "out", p, out.len())?;
        layout.check_call::<T>("projection_scatter", p, grads.iter().map(|g| g.len()))?;
        let mut sums = vec![0f64; p.cols() as usize];
        let mut finite = true;
        for (seg, g) in layout.segments().iter().zip(grads) {
            for (e, v) in g.iter().enumerate() {
                let v = v.to_f64();
                finite &= v.is_finite();
                sums[p.column(seg.start + e as u64) as usize] += v;
            }
        }
        for ((o, s), &scale) in out.iter_mut().zip(&sums).zip(&prepared.scale) {
            *o = if finite { (s * scale as f64) as f32 } else { f32::NAN };
        }
        Ok(())
    }
}
