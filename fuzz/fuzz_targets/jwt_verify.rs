//! Token verification on arbitrary strings, also as mutations of a valid token's three parts: a refusal or the
//! signed identity, never a panic.
#![no_main]

use std::{sync::LazyLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use upload_pipeline::auth::Auth;

static AUTH: LazyLock<Auth> = LazyLock::new(|| Auth::hs256("fuzzing-secret-of-32-characters!"));
static VALID: LazyLock<String> = LazyLock::new(|| {
    AUTH.issue(
        "6a2f41a3-c54c-4d5b-8f1e-3c2b1a0f9e8d".parse().unwrap(),
        Duration::from_secs(3600),
        true,
    )
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = AUTH.verify(text);
    // Splice the input into each part of a valid token.
    let parts: Vec<&str> = VALID.split('.').collect();
    for i in 0..3 {
        let mut p = parts.clone();
        p[i] = text;
        let token = p.join(".");
        if let Ok(id) = AUTH.verify(&token) {
            // Only an untouched signature can verify; then the claims are the signed ones.
            assert!(i == 2 && text == parts[2] || i != 2 && text == parts[i], "forged token accepted");
            assert!(id.admin);
        }
    }
});
