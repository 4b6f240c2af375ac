//! Registering tunnels on an agent connection: validation, allow-lists, the tunnel creation
//! rate limit, port allocation, and taking a tunnel back with its single-use reconnect token
//! (including from a half-open older connection of the same agent).

use super::*;

impl Session {
    pub(super) async fn register(&mut self, info: TunnelInfo) -> ControlMessage {
        match self.try_register(info).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(code = e.code as u16, reason = e.reason, "tunnel refused");
                ControlMessage::error(e.code, e.message, Some(e.reason))
            }
        }
    }

    async fn try_register(&mut self, info: TunnelInfo) -> Result<ControlMessage, AllocError> {
        let invalid = |message: String, reason: &'static str| AllocError {
            code: ErrorCode::InvalidConfig,
            message,
            reason,
        };
        if info.protocol != "tcp" {
            return Err(invalid(
                format!("protocol {:?} is not supported (only tcp)", info.protocol),
                "unsupported_protocol",
            ));
        }
        if info.ports.len() > 1 || info.name.len() > 128 {
            return Err(invalid(
                "a tunnel takes at most one port and a name of at most 128 bytes".into(),
                "invalid_tunnel_info",
            ));
        }
        if self.draining {
            return Err(AllocError {
                code: ErrorCode::ShuttingDown,
                message: "relay is shutting down".into(),
                reason: "shutdown",
            });
        }
        if self.owned.len() >= self.shared.config.max_tunnels_per_agent {
            return Err(invalid(
                "too many tunnels on one connection".into(),
                "too_many_tunnels",
            ));
        }
        let allowed = self.allow_list(&info.allowed_ips)?;
        if let (Some(id), Some(token)) = (&info.tunnel_id, &info.reconnect_token)
            && let Some(reply) = self.reclaim(id, token, &info, &allowed).await?
        {
            return Ok(reply);
        }
        if let Err((limit, retry)) = self.take_tunnel_tokens() {
            self.shared.state.count_rate_limited(limit);
            tracing::warn!(
                limit,
                retry_after = retry.as_secs(),
                "tunnel creation rate limited"
            );
            return Ok(ControlMessage::error_retry(
                ErrorCode::RateLimit,
                "too many new tunnels",
                "tunnel_creation",
                retry.as_secs(),
            ));
        }
        let id = Uuid::new_v4();
        let listener = {
            let mut ports = lock(&self.shared.state.ports);
            allocate(
                &mut ports,
                id,
                self.public_ip,
                info.ports.first().copied(),
                &self.shared.config.port_range,
                random_u64(),
            )?
        };
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let token = random_token();
        let tunnel = Tunnel {
            id,
            subject: self.subject.clone(),
            name: info.name.clone(),
            port,
            endpoint: join_host_port(&self.public_host, port),
            allowed,
            token_hash: Sha256::digest(token.as_bytes()).into(),
            state: TunnelState::Pending { session: self.id },
            counters: Arc::new(TunnelCounters::default()),
            active_since: SystemTime::now(),
        };
        tracing::info!(tunnel_id = %id, port, name = %info.name, state = "registered", "tunnel registered");
        Ok(self.install(tunnel, listener, token).await)
    }

    /// Takes one new-tunnel token from the subject's bucket and one from the source's, or
    /// neither: a refusal by one limit costs nothing at the other. `Err` names the limit (the
    /// longer wait if both refuse) and the wait until it has a token again.
    fn take_tunnel_tokens(&self) -> Result<(), (&'static str, std::time::Duration)> {
        let now = Instant::now().into_std();
        let mut l = lock(&self.shared.limits);
        let by_subject = l.tunnel_subject.peek(&self.subject, now);
        let by_ip = l.tunnel_ip.peek(&self.source, now);
        match (by_subject, by_ip) {
            (Ok(()), Ok(())) => {
                // Both had a token under this lock, so both takes succeed.
                let a = l.tunnel_subject.check(&self.subject, now);
                let b = l.tunnel_ip.check(&self.source, now);
                debug_assert!(a.is_ok() && b.is_ok());
                Ok(())
            }
            (Err(s), Err(i)) if i > s => Err(("tunnel_creation_ip", i)),
            (Err(s), _) => Err(("tunnel_creation", s)),
            (Ok(()), Err(i)) => Err(("tunnel_creation_ip", i)),
        }
    }

    /// Takes a tunnel back with its reconnect token. `Ok(None)`: the lease is gone, register
    /// anew.
    async fn reclaim(
        &mut self,
        id: &str,
        token: &str,
        info: &TunnelInfo,
        allowed: &[Cidr],
    ) -> Result<Option<ControlMessage>, AllocError> {
        let refused = || AllocError {
            code: ErrorCode::ReconnectRefused,
            message: "reconnect token not accepted; register the tunnel anew".into(),
            reason: "reconnect_refused",
        };
        let Ok(id) = Uuid::parse_str(id) else {
            return Ok(None);
        };
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let holder = {
            let tunnels = lock(&self.shared.state.tunnels);
            let Some(t) = tunnels.get(&id) else {
                return Ok(None);
            };
            let ok: bool = t.token_hash.ct_eq(&hash).into();
            if !ok || t.subject != self.subject {
                tracing::warn!(tunnel_id = %id, "reconnect token refused");
                return Err(refused());
            }
            match t.state {
                TunnelState::Pending { session } | TunnelState::Active { session }
                    if session != self.id =>
                {
                    Some(session)
                }
                TunnelState::Pending { .. } | TunnelState::Active { .. } => return Err(refused()),
                TunnelState::Reconnecting { .. } => None,
            }
        };
        if let Some(old) = holder {
            // The same agent, back on a new connection while the relay still holds the old,
            // half-open one: end the old session and wait until it has let the port go.
            tracing::info!(tunnel_id = %id, old_session = old, "agent took its tunnel over from a stale connection");
            let cancel = lock(&self.shared.state.agents)
                .get(&old)
                .map(|a| a.cancel.clone());
            if let Some(c) = cancel {
                c.cancel();
            }
            let state = &self.shared.state;
            let wait = state.wait_until(|s| {
                lock(&s.tunnels)
                    .get(&id)
                    .is_none_or(|t| matches!(t.state, TunnelState::Reconnecting { .. }))
            });
            if tube_net::timer::timeout(std::time::Duration::from_secs(5), wait)
                .await
                .is_err()
            {
                return Err(AllocError {
                    code: ErrorCode::ServerError,
                    message: "previous connection did not end".into(),
                    reason: "takeover_timeout",
                });
            }
        }
        let (port, name, counters) = {
            let tunnels = lock(&self.shared.state.tunnels);
            let Some(t) = tunnels.get(&id) else {
                return Ok(None);
            };
            (t.port, t.name.clone(), t.counters.clone())
        };
        let listener = bind(self.public_ip, port).map_err(|_| AllocError {
            code: ErrorCode::PortUnavailable,
            message: format!("port {port} cannot be bound"),
            reason: "port_in_use",
        })?;
        let token = random_token();
        let tunnel = Tunnel {
            id,
            subject: self.subject.clone(),
            name: if info.name.is_empty() {
                name
            } else {
                info.name.clone()
            },
            port,
            endpoint: join_host_port(&self.public_host, port),
            allowed: allowed.to_vec(),
            token_hash: Sha256::digest(token.as_bytes()).into(),
            state: TunnelState::Pending { session: self.id },
            counters,
            active_since: SystemTime::now(),
        };
        tracing::info!(tunnel_id = %id, port, state = "registered", "tunnel reclaimed with its reconnect token");
        Ok(Some(self.install(tunnel, listener, token).await))
    }

    async fn install(
        &mut self,
        tunnel: Tunnel,
        listener: TcpListener,
        token: String,
    ) -> ControlMessage {
        let id = tunnel.id;
        let reply = ControlMessage::RegisterResponse {
            status: "success".into(),
            tunnel_id: id.to_string(),
            config: TunnelConfig {
                endpoint: tunnel.endpoint.clone(),
                public_key: self.shared.fingerprint.clone(),
                allowed_ips: tunnel.allowed.iter().map(|c| c.to_string()).collect(),
            },
            reconnect_token: Some(token),
        };
        let lease = lease_of(&tunnel, None);
        lock(&self.shared.state.tunnels).insert(id, tunnel);
        self.shared.state.changed();
        self.pending.insert(id, listener);
        self.owned.push(id);
        self.shared.store_put(lease).await;
        reply
    }

    fn allow_list(&self, requested: &[String]) -> Result<Vec<Cidr>, AllocError> {
        let cfg = &self.shared.config;
        let invalid = |message: String| AllocError {
            code: ErrorCode::InvalidConfig,
            message,
            reason: "invalid_allowed_ips",
        };
        if requested.len() > cfg.max_allowed_ips {
            return Err(invalid(format!(
                "at most {} allowed_ips entries",
                cfg.max_allowed_ips
            )));
        }
        let mut out = Vec::with_capacity(requested.len());
        for r in requested {
            let c: Cidr = r
                .parse()
                .map_err(|_| invalid(format!("{r:?} is not an address range")))?;
            if !cfg.allowed_ips_policy.is_empty()
                && !cfg.allowed_ips_policy.iter().any(|p| p.covers(&c))
            {
                return Err(invalid(format!("{c} is outside the relay's policy")));
            }
            out.push(c);
        }
        if out.is_empty() {
            out = cfg.allowed_ips_policy.clone();
        }
        Ok(out)
    }
}

pub(super) fn lease_of(t: &Tunnel, expires_at: Option<u64>) -> Lease {
    Lease {
        tunnel_id: t.id.to_string(),
        subject: t.subject.clone(),
        name: t.name.clone(),
        port: t.port,
        endpoint: t.endpoint.clone(),
        token_hash: t.token_hash,
        allowed_ips: t.allowed.iter().map(|c| c.to_string()).collect(),
        expires_at,
    }
}

fn random_token() -> String {
    let mut b = [0u8; 32];
    // getrandom failing means the OS has no entropy source; the token would then be all
    // zeros, so fall back to a v4 UUID pair (also OS randomness) rather than panic.
    if getrandom::fill(&mut b).is_err() {
        return format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
    }
    hex::encode(b)
}

pub(crate) fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // Only spreads port choices; a failure leaves the first port of the range as the start.
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_hosts_are_bracketed() {
        assert_eq!(join_host_port("::1", 80), "[::1]:80");
        assert_eq!(join_host_port("relay.example", 80), "relay.example:80");
    }
}
