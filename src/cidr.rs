//! IP networks (`10.0.0.0/8`, `::1/128`) and sets of them: pure, parsed
//! once at config load, matched with a mask and a compare per network.
//!
//! An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, what a dual-stack socket
//! reports for an IPv4 peer) matches as the IPv4 address it is.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One network: an address with its host bits cleared, and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cidr {
    V4 { net: u32, prefix: u8 },
    V6 { net: u128, prefix: u8 },
}

impl Cidr {
    /// `ADDR/PREFIX`, or a bare address (a single host). Host bits under the
    /// prefix are cleared (`192.168.1.10/24` is `192.168.1.0/24`), as
    /// HAProxy and Go's `ParseCIDR` do.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let bad = |why: &str| format!("invalid network `{s}`: {why}; expected e.g. \"10.0.0.0/8\" or \"::1/128\"");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            // Digits only: no sign, no spaces, no leading `+`.
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().map_err(|_| bad("bad prefix length"))?
            }
            Some(_) => return Err(bad("bad prefix length")),
        };
        if prefix > max {
            return Err(bad(&format!("prefix length above {max}")));
        }
        Ok(match addr {
            IpAddr::V4(a) => Cidr::V4 { net: a.to_bits() & mask32(prefix), prefix },
            IpAddr::V6(a) => Cidr::V6 { net: a.to_bits() & mask128(prefix), prefix },
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self, ip.to_canonical()) {
            (Cidr::V4 { net, prefix }, IpAddr::V4(a)) => a.to_bits() & mask32(*prefix) == *net,
            (Cidr::V6 { net, prefix }, IpAddr::V6(a)) => a.to_bits() & mask128(*prefix) == *net,
            _ => false,
        }
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix.min(128))).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Cidr::parse(s)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cidr::V4 { net, prefix } => write!(f, "{}/{prefix}", std::net::Ipv4Addr::from_bits(*net)),
            Cidr::V6 { net, prefix } => write!(f, "{}/{prefix}", std::net::Ipv6Addr::from_bits(*net)),
        }
    }
}

/// A set of networks; empty matches nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrSet {
    nets: Vec<Cidr>,
}

impl CidrSet {
    pub fn new(nets: impl IntoIterator<Item = Cidr>) -> Self {
        let mut nets: Vec<Cidr> = nets.into_iter().collect();
        nets.dedup();
        CidrSet { nets }
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|n| n.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_networks_match_exactly_their_range() {
        let n = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(n.contains(ip("10.0.0.0")));
        assert!(n.contains(ip("10.255.255.255")));
        assert!(!n.contains(ip("11.0.0.0")));
        assert!(!n.contains(ip("9.255.255.255")));
        let host = Cidr::parse("127.0.0.1/32").unwrap();
        assert!(host.contains(ip("127.0.0.1")));
        assert!(!host.contains(ip("127.0.0.2")));
        let odd = Cidr::parse("192.168.1.128/25").unwrap();
        assert!(odd.contains(ip("192.168.1.200")));
        assert!(!odd.contains(ip("192.168.1.127")));
    }

    #[test]
    fn zero_prefix_matches_every_address_of_its_family_only() {
        let all4 = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all4.contains(ip("1.2.3.4")) && all4.contains(ip("255.255.255.255")));
        assert!(!all4.contains(ip("2001:db8::1")));
        let all6 = Cidr::parse("::/0").unwrap();
        assert!(all6.contains(ip("2001:db8::1")));
        assert!(!all6.contains(ip("1.2.3.4")));
    }

    #[test]
    fn v6_networks_and_v4_mapped_peers() {
        let n = Cidr::parse("2001:db8::/32").unwrap();
        assert!(n.contains(ip("2001:db8:ffff::1")));
        assert!(!n.contains(ip("2001:db9::1")));
        assert!(Cidr::parse("::1/128").unwrap().contains(ip("::1")));
        // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
        assert!(Cidr::parse("10.0.0.0/8").unwrap().contains(ip("::ffff:10.1.2.3")));
        assert!(CidrSet::new([Cidr::parse("127.0.0.1").unwrap()]).contains(ip("::ffff:127.0.0.1")));
    }

    #[test]
    fn a_bare_address_is_a_single_host_and_host_bits_are_cleared() {
        assert_eq!(Cidr::parse("10.1.2.3").unwrap(), Cidr::parse("10.1.2.3/32").unwrap());
        assert_eq!(Cidr::parse("::1").unwrap(), Cidr::parse("::1/128").unwrap());
        assert_eq!(Cidr::parse("192.168.1.10/24").unwrap().to_string(), "192.168.1.0/24");
    }

    #[test]
    fn malformed_networks_are_rejected_with_the_reason() {
        for bad in [
            "",
            "/",
            "10.0.0.0/",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "10.0.0.0/ 8",
            "10.0.0.0/8/8",
            "10.0.0.0/0008",
            "localhost",
            "10.0.0.0 /8",
            "1.2.3.4:80",
            "[::1]/128",
            "10.0.0.0/256",
        ] {
            let err = Cidr::parse(bad).expect_err(bad);
            assert!(err.contains(&format!("`{bad}`")), "{err}");
        }
        assert!(Cidr::parse("10.0.0.0/33").unwrap_err().contains("prefix length above 32"));
    }

    #[test]
    fn an_empty_set_matches_nothing() {
        assert!(!CidrSet::default().contains(ip("127.0.0.1")));
        let set = CidrSet::new(["10.0.0.0/8", "::1/128"].map(|s| Cidr::parse(s).unwrap()));
        assert!(set.contains(ip("10.9.9.9")) && set.contains(ip("::1")) && !set.contains(ip("127.0.0.1")));
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,60}") {
            let _ = Cidr::parse(&s);
        }

        /// A v4 network contains an address iff their first `prefix` bits agree.
        #[test]
        fn v4_contains_agrees_with_bit_comparison(net in any::<u32>(), prefix in 0u8..=32, addr in any::<u32>()) {
            let text = format!("{}/{prefix}", std::net::Ipv4Addr::from_bits(net));
            let cidr = Cidr::parse(&text).unwrap();
            let same = prefix == 0 || (net ^ addr) >> (32 - u32::from(prefix)) == 0;
            prop_assert_eq!(cidr.contains(IpAddr::V4(addr.into())), same);
            // Its own address is always inside, and printing round-trips.
            prop_assert!(cidr.contains(IpAddr::V4(net.into())));
            prop_assert_eq!(Cidr::parse(&cidr.to_string()).unwrap(), cidr);
        }

        #[test]
        fn v6_contains_agrees_with_bit_comparison(net in any::<u128>(), prefix in 0u8..=128, addr in any::<u128>()) {
            let text = format!("{}/{prefix}", std::net::Ipv6Addr::from_bits(net));
            let cidr = Cidr::parse(&text).unwrap();
            let same = prefix == 0 || (net ^ addr) >> (128 - u32::from(prefix)) == 0;
            let addr = std::net::Ipv6Addr::from_bits(addr);
            // Mapped v4 addresses are compared as v4; leave them out here.
            prop_assume!(addr.to_ipv4_mapped().is_none());
            prop_assert_eq!(cidr.contains(IpAddr::V6(addr)), same);
            prop_assert_eq!(Cidr::parse(&cidr.to_string()).unwrap(), cidr);
        }
    }
}
