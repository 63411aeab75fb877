//! The snapshot store: content-addressed chunks and PIT manifests in an object
//! store.
//!
//! [`Store`] is the one seam between Lifeboat and the [`object_store`] crate: a
//! local directory ([`LocalFileSystem`], the default, under the receiver's
//! directory) or S3 / an S3-compatible server ([`AmazonS3Builder`]). Everything
//! above it (PIT manifests in [`crate::pit`], and later `launch` and `gc`) speaks
//! in *keys*, strings relative to the store's prefix, and never sees an
//! `object_store` type.
//!
//! ## Where a store lives ([`StoreUrl`])
//! - `file:///abs/path`, or a bare absolute path: a directory, created if absent.
//!   Writes are fsynced (file and parent directory) before they return, matching
//!   the durability an S3 `PUT` promises. The path is taken literally (no
//!   percent-decoding).
//! - `s3://bucket/prefix`: AWS S3 or an S3-compatible server (see below).
//!
//! ## S3 settings, in order of precedence
//! 1. [`S3Settings`], from `receiver.toml`'s `[s3]` table: endpoint, region,
//!    plain HTTP, static credentials.
//! 2. The `AWS_*` environment variables that [`AmazonS3Builder::from_env`]
//!    knows: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//!    `AWS_REGION` / `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL(_S3)`,
//!    `AWS_ALLOW_HTTP`, web identity and container credentials, and the HTTP
//!    client's keys (`AWS_TIMEOUT`, `AWS_CONNECT_TIMEOUT`, `AWS_PROXY_URL`).
//!    Without credentials from either, object_store asks the EC2 instance
//!    metadata service. Shared profiles (`AWS_PROFILE`, `~/.aws/credentials`)
//!    are *not* read: object_store 0.14 has no profile provider.
//! 3. Lifeboat's defaults: connect timeout [`S3_CONNECT_TIMEOUT`], request
//!    timeout [`S3_REQUEST_TIMEOUT`], at most [`S3_MAX_RETRIES`] retries within
//!    [`S3_RETRY_TIMEOUT`], so a dead endpoint fails in seconds instead of the
//!    minutes object_store's defaults allow.
//!
//! Setting an endpoint selects path-style requests, which S3-compatible servers
//! (MinIO, s3s-fs, Ceph) expect, and defaults the region to `us-east-1`.
//! Without an endpoint (AWS itself) a region is required. An `http://`
//! endpoint needs `allow_http`, so credentials never go out unencrypted by
//! accident. Errors from the server name the store and the endpoint.
//!
//! Create-only writes are S3 conditional puts (`If-None-Match: *`), pinned on
//! whatever `AWS_CONDITIONAL_PUT` says. AWS S3 honours them (since 2024), as do
//! MinIO, Cloudflare R2 and s3s-fs (whose check is not atomic with its write:
//! two *concurrent* creates of one key can both succeed there). A server that
//! ignored the header would make create-only writes plain overwrites; Lifeboat
//! stays correct anyway, because chunk keys are content addresses (an
//! overwrite stores the same bytes) and manifest keys carry a PIT id with 50
//! random bits (two receivers never pick the same key).
//!
//! ## Key layout
//! ```text
//! <prefix>/chunks/<2 hex>/<64 hex>                               one block, by BLAKE3 digest
//! <prefix>/pits/<server>/<volume>/<20-digit epoch>-<pit id>.manifest
//! ```
//! Chunks fan out on the first digest byte so no directory of a local store
//! holds more than 1/256 of them. Manifest keys sort by epoch (zero-padded to 20
//! digits, the width of `u64::MAX`), so a listing is already in replication
//! order. Server and volume names are validated ([`ServerName`], [`VolumeName`])
//! before they become key segments.
//!
//! ## Chunk format
//! ```text
//! u8  encoding    0 raw, 1 zstd, 2 zero (lifeboat_protocol::Encoding)
//! u32 raw_len     little-endian: the block's length
//! ..  payload     raw bytes / one zstd frame / empty
//! ```
//! The same encoding as a `Block` frame on the wire ([`BlockEncoder`]: zstd
//! level 1, kept only when strictly smaller; all-zero blocks are a marker).
//! Encoding bytes 3–255 are unused; a new chunk format takes one of them, so
//! old readers reject new chunks with a clear error instead of misreading them.
//! [`Store::get_chunk`] bounds the object by the expected block length before
//! reading it, decodes, and verifies the BLAKE3 digest: nothing read from a
//! store is trusted. A bulk reader (`launch`) uses the same checks without the
//! per-block allocations: [`Store::chunk_object`] (async, any store) or
//! [`Store::read_local_chunk`] (blocking, local stores only: a plain read of
//! the chunk's file, no hop through `object_store`'s blocking pool), then
//! [`Store::verify_chunk_into`] into a buffer the caller reuses.
//!
//! ## Invariants
//! - **Chunks are create-only and content-addressed**: [`Store::put_if_absent`]
//!   with `PutMode::Create`; a chunk that exists is never rewritten, so a chunk
//!   shared by many PITs and volumes is stored once. [`Store::put_chunk`]
//!   re-hashes the block before storing it, because a chunk stored under the
//!   wrong digest would never be repaired by a later write.
//! - **Manifests are create-only**: [`Store::put_new`] fails with
//!   [`StoreError::Exists`] rather than replace an object, so two receivers
//!   writing the same volume can never clobber each other's PITs.
//! - **A manifest is written only after all its chunks are stored** (the
//!   caller's duty, see [`crate::pit`]); a put's success means durable, so a
//!   listed manifest never names a chunk that is not there (until `gc` errs).
//! - Every write is atomic (the local store writes a staging file and links it
//!   into place), so a receiver killed mid-write leaves no partial object.
//!
//! ## Async and CPU
//! Methods are `async` (object stores are remote). Chunk compression and
//! verification are synchronous CPU work done inline with one zstd context per
//! thread; a caller moving many large blocks can do that work in
//! `spawn_blocking` with [`encode_chunk`] / [`decode_chunk`] and use the plain
//! key methods for IO.

use std::cell::RefCell;
use std::fmt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use lifeboat_protocol::block::{BlockDecodeError, BlockDecoder, BlockEncoder, Encoding};
use lifeboat_protocol::names::NameError;
use lifeboat_protocol::{BlockHash, ServerName, VolumeName};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, AwsCredential, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientConfigKey, ClientOptions, GetOptions, GetRange, ObjectStore,
    ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig, StaticCredentialProvider,
};

/// Length of a chunk object's header (encoding byte + raw length).
pub const CHUNK_HEADER_LEN: usize = 5;

/// Top-level key segment of chunks.
pub const CHUNKS_DIR: &str = "chunks";
/// Top-level key segment of PIT manifests.
pub const PITS_DIR: &str = "pits";
/// Suffix of manifest keys.
pub const MANIFEST_SUFFIX: &str = ".manifest";

