//! nasd: delivers ISP billing events from the event stack to network access servers.
//!
//! See ARCHITECTURE.md for the map of the modules.

pub mod alerts;
pub mod answer;
pub mod api;
pub mod bench;
pub mod breaker;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod device;
pub mod dispatch;
pub mod duration;
pub mod expand;
pub mod journal;
pub mod retry;
pub mod scheme;
pub mod sim;
pub mod stats;
pub mod store;
pub mod supervisor;
pub mod systemd;
pub mod tls;
pub mod transport;
