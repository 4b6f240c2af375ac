//! Config files (`--config relay.toml`, `agent.toml`, `longpoll.toml`, `hub.toml`,
//! `node.toml`, `peer.toml`): serde input structs that refuse unknown keys, and the helpers that put a flag
//! over its file value. Values here sit below flags and `TUBE_*` variables and above defaults;
//! each command's module does its merging. Examples live in `examples/` and are parsed by the
//! tests below.

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
    pub(crate) max_handshakes_per_ip: Option<usize>,
    pub(crate) max_tunnels_per_agent: Option<usize>,
    pub(crate) heartbeat_interval: Option<String>,
    pub(crate) heartbeat_misses: Option<u32>,
    pub(crate) heartbeat_min_interval: Option<String>,
    pub(crate) lease_grace: Option<String>,
    pub(crate) shutdown_grace: Option<String>,
    pub(crate) allow: Option<Vec<String>>,
    pub(crate) max_allowed_ips: Option<usize>,
    pub(crate) threads: Option<usize>,
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
    pub(crate) shutdown_grace: Option<String>,
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

/// A setting from its flag, else parsed from the file's text (`what`, the key, names it in
/// errors), else `None` (the default applies).
pub(crate) fn pick<T>(
    flag: Option<T>,
    file: Option<String>,
    what: &str,
) -> anyhow::Result<Option<T>>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    match (flag, file) {
        (Some(v), _) => Ok(Some(v)),
        (None, Some(s)) => s
            .parse()
            .map(Some)
            .map_err(|e| anyhow::anyhow!("error: {what}: {s:?}: {e}")),
        (None, None) => Ok(None),
    }
}