/// How long an S3 connection may take to establish (`AWS_CONNECT_TIMEOUT`
/// overrides it).
pub const S3_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long one S3 request may take in all (`AWS_TIMEOUT` overrides it).
/// Generous: a full manifest is one PUT of up to 1.3 GiB.
pub const S3_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
/// Most retries of one S3 request (server errors, throttling, connection
/// failures; timeouts only for reads).
pub const S3_MAX_RETRIES: usize = 5;
/// No S3 retry starts later than this after the first attempt.
pub const S3_RETRY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// The region of an S3-compatible endpoint that names none.
pub const DEFAULT_ENDPOINT_REGION: &str = "us-east-1";
/// How often a create refused as a conflict, with no object there afterwards,
/// is tried again (see [`Store::put_if_absent`]).
pub const CREATE_CONFLICT_RETRIES: u32 = 3;

/// Errors of the snapshot store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A store URL could not be parsed or opened.
    #[error("store {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A key is not a valid object path.
    #[error("store {url}: invalid key {key:?}: {reason}")]
    BadKey {
        /// The store's URL.
        url: String,
        /// The rejected key.
        key: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A server or volume name is not safe as a key segment.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A create-only write found the object already present.
    #[error("store {url}: object {key} already exists; refusing to overwrite it")]
    Exists {
        /// The store's URL.
        url: String,
        /// The key that exists.
        key: String,
    },
    /// The object is not in the store.
    #[error("store {url}: object {key} is missing")]
    Missing {
        /// The store's URL.
        url: String,
        /// The missing key.
        key: String,
    },
    /// An object is larger than its reader allows.
    #[error("store {url}: object {key} is {size} bytes, more than the {max} allowed")]
    TooLarge {
        /// The store's URL.
        url: String,
        /// The object's key.
        key: String,
        /// Its size.
        size: u64,
        /// The largest size accepted.
        max: u64,
    },
    /// A chunk's content does not decode to the block its key names.
    #[error("store {url}: chunk {key} is corrupt (expected BLAKE3 {digest}): {reason}")]
    Corrupt {
        /// The store's URL.
        url: String,
        /// The chunk's key.
        key: String,
        /// The digest the chunk should have (hex).
        digest: String,
        /// What is wrong.
        reason: String,
    },
    /// A caller asked to store a block under a digest it does not have.
    #[error("refusing to store a chunk as {digest}: the block's BLAKE3 is {actual}")]
    DigestMismatch {
        /// The digest the caller claimed (hex).
        digest: String,
        /// The block's actual digest (hex).
        actual: String,
    },
    /// A listing found more objects than the caller allows.
    #[error("store {url}: more than {max} objects under {prefix}/")]
    ListTooLong {
        /// The store's URL.
        url: String,
        /// The listed prefix.
        prefix: String,
        /// The caller's limit.
        max: usize,
    },
    /// S3 answered a create-only write with a conflict, yet no object was
    /// there afterwards (a concurrent write or delete of the key), every time.
    #[error("store {url}{via}: object {key}: the create-only write kept conflicting with another write or delete of it, and no object is there")]
    Conflict {
        /// The store's URL.
        url: String,
        /// Where the store is reached, for messages (see [`Store::via`]).
        via: String,
        /// The key.
        key: String,
    },
    /// The object store failed.
    #[error("store {url}{via}: {op} {key}: {detail}")]
    Backend {
        /// The store's URL.
        url: String,
        /// Where the store is reached, for messages (see [`Store::via`]).
        via: String,
        /// What was attempted ("put", "get", "list", ...).
        op: &'static str,
        /// The key or prefix involved.
        key: String,
        /// What to check, for failures with a usual cause (denied access, no
        /// connection), then the object store's error and its causes, each
        /// said once (see [`describe_backend_error`]).
        detail: String,
        /// The object store's error (boxed: it is large, and rare). Not a
        /// `#[source]`: `detail` already says all of it, and object_store's
        /// messages repeat their causes, so a printed chain would say it five
        /// times.
        error: Box<object_store::Error>,
    },
}

/// Result alias for store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Where a store lives, parsed from `file:///…`, `s3://…` or an absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// A directory on a local filesystem.
    Local {
        /// The absolute directory.
        root: PathBuf,
    },
    /// An S3 bucket (or an S3-compatible server), with a key prefix.
    S3 {
        /// The bucket's name.
        bucket: String,
        /// Key prefix inside the bucket, without leading or trailing `/`
        /// (empty for the whole bucket).
        prefix: String,
    },
}

impl StoreUrl {
    /// Parses `file:///abs/path`, `s3://bucket[/prefix]` or `/abs/path`.
    pub fn parse(url: &str) -> Result<StoreUrl> {
        let bad = |reason: &str| StoreError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        if let Some(rest) = url.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(bad(
                    "a file URL needs an absolute path (file:///abs/path); hosts are not supported",
                ));
            }
            return Self::local(url, rest);
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.len() < 3
                || bucket.len() > 63
                || !bucket
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            {
                return Err(bad(
                    "the bucket name must be 3-63 characters of lowercase letters, digits, '.' and '-'",
                ));
            }
            let prefix = prefix.trim_matches('/');
            if !prefix.is_empty() {
                Path::parse(prefix).map_err(|e| bad(&format!("invalid key prefix: {e}")))?;
            }
            return Ok(StoreUrl::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
            });
        }
        if url.starts_with('/') {
            return Self::local(url, url);
        }
        Err(bad(
            "expected file:///abs/path, s3://bucket/prefix or an absolute path",
        ))
    }

    fn local(url: &str, path: &str) -> Result<StoreUrl> {
        let root = PathBuf::from(path);
        if root
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(StoreError::BadUrl {
                url: url.to_string(),
                reason: "the path must not contain '..'".to_string(),
            });
        }
        Ok(StoreUrl::Local { root })
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Local { root } => write!(f, "file://{}", root.display()),
            StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

impl std::str::FromStr for StoreUrl {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self> {
        StoreUrl::parse(s)
    }
}

/// Settings of an S3 store that override the AWS environment (see the module
/// documentation for the precedence); `Default` leaves everything to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Settings {
    /// Endpoint of an S3-compatible server, e.g. `http://127.0.0.1:9000`; also
    /// selects path-style requests and defaults the region to
    /// [`DEFAULT_ENDPOINT_REGION`].
    pub endpoint: Option<String>,
    /// Region, e.g. `eu-west-1`.
    pub region: Option<String>,
    /// Whether plain HTTP is allowed; `None` leaves it to `AWS_ALLOW_HTTP`.
    pub allow_http: Option<bool>,
    /// Static credentials; `None` takes them from the environment.
    pub credentials: Option<S3Credentials>,
}

