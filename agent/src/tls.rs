//! The agent's side of mutual TLS, built from its enrollment bundle.
//!
//! The agent trusts exactly one certificate authority: the receiver's own CA from
//! the bundle (no system roots, so no public CA can impersonate the receiver), and
//! proves its identity with the client certificate and key from the same bundle.
//! The receiver learns the agent's server name from that certificate's CN, never
//! from anything the agent says. TLS 1.3 only, with the aws-lc-rs provider chosen
//! explicitly (not the process default), and ALPN [`ALPN_LIFEBOAT_V1`].

use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use lifeboat_protocol::Bundle;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The ALPN protocol id of Lifeboat's wire protocol, version 1 (the receiver
/// offers the same).
pub const ALPN_LIFEBOAT_V1: &[u8] = b"lifeboat/1";

fn certs(field: &str, pem: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("bundle field {field} is not valid PEM: {e}"))?;
    if certs.is_empty() {
        bail!("bundle field {field} holds no PEM CERTIFICATE block");
    }
    Ok(certs)
}

/// The rustls client configuration for the receiver named in `bundle`: roots =
/// the bundle's CA only, client certificate and key from the bundle, TLS 1.3,
/// aws-lc-rs, ALPN [`ALPN_LIFEBOAT_V1`]. Errors name the bundle field at fault.
pub fn client_tls_config(bundle: &Bundle) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());

    let mut roots = rustls::RootCertStore::empty();
    for ca in certs("ca_cert", &bundle.ca_cert)? {
        roots
            .add(ca)
            .map_err(|e| anyhow!("bundle field ca_cert is not a usable CA certificate: {e}"))?;
    }
    let chain = certs("client_cert", &bundle.client_cert)?;
    let key = PrivateKeyDer::from_pem_slice(bundle.client_key.as_bytes())
        .map_err(|e| anyhow!("bundle field client_key is not a PEM private key: {e}"))?;

    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 is unavailable in the aws-lc-rs provider")?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| {
            anyhow!("bundle fields client_cert and client_key are not a usable pair: {e}")
        })?;
    config.alpn_protocols = vec![ALPN_LIFEBOAT_V1.to_vec()];
    Ok(config)
}

/// The name the receiver's certificate is verified against (bundle field `tls_name`).
pub fn receiver_tls_name(bundle: &Bundle) -> anyhow::Result<ServerName<'static>> {
    ServerName::try_from(bundle.tls_name.clone()).map_err(|e| {
        anyhow!(
            "bundle field tls_name {:?} is neither a DNS name nor an IP address: {e}",
            bundle.tls_name
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_protocol::bundle::BUNDLE_FORMAT_V1;

    // The happy path (a real handshake against the receiver's PKI) is tested in
    // lifeboat-receiver's `pki` module, which can issue certificates.

    fn bundle() -> Bundle {
        Bundle {
            format: BUNDLE_FORMAT_V1.into(),
            server: lifeboat_protocol::ServerName::new("web-1").unwrap(),
            receiver: "127.0.0.1:7443".into(),
            tls_name: "localhost".into(),
            ca_cert: "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".into(),
            client_cert: "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".into(),
            client_key: "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n".into(),
        }
    }

    fn err(b: &Bundle) -> String {
        format!("{:#}", client_tls_config(b).unwrap_err())
    }

    #[test]
    fn errors_name_the_bad_field() {
        let b = bundle();
        assert!(err(&b).contains("ca_cert"), "{}", err(&b));

        let mut b = bundle();
        b.ca_cert = String::new();
        let e = err(&b);
        assert!(e.contains("ca_cert") && e.contains("no PEM"), "{e}");

        let mut b = bundle();
        b.client_key = "nothing here".into();
        // ca_cert is checked first; with a junk CA the error still names ca_cert.
        assert!(err(&b).contains("ca_cert"));

        let mut b = bundle();
        b.tls_name = "not a name".into();
        let e = format!("{:#}", receiver_tls_name(&b).unwrap_err());
        assert!(e.contains("tls_name"), "{e}");
        b.tls_name = "127.0.0.1".into();
        assert!(matches!(
            receiver_tls_name(&b),
            Ok(ServerName::IpAddress(_))
        ));
    }
}
