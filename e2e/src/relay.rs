//! A TCP relay in front of a service that can *freeze*: stop passing bytes either way while
//! keeping both connections open, as a client whose network vanished (no FIN, no RST) looks to
//! the server.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::{JoinHandle, JoinSet},
};

/// Relays every connection made to [`Relay::url`] to the upstream address; stops when dropped.
#[derive(Debug)]
pub struct Relay {
    pub url: String,
    frozen: watch::Sender<bool>,
    accept: JoinHandle<()>,
    /// Relayed connections the upstream has not closed.
    open: Arc<AtomicUsize>,
}

impl Relay {
    /// A relay to `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let upstream = upstream
            .strip_prefix("http://")
            .unwrap_or(upstream)
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (frozen, watching) = watch::channel(false);
        let open = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&open);
        let accept = tokio::spawn(async move {
            // Owned here: aborting this task (on drop) ends every relayed connection.
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                counted.fetch_add(1, Ordering::SeqCst);
                connections.spawn(pass(client_read, server_write, watching.clone()));
                let counted = Arc::clone(&counted);
                let watching = watching.clone();
                connections.spawn(async move {
                    from_upstream(server_read, client_write, watching).await;
                    counted.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Self {
            url,
            frozen,
            accept,
            open,
        })
    }

    /// Relayed connections the upstream (the server) has not closed yet.
    pub fn upstream_open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// From now on no byte passes either way; the connections stay open.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The server's side: relayed until frozen, then read and dropped (the client hears nothing) until
/// the server closes the connection, which is when this returns.
async fn from_upstream(
    mut from: impl AsyncReadExt + Unpin,
    to: impl AsyncWriteExt + Unpin,
    frozen: watch::Receiver<bool>,
) {
    let _to = relayed(&mut from, to, frozen).await;
    let mut buffer = vec![0; 16 * 1024];
    while matches!(from.read(&mut buffer).await, Ok(n) if n > 0) {}
}

/// Copies `from` to `to` until either side closes or the relay freezes; frozen, it holds both
/// ends open (until the relay is dropped).
async fn pass(
    mut from: impl AsyncReadExt + Unpin,
    to: impl AsyncWriteExt + Unpin,
    frozen: watch::Receiver<bool>,
) {
    if let Some(_held) = relayed(&mut from, to, frozen).await {
        std::future::pending::<()>().await;
    }
}

/// Copies until either side closes (`None`) or the relay freezes (`Some`: the write side, to be
/// held open).
async fn relayed<W: AsyncWriteExt + Unpin>(
    from: &mut (impl AsyncReadExt + Unpin),
    mut to: W,
    mut frozen: watch::Receiver<bool>,
) -> Option<W> {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        tokio::select! {
            () = async { drop(frozen.wait_for(|f| *f).await) } => return Some(to),
            read = from.read(&mut buffer) => match read {
                Ok(0) | Err(_) => return None,
                Ok(n) => {
                    if to.write_all(&buffer[..n]).await.is_err() {
                        return None;
                    }
                }
            },
        }
    }
}
