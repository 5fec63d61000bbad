//! pid-core's integration tests, one binary (linking candle once per test build matters on
//! a 2-core CI machine). One module per concern.

// Test code: a failed unwrap is a failed test, and reports go to the test log.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;
mod decoder;
mod goldens_gemma;
mod goldens_pidnet;
mod goldens_vae;
mod weights;
