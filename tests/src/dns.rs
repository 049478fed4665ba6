//! Just enough of the DNS wire format (RFC 1035) for the probe's A queries
//! and the test DNS server's answers.

use std::net::Ipv4Addr;

pub const TYPE_A: u16 = 1;
pub const CLASS_IN: u16 = 1;
pub const RCODE_NXDOMAIN: u8 = 3;

/// A query for one name and type, recursion desired.
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(32 + name.len());
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00]); // RD
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // QD=1
    encode_name(&mut m, name);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&CLASS_IN.to_be_bytes());
    m
}

fn encode_name(m: &mut Vec<u8>, name: &str) {
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
}

/// Read a (possibly compressed) name at `pos`; returns it and the offset
/// just after it in the original position.
fn decode_name(msg: &[u8], mut pos: usize) -> Option<(String, usize)> {
    let mut labels = Vec::new();
    let mut end = None;
    for _ in 0..64 {
        let len = *msg.get(pos)? as usize;
        if len == 0 {
            return Some((labels.join("."), end.unwrap_or(pos + 1)));
        }
        if len & 0xc0 == 0xc0 {
            let ptr = ((len & 0x3f) << 8) | *msg.get(pos + 1)? as usize;
            end.get_or_insert(pos + 2);
            pos = ptr;
            continue;
        }
        let label = msg.get(pos + 1..pos + 1 + len)?;
        labels.push(String::from_utf8_lossy(label).into_owned());
        pos += 1 + len;
    }
    None
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub id: u16,
    pub name: String,
    pub qtype: u16,
    /// Offset just past the question section.
    pub end: usize,
}

pub fn parse_question(msg: &[u8]) -> Option<Question> {
    if msg.len() < 12 || u16::from_be_bytes([msg[4], msg[5]]) < 1 {
        return None;
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let (name, pos) = decode_name(msg, 12)?;
    let qtype = u16::from_be_bytes([*msg.get(pos)?, *msg.get(pos + 1)?]);
    Some(Question {
        id,
        name,
        qtype,
        end: pos + 4,
    })
}

/// A response to `query` with the given A answers (NXDOMAIN when empty).
pub fn answer(query: &[u8], q: &Question, addrs: &[Ipv4Addr]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&q.id.to_be_bytes());
    let rcode = if addrs.is_empty() { RCODE_NXDOMAIN } else { 0 };
    m.push(0x84 | (query[2] & 0x01)); // QR, AA, and RD as the query had it
    m.push(0x80 | rcode); // RA
    m.extend_from_slice(&[0, 1]);
    m.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(&query[12..q.end]);
    for a in addrs {
        m.extend_from_slice(&[0xc0, 12]); // pointer to the question name
        m.extend_from_slice(&TYPE_A.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        m.extend_from_slice(&60u32.to_be_bytes());
        m.extend_from_slice(&4u16.to_be_bytes());
        m.extend_from_slice(&a.octets());
    }
    m
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub id: u16,
    pub rcode: u8,
    pub a: Vec<Ipv4Addr>,
}

pub fn parse_response(msg: &[u8]) -> Option<Response> {
    let q = parse_question(msg)?;
    if msg[2] & 0x80 == 0 {
        return None; // not a response
    }
    let rcode = msg[3] & 0x0f;
    let ancount = u16::from_be_bytes([msg[6], msg[7]]);
    let mut pos = q.end;
    let mut a = Vec::new();
    for _ in 0..ancount {
        let (_, p) = decode_name(msg, pos)?;
        let h = msg.get(p..p + 10)?;
        let rtype = u16::from_be_bytes([h[0], h[1]]);
        let rdlen = u16::from_be_bytes([h[8], h[9]]) as usize;
        let data = msg.get(p + 10..p + 10 + rdlen)?;
        if rtype == TYPE_A && rdlen == 4 {
            a.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        pos = p + 10 + rdlen;
    }
    Some(Response { id: q.id, rcode, a })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_answer_round_trip() {
        let qm = query(0x1234, "origin.test", TYPE_A);
        let q = parse_question(&qm).unwrap();
        assert_eq!(q.name, "origin.test");
        assert_eq!(q.qtype, TYPE_A);
        let ip = Ipv4Addr::new(10, 1, 2, 2);
        let r = parse_response(&answer(&qm, &q, &[ip])).unwrap();
        assert_eq!(
            r,
            Response {
                id: 0x1234,
                rcode: 0,
                a: vec![ip]
            }
        );
        let nx = parse_response(&answer(&qm, &q, &[])).unwrap();
        assert_eq!(nx.rcode, RCODE_NXDOMAIN);
        assert!(nx.a.is_empty());
        assert!(parse_response(&qm).is_none(), "a query is not a response");
    }
}
