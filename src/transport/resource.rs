//! Running out of something on this host (file descriptors, processes, memory, local
//! ports, disk space) says nothing about the event or the device: it is a condition to
//! wait out. A send that fails this way before anything went out is put back
//! (`Verdict::Requeue`: the attempt is not counted and the NAS's circuit breaker learns
//! nothing), so no event fails for good because the daemon was short of descriptors.

use std::io;

/// Whether `error` means this host ran short of a resource.
pub fn exhausted(error: &io::Error) -> bool {
    if error.kind() == io::ErrorKind::OutOfMemory || error.kind() == io::ErrorKind::StorageFull {
        return true;
    }
    matches!(
        error.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::EAGAIN
                | libc::ENOMEM
                | libc::ENOSPC
                | libc::ENOBUFS
        )
    )
}

/// Whether an error's chain holds an I/O error that [`exhausted`] accepts (errors of
/// other crates wrap `io::Error` in their own types).
pub fn exhausted_in(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && exhausted(io)
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// The text of a resource error, saying what it means for the event.
pub fn describe(what: &str, error: &dyn std::fmt::Display) -> String {
    format!("{what}: {error} (this host is short of a resource; retried, attempt not counted)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_errors_table() {
        let os = io::Error::from_raw_os_error;
        let cases = [
            (os(libc::EMFILE), true),
            (os(libc::ENFILE), true),
            (os(libc::EAGAIN), true),
            (os(libc::ENOMEM), true),
            (os(libc::ENOSPC), true),
            (os(libc::ENOBUFS), true),
            (os(libc::ECONNREFUSED), false),
            (os(libc::ENOENT), false),
            (os(libc::EACCES), false),
            (os(libc::ETIMEDOUT), false),
            (io::Error::new(io::ErrorKind::OutOfMemory, "oom"), true),
            (io::Error::other("anything"), false),
        ];
        for (error, want) in cases {
            assert_eq!(exhausted(&error), want, "{error}");
        }
    }

    #[derive(Debug)]
    struct Wrapper(io::Error);
    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "wrapped: {}", self.0)
        }
    }
    impl std::error::Error for Wrapper {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn found_inside_other_errors() {
        let wrapped = Wrapper(io::Error::from_raw_os_error(libc::EMFILE));
        assert!(exhausted_in(&wrapped));
        let refused = Wrapper(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert!(!exhausted_in(&refused));
        assert_eq!(
            describe(
                "cannot run /x.sh",
                &io::Error::from_raw_os_error(libc::EMFILE)
            ),
            "cannot run /x.sh: Too many open files (os error 24) (this host is short of a \
             resource; retried, attempt not counted)"
        );
    }
}
