//! A client of a node's front API (`docs/protocols/chain.md` section 8): one loopback
//! connection carrying newline-delimited JSON [`FrontMessage`]s. `tube chain` is built on it,
//! and so are the tests; any program can speak the API without it.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tube_proto::chain::{FrontMessage, LineBuffer, decode_line, encode_line};

/// Why a front connection failed.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    /// Connecting, reading or writing failed.
    #[error("node API connection: {0}")]
    Io(#[from] std::io::Error),
    /// The node closed the connection.
    #[error("the node closed the API connection")]
    Closed,
    /// The node sent something that is not a message.
    #[error("the node sent an invalid message: {0}")]
    Invalid(String),
}

/// One connection to a node's front API.
#[derive(Debug)]
pub struct FrontClient {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    lines: LineBuffer,
    /// Bytes read but not yet cut into lines.
    pending: Vec<u8>,
}

impl FrontClient {
    /// Connects to the API at `api`.
    pub async fn connect(api: SocketAddr) -> Result<Self, FrontError> {
        let s = TcpStream::connect(api).await?;
        tube_net::tune_tcp(&s);
        let _ = s.set_nodelay(true);
        let (rd, wr) = s.into_split();
        Ok(Self {
            rd,
            wr,
            lines: LineBuffer::default(),
            pending: Vec::new(),
        })
    }

    /// Sends one message.
    pub async fn send(&mut self, m: &FrontMessage) -> Result<(), FrontError> {
        self.wr.write_all(&encode_line(m)).await?;
        Ok(())
    }

    /// The next message from the node. Cancel-safe: bytes already read stay buffered.
    pub async fn recv(&mut self) -> Result<FrontMessage, FrontError> {
        loop {
            let mut input: &[u8] = &self.pending;
            let line = self.lines.poll_line(&mut input);
            let used = self.pending.len() - input.len();
            self.pending.drain(..used);
            match line {
                Ok(Some(l)) => {
                    return decode_line(&l).map_err(|e| FrontError::Invalid(e.to_string()));
                }
                Ok(None) => {}
                Err(e) => return Err(FrontError::Invalid(e.to_string())),
            }
            let mut buf = [0u8; 8192];
            let n = self.rd.read(&mut buf).await?;
            if n == 0 {
                return Err(FrontError::Closed);
            }
            self.pending
                .extend_from_slice(buf.get(..n).unwrap_or_default());
        }
    }
}
