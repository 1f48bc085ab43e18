//! Uni-LoRA shared projection: properties of the CPU oracle, validation of
//! every input, and GPU against CPU (bit-identical columns and gathers).

// Without the `cuda` feature the GPU tests compile out, and the helpers
// only they use would warn.
#![cfg_attr(not(feature = "cuda"), allow(dead_code, unused_imports))]

mod common;

use half::{bf16, f16};
use lorafuse::cpu::Cpu;
#[cfg(feature = "cuda")]
use lorafuse::cuda::Gpu;
use lorafuse::projection::*;
use lorafuse::rng::Rng;
use lorafuse::testing::{check_bounded, ErrorBound, Magnitude};
use lorafuse::{Backend, DType, Element, Error};
use proptest::prelude::*;

/// A packed layout of `parts` segments with awkward (odd, uneven) lengths
/// summing to `rows`.
fn layout(rows: u64, parts: usize, dtype: DType, seed: u64) -> ProjectionLayout {
    let parts = parts.clamp(1, rows as usize);
    let mut rng = Rng::new(seed);
    let mut cuts: Vec<u64> = (1..parts).map(|_| 1 + rng.below(rows - 1)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut bounds = vec![0];
    bounds.extend(cuts);
    bounds.push(rows);
    let tensors = bounds.windows(2).enumerate().map(|(k, w)| (format!("seg{k}"), [1, (w[1] - w[0]) as usize]));
    ProjectionLayout::packed(dtype, tensors).unwrap()
}

fn gather_cpu(prep: &PreparedProjection<Cpu>, theta: &[f32], layout: &ProjectionLayout) -> Vec<Vec<f32>> {
    let mut segs: Vec<Vec<f32>> = layout.segments().iter().map(|s| vec![f32::NAN; s.len() as usize]).collect();
    Cpu.projection_gather(prep, &theta.to_vec(), layout, &mut segs.iter_mut().collect::<Vec<_>>()).unwrap();
    segs
}

fn scatter_cpu(prep: &PreparedProjection<Cpu>, layout: &ProjectionLayout, grads: &[Vec<f32>]) -> Vec<f32> {
    let mut out = vec![f32::NAN; prep.projection.cols() as usize];
    Cpu.projection_scatter(prep, layout, &grads.iter().collect::<Vec<_>>(), ScatterMode::Deterministic, &mut out)
        .unwrap();
    out
}

fn dot(a: impl Iterator<Item = f64>, b: impl Iterator<Item = f64>) -> f64 {
    a.zip(b).map(|(x, y)| x * y).sum()
}

fn assignment() -> impl Strategy<Value = Assignment> {
    prop_oneof![Just(Assignment::Hash), Just(Assignment::Balanced)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::cases(48)))]

    /// ‖Pθ‖ = ‖θ restricted to used columns‖, Pᵀ(Pθ) = θ on used columns,
    /// and ⟨Pθ, g⟩ = ⟨θ, Pᵀg⟩, on random shapes from 1×1 up.
    #[test]
    fn cpu_projection_is_an_isometry_and_its_transpose_is_its_adjoint(
        rows in 1u64..6000, cols in 1u32..700, parts in 1usize..9, seed in any::<u64>(), assign in assignment()
    ) {
        let ctx = format!("D={rows} d={cols} parts={parts} seed={seed} {assign:?}");
        let layout = layout(rows, parts, DType::F32, seed);
        let p = Projection::new(rows, cols, seed, assign).unwrap();
        let prep = Cpu.projection_prepare(&p).unwrap();
        let theta = common::random(seed ^ 1, cols as usize);
        let segs = gather_cpu(&prep, &theta, &layout);
        let used = |j: usize| prep.counts[j] > 0;

        let norm_out = segs.iter().flatten().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let norm_in = theta.iter().enumerate().filter(|(j, _)| used(*j)).map(|(_, &v)| (v as f64).powi(2)).sum::<f64>().sqrt();
        prop_assert!((norm_out - norm_in).abs() <= 1e-6 * norm_in, "{ctx}: ‖Pθ‖={norm_out} ‖θ‖={norm_in}");

        // Column j: n_j terms scale_j²·θ_j (Σ|terms| = |θ_j|), each a
        // rounded f32 product, summed, scaled and rounded: n_j + 3 steps.
        let back = scatter_cpu(&prep, &layout, &segs);
        let want: Vec<f64> = theta.iter().enumerate().map(|(j, &v)| if used(j) { v as f64 } else { 0.0 }).collect();
        let mag: Vec<Magnitude> = want.iter().zip(&prep.counts).map(|(w, &n)| Magnitude::sum(n as usize + 3, w.abs())).collect();
        let c = check_bounded(&format!("{ctx}: Pᵀ(Pθ) vs θ"), &back, &want, &mag, ErrorBound::gpu(DType::F32));
        prop_assert!(c.is_ok(), "{}", c.unwrap_err());

        let g: Vec<Vec<f32>> = layout.segments().iter().enumerate()
            .map(|(k, s)| common::random(seed ^ (k as u64 + 7), s.len() as usize)).collect();
        let pt_g = scatter_cpu(&prep, &layout, &g);
        let lhs = dot(segs.iter().flatten().map(|&v| v as f64), g.iter().flatten().map(|&v| v as f64));
        let rhs = dot(theta.iter().map(|&v| v as f64), pt_g.iter().map(|&v| v as f64));
        let scale = norm_in * g.iter().flatten().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        prop_assert!((lhs - rhs).abs() <= 1e-6 * scale.max(1e-30), "{ctx}: ⟨Pθ,g⟩={lhs} ⟨θ,Pᵀg⟩={rhs}");
    }

    /// Balanced assignment: every column gets ⌊D/d⌋ or ⌈D/d⌉ rows, which
    /// holds only if the Feistel walk really permutes [0, D).
    #[test]
    fn balanced_columns_differ_in_size_by_at_most_one(rows in 1u64..20000, cols in 1u32..500, seed in any::<u64>()) {
        let p = Projection::new(rows, cols, seed, Assignment::Balanced).unwrap();
        let counts = lorafuse::cpu::projection::projection_counts(&p);
        let (lo, extra) = (rows / cols as u64, rows % cols as u64);
        let mut sizes: Vec<u64> = counts.iter().map(|&n| n as u64).collect();
        sizes.sort_unstable();
        let mut want = vec![lo; cols as usize];
        want.iter_mut().rev().take(extra as usize).for_each(|n| *n += 1);
        prop_assert_eq!(sizes, want, "D={} d={} seed={}", rows, cols, seed);
    }
}

