//! One error type for the whole core, grouped by what the user has to do about it.
//!
//! Every variant has a stable [`Error::code`] so bindings and tests can match on
//! the kind of failure while the wording improves.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A caller-supplied value is wrong (shape, dtype, range, non-finite, ...).
    #[error("{message}")]
    InvalidInput { code: &'static str, message: String },

    /// A weight file exists but is not what we need (corrupt, truncated, wrong tensors).
    #[error("{path}: {message}")]
    Weights {
        path: PathBuf,
        code: &'static str,
        message: String,
    },

    /// A file or directory we were pointed at does not exist.
    #[error("{path}: not found; {hint}")]
    MissingFile { path: PathBuf, hint: String },

    /// The request would need more memory than the budget allows.
    #[error("{message}")]
    Budget {
        needed_bytes: u64,
        budget_bytes: u64,
        message: String,
    },

    /// This machine cannot run what was asked: no CUDA in this build, no GPU, a driver or GPU
    /// too old for the build.
    #[error("{message}")]
    Unsupported { code: &'static str, message: String },

    /// The caller asked us to stop (cancel token or Ctrl-C).
    #[error("decode cancelled")]
    Cancelled,

    /// A progress callback failed; carried through untouched so the binding can re-raise it.
    #[error("progress callback failed: {0}")]
    Callback(String),

    /// Anything candle itself reports (device, kernel, internal shape errors).
    #[error(transparent)]
    Backend(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Error {
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidInput { code, .. }
            | Error::Weights { code, .. }
            | Error::Unsupported { code, .. } => code,
            Error::MissingFile { .. } => "missing_file",
            Error::Budget { .. } => "memory_budget",
            Error::Cancelled => "cancelled",
            Error::Callback(_) => "callback",
            Error::Backend(_) => "backend",
            Error::Io { .. } => "io",
        }
    }

    pub fn input(code: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidInput {
            code,
            message: message.into(),
        }
    }

    pub fn unsupported(code: &'static str, message: impl Into<String>) -> Self {
        Error::Unsupported {
            code,
            message: message.into(),
        }
    }

    pub fn weights(
        path: impl Into<PathBuf>,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Error::Weights {
            path: path.into(),
            code,
            message: message.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            return Error::MissingFile {
                path,
                hint: "check the path, or run `pid-native fetch` to provision the weights".into(),
            };
        }
        Error::Io { path, source }
    }
}
