use std::io::Write;

use flate2::Compression;
use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};

use super::super::stream::DEFAULT_HOLDBACK;
use super::super::{JsonEntry, MaskEntry, mask_body};
use super::*;

const MIB: u64 = 1024 * 1024;

fn spec() -> Arc<MaskSpec> {
    let mut entries: Vec<MaskEntry> = ["credit_card", "email", "us_ssn"]
        .iter()
        .map(|n| MaskEntry::Detector(n.to_string()))
        .collect();
    entries.push(MaskEntry::Json(JsonEntry {
        json: "$.customer.tax_id".into(),
    }));
    Arc::new(MaskSpec::from_entries(&entries).unwrap())
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut w = GzEncoder::new(Vec::new(), Compression::default());
    w.write_all(data).unwrap();
    w.finish().unwrap()
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut w = ZlibEncoder::new(Vec::new(), Compression::default());
    w.write_all(data).unwrap();
    w.finish().unwrap()
}

fn raw_deflate(data: &[u8]) -> Vec<u8> {
    let mut w = DeflateEncoder::new(Vec::new(), Compression::default());
    w.write_all(data).unwrap();
    w.finish().unwrap()
}

fn br(data: &[u8]) -> Vec<u8> {
    let mut w = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22);
    w.write_all(data).unwrap();
    w.into_inner()
}

/// A Content-Encoding value and how to produce such a body.
struct Enc {
    header: &'static str,
    encode: fn(&[u8]) -> Vec<u8>,
}

fn encodings() -> Vec<Enc> {
    vec![
        Enc {
            header: "gzip",
            encode: gzip,
        },
        Enc {
            header: "x-gzip",
            encode: gzip,
        },
        Enc {
            header: "deflate",
            encode: zlib,
        },
        Enc {
            header: "deflate",
            encode: raw_deflate,
        },
        Enc {
            header: "br",
            encode: br,
        },
        // Listed in the order applied: gzip first, then br.
        Enc {
            header: "gzip, br",
            encode: |d| br(&gzip(d)),
        },
        Enc {
            header: "BR,deflate",
            encode: |d| zlib(&br(d)),
        },
        Enc {
            header: "identity, gzip, identity",
            encode: gzip,
        },
        Enc {
            header: "deflate, gzip",
            encode: |d| gzip(&raw_deflate(d)),
        },
    ]
}

fn text_body() -> Vec<u8> {
    let mut s = String::from("Dear jane@example.com,\nyour card 4111 1111 1111 1111 ");
    s.push_str("was charged. SSN on file: 078-05-1120. Reply to billing@shop.example.\n");
    s.push_str("Order ORD-2024-000123456, id 10000000000000017, card 5555555555554444.\n");
    s.into_bytes()
}

fn json_body() -> Vec<u8> {
    br#"{"customer": {"email": "jane@example.com", "tax_id": 123456789,
 "card": "4111 1111 1111 1111"}, "note": "mail a@b.io", "id": 10000000000000017}"#
        .to_vec()
}

/// Runs `body` through an [`EncodedMasker`], cut at `splits`.
fn run_split(
    ct: Option<&str>,
    ce: Option<&str>,
    body: &[u8],
    splits: &[usize],
    limit: u64,
) -> std::result::Result<(Vec<u8>, Counts), EncodingError> {
    let mut m = EncodedMasker::new(spec(), ct, ce, limit)?;
    let mut out = Vec::new();
    let mut prev = 0;
    for &at in splits.iter().chain(std::iter::once(&body.len())) {
        out.extend(m.push(&body[prev..at])?);
        prev = at;
    }
    out.extend(m.finish()?);
    assert_eq!(m.counts().total(), m.masked_count());
    Ok((out, m.counts()))
}

fn run(ct: Option<&str>, ce: Option<&str>, body: &[u8]) -> Result<(Vec<u8>, Counts)> {
    run_split(ct, ce, body, &[], u64::MAX)
}

