//! PIT stores on S3, against a real S3 server (`s3s-fs` on 127.0.0.1): the
//! store seam itself (chunks, create-only writes, listing, errors), PITs
//! through the real binaries, and the errors an operator meets first (wrong
//! secret, dead endpoint, `[s3]` without an S3 store).
//!
//! Without `s3s-fs` these tests fail, naming the install command, unless
//! `LIFEBOAT_SKIP_S3=1` (then they record a skip).

use std::time::{Duration, Instant};

use bytes::Bytes;
use lifeboat_protocol::BlockHash;
use lifeboat_receiver::store::{
    chunk_key, PutOutcome, S3Credentials, S3Settings, Store, StoreError, StoreUrl,
};
use lifeboat_tests::{
    free_tcp_port, pits_are_taken_listed_and_launched_exactly, PitStore, Receiver, S3Server, SERVER,
};

/// Opens the bucket of `server` under `prefix` through the library.
fn open(server: &S3Server, prefix: &str, secret: &str) -> Store {
    let url = StoreUrl::parse(&server.store_url(prefix)).expect("url");
    let settings = S3Settings {
        endpoint: Some(server.endpoint.clone()),
        region: None,
        allow_http: Some(true),
        credentials: Some(S3Credentials {
            access_key_id: server.access_key.clone(),
            secret_access_key: secret.to_string(),
        }),
    };
    Store::open(&url, &settings).expect("open the S3 store")
}

