//! The contract with the CUDA kernels: every constant and argument struct a
//! kernel and its launcher share, defined once in `kernels/abi.h`.
//!
//! [`bindings`] is bindgen's translation of that header, committed so that
//! building the crate needs neither libclang nor bindgen. After changing the
//! header, run `scripts/gen-abi.sh` and commit both files; CI runs
//! `scripts/gen-abi.sh --check`, which fails when they disagree. bindgen also
//! emits compile-time checks that each struct's size and field offsets are
//! those clang computed for the C layout, and abi.h asserts the same numbers
//! in nvcc and the emulator's compiler.
//!
//! The structs derive bytemuck's `Pod` and `Zeroable`, so a launcher starts
//! from `Zeroable::zeroed()` and views them as plain words; device addresses
//! are `u64` fields, as cudarc hands them out.

// Generated code: items of the header only the kernels use are not dead,
// and the C names (enum typedefs such as `ProjMode`) stay as the kernels
// spell them.
#[allow(dead_code, non_camel_case_types, non_upper_case_globals, missing_docs, clippy::all)]
pub(crate) mod bindings;

pub(crate) use bindings::*;
