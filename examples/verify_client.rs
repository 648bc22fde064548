//! Calling `VerifyToken` from your service: the client side the README's
//! section "Calling VerifyToken from your service" recommends, in Rust with
//! tonic. The integration tests run it against the real server.
//!
//! ```text
//! IDENTITY_ADDR=http://127.0.0.1:50051 VERIFIER_TOKEN=idpat_... \
//!   cargo run --example verify_client -- project:read
//! ```
//!
//! It reads one presented credential per line on stdin (what your service
//! found after `authorization: Bearer `), asks `VerifyToken` for the scopes
//! given as arguments, and prints the HTTP status your service would answer
//! and why: `200 <username>`, `401 <reason>`, `403 <missing scope>`, `503
//! <code>` or `500 <code>`.
//!
//! What it does, and why:
//! - **One channel for the process**, connected lazily: tonic reconnects by
//!   itself, with back-off, after the identity service restarts.
//! - **A deadline on every call** (300 ms here): a verification that cannot
//!   answer quickly is an outage, and your request must not hang on it.
//! - **Keepalive pings**, so a connection a load balancer or a failover cut
//!   silently is noticed in seconds rather than at the next call.
//! - **One retry, on UNAVAILABLE only**, after a short pause: the call never
//!   reached a working server, so nothing was spent. Never retry
//!   DEADLINE_EXCEEDED: the server may have spent a use of a limited-use
//!   token.
//! - **Fail closed**: an outage is 503, never "allow".
//! - **The verifier's own credential** failing (UNAUTHENTICATED or
//!   PERMISSION_DENIED) is your configuration's fault, not the client's:
//!   500, and page someone. Rotate that token before it expires.
//!
//! The stubs come from this crate (`identity::api::pb`); your service would
//! generate its own from `proto/` with `tonic-prost-build`.

use std::{io::BufRead as _, time::Duration};

use identity::api::pb::{
    InactiveReason, VerifyTokenRequest, tokens_service_client::TokensServiceClient,
};
use tonic::{Code, Request, metadata::MetadataValue, transport::Channel};

/// Every verification's deadline, unless `VERIFY_DEADLINE_MS` says otherwise.
const DEADLINE: Duration = Duration::from_millis(300);
/// The pause before the one retry of an UNAVAILABLE call.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// What your service answers its own client.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// 200: go ahead, as this user.
    Allow { username: String },
    /// 401: no valid credential.
    Unauthenticated { reason: String },
    /// 403: a valid credential without a scope this request needs.
    Forbidden,
    /// 503: the identity service could not answer in time; fail closed.
    Unavailable { code: Code },
    /// 500: this service's own configuration is wrong (its verifier
    /// credential, or a malformed required scope).
    Misconfigured { code: Code },
}

impl Decision {
    fn http_status(&self) -> u16 {
        match self {
            Decision::Allow { .. } => 200,
            Decision::Unauthenticated { .. } => 401,
            Decision::Forbidden => 403,
            Decision::Unavailable { .. } => 503,
            Decision::Misconfigured { .. } => 500,
        }
    }
}

/// The verifier: one channel, one credential of its own.
struct Verifier {
    client: TokensServiceClient<Channel>,
    authorization: MetadataValue<tonic::metadata::Ascii>,
    deadline: Duration,
}

impl Verifier {
    fn new(
        addr: String,
        verifier_token: &str,
        deadline: Duration,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let channel = Channel::from_shared(addr)?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect_lazy();
        let mut authorization: MetadataValue<_> = format!("Bearer {verifier_token}").parse()?;
        // Never logged by tonic or tower when marked sensitive.
        authorization.set_sensitive(true);
        Ok(Self {
            client: TokensServiceClient::new(channel),
            authorization,
            deadline,
        })
    }

    /// The decision on `presented`, a credential one of your clients sent.
    async fn decide(&self, presented: &str, scopes: &[String]) -> Decision {
        let mut result = self.call(presented, scopes).await;
        if matches!(&result, Err(status) if status.code() == Code::Unavailable) {
            tokio::time::sleep(RETRY_PAUSE).await;
            result = self.call(presented, scopes).await;
        }
        match result {
            Ok(verdict) if verdict.active => Decision::Allow {
                username: verdict.principal.map(|p| p.username).unwrap_or_default(),
            },
            Ok(verdict) => match InactiveReason::try_from(verdict.reason) {
                Ok(InactiveReason::InsufficientScope) => Decision::Forbidden,
                Ok(reason) => Decision::Unauthenticated {
                    reason: reason.as_str_name().to_owned(),
                },
                Err(_) => Decision::Unauthenticated {
                    reason: format!("reason {}", verdict.reason),
                },
            },
            Err(status) => match status.code() {
                Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => {
                    Decision::Unavailable {
                        code: status.code(),
                    }
                }
                code => Decision::Misconfigured { code },
            },
        }
    }

    async fn call(
        &self,
        presented: &str,
        scopes: &[String],
    ) -> Result<identity::api::pb::VerifyTokenResponse, tonic::Status> {
        let mut request = Request::new(VerifyTokenRequest {
            token: presented.to_owned(),
            required_scopes: scopes.to_vec(),
            // The resource the call is for, such as `projects/3f9c2a`, if your
            // service limits tokens to resources (then also map
            // INACTIVE_REASON_RESOURCE_NOT_ALLOWED to 403 below).
            required_resources: Vec::new(),
            // Fill in your own client's address (the first entry of your
            // X-Forwarded-For, if your proxy sets it), for the token's
            // last_used_address.
            client_address: String::new(),
        });
        request.set_timeout(self.deadline);
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        // A clone of a tonic client shares its channel: cheap.
        let mut client = self.client.clone();
        client.verify_token(request).await.map(|r| r.into_inner())
    }
}

/// A gRPC code as the spec spells it (`PERMISSION_DENIED`), for logs that
/// other languages' clients write the same way.
fn code_name(code: Code) -> String {
    let mut name = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr =
        std::env::var("IDENTITY_ADDR").unwrap_or_else(|_| "http://127.0.0.1:50051".to_owned());
    let verifier_token = std::env::var("VERIFIER_TOKEN")
        .map_err(|_| "set VERIFIER_TOKEN to a tokens:verify token")?;
    let scopes: Vec<String> = std::env::args().skip(1).collect();
    let deadline = match std::env::var("VERIFY_DEADLINE_MS") {
        Ok(ms) => Duration::from_millis(ms.parse()?),
        Err(_) => DEADLINE,
    };
    let verifier = Verifier::new(addr, &verifier_token, deadline)?;
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line?;
        let decision = verifier.decide(line.trim(), &scopes).await;
        let detail = match &decision {
            Decision::Allow { username } => username.clone(),
            Decision::Unauthenticated { reason } => reason.clone(),
            Decision::Forbidden => "INACTIVE_REASON_INSUFFICIENT_SCOPE".to_owned(),
            Decision::Unavailable { code } | Decision::Misconfigured { code } => code_name(*code),
        };
        println!("{} {detail}", decision.http_status());
    }
    Ok(())
}