#[test]
fn hash_is_splitmix64_as_published() {
    // SplitMix64 seeded with 0 first outputs 0xE220A8397B1DCDAF (Vigna's
    // reference implementation); splitmix_at(key, 0) is that first output.
    assert_eq!(splitmix_at(0, 0), 0xE220_A839_7B1D_CDAF);
    assert_eq!(splitmix_at(0, 1), 0x6E78_9E6A_A1B9_65F4);
    // Multiply-shift keeps the top bits: the full range maps to [0, n).
    assert_eq!(reduce_range(u64::MAX, 7), 6);
    assert_eq!(reduce_range(0, 7), 0);
}

#[test]
fn hash_columns_are_close_to_uniform() {
    // Chi-square over d bins: mean d-1, sd sqrt(2(d-1)); 6 sd is a failure
    // rate far below anything a test run will see, and a biased or
    // layout-dependent hash lands far outside it.
    let (rows, cols) = (400_000u64, 257u32);
    for seed in [0u64, 1, 0xDEAD_BEEF] {
        let p = Projection::new(rows, cols, seed, Assignment::Hash).unwrap();
        let counts = lorafuse::cpu::projection::projection_counts(&p);
        let expect = rows as f64 / cols as f64;
        let chi2: f64 = counts.iter().map(|&n| (n as f64 - expect).powi(2) / expect).sum();
        let dof = (cols - 1) as f64;
        assert!((chi2 - dof).abs() < 6.0 * (2.0 * dof).sqrt(), "seed {seed}: chi2 = {chi2:.1}, dof = {dof}");
    }
}

#[test]
fn different_seeds_give_different_projections() {
    let a = Projection::new(1000, 50, 1, Assignment::Hash).unwrap();
    let b = Projection::new(1000, 50, 2, Assignment::Hash).unwrap();
    let same = (0..1000).filter(|&i| a.column(i) == b.column(i)).count();
    assert!(same < 60, "{same} of 1000 rows agree; independent draws agree on ~20");
}

