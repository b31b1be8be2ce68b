//! The null transport: accepts rendered commands and sends them nowhere. Used by
//! benchmarks to measure the pipeline without a device, and by schemes under test.

use super::{Reply, Verdict};

pub fn send(commands: Vec<String>) -> Reply {
    Reply {
        commands,
        answer: String::new(),
        verdict: Verdict::Done,
    }
}