#[test]
fn every_encoding_masks_like_the_plain_body() {
    let spec = spec();
    for (ct, plain) in [
        ("text/plain", text_body()),
        ("application/json", json_body()),
    ] {
        let (expected, expected_counts) = mask_body(&spec, Some(ct), &plain);
        assert!(expected_counts.total() >= 3, "{ct}: {expected_counts:?}");
        for enc in encodings() {
            let body = (enc.encode)(&plain);
            let mut m = EncodedMasker::new(spec.clone(), Some(ct), Some(enc.header), MIB).unwrap();
            assert!(m.decodes(), "{}", enc.header);
            let mut out = m.push(&body).unwrap();
            out.extend(m.finish().unwrap());
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&expected),
                "{ct} {}",
                enc.header
            );
            assert_eq!(m.counts(), expected_counts, "{ct} {}", enc.header);
            assert_eq!(m.decoded_bytes(), plain.len() as u64);
            assert_eq!(m.buffered(), 0);
        }
    }
    // Spot-check the actual replacements.
    let (out, counts) = run(Some("text/plain"), Some("gzip"), &gzip(&text_body())).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains("your card [MASKED:credit_card:****1111] was"),
        "{out}"
    );
    assert!(out.contains("Dear [MASKED:email],"), "{out}");
    assert!(out.contains("id 10000000000000017,"), "{out}");
    assert_eq!(counts.get("credit_card"), 2);
    let (out, counts) = run(Some("application/json"), Some("br"), &br(&json_body())).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains(r#""tax_id": "[MASKED:json_field]""#), "{out}");
    assert_eq!(counts.get("json_field"), 1);
}

#[test]
fn every_split_point_gives_the_same_output() {
    let spec = spec();
    for (ct, plain) in [
        ("text/plain", text_body()),
        ("application/json", json_body()),
    ] {
        let (expected, expected_counts) = mask_body(&spec, Some(ct), &plain);
        for enc in encodings() {
            let body = (enc.encode)(&plain);
            for at in 0..=body.len() {
                let (out, counts) =
                    run_split(Some(ct), Some(enc.header), &body, &[at], MIB).unwrap();
                assert!(out == expected, "{ct} {} split at {at}", enc.header);
                assert_eq!(counts, expected_counts, "{ct} {} split at {at}", enc.header);
            }
            let ones: Vec<usize> = (1..body.len()).collect();
            let (out, counts) = run_split(Some(ct), Some(enc.header), &body, &ones, MIB).unwrap();
            assert!(out == expected, "{ct} {} 1-byte chunks", enc.header);
            assert_eq!(counts, expected_counts);
        }
    }
}

#[test]
fn matches_straddling_decoder_steps_are_caught() {
    // Several decoding steps of output, a card number at each step
    // boundary, fed in odd-sized compressed chunks.
    let mut plain = Vec::new();
    while plain.len() < 5 * STEP {
        let pad = STEP - 9 - plain.len() % STEP;
        plain.extend(std::iter::repeat_n(b'x', pad));
        plain.extend_from_slice(b" 4111 1111 1111 1111 a@b.io ");
    }
    let spec = spec();
    let (expected, counts) = mask_body(&spec, Some("text/plain"), &plain);
    assert_eq!(counts.get("credit_card"), 5);
    for enc in encodings() {
        let body = (enc.encode)(&plain);
        for step in [1, 7, 100, 4096, 65_537] {
            let splits: Vec<usize> = (step..body.len()).step_by(step).collect();
            let (out, c) =
                run_split(Some("text/plain"), Some(enc.header), &body, &splits, MIB).unwrap();
            assert!(out == expected, "{} step {step}", enc.header);
            assert_eq!(c, counts, "{} step {step}", enc.header);
        }
    }
}

#[test]
fn identity_and_no_encoding_are_not_decoded() {
    let plain = text_body();
    let (expected, _) = mask_body(&spec(), Some("text/plain"), &plain);
    for ce in [None, Some("identity"), Some(""), Some(" Identity , ")] {
        let mut m = EncodedMasker::new(spec(), Some("text/plain"), ce, 10).unwrap();
        assert!(!m.decodes(), "{ce:?}");
        // The decoded-size limit is for decoding: plain bodies are not capped.
        let mut out = Vec::new();
        for c in plain.chunks(5) {
            out.extend(m.push(c).unwrap());
        }
        out.extend(m.finish().unwrap());
        assert_eq!(out, expected, "{ce:?}");
        assert_eq!(m.decoded_bytes(), plain.len() as u64);
        assert_eq!(m.masked_count(), 5);
    }
}

