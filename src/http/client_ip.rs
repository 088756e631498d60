//! The client address stored when a payload names none: the peer, or the
//! address a trusted proxy forwarded.

use std::net::{IpAddr, SocketAddr};

use axum::extract::ConnectInfo;
use axum::http::Request;
use ipnet::IpNet;

/// Walks `X-Forwarded-For` from the right (the hop nearest to us), skipping
/// trusted proxies; the first untrusted address is the client. Without a
/// trusted peer the header is ignored: anyone can write it.
pub fn client_ip<B>(request: &Request<B>, trusted: &[IpNet]) -> Option<IpAddr> {
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())?;
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let mut client = peer;
    for value in request.headers().get_all("x-forwarded-for").iter().rev() {
        let Ok(text) = value.to_str() else {
            return Some(client);
        };
        for hop in text.rsplit(',') {
            let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                return Some(client);
            };
            client = ip;
            if !is_trusted(&ip) {
                return Some(client);
            }
        }
    }
    Some(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(peer: &str, forwarded: &[&str]) -> Request<()> {
        let mut builder = Request::builder();
        for value in forwarded {
            builder = builder.header("x-forwarded-for", *value);
        }
        let mut request = builder.body(()).unwrap();
        request.extensions_mut().insert(ConnectInfo(format!("{peer}:1234").parse::<SocketAddr>().unwrap()));
        request
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn untrusted_peers_cannot_forge_the_client_address() {
        let ip = client_ip(&request("198.51.100.9", &["203.0.113.7"]), &nets(&["10.0.0.0/8"]));
        assert_eq!(ip, Some("198.51.100.9".parse().unwrap()));
    }

    #[test]
    fn trusted_proxies_are_skipped_from_the_right() {
        let trusted = nets(&["10.0.0.0/8"]);
        let ip = client_ip(&request("10.0.0.5", &["1.2.3.4, 203.0.113.7, 10.0.0.9"]), &trusted);
        assert_eq!(ip, Some("203.0.113.7".parse().unwrap()));
        let ip = client_ip(&request("10.0.0.5", &[]), &trusted);
        assert_eq!(ip, Some("10.0.0.5".parse().unwrap()));
        let ip = client_ip(&request("10.0.0.5", &["garbage"]), &trusted);
        assert_eq!(ip, Some("10.0.0.5".parse().unwrap()));
    }
}
