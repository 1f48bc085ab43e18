//! The multi-adapter op: the CPU twin against a per-row naive f64
//! reference and against the single-adapter low-rank op, on random ids
//! (including −1), mixed ranks, awkward segment sizes and every adapter
//! kind (LoRA, Tied-LoRA, VeRA from a seed, Uni-LoRA served from θ with
//! hash and balanced projections); typed errors; then the GPU kernels
//! against the same reference, deterministic and batch-invariant.
//!
//! Error bounds are derived per element, not tuned: with `want` the exact
//! result, `mag = |y₀| + |s|·|v_n|·Σ_q |u_q|·|B_nq|·Σ_k |x_k|·|A_qk|` (the
//! sum of magnitudes every rounding error is relative to) and `ε` the unit
//! roundoff of the arithmetic (2⁻⁵³ in the f64 twin, 2⁻²⁴ on the GPU),
//!
//! ```text
//! |got − want| ≤ (u_T + u_f32)·|want| + (K + r + 4)·ε·mag
//! ```
//!
//! The first term is the final rounding to the storage type `T` (through
//! f32, as `Element::from_f64` does); the second the standard bound γ_n
//! on a dot product of length K (shrink), then r (expand), plus the scale,
//! `u`, `v` products and the add onto `y₀`.

#[macro_use]
mod common;

use common::cases;
use half::{bf16, f16};
use lorafuse::cpu::Cpu;
use lorafuse::lowrank::{Adapter, LinearShape, LowRankConfig, LowRankOps};
use lorafuse::multi_adapter::*;
use lorafuse::projection::{Assignment, Projection, ProjectionLayout, ProjectionOps, Segment};
use lorafuse::rng::Rng;
use lorafuse::{DType, Element, Error};

/// What the reference needs of one layer: the factors as the pool holds
/// them (rounded to `T` for stored factors, exact f32 for Uni-LoRA).
#[derive(Clone, Debug)]
struct RefLayer {
    a: Vec<f32>,
    b: Vec<f32>,
    u: Option<Vec<f32>>,
    v: Option<Vec<f32>>,
}

#[derive(Clone, Debug)]
struct RefAdapter {
    rank: usize,
    scale: f32,
    layers: Vec<RefLayer>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Lora,
    Tied,
    Vera,
    UniHash,
    UniBalanced,
}

const KINDS: [Kind; 5] = [Kind::Lora, Kind::Tied, Kind::Vera, Kind::UniHash, Kind::UniBalanced];

fn rounded<T: Element>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&e| T::from_f32(e).to_f32()).collect()
}

fn unit(d: DType) -> f64 {
    match d {
        DType::F32 => 0.0, // the f32 step of the rounding is counted once, below
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
    }
}

/// A pool with adapters of every requested kind, and what the reference
/// knows about each slot.
struct Fixture<B: MultiAdapterOps, T: Element> {
    pool: AdapterPool<B, T>,
    refs: Vec<Option<RefAdapter>>,
}

/// Rows of θ_D the Uni-LoRA adapters may address, and the projection's d.
fn uni_rows(k: usize, n: usize, layers: usize) -> u64 {
    (layers * MAX_RANK * (k + n)) as u64
}
const UNI_D: u32 = 53;

