//! The model's shape, read from (and written as) a Hugging Face GPT-2
//! `config.json`.

use std::path::Path;

use crate::{Error, Result};

/// GPT-2 hyper-parameters, named as in Hugging Face's `GPT2Config` (other
/// fields of a `config.json` are ignored; `n_ctx` is used when
/// `n_positions` is absent, as in old GPT-2 configs).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Gpt2Config {
    /// Token vocabulary size.
    pub vocab_size: usize,
    /// Learned positions (the longest sequence the model accepts).
    pub n_positions: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention heads (must divide `n_embd`).
    pub n_head: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
}

fn default_eps() -> f64 {
    1e-5
}

impl Gpt2Config {
    /// A config with GPT-2's epsilon, validated.
    pub fn new(vocab_size: usize, n_positions: usize, n_embd: usize, n_layer: usize, n_head: usize) -> Result<Self> {
        let c = Gpt2Config { vocab_size, n_positions, n_embd, n_layer, n_head, layer_norm_epsilon: 1e-5 };
        c.validate()?;
        Ok(c)
    }

    /// Rejects zero sizes, heads that do not divide the width, and a
    /// non-positive epsilon.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ] {
            if v == 0 {
                return Err(Error::invalid(format!("model config {name}"), "must be at least 1"));
            }
        }
        if self.n_embd % self.n_head != 0 {
            return Err(Error::invalid(
                "model config n_head",
                format!("{} heads do not divide n_embd = {}", self.n_head, self.n_embd),
            ));
        }
        if !(self.layer_norm_epsilon > 0.0 && self.layer_norm_epsilon.is_finite()) {
            return Err(Error::invalid("model config layer_norm_epsilon", "must be a positive finite number"));
        }
        if self.vocab_size > u32::MAX as usize - 1 {
            return Err(Error::invalid("model config vocab_size", "must fit a u32 token id"));
        }
        // Checked before any allocation: a config's sizes are untrusted.
        crate::memory::check(
            &format!(
                "model of {} layers, width {}, vocab {}, {} positions",
                self.n_layer, self.n_embd, self.vocab_size, self.n_positions
            ),
            self.num_params().map(|p| p * 4),
        )
    }

    /// Parameters of the model (`None` on overflow): embeddings, twelve
    /// tensors per block, the final LayerNorm.
    pub fn num_params(&self) -> Option<u128> {
        let d = self.n_embd as u128;
        let block = 12 * d * d + 13 * d;
        let emb = (self.vocab_size as u128 + self.n_positions as u128).checked_mul(d)?;
        (self.n_layer as u128).checked_mul(block)?.checked_add(emb)?.checked_add(2 * d)
    }

    /// An estimate of the activation memory one training step of `batch`
    /// rows of `seq` tokens keeps for the backward (per layer about 20·D
    /// values per token, plus logits and their gradient), in bytes, checked
    /// against the memory budget.
    pub fn check_activation_budget(&self, batch: usize, seq: usize) -> Result<()> {
        let tokens = (batch as u128).checked_mul(seq as u128);
        let per_token = (self.n_layer as u128) * 20 * self.n_embd as u128 + 2 * self.vocab_size as u128;
        crate::memory::check(
            &format!("a batch of {batch} rows of {seq} tokens"),
            tokens.and_then(|t| t.checked_mul(per_token)).and_then(|v| v.checked_mul(4)),
        )
    }

    /// Channels per head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Reads and validates a `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))?;
        if let Some(obj) = v.as_object_mut() {
            if !obj.contains_key("n_positions") {
                if let Some(n_ctx) = obj.get("n_ctx").cloned() {
                    obj.insert("n_positions".into(), n_ctx);
                }
            }
        }
        let c: Gpt2Config = serde_json::from_value(v).map_err(|e| Error::format(path, e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// The `config.json` text, with the fields Hugging Face needs to load it
    /// as a `GPT2LMHeadModel`.
    pub fn to_json(&self) -> String {
        let v = serde_json::json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "tie_word_embeddings": true,
        });
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }
}