/// A static S3 access key; `Debug` does not show the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Credentials {
    /// The access key id.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

/// Builds the S3 client of `bucket`: Lifeboat's timeouts and retries, then the
/// `AWS_*` environment, then `s3`. Returns the builder and the endpoint it
/// will use, for messages.
fn s3_builder(
    bucket: &str,
    s3: &S3Settings,
) -> std::result::Result<(AmazonS3Builder, String), String> {
    let client = ClientOptions::new()
        .with_connect_timeout(S3_CONNECT_TIMEOUT)
        .with_timeout(S3_REQUEST_TIMEOUT);
    let retry = RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: S3_MAX_RETRIES,
        retry_timeout: S3_RETRY_TIMEOUT,
    };
    let mut b = AmazonS3Builder::new()
        .with_client_options(client)
        .with_retry(retry);
    // What `AmazonS3Builder::from_env` does, applied over our defaults rather
    // than instead of them.
    for (key, value) in std::env::vars_os() {
        let (Some(key), Some(value)) = (key.to_str(), value.to_str()) else {
            continue;
        };
        if !key.starts_with("AWS_") {
            continue;
        }
        if let Ok(key) = key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
            b = b.with_config(key, value);
        }
    }
    b = b
        .with_bucket_name(bucket)
        .with_conditional_put(S3ConditionalPut::ETagMatch);
    if let Some(endpoint) = &s3.endpoint {
        // AWS_ENDPOINT_URL_S3 would win over a plain endpoint: set both.
        b = b
            .with_endpoint(endpoint)
            .with_config(AmazonS3ConfigKey::S3Endpoint, endpoint)
            .with_virtual_hosted_style_request(false);
    }
    if let Some(region) = &s3.region {
        b = b.with_region(region);
    }
    if let Some(allow) = s3.allow_http {
        b = b.with_allow_http(allow);
    }
    if let Some(c) = &s3.credentials {
        // Static keys from receiver.toml: no session token from the
        // environment may be mixed in.
        b = b.with_credentials(Arc::new(StaticCredentialProvider::new(AwsCredential {
            key_id: c.access_key_id.clone(),
            secret_key: c.secret_access_key.clone(),
            token: None,
        })));
    }
    let endpoint = b
        .get_config_value(&AmazonS3ConfigKey::S3Endpoint)
        .or_else(|| b.get_config_value(&AmazonS3ConfigKey::Endpoint));
    let region = b.get_config_value(&AmazonS3ConfigKey::Region);
    let endpoint = match (endpoint, region) {
        (Some(endpoint), None) => {
            b = b.with_region(DEFAULT_ENDPOINT_REGION);
            endpoint
        }
        (Some(endpoint), Some(_)) => endpoint,
        (None, Some(region)) => format!("https://s3.{region}.amazonaws.com"),
        (None, None) => {
            return Err(
                "no region: set `region` in receiver.toml's [s3] table, or AWS_REGION \
                 (an S3-compatible endpoint defaults to us-east-1)"
                    .to_string(),
            )
        }
    };
    let http_allowed = b
        .get_config_value(&AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp))
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    if endpoint.starts_with("http://") && !http_allowed {
        return Err(format!(
            "endpoint {endpoint} is plain HTTP: set `allow_http = true` in [s3] (or \
             AWS_ALLOW_HTTP=true) to send data and signed requests unencrypted"
        ));
    }
    Ok((b, endpoint))
}

/// What a create-only write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object was written.
    Created,
    /// An object was already there and was left as it was.
    AlreadyExists,
}

/// One object found by [`Store::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    /// The key, relative to the store's prefix.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, milliseconds since the Unix epoch.
    pub last_modified_unix_ms: i64,
}

/// A snapshot store: an object store plus the key prefix Lifeboat owns in it.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
    /// `" (endpoint …)"` for a remote store, empty for a local one.
    via: String,
    /// The directory of a local store (its prefix is empty), for
    /// [`Store::read_local_chunk`].
    local_root: Option<PathBuf>,
}

thread_local! {
    // One zstd context per thread: allocating one per block costs more than
    // compressing a 64 KiB block at level 1.
    static ENCODER: RefCell<BlockEncoder> = RefCell::new(BlockEncoder::default());
    static DECODER: RefCell<BlockDecoder> = RefCell::new(BlockDecoder::default());
    static ZSTD_INTO: RefCell<zstd::bulk::Decompressor<'static>> = RefCell::new(
        zstd::bulk::Decompressor::new().expect("zstd: cannot allocate a decompression context"),
    );
}

impl Store {
    /// Opens the store at `url` (creating a local directory if absent).
    /// Performs no network IO: an unreachable S3 endpoint shows on first use.
    pub fn open(url: &StoreUrl, s3: &S3Settings) -> Result<Store> {
        let shown = url.to_string();
        let bad = |reason: String| StoreError::BadUrl {
            url: shown.clone(),
            reason,
        };
        match url {
            StoreUrl::Local { root } => {
                std::fs::create_dir_all(root)
                    .map_err(|e| bad(format!("cannot create {}: {e}", root.display())))?;
                let fs = LocalFileSystem::new_with_prefix(root)
                    .map_err(|e| bad(e.to_string()))?
                    .with_fsync(true);
                Ok(Store {
                    local_root: Some(root.clone()),
                    ..Store::from_object_store(Arc::new(fs), Path::default(), shown.clone())
                })
            }
            StoreUrl::S3 { bucket, prefix } => {
                let (b, endpoint) = s3_builder(bucket, s3).map_err(&bad)?;
                let s3store = b.build().map_err(|e| bad(e.to_string()))?;
                let prefix = Path::parse(prefix).map_err(|e| bad(e.to_string()))?;
                let mut store = Store::from_object_store(Arc::new(s3store), prefix, shown.clone());
                store.via = format!(" (endpoint {endpoint})");
                Ok(store)
            }
        }
    }

