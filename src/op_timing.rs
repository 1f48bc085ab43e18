//! Per-op time breakdown of a forward/backward: where a training step's
//! time goes, op by op.
//!
//! The trainer calls [`crate::Backend::op_mark`] before each op; every mark
//! closes the interval the previous mark opened. Time is measured between
//! consecutive marks on the device's own clock (CUDA events recorded on the
//! stream, so no synchronisation is added while timing; `Instant` on the
//! CPU), and summed per label. Marks are free when timing is off.
//!
//! Work replayed from a captured CUDA graph (the trainer's
//! `TrainConfig::graph`) has no marks: an event recorded inside a capture
//! cannot be timed outside it, so the CUDA backend records none while
//! capturing ([`crate::Backend::op_timing_on`] tells the trainer to run a
//! timed step eagerly instead). Per-op times then come from that eager
//! profiling step, and a replayed step is timed as a whole.

use std::time::Instant;

/// A point in time on some backend's clock.
pub trait Marker {
    /// Milliseconds from `self` to `later`.
    fn ms_until(&self, later: &Self) -> crate::Result<f64>;
}

impl Marker for Instant {
    fn ms_until(&self, later: &Self) -> crate::Result<f64> {
        Ok(later.duration_since(*self).as_secs_f64() * 1e3)
    }
}

/// The marks of one timing session.
pub struct Timeline<M: Marker> {
    marks: Vec<(&'static str, M)>,
}

impl<M: Marker> Default for Timeline<M> {
    fn default() -> Self {
        Timeline { marks: Vec::new() }
    }
}

/// Total milliseconds and number of intervals per label, in the order each
/// label first appeared.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Breakdown {
    /// `(label, total ms, intervals)`.
    pub ops: Vec<(&'static str, f64, usize)>,
}

impl Breakdown {
    /// Sum over every label.
    pub fn total_ms(&self) -> f64 {
        self.ops.iter().map(|o| o.1).sum()
    }

    /// One JSON object `{label: ms, ...}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(self.ops.iter().map(|(l, ms, _)| (l.to_string(), serde_json::json!(ms))).collect())
    }
}

impl<M: Marker> Timeline<M> {
    /// Adds a mark.
    pub fn push(&mut self, label: &'static str, marker: M) {
        self.marks.push((label, marker));
    }

    /// Sums the intervals between consecutive marks per opening label (the
    /// last mark only closes).
    pub fn breakdown(&self) -> crate::Result<Breakdown> {
        let mut out = Breakdown::default();
        for pair in self.marks.windows(2) {
            let ((label, start), (_, end)) = (&pair[0], &pair[1]);
            let ms = start.ms_until(end)?;
            match out.ops.iter_mut().find(|o| o.0 == *label) {
                Some(o) => {
                    o.1 += ms;
                    o.2 += 1;
                }
                None => out.ops.push((label, ms, 1)),
            }
        }
        Ok(out)
    }
}
