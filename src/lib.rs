//! nasd: delivers ISP billing events from the event stack to network access servers.
//!
//! See ARCHITECTURE.md for the map of the modules.

pub mod alerts;
pub mod api;
pub mod billing;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod daemon_lock;
pub mod dispatch;
pub mod duration;
pub mod expand;
pub mod journal;
pub mod limits;
pub mod manual;
pub mod model;
pub mod prune;
pub mod reconcile;
pub mod reload;
pub mod scheme;
pub mod series;
pub mod sim;
pub mod stats;
pub mod store;
pub mod supervisor;
pub mod systemd;
pub mod tls;
pub mod tools;
pub mod transport;

// Old paths of the tools, kept while tests use them.
pub use tools::{bench, demo};
// The retry schedule and the circuit breaker live with the dispatcher that uses them.
pub use dispatch::{breaker, retry};
/// `device` and `answer` live in `transport/`; the old paths keep working.
pub use transport::{answer, device};
