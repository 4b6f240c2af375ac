//! Config files (`--config relay.toml`, `--config agent.toml`): serde input structs that
//! refuse unknown keys. Values here sit below flags and `TUBE_*` variables and above defaults;
//! `relay.rs` and `expose.rs` do the merging. Examples live in `examples/` and are parsed by
//! the tests below.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

/// `relay.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RelayFile {
    pub(crate) listen: Option<String>,
    pub(crate) admin: Option<String>,
    pub(crate) public_host: Option<String>,
    pub(crate) public_bind: Option<String>,
    pub(crate) port_range: Option<String>,
    pub(crate) data_dir: Option<String>,
    pub(crate) handshake_timeout: Option<String>,
    pub(crate) max_handshakes: Option<usize>,
    pub(crate) max_tunnels_per_agent: Option<usize>,
    pub(crate) heartbeat_interval: Option<String>,
    pub(crate) heartbeat_misses: Option<u32>,
    pub(crate) heartbeat_min_interval: Option<String>,
    pub(crate) lease_grace: Option<String>,
    pub(crate) allow: Option<Vec<String>>,
    pub(crate) max_allowed_ips: Option<usize>,
    pub(crate) rate_limits: Option<RateLimitsFile>,
}

/// `[rate_limits]` of `relay.toml` (seed 001 section 5.2).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RateLimitsFile {
    pub(crate) auth_attempts_per_minute: Option<u32>,
    pub(crate) tunnels_per_hour: Option<u32>,
    pub(crate) auth_failure_delay: Option<String>,
}

/// `agent.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AgentFile {
    pub(crate) relay: Option<String>,
    pub(crate) token: Option<String>,
    pub(crate) fingerprint: Option<String>,
    pub(crate) heartbeat_interval: Option<String>,
    pub(crate) heartbeat_misses: Option<u32>,
    pub(crate) reconnect: Option<ReconnectFile>,
    #[serde(default)]
    pub(crate) tunnel: Vec<TunnelFile>,
}

/// `[reconnect]` of `agent.toml` (seed 001 section 6.1).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReconnectFile {
    pub(crate) initial_delay: Option<String>,
    pub(crate) max_delay: Option<String>,
    pub(crate) max_attempts: Option<u32>,
    pub(crate) backoff_factor: Option<f64>,
    pub(crate) jitter: Option<f64>,
}

/// `[[tunnel]]` of `agent.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TunnelFile {
    pub(crate) local: String,
    pub(crate) remote_port: Option<u16>,
    pub(crate) name: Option<String>,
    #[serde(default)]
    pub(crate) allow: Vec<String>,
}

/// Reads and parses a TOML file into `T`.
pub(crate) fn load<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("error: reading {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        // One line: `error: FILE:LINE: message` (toml's own text quotes the source over
        // several lines).
        let line = e
            .span()
            .map(|s| text.get(..s.start).unwrap_or(&text).matches('\n').count() + 1);
        let message = e.message().trim().replace('\n', " ");
        match line {
            Some(l) => anyhow::anyhow!("error: {}:{l}: {message}", path.display()),
            None => anyhow::anyhow!("error: {}: {message}", path.display()),
        }
    })
}

/// Parses a duration written like `30s`, `5m`, `100ms`.
pub(crate) fn duration(what: &str, s: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(s)
        .with_context(|| format!("error: {what}: {s:?} is not a duration (e.g. 30s)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples() -> Vec<std::path::PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut v: Vec<_> = std::fs::read_dir(&dir)
            .expect("examples dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn every_example_config_parses_and_converts() {
        let files = examples();
        assert_eq!(files.len(), 3, "relay, agent and longpoll: {files:?}");
        for f in files {
            let name = f
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            if name.starts_with("relay") {
                let c: RelayFile = load(&f).unwrap();
                crate::relay::from_file_only(c).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            } else if name.starts_with("agent") {
                let c: AgentFile = load(&f).unwrap();
                assert!(!c.tunnel.is_empty(), "{name} shows tunnels");
                crate::expose::from_file_only(c).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            } else if name.starts_with("longpoll") {
                let c: crate::longpoll::LongpollFile = load(&f).unwrap();
                crate::longpoll::from_file_only(c).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            } else {
                panic!("unexpected example {name}");
            }
        }
    }

    #[test]
    fn file_errors_are_one_line_with_the_line_number() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("relay.toml");
        std::fs::write(&f, "listen = \"127.0.0.1:1\"\nbogus = 3\n").unwrap();
        let e = format!("{:#}", load::<RelayFile>(&f).unwrap_err());
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.starts_with(&format!("error: {}:2: unknown field `bogus`", f.display())),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<RelayFile>("listen = \"1.2.3.4:1\"\nlisten_port = 3").is_err());
        assert!(toml::from_str::<AgentFile>("[[tunnel]]\nlocal = \"a:1\"\nport = 3").is_err());
        assert!(duration("x", "soon").is_err());
        assert_eq!(
            duration("x", "1500ms").unwrap(),
            Duration::from_millis(1500)
        );
    }
}