#[test]
fn unsupported_encodings_fail_unless_nothing_is_masked() {
    for ce in [
        "zstd",
        "compress",
        "x-compress",
        "gzip, zstd",
        "dcb",
        "gzip;q=1",
    ] {
        let e = EncodedMasker::new(spec(), Some("text/html"), Some(ce), MIB).err();
        assert!(
            matches!(&e, Some(EncodingError::Unsupported(_))),
            "{ce}: {e:?}"
        );
        let msg = e.unwrap().to_string();
        assert!(msg.contains("cannot decode Content-Encoding"), "{msg}");
        assert!(msg.contains("Accept-Encoding"), "{msg}");
    }
    let e = EncodedMasker::new(spec(), None, Some("gzip, gzip, gzip, gzip, gzip"), MIB).err();
    assert!(matches!(e, Some(EncodingError::Unsupported(_))), "{e:?}");
    assert!(EncodedMasker::new(spec(), None, Some("gzip, gzip, gzip, gzip"), MIB).is_ok());

    // Images are not masked: passed through encoded, whatever the encoding.
    let bytes = b"\x28\xb5\x2f\xfd zstd frame 4111111111111111";
    for ce in ["zstd", "gzip"] {
        let mut m = EncodedMasker::new(spec(), Some("image/png"), Some(ce), 1).unwrap();
        assert!(!m.decodes());
        let mut out = m.push(bytes).unwrap();
        out.extend(m.finish().unwrap());
        assert_eq!(out, bytes);
        assert_eq!(m.masked_count(), 0);
    }
    // Nor is anything with an empty spec.
    let empty = Arc::new(MaskSpec::from_names(&[]).unwrap());
    let m = EncodedMasker::new(empty, Some("text/plain"), Some("zstd"), 1).unwrap();
    assert!(!m.decodes());
}

#[test]
fn stacked_encodings_are_undone_in_reverse_order() {
    let plain = text_body();
    let body = br(&gzip(&plain));
    assert!(run(Some("text/plain"), Some("gzip, br"), &body).is_ok());
    // The wrong order is a corrupt body, not a pass-through.
    let e = run(Some("text/plain"), Some("br, gzip"), &body).unwrap_err();
    assert!(matches!(e, EncodingError::Corrupt(_)), "{e:?}");
}

