//! The byte streams of an intercepted connection: the client side (with the
//! bytes already read while sniffing put back in front, and counted), and
//! the upstream side (plain TCP or verified TLS, marked so our own hooks
//! never touch it), plus the connector hyper's client pool calls.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
    time::Duration,
};

use hyper::Uri;
use hyper_util::{
    client::legacy::connect::{Connected, Connection},
    rt::TokioIo,
};
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use crate::relay::Counters;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

// === client side ===

/// The client's stream with the sniffed bytes replayed first. Counts bytes
/// both ways into the connection's counters.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
    counters: Arc<Counters>,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S, counters: Arc<Counters>) -> Prefixed<S> {
        // The sniffed bytes were read from the client already.
        counters
            .up
            .fetch_add(prefix.len() as u64, Ordering::Relaxed);
        Prefixed {
            prefix,
            pos: 0,
            inner,
            counters,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.pos);
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.counters.up.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.counters.down.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.counters.down.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

// === upstream side ===

/// A connection to the original destination.
pub enum UpStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for UpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpStream::Plain(s) => Pin::new(s).poll_write(cx, b),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, b),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpStream::Plain(s) => s.is_write_vectored(),
            UpStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// What hyper's client pool gets from [`Connector`]: the stream, and
/// whether ALPN chose h2.
pub struct UpConn {
    io: TokioIo<UpStream>,
    h2: bool,
}

impl Connection for UpConn {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.h2 { c.negotiated_h2() } else { c }
    }
}

impl hyper::rt::Read for UpConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, b)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// An upstream connect failure, kept apart so the request's audit reason
/// can say "certificate" rather than "client error".
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConnectError(pub String);

/// Always connects to the connection's original destination, whatever the
/// request URI says (the URI only names the TLS server name); every request
/// of one client connection shares this connector's pool, so identities
/// never share upstream connections.
#[derive(Clone)]
pub struct Connector {
    pub dst: SocketAddr,
    /// `Some` for TLS upstreams: verified against the system roots and the
    /// configured CAs.
    pub tls: Option<Arc<ClientConfig>>,
    pub mark: u32,
    pub timeout: Duration,
}

impl Connector {
    pub async fn connect(&self, server_name: &str) -> Result<UpConn, ConnectError> {
        let tcp = crate::proxy::connect_marked(self.dst, self.mark, self.timeout)
            .await
            .map_err(ConnectError)?;
        let Some(cfg) = &self.tls else {
            return Ok(UpConn {
                io: TokioIo::new(UpStream::Plain(tcp)),
                h2: false,
            });
        };
        let name = server_name_for(server_name, self.dst);
        let tls = tokio::time::timeout(
            self.timeout,
            TlsConnector::from(cfg.clone()).connect(name, tcp),
        )
        .await
        .map_err(|_| {
            ConnectError(format!(
                "TLS handshake with upstream {server_name} ({}) timed out after {} ms",
                self.dst,
                self.timeout.as_millis()
            ))
        })?
        .map_err(|e| {
            ConnectError(format!(
                "TLS to upstream {server_name} ({}) failed: {e}",
                self.dst
            ))
        })?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        Ok(UpConn {
            io: TokioIo::new(UpStream::Tls(Box::new(tls))),
            h2,
        })
    }
}

/// The name the upstream certificate must carry: the host the client asked
/// for, an IP address when it asked for one.
fn server_name_for(host: &str, dst: SocketAddr) -> ServerName<'static> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_string())
        .unwrap_or_else(|_| ServerName::IpAddress(dst.ip().into()))
}

impl tower_service::Service<Uri> for Connector {
    type Response = UpConn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<UpConn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().to_string();
            this.connect(&host).await
        })
    }
}
