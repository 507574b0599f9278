//! Route matching: by Host first, then the longest path prefix, then declaration order.
//!
//! Routes that name the request's host are tried before routes that accept any host, so a
//! host-specific route always wins over a catch-all. A prefix matches whole path segments:
//! `/api` matches `/api` and `/api/users` but not `/apis` (a prefix ending in `/` matches
//! anything below it).

use std::collections::HashMap;

use crate::config::RouteConfig;

/// Route lookup table of one configuration generation.
#[derive(Debug, Default)]
pub struct Router {
    by_host: HashMap<String, Vec<(String, usize)>>,
    any_host: Vec<(String, usize)>,
}

impl Router {
    /// A table over `routes` (indices refer to this slice).
    pub fn new(routes: &[RouteConfig]) -> Self {
        let mut r = Router::default();
        for (i, route) in routes.iter().enumerate() {
            let entry = (route.path_prefix.clone(), i);
            if route.hosts.is_empty() {
                r.any_host.push(entry);
            } else {
                for h in &route.hosts {
                    r.by_host.entry(h.clone()).or_default().push(entry.clone());
                }
            }
        }
        // Longest prefix first; the sort is stable, so ties keep declaration order.
        let by_len = |v: &mut Vec<(String, usize)>| v.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        r.by_host.values_mut().for_each(by_len);
        by_len(&mut r.any_host);
        r
    }

    /// The index of the route serving `host` (as sent, port allowed) and `path`.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<usize> {
        if let Some(host) = host.map(strip_port)
            && !self.by_host.is_empty()
        {
            let hit = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                self.by_host.get(&host.to_ascii_lowercase())
            } else {
                self.by_host.get(host)
            };
            if let Some(found) = hit.and_then(|list| first_match(list, path)) {
                return Some(found);
            }
        }
        first_match(&self.any_host, path)
    }
}

fn first_match(list: &[(String, usize)], path: &str) -> Option<usize> {
    list.iter().find(|(prefix, _)| prefix_matches(prefix, path)).map(|(_, i)| *i)
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        && (prefix.ends_with('/')
            || path.len() == prefix.len()
            || path.as_bytes()[prefix.len()] == b'/'
            || path.as_bytes()[prefix.len()] == b'?')
}

/// `host[:port]` or `[v6]:port` → host.
pub fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn routes(src: &str) -> Vec<RouteConfig> {
        Config::parse(Path::new("t.toml"), src).expect("valid").routes
    }

    fn route(name: &str, hosts: &str, prefix: &str) -> String {
        format!(
            "[[routes]]\nname = \"{name}\"\nhosts = [{hosts}]\npath_prefix = \"{prefix}\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\"]\n"
        )
    }

    #[test]
    fn host_then_longest_prefix() {
        let src = [
            route("any", "", "/"),
            route("api", "", "/api"),
            route("shop", "\"shop.example\"", "/"),
            route("shop_api", "\"shop.example\"", "/api/"),
        ]
        .concat();
        let r = Router::new(&routes(&src));
        assert_eq!(r.find(Some("other"), "/x"), Some(0));
        assert_eq!(r.find(None, "/api/v1"), Some(1));
        assert_eq!(r.find(None, "/apis"), Some(0));
        assert_eq!(r.find(Some("SHOP.example:8080"), "/x"), Some(2));
        assert_eq!(r.find(Some("shop.example"), "/api/x"), Some(3));
        assert_eq!(r.find(Some("shop.example"), "/api"), Some(2));
    }

    #[test]
    fn no_catch_all_means_unknown_hosts_get_nothing() {
        let r = Router::new(&routes(&route("shop", "\"shop.example\"", "/")));
        assert_eq!(r.find(Some("evil.example"), "/"), None);
        assert_eq!(r.find(None, "/"), None);
    }

    #[test]
    fn ports_and_v6_are_stripped() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "::1");
    }
}
