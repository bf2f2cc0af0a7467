//! Guest MAC addresses: qemu's `52:54:00` prefix (0x52 has the locally-administered
//! bit set and the multicast bit clear) plus 24 random bits.

/// qemu's default NIC MAC: every VM started without `mac=` has it, so never hand it out.
const QEMU_DEFAULT: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MacError {
    #[error("invalid MAC address {0:?} (expected six hex pairs like 52:54:00:ab:cd:ef)")]
    Invalid(String),
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-` separators), case-insensitive.
pub fn parse_mac(s: &str) -> Result<[u8; 6], MacError> {
    let bad = || MacError::Invalid(s.to_string());
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

/// Lower-case, colon-separated.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A random `52:54:00:xx:xx:xx` not in `taken` (entries that do not parse are ignored,
/// comparison is on the parsed bytes so case and separators do not matter).
pub fn generate_mac(taken: &[String]) -> String {
    let taken: Vec<[u8; 6]> = taken.iter().filter_map(|m| parse_mac(m).ok()).collect();
    let free = |mac: &[u8; 6]| *mac != QEMU_DEFAULT && !taken.contains(mac);
    // Random tries first; a space of 2^24 makes failure here practically impossible.
    for _ in 0..1000 {
        let tail: [u8; 3] = rand::random();
        let mac = [0x52, 0x54, 0x00, tail[0], tail[1], tail[2]];
        if free(&mac) {
            return format_mac(&mac);
        }
    }
    // Deterministic scan so the function always terminates with an answer.
    (1u32..1 << 24)
        .map(|n| {
            let b = n.to_be_bytes();
            [0x52, 0x54, 0x00, b[1], b[2], b[3]]
        })
        .find(|mac| free(mac))
        .map(|mac| format_mac(&mac))
        .unwrap_or_else(|| format_mac(&[0x52, 0x54, 0x00, 0, 0, 0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format_roundtrip() {
        let m = parse_mac("52:54:00:AB:cd:0f").unwrap();
        assert_eq!(m, [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]);
        assert_eq!(format_mac(&m), "52:54:00:ab:cd:0f");
        assert_eq!(parse_mac("52-54-00-ab-cd-0f").unwrap(), m);
    }

    #[test]
    fn parse_rejects_garbage() {
        for s in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:00",
            "52:54:00:ab:cd:zz",
            "525:4:00:ab:cd:0f",
            "+1:54:00:ab:cd:0f",
        ] {
            assert!(parse_mac(s).is_err(), "{s}");
        }
    }

    #[test]
    fn generated_format_and_uniqueness() {
        let mut taken = Vec::new();
        for _ in 0..300 {
            let m = generate_mac(&taken);
            let b = parse_mac(&m).unwrap();
            assert_eq!(&b[..3], &[0x52, 0x54, 0x00]);
            assert_eq!(b[0] & 0x02, 0x02, "locally administered");
            assert_eq!(b[0] & 0x01, 0, "unicast");
            assert_eq!(m, m.to_lowercase());
            assert!(!taken.contains(&m));
            assert_ne!(b, QEMU_DEFAULT);
            taken.push(m);
        }
    }

    #[test]
    fn taken_compared_by_value() {
        // Upper-case / dash forms of a taken MAC still count as taken.
        let taken: Vec<String> = vec!["52-54-00-AA-BB-CC".into(), "junk".into()];
        for _ in 0..100 {
            assert_ne!(generate_mac(&taken), "52:54:00:aa:bb:cc");
        }
    }
}
