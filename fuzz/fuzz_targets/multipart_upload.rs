//! The upload body as the API reads it: axum's multipart extractor over arbitrary bytes (boundary from the
//! first line), every field's name, file name and contents read, the file name sanitised and the metadata field
//! parsed as the handler does. Errors are fine; panics are not, and a sanitised name never holds a path
//! separator or a control character.
#![no_main]

use std::sync::LazyLock;

use axum::{
    body::Body,
    extract::{FromRequest, Multipart},
    http::Request,
};
use libfuzzer_sys::fuzz_target;

static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
});

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let boundary = String::from_utf8_lossy(&data[..split]).into_owned();
    let body = data.get(split + 1..).unwrap_or_default().to_vec();
    let Ok(req) = Request::builder()
        .method("POST")
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(Body::from(body))
    else {
        return;
    };
    RT.block_on(async move {
        let Ok(mut multipart) = Multipart::from_request(req, &()).await else {
            return;
        };
        while let Ok(Some(field)) = multipart.next_field().await {
            let name = field.name().map(str::to_owned);
            if let Some(file) = field.file_name() {
                let clean = upload_pipeline::api::sanitize_filename(file);
                assert!(!clean.is_empty() && !clean.contains('/') && !clean.contains('\\'));
                assert!(!clean.chars().any(char::is_control), "{clean:?}");
            }
            let Ok(bytes) = field.bytes().await else {
                return;
            };
            if name.as_deref() == Some("metadata") {
                let _ = serde_json::from_slice::<serde_json::Value>(&bytes);
            }
        }
    });
});
