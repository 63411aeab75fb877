//! The enrollment bundle: the one file an agent needs.
//!
//! `lifeboat-receiver enroll` writes it; `lifeboat-agent` reads it. It is TOML
//! with a format tag, the source server's name, the receiver's address and the
//! name its certificate is checked against, and three PEM blocks: the receiver's
//! CA certificate, the server's client certificate and its private key. The key
//! makes the file a secret: it is written with mode 0600.

use serde::{Deserialize, Serialize};

use crate::names::ServerName;

/// The format tag of version 1 bundles.
pub const BUNDLE_FORMAT_V1: &str = "lifeboat-bundle-v1";

/// Errors reading a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The text is not valid bundle TOML.
    #[error("not a Lifeboat bundle: {0}")]
    Syntax(String),
    /// The format tag is not one this version understands.
    #[error("unsupported bundle format {0:?} (this version reads {BUNDLE_FORMAT_V1:?})")]
    Format(String),
    /// A required PEM block is missing or malformed.
    #[error("bundle field {field} does not hold a PEM {expected}")]
    Pem {
        /// The field that is wrong.
        field: &'static str,
        /// What it should hold.
        expected: &'static str,
    },
}

/// An enrollment bundle (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// Always [`BUNDLE_FORMAT_V1`].
    pub format: String,
    /// The source server this bundle was issued to (also the certificate's CN).
    pub server: ServerName,
    /// Receiver address, `host:port`.
    pub receiver: String,
    /// The DNS name or IP the receiver's certificate is checked against.
    pub tls_name: String,
    /// The receiver CA's certificate, PEM.
    pub ca_cert: String,
    /// The server's client certificate, PEM.
    pub client_cert: String,
    /// The client certificate's private key, PEM.
    pub client_key: String,
}

impl Bundle {
    /// Serializes the bundle as TOML with a comment header.
    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).expect("bundle fields are all plain strings");
        format!(
            "# Lifeboat enrollment bundle for source server {:?}.\n\
             # It holds a private key: keep it secret (mode 0600) and give it only to that server's agent.\n{body}",
            self.server.as_str()
        )
    }

    /// Parses and checks a bundle.
    pub fn from_toml(text: &str) -> Result<Bundle, BundleError> {
        let b: Bundle = toml::from_str(text).map_err(|e| BundleError::Syntax(e.to_string()))?;
        if b.format != BUNDLE_FORMAT_V1 {
            return Err(BundleError::Format(b.format));
        }
        for (field, value, expected) in [
            ("ca_cert", &b.ca_cert, "CERTIFICATE"),
            ("client_cert", &b.client_cert, "CERTIFICATE"),
            ("client_key", &b.client_key, "PRIVATE KEY"),
        ] {
            let begin = format!("-----BEGIN {expected}-----");
            let end = format!("-----END {expected}-----");
            if !(value.contains(&begin) && value.contains(&end)) {
                return Err(BundleError::Pem { field, expected });
            }
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bundle {
        Bundle {
            format: BUNDLE_FORMAT_V1.into(),
            server: ServerName::new("web-1").unwrap(),
            receiver: "127.0.0.1:7443".into(),
            tls_name: "localhost".into(),
            ca_cert: "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".into(),
            client_cert: "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".into(),
            client_key: "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n".into(),
        }
    }

    #[test]
    fn round_trips() {
        let b = sample();
        assert_eq!(Bundle::from_toml(&b.to_toml()).unwrap(), b);
    }

    #[test]
    fn rejects_bad_bundles() {
        assert!(matches!(
            Bundle::from_toml("hello"),
            Err(BundleError::Syntax(_))
        ));
        let mut b = sample();
        b.format = "v9".into();
        assert!(matches!(
            Bundle::from_toml(&b.to_toml()),
            Err(BundleError::Format(_))
        ));
        let mut b = sample();
        b.client_key = "nope".into();
        assert!(matches!(
            Bundle::from_toml(&b.to_toml()),
            Err(BundleError::Pem {
                field: "client_key",
                ..
            })
        ));
        let t = sample()
            .to_toml()
            .replace("server = \"web-1\"", "server = \"../x\"");
        assert!(matches!(Bundle::from_toml(&t), Err(BundleError::Syntax(_))));
    }
}
