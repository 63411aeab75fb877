//! The checks behind `lifeboat-agent install`, which turns an enrollment
//! bundle and a list of volumes into `agent.toml` (see [`crate::config`]).
//!
//! What must hold is an error: the bundle parses and its certificates and key
//! make a TLS configuration; every volume opens read-only and is a non-empty
//! block device or regular file. What may be fixed later is a warning: a
//! bundle readable by every user, a receiver that does not answer yet (the
//! agent retries for as long as it runs).
//!
//! The reachability check is one QUIC handshake with mutual TLS, made with the
//! same client endpoint `sync` and `run` connect with, then closed at once:
//! no session is opened, so the receiver creates nothing (it logs a
//! connection that opened no control stream).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use lifeboat_protocol::names::MAX_NAME_LEN;
use lifeboat_protocol::{Bundle, VolumeName};

use crate::transport::{self, LinkError};
use crate::volume::{SourceVolume, VolumeKind};

/// How long the reachability check waits for name resolution and the handshake.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long after its handshake the check waits for the receiver to refuse
/// the client certificate (with TLS 1.3 it does so after the client is done).
const REFUSAL_GRACE: Duration = Duration::from_millis(300);

/// A bundle that passed the checks.
#[derive(Debug)]
pub struct CheckedBundle {
    /// The parsed bundle.
    pub bundle: Bundle,
    /// Its permission bits.
    pub mode: u32,
}

impl CheckedBundle {
    /// Whether users other than the owner and group can read it (it holds a
    /// private key).
    pub fn world_readable(&self) -> bool {
        self.mode & 0o004 != 0
    }
}

/// Reads and checks a bundle: it parses and its certificates and key make a
/// TLS client configuration. Errors name the file.
pub fn check_bundle(path: &Path) -> anyhow::Result<CheckedBundle> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read bundle {}", path.display()))?;
    if !meta.is_file() {
        bail!("bundle {} is not a regular file", path.display());
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read bundle {}", path.display()))?;
    let bundle = Bundle::from_toml(&text)
        .with_context(|| format!("bundle {} is unusable", path.display()))?;
    crate::tls::client_tls_config(&bundle)
        .and_then(|_| crate::tls::receiver_tls_name(&bundle))
        .with_context(|| format!("bundle {} is unusable", path.display()))?;
    Ok(CheckedBundle {
        bundle,
        mode: meta.permissions().mode() & 0o7777,
    })
}

/// A volume that passed the checks.
#[derive(Debug, Clone, Copy)]
pub struct CheckedVolume {
    /// Block device or regular file.
    pub kind: VolumeKind,
    /// Its size in bytes.
    pub size: u64,
}

/// Checks that `path` opens read-only (as the agent will open it) and is a
/// non-empty block device or regular file. The error names the path.
pub fn check_volume(path: &Path) -> anyhow::Result<CheckedVolume> {
    let v = SourceVolume::open(path)?;
    Ok(CheckedVolume {
        kind: v.kind(),
        size: v.size(),
    })
}

/// The volume name `install` gives `path` when no `--name` is given: its file
/// name (`vdb` for `/dev/vdb`, `vg0-root` for `/dev/mapper/vg0-root`), with
/// characters a name cannot hold replaced by `_`.
pub fn default_volume_name(path: &Path) -> anyhow::Result<VolumeName> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cleaned: String = file_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let trimmed = cleaned.trim_start_matches(['.', '-']);
    let name: String = trimmed.chars().take(MAX_NAME_LEN).collect();
    VolumeName::new(name).map_err(|e| {
        anyhow!(
            "cannot make a volume name from {} ({e}): give one with --name",
            path.display()
        )
    })
}

/// Resolves the bundle's receiver address and completes one QUIC handshake
/// with mutual TLS, within [`PROBE_TIMEOUT`]; returns the address answered.
pub async fn probe_receiver(bundle: &Bundle) -> anyhow::Result<SocketAddr> {
    let addr = tokio::time::timeout(PROBE_TIMEOUT, transport::resolve(&bundle.receiver))
        .await
        .map_err(|_| {
            anyhow!(
                "resolving {:?} took over {PROBE_TIMEOUT:?}",
                bundle.receiver
            )
        })??;
    let endpoint = transport::client_endpoint(bundle)?;
    let result = async {
        let connecting = endpoint
            .connect(addr, &bundle.tls_name)
            .with_context(|| format!("cannot connect to {addr}"))?;
        let conn = match tokio::time::timeout(PROBE_TIMEOUT, connecting).await {
            Err(_) => bail!("no answer from {addr} within {PROBE_TIMEOUT:?}"),
            Ok(Err(e)) => bail!("{}", LinkError::from(e)),
            Ok(Ok(conn)) => conn,
        };
        if let Ok(reason) = tokio::time::timeout(REFUSAL_GRACE, conn.closed()).await {
            bail!("{}", LinkError::from(reason));
        }
        conn.close(0u32.into(), b"lifeboat-agent install: reachability check");
        // Let the close reach the receiver, briefly.
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        Ok(addr)
    }
    .await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_come_from_the_file_name() {
        for (path, name) in [
            ("/dev/vdb", "vdb"),
            ("/dev/mapper/vg0-root", "vg0-root"),
            ("/srv/images/disk 1.img", "disk_1.img"),
            ("/srv/.hidden", "hidden"),
            ("/dev/disk/by-id/wwn-0x5000:part1", "wwn-0x5000_part1"),
        ] {
            assert_eq!(
                default_volume_name(Path::new(path))
                    .map(|n| n.to_string())
                    .ok(),
                Some(name.to_string()),
                "{path}"
            );
        }
        let long = format!("/srv/{}", "x".repeat(100));
        assert_eq!(
            default_volume_name(Path::new(&long))
                .unwrap()
                .as_str()
                .len(),
            64
        );
        let e = default_volume_name(Path::new("/")).unwrap_err().to_string();
        assert!(e.contains("--name"), "{e}");
    }

    #[test]
    fn volume_checks_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.img");
        let e = format!("{:#}", check_volume(&missing).unwrap_err());
        assert!(e.contains("missing.img"), "{e}");
        let e = format!("{:#}", check_volume(dir.path()).unwrap_err());
        assert!(
            e.contains("neither a regular file nor a block device"),
            "{e}"
        );
        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        let e = format!("{:#}", check_volume(&empty).unwrap_err());
        assert!(e.contains("empty.img") && e.contains("empty"), "{e}");
        let ok = dir.path().join("ok.img");
        std::fs::write(&ok, vec![1u8; 8192]).unwrap();
        let v = check_volume(&ok).expect("a regular file is a volume");
        assert_eq!((v.kind, v.size), (VolumeKind::File, 8192));
    }

    #[test]
    fn bundle_checks_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web-1.bundle");
        let e = format!("{:#}", check_bundle(&path).unwrap_err());
        assert!(e.contains("web-1.bundle"), "{e}");
        std::fs::write(&path, "format = \"lifeboat-bundle-v1\"\n").unwrap();
        let e = format!("{:#}", check_bundle(&path).unwrap_err());
        assert!(
            e.contains("web-1.bundle") && e.contains("not a Lifeboat bundle"),
            "{e}"
        );
    }
}
