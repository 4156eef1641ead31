//! The configuration file: TOML → plain, validated types.
//!
//! Loading has two stages. The document is parsed into spanned TOML values,
//! then every top-level section (and every pool, listener and route inside
//! it) is deserialized on its own, so one typo does not hide the next: all
//! errors come back at once, each as `file:line:col: message`. Semantic
//! checks (references, duplicates, ranges, readable secret files) run on the
//! sections that parsed, with the span of the offending value.
//!
//! These types are what the operator writes. They never reach the request
//! path: [`crate::snapshot`] compiles them into the runtime form.

mod limits;
mod tls;
mod transport;
mod types;
mod validate;

pub use limits::LimitsSection;
pub use tls::{SniSection, TlsSection, TlsVersion};
pub use types::*;

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::{DeserializeOwned, IntoDeserializer};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One problem in a configuration file, located by line and column (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file, self.line, self.col, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every error of one load; displays one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
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

impl std::error::Error for ConfigErrors {}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: name.clone(),
            line: 1,
            col: 1,
            message: format!("cannot read config file: {e}"),
        }])
    })?;
    parse(&name, &text, path.parent())
}

/// Parses and validates configuration text. `name` is used in error
/// messages; relative paths inside the file (such as `secret_file`) are
/// resolved against `base_dir` (the config file's directory).
pub fn parse(name: &str, text: &str, base_dir: Option<&Path>) -> Result<Config, ConfigErrors> {
    let mut errs = Errors::new(name, text);
    let (doc, syntax) = DeTable::parse_recoverable(text);
    for e in syntax {
        errs.toml(&e);
    }
    if !errs.list.is_empty() {
        // After a syntax error the recovered document may be misleading.
        return Err(ConfigErrors(errs.list));
    }
    let mut file = Config::default();
    for (key, value) in doc.into_inner() {
        match key.get_ref().as_ref() {
            "admin" => file.admin = errs.section(value),
            "log" => file.log = errs.section(value).unwrap_or_default(),
            "timeouts" => file.timeouts = errs.section(value).unwrap_or_default(),
            "forwarding" => file.forwarding = errs.section(value).unwrap_or_default(),
            "limits" => file.limits = errs.section(value).unwrap_or_default(),
            "listeners" => file.listeners = errs.named_sections(value, "listeners"),
            "pools" => file.pools = errs.named_sections(value, "pools"),
            "routes" => file.routes = errs.array_sections(value, "routes"),
            other => errs.at(
                key.span(),
                format!(
                    "unknown section `{other}`; expected one of: admin, log, timeouts, limits, forwarding, listeners, routes, pools"
                ),
            ),
        }
    }
    let base = base_dir.map(Path::to_path_buf).unwrap_or_default();
    let mut config = validate::validate(file, &base, &mut errs);
    if errs.list.is_empty() {
        config.warnings = errs.warnings;
        Ok(config)
    } else {
        errs.list.sort_by_key(|e| (e.line, e.col));
        Err(ConfigErrors(errs.list))
    }
}

/// Collects errors of one file, turning byte spans into line and column.
pub(crate) struct Errors<'a> {
    file: &'a str,
    text: &'a str,
    pub(crate) list: Vec<ConfigError>,
    /// Named sections that exist but did not parse, as (`pools`, name):
    /// their error is already reported, so they are neither missing nor
    /// unknown to references.
    pub(crate) unparsed: Vec<(String, String)>,
    pub(crate) warnings: Vec<ConfigError>,
}

impl<'a> Errors<'a> {
    fn new(file: &'a str, text: &'a str) -> Self {
        Errors { file, text, list: Vec::new(), unparsed: Vec::new(), warnings: Vec::new() }
    }

    pub(crate) fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, col) = line_col(self.text, span.start);
        self.list.push(ConfigError { file: self.file.to_string(), line, col, message: message.into() });
    }

    /// Something allowed but dangerous: reported, not rejected.
    pub(crate) fn warn(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, col) = line_col(self.text, span.start);
        self.warnings.push(ConfigError { file: self.file.to_string(), line, col, message: message.into() });
    }

    fn toml(&mut self, e: &toml::de::Error) {
        let span = e.span().unwrap_or(0..0);
        // toml's messages may span lines; the first line is the useful one.
        let msg = e.message().trim().replace('\n', "; ");
        self.at(span, msg)
    }

    /// Deserializes one spanned value, recording the error if it fails.
    fn section<T: DeserializeOwned>(&mut self, value: Spanned<DeValue<'_>>) -> Option<T> {
        match T::deserialize(value.into_deserializer()) {
            Ok(v) => Some(v),
            Err(e) => {
                self.toml(&e);
                None
            }
        }
    }

    /// A table of named tables (`[pools.NAME]`): each entry on its own.
    fn named_sections<T: DeserializeOwned>(&mut self, value: Spanned<DeValue<'_>>, what: &str) -> Vec<Named<T>> {
        let span = value.span();
        let DeValue::Table(table) = value.into_inner() else {
            self.at(span, format!("`{what}` must be a table of named tables, e.g. [{what}.NAME]"));
            return Vec::new();
        };
        let mut out = Vec::new();
        for (key, value) in table {
            let key_span = key.span();
            match self.section(value) {
                Some(v) => out.push(Named { name: key.get_ref().to_string(), span: key_span, value: v }),
                None => self.unparsed.push((what.to_string(), key.get_ref().to_string())),
            }
        }
        out
    }

    /// An array of tables (`[[routes]]`): each element on its own.
    fn array_sections<T: DeserializeOwned>(&mut self, value: Spanned<DeValue<'_>>, what: &str) -> Vec<T> {
        let span = value.span();
        let DeValue::Array(items) = value.into_inner() else {
            self.at(span, format!("`{what}` must be an array of tables, e.g. [[{what}]]"));
            return Vec::new();
        };
        items.into_iter().filter_map(|v| self.section(v)).collect()
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, col)
}

/// The config file's path, kept for reloads and status.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod transport_tests;
