use base64::Engine;

use super::stream::DEFAULT_HOLDBACK;
use super::*;

const ALL: &[&str] = &[
    "credit_card",
    "us_ssn",
    "email",
    "phone",
    "iban",
    "jwt",
    "aws_access_key_id",
    "github_token",
    "slack_token",
    "bearer",
];

fn all() -> MaskSpec {
    MaskSpec::from_names(ALL).unwrap()
}

fn mask(spec: &MaskSpec, s: &str) -> (String, Counts) {
    let mut c = Counts::default();
    let out = spec.mask_text(s.as_bytes(), &mut c);
    (String::from_utf8(out).unwrap(), c)
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

fn jwt() -> String {
    format!(
        "{}.{}.{}",
        b64(r#"{"alg":"HS256","typ":"JWT"}"#),
        b64(r#"{"sub":"1234567890","name":"John Doe","iat":1516239022}"#),
        "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
    )
}

/// Appends the Luhn check digit to `prefix`.
fn with_check_digit(prefix: &str) -> String {
    (0..10u8)
        .map(|d| format!("{prefix}{d}"))
        .find(|s| detectors::luhn(s.as_bytes()))
        .unwrap()
}

/// Each detector on its own: (detector, text, masked value expected or not).
fn table() -> Vec<(&'static str, String, bool)> {
    let gh = format!("ghp_{}", "a1B2c3D4e5".repeat(4).get(..36).unwrap());
    let pat = format!("github_pat_{}", "A1_b".repeat(21).get(..82).unwrap());
    let not_json = b64("{\"unterminated");
    vec![
        // credit_card
        ("credit_card", "card 4111111111111111 ok".into(), true),
        ("credit_card", "card 4111 1111 1111 1111 ok".into(), true),
        ("credit_card", "card 4111-1111-1111-1111 ok".into(), true),
        ("credit_card", "amex 378282246310005.".into(), true),
        ("credit_card", "mc 5555555555554444".into(), true),
        ("credit_card", "disc 6011111111111117,".into(), true),
        ("credit_card", "luhn fails 4111111111111112".into(), false),
        (
            "credit_card",
            "mixed seps 4111 1111-1111 1111".into(),
            false,
        ),
        (
            "credit_card",
            "double sep 4111  1111 1111 1111".into(),
            false,
        ),
        ("credit_card", "order ORD-2024-000123456".into(), false),
        ("credit_card", "order id 10000000000000017".into(), false),
        (
            "credit_card",
            format!("epoch ms {}", with_check_digit("170000000000")),
            false,
        ),
        ("credit_card", "at 2024-01-15T10:30:00.123Z".into(), false),
        (
            "credit_card",
            "price 1234.56 and 4111111111111111.50".into(),
            false,
        ),
        ("credit_card", "version 1.4111111111111111".into(), false),
        ("credit_card", "too short 411111111111".into(), false),
        ("credit_card", "in word x4111111111111111".into(), false),
        // us_ssn
        ("us_ssn", "ssn 123-45-6789".into(), true),
        ("us_ssn", "ssn:078-05-1120;".into(), true),
        ("us_ssn", "area 000-12-3456".into(), false),
        ("us_ssn", "area 666-12-3456".into(), false),
        ("us_ssn", "area 900-12-3456".into(), false),
        ("us_ssn", "area 999-12-3456".into(), false),
        ("us_ssn", "group 123-00-4567".into(), false),
        ("us_ssn", "serial 123-45-0000".into(), false),
        ("us_ssn", "date 2024-01-15".into(), false),
        (
            "us_ssn",
            "longer 1123-45-6789 and 123-45-67890".into(),
            false,
        ),
        ("us_ssn", "part 123-45-6789-1".into(), false),
        // email
        ("email", "mail jane.doe+x@example.co.uk now".into(), true),
        ("email", "<a href=\"mailto:a@b.io\">".into(), true),
        ("email", "no tld user@localhost".into(), false),
        ("email", "handle @jane and a@b".into(), false),
        ("email", "version pkg@1.2.3".into(), false),
        // phone
        ("phone", "call +14155552671 now".into(), true),
        ("phone", "call +442071838750".into(), true),
        ("phone", "call (555) 123-4567".into(), true),
        ("phone", "call 555-123-4567.".into(), true),
        ("phone", "short +1234567".into(), false),
        ("phone", "date 2024-01-15".into(), false),
        ("phone", "iso 2024-01-15T10:30:00Z".into(), false),
        ("phone", "id 123-456-7890".into(), false),
        ("phone", "range 555-123-4567-89".into(), false),
        ("phone", "math 3+14155552671".into(), false),
        ("phone", "order 20240115-123-4567".into(), false),
        // iban
        ("iban", "iban GB82WEST12345698765432 ok".into(), true),
        ("iban", "iban DE89370400440532013000".into(), true),
        ("iban", "iban GB82 WEST 1234 5698 7654 32".into(), true),
        ("iban", "bad DE89370400440532013001".into(), false),
        ("iban", "sku AB12CDEF34567890".into(), false),
        ("iban", "lower gb82west12345698765432".into(), false),
        // jwt
        ("jwt", format!("token {} end", jwt()), true),
        (
            "jwt",
            format!("unsigned {}.", jwt().rsplit_once('.').unwrap().0),
            true,
        ),
        ("jwt", format!("not json {not_json}.{not_json}.abc"), false),
        ("jwt", "random eyJhbGciOi.eyJzdWIiOi.abc".into(), false),
        (
            "jwt",
            "base64 QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo.YWJj.ZGVm".into(),
            false,
        ),
        // aws
        (
            "aws_access_key_id",
            "key AKIAIOSFODNN7EXAMPLE ok".into(),
            true,
        ),
        ("aws_access_key_id", "key ASIAY34FZKBOKMUTVV7A".into(), true),
        (
            "aws_access_key_id",
            "short AKIAIOSFODNN7EXAMPL".into(),
            false,
        ),
        (
            "aws_access_key_id",
            "long AKIAIOSFODNN7EXAMPLEX".into(),
            false,
        ),
        (
            "aws_access_key_id",
            "lower AKIAiosfodnn7example".into(),
            false,
        ),
        // github
        ("github_token", format!("tok {gh} ok"), true),
        (
            "github_token",
            format!("tok {}", gh.replace("ghp_", "ghs_")),
            true,
        ),
        ("github_token", format!("tok {pat}"), true),
        ("github_token", format!("short {}", &gh[..39]), false),
        ("github_token", format!("long {gh}x"), false),
        (
            "github_token",
            format!("prefix {}", gh.replace("ghp_", "ghx_")),
            false,
        ),
        // slack
        (
            "slack_token",
            "t xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx".into(),
            true,
        ),
        ("slack_token", "t xoxp-1234-5678-abcd".into(), true),
        ("slack_token", "t xoxz-1234-5678-abcd".into(), false),
        ("slack_token", "t xoxb-".into(), false),
        // bearer
        (
            "bearer",
            "Authorization: Bearer abc123DEF456ghi789".into(),
            true,
        ),
        (
            "bearer",
            "authorization: bearer 0123456789abcdef==".into(),
            true,
        ),
        (
            "bearer",
            "Bearer authentication is described here".into(),
            false,
        ),
        ("bearer", "Bearer short1".into(), false),
    ]
}

#[test]
fn detector_table() {
    let mut failures = Vec::new();
    for (name, text, positive) in table() {
        let spec = MaskSpec::from_names(&[name]).unwrap();
        let (out, counts) = mask(&spec, &text);
        let hit = counts.get(name) > 0;
        let marked = out.contains(&format!("[MASKED:{name}"));
        if hit != positive || marked != positive {
            failures.push(format!(
                "{name}: {text:?} -> {out:?} (expected masked={positive})"
            ));
        }
        // With every detector on, negatives of this detector may only be
        // touched by another detector, never left half-masked.
        let (_, all_counts) = mask(&all(), &text);
        if positive && all_counts.total() == 0 {
            failures.push(format!("all detectors missed {text:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn look_alikes_untouched_by_all_detectors() {
    let text = "order ORD-2024-000123456 id 10000000000000017 at 2024-01-15T10:30:00.123Z \
                price 1234.56 total 99999.99 epoch 1705312200 ms 1705312200123 \
                date 2024-01-15 uuid 123e4567-e89b-12d3-a456-426614174000 \
                sha 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 \
                ver 1.2.3 ip 192.168.100.200 AKIAIOSFODNN7EXAMPL";
    let (out, counts) = mask(&all(), text);
    assert_eq!(counts.total(), 0, "{out}");
    assert_eq!(out, text);
}

#[test]
fn replacement_formats() {
    let (out, counts) = mask(
        &all(),
        "pay 4111 1111 1111 1234x 4111111111111111 to a@b.io",
    );
    assert_eq!(
        out,
        "pay 4111 1111 1111 1234x [MASKED:credit_card:****1111] to [MASKED:email]"
    );
    assert_eq!(counts.get("credit_card"), 1);
    assert_eq!(counts.get("email"), 1);
    assert_eq!(counts.total(), 2);
    assert_eq!(
        counts.by_name().keys().collect::<Vec<_>>(),
        ["credit_card", "email"]
    );
    assert!(!all().is_empty());
    assert!(MaskSpec::from_entries(&[]).unwrap().is_empty());
    // Bearer masks the value only; a JWT after Bearer is named jwt.
    let (out, _) = mask(&all(), "Authorization: Bearer abc123DEF456ghi789\n");
    assert_eq!(out, "Authorization: Bearer [MASKED:bearer]\n");
    let (out, c) = mask(&all(), &format!("Authorization: Bearer {}", jwt()));
    assert_eq!(out, "Authorization: Bearer [MASKED:jwt]");
    assert_eq!(c.total(), 1);
}

#[test]
fn spec_errors_are_clear() {
    let e = MaskSpec::from_names(&["credit_card", "passport"]).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("\"passport\"") && msg.contains("us_ssn"),
        "{msg}"
    );

    let e = MaskSpec::from_entries(&[MaskEntry::Regex(RegexEntry {
        regex: "(unclosed".into(),
        name: Some("x".into()),
    })])
    .unwrap_err();
    assert!(matches!(e, MaskSpecError::InvalidRegex { .. }));
    assert!(e.to_string().contains("(unclosed"), "{e}");

    let e = MaskSpec::from_entries(&[MaskEntry::Regex(RegexEntry {
        regex: "a*".into(),
        name: None,
    })])
    .unwrap_err();
    assert!(e.to_string().contains("empty string"), "{e}");

    let e = MaskSpec::from_entries(&[MaskEntry::Regex(RegexEntry {
        regex: "x+".into(),
        name: Some("Bad Name".into()),
    })])
    .unwrap_err();
    assert!(matches!(e, MaskSpecError::InvalidName { .. }));

    for bad in ["customer.tax_id", "$.", "$.a[", "$.a[x]", "$..a", "$a"] {
        let e =
            MaskSpec::from_entries(&[MaskEntry::Json(JsonEntry { json: bad.into() })]).unwrap_err();
        assert!(matches!(e, MaskSpecError::InvalidJsonPath { .. }), "{bad}");
        assert!(e.to_string().contains("supported"), "{e}");
    }
    assert!(JsonPath::parse("$.items[*].ssn").is_ok());
    assert!(JsonPath::parse("$['odd key'][0]").is_ok());
    assert!(JsonPath::parse("$").is_ok());
}

#[test]
fn spec_from_toml_entries() {
    #[derive(Deserialize)]
    struct Rule {
        mask: Vec<MaskEntry>,
    }
    let r: Rule = toml::from_str(
        r#"mask = ["credit_card", "us_ssn", "email", { json = "$.customer.tax_id" }, { regex = "EMP-[0-9]{6}", name = "employee_id" }]"#,
    )
    .unwrap();
    let spec = MaskSpec::from_entries(&r.mask).unwrap();
    let (out, c) = mask(&spec, "emp EMP-123456 ssn 123-45-6789");
    assert_eq!(out, "emp [MASKED:employee_id] ssn [MASKED:us_ssn]");
    assert_eq!(c.get("employee_id"), 1);
    assert!(toml::from_str::<Rule>(r#"mask = [{ jsn = "$.a" }]"#).is_err());
}

fn sample_text() -> String {
    let mut s = String::new();
    for (_, text, _) in table() {
        s.push_str(&text);
        s.push('\n');
    }
    s.push_str("unicode: café ☕ 4111111111111111 — jane@example.com ✓\n");
    s
}

fn run_chunks(
    spec: &MaskSpec,
    holdback: usize,
    input: &[u8],
    splits: &[usize],
) -> (Vec<u8>, Counts) {
    let mut m = StreamMasker::with_holdback(spec, holdback);
    let mut out = Vec::new();
    let mut prev = 0;
    for &at in splits.iter().chain(std::iter::once(&input.len())) {
        out.extend(m.push(&input[prev..at]));
        prev = at;
    }
    out.extend(m.finish());
    (out, m.counts().clone())
}

#[test]
fn every_split_point_gives_same_output() {
    let spec = all();
    let input = sample_text();
    let input = input.as_bytes();
    for holdback in [DEFAULT_HOLDBACK, 256] {
        let (whole, whole_counts) = run_chunks(&spec, holdback, input, &[]);
        assert!(whole_counts.total() >= 25, "{whole_counts:?}");
        for at in 1..input.len() {
            let (out, counts) = run_chunks(&spec, holdback, input, &[at]);
            assert_eq!(out, whole, "split at {at}, holdback {holdback}");
            assert_eq!(counts, whole_counts, "split at {at}");
        }
        let ones: Vec<usize> = (1..input.len()).collect();
        let (out, counts) = run_chunks(&spec, holdback, input, &ones);
        assert_eq!(out, whole, "1-byte chunks, holdback {holdback}");
        assert_eq!(counts, whole_counts);
        for step in [7, 63, 100, 1000] {
            let splits: Vec<usize> = (step..input.len()).step_by(step).collect();
            assert_eq!(
                run_chunks(&spec, holdback, input, &splits).0,
                whole,
                "step {step}"
            );
        }
    }
    // The stream result equals the structured text result used elsewhere.
    let (body, _) = mask_body(&spec, Some("text/plain"), input);
    assert_eq!(body, run_chunks(&spec, DEFAULT_HOLDBACK, input, &[]).0);
}

#[test]
fn long_input_matches_split_across_many_cuts() {
    // Many matches, well past the holdback, so cuts land everywhere.
    let spec = all();
    let mut input = String::new();
    for i in 0..400 {
        input.push_str(&format!(
            "row {i} card 4111 1111 1111 1111 mail u{i}@ex.com jwt {} ",
            jwt()
        ));
        input.push_str(&"x".repeat(i % 37));
        input.push('\n');
    }
    let input = input.as_bytes();
    let (whole, counts) = run_chunks(&spec, DEFAULT_HOLDBACK, input, &[]);
    assert_eq!(counts.get("credit_card"), 400);
    assert_eq!(counts.get("email"), 400);
    assert_eq!(counts.get("jwt"), 400);
    for step in [1, 2, 3, 17, 64, 999, 4095, 4096, 4097, 10_000] {
        let splits: Vec<usize> = (step..input.len()).step_by(step).collect();
        let (out, c) = run_chunks(&spec, DEFAULT_HOLDBACK, input, &splits);
        assert!(out == whole, "step {step}");
        assert_eq!(c, counts, "step {step}");
    }
}

#[test]
fn memory_stays_bounded() {
    let spec = all();
    let chunk_size = 64 * 1024;
    let mut line = String::new();
    while line.len() < chunk_size {
        line.push_str(
            "id 10000000000000017 mail jane@example.com card 4111111111111111 lorem ipsum dolor\n",
        );
    }
    let chunk = line.as_bytes()[..chunk_size].to_vec();
    let mut m = StreamMasker::new(&spec);
    let total = 50 * 1024 * 1024;
    let mut fed = 0;
    let mut emitted = 0;
    while fed < total {
        emitted += m.push(&chunk).len();
        fed += chunk.len();
        assert!(
            m.buffered() <= m.holdback() + chunk_size,
            "buffered {}",
            m.buffered()
        );
        assert!(m.buffered() <= m.holdback() + m.holdback() / 4);
    }
    emitted += m.finish().len();
    assert_eq!(m.buffered(), 0);
    assert!(emitted > 0);
    assert!(m.masked_count() > 1_000_000);
}

#[test]
fn json_masks_values_keeps_everything_else() {
    let entries = vec![
        MaskEntry::Detector("credit_card".into()),
        MaskEntry::Detector("us_ssn".into()),
        MaskEntry::Detector("email".into()),
        MaskEntry::Detector("phone".into()),
        MaskEntry::Json(JsonEntry {
            json: "$.customer.tax_id".into(),
        }),
        MaskEntry::Json(JsonEntry {
            json: "$.items[*].ssn".into(),
        }),
        MaskEntry::Json(JsonEntry {
            json: "$.items[1].note".into(),
        }),
    ];
    let spec = MaskSpec::from_entries(&entries).unwrap();
    let body = r#"{ "order_id": "ORD-2024-000123456", "id": 10000000000000017,
  "created_at": "2024-01-15T10:30:00.123Z", "price": 1234.56, "big": 1.0e+400,
  "customer": {"email": "jane@example.com", "tax_id": 123456789, "card": "4111 1111 1111 1111"},
  "items": [ {"ssn": "078-05-1120", "note": "x"}, {"ssn": 5, "note": "y\u00e9\n", "ok": true, "n": null} ],
  "4111111111111111": "key is not masked", "text": "call (555) 123-4567 or mail a@b.io"
}"#;
    let (out, counts) = mask_body(
        &spec,
        Some("application/json; charset=utf-8"),
        body.as_bytes(),
    );
    let out = String::from_utf8(out).unwrap();
    let expected = r#"{ "order_id": "ORD-2024-000123456", "id": 10000000000000017,
  "created_at": "2024-01-15T10:30:00.123Z", "price": 1234.56, "big": 1.0e+400,
  "customer": {"email": "[MASKED:email]", "tax_id": "[MASKED:json_field]", "card": "[MASKED:credit_card:****1111]"},
  "items": [ {"ssn": "[MASKED:json_field]", "note": "x"}, {"ssn": "[MASKED:json_field]", "note": "[MASKED:json_field]", "ok": true, "n": null} ],
  "4111111111111111": "key is not masked", "text": "call [MASKED:phone] or mail [MASKED:email]"
}"#;
    assert_eq!(out, expected);
    assert_eq!(counts.get(JSON_FIELD), 4);
    assert_eq!(counts.get("email"), 2);
    assert_eq!(counts.get("credit_card"), 1);
    assert_eq!(counts.get("phone"), 1);
    assert_eq!(counts.total(), 8);
}

#[test]
fn json_pushed_in_chunks_and_fallbacks() {
    let spec = MaskSpec::from_entries(&[
        MaskEntry::Detector("credit_card".into()),
        MaskEntry::Json(JsonEntry { json: "$.a".into() }),
    ])
    .unwrap();
    let body = br#"{"a": 42, "b": "4111111111111111"}"#;
    let mut m = BodyMasker::new(&spec, Some("application/json"));
    let mut out = Vec::new();
    for c in body.chunks(3) {
        out.extend(m.push(c));
    }
    out.extend(m.finish());
    assert_eq!(
        out,
        br#"{"a": "[MASKED:json_field]", "b": "[MASKED:credit_card:****1111]"}"#
    );
    assert_eq!(m.masked_count(), 2);

    // Invalid JSON: text scanning, selectors cannot apply.
    let (out, c) = mask_body(
        &spec,
        Some("application/json"),
        br#"{"a": 42, "b": "4111111111111111""#,
    );
    assert_eq!(out, br#"{"a": 42, "b": "[MASKED:credit_card:****1111]""#);
    assert_eq!(c.total(), 1);

    // Over the cap: streamed as text.
    let mut m = BodyMasker::with_cap(&spec, Some("application/json"), 10);
    let mut out = m.push(&body[..8]);
    out.extend(m.push(&body[8..]));
    out.extend(m.finish());
    assert_eq!(out, br#"{"a": 42, "b": "[MASKED:credit_card:****1111]"}"#);
    assert_eq!(m.masked_count(), 1);

    // Deep nesting does not overflow the stack; it falls back to text.
    let deep = format!(
        "{}4111111111111111{}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let (out, c) = mask_body(&spec, Some("application/json"), deep.as_bytes());
    assert_eq!(c.total(), 1);
    assert_eq!(
        out.len(),
        deep.len() - 16 + "[MASKED:credit_card:****1111]".len()
    );
}

#[test]
fn form_and_html_and_opaque() {
    let spec = all();
    let (out, c) = mask_body(
        &spec,
        Some("application/x-www-form-urlencoded"),
        b"name=Jane+Doe&email=jane%40example.com&card=4111+1111+1111+1111&empty=&flag&note=hi%21",
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "name=Jane+Doe&email=%5BMASKED%3Aemail%5D&card=%5BMASKED%3Acredit_card%3A****1111%5D&empty=&flag&note=hi%21"
    );
    assert_eq!(c.total(), 2);

    let html =
        "<p>Contact <a href=\"mailto:jane@example.com\">jane@example.com</a>, SSN 123-45-6789</p>";
    let (out, c) = mask_body(&spec, Some("text/html; charset=utf-8"), html.as_bytes());
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "<p>Contact <a href=\"mailto:[MASKED:email]\">[MASKED:email]</a>, SSN [MASKED:us_ssn]</p>"
    );
    assert_eq!(c.total(), 3);

    let png = b"\x89PNG 4111111111111111";
    assert_eq!(mask_body(&spec, Some("image/png"), png).0, png);
    assert_eq!(
        BodyKind::from_content_type(Some("application/problem+json")),
        BodyKind::Json
    );
    assert_eq!(BodyKind::from_content_type(None), BodyKind::Text);
}

#[test]
fn invalid_utf8_passes_through() {
    let spec = all();
    let mut input = b"\xff\xfe card 4111111111111111 \xc3\x28 mail a@b.io\x80".to_vec();
    input.extend_from_slice(b" tail \xe2\x82");
    let (out, c) = run_chunks(&spec, DEFAULT_HOLDBACK, &input, &[]);
    let mut expected =
        b"\xff\xfe card [MASKED:credit_card:****1111] \xc3\x28 mail [MASKED:email]\x80".to_vec();
    expected.extend_from_slice(b" tail \xe2\x82");
    assert_eq!(out, expected);
    assert_eq!(c.total(), 2);
    for at in 1..input.len() {
        assert_eq!(run_chunks(&spec, 64, &input, &[at]).0, expected);
    }
}

#[test]
fn garbage_never_panics() {
    // xorshift with a fixed seed: random bytes, random chunking, biased
    // toward digits, separators and token prefixes.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let alphabet = b"0123456789 -.@+()_eyJAKIAghp_xox-Bearer {}[]\":,\\\xff\xc3\xe2\n";
    let mut spec_entries: Vec<MaskEntry> = ALL
        .iter()
        .map(|n| MaskEntry::Detector(n.to_string()))
        .collect();
    spec_entries.push(MaskEntry::Json(JsonEntry {
        json: "$[*].a".into(),
    }));
    spec_entries.push(MaskEntry::Regex(RegexEntry {
        regex: "[0-9]{3}x".into(),
        name: Some("c".into()),
    }));
    let spec = MaskSpec::from_entries(&spec_entries).unwrap();
    for round in 0..300 {
        let len = (next() % 3000) as usize;
        let input: Vec<u8> = (0..len)
            .map(|_| {
                let r = next();
                if r % 4 == 0 {
                    (r >> 8) as u8
                } else {
                    alphabet[(r >> 8) as usize % alphabet.len()]
                }
            })
            .collect();
        let mut splits: Vec<usize> = (0..(next() % 20))
            .map(|_| (next() as usize) % (len + 1))
            .collect();
        splits.sort_unstable();
        let (whole, wc) = run_chunks(&spec, 256, &input, &[]);
        let (split, sc) = run_chunks(&spec, 256, &input, &splits);
        assert_eq!(whole, split, "round {round}");
        assert_eq!(wc, sc, "round {round}");
        for ct in [
            "application/json",
            "application/x-www-form-urlencoded",
            "text/html",
        ] {
            let _ = mask_body(&spec, Some(ct), &input);
        }
    }
}