/// Builds a pool on `backend` whose slots hold `kinds[i]` with `ranks[i]`
/// (None: left empty), all data drawn from `seed`, so the same call on two
/// backends fills identical pools.
fn fixture<B: MultiAdapterOps, T: Element>(
    backend: &B,
    seed: u64,
    (k, n, layers): (usize, usize, usize),
    slots: &[Option<(Kind, usize)>],
) -> lorafuse::Result<Fixture<B, T>> {
    let mut rng = Rng::new(seed);
    let rank_rows = slots.len() * layers * MAX_RANK + 2 * MAX_RANK;
    let floats = slots.len() * layers * (MAX_RANK + n) + slots.len() * UNI_D as usize + 4 * UNI_D as usize;
    let cfg = PoolConfig { k, n, layers, slots: slots.len(), rank_rows, floats };
    let mut pool = AdapterPool::<B, T>::new(backend, cfg)?;
    let mut refs = vec![None; slots.len()];
    let mut vera: Option<(SharedFactors, usize, Vec<f32>, Vec<f32>)> = None;
    let mut projections: Vec<(Assignment, ProjectionHandle, Projection)> = Vec::new();
    let d_rows = uni_rows(k, n, layers);
    for (slot, spec) in slots.iter().enumerate() {
        let Some((kind, rank)) = *spec else { continue };
        let scale = rng.uniform(0.25, 2.0) as f32;
        let vectors = |rng: &mut Rng, with: bool| -> (Option<Vec<f32>>, Option<Vec<f32>>) {
            if with {
                (Some(rng.uniform_vec(rank, -1.5, 1.5)), Some(rng.uniform_vec(n, -1.5, 1.5)))
            } else {
                (None, None)
            }
        };
        let r = match kind {
            Kind::Lora => {
                let with_vectors = rng.below(2) == 1;
                let per: Vec<RefLayer> = (0..layers)
                    .map(|_| {
                        let a = rng.uniform_vec(rank * k, -1.0, 1.0);
                        let b = rng.uniform_vec(n * rank, -1.0, 1.0);
                        let (u, v) = vectors(&mut rng, with_vectors);
                        RefLayer { a, b, u, v }
                    })
                    .collect();
                let lf: Vec<LayerFactors> = per
                    .iter()
                    .map(|l| LayerFactors { a: &l.a, b: &l.b, u: l.u.as_deref(), v: l.v.as_deref() })
                    .collect();
                pool.fill(backend, slot, &ServedAdapter::PerLayer { rank, scale, layers: &lf })?;
                let layers =
                    per.into_iter().map(|l| RefLayer { a: rounded::<T>(&l.a), b: rounded::<T>(&l.b), ..l }).collect();
                RefAdapter { rank, scale, layers }
            }
            Kind::Tied => {
                let a = rng.uniform_vec(rank * k, -1.0, 1.0);
                let b = rng.uniform_vec(n * rank, -1.0, 1.0);
                let vecs: Vec<_> = (0..layers).map(|_| vectors(&mut rng, true)).collect();
                let lv: Vec<LayerVectors> =
                    vecs.iter().map(|(u, v)| LayerVectors { u: u.as_deref(), v: v.as_deref() }).collect();
                pool.fill(backend, slot, &ServedAdapter::Tied { rank, scale, a: &a, b: &b, vectors: &lv })?;
                let (ar, br) = (rounded::<T>(&a), rounded::<T>(&b));
                let layers = vecs.into_iter().map(|(u, v)| RefLayer { a: ar.clone(), b: br.clone(), u, v }).collect();
                RefAdapter { rank, scale, layers }
            }
            Kind::Vera => {
                // Every VeRA adapter of the pool shares the first one's seed and rank.
                if vera.is_none() {
                    let vseed = rng.next_u64();
                    let id = pool.add_vera_factors(backend, rank, vseed)?;
                    let (a, b) = LowRankConfig::vera(rank, 1.0).init_factors(k, n, &mut Rng::new(vseed));
                    vera = Some((id, rank, rounded::<T>(&a), rounded::<T>(&b)));
                }
                let (id, vrank, a, b) = vera.clone().unwrap();
                let vecs: Vec<_> = (0..layers)
                    .map(|_| (Some(rng.uniform_vec(vrank, -1.5, 1.5)), Some(rng.uniform_vec(n, -1.5, 1.5))))
                    .collect();
                let lv: Vec<LayerVectors> =
                    vecs.iter().map(|(u, v)| LayerVectors { u: u.as_deref(), v: v.as_deref() }).collect();
                pool.fill(backend, slot, &ServedAdapter::Shared { factors: id, scale, vectors: &lv })?;
                let layers = vecs.into_iter().map(|(u, v)| RefLayer { a: a.clone(), b: b.clone(), u, v }).collect();
                RefAdapter { rank: vrank, scale, layers }
            }
            Kind::UniHash | Kind::UniBalanced => {
                let assignment = if kind == Kind::UniHash { Assignment::Hash } else { Assignment::Balanced };
                if !projections.iter().any(|p| p.0 == assignment) {
                    let proj = Projection::new(d_rows, UNI_D, 1000 + seed, assignment)?;
                    let h = pool.add_projection(backend, &proj)?;
                    projections.push((assignment, h, proj));
                }
                let (_, handle, proj) = projections.iter().find(|p| p.0 == assignment).unwrap().clone();
                let theta = rng.uniform_vec(UNI_D as usize, -1.0, 1.0);
                // Layer l's factors sit at a random offset of θ_D.
                let per: Vec<UniLoraLayer> = (0..layers)
                    .map(|_| {
                        let span = (rank * (k + n)) as u64;
                        let a_start = rng.below(d_rows - span + 1);
                        UniLoraLayer { a_start, b_start: a_start + (rank * k) as u64 }
                    })
                    .collect();
                pool.fill(
                    backend,
                    slot,
                    &ServedAdapter::UniLora { projection: handle, rank, scale, theta: &theta, layers: &per },
                )?;
                // The reference materialises the factors with the crate's own gather.
                let layers = per.iter().map(|ul| materialise(&proj, &theta, ul, rank, k, n)).collect();
                RefAdapter { rank, scale, layers }
            }
        };
        refs[slot] = Some(r);
    }
    Ok(Fixture { pool, refs })
}

