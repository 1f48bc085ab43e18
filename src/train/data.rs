//! Training and evaluation data, deterministic from a seed.
//!
//! - **Token files** in llm.c's format: a 256 × i32 little-endian header
//!   (magic 20240520, version 1 = u16 tokens or 2 = u32 tokens, token
//!   count), then the tokens. The header is validated against the file size
//!   before anything is read.
//! - **Raw text**, one byte per token (vocabulary 256).
//! - The **embedded default**: procedurally generated text domains, disjoint
//!   in structure, with held-out evaluation sets that share no prompt with
//!   the training set, byte tokens:
//!   - `add`: `"417+38="` → `"455\n"`,
//!   - `sort`: `"sort:5 2 8>"` → `"2 5 8\n"`,
//!   - `recall`: `"a3 b7 c1?b>"` → `"7\n"` (key–value recall),
//!   - `reverse`: `"rev:kcad>"` → `"dack\n"`.
//!
//! Streams (files, text) sample random windows for training (or, with
//! [`Dataset::sequential_batch`], take them in order, for runs another
//! framework replays) and evaluate on consecutive windows of their last 10%. Example sets train on rows packed
//! with whole examples and evaluate one example per row, with loss and
//! exact-match accuracy on the answer tokens only.

use std::collections::HashSet;
use std::path::Path;

use crate::nn::IGNORE;
use crate::rng::Rng;
use crate::{Error, Result};

/// llm.c's token-file magic number.
pub const LLMC_MAGIC: i32 = 20240520;
/// llm.c's header: 256 little-endian i32.
pub const LLMC_HEADER_BYTES: usize = 256 * 4;
/// Byte-level vocabulary.
pub const BYTE_VOCAB: usize = 256;
/// The embedded domains' names.
pub const DOMAINS: [&str; 4] = ["add", "sort", "recall", "reverse"];

/// One prompt and its answer (byte tokens).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Example {
    /// What the model is given.
    pub prompt: Vec<u32>,
    /// What it must continue with.
    pub answer: Vec<u32>,
}

/// Where tokens come from.
#[derive(Clone, Debug)]
pub enum Corpus {
    /// A token stream (files, raw text).
    Stream(Vec<u32>),
    /// Prompt/answer examples.
    Examples(Vec<Example>),
}

/// A training set and its held-out evaluation set.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// A short description.
    pub name: String,
    /// The largest token id + 1 that may appear.
    pub vocab: usize,
    /// Training data.
    pub train: Corpus,
    /// Held-out data.
    pub eval: Corpus,
}

/// A host batch: `rows × seq` tokens and targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostBatch {
    /// Rows.
    pub rows: usize,
    /// Tokens per row.
    pub seq: usize,
    /// Inputs.
    pub tokens: Vec<u32>,
    /// Next-token targets ([`IGNORE`] where no loss is taken).
    pub targets: Vec<u32>,
}

/// Reads an llm.c token file, validating its header and size.
pub fn read_llmc_tokens(path: &Path) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.len() < LLMC_HEADER_BYTES {
        return Err(Error::format(path, format!("{} bytes: shorter than the 1024-byte llm.c header", bytes.len())));
    }
    let header: Vec<i32> =
        bytes[..LLMC_HEADER_BYTES].chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if header[0] != LLMC_MAGIC {
        return Err(Error::format(path, format!("magic {} is not llm.c's {LLMC_MAGIC}", header[0])));
    }
    let width = match header[1] {
        1 => 2,
        2 => 4,
        v => return Err(Error::format(path, format!("version {v}: only 1 (u16 tokens) and 2 (u32 tokens) exist"))),
    };
    let count =
        usize::try_from(header[2]).map_err(|_| Error::format(path, format!("negative token count {}", header[2])))?;
    let body = &bytes[LLMC_HEADER_BYTES..];
    if body.len() != count * width {
        return Err(Error::format(
            path,
            format!("header says {count} tokens ({} bytes) but {} bytes follow it", count * width, body.len()),
        ));
    }
    Ok(match width {
        2 => body.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect(),
        _ => body.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
    })
}

