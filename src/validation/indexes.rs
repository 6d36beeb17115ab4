//! `indexUrl`, `extraIndexUrls` and `trustedHosts`.

use super::{Checker, ROOT};

pub(super) fn check_index_url(c: &mut Checker, path: &str, raw: &str) {
    match url::Url::parse(raw.trim()) {
        Ok(url) => {
            if url.scheme() != "http" && url.scheme() != "https" {
                c.error(path, format!("{raw:?} must be an http:// or https:// URL"));
            } else if url.host_str().is_none_or(str::is_empty) {
                c.error(path, format!("{raw:?} has no host"));
            } else if !url.username().is_empty() || url.password().is_some() {
                c.error(
                    path,
                    "must not contain credentials (they would be visible in the pod spec); use credentials.secretRef",
                );
            } else if raw.trim() != raw || raw.contains(char::is_whitespace) {
                c.error(path, format!("{raw:?} contains whitespace"));
            }
        }
        Err(e) => c.error(path, format!("{raw:?} is not a valid URL: {e}")),
    }
}

pub(super) fn check_host_port(host: &str) -> Result<(), String> {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or("unbalanced '['")?;
        addr.parse::<std::net::Ipv6Addr>()
            .map_err(|_| "invalid IPv6 address")?;
        (None, after.strip_prefix(':'))
    } else {
        match host.split_once(':') {
            Some((name, port)) => (Some(name), Some(port)),
            None => (Some(host), None),
        }
    };
    if let Some(name) = name {
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || ch == '-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !valid {
            return Err("invalid host name".into());
        }
    }
    if let Some(port) = port {
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err(format!("invalid port {port:?}")),
        }
    }
    Ok(())
}

pub(super) fn warn_insecure_indexes(
    c: &mut Checker,
    index_url: Option<&str>,
    extra: &[String],
    trusted: &[String],
) {
    let urls = index_url
        .map(|u| (format!("{ROOT}.indexUrl"), u.to_owned()))
        .into_iter()
        .chain(
            extra
                .iter()
                .enumerate()
                .map(|(i, u)| (format!("{ROOT}.extraIndexUrls[{i}]"), u.clone())),
        );
    for (path, raw) in urls {
        let Ok(url) = url::Url::parse(raw.trim()) else {
            continue;
        };
        if url.scheme() != "http" {
            continue;
        }
        let host = url.host_str().unwrap_or_default().to_owned();
        let host_port = url.port().map(|p| format!("{host}:{p}"));
        let listed = trusted
            .iter()
            .any(|t| *t == host || Some(t) == host_port.as_ref());
        if !listed {
            c.warn(
                path,
                format!(
                    "{raw:?} uses plain http and {host:?} is not in trustedHosts; pip will refuse it"
                ),
            );
        }
    }
}
