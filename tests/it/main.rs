//! Every integration test of the root package, in one binary (one link instead of fifteen).
//!
//! Each module is one concern; `fixtures` holds the shared price book, keys and record builders,
//! `aws_fixtures` the AWS-client harness. Tests that need the stage binaries expect
//! `cargo build --workspace --all-features` first (scripts/test.sh does it). Run one module with
//! `cargo test --all-features --test it distributed::` (a path prefix filter).

mod aws_fixtures;
mod fixtures;

mod aws_sdk;
mod boto3;
mod connections;
mod crash;
mod distributed;
mod embedded_http;
mod errors;
mod hostile_http;
mod loadtest_smoke;
mod observability;
mod operator_api;
mod overload;
mod price_models;
mod query_api;
mod rate_command;
