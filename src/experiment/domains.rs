//! The domains of an experiment: one dataset each (training and held-out
//! parts), the training data of a combination, and the check that no
//! held-out example or window is trained on by any adapter of the run.

use std::collections::{HashMap, HashSet};

use crate::train::data::{Corpus, Dataset, Example, DOMAINS};
use crate::train::spec::DataSpec;
use crate::{Error, Result};

/// One domain: a name for tables and file names, and its data.
#[derive(Clone, Debug)]
pub struct Domain {
    /// Short name (`add`, `math`, …): letters, digits, `-` and `_`.
    pub name: String,
    /// Its training set and held-out set.
    pub data: Dataset,
}

impl Domain {
    /// A named domain; the name must be usable as a file name.
    pub fn new(name: &str, data: Dataset) -> Result<Domain> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(Error::invalid(
                format!("domain name `{name}`"),
                "use letters, digits, `-` and `_` only (it names files and table rows)",
            ));
        }
        Ok(Domain { name: name.to_string(), data })
    }
}

/// The embedded synthetic domains `names`, each with `train` training and
/// `eval` held-out examples from `seed` (a domain's examples do not depend
/// on the other names listed).
pub fn embedded(names: &[&str], train: usize, eval: usize, seed: u64) -> Result<Vec<Domain>> {
    names.iter().map(|n| Domain::new(n, Dataset::embedded(&[n], train, eval, seed)?)).collect()
}

/// The domains `specs` name, as `lorafuse experiment --data` takes them:
/// `NAME=tokens:<file>` or `NAME=text:<file>` is one domain (a bare
/// `tokens:`/`text:` spec is named after its file's stem), and
/// `embedded[:add,sort,…]` is one domain per embedded domain listed (all
/// when none is). No spec at all means `embedded`. Embedded domains get
/// `train` training and `eval` held-out examples from `seed`; token files
/// are checked against `vocab`.
pub fn from_specs(specs: &[String], vocab: usize, train: usize, eval: usize, seed: u64) -> Result<Vec<Domain>> {
    let specs = if specs.is_empty() { vec!["embedded".to_string()] } else { specs.to_vec() };
    let mut out = Vec::new();
    for spec in &specs {
        let (name, source) = match spec.split_once('=') {
            Some((n, s)) => (Some(n), s),
            None => (None, spec.as_str()),
        };
        let bad = || {
            Error::invalid(
                format!("domain spec `{spec}`"),
                "use NAME=tokens:<file>, NAME=text:<file> or embedded[:add,sort,…], once per domain",
            )
        };
        match source.parse::<DataSpec>().map_err(|_| bad())? {
            DataSpec::Embedded(_) if name.is_some() => return Err(bad()),
            DataSpec::Embedded(names) if names.is_empty() => out.extend(embedded(&DOMAINS, train, eval, seed)?),
            DataSpec::Embedded(names) => {
                out.extend(embedded(&names.iter().map(String::as_str).collect::<Vec<_>>(), train, eval, seed)?)
            }
            file => {
                let stem = || file.path().and_then(|p| p.file_stem()).and_then(|s| s.to_str()).unwrap_or("data");
                out.push(Domain::new(name.unwrap_or_else(stem), file.load(vocab, eval, seed)?)?);
            }
        }
    }
    Ok(out)
}

/// The training data of a combination: every member's training set (example
/// sets concatenated, so batches draw from each in proportion to its size;
/// streams joined end to end). The held-out part is the members' held-out
/// sets joined the same way, but the experiment scores each member's own.
pub fn combined(members: &[&Domain]) -> Result<Dataset> {
    let name = members.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join("+");
    let join = |part: fn(&Dataset) -> &Corpus| -> Result<Corpus> {
        match part(&members[0].data) {
            Corpus::Examples(_) => {
                let mut all = Vec::new();
                for d in members {
                    match part(&d.data) {
                        Corpus::Examples(e) => all.extend_from_slice(e),
                        Corpus::Stream(_) => return Err(mixed(&name)),
                    }
                }
                Ok(Corpus::Examples(all))
            }
            Corpus::Stream(_) => {
                let mut all = Vec::new();
                for d in members {
                    match part(&d.data) {
                        Corpus::Stream(t) => all.extend_from_slice(t),
                        Corpus::Examples(_) => return Err(mixed(&name)),
                    }
                }
                Ok(Corpus::Stream(all))
            }
        }
    };
    if members.is_empty() {
        return Err(Error::invalid("domain combination", "has no members"));
    }
    let vocab = members.iter().map(|d| d.data.vocab).max().unwrap_or(0);
    let (train, eval) = (join(|d| &d.train)?, join(|d| &d.eval)?);
    Ok(Dataset { name, vocab, train, eval })
}

fn mixed(name: &str) -> Error {
    Error::invalid(
        format!("domain combination `{name}`"),
        "mixes example data (embedded) with token streams (text:, tokens:); use one kind for every domain",
    )
}

/// Polynomial rolling hash of `seq`-token windows.
struct Rolling {
    seq: usize,
    top: u64,
}

const BASE: u64 = 0x100_0000_01B3;

