//! Compiles every `kernels/*.cu` into a fatbin with nvcc and generates one Rust
//! constant per kernel family (`$OUT_DIR/kernels.rs`).
//!
//! nvcc is looked up in `NVCC`, then `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, then
//! `PATH`. Without it the crate still builds: each family's image is `None`,
//! the CUDA backend answers `Error::KernelsNotBuilt`, and the cfg
//! `lorafuse_kernels` stays unset. `scripts/install-cuda-toolchain.sh` installs
//! the pinned nvcc without root or a system toolkit.
//!
//! Environment:
//! - `LORAFUSE_CUDA_ARCHS`: comma-separated real targets, default
//!   `sm_80,sm_90a`. PTX for the lowest one is embedded too, so newer GPUs
//!   can JIT it.
//! - `LORAFUSE_SKIP_KERNELS=1`: do not compile kernels even if nvcc exists.
//! - Without the `cuda` feature no kernel is compiled (nothing would load it).
//! - `LORAFUSE_NVCC_FLAGS`: extra flags appended to every nvcc call.
//!
//! The base nvcc flags live in `kernels/nvcc-flags.txt`, which
//! `scripts/check-kernels.sh` reads too.
//!
//! With the `regen-abi` feature, bindgen regenerates the Rust side of
//! `kernels/abi.h` and the build fails if it differs from the committed
//! `src/abi/bindings.rs` (`LORAFUSE_ABI_BLESS=1` overwrites it instead;
//! `scripts/gen-abi.sh` does that). Without the feature nothing here needs
//! libclang.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_ARCHS: &str = "sm_80,sm_90a";
const ENV_VARS: &[&str] = &[
    "NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "PATH",
    "LORAFUSE_CUDA_ARCHS",
    "LORAFUSE_SKIP_KERNELS",
    "LORAFUSE_NVCC_FLAGS",
    "LORAFUSE_ABI_BLESS",
    "LIBCLANG_PATH",
];

fn main() {
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rustc-check-cfg=cfg(lorafuse_kernels)");

    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernel_dir = manifest.join("kernels");
    let sources = kernel_sources(&kernel_dir);
    #[cfg(feature = "regen-abi")]
    abi::check(&manifest, &out_dir);

    // Without the `cuda` feature nothing loads the kernels: skip nvcc quietly.
    let cuda = env::var_os("CARGO_FEATURE_CUDA").is_some();
    let skip = env::var("LORAFUSE_SKIP_KERNELS").is_ok_and(|v| v == "1");
    let nvcc = if skip || !cuda { None } else { find_nvcc() };
    let images: Vec<(String, Option<PathBuf>)> = match &nvcc {
        Some(nvcc) => compile_all(nvcc, &sources, &kernel_dir, &out_dir),
        None if !cuda => sources.iter().map(|s| (stem(s), None)).collect(),
        None => {
            let why =
                if skip { "LORAFUSE_SKIP_KERNELS=1" } else { "nvcc not found (NVCC, CUDA_HOME, CUDA_PATH, PATH)" };
            println!(
                "cargo:warning=lorafuse: CUDA kernels not compiled: {why}. The CPU backend works; \
                 the CUDA backend will return Error::KernelsNotBuilt. \
                 Run scripts/install-cuda-toolchain.sh and set NVCC to the path it prints."
            );
            sources.iter().map(|s| (stem(s), None)).collect()
        }
    };
    if nvcc.is_some() {
        println!("cargo:rustc-cfg=lorafuse_kernels");
    }
    let archs = if nvcc.is_some() { gencode_flags().join(" ") } else { String::new() };
    fs::write(out_dir.join("kernels.rs"), generate(&images, &archs)).unwrap();
}

fn kernel_sources(dir: &Path) -> Vec<PathBuf> {
    let mut sources = Vec::new();
    for entry in fs::read_dir(dir).expect("kernels/ directory missing") {
        let path = entry.unwrap().path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("cu") => sources.push(path.clone()),
            Some("cuh" | "h" | "txt") => {}
            _ => continue,
        }
        println!("cargo:rerun-if-changed={}", path.display());
    }
    sources.sort();
    sources
}