fn block(len: usize, seed: u8, text: bool) -> Vec<u8> {
    let mut s = u64::from(seed) | 1;
    (0..len)
        .map(|i| {
            if text {
                b"lifeboat s3 chunk "[i % 18]
            } else {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn chunks_round_trip_and_are_verified_on_s3() {
    let Some(server) = S3Server::start("s3::chunks_round_trip_and_are_verified_on_s3") else {
        return;
    };
    let store = open(&server, "dr/unit", &server.secret_key);
    assert_eq!(store.url(), "s3://lifeboat-test/dr/unit");
    let blocks = [
        ("zero", vec![0u8; 65536]),
        ("raw", block(65536, 7, false)),
        ("zstd", block(65536, 0, true)),
        ("short", block(1000, 3, false)),
    ];
    for (name, raw) in &blocks {
        let d = BlockHash::of(raw);
        assert_eq!(
            store.put_chunk(&d, raw).await.expect(name),
            PutOutcome::Created,
            "{name}"
        );
        assert_eq!(
            store.put_chunk(&d, raw).await.expect(name),
            PutOutcome::AlreadyExists,
            "{name}: stored once"
        );
        let back = store.get_chunk(&d, raw.len() as u32).await.expect(name);
        assert_eq!(&back, raw, "{name}");
        // Really in the bucket, under the prefix.
        let file = server.object_path(&format!("dr/unit/{}", chunk_key(&d)));
        assert!(file.is_file(), "{name}: {} missing", file.display());
    }

    // A corrupt chunk is found and named, whatever the server says.
    let d = BlockHash::of(&blocks[2].1);
    let file = server.object_path(&format!("dr/unit/{}", chunk_key(&d)));
    let mut bytes = std::fs::read(&file).expect("read the object");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, bytes).expect("corrupt it");
    let err = store.get_chunk(&d, 65536).await.expect_err("corrupt");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(&d.to_hex()), "{err}");

    // A chunk that was never stored.
    let absent = BlockHash::of(b"absent");
    let err = store.get_chunk(&absent, 6).await.expect_err("missing");
    assert!(matches!(err, StoreError::Missing { .. }), "{err}");
    assert!(err.to_string().contains(&absent.to_hex()), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn create_only_writes_list_and_missing_keys_on_s3() {
    let Some(server) = S3Server::start("s3::create_only_writes_list_and_missing_keys_on_s3") else {
        return;
    };
    let store = open(&server, "dr/unit", &server.secret_key);

    // The server itself refuses the second create (If-None-Match: *): the
    // first object stays.
    let key = "pits/web-1/data/00000000000000000001-a.manifest";
    store
        .put_new(key, Bytes::from_static(b"first"))
        .await
        .expect("first create");
    let err = store
        .put_new(key, Bytes::from_static(b"second"))
        .await
        .expect_err("second create");
    assert!(matches!(err, StoreError::Exists { .. }), "{err}");
    assert!(err.to_string().contains(key), "{err}");
    assert_eq!(&store.get(key).await.expect("get")[..], b"first");
    assert_eq!(
        std::fs::read(server.object_path(&format!("dr/unit/{key}"))).expect("object file"),
        b"first"
    );
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

    // Missing keys.
    let err = store.get("pits/a/b/c").await.expect_err("missing");
    assert!(matches!(err, StoreError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("pits/a/b/c"), "{err}");
    assert!(!store.exists("pits/a/b/c").await.expect("exists"));

    // Listing: whole key segments, keys relative to the prefix.
    for k in ["pits/web-1/b", "pits/web-10/c", "chunks/00/d"] {
        store
            .put_new(k, Bytes::from(k.as_bytes().to_vec()))
            .await
            .expect("put");
    }
    let mut listed = store.list("pits/web-1", 10).await.expect("list");
    listed.sort_by(|a, b| a.key.cmp(&b.key));
    let keys: Vec<_> = listed.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, ["pits/web-1/b", key]);
    assert_eq!(listed[1].size, 5);
    assert!(listed[1].last_modified_unix_ms > 1_600_000_000_000);
    assert!(store.list("nothing", 10).await.expect("empty").is_empty());
    let err = store.list("pits", 2).await.expect_err("bounded");
    assert!(
        matches!(err, StoreError::ListTooLong { max: 2, .. }),
        "{err}"
    );
    // Another prefix of the same bucket sees none of it.
    let other = open(&server, "dr/other", &server.secret_key);
    assert!(other.list("pits", 10).await.expect("list").is_empty());

    // Ranges, size limits, deletes.
    assert_eq!(
        &store.get_range("pits/web-1/b", 0..4).await.expect("range")[..],
        b"pits"
    );
    let err = store.get_limited("pits/web-1/b", 3).await.expect_err("big");
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
    store.delete("pits/web-1/b").await.expect("delete");
    store.delete("pits/web-1/b").await.expect("idempotent");
    assert!(!store.exists("pits/web-1/b").await.expect("exists"));

    // A wrong secret: denied, naming the store, the endpoint and what to check.
    let wrong = open(&server, "dr/unit", "not-the-secret");
    let err = wrong.get(key).await.expect_err("denied");
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Backend { .. }), "{msg}");
    assert!(msg.contains("s3://lifeboat-test/dr/unit"), "{msg}");
    assert!(msg.contains(&server.endpoint), "{msg}");
    assert!(msg.contains("credentials"), "{msg}");
}

#[test]
fn pits_are_taken_listed_and_launched_exactly_on_s3() {
    let Some(server) = S3Server::start("s3::pits_are_taken_listed_and_launched_exactly_on_s3")
    else {
        return;
    };
    pits_are_taken_listed_and_launched_exactly(PitStore::S3 {
        server: &server,
        prefix: "dr/e2e",
    });
}

/// `pits` with the credentials in receiver.toml: the right secret lists, a
/// wrong one fails naming the store and the endpoint.
#[test]
fn wrong_secret_fails_naming_the_store() {
    let Some(server) = S3Server::start("s3::wrong_secret_fails_naming_the_store") else {
        return;
    };
    let rx = Receiver::init_only();
    rx.prepend_config(&format!("store = {:?}\n", server.store_url("dr/creds")));
    rx.append_config(&format!(
        "\n[s3]\nendpoint = {:?}\nregion = \"us-east-1\"\nallow_http = true\n\
         access_key_id = {:?}\nsecret_access_key_file = \"s3.secret\"\n",
        server.endpoint, server.access_key
    ));
    let secret = rx.dir.join("s3.secret");
    std::fs::write(&secret, format!("{}\n", server.secret_key)).expect("write the secret");
    let args = ["pits", "--server", SERVER, "--volume", "data"];
    let out = rx.command(&args);
    assert!(out.status.success(), "pits failed: {}", out.stderr);
    assert!(
        out.stdout.contains("no PITs") && out.stdout.contains("s3://lifeboat-test/dr/creds"),
        "{}",
        out.stdout
    );

    std::fs::write(&secret, "not-the-secret\n").expect("write a wrong secret");
    let out = rx.command(&args);
    let err = out.expect_failure();
    assert!(err.contains("s3://lifeboat-test/dr/creds"), "{err}");
    assert!(err.contains(&server.endpoint), "{err}");
    assert!(err.contains("credentials"), "{err}");
}

/// A dead endpoint fails `pits` within seconds, naming the store and the
/// endpoint (no s3s-fs needed).
#[test]
fn unreachable_endpoint_fails_in_bounded_time() {
    let mut rx = Receiver::init_only();
    let endpoint = format!("http://127.0.0.1:{}", free_tcp_port());
    rx.prepend_config("store = \"s3://lifeboat-test/dr/dead\"\n");
    rx.append_config(&format!(
        "\n[s3]\nendpoint = {endpoint:?}\nallow_http = true\n"
    ));
    rx.set_env("AWS_ACCESS_KEY_ID", "k");
    rx.set_env("AWS_SECRET_ACCESS_KEY", "s");
    let started = Instant::now();
    let out = rx.command(&["pits", "--server", SERVER, "--volume", "data"]);
    let took = started.elapsed();
    let err = out.expect_failure();
    assert!(err.contains("s3://lifeboat-test/dr/dead"), "{err}");
    assert!(err.contains(&endpoint), "{err}");
    assert!(
        took < Duration::from_secs(30),
        "a refused connection took {took:?} to fail"
    );
}

/// `[s3]` with a local store, and unknown `[s3]` keys, are refused naming what
/// is wrong (no s3s-fs needed).
#[test]
fn s3_table_mistakes_are_named() {
    let rx = Receiver::init_only();
    let config = rx.dir.join("receiver.toml");
    let original = std::fs::read_to_string(&config).expect("read receiver.toml");
    let args = ["pits", "--server", SERVER, "--volume", "data"];

    rx.append_config("\n[s3]\nregion = \"eu-west-1\"\n");
    let out = rx.command(&args);
    let err = out.expect_failure();
    assert!(err.contains("[s3]") && err.contains("s3://"), "{err}");

    std::fs::write(&config, &original).expect("restore receiver.toml");
    rx.prepend_config("store = \"s3://lifeboat-test/x\"\n");
    rx.append_config("\n[s3]\nsecret_access_key = \"inline\"\n");
    let out = rx.command(&args);
    let err = out.expect_failure();
    assert!(err.contains("secret_access_key"), "{err}");
}