/// `A` and `B` of one Uni-LoRA layer through `Cpu::projection_gather` (f32).
fn materialise(proj: &Projection, theta: &[f32], ul: &UniLoraLayer, rank: usize, k: usize, n: usize) -> RefLayer {
    let segs = vec![
        Segment { name: "A".into(), start: ul.a_start, shape: [rank, k] },
        Segment { name: "B".into(), start: ul.b_start, shape: [n, rank] },
    ];
    let layout = ProjectionLayout::new(proj.rows(), DType::F32, segs).unwrap();
    let prepared = Cpu.projection_prepare(proj).unwrap();
    let (mut a, mut b) = (vec![0f32; rank * k], vec![0f32; n * rank]);
    Cpu.projection_gather(&prepared, &theta.to_vec(), &layout, &mut [&mut a, &mut b]).unwrap();
    RefLayer { a, b, u: None, v: None }
}

/// The naive per-row reference in f64, and each element's magnitude sum.
fn reference<T: Element>(
    refs: &[Option<RefAdapter>],
    layer: usize,
    ids: &[i32],
    (k, n): (usize, usize),
    x: &[T],
    y0: &[T],
) -> (Vec<f64>, Vec<f64>) {
    let mut want: Vec<f64> = y0.iter().map(|v| v.to_f64()).collect();
    let mut mag: Vec<f64> = want.iter().map(|v| v.abs()).collect();
    for (i, &id) in ids.iter().enumerate() {
        if id < 0 {
            continue;
        }
        let ad = refs[id as usize].as_ref().unwrap();
        let l = &ad.layers[layer];
        let r = ad.rank;
        let s = ad.scale as f64;
        let xr: Vec<f64> = x[i * k..(i + 1) * k].iter().map(|v| v.to_f64()).collect();
        let (mut t, mut tmag) = (vec![0f64; r], vec![0f64; r]);
        for q in 0..r {
            let uq = l.u.as_ref().map_or(1.0, |u| u[q] as f64);
            let arow = &l.a[q * k..(q + 1) * k];
            let dot: f64 = xr.iter().zip(arow).map(|(x, a)| x * *a as f64).sum();
            let dmag: f64 = xr.iter().zip(arow).map(|(x, a)| (x * *a as f64).abs()).sum();
            t[q] = s * uq * dot;
            tmag[q] = (s * uq).abs() * dmag;
        }
        for j in 0..n {
            let vj = l.v.as_ref().map_or(1.0, |v| v[j] as f64);
            let brow = &l.b[j * r..(j + 1) * r];
            let z: f64 = t.iter().zip(brow).map(|(t, b)| t * *b as f64).sum();
            let zmag: f64 = tmag.iter().zip(brow).map(|(t, b)| t * (*b as f64).abs()).sum();
            want[i * n + j] += vj * z;
            mag[i * n + j] += vj.abs() * zmag;
        }
    }
    (want, mag)
}

/// The derived element bound (module docs); `eps` is the arithmetic's unit
/// roundoff, `r_max` the largest rank in the batch.
fn check<T: Element>(ctx: &str, got: &[T], want: &[f64], mag: &[f64], k: usize, r_max: usize, eps: f64) {
    assert_eq!(got.len(), want.len(), "{ctx}: length");
    let out_unit = unit(T::DTYPE) + 2f64.powi(-24);
    let terms = (k + r_max + 4) as f64;
    let mut worst: Option<(usize, f64, f64, f64)> = None;
    for i in 0..got.len() {
        let g = got[i].to_f64();
        let bound = out_unit * want[i].abs() + terms * eps * mag[i];
        let err = (g - want[i]).abs();
        let within = err <= bound; // false for NaN too
        if !within && worst.is_none_or(|w| err / bound > w.1 / w.3) {
            worst = Some((i, err, g, bound));
        }
    }
    if let Some((i, err, g, bound)) = worst {
        panic!("{ctx}: element {i}: got {g:.9e}, want {:.9e}, error {err:.3e} above bound {bound:.3e}", want[i]);
    }
}

