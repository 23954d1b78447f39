//! `script`: a Lua script (Avi DataScript) names a key, a backend or nothing per request.
//! The script is read and compiled here, so `tether check` and a reload refuse one that
//! does not compile, with its line and the reason.

use std::path::PathBuf;

use super::{At, Common, RawFallback, fallback};
use crate::{
    config::{ConfigError, PersistenceKind, ScriptProfile},
    script::{self, Limits},
};

/// Largest script file read.
const MAX_SCRIPT_BYTES: u64 = 1 << 20;

profile_fields! {
    pub struct Raw {
        /// Path of the Lua script.
        file: String,
        timeout_s: u32,
        fallback: RawFallback,
        /// Lua instructions per call (default 1 000 000).
        max_instructions: u64,
        /// Memory of each Lua state, in KiB (default 8192).
        max_memory_kb: u32,
    }
}

impl Raw {
    pub fn common(&self) -> Common<'_> {
        Common::unprefixed(&self.name, self.timeout_s, self.select_new_server_when_down)
    }

    pub fn kind(&self, at: At<'_>) -> Result<PersistenceKind, ConfigError> {
        let fallback = fallback(at, self.fallback.as_ref())?;
        let instructions = self.max_instructions.unwrap_or(1_000_000);
        if !(1_000..=1_000_000_000).contains(&instructions) {
            return Err(ConfigError::new(
                at("max_instructions"),
                format!("{instructions}: must be 1000 to 1000000000"),
            ));
        }
        let kb = self.max_memory_kb.unwrap_or(8192);
        if !(256..=1 << 20).contains(&kb) {
            return Err(ConfigError::new(
                at("max_memory_kb"),
                format!("{kb}: must be 256 to 1048576"),
            ));
        }
        let limits = Limits {
            instructions,
            memory_bytes: kb as usize * 1024,
        };
        let Some(file) = self.file.as_deref() else {
            return Err(ConfigError::new(
                at("file"),
                "required: the path of the Lua script",
            ));
        };
        let too_big = std::fs::metadata(file).is_ok_and(|m| m.len() > MAX_SCRIPT_BYTES);
        if too_big {
            return Err(ConfigError::new(
                at("file"),
                format!("{file}: larger than {MAX_SCRIPT_BYTES} bytes"),
            ));
        }
        let source = std::fs::read_to_string(file)
            .map_err(|e| ConfigError::new(at("file"), format!("{file}: {e}")))?;
        script::check(file, &source, limits)
            .map_err(|e| ConfigError::new(at("file"), format!("the script is refused: {e}")))?;
        Ok(PersistenceKind::Script(ScriptProfile {
            file: PathBuf::from(file),
            source,
            limits,
            fallback,
        }))
    }
}
