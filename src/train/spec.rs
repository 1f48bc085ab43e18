//! Where a run's model and data come from, written as one-line specs: the
//! command line's `--model` and `--data`, a run file's `model` and `data`
//! keys, and a checkpoint directory's `run.json` all use them.
//!
//! - model: a directory with `config.json` + `model.safetensors` (GPT-2
//!   naming), or `random:<layers>,<width>,<heads>[,<positions>[,<vocab>]]`
//!   (positions default to 64, vocab to 256, the byte vocabulary);
//! - data: `embedded[:domain,domain…]` (the built-in domains, all when
//!   none is named), `text:<file>` (bytes as tokens) or `tokens:<file>`
//!   (an llm.c token file).
//!
//! ```
//! use lorafuse::train::spec::{DataSpec, ModelSpec};
//! # fn main() -> lorafuse::Result<()> {
//! let model: ModelSpec = "random:2,64,4".parse()?;
//! assert_eq!(model.config()?.map(|c| (c.n_layer, c.n_embd, c.n_positions)), Some((2, 64, 64)));
//! let data: DataSpec = "embedded:add,sort".parse()?;
//! assert_eq!(data, DataSpec::Embedded(vec!["add".into(), "sort".into()]));
//! assert_eq!(data.to_string(), "embedded:add,sort");
//! let sorted = data.load(256, 100, 0)?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::config::Gpt2Config;
use super::data::{Dataset, DOMAINS};
use super::model::Gpt2;
use super::TrainBackend;
use crate::{Error, Result};

/// Training examples drawn per embedded domain.
pub const EMBEDDED_TRAIN_EXAMPLES: usize = 4000;

/// A model spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSpec {
    /// A fresh, randomly initialised GPT-2 of this shape.
    Random {
        /// Transformer blocks.
        layers: usize,
        /// Embedding width.
        width: usize,
        /// Attention heads.
        heads: usize,
        /// Context length.
        positions: usize,
        /// Vocabulary size.
        vocab: usize,
    },
    /// A saved model directory (config.json + model.safetensors).
    Dir(PathBuf),
}

impl FromStr for ModelSpec {
    type Err = Error;
    fn from_str(spec: &str) -> Result<Self> {
        let Some(dims) = spec.strip_prefix("random:") else {
            if spec.is_empty() {
                return Err(Error::invalid(
                    "model spec",
                    "is empty: give a model directory or random:<layers>,<width>,<heads>",
                ));
            }
            return Ok(ModelSpec::Dir(PathBuf::from(spec)));
        };
        let what = || format!("model spec `{spec}`");
        let v: Vec<usize> = dims
            .split(',')
            .map(|s| s.trim().parse().map_err(|_| Error::invalid(what(), format!("`{s}` is not a number"))))
            .collect::<Result<_>>()?;
        match v[..] {
            [layers, width, heads] | [layers, width, heads, _] | [layers, width, heads, _, _] => {
                Ok(ModelSpec::Random {
                    layers,
                    width,
                    heads,
                    positions: *v.get(3).unwrap_or(&64),
                    vocab: *v.get(4).unwrap_or(&256),
                })
            }
            _ => Err(Error::invalid(what(), "give random:<layers>,<width>,<heads>[,<positions>[,<vocab>]]")),
        }
    }
}

impl std::fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSpec::Random { layers, width, heads, positions, vocab } => {
                write!(f, "random:{layers},{width},{heads},{positions},{vocab}")
            }
            ModelSpec::Dir(dir) => write!(f, "{}", dir.display()),
        }
    }
}

impl ModelSpec {
    /// The shape of a `random:` model, validated (`None` for a directory,
    /// whose shape is in its config.json).
    pub fn config(&self) -> Result<Option<Gpt2Config>> {
        match self {
            ModelSpec::Random { layers, width, heads, positions, vocab } => {
                Gpt2Config::new(*vocab, *positions, *width, *layers, *heads).map(Some)
            }
            ModelSpec::Dir(_) => Ok(None),
        }
    }

    /// The model on `backend`: loaded from its directory, or initialised
    /// from `seed`.
    pub fn build<B: TrainBackend>(&self, backend: &B, seed: u64) -> Result<Gpt2<B>> {
        match (self, self.config()?) {
            (ModelSpec::Dir(dir), _) => Gpt2::load(backend, dir),
            (_, Some(cfg)) => Gpt2::random(backend, &cfg, seed),
            (ModelSpec::Random { .. }, None) => unreachable!("a random spec always has a config"),
        }
    }
}

/// A data spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSpec {
    /// The embedded domains named (all of [`DOMAINS`] when empty).
    Embedded(Vec<String>),
    /// A text file, one token per byte.
    Text(PathBuf),
    /// An llm.c token file.
    Tokens(PathBuf),
}

