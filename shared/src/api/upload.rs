//! Reading an upload request before anything is stored: the per-user rate limit, the `Idempotency-Key` header and
//! the multipart form (file, name, metadata), with the form's schema for the OpenAPI document.

use std::borrow::Cow;

use axum::{
    extract::{
        Multipart,
        multipart::{Field, MultipartError, MultipartRejection},
    },
    http::{HeaderMap, StatusCode},
};
use utoipa::{
    PartialSchema, ToSchema,
    openapi::{
        RefOr,
        schema::{AnyOfBuilder, ArrayBuilder, ObjectBuilder, Ref, Schema, SchemaType, Type},
    },
};
use uuid::Uuid;

use super::{
    ApiState,
    error::{ApiError, ErrorCode},
};

/// The multipart body of an upload.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct UploadForm {
    /// The document: .txt, .md, .html, .pdf or .docx (its name decides how it is read).
    #[schema(value_type = String, format = Binary, content_media_type = "application/octet-stream")]
    file: Vec<u8>,
    /// Free-form metadata, a JSON object (at most 64 KiB).
    #[schema(value_type = Metadata, required = false)]
    metadata: Option<String>,
}

/// Matches a string without a NUL character, which Postgres cannot store.
const NO_NUL: &str = r"^[^\u0000]*$";

/// The schema of the `metadata` part: a JSON object, sent as the part's text, whose keys and strings hold no NUL
/// character.
pub(super) struct Metadata;

impl PartialSchema for Metadata {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "A JSON object whose keys and strings hold no NUL character.",
            ))
            .property_names(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(NO_NUL)),
            ))
            .additional_properties(Some(Ref::from_schema_name(MetadataValue::name())))
            .into()
    }
}

impl ToSchema for Metadata {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Metadata")
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((MetadataValue::name().into(), MetadataValue::schema()));
    }
}

/// The schema of a value inside [`Metadata`]: any JSON value without a NUL character in its strings.
pub(super) struct MetadataValue;

impl PartialSchema for MetadataValue {
    fn schema() -> RefOr<Schema> {
        let scalar = SchemaType::from_iter([Type::Null, Type::Boolean, Type::Number]);
        AnyOfBuilder::new()
            .description(Some("Any JSON value whose strings hold no NUL character."))
            .item(ObjectBuilder::new().schema_type(scalar))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(NO_NUL)),
            )
            .item(ArrayBuilder::new().items(Ref::from_schema_name(Self::name())))
            .item(Ref::from_schema_name(Metadata::name()))
            .into()
    }
}

impl ToSchema for MetadataValue {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("MetadataValue")
    }
}

/// The parts of an upload's form that matter.
pub(super) struct Form {
    /// The file's sanitized name.
    pub filename: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// The `metadata` part, `{}` without one.
    pub metadata: serde_json::Value,
}

/// Takes one of the user's uploads from the fleet-wide budget, or answers 429 with `Retry-After`.
pub(super) async fn admit(state: &ApiState, user: Uuid) -> Result<(), ApiError> {
    let Err(wait) = state.uploads.take(user).await else {
        return Ok(());
    };
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    let message = format!(
        "more than {} uploads a minute; try again in {secs} s",
        state.pipeline.settings.api.uploads_per_minute
    );
    Err(ApiError::new(ErrorCode::RateLimited, message).with_retry_after(secs))
}

/// The `Idempotency-Key` header, when sent: 1 to 255 visible characters, trimmed.
pub(super) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                "Idempotency-Key must be 1 to 255 visible characters",
            )
        })?;
    Ok(Some(key.to_owned()))
}

/// A body that is not multipart at all.
pub(super) fn not_multipart(e: MultipartRejection) -> ApiError {
    ApiError::new(
        ErrorCode::InvalidRequest,
        format!(
            "send multipart/form-data with a `file` field: {}",
            e.body_text()
        ),
    )
}

/// Reads the whole form: the `file` part (at most `limit` bytes) and the optional `metadata` part; other parts are
/// read and dropped.
pub(super) async fn read_form(mut multipart: Multipart, limit: u64) -> Result<Form, ApiError> {
    let mut file = None;
    let mut metadata = serde_json::json!({});
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(e, limit))?
    {
        match field.name() {
            Some("file") => file = Some(read_file(field, limit).await?),
            Some("metadata") => metadata = read_metadata(field, limit).await?,
            _ => skip(field, limit).await?,
        }
    }
    let (filename, bytes) = file.ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            "the multipart body has no `file` field",
        )
    })?;
    Ok(Form {
        filename,
        bytes,
        metadata,
    })
}

async fn read_file(mut field: Field<'_>, limit: u64) -> Result<(String, Vec<u8>), ApiError> {
    let name = sanitize_filename(field.file_name().unwrap_or("upload"));
    let mut bytes = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, limit))? {
        if (bytes.len() + chunk.len()) as u64 > limit {
            return Err(too_large(limit));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok((name, bytes))
}

async fn read_metadata(mut field: Field<'_>, limit: u64) -> Result<serde_json::Value, ApiError> {
    let mut raw = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, limit))? {
        raw.extend_from_slice(&chunk);
        if raw.len() > 64 * 1024 {
            return Err(ApiError::new(
                ErrorCode::InvalidMetadata,
                "metadata is limited to 64 KiB",
            ));
        }
    }
    serde_json::from_slice::<serde_json::Value>(&raw)
        .ok()
        .filter(|v| v.is_object() && !v.to_string().contains("\\u0000"))
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidMetadata, "metadata must be a JSON object"))
}

async fn skip(mut field: Field<'_>, limit: u64) -> Result<(), ApiError> {
    while field
        .chunk()
        .await
        .map_err(|e| multipart_error(e, limit))?
        .is_some()
    {}
    Ok(())
}

/// The base name of an uploaded file, without directories or control characters, at most 255 bytes.
pub fn sanitize_filename(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let clean: String = base.chars().filter(|c| !c.is_control()).collect();
    let clean = clean.trim().trim_start_matches('.').to_owned();
    let mut out = String::new();
    for c in clean.chars() {
        if out.len() + c.len_utf8() > 255 {
            break;
        }
        out.push(c);
    }
    if out.is_empty() { "upload".into() } else { out }
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        ErrorCode::FileTooLarge,
        format!("uploads are limited to {limit} bytes"),
    )
}

fn multipart_error(e: MultipartError, limit: u64) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(limit)
    } else {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("unreadable multipart body: {}", e.body_text()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filenames_lose_paths_and_control_characters() {
        assert_eq!(sanitize_filename("../../etc/passwd"), "passwd");
        assert_eq!(sanitize_filename("C:\\docs\\report.pdf"), "report.pdf");
        assert_eq!(sanitize_filename("a\u{0}b\nc.txt"), "abc.txt");
        assert_eq!(sanitize_filename("..."), "upload");
        assert_eq!(sanitize_filename(&"é".repeat(300)).len(), 254);
    }
}
