//! Reading a [`Filter`] from JSON with the checks of the SQL function `upload_pipeline.filter_validate`: its shape,
//! its limits, and each value against its operator and key. Errors name the part at fault from `filters`.

use serde_json::{Map, Value};

use chrono::Datelike;

use super::filter::{
    ComparisonFilter, ComparisonOp, CompoundFilter, CompoundOp, Filter, FilterError, FilterValue,
    MAX_DEPTH, MAX_FILTERS, MAX_KEY_CHARS, MAX_STRING_CHARS, MAX_TOTAL_VALUES, MAX_VALUES, Scalar,
};

/// The filter `value` holds (the `filters` of a search).
pub(super) fn filter(value: &Value) -> Result<Filter, FilterError> {
    parse_node(value, "filters", 1, &mut Size::default())
}

/// What a filter has used of its limits so far.
#[derive(Default)]
struct Size {
    /// Filters (comparisons and compounds), against [`MAX_FILTERS`].
    filters: usize,
    /// Values (a comparison's counts 1, a list its items), against [`MAX_TOTAL_VALUES`].
    values: usize,
}

/// The JSON type of `v`, as messages name it.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_node(
    value: &Value,
    path: &str,
    depth: usize,
    size: &mut Size,
) -> Result<Filter, FilterError> {
    size.filters += 1;
    if size.filters > MAX_FILTERS {
        return Err(FilterError::new(
            "filters",
            format!("at most {MAX_FILTERS} filters in all"),
        ));
    }
    if depth > MAX_DEPTH {
        return Err(FilterError::new(
            path,
            format!("filters nest at most {MAX_DEPTH} deep"),
        ));
    }
    let Value::Object(object) = value else {
        return Err(FilterError::new(
            path,
            format!("must be an object, not {}", kind(value)),
        ));
    };
    let Some(Value::String(op)) = object.get("type") else {
        return Err(FilterError::new(
            format!("{path}.type"),
            "missing, or not a string",
        ));
    };
    let compound = match op.as_str() {
        "and" => Some(CompoundOp::And),
        "or" => Some(CompoundOp::Or),
        _ => None,
    };
    if let Some(op) = compound {
        return parse_compound(object, op, path, depth, size);
    }
    let Some(&(_, op)) = ComparisonOp::ALL.iter().find(|(name, _)| name == op) else {
        return Err(FilterError::new(
            format!("{path}.type"),
            format!("unknown filter type '{op}' (eq, ne, gt, gte, lt, lte, in, nin, and, or)"),
        ));
    };
    let comparison = parse_comparison(object, op, path)?;
    size.values += match &comparison.value {
        FilterValue::Scalar(_) => 1,
        FilterValue::List(items) => items.len(),
    };
    if size.values > MAX_TOTAL_VALUES {
        return Err(FilterError::new(
            "filters",
            format!("at most {MAX_TOTAL_VALUES} values in all"),
        ));
    }
    Ok(Filter::Comparison(comparison))
}

/// The first field of `object` not in `known`.
fn unknown_field<'a>(
    object: &'a serde_json::Map<String, Value>,
    known: &[&str],
) -> Option<&'a str> {
    object
        .keys()
        .map(String::as_str)
        .find(|k| !known.contains(k))
}

fn parse_compound(
    object: &Map<String, Value>,
    op: CompoundOp,
    path: &str,
    depth: usize,
    size: &mut Size,
) -> Result<Filter, FilterError> {
    if let Some(field) = unknown_field(object, &["type", "filters"]) {
        return Err(FilterError::new(
            format!("{path}.{field}"),
            "unknown field of a compound filter (type, filters)",
        ));
    }
    let items = match object.get("filters") {
        // The compound counts itself in MAX_FILTERS, so it holds one fewer.
        Some(Value::Array(items)) if (1..MAX_FILTERS).contains(&items.len()) => items,
        _ => {
            return Err(FilterError::new(
                format!("{path}.filters"),
                format!("must be an array of 1 to {} filters", MAX_FILTERS - 1),
            ));
        }
    };
    let filters = items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_node(item, &format!("{path}.filters[{i}]"), depth + 1, size))
        .collect::<Result<_, _>>()?;
    Ok(Filter::Compound(CompoundFilter { op, filters }))
}