    /// Wraps any object store (tests use `object_store::memory::InMemory`);
    /// `url` only names the store in errors.
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, prefix: Path, url: String) -> Store {
        Store {
            inner,
            prefix,
            url,
            via: String::new(),
            local_root: None,
        }
    }

    /// The store's URL, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where the store is reached, as errors show it: `" (endpoint URL)"`
    /// for S3, empty for a local directory.
    pub fn via(&self) -> &str {
        &self.via
    }

    fn location(&self, key: &str) -> Result<Path> {
        let rel = Path::parse(key).map_err(|e| StoreError::BadKey {
            url: self.url.clone(),
            key: key.to_string(),
            reason: e.to_string(),
        })?;
        if rel.parts().next().is_none() {
            return Err(StoreError::BadKey {
                url: self.url.clone(),
                key: key.to_string(),
                reason: "the key is empty".to_string(),
            });
        }
        Ok(self.prefix.parts().chain(rel.parts()).collect())
    }

    fn backend(&self, op: &'static str, key: &str, source: object_store::Error) -> StoreError {
        match source {
            object_store::Error::NotFound { .. } => StoreError::Missing {
                url: self.url.clone(),
                key: key.to_string(),
            },
            error => {
                let detail = describe_backend_error(&error);
                let denied = matches!(
                    error,
                    object_store::Error::PermissionDenied { .. }
                        | object_store::Error::Unauthenticated { .. }
                ) || detail.contains(" 403 Forbidden")
                    || detail.contains(" 401 Unauthorized");
                let unreachable = detail.contains("(Connect)") || detail.contains("connect error");
                let hint = if denied {
                    "access denied: check the credentials ([s3] in receiver.toml, or \
                     AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and their rights on the bucket; "
                } else if unreachable {
                    "cannot connect to the endpoint; "
                } else {
                    ""
                };
                StoreError::Backend {
                    url: self.url.clone(),
                    via: self.via.clone(),
                    op,
                    key: key.to_string(),
                    detail: format!("{hint}{detail}"),
                    error: Box::new(error),
                }
            }
        }
    }

    async fn put_create(&self, key: &str, data: Bytes) -> Result<PutOutcome> {
        let loc = self.location(key)?;
        let mut attempt = 0;
        loop {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            match self
                .inner
                .put_opts(&loc, PutPayload::from(data.clone()), opts)
                .await
            {
                Ok(_) => return Ok(PutOutcome::Created),
                Err(object_store::Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(self.backend("put", key, e)),
            }
            // object_store also reports S3's 409 Conflict as AlreadyExists, and
            // S3 answers a conditional put with 409 when a write or delete of
            // the key is in flight: the object may well be absent. Only an
            // object we can see counts as existing.
            match self.inner.head(&loc).await {
                Ok(_) => return Ok(PutOutcome::AlreadyExists),
                Err(object_store::Error::NotFound { .. }) if attempt < CREATE_CONFLICT_RETRIES => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100 << attempt)).await;
                }
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(StoreError::Conflict {
                        url: self.url.clone(),
                        via: self.via.clone(),
                        key: key.to_string(),
                    })
                }
                Err(e) => return Err(self.backend("head", key, e)),
            }
        }
    }

    /// Writes `data` at `key` unless an object is already there; an existing
    /// object is left untouched and reported, not treated as an error (for
    /// content-addressed chunks, stored once). "Already there" is confirmed by
    /// reading the object's metadata: S3 also refuses a create with a conflict
    /// while another write or delete of the key is in flight, and then the
    /// create is tried again (at most [`CREATE_CONFLICT_RETRIES`] times).
    pub async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome> {
        self.put_create(key, data).await
    }

    /// Writes `data` at `key`, failing with [`StoreError::Exists`] if an object
    /// is already there (manifests: two receivers never clobber each other).
    pub async fn put_new(&self, key: &str, data: Bytes) -> Result<()> {
        match self.put_create(key, data).await? {
            PutOutcome::Created => Ok(()),
            PutOutcome::AlreadyExists => Err(StoreError::Exists {
                url: self.url.clone(),
                key: key.to_string(),
            }),
        }
    }

    /// Reads the object at `key` ([`StoreError::Missing`] if absent).
    pub async fn get(&self, key: &str) -> Result<Bytes> {
        self.get_limited(key, u64::MAX).await
    }

    /// Reads the object at `key`, refusing one larger than `max` bytes before
    /// its body is read.
    pub async fn get_limited(&self, key: &str, max: u64) -> Result<Bytes> {
        let loc = self.location(key)?;
        let res = self
            .inner
            .get_opts(&loc, GetOptions::default())
            .await
            .map_err(|e| self.backend("get", key, e))?;
        if res.meta.size > max {
            return Err(StoreError::TooLarge {
                url: self.url.clone(),
                key: key.to_string(),
                size: res.meta.size,
                max,
            });
        }
        res.bytes().await.map_err(|e| self.backend("get", key, e))
    }

    /// Reads bytes `range` of the object at `key`. Keep `range.end` within the
    /// object's size (from [`Store::list`]): past the end, stores differ (S3
    /// returns what there is, a local store fails).
    pub async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        let loc = self.location(key)?;
        let opts = GetOptions::new().with_range(Some(GetRange::Bounded(range)));
        let res = self
            .inner
            .get_opts(&loc, opts)
            .await
            .map_err(|e| self.backend("get", key, e))?;
        res.bytes().await.map_err(|e| self.backend("get", key, e))
    }

    /// Whether an object exists at `key`.
    pub async fn exists(&self, key: &str) -> Result<bool> {
        let loc = self.location(key)?;
        match self.inner.head(&loc).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.backend("head", key, e)),
        }
    }

    /// Lists every object under the key directory `prefix` (whole segments:
    /// `pits/web-1` does not match `pits/web-10`), in no particular order.
    /// More than `max` objects is an error, not a silently short list: `gc`
    /// must never decide what is unreferenced from part of the manifests.
    pub async fn list(&self, prefix: &str, max: usize) -> Result<Vec<ListedObject>> {
        let loc = self.location(prefix)?;
        let mut stream = self.inner.list(Some(&loc));
        let mut out = Vec::new();
        while let Some(meta) = stream
            .try_next()
            .await
            .map_err(|e| self.backend("list", prefix, e))?
        {
            if out.len() >= max {
                return Err(StoreError::ListTooLong {
                    url: self.url.clone(),
                    prefix: prefix.to_string(),
                    max,
                });
            }
            let Some(rel) = meta.location.prefix_match(&self.prefix) else {
                continue; // not ours (cannot happen for a prefixed listing)
            };
            let key = rel
                .map(|p| p.as_ref().to_string())
                .collect::<Vec<_>>()
                .join("/");
            out.push(ListedObject {
                key,
                size: meta.size,
                last_modified_unix_ms: meta.last_modified.timestamp_millis(),
            });
        }
        Ok(out)
    }

    /// The names of the key directories directly under `prefix` (for
    /// `pits`: the servers), sorted. An absent prefix has none.
    pub async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        let loc = self.location(prefix)?;
        let listed = match self.inner.list_with_delimiter(Some(&loc)).await {
            Ok(l) => l,
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(self.backend("list", prefix, e)),
        };
        let mut out: Vec<String> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Deletes the object at `key`; an absent object is not an error (deletes
    /// are retried by `gc`, and S3 does not report absence either).
    pub async fn delete(&self, key: &str) -> Result<()> {
        let loc = self.location(key)?;
        match self.inner.delete(&loc).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.backend("delete", key, e)),
        }
    }

    /// Stores one block as a chunk, compressed, unless it is already stored.
    /// Re-hashes `raw` first and refuses it if it does not match `digest`.
    pub async fn put_chunk(&self, digest: &BlockHash, raw: &[u8]) -> Result<PutOutcome> {
        let actual = BlockHash::of(raw);
        if actual != *digest {
            return Err(StoreError::DigestMismatch {
                digest: digest.to_hex(),
                actual: actual.to_hex(),
            });
        }
        let object = encode_chunk(raw);
        self.put_if_absent(&chunk_key(digest), object).await
    }

    /// Fetches the chunk of `digest`, decodes it to exactly `expected_len`
    /// bytes and verifies its BLAKE3 digest ([`StoreError::Corrupt`] names the
    /// digest otherwise; [`StoreError::Missing`] if there is no such chunk).
    pub async fn get_chunk(&self, digest: &BlockHash, expected_len: u32) -> Result<Vec<u8>> {
        let object = self.chunk_object(digest, expected_len).await?;
        decode_chunk(digest, &object, expected_len).map_err(|reason| self.corrupt(digest, reason))
    }

    /// Fetches the chunk object of `digest`, still encoded and unverified,
    /// refusing one too large for an `expected_len`-byte block before its body
    /// is read ([`StoreError::Corrupt`]). Pass it to [`Store::verify_chunk_into`].
    pub async fn chunk_object(&self, digest: &BlockHash, expected_len: u32) -> Result<Bytes> {
        let max = CHUNK_HEADER_LEN as u64 + expected_len as u64;
        match self.get_limited(&chunk_key(digest), max).await {
            Err(StoreError::TooLarge { size, max, .. }) => {
                Err(self.corrupt(digest, too_large(size, max, expected_len)))
            }
            other => other,
        }
    }

    /// Whether this is a local store ([`Store::read_local_chunk`] reads it).
    pub fn is_local(&self) -> bool {
        self.local_root.is_some()
    }

    /// For a local store, reads the chunk object of `digest` into `object`
    /// (replacing its contents) with blocking file IO, under the same bound
    /// and errors as [`Store::chunk_object`]; `None` for any other store.
    pub fn read_local_chunk(
        &self,
        digest: &BlockHash,
        expected_len: u32,
        object: &mut Vec<u8>,
    ) -> Option<Result<()>> {
        use std::io::Read;
        let root = self.local_root.as_deref()?;
        let key = chunk_key(digest);
        let io = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::Missing {
                url: self.url.clone(),
                key: key.clone(),
            },
            _ => self.backend(
                "get",
                &key,
                object_store::Error::Generic {
                    store: "LocalFileSystem",
                    source: Box::new(e),
                },
            ),
        };
        let max = CHUNK_HEADER_LEN as u64 + expected_len as u64;
        let mut read = || -> Result<()> {
            let file = std::fs::File::open(local_object_path(root, &key)).map_err(io)?;
            let size = file.metadata().map_err(io)?.len();
            if size > max {
                return Err(self.corrupt(digest, too_large(size, max, expected_len)));
            }
            object.clear();
            object.reserve(size as usize);
            // The bound holds even if the file grew since the stat.
            file.take(max).read_to_end(object).map_err(io)?;
            Ok(())
        };
        Some(read())
    }

    /// Decodes a chunk object to exactly `expected_len` bytes and verifies
    /// their BLAKE3 digest, like [`Store::get_chunk`] but allocating nothing:
    /// the block is returned in place (a raw chunk) or decoded into `scratch`,
    /// which must hold at least `expected_len` bytes.
    pub fn verify_chunk_into<'a>(
        &self,
        digest: &BlockHash,
        object: &'a [u8],
        expected_len: u32,
        scratch: &'a mut [u8],
    ) -> Result<&'a [u8]> {
        decode_chunk_into(digest, object, expected_len, scratch)
            .map_err(|reason| self.corrupt(digest, reason))
    }

    fn corrupt(&self, digest: &BlockHash, reason: String) -> StoreError {
        StoreError::Corrupt {
            url: self.url.clone(),
            key: chunk_key(digest),
            digest: digest.to_hex(),
            reason,
        }
    }
}