#[test]
fn layouts_reject_overlap_out_of_range_and_empty_segments() {
    let seg = |name: &str, start, len| Segment { name: name.into(), start, shape: [1, len] };
    let err = ProjectionLayout::new(100, DType::F32, vec![seg("a", 0, 50), seg("b", 40, 10)]).unwrap_err();
    assert!(err.to_string().contains("overlap"), "{err}");
    let err = ProjectionLayout::new(100, DType::F32, vec![seg("a", 95, 10)]).unwrap_err();
    assert!(err.to_string().contains("D = 100"), "{err}");
    let err = ProjectionLayout::new(100, DType::F32, vec![seg("a", 0, 0)]).unwrap_err();
    assert!(err.to_string().contains("no rows"), "{err}");
    let err = ProjectionLayout::new(100, DType::F32, vec![]).unwrap_err();
    assert!(err.to_string().contains("no segments"), "{err}");
    let err = ProjectionLayout::new(u64::MAX, DType::F32, vec![seg("a", u64::MAX - 1, 10)]).unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
    // Gaps and any order are fine.
    ProjectionLayout::new(100, DType::F32, vec![seg("b", 60, 40), seg("a", 0, 10)]).unwrap();
}

#[test]
fn bad_projections_and_calls_are_typed_errors() {
    assert!(matches!(Projection::new(0, 4, 1, Assignment::Hash), Err(Error::Invalid { .. })));
    assert!(matches!(Projection::new(4, 0, 1, Assignment::Hash), Err(Error::Invalid { .. })));
    assert!(matches!(Projection::new(4, 2, 1, Assignment::Explicit), Err(Error::Invalid { .. })));
    match Projection::explicit(vec![0, 1, 5, 2], 3) {
        Err(Error::Index { index: 5, bound: 3, .. }) => {}
        other => panic!("expected an index error, got {other:?}"),
    }

    let layout = layout(30, 2, DType::F32, 3);
    let p = Projection::new(30, 8, 1, Assignment::Hash).unwrap();
    let prep = Cpu.projection_prepare(&p).unwrap();
    let lens: Vec<usize> = layout.segments().iter().map(|s| s.len() as usize).collect();
    let mut a = vec![0f32; lens[0]];
    let mut b = vec![0f32; lens[1]];
    let err = Cpu.projection_gather(&prep, &vec![0.1; 7], &layout, &mut [&mut a, &mut b]).unwrap_err();
    assert!(matches!(err, Error::Shape { operand: "theta", .. }), "{err}");
    let err = Cpu.projection_gather(&prep, &vec![0.1; 8], &layout, &mut [&mut a]).unwrap_err();
    assert!(err.to_string().contains("2 buffers"), "{err}");
    let mut short = vec![0f32; lens[1] - 1];
    let err = Cpu.projection_gather(&prep, &vec![0.1; 8], &layout, &mut [&mut a, &mut short]).unwrap_err();
    assert!(err.to_string().contains("seg1"), "{err}");
    // The layout says where rows land, not how they are stored: bf16
    // buffers over an f32 layout get the f32 gather rounded once.
    let mut h = vec![bf16::ZERO; lens[0]];
    let mut h2 = vec![bf16::ZERO; lens[1]];
    Cpu.projection_gather(&prep, &vec![0.1; 8], &layout, &mut [&mut h, &mut h2]).unwrap();
    Cpu.projection_gather(&prep, &vec![0.1; 8], &layout, &mut [&mut a, &mut b]).unwrap();
    let rounded: Vec<bf16> = a.iter().chain(&b).map(|&v| bf16::from_f32(v)).collect();
    assert_eq!(h.iter().chain(&h2).copied().collect::<Vec<_>>(), rounded);
    let other = Projection::new(31, 8, 1, Assignment::Hash).unwrap();
    let prep_other = Cpu.projection_prepare(&other).unwrap();
    let err = Cpu.projection_gather(&prep_other, &vec![0.1; 8], &layout, &mut [&mut a, &mut b]).unwrap_err();
    assert!(matches!(err, Error::Shape { operand: "projection", .. }), "{err}");
}

