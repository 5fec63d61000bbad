//! The single mapping from core errors to the Python exception hierarchy.
//!
//! The classes are defined once, in `pid_native/errors.py`; the binding imports them.

use pyo3::PyErr;

pyo3::import_exception!(pid_native.errors, PidError);
pyo3::import_exception!(pid_native.errors, InvalidInputError);
pyo3::import_exception!(pid_native.errors, WeightsError);
pyo3::import_exception!(pid_native.errors, MissingFileError);
pyo3::import_exception!(pid_native.errors, BudgetError);
pyo3::import_exception!(pid_native.errors, BackendUnavailableError);
pyo3::import_exception!(pid_native.errors, Cancelled);

/// Newtype so `?` can turn a core error into a Python exception (orphan rule).
pub struct PyPidError(pub pid_core::Error);

impl From<pid_core::Error> for PyPidError {
    fn from(e: pid_core::Error) -> Self {
        Self(e)
    }
}

impl From<candle_core::Error> for PyPidError {
    fn from(e: candle_core::Error) -> Self {
        Self(pid_core::Error::Backend(e))
    }
}

impl From<PyPidError> for PyErr {
    fn from(PyPidError(e): PyPidError) -> Self {
        let code = e.code();
        let msg = e.to_string();
        match e {
            pid_core::Error::InvalidInput { .. } => InvalidInputError::new_err((msg, code)),
            pid_core::Error::Weights { .. } => WeightsError::new_err((msg, code)),
            pid_core::Error::MissingFile { .. } => MissingFileError::new_err((msg, code)),
            pid_core::Error::Budget { .. } => BudgetError::new_err((msg, code)),
            pid_core::Error::Unsupported { .. } => BackendUnavailableError::new_err((msg, code)),
            pid_core::Error::Cancelled => Cancelled::new_err((msg, code)),
            // A Python exception raised inside a callback is restored by the caller; this is the fallback.
            pid_core::Error::Callback(_)
            | pid_core::Error::Backend(_)
            | pid_core::Error::Io { .. } => PidError::new_err((msg, code)),
        }
    }
}

/// Shorthand for raising an input error from argument conversion.
pub fn input_error(code: &'static str, msg: impl Into<String>) -> PyErr {
    PyPidError(pid_core::Error::input(code, msg)).into()
}
