//! An authenticated, framed channel over TCP.
//!
//! Handshake (both sides hold the cluster key `K`, derived from the cluster secret):
//!
//! ```text
//! client → server   MAGIC, client nonce Nc (32 bytes)
//! server → client   MAGIC, server nonce Ns, H(K, "server" ‖ Nc ‖ Ns)
//! client → server   H(K, "client" ‖ Nc ‖ Ns)
//! ```
//!
//! `H` is keyed blake3. Each side proves knowledge of `K` over the other side's fresh
//! nonce, so neither a replay nor a reflection of an earlier handshake passes. The
//! session key is `H(K, "session" ‖ Nc ‖ Ns)`.
//!
//! Frames: `len: u32 BE ‖ payload ‖ mac (16 bytes)`, where the MAC covers the
//! direction, a per-direction sequence number and the payload; a dropped, reordered,
//! replayed or altered frame fails verification and the channel is closed. The channel
//! authenticates but does not encrypt: confidentiality comes from TLS (a later layer).

use std::io;
use std::time::Duration;

use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

const MAGIC: &[u8; 8] = b"RAMPART1";
const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 16;
/// Largest frame accepted; large enough for a snapshot chunk or a module package.
pub const MAX_FRAME: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("peer is not a Rampart node (bad magic)")]
    BadMagic,
    #[error("peer failed authentication: it does not hold this cluster's secret")]
    AuthenticationFailed,
    #[error("frame of {0} bytes exceeds the {MAX_FRAME} byte limit")]
    FrameTooLarge(usize),
    #[error("frame failed authentication (altered, replayed or reordered)")]
    BadFrame,
}

impl ChannelError {
    /// True when the error says the peer does not hold the cluster secret: retrying
    /// will not help and the operator must fix the configuration.
    pub fn is_authentication(&self) -> bool {
        matches!(
            self,
            ChannelError::AuthenticationFailed | ChannelError::BadMagic
        )
    }
}

/// The key every channel is authenticated with, derived from the cluster secret.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl ClusterKey {
    pub fn from_secret(secret: &[u8]) -> Self {
        ClusterKey(blake3::derive_key("rampart cluster channel key v1", secret))
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        hasher.update(label);
        for part in parts {
            hasher.update(part);
        }
        *hasher.finalize().as_bytes()
    }
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

#[derive(Clone, Copy)]
enum Side {
    Client,
    Server,
}

/// Sending half: frames carry this side's direction and sequence number.
pub struct FrameWriter {
    stream: BufWriter<OwnedWriteHalf>,
    key: [u8; 32],
    direction: u8,
    seq: u64,
}

/// Receiving half: expects the peer's direction and the next sequence number.
pub struct FrameReader {
    stream: BufReader<OwnedReadHalf>,
    key: [u8; 32],
    direction: u8,
    seq: u64,
}

/// Both halves of an authenticated connection.
pub struct SecureChannel {
    pub reader: FrameReader,
    pub writer: FrameWriter,
    /// Address of the other end, for logs.
    pub peer: String,
}

impl std::fmt::Debug for SecureChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureChannel")
            .field("peer", &self.peer)
            .finish()
    }
}

impl SecureChannel {
    /// Connects and authenticates, all within `timeout`.
    pub async fn connect(
        addr: &str,
        key: &ClusterKey,
        timeout: Duration,
    ) -> Result<Self, ChannelError> {
        tokio::time::timeout(timeout, async {
            let stream = TcpStream::connect(addr).await?;
            Self::handshake(stream, key, Side::Client).await
        })
        .await
        .map_err(|_| ChannelError::Timeout(timeout))?
    }

    /// Authenticates an accepted connection, within `timeout`.
    pub async fn accept(
        stream: TcpStream,
        key: &ClusterKey,
        timeout: Duration,
    ) -> Result<Self, ChannelError> {
        tokio::time::timeout(timeout, Self::handshake(stream, key, Side::Server))
            .await
            .map_err(|_| ChannelError::Timeout(timeout))?
    }

    async fn handshake(
        mut stream: TcpStream,
        key: &ClusterKey,
        side: Side,
    ) -> Result<Self, ChannelError> {
        stream.set_nodelay(true)?;
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let mut mine = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut mine);
        let (client_nonce, server_nonce) = match side {
            Side::Client => {
                stream.write_all(MAGIC).await?;
                stream.write_all(&mine).await?;
                let theirs = read_magic_and_nonce(&mut stream).await?;
                let mut proof = [0u8; 32];
                stream.read_exact(&mut proof).await?;
                if !constant_time_eq(&proof, &key.mac(b"server", &[&mine, &theirs])) {
                    return Err(ChannelError::AuthenticationFailed);
                }
                stream
                    .write_all(&key.mac(b"client", &[&mine, &theirs]))
                    .await?;
                (mine, theirs)
            }
            Side::Server => {
                let theirs = read_magic_and_nonce(&mut stream).await?;
                stream.write_all(MAGIC).await?;
                stream.write_all(&mine).await?;
                stream
                    .write_all(&key.mac(b"server", &[&theirs, &mine]))
                    .await?;
                let mut proof = [0u8; 32];
                stream.read_exact(&mut proof).await?;
                if !constant_time_eq(&proof, &key.mac(b"client", &[&theirs, &mine])) {
                    return Err(ChannelError::AuthenticationFailed);
                }
                (theirs, mine)
            }
        };
        let session = key.mac(b"session", &[&client_nonce, &server_nonce]);
        let (mine_dir, theirs_dir) = match side {
            Side::Client => (0u8, 1u8),
            Side::Server => (1u8, 0u8),
        };
        let (read, write) = stream.into_split();
        Ok(SecureChannel {
            reader: FrameReader {
                stream: BufReader::new(read),
                key: session,
                direction: theirs_dir,
                seq: 0,
            },
            writer: FrameWriter {
                stream: BufWriter::new(write),
                key: session,
                direction: mine_dir,
                seq: 0,
            },
            peer,
        })
    }

    pub async fn send(&mut self, payload: &[u8]) -> Result<(), ChannelError> {
        self.writer.send(payload).await
    }

    pub async fn recv(&mut self) -> Result<Vec<u8>, ChannelError> {
        self.reader.recv().await
    }
}