fn assert_too_large(m: &mut EncodedMasker, body: &[u8], chunk: usize, limit: u64) -> EncodingError {
    let mut err = None;
    for c in body.chunks(chunk) {
        match m.push(c) {
            Ok(_) => {}
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let e = match err {
        Some(e) => e,
        None => m.finish().unwrap_err(),
    };
    assert_eq!(e, EncodingError::TooLarge { limit });
    // Stopped within one decoding step past the limit.
    assert!(
        m.decoded_bytes() <= limit + STEP as u64,
        "decoded {}",
        m.decoded_bytes()
    );
    // The masker stays failed.
    assert_eq!(m.push(b"more").unwrap_err(), e);
    assert_eq!(m.finish().unwrap_err(), e);
    e
}

#[test]
fn gzip_bomb_stops_at_the_limit() {
    let zeros = vec![0u8; 10 * 1024 * 1024];
    let bomb = gzip(&zeros);
    assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
    for chunk in [bomb.len(), 1024, 7] {
        let mut m = EncodedMasker::new(spec(), Some("text/plain"), Some("gzip"), MIB).unwrap();
        let e = assert_too_large(&mut m, &bomb, chunk, MIB);
        assert!(e.to_string().contains("more than 1048576 bytes"), "{e}");
    }
    // The same bomb, wrapped in brotli: the inner layer's output counts.
    let wrapped = br(&bomb);
    let mut m = EncodedMasker::new(spec(), Some("text/plain"), Some("gzip, br"), MIB).unwrap();
    assert_too_large(&mut m, &wrapped, wrapped.len(), MIB);
    // A body of exactly the limit passes.
    let exact = gzip(&zeros[..MIB as usize]);
    let (out, _) = run_split(Some("text/plain"), Some("gzip"), &exact, &[], MIB).unwrap();
    assert_eq!(out.len() as u64, MIB);
    assert!(run_split(Some("text/plain"), Some("gzip"), &exact, &[], MIB - 1).is_err());
}

#[test]
fn brotli_bomb_of_a_gigabyte_stops_at_the_limit() {
    // 1 GiB of zeros, streamed into the encoder (never held whole).
    let mut w = brotli::CompressorWriter::new(Vec::new(), 1 << 16, 1, 24);
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        w.write_all(&zeros).unwrap();
    }
    let bomb = w.into_inner();
    assert!(bomb.len() < 256 * 1024, "{}", bomb.len());
    for chunk in [bomb.len(), 4096] {
        let mut m = EncodedMasker::new(spec(), Some("text/plain"), Some("br"), MIB).unwrap();
        assert_too_large(&mut m, &bomb, chunk, MIB);
    }
    // Also under a JSON content type, whose body is buffered for parsing.
    let mut m = EncodedMasker::new(spec(), Some("application/json"), Some("br"), MIB).unwrap();
    assert_too_large(&mut m, &bomb, bomb.len(), MIB);
}

#[test]
fn truncated_streams_fail_at_every_cut() {
    let plain = text_body();
    for enc in encodings() {
        let body = (enc.encode)(&plain);
        for cut in 1..body.len() {
            let r = run(Some("text/plain"), Some(enc.header), &body[..cut]);
            assert!(
                matches!(r, Err(EncodingError::Corrupt(_))),
                "{} cut at {cut}/{}: {r:?}",
                enc.header,
                body.len()
            );
        }
        // Nothing at all is an empty body.
        let (out, _) = run(Some("text/plain"), Some(enc.header), b"").unwrap();
        assert!(out.is_empty());
    }
    let e = run(Some("text/plain"), Some("gzip"), &gzip(&plain)[..20]).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("truncated gzip stream"), "{msg}");
    assert!(
        msg.contains("cut off rather than passed on unmasked"),
        "{msg}"
    );
}

#[test]
fn checksums_and_headers_are_checked() {
    let plain = text_body();
    let corrupt_at = |body: &[u8], at: usize, ce: &str| {
        let mut b = body.to_vec();
        b[at] ^= 0x01;
        run(Some("text/plain"), Some(ce), &b)
    };
    let g = gzip(&plain);
    let n = g.len();
    let msg = |r: Result<(Vec<u8>, Counts)>| r.unwrap_err().to_string();
    assert!(msg(corrupt_at(&g, n - 8, "gzip")).contains("CRC-32 mismatch"));
    assert!(msg(corrupt_at(&g, n - 1, "gzip")).contains("length mismatch"));
    assert!(msg(corrupt_at(&g, 0, "gzip")).contains("not gzip data"));
    assert!(msg(corrupt_at(&g, 2, "gzip")).contains("compression method 9"));
    let mut reserved = g.clone();
    reserved[3] = 0x20;
    assert!(msg(run(None, Some("gzip"), &reserved)).contains("reserved flags"));
    let z = zlib(&plain);
    let e = corrupt_at(&z, z.len() - 1, "deflate").unwrap_err();
    assert!(matches!(e, EncodingError::Corrupt(_)), "{e:?}");
    let e = corrupt_at(&br(&plain), 0, "br").unwrap_err();
    assert!(matches!(e, EncodingError::Corrupt(_)), "{e:?}");
    // Plain text labelled gzip/br/deflate is corrupt, not passed through.
    for ce in ["gzip", "br", "deflate"] {
        let r = run(Some("text/plain"), Some(ce), &plain);
        assert!(matches!(r, Err(EncodingError::Corrupt(_))), "{ce}: {r:?}");
    }
}

/// A gzip member with every optional header field, FHCRC included.
fn gzip_all_fields(data: &[u8]) -> Vec<u8> {
    let mut h = vec![
        0x1f,
        0x8b,
        8,
        FHCRC | FEXTRA | FNAME | FCOMMENT,
        1,
        2,
        3,
        4,
        0,
        3,
    ];
    h.extend_from_slice(&[5, 0, b'A', b'B', 2, 0, 9]);
    h.extend_from_slice(b"file.txt\0a comment\0");
    let mut crc = Crc::new();
    crc.update(&h);
    h.extend_from_slice(&((crc.sum() & 0xffff) as u16).to_le_bytes());
    h.extend(raw_deflate(data));
    let mut crc = Crc::new();
    crc.update(data);
    h.extend_from_slice(&crc.sum().to_le_bytes());
    h.extend_from_slice(&(data.len() as u32).to_le_bytes());
    h
}

