//! Configuration: YAML file → [`file::FileConfig`] (serde) → [`compile`] →
//! [`Snapshot`], the immutable model a request reads once at its start.
//!
//! Every error carries the file, line and column of the key it is about
//! (`FILE:LINE:COLUMN: message`), as `luagate check` prints it; compilation
//! collects all errors instead of stopping at the first.

pub mod compile;
pub mod file;
pub mod locate;
pub mod reload;
pub mod snapshot;
pub mod units;

use std::fmt;
use std::path::{Path, PathBuf};

pub use snapshot::Snapshot;

/// One thing wrong with a config file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Lua syntax errors have no column: FILE:LINE: message, as Lua prints them.
        if self.column == 0 {
            return write!(f, "{}:{}: {}", self.file.display(), self.line, self.message);
        }
        write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.column, self.message)
    }
}

/// All errors found in one file, in source order.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Read, parse and compile the config at `path`. `previous` is the running
/// snapshot (if any), whose shared state the new one keeps.
pub fn load(path: &Path) -> Result<Snapshot, ConfigErrors> {
    let at_top =
        |message: String| ConfigErrors(vec![ConfigError { file: path.to_path_buf(), line: 1, column: 1, message }]);
    let source = std::fs::read_to_string(path).map_err(|e| at_top(format!("cannot read config: {e}")))?;
    let parsed: file::FileConfig = match serde_yaml_ng::from_str(&source) {
        Ok(parsed) => parsed,
        Err(e) => {
            let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((1, 1));
            return Err(ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                line,
                column,
                message: strip_location(&e.to_string()),
            }]));
        }
    };
    let mut compiled = compile::compile(parsed, path).map_err(|failed| {
        let locator = locate::Locator::new(&source);
        let mut out: Vec<ConfigError> = failed
            .errors
            .into_iter()
            .map(|(key, message)| {
                let pos = locator.find(&key);
                ConfigError {
                    file: path.to_path_buf(),
                    line: pos.map_or(1, |p| p.line),
                    column: pos.map_or(1, |p| p.column),
                    message: format!("{key}: {message}"),
                }
            })
            .collect();
        out.sort_by_key(|e| (e.line, e.column));
        out.extend(failed.lua);
        ConfigErrors(out)
    })?;
    compiled.digest = digest(source.as_bytes());
    Ok(compiled)
}

/// The first 16 hex digits of the SHA-256 of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// serde_yaml appends " at line L column C" to its messages; we print the
/// position in front instead.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].trim_end_matches(',').to_string(),
        None => message.to_string(),
    }
}
