//! The OpenAPI schemas of [`Filter`]: written out, because the filter is recursive (a compound holds filters) and
//! its JSON is checked by hand ([`Filter::parse`]) rather than derived.

use std::borrow::Cow;

use utoipa::{
    PartialSchema, ToSchema,
    openapi::{
        RefOr,
        schema::{
            AdditionalProperties, ArrayBuilder, ObjectBuilder, OneOfBuilder, Ref, Schema, Type,
        },
    },
};

use super::filter::{
    ComparisonFilter, CompoundFilter, Filter, MAX_FILTERS, MAX_KEY_CHARS, MAX_STRING_CHARS,
    MAX_VALUES,
};

impl PartialSchema for Filter {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .description(Some(
                "OpenAI's vector store filter: a comparison, or a compound of filters (at most 5 deep and 100 in \
                 all). The keys `filename`, `content_type`, `created_at` (RFC 3339 or Unix seconds) and \
                 `document_id` name the document's fields; any other key is a top-level key of its metadata.",
            ))
            .item(Ref::from_schema_name(ComparisonFilter::name()))
            .item(Ref::from_schema_name(CompoundFilter::name()))
            .into()
    }
}

impl ToSchema for Filter {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Filter")
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((ComparisonFilter::name().into(), ComparisonFilter::schema()));
        schemas.push((CompoundFilter::name().into(), CompoundFilter::schema()));
    }
}

/// Strings Postgres' jsonb can hold: no U+0000.
const NO_NUL: &str = r"^[^\u0000]*$";

/// A string value of a comparison.
fn string() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .max_length(Some(MAX_STRING_CHARS))
        .pattern(Some(NO_NUL))
}

/// A string, number or boolean.
fn scalar() -> OneOfBuilder {
    OneOfBuilder::new()
        .item(string())
        .item(ObjectBuilder::new().schema_type(Type::Number))
        .item(ObjectBuilder::new().schema_type(Type::Boolean))
}

/// One shape of comparison: the operators `ops`, whose value is `value`.
fn comparison(ops: &[&str], value: impl Into<RefOr<Schema>>, description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(description))
        .property(
            "type",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(ops.iter().copied())),
        )
        .required("type")
        .property(
            "key",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(MAX_KEY_CHARS))
                .pattern(Some(NO_NUL)),
        )
        .required("key")
        .property("value", value)
        .required("value")
        .additional_properties(Some(AdditionalProperties::FreeForm(false)))
}

impl PartialSchema for ComparisonFilter {
    fn schema() -> RefOr<Schema> {
        let list = ArrayBuilder::new()
            .items(scalar())
            .min_items(Some(1))
            .max_items(Some(MAX_VALUES));
        let ordered = OneOfBuilder::new()
            .item(string())
            .item(ObjectBuilder::new().schema_type(Type::Number));
        OneOfBuilder::new()
            .description(Some(
                "Compares a field of the document, or a key of its metadata, with a value. `ne` and `nin` also \
                 match documents without the key; a list in the metadata matches when one of its items does. \
                 `filename` and `content_type` take strings, `document_id` UUID strings (eq, ne, in, nin), \
                 `created_at` an RFC 3339 time or Unix seconds.",
            ))
            .item(comparison(
                &["eq", "ne"],
                scalar(),
                "Equal (`eq`) or not equal (`ne`) to a string, number or boolean.",
            ))
            .item(comparison(
                &["gt", "gte", "lt", "lte"],
                ordered,
                "Ordered comparison with a string or a number.",
            ))
            .item(comparison(
                &["in", "nin"],
                list,
                "Equal to one (`in`) or none (`nin`) of 1 to 100 values.",
            ))
            .into()
    }
}

impl ToSchema for ComparisonFilter {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ComparisonFilter")
    }
}

impl PartialSchema for CompoundFilter {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some("All (`and`) or any (`or`) of several filters."))
            .property(
                "type",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["and", "or"])),
            )
            .required("type")
            .property(
                "filters",
                ArrayBuilder::new()
                    .items(Ref::from_schema_name(Filter::name()))
                    .min_items(Some(1))
                    .max_items(Some(MAX_FILTERS - 1)),
            )
            .required("filters")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .into()
    }
}

impl ToSchema for CompoundFilter {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("CompoundFilter")
    }
}