/// Rows whose id is −1 must come back bit for bit.
fn check_untouched<T: Element>(ctx: &str, ids: &[i32], n: usize, got: &[T], y0: &[T]) {
    for (i, &id) in ids.iter().enumerate() {
        if id == -1 {
            assert!(got[i * n..(i + 1) * n] == y0[i * n..(i + 1) * n], "{ctx}: row {i} has no adapter but changed");
        }
    }
}

/// A random batch over `slots`: segments of awkward lengths (0, 1, 7, 8,
/// 9, 17, …), each with a random filled slot or −1.
fn random_batch(rng: &mut Rng, filled: &[usize], segments: usize) -> (Vec<usize>, Vec<i32>) {
    const LENS: [usize; 9] = [0, 1, 2, 7, 8, 9, 16, 17, 3];
    let mut starts = vec![0usize];
    let mut ids = Vec::new();
    for _ in 0..segments {
        let len = LENS[rng.below(LENS.len() as u64) as usize];
        starts.push(starts.last().unwrap() + len);
        let pick = rng.below(filled.len() as u64 + 1) as usize;
        ids.push(if pick == filled.len() { -1 } else { filled[pick] as i32 });
    }
    (starts, ids)
}

fn random_t<T: Element>(rng: &mut Rng, len: usize) -> Vec<T> {
    rng.uniform_vec(len, -1.0, 1.0).into_iter().map(T::from_f32).collect()
}

fn slot_specs(rng: &mut Rng, kinds: &[Kind], slots: usize) -> Vec<Option<(Kind, usize)>> {
    const RANKS: [usize; 9] = [1, 2, 3, 8, 9, 16, 17, 64, 128];
    (0..slots)
        .map(|s| {
            if s % 5 == 4 {
                return None; // an empty slot, never named by a batch
            }
            let kind = kinds[rng.below(kinds.len() as u64) as usize];
            Some((kind, RANKS[rng.below(RANKS.len() as u64) as usize]))
        })
        .collect()
}

/// Three random batches of the adapters `kinds` (mixed ranks, an empty slot)
/// through `dev`'s multi-adapter op against the f64 reference, within the
/// bound of its accumulator (f64 on the CPU, f32 on a device), untouched
/// rows left alone. The segmented (prefill) and per-row (decode) forms give
/// the same bits, and a row's bits do not depend on its neighbours (a
/// reversed batch gives the same rows).
fn matches_reference<B: MultiAdapterOps + 'static, T: Element>(
    dev: &B,
    seed: u64,
    kinds: &[Kind],
    (k, n): (usize, usize),
) {
    let unit = if common::is_cpu::<B>() { 2f64.powi(-53) } else { 2f64.powi(-24) };
    let mut rng = Rng::new(seed);
    let layers = 1 + rng.below(3) as usize;
    let specs = slot_specs(&mut rng, kinds, 7);
    let fx = fixture::<B, T>(dev, seed, (k, n, layers), &specs).unwrap();
    let filled: Vec<usize> = (0..specs.len()).filter(|&s| specs[s].is_some()).collect();
    let r_max = fx.refs.iter().flatten().map(|r| r.rank).max().unwrap_or(1);
    for round in 0..3 {
        let segments = 1 + rng.below(12) as usize;
        let (starts, seg_ids) = random_batch(&mut rng, &filled, segments);
        let rows = RowAdapters::Segments { starts: &starts, ids: &seg_ids };
        let per_row = rows.per_row();
        let m = per_row.len();
        let layer = rng.below(layers as u64) as usize;
        let x = random_t::<T>(&mut rng, m * k);
        let y0 = random_t::<T>(&mut rng, m * n);
        let ctx = format!(
            "{} seed {seed} round {round} {} K={k} N={n} layer {layer} ids {per_row:?}",
            dev.describe(),
            T::DTYPE
        );
        let (want, mag) = reference(&fx.refs, layer, &per_row, (k, n), &x, &y0);
        let xd = dev.upload(&x).unwrap();
        let mut yd = dev.upload(&y0).unwrap();
        dev.multi_adapter_add(&fx.pool, layer, rows, &xd, &mut yd).unwrap();
        let got = dev.download(&yd).unwrap();
        check(&format!("{ctx} segments"), &got, &want, &mag, k, r_max, unit);
        check_untouched(&ctx, &per_row, n, &got, &y0);
        let mut yd2 = dev.upload(&y0).unwrap();
        dev.multi_adapter_add(&fx.pool, layer, RowAdapters::Rows(&per_row), &xd, &mut yd2).unwrap();
        assert!(dev.download(&yd2).unwrap() == got, "{ctx}: rows form differs from segments form");
        let rev: Vec<i32> = per_row.iter().rev().copied().collect();
        let xr: Vec<T> = (0..m).rev().flat_map(|i| x[i * k..(i + 1) * k].to_vec()).collect();
        let yr: Vec<T> = (0..m).rev().flat_map(|i| y0[i * n..(i + 1) * n].to_vec()).collect();
        let mut ydr = dev.upload(&yr).unwrap();
        dev.multi_adapter_add(&fx.pool, layer, RowAdapters::Rows(&rev), &dev.upload(&xr).unwrap(), &mut ydr).unwrap();
        let back = dev.download(&ydr).unwrap();
        for i in 0..m {
            assert!(
                back[(m - 1 - i) * n..(m - i) * n] == got[i * n..(i + 1) * n],
                "{ctx}: row {i} depends on the batch"
            );
        }
    }
}

