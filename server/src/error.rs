//! The server's one error type, and its one mapping to `tonic::Status`.

use sea_orm::DbErr;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Most characters of a client's value quoted in an error message.
const QUOTED_CHARS: usize = 64;
/// Most characters of a field path or a description in an error.
const DESCRIBED_CHARS: usize = 256;
/// Most field violations reported in one error; the rest are counted. With
/// the cut above, the message stays under 3 KiB and the details (which
/// repeat it) under 6 KiB: grpc-core clients refuse trailers over 16 KiB,
/// and the details go out in base64.
const REPORTED_VIOLATIONS: usize = 8;

/// A client's value for an error message: in backquotes, at most
/// [`QUOTED_CHARS`] characters of it, with control characters escaped (other
/// characters, accented letters included, are shown as they are). An
/// error never repeats a whole input: trailers over 16 KiB make grpc-core
/// clients report RESOURCE_EXHAUSTED instead of the error.
pub(crate) fn quote(value: &str) -> String {
    let chars = value.chars().count();
    let shown: String = value
        .chars()
        .take(QUOTED_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    if chars > QUOTED_CHARS {
        format!("`{shown}`… ({chars} characters)")
    } else {
        format!("`{shown}`")
    }
}

/// `text` cut to `max` characters, marked when cut.
fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// One invalid field of a request, reported in `google.rpc.BadRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field in the request, for example `user.first_name`.
    pub field: String,
    /// Why the value is invalid.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`, explained by `description`.
    pub(crate) fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// Everything that can go wrong in the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is invalid; every bad field is listed.
    #[error("invalid request: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// The addressed resource does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The resource would collide with an existing one.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A request exceeds a documented bound.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The system is not in a state that allows the call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A dependency cannot be reached; retrying later may succeed.
    #[error("{dependency} unavailable: {reason}")]
    Unavailable {
        /// Which dependency.
        dependency: &'static str,
        /// What failed.
        reason: String,
    },
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The server could not start or run.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying failure.
        source: std::io::Error,
    },
    /// The gRPC transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A database call failed.
    #[error("database: {0}")]
    Database(#[from] DbErr),
    /// A bug or an unexpected state.
    #[error("internal error: {0}")]
    Internal(String),
}

fn describe(violations: &[FieldViolation]) -> String {
    let mut described = violations
        .iter()
        .take(REPORTED_VIOLATIONS)
        .map(|v| {
            format!(
                "{}: {}",
                cut(&v.field, DESCRIBED_CHARS),
                cut(&v.description, DESCRIBED_CHARS)
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    if let Some(more) = violations
        .len()
        .checked_sub(REPORTED_VIOLATIONS)
        .filter(|n| *n > 0)
    {
        described.push_str(&format!("; and {more} more"));
    }
    described
}

/// True when a database error means the database could not be reached, as
/// opposed to a statement that failed.
pub(crate) fn is_connection_error(error: &DbErr) -> bool {
    use sea_orm::{RuntimeErr, sqlx::Error as SqlxError};
    match error {
        DbErr::Conn(_) | DbErr::ConnectionAcquire(_) => true,
        // A pooled connection that breaks mid-statement (server restarted).
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            match e.as_ref() {
                SqlxError::Io(_)
                | SqlxError::Tls(_)
                | SqlxError::PoolTimedOut
                | SqlxError::PoolClosed
                | SqlxError::WorkerCrashed => true,
                // PostgreSQL closing the connection on purpose: class 57P
                // (shutting down, restarted, backend terminated) and class
                // 08 (connection exception).
                SqlxError::Database(db) => db
                    .code()
                    .is_some_and(|code| code.starts_with("57P") || code.starts_with("08")),
                _ => false,
            }
        }
        _ => false,
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidArgument(violations) => {
                let message = format!("invalid request: {}", describe(&violations));
                // Bounded like the message, so the trailers stay small
                // whatever the request held.
                let details = ErrorDetails::with_bad_request(
                    violations
                        .into_iter()
                        .take(REPORTED_VIOLATIONS)
                        .map(|v| {
                            tonic_types::FieldViolation::new(
                                cut(&v.field, DESCRIBED_CHARS),
                                cut(&v.description, DESCRIBED_CHARS),
                            )
                        })
                        .collect::<Vec<_>>(),
                );
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            Error::NotFound(_) => Status::not_found(error.to_string()),
            Error::AlreadyExists(_) => Status::already_exists(error.to_string()),
            Error::FailedPrecondition(_) => Status::failed_precondition(error.to_string()),
            Error::ResourceExhausted(_) => Status::resource_exhausted(error.to_string()),
            Error::Unavailable { .. } => Status::unavailable(error.to_string()),
            Error::Database(ref db) if is_connection_error(db) => {
                tracing::warn!(error = %db, "database unreachable");
                Status::unavailable("database unavailable; retry later")
            }
            Error::Database(_)
            | Error::Internal(_)
            | Error::Config(_)
            | Error::Io { .. }
            | Error::Transport(_) => {
                // The details stay in the log: clients get no internals.
                tracing::error!(error = %error, "request failed");
                Status::internal("internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_carries_every_field_violation() {
        let status = Status::from(Error::InvalidArgument(vec![
            FieldViolation::new("user.first_name", "must not be blank"),
            FieldViolation::new("user.email", "is not an email address"),
        ]));
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let bad_request = details.bad_request().expect("BadRequest detail");
        let fields: Vec<_> = bad_request
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["user.first_name", "user.email"]);
    }

    #[test]
    fn an_error_never_repeats_a_whole_input() {
        let huge = "x".repeat(1 << 20);
        assert_eq!(quote("name desc"), "`name desc`");
        assert_eq!(quote("a\0b"), "`a\\0b`");
        assert_eq!(quote("año\u{7}"), "`año\\u{7}`");
        assert!(quote(&huge).len() < 128, "{}", quote(&huge));
        // A few huge values among many violations.
        let violations: Vec<FieldViolation> = (0..100_000)
            .map(|i| {
                let description = if i < 20 { huge.as_str() } else { "unknown" };
                FieldViolation::new(format!("update_mask.paths[{i}]"), description)
            })
            .collect();
        let status = Status::from(Error::InvalidArgument(violations));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().len() < 3 * 1024,
            "{}",
            status.message().len()
        );
        assert!(status.message().ends_with("and 99992 more"));
        assert!(
            status.details().len() < 6 * 1024,
            "{}",
            status.details().len()
        );
    }

    #[test]
    fn unreachable_database_is_unavailable_not_internal() {
        let error = Error::Database(DbErr::Conn(sea_orm::RuntimeErr::Internal("refused".into())));
        assert_eq!(Status::from(error).code(), Code::Unavailable);
    }

    #[test]
    fn internal_errors_hide_their_details() {
        let status = Status::from(Error::Internal("secret table name".into()));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("secret"));
    }
}
