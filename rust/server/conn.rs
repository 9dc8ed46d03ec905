//! conn: an accepted TCP connection as the server hands it to HTTP/2 (h2). It changes
//! when bytes reach the socket, never which bytes or their order.
//!
//! - **One write per answer.** h2 copies a DATA frame's payload into its write buffer only
//!   below a threshold: 256 bytes on a transport with vectored writes, 1 KiB on one
//!   without. A payload above it is chained instead, and nothing more is buffered until
//!   the chain is written, so a unary answer of 256 bytes to 1 KiB (a typical
//!   UpdateEntity answer) left in two writes, headers and message, then the trailers; the
//!   client finished the call only on the second, woken twice. `Conn` says it has no
//!   vectored writes of its own, so such an answer is one write. A payload over 1 KiB
//!   (watch batches) is still chained.
//! - **PING acks ride with the next write.** gRPC clients with flow-control estimation
//!   (grpc-go, grpc-java) send a PING after each answer they receive, and h2 flushes the
//!   ack as soon as it has read the PING, a write of its own that wakes the client for
//!   nothing. A write made only of PING acks is held (at most `ACK_DELAY`, like Nagle's
//!   algorithm for acks alone) and leaves with the next write, usually the next answer.
//!   Under TLS the bytes are records, never held.
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The longest a PING ack waits for a write to ride with: far below any ping timeout.
const ACK_DELAY: Duration = Duration::from_millis(1);
/// A PING ack: length 8, type PING (6), flags ACK (1), stream 0, then 8 bytes of payload.
const PING_ACK_HEAD: [u8; 9] = [0, 0, 8, 6, 1, 0, 0, 0, 0];
const PING_ACK_LEN: usize = 17;
/// Acks held at most (h2 answers each PING it reads; a flood is written out at once).
const MAX_HELD: usize = 8 * PING_ACK_LEN;

pub struct Conn {
    io: TcpStream,
    /// PING acks accepted from h2 and not yet on the socket.
    held: Vec<u8>,
    /// When `held` goes out if no write takes it first (one timer per connection, reset
    /// for each held ack: no allocation per call).
    due: Pin<Box<Sleep>>,
    /// Whether `due` is set for what is held now.
    armed: bool,
}

impl Conn {
    /// Takes an accepted connection (in the runtime: the delay's timer is made here).
    pub fn new(io: TcpStream) -> Self {
        // Small messages must not wait for Nagle's algorithm.
        let _ = io.set_nodelay(true);
        Conn { io, held: Vec::new(), due: Box::pin(tokio::time::sleep(ACK_DELAY)), armed: false }
    }

    /// Writes what is held (all of it, or Pending with the socket's waker set).
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..n);
        }
        self.armed = false;
        Poll::Ready(Ok(()))
    }
}

/// Whether `buf` is one or more whole PING acks (h2 writes from a frame's start unless a
/// write was partial; a misread tail is only held, never changed or reordered).
fn only_ping_acks(buf: &[u8]) -> bool {
    !buf.is_empty() && buf.len().is_multiple_of(PING_ACK_LEN) && buf.chunks(PING_ACK_LEN).all(|f| f[..9] == PING_ACK_HEAD)
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

/// `is_write_vectored` keeps its default (false): see the module's first point.
impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.held.len() + buf.len() <= MAX_HELD && only_ping_acks(buf) {
            this.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        // The held acks and `buf` in one write.
        while !this.held.is_empty() {
            let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, &[IoSlice::new(&this.held), IoSlice::new(buf)]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let held = this.held.len();
            this.held.drain(..n.min(held));
            if n > held {
                this.armed = false;
                return Poll::Ready(Ok(n - held));
            }
        }
        this.armed = false;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    /// Held acks wait until `ACK_DELAY` has passed since they were flushed first.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.held.is_empty() {
            if !this.armed {
                this.due.as_mut().reset(tokio::time::Instant::now() + ACK_DELAY);
                this.armed = true;
            }
            ready!(this.due.as_mut().poll(cx));
            ready!(this.poll_write_held(cx))?;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (Conn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Conn::new(server), client)
    }

    fn ping_ack(payload: u8) -> Vec<u8> {
        let mut frame = PING_ACK_HEAD.to_vec();
        frame.extend([payload; 8]);
        frame
    }

    async fn read_n(client: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        client.read_exact(&mut buf).await.unwrap();
        buf
    }

    #[tokio::test]
    async fn a_ping_ack_is_held_until_the_next_write_and_goes_first() {
        let (mut conn, mut client) = pair().await;
        conn.write_all(&ping_ack(7)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut probe = [0u8; 1];
        assert!(client.try_read(&mut probe).is_err(), "the ack went out alone"); // WouldBlock
        conn.write_all(b"answer").await.unwrap();
        assert_eq!(read_n(&mut client, PING_ACK_LEN + 6).await, [ping_ack(7), b"answer".to_vec()].concat());
    }

    #[tokio::test]
    async fn a_lone_ping_ack_goes_out_when_flushed_after_the_delay() {
        let (mut conn, mut client) = pair().await;
        let acks = [ping_ack(1), ping_ack(2)].concat();
        conn.write_all(&acks).await.unwrap();
        let started = tokio::time::Instant::now();
        conn.flush().await.unwrap();
        assert!(started.elapsed() >= ACK_DELAY);
        assert_eq!(read_n(&mut client, acks.len()).await, acks);
    }

    #[tokio::test]
    async fn other_bytes_are_never_held_and_shutdown_writes_held_acks() {
        let (mut conn, mut client) = pair().await;
        let mut not_ack = ping_ack(3);
        not_ack[4] = 0; // a PING, not its ack
        conn.write_all(&not_ack).await.unwrap();
        assert_eq!(read_n(&mut client, not_ack.len()).await, not_ack);
        conn.write_all(&ping_ack(4)).await.unwrap();
        conn.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, ping_ack(4));
    }
}
