//! txrelay: a transactional-outbox relay. Every payment transaction is
//! committed to PostgreSQL before it is handed to SQS, and whatever is not
//! sent yet is delivered by a relay loop that survives outages, replicas
//! and restarts.

pub mod auth;
pub mod cli;
pub mod config;
pub mod duration;
pub mod http;
pub mod metrics;
pub mod operator;
pub mod queue;
pub mod relay;
pub mod secret;
pub mod settings;
pub mod spec;
pub mod store;
pub mod telemetry;
pub mod transaction;