/// A duration from its flag, else from the file (see [`duration`]), else `None`.
pub(crate) fn pick_duration(
    flag: Option<Duration>,
    file: Option<String>,
    what: &str,
) -> anyhow::Result<Option<Duration>> {
    match (flag, file) {
        (Some(d), _) => Ok(Some(d)),
        (None, Some(s)) => duration(what, &s).map(Some),
        (None, None) => Ok(None),
    }
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
        assert_eq!(
            files.len(),
            6,
            "relay, agent, longpoll, hub, node, peer: {files:?}"
        );
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
            } else if name.starts_with("hub") {
                let c: crate::hub::HubFile = load(&f).unwrap();
                crate::hub::hub_from_file_only(c).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            } else if name.starts_with("node") {
                let c: crate::hub::NodeFile = load(&f).unwrap();
                crate::hub::node_from_file_only(c).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            } else if name.starts_with("peer") {
                let c: crate::mailbox::PeerFile = load(&f).unwrap();
                crate::mailbox::peer_from_file_only(c).unwrap_or_else(|e| panic!("{name}: {e:#}"));
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

    // ---- property tests of every config-file parser (issue 8) ----

    use proptest::prelude::*;
    use toml::{Table, Value};

    /// The type a key of a config file takes.
    #[derive(Debug, Clone, Copy)]
    enum Kind {
        Str,
        Int,
        Float,
        Bool,
        Strs,
        Table(&'static [(&'static str, Kind)]),
        Tables(&'static [(&'static str, Kind)]),
    }

    use Kind::{Float, Int, Str, Strs, Tables};

    const RATE_LIMITS: &[(&str, Kind)] = &[
        ("auth_attempts_per_minute", Int),
        ("tunnels_per_hour", Int),
        ("auth_failure_delay", Str),
    ];
    const RELAY: &[(&str, Kind)] = &[
        ("listen", Str),
        ("admin", Str),
        ("public_host", Str),
        ("public_bind", Str),
        ("port_range", Str),
        ("data_dir", Str),
        ("handshake_timeout", Str),
        ("max_handshakes", Int),
        ("max_handshakes_per_ip", Int),
        ("max_tunnels_per_agent", Int),
        ("heartbeat_interval", Str),
        ("heartbeat_misses", Int),
        ("heartbeat_min_interval", Str),
        ("lease_grace", Str),
        ("shutdown_grace", Str),
        ("allow", Strs),
        ("max_allowed_ips", Int),
        ("rate_limits", Kind::Table(RATE_LIMITS)),
    ];
    const RECONNECT: &[(&str, Kind)] = &[
        ("initial_delay", Str),
        ("max_delay", Str),
        ("max_attempts", Int),
        ("backoff_factor", Float),
        ("jitter", Float),
    ];
    const TUNNEL: &[(&str, Kind)] = &[
        ("local", Str),
        ("remote_port", Int),
        ("name", Str),
        ("allow", Strs),
    ];
    const AGENT: &[(&str, Kind)] = &[
        ("relay", Str),
        ("token", Str),
        ("fingerprint", Str),
        ("heartbeat_interval", Str),
        ("heartbeat_misses", Int),
        ("shutdown_grace", Str),
        ("reconnect", Kind::Table(RECONNECT)),
        ("tunnel", Tables(TUNNEL)),
    ];
    const LONGPOLL: &[(&str, Kind)] = &[
        ("listen", Str),
        ("admin", Str),
        ("backends", Strs),
        ("poll_timeout", Str),
        ("token_ttl", Str),
        ("idle_timeout", Str),
        ("backend_timeout", Str),
        ("backoff_min", Str),
        ("backoff_max", Str),
        ("max_body", Int),
        ("max_client_packets", Int),
        ("max_client_bytes", Int),
        ("max_total_bytes", Int),
        ("max_clients", Int),
        ("body_timeout", Str),
        ("header_timeout", Str),
        ("http_idle_timeout", Str),
        ("max_connections", Int),
        ("write_timeout", Str),
    ];

    const HUB: &[(&str, Kind)] = &[
        ("listen", Str),
        ("admin", Str),
        ("data_dir", Str),
        ("intermediates", Int),
        ("approval_timeout", Str),
        ("hop_timeout", Str),
        ("handshake_timeout", Str),
        ("max_chains_per_node", Int),
        ("max_nodes", Int),
        ("max_handshakes", Int),
        ("registrations_per_hour", Int),
        ("max_nodes_per_source", Int),
        ("max_accounts", Int),
        ("evict_unseen_after", Str),
        ("registration_token", Str),
    ];
    const NODE: &[(&str, Kind)] = &[
        ("hub", Str),
        ("hub_fingerprint", Str),
        ("name", Str),
        ("bind", Str),
        ("api", Str),
        ("data_dir", Str),
        ("no_relay", Kind::Bool),
        ("hop_timeout", Str),
        ("max_chains", Int),
        ("reconnect_max", Str),
        ("registration_token", Str),
    ];
    const PEER: &[(&str, Kind)] = &[
        ("listen", Str),
        ("tls", Kind::Bool),
        ("http", Str),
        ("http_hold", Str),
        ("admin", Str),
        ("data_dir", Str),
        ("max_queue_messages", Int),
        ("max_queue_bytes", Int),
        ("max_total_bytes", Int),
        ("max_clients", Int),
        ("max_connections", Int),
        ("max_age", Str),
        ("idle_timeout", Str),
        ("registrations_per_minute", Int),
        ("deliveries_per_minute", Int),
    ];

    /// Parses `text` as each config file and converts what parses, as `tube` does: whatever
    /// the text, this returns.
    fn parse_every_file(text: &str) {
        if let Ok(f) = toml::from_str::<RelayFile>(text) {
            let _ = crate::relay::from_file_only(f);
        }
        if let Ok(f) = toml::from_str::<AgentFile>(text) {
            let _ = crate::expose::from_file_only(f);
        }
        if let Ok(f) = toml::from_str::<crate::longpoll::LongpollFile>(text) {
            let _ = crate::longpoll::from_file_only(f);
        }
        if let Ok(f) = toml::from_str::<crate::hub::HubFile>(text) {
            let _ = crate::hub::hub_from_file_only(f);
        }
        if let Ok(f) = toml::from_str::<crate::hub::NodeFile>(text) {
            let _ = crate::hub::node_from_file_only(f);
        }
        if let Ok(f) = toml::from_str::<crate::mailbox::PeerFile>(text) {
            let _ = crate::mailbox::peer_from_file_only(f);
        }
    }

    /// Text that looks a little like TOML: assignments, table headers, strays.
    fn tomlish_text() -> impl Strategy<Value = String> {
        "([a-z_]{1,16} ?= ?[^\n]{0,24}\n|\\[\\[?[a-z_]{1,12}\\]\\]?\n|[^\n]{0,16}\n){0,8}"
    }

    /// Any key a file knows (at any depth), or one none does.
    fn any_key() -> impl Strategy<Value = String> {
        let known: Vec<&str> = [
            RELAY,
            RATE_LIMITS,
            AGENT,
            RECONNECT,
            TUNNEL,
            LONGPOLL,
            HUB,
            NODE,
        ]
        .concat()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
        prop_oneof![
            9 => prop::sample::select(known).prop_map(str::to_string),
            1 => "[a-z_]{1,12}",
        ]
    }

    /// Strings that reach every parser behind the keys: free text, durations, addresses,
    /// ranges, CIDRs, fingerprints, URLs, all a little off or not.
    fn any_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[0-9]{1,25}(ns|ms|s|m|h|d|w|y|x)?",
            "[0-9a-f.:/\\[\\]-]{0,24}",
            "(sha256:)?[0-9a-fA-F]{0,66}",
            "(https?|ftp)://[a-z0-9.:]{0,20}/?",
        ]
    }

    /// A value of `kind` with random content.
    fn typed_value(kind: Kind) -> BoxedStrategy<Value> {
        match kind {
            Str => any_text().prop_map(Value::String).boxed(),
            Int => prop_oneof![any::<i64>(), 0..=i64::from(u16::MAX)]
                .prop_map(Value::Integer)
                .boxed(),
            Float => any::<f64>().prop_map(Value::Float).boxed(),
            Kind::Bool => any::<bool>().prop_map(Value::Boolean).boxed(),
            Strs => prop::collection::vec(any_text().prop_map(Value::String), 0..4)
                .prop_map(Value::Array)
                .boxed(),
            Kind::Table(keys) => typed_table(keys).prop_map(Value::Table).boxed(),
            Tables(keys) => prop::collection::vec(typed_table(keys).prop_map(Value::Table), 0..3)
                .prop_map(Value::Array)
                .boxed(),
        }
    }

    /// Some of `keys`, each with a value of its type and random content.
    fn typed_table(keys: &'static [(&'static str, Kind)]) -> impl Strategy<Value = Table> {
        keys.iter()
            .map(|(k, kind)| {
                prop::option::of(typed_value(*kind).prop_map(move |v| (k.to_string(), v)))
            })
            .collect::<Vec<_>>()
            .prop_map(|f| f.into_iter().flatten().collect())
    }

    /// A value of a random type: strings (free, duration-like, address-like), integers,
    /// floats (NaN and infinities too), booleans, a datetime, arrays and tables of those.
    fn any_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            any::<String>().prop_map(Value::String),
            "[0-9]{1,25}(ns|ms|s|m|h|d|w|y|x)?".prop_map(Value::String),
            "[0-9a-f.:/\\[\\]-]{0,24}".prop_map(Value::String),
            any::<i64>().prop_map(Value::Integer),
            any::<f64>().prop_map(Value::Float),
            any::<bool>().prop_map(Value::Boolean),
            Just(Value::Datetime(
                "1979-05-27T07:32:00Z".parse().expect("datetime")
            )),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(any_key(), inner, 0..4)
                    .prop_map(|m| Value::Table(m.into_iter().collect())),
            ]
        })
    }

    /// A document for a file with `keys`, as TOML text, and whether one of its top-level keys
    /// is unknown to that file: either 0 to 8 keys of the files with values of random types,
    /// or the file's own keys with values of their type and random content.
    fn random_document(
        keys: &'static [(&'static str, Kind)],
    ) -> impl Strategy<Value = (String, bool)> {
        let random_types = prop::collection::btree_map(any_key(), any_value(), 0..8)
            .prop_map(|m| m.into_iter().collect::<Table>());
        prop_oneof![random_types, typed_table(keys)].prop_filter_map(
            "not representable in TOML",
            move |table| {
                let unknown = table
                    .keys()
                    .any(|k| !keys.iter().any(|(known, _)| known == k));
                toml::to_string(&table).ok().map(|text| (text, unknown))
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Arbitrary text, TOML-like text and arbitrary bytes in a file: every config-file
        /// parser (and `load`, which reads the file and formats the error) returns.
        #[test]
        fn config_files_arbitrary_text_never_panics(
            free in any::<String>(),
            tomlish in tomlish_text(),
            bytes in prop::collection::vec(any::<u8>(), 0..256),
        ) {
            parse_every_file(&free);
            parse_every_file(&tomlish);
            let dir = tempfile::tempdir().expect("tempdir");
            let f = dir.path().join("config.toml");
            std::fs::write(&f, &bytes).expect("write");
            let _ = load::<RelayFile>(&f);
            let _ = load::<AgentFile>(&f);
            let _ = load::<crate::longpoll::LongpollFile>(&f);
            let _ = load::<crate::hub::HubFile>(&f);
            let _ = load::<crate::hub::NodeFile>(&f);
            let _ = load::<crate::mailbox::PeerFile>(&f);
        }

        /// Documents of known keys with values of random types: `relay.toml` parsing and
        /// conversion return, and an unknown top-level key is always refused.
        #[test]
        fn relay_toml_random_documents_never_panic_and_unknown_keys_are_refused(
            (text, unknown) in random_document(RELAY),
        ) {
            let parsed = toml::from_str::<RelayFile>(&text);
            prop_assert!(!(unknown && parsed.is_ok()), "unknown key accepted:\n{}", text);
            if let Ok(f) = parsed {
                let _ = crate::relay::from_file_only(f);
            }
        }

        /// The same for `agent.toml`.
        #[test]
        fn agent_toml_random_documents_never_panic_and_unknown_keys_are_refused(
            (text, unknown) in random_document(AGENT),
        ) {
            let parsed = toml::from_str::<AgentFile>(&text);
            prop_assert!(!(unknown && parsed.is_ok()), "unknown key accepted:\n{}", text);
            if let Ok(f) = parsed {
                let _ = crate::expose::from_file_only(f);
            }
        }

        /// The same for `longpoll.toml`.
        #[test]
        fn longpoll_toml_random_documents_never_panic_and_unknown_keys_are_refused(
            (text, unknown) in random_document(LONGPOLL),
        ) {
            let parsed = toml::from_str::<crate::longpoll::LongpollFile>(&text);
            prop_assert!(!(unknown && parsed.is_ok()), "unknown key accepted:\n{}", text);
            if let Ok(f) = parsed {
                let _ = crate::longpoll::from_file_only(f);
            }
        }

        /// The same for `hub.toml`.
        #[test]
        fn hub_toml_random_documents_never_panic_and_unknown_keys_are_refused(
            (text, unknown) in random_document(HUB),
        ) {
            let parsed = toml::from_str::<crate::hub::HubFile>(&text);
            prop_assert!(!(unknown && parsed.is_ok()), "unknown key accepted:\n{}", text);
            if let Ok(f) = parsed {
                let _ = crate::hub::hub_from_file_only(f);
            }
        }

        /// The same for `peer.toml`.
        #[test]
        fn peer_toml_random_documents_never_panic_and_unknown_keys_are_refused(
            (text, unknown) in random_document(PEER),
        ) {
            let parsed = toml::from_str::<crate::mailbox::PeerFile>(&text);
            prop_assert!(!(unknown && parsed.is_ok()), "unknown key accepted:\n{}", text);
            if let Ok(f) = parsed {
                let _ = crate::mailbox::peer_from_file_only(f);
            }
        }

        /// The same for `node.toml`.
        #[test]
        fn node_toml_random_documents_never_panic_and_unknown_keys_are_refused(
            (text, unknown) in random_document(NODE),
        ) {
            let parsed = toml::from_str::<crate::hub::NodeFile>(&text);
            prop_assert!(!(unknown && parsed.is_ok()), "unknown key accepted:\n{}", text);
            if let Ok(f) = parsed {
                let _ = crate::hub::node_from_file_only(f);
            }
        }
    }

    // Valid values, one strategy per kind of setting.

    fn addr() -> impl Strategy<Value = Value> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| std::net::SocketAddr::from((ip, port)).to_string()),
            (any::<[u16; 8]>(), any::<u16>()).prop_map(|(ip, port)| {
                std::net::SocketAddr::from((std::net::Ipv6Addr::from(ip), port)).to_string()
            }),
        ]
        .prop_map(Value::String)
    }

    fn ip() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|ip| std::net::Ipv4Addr::from(ip).to_string()),
            any::<[u16; 8]>().prop_map(|ip| std::net::Ipv6Addr::from(ip).to_string()),
        ]
        .prop_map(Value::String)
    }

    fn duration_text() -> impl Strategy<Value = Value> {
        (
            1u64..1_000_000,
            prop::sample::select(vec!["ms", "s", "m", "h", "d"]),
        )
            .prop_map(|(n, unit)| Value::String(format!("{n}{unit}")))
    }

    fn count(max: i64) -> impl Strategy<Value = Value> {
        (0..=max).prop_map(Value::Integer)
    }

    fn word() -> impl Strategy<Value = Value> {
        "[A-Za-z0-9._/-]{1,30}".prop_map(Value::String)
    }

    fn cidrs() -> impl Strategy<Value = Value> {
        prop::collection::vec(
            (any::<[u8; 4]>(), 0u8..=32).prop_map(|(ip, prefix)| {
                Value::String(format!("{}/{prefix}", std::net::Ipv4Addr::from(ip)))
            }),
            0..4,
        )
        .prop_map(Value::Array)
    }

    fn float(range: std::ops::RangeInclusive<f64>) -> impl Strategy<Value = Value> {
        range.prop_map(Value::Float)
    }

    type Field = BoxedStrategy<Option<(String, Value)>>;

    fn optional(key: &'static str, s: impl Strategy<Value = Value> + 'static) -> Field {
        prop::option::of(s.prop_map(move |v| (key.to_string(), v))).boxed()
    }

    fn required(key: &'static str, s: impl Strategy<Value = Value> + 'static) -> Field {
        s.prop_map(move |v| Some((key.to_string(), v))).boxed()
    }

    fn table(fields: Vec<Field>) -> impl Strategy<Value = Value> {
        fields.prop_map(|f| Value::Table(f.into_iter().flatten().collect()))
    }

    fn document(fields: Vec<Field>) -> impl Strategy<Value = Table> {
        fields.prop_map(|f| f.into_iter().flatten().collect())
    }

    fn relay_document() -> impl Strategy<Value = Table> {
        let port_range = (1u16..=u16::MAX)
            .prop_flat_map(|lo| (Just(lo), lo..=u16::MAX))
            .prop_map(|(lo, hi)| Value::String(format!("{lo}-{hi}")));
        let rate_limits = table(vec![
            optional("auth_attempts_per_minute", count(u32::MAX.into())),
            optional("tunnels_per_hour", count(u32::MAX.into())),
            optional("auth_failure_delay", duration_text()),
        ]);
        document(vec![
            optional("listen", addr()),
            optional("admin", addr()),
            optional("public_host", word()),
            optional("public_bind", ip()),
            optional("port_range", port_range),
            optional("data_dir", word()),
            optional("handshake_timeout", duration_text()),
            optional("max_handshakes", count(i64::MAX)),
            optional("max_handshakes_per_ip", count(i64::MAX)),
            optional("max_tunnels_per_agent", count(i64::MAX)),
            optional("heartbeat_interval", duration_text()),
            optional("heartbeat_misses", count(u32::MAX.into())),
            optional("heartbeat_min_interval", duration_text()),
            optional("lease_grace", duration_text()),
            optional("shutdown_grace", duration_text()),
            optional("allow", cidrs()),
            optional("max_allowed_ips", count(i64::MAX)),
            optional("rate_limits", rate_limits),
        ])
    }

    fn agent_document() -> impl Strategy<Value = Table> {
        let reconnect = table(vec![
            optional("initial_delay", duration_text()),
            optional("max_delay", duration_text()),
            optional("max_attempts", count(u32::MAX.into())),
            optional("backoff_factor", float(1.0..=10.0)),
            optional("jitter", float(0.0..=1.0)),
        ]);
        let tunnel = table(vec![
            required("local", addr()),
            optional("remote_port", count(u16::MAX.into())),
            optional("name", word()),
            optional("allow", cidrs()),
        ]);
        let fingerprint = "sha256:[0-9a-f]{64}".prop_map(Value::String);
        document(vec![
            required("relay", word()),
            optional("token", word()),
            required("fingerprint", fingerprint),
            optional("heartbeat_interval", duration_text()),
            optional("heartbeat_misses", count(u32::MAX.into())),
            optional("shutdown_grace", duration_text()),
            optional("reconnect", reconnect),
            required(
                "tunnel",
                prop::collection::vec(tunnel, 1..4).prop_map(Value::Array),
            ),
        ])
    }

    fn longpoll_document() -> impl Strategy<Value = Table> {
        let backend = (word(), any::<u16>()).prop_map(|(path, port)| match path {
            Value::String(p) => Value::String(format!("http://127.0.0.1:{port}/{p}")),
            other => other,
        });
        let max = i64::MAX;
        document(vec![
            optional("listen", addr()),
            optional("admin", addr()),
            required(
                "backends",
                prop::collection::vec(backend, 1..4).prop_map(Value::Array),
            ),
            optional("poll_timeout", duration_text()),
            optional("token_ttl", duration_text()),
            optional("idle_timeout", duration_text()),
            optional("backend_timeout", duration_text()),
            optional("backoff_min", duration_text()),
            optional("backoff_max", duration_text()),
            optional("max_body", count(max)),
            optional("max_client_packets", count(max)),
            optional("max_client_bytes", count(max)),
            optional("max_total_bytes", count(max)),
            optional("max_clients", count(max)),
            optional("body_timeout", duration_text()),
            optional("header_timeout", duration_text()),
            optional("http_idle_timeout", duration_text()),
            optional("max_connections", count(max)),
            optional("write_timeout", duration_text()),
        ])
    }

    // What a parsed file holds, written back as a TOML table, to compare with the document.

    fn put(t: &mut Table, key: &str, v: Option<Value>) {
        if let Some(v) = v {
            t.insert(key.to_string(), v);
        }
    }

    fn text(v: &Option<String>) -> Option<Value> {
        v.clone().map(Value::String)
    }

    fn int<N: TryInto<i64>>(v: Option<N>) -> Option<Value> {
        v.and_then(|n| n.try_into().ok()).map(Value::Integer)
    }

    fn texts(v: &[String]) -> Value {
        Value::Array(v.iter().cloned().map(Value::String).collect())
    }

    fn relay_back(f: &RelayFile) -> Table {
        let mut t = Table::new();
        put(&mut t, "listen", text(&f.listen));
        put(&mut t, "admin", text(&f.admin));
        put(&mut t, "public_host", text(&f.public_host));
        put(&mut t, "public_bind", text(&f.public_bind));
        put(&mut t, "port_range", text(&f.port_range));
        put(&mut t, "data_dir", text(&f.data_dir));
        put(&mut t, "handshake_timeout", text(&f.handshake_timeout));
        put(&mut t, "max_handshakes", int(f.max_handshakes));
        put(
            &mut t,
            "max_handshakes_per_ip",
            int(f.max_handshakes_per_ip),
        );
        put(
            &mut t,
            "max_tunnels_per_agent",
            int(f.max_tunnels_per_agent),
        );
        put(&mut t, "heartbeat_interval", text(&f.heartbeat_interval));
        put(&mut t, "heartbeat_misses", int(f.heartbeat_misses));
        put(
            &mut t,
            "heartbeat_min_interval",
            text(&f.heartbeat_min_interval),
        );
        put(&mut t, "lease_grace", text(&f.lease_grace));
        put(&mut t, "shutdown_grace", text(&f.shutdown_grace));
        put(&mut t, "allow", f.allow.as_deref().map(texts));
        put(&mut t, "max_allowed_ips", int(f.max_allowed_ips));
        put(
            &mut t,
            "rate_limits",
            f.rate_limits.as_ref().map(|r| {
                let mut t = Table::new();
                put(
                    &mut t,
                    "auth_attempts_per_minute",
                    int(r.auth_attempts_per_minute),
                );
                put(&mut t, "tunnels_per_hour", int(r.tunnels_per_hour));
                put(&mut t, "auth_failure_delay", text(&r.auth_failure_delay));
                Value::Table(t)
            }),
        );
        t
    }

    fn agent_back(f: &AgentFile) -> Table {
        let mut t = Table::new();
        put(&mut t, "relay", text(&f.relay));
        put(&mut t, "token", text(&f.token));
        put(&mut t, "fingerprint", text(&f.fingerprint));
        put(&mut t, "heartbeat_interval", text(&f.heartbeat_interval));
        put(&mut t, "heartbeat_misses", int(f.heartbeat_misses));
        put(&mut t, "shutdown_grace", text(&f.shutdown_grace));
        put(
            &mut t,
            "reconnect",
            f.reconnect.as_ref().map(|r| {
                let mut t = Table::new();
                put(&mut t, "initial_delay", text(&r.initial_delay));
                put(&mut t, "max_delay", text(&r.max_delay));
                put(&mut t, "max_attempts", int(r.max_attempts));
                put(&mut t, "backoff_factor", r.backoff_factor.map(Value::Float));
                put(&mut t, "jitter", r.jitter.map(Value::Float));
                Value::Table(t)
            }),
        );
        let tunnels = f.tunnel.iter().map(|tun| {
            let mut t = Table::new();
            t.insert("local".into(), Value::String(tun.local.clone()));
            put(&mut t, "remote_port", int(tun.remote_port));
            put(&mut t, "name", text(&tun.name));
            // `allow` defaults to empty: an empty list written and none written read the same.
            if !tun.allow.is_empty() {
                t.insert("allow".into(), texts(&tun.allow));
            }
            Value::Table(t)
        });
        t.insert("tunnel".into(), Value::Array(tunnels.collect()));
        t
    }

    fn longpoll_back(f: &crate::longpoll::LongpollFile) -> Table {
        let mut t = Table::new();
        put(&mut t, "listen", text(&f.listen));
        put(&mut t, "admin", text(&f.admin));
        t.insert("backends".into(), texts(&f.backends));
        put(&mut t, "poll_timeout", text(&f.poll_timeout));
        put(&mut t, "token_ttl", text(&f.token_ttl));
        put(&mut t, "idle_timeout", text(&f.idle_timeout));
        put(&mut t, "backend_timeout", text(&f.backend_timeout));
        put(&mut t, "backoff_min", text(&f.backoff_min));
        put(&mut t, "backoff_max", text(&f.backoff_max));
        put(&mut t, "max_body", int(f.max_body));
        put(&mut t, "max_client_packets", int(f.max_client_packets));
        put(&mut t, "max_client_bytes", int(f.max_client_bytes));
        put(&mut t, "max_total_bytes", int(f.max_total_bytes));
        put(&mut t, "max_clients", int(f.max_clients));
        put(&mut t, "body_timeout", text(&f.body_timeout));
        put(&mut t, "header_timeout", text(&f.header_timeout));
        put(&mut t, "http_idle_timeout", text(&f.http_idle_timeout));
        put(&mut t, "max_connections", int(f.max_connections));
        put(&mut t, "write_timeout", text(&f.write_timeout));
        t
    }

    /// `allow = []` in a `[[tunnel]]` reads back as no `allow`.
    fn without_empty_allow(mut doc: Table) -> Table {
        if let Some(Value::Array(tunnels)) = doc.get_mut("tunnel") {
            for t in tunnels.iter_mut() {
                if let Value::Table(t) = t
                    && t.get("allow")
                        .is_some_and(|a| a.as_array().is_some_and(Vec::is_empty))
                {
                    t.remove("allow");
                }
            }
        }
        doc
    }

    proptest! {
        /// A valid `relay.toml` (every key optional, valid values) parses to exactly the
        /// values written, and converts into relay settings.
        #[test]
        fn relay_toml_valid_documents_round_trip(doc in relay_document()) {
            let text = toml::to_string(&doc).expect("to TOML");
            let f: RelayFile = toml::from_str(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            prop_assert_eq!(relay_back(&f), doc, "{}", text);
            if let Err(e) = crate::relay::from_file_only(f) {
                prop_assert!(false, "{:#}\n{}", e, text);
            }
        }

        /// A valid `agent.toml` (relay, fingerprint and at least one tunnel) parses to exactly
        /// the values written, and converts into agent settings.
        #[test]
        fn agent_toml_valid_documents_round_trip(doc in agent_document()) {
            let text = toml::to_string(&doc).expect("to TOML");
            let f: AgentFile = toml::from_str(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            prop_assert_eq!(agent_back(&f), without_empty_allow(doc), "{}", text);
            if let Err(e) = crate::expose::from_file_only(f) {
                prop_assert!(false, "{:#}\n{}", e, text);
            }
        }

        /// A valid `longpoll.toml` (at least one backend) parses to exactly the values
        /// written, and converts into the proxy's settings.
        #[test]
        fn longpoll_toml_valid_documents_round_trip(doc in longpoll_document()) {
            let text = toml::to_string(&doc).expect("to TOML");
            let f: crate::longpoll::LongpollFile = toml::from_str(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            prop_assert_eq!(longpoll_back(&f), doc, "{}", text);
            if let Err(e) = crate::longpoll::from_file_only(f) {
                prop_assert!(false, "{:#}\n{}", e, text);
            }
        }
    }
}
