//! The server side of RFC 6455 on an upgraded HTTP/1.1 connection: an echo
//! of every text and binary message, pong for ping, close answered with
//! close. No extensions are negotiated (no permessage-deflate), so frames
//! arrive uncompressed. Every message is logged as `{"ws": {...}}`.

use crate::emit;
use base64::Engine;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest message (after reassembly) the echo accepts; bigger ones get
/// close code 1009.
const MAX_MESSAGE: usize = 16 << 20;

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let d = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{}{GUID}", key.trim()).as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(d.as_ref())
}

struct Frame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

enum ReadError {
    /// The peer went away (EOF or I/O error).
    Gone(String),
    /// A protocol violation: close with this code.
    Protocol(u16, String),
}

async fn read_frame<S: AsyncRead + Unpin>(s: &mut S) -> Result<Frame, ReadError> {
    let gone = |e: std::io::Error| ReadError::Gone(e.to_string());
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await.map_err(gone)?;
    let fin = h[0] & 0x80 != 0;
    if h[0] & 0x70 != 0 {
        return Err(ReadError::Protocol(1002, "reserved bits set".into()));
    }
    let opcode = h[0] & 0x0f;
    let masked = h[1] & 0x80 != 0;
    let mut len = u64::from(h[1] & 0x7f);
    if len == 126 {
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await.map_err(gone)?;
        len = u64::from(u16::from_be_bytes(b));
    } else if len == 127 {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).await.map_err(gone)?;
        len = u64::from_be_bytes(b);
    }
    if !masked {
        return Err(ReadError::Protocol(1002, "unmasked client frame".into()));
    }
    if opcode >= 8 && (len > 125 || !fin) {
        return Err(ReadError::Protocol(1002, "bad control frame".into()));
    }
    if len > MAX_MESSAGE as u64 {
        return Err(ReadError::Protocol(1009, format!("frame of {len} bytes")));
    }
    let mut mask = [0u8; 4];
    s.read_exact(&mut mask).await.map_err(gone)?;
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).await.map_err(gone)?;
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    Ok(Frame {
        fin,
        opcode,
        payload,
    })
}

async fn write_frame<S: AsyncWrite + Unpin>(
    s: &mut S,
    opcode: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xffff => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    s.write_all(&out).await?;
    s.flush().await
}

async fn close<S: AsyncWrite + Unpin>(s: &mut S, id: u64, code: u16, reason: &str) {
    emit(&json!({"ws": {"id": id, "close_sent": code, "reason": reason}}));
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes().get(..120).unwrap_or(reason.as_bytes()));
    let _ = write_frame(s, 0x8, &p).await;
    let _ = s.shutdown().await;
}

/// Echo until the peer closes or goes away. `id` is the request id of the
/// upgrade request, repeated in every log line.
pub async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, id: u64) {
    emit(&json!({"ws": {"id": id, "open": true}}));
    // The opcode and data of a fragmented message being reassembled.
    let mut partial: Option<(u8, Vec<u8>)> = None;
    loop {
        let frame = match read_frame(&mut s).await {
            Ok(f) => f,
            Err(ReadError::Gone(e)) => {
                emit(&json!({"ws": {"id": id, "gone": e}}));
                return;
            }
            Err(ReadError::Protocol(code, why)) => return close(&mut s, id, code, &why).await,
        };
        let message = match frame.opcode {
            0x1 | 0x2 if partial.is_some() => {
                return close(&mut s, id, 1002, "new message inside a fragmented one").await;
            }
            0x1 | 0x2 if frame.fin => (frame.opcode, frame.payload),
            0x1 | 0x2 => {
                partial = Some((frame.opcode, frame.payload));
                continue;
            }
            0x0 => {
                let Some((op, mut data)) = partial.take() else {
                    return close(&mut s, id, 1002, "continuation without a message").await;
                };
                data.extend_from_slice(&frame.payload);
                if data.len() > MAX_MESSAGE {
                    return close(&mut s, id, 1009, "message too big").await;
                }
                if !frame.fin {
                    partial = Some((op, data));
                    continue;
                }
                (op, data)
            }
            0x8 => {
                let code = frame
                    .payload
                    .get(..2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]));
                emit(&json!({"ws": {"id": id, "close": code}}));
                let _ = write_frame(&mut s, 0x8, frame.payload.get(..2).unwrap_or(&[])).await;
                let _ = s.shutdown().await;
                return;
            }
            0x9 => {
                emit(&json!({"ws": {"id": id, "ping": frame.payload.len()}}));
                if write_frame(&mut s, 0xA, &frame.payload).await.is_err() {
                    return;
                }
                continue;
            }
            0xA => continue,
            op => return close(&mut s, id, 1002, &format!("unknown opcode {op}")).await,
        };
        let (op, data) = message;
        if op == 0x1 {
            match std::str::from_utf8(&data) {
                Ok(text) => emit(&json!({"ws": {"id": id, "text": text}})),
                Err(_) => return close(&mut s, id, 1007, "text is not UTF-8").await,
            }
        } else {
            emit(&json!({"ws": {"id": id, "binary": data.len()}}));
        }
        if let Err(e) = write_frame(&mut s, op, &data).await {
            emit(&json!({"ws": {"id": id, "gone": e.to_string()}}));
            return;
        }
    }
}