/// An object store error and its chain of causes as one line, each message
/// once: object_store's messages embed some of their causes and not others
/// (the deepest, e.g. "Connection refused", only shows in the chain).
pub fn describe_backend_error(error: &object_store::Error) -> String {
    let mut out = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

fn too_large(size: u64, max: u64, expected_len: u32) -> String {
    format!("the object is {size} bytes, more than {max} for a {expected_len}-byte block")
}

/// The key of the chunk holding the block with `digest`:
/// `chunks/<first byte, hex>/<64 hex>`.
pub fn chunk_key(digest: &BlockHash) -> String {
    let hex = digest.to_hex();
    format!("{CHUNKS_DIR}/{}/{hex}", &hex[..2])
}

/// The digest a chunk key names, if `key` is one.
pub fn parse_chunk_key(key: &str) -> Option<BlockHash> {
    let rest = key.strip_prefix(CHUNKS_DIR)?.strip_prefix('/')?;
    let (fan, hex) = rest.split_once('/')?;
    let digest: BlockHash = hex.parse().ok()?;
    (fan.len() == 2 && hex.starts_with(fan) && hex == digest.to_hex()).then_some(digest)
}

/// The key directory of one volume's manifests: `pits/<server>/<volume>`.
pub fn manifest_dir(server: &str, volume: &str) -> Result<String> {
    let server = ServerName::new(server)?;
    let volume = VolumeName::new(volume)?;
    Ok(format!(
        "{PITS_DIR}/{}/{}",
        server.as_str(),
        volume.as_str()
    ))
}

/// The key of a manifest:
/// `pits/<server>/<volume>/<20-digit zero-padded epoch>-<pit id>.manifest`.
/// `pit_id` must be a key-safe token (the caller validates its syntax; here it
/// is only checked not to contain `/`, `.` or `-`).
pub fn manifest_key(server: &str, volume: &str, epoch: u64, pit_id: &str) -> Result<String> {
    let dir = manifest_dir(server, volume)?;
    if pit_id.is_empty() || !pit_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(StoreError::BadKey {
            url: String::new(),
            key: pit_id.to_string(),
            reason: "a PIT id must be non-empty ASCII letters and digits".to_string(),
        });
    }
    Ok(format!("{dir}/{epoch:020}-{pit_id}{MANIFEST_SUFFIX}"))
}

