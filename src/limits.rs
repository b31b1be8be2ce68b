//! Descriptor headroom at start: the daemon needs a descriptor per device session
//! (`max_sessions` of every enabled NAS), per API connection (`[api] max_connections`),
//! per database connection, and some for logs, scripts and RADIUS sockets. When the
//! soft `RLIMIT_NOFILE` is below that, the daemon raises it towards the hard limit; if
//! even that is short, it warns once at start, naming the figures, instead of failing
//! events later with "Too many open files".

/// Descriptors kept for everything not counted apart: log files being written, local
/// scripts and their pipes, RADIUS sockets, the listening socket, stdio.
pub const SPARE: u64 = 128;

/// What the daemon may need at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub sessions: u64,
    pub api: u64,
    pub database: u64,
}

impl Need {
    pub fn total(&self) -> u64 {
        self.sessions + self.api + self.database + SPARE
    }
}

/// What to do about the soft limit `soft` (hard limit `hard`) for `need`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Enough already.
    Enough,
    /// Raise the soft limit to this (at most the hard limit); enough afterwards.
    Raise(u64),
    /// Raise as far as the hard limit allows, and warn: still short.
    RaiseAndWarn(u64),
}

pub fn plan(soft: u64, hard: u64, need: u64) -> Plan {
    if soft >= need {
        Plan::Enough
    } else if hard >= need {
        Plan::Raise(need.max(soft))
    } else {
        Plan::RaiseAndWarn(hard.max(soft))
    }
}

/// The warning for a limit still short of `need` after raising it to `limit`.
pub fn warning(limit: u64, need: &Need) -> String {
    format!(
        "the open files limit (RLIMIT_NOFILE) is {limit}, below the {} this daemon may need \
         ({} device sessions, {} API connections, {} database connections, {SPARE} spare): \
         raise it (LimitNOFILE= in the systemd unit, or ulimit -n); sends that find no free \
         descriptor are retried, not failed",
        need.total(),
        need.sessions,
        need.api,
        need.database
    )
}

/// Applies [`plan`] to this process. Returns the warning to log when still short.
pub fn ensure(need: &Need) -> Option<String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    let (soft, hard) = (limit.rlim_cur, limit.rlim_max);
    let raise = |to: u64| {
        let wanted = libc::rlimit {
            rlim_cur: to,
            rlim_max: hard,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        (unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } == 0).then_some(to)
    };
    match plan(soft, hard, need.total()) {
        Plan::Enough => None,
        Plan::Raise(to) => match raise(to) {
            Some(_) => {
                tracing::info!("raised the open files limit from {soft} to {to}");
                None
            }
            None => Some(warning(soft, need)),
        },
        Plan::RaiseAndWarn(to) => {
            let now = if to > soft {
                raise(to).unwrap_or(soft)
            } else {
                soft
            };
            Some(warning(now, need))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_table() {
        // (soft, hard, need) -> plan
        let cases = [
            (1024, 4096, 500, Plan::Enough),
            (500, 4096, 500, Plan::Enough),
            (256, 4096, 500, Plan::Raise(500)),
            (256, 400, 500, Plan::RaiseAndWarn(400)),
            (256, 256, 500, Plan::RaiseAndWarn(256)),
        ];
        for (soft, hard, need, want) in cases {
            assert_eq!(plan(soft, hard, need), want, "{soft}/{hard} for {need}");
        }
    }

    #[test]
    fn the_warning_names_every_figure() {
        let need = Need {
            sessions: 300,
            api: 256,
            database: 10,
        };
        assert_eq!(need.total(), 694);
        let text = warning(256, &need);
        for part in [
            "is 256",
            "the 694",
            "300 device sessions",
            "256 API connections",
            "10 database connections",
            "LimitNOFILE",
        ] {
            assert!(text.contains(part), "{part} in {text}");
        }
    }
}
