//! End-to-end tests. Each test drives the real `walstream` binary (built by the workspace) as a
//! separate process against a SQLite database written by the test, and checks the result by
//! restoring and comparing with the source. Interop tests run the real litestream v0.3.13 that
//! `scripts/install-tools.sh` puts in `.tools/`.

mod cli;
mod config;
mod cost;
mod crash;
mod deploy;
mod emulator;
mod encryption;
mod exec;
mod fault_proxy;
mod faults;
mod fd_limit;
mod gcs;
mod harness;
mod health;
mod idle;
mod interop;
mod lease;
mod memory_volume;
mod replicate;
mod restore;
mod retention;
mod s3;
mod server;
mod stall;
