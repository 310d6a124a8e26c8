//! The one error type of the workspace.

use std::time::Duration;

/// A `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a registry. Every message says what was wrong and, where
/// it helps, what to do; [`Error::is_retryable`] tells whether trying again can succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The input is not a valid URL.
    #[error("invalid URL {input:?}: {reason}")]
    InvalidUrl {
        /// The text that was parsed.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A node name or key is not valid `URLEncoder` output.
    #[error("cannot decode {input:?}: {reason}")]
    InvalidEncoding {
        /// The encoded text.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A URL parameter has a value that cannot be used.
    #[error("invalid value {value:?} for parameter `{key}`: {reason}")]
    InvalidParameter {
        /// The parameter.
        key: String,
        /// Its value.
        value: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The registry URL cannot be used as a registry address.
    #[error("invalid registry address {url}: {reason}")]
    InvalidRegistryUrl {
        /// The registry URL (password hidden).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No backend is registered for the scheme.
    #[error(
        "no registry backend for scheme `{scheme}`; registered schemes: {}. \
         A backend crate used only through its scheme must be linked with `use registry_x as _;`",
        if registered.is_empty() { "none".to_owned() } else { registered.join(", ") }
    )]
    UnknownScheme {
        /// The scheme asked for.
        scheme: String,
        /// The schemes that are registered.
        registered: Vec<String>,
    },
    /// Two backends registered the same scheme.
    #[error(
        "the scheme `{scheme}` is registered by more than one backend ({count} factories); link only one"
    )]
    DuplicateScheme {
        /// The scheme.
        scheme: String,
        /// How many factories claim it.
        count: usize,
    },
    /// The URL is refused by the registry's `accepts` list.
    #[error("{url} is not accepted by this registry (accepts={accepts})")]
    NotAccepted {
        /// The URL.
        url: String,
        /// The registry's `accepts` parameter.
        accepts: String,
    },
    /// The registry was destroyed; make a new one.
    #[error("the registry {registry} is destroyed")]
    Destroyed {
        /// The registry URL.
        registry: String,
    },
    /// The backend cannot be reached now; retrying may succeed.
    #[error("the registry {registry} is unavailable: {reason}")]
    Unavailable {
        /// The registry URL.
        registry: String,
        /// Why.
        reason: String,
    },
    /// The backend is not connected (no connection or session yet): the request was not
    /// sent, so nothing of it was or will be applied; retrying may succeed.
    #[error("the registry {registry} is unavailable: {reason}")]
    NotConnected {
        /// The registry URL.
        registry: String,
        /// Why.
        reason: String,
    },
    /// An operation took longer than allowed.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What was being done.
        operation: String,
        /// The limit.
        after: Duration,
    },
    /// A value or list is larger than the backend accepts.
    #[error("{what} at {path} is too large: {reason}")]
    TooLarge {
        /// What was too large (a child list, a value...).
        what: String,
        /// The node path or key.
        path: String,
        /// The limit and how to raise it.
        reason: String,
    },
    /// The backend refused the credentials or the operation.
    #[error("access denied by {registry}: {reason}")]
    AccessDenied {
        /// The registry URL.
        registry: String,
        /// The server's reason.
        reason: String,
    },
    /// A configuration file or environment variable is wrong.
    #[error("configuration error: {0}")]
    Config(String),
    /// A local I/O error (disk cache, configuration file).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A failure injected by the conformance kit's fault wrapper.
    #[error("injected failure of {operation}")]
    Injected {
        /// The operation that was made to fail.
        operation: String,
        /// Whether the call reached the wrapped registry (a lost reply, a late write), as
        /// opposed to failing before it was sent.
        reached: bool,
    },
    /// Any other backend failure.
    #[error("{registry}: {message}")]
    Backend {
        /// The registry URL.
        registry: String,
        /// What failed.
        message: String,
        /// Whether trying again can succeed.
        retryable: bool,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl Error {
    /// Whether trying the same operation again can succeed (the backend was unreachable,
    /// slow or failed transiently), as opposed to bad input or a destroyed registry.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unavailable { .. }
            | Error::NotConnected { .. }
            | Error::Timeout { .. }
            | Error::Injected { .. } => true,
            Error::Io { .. } => true,
            Error::Backend { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// Whether a failed write may have been applied, or may still be applied later (a
    /// time-out, a lost reply, a connection lost while the request was out): the caller
    /// cannot tell. `false` for errors raised before the request was sent
    /// ([`Error::NotConnected`], an injected failure that never reached the wrapped
    /// registry) and for errors retrying cannot fix (bad input, refused by the server).
    pub fn may_have_applied(&self) -> bool {
        match self {
            Error::NotConnected { .. } => false,
            Error::Injected { reached, .. } => *reached,
            e => e.is_retryable(),
        }
    }

    /// An [`Error::NotConnected`] of the registry labelled `registry` (no password).
    pub fn not_connected(registry: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::NotConnected {
            registry: registry.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid_url(input: &str, reason: &str) -> Error {
        Error::InvalidUrl {
            input: input.to_owned(),
            reason: reason.to_owned(),
        }
    }

    /// A retryable backend error with a message.
    pub fn backend(registry: &crate::Url, message: impl Into<String>, retryable: bool) -> Error {
        Error::Backend {
            registry: registry.to_identity_string_redacted(),
            message: message.into(),
            retryable,
            source: None,
        }
    }
}
