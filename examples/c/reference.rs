//! The numbers `examples/c/main.c` must print, computed through the Rust
//! API on the same inputs (the same integer hash), in the same format:
//! `<op> <index> <f32 bits in hex>`. `make -C examples/c run` diffs the two.

use lorafuse::cpu::Cpu;
use lorafuse::lowrank::{Adapter, LinearShape, LowRankOps};
use lorafuse::multi_adapter::*;
use lorafuse::projection::{Assignment, Projection};

/// The C program's `value`: a 32-bit hash of (stream, index) mapped exactly
/// onto a float in [-1, 1).
fn value(stream: u32, i: u32) -> f32 {
    let mut h = i.wrapping_mul(0x9E37_79B1) ^ stream.wrapping_mul(0x85EB_CA77).wrapping_add(0x1656_67B1);
    h ^= h >> 16;
    h = h.wrapping_mul(0x7FEB_352D);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846C_A68B);
    h ^= h >> 16;
    (h >> 8) as f32 * (1.0 / 8_388_608.0) - 1.0
}

fn draw(stream: u32, n: usize) -> Vec<f32> {
    (0..n as u32).map(|i| value(stream, i)).collect()
}

fn main() -> lorafuse::Result<()> {
    let (m, k, n, r) = (4, 64, 48, 8);
    let (x, w, bias) = (draw(1, m * k), draw(2, n * k), draw(3, n));
    let (a, b) = (draw(4, r * k), draw(5, n * r));
    let mut y = vec![0f32; m * n];
    let ad = Adapter::<Cpu> { a: &a, b: &b, u: None, v: None, scale: 0.5 };
    Cpu.lowrank_forward(LinearShape { m, k, n, r }, &x, &w, Some(&bias), Some(ad), &mut y, None)?;
    for (i, v) in y.iter().enumerate() {
        println!("linear {i} {:08x}", v.to_bits());
    }

    let (pk, pn, dm) = (64, 48, 6);
    let cfg = PoolConfig { k: pk, n: pn, layers: 1, slots: 4, rank_rows: 256, floats: 4096 };
    let mut pool = AdapterPool::<Cpu, f32>::new(&Cpu, cfg)?;
    let (a0, b0) = (draw(10, 8 * pk), draw(11, pn * 8));
    let l0 = [LayerFactors { a: &a0, b: &b0, u: None, v: None }];
    pool.fill(&Cpu, 0, &ServedAdapter::PerLayer { rank: 8, scale: 0.25, layers: &l0 })?;
    let (a1, b1, u1, v1) = (draw(12, 16 * pk), draw(13, pn * 16), draw(14, 16), draw(15, pn));
    let l1 = [LayerFactors { a: &a1, b: &b1, u: Some(&u1), v: Some(&v1) }];
    pool.fill(&Cpu, 1, &ServedAdapter::PerLayer { rank: 16, scale: 0.125, layers: &l1 })?;
    let shared = pool.add_shared_factors(&Cpu, 32, &draw(16, 32 * pk), &draw(17, pn * 32))?;
    let (u2, v2) = (draw(18, 32), draw(19, pn));
    let lv = [LayerVectors { u: Some(&u2), v: Some(&v2) }];
    pool.fill(&Cpu, 2, &ServedAdapter::Shared { factors: shared, scale: 1.0, vectors: &lv })?;
    let proj = pool.add_projection(&Cpu, &Projection::new(1024, 37, 42, Assignment::Balanced)?)?;
    let theta = draw(20, 37);
    let ul = [UniLoraLayer { a_start: 100, b_start: 600 }];
    pool.fill(&Cpu, 3, &ServedAdapter::UniLora { projection: proj, rank: 4, scale: 0.5, theta: &theta, layers: &ul })?;
    let xd = draw(30, dm * pk);
    let mut yd = draw(31, dm * pn);
    Cpu.multi_adapter_add(&pool, 0, RowAdapters::Rows(&[1, -1, 0, 2, 3, 1]), &xd, &mut yd)?;
    for (i, v) in yd.iter().enumerate() {
        println!("decode {i} {:08x}", v.to_bits());
    }
    Ok(())
}