/// Writes tokens as an llm.c token file (version 1 when every token fits
/// u16, else 2), atomically.
pub fn write_llmc_tokens(path: &Path, tokens: &[u32]) -> Result<()> {
    let count = i32::try_from(tokens.len()).map_err(|_| Error::invalid("token file", "more than 2^31 tokens"))?;
    let small = tokens.iter().all(|&t| t <= u16::MAX as u32);
    let mut header = [0i32; 256];
    header[0] = LLMC_MAGIC;
    header[1] = if small { 1 } else { 2 };
    header[2] = count;
    let mut bytes: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
    for &t in tokens {
        if small {
            bytes.extend_from_slice(&(t as u16).to_le_bytes());
        } else {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
    }
    crate::atomic_file::write_atomic(path, &bytes)
}

fn bytes(s: &str) -> Vec<u32> {
    s.bytes().map(u32::from).collect()
}

/// One random example of `domain`.
pub fn generate_example(domain: &str, rng: &mut Rng) -> Result<Example> {
    let (prompt, answer) = match domain {
        "add" => {
            let (a, b) = (rng.below(1000), rng.below(1000));
            (format!("{a}+{b}="), format!("{}\n", a + b))
        }
        "sort" => {
            let n = 3 + rng.below(3) as usize;
            let mut xs: Vec<u64> = (0..n).map(|_| rng.below(10)).collect();
            let p = xs.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
            xs.sort_unstable();
            (format!("sort:{p}>"), format!("{}\n", xs.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")))
        }
        "recall" => {
            let n = 3 + rng.below(3) as usize;
            let mut keys: Vec<u8> = (b'a'..=b'h').collect();
            for i in (1..keys.len()).rev() {
                keys.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let pairs: Vec<(char, u64)> = keys[..n].iter().map(|&k| (k as char, rng.below(10))).collect();
            let (qk, qv) = pairs[rng.below(n as u64) as usize];
            let p = pairs.iter().map(|(k, v)| format!("{k}{v}")).collect::<Vec<_>>().join(" ");
            (format!("{p}?{qk}>"), format!("{qv}\n"))
        }
        "reverse" => {
            let n = 3 + rng.below(4) as usize;
            let w: String = (0..n).map(|_| (b'a' + rng.below(26) as u8) as char).collect();
            (format!("rev:{w}>"), format!("{}\n", w.chars().rev().collect::<String>()))
        }
        other => {
            return Err(Error::invalid(
                format!("data domain `{other}`"),
                format!("known domains: {}", DOMAINS.join(", ")),
            ))
        }
    };
    Ok(Example { prompt: bytes(&prompt), answer: bytes(&answer) })
}

/// Longest example any domain produces (prompt + answer), in tokens.
pub const MAX_EXAMPLE_TOKENS: usize = 26;

impl Dataset {
    /// The embedded default: `train` examples and `eval` held-out examples
    /// (no prompt shared with training) per domain, drawn from `seed` and
    /// the domain's name: a domain's examples are the same whichever other
    /// domains are listed with it, and in whatever order.
    pub fn embedded(domains: &[&str], train: usize, eval: usize, seed: u64) -> Result<Dataset> {
        if domains.is_empty() {
            return Err(Error::invalid("data domains", format!("none given; known: {}", DOMAINS.join(", "))));
        }
        let (mut tr, mut ev) = (Vec::new(), Vec::new());
        for d in domains {
            // Keyed by the domain, not its position in the list, so that a
            // domain's examples are the same in every mix that holds it (and
            // a held-out set stays disjoint from every run's training set).
            let key = DOMAINS.iter().position(|k| k == d).ok_or_else(|| {
                Error::invalid(format!("data domain `{d}`"), format!("known domains: {}", DOMAINS.join(", ")))
            })?;
            let mut rng = Rng::new(seed ^ (0x5EED_0000 + key as u64));
            let mut seen = HashSet::new();
            for _ in 0..train {
                let e = generate_example(d, &mut rng)?;
                seen.insert(e.prompt.clone());
                tr.push(e);
            }
            let mut tries = 0;
            let mut held = 0;
            while held < eval && tries < 100 * eval.max(1) {
                tries += 1;
                let e = generate_example(d, &mut rng)?;
                if seen.insert(e.prompt.clone()) {
                    ev.push(e);
                    held += 1;
                }
            }
        }
        Ok(Dataset {
            name: domains.join("+"),
            vocab: BYTE_VOCAB,
            train: Corpus::Examples(tr),
            eval: Corpus::Examples(ev),
        })
    }

    /// A token stream split 90/10 into training and held-out windows.
    pub fn stream(name: &str, tokens: Vec<u32>, vocab: usize) -> Result<Dataset> {
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Index { what: format!("{name}: token"), index: t as u64, bound: vocab as u64 });
        }
        let split = tokens.len() * 9 / 10;
        let eval = tokens[split..].to_vec();
        let mut train = tokens;
        train.truncate(split);
        Ok(Dataset { name: name.into(), vocab, train: Corpus::Stream(train), eval: Corpus::Stream(eval) })
    }

    /// Raw text as byte tokens.
    pub fn text(path: &Path) -> Result<Dataset> {
        let b = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::stream(&path.display().to_string(), b.into_iter().map(u32::from).collect(), BYTE_VOCAB)
    }

    /// An llm.c token file (tokens must be `< vocab`).
    pub fn llmc(path: &Path, vocab: usize) -> Result<Dataset> {
        Self::stream(&path.display().to_string(), read_llmc_tokens(path)?, vocab)
    }

    /// Checks the data fits rows of `seq` tokens.
    pub fn check_seq(&self, seq: usize) -> Result<()> {
        if seq == 0 {
            return Err(Error::invalid("sequence length", "seq = 0: rows need at least one token (e.g. --seq 32)"));
        }
        for (what, c) in [("training", &self.train), ("evaluation", &self.eval)] {
            match c {
                Corpus::Stream(t) if t.len() < seq + 1 => {
                    return Err(Error::invalid(
                        format!("{what} data `{}`", self.name),
                        format!("{} tokens: need at least seq + 1 = {}", t.len(), seq + 1),
                    ))
                }
                Corpus::Examples(e) if e.is_empty() => {
                    return Err(Error::invalid(format!("{what} data `{}`", self.name), "no examples"))
                }
                Corpus::Examples(e) => {
                    if e.iter().any(|x| x.prompt.is_empty() || x.answer.is_empty()) {
                        return Err(Error::invalid(
                            format!("{what} data `{}`", self.name),
                            "an example has an empty prompt or answer",
                        ));
                    }
                    if let Some(x) = e.iter().find(|x| x.prompt.len() + x.answer.len() > seq) {
                        return Err(Error::invalid(
                            "sequence length",
                            format!("{seq} is shorter than an example of {} tokens", x.prompt.len() + x.answer.len()),
                        ));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A random training batch. With `answer_only`, examples take loss on
    /// their answers only (the prompts are given).
    pub fn sample(&self, rng: &mut Rng, rows: usize, seq: usize, answer_only: bool) -> HostBatch {
        let mut b =
            HostBatch { rows, seq, tokens: Vec::with_capacity(rows * seq), targets: Vec::with_capacity(rows * seq) };
        for _ in 0..rows {
            match &self.train {
                Corpus::Stream(t) => {
                    let start = rng.below((t.len() - seq) as u64) as usize;
                    b.tokens.extend_from_slice(&t[start..start + seq]);
                    b.targets.extend_from_slice(&t[start + 1..start + seq + 1]);
                }
                Corpus::Examples(ex) => {
                    // Pack whole examples; the row's last target is the next
                    // example's first token when it fits, else ignored.
                    let (mut toks, mut loss) = (Vec::new(), Vec::new());
                    while toks.len() < seq + 1 {
                        let e = &ex[rng.below(ex.len() as u64) as usize];
                        toks.extend_from_slice(&e.prompt);
                        loss.extend(std::iter::repeat_n(!answer_only, e.prompt.len()));
                        toks.extend_from_slice(&e.answer);
                        loss.extend(std::iter::repeat_n(true, e.answer.len()));
                    }
                    b.tokens.extend_from_slice(&toks[..seq]);
                    // Target at p predicts token p + 1: counted when p + 1 is.
                    b.targets.extend((0..seq).map(|p| if loss[p + 1] { toks[p + 1] } else { IGNORE }));
                }
            }
        }
        b
    }

    /// Training batch number `index` (0-based) in **sequential** order, for
    /// runs another framework must reproduce exactly (no RNG involved):
    /// the training stream is cut into `W = (len − 1) / seq` consecutive
    /// non-overlapping windows, window `w` being tokens `w·seq .. w·seq + seq`
    /// with targets shifted by one; row `j` of batch `i` is window
    /// `(i·rows + j) mod W`. Only token streams have such an order.
    pub fn sequential_batch(&self, index: u64, rows: usize, seq: usize) -> Result<HostBatch> {
        let t = match &self.train {
            Corpus::Stream(t) => t,
            Corpus::Examples(_) => {
                return Err(Error::invalid(
                    format!("sequential batches of `{}`", self.name),
                    "only token streams (text:, tokens:) have a sequential order; use random batches",
                ))
            }
        };
        let windows = t.len().saturating_sub(1).checked_div(seq).unwrap_or(0);
        if windows == 0 {
            return Err(Error::invalid(
                format!("training data `{}`", self.name),
                format!("{} tokens: need at least seq + 1 = {}", t.len(), seq + 1),
            ));
        }
        let mut b =
            HostBatch { rows, seq, tokens: Vec::with_capacity(rows * seq), targets: Vec::with_capacity(rows * seq) };
        for j in 0..rows as u64 {
            let w = (index.wrapping_mul(rows as u64).wrapping_add(j) % windows as u64) as usize;
            b.tokens.extend_from_slice(&t[w * seq..w * seq + seq]);
            b.targets.extend_from_slice(&t[w * seq + 1..w * seq + seq + 1]);
        }
        Ok(b)
    }

    /// The held-out set as batches of at most `rows` rows, with the number
    /// of examples (rows) each holds for exact-match scoring.
    pub fn eval_batches(&self, rows: usize, seq: usize, limit: usize) -> Vec<HostBatch> {
        let mut out: Vec<HostBatch> = Vec::new();
        let mut push_row = |tokens: &[u32], targets: &[u32]| {
            if out.last().is_none_or(|b| b.rows == rows) {
                out.push(HostBatch { rows: 0, seq, tokens: Vec::new(), targets: Vec::new() });
            }
            let b = out.last_mut().unwrap();
            b.rows += 1;
            b.tokens.extend_from_slice(tokens);
            b.targets.extend_from_slice(targets);
        };
        match &self.eval {
            Corpus::Stream(t) => {
                for w in 0..((t.len() - 1) / seq).min(limit) {
                    push_row(&t[w * seq..(w + 1) * seq], &t[w * seq + 1..(w + 1) * seq + 1]);
                }
            }
            Corpus::Examples(ex) => {
                for e in ex.iter().take(limit) {
                    let mut toks = e.prompt.clone();
                    toks.extend_from_slice(&e.answer);
                    let mut targets = vec![IGNORE; seq];
                    let first = e.prompt.len() - 1;
                    targets[first..toks.len() - 1].copy_from_slice(&toks[first + 1..]);
                    toks.resize(seq, b'\n' as u32);
                    push_row(&toks, &targets);
                }
            }
        }
        out
    }
}

/// Evaluation results.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalMetrics {
    /// Mean loss over scored tokens.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Rows whose every scored token is predicted (argmax) correctly, as a
    /// fraction: exact match for examples, whole-window accuracy for streams.
    pub exact_match: f64,
    /// Fraction of scored tokens predicted correctly.
    pub token_accuracy: f64,
    /// Scored tokens.
    pub tokens: usize,
    /// Rows (examples).
    pub rows: usize,
}

/// Accumulates per-position results into [`EvalMetrics`].
#[derive(Default)]
pub struct MetricsAccumulator {
    loss: f64,
    tokens: usize,
    correct: usize,
    rows: usize,
    exact: usize,
}

impl MetricsAccumulator {
    /// Adds one batch's per-position losses and hits (`seq` positions per row).
    pub fn add(&mut self, seq: usize, losses: &[f32], correct: &[u32], targets: &[u32]) {
        for r in 0..targets.len() / seq {
            let mut all = true;
            for p in r * seq..(r + 1) * seq {
                if targets[p] == IGNORE {
                    continue;
                }
                self.loss += losses[p] as f64;
                self.tokens += 1;
                self.correct += correct[p] as usize;
                all &= correct[p] == 1;
            }
            self.rows += 1;
            self.exact += all as usize;
        }
    }

    /// The metrics so far.
    pub fn finish(&self) -> EvalMetrics {
        let loss = if self.tokens > 0 { self.loss / self.tokens as f64 } else { 0.0 };
        EvalMetrics {
            loss,
            perplexity: loss.exp(),
            exact_match: if self.rows > 0 { self.exact as f64 / self.rows as f64 } else { 0.0 },
            token_accuracy: if self.tokens > 0 { self.correct as f64 / self.tokens as f64 } else { 0.0 },
            tokens: self.tokens,
            rows: self.rows,
        }
    }
}
