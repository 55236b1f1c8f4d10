//! The reference signing vectors, reproduced by the library and verified by
//! the same code the server runs.

use apex::auth::{SignedRequest, Verifier, sha256_hex, sign, string_to_sign};
use base64::Engine as _;
use serde_json::Value;

struct Vector {
    label: String,
    key: String,
    ts: String,
    method: String,
    target: String,
    nonce: String,
    body: Vec<u8>,
    body_sha256: String,
    string_to_sign: String,
    signature: String,
    /// False for a case whose signature must not verify.
    valid: bool,
}

fn load(file: &str) -> Vec<Vector> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    let field = |v: &Value, name: &str| {
        v[name]
            .as_str()
            .unwrap_or_else(|| panic!("{file}: missing {name}"))
            .to_string()
    };

    let vectors: Vec<Vector> = json["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let body = match v.get("body_base64") {
                Some(encoded) => base64::engine::general_purpose::STANDARD
                    .decode(encoded.as_str().unwrap())
                    .unwrap(),
                None => field(v, "body").into_bytes(),
            };
            Vector {
                label: format!("{file}[{index}] {}", field(v, "target")),
                key: field(v, "key"),
                ts: field(v, "ts"),
                method: field(v, "method"),
                target: field(v, "target"),
                nonce: field(v, "nonce"),
                body,
                body_sha256: field(v, "body_sha256"),
                string_to_sign: field(v, "string_to_sign"),
                signature: field(v, "signature"),
                valid: v.get("valid").and_then(Value::as_bool).unwrap_or(true),
            }
        })
        .collect();
    assert!(!vectors.is_empty(), "{file} has no vectors");
    vectors
}

/// Asserts the vector's body digest and string to sign, and returns the latter.
fn checked_string_to_sign(vector: &Vector) -> String {
    let label = &vector.label;
    assert_eq!(
        sha256_hex(&vector.body),
        vector.body_sha256,
        "{label}: body digest"
    );
    let text = string_to_sign(
        &vector.ts,
        &vector.method,
        &vector.target,
        &vector.nonce,
        &vector.body,
    );
    assert_eq!(text, vector.string_to_sign, "{label}: string to sign");
    text
}

/// Returns the vector as a request for the verifier.
fn signed_request(vector: &Vector) -> SignedRequest<'_> {
    SignedRequest {
        ts: &vector.ts,
        signature: &vector.signature,
        nonce: &vector.nonce,
        method: &vector.method,
        target: &vector.target,
        body: &vector.body,
        key_id: "default",
    }
}

fn check(vector: &Vector) {
    let label = &vector.label;
    let text = checked_string_to_sign(vector);
    assert_eq!(
        sign(vector.key.as_bytes(), &text),
        vector.signature,
        "{label}: signature"
    );

    let request = signed_request(vector);
    let now: u64 = vector.ts.parse().unwrap();
    let verifier = Verifier::new(vector.key.as_bytes().to_vec(), 0);
    assert_eq!(
        verifier.verify(&request, now).map(|_| ()),
        Ok(()),
        "{label}: verifies"
    );

    // The same request under another key must fail.
    let other = Verifier::new(b"a different key, thirty-two bytes+".to_vec(), 0);
    assert!(
        other.verify(&request, now).is_err(),
        "{label}: another key must not verify"
    );
}

#[test]
fn reference_vectors_verify() {
    let vectors = load("signing-vectors.json");
    assert_eq!(vectors.len(), 6, "every reference vector is checked");
    for vector in &vectors {
        check(vector);
    }
}

/// Checks that a failing case's request and string to sign are consistent,
/// and that its signature does not verify.
fn check_failing(vector: &Vector) {
    let label = &vector.label;
    let text = checked_string_to_sign(vector);
    assert_ne!(
        sign(vector.key.as_bytes(), &text),
        vector.signature,
        "{label}: must not match"
    );

    let request = signed_request(vector);
    let verifier = Verifier::new(vector.key.as_bytes().to_vec(), 0);
    assert!(
        verifier.verify(&request, vector.ts.parse().unwrap()).is_err(),
        "{label}: must be rejected"
    );
}

#[test]
fn failing_cases_rejected() {
    let vectors = load("extra-signing-vectors.json");
    let failing: Vec<&Vector> = vectors.iter().filter(|v| !v.valid).collect();
    assert!(failing.len() >= 5, "the failing cases are present");
    for vector in failing {
        check_failing(vector);
    }
}

#[test]
fn extra_vectors_verify() {
    let vectors: Vec<Vector> = load("extra-signing-vectors.json")
        .into_iter()
        .filter(|v| v.valid)
        .collect();
    let targets: Vec<&str> = vectors.iter().map(|v| v.target.as_str()).collect();
    assert!(targets.contains(&"/v1/plugins?"), "a bare `?` query is covered");
    assert!(
        targets.iter().any(|t| t.contains('%')),
        "a percent-encoded query is covered"
    );
    assert!(
        vectors.iter().any(|v| std::str::from_utf8(&v.body).is_err()),
        "a binary body is covered"
    );
    for vector in &vectors {
        check(vector);
    }
}
