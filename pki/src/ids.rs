//! Credential identifiers: X.509 serial numbers and JWT `jti`s.
//!
//! Both start with the issue time (big-endian nanoseconds since the Unix epoch) followed by
//! random bytes, so they are unique, unguessable and sort by issue time. The broker uses them as
//! ledger keys, which keeps ledger inserts append-mostly.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;

/// Fills `buf` from the operating system's CSPRNG (through aws-lc).
pub fn fill_random(buf: &mut [u8]) {
    // aws-lc's RNG reads the kernel's; failure here means the process cannot do any crypto.
    #[allow(clippy::expect_used)]
    aws_lc_rs::rand::fill(buf).expect("the system random number generator failed");
}

/// `N` random bytes.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    fill_random(&mut b);
    b
}

fn nanos(now: SystemTime) -> [u8; 8] {
    let n = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_nanos() as u64;
    // The top bit stays clear until 2262, so the serial is a positive INTEGER without padding.
    (n & (u64::MAX >> 1)).to_be_bytes()
}

/// A 128-bit certificate serial: 64 bits of issue time, 64 bits of randomness (the CA/Browser
/// Forum's minimum of CSPRNG output), positive.
pub fn new_serial(now: SystemTime) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(&nanos(now));
    fill_random(&mut s[8..]);
    s
}

/// A 192-bit JWT ID: 64 bits of issue time, 128 bits of randomness.
pub fn new_jti(now: SystemTime) -> [u8; 24] {
    let mut j = [0u8; 24];
    j[..8].copy_from_slice(&nanos(now));
    fill_random(&mut j[8..]);
    j
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Lower-case hex, as serials are shown.
pub fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// Parses hex (either case, optional `:` separators as `openssl` prints them).
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    let clean: Vec<u8> = s.bytes().filter(|b| *b != b':').collect();
    if !clean.len().is_multiple_of(2) || clean.is_empty() {
        return None;
    }
    clean
        .chunks(2)
        .map(|p| {
            let h = (p[0] as char).to_digit(16)?;
            let l = (p[1] as char).to_digit(16)?;
            Some((h * 16 + l) as u8)
        })
        .collect()
}

/// The textual form of a `jti`: base64url without padding.
pub fn jti_to_string(jti: &[u8]) -> String {
    B64URL.encode(jti)
}

/// Parses the textual form of a `jti`.
pub fn jti_from_str(s: &str) -> Option<Vec<u8>> {
    B64URL.decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_time_and_do_not_repeat() {
        let t0 = SystemTime::now();
        let t1 = t0 + Duration::from_micros(1);
        let a = new_serial(t0);
        let b = new_serial(t1);
        assert!(a < b);
        assert_ne!(new_serial(t0), new_serial(t0));
        assert!(a[0] & 0x80 == 0 && a[0] != 0);
        assert!(new_jti(t0) < new_jti(t1));
    }

    #[test]
    fn hex_round_trips_and_accepts_openssl_style() {
        let b = [0x01, 0xab, 0xff];
        assert_eq!(to_hex(&b), "01abff");
        assert_eq!(from_hex("01ABFF").unwrap(), b);
        assert_eq!(from_hex("01:ab:ff").unwrap(), b);
        assert!(from_hex("0g").is_none());
        assert!(from_hex("abc").is_none());
        let j = new_jti(SystemTime::now());
        assert_eq!(jti_from_str(&jti_to_string(&j)).unwrap(), j);
    }
}
