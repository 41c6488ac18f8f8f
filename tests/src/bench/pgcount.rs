//! A TCP proxy in front of PostgreSQL that counts the statements its clients send, for "Postgres statements per
//! document": every simple-protocol `Query` ('Q', sqlx's BEGIN/COMMIT) and every extended-protocol `Execute`
//! ('E', one per prepared statement run). Clients must connect without TLS (`sslmode=disable`), or there would be
//! nothing to read; the proxy refuses to guess and forwards encrypted streams uncounted.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Statements seen so far.
#[derive(Debug, Default)]
pub struct Counts {
    /// Simple-protocol queries.
    pub simple: AtomicU64,
    /// Extended-protocol executions.
    pub executes: AtomicU64,
    /// Client connections opened.
    pub connections: AtomicU64,
}

impl Counts {
    /// Statements: simple queries plus executions.
    pub fn statements(&self) -> u64 {
        self.simple.load(Ordering::Relaxed) + self.executes.load(Ordering::Relaxed)
    }
}

/// The running proxy.
pub struct PgCounter {
    /// Its `host:port`.
    pub addr: String,
    /// What it counted.
    pub counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

impl PgCounter {
    /// Listens on a free local port and forwards every connection to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let counts = Arc::new(Counts::default());
        let (upstream, c) = (upstream.to_owned(), counts.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, c) = (upstream.clone(), c.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        c.connections.fetch_add(1, Ordering::Relaxed);
                        let _ = relay(client, server, c).await;
                    }
                });
            }
        });
        Ok(Self { addr, counts, task })
    }

    /// `url` (a `postgres://` URL) pointed at the proxy, without TLS.
    pub fn url_for(&self, url: &str) -> Result<String> {
        let mut u = reqwest::Url::parse(url).context("database URL")?;
        let (host, port) = self.addr.rsplit_once(':').context("proxy address")?;
        u.set_host(Some(host))?;
        u.set_port(Some(port.parse()?))
            .map_err(|_| anyhow::anyhow!("cannot set a port on {url}"))?;
        let rest: Vec<(String, String)> = u
            .query_pairs()
            .filter(|(k, _)| k != "sslmode")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        u.query_pairs_mut()
            .clear()
            .extend_pairs(rest)
            .append_pair("sslmode", "disable");
        Ok(u.to_string())
    }
}

impl Drop for PgCounter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, server: TcpStream, counts: Arc<Counts>) -> std::io::Result<()> {
    // Small messages both ways: without NODELAY, Nagle and delayed ACKs would stall each exchange by tens of ms.
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let down =
        tokio::spawn(async move { tokio::io::copy(&mut server_read, &mut client_write).await });
    let up = async move {
        // Untagged start-up messages first: an SSL or GSS request (answered with one byte, 'N' when refused),
        // then the StartupMessage; everything after is tagged.
        loop {
            let len = client_read.read_u32().await?;
            let mut message = len.to_be_bytes().to_vec();
            message.resize(len.max(4) as usize, 0);
            client_read.read_exact(&mut message[4..]).await?;
            server_write.write_all(&message).await?;
            let code = message
                .get(4..8)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .unwrap_or(0);
            if code != SSL_REQUEST && code != GSSENC_REQUEST {
                break;
            }
        }
        // Then whatever arrives is forwarded as it came, in one write, while message boundaries are tracked for
        // the count: a tag byte and a length (which counts itself), then the body.
        let mut buf = vec![0u8; 64 * 1024];
        let mut header = Vec::with_capacity(5);
        let mut body_left = 0usize;
        loop {
            let n = client_read.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            let mut i = 0;
            while i < n {
                if body_left > 0 {
                    let take = body_left.min(n - i);
                    body_left -= take;
                    i += take;
                    continue;
                }
                header.push(buf[i]);
                i += 1;
                if header.len() == 5 {
                    match header[0] {
                        b'Q' => counts.simple.fetch_add(1, Ordering::Relaxed),
                        b'E' => counts.executes.fetch_add(1, Ordering::Relaxed),
                        _ => 0,
                    };
                    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
                    body_left = (len as usize).saturating_sub(4);
                    header.clear();
                }
            }
            server_write.write_all(&buf[..n]).await?;
        }
    };
    let result: std::io::Result<()> = up.await;
    down.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_simple_queries_and_executions_through_a_working_connection() {
        let server = crate::pg_server();
        let url = reqwest::Url::parse(&server).unwrap();
        let proxy = PgCounter::start(&format!(
            "{}:{}",
            url.host_str().unwrap(),
            url.port().unwrap_or(5432)
        ))
        .await
        .unwrap();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&proxy.url_for(&format!("{server}/postgres")).unwrap())
            .await
            .unwrap();
        let before = proxy.counts.statements();
        let mut tx = pool.begin().await.unwrap(); // BEGIN: a simple query
        for i in 0..3i32 {
            let (n,): (i32,) = sqlx::query_as("SELECT $1::int4 + 1")
                .bind(i)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            assert_eq!(n, i + 1);
        }
        // A statement larger than the proxy's buffer still arrives whole.
        let big = "x".repeat(200_000);
        let (len,): (i32,) = sqlx::query_as("SELECT length($1)")
            .bind(&big)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(len, 200_000);
        tx.commit().await.unwrap(); // COMMIT: a simple query
        assert_eq!(proxy.counts.statements() - before, 6);
        assert!(proxy.counts.connections.load(Ordering::Relaxed) >= 1);
        assert!(
            proxy
                .url_for("postgres://u@h:1/db?sslmode=require&application_name=a")
                .unwrap()
                .ends_with("application_name=a&sslmode=disable")
        );
    }
}
