//! Integration tests against the real PostgreSQL and the real moto SQS
//! server. Run them with `just test`, which starts both.

mod common;

mod ambiguous;
mod cli;
mod cluster;
mod engine;
mod faults;
mod group;
mod ingest;
mod manifests;
mod metrics;
mod operator;
mod processes;
mod real_cluster;
mod resend;
mod security;
mod shutdown;
mod statements;
mod store;