fn parse_comparison(
    object: &Map<String, Value>,
    op: ComparisonOp,
    path: &str,
) -> Result<ComparisonFilter, FilterError> {
    if let Some(field) = unknown_field(object, &["type", "key", "value"]) {
        return Err(FilterError::new(
            format!("{path}.{field}"),
            "unknown field of a comparison filter (type, key, value)",
        ));
    }
    let key = match object.get("key") {
        Some(Value::String(key)) if (1..=MAX_KEY_CHARS).contains(&key.chars().count()) => key,
        _ => {
            return Err(FilterError::new(
                format!("{path}.key"),
                format!("must be a string of 1 to {MAX_KEY_CHARS} characters"),
            ));
        }
    };
    // Postgres' jsonb cannot hold U+0000.
    if key.contains('\0') {
        return Err(FilterError::new(
            format!("{path}.key"),
            "must not contain NUL characters",
        ));
    }
    let value_path = format!("{path}.value");
    let value = match (object.get("value"), op.takes_list()) {
        (None, _) => return Err(FilterError::new(value_path, "missing")),
        (Some(Value::Array(items)), true) if (1..=MAX_VALUES).contains(&items.len()) => {
            let list = items
                .iter()
                .enumerate()
                .map(|(i, item)| scalar(item, op, key, &format!("{value_path}[{i}]")))
                .collect::<Result<_, _>>()?;
            FilterValue::List(list)
        }
        (Some(_), true) => {
            return Err(FilterError::new(
                value_path,
                format!("{op} takes an array of 1 to {MAX_VALUES} values"),
            ));
        }
        (Some(item), false) => FilterValue::Scalar(scalar(item, op, key, &value_path)?),
    };
    Ok(ComparisonFilter {
        op,
        key: key.clone(),
        value,
    })
}

/// Reads one value compared with `key` by `op`.
fn scalar(value: &Value, op: ComparisonOp, key: &str, path: &str) -> Result<Scalar, FilterError> {
    let fail = |reason: String| Err(FilterError::new(path, reason));
    let scalar = match value {
        Value::String(s) if s.chars().count() > MAX_STRING_CHARS => {
            return fail(format!(
                "strings are limited to {MAX_STRING_CHARS} characters"
            ));
        }
        Value::String(s) if s.contains('\0') => {
            return fail("strings must not contain NUL characters".into());
        }
        Value::String(s) => Scalar::String(s.clone()),
        Value::Number(n) => Scalar::Number(n.clone()),
        Value::Bool(_) if op.is_range() => {
            return fail(format!(
                "{op} compares numbers, strings or times, not booleans"
            ));
        }
        Value::Bool(b) => Scalar::Bool(*b),
        Value::Array(_) => {
            return fail(
                "must be a string, a number or a boolean (a list of values takes in or nin)".into(),
            );
        }
        other => {
            return fail(format!(
                "must be a string, a number or a boolean, not {}",
                kind(other)
            ));
        }
    };
    match (key, &scalar) {
        ("filename" | "content_type", Scalar::String(_)) => Ok(scalar),
        ("filename" | "content_type", _) => fail(format!("{key} is compared with strings")),
        ("document_id", _) if op.is_range() => fail("document_id takes eq, ne, in or nin".into()),
        ("document_id", Scalar::String(s)) if is_sql_uuid(s) => Ok(scalar),
        ("document_id", _) => fail("document_id is compared with UUID strings".into()),
        ("created_at", Scalar::Number(_)) => Ok(scalar),
        ("created_at", Scalar::String(s)) if is_sql_time(s) => Ok(scalar),
        ("created_at", _) => {
            fail("created_at is compared with an RFC 3339 time or Unix seconds".into())
        }
        _ => Ok(scalar),
    }
}

