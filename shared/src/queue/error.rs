//! Errors of the queue itself ([`QueueError`]) and the outcome a job handler reports ([`JobError`]).

use std::time::Duration;

use apalis_core::error::{AbortError, BoxDynError, RetryAfterError};

/// An error talking to the queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Redis refused the command or could not be reached.
    #[error("Redis command failed: {0}")]
    Redis(#[from] redis::RedisError),
    /// A job could not be serialised to JSON.
    #[error("failed to encode the job payload: {0}")]
    Encode(serde_json::Error),
    /// A queue name outside `[a-z0-9_-]{1,64}`.
    #[error("invalid queue name {0:?}: use 1 to 64 lowercase letters, digits, '-' or '_'")]
    InvalidName(String),
}

impl QueueError {
    /// Whether trying again later can succeed (Redis down, timeouts) or not (bad names, unencodable jobs).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Redis(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || matches!(
                        e.code(),
                        Some("LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "NOGROUP")
                    )
            }
            Self::Encode(_) | Self::InvalidName(_) => false,
        }
    }
}

/// How a job handler reports a failure, so the queue knows whether to try again.
///
/// Handlers may also return apalis's [`AbortError`] (permanent) or [`RetryAfterError`] (retry after a delay), or any
/// other error, which counts as retryable with the queue's backoff.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Worth another attempt: after `after` if given (a provider's Retry-After), else after the queue's backoff.
    #[error("{source}")]
    Retryable {
        /// What went wrong.
        source: BoxDynError,
        /// The earliest time to try again, if the failure says so.
        after: Option<Duration>,
    },
    /// Never worth another attempt (bad input, a 4xx answer): the job goes to the dead letters at once.
    #[error("{source}")]
    Permanent {
        /// What went wrong.
        source: BoxDynError,
    },
    /// Not the job's fault (its provider is paused, out of quota): run it again after `after` without spending
    /// one of its attempts, however long the wait lasts.
    #[error("{source}")]
    Deferred {
        /// Why it waits.
        source: BoxDynError,
        /// When to try again.
        after: Duration,
    },
    /// The job ended in a failure its handler has already recorded (a document marked failed, with its reason):
    /// the job is acknowledged like a success, never retried or dead-lettered, and counted as `failed`.
    #[error("{source}")]
    Failed {
        /// Why it failed.
        source: BoxDynError,
    },
}

impl JobError {
    /// A failure worth retrying after the queue's backoff.
    pub fn retryable(source: impl Into<BoxDynError>) -> Self {
        Self::Retryable {
            source: source.into(),
            after: None,
        }
    }

    /// A job to run again after `after`, keeping its attempts.
    pub fn defer(source: impl Into<BoxDynError>, after: Duration) -> Self {
        Self::Deferred {
            source: source.into(),
            after,
        }
    }

    /// A failure worth retrying, not before `after`.
    pub fn retry_after(source: impl Into<BoxDynError>, after: Duration) -> Self {
        Self::Retryable {
            source: source.into(),
            after: Some(after),
        }
    }

    /// A failure the handler has recorded itself: acknowledge the job and count it as failed.
    pub fn failed(source: impl Into<BoxDynError>) -> Self {
        Self::Failed {
            source: source.into(),
        }
    }

    /// A failure no retry can fix.
    pub fn permanent(source: impl Into<BoxDynError>) -> Self {
        Self::Permanent {
            source: source.into(),
        }
    }
}

/// What the queue does with a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Try again, after the given delay or the backoff.
    Retry {
        error: String,
        after: Option<Duration>,
    },
    /// Dead-letter now.
    Permanent { error: String },
    /// Run again after the delay, keeping the attempt count.
    Defer { error: String, after: Duration },
    /// Acknowledge: the handler recorded the failure, nothing is left to do.
    Settled { error: String },
}

impl Failure {
    /// Classifies whatever error the handler stack returned.
    pub(crate) fn classify(err: &BoxDynError) -> Self {
        if let Some(e) = err.downcast_ref::<JobError>() {
            return match e {
                JobError::Retryable { source, after } => Self::Retry {
                    error: source.to_string(),
                    after: *after,
                },
                JobError::Permanent { source } => Self::Permanent {
                    error: source.to_string(),
                },
                JobError::Deferred { source, after } => Self::Defer {
                    error: source.to_string(),
                    after: *after,
                },
                JobError::Failed { source } => Self::Settled {
                    error: source.to_string(),
                },
            };
        }
        if let Some(e) = err.downcast_ref::<AbortError>() {
            return Self::Permanent {
                error: e.to_string(),
            };
        }
        if let Some(e) = err.downcast_ref::<RetryAfterError>() {
            return Self::Retry {
                error: e.to_string(),
                after: Some(e.get_duration()),
            };
        }
        Self::Retry {
            error: err.to_string(),
            after: None,
        }
    }

    pub(crate) fn message(&self) -> &str {
        match self {
            Self::Retry { error, .. }
            | Self::Permanent { error }
            | Self::Defer { error, .. }
            | Self::Settled { error } => error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handler_errors_are_classified_by_their_type() {
        let boxed = |e: JobError| -> BoxDynError { Box::new(e) };
        assert_eq!(
            Failure::classify(&boxed(JobError::permanent("bad file"))),
            Failure::Permanent {
                error: "bad file".into()
            }
        );
        assert_eq!(
            Failure::classify(&boxed(JobError::retry_after("429", Duration::from_secs(3)))),
            Failure::Retry {
                error: "429".into(),
                after: Some(Duration::from_secs(3))
            }
        );
        let abort: BoxDynError = Box::new(AbortError::new("no"));
        assert!(matches!(
            Failure::classify(&abort),
            Failure::Permanent { .. }
        ));
        let later: BoxDynError =
            Box::new(RetryAfterError::new("busy", Duration::from_millis(1500)));
        assert_eq!(Failure::classify(&later).message(), "RetryError: busy");
        assert!(
            matches!(Failure::classify(&later), Failure::Retry { after: Some(d), .. } if d == Duration::from_millis(1500))
        );
        let paused = Failure::classify(&boxed(JobError::defer(
            "openai paused",
            Duration::from_secs(30),
        )));
        assert_eq!(
            paused,
            Failure::Defer {
                error: "openai paused".into(),
                after: Duration::from_secs(30)
            }
        );
        assert_eq!(paused.message(), "openai paused");
        let recorded = Failure::classify(&boxed(JobError::failed("corrupt PDF")));
        assert_eq!(
            recorded,
            Failure::Settled {
                error: "corrupt PDF".into()
            }
        );
        assert_eq!(recorded.message(), "corrupt PDF");
        assert_eq!(
            Failure::classify(&boxed(JobError::permanent("bad file"))).message(),
            "bad file"
        );
        let other: BoxDynError = "connection reset".into();
        assert_eq!(
            Failure::classify(&other),
            Failure::Retry {
                error: "connection reset".into(),
                after: None
            }
        );
    }
}