#[test]
fn explicit_index_matches_the_equivalent_hash_projection() {
    let rows = 5000u64;
    let hashed = Projection::new(rows, 97, 5, Assignment::Hash).unwrap();
    let index: Vec<u32> = (0..rows).map(|i| hashed.column(i)).collect();
    let explicit = Projection::explicit(index, 97).unwrap();
    let layout = layout(rows, 4, DType::F32, 5);
    let theta = common::random(9, 97);
    let (ph, pe) = (Cpu.projection_prepare(&hashed).unwrap(), Cpu.projection_prepare(&explicit).unwrap());
    assert_eq!(ph.counts, pe.counts);
    assert_eq!(gather_cpu(&ph, &theta, &layout), gather_cpu(&pe, &theta, &layout));
}

#[test]
fn a_non_finite_gradient_poisons_the_whole_scatter() {
    let layout = layout(100, 3, DType::F32, 1);
    let p = Projection::new(100, 10, 1, Assignment::Hash).unwrap();
    let prep = Cpu.projection_prepare(&p).unwrap();
    let mut g: Vec<Vec<f32>> = layout.segments().iter().map(|s| common::random(2, s.len() as usize)).collect();
    g[1][0] = f32::INFINITY;
    assert!(scatter_cpu(&prep, &layout, &g).iter().all(|v| v.is_nan()));
}

// ---- GPU against the CPU oracle (skip without a GPU) ----------------------

#[cfg(feature = "cuda")]
fn gpu_gather<T: Element>(gpu: &Gpu, p: &Projection, theta: &[f32], layout: &ProjectionLayout) -> Vec<Vec<T>> {
    let prep = gpu.projection_prepare(p).unwrap();
    let theta = gpu.upload(theta).unwrap();
    let poison = T::from_f32(f32::NAN);
    let mut segs: Vec<_> =
        layout.segments().iter().map(|s| gpu.upload(&vec![poison; s.len() as usize]).unwrap()).collect();
    gpu.projection_gather(&prep, &theta, layout, &mut segs.iter_mut().collect::<Vec<_>>()).unwrap();
    segs.iter().map(|s| gpu.download(s).unwrap()).collect()
}

#[cfg(feature = "cuda")]
fn gpu_scatter<T: Element>(
    gpu: &Gpu,
    p: &Projection,
    layout: &ProjectionLayout,
    grads: &[Vec<T>],
    mode: ScatterMode,
) -> Vec<f32> {
    let prep = gpu.projection_prepare(p).unwrap();
    let g: Vec<_> = grads.iter().map(|g| gpu.upload(g).unwrap()).collect();
    let mut out = gpu.upload(&vec![f32::NAN; p.cols() as usize]).unwrap();
    gpu.projection_scatter(&prep, layout, &g.iter().collect::<Vec<_>>(), mode, &mut out).unwrap();
    gpu.download(&out).unwrap()
}

