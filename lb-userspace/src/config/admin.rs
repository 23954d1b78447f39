//! Top-level fields of the admin API's access: where its token lives and which
//! `admin_listen` needs one named.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use super::{ConfigError, DEFAULT_STATE_DIR};
/// The token's file name in `state_dir` when `admin_token_file` is not set.
pub const TOKEN_FILE_NAME: &str = "admin.token";

/// `state_dir` and `admin_token_file`, checked against `admin_listen`.
pub(super) fn validate(
    state_dir: Option<&str>,
    admin_token_file: Option<&str>,
    admin_listen: SocketAddr,
) -> Result<(PathBuf, Option<PathBuf>), ConfigError> {
    let state_dir = PathBuf::from(state_dir.unwrap_or(DEFAULT_STATE_DIR));
    absolute("state_dir", &state_dir)?;
    let token = admin_token_file.map(PathBuf::from);
    if let Some(t) = &token {
        absolute("admin_token_file", t)?;
        if t.file_name().is_none() {
            return Err(ConfigError::new(
                "admin_token_file",
                format!("{}: must name a file", t.display()),
            ));
        }
    }
    // Off loopback the token is the only thing between the network and the persistence
    // tables: the operator names the file remote clients get it from.
    if !admin_listen.ip().to_canonical().is_loopback() && token.is_none() {
        return Err(ConfigError::new(
            "admin_listen",
            format!(
                "{admin_listen} is not a loopback address: set admin_token_file too (the \
                 bearer token every TCP client must send, generated there on first start)"
            ),
        ));
    }
    Ok((state_dir, token))
}

fn absolute(field: &str, p: &Path) -> Result<(), ConfigError> {
    if !p.is_absolute()
        || p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(ConfigError::new(
            field,
            format!("{}: must be an absolute path without ..", p.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
