//! Bodies of the fuzz targets of this crate, callable from `cargo fuzz` and
//! from ordinary tests. Not a stable API.
//!
//! `receiver/fuzz/fuzz_targets/agent_config.rs` (the agent's target shares
//! the receiver's fuzz crate, and so its one build of the TLS and QUIC
//! stack) wraps [`agent_config`], and the `fuzz_smoke` test of
//! `lifeboat-tests` replays the checked-in corpus
//! (`receiver/fuzz/corpus/agent_config/`) and a bounded number of mutations
//! of it through the same function on every `cargo test`, on stable Rust.

use crate::config::{AgentConfig, ParseError};

/// Keys and tables of `agent.toml`; every `Invalid` reason names one.
const CONFIG_KEYS: &[&str] = &[
    "bundle",
    "state_dir",
    "epoch_interval",
    "scan_interval",
    "lag_threshold",
    "stall_after",
    "scan_only",
    "freeze",
    "resize",
    "max_rate",
    "resync_max_rate",
    "block_size",
    "streams",
    "threads",
    "log_level",
    "log_format",
    "nbd_listen",
    "[[volume]]",
];

/// `agent_config`: arbitrary (UTF-8, lossily) text as `agent.toml`.
///
/// Properties: an accepted file reads back from [`AgentConfig::to_toml`] as
/// the same configuration (what `install` and `save` rely on) and differs
/// from itself in no key; a refused one is a syntax error with the parser's
/// message or names the key that is wrong.
pub fn agent_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let c = match AgentConfig::from_toml(&text) {
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
    let written = c.to_toml();
    let again = AgentConfig::from_toml(&written);
    assert!(
        matches!(&again, Ok(a) if *a == c),
        "{c:?} does not read back from\n{written}\n{again:?}"
    );
    assert!(c.changed_keys(&c).is_empty());
}