#[cfg(feature = "cuda")]
fn check_gpu_dtype<T: Element>(gpu: &Gpu, rows: u64, cols: u32, parts: usize, seed: u64, assign: Assignment) {
    let ctx = format!("D={rows} d={cols} parts={parts} seed={seed} {assign:?} dtype={}", T::DTYPE);
    let layout = layout(rows, parts, T::DTYPE, seed);
    let p = Projection::new(rows, cols, seed, assign).unwrap();
    let cpu_prep = Cpu.projection_prepare(&p).unwrap();
    let gpu_prep = gpu.projection_prepare(&p).unwrap();
    assert_eq!(gpu.download(&gpu_prep.counts).unwrap(), cpu_prep.counts, "{ctx}: column counts differ");
    let scale_bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(scale_bits(&gpu.download(&gpu_prep.scale).unwrap()), scale_bits(&cpu_prep.scale), "{ctx}: scales");

    let theta = common::random(seed ^ 3, cols as usize);
    // The gather is one f32 product and one rounding per element on both
    // sides: it must match bit for bit, in every dtype.
    let got = gpu_gather::<T>(gpu, &p, &theta, &layout);
    let want: Vec<Vec<T>> =
        gather_cpu(&cpu_prep, &theta, &layout).iter().map(|s| s.iter().map(|&v| T::from_f32(v)).collect()).collect();
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        let bad = g.iter().zip(w).position(|(a, b)| a.to_f32().to_bits() != b.to_f32().to_bits());
        assert!(bad.is_none(), "{ctx}: gather segment {k} differs first at {bad:?}");
    }

    let grads: Vec<Vec<T>> = layout
        .segments()
        .iter()
        .enumerate()
        .map(|(k, s)| common::random(seed ^ (k as u64 + 11), s.len() as usize).into_iter().map(T::from_f32).collect())
        .collect();
    let grads_f32: Vec<Vec<f32>> = grads.iter().map(|g| g.iter().map(|v| v.to_f32()).collect()).collect();
    let want = scatter_cpu(&cpu_prep, &layout, &grads_f32);
    let det = gpu_scatter(gpu, &p, &layout, &grads, ScatterMode::Deterministic);
    let again = gpu_scatter(gpu, &p, &layout, &grads, ScatterMode::Deterministic);
    assert_eq!(scale_bits(&det), scale_bits(&again), "{ctx}: deterministic scatter changed between runs");
    // Column j sums its n_j gradients in f32 (any order: the atomic path
    // too) and scales once: Σ|terms| = scale_j·Σ|g| is the scatter of |g|.
    let abs_grads: Vec<Vec<f32>> = grads_f32.iter().map(|g| lorafuse::testing::abs(g)).collect();
    let mag: Vec<Magnitude> = scatter_cpu(&cpu_prep, &layout, &abs_grads)
        .iter()
        .zip(&cpu_prep.counts)
        .map(|(&m, &n)| Magnitude::sum(n as usize + 1, m as f64))
        .collect();
    let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    let bound = ErrorBound::gpu(DType::F32);
    check_bounded(&format!("{ctx}: deterministic scatter vs cpu"), &det, &want, &mag, bound).unwrap();
    let atomic = gpu_scatter(gpu, &p, &layout, &grads, ScatterMode::Atomic);
    check_bounded(&format!("{ctx}: atomic scatter vs cpu"), &atomic, &want, &mag, bound).unwrap();
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_projection_matches_cpu_in_every_dtype_and_shape() {
    let Some(gpu) = common::gpu_or_skip("gpu_projection_matches_cpu_in_every_dtype_and_shape") else { return };
    // Small d exercises the shared-memory staging, large d the global path;
    // 300 segments force several launches; odd sizes straddle tiles.
    let shapes: &[(u64, u32, usize)] =
        &[(1, 1, 1), (7, 3, 2), (8193, 1, 3), (100_003, 4099, 7), (1_000_003, 70_001, 300), (65_537, 20_000, 129)];
    for (n, &(rows, cols, parts)) in shapes.iter().enumerate() {
        for assign in [Assignment::Hash, Assignment::Balanced] {
            let seed = 1000 + n as u64;
            check_gpu_dtype::<f32>(&gpu, rows, cols, parts, seed, assign);
            check_gpu_dtype::<f16>(&gpu, rows, cols, parts, seed, assign);
            check_gpu_dtype::<bf16>(&gpu, rows, cols, parts, seed, assign);
        }
    }
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_explicit_index_and_non_finite_gradients() {
    let Some(gpu) = common::gpu_or_skip("gpu_explicit_index_and_non_finite_gradients") else { return };
    let rows = 30_001u64;
    let mut rng = Rng::new(4);
    let index: Vec<u32> = (0..rows).map(|_| rng.below(513) as u32).collect();
    let p = Projection::explicit(index, 513).unwrap();
    let layout = layout(rows, 5, DType::F32, 4);
    let theta = common::random(5, 513);
    let cpu_prep = Cpu.projection_prepare(&p).unwrap();
    assert_eq!(gpu_gather::<f32>(&gpu, &p, &theta, &layout), gather_cpu(&cpu_prep, &theta, &layout));
    let mut g: Vec<Vec<f32>> = layout.segments().iter().map(|s| common::random(6, s.len() as usize)).collect();
    g[2][3] = f32::NAN;
    assert!(gpu_scatter(&gpu, &p, &layout, &g, ScatterMode::Deterministic).iter().all(|v| v.is_nan()));
}

// ---- the single-launch gather and read-once scatter (skip without a GPU) ---

/// The CPU twin's gather in T, for a layout of T.
fn cpu_gather_t<T: Element>(prep: &PreparedProjection<Cpu>, theta: &[f32], layout: &ProjectionLayout) -> Vec<Vec<T>> {
    let mut segs: Vec<Vec<T>> = layout.segments().iter().map(|s| vec![T::from_f32(0.0); s.len() as usize]).collect();
    Cpu.projection_gather(prep, &theta.to_vec(), layout, &mut segs.iter_mut().collect::<Vec<_>>()).unwrap();
    segs
}

/// A layout with gaps: `parts` segments at random offsets inside [0, rows).
fn gapped_layout(rows: u64, parts: usize, dtype: DType, seed: u64) -> ProjectionLayout {
    let full = layout(rows, parts, DType::F32, seed);
    let mut rng = Rng::new(seed ^ 0x5EED);
    let segments = full
        .segments()
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let len = s.len() as usize;
            let keep = if k % 2 == 1 && len > 1 { 1 + rng.below(len as u64 - 1) as usize } else { len };
            Segment { name: s.name.clone(), start: s.start, shape: [1, keep] }
        })
        .collect();
    ProjectionLayout::new(rows, dtype, segments).unwrap()
}

