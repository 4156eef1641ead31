//! The affinity cookie codec.
//!
//! A cookie value names a backend without revealing it: it is an opaque
//! 64-bit id derived only from the pool and backend name, so two tether
//! instances with one config (or one restarted) mint and accept the same
//! values. With a secret the id itself is an HMAC of the name (not
//! guessable from a list of likely names) and the value carries a MAC over
//! the pool, the cookie name and the id, so a value minted for one pool or
//! cookie name never verifies for another. (The `cookie` crate's signed jar
//! would cover only the value, hence our own HMAC.)
//!
//! Format: `<id as 16 hex digits>` unsigned, or `<id>.<32 hex digits of MAC>`.
//! Values are computed once per backend at config load; a request only looks
//! the id up and compares the whole value in constant time.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const ID_HEX: usize = 16;
const MAC_BYTES: usize = 16;
const MAC_HEX: usize = MAC_BYTES * 2;

/// Mints and verifies affinity cookie values for one pool and cookie name.
#[derive(Clone)]
pub struct CookieCodec {
    mac: Option<HmacSha256>,
    /// `pool \0 cookie-name`: binds values to where they were minted.
    context: Vec<u8>,
}

impl std::fmt::Debug for CookieCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CookieCodec").field("signed", &self.mac.is_some()).finish()
    }
}

impl CookieCodec {
    pub fn new(pool: &str, cookie_name: &str, secret: Option<&[u8]>) -> Self {
        let mut context = Vec::with_capacity(pool.len() + cookie_name.len() + 1);
        context.extend_from_slice(pool.as_bytes());
        context.push(0);
        context.extend_from_slice(cookie_name.as_bytes());
        // HMAC accepts keys of any length, so this cannot fail.
        let mac = secret.and_then(|s| HmacSha256::new_from_slice(s).ok());
        CookieCodec { mac, context }
    }

    pub fn is_signed(&self) -> bool {
        self.mac.is_some()
    }

    /// The opaque id of a backend, stable across processes.
    pub fn backend_id(&self, backend_name: &str) -> u64 {
        match &self.mac {
            Some(mac) => {
                let mut m = mac.clone();
                m.update(b"id\0");
                m.update(&self.context);
                m.update(b"\0");
                m.update(backend_name.as_bytes());
                let out = m.finalize().into_bytes();
                let mut id = [0u8; 8];
                id.copy_from_slice(&out[..8]);
                u64::from_be_bytes(id)
            }
            None => {
                let mut buf = self.context.clone();
                buf.push(0);
                buf.extend_from_slice(backend_name.as_bytes());
                xxhash_rust::xxh3::xxh3_64(&buf)
            }
        }
    }

    /// The cookie value for a backend.
    pub fn encode(&self, backend_name: &str) -> String {
        let id = format!("{:016x}", self.backend_id(backend_name));
        match self.tag(id.as_bytes()) {
            Some(tag) => format!("{id}.{}", hex(&tag)),
            None => id,
        }
    }

    /// Verifies a value and returns its backend id; `None` for anything
    /// forged, truncated, tampered or malformed. Never panics.
    pub fn decode(&self, value: &str) -> Option<u64> {
        let id_hex = value.get(..ID_HEX)?;
        let id = parse_id(id_hex)?;
        let rest = &value.as_bytes()[ID_HEX..];
        match &self.mac {
            None => rest.is_empty().then_some(id),
            Some(_) => {
                let tag_hex = rest.strip_prefix(b".")?;
                if tag_hex.len() != MAC_HEX {
                    return None;
                }
                let expected = hex(&self.tag(id_hex.as_bytes())?);
                constant_time_eq(expected.as_bytes(), tag_hex).then_some(id)
            }
        }
    }

    fn tag(&self, id_hex: &[u8]) -> Option<[u8; MAC_BYTES]> {
        let mut m = self.mac.clone()?;
        m.update(b"mac\0");
        m.update(&self.context);
        m.update(b"\0");
        m.update(id_hex);
        let out = m.finalize().into_bytes();
        let mut tag = [0u8; MAC_BYTES];
        tag.copy_from_slice(&out[..MAC_BYTES]);
        Some(tag)
    }
}

