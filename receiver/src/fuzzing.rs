//! Bodies of the fuzz targets of this crate, callable from `cargo fuzz` and
//! from ordinary tests. Not a stable API.
//!
//! `receiver/fuzz/fuzz_targets/*.rs` are one-line wrappers around these
//! functions, and the `fuzz_smoke` test of `lifeboat-tests` replays the
//! checked-in corpora (`receiver/fuzz/corpus/<target>/`) and a bounded number
//! of mutations of them through the same functions on every `cargo test`, on
//! stable Rust. Each function panics when a property fails.

use std::path::Path;

use crate::config::{ParseError, ReceiverConfig};
use crate::pit::{ManifestError, PitManifest, MANIFEST_HEAD_MAX, MANIFEST_MAGIC, MANIFEST_VERSION};
use crate::store::parse_manifest_name;

/// Makes a manifest object of `body`: preamble with the body's length, the
/// body, the checksum. For seeds and for [`pit_manifest`]'s sealed mode.
pub fn seal_manifest(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + body.len() + 32);
    out.extend_from_slice(&MANIFEST_MAGIC);
    out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// `pit_manifest`: byte 0 bit 0 set means "sealed": the rest is a manifest
/// *body*, given a correct preamble and checksum (see [`seal_manifest`]) so
/// the fuzzer gets past the checksum to the field checks; clear means the rest
/// is the whole object. It goes to [`PitManifest::decode`] and its first
/// [`MANIFEST_HEAD_MAX`] bytes to [`PitManifest::decode_summary`].
///
/// Properties: an accepted manifest re-encodes to exactly its bytes; its
/// entries are strictly increasing blocks inside the volume with no `UNKNOWN`
/// digest, all of them for a full manifest; its key names its epoch and id;
/// the summary read from its head equals the summary of the whole; errors
/// name the field that is wrong.
pub fn pit_manifest(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 1 {
        seal_manifest(rest)
    } else {
        rest.to_vec()
    };
    let head = &bytes[..bytes.len().min(MANIFEST_HEAD_MAX)];
    let summary = PitManifest::decode_summary(head, "key".into());
    if let Err(e) = &summary {
        assert_names_field(e);
    }
    let m = match PitManifest::decode(&bytes) {
        Ok(m) => m,
        Err(e) => {
            assert_names_field(&e);
            return;
        }
    };
    assert_eq!(
        m.encode().as_deref(),
        Ok(&bytes[..]),
        "re-encodes to its bytes"
    );
    let blocks = m.geometry.block_count();
    assert!(m.entries.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(m
        .entries
        .iter()
        .all(|(b, d)| *b < blocks && !d.is_unknown()));
    if m.is_full() {
        assert_eq!(m.entries.len() as u64, blocks);
    } else {
        assert!(m.parent.is_some());
    }
    let key = m.key();
    let name = key.rsplit('/').next().expect("split yields one piece");
    assert_eq!(
        parse_manifest_name(name),
        Some((m.epoch, m.pit_id.as_str())),
        "{key}"
    );
    let summary = summary.expect("the head of a valid manifest decodes");
    let mut whole = m.summary();
    assert_eq!(whole.key, key);
    whole.key = "key".into();
    assert_eq!(summary, whole);
}

fn assert_names_field(e: &ManifestError) {
    match e {
        ManifestError::Truncated { field } | ManifestError::Invalid { field, .. } => {
            assert!(!field.is_empty() && e.to_string().contains(field), "{e}")
        }
        _ => assert!(!e.to_string().is_empty()),
    }
}

/// Keys and tables of `receiver.toml`; every `Invalid` reason names one.
const CONFIG_KEYS: &[&str] = &[
    "listen",
    "advertise",
    "tls_name",
    "staging_dir",
    "fsync",
    "store",
    "pit_interval",
    "pit_max_rate",
    "max_rate",
    "log_level",
    "[s3]",
    "gc_interval",
    "metrics_listen",
    "[limits]",
    "[[volume]]",
    "[retention]",
    "[[retention_override]]",
];

/// `receiver_config`: arbitrary (UTF-8, lossily) text as `receiver.toml`.
///
/// Properties: an accepted file round-trips through
/// [`ReceiverConfig::to_toml`], passes [`ReceiverConfig::validate`], and every
/// value it validated is usable (each rate, interval and address it holds
/// parses again in the accessors, its store URL parses); a refused one is a
/// syntax error with the parser's message or names the key that is wrong.
pub fn receiver_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let c = match ReceiverConfig::from_toml(&text) {
        Ok(c) => c,
        Err(ParseError::Syntax(m)) => {
            assert!(!m.is_empty());
            return;
        }
        Err(ParseError::Invalid(reason)) => {
            assert!(
                CONFIG_KEYS.iter().any(|k| reason.contains(k)),
                "{reason:?} names no key"
            );
            return;
        }
    };
    let again = ReceiverConfig::from_toml(&c.to_toml());
    assert!(
        matches!(&again, Ok(a) if *a == c),
        "{c:?} does not read back from\n{}\n{again:?}",
        c.to_toml()
    );
    let dir = Path::new("/var/lib/lifeboat");
    assert!(c.validate(dir).is_ok());
    assert_eq!(c.max_rate().is_some(), c.max_rate.is_some());
    assert_eq!(c.pit_max_rate().is_some(), c.pit_max_rate.is_some());
    if let Some(m) = &c.metrics_listen {
        assert_eq!(
            c.metrics_listen().is_some(),
            !m.trim().eq_ignore_ascii_case("off")
        );
    }
    c.pit_interval();
    c.gc_interval();
    assert!(c.store_url(dir).is_ok());
    for o in &c.retention_overrides {
        let base = c
            .retention
            .apply_to(&Default::default())
            .expect("validated");
        assert_eq!(
            Ok(c.retention_policy(&o.server, &o.volume)),
            o.rules().apply_to(&base)
        );
    }
}
