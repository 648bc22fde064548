//! The client's address behind trusted proxies (`IDENTITY_TRUSTED_PROXIES`).
//!
//! A request's client address is its TCP peer, unless that peer is inside
//! one of the trusted networks: then it is the right-most entry of the
//! `x-forwarded-for` metadata that is not itself a trusted proxy, as nginx's
//! `real_ip` (with `real_ip_recursive on`) and Envoy's trusted hops read it.
//! Several `x-forwarded-for` entries are read as one list, in order. The walk
//! goes from the right: each trusted entry is one more proxy and the walk
//! goes on; the first untrusted one is the client. If every entry is
//! trusted, the left-most is used. An entry that is not an IP address
//! (optionally with a port, IPv6 in brackets then) stops the walk, and the
//! last good hop, a trusted proxy, is the client: a proxy that writes such
//! entries is misconfigured, and blaming it keeps one client's garbage from
//! choosing an address. (A client can only ever add entries to the *left* of
//! what its first trusted proxy appends, so it can never pick the address
//! that is used.)
//!
//! From an untrusted peer, and with the default empty list, the header is
//! ignored entirely: anyone can send it.
//!
//! [`ClientAddressLayer`] resolves the address once per call, before any
//! handler, and leaves it in the request's extensions for
//! [`crate::api::auth::client_address`]; the sign-in throttle, the leak-report
//! limiter, the audit log's `source_address` and a token's
//! `last_used_address` all read it from there.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    task::{Context, Poll},
};

use tonic::transport::server::TcpConnectInfo;
use tower::{Layer, Service};

use crate::api::auth::TlsPeer;

/// The metadata key proxies append the address they received from to.
pub const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// Entries of `x-forwarded-for` read at most, from the right; a longer chain
/// is cut there and the last trusted hop reached is used.
const MAX_HOPS: usize = 32;

/// The networks whose peers may say, in `x-forwarded-for`, whom they are
/// forwarding for. Empty by default: nobody.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    networks: Vec<Network>,
}

/// One CIDR block, its address already masked to the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Network {
    V4 { bits: u32, prefix: u8 },
    V6 { bits: u128, prefix: u8 },
}

impl Network {
    fn parse(raw: &str) -> Result<Self, &'static str> {
        let (address, prefix) = match raw.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (raw, None),
        };
        let address: IpAddr = address
            .parse()
            .map_err(|_| "is not a CIDR block such as 10.0.0.0/8 or fd00::/8")?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(digits) => digits
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max && !digits.starts_with('+'))
                .ok_or("has a prefix length that is not 0 to 32 (IPv4) or 0 to 128 (IPv6)")?,
        };
        let network = match address {
            IpAddr::V4(v4) => Network::V4 {
                bits: u32::from(v4),
                prefix,
            },
            IpAddr::V6(v6) => Network::V6 {
                bits: u128::from(v6),
                prefix,
            },
        };
        if network.masked() != network {
            return Err("has address bits set beyond its prefix length");
        }
        Ok(network)
    }

    fn masked(self) -> Self {
        match self {
            Network::V4 { bits, prefix } => Network::V4 {
                bits: bits & u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0),
                prefix,
            },
            Network::V6 { bits, prefix } => Network::V6 {
                bits: bits & u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0),
                prefix,
            },
        }
    }

    fn contains(self, ip: IpAddr) -> bool {
        match (self, ip.to_canonical()) {
            (Network::V4 { prefix, .. }, IpAddr::V4(v4)) => {
                Network::V4 {
                    bits: u32::from(v4),
                    prefix,
                }
                .masked()
                    == self
            }
            (Network::V6 { prefix, .. }, IpAddr::V6(v6)) => {
                Network::V6 {
                    bits: u128::from(v6),
                    prefix,
                }
                .masked()
                    == self
            }
            _ => false,
        }
    }
}

