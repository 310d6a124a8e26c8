//! Turning `zookeeper-client` errors (and our request timeouts) into [`registry_core::Error`]s
//! that name the registry, the operation and the path, and say whether trying again can help.

use std::time::Duration;

use registry_core::Error;
use zookeeper_client as zk;

/// A failed ZooKeeper call: the client's error, or our request timeout.
#[derive(Debug)]
pub(crate) enum Fail {
    Zk(zk::Error),
    Timeout(Duration),
}

/// A registry error that names the registry (`label`), the operation and the path.
pub(crate) fn error(label: &str, op: &str, path: &str, fail: Fail) -> Error {
    let e = match fail {
        Fail::Timeout(after) => {
            return Error::Timeout {
                operation: format!("zookeeper {op} {path} on {}", label),
                after,
            };
        }
        Fail::Zk(e) => e,
    };
    let reason = format!("{op} {path}: {e}");
    match e {
        zk::Error::ConnectionLoss
        | zk::Error::SessionExpired
        | zk::Error::SessionMoved
        | zk::Error::NoHosts
        | zk::Error::Timeout
        | zk::Error::Throttled
        | zk::Error::ClientClosed => Error::Unavailable {
            registry: label.to_owned(),
            reason,
        },
        zk::Error::NoAuth | zk::Error::AuthFailed => Error::AccessDenied {
            registry: label.to_owned(),
            reason,
        },
        zk::Error::UnmarshalError { .. } | zk::Error::MarshallingError
            if op == "list children of" =>
        {
            Error::TooLarge {
                what: "the child list".into(),
                path: path.to_owned(),
                reason: format!(
                    "the reply could not be read ({e}); remove stale entries or split the service"
                ),
            }
        }
        zk::Error::BadArguments(_)
        | zk::Error::InvalidAcl
        | zk::Error::NoChildrenForEphemerals
        | zk::Error::Unimplemented
        | zk::Error::QuotaExceeded => Error::Backend {
            registry: label.to_owned(),
            message: reason,
            retryable: false,
            source: Some(Box::new(e)),
        },
        _ => Error::Backend {
            registry: label.to_owned(),
            message: reason,
            retryable: true,
            source: Some(Box::new(e)),
        },
    }
}

/// A copy of an error for several waiters (`Error` is not `Clone`), as retryable as it.
pub(crate) fn copy_error(e: &Error, label: &str) -> Error {
    if e.is_retryable() {
        Error::Unavailable {
            registry: label.to_owned(),
            reason: e.to_string(),
        }
    } else {
        Error::Backend {
            registry: label.to_owned(),
            message: e.to_string(),
            retryable: false,
            source: None,
        }
    }
}