/// Splits the file name of a manifest key (`<epoch>-<id>.manifest`, the part
/// after the volume's directory) into epoch and PIT id.
pub fn parse_manifest_name(name: &str) -> Option<(u64, &str)> {
    let stem = name.strip_suffix(MANIFEST_SUFFIX)?;
    let (epoch, id) = stem.split_once('-')?;
    if epoch.len() != 20 || !epoch.bytes().all(|b| b.is_ascii_digit()) || id.is_empty() {
        return None;
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    Some((epoch.parse().ok()?, id))
}

/// Encodes one block as a chunk object (see the module doc for the format).
pub fn encode_chunk(raw: &[u8]) -> Bytes {
    let raw_len = u32::try_from(raw.len()).expect("a block is at most 4 MiB");
    let (encoding, payload) = ENCODER.with(|e| e.borrow_mut().encode(raw));
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + payload.len());
    out.push(u8::from(encoding));
    out.extend_from_slice(&raw_len.to_le_bytes());
    out.extend_from_slice(&payload);
    Bytes::from(out)
}

/// Decodes a chunk object to exactly `expected_len` bytes and verifies that
/// they hash to `digest`; the error says what is wrong. Never panics, and
/// allocates at most `expected_len` bytes.
pub fn decode_chunk(
    digest: &BlockHash,
    object: &[u8],
    expected_len: u32,
) -> std::result::Result<Vec<u8>, String> {
    let (encoding, payload) = chunk_header(object, expected_len)?;
    let data = DECODER
        .with(|d| {
            d.borrow_mut()
                .decode(encoding, expected_len, payload, expected_len)
        })
        .map_err(|e| e.to_string())?;
    check_digest(digest, encoding, &data)?;
    Ok(data)
}

/// [`decode_chunk`] without allocating: the block is `object`'s payload (raw)
/// or is decoded into the first `expected_len` bytes of `scratch`.
pub fn decode_chunk_into<'a>(
    digest: &BlockHash,
    object: &'a [u8],
    expected_len: u32,
    scratch: &'a mut [u8],
) -> std::result::Result<&'a [u8], String> {
    let (encoding, payload) = chunk_header(object, expected_len)?;
    let want = expected_len as usize;
    let room = scratch.len();
    let Some(out) = scratch.get_mut(..want) else {
        return Err(format!(
            "the decode buffer holds {room} bytes, less than the {want}-byte block"
        ));
    };
    let data: &[u8] = match encoding {
        Encoding::Raw if payload.len() == want => payload,
        Encoding::Raw => {
            return Err(BlockDecodeError::RawLength {
                raw_len: expected_len,
                payload_len: payload.len(),
            }
            .to_string())
        }
        Encoding::Zero if payload.is_empty() => {
            out.fill(0);
            out
        }
        Encoding::Zero => {
            return Err(BlockDecodeError::ZeroPayload {
                payload_len: payload.len(),
            }
            .to_string())
        }
        // Single-shot into a slice of exactly the block's length: a frame
        // claiming more content fails instead of allocating.
        Encoding::Zstd => {
            match ZSTD_INTO.with(|z| z.borrow_mut().decompress_to_buffer(payload, out)) {
                Ok(n) if n == want => out,
                Ok(n) => {
                    return Err(BlockDecodeError::ZstdLength {
                        raw_len: expected_len,
                        actual: n,
                    }
                    .to_string())
                }
                Err(e) => {
                    return Err(BlockDecodeError::Zstd {
                        raw_len: expected_len,
                        payload_len: payload.len(),
                        reason: e.to_string(),
                    }
                    .to_string())
                }
            }
        }
    };
    check_digest(digest, encoding, data)?;
    Ok(data)
}

/// Checks a chunk's header against the block's length; returns its encoding
/// and payload.
fn chunk_header(
    object: &[u8],
    expected_len: u32,
) -> std::result::Result<(Encoding, &[u8]), String> {
    if object.len() < CHUNK_HEADER_LEN {
        return Err(format!(
            "the object is {} bytes, shorter than the {CHUNK_HEADER_LEN}-byte chunk header",
            object.len()
        ));
    }
    let encoding = Encoding::try_from(object[0]).map_err(|e| e.to_string())?;
    let raw_len = u32::from_le_bytes([object[1], object[2], object[3], object[4]]);
    if raw_len != expected_len {
        return Err(format!(
            "the chunk holds {raw_len} bytes but the block is {expected_len} bytes"
        ));
    }
    Ok((encoding, &object[CHUNK_HEADER_LEN..]))
}

fn check_digest(
    digest: &BlockHash,
    encoding: Encoding,
    data: &[u8],
) -> std::result::Result<(), String> {
    let actual = BlockHash::of(data);
    if actual != *digest {
        return Err(format!(
            "its {} content hashes to {actual}",
            encoding.name()
        ));
    }
    Ok(())
}

