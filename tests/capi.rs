//! The C ABI: `include/lorafuse.h` against the declarations of
//! `src/capi.rs` (so the two cannot drift), status codes and messages, and
//! every CPU entry point against the Rust API it wraps (same bits). The
//! CUDA entry points are checked against the Rust CUDA API where a GPU
//! exists, and must fail cleanly (no panic, a status code) where none does.

mod common;

use std::collections::BTreeMap;
use std::ffi::{c_void, CStr};

#[cfg(feature = "cuda")]
use common::gpu_or_skip;
use half::bf16;
use lorafuse::capi::*;
use lorafuse::cpu::Cpu;
use lorafuse::lowrank::{Adapter, LinearShape, LowRankOps};
use lorafuse::multi_adapter::*;
use lorafuse::rng::Rng;
#[cfg(feature = "cuda")]
use lorafuse::Backend;

const HEADER: &str = include_str!("../include/lorafuse.h");
const SOURCE: &str = include_str!("../src/capi.rs");

/// (return type, [(parameter name, type)]) per function, in C spelling.
type Signatures = BTreeMap<String, (String, Vec<(String, String)>)>;

/// A Rust FFI type in C spelling.
fn c_type(rust: &str) -> String {
    let t = rust.trim();
    if let Some(inner) = t.strip_prefix("*const ") {
        let inner = c_type(inner);
        return if inner.ends_with('*') { format!("{inner} const*") } else { format!("const {inner}*") };
    }
    if let Some(inner) = t.strip_prefix("*mut ") {
        return format!("{}*", c_type(inner));
    }
    match t {
        "i32" => "int32_t",
        "i64" => "int64_t",
        "u32" => "uint32_t",
        "u64" => "uint64_t",
        "f32" => "float",
        "c_void" => "void",
        "c_char" => "char",
        "LorafusePool" => "lorafuse_pool",
        "CUstream" => "CUstream",
        other => panic!("src/capi.rs uses `{other}` across the boundary: add its C spelling to this test"),
    }
    .to_string()
}

fn rust_signatures() -> Signatures {
    let mut out = Signatures::new();
    for (i, _) in SOURCE.match_indices("extern \"C\" fn ") {
        let rest = &SOURCE[i + "extern \"C\" fn ".len()..];
        let open = rest.find('(').unwrap();
        let name = rest[..open].trim().to_string();
        let close = open + rest[open..].find(')').unwrap();
        let params = rest[open + 1..close]
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (n, t) = p.split_once(':').unwrap();
                (n.trim().to_string(), c_type(t))
            })
            .collect();
        let tail = &rest[close + 1..rest.find('{').unwrap()];
        let ret = tail.trim().strip_prefix("->").map_or("void".to_string(), c_type);
        out.insert(name, (ret, params));
    }
    out
}

fn strip_comments(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("/*") {
        out.push_str(&rest[..i]);
        rest = &rest[i + rest[i..].find("*/").unwrap() + 2..];
    }
    out.push_str(rest);
    out
}

/// Normalises C spelling: `const void* x` → ("x", "const void*").
fn c_param(p: &str) -> (String, String) {
    let p = p.split_whitespace().collect::<Vec<_>>().join(" ").replace(" *", "*");
    let cut = p.rfind([' ', '*']).unwrap();
    (p[cut + 1..].to_string(), p[..=cut].trim().to_string())
}

fn header_signatures() -> Signatures {
    let text = strip_comments(HEADER);
    let code: String = text.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join(" ");
    let mut out = Signatures::new();
    for decl in code.split(';') {
        let Some(open) = decl.find("lorafuse_").filter(|_| decl.contains('(')) else { continue };
        if decl.contains("typedef") {
            continue;
        }
        let paren = decl.find('(').unwrap();
        let name = decl[open..paren].trim().to_string();
        let ret = decl[..open].split_whitespace().collect::<Vec<_>>().join(" ").replace(" *", "*");
        let params = &decl[paren + 1..decl.rfind(')').unwrap()];
        let params =
            if params.trim() == "void" { Vec::new() } else { params.split(',').map(c_param).collect::<Vec<_>>() };
        out.insert(name, (ret, params));
    }
    out
}

