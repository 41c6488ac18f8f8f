//! Filters on the documents a search looks in: OpenAI's vector store `filters`, checked in `parse` and evaluated in
//! SQL.
//!
//! A comparison `{"type": "eq"|"ne"|"gt"|"gte"|"lt"|"lte"|"in"|"nin", "key": "...", "value": ...}` or a compound
//! `{"type": "and"|"or", "filters": [...]}`. The keys `filename`, `content_type`, `created_at` and `document_id` name
//! the document's own fields; any other key is a top-level key of its metadata. The checks here are those of the
//! SQL function `upload_pipeline.filter_validate`, with the same limits, so the API answers a bad filter with a
//! message that names its part before any work is done (and refuses what Postgres could not take: NUL characters,
//! times outside its range, UUIDs in forms the SQL check refuses); `upload_pipeline.filter_matches` evaluates it
//! once per document of the caller's inside the search, before the top hits are taken.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// How deep filters nest: a comparison alone is 1 deep, `and` of comparisons 2.
pub const MAX_DEPTH: usize = 5;
/// Most filters (comparisons and compounds) in one.
pub const MAX_FILTERS: usize = 100;
/// Most values of an `in` or `nin` list.
pub const MAX_VALUES: usize = 100;
/// Most values in a whole filter (a comparison's value counts 1, a list its items): with [`MAX_FILTERS`], a bound
/// on the work of matching one document.
pub const MAX_TOTAL_VALUES: usize = 500;
/// Longest key, in characters.
pub const MAX_KEY_CHARS: usize = 256;
/// Longest string value, in characters.
pub const MAX_STRING_CHARS: usize = 1000;

/// The document's own fields a key may name; any other key names a metadata key.
pub const DOCUMENT_FIELDS: [&str; 4] = ["filename", "content_type", "created_at", "document_id"];

/// A filter: a comparison, or a compound of filters.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Filter {
    /// Compares one field of the document (or key of its metadata) with a value.
    Comparison(ComparisonFilter),
    /// All (`and`) or any (`or`) of several filters.
    Compound(CompoundFilter),
}

/// `{"type": "eq", "key": "team", "value": "ops"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComparisonFilter {
    /// The comparison.
    #[serde(rename = "type")]
    pub op: ComparisonOp,
    /// `filename`, `content_type`, `created_at`, `document_id`, or a top-level key of the document's metadata.
    pub key: String,
    /// A string, number or boolean; a list of them for `in` and `nin`.
    pub value: FilterValue,
}

/// `{"type": "and", "filters": [...]}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompoundFilter {
    /// `and` or `or`.
    #[serde(rename = "type")]
    pub op: CompoundOp,
    /// The filters combined.
    pub filters: Vec<Filter>,
}

/// A comparison's operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComparisonOp {
    /// Equal.
    Eq,
    /// Not equal (also: the key is missing).
    Ne,
    /// Greater than.
    Gt,
    /// Greater than or equal.
    Gte,
    /// Less than.
    Lt,
    /// Less than or equal.
    Lte,
    /// Equal to one of a list.
    In,
    /// Equal to none of a list (also: the key is missing).
    Nin,
}

/// A compound's operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompoundOp {
    /// Every filter matches.
    And,
    /// At least one filter matches.
    Or,
}

/// The value of a comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum FilterValue {
    /// For `eq`, `ne`, `gt`, `gte`, `lt`, `lte`.
    Scalar(Scalar),
    /// For `in` and `nin`.
    List(Vec<Scalar>),
}

/// A string, number or boolean.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Scalar {
    /// A string (a time for `created_at`: RFC 3339).
    String(String),
    /// A number (a time for `created_at`: Unix seconds).
    Number(serde_json::Number),
    /// A boolean.
    Bool(bool),
}

/// Why a filter was refused: the part (`filters.filters[1].type`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct FilterError {
    /// Where, from `filters`.
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

impl FilterError {
    pub(super) fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

impl ComparisonOp {
    pub(super) const ALL: [(&'static str, Self); 8] = [
        ("eq", Self::Eq),
        ("ne", Self::Ne),
        ("gt", Self::Gt),
        ("gte", Self::Gte),
        ("lt", Self::Lt),
        ("lte", Self::Lte),
        ("in", Self::In),
        ("nin", Self::Nin),
    ];

    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, op)| *op == self)
            .map_or("eq", |(name, _)| name)
    }

    /// `in` and `nin`, which take a list.
    pub fn takes_list(self) -> bool {
        matches!(self, Self::In | Self::Nin)
    }

    /// `gt`, `gte`, `lt` and `lte`, which order values.
    pub fn is_range(self) -> bool {
        matches!(self, Self::Gt | Self::Gte | Self::Lt | Self::Lte)
    }
}

impl fmt::Display for ComparisonOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for Scalar {
    fn from(s: &str) -> Self {
        Self::String(s.to_owned())
    }
}

impl From<String> for Scalar {
    fn from(s: String) -> Self {
        Self::String(s)
    }
}

impl From<i64> for Scalar {
    fn from(n: i64) -> Self {
        Self::Number(n.into())
    }
}

impl From<bool> for Scalar {
    fn from(b: bool) -> Self {
        Self::Bool(b)
    }
}

impl<T: Into<Scalar>> From<T> for FilterValue {
    fn from(v: T) -> Self {
        Self::Scalar(v.into())
    }
}

impl<T: Into<Scalar>> From<Vec<T>> for FilterValue {
    fn from(v: Vec<T>) -> Self {
        Self::List(v.into_iter().map(Into::into).collect())
    }
}

impl Filter {
    /// `{"type": op, "key": key, "value": value}`.
    pub fn compare(op: ComparisonOp, key: &str, value: impl Into<FilterValue>) -> Self {
        Self::Comparison(ComparisonFilter {
            op,
            key: key.to_owned(),
            value: value.into(),
        })
    }

    /// `{"type": "and", "filters": filters}`.
    pub fn and(filters: Vec<Filter>) -> Self {
        Self::Compound(CompoundFilter {
            op: CompoundOp::And,
            filters,
        })
    }

    /// `{"type": "or", "filters": filters}`.
    pub fn or(filters: Vec<Filter>) -> Self {
        Self::Compound(CompoundFilter {
            op: CompoundOp::Or,
            filters,
        })
    }

    /// Reads and checks a filter given as JSON (the `filters` of a search); errors name the part from `filters`.
    pub fn parse(value: &Value) -> Result<Self, FilterError> {
        super::parse::filter(value)
    }

    /// Checks a filter built in code against the same rules as [`Filter::parse`].
    pub fn validate(&self) -> Result<(), FilterError> {
        let json =
            serde_json::to_value(self).map_err(|e| FilterError::new("filters", e.to_string()))?;
        Self::parse(&json).map(drop)
    }
}

impl<'de> Deserialize<'de> for Filter {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Filter::parse(&value).map_err(serde::de::Error::custom)
    }
}
