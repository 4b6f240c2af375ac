//! Address ranges (`tube_proto::cidr`): the input is an `allowed_ips` entry a peer sent
//! (lossily made UTF-8); addresses to test against it are derived from the input.
//!
//! - Parsing never panics; an error keeps at most 64 bytes of the input, a prefix of it.
//! - A parsed range prints canonically: its `Display` parses back to an equal range and
//!   prints the same again. Its prefix fits its family, its network has no host bits set,
//!   it contains its network and covers itself.
//! - `contains` agrees with a bit-by-bit reference for addresses around the range's edges and
//!   pseudo-random ones, IPv4-mapped IPv6 addresses counting as IPv4; `allowed` is "empty list
//!   or any range contains it".
//! - `Cidr::new` on a derived address and prefix either fails (prefix too long) or gives a
//!   range that prints and parses back to itself and agrees with the reference on that address.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use tube_fuzz::Rng;
use tube_proto::cidr::{Cidr, allowed};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut rng = Rng::from_bytes(data);

    match text.parse::<Cidr>() {
        Ok(c) => check_range(&c, &mut rng),
        Err(e) => {
            assert!(e.0.len() <= 64, "error keeps {} bytes", e.0.len());
            assert!(text.starts_with(&e.0));
        }
    }

    let addr = random_ip(&mut rng);
    let prefix = (rng.next_u64() % 140) as u8;
    if let Ok(c) = Cidr::new(addr, prefix) {
        check_range(&c, &mut rng);
        assert_eq!(
            c.contains(addr),
            reference_contains(&c, addr),
            "{c} contains {addr}"
        );
    }
});

fn check_range(c: &Cidr, rng: &mut Rng) {
    let shown = c.to_string();
    let back: Cidr = match shown.parse() {
        Ok(b) => b,
        Err(e) => panic!("{shown} does not parse back: {e}"),
    };
    assert_eq!(back, *c, "{shown}");
    assert_eq!(back.to_string(), shown);

    let (width, bits) = match c.network() {
        IpAddr::V4(v4) => (32u32, u128::from(u32::from(v4))),
        IpAddr::V6(v6) => (128u32, u128::from(v6)),
    };
    let prefix = u32::from(c.prefix());
    assert!(prefix <= width, "{shown}");
    // The low `width - prefix` bits (all 128 for `::/0`).
    let host = u128::MAX.checked_shr(128 - (width - prefix)).unwrap_or(0);
    assert_eq!(bits & host, 0, "host bits set in {shown}");
    assert!(c.contains(c.network()));
    assert!(c.covers(c));
    if let IpAddr::V6(v6) = c.network() {
        assert!(
            v6.to_ipv4_mapped().is_none() || prefix < 96,
            "{shown} should have been stored as IPv4"
        );
    }

    let last = bits | host;
    let mut probes = vec![bits, last, bits.wrapping_sub(1), last.wrapping_add(1)];
    probes.extend((0..4).map(|_| {
        let r = u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64());
        (r & host) | bits
    }));
    probes.extend((0..4).map(|_| u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64())));
    for p in probes {
        let ips = if width == 32 {
            let v4 = Ipv4Addr::from(p as u32);
            vec![IpAddr::V4(v4), IpAddr::V6(v4.to_ipv6_mapped())]
        } else {
            vec![IpAddr::V6(Ipv6Addr::from(p))]
        };
        for ip in ips {
            let want = reference_contains(c, ip);
            assert_eq!(c.contains(ip), want, "{shown} contains {ip}");
            assert_eq!(allowed(&[*c], ip), want);
            assert!(allowed(&[], ip));
        }
    }
}

/// Bit by bit: the first `prefix` bits of `ip` (IPv4-mapped counted as IPv4) equal the
/// network's, in the same family.
fn reference_contains(c: &Cidr, ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    };
    let (net, addr, width) = match (c.network(), ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => (u128::from(u32::from(n)), u128::from(u32::from(a)), 32),
        (IpAddr::V6(n), IpAddr::V6(a)) => (u128::from(n), u128::from(a), 128),
        _ => return false,
    };
    (0..u32::from(c.prefix())).all(|i| {
        let bit = width - 1 - i;
        (net >> bit) & 1 == (addr >> bit) & 1
    })
}

fn random_ip(rng: &mut Rng) -> IpAddr {
    let r = u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64());
    match rng.below(3) {
        0 => IpAddr::V4(Ipv4Addr::from(r as u32)),
        1 => IpAddr::V6(Ipv4Addr::from(r as u32).to_ipv6_mapped()),
        _ => IpAddr::V6(Ipv6Addr::from(r)),
    }
}