#[test]
fn gzip_optional_header_fields_members_and_trailing_bytes() {
    let plain = text_body();
    let (expected, _) = mask_body(&spec(), Some("text/plain"), &plain);
    let body = gzip_all_fields(&plain);
    for at in 0..=body.len() {
        let (out, _) = run_split(Some("text/plain"), Some("gzip"), &body, &[at], MIB).unwrap();
        assert!(out == expected, "split at {at}");
    }
    let mut bad = body.clone();
    bad[20] ^= 1; // inside the file name: the header CRC catches it
    let e = run(None, Some("gzip"), &bad).unwrap_err();
    assert!(e.to_string().contains("header checksum"), "{e}");
    // flate2's own builder, for good measure.
    let mut w = flate2::GzBuilder::new()
        .filename("x.txt")
        .comment("hi")
        .extra(vec![1, 2, 3])
        .write(Vec::new(), Compression::fast());
    w.write_all(&plain).unwrap();
    let (out, _) = run(Some("text/plain"), Some("gzip"), &w.finish().unwrap()).unwrap();
    assert_eq!(out, expected);

    // Several members decode to their concatenation, a card split between
    // two of them included.
    let (a, b) = plain.split_at(30);
    let mut multi = gzip(a);
    multi.extend(gzip_all_fields(b));
    multi.extend(gzip(b""));
    for at in 0..=multi.len() {
        let (out, _) = run_split(Some("text/plain"), Some("gzip"), &multi, &[at], MIB).unwrap();
        assert!(out == expected, "split at {at}");
    }
    // A member cut short is still a truncated body.
    let r = run(None, Some("gzip"), &multi[..multi.len() - 3]);
    assert!(matches!(r, Err(EncodingError::Corrupt(_))), "{r:?}");

    // After the end of a stream: NUL padding is fine, anything else is not.
    for (ce, body) in [
        ("gzip", gzip(&plain)),
        ("gzip", gzip_all_fields(&plain)),
        ("br", br(&plain)),
        ("deflate", zlib(&plain)),
        ("deflate", raw_deflate(&plain)),
    ] {
        let mut padded = body.clone();
        padded.extend_from_slice(&[0; 20]);
        for at in [0, body.len() - 1, body.len(), body.len() + 1, padded.len()] {
            let (out, _) = run_split(Some("text/plain"), Some(ce), &padded, &[at], MIB).expect(ce);
            assert!(out == expected, "{ce} split at {at}");
        }
        for junk in [
            &b"\0\0junk 4111 1111 1111 1111"[..],
            b"\x1f",
            b"\x1f\x8b",
            b"\x01",
        ] {
            let mut b = body.clone();
            b.extend_from_slice(junk);
            for at in [body.len() - 1, body.len(), b.len()] {
                let e = run_split(Some("text/plain"), Some(ce), &b, &[at], MIB).unwrap_err();
                assert!(
                    matches!(e, EncodingError::Corrupt(_)),
                    "{ce} {junk:?}: {e:?}"
                );
            }
        }
    }
    let mut b = gzip(&plain);
    b.push(b'x');
    let e = run(None, Some("gzip"), &b).unwrap_err();
    assert!(
        e.to_string()
            .contains("data after the end of the gzip stream"),
        "{e}"
    );
}

#[test]
fn deflate_tells_zlib_from_raw() {
    assert!(is_zlib_header(0x78, 0x9c));
    assert!(is_zlib_header(0x78, 0x01));
    assert!(is_zlib_header(0x78, 0xda));
    assert!(is_zlib_header(0x48, 0x0d));
    assert!(!is_zlib_header(0x78, 0x9d));
    assert!(!is_zlib_header(0x88, 0x1d)); // window 2^16: not zlib
    // Every raw stream that flate2 makes for these inputs is told apart.
    for data in [&b""[..], b"a", b"hello hello hello", &text_body()] {
        let raw = raw_deflate(data);
        assert!(!is_zlib_header(raw[0], raw[1]));
        let (out, _) = run(Some("text/plain"), Some("deflate"), &raw).unwrap();
        assert_eq!(out, spec().mask_text(data, &mut Counts::default()));
    }
    let r = run(Some("text/plain"), Some("deflate"), b"x");
    assert!(matches!(r, Err(EncodingError::Corrupt(_))), "{r:?}");
}

