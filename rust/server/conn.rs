//! conn: an accepted TCP connection as the server hands it to HTTP/2 (h2).
//!
//! Why a wrapper: h2 copies a DATA frame's payload into its write buffer only below a
//! threshold: 256 bytes on a transport with vectored writes, 1 KiB on one without. A
//! payload above it is chained instead, and nothing more is buffered until the chain is
//! written, so a unary response of 256 bytes to 1 KiB (a typical UpdateEntity answer)
//! left in two writes: headers and message, then the trailers. The client could finish
//! the call only on the second, woken twice per call (measured: 3 writes per call instead
//! of 2, and a fifth fewer updates/s from the seed's Go client). `Conn` says it has no
//! vectored writes: such a response is one write again. A payload over 1 KiB (watch
//! batches) costs one write more per 16 KiB frame, its header apart from its payload.
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

pub struct Conn(pub TcpStream);

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

/// Every write goes straight to the socket; `is_write_vectored` keeps its default (false).
impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.0.connect_info()
    }
}
