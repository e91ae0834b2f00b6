//! Turning what `ssh` printed into an error that says what to do.

use crate::SshError;

/// The error for a connection that failed with these stderr lines, if they
/// say why. Lines are matched on OpenSSH's fixed message texts.
pub(crate) fn diagnose(host: &str, stderr_tail: &[String]) -> Option<SshError> {
    let found = |needle: &str| {
        stderr_tail
            .iter()
            .rev()
            .find(|line| line.contains(needle))
            .cloned()
    };
    let host = host.to_string();
    if let Some(detail) = found("Permission denied (") {
        return Some(SshError::Authentication { host, detail });
    }
    if let Some(detail) = found("Host key verification failed")
        .or_else(|| found("REMOTE HOST IDENTIFICATION HAS CHANGED"))
        .or_else(|| found("host key is not known"))
        .or_else(|| found("No ED25519 host key is known"))
        .or_else(|| found("No RSA host key is known"))
        .or_else(|| found("No ECDSA host key is known"))
    {
        return Some(SshError::HostKey { host, detail });
    }
    if let Some(detail) =
        found("Could not resolve hostname").or_else(|| found("Name or service not known"))
    {
        return Some(SshError::Resolve { host, detail });
    }
    if let Some(detail) = found("Connection refused") {
        return Some(SshError::Refused { host, detail });
    }
    if let Some(detail) = found("timed out").or_else(|| found("Connection timed out")) {
        return Some(SshError::Timeout { host, detail });
    }
    if let Some(detail) = found("No route to host").or_else(|| found("Network is unreachable")) {
        return Some(SshError::Unreachable { host, detail });
    }
    if let Some(detail) = found("Unable to negotiate with") {
        return Some(SshError::Negotiation { host, detail });
    }
    if let Some(detail) = found("Connection closed by")
        .or_else(|| found("Connection reset by"))
        .or_else(|| found("kex_exchange_identification"))
    {
        return Some(SshError::Closed { host, detail });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(String::from).collect()
    }

    #[test]
    fn openssh_messages_map_to_distinct_errors() {
        type Expected = fn(&SshError) -> bool;
        let cases: [(&str, Expected); 7] = [
            ("root@127.0.0.1: Permission denied (publickey).", |e| {
                matches!(e, SshError::Authentication { .. })
            }),
            ("Host key verification failed.", |e| {
                matches!(e, SshError::HostKey { .. })
            }),
            (
                "ssh: Could not resolve hostname nowhere.invalid: Name or service not known",
                |e| matches!(e, SshError::Resolve { .. }),
            ),
            (
                "ssh: connect to host 127.0.0.1 port 1: Connection refused",
                |e| matches!(e, SshError::Refused { .. }),
            ),
            (
                "ssh: connect to host 10.255.255.1 port 22: Connection timed out",
                |e| matches!(e, SshError::Timeout { .. }),
            ),
            (
                "ssh: connect to host 10.0.0.1 port 22: No route to host",
                |e| matches!(e, SshError::Unreachable { .. }),
            ),
            (
                "Unable to negotiate with 127.0.0.1 port 22: no matching cipher found. \
                 Their offer: aes128-ctr",
                |e| matches!(e, SshError::Negotiation { .. }),
            ),
        ];
        for (text, expected) in cases {
            let error = diagnose("web1", &lines(text)).expect(text);
            assert!(expected(&error), "{text} gave {error:?}");
            assert!(error.to_string().contains("web1"), "{error}");
        }
        assert!(diagnose("web1", &lines("something else entirely")).is_none());
    }
}
