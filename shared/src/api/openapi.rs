//! The OpenAPI 3.1 document of the API, generated from the handlers' annotations.

use utoipa::OpenApi;

use super::{
    admin::{
        self, BudgetEntry, DeadLetterAction, DeadLetterEntry, DeadLetterId, DeadLetterIds,
        Failures, Moved, PipelineStage, QueueState, Resumed,
    },
    documents::{self, DocumentPage, DocumentStatus, RetryResponse, UploadResponse},
    error::{ErrorBody, ErrorCode, ErrorDetail},
    ops::{self, Health, Readiness},
    search::{self, SearchRequest, SearchResponse},
    types::{Document, Hit, StageStatus},
    upload::{Metadata, MetadataValue},
};
use crate::{
    retry::{FailedDocument, FailureCount},
    search::{ComparisonFilter, CompoundFilter, Filter, SearchMode},
};

/// The OpenAPI 3.1 document of the API (served at `/openapi.json`, committed as `docs/openapi.json`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "upload-pipeline producer API",
        description = "Upload documents on behalf of users and search their chunks (hybrid: by meaning and by words). Every /v1 call needs \
                       `Authorization: Bearer <JWT>` (HS256, or RS256/ES256 with a JWKS file; `sub` = the user). Errors are \
                       `{\"error\": {\"code\", \"message\"}}` with the codes of `ErrorCode`."
    ),
    paths(
        documents::upload, documents::list, documents::status, documents::remove, documents::retry_document,
        search::search,
        admin::admin_queues, admin::admin_failures, admin::admin_dead_letters, admin::admin_dead_letter_action,
        admin::admin_quota, admin::admin_resume,
        ops::healthz, ops::readyz, ops::render_metrics,
    ),
    components(schemas(ErrorBody, ErrorDetail, ErrorCode, UploadResponse, Metadata, MetadataValue, Document, StageStatus, DocumentPage, DocumentStatus, RetryResponse, SearchRequest, SearchMode, Filter, ComparisonFilter, CompoundFilter, SearchResponse, Hit, Health, Readiness, QueueState, PipelineStage, Failures, FailureCount, FailedDocument, DeadLetterEntry, DeadLetterId, DeadLetterIds, DeadLetterAction, Moved, BudgetEntry, Resumed)),
    modifiers(&BearerAuth),
    tags(
        (name = "documents", description = "Upload, follow, list, retry and delete documents"),
        (name = "search", description = "Search the caller's ready documents: hybrid, vector or keyword, with filters and citations"),
        (name = "admin", description = "Operator endpoints: queues, failures, dead letters, quota (tokens with the admin claim)"),
        (name = "operations", description = "Health, readiness and metrics"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document as pretty JSON with a final newline (the form committed as `docs/openapi.json`).
pub fn openapi_json() -> String {
    let mut doc =
        serde_json::to_string_pretty(&ApiDoc::openapi()).expect("the OpenAPI document serialises");
    doc.push('\n');
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_openapi_document_matches_the_code() {
        let committed = include_str!("../../../docs/openapi.json");
        assert!(
            openapi_json() == committed,
            "docs/openapi.json is out of date: run `make openapi` and commit it"
        );
    }

    #[test]
    fn every_error_code_is_in_the_document() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let codes = doc["components"]["schemas"]["ErrorCode"]["enum"]
            .as_array()
            .unwrap()
            .len();
        assert_eq!(codes, 22);
    }
}
