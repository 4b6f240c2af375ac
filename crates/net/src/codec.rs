//! `tokio_util` codec adapter over [`tube_proto::frame`], and control-message helpers for the
//! handshake phase (before the mux takes the connection over).

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, Encoder, Framed};
use tube_proto::control::ControlMessage;
use tube_proto::frame::{self, DecodeError, Frame, FrameLimits};

/// Frames over a byte stream.
#[derive(Debug, Clone, Default)]
pub struct FrameCodec {
    /// Limits enforced on decode.
    pub limits: FrameLimits,
}

/// An error reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The bytes broke the framing rules.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The transport failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        Ok(frame::decode(src, &self.limits)?)
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;
    fn encode(&mut self, item: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        frame::encode(&item, dst);
        Ok(())
    }
}

/// A connection in its handshake phase: frames, of which only CONTROL is expected.
pub type HandshakeConn<T> = Framed<T, FrameCodec>;

/// Wraps a stream for the handshake.
pub fn handshake_conn<T: AsyncRead + AsyncWrite>(io: T) -> HandshakeConn<T> {
    Framed::new(io, FrameCodec::default())
}

/// Why a control message could not be received.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The peer closed the connection.
    #[error("connection closed by peer")]
    Closed,
    /// Framing or transport failed.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// A frame other than CONTROL arrived during the handshake.
    #[error("unexpected frame during handshake")]
    UnexpectedFrame,
    /// The control payload was not a valid message.
    #[error(transparent)]
    Malformed(#[from] tube_proto::control::ControlDecodeError),
}

/// Sends one control message and flushes.
pub async fn send_control<T: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut HandshakeConn<T>,
    msg: &ControlMessage,
) -> Result<(), CodecError> {
    conn.send(Frame::Control(msg.to_bytes())).await
}

/// Receives the next control message.
pub async fn recv_control<T: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut HandshakeConn<T>,
) -> Result<ControlMessage, ControlError> {
    match conn.next().await {
        None => Err(ControlError::Closed),
        Some(Err(e)) => Err(e.into()),
        Some(Ok(Frame::Control(b))) => Ok(ControlMessage::from_bytes(&b)?),
        Some(Ok(_)) => Err(ControlError::UnexpectedFrame),
    }
}
