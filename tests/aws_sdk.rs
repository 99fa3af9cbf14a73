//! The official AWS SDK for Rust (`aws-sdk-marketplacemetering`) against `meterline serve`.
//! (The calls follow in the next commit; this file pins the dev-dependency's build.)
use aws_sdk_marketplacemetering as _;
use aws_smithy_http_client as _;
