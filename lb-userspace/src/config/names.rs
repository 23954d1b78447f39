//! Names of services, pools, backends and profiles: one rule for all of them, used by the
//! validation of each section.

use super::ConfigError;

/// A name is 1-64 characters of `A-Z a-z 0-9 - _ .` (it appears in metrics labels, file
/// names and the admin API's query strings).
pub(super) fn check_name(path: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(ConfigError::new(path, "must not be empty"));
    }
    if name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ConfigError::new(
            path,
            format!("{name:?}: use 1-64 characters of A-Z a-z 0-9 - _ ."),
        ));
    }
    Ok(())
}