fn stem(path: &Path) -> String {
    path.file_stem().unwrap().to_string_lossy().into_owned()
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(path) = env::var_os("NVCC") {
        // An explicit NVCC that does not exist is a mistake worth failing on,
        // not something to silently build around.
        let path = PathBuf::from(path);
        assert!(path.is_file(), "NVCC={} does not exist", path.display());
        return Some(path);
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var) {
            let candidate = PathBuf::from(root).join("bin").join("nvcc");
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    env::split_paths(&env::var_os("PATH")?).map(|dir| dir.join("nvcc")).find(|p| p.is_file())
}

fn gencode_flags() -> Vec<String> {
    let archs = env::var("LORAFUSE_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.into());
    let archs: Vec<&str> = archs.split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
    assert!(!archs.is_empty(), "LORAFUSE_CUDA_ARCHS is empty");
    let mut flags = Vec::new();
    for arch in &archs {
        let num = arch
            .strip_prefix("sm_")
            .unwrap_or_else(|| panic!("LORAFUSE_CUDA_ARCHS entry `{arch}` must look like sm_80 or sm_90a"));
        // The -gencode form: `-arch=sm_90a` alone also runs a plain sm_90 pass
        // that rejects wgmma/setmaxnreg.
        flags.push(format!("-gencode=arch=compute_{num},code=sm_{num}"));
    }
    // PTX of the lowest target, for GPUs newer than every listed one.
    let lowest = archs
        .iter()
        .map(|a| a.trim_start_matches("sm_"))
        .min_by_key(|n| n.trim_end_matches(char::is_alphabetic).parse::<u32>().unwrap_or(0))
        .unwrap();
    let lowest = lowest.trim_end_matches(char::is_alphabetic);
    flags.push(format!("-gencode=arch=compute_{lowest},code=compute_{lowest}"));
    flags
}

/// The flags of `kernels/nvcc-flags.txt`: one per line, `#` comments.
fn base_flags(kernel_dir: &Path) -> Vec<String> {
    let path = kernel_dir.join("nvcc-flags.txt");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines().map(|l| l.split('#').next().unwrap().trim()).filter(|l| !l.is_empty()).map(String::from).collect()
}

fn compile_all(nvcc: &Path, sources: &[PathBuf], kernel_dir: &Path, out_dir: &Path) -> Vec<(String, Option<PathBuf>)> {
    let gencode = gencode_flags();
    let extra: Vec<String> =
        env::var("LORAFUSE_NVCC_FLAGS").map(|f| f.split_whitespace().map(String::from).collect()).unwrap_or_default();
    // Families compile independently; nvcc is slow, so run them side by side.
    let handles: Vec<_> = sources
        .iter()
        .map(|src| {
            let (nvcc, src, gencode, extra) = (nvcc.to_path_buf(), src.clone(), gencode.clone(), extra.clone());
            let (kernel_dir, out) = (kernel_dir.to_path_buf(), out_dir.join(format!("{}.fatbin", stem(&src))));
            let base = base_flags(&kernel_dir);
            std::thread::spawn(move || {
                let output = Command::new(&nvcc)
                    .arg("-fatbin")
                    .args(&base)
                    .arg(format!("-I{}", kernel_dir.display()))
                    .args(&gencode)
                    .args(&extra)
                    .arg("-o")
                    .arg(&out)
                    .arg(&src)
                    .output()
                    .unwrap_or_else(|e| panic!("could not run {}: {e}", nvcc.display()));
                if !output.status.success() {
                    panic!(
                        "nvcc failed on {}:\n{}\n{}",
                        src.display(),
                        String::from_utf8_lossy(&output.stdout),
                        String::from_utf8_lossy(&output.stderr)
                    );
                }
                (stem(&src), Some(out))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn generate(images: &[(String, Option<PathBuf>)], gencode: &str) -> String {
    let mut code = String::from("// Generated by build.rs: one constant per kernels/<family>.cu.\n");
    writeln!(
        code,
        "/// The nvcc -gencode flags the kernels were built with (empty without nvcc).\npub const GENCODE: &str = {gencode:?};"
    )
    .unwrap();
    for (name, image) in images {
        let ident = name.to_uppercase();
        let image = match image {
            Some(path) => format!("Some(include_bytes!({:?}))", path.display().to_string()),
            None => "None".to_string(),
        };
        writeln!(
            code,
            "/// Compiled image of `kernels/{name}.cu` (`None` when nvcc was not found at build time).\n\
             pub const {ident}: KernelFamily = KernelFamily {{ name: {name:?}, image: {image} }};"
        )
        .unwrap();
    }
    let all: Vec<String> = images.iter().map(|(n, _)| n.to_uppercase()).collect();
    writeln!(
        code,
        "/// Every kernel family, in file-name order.\npub const ALL: &[KernelFamily] = &[{}];",
        all.join(", ")
    )
    .unwrap();
    code
}

/// Regenerates the Rust side of `kernels/abi.h` and compares it with the
/// committed copy, so a header change cannot land without its bindings.
#[cfg(feature = "regen-abi")]
mod abi {
    use std::fs;
    use std::path::Path;

    const HEADER: &str = "// Generated from kernels/abi.h by bindgen (scripts/gen-abi.sh, or build.rs with the\n\
                          // `regen-abi` feature). Do not edit: change kernels/abi.h and regenerate.";

    /// Adds bytemuck's Pod and Zeroable to every struct: the launchers build
    /// them zeroed and view them as bytes or words.
    #[derive(Debug)]
    struct PodStructs;

    impl bindgen::callbacks::ParseCallbacks for PodStructs {
        fn add_derives(&self, info: &bindgen::callbacks::DeriveInfo<'_>) -> Vec<String> {
            match info.kind {
                bindgen::callbacks::TypeKind::Struct => vec!["bytemuck::Pod".into(), "bytemuck::Zeroable".into()],
                _ => vec![],
            }
        }
    }

    pub fn check(manifest: &Path, out_dir: &Path) {
        let header = manifest.join("kernels").join("abi.h");
        let committed = manifest.join("src").join("abi").join("bindings.rs");
        println!("cargo:rerun-if-changed={}", header.display());
        println!("cargo:rerun-if-changed={}", committed.display());
        let bindings = bindgen::Builder::default()
            .header(header.display().to_string())
            .clang_args(["-x", "c", "-std=c11"])
            .allowlist_file(".*abi\\.h")
            .default_enum_style(bindgen::EnumVariation::Consts)
            .prepend_enum_name(false)
            .derive_default(false)
            .derive_debug(true)
            .parse_callbacks(Box::new(PodStructs))
            .raw_line(HEADER)
            .rustfmt_configuration_file(Some(manifest.join("rustfmt.toml")))
            .generate()
            .unwrap_or_else(|e| {
                panic!(
                    "bindgen could not read kernels/abi.h: {e}. It loads libclang at run time: run \
                     scripts/install-libclang.sh and set LIBCLANG_PATH to the folder it prints."
                )
            });
        let fresh = out_dir.join("abi_bindings.rs");
        bindings.write_to_file(&fresh).expect("writing the generated bindings");
        let fresh_text = fs::read_to_string(&fresh).unwrap();
        let old = fs::read_to_string(&committed).unwrap_or_default();
        if fresh_text == old {
            return;
        }
        if std::env::var("LORAFUSE_ABI_BLESS").is_ok_and(|v| v == "1") {
            fs::write(&committed, fresh_text).expect("writing src/abi/bindings.rs");
            println!("cargo:warning=lorafuse: regenerated src/abi/bindings.rs from kernels/abi.h");
            return;
        }
        panic!(
            "src/abi/bindings.rs is not what bindgen makes of kernels/abi.h (fresh copy: {}).\n\
             Do not edit it by hand: change kernels/abi.h, run scripts/gen-abi.sh and commit both.",
            fresh.display()
        );
    }
}
