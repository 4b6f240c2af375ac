//! Address ranges for tunnel allow-lists (seed 001, section 2.2: `allowed_ips: ["10.0.0.0/24"]`).
//!
//! A [`Cidr`] is a network address with its host bits zeroed plus a prefix length. Parsing is
//! strict (no spaces, no zone ids, no leading `+` or zeros in the prefix, at most 64 bytes) and
//! the [`Display`](std::fmt::Display) form is canonical, so a parsed list prints back the same.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are IPv4 peers arriving over a dual-stack
//! socket, and are treated as IPv4 everywhere: [`Cidr::contains`] matches them against IPv4
//! ranges (and not against IPv6 ones), and a range written inside `::ffff:0:0/96` is stored as
//! the IPv4 range it denotes (`::ffff:10.0.0.0/104` is `10.0.0.0/8`). A rule therefore means the
//! same thing whichever socket family the relay listens on.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Longest accepted input: the longest valid form (an IPv6 address with an embedded IPv4 and a
/// prefix) is 49 bytes.
const MAX_INPUT: usize = 64;

/// Prefix length of `::ffff:0:0/96`, the IPv4-mapped block.
const MAPPED_PREFIX: u8 = 96;

/// A range of IP addresses: network address (host bits zeroed) and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// A string that is not an IP address or `IP/prefix`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address range {0:?}: expected an IP or IP/prefix")]
pub struct CidrError(pub String);

impl CidrError {
    /// The error for `input`, keeping at most [`MAX_INPUT`] bytes of it.
    fn new(input: &str) -> Self {
        let mut end = input.len().min(MAX_INPUT);
        while !input.is_char_boundary(end) {
            end -= 1;
        }
        Self(input[..end].to_owned())
    }
}

impl Cidr {
    /// The range of `prefix` bits around `addr` (host bits are cleared); an error if the prefix
    /// is longer than the address.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, CidrError> {
        let invalid = || CidrError(format!("{addr}/{prefix}"));
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if prefix >= MAPPED_PREFIX => (IpAddr::V4(v4), prefix - MAPPED_PREFIX),
                _ => (addr, prefix),
            },
            IpAddr::V4(_) => (addr, prefix),
        };
        let addr = match addr {
            IpAddr::V4(v4) if prefix <= 32 => {
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask_v4(prefix)))
            }
            IpAddr::V6(v6) if prefix <= 128 => {
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask_v6(prefix)))
            }
            _ => return Err(invalid()),
        };
        Ok(Self { addr, prefix })
    }

    /// Whether `ip` is in the range. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are matched
    /// against IPv4 ranges as their IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, unmap(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(ip) & mask_v4(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & mask_v6(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }

    /// Whether every address of `other` is in `self` (same family).
    pub fn covers(&self, other: &Cidr) -> bool {
        self.prefix <= other.prefix && self.contains(other.addr)
    }

    /// Prefix length in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The network address (host bits zero).
    pub fn network(&self) -> IpAddr {
        self.addr
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// Parses `IP` (a single address: /32 or /128) or `IP/prefix`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_INPUT {
            return Err(CidrError::new(s));
        }
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, prefix)) => (ip, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| CidrError::new(s))?;
        let prefix = match prefix {
            Some(p) => parse_prefix(p).ok_or_else(|| CidrError::new(s))?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Cidr::new(addr, prefix).map_err(|_| CidrError::new(s))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// True when `ip` is in any of `list`; an empty list allows everything.
pub fn allowed(list: &[Cidr], ip: IpAddr) -> bool {
    list.is_empty() || list.iter().any(|c| c.contains(ip))
}

/// A prefix length: 1 to 3 ASCII digits, no leading zero (except "0" itself), at most 255.
fn parse_prefix(p: &str) -> Option<u8> {
    let digits_only = !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit());
    if !digits_only || (p.len() > 1 && p.starts_with('0')) {
        return None;
    }
    p.parse().ok()
}

