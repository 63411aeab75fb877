//! Real peers: qemu-io, qemu-img (and nbdinfo when installed) against a
//! `Server` serving a `FileExport` on 127.0.0.1 and on a Unix socket.
//!
//! Every external command runs under a time limit and is killed on drop.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use lifeboat_nbd::{ExportMap, FileExport, Server, ServerConfig};
use tokio::process::Command;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const MIB: usize = 1 << 20;
const COMMAND_LIMIT: Duration = Duration::from_secs(120);

struct Served {
    token: CancellationToken,
    task: JoinHandle<()>,
}

impl Served {
    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("server stops in time")
            .expect("server task");
    }
}

fn image(dir: &Path, name: &str, size: usize, byte: u8) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, vec![byte; size]).expect("write image");
    path
}

fn exports(path: &Path, name: &str) -> ExportMap {
    let export = FileExport::open(path, false)
        .expect("open image")
        .with_description("lifeboat test image");
    ExportMap::new()
        .with(name, Arc::new(export))
        .with_default(name)
}

async fn serve_tcp(exports: ExportMap) -> (u16, Served) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = Server::new(Arc::new(exports), ServerConfig::default());
    let token = CancellationToken::new();
    let t = token.clone();
    let task = tokio::spawn(async move { server.serve_tcp(listener, t).await });
    (port, Served { token, task })
}

async fn serve_unix(exports: ExportMap, socket: &Path) -> Served {
    let listener = tokio::net::UnixListener::bind(socket).expect("bind unix");
    let server = Server::new(Arc::new(exports), ServerConfig::default());
    let token = CancellationToken::new();
    let t = token.clone();
    let task = tokio::spawn(async move { server.serve_unix(listener, t).await });
    Served { token, task }
}

