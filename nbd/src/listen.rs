//! Where a server listens ([`Listen`]: TCP or a Unix socket) and
//! [`Server::spawn`], which binds it and serves in a task.

use std::io;
use std::path::PathBuf;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::server::Server;

/// A listening address given on a command line: `HOST:PORT` or a Unix
/// socket (`unix:/path`, or an absolute path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// `HOST:PORT` (port 0: any free port).
    Tcp(std::net::SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return if p.is_empty() {
                Err("unix: needs a socket path, e.g. unix:/run/lifeboat/nbd.sock".into())
            } else {
                Ok(Listen::Unix(PathBuf::from(p)))
            };
        }
        if s.starts_with('/') {
            return Ok(Listen::Unix(PathBuf::from(s)));
        }
        s.parse().map(Listen::Tcp).map_err(|_| {
            format!(
                "{s:?} is neither HOST:PORT (e.g. 127.0.0.1:10809) nor a Unix socket \
                 (unix:/path or an absolute path)"
            )
        })
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Server {
    /// Binds `listen` and serves in a new task until `shutdown` fires (then
    /// waits for the connections to end). A Unix socket file left by an
    /// earlier run is replaced (anything else at that path is refused) and
    /// removed when the server stops. Returns the address bound (with the
    /// real port for port 0) and the task.
    pub async fn spawn(
        self,
        listen: &Listen,
        shutdown: CancellationToken,
    ) -> io::Result<(String, JoinHandle<()>)> {
        match listen {
            Listen::Tcp(addr) => {
                let listener = tokio::net::TcpListener::bind(addr).await?;
                let local = listener.local_addr()?;
                let task = tokio::spawn(
                    async move { self.serve_tcp(listener, shutdown).await }.in_current_span(),
                );
                Ok((local.to_string(), task))
            }
            Listen::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if !meta.file_type().is_socket() {
                        return Err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            format!("{} exists and is not a socket", path.display()),
                        ));
                    }
                    std::fs::remove_file(path)?;
                }
                let listener = tokio::net::UnixListener::bind(path)?;
                let socket = path.clone();
                let task = tokio::spawn(
                    async move {
                        self.serve_unix(listener, shutdown).await;
                        let _ = std::fs::remove_file(&socket);
                    }
                    .in_current_span(),
                );
                Ok((format!("unix:{}", path.display()), task))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_unix() {
        assert_eq!(
            "127.0.0.1:10809".parse::<Listen>(),
            Ok(Listen::Tcp("127.0.0.1:10809".parse().unwrap()))
        );
        assert_eq!(
            "unix:/run/x.sock".parse::<Listen>(),
            Ok(Listen::Unix(PathBuf::from("/run/x.sock")))
        );
        assert_eq!(
            "/run/y.sock".parse::<Listen>(),
            Ok(Listen::Unix(PathBuf::from("/run/y.sock")))
        );
        assert!("unix:".parse::<Listen>().is_err());
        assert!("localhost".parse::<Listen>().is_err());
        assert_eq!(Listen::Unix(PathBuf::from("/a")).to_string(), "unix:/a");
    }
}