fn header_defines() -> BTreeMap<String, i64> {
    HEADER
        .lines()
        .filter_map(|l| {
            let mut parts = l.trim().strip_prefix("#define ")?.split_whitespace();
            let (name, value) = (parts.next()?, parts.next()?);
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn rust_consts() -> BTreeMap<String, i64> {
    SOURCE
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("pub const ")?;
            let (name, value) = rest.split_once(':')?;
            let value = value.split_once('=')?.1.trim().trim_end_matches(';');
            Some((name.trim().to_string(), value.parse().ok()?))
        })
        .collect()
}

#[test]
fn header_matches_rust_declarations() {
    let (rust, header) = (rust_signatures(), header_signatures());
    assert!(rust.len() >= 15, "parsed only {} Rust functions", rust.len());
    assert_eq!(
        rust.keys().collect::<Vec<_>>(),
        header.keys().collect::<Vec<_>>(),
        "functions in src/capi.rs and include/lorafuse.h differ"
    );
    for (name, sig) in &rust {
        assert_eq!(sig, &header[name], "{name}: src/capi.rs (left) and include/lorafuse.h (right) differ");
    }
    let (consts, defines) = (rust_consts(), header_defines());
    assert!(consts.len() >= 15);
    for (name, value) in &consts {
        assert_eq!(defines.get(name), Some(value), "{name}: header and src/capi.rs differ");
    }
    let version = [env!("CARGO_PKG_VERSION_MAJOR"), env!("CARGO_PKG_VERSION_MINOR"), env!("CARGO_PKG_VERSION_PATCH")];
    for (part, v) in ["MAJOR", "MINOR", "PATCH"].iter().zip(version) {
        assert_eq!(defines[&format!("LORAFUSE_VERSION_{part}")], v.parse::<i64>().unwrap(), "header version");
    }
}

#[test]
fn version_and_error_messages() {
    let v = env!("CARGO_PKG_VERSION");
    assert_eq!(unsafe { CStr::from_ptr(lorafuse_version_string()) }.to_str().unwrap(), v);
    let d = header_defines();
    assert_eq!(lorafuse_version() as i64, d["LORAFUSE_VERSION_MAJOR"] * 10000 + d["LORAFUSE_VERSION_MINOR"] * 100);
    let last = || unsafe { CStr::from_ptr(lorafuse_last_error()) }.to_string_lossy().into_owned();
    let null = std::ptr::null();
    let status = unsafe {
        lorafuse_lora_linear_cpu(
            LORAFUSE_F32,
            1,
            2,
            3,
            1,
            null,
            null,
            null,
            null.cast(),
            null.cast(),
            null.cast(),
            null.cast(),
            1.0,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(status, LORAFUSE_ERR_NULL_POINTER);
    assert!(last().contains("`x` is NULL"), "{}", last());
    let x = [0f32; 2];
    let status = unsafe {
        lorafuse_lora_linear_cpu(
            9,
            1,
            2,
            3,
            1,
            x.as_ptr().cast(),
            null,
            null,
            null.cast(),
            null.cast(),
            null.cast(),
            null.cast(),
            1.0,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(status, LORAFUSE_ERR_INVALID);
    assert!(last().contains("LORAFUSE_BF16"), "{}", last());
    // Messages are per thread.
    std::thread::spawn(|| assert_eq!(unsafe { CStr::from_ptr(lorafuse_last_error()) }.to_bytes(), b"")).join().unwrap();
    let mut pool: *mut LorafusePool = std::ptr::null_mut();
    assert_eq!(unsafe { lorafuse_pool_create_cpu(LORAFUSE_F32, 4, 4, 1, 2, 8, 8, &mut pool) }, LORAFUSE_OK);
    assert_eq!(last(), "");
    assert_eq!(unsafe { lorafuse_pool_evict(pool, 7) }, LORAFUSE_ERR_INDEX);
    assert_eq!(unsafe { lorafuse_pool_evict(pool, 0) }, LORAFUSE_ERR_INVALID);
    assert_eq!(unsafe { lorafuse_pool_create_cpu(LORAFUSE_F32, 0, 4, 1, 2, 8, 8, &mut pool) }, LORAFUSE_ERR_INVALID);
    assert_eq!(unsafe { lorafuse_pool_destroy(pool) }, LORAFUSE_OK);
    assert_eq!(unsafe { lorafuse_pool_destroy(std::ptr::null_mut()) }, LORAFUSE_OK);
}

fn bf(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&e| bf16::from_f32(e)).collect()
}

#[test]
fn lora_linear_cpu_equals_rust_api() {
    let (m, k, n, r) = (5, 19, 11, 3);
    let mut rng = Rng::new(4);
    let x = bf(&rng.uniform_vec(m * k, -1.0, 1.0));
    let w = bf(&rng.uniform_vec(n * k, -1.0, 1.0));
    let bias = bf(&rng.uniform_vec(n, -1.0, 1.0));
    let (a, b) = (rng.uniform_vec(r * k, -1.0, 1.0), rng.uniform_vec(n * r, -1.0, 1.0));
    let (u, v) = (rng.uniform_vec(r, -1.0, 1.0), rng.uniform_vec(n, -1.0, 1.0));
    let mut y_c = vec![bf16::ZERO; m * n];
    let status = unsafe {
        lorafuse_lora_linear_cpu(
            LORAFUSE_BF16,
            m as i64,
            k as i64,
            n as i64,
            r as i64,
            x.as_ptr().cast(),
            w.as_ptr().cast(),
            bias.as_ptr().cast(),
            a.as_ptr(),
            b.as_ptr(),
            u.as_ptr(),
            v.as_ptr(),
            0.5,
            y_c.as_mut_ptr().cast(),
        )
    };
    assert_eq!(status, LORAFUSE_OK);
    let mut y_rust = vec![bf16::ZERO; m * n];
    let ad = Adapter::<Cpu> { a: &a, b: &b, u: Some(&u), v: Some(&v), scale: 0.5 };
    Cpu.lowrank_forward(LinearShape { m, k, n, r }, &x, &w, Some(&bias), Some(ad), &mut y_rust, None).unwrap();
    assert_eq!(y_c, y_rust);
    // A wrong rank is a shape error, and y stays untouched.
    let before = y_c.clone();
    let status = unsafe {
        lorafuse_lora_linear_cpu(
            LORAFUSE_BF16,
            m as i64,
            k as i64,
            n as i64,
            0,
            x.as_ptr().cast(),
            w.as_ptr().cast(),
            bias.as_ptr().cast(),
            a.as_ptr(),
            b.as_ptr(),
            u.as_ptr(),
            v.as_ptr(),
            0.5,
            y_c.as_mut_ptr().cast(),
        )
    };
    assert_ne!(status, LORAFUSE_OK);
    assert_eq!(y_c, before);
}

/// A pool filled through the ABI with every adapter kind serves the same
/// bits as the same pool filled through the Rust API.
#[test]
fn pool_and_multi_adapter_cpu_equal_rust_api() {
    let (k, n, layers, slots) = (24, 16, 2, 5);
    let (rank_rows, floats) = (200i64, 2000i64);
    let mut rng = Rng::new(8);
    let a = rng.uniform_vec(layers * 4 * k, -1.0, 1.0);
    let b = rng.uniform_vec(layers * n * 4, -1.0, 1.0);
    let tied_a = rng.uniform_vec(2 * k, -1.0, 1.0);
    let tied_b = rng.uniform_vec(n * 2, -1.0, 1.0);
    let tied_u = rng.uniform_vec(layers * 2, -1.0, 1.0);
    let vera_u = rng.uniform_vec(layers * 8, -1.0, 1.0);
    let vera_v = rng.uniform_vec(layers * n, -1.0, 1.0);
    let theta = rng.uniform_vec(31, -1.0, 1.0);
    let (a_start, b_start) = ([0u64, 400], [200u64, 700]);
    let d_rows = 2000u64;

    let mut pool: *mut LorafusePool = std::ptr::null_mut();
    let null = std::ptr::null::<f32>();
    unsafe {
        assert_eq!(
            lorafuse_pool_create_cpu(
                LORAFUSE_BF16,
                k as i64,
                n as i64,
                layers as i64,
                slots,
                rank_rows,
                floats,
                &mut pool
            ),
            LORAFUSE_OK
        );
        assert_eq!(lorafuse_pool_fill_lora(pool, 0, 4, 0.5, a.as_ptr(), b.as_ptr(), null, null), LORAFUSE_OK);
        assert_eq!(
            lorafuse_pool_fill_tied(pool, 1, 2, 1.5, tied_a.as_ptr(), tied_b.as_ptr(), tied_u.as_ptr(), null),
            LORAFUSE_OK
        );
        let mut vera = -1i64;
        assert_eq!(lorafuse_pool_add_vera_factors(pool, 8, 99, &mut vera), LORAFUSE_OK);
        assert_eq!(lorafuse_pool_fill_shared(pool, 2, vera, 2.0, vera_u.as_ptr(), vera_v.as_ptr()), LORAFUSE_OK);
        let mut proj = -1i64;
        assert_eq!(lorafuse_pool_add_projection(pool, d_rows, 31, 5, LORAFUSE_ASSIGN_BALANCED, &mut proj), LORAFUSE_OK);
        assert_eq!(
            lorafuse_pool_fill_unilora(pool, 4, proj, 3, 0.25, theta.as_ptr(), a_start.as_ptr(), b_start.as_ptr()),
            LORAFUSE_OK
        );
    }

    let cfg =
        PoolConfig { k, n, layers, slots: slots as usize, rank_rows: rank_rows as usize, floats: floats as usize };
    let mut rp = AdapterPool::<Cpu, bf16>::new(&Cpu, cfg).unwrap();
    let lf: Vec<LayerFactors> = (0..layers)
        .map(|l| LayerFactors {
            a: &a[l * 4 * k..(l + 1) * 4 * k],
            b: &b[l * n * 4..(l + 1) * n * 4],
            u: None,
            v: None,
        })
        .collect();
    rp.fill(&Cpu, 0, &ServedAdapter::PerLayer { rank: 4, scale: 0.5, layers: &lf }).unwrap();
    let tv: Vec<LayerVectors> =
        (0..layers).map(|l| LayerVectors { u: Some(&tied_u[l * 2..l * 2 + 2]), v: None }).collect();
    rp.fill(&Cpu, 1, &ServedAdapter::Tied { rank: 2, scale: 1.5, a: &tied_a, b: &tied_b, vectors: &tv }).unwrap();
    let vera = rp.add_vera_factors(&Cpu, 8, 99).unwrap();
    let vv: Vec<LayerVectors> = (0..layers)
        .map(|l| LayerVectors { u: Some(&vera_u[l * 8..l * 8 + 8]), v: Some(&vera_v[l * n..(l + 1) * n]) })
        .collect();
    rp.fill(&Cpu, 2, &ServedAdapter::Shared { factors: vera, scale: 2.0, vectors: &vv }).unwrap();
    let proj =
        lorafuse::projection::Projection::new(d_rows, 31, 5, lorafuse::projection::Assignment::Balanced).unwrap();
    let h = rp.add_projection(&Cpu, &proj).unwrap();
    let ul: Vec<UniLoraLayer> =
        (0..layers).map(|l| UniLoraLayer { a_start: a_start[l], b_start: b_start[l] }).collect();
    rp.fill(&Cpu, 4, &ServedAdapter::UniLora { projection: h, rank: 3, scale: 0.25, theta: &theta, layers: &ul })
        .unwrap();

    let ids = [4i32, -1, 0, 2, 2, 1, 4, 0];
    let m = ids.len();
    let x = bf(&rng.uniform_vec(m * k, -1.0, 1.0));
    let y0 = bf(&rng.uniform_vec(m * n, -1.0, 1.0));
    let starts = [0i64, 3, 3, 8];
    let seg_ids = [2i32, 0, -1];
    for layer in 0..layers {
        let mut y_c = y0.clone();
        let st = unsafe {
            lorafuse_multi_adapter_add(
                pool,
                std::ptr::null_mut(),
                layer as i64,
                m as i64,
                ids.as_ptr(),
                x.as_ptr().cast(),
                y_c.as_mut_ptr().cast(),
            )
        };
        assert_eq!(st, LORAFUSE_OK);
        let mut y_r = y0.clone();
        Cpu.multi_adapter_add(&rp, layer, RowAdapters::Rows(&ids), &x, &mut y_r).unwrap();
        assert_eq!(y_c, y_r, "layer {layer} rows");
        assert_ne!(y_c, y0);
        let mut y_c = y0.clone();
        let st = unsafe {
            lorafuse_multi_adapter_add_segments(
                pool,
                std::ptr::null_mut(),
                layer as i64,
                3,
                starts.as_ptr(),
                seg_ids.as_ptr(),
                x.as_ptr().cast(),
                y_c.as_mut_ptr().cast(),
            )
        };
        assert_eq!(st, LORAFUSE_OK);
        let mut y_r = y0.clone();
        let su = [0usize, 3, 3, 8];
        Cpu.multi_adapter_add(&rp, layer, RowAdapters::Segments { starts: &su, ids: &seg_ids }, &x, &mut y_r).unwrap();
        assert_eq!(y_c, y_r, "layer {layer} segments");
    }
    // Errors: an empty slot, a bad id, a stream given to a CPU pool.
    let mut y_c = y0.clone();
    let run = |ids: &[i32], stream: *mut c_void, y: &mut Vec<bf16>| unsafe {
        lorafuse_multi_adapter_add(
            pool,
            stream.cast(),
            0,
            ids.len() as i64,
            ids.as_ptr(),
            x.as_ptr().cast(),
            y.as_mut_ptr().cast(),
        )
    };
    assert_eq!(run(&[3, 0, 0, 0, 0, 0, 0, 0], std::ptr::null_mut(), &mut y_c), LORAFUSE_ERR_INVALID);
    assert_eq!(run(&[5, 0, 0, 0, 0, 0, 0, 0], std::ptr::null_mut(), &mut y_c), LORAFUSE_ERR_INDEX);
    assert_eq!(run(&ids, 8usize as *mut c_void, &mut y_c), LORAFUSE_ERR_INVALID);
    assert_eq!(y_c, y0, "failed calls must not write y");
    assert_eq!(unsafe { lorafuse_pool_destroy(pool) }, LORAFUSE_OK);
}

/// Where no GPU answers (or the build has no CUDA): a status code and a
/// message, never a panic or a crash. Returns the last message.
fn cuda_entry_points_fail_cleanly() -> String {
    let mut pool: *mut LorafusePool = std::ptr::null_mut();
    let st = unsafe { lorafuse_pool_create_cuda(0, LORAFUSE_BF16, 4, 4, 1, 1, 4, 4, &mut pool) };
    assert!(st == LORAFUSE_ERR_NO_DEVICE || st == LORAFUSE_ERR_KERNELS_NOT_BUILT, "status {st}");
    assert!(pool.is_null(), "a failed create must not hand out a pool");
    let fake = 256usize as *const c_void;
    let st = unsafe {
        lorafuse_lora_linear_cuda(
            std::ptr::null_mut(),
            LORAFUSE_BF16,
            1,
            8,
            8,
            1,
            fake,
            fake,
            std::ptr::null(),
            fake.cast(),
            fake.cast(),
            std::ptr::null(),
            std::ptr::null(),
            1.0,
            fake as *mut c_void,
        )
    };
    assert!(st == LORAFUSE_ERR_NO_DEVICE || st == LORAFUSE_ERR_KERNELS_NOT_BUILT, "status {st}");
    unsafe { CStr::from_ptr(lorafuse_last_error()) }.to_string_lossy().into_owned()
}

/// A build without the `cuda` feature keeps the CUDA symbols (one header
/// for both builds); they refuse, and say how to get them.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_entry_points_name_the_missing_feature_in_a_build_without_cuda() {
    let msg = cuda_entry_points_fail_cleanly();
    assert!(msg.contains("`cuda` feature") && msg.contains("_cpu"), "{msg}");
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_cuda_entry_points_fail_cleanly_or_match_rust_api() {
    let (m, k, n, r) = (3usize, 64usize, 40usize, 4usize);
    let mut rng = Rng::new(12);
    let x = bf(&rng.uniform_vec(m * k, -1.0, 1.0));
    let w = bf(&rng.uniform_vec(n * k, -1.0, 1.0));
    let (a, b) = (rng.uniform_vec(r * k, -1.0, 1.0), rng.uniform_vec(n * r, -1.0, 1.0));
    let Some(gpu) = gpu_or_skip("gpu_cuda_entry_points_fail_cleanly_or_match_rust_api") else {
        cuda_entry_points_fail_cleanly();
        return;
    };
    use cudarc::driver::DevicePtr;
    let (xd, wd, ad, bd) =
        (gpu.upload(&x).unwrap(), gpu.upload(&w).unwrap(), gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap());
    let mut yd = gpu.zeros::<bf16>(m * n).unwrap();
    let stream = gpu.stream();
    fn ptr<T>(s: &cudarc::driver::CudaSlice<T>, stream: &std::sync::Arc<cudarc::driver::CudaStream>) -> *const c_void {
        s.device_ptr(stream).0 as *const c_void
    }
    let st = unsafe {
        lorafuse_lora_linear_cuda(
            stream.cu_stream(),
            LORAFUSE_BF16,
            m as i64,
            k as i64,
            n as i64,
            r as i64,
            ptr(&xd, stream),
            ptr(&wd, stream),
            std::ptr::null(),
            ptr(&ad, stream).cast(),
            ptr(&bd, stream).cast(),
            std::ptr::null(),
            std::ptr::null(),
            0.5,
            ptr(&yd, stream) as *mut c_void,
        )
    };
    assert_eq!(st, LORAFUSE_OK, "{}", unsafe { CStr::from_ptr(lorafuse_last_error()) }.to_string_lossy());
    let got = gpu.download(&yd).unwrap();
    let ad_rust = Adapter::<lorafuse::cuda::Gpu> { a: &ad, b: &bd, u: None, v: None, scale: 0.5 };
    gpu.lowrank_forward(LinearShape { m, k, n, r }, &xd, &wd, None, Some(ad_rust), &mut yd, None).unwrap();
    assert_eq!(got, gpu.download(&yd).unwrap(), "the ABI and the Rust API give different bits");
}