impl TrustedProxies {
    /// Parses a comma-separated list of CIDR blocks (`10.0.0.0/8`,
    /// `fd00::/8`; a bare address is a block of one). Blank entries are
    /// skipped. An error says which entry is wrong and why, never what it
    /// holds.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut networks = Vec::new();
        for (i, entry) in raw.split(',').map(str::trim).enumerate() {
            if entry.is_empty() {
                continue;
            }
            let network = Network::parse(entry).map_err(|why| format!("entry {} {why}", i + 1))?;
            networks.push(network);
        }
        Ok(Self { networks })
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    /// Whether `ip` (IPv4-mapped IPv6 addresses as IPv4) is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.networks.iter().any(|n| n.contains(ip))
    }

    /// The client address of a request from `peer` whose `x-forwarded-for`
    /// values, in order, are `forwarded` (see the module documentation).
    pub fn resolve<'a>(
        &self,
        peer: SocketAddr,
        forwarded: impl DoubleEndedIterator<Item = &'a [u8]>,
    ) -> ClientAddress {
        let mut client = ClientAddress {
            ip: peer.ip(),
            port: Some(peer.port()),
            forwarded: false,
        };
        if !self.contains(peer.ip()) {
            return client;
        }
        let mut hops = 0;
        for value in forwarded.rev() {
            let Ok(text) = std::str::from_utf8(value) else {
                return client;
            };
            for entry in text.rsplit(',') {
                hops += 1;
                let Some(hop) = (hops <= MAX_HOPS).then(|| parse_hop(entry)).flatten() else {
                    return client;
                };
                client = hop;
                if !self.contains(hop.ip) {
                    return client;
                }
            }
        }
        client
    }
}

/// One `x-forwarded-for` entry: `ip`, `ipv4:port`, `[ipv6]` or
/// `[ipv6]:port`, with optional surrounding whitespace.
fn parse_hop(entry: &str) -> Option<ClientAddress> {
    let entry = entry.trim_matches(|c| c == ' ' || c == '\t');
    let (ip, port) = if let Ok(ip) = entry.parse::<IpAddr>() {
        (ip, None)
    } else if let Ok(socket) = entry.parse::<SocketAddr>() {
        (socket.ip(), Some(socket.port()))
    } else {
        let inner = entry.strip_prefix('[')?.strip_suffix(']')?;
        (IpAddr::V6(inner.parse().ok()?), None)
    };
    Some(ClientAddress {
        ip,
        port,
        forwarded: true,
    })
}

/// Where a call came from, after [`TrustedProxies::resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddress {
    /// The client's IP address.
    pub ip: IpAddr,
    /// Its port, when known (always for a TCP peer; for a forwarded address
    /// only if the proxy wrote one).
    pub port: Option<u16>,
    /// Whether it came from `x-forwarded-for` (rather than being the peer).
    pub forwarded: bool,
}

impl fmt::Display for ClientAddress {
    /// `ip:port` (`[ipv6]:port`) or, without a port, the bare IP.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => SocketAddr::new(self.ip, port).fmt(f),
            None => self.ip.fmt(f),
        }
    }
}

/// A tower layer that resolves each call's [`ClientAddress`] under
/// `trusted` and adds it to the request's extensions.
#[derive(Debug, Clone)]
pub struct ClientAddressLayer {
    trusted: Arc<TrustedProxies>,
}

impl ClientAddressLayer {
    /// Trusts `trusted` to forward addresses.
    pub fn new(trusted: TrustedProxies) -> Self {
        Self {
            trusted: Arc::new(trusted),
        }
    }
}

impl<S> Layer<S> for ClientAddressLayer {
    type Service = ResolveClientAddress<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ResolveClientAddress {
            inner,
            trusted: Arc::clone(&self.trusted),
        }
    }
}

/// The service [`ClientAddressLayer`] produces.
#[derive(Debug, Clone)]
pub struct ResolveClientAddress<S> {
    inner: S,
    trusted: Arc<TrustedProxies>,
}