#[cfg(feature = "cuda")]
/// Gathers into views that start `offsets[k]` elements into larger buffers,
/// so most segments are not 16-byte aligned and every lead length occurs.
fn gpu_gather_offset<T: Element>(
    gpu: &Gpu,
    prep: &PreparedProjection<Gpu>,
    theta: &[f32],
    layout: &ProjectionLayout,
) -> Vec<Vec<T>> {
    let theta = gpu.upload(theta).unwrap();
    let poison = T::from_f32(f32::NAN);
    let mut bufs: Vec<_> = layout
        .segments()
        .iter()
        .enumerate()
        .map(|(k, s)| gpu.upload(&vec![poison; s.len() as usize + 9 + k % 8]).unwrap())
        .collect();
    {
        let mut views: Vec<_> = layout
            .segments()
            .iter()
            .zip(bufs.iter_mut())
            .enumerate()
            .map(|(k, (s, b))| b.slice_mut(k % 8..k % 8 + s.len() as usize))
            .collect();
        lorafuse::cuda::projection::gather(gpu, prep, &theta.slice(..), layout, &mut views).unwrap();
    }
    bufs.iter()
        .zip(layout.segments())
        .enumerate()
        .map(|(k, (b, s))| {
            let host = gpu.download(b).unwrap();
            let (head, tail) = (&host[..k % 8], &host[k % 8 + s.len() as usize..]);
            assert!(head.iter().chain(tail).all(|v| v.to_f32().is_nan()), "segment {k}: write outside its view");
            host[k % 8..k % 8 + s.len() as usize].to_vec()
        })
        .collect()
}

#[cfg(feature = "cuda")]
fn gather_case<T: Element>(gpu: &Gpu, rows: u64, cols: u32, parts: usize, assign: Assignment, seed: u64) {
    let ctx = format!("D={rows} d={cols} parts={parts} {assign:?} seed={seed} {}", T::DTYPE);
    let layout = gapped_layout(rows, parts, T::DTYPE, seed);
    let p = Projection::new(rows, cols, seed, assign).unwrap();
    let theta = common::random(seed ^ 3, cols as usize);
    let want = cpu_gather_t::<T>(&Cpu.projection_prepare(&p).unwrap(), &theta, &layout);
    let got = gpu_gather_offset::<T>(gpu, &gpu.projection_prepare(&p).unwrap(), &theta, &layout);
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        let bad = g.iter().zip(w).position(|(a, b)| a.to_f32().to_bits() != b.to_f32().to_bits());
        assert!(bad.is_none(), "{ctx}: gather segment {k} differs first at {bad:?}");
    }
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_gather_is_bit_identical_for_offsets_gaps_many_segments_and_both_staging_paths() {
    let Some(gpu) = common::gpu_or_skip("gpu_gather_is_bit_identical_...") else { return };
    // d = 150_001 does not fit shared memory in any dtype (unstaged path);
    // 260 segments take three launches; D = 1 and single rows per segment
    // are all lead rows.
    let shapes: &[(u64, u32, usize)] =
        &[(1, 1, 1), (37, 5, 9), (50_001, 777, 5), (300_007, 23_040, 96), (200_003, 150_001, 7), (90_001, 513, 260)];
    for (n, &(rows, cols, parts)) in shapes.iter().enumerate() {
        for assign in [Assignment::Hash, Assignment::Balanced] {
            let seed = 2000 + n as u64;
            gather_case::<f32>(&gpu, rows, cols, parts, assign, seed);
            gather_case::<f16>(&gpu, rows, cols, parts, assign, seed);
            gather_case::<bf16>(&gpu, rows, cols, parts, assign, seed);
        }
    }
}