/// Whether `s` is a UUID in a form `filter_check_value` takes (`^[0-9a-f]{8}-?([0-9a-f]{4}-?){3}[0-9a-f]{12}$`, any
/// case): 32 hex digits, with a hyphen allowed after the 8th, 12th, 16th and 20th; not `{braced}`, not
/// `urn:uuid:`, which Rust's parser also reads.
fn is_sql_uuid(s: &str) -> bool {
    let mut digits = 0;
    let mut after_hyphen = false;
    for c in s.chars() {
        if c.is_ascii_hexdigit() {
            digits += 1;
            after_hyphen = false;
        } else if c == '-' && !after_hyphen && matches!(digits, 8 | 12 | 16 | 20) {
            after_hyphen = true;
        } else {
            return false;
        }
    }
    digits == 32
}

/// Whether `s` is an RFC 3339 time that `filter_check_value` takes and Postgres reads: its pattern
/// (`YYYY-MM-DD`, `T`, `t` or a space, `HH:MM:SS`, optional fraction, `Z` or `±HH:MM`, ASCII digits), a real date
/// and time, a year from 1 (Postgres has no year 0) and an offset within ±15:59 (Postgres' bound).
fn is_sql_time(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |from: usize, to: usize| {
        b.get(from..to)
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
    };
    let at = |i: usize, allowed: &[u8]| b.get(i).is_some_and(|c| allowed.contains(c));
    let date_time = digits(0, 4)
        && at(4, b"-")
        && digits(5, 7)
        && at(7, b"-")
        && digits(8, 10)
        && at(10, b"Tt ")
        && digits(11, 13)
        && at(13, b":")
        && digits(14, 16)
        && at(16, b":")
        && digits(17, 19);
    if !date_time {
        return false;
    }
    let mut zone = 19;
    if at(zone, b".") {
        let fraction = zone + 1;
        zone = fraction
            + b[fraction..]
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .count();
        if zone == fraction {
            return false;
        }
    }
    let zone_ok = (b.len() == zone + 1 && at(zone, b"Zz"))
        || (b.len() == zone + 6
            && at(zone, b"+-")
            && digits(zone + 1, zone + 3)
            && at(zone + 3, b":")
            && digits(zone + 4, zone + 6));
    // chrono is given the separator and the zone in upper case (the pattern above fixed where they are).
    let mut canonical = s.to_owned();
    canonical.replace_range(10..11, "T");
    if canonical.ends_with('z') {
        canonical.replace_range(zone.., "Z");
    }
    zone_ok
        && chrono::DateTime::parse_from_rfc3339(&canonical)
            .is_ok_and(|t| t.year() >= 1 && t.offset().local_minus_utc().abs() < 16 * 3600)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn refused(filter: Value) -> String {
        Filter::parse(&filter).unwrap_err().to_string()
    }

    #[test]
    fn every_operator_and_compound_reads_and_writes_back_the_same_json() {
        let filter = json!({"type": "and", "filters": [
            {"type": "eq", "key": "team", "value": "ops"},
            {"type": "ne", "key": "draft", "value": true},
            {"type": "gt", "key": "year", "value": 2020},
            {"type": "gte", "key": "score", "value": 0.5},
            {"type": "lt", "key": "created_at", "value": "2026-12-01T00:00:00Z"},
            {"type": "lte", "key": "created_at", "value": 1_800_000_000},
            {"type": "or", "filters": [
                {"type": "in", "key": "filename", "value": ["a.md", "b.md"]},
                {"type": "nin", "key": "document_id", "value": ["6f1c2a9e-0000-4000-8000-000000000001"]},
            ]},
        ]});
        let parsed = Filter::parse(&filter).unwrap();
        assert_eq!(serde_json::to_value(&parsed).unwrap(), filter);
        let Filter::Compound(all) = &parsed else {
            panic!("{parsed:?}")
        };
        assert_eq!(all.op, CompoundOp::And);
        assert_eq!(all.filters.len(), 7);
        assert_eq!(serde_json::from_value::<Filter>(filter).unwrap(), parsed);
    }

    #[test]
    fn filters_built_in_code_are_the_openai_shape() {
        let filter = Filter::or(vec![
            Filter::compare(ComparisonOp::Eq, "team", "ops"),
            Filter::compare(ComparisonOp::In, "year", vec![2024, 2025]),
        ]);
        filter.validate().unwrap();
        assert_eq!(
            serde_json::to_value(&filter).unwrap(),
            json!({"type": "or", "filters": [
                {"type": "eq", "key": "team", "value": "ops"},
                {"type": "in", "key": "year", "value": [2024, 2025]},
            ]})
        );
        let bad = Filter::compare(ComparisonOp::Gt, "document_id", "x");
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "filters.value: document_id takes eq, ne, in or nin"
        );
    }

    #[test]
    fn an_unknown_type_is_named_with_its_path() {
        let msg = refused(json!({"type": "and", "filters": [
            {"type": "eq", "key": "a", "value": 1},
            {"type": "like", "key": "a", "value": "x%"},
        ]}));
        assert_eq!(
            msg,
            "filters.filters[1].type: unknown filter type 'like' (eq, ne, gt, gte, lt, lte, in, nin, and, or)"
        );
        assert_eq!(
            refused(json!({"key": "a", "value": 1})),
            "filters.type: missing, or not a string"
        );
        assert_eq!(
            refused(json!("team = ops")),
            "filters: must be an object, not a string"
        );
    }

    #[test]
    fn keys_and_values_are_checked_against_the_operator() {
        assert_eq!(
            refused(json!({"type": "eq", "value": 1})),
            "filters.key: must be a string of 1 to 256 characters"
        );
        assert_eq!(
            refused(json!({"type": "eq", "key": ""})),
            "filters.key: must be a string of 1 to 256 characters"
        );
        assert_eq!(
            refused(json!({"type": "eq", "key": "a"})),
            "filters.value: missing"
        );
        assert_eq!(
            refused(json!({"type": "gt", "key": "a", "value": true})),
            "filters.value: gt compares numbers, strings or times, not booleans"
        );
        assert_eq!(
            refused(json!({"type": "eq", "key": "a", "value": [1]})),
            "filters.value: must be a string, a number or a boolean (a list of values takes in or nin)"
        );
        assert_eq!(
            refused(json!({"type": "in", "key": "a", "value": []})),
            "filters.value: in takes an array of 1 to 100 values"
        );
        assert_eq!(
            refused(json!({"type": "nin", "key": "a", "value": [1, null]})),
            "filters.value[1]: must be a string, a number or a boolean, not null"
        );
        assert_eq!(
            refused(json!({"type": "eq", "key": "a", "value": {"b": 1}})),
            "filters.value: must be a string, a number or a boolean, not an object"
        );
        assert_eq!(
            refused(json!({"type": "eq", "key": "a", "value": 1, "extra": 2})),
            "filters.extra: unknown field of a comparison filter (type, key, value)"
        );
        let long = "x".repeat(MAX_STRING_CHARS + 1);
        assert_eq!(
            refused(json!({"type": "eq", "key": "a", "value": long})),
            "filters.value: strings are limited to 1000 characters"
        );
    }

    #[test]
    fn the_documents_own_fields_take_values_of_their_type() {
        assert_eq!(
            refused(json!({"type": "eq", "key": "filename", "value": 3})),
            "filters.value: filename is compared with strings"
        );
        assert_eq!(
            refused(json!({"type": "in", "key": "content_type", "value": ["text/plain", false]})),
            "filters.value[1]: content_type is compared with strings"
        );
        assert_eq!(
            refused(json!({"type": "eq", "key": "document_id", "value": "not-a-uuid"})),
            "filters.value: document_id is compared with UUID strings"
        );
        assert_eq!(
            refused(json!({"type": "gte", "key": "created_at", "value": "yesterday"})),
            "filters.value: created_at is compared with an RFC 3339 time or Unix seconds"
        );
        assert_eq!(
            refused(json!({"type": "gte", "key": "created_at", "value": "2026-02-30T00:00:00Z"})),
            "filters.value: created_at is compared with an RFC 3339 time or Unix seconds"
        );
        let time =
            json!({"type": "gte", "key": "created_at", "value": "2026-01-31T10:00:00+01:00"});
        Filter::parse(&time).unwrap();
    }

    #[test]
    fn what_postgres_cannot_take_is_refused_here_naming_the_part() {
        assert_eq!(
            refused(json!({"type": "eq", "key": "te\u{0}am", "value": "ops"})),
            "filters.key: must not contain NUL characters"
        );
        assert_eq!(
            refused(json!({"type": "in", "key": "team", "value": ["ops", "o\u{0}ps"]})),
            "filters.value[1]: strings must not contain NUL characters"
        );
        let time = |value: &str| json!({"type": "gte", "key": "created_at", "value": value});
        for bad in [
            "0000-06-01T00:00:00Z",
            "2026-01-01T00:00:00+16:00",
            "2026-01-01T00:00:00-23:59",
            "2026-01-01T00:00:00+00:60",
            "2026-01-01T00:00:00.Z",
            "2026-01-01T00:00Z",
            "+2026-01-01T00:00:00Z",
            "2026-01-01T00:00:00Z ",
        ] {
            assert_eq!(
                refused(time(bad)),
                "filters.value: created_at is compared with an RFC 3339 time or Unix seconds",
                "{bad:?}"
            );
        }
        for good in [
            "0001-01-01T00:00:00Z",
            "2026-01-01T00:00:00+15:59",
            "2026-01-01t00:00:00-15:59",
            "2026-01-01 00:00:00.123456789z",
            "9999-12-31T23:59:59Z",
        ] {
            Filter::parse(&time(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        let id = |value: &str| json!({"type": "eq", "key": "document_id", "value": value});
        for bad in [
            "{6f1c2a9e-0000-4000-8000-000000000001}",
            "urn:uuid:6f1c2a9e-0000-4000-8000-000000000001",
            "6f1c2a9e--0000-4000-8000-000000000001",
            "-6f1c2a9e0000400080000000000000001",
            "6f1c2a9e0000400080000000000000001",
            "6f1c2a9e00004000800000000000000-",
        ] {
            assert_eq!(
                refused(id(bad)),
                "filters.value: document_id is compared with UUID strings",
                "{bad}"
            );
        }
        for good in [
            "6F1C2A9E-0000-4000-8000-000000000001",
            "6f1c2a9e000040008000000000000001",
            "6f1c2a9e-00004000-8000000000000001",
        ] {
            Filter::parse(&id(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
    }

    #[test]
    fn a_filter_holds_at_most_500_values_in_all() {
        let list =
            |n: usize| json!({"type": "in", "key": "team", "value": (0..n).collect::<Vec<_>>()});
        let five = json!({"type": "or", "filters": vec![list(100); 5]});
        Filter::parse(&five).unwrap();
        let more = json!({"type": "or", "filters": [list(100), list(100), list(100), list(100), list(100),
            {"type": "eq", "key": "team", "value": "ops"}]});
        assert_eq!(refused(more), "filters: at most 500 values in all");
        let eqs = json!({"type": "and", "filters": vec![json!({"type": "eq", "key": "a", "value": 1}); 99]});
        Filter::parse(&eqs).unwrap();
    }

    #[test]
    fn compounds_are_bounded_in_depth_and_size() {
        let mut deep = json!({"type": "eq", "key": "a", "value": 1});
        for _ in 0..MAX_DEPTH - 1 {
            deep = json!({"type": "and", "filters": [deep]});
        }
        Filter::parse(&deep).unwrap();
        let too_deep = json!({"type": "or", "filters": [deep]});
        assert_eq!(
            refused(too_deep),
            "filters.filters[0].filters[0].filters[0].filters[0].filters[0]: filters nest at most 5 deep"
        );
        assert_eq!(
            refused(json!({"type": "and", "filters": []})),
            "filters.filters: must be an array of 1 to 99 filters"
        );
        assert_eq!(
            refused(
                json!({"type": "or", "filters": [{"type": "eq", "key": "a", "value": 1}], "key": "a"})
            ),
            "filters.key: unknown field of a compound filter (type, filters)"
        );
        let leaf = json!({"type": "eq", "key": "a", "value": 1});
        let wide = |n: usize| json!({"type": "or", "filters": vec![leaf.clone(); n]});
        Filter::parse(&wide(99)).unwrap();
        let many = json!({"type": "and", "filters": [wide(60), wide(60)]});
        assert_eq!(refused(many), "filters: at most 100 filters in all");
    }
}