#[test]
fn twin_matches_naive_reference_all_kinds_mixed_ranks() {
    for case in 0..cases(4) as u64 {
        matches_reference::<_, f32>(&Cpu, 100 + case, &KINDS, (37, 45));
        matches_reference::<_, f16>(&Cpu, 200 + case, &KINDS, (40, 24));
        matches_reference::<_, bf16>(&Cpu, 300 + case, &KINDS, (19, 64));
    }
}

#[test]
fn twin_matches_reference_per_kind() {
    for (i, &kind) in KINDS.iter().enumerate() {
        matches_reference::<_, bf16>(&Cpu, 400 + i as u64, &[kind], (33, 17));
        matches_reference::<_, f32>(&Cpu, 500 + i as u64, &[kind], (24, 2056));
    }
}

/// Rows of one LoRA adapter through the multi-adapter op and through
/// `LowRankOps::lowrank_add` with the same (stored) factors agree within
/// both ops' bounds.
#[test]
fn twin_matches_single_adapter_lowrank_op() {
    for (seed, rank) in [(1u64, 1usize), (2, 7), (3, 16), (4, 128)] {
        let (k, n, m) = (29, 35, 13);
        let fx =
            fixture::<Cpu, bf16>(&Cpu, seed, (k, n, 1), &[Some((Kind::Lora, rank)), Some((Kind::Tied, 5))]).unwrap();
        let mut rng = Rng::new(seed + 50);
        let x = random_t::<bf16>(&mut rng, m * k);
        let y0 = random_t::<bf16>(&mut rng, m * n);
        let ids = vec![0i32; m];
        let mut y_multi = y0.clone();
        Cpu.multi_adapter_add(&fx.pool, 0, RowAdapters::Rows(&ids), &x, &mut y_multi).unwrap();
        let ad = fx.refs[0].as_ref().unwrap();
        let l = &ad.layers[0];
        let adapter = Adapter::<Cpu> { a: &l.a, b: &l.b, u: l.u.as_ref(), v: l.v.as_ref(), scale: ad.scale };
        let mut y_single = y0.clone();
        Cpu.lowrank_add(LinearShape { m, k, n, r: rank }, &x, adapter, &mut y_single).unwrap();
        let (want, mag) = reference(&fx.refs, 0, &ids, (k, n), &x, &y0);
        check(&format!("rank {rank} multi"), &y_multi, &want, &mag, k, rank, 2f64.powi(-53));
        check(&format!("rank {rank} single"), &y_single, &want, &mag, k, rank, 2f64.powi(-53));
    }
}

