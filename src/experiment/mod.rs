//! Experiments built from the crate's pieces (training, sums, the cosine
//! diagnostic, evaluation). Nothing below `experiment` imports it.
//!
//! - [`summation`]: when do summed adapters interfere? One adapter per
//!   domain and one per combination of domains (trained on the combined
//!   data); each combination's exact sum against its merged-data adapter,
//!   the change in held-out perplexity against the RMS cosine of the
//!   summed adapters, and a line fitted through them.
//! - [`domains`]: per-domain datasets, their combinations, and the check
//!   that no held-out example is trained on anywhere in a run.
//! - [`stats`]: combinations of indices, least squares and rank correlation.
//! - [`plot`]: the scatter plot with its fit line, as SVG.

pub mod domains;
pub mod plot;
pub mod stats;
pub mod summation;
