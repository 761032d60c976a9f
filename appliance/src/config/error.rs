//! Why a configuration is refused: a missing file, a file that does not
//! parse, or a value that breaks a rule, named by its dotted key.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config file {path} does not exist")]
    Missing { path: PathBuf },
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid value for {field} ({value}): {reason}")]
    Invalid {
        field: String,
        value: String,
        reason: String,
    },
}

impl ConfigError {
    /// The error for `field` holding `value`.
    pub(crate) fn invalid(field: &str, value: impl ToString, reason: &str) -> Self {
        Self::Invalid {
            field: field.to_owned(),
            value: value.to_string(),
            reason: reason.to_owned(),
        }
    }

    /// Refuses `value` below `min`.
    pub(crate) fn at_least<T: PartialOrd + std::fmt::Display>(
        field: &str,
        value: T,
        min: T,
    ) -> Result<(), Self> {
        if value < min {
            return Err(Self::invalid(
                field,
                value,
                &format!("must be at least {min}"),
            ));
        }
        Ok(())
    }

    /// Refuses an empty path.
    pub(crate) fn non_empty(field: &str, path: &std::path::Path) -> Result<(), Self> {
        if path.as_os_str().is_empty() {
            return Err(Self::invalid(field, "\"\"", "must not be empty"));
        }
        Ok(())
    }

    /// A value of the wrong type or outside its type (a 0 where a `NonZero`
    /// setting is), named by its dotted key like every other bad value.
    pub(super) fn from_figment(error: figment::Error) -> Self {
        use figment::error::{Actual, Kind};
        let field = error.path.join(".");
        match &error.kind {
            Kind::InvalidValue(actual, expected) | Kind::InvalidType(actual, expected)
                if !field.is_empty() =>
            {
                // The value as it was written, not figment's description of it.
                let value = match actual {
                    Actual::Unsigned(v) => v.to_string(),
                    Actual::Signed(v) => v.to_string(),
                    Actual::Float(v) => v.to_string(),
                    Actual::Bool(v) => v.to_string(),
                    Actual::Str(v) => format!("{v:?}"),
                    other => other.to_string(),
                };
                Self::invalid(&field, value, &format!("expected {expected}"))
            }
            _ => Self::Parse(error.to_string()),
        }
    }
}