/// An IPv4-mapped IPv6 address as the IPv4 address it carries; anything else unchanged.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// The top `prefix` bits set (prefix at most 32).
fn mask_v4(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

/// The top `prefix` bits set (prefix at most 128).
fn mask_v6(prefix: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix.min(128)))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_display_table() {
        let cases = [
            ("10.0.0.0/24", "10.0.0.0/24"),
            ("10.0.0.7/24", "10.0.0.0/24"),
            ("1.2.3.4", "1.2.3.4/32"),
            ("1.2.3.4/32", "1.2.3.4/32"),
            ("255.255.255.255/1", "128.0.0.0/1"),
            ("192.168.1.1/0", "0.0.0.0/0"),
            ("::1", "::1/128"),
            ("fd00::/8", "fd00::/8"),
            ("fdff:1:2::9/8", "fd00::/8"),
            ("2001:DB8::1/32", "2001:db8::/32"),
            ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1/128"),
            ("::/0", "::/0"),
            ("ffff::/0", "::/0"),
            ("fe80::1:2:3:4/64", "fe80::/64"),
            ("::ffff:10.1.2.3/104", "10.0.0.0/8"),
            ("::ffff:1.2.3.4", "1.2.3.4/32"),
            ("::ffff:0:0/96", "0.0.0.0/0"),
            ("::ffff:0:0/95", "::fffe:0:0/95"),
        ];
        for (input, want) in cases {
            let got = c(input);
            assert_eq!(got.to_string(), want, "{input}");
            assert_eq!(c(want), got, "{want} round trip");
        }
        assert_eq!(c("10.0.0.7/24").prefix(), 24);
        assert_eq!(c("10.0.0.7/24").network(), ip("10.0.0.0"));
        assert_eq!(c("fd00::/8").prefix(), 8);
    }

    #[test]
    fn malformed_strings_are_refused() {
        let long = format!("10.0.0.0/{}", "0".repeat(60));
        let cases = [
            "",
            " ",
            "/",
            "/24",
            "10.0.0.0/",
            "10.0.0.0/33",
            "10.0.0.0/255",
            "10.0.0.0/256",
            "::/129",
            "fd00::/200",
            " 10.0.0.0/24",
            "10.0.0.0/24 ",
            "10.0.0.0 /24",
            "10.0.0.0/ 24",
            "10.0.0.0/+24",
            "10.0.0.0/-1",
            "10.0.0.0/024",
            "10.0.0.0/2a",
            "10.0.0.0/24/8",
            "10.0.0",
            "10.0.0.256",
            "010.0.0.1",
            "10.0.0.0.0/8",
            "hello",
            "fe80::1%eth0",
            "[::1]/128",
            "::1::2",
            "10.0.0.0/8\n",
            "１0.0.0.0/8",
            &long,
        ];
        for s in cases {
            let err = s.parse::<Cidr>().unwrap_err();
            assert!(
                err.to_string().starts_with("invalid address range"),
                "{s:?}"
            );
        }
        assert!(long.len() > MAX_INPUT);
        // The error carries at most 64 bytes of a long input.
        let huge = "x".repeat(10_000);
        assert_eq!(huge.parse::<Cidr>().unwrap_err().0.len(), MAX_INPUT);
        let multibyte = "é".repeat(100);
        assert!(multibyte.parse::<Cidr>().unwrap_err().0.len() <= MAX_INPUT);
    }

    #[test]
    fn longest_valid_form_fits() {
        let s = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255/128";
        assert_eq!(s.len(), 49);
        assert_eq!(c(s).prefix(), 128);
    }

    #[test]
    fn contains_edges() {
        let r = c("10.0.0.0/24");
        assert!(r.contains(ip("10.0.0.0")));
        assert!(r.contains(ip("10.0.0.255")));
        assert!(!r.contains(ip("10.0.1.0")));
        assert!(!r.contains(ip("9.255.255.255")));
        let r = c("fd00::/8");
        assert!(r.contains(ip("fd00::")));
        assert!(r.contains(ip("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
        assert!(!r.contains(ip("fe00::")));
        assert!(!r.contains(ip("fcff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
        let single = c("1.2.3.4");
        assert!(single.contains(ip("1.2.3.4")));
        assert!(!single.contains(ip("1.2.3.5")));
        assert!(!single.contains(ip("1.2.3.3")));
        // Families do not mix.
        assert!(!c("10.0.0.0/8").contains(ip("a00::1")));
        assert!(!c("::/0").contains(ip("10.0.0.1")));
    }

    #[test]
    fn slash_zero_matches_its_whole_family() {
        let all4 = c("0.0.0.0/0");
        for a in ["0.0.0.0", "255.255.255.255", "10.1.2.3", "::ffff:8.8.8.8"] {
            assert!(all4.contains(ip(a)), "{a}");
        }
        assert!(!all4.contains(ip("::1")));
        let all6 = c("::/0");
        for a in [
            "::",
            "::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "2001:db8::1",
        ] {
            assert!(all6.contains(ip(a)), "{a}");
        }
        assert!(!all6.contains(ip("1.2.3.4")));
    }

    #[test]
    fn v4_mapped_addresses_match_as_ipv4() {
        let r = c("10.0.0.0/24");
        assert!(r.contains(ip("::ffff:10.0.0.7")));
        assert!(r.contains(ip("::ffff:a00:ff")));
        assert!(!r.contains(ip("::ffff:10.0.1.0")));
        // A mapped address is an IPv4 peer, not a member of an IPv6 range.
        assert!(!c("::/0").contains(ip("::ffff:10.0.0.7")));
        // The deprecated IPv4-compatible form (::a.b.c.d) is an ordinary IPv6 address.
        assert!(!r.contains(ip("::10.0.0.7")));
        // Ranges written in mapped form are IPv4 ranges.
        assert!(c("::ffff:10.0.0.0/120").contains(ip("10.0.0.9")));
        assert!(allowed(&[c("::ffff:0:0/96")], ip("203.0.113.5")));
    }

    #[test]
    fn covers() {
        assert!(c("10.0.0.0/8").covers(&c("10.1.0.0/16")));
        assert!(c("10.0.0.0/8").covers(&c("10.0.0.0/8")));
        assert!(c("10.0.0.0/8").covers(&c("10.255.255.255")));
        assert!(!c("10.1.0.0/16").covers(&c("10.0.0.0/8")));
        assert!(!c("10.0.0.0/8").covers(&c("11.0.0.0/16")));
        assert!(c("0.0.0.0/0").covers(&c("1.2.3.4")));
        assert!(!c("0.0.0.0/0").covers(&c("::/0")));
        assert!(!c("::/0").covers(&c("0.0.0.0/0")));
        assert!(c("fd00::/8").covers(&c("fd12:3456::/32")));
        assert!(!c("fd00::/8").covers(&c("fc00::/7")));
    }

    #[test]
    fn allow_list() {
        assert!(allowed(&[], ip("8.8.8.8")));
        assert!(allowed(&[], ip("::1")));
        let list = [c("10.0.0.0/24"), c("fd00::/8")];
        assert!(allowed(&list, ip("10.0.0.5")));
        assert!(allowed(&list, ip("::ffff:10.0.0.5")));
        assert!(allowed(&list, ip("fd00::5")));
        assert!(!allowed(&list, ip("10.0.1.5")));
        assert!(!allowed(&list, ip("2001:db8::1")));
    }

    #[test]
    fn new_checks_the_prefix() {
        assert!(Cidr::new(ip("1.2.3.4"), 33).is_err());
        assert!(Cidr::new(ip("::1"), 129).is_err());
        assert_eq!(Cidr::new(ip("1.2.3.4"), 16), Ok(c("1.2.0.0/16")));
    }

    /// Bit `i` (0 = most significant) of a `width`-bit address.
    fn bit(value: u128, width: u32, i: u32) -> bool {
        (value >> (width - 1 - i)) & 1 == 1
    }

    /// The naive reference: the first `prefix` bits agree one by one.
    fn naive_contains(net: IpAddr, prefix: u8, ip: IpAddr) -> bool {
        let (a, b, width) = match (net, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                (u128::from(u32::from(a)), u128::from(u32::from(b)), 32)
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return false,
        };
        (0..u32::from(prefix)).all(|i| bit(a, width, i) == bit(b, width, i))
    }

    fn arb_cidr() -> impl Strategy<Value = (IpAddr, u8)> {
        prop_oneof![
            (any::<u32>(), 0u8..=32).prop_map(|(a, p)| (IpAddr::V4(Ipv4Addr::from(a)), p)),
            (any::<u128>(), 0u8..=128).prop_map(|(a, p)| (IpAddr::V6(Ipv6Addr::from(a)), p)),
        ]
    }

    proptest! {
        #[test]
        fn display_parse_round_trip((addr, prefix) in arb_cidr()) {
            let cidr = Cidr::new(addr, prefix).unwrap();
            let text = cidr.to_string();
            prop_assert_eq!(text.parse::<Cidr>(), Ok(cidr));
            // The written form parses to the same range too.
            prop_assert_eq!(format!("{addr}/{prefix}").parse::<Cidr>(), Ok(cidr));
        }

        #[test]
        fn contains_agrees_with_a_bitwise_check(
            (addr, prefix) in arb_cidr(),
            flip in any::<u128>(),
            near in any::<bool>(),
        ) {
            let cidr = Cidr::new(addr, prefix).unwrap();
            let net = cidr.network();
            // Either a random address or the network with a few low bits changed.
            let probe = match net {
                IpAddr::V4(n) => {
                    let x = if near { u32::from(n) ^ (flip as u32 & 0x3ff) } else { flip as u32 };
                    IpAddr::V4(Ipv4Addr::from(x))
                }
                IpAddr::V6(n) => {
                    let x = if near { u128::from(n) ^ (flip & 0x3ff) } else { flip };
                    IpAddr::V6(Ipv6Addr::from(x))
                }
            };
            let want = naive_contains(net, cidr.prefix(), unmap(probe));
            prop_assert_eq!(cidr.contains(probe), want);
            // The network address itself is always inside.
            prop_assert!(cidr.contains(net));
        }
    }
}
