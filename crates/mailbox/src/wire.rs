//! The async edge of the mailbox wire format: a `tokio_util` codec over the pure packet codec
//! of `tube_proto::mailbox`, and a connection that is plain TCP or TLS 1.3 alike.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder, Framed};
use tube_net::tokio_rustls::{client, server};
use tube_proto::mailbox::{self, Packet, PacketError};

/// Frames [`Packet`]s on a byte stream.
#[derive(Debug, Default, Clone, Copy)]
pub struct PacketCodec;

/// Why reading packets failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The transport failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The peer sent something that is not a packet.
    #[error(transparent)]
    Packet(#[from] PacketError),
}

impl Decoder for PacketCodec {
    type Item = Packet;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Packet>, WireError> {
        Ok(mailbox::decode(src)?)
    }
}

impl Encoder<Packet> for PacketCodec {
    type Error = WireError;

    fn encode(&mut self, item: Packet, dst: &mut BytesMut) -> Result<(), WireError> {
        mailbox::encode(&item, dst);
        Ok(())
    }
}

/// A mailbox connection's transport: plain TCP as the seed says, or TLS when the peer has a
/// certificate.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS, as the accepting peer.
    Server(Box<server::TlsStream<TcpStream>>),
    /// TLS, as the connecting client.
    Client(Box<client::TlsStream<TcpStream>>),
}

/// Packets over a [`Stream`].
pub type Conn = Framed<Stream, PacketCodec>;

/// Wraps `stream` in the packet codec.
pub fn conn(stream: Stream) -> Conn {
    Framed::new(stream, PacketCodec)
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Client(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