/// The id in a value's first 16 characters, if they are lowercase hex.
/// Used on the request path before the full constant-time comparison.
pub fn parse_id(value: &str) -> Option<u64> {
    let id_hex = value.as_bytes().get(..ID_HEX)?;
    // One pass, digit by digit (this runs on every request with a cookie).
    id_hex.iter().try_fold(0u64, |id, &b| {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return None,
        };
        Some(id << 4 | u64::from(digit))
    })
}

/// Compares without an early exit, so timing does not reveal how much of a
/// forged value was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_sixteen_lowercase_hex_digits_at_the_front() {
        assert_eq!(parse_id("00000000000000ffrest"), Some(255));
        assert_eq!(parse_id("ffffffffffffffff"), Some(u64::MAX));
        assert_eq!(parse_id("0123456789abcdef"), Some(0x0123_4567_89ab_cdef));
        for bad in ["00000000000000FF", "000000000000000", "00000000000000g0", "", "é0000000000000000"] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
    }

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn values_are_deterministic_across_codec_instances() {
        let a = CookieCodec::new("app", "tether", Some(SECRET));
        let b = CookieCodec::new("app", "tether", Some(SECRET));
        assert_eq!(a.encode("app1"), b.encode("app1"));
        let u = CookieCodec::new("app", "tether", None);
        assert_eq!(u.encode("app1"), CookieCodec::new("app", "tether", None).encode("app1"));
    }

    #[test]
    fn value_does_not_reveal_the_backend_name() {
        let c = CookieCodec::new("app", "tether", Some(SECRET));
        let v = c.encode("app1");
        assert!(!v.contains("app1"));
        assert_eq!(v.len(), ID_HEX + 1 + MAC_HEX);
    }

    #[test]
    fn signed_value_round_trips() {
        let c = CookieCodec::new("app", "tether", Some(SECRET));
        let v = c.encode("app1");
        assert_eq!(c.decode(&v), Some(c.backend_id("app1")));
        assert_ne!(c.backend_id("app1"), c.backend_id("app2"));
    }

    #[test]
    fn unsigned_value_round_trips_and_rejects_a_tag() {
        let c = CookieCodec::new("app", "tether", None);
        let v = c.encode("app1");
        assert_eq!(v.len(), ID_HEX);
        assert_eq!(c.decode(&v), Some(c.backend_id("app1")));
        assert_eq!(c.decode(&format!("{v}.00")), None);
    }

    #[test]
    fn a_value_never_verifies_for_another_pool_cookie_name_or_secret() {
        let c = CookieCodec::new("app", "tether", Some(SECRET));
        let v = c.encode("app1");
        assert_eq!(CookieCodec::new("api", "tether", Some(SECRET)).decode(&v), None);
        assert_eq!(CookieCodec::new("app", "other", Some(SECRET)).decode(&v), None);
        assert_eq!(CookieCodec::new("app", "tether", Some(b"another secret of 32 bytes......")).decode(&v), None);
    }

    #[test]
    fn tampered_truncated_and_garbage_values_are_rejected() {
        let c = CookieCodec::new("app", "tether", Some(SECRET));
        let v = c.encode("app1");
        // Flip each character of the value in turn.
        for i in 0..v.len() {
            let mut bytes = v.clone().into_bytes();
            bytes[i] = if bytes[i] == b'0' { b'1' } else { b'0' };
            let tampered = String::from_utf8(bytes).unwrap();
            assert_eq!(c.decode(&tampered), None, "tampered at {i}: {tampered}");
        }
        for cut in 0..v.len() {
            assert_eq!(c.decode(&v[..cut]), None, "truncated to {cut}");
        }
        for junk in ["", ".", "zzzzzzzzzzzzzzzz", "ééééééééééééééééé", "0000000000000000.", "\u{0}"] {
            assert_eq!(c.decode(junk), None, "{junk:?}");
        }
        // The unsigned id alone does not pass a signed codec.
        assert_eq!(c.decode(&v[..ID_HEX]), None);
    }

    #[test]
    fn uppercase_hex_is_not_accepted() {
        let c = CookieCodec::new("app", "tether", None);
        let v = c.encode("app1").to_uppercase();
        if v.bytes().any(|b| b.is_ascii_uppercase()) {
            assert_eq!(c.decode(&v), None);
        }
    }

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