/// Per-column bound on |GPU − CPU| for the deterministic scatter, from its
/// arithmetic: each term is rounded to a multiple of 2^-S (S from max|g|
/// with the exponent rounded up to a multiple of 4 and ceil_log2(n_max)
/// bits of headroom), so a column of n terms is off by at most
/// n·2^-(S+1)·scale; both sides round an f64 result once to f32 (2^-24
/// relative each), and the CPU's f64 sum adds n·2^-53·Σ|g|.
fn scatter_bounds(
    prep: &PreparedProjection<Cpu>,
    layout: &ProjectionLayout,
    grads: &[Vec<f32>],
    want: &[f32],
) -> Vec<f64> {
    let p = &prep.projection;
    let absmax = grads.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let mut e = if absmax == 0.0 { 0 } else { absmax.log2().floor() as i32 + 1 };
    e += (4 - (e & 3)) & 3;
    let headroom = 32 - prep.max_count.max(1).saturating_sub(1).leading_zeros() as i32;
    let shift = 61 - headroom - e;
    let mut abs = vec![0f64; p.cols() as usize];
    for (seg, g) in layout.segments().iter().zip(grads) {
        for (i, v) in g.iter().enumerate() {
            abs[p.column(seg.start + i as u64) as usize] += v.abs() as f64;
        }
    }
    (0..p.cols() as usize)
        .map(|j| {
            let (n, s) = (prep.counts[j] as f64, prep.scale[j] as f64);
            n * s * 2f64.powi(-shift - 1)
                + 2.0 * 2f64.powi(-24) * want[j].abs() as f64
                + n * 2f64.powi(-53) * s * abs[j]
        })
        .collect()
}