impl FromStr for DataSpec {
    type Err = Error;
    fn from_str(spec: &str) -> Result<Self> {
        if spec == "embedded" {
            return Ok(DataSpec::Embedded(Vec::new()));
        }
        if let Some(list) = spec.strip_prefix("embedded:") {
            return Ok(DataSpec::Embedded(list.split(',').map(|d| d.trim().to_string()).collect()));
        }
        if let Some(p) = spec.strip_prefix("text:") {
            return Ok(DataSpec::Text(PathBuf::from(p)));
        }
        if let Some(p) = spec.strip_prefix("tokens:") {
            return Ok(DataSpec::Tokens(PathBuf::from(p)));
        }
        Err(Error::invalid(format!("data spec `{spec}`"), "use embedded[:domains], text:<file> or tokens:<file>"))
    }
}

impl std::fmt::Display for DataSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataSpec::Embedded(d) if d.is_empty() => f.write_str("embedded"),
            DataSpec::Embedded(d) => write!(f, "embedded:{}", d.join(",")),
            DataSpec::Text(p) => write!(f, "text:{}", p.display()),
            DataSpec::Tokens(p) => write!(f, "tokens:{}", p.display()),
        }
    }
}

impl DataSpec {
    /// The dataset: for embedded domains, [`EMBEDDED_TRAIN_EXAMPLES`]
    /// training examples per domain and `eval` held-out ones in all, drawn
    /// from `seed`; token files are checked against the model's `vocab`.
    pub fn load(&self, vocab: usize, eval: usize, seed: u64) -> Result<Dataset> {
        match self {
            DataSpec::Embedded(names) => {
                let names: Vec<&str> =
                    if names.is_empty() { DOMAINS.to_vec() } else { names.iter().map(String::as_str).collect() };
                Dataset::embedded(&names, EMBEDDED_TRAIN_EXAMPLES, eval.div_ceil(names.len()), seed)
            }
            DataSpec::Text(p) => Dataset::text(p),
            DataSpec::Tokens(p) => Dataset::llmc(p, vocab),
        }
    }

    /// The file this spec reads, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            DataSpec::Text(p) | DataSpec::Tokens(p) => Some(p),
            DataSpec::Embedded(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_specs_parse_with_defaults_and_print_back() {
        let m: ModelSpec = "random:1,16,2".parse().unwrap();
        assert_eq!(m, ModelSpec::Random { layers: 1, width: 16, heads: 2, positions: 64, vocab: 256 });
        assert_eq!(m.to_string().parse::<ModelSpec>().unwrap(), m);
        let m: ModelSpec = "random:2, 32, 4, 128, 50257".parse().unwrap();
        assert_eq!(m, ModelSpec::Random { layers: 2, width: 32, heads: 4, positions: 128, vocab: 50257 });
        assert_eq!("runs/base".parse::<ModelSpec>().unwrap(), ModelSpec::Dir("runs/base".into()));
        for (bad, says) in [
            ("random:1,x,2", "`x` is not a number"),
            ("random:1,16", "give random:<layers>"),
            ("random:1,2,3,4,5,6", "give random:<layers>"),
            ("", "is empty"),
        ] {
            let err = bad.parse::<ModelSpec>().unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
        // The shape is validated when used: 16 is not divisible by 3 heads.
        assert!("random:1,16,3".parse::<ModelSpec>().unwrap().config().is_err());
        assert_eq!(ModelSpec::Dir("d".into()).config().unwrap(), None);
    }

    #[test]
    fn data_specs_parse_print_back_and_load_embedded_domains() {
        for s in ["embedded", "embedded:add,sort", "text:a b.txt", "tokens:/x/y.bin"] {
            assert_eq!(s.parse::<DataSpec>().unwrap().to_string(), s);
        }
        assert_eq!("embedded: add , sort".parse::<DataSpec>().unwrap().to_string(), "embedded:add,sort");
        let err = "csv:x".parse::<DataSpec>().unwrap_err().to_string();
        assert!(err.contains("use embedded[:domains]"), "{err}");
        assert_eq!("text:f".parse::<DataSpec>().unwrap().path(), Some(Path::new("f")));
        // All domains by default, the held-out count spread over them.
        let all = DataSpec::Embedded(vec![]).load(256, 10, 3).unwrap();
        let two = "embedded:add,sort".parse::<DataSpec>().unwrap().load(256, 10, 3).unwrap();
        let want = Dataset::embedded(&["add", "sort"], EMBEDDED_TRAIN_EXAMPLES, 5, 3).unwrap();
        assert_eq!((&two.name, two.eval_batches(4, 32, 10)), (&want.name, want.eval_batches(4, 32, 10)));
        assert_ne!(all.name, two.name);
        assert!("embedded:nope".parse::<DataSpec>().unwrap().load(256, 10, 3).is_err());
        assert!(DataSpec::Text("/nonexistent/lorafuse.txt".into()).load(256, 10, 3).is_err());
    }
}
