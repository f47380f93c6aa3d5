//! MQTT 3.1.1 packets written and read by hand over a plain TCP stream.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Packet types (the high nibble of the first byte).
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const SUBACK: u8 = 9;
pub const PINGRESP: u8 = 13;

fn string(s: &[u8]) -> Vec<u8> {
    let mut v = u16::try_from(s.len())
        .expect("short string")
        .to_be_bytes()
        .to_vec();
    v.extend_from_slice(s);
    v
}

fn packet(header: u8, body: Vec<u8>) -> Vec<u8> {
    let mut out = vec![header];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
    out.extend(body);
    out
}

/// CONNECT, clean session, with this keep-alive and optional login.
pub fn connect(client_id: &str, login: Option<(&str, &str)>, keep_alive: u16) -> Vec<u8> {
    let mut body = string(b"MQTT");
    let flags = 0x02 | if login.is_some() { 0xc0 } else { 0 };
    body.extend([4, flags]);
    body.extend(keep_alive.to_be_bytes());
    body.extend(string(client_id.as_bytes()));
    if let Some((user, pass)) = login {
        body.extend(string(user.as_bytes()));
        body.extend(string(pass.as_bytes()));
    }
    packet(0x10, body)
}

/// SUBSCRIBE with packet id `pkid` and these (filter, QoS) pairs.
pub fn subscribe(pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    for (f, qos) in filters {
        body.extend(string(f.as_bytes()));
        body.push(*qos);
    }
    packet(0x82, body)
}

/// PUBLISH; QoS 1 carries packet id 1.
pub fn publish(topic: &str, payload: &[u8], qos: u8) -> Vec<u8> {
    let mut body = string(topic.as_bytes());
    if qos > 0 {
        body.extend(1u16.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), body)
}

/// The topic of a PUBLISH, from its body.
pub fn publish_topic(body: &[u8]) -> String {
    let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    String::from_utf8_lossy(&body[2..2 + len]).into_owned()
}

pub fn pingreq() -> Vec<u8> {
    vec![0xc0, 0]
}

/// What a read saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// A packet: its first byte and its body.
    Packet(u8, Vec<u8>),
    /// The broker closed the connection.
    Closed,
    /// Nothing within the time given.
    Nothing,
}

impl Read {
    pub fn kind(&self) -> Option<u8> {
        match self {
            Read::Packet(h, _) => Some(h >> 4),
            _ => None,
        }
    }
}

/// One client connection.
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub async fn open(addr: SocketAddr) -> Client {
        Client {
            stream: TcpStream::connect(addr).await.expect("tcp connect"),
            buf: Vec::new(),
        }
    }

    /// Opens a connection, sends CONNECT and returns the CONNACK's return
    /// code (`None` if the connection closed without one).
    pub async fn login(
        addr: SocketAddr,
        client_id: &str,
        login: Option<(&str, &str)>,
        keep_alive: u16,
    ) -> (Client, Option<u8>) {
        let mut c = Client::open(addr).await;
        c.send(&connect(client_id, login, keep_alive)).await;
        let code = match c.read(Duration::from_secs(20)).await {
            Read::Packet(h, body) if h >> 4 == CONNACK && body.len() == 2 => Some(body[1]),
            _ => None,
        };
        (c, code)
    }

    /// [`Client::login`] from a chosen local address (another loopback
    /// address is another source to the broker).
    pub async fn login_from(
        local: std::net::IpAddr,
        addr: SocketAddr,
        client_id: &str,
        login: Option<(&str, &str)>,
    ) -> (Client, Option<u8>) {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(local, 0)).expect("bind");
        let mut c = Client {
            stream: socket.connect(addr).await.expect("tcp connect"),
            buf: Vec::new(),
        };
        c.send(&connect(client_id, login, 30)).await;
        let code = match c.read(Duration::from_secs(20)).await {
            Read::Packet(h, body) if h >> 4 == CONNACK && body.len() == 2 => Some(body[1]),
            _ => None,
        };
        (c, code)
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        // A broker that already closed may reset the connection; the next
        // read reports that.
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next whole packet, or why there is none.
    pub async fn read(&mut self, within: Duration) -> Read {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some((header, body, used)) = frame(&self.buf) {
                self.buf.drain(..used);
                return Read::Packet(header, body);
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Read::Nothing,
                Ok(Ok(0) | Err(_)) => return Read::Closed,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Skips packets until one of `kind` arrives.
    pub async fn expect(&mut self, kind: u8, within: Duration) -> Read {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let r = self.read(left).await;
            if r.kind().is_none_or(|k| k == kind) {
                return r;
            }
        }
    }
}

/// A complete packet at the start of `buf`: (first byte, body, bytes used).
fn frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    let header = *buf.first()?;
    let mut len = 0usize;
    let mut shift = 0;
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        len |= usize::from(b & 0x7f) << shift;
        shift += 7;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    let end = i + len;
    (buf.len() >= end).then(|| (header, buf[i..end].to_vec(), end))
}