impl Rolling {
    fn new(seq: usize) -> Self {
        Rolling { seq, top: (1..seq).fold(1u64, |p, _| p.wrapping_mul(BASE)) }
    }
    fn hash(&self, w: &[u32]) -> u64 {
        w.iter().fold(0u64, |h, &t| h.wrapping_mul(BASE).wrapping_add(t as u64 + 1))
    }
    /// Calls `f(start)` for every window of the stream whose hash is in `want`.
    fn scan(&self, t: &[u32], want: &HashSet<u64>, mut f: impl FnMut(usize) -> bool) -> bool {
        if t.len() < self.seq {
            return false;
        }
        let mut h = self.hash(&t[..self.seq]);
        for start in 0..=t.len() - self.seq {
            if start > 0 {
                let out = (t[start - 1] as u64 + 1).wrapping_mul(self.top);
                h = h.wrapping_sub(out).wrapping_mul(BASE).wrapping_add(t[start + self.seq - 1] as u64 + 1);
            }
            if want.contains(&h) && f(start) {
                return true;
            }
        }
        false
    }
}

/// Checks that no domain's held-out data appears in any domain's training
/// data (every adapter of a run trains on a union of these). Examples
/// clash when their prompts are equal; a held-out window of a stream
/// clashes when its `seq` tokens occur anywhere in a training stream (found
/// with a rolling hash, confirmed exactly). The error names both domains
/// and the example or window.
pub fn check_held_out_disjoint(domains: &[Domain], seq: usize) -> Result<()> {
    let mut prompts: HashMap<&[u32], &str> = HashMap::new();
    for d in domains {
        if let Corpus::Examples(e) = &d.data.train {
            for x in e {
                prompts.entry(x.prompt.as_slice()).or_insert(&d.name);
            }
        }
    }
    let rolling = Rolling::new(seq.max(1));
    for held in domains {
        match &held.data.eval {
            Corpus::Examples(e) => {
                if let Some((x, owner)) =
                    e.iter().find_map(|x: &Example| prompts.get(x.prompt.as_slice()).map(|o| (x, o)))
                {
                    return Err(clash(&held.name, owner, &format!("prompt {:?}", text(&x.prompt))));
                }
            }
            Corpus::Stream(ev) => {
                let windows: Vec<&[u32]> = ev.chunks_exact(rolling.seq).collect();
                let want: HashSet<u64> = windows.iter().map(|w| rolling.hash(w)).collect();
                for train in domains {
                    if let Corpus::Stream(t) = &train.data.train {
                        let mut found = None;
                        rolling.scan(t, &want, |start| {
                            let w = &t[start..start + rolling.seq];
                            found = windows.iter().position(|e| *e == w);
                            found.is_some()
                        });
                        if let Some(i) = found {
                            let what = format!("held-out window {i} ({} tokens)", rolling.seq);
                            return Err(clash(&held.name, &train.name, &what));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn text(tokens: &[u32]) -> String {
    tokens.iter().map(|&t| char::from_u32(t).filter(|c| !c.is_control()).unwrap_or('·')).collect()
}

fn clash(held: &str, train: &str, what: &str) -> Error {
    Error::invalid(
        format!("held-out data of domain `{held}`"),
        format!(
            "its {what} is also in the training data of `{train}`, so the evaluation would score memorised data; \
             give the domains disjoint data (different files, or the same seed for every embedded domain)"
        ),
    )
}

/// A 64-bit fingerprint of a dataset's tokens (training and held out), so
/// that a resumed run can tell its data changed.
pub fn fingerprint(data: &Dataset) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    let mut eat = |x: u64| h = crate::projection::mix64(h ^ x);
    for c in [&data.train, &data.eval] {
        match c {
            Corpus::Stream(t) => {
                eat(t.len() as u64);
                t.iter().for_each(|&x| eat(x as u64));
            }
            Corpus::Examples(e) => {
                eat(e.len() as u64 | 1 << 63);
                for x in e {
                    eat(x.prompt.len() as u64);
                    x.prompt.iter().chain(&x.answer).for_each(|&t| eat(t as u64));
                }
            }
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_specs_name_one_domain_per_file_and_per_embedded_name() {
        let names = |d: &[Domain]| d.iter().map(|d| d.name.clone()).collect::<Vec<_>>();
        let all = from_specs(&[], 256, 20, 4, 0).unwrap();
        assert_eq!(names(&all), DOMAINS);
        let dir = std::env::temp_dir().join(format!("lorafuse-domains-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = dir.join("poems.txt");
        std::fs::write(&text, "a few lines of verse, long enough for windows\n".repeat(20)).unwrap();
        let specs =
            [format!("text:{}", text.display()), format!("verse=text:{}", text.display()), "embedded:sort".into()];
        let got = from_specs(&specs, 256, 20, 4, 0);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(names(&got.unwrap()), ["poems", "verse", "sort"]);
        for bad in ["x=embedded", "csv:f", "bad name=text:f"] {
            assert!(from_specs(&[bad.to_string()], 256, 20, 4, 0).is_err(), "{bad}");
        }
    }
}