/// Uni-LoRA served from θ gives the same bits as the same adapter with its
/// factors materialised by `projection_gather` and stored as f32 LoRA.
#[test]
fn unilora_from_theta_equals_materialised() {
    for assignment in [Assignment::Hash, Assignment::Balanced] {
        let (k, n, layers, rank) = (24, 40, 2, 6);
        let cfg = PoolConfig { k, n, layers, slots: 2, rank_rows: 64, floats: 4096 };
        let mut pool = AdapterPool::<Cpu, f32>::new(&Cpu, cfg).unwrap();
        let proj = Projection::new(uni_rows(k, n, layers), UNI_D, 77, assignment).unwrap();
        let h = pool.add_projection(&Cpu, &proj).unwrap();
        let mut rng = Rng::new(9);
        let theta = rng.uniform_vec(UNI_D as usize, -1.0, 1.0);
        let per = [UniLoraLayer { a_start: 5, b_start: 700 }, UniLoraLayer { a_start: 3000, b_start: 1000 }];
        let uni = ServedAdapter::UniLora { projection: h, rank, scale: 0.7, theta: &theta, layers: &per };
        pool.fill(&Cpu, 0, &uni).unwrap();
        let mats: Vec<RefLayer> = per.iter().map(|ul| materialise(&proj, &theta, ul, rank, k, n)).collect();
        let lf: Vec<LayerFactors> = mats.iter().map(|l| LayerFactors { a: &l.a, b: &l.b, u: None, v: None }).collect();
        pool.fill(&Cpu, 1, &ServedAdapter::PerLayer { rank, scale: 0.7, layers: &lf }).unwrap();
        let m = 11;
        let x = rng.uniform_vec(m * k, -1.0, 1.0);
        for layer in 0..layers {
            let (mut y_theta, mut y_mat) = (vec![0.5f32; m * n], vec![0.5f32; m * n]);
            Cpu.multi_adapter_add(&pool, layer, RowAdapters::Rows(&[0; 11]), &x, &mut y_theta).unwrap();
            Cpu.multi_adapter_add(&pool, layer, RowAdapters::Rows(&[1; 11]), &x, &mut y_mat).unwrap();
            assert_eq!(y_theta, y_mat, "{assignment:?} layer {layer}");
            assert!(y_theta.iter().any(|&v| v != 0.5), "the adapter must change y");
        }
    }
}

#[test]
fn pool_fill_evict_reuse_and_sharing() {
    let (k, n) = (16, 8);
    let cfg = PoolConfig { k, n, layers: 2, slots: 3, rank_rows: 20, floats: 100 };
    let mut pool = AdapterPool::<Cpu, f32>::new(&Cpu, cfg).unwrap();
    let vera = pool.add_vera_factors(&Cpu, 4, 11).unwrap();
    assert_eq!(pool.usage(), (4, 0));
    let u = vec![0.1f32; 4];
    let v = vec![0.5f32; n];
    let lv = [LayerVectors { u: Some(&u), v: Some(&v) }, LayerVectors { u: Some(&u), v: None }];
    // Three VeRA adapters share the 4 rank rows; each costs only its vectors.
    for slot in 0..3 {
        pool.fill(&Cpu, slot, &ServedAdapter::Shared { factors: vera, scale: 1.0, vectors: &lv }).unwrap();
    }
    assert_eq!(pool.usage(), (4, 3 * (4 + n + 4)));
    assert!(matches!(pool.release_shared_factors(vera), Err(Error::Invalid { .. })));
    for slot in 0..3 {
        pool.evict(&Cpu, slot).unwrap();
    }
    pool.release_shared_factors(vera).unwrap();
    assert_eq!(pool.usage(), (0, 0));
    // A rank-8 LoRA in two layers takes 16 of the 20 rank rows; a second
    // does not fit until the first is evicted.
    let (a, b) = (vec![0.25f32; 8 * k], vec![0.5f32; n * 8]);
    let lf = [LayerFactors { a: &a, b: &b, u: None, v: None }; 2];
    let lora = ServedAdapter::PerLayer { rank: 8, scale: 1.0, layers: &lf };
    pool.fill(&Cpu, 1, &lora).unwrap();
    let full = pool.fill(&Cpu, 2, &lora).unwrap_err();
    assert!(full.to_string().contains("evict"), "{full}");
    assert_eq!(pool.usage(), (16, 0), "a failed fill must not leak");
    assert!(!pool.is_filled(2));
    pool.evict(&Cpu, 1).unwrap();
    pool.fill(&Cpu, 2, &lora).unwrap();
    assert_eq!(pool.rank(2), Some(8));
    // The evicted slot is rejected by name, the filled one works.
    let x = vec![1f32; k];
    let mut y = vec![0f32; n];
    let e = Cpu.multi_adapter_add(&pool, 0, RowAdapters::Rows(&[1]), &x, &mut y).unwrap_err();
    assert!(e.to_string().contains("slot 1, which is empty"), "{e}");
    assert!(y.iter().all(|&v| v == 0.0), "a rejected call must not write y");
    Cpu.multi_adapter_add(&pool, 1, RowAdapters::Rows(&[2]), &x, &mut y).unwrap();
    // y = s·(x·Aᵀ)·Bᵀ = 16·0.25·8·0.5 = 16 per element.
    assert!(y.iter().all(|&v| v == 16.0), "{y:?}");
}