#[test]
fn random_and_damaged_input_never_panics() {
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let plain = text_body();
    let valid: Vec<(&str, Vec<u8>)> = vec![
        ("gzip", gzip(&plain)),
        ("deflate", zlib(&plain)),
        ("deflate", raw_deflate(&plain)),
        ("br", br(&plain)),
        ("gzip, br", br(&gzip(&plain))),
    ];
    for round in 0..3000 {
        let (ce, base) = &valid[round % valid.len()];
        let mut body = match round % 3 {
            // Pure noise.
            0 => (0..(next() % 600))
                .map(|_| next() as u8)
                .collect::<Vec<u8>>(),
            // A valid prefix, then noise.
            1 => {
                let keep = (next() as usize) % base.len();
                let mut b = base[..keep].to_vec();
                b.extend((0..(next() % 300)).map(|_| next() as u8));
                b
            }
            // A valid stream with a few bytes damaged.
            _ => {
                let mut b = base.clone();
                for _ in 0..=(next() % 4) {
                    let at = (next() as usize) % b.len();
                    b[at] ^= (next() as u8) | 1;
                }
                b
            }
        };
        if round % 7 == 0 {
            body.truncate((next() as usize) % (body.len() + 1));
        }
        let mut splits: Vec<usize> = (0..(next() % 8))
            .map(|_| (next() as usize) % (body.len() + 1))
            .collect();
        splits.sort_unstable();
        for ct in ["text/plain", "application/json"] {
            match run_split(Some(ct), Some(ce), &body, &splits, 64 * 1024) {
                Ok(_) => {}
                Err(EncodingError::Corrupt(m)) => assert!(!m.is_empty()),
                Err(EncodingError::TooLarge { .. }) => {}
                Err(e) => panic!("round {round}: {e:?}"),
            }
        }
    }
}

#[test]
fn memory_stays_bounded_over_a_large_stream() {
    // 50 MiB of text with secrets, compressed as it is produced and fed to
    // the masker in small compressed chunks; nothing holds the whole body.
    fn stream_through(ce: &str, total: usize, chunk: usize) -> (EncodedMasker, u64, usize) {
        let mut m = EncodedMasker::new(spec(), Some("text/plain"), Some(ce), u64::MAX).unwrap();
        let mut enc = match ce {
            "gzip" => Encoder::Gz(GzEncoder::new(Vec::new(), Compression::fast())),
            _ => Encoder::Br(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                1,
                22,
            ))),
        };
        let mut fed = 0usize;
        let mut compressed = 0usize;
        let mut emitted = 0u64;
        let mut line_no = 0u64;
        let mut pending = Vec::new();
        while fed < total {
            let mut text = String::new();
            while text.len() < 256 * 1024 {
                line_no += 1;
                text.push_str(&format!(
                    "row {line_no} mail user{line_no}@example.com card 4111 1111 1111 1111 ok\n"
                ));
            }
            fed += text.len();
            pending.extend(enc.write(text.as_bytes()));
            for c in pending.chunks(chunk) {
                compressed += c.len();
                emitted += m.push(c).unwrap().len() as u64;
                assert!(
                    m.buffered() <= DEFAULT_HOLDBACK + DEFAULT_HOLDBACK / 4 + 16,
                    "buffered {}",
                    m.buffered()
                );
            }
            pending.clear();
        }
        let rest = enc.finish();
        for c in rest.chunks(chunk) {
            compressed += c.len();
            emitted += m.push(c).unwrap().len() as u64;
        }
        emitted += m.finish().unwrap().len() as u64;
        assert_eq!(m.buffered(), 0);
        assert_eq!(m.decoded_bytes(), fed as u64);
        assert_eq!(m.counts().get("credit_card"), line_no);
        assert_eq!(m.counts().get("email"), line_no);
        (m, emitted, compressed)
    }
    let (_, emitted, compressed) = stream_through("gzip", 50 * 1024 * 1024, 1500);
    assert!(emitted > 50 * MIB, "{emitted}");
    assert!(compressed < 25 * 1024 * 1024, "{compressed}");
    stream_through("br", 8 * 1024 * 1024, 999);
}

