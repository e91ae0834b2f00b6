//! The process's limit on open descriptors (`RLIMIT_NOFILE`).
//!
//! Each local tunnel holds four descriptors in the controller (the agent's
//! three pipes and its process handle), so at the common soft limit of 1024
//! a few hundred tunnels would fail with `EMFILE`. The first tunnel raises the
//! soft limit to the hard limit, as many servers do at start-up; past that, a
//! spawn that runs out of descriptors says which limit it hit.

use std::sync::Once;

/// Raises the soft limit on open descriptors to the hard limit, once per process.
pub(crate) fn raise_soft_limit() {
    static RAISED: Once = Once::new();
    RAISED.call_once(|| {
        let Some(limit) = current() else { return };
        if limit.rlim_cur >= limit.rlim_max {
            return;
        }
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; setrlimit only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            tracing::debug!(
                soft = limit.rlim_cur,
                hard = limit.rlim_max,
                "could not raise the soft limit on open descriptors"
            );
        }
    });
}

fn current() -> Option<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is writable; getrlimit fills it.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit)
}

/// When `error` (or an error it wraps) is this process running out of
/// descriptors, what to say about it: the limit, and what to do.
pub(crate) fn exhaustion(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        cause = error.source();
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            // An `io::Error` that wraps another reports the wrapped error's
            // source, not the wrapped error itself.
            if let Some(inner) = io.get_ref() {
                cause = Some(inner as &(dyn std::error::Error + 'static));
            }
            match io.raw_os_error() {
                Some(libc::EMFILE) => {
                    let limit = current()
                        .map(|limit| limit.rlim_cur.to_string())
                        .unwrap_or_else(|| "unknown".into());
                    return Some(format!(
                        "this process has all the descriptors its limit allows open \
                         (RLIMIT_NOFILE, `ulimit -n`: {limit}); each local tunnel holds 4 of \
                         them: close tunnels, or raise the hard limit"
                    ));
                }
                Some(libc::ENFILE) => {
                    return Some(
                        "the system has all the open files its limit allows \
                         (fs.file-max); close tunnels or raise that limit"
                            .into(),
                    );
                }
                _ => {}
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhaustion_names_the_limit_and_ignores_other_errors() {
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        let text = exhaustion(&emfile).expect("EMFILE is exhaustion");
        let soft = current().expect("getrlimit").rlim_cur.to_string();
        assert!(
            text.contains("RLIMIT_NOFILE") && text.contains(&soft),
            "{text}"
        );
        let wrapped = std::io::Error::other(emfile);
        assert!(exhaustion(&wrapped).is_some());
        let other = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(exhaustion(&other), None);
    }
}