fn frame_mac(key: &[u8; 32], direction: u8, seq: u64, payload: &[u8]) -> [u8; MAC_LEN] {
    let mut hasher = blake3::Hasher::new_keyed(key);
    hasher.update(&[direction]);
    hasher.update(&seq.to_be_bytes());
    hasher.update(payload);
    let mut mac = [0u8; MAC_LEN];
    mac.copy_from_slice(&hasher.finalize().as_bytes()[..MAC_LEN]);
    mac
}

impl FrameWriter {
    /// Writes one frame and flushes it.
    pub async fn send(&mut self, payload: &[u8]) -> Result<(), ChannelError> {
        self.write(payload).await?;
        self.flush().await
    }

    /// Buffers one frame; [`FrameWriter::flush`] sends what is buffered. For pipelining.
    pub async fn write(&mut self, payload: &[u8]) -> Result<(), ChannelError> {
        if payload.len() > MAX_FRAME {
            return Err(ChannelError::FrameTooLarge(payload.len()));
        }
        let mac = frame_mac(&self.key, self.direction, self.seq, payload);
        self.seq += 1;
        let len = u32::try_from(payload.len()).expect("MAX_FRAME fits in u32");
        self.stream.write_all(&len.to_be_bytes()).await?;
        self.stream.write_all(payload).await?;
        self.stream.write_all(&mac).await?;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), ChannelError> {
        Ok(self.stream.flush().await?)
    }
}

impl FrameReader {
    /// Reads and verifies the next frame.
    pub async fn recv(&mut self) -> Result<Vec<u8>, ChannelError> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(ChannelError::FrameTooLarge(len));
        }
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload).await?;
        let mut mac = [0u8; MAC_LEN];
        self.stream.read_exact(&mut mac).await?;
        if !constant_time_eq(
            &mac,
            &frame_mac(&self.key, self.direction, self.seq, &payload),
        ) {
            return Err(ChannelError::BadFrame);
        }
        self.seq += 1;
        Ok(payload)
    }
}

async fn read_magic_and_nonce(stream: &mut TcpStream) -> Result<[u8; NONCE_LEN], ChannelError> {
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic).await?;
    if &magic != MAGIC {
        return Err(ChannelError::BadMagic);
    }
    let mut nonce = [0u8; NONCE_LEN];
    stream.read_exact(&mut nonce).await?;
    Ok(nonce)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const TIMEOUT: Duration = Duration::from_secs(5);

    async fn pair(
        server_secret: &'static [u8],
        client_secret: &'static [u8],
    ) -> (
        Result<SecureChannel, ChannelError>,
        Result<SecureChannel, ChannelError>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            SecureChannel::accept(stream, &ClusterKey::from_secret(server_secret), TIMEOUT).await
        });
        let client =
            SecureChannel::connect(&addr, &ClusterKey::from_secret(client_secret), TIMEOUT).await;
        (server.await.unwrap(), client)
    }

    #[tokio::test]
    async fn peers_with_the_same_secret_exchange_frames() {
        let (server, client) = pair(b"s3cret", b"s3cret").await;
        let (mut server, mut client) = (server.unwrap(), client.unwrap());
        client.send(b"ping").await.unwrap();
        assert_eq!(server.recv().await.unwrap(), b"ping");
        server.send(b"").await.unwrap();
        assert_eq!(client.recv().await.unwrap(), b"");
    }

    #[tokio::test]
    async fn a_peer_with_another_secret_is_refused_on_both_sides() {
        let (server, client) = pair(b"s3cret", b"wrong").await;
        assert!(client.unwrap_err().is_authentication());
        // The server sees the client hang up or fail its proof; never a channel.
        assert!(server.is_err());
    }

    #[tokio::test]
    async fn a_replayed_frame_is_rejected() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let key = ClusterKey::from_secret(b"k");
        let server_key = key.clone();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut channel = SecureChannel::accept(stream, &server_key, TIMEOUT)
                .await
                .unwrap();
            let first = channel.recv().await.unwrap();
            (first, channel.recv().await)
        });
        let mut client = SecureChannel::connect(&addr, &key, TIMEOUT).await.unwrap();
        client.send(b"once").await.unwrap();
        // Re-send the exact bytes of frame 0 as if replayed by an attacker.
        let mac = frame_mac(&client.writer.key, 0, 0, b"once");
        let raw = client.writer.stream.get_mut();
        raw.write_all(&4u32.to_be_bytes()).await.unwrap();
        raw.write_all(b"once").await.unwrap();
        raw.write_all(&mac).await.unwrap();
        let (first, replay) = server.await.unwrap();
        assert_eq!(first, b"once");
        assert!(matches!(replay, Err(ChannelError::BadFrame)));
    }

    #[tokio::test]
    async fn something_that_is_not_rampart_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            SecureChannel::accept(stream, &ClusterKey::from_secret(b"k"), TIMEOUT).await
        });
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\n\r\n0123456789012345678901234")
            .await
            .unwrap();
        assert!(matches!(server.await.unwrap(), Err(ChannelError::BadMagic)));
    }
}
