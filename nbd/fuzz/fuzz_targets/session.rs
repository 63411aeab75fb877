//! Arbitrary bytes as the whole client side of a session (handshake, option
//! haggling, requests) against an in-memory export: the server must neither
//! panic nor hang, whatever it is sent.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use lifeboat_nbd::{serve_connection, ExportMap, MemExport, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let exports = ExportMap::new()
            .with("disk", Arc::new(MemExport::new(64 * 1024)))
            .with("ro", Arc::new(MemExport::from_vec(vec![7; 4096], true)))
            .with_default("disk");
        let config = ServerConfig {
            max_payload: 16 * 1024,
            handshake_timeout: Duration::from_secs(5),
            max_options: 64,
            ..ServerConfig::default()
        };
        let (mut rd, mut wr) = tokio::io::split(client);
        let write = async move {
            // The server may close early; the rest of the input is then moot.
            let _ = wr.write_all(data).await;
            let _ = wr.shutdown().await;
        };
        let read = async move {
            let mut sink = [0u8; 8192];
            while let Ok(n) = rd.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        let serve = async {
            let _ = serve_connection(server, &exports, &config).await;
        };
        let all = async {
            tokio::join!(serve, write, read);
        };
        tokio::time::timeout(Duration::from_secs(20), all)
            .await
            .expect("the session ends once the client input ends");
    });
});