async fn run(program: &str, args: &[&str]) -> Output {
    let out = tokio::time::timeout(
        COMMAND_LIMIT,
        Command::new(program).args(args).kill_on_drop(true).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{program} {args:?} did not finish in {COMMAND_LIMIT:?}"))
    .unwrap_or_else(|e| panic!("{program} could not start: {e}"));
    eprintln!(
        "$ {program} {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs qemu-io with one `-c` per command and checks that every command worked.
async fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    let out = run("qemu-io", &args).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-io failed: {text}");
    let lower = text.to_lowercase();
    assert!(
        !lower.contains("fail") && !lower.contains("error"),
        "qemu-io reported a failure: {text}"
    );
    text
}

async fn compare(uri: &str, file: &Path) {
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            uri,
            file.to_str().expect("utf-8 path"),
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "qemu-img compare says the images differ"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Images are identical"));
}

fn region(file: &Path, offset: usize, len: usize) -> Vec<u8> {
    let data = std::fs::read(file).expect("read image");
    data[offset..offset + len].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_and_qemu_img_over_tcp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "disk.img", 4 * MIB, 0);
    let (port, served) = serve_tcp(exports(&img, "disk")).await;
    let uri = format!("nbd://127.0.0.1:{port}/disk");

    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "flush",
            "write -f -P 0xcd 1M 128k",
            "discard 1M 64k",
            "read -P 0xcd 1088k 64k",
            "write -z 2M 64k",
            "read -P 0 2M 64k",
            "write -P 0x11 3M 4k",
            "write -z -u 3M 4k",
            "read -P 0 3M 4k",
            "write -P 0x22 4194303 1",
            "read -P 0x22 4194303 1",
        ],
    )
    .await;
    // The writes are on the image itself.
    assert!(region(&img, 0, 64 << 10).iter().all(|b| *b == 0xab));
    assert!(region(&img, (1 << 20) + (64 << 10), 64 << 10)
        .iter()
        .all(|b| *b == 0xcd));
    assert!(region(&img, 2 << 20, 64 << 10).iter().all(|b| *b == 0));
    assert!(region(&img, 3 << 20, 4 << 10).iter().all(|b| *b == 0));
    assert_eq!(region(&img, 4 * MIB - 1, 1), vec![0x22]);

    // A read past the end fails (qemu checks the advertised size first).
    let out = run("qemu-io", &["-f", "raw", "-c", "read 4194303 2", &uri]).await;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.to_lowercase().contains("error") || !out.status.success(),
        "{text}"
    );

    let out = run("qemu-img", &["info", "-f", "raw", &uri]).await;
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("virtual size: 4 MiB (4194304 bytes)"),
        "qemu-img info"
    );

    compare(&uri, &img).await;

    // qemu-img convert into the export (uses write-zeroes, fast zero and flush).
    let src = dir.path().join("src.img");
    let mut data = vec![0u8; 4 * MIB];
    for (i, chunk) in data.chunks_mut(64 << 10).enumerate() {
        if i % 3 != 0 {
            chunk.fill(i as u8);
        }
    }
    std::fs::write(&src, &data).expect("write source");
    let out = run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    )
    .await;
    assert!(out.status.success(), "qemu-img convert");
    compare(&uri, &src).await;
    assert_eq!(std::fs::read(&img).expect("image"), data);

    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_bench_writes_complete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "bench.img", 16 * MIB, 0);
    let (port, served) = serve_tcp(exports(&img, "bench")).await;
    let uri = format!("nbd://127.0.0.1:{port}/bench");
    let out = run(
        "qemu-img",
        &[
            "bench",
            "-f",
            "raw",
            "-w",
            "-t",
            "none",
            "-s",
            "65536",
            "-c",
            "2000",
            "--pattern",
            "90",
            "--flush-interval",
            "100",
            &uri,
        ],
    )
    .await;
    assert!(out.status.success(), "qemu-img bench");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Run completed"));
    // 2000 sequential 64 KiB writes wrap around the 16 MiB image: every byte
    // now holds the pattern.
    let data = std::fs::read(&img).expect("image");
    assert_eq!(data.len(), 16 * MIB);
    assert!(data.iter().all(|b| *b == 90), "bench pattern on the image");
    compare(&uri, &img).await;
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_over_a_unix_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "unix.img", 2 * MIB, 0x33);
    let socket = dir.path().join("nbd.sock");
    let served = serve_unix(exports(&img, "snap"), &socket).await;
    let uri = format!("nbd+unix:///snap?socket={}", socket.display());
    qemu_io(
        &uri,
        &[
            "read -P 0x33 0 1M",
            "write -P 0x44 512 1536",
            "read -P 0x44 512 1536",
            "flush",
        ],
    )
    .await;
    assert!(region(&img, 512, 1536).iter().all(|b| *b == 0x44));
    assert!(region(&img, 0, 512).iter().all(|b| *b == 0x33));
    compare(&uri, &img).await;
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_exports_when_installed() {
    if std::process::Command::new("nbdinfo")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: nbdinfo is not installed (apt-get install libnbd-bin)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let a = image(dir.path(), "a.img", MIB, 0);
    let b = image(dir.path(), "b.img", 2 * MIB, 0);
    let map = ExportMap::new()
        .with("alpha", Arc::new(FileExport::open(&a, false).expect("a")))
        .with(
            "beta",
            Arc::new(
                FileExport::open(&b, true)
                    .expect("b")
                    .with_description("read-only beta"),
            ),
        );
    let (port, served) = serve_tcp(map).await;
    let out = run("nbdinfo", &["--list", &format!("nbd://127.0.0.1:{port}")]).await;
    assert!(out.status.success(), "nbdinfo --list");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("alpha") && text.contains("beta"), "{text}");
    assert!(text.contains("read-only beta"), "{text}");
    assert!(text.contains("2097152"), "{text}");

    let out = run(
        "nbdinfo",
        &["--json", &format!("nbd://127.0.0.1:{port}/beta")],
    )
    .await;
    assert!(out.status.success(), "nbdinfo beta");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"is_read_only\": true"), "{text}");
    assert!(text.contains("\"block_size_maximum\": 33554432"), "{text}");
    served.stop().await;
}