/// The absolute filesystem path of `key` in a local store rooted at `root`
/// (tests and diagnostics: e.g. to corrupt a chunk on purpose).
pub fn local_object_path(root: &FsPath, key: &str) -> PathBuf {
    key.split('/')
        .fold(root.to_path_buf(), |p, seg| p.join(seg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("store");
        let url = StoreUrl::parse(&format!("file://{}", root.display())).expect("url");
        let store = Store::open(&url, &S3Settings::default()).expect("open");
        (dir, store)
    }

    fn text_block(len: usize) -> Vec<u8> {
        b"lifeboat block store "
            .iter()
            .cycle()
            .take(len)
            .copied()
            .collect()
    }

    fn random_block(len: usize, mut s: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn urls_parse_and_name_themselves_in_errors() {
        assert_eq!(
            StoreUrl::parse("file:///srv/lifeboat").expect("file"),
            StoreUrl::Local {
                root: "/srv/lifeboat".into()
            }
        );
        assert_eq!(
            StoreUrl::parse("/srv/lifeboat").expect("bare"),
            StoreUrl::Local {
                root: "/srv/lifeboat".into()
            }
        );
        assert_eq!(
            StoreUrl::parse("s3://my-bucket/dr/prod/").expect("s3"),
            StoreUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "dr/prod".into()
            }
        );
        assert_eq!(
            StoreUrl::parse("s3://my-bucket").expect("s3").to_string(),
            "s3://my-bucket"
        );
        assert_eq!(
            StoreUrl::parse("s3://my-bucket/a/b")
                .expect("s3")
                .to_string(),
            "s3://my-bucket/a/b"
        );
        for bad in [
            "relative/dir",
            "file://host/srv",
            "file://relative",
            "s3://",
            "s3://Upper/x",
            "s3://b/x",
            "s3://bucket/a//b",
            "gs://bucket/x",
            "/srv/../etc",
        ] {
            let err = StoreUrl::parse(bad).expect_err(bad).to_string();
            assert!(err.contains(bad), "{err:?} should name {bad:?}");
        }
    }

    #[tokio::test]
    async fn s3_store_opens_without_network() {
        let url = StoreUrl::parse("s3://lifeboat-test/prefix").expect("url");
        let s3 = S3Settings {
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            allow_http: Some(true),
            credentials: None,
        };
        let store = Store::open(&url, &s3).expect("open");
        assert_eq!(store.url(), "s3://lifeboat-test/prefix");
    }

    #[tokio::test]
    async fn s3_settings_are_checked_at_open() {
        let url = StoreUrl::parse("s3://lifeboat-test/prefix").expect("url");
        // A plain-HTTP endpoint needs allow_http.
        let s3 = S3Settings {
            endpoint: Some("http://127.0.0.1:9".into()),
            allow_http: Some(false),
            ..S3Settings::default()
        };
        let err = Store::open(&url, &s3).expect_err("plain http").to_string();
        assert!(
            err.contains("allow_http") && err.contains("s3://lifeboat-test/prefix"),
            "{err}"
        );
        // An endpoint defaults the region; the endpoint is named in errors.
        let s3 = S3Settings {
            endpoint: Some("https://objects.example:9000".into()),
            ..S3Settings::default()
        };
        let store = Store::open(&url, &s3).expect("open");
        assert_eq!(store.via(), " (endpoint https://objects.example:9000)");
        // AWS itself needs a region (only checkable if the environment names none).
        let env_names_one = std::env::vars().any(|(k, _)| {
            k.starts_with("AWS_") && (k.contains("REGION") || k.contains("ENDPOINT"))
        });
        if !env_names_one {
            let err = Store::open(&url, &S3Settings::default())
                .expect_err("no region")
                .to_string();
            assert!(err.contains("region"), "{err}");
            let s3 = S3Settings {
                region: Some("eu-west-1".into()),
                ..S3Settings::default()
            };
            let store = Store::open(&url, &s3).expect("open");
            assert_eq!(
                store.via(),
                " (endpoint https://s3.eu-west-1.amazonaws.com)"
            );
        }
    }

    #[test]
    fn keys_have_the_documented_layout() {
        let d = BlockHash::of(b"x");
        let key = chunk_key(&d);
        assert_eq!(key, format!("chunks/{}/{}", &d.to_hex()[..2], d.to_hex()));
        assert_eq!(parse_chunk_key(&key), Some(d));
        assert_eq!(parse_chunk_key("chunks/00/abc"), None);
        assert_eq!(
            parse_chunk_key(&format!("chunks/zz/{}", d.to_hex())),
            None,
            "the fan-out must match the digest"
        );
        let m = manifest_key("web-1", "data", 42, "0abc").expect("key");
        assert_eq!(m, "pits/web-1/data/00000000000000000042-0abc.manifest");
        let name = m.rsplit('/').next().expect("name");
        assert_eq!(parse_manifest_name(name), Some((42, "0abc")));
        assert_eq!(parse_manifest_name("42-0abc.manifest"), None);
        assert_eq!(
            manifest_key("web-1", "data", u64::MAX, "a").expect("key"),
            "pits/web-1/data/18446744073709551615-a.manifest"
        );
        assert!(matches!(
            manifest_key("../x", "data", 1, "a"),
            Err(StoreError::Name(_))
        ));
        assert!(matches!(
            manifest_key("web-1", "data/../../x", 1, "a"),
            Err(StoreError::Name(_))
        ));
        assert!(matches!(
            manifest_key("web-1", "data", 1, "a/b"),
            Err(StoreError::BadKey { .. })
        ));
    }

    #[tokio::test]
    async fn chunks_round_trip_in_every_encoding() {
        let (_dir, store) = local_store();
        let blocks = [
            ("zero", vec![0u8; 65536]),
            ("raw", random_block(65536, 7)),
            ("zstd", text_block(65536)),
            ("short zstd", text_block(1808)),
            ("short raw", random_block(3, 9)),
        ];
        for (name, raw) in &blocks {
            let d = BlockHash::of(raw);
            assert_eq!(
                store.put_chunk(&d, raw).await.expect(name),
                PutOutcome::Created,
                "{name}"
            );
            let back = store.get_chunk(&d, raw.len() as u32).await.expect(name);
            assert_eq!(&back, raw, "{name}");
            // Stored once: the second put finds it.
            assert_eq!(
                store.put_chunk(&d, raw).await.expect(name),
                PutOutcome::AlreadyExists
            );
        }
        // The stored forms really are the three encodings.
        for (raw, enc, max_len) in [
            (&blocks[0].1, Encoding::Zero, CHUNK_HEADER_LEN),
            (&blocks[1].1, Encoding::Raw, CHUNK_HEADER_LEN + 65536),
            (&blocks[2].1, Encoding::Zstd, 4096),
        ] {
            let obj = store
                .get(&chunk_key(&BlockHash::of(raw)))
                .await
                .expect("get");
            assert_eq!(obj[0], u8::from(enc));
            assert!(obj.len() <= max_len, "{enc:?}: {} bytes", obj.len());
        }
    }

    #[tokio::test]
    async fn local_reads_into_reused_buffers_match_get_chunk() {
        let (dir, store) = local_store();
        assert!(store.is_local());
        let mut object = Vec::new();
        let mut scratch = vec![0xaa; 65536];
        for (name, raw) in [
            ("zero", vec![0u8; 65536]),
            ("raw", random_block(65536, 7)),
            ("zstd", text_block(65536)),
            ("short zstd", text_block(1808)),
            ("short raw", random_block(3, 9)),
        ] {
            let d = BlockHash::of(&raw);
            let len = raw.len() as u32;
            store.put_chunk(&d, &raw).await.expect(name);
            store
                .read_local_chunk(&d, len, &mut object)
                .expect("a local store")
                .expect(name);
            let fetched = store.chunk_object(&d, len).await.expect(name);
            assert_eq!(object, &fetched[..], "{name}");
            let block = store
                .verify_chunk_into(&d, &object, len, &mut scratch)
                .expect(name);
            assert_eq!(block, &raw[..], "{name}");
        }

        // The same checks as get_chunk: wrong length, too large, corrupt, missing.
        let raw = text_block(65536);
        let d = BlockHash::of(&raw);
        store
            .read_local_chunk(&d, 65536, &mut object)
            .expect("local")
            .expect("read");
        let err = store
            .verify_chunk_into(&d, &object, 65535, &mut scratch)
            .expect_err("length");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        let err = store
            .verify_chunk_into(&d, &object, 65536, &mut scratch[..100])
            .expect_err("scratch too small");
        assert!(err.to_string().contains("decode buffer"), "{err}");
        let raw_small = random_block(64, 1);
        let ds = BlockHash::of(&raw_small);
        store.put_chunk(&ds, &raw_small).await.expect("put");
        let err = store
            .read_local_chunk(&ds, 8, &mut object)
            .expect("local")
            .expect_err("too large");
        assert!(err.to_string().contains("more than 13"), "{err}");
        let path = local_object_path(&dir.path().join("store"), &chunk_key(&d));
        let mut bytes = std::fs::read(&path).expect("stored object");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).expect("corrupt");
        store
            .read_local_chunk(&d, 65536, &mut object)
            .expect("local")
            .expect("read");
        let err = store
            .verify_chunk_into(&d, &object, 65536, &mut scratch)
            .expect_err("corrupt");
        assert!(err.to_string().contains(&d.to_hex()), "{err}");
        let absent = BlockHash::of(b"never stored");
        let err = store
            .read_local_chunk(&absent, 12, &mut object)
            .expect("local")
            .expect_err("missing");
        assert!(matches!(err, StoreError::Missing { .. }), "{err}");

        let other = Store::from_object_store(
            Arc::new(object_store::memory::InMemory::new()),
            Path::default(),
            "memory:".into(),
        );
        assert!(!other.is_local());
        assert!(other.read_local_chunk(&d, 65536, &mut object).is_none());
    }

    #[tokio::test]
    async fn chunk_under_a_wrong_digest_is_refused() {
        let (_dir, store) = local_store();
        let wrong = BlockHash::of(b"something else");
        let err = store
            .put_chunk(&wrong, b"block")
            .await
            .expect_err("refused");
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(!store.exists(&chunk_key(&wrong)).await.expect("exists"));
    }

    #[tokio::test]
    async fn corrupt_chunk_names_its_digest() {
        let (dir, store) = local_store();
        let root = dir.path().join("store");
        for (name, raw) in [("zstd", text_block(65536)), ("raw", random_block(4096, 3))] {
            let d = BlockHash::of(&raw);
            store.put_chunk(&d, &raw).await.expect("put");
            let path = local_object_path(&root, &chunk_key(&d));
            let mut bytes = std::fs::read(&path).expect("stored object");
            let last = bytes.len() - 1;
            bytes[last] ^= 0x01;
            std::fs::write(&path, &bytes).expect("corrupt it");
            let err = store.get_chunk(&d, raw.len() as u32).await.expect_err(name);
            assert!(matches!(err, StoreError::Corrupt { .. }), "{name}: {err}");
            assert!(err.to_string().contains(&d.to_hex()), "{name}: {err}");
        }
        // A wrong expected length, a truncated header and an unknown encoding.
        let raw = text_block(4096);
        let d = BlockHash::of(&raw);
        store.put_chunk(&d, &raw).await.expect("put");
        let err = store.get_chunk(&d, 8192).await.expect_err("length");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(decode_chunk(&d, &[1, 0], 4096).is_err());
        assert!(decode_chunk(&d, &[9, 0, 16, 0, 0], 4096)
            .expect_err("tag")
            .contains("unknown block encoding"));
        // A chunk that was never stored.
        let absent = BlockHash::of(b"absent");
        let err = store.get_chunk(&absent, 6).await.expect_err("missing");
        assert!(matches!(err, StoreError::Missing { .. }), "{err}");
        assert!(err.to_string().contains(&absent.to_hex()), "{err}");
    }

    #[tokio::test]
    async fn create_only_writes() {
        let (_dir, store) = local_store();
        let key = "pits/web-1/data/00000000000000000001-a.manifest";
        assert_eq!(
            store
                .put_if_absent("chunks/x", Bytes::from_static(b"1"))
                .await
                .expect("first"),
            PutOutcome::Created
        );
        assert_eq!(
            store
                .put_if_absent("chunks/x", Bytes::from_static(b"2"))
                .await
                .expect("second"),
            PutOutcome::AlreadyExists
        );
        assert_eq!(&store.get("chunks/x").await.expect("get")[..], b"1");

        store
            .put_new(key, Bytes::from_static(b"first"))
            .await
            .expect("first");
        let err = store
            .put_new(key, Bytes::from_static(b"second"))
            .await
            .expect_err("second");
        assert!(matches!(err, StoreError::Exists { .. }), "{err}");
        assert!(err.to_string().contains(key), "{err}");
        assert_eq!(&store.get(key).await.expect("get")[..], b"first");
    }

    #[tokio::test]
    async fn get_exists_list_delete() {
        let (_dir, store) = local_store();
        let err = store.get("pits/a/b/c").await.expect_err("missing");
        assert!(matches!(err, StoreError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("pits/a/b/c"), "{err}");
        assert!(!store.exists("pits/a/b/c").await.expect("exists"));

        for key in [
            "pits/web-1/a",
            "pits/web-1/b",
            "pits/web-10/c",
            "chunks/00/d",
        ] {
            store
                .put_new(key, Bytes::from(key.as_bytes().to_vec()))
                .await
                .expect("put");
        }
        assert!(store.exists("pits/web-1/a").await.expect("exists"));
        assert_eq!(
            store.list_dirs("pits").await.expect("dirs"),
            ["web-1", "web-10"]
        );
        assert!(store.list_dirs("nothing").await.expect("none").is_empty());
        let mut listed = store.list("pits/web-1", 10).await.expect("list");
        listed.sort_by(|a, b| a.key.cmp(&b.key));
        let keys: Vec<_> = listed.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["pits/web-1/a", "pits/web-1/b"]);
        assert_eq!(listed[0].size, "pits/web-1/a".len() as u64);
        assert!(listed[0].last_modified_unix_ms > 1_600_000_000_000);
        assert!(store.list("nothing", 10).await.expect("empty").is_empty());
        let err = store.list("pits", 2).await.expect_err("bounded");
        assert!(
            matches!(err, StoreError::ListTooLong { max: 2, .. }),
            "{err}"
        );

        let err = store.get_limited("pits/web-1/a", 3).await.expect_err("big");
        assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
        assert_eq!(
            &store.get_range("pits/web-1/a", 0..4).await.expect("range")[..],
            b"pits"
        );

        store.delete("pits/web-1/a").await.expect("delete");
        store
            .delete("pits/web-1/a")
            .await
            .expect("delete is idempotent");
        assert!(!store.exists("pits/web-1/a").await.expect("exists"));

        for bad in ["", "/", "a//b", "../x"] {
            let err = store.get(bad).await.expect_err(bad);
            assert!(matches!(err, StoreError::BadKey { .. }), "{bad:?}: {err}");
        }
    }

    #[tokio::test]
    async fn prefix_is_applied_and_stripped() {
        let inner = Arc::new(object_store::memory::InMemory::new());
        let store = Store::from_object_store(
            inner.clone(),
            Path::parse("dr/prod").expect("prefix"),
            "memory://".into(),
        );
        store
            .put_new("pits/s/v/x", Bytes::from_static(b"m"))
            .await
            .expect("put");
        assert!(inner
            .head(&Path::parse("dr/prod/pits/s/v/x").expect("path"))
            .await
            .is_ok());
        let listed = store.list("pits", 10).await.expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].key, "pits/s/v/x");
    }
}