#[cfg(feature = "cuda")]
fn scatter_case<T: Element>(gpu: &Gpu, rows: u64, cols: u32, parts: usize, assign: Assignment, seed: u64) {
    let ctx = format!("D={rows} d={cols} parts={parts} {assign:?} seed={seed} {}", T::DTYPE);
    let layout = gapped_layout(rows, parts, T::DTYPE, seed);
    let p = Projection::new(rows, cols, seed, assign).unwrap();
    let cpu_prep = Cpu.projection_prepare(&p).unwrap();
    let grads: Vec<Vec<T>> = layout
        .segments()
        .iter()
        .enumerate()
        .map(|(k, s)| {
            common::random(seed ^ (k as u64 + 11), s.len() as usize)
                .into_iter()
                .map(|v| T::from_f32(v * 1e-3))
                .collect()
        })
        .collect();
    let run = |prep: &PreparedProjection<Gpu>, grads: &[Vec<T>], mode: ScatterMode| {
        let g: Vec<_> = grads.iter().map(|g| gpu.upload(g).unwrap()).collect();
        let mut out = gpu.upload(&vec![f32::NAN; cols as usize]).unwrap();
        gpu.projection_scatter(prep, &layout, &g.iter().collect::<Vec<_>>(), mode, &mut out).unwrap();
        gpu.download(&out).unwrap()
    };
    let check = |got: &[f32], grads: &[Vec<T>], what: &str| {
        let g32: Vec<Vec<f32>> = grads.iter().map(|g| g.iter().map(|v| v.to_f32()).collect()).collect();
        let mut want = vec![0f32; cols as usize];
        let refs: Vec<&Vec<T>> = grads.iter().collect();
        Cpu.projection_scatter(&cpu_prep, &layout, &refs, ScatterMode::Deterministic, &mut want).unwrap();
        let bound = scatter_bounds(&cpu_prep, &layout, &g32, &want);
        let bad = (0..cols as usize).find(|&j| outside((got[j] as f64 - want[j] as f64).abs(), bound[j]));
        assert!(
            bad.is_none(),
            "{ctx}: {what}: column {bad:?} outside its bound: got {:?}",
            bad.map(|j| (got[j], want[j], bound[j]))
        );
    };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();

    let prep = gpu.projection_prepare(&p).unwrap();
    let first = run(&prep, &grads, ScatterMode::Deterministic); // measures S, then sums
    check(&first, &grads, "first call");
    let second = run(&prep, &grads, ScatterMode::Deterministic); // steady state: reads g once
    assert_eq!(bits(&first), bits(&second), "{ctx}: deterministic scatter changed between runs");
    // max|g| three buckets up: the speculated scale is wrong, the sums are
    // redone, and the bits equal those of a fresh prepared projection.
    let big: Vec<Vec<T>> = grads.iter().map(|g| g.iter().map(|v| T::from_f32(v.to_f32() * 4096.0)).collect()).collect();
    let moved = run(&prep, &big, ScatterMode::Deterministic);
    let fresh = run(&gpu.projection_prepare(&p).unwrap(), &big, ScatterMode::Deterministic);
    assert_eq!(bits(&moved), bits(&fresh), "{ctx}: result depends on the previous call's scale");
    check(&moved, &big, "after a scale change");

    let atomic = run(&prep, &grads, ScatterMode::Atomic);
    let g32: Vec<Vec<f32>> = grads.iter().map(|g| g.iter().map(|v| v.to_f32()).collect()).collect();
    let mut abs = vec![0f64; cols as usize];
    for (seg, g) in layout.segments().iter().zip(&g32) {
        for (i, v) in g.iter().enumerate() {
            let j = p.column(seg.start + i as u64) as usize;
            abs[j] += (v.abs() * cpu_prep.scale[j]) as f64;
        }
    }
    // f32 sums in any order: off by at most (n + 1)·2^-24·Σ|terms|.
    for j in 0..cols as usize {
        let bound = (cpu_prep.counts[j] as f64 + 1.0) * 2f64.powi(-24) * abs[j] + 1e-30;
        assert!(
            (atomic[j] - first[j]).abs() as f64 <= 2.0 * bound,
            "{ctx}: atomic column {j}: {} vs {}",
            atomic[j],
            first[j]
        );
    }
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_scatter_is_deterministic_history_free_and_within_its_fixed_point_bound() {
    let Some(gpu) = common::gpu_or_skip("gpu_scatter_is_deterministic_...") else { return };
    // d = 23_040 fills shared memory with per-block sums; d = 40_000 does not
    // (global 64-bit sums); 260 segments take three launches per phase.
    let shapes: &[(u64, u32, usize)] =
        &[(1, 1, 1), (37, 5, 9), (50_001, 777, 5), (300_007, 23_040, 96), (200_003, 40_000, 7), (90_001, 513, 260)];
    for (n, &(rows, cols, parts)) in shapes.iter().enumerate() {
        for assign in [Assignment::Hash, Assignment::Balanced] {
            let seed = 3000 + n as u64;
            scatter_case::<f32>(&gpu, rows, cols, parts, assign, seed);
            scatter_case::<f16>(&gpu, rows, cols, parts, assign, seed);
            scatter_case::<bf16>(&gpu, rows, cols, parts, assign, seed);
        }
    }
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_scatter_recovers_after_a_non_finite_gradient() {
    let Some(gpu) = common::gpu_or_skip("gpu_scatter_recovers_after_a_non_finite_gradient") else { return };
    let layout = layout(30_001, 5, DType::BF16, 8);
    let p = Projection::new(30_001, 513, 8, Assignment::Hash).unwrap();
    let prep = gpu.projection_prepare(&p).unwrap();
    let mut grads: Vec<Vec<bf16>> = layout
        .segments()
        .iter()
        .map(|s| common::random(9, s.len() as usize).into_iter().map(bf16::from_f32).collect())
        .collect();
    let run = |grads: &[Vec<bf16>]| {
        let g: Vec<_> = grads.iter().map(|g| gpu.upload(g).unwrap()).collect();
        let mut out = gpu.upload(&vec![0f32; 513]).unwrap();
        gpu.projection_scatter(&prep, &layout, &g.iter().collect::<Vec<_>>(), ScatterMode::Deterministic, &mut out)
            .unwrap();
        gpu.download(&out).unwrap()
    };
    let clean = run(&grads);
    grads[1][7] = bf16::INFINITY;
    assert!(run(&grads).iter().all(|v| v.is_nan()));
    grads[1][7] = bf16::from_f32(0.25);
    let zero: Vec<Vec<bf16>> = grads.iter().map(|g| vec![bf16::ZERO; g.len()]).collect();
    assert!(run(&zero).iter().all(|&v| v == 0.0));
    grads[1][7] = bf16::from_f32(common::random(9, layout.segments()[1].len() as usize)[7]);
    let again = run(&grads);
    assert_eq!(
        clean.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        again.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}

/// An error above its bound, or NaN (which no bound admits).
fn outside(err: f64, bound: f64) -> bool {
    err.is_nan() || err > bound
}
