//! Hostile input: files and requests made to crash, hang or confuse the fleet. Each case has its documented
//! outcome (refused with a status and code, accepted and then failed with a reason, or accepted and made
//! searchable). Afterwards no refused upload left a row, no failed document left chunks, the worker is still
//! alive, and an ordinary document still goes through.

use std::{io::Write, time::Duration};

use reqwest::Method;
use serde_json::{Value, json};
use tests::TestApp;
use tests::{WorkerProcess, settings, unique_prefix, wait_for};
use uuid::Uuid;

/// What a case must end in.
#[derive(Debug, Clone)]
enum Outcome {
    /// The request is answered with this status and error code; nothing is stored.
    Refused(u16, &'static str),
    /// Accepted (202), then the document fails with a reason containing this text.
    Fails(&'static str),
    /// Accepted, becomes ready, and its chunks never contain this text.
    ReadyWithout(&'static str),
    /// Any answer below 500 with an error body (search and raw requests); nothing is stored.
    Answered(u16),
}

/// A request of a case.
enum Request {
    Upload {
        filename: String,
        bytes: Vec<u8>,
        metadata: Option<String>,
    },
    Raw {
        method: Method,
        path: String,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    },
}

struct Case {
    name: &'static str,
    request: Request,
    outcome: Outcome,
}

fn upload(filename: &str, bytes: Vec<u8>) -> Request {
    Request::Upload {
        filename: filename.to_owned(),
        bytes,
        metadata: None,
    }
}

fn upload_meta(filename: &str, bytes: &[u8], metadata: String) -> Request {
    Request::Upload {
        filename: filename.to_owned(),
        bytes: bytes.to_vec(),
        metadata: Some(metadata),
    }
}

fn search(body: Vec<u8>) -> Request {
    Request::Raw {
        method: Method::POST,
        path: "/v1/search".into(),
        headers: vec![("content-type", "application/json".into())],
        body,
    }
}

/// A DOCX whose `word/document.xml` inflates to `size` bytes of one repeated paragraph.
fn docx_with_body(size: usize) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut buf);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(size > u32::MAX as usize / 2);
    zip.start_file("[Content_Types].xml", opts).unwrap();
    zip.write_all(br#"<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"/>"#)
        .unwrap();
    zip.start_file("word/document.xml", opts).unwrap();
    let head = br#"<?xml version="1.0"?><w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body>"#;
    zip.write_all(head).unwrap();
    let para = b"<w:p><w:r><w:t>zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz</w:t></w:r></w:p>";
    let mut written = head.len();
    while written < size {
        zip.write_all(para).unwrap();
        written += para.len();
    }
    zip.write_all(b"</w:body></w:document>").unwrap();
    zip.finish().unwrap();
    buf.into_inner()
}

/// A PDF whose page tree refers to itself: /Kids of the root lists the root.
fn pdf_recursive_pages() -> Vec<u8> {
    pdf_from_objects(&[
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [2 0 R] /Count 1 >>",
    ])
}

/// A PDF with an object nested 100,000 arrays deep.
fn pdf_deep_nesting() -> Vec<u8> {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let obj = format!("<< /Type /Catalog /Pages 2 0 R /Deep {deep} >>");
    pdf_from_objects(&[&obj, "<< /Type /Pages /Kids [] /Count 0 >>"])
}

/// A PDF declaring a content stream of 2 GB with a few bytes behind it.
fn pdf_huge_stream_length() -> Vec<u8> {
    pdf_from_objects(&[
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /Contents 4 0 R /MediaBox [0 0 612 792] >>",
        "<< /Length 2147483647 >>\nstream\nBT /F1 12 Tf (hi) Tj ET\nendstream",
    ])
}

fn pdf_from_objects(objects: &[&str]) -> Vec<u8> {
    let mut out = b"%PDF-1.7\n".to_vec();
    let mut offsets = Vec::new();
    for (i, obj) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend(format!("{} 0 obj\n{obj}\nendobj\n", i + 1).as_bytes());
    }
    let xref = out.len();
    out.extend(format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes());
    for o in offsets {
        out.extend(format!("{o:010} 00000 n \n").as_bytes());
    }
    out.extend(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    out
}

fn cases() -> Vec<Case> {
    let nested_meta = format!("{}1{}", "{\"a\":".repeat(5_000), "}".repeat(5_000));
    let scripts = format!(
        "<html><head><script>{}</script><style>body {{ color: red }}</style></head><body>\
         <h1>Harbour lights</h1><p>The keeper trims the wick at dusk.</p>\
         <script>document.write('SCRIPTPAYLOAD')</script><noscript>NOSCRIPTPAYLOAD</noscript>\
         <iframe src=\"javascript:alert(1)\"></iframe><img src=x onerror=\"alert('ONERRORPAYLOAD')\"></body></html>",
        "var SCRIPTPAYLOAD = 1;".repeat(2_000)
    );
    let deep_html = format!("{}deep{}", "<div>".repeat(20_000), "</div>".repeat(20_000));
    let deep_md = (0..1_200)
        .map(|i| format!("{}- level {i}\n", "  ".repeat(i)))
        .collect::<String>();
    let one_line = "x".repeat(3 * 1024 * 1024);
    vec![
        Case {
            name: "zero-byte file",
            request: upload("empty.txt", vec![]),
            outcome: Outcome::Refused(400, "empty_file"),
        },
        Case {
            name: "binary data named .txt",
            request: upload("photo.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR".to_vec()),
            outcome: Outcome::Refused(422, "invalid_text"),
        },
        Case {
            name: "invalid UTF-8 text",
            request: upload("latin1.txt", b"na\xefve caf\xe9".to_vec()),
            outcome: Outcome::Refused(422, "invalid_text"),
        },
        Case {
            name: "NUL bytes in text",
            request: upload("nul.md", b"# Title\n\nbefore\x00after".to_vec()),
            outcome: Outcome::Refused(422, "invalid_text"),
        },
        Case {
            name: "executable",
            request: upload("setup.exe", b"MZ\x90\x00\x03\x00\x00\x00".to_vec()),
            outcome: Outcome::Refused(415, "unsupported_media_type"),
        },
        Case {
            name: "text without an extension",
            request: upload("README", b"plain words".to_vec()),
            outcome: Outcome::ReadyWithout("\u{0}"),
        },
        Case {
            name: "GIF named .pdf",
            request: upload("fake.pdf", b"GIF89a\x01\x00".to_vec()),
            outcome: Outcome::Refused(422, "invalid_document"),
        },
        Case {
            name: "text named .docx",
            request: upload("fake.docx", b"not a zip at all".to_vec()),
            outcome: Outcome::Refused(422, "invalid_document"),
        },
        Case {
            name: "zip bomb DOCX (200 MB body)",
            request: upload("bomb.docx", docx_with_body(200 * 1024 * 1024)),
            outcome: Outcome::Fails("decompresses"),
        },
        Case {
            name: "DOCX yielding more characters than allowed",
            request: upload("long.docx", docx_with_body(8 * 1024 * 1024)),
            outcome: Outcome::Fails("characters"),
        },
        Case {
            name: "PDF with a self-referencing page tree",
            request: upload("loop.pdf", pdf_recursive_pages()),
            outcome: Outcome::Fails("PDF"),
        },
        Case {
            name: "PDF nested 100,000 arrays deep",
            request: upload("deep.pdf", pdf_deep_nesting()),
            outcome: Outcome::Fails("PDF"),
        },
        Case {
            name: "PDF declaring a 2 GB stream",
            request: upload("huge-stream.pdf", pdf_huge_stream_length()),
            outcome: Outcome::Fails(""),
        },
        Case {
            name: "truncated PDF",
            request: upload("cut.pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog".to_vec()),
            outcome: Outcome::Fails("PDF"),
        },
        Case {
            name: "HTML full of scripts",
            request: upload("scripts.html", scripts.into_bytes()),
            outcome: Outcome::ReadyWithout("PAYLOAD"),
        },
        Case {
            name: "HTML nested 20,000 elements deep",
            request: upload("deep.html", deep_html.into_bytes()),
            outcome: Outcome::Fails("nests"),
        },
        Case {
            name: "Markdown list nested 1,200 levels",
            request: upload("deep.md", deep_md.into_bytes()),
            outcome: Outcome::ReadyWithout("\u{0}"),
        },
        Case {
            name: "3 MB single line without spaces",
            request: upload("line.txt", one_line.into_bytes()),
            outcome: Outcome::Fails("characters"),
        },
        Case {
            name: "path traversal in the filename",
            request: upload("../../../etc/passwd.txt", b"traversal attempt".to_vec()),
            outcome: Outcome::ReadyWithout("../"),
        },
        Case {
            name: "control characters in the filename",
            request: upload("a\u{7}b\u{1b}[31mc\u{7f}.txt", b"bell and escape".to_vec()),
            outcome: Outcome::Refused(400, "invalid_request"),
        },
        Case {
            name: "CR and LF in the filename (header injection)",
            request: upload("a\r\nContent-Type: text/html\r\n.txt", b"injected".to_vec()),
            outcome: Outcome::Refused(400, "invalid_request"),
        },
        Case {
            name: "SQL in the filename",
            request: upload(
                "x'); DROP TABLE upload_pipeline.documents;--.txt",
                b"bobby tables".to_vec(),
            ),
            outcome: Outcome::ReadyWithout("\u{0}"),
        },
        Case {
            name: "SQL in metadata",
            request: upload_meta(
                "meta.txt",
                b"metadata words",
                r#"{"note": "'; DELETE FROM upload_pipeline.documents; --"}"#.into(),
            ),
            outcome: Outcome::ReadyWithout("\u{0}"),
        },
        Case {
            name: "metadata nested 5,000 deep",
            request: upload_meta("nested.txt", b"nested metadata", nested_meta),
            outcome: Outcome::Refused(400, "invalid_metadata"),
        },
        Case {
            name: "metadata that is not an object",
            request: upload_meta("array.txt", b"array metadata", "[1, 2, 3]".into()),
            outcome: Outcome::Refused(400, "invalid_metadata"),
        },
        Case {
            name: "metadata with a NUL character",
            request: upload_meta(
                "nulmeta.txt",
                b"nul metadata",
                r#"{"k": "a\u0000b"}"#.into(),
            ),
            outcome: Outcome::Refused(400, "invalid_metadata"),
        },
        Case {
            name: "metadata that is not JSON",
            request: upload_meta("junk.txt", b"junk metadata", "{not json".into()),
            outcome: Outcome::Refused(400, "invalid_metadata"),
        },
        Case {
            name: "a 1 MB search query",
            request: search(
                json!({"query": "q".repeat(1024 * 1024)})
                    .to_string()
                    .into_bytes(),
            ),
            outcome: Outcome::Refused(422, "invalid_query"),
        },
        Case {
            name: "search body that is 100,000 nested arrays",
            request: search(format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes()),
            outcome: Outcome::Refused(422, "invalid_request"),
        },
        Case {
            name: "search body that is not JSON",
            request: search(b"{\"query\": \"tides\"".to_vec()),
            outcome: Outcome::Refused(400, "invalid_json"),
        },
        Case {
            name: "SQL in a search query",
            request: search(
                json!({"query": "'; DROP TABLE upload_pipeline.document_chunks; --"})
                    .to_string()
                    .into_bytes(),
            ),
            outcome: Outcome::Answered(200),
        },
        Case {
            name: "NUL in a search query",
            request: search(br#"{"query": "tide\u0000s"}"#.to_vec()),
            outcome: Outcome::Answered(200),
        },
        Case {
            name: "search body with an unknown field nested 100,000 deep",
            request: search(
                format!(
                    r#"{{"query": "tides", "extra": {}{}}}"#,
                    "[".repeat(100_000),
                    "]".repeat(100_000)
                )
                .into_bytes(),
            ),
            outcome: Outcome::Refused(422, "invalid_request"),
        },
        Case {
            name: "negative k",
            request: search(br#"{"query": "tides", "k": -1}"#.to_vec()),
            outcome: Outcome::Refused(422, "invalid_k"),
        },
        Case {
            name: "document id that is not a UUID",
            request: Request::Raw {
                method: Method::GET,
                path: "/v1/documents/..%2F..%2Fetc%2Fpasswd".into(),
                headers: vec![],
                body: vec![],
            },
            outcome: Outcome::Refused(404, "not_found"),
        },
        Case {
            name: "a 1 MB bearer token",
            request: Request::Raw {
                method: Method::GET,
                path: "/v1/documents".into(),
                headers: vec![(
                    "authorization",
                    format!("Bearer {}", "a".repeat(1024 * 1024)),
                )],
                body: vec![],
            },
            outcome: Outcome::Answered(431),
        },
    ]
}

async fn send(
    base: &str,
    token: &str,
    request: &Request,
    idempotency: Option<&str>,
) -> (u16, Value) {
    let http = reqwest::Client::new();
    let req = match request {
        Request::Upload {
            filename,
            bytes,
            metadata,
        } => {
            let mut form = reqwest::multipart::Form::new().part(
                "file",
                reqwest::multipart::Part::bytes(bytes.clone()).file_name(filename.clone()),
            );
            if let Some(m) = metadata {
                form = form.text("metadata", m.clone());
            }
            let mut r = http
                .post(format!("{base}/v1/documents"))
                .bearer_auth(token)
                .multipart(form);
            if let Some(k) = idempotency {
                r = r.header("idempotency-key", k);
            }
            r
        }
        Request::Raw {
            method,
            path,
            headers,
            body,
        } => {
            let mut r = http
                .request(method.clone(), format!("{base}{path}"))
                .body(body.clone());
            if !headers.iter().any(|(h, _)| *h == "authorization") {
                r = r.bearer_auth(token);
            }
            for (h, v) in headers {
                r = r.header(*h, v);
            }
            r
        }
    };
    let resp = req.send().await.expect("the API answers");
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_files_and_requests_end_as_documented_and_harm_nothing() {
    let mut s = settings(&unique_prefix("hostile"), &tests::redis_url());
    s.api.max_upload_bytes = 8 * 1024 * 1024;
    s.pipeline.max_chars = 2 * 1024 * 1024;
    // The 1,200-level list takes about 8 s to chunk in a debug build at a load of 4 on 2 cores, and went past
    // 20 s at a load of 10: the bound stops runaway work, not a busy machine.
    s.pipeline.parse_timeout = Duration::from_secs(45);
    let app = TestApp::spawn(s).await;
    let mut worker = WorkerProcess::start(&app.settings, "parse,chunk,embed");
    worker.wait_healthy().await;
    let user = Uuid::new_v4();
    let token = app.token(user);
    let cases = cases();
    assert!(cases.len() >= 30, "{} cases", cases.len());

    let mut accepted = Vec::new();
    let mut problems = Vec::new();
    for case in &cases {
        let (status, body) = send(&app.api.url, &token, &case.request, None).await;
        let short = body.to_string().chars().take(300).collect::<String>();
        match &case.outcome {
            Outcome::Refused(want, code) => {
                if status != *want || body["error"]["code"] != *code {
                    problems.push(format!(
                        "{}: want {want} {code}, got {status} {short}",
                        case.name
                    ));
                }
            }
            Outcome::Answered(want) => {
                if status != *want {
                    problems.push(format!("{}: want {want}, got {status} {short}", case.name));
                }
            }
            Outcome::Fails(_) | Outcome::ReadyWithout(_) => match body["document_id"].as_str() {
                Some(id) if status == 202 => accepted.push((case, id.parse::<Uuid>().unwrap())),
                _ => problems.push(format!("{}: want 202, got {status} {short}", case.name)),
            },
        }
    }

    // The same Idempotency-Key with a different body: 409, and the first upload stands.
    let key = Uuid::new_v4().to_string();
    let first = send(
        &app.api.url,
        &token,
        &upload("idem.txt", b"first body".to_vec()),
        Some(&key),
    )
    .await;
    assert_eq!(first.0, 202, "{}", first.1);
    let second = send(
        &app.api.url,
        &token,
        &upload("idem.txt", b"second body".to_vec()),
        Some(&key),
    )
    .await;
    assert_eq!(
        (second.0, second.1["error"]["code"].clone()),
        (409, json!("idempotency_conflict"))
    );

    // Every accepted case settles as documented, within the parse time bound.
    let client = app.client(user);
    for (case, id) in &accepted {
        let doc = wait_for(case.name, Duration::from_secs(120), || async {
            let d = client.status(*id).await.ok()?;
            (d.status == "ready" || d.status == "failed").then_some(d)
        })
        .await;
        let settled = match &case.outcome {
            Outcome::Fails(reason) => {
                doc.status == "failed" && doc.error.as_deref().unwrap_or_default().contains(reason)
            }
            _ => doc.status == "ready",
        };
        if !settled {
            problems.push(format!(
                "{}: want {:?}, got {} {:?}",
                case.name, case.outcome, doc.status, doc.error
            ));
            continue;
        }
        let chunks: Vec<String> = sqlx::query_scalar(
            "SELECT content FROM upload_pipeline.document_chunks WHERE document_id = $1",
        )
        .bind(id)
        .fetch_all(app.admin())
        .await
        .unwrap();
        match &case.outcome {
            Outcome::Fails(reason) => {
                assert_eq!(doc.status, "failed", "{}: {:?}", case.name, doc);
                let error = doc.error.clone().unwrap_or_default();
                assert!(error.contains(reason), "{}: {error}", case.name);
                assert!(
                    chunks.is_empty(),
                    "{}: a failed document kept chunks",
                    case.name
                );
            }
            Outcome::ReadyWithout(forbidden) => {
                assert_eq!(doc.status, "ready", "{}: {:?}", case.name, doc.error);
                assert!(!chunks.is_empty(), "{}: no chunks", case.name);
                assert!(
                    chunks.iter().all(|c| !c.contains(forbidden)),
                    "{}: a chunk holds {forbidden:?}",
                    case.name
                );
                assert!(
                    !doc.filename.contains('/') && !doc.filename.chars().any(char::is_control),
                    "{}: filename {:?}",
                    case.name,
                    doc.filename
                );
            }
            _ => unreachable!(),
        }
    }

    assert!(
        problems.is_empty(),
        "{} of {} cases ended otherwise than documented:\n{}",
        problems.len(),
        cases.len(),
        problems.join("\n")
    );

    // Nothing refused was stored; the tables survived the SQL; the worker lives; an ordinary document still works.
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM upload_pipeline.documents WHERE user_id = $1")
            .bind(user)
            .fetch_one(app.admin())
            .await
            .unwrap();
    assert_eq!(
        stored as usize,
        accepted.len() + 1,
        "refused uploads left rows"
    );
    assert!(worker.is_running(), "the worker died:\n{}", worker.logs());
    let ok = client
        .upload_bytes(
            "after.txt",
            b"After the storm the harbour is calm again.".to_vec(),
            None,
        )
        .await
        .unwrap()
        .document_id;
    tests::wait_ready(&client, &[ok], Duration::from_secs(60)).await;
    let hits = client
        .search("calm harbour after the storm", 3)
        .await
        .unwrap();
    assert!(hits.results.iter().any(|h| h.document_id == ok));
}

/// A DOCX of `paragraphs` ordinary paragraphs: small compressed, slow and large to parse.
fn docx_paragraphs(paragraphs: usize) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut buf);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    zip.start_file("word/document.xml", opts).unwrap();
    zip.write_all(br#"<?xml version="1.0"?><w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body>"#)
        .unwrap();
    for _ in 0..paragraphs {
        zip.write_all(b"<w:p><w:r><w:t>lorem ipsum dolor sit amet lorem ipsum dolor sit amet lorem ipsum</w:t></w:r></w:p>")
            .unwrap();
    }
    zip.write_all(b"</w:body></w:document>").unwrap();
    zip.finish().unwrap();
    buf.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parse_past_its_memory_or_time_bound_is_stopped_and_the_worker_goes_on() {
    // 40 MB of XML: about 7 s and more than 128 MiB to parse in a debug build. The small document of each round
    // takes about 1 s to chunk (mostly the tokenizer's start-up) and more than 2 s at a load of 10 on 2 cores, so
    // the time bound is 4 s.
    let heavy = docx_paragraphs(40 * 1024 * 1024 / 95);
    let mut s = settings(&unique_prefix("parse-bounds"), &tests::redis_url());
    s.pipeline.max_chars = 100_000_000;
    let app = TestApp::spawn(s).await;
    for (memory_mb, timeout, reason) in [
        (128, Duration::from_secs(120), "more than 128 MiB of memory"),
        (0, Duration::from_secs(4), "longer than 4 s"),
    ] {
        // A user per round: the same bytes again would be the first round's document.
        let client = app.client(Uuid::new_v4());
        let mut w = app.settings.clone();
        w.pipeline.parse_memory_mb = memory_mb;
        w.pipeline.parse_timeout = timeout;
        let mut worker = WorkerProcess::start(&w, "parse,chunk,embed");
        worker.wait_healthy().await;
        let id = client
            .upload_bytes(&format!("heavy-{memory_mb}.docx"), heavy.clone(), None)
            .await
            .unwrap()
            .document_id;
        let doc = wait_for(
            "the heavy document to fail",
            Duration::from_secs(120),
            || async {
                let d = client.status(id).await.ok()?;
                (d.status == "failed").then_some(d)
            },
        )
        .await;
        let error = doc.error.unwrap_or_default();
        assert!(error.contains(reason), "{error}");
        assert_eq!(doc.stages[0].attempts, 1, "a bound is not retried");
        // The helper is gone, the worker lives, and an ordinary document still goes through.
        let helpers = std::process::Command::new("pgrep")
            .args(["-P", &worker.pid().to_string()])
            .output()
            .unwrap();
        assert!(
            helpers.stdout.is_empty(),
            "helper processes left: {}",
            String::from_utf8_lossy(&helpers.stdout)
        );
        assert!(worker.is_running(), "{}", worker.logs());
        let ok = client
            .upload_bytes(
                &format!("small-{memory_mb}.docx"),
                docx_paragraphs(10),
                None,
            )
            .await
            .unwrap()
            .document_id;
        tests::wait_ready(&client, &[ok], Duration::from_secs(60)).await;
        drop(worker);
    }
}
