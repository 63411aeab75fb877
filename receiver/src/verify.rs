//! `lifeboat-receiver verify`: checks, by BLAKE3 digest, that what the
//! receiver holds is what it acknowledged to the agent.
//!
//! - The staging volume: every block is read and hashed and compared with the
//!   digest the receiver acknowledged for it (the index plus the journal's
//!   later records, read without changing anything, so `serve` may run). A
//!   block whose write a journal intent says may be in progress is counted
//!   as unchecked. Mismatches are read again once (after re-reading the
//!   acknowledged digests) so a block applied during the check is not
//!   reported. A journal damaged before its end (not a torn last record)
//!   makes the check impossible — the digests recorded after the damage are
//!   unknown — and is an error naming the file and the byte offset
//!   ([`ReplicaError::JournalDamaged`]).
//! - A PIT (`--pit`): its manifest chain is resolved (checksummed) and every
//!   distinct chunk it needs is fetched and its digest checked; missing and
//!   corrupt chunks are reported with the blocks that use them.
//!
//! Mismatches are reported; with `--repair` the blocks are also handed to
//! whoever holds the replica ([`crate::replica::request_repair`]), which
//! forgets their digests so the agent resends them from the source.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use futures::stream::{self, StreamExt};
use lifeboat_protocol::hash::{is_all_zero, zero_hash, BlockHash};
use serde::Serialize;

use crate::pit::{open_pit, At, PitError};
use crate::replica::{acknowledged_digests, ReplicaError, ReplicaPaths};
use crate::store::Store;

/// A block whose content does not match its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// Block index.
    pub block: u64,
    /// The digest it should have (hex).
    pub expected: String,
    /// What was found: the digest of its bytes, or why it could not be read.
    pub found: String,
}

/// What [`verify_staging`] or [`verify_pit`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// What was checked (`staging PATH` or `PIT ID`).
    pub target: String,
    /// Blocks in the volume.
    pub blocks: u64,
    /// Blocks checked against a digest.
    pub checked: u64,
    /// Blocks not checked (a write in progress, or all zeros in a PIT).
    pub unchecked: u64,
    /// Blocks that do not match, ascending.
    pub mismatched: Vec<Mismatch>,
    /// What `--repair` did about them, if asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair: Option<RepairOutcome>,
}

/// What became of a `verify --repair` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RepairOutcome {
    /// The mismatched blocks' digests are forgotten: the agent resends them.
    Applied,
    /// The request waits for `serve` to open the replica.
    Pending,
}

/// Errors that stop a verification (a mismatch is a finding, not an error).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The replica's index or journal cannot be read.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// The staging volume cannot be read.
    #[error("cannot read the staging volume {path}: {source}")]
    Staging {
        /// The staging volume.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The PIT cannot be resolved.
    #[error(transparent)]
    Pit(#[from] PitError),
}

fn digest_of(buf: &[u8]) -> BlockHash {
    if is_all_zero(buf) {
        zero_hash(buf.len())
    } else {
        BlockHash::of(buf)
    }
}

/// Checks the staging volume of `paths` against the acknowledged digests.
pub fn verify_staging(paths: &ReplicaPaths) -> Result<VerifyReport, VerifyError> {
    let ack = acknowledged_digests(paths)?;
    let g = ack.geometry;
    let staging_err = |source| VerifyError::Staging {
        path: paths.staging.display().to_string(),
        source,
    };
    let file = File::open(&paths.staging).map_err(staging_err)?;
    let read_block = |i: u64, buf: &mut Vec<u8>| -> Result<BlockHash, VerifyError> {
        let r = g.block_range(i);
        buf.resize((r.end - r.start) as usize, 0);
        file.read_exact_at(buf, r.start).map_err(staging_err)?;
        Ok(digest_of(buf))
    };
    let mut report = VerifyReport {
        target: format!("staging {}", paths.staging.display()),
        blocks: g.block_count(),
        ..VerifyReport::default()
    };
    let mut suspects = Vec::new();
    let mut buf = Vec::new();
    for i in 0..g.block_count() {
        let expected = ack.digests[i as usize];
        if ack.uncertain.contains(&i) || expected == BlockHash::UNKNOWN {
            report.unchecked += 1;
            continue;
        }
        report.checked += 1;
        if read_block(i, &mut buf)? != expected {
            suspects.push(i);
        }
    }
    if !suspects.is_empty() {
        // Read again against freshly read digests: a block applied while
        // this ran is not a mismatch.
        let again = acknowledged_digests(paths)?;
        for i in suspects {
            let expected = again.digests[i as usize];
            if again.uncertain.contains(&i) {
                continue;
            }
            let found = read_block(i, &mut buf)?;
            if found != expected {
                report.mismatched.push(Mismatch {
                    block: i,
                    expected: expected.to_hex(),
                    found: found.to_hex(),
                });
            }
        }
    }
    Ok(report)
}

/// Checks every chunk the PIT `at` of `server/volume` needs.
pub async fn verify_pit(
    store: &Store,
    server: &str,
    volume: &str,
    at: &At,
) -> Result<VerifyReport, VerifyError> {
    let pit = open_pit(store, server, volume, at).await?;
    let g = pit.geometry;
    let mut report = VerifyReport {
        target: format!("PIT {}", pit.summary.id),
        blocks: g.block_count(),
        ..VerifyReport::default()
    };
    // Each distinct chunk once, with the blocks that use it.
    let mut chunks: BTreeMap<(BlockHash, u32), Vec<u64>> = BTreeMap::new();
    for i in 0..g.block_count() {
        if pit.is_zero_block(i) {
            report.unchecked += 1;
            continue;
        }
        report.checked += 1;
        chunks
            .entry((pit.digests[i as usize], g.block_len(i)))
            .or_default()
            .push(i);
    }
    let results: Vec<_> = stream::iter(chunks)
        .map(|((digest, len), blocks)| async move {
            let r = store.get_chunk(&digest, len).await;
            (digest, blocks, r.err().map(|e| e.to_string()))
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for (digest, blocks, error) in results {
        if let Some(error) = error {
            for b in blocks {
                report.mismatched.push(Mismatch {
                    block: b,
                    expected: digest.to_hex(),
                    found: error.clone(),
                });
            }
        }
    }
    report.mismatched.sort_by_key(|m| m.block);
    Ok(report)
}

/// The text `verify` prints for a report.
pub fn render(report: &VerifyReport) -> String {
    let mut out = format!(
        "{}: {} blocks, {} checked, {} not checked, {} mismatched\n",
        report.target,
        report.blocks,
        report.checked,
        report.unchecked,
        report.mismatched.len()
    );
    for m in report.mismatched.iter().take(100) {
        out.push_str(&format!(
            "  block {}: expected {}, found {}\n",
            m.block, m.expected, m.found
        ));
    }
    if report.mismatched.len() > 100 {
        out.push_str(&format!(
            "  ... and {} more (--json lists all)\n",
            report.mismatched.len() - 100
        ));
    }
    out
}