impl<S, B> Service<http::Request<B>> for ResolveClientAddress<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let extensions = request.extensions();
        let peer = match extensions.get::<TlsPeer>() {
            Some(peer) => Some(peer.remote_addr),
            None => extensions
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr),
        };
        if let Some(peer) = peer {
            let values = request.headers().get_all(X_FORWARDED_FOR);
            let client = self
                .trusted
                .resolve(peer, values.iter().map(http::HeaderValue::as_bytes));
            if let Some(call) = request.extensions().get::<super::observe::CallSpan>() {
                call.record_client_address(&client);
            }
            request.extensions_mut().insert(client);
        }
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(raw: &str) -> TrustedProxies {
        TrustedProxies::parse(raw).expect("valid list")
    }

    fn resolve(trusted: &TrustedProxies, peer: &str, headers: &[&str]) -> String {
        trusted
            .resolve(
                peer.parse().expect("peer"),
                headers.iter().map(|h| h.as_bytes()),
            )
            .to_string()
    }

    #[test]
    fn cidr_lists_parse_and_match_v4_v6_and_mapped_addresses() {
        let trusted = proxies(" 10.0.0.0/8, 192.168.1.7 ,,fd00::/8, 2001:db8::1");
        for inside in [
            "10.255.0.1",
            "192.168.1.7",
            "fd12::1",
            "2001:db8::1",
            "::ffff:10.1.2.3",
        ] {
            assert!(trusted.contains(inside.parse().expect("ip")), "{inside}");
        }
        for outside in [
            "11.0.0.1",
            "192.168.1.8",
            "fe80::1",
            "2001:db8::2",
            "::a00:1",
        ] {
            assert!(!trusted.contains(outside.parse().expect("ip")), "{outside}");
        }
        assert!(proxies("0.0.0.0/0").contains("203.0.113.1".parse().expect("ip")));
        assert!(!proxies("0.0.0.0/0").contains("2001:db8::1".parse().expect("ip")));
        assert!(proxies("::/0").contains("2001:db8::1".parse().expect("ip")));
        assert!(proxies("").is_empty());
    }

    #[test]
    fn bad_entries_are_named_by_position_without_their_value() {
        for (raw, why) in [
            ("10.0.0.0/8, secret-host", "entry 2 is not a CIDR"),
            ("10.0.0.1/8", "entry 1 has address bits set"),
            ("10.0.0.0/33", "entry 1 has a prefix length"),
            ("fd00::/129", "entry 1 has a prefix length"),
            ("10.0.0.0/+8", "entry 1 has a prefix length"),
            ("10.0.0.0/", "entry 1 has a prefix length"),
        ] {
            let err = TrustedProxies::parse(raw).expect_err(raw);
            assert!(err.starts_with(why), "{raw}: {err}");
            assert!(!err.contains("secret-host"), "{err}");
        }
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let trusted = proxies("10.0.0.0/8");
        assert_eq!(
            resolve(&trusted, "203.0.113.9:5000", &["198.51.100.1, 10.0.0.1"]),
            "203.0.113.9:5000"
        );
        assert_eq!(
            resolve(&TrustedProxies::default(), "10.0.0.1:1", &["198.51.100.1"]),
            "10.0.0.1:1"
        );
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_client() {
        let trusted = proxies("10.0.0.0/8, fd00::/8");
        let peer = "10.0.0.2:443";
        // A client's own claim sits to the left of what the proxy appended.
        assert_eq!(
            resolve(&trusted, peer, &["1.1.1.1, 203.0.113.5"]),
            "203.0.113.5"
        );
        // Trusted hops are skipped, across several headers, in order.
        assert_eq!(
            resolve(
                &trusted,
                peer,
                &["1.1.1.1, 203.0.113.5", "10.1.1.1,fd00::7"]
            ),
            "203.0.113.5"
        );
        assert_eq!(
            resolve(&trusted, peer, &["[2001:db8::5]:4711"]),
            "[2001:db8::5]:4711"
        );
        assert_eq!(resolve(&trusted, peer, &["[2001:db8::5]"]), "2001:db8::5");
        assert_eq!(
            resolve(&trusted, peer, &["203.0.113.5:80"]),
            "203.0.113.5:80"
        );
        // Every hop trusted: the left-most one.
        assert_eq!(resolve(&trusted, peer, &["10.9.9.9, 10.1.1.1"]), "10.9.9.9");
        // No header: the proxy itself.
        assert_eq!(resolve(&trusted, peer, &[]), "10.0.0.2:443");
    }

    #[test]
    fn a_malformed_hop_stops_the_walk_at_the_last_good_one() {
        let trusted = proxies("10.0.0.0/8");
        let peer = "10.0.0.2:443";
        assert_eq!(resolve(&trusted, peer, &["unknown"]), "10.0.0.2:443");
        assert_eq!(resolve(&trusted, peer, &[""]), "10.0.0.2:443");
        assert_eq!(
            resolve(&trusted, peer, &["203.0.113.5, garbage, 10.3.3.3"]),
            "10.3.3.3"
        );
        assert_eq!(
            resolve(&trusted, peer, &["203.0.113.5, garbage, 198.51.100.7"]),
            "198.51.100.7",
            "the walk never reaches what lies left of the client"
        );
        assert_eq!(resolve(&trusted, peer, &["fe80::1%eth0"]), "10.0.0.2:443");
        let long = vec!["10.0.0.9"; MAX_HOPS + 5].join(",");
        assert_eq!(resolve(&trusted, peer, &[&long]), "10.0.0.9");
    }
}
