//! Turning `etcd-client` errors into [`registry_core::Error`]s that name the registry, the key
//! and what failed, and say whether trying again can help.

use std::future::Future;
use std::time::Duration;

use etcd_client::Error as EtcdError;
use registry_core::Error;
use tonic::Code;

/// What an error means for the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Credentials refused or not allowed.
    Denied,
    /// The lease named in the request does not exist (expired or revoked).
    LeaseNotFound,
    /// The auth token is no longer valid (e.g. the server restarted): authenticate again.
    TokenInvalid,
    /// A reply larger than the client's decoding limit.
    TooLarge,
    /// Connection trouble, timeouts: retry.
    Transient,
    /// Anything else.
    Other,
}

/// Messages of etcd server errors that pass: leader elections, learners, overload, timeouts.
const TRANSIENT_MESSAGES: &[&str] = &[
    "not leader",
    "no leader",
    "leader changed",
    "not capable",
    "rpc not supported for learner",
    "too many requests",
    "request timed out",
    "server stopped",
    "unhealthy cluster",
];

/// Classifies an `etcd-client` error.
pub(crate) fn kind(e: &EtcdError) -> Kind {
    match e {
        EtcdError::GRpcStatus(s) => {
            let msg = s.message();
            if msg.contains("too large") && !msg.contains("request is too large") {
                return Kind::TooLarge;
            }
            // As etcd's Go client: authenticate again and retry.
            if msg.contains("invalid auth token")
                || msg.contains("auth token is expired")
                || msg.contains("revision of auth store is old")
            {
                return Kind::TokenInvalid;
            }
            // Cluster transients, some of them FailedPrecondition or InvalidArgument.
            if TRANSIENT_MESSAGES.iter().any(|m| msg.contains(m)) {
                return Kind::Transient;
            }
            if msg.contains("requested lease not found") {
                return Kind::LeaseNotFound;
            }
            if msg.contains("authentication failed")
                || msg.contains("permission denied")
                || msg.contains("user name is empty")
                || msg.contains("user name not found")
            {
                return Kind::Denied;
            }
            match s.code() {
                Code::Unauthenticated | Code::PermissionDenied => Kind::Denied,
                Code::NotFound => Kind::LeaseNotFound,
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Aborted
                | Code::Unknown
                | Code::Internal
                | Code::ResourceExhausted => Kind::Transient,
                _ => Kind::Other,
            }
        }
        EtcdError::LeaseKeepAliveError(m) if m.contains("not found") => Kind::LeaseNotFound,
        EtcdError::TransportError(_)
        | EtcdError::IoError(_)
        | EtcdError::WatchError(_)
        | EtcdError::LeaseKeepAliveError(_)
        | EtcdError::EndpointError(_) => Kind::Transient,
        _ => Kind::Other,
    }
}

/// Converts an `etcd-client` error of `what` (an operation and its key) on `registry`.
pub(crate) fn convert(registry: &str, what: &str, e: EtcdError) -> Error {
    let detail = match &e {
        EtcdError::GRpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    };
    match kind(&e) {
        Kind::Denied => Error::AccessDenied {
            registry: registry.to_owned(),
            reason: format!("{what}: {detail}"),
        },
        Kind::TooLarge => Error::TooLarge {
            what: "the etcd reply".to_owned(),
            path: what.to_owned(),
            reason: format!(
                "{detail}; raise the registry URL parameter `{}` (bytes)",
                crate::options::MAX_MESSAGE_SIZE_KEY
            ),
        },
        Kind::Transient => Error::Unavailable {
            registry: registry.to_owned(),
            reason: format!("{what}: {detail}"),
        },
        Kind::LeaseNotFound | Kind::TokenInvalid => Error::Backend {
            registry: registry.to_owned(),
            message: format!("{what}: {detail}"),
            retryable: true,
            source: Some(Box::new(e)),
        },
        Kind::Other => Error::Backend {
            registry: registry.to_owned(),
            message: format!("{what}: {detail}"),
            retryable: false,
            source: Some(Box::new(e)),
        },
    }
}

/// Runs one request with a deadline (the client's own timeout does not cover waiting for a
/// connection), converting its error.
pub(crate) async fn timed<T>(
    registry: &str,
    what: impl FnOnce() -> String,
    after: Duration,
    fut: impl Future<Output = Result<T, EtcdError>>,
) -> Result<T, (Error, Kind)> {
    match tokio::time::timeout(after, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            let k = kind(&e);
            Err((convert(registry, &what(), e), k))
        }
        Err(_) => Err((
            Error::Timeout {
                operation: format!("{} on {registry}", what()),
                after,
            },
            Kind::Transient,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Code, msg: &str) -> EtcdError {
        EtcdError::GRpcStatus(tonic::Status::new(code, msg))
    }

    #[test]
    fn stale_tokens_are_retryable_and_reauthenticate() {
        for (code, msg) in [
            (Code::Unauthenticated, "etcdserver: invalid auth token"),
            (
                Code::InvalidArgument,
                "etcdserver: revision of auth store is old",
            ),
        ] {
            assert_eq!(kind(&status(code, msg)), Kind::TokenInvalid, "{msg}");
            let e = convert("etcd://h", "putting /k", status(code, msg));
            assert!(e.is_retryable(), "{msg}: {e}");
        }
    }

    #[test]
    fn cluster_transients_are_retryable() {
        for (code, msg) in [
            (Code::FailedPrecondition, "etcdserver: not leader"),
            (Code::Unavailable, "etcdserver: no leader"),
            (Code::Unavailable, "etcdserver: leader changed"),
            (Code::FailedPrecondition, "etcdserver: not capable"),
            (Code::Unavailable, "etcdserver: not capable"),
            (
                Code::Unavailable,
                "etcdserver: rpc not supported for learner",
            ),
            (Code::ResourceExhausted, "etcdserver: too many requests"),
            (Code::Unavailable, "etcdserver: request timed out"),
        ] {
            assert_eq!(kind(&status(code, msg)), Kind::Transient, "{msg}");
            assert!(convert("etcd://h", "x", status(code, msg)).is_retryable());
        }
    }

    #[test]
    fn refusals_and_bad_requests_are_not_retryable() {
        for (code, msg) in [
            (Code::PermissionDenied, "etcdserver: permission denied"),
            (
                Code::InvalidArgument,
                "etcdserver: authentication failed, invalid user ID or password",
            ),
            (Code::InvalidArgument, "etcdserver: request is too large"),
        ] {
            assert!(
                !convert("etcd://h", "x", status(code, msg)).is_retryable(),
                "{msg}"
            );
        }
        assert_eq!(
            kind(&status(
                Code::OutOfRange,
                "decoded message length too large: found 6000000 bytes"
            )),
            Kind::TooLarge
        );
    }
}
