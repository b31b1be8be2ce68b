//! Tools beside the daemon, for trying and measuring it: `nasd demo`, `nasd bench`,
//! `nasd bench-api`, the small HTTP/1.1 client the API benchmark and tests use, and
//! `scratch` (the fresh database and the setup steps they share). They start the daemon
//! in-process; neither the daemon nor `api` imports anything from here.

pub mod bench;
pub mod bench_api;
pub mod bench_billing;
pub mod bench_console;
pub mod bench_prune;
pub mod bench_storm;
pub mod demo;
pub mod http_client;
pub mod progress;
pub mod scratch;
