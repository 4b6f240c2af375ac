//! Helpers the unit tests share.

use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A loopback TCP connection whose server side has a 4 KiB send buffer (so writes to it come
/// up short), and with `small_client` a client whose receive buffer is 4 KiB too (so a client
/// that reads nothing stops taking bytes early). Returns (client, server).
pub(crate) async fn tight_tcp_pair(small_client: bool) -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpSocket::new_v4().unwrap();
    if small_client {
        client.set_recv_buffer_size(4096).unwrap();
    }
    let client = client
        .connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    socket2::SockRef::from(&server)
        .set_send_buffer_size(4096)
        .unwrap();
    (client, server)
}
