//! Crash-safe writes: a file through a synced temporary sibling and a
//! rename, a directory of files as one rename of a fresh sibling directory.
//! Readers see the old contents or the new ones, never a torn file.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The environment variable of the crash test: when set to `N`, the process
/// aborts (as a kill would stop it) just before its `N`-th file or
/// directory rename, counted from 1 over every atomic write of this
/// crate. For tests only: it lets a test stop a training run at every
/// commit point of a checkpoint and check that the run resumes exactly.
pub const FAULT_RENAME_ENV: &str = "LORAFUSE_TEST_ABORT_AT_RENAME";

/// `std::fs::rename`, with the [`FAULT_RENAME_ENV`] hook.
pub(crate) fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
    static RENAMES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = RENAMES.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    if std::env::var(FAULT_RENAME_ENV).ok().and_then(|v| v.parse::<u64>().ok()) == Some(n) {
        eprintln!("{FAULT_RENAME_ENV}: aborting before rename {n} ({} -> {})", from.display(), to.display());
        std::process::abort();
    }
    std::fs::rename(from, to)
}

/// Writes `bytes` to `path` through a temporary sibling file that is synced
/// and renamed over `path`: readers see the old file or the new one, never a
/// torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid("output path", format!("{} has no file name", path.display())))?;
    // Unique per process and call, so concurrent saves never share a temp.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}.{call}", std::process::id()));
    let tmp: PathBuf = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `files` into `dir` as one rename of a fresh sibling directory
/// when `dir` is new or holds nothing but those files; else file by file,
/// each atomically, in the order given.
pub fn write_dir_atomic(dir: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    let only_ours = match std::fs::read_dir(dir) {
        Ok(entries) => entries.filter_map(|e| e.ok()).all(|e| {
            let name = e.file_name();
            files.iter().any(|(f, _)| name == *f)
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(Error::io(dir, e)),
    };
    let name = dir.file_name().filter(|n| *n != "." && *n != "..");
    let (true, Some(name)) = (only_ours, name) else {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        for (f, bytes) in files {
            write_atomic(&dir.join(f), bytes)?;
        }
        return Ok(());
    };
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let sibling = |what: &str| {
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut n = std::ffi::OsString::from(".");
        n.push(name);
        n.push(format!(".{what}.{}.{call}", std::process::id()));
        dir.with_file_name(n)
    };
    let tmp = sibling("tmp");
    let result = (|| {
        std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        for (f, bytes) in files {
            let path = tmp.join(f);
            let mut file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
            file.write_all(bytes).map_err(|e| Error::io(&path, e))?;
            file.sync_all().map_err(|e| Error::io(&path, e))?;
        }
        if dir.exists() {
            // A directory cannot be renamed over a non-empty one: move the
            // old one aside first (a crash between the two renames leaves
            // it under the hidden `.old` name, complete).
            let old = sibling("old");
            rename(dir, &old).map_err(|e| Error::io(dir, e))?;
            rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
