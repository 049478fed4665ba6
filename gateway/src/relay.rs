//! Opaque TCP relay between a client and its upstream: both directions at
//! once, half-close passed on (EOF on one side becomes a write shutdown on
//! the other), an idle timeout, and live byte counters.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

const BUF: usize = 32 * 1024;

/// Bytes moved so far, readable while the relay runs (for `status`).
#[derive(Debug, Default)]
pub struct Counters {
    pub up: AtomicU64,
    pub down: AtomicU64,
    /// Milliseconds since `start` at the last byte moved either way.
    last_ms: AtomicU64,
}

/// Why a relay ended.
#[derive(Debug)]
pub enum End {
    /// Both directions reached EOF.
    Closed,
    IdleTimeout,
    /// Reading from or writing to the client failed (client went away).
    ClientError(std::io::Error),
    /// Reading from or writing to the upstream failed.
    UpstreamError(std::io::Error),
}

pub async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    idle: Duration,
    counters: Arc<Counters>,
) -> End {
    let start = Instant::now();
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let up = pump(cr, uw, &counters.up, &counters.last_ms, start, Side::Client);
    let down = pump(
        ur,
        cw,
        &counters.down,
        &counters.last_ms,
        start,
        Side::Upstream,
    );
    let both = async {
        let (a, b) = tokio::join!(up, down);
        a.and(b)
    };
    tokio::pin!(both);
    loop {
        let since = Duration::from_millis(counters.last_ms.load(Ordering::Relaxed));
        let deadline = start + since + idle;
        tokio::select! {
            r = &mut both => return match r {
                Ok(()) => End::Closed,
                Err(e) => e,
            },
            () = tokio::time::sleep_until(deadline.into()) => {
                let last = Duration::from_millis(counters.last_ms.load(Ordering::Relaxed));
                if start.elapsed() >= last + idle {
                    return End::IdleTimeout;
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Side {
    /// Reading from the client, writing upstream.
    Client,
    /// Reading from the upstream, writing to the client.
    Upstream,
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    count: &AtomicU64,
    last_ms: &AtomicU64,
    start: Instant,
    side: Side,
) -> Result<(), End> {
    type Wrap = fn(std::io::Error) -> End;
    let (read_err, write_err): (Wrap, Wrap) = match side {
        Side::Client => (End::ClientError, End::UpstreamError),
        Side::Upstream => (End::UpstreamError, End::ClientError),
    };
    // Uninitialised capacity: `read_buf` fills it without zeroing first,
    // which matters when connections are short.
    let mut buf = Vec::with_capacity(BUF);
    loop {
        buf.clear();
        let n = from.read_buf(&mut buf).await.map_err(read_err)?;
        if n == 0 {
            // Pass the half-close on; the other direction keeps flowing.
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf).await.map_err(write_err)?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        last_ms.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}
