//! Serves one file as an NBD export with [`FileExport`], nothing else: the
//! NBD server core without replication, for comparing it with `qemu-nbd` and
//! with the agent's replicated export (`scripts/bench-nbd.sh`).
//!
//! ```text
//! cargo run --release -p lifeboat-nbd --example serve_file -- IMAGE NAME ADDR
//! ```
//! `ADDR` is `HOST:PORT` or `unix:PATH`. Prints `nbd on ADDR` once serving;
//! runs until killed.

use std::sync::Arc;

use lifeboat_nbd::{ExportMap, FileExport, Listen, Server, ServerConfig};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [image, name, addr] = args.as_slice() else {
        return Err("usage: serve_file IMAGE NAME HOST:PORT|unix:PATH".into());
    };
    let listen: Listen = addr.parse()?;
    let export = FileExport::open(image, false).map_err(|e| format!("cannot open {image}: {e}"))?;
    let exports = ExportMap::new()
        .with(name.as_str(), Arc::new(export))
        .with_default(name.as_str());
    let server = Server::new(Arc::new(exports), ServerConfig::default());
    let (bound, task) = server.spawn(&listen, CancellationToken::new()).await?;
    println!("nbd on {bound}");
    task.await?;
    Ok(())
}