#[test]
fn bad_input_gets_typed_errors() {
    let (k, n) = (8, 4);
    let cfg = PoolConfig { k, n, layers: 1, slots: 2, rank_rows: 200, floats: 300 };
    let mut pool = AdapterPool::<Cpu, f32>::new(&Cpu, cfg).unwrap();
    let (a, b) = (vec![0.5f32; 2 * k], vec![0.5f32; n * 2]);
    let lf = [LayerFactors { a: &a, b: &b, u: None, v: None }];
    pool.fill(&Cpu, 0, &ServedAdapter::PerLayer { rank: 2, scale: 1.0, layers: &lf }).unwrap();
    let x = vec![1f32; 2 * k];
    let mut y = vec![0f32; 2 * n];
    let add = |pool: &AdapterPool<Cpu, f32>, layer, rows, x: &Vec<f32>, y: &mut Vec<f32>| {
        Cpu.multi_adapter_add(pool, layer, rows, x, y).unwrap_err()
    };
    assert!(matches!(add(&pool, 0, RowAdapters::Rows(&[0, 2]), &x, &mut y), Error::Index { index: 2, bound: 2, .. }));
    assert!(matches!(add(&pool, 0, RowAdapters::Rows(&[-2, 0]), &x, &mut y), Error::Index { .. }));
    assert!(matches!(add(&pool, 0, RowAdapters::Rows(&[1, 0]), &x, &mut y), Error::Invalid { .. }));
    assert!(matches!(add(&pool, 1, RowAdapters::Rows(&[0, 0]), &x, &mut y), Error::Index { index: 1, .. }));
    assert!(matches!(add(&pool, 0, RowAdapters::Rows(&[0]), &x, &mut y), Error::Shape { operand: "x", .. }));
    let mut y_short = vec![0f32; n];
    assert!(matches!(add(&pool, 0, RowAdapters::Rows(&[0, 0]), &x, &mut y_short), Error::Shape { operand: "y", .. }));
    let bad_starts = RowAdapters::Segments { starts: &[0, 2], ids: &[0, 0] };
    assert!(matches!(add(&pool, 0, bad_starts, &x, &mut y), Error::Shape { .. }));
    let decreasing = RowAdapters::Segments { starts: &[0, 2, 1, 2], ids: &[0, 0, 0] };
    assert!(matches!(add(&pool, 0, decreasing, &x, &mut y), Error::Invalid { .. }));
    assert!(y.iter().all(|&v| v == 0.0), "rejected calls must not write y");

    let fill = |pool: &mut AdapterPool<Cpu, f32>, slot, ad: &ServedAdapter| pool.fill(&Cpu, slot, ad).unwrap_err();
    assert!(matches!(
        fill(&mut pool, 0, &ServedAdapter::PerLayer { rank: 2, scale: 1.0, layers: &lf }),
        Error::Invalid { .. }
    ));
    assert!(matches!(
        fill(&mut pool, 5, &ServedAdapter::PerLayer { rank: 2, scale: 1.0, layers: &lf }),
        Error::Index { .. }
    ));
    for rank in [0, MAX_RANK + 1] {
        let e = fill(&mut pool, 1, &ServedAdapter::PerLayer { rank, scale: 1.0, layers: &lf });
        assert!(e.to_string().contains("rank"), "{e}");
    }
    let e = fill(&mut pool, 1, &ServedAdapter::PerLayer { rank: 3, scale: 1.0, layers: &lf });
    assert!(matches!(e, Error::Shape { operand: "A", .. }), "{e}");
    let e = fill(&mut pool, 1, &ServedAdapter::PerLayer { rank: 2, scale: f32::NAN, layers: &lf });
    assert!(e.to_string().contains("not finite"), "{e}");
    let e = fill(&mut pool, 1, &ServedAdapter::PerLayer { rank: 2, scale: 1.0, layers: &[lf[0], lf[0]] });
    assert!(matches!(e, Error::Shape { operand: "layers", .. }), "{e}");
    let short_v = vec![1f32; n - 1];
    let bad_v = [LayerFactors { v: Some(&short_v), ..lf[0] }];
    let e = fill(&mut pool, 1, &ServedAdapter::PerLayer { rank: 2, scale: 1.0, layers: &bad_v });
    assert!(matches!(e, Error::Shape { operand: "v", .. }), "{e}");
    let e = fill(
        &mut pool,
        1,
        &ServedAdapter::Shared { factors: SharedFactors(3), scale: 1.0, vectors: &[LayerVectors::default()] },
    );
    assert!(matches!(e, Error::Index { .. }), "{e}");
    assert_eq!(pool.usage(), (2, 0), "failed fills must not leak");

    let explicit = Projection::explicit(vec![0, 1, 0], 2).unwrap();
    assert!(pool.add_projection(&Cpu, &explicit).is_err());
    let proj = Projection::new(100, 7, 1, Assignment::Hash).unwrap();
    let h = pool.add_projection(&Cpu, &proj).unwrap();
    let theta = vec![0.1f32; 7];
    let past_end = [UniLoraLayer { a_start: 90, b_start: 0 }];
    let e = fill(
        &mut pool,
        1,
        &ServedAdapter::UniLora { projection: h, rank: 2, scale: 1.0, theta: &theta, layers: &past_end },
    );
    assert!(e.to_string().contains("runs past D"), "{e}");
    let ok_layer = [UniLoraLayer { a_start: 0, b_start: 16 }];
    let e = fill(
        &mut pool,
        1,
        &ServedAdapter::UniLora { projection: h, rank: 2, scale: 1.0, theta: &theta[..6], layers: &ok_layer },
    );
    assert!(matches!(e, Error::Shape { operand: "theta", .. }), "{e}");
    pool.fill(
        &Cpu,
        1,
        &ServedAdapter::UniLora { projection: h, rank: 2, scale: 1.0, theta: &theta, layers: &ok_layer },
    )
    .unwrap();
    assert!(pool.release_projection(h).is_err(), "a projection in use cannot be released");
    pool.evict(&Cpu, 1).unwrap();
    pool.release_projection(h).unwrap();
    assert!(pool.evict(&Cpu, 1).is_err(), "evicting an empty slot is an error");
    for bad in [
        PoolConfig { k: 0, n: 4, layers: 1, slots: 1, rank_rows: 1, floats: 1 },
        PoolConfig { k: 4, n: 4, layers: 1, slots: 0, rank_rows: 1, floats: 1 },
        PoolConfig { k: 4, n: 4, layers: 1, slots: 1, rank_rows: 1, floats: u32::MAX as usize },
    ] {
        assert!(AdapterPool::<Cpu, f32>::new(&Cpu, bad).is_err(), "{bad:?}");
    }
}

// ---- GPU: the kernels against the same reference ------------------------------

/// Every kind on the shapes of the device kernels' paths: multiples of 8
/// take the 16-byte paths; the others the scalar ones.
fn matches_reference_on_kernel_paths<B: MultiAdapterOps + 'static>(dev: &B) {
    for case in 0..cases(4) as u64 {
        matches_reference::<_, bf16>(dev, 600 + case, &KINDS, (4096, 512));
        matches_reference::<_, f16>(dev, 700 + case, &KINDS, (256, 2056));
        matches_reference::<_, f32>(dev, 800 + case, &KINDS, (72, 4104));
        matches_reference::<_, bf16>(dev, 900 + case, &KINDS, (37, 45));
        matches_reference::<_, f32>(dev, 950 + case, &KINDS, (1, 3));
    }
}

test_device!(matches_reference_on_kernel_paths, gpu: gpu_matches_reference_all_kinds);
