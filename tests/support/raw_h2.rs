//! A deliberately rude HTTP/2 client for transport tests: it writes frames by hand, so it can
//! open more streams than the server allows and send headers without ever sending a body —
//! things a well-behaved client library refuses to do.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const REFUSED_STREAM: u32 = 0x7;

/// One frame as read from the wire.
#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// A frame header and payload, ready to write.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK "literal header field without indexing — new name", lengths under 127.
fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0x00);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

/// The header block of a gRPC call to `path`.
pub fn grpc_headers(path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    literal(&mut block, ":method", "POST");
    literal(&mut block, ":scheme", "http");
    literal(&mut block, ":path", path);
    literal(&mut block, ":authority", "localhost");
    literal(&mut block, "content-type", "application/grpc");
    literal(&mut block, "te", "trailers");
    block
}

/// An HTTP/2 connection past the handshake (settings exchanged).
pub struct RawH2 {
    pub stream: TcpStream,
    next_id: u32,
    buf: Vec<u8>,
}

impl RawH2 {
    /// Connects, sends the preface and empty SETTINGS, and acknowledges the server's SETTINGS
    /// (so its limits are in force for every frame sent after this returns).
    pub async fn connect(addr: SocketAddr) -> RawH2 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        stream.write_all(&hello).await.unwrap();
        let mut conn = RawH2 {
            stream,
            next_id: 1,
            buf: Vec::new(),
        };
        loop {
            let f = conn
                .read_frame(Duration::from_secs(10))
                .await
                .expect("server SETTINGS");
            if f.kind == SETTINGS && f.flags & 1 == 0 {
                conn.stream
                    .write_all(&frame(SETTINGS, 1, 0, &[]))
                    .await
                    .unwrap();
                return conn;
            }
        }
    }

    /// Opens `n` streams to `path` with headers only (no END_STREAM, no body, ever), in one
    /// write; returns their ids.
    pub async fn open_header_only_streams(&mut self, path: &str, n: usize) -> Vec<u32> {
        let block = grpc_headers(path);
        let mut out = Vec::new();
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            // END_HEADERS only: the request body never comes.
            out.extend(frame(HEADERS, 0x4, self.next_id, &block));
            ids.push(self.next_id);
            self.next_id += 2;
        }
        self.stream.write_all(&out).await.unwrap();
        ids
    }

    /// The next frame, or `None` on end of stream, error or timeout. PINGs are answered.
    pub async fn read_frame(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16)
                    | (usize::from(self.buf[1]) << 8)
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let head: Vec<u8> = self.buf.drain(..9 + len).collect();
                    let f = Frame {
                        kind: head[3],
                        flags: head[4],
                        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]])
                            & 0x7fff_ffff,
                        payload: head[9..].to_vec(),
                    };
                    if f.kind == PING && f.flags & 1 == 0 {
                        let _ = self.stream.write_all(&frame(PING, 1, 0, &f.payload)).await;
                    }
                    return Some(f);
                }
            }
            let mut chunk = [0_u8; 16 * 1024];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .ok()?
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads until `done` says so, the connection ends, or `timeout` passes; returns every
    /// frame seen.
    pub async fn read_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[Frame]) -> bool,
    ) -> Vec<Frame> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut frames = Vec::new();
        while !done(&frames) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_frame(left).await {
                Some(f) => frames.push(f),
                None => break,
            }
        }
        frames
    }
}

/// The error code of an RST_STREAM frame.
pub fn rst_code(f: &Frame) -> Option<u32> {
    (f.kind == RST_STREAM && f.payload.len() == 4)
        .then(|| u32::from_be_bytes([f.payload[0], f.payload[1], f.payload[2], f.payload[3]]))
}
