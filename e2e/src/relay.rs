//! A TCP relay in front of a service that can *freeze*: stop passing bytes either way while
//! keeping both connections open, as a client whose network vanished (no FIN, no RST) looks to
//! the server.

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
        let accept = tokio::spawn(async move {
            // Owned here: aborting this task (on drop) ends every relayed connection.
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                connections.spawn(pass(client_read, server_write, watching.clone()));
                connections.spawn(pass(server_read, client_write, watching.clone()));
            }
        });
        Ok(Self {
            url,
            frozen,
            accept,
        })
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

/// Copies `from` to `to` until either side closes or the relay freezes; frozen, it holds both
/// ends open (until the relay is dropped).
async fn pass(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        tokio::select! {
            () = async { drop(frozen.wait_for(|f| *f).await) } => break,
            read = from.read(&mut buffer) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if to.write_all(&buffer[..n]).await.is_err() {
                        return;
                    }
                }
            },
        }
    }
    std::future::pending::<()>().await;
}
