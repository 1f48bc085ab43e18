//! A host-memory budget checked before large allocations whose size comes
//! from untrusted input (a config's `n_layer`, a layout's `rows`, a flag's
//! `--batch`): such sizes get a typed error naming what asked, instead of
//! an allocation failure that aborts the process.
//!
//! The budget is [`set_budget`]'s when set, else `LORAFUSE_MEMORY_BUDGET` (bytes; `k`/`m`/`g` suffixes
//! allowed) when set, else the `MemAvailable` of `/proc/meminfo`, else
//! 16 GiB where there is no such file.

use crate::{Error, Result};

static OVERRIDE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Sets the budget for this process (`None`: back to the environment and
/// `/proc/meminfo`). For tests that feed random sizes and must never
/// allocate much, whatever the machine.
pub fn set_budget(bytes: Option<u64>) {
    OVERRIDE.store(bytes.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
}

/// Bytes the process may plan to allocate at once.
pub fn budget() -> u128 {
    let fixed = OVERRIDE.load(std::sync::atomic::Ordering::Relaxed);
    if fixed > 0 {
        return fixed as u128;
    }
    if let Ok(text) = std::env::var("LORAFUSE_MEMORY_BUDGET") {
        if let Some(b) = parse_bytes(&text) {
            return b;
        }
    }
    if let Ok(info) = std::fs::read_to_string("/proc/meminfo") {
        for line in info.lines() {
            if let Some(rest) = line.strip_prefix("MemAvailable:") {
                if let Ok(kb) = rest.trim().trim_end_matches("kB").trim().parse::<u128>() {
                    return kb * 1024;
                }
            }
        }
    }
    16 << 30
}

fn parse_bytes(text: &str) -> Option<u128> {
    let t = text.trim().to_ascii_lowercase();
    let (digits, shift) = match t.chars().last()? {
        'k' => (&t[..t.len() - 1], 10),
        'm' => (&t[..t.len() - 1], 20),
        'g' => (&t[..t.len() - 1], 30),
        _ => (t.as_str(), 0),
    };
    digits.trim().parse::<u128>().ok().map(|v| v << shift)
}

/// Refuses `bytes` (an estimate of the peak `what` allocates; `None` when
/// the size computation overflowed) above the [`budget`].
pub fn check(what: &str, bytes: Option<u128>) -> Result<()> {
    let budget = budget();
    match bytes {
        Some(b) if b <= budget => Ok(()),
        _ => Err(Error::invalid(
            what.to_string(),
            format!(
                "needs about {} but the memory budget is {} (MemAvailable, or LORAFUSE_MEMORY_BUDGET): \
                 check the sizes given, or free memory",
                bytes.map_or("more than 2^128 bytes".to_string(), human),
                human(budget)
            ),
        )),
    }
}

/// Bytes as a short human string (`1.5 GiB`).
pub fn human(bytes: u128) -> String {
    let b = bytes as f64;
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", b / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", b / 1_048_576.0),
        _ => format!("{:.1} GiB", b / 1_073_741_824.0),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_suffixes_and_refuses_overflow() {
        assert_eq!(super::parse_bytes("3g"), Some(3 << 30));
        assert_eq!(super::parse_bytes("12"), Some(12));
        assert_eq!(super::parse_bytes("x"), None);
        assert!(super::check("test", None).is_err());
        assert!(super::check("test", Some(1)).is_ok());
    }
}