/// A streaming encoder whose output is taken as it comes.
enum Encoder {
    Gz(GzEncoder<Vec<u8>>),
    Br(Box<brotli::CompressorWriter<Vec<u8>>>),
}

impl Encoder {
    /// Compresses `data`; returns the compressed bytes produced so far.
    fn write(&mut self, data: &[u8]) -> Vec<u8> {
        match self {
            Encoder::Gz(e) => {
                e.write_all(data).unwrap();
                std::mem::take(e.get_mut())
            }
            Encoder::Br(e) => {
                e.write_all(data).unwrap();
                std::mem::take(e.get_mut())
            }
        }
    }

    fn finish(self) -> Vec<u8> {
        match self {
            Encoder::Gz(e) => e.finish().unwrap(),
            Encoder::Br(e) => e.into_inner(),
        }
    }
}

#[test]
fn next_output_hands_out_bounded_pieces() {
    // 32 MiB of text with secrets in a brotli body of a few KiB: one push
    // would return all of it at once; next_output hands it out by steps.
    let mut line = String::new();
    while line.len() < 64 * 1024 {
        line.push_str("jane@example.com card 4111 1111 1111 1111 and some text\n");
    }
    let mut w = brotli::CompressorWriter::new(Vec::new(), 1 << 16, 5, 24);
    let mut plain_len = 0u64;
    while plain_len < 32 * MIB {
        w.write_all(line.as_bytes()).unwrap();
        plain_len += line.len() as u64;
    }
    let body = w.into_inner();
    assert!(body.len() < 256 * 1024, "{}", body.len());
    let mut m = EncodedMasker::new(spec(), Some("text/plain"), Some("br"), u64::MAX).unwrap();
    m.feed(&body).unwrap();
    let (mut total, mut pieces) = (0usize, 0usize);
    while let Some(piece) = m.next_output().unwrap() {
        assert!(piece.len() <= 3 * STEP, "{}", piece.len());
        assert!(m.buffered() <= body.len() + 2 * DEFAULT_HOLDBACK);
        total += piece.len();
        pieces += 1;
    }
    assert!(m.buffered() <= 2 * DEFAULT_HOLDBACK, "{}", m.buffered());
    total += m.finish().unwrap().len();
    assert!(pieces > 400, "{pieces}");
    assert!(total as u64 > plain_len);
    assert_eq!(m.decoded_bytes(), plain_len);
    let lines = plain_len / 56;
    assert_eq!(m.counts().get("email"), lines);
    assert_eq!(m.counts().get("credit_card"), lines);

    // Mixing feed/next_output with push: the same output as one push.
    let plain = text_body();
    let g = gzip(&plain);
    let (expected, _) = mask_body(&spec(), Some("text/plain"), &plain);
    let mut m = EncodedMasker::new(spec(), Some("text/plain"), Some("gzip"), MIB).unwrap();
    m.feed(&g[..10]).unwrap();
    m.feed(&g[10..20]).unwrap();
    let mut out = Vec::new();
    while let Some(p) = m.next_output().unwrap() {
        out.extend(p);
    }
    out.extend(m.push(&g[20..]).unwrap());
    out.extend(m.finish().unwrap());
    assert_eq!(out, expected);
}

#[test]
fn is_send_and_static() {
    fn assert_send<T: Send + 'static>() {}
    assert_send::<EncodedMasker>();
    // A masker outlives the Arc handed to it.
    let mut m = {
        let s = spec();
        EncodedMasker::new(s, Some("text/plain"), Some("gzip"), MIB).unwrap()
    };
    let mut out = m.push(&gzip(b"mail a@b.io")).unwrap();
    out.extend(m.finish().unwrap());
    assert_eq!(out, b"mail [MASKED:email]");
    // After the end, more data is a caller error, reported not panicked.
    assert!(m.push(b"x").is_err());
}
