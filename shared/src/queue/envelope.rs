//! The job envelope: the fields a job carries in the stream, the delayed set and the dead letters, parsed once
//! into typed fields when an entry is read, and written back in the wire format the Lua scripts expect.

use std::{collections::HashMap, str::FromStr};

use serde::Serialize;

use super::now_ms;

/// The wire names of the envelope's fields. The Lua scripts spell the same literals (`push.lua`, `ack.lua`,
/// `dead.lua`, `promote.lua`, `release.lua`, `replay.lua`), so these never change on their own.
pub(crate) mod field {
    /// The stable job id.
    pub(crate) const JOB_ID: &str = "id";
    /// The JSON payload.
    pub(crate) const PAYLOAD: &str = "p";
    /// Attempts used before this entry, as a decimal string.
    pub(crate) const ATTEMPTS: &str = "a";
    /// First enqueue time, ms since the epoch, as a decimal string.
    pub(crate) const ENQUEUED_AT: &str = "e";
    /// Error of the last failed attempt (absent when there was none).
    pub(crate) const ERROR: &str = "err";
}

/// A job as stored in the stream, in the delayed set and in the dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Envelope {
    /// Stable job id (`id`).
    pub job_id: String,
    /// JSON payload, as pushed (`p`).
    pub payload: String,
    /// Attempts used before this entry (`a`).
    pub attempts: u32,
    /// First enqueue time, ms since the epoch (`e`).
    pub enqueued_at_ms: u64,
    /// Error of the last failed attempt (`err`).
    pub last_error: Option<String>,
}

/// A stream entry without a job id or payload field: it cannot run, so it goes to the dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed;

impl Malformed {
    /// The error its dead letter records.
    pub(crate) const MESSAGE: &'static str =
        "malformed queue entry: missing its id or payload field";
}

/// The delayed set's member: a JSON object whose values are all strings, in this field order, because
/// `promote.lua` copies them into `XADD` as they are.
#[derive(Serialize)]
struct DelayedMember<'a> {
    id: &'a str,
    p: &'a str,
    a: String,
    e: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    err: Option<&'a str>,
}

impl Envelope {
    /// A job pushed now that has used no attempt yet.
    pub(crate) fn new(job_id: String, payload: String) -> Self {
        Self {
            job_id,
            payload,
            attempts: 0,
            enqueued_at_ms: now_ms(),
            last_error: None,
        }
    }

    /// Reads a stream entry's fields. Without a job id or payload the entry is [`Malformed`]; a missing or
    /// malformed attempt count or enqueue time reads as 0 (see [`lenient_number`]).
    pub(crate) fn from_fields(mut fields: HashMap<String, String>) -> Result<Self, Malformed> {
        let job_id = fields.remove(field::JOB_ID).ok_or(Malformed)?;
        let payload = fields.remove(field::PAYLOAD).ok_or(Malformed)?;
        Ok(Self {
            job_id,
            payload,
            attempts: lenient_number(fields.get(field::ATTEMPTS).map(String::as_str)),
            enqueued_at_ms: lenient_number(fields.get(field::ENQUEUED_AT).map(String::as_str)),
            last_error: fields.remove(field::ERROR),
        })
    }

    /// The fields as `XADD` takes them, in the order the scripts write them (`err` only when set).
    pub(crate) fn fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            (field::JOB_ID, self.job_id.clone()),
            (field::PAYLOAD, self.payload.clone()),
            (field::ATTEMPTS, self.attempts.to_string()),
            (field::ENQUEUED_AT, self.enqueued_at_ms.to_string()),
        ];
        if let Some(err) = &self.last_error {
            f.push((field::ERROR, err.clone()));
        }
        f
    }

    /// The member the delayed set holds for this envelope (see [`DelayedMember`]).
    pub(crate) fn delayed_member(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(&DelayedMember {
            id: &self.job_id,
            p: &self.payload,
            a: self.attempts.to_string(),
            e: self.enqueued_at_ms.to_string(),
            err: self.last_error.as_deref(),
        })
    }
}

/// Reads a numeric envelope field; a missing or malformed value reads as 0, silently.
///
/// This is the one place that policy lives. Only this crate and its scripts write these fields, always as
/// decimals, so a value that does not parse was edited by hand. Reading it as 0 keeps the job running instead of
/// losing it or stopping the worker: a bad attempt count costs at most a few extra attempts (the stream's
/// delivery count still bounds a crashing job), a bad enqueue time only skews a log field, and the next write of
/// the envelope (a retry or a dead letter) stores a valid number again.
pub(crate) fn lenient_number<N: FromStr + Default>(raw: Option<&str>) -> N {
    raw.and_then(|s| s.parse().ok()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn an_entry_without_id_or_payload_is_malformed() {
        assert_eq!(Envelope::from_fields(map(&[("p", "{}")])), Err(Malformed));
        assert_eq!(Envelope::from_fields(map(&[("id", "j1")])), Err(Malformed));
    }

    #[test]
    fn missing_or_malformed_numbers_read_as_zero() {
        let env = Envelope::from_fields(map(&[("id", "j1"), ("p", "{}"), ("a", "x"), ("e", "-3")]))
            .expect("id and payload are there");
        assert_eq!((env.attempts, env.enqueued_at_ms), (0, 0));
        let env = Envelope::from_fields(map(&[("id", "j1"), ("p", "{}")])).expect("well formed");
        assert_eq!(
            (env.attempts, env.enqueued_at_ms, env.last_error),
            (0, 0, None)
        );
    }

    #[test]
    fn the_wire_format_round_trips() {
        let env = Envelope {
            job_id: "j1".into(),
            payload: r#"{"doc":1}"#.into(),
            attempts: 2,
            enqueued_at_ms: 1_700_000_000_000,
            last_error: Some("boom".into()),
        };
        let fields = env.fields();
        let back = fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        assert_eq!(Envelope::from_fields(back), Ok(env.clone()));
        assert_eq!(
            env.delayed_member().expect("encodes"),
            r#"{"id":"j1","p":"{\"doc\":1}","a":"2","e":"1700000000000","err":"boom"}"#
        );
        let fresh = Envelope {
            last_error: None,
            ..env
        };
        assert!(!fresh.delayed_member().expect("encodes").contains("err"));
    }
}
