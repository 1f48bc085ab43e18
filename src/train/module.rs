//! The linear modules of a GPT-2 block that adapters can target, named as
//! PEFT names them.

use crate::{Error, Result};

/// The four linear modules of a block that adapters can target, named as
/// PEFT's `target_modules` names them for GPT-2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Module {
    /// `attn.c_attn`: D → 3D (q, k, v).
    #[serde(rename = "attn.c_attn")]
    CAttn,
    /// `attn.c_proj`: D → D.
    #[serde(rename = "attn.c_proj")]
    AttnProj,
    /// `mlp.c_fc`: D → 4D.
    #[serde(rename = "mlp.c_fc")]
    Fc,
    /// `mlp.c_proj`: 4D → D.
    #[serde(rename = "mlp.c_proj")]
    MlpProj,
}

impl Module {
    /// All four, in block order (the order adapters are laid out in).
    pub const ALL: [Module; 4] = [Module::CAttn, Module::AttnProj, Module::Fc, Module::MlpProj];

    /// The dotted name inside a block, e.g. `attn.c_attn`.
    pub fn name(self) -> &'static str {
        match self {
            Module::CAttn => "attn.c_attn",
            Module::AttnProj => "attn.c_proj",
            Module::Fc => "mlp.c_fc",
            Module::MlpProj => "mlp.c_proj",
        }
    }

    /// Parses a target name: the full dotted name, or `c_attn` / `c_fc`
    /// (unambiguous). Bare `c_proj` is rejected (two modules carry it).
    pub fn parse(s: &str) -> Result<Module> {
        let s = s.trim();
        match s {
            "attn.c_attn" | "c_attn" => Ok(Module::CAttn),
            "attn.c_proj" => Ok(Module::AttnProj),
            "mlp.c_fc" | "c_fc" => Ok(Module::Fc),
            "mlp.c_proj" => Ok(Module::MlpProj),
            "c_proj" => {
                Err(Error::invalid("target module `c_proj`", "ambiguous in GPT-2: write attn.c_proj or mlp.c_proj"))
            }
            other => Err(Error::invalid(
                format!("target module `{other}`"),
                "known modules are attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj",
            )),
        }
    }

    /// `(K, N)`: input and output features for width `d`.
    pub fn dims(self, d: usize) -> (usize, usize) {
        match self {
            Module::CAttn => (d, 3 * d),
            Module::AttnProj => (d, d),
            Module::Fc => (d, 4 * d),
            Module::MlpProj => (4 * d, d),
        }
    }

    /// Label of its forward in the per-op breakdown ([`crate::op_timing`]).
    pub fn forward_label(self) -> &'static str {
        match self {
            Module::CAttn => "fwd attn.c_attn",
            Module::AttnProj => "fwd attn.c_proj",
            Module::Fc => "fwd mlp.c_fc",
            Module::MlpProj => "fwd mlp.c_proj",
        }
    }

    /// Label of its backward in the per-op breakdown.
    pub fn backward_label(self) -> &'static str {
        match self {
            Module::CAttn => "bwd attn.c_attn",
            Module::AttnProj => "bwd attn.c_proj",
            Module::Fc => "bwd mlp.c_fc",
            Module::MlpProj => "bwd mlp.c_proj",
        }
    }
}
