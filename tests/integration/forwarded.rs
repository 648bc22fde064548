//! The client address behind a gateway (`IDENTITY_TRUSTED_PROXIES`), on both
//! stores: from a trusted peer, the right-most untrusted `x-forwarded-for`
//! entry is the client, for the sign-in throttle, the leak-report limiter,
//! the audit log and a token's last use; from any other peer, and with no
//! trusted proxies, the header is ignored.

use std::time::Duration;

use identity::{
    api::layers::forwarded::TrustedProxies, config::Config, domain::throttle::ThrottleSettings,
};
use tonic::{Code, Request, metadata::MetadataValue};

use crate::support::{Backend, PASSWORD, TestApp, assert_status, bearer, pb};

/// Runs `$name(backend)` once per backend (these tests need their own
/// settings, so they cannot use `both_backends!`).
macro_rules! on_both {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(crate::support::Backend::Sqlite).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(crate::support::Backend::Postgres).await;
            }
        }
    };
}

const WRONG: &str = "not the password at all";
const ATTACKER: &str = "203.0.113.66";
const ALICE: &str = "198.51.100.7";

/// Trusts `proxies` (the test client connects from 127.0.0.1), with the
/// default throttle except for a first delay long enough that no busy
/// machine outlasts it by accident.
fn behind(proxies: &str) -> impl FnOnce(&mut Config) {
    let trusted = TrustedProxies::parse(proxies).expect("valid proxies");
    move |config| {
        config.trusted_proxies = trusted;
        config.identity.sign_in_throttle = ThrottleSettings {
            base_delay: Duration::from_secs(600),
            max_delay: Duration::from_secs(900),
            ..ThrottleSettings::default()
        };
    }
}

/// `message` with one `x-forwarded-for` entry per element of `forwarded`.
fn forwarded<T>(message: T, forwarded: &[&str]) -> Request<T> {
    let mut request = Request::new(message);
    add_forwarded(&mut request, forwarded);
    request
}

fn add_forwarded<T>(request: &mut Request<T>, forwarded: &[&str]) {
    for value in forwarded {
        request.metadata_mut().append(
            "x-forwarded-for",
            MetadataValue::try_from(*value).expect("ascii"),
        );
    }
}

async fn sign_in_from(
    app: &TestApp,
    username: &str,
    password: &str,
    from: &[&str],
) -> Result<pb::SignInResponse, tonic::Status> {
    app.accounts()
        .sign_in(forwarded(
            pb::SignInRequest {
                username: username.into(),
                password: password.into(),
            },
            from,
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// 21 failed sign-ins with made-up usernames from [`ATTACKER`]: one more
/// than the address's free failures, so its next attempt must wait.
async fn fail_from_the_attacker(app: &TestApp) {
    for i in 0..21 {
        assert_status(
            sign_in_from(app, &format!("nobody-{i}"), WRONG, &[ATTACKER]).await,
            Code::Unauthenticated,
            "ERROR_REASON_SIGN_IN_FAILED",
        );
    }
}

/// The source address of `account_id`'s newest successful sign-in event.
async fn sign_in_source(app: &TestApp, account_id: &str) -> String {
    app.audit(account_id, &[pb::AuditEventType::SignIn])
        .await
        .into_iter()
        .find(|e| e.outcome == pb::AuditOutcome::Success as i32)
        .expect("a successful sign-in event")
        .source_address
}

async fn one_clients_failures_do_not_refuse_another_behind_a_trusted_proxy(backend: Backend) {
    let app = TestApp::spawn_with(backend, behind("127.0.0.1/32")).await;
    let alice = app.person("alice").await.0;
    fail_from_the_attacker(&app).await;
    // The attacker's own address is throttled ...
    assert_status(
        sign_in_from(&app, "alice", PASSWORD, &[ATTACKER]).await,
        Code::ResourceExhausted,
        "ERROR_REASON_SIGN_IN_THROTTLED",
    );
    // ... and alice, through the same gateway, is not.
    sign_in_from(&app, "alice", PASSWORD, &[ALICE])
        .await
        .expect("alice's right password from her own address");
    assert_eq!(sign_in_source(&app, &alice.account_id).await, ALICE);
    app.stop().await;
}
on_both!(one_clients_failures_do_not_refuse_another_behind_a_trusted_proxy);

async fn without_trusted_proxies_the_header_is_ignored(backend: Backend) {
    let app = TestApp::spawn_with(backend, behind("")).await;
    let alice = app.person("alice").await.0;
    fail_from_the_attacker(&app).await;
    // Every call comes from the test client's own address, whatever the
    // header says: the attacker's failures are that address's.
    assert_status(
        sign_in_from(&app, "alice", PASSWORD, &[ALICE]).await,
        Code::ResourceExhausted,
        "ERROR_REASON_SIGN_IN_THROTTLED",
    );
    let source = sign_in_source(&app, &alice.account_id).await;
    assert!(source.starts_with("127.0.0.1:"), "{source}");
    app.stop().await;
}
on_both!(without_trusted_proxies_the_header_is_ignored);

async fn an_untrusted_peer_cannot_choose_its_address(backend: Backend) {
    // Proxies are trusted, but the test client is not one of them.
    let app = TestApp::spawn_with(backend, behind("10.0.0.0/8, fd00::/8")).await;
    let alice = app.person("alice").await.0;
    sign_in_from(&app, "alice", PASSWORD, &["10.0.0.1, 198.51.100.2"])
        .await
        .expect("sign in");
    let source = sign_in_source(&app, &alice.account_id).await;
    assert!(source.starts_with("127.0.0.1:"), "{source}");
    app.stop().await;
}
on_both!(an_untrusted_peer_cannot_choose_its_address);

async fn the_right_most_untrusted_hop_is_the_audited_and_recorded_address(backend: Backend) {
    let app = TestApp::spawn_with(backend, behind("127.0.0.1/32, 10.0.0.0/8")).await;
    let alice = app.person("alice").await.0;
    // A client's spoofed entry is left of what the gateway appended; the
    // gateway's own hop (trusted) is skipped, across two headers.
    sign_in_from(
        &app,
        "alice",
        PASSWORD,
        &["192.0.2.200, 198.51.100.2", "10.1.2.3"],
    )
    .await
    .expect("sign in");
    assert_eq!(
        sign_in_source(&app, &alice.account_id).await,
        "198.51.100.2"
    );

    // A token used through the gateway records the forwarded address.
    let robot = app.robot("ci").await;
    let (token, secret) = app
        .token(&app.operator_token, &robot.account_id, "ci", &[])
        .await;
    let mut request = bearer(
        pb::GetAccountRequest {
            lookup: Some(pb::get_account_request::Lookup::AccountId(
                robot.account_id.clone(),
            )),
        },
        &secret,
    );
    add_forwarded(&mut request, &["[2001:db8::42]:4711"]);
    app.accounts()
        .get_account(request)
        .await
        .expect("the token reads its own account");
    // The write happens in the background: poll until it lands.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let recorded = loop {
        let now = app
            .tokens()
            .get_token(bearer(
                pb::GetTokenRequest {
                    token_id: token.token_id.clone(),
                },
                &app.operator_token,
            ))
            .await
            .expect("get token")
            .into_inner()
            .token
            .expect("token");
        if now.last_used_time.is_some() {
            break now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "last use never recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(recorded.last_used_address, "[2001:db8::42]:4711");
    app.stop().await;
}
on_both!(the_right_most_untrusted_hop_is_the_audited_and_recorded_address);

async fn leak_reports_are_limited_per_forwarded_address_and_ipv6_per_64(backend: Backend) {
    let trusted = behind("127.0.0.1/32");
    let app = TestApp::spawn_with(backend, |config| {
        trusted(config);
        config.leak_reports_per_minute = 2;
    })
    .await;
    let report = |from: &'static str| {
        let mut client = app.tokens();
        let request = forwarded(
            pb::RevokeLeakedTokenRequest {
                secrets: vec!["idpat_not_a_real_secret".into()],
            },
            &[from],
        );
        async move { client.revoke_leaked_token(request).await }
    };
    report("2001:db8:1:2::1").await.expect("first of the /64");
    report("2001:db8:1:2:ffff::2")
        .await
        .expect("second of the /64");
    assert_status(
        report("2001:db8:1:2::3").await,
        Code::ResourceExhausted,
        "ERROR_REASON_RATE_LIMITED",
    );
    // Other clients of the same gateway are unaffected.
    report("2001:db8:1:3::1").await.expect("the next /64");
    report("203.0.113.9").await.expect("an IPv4 client");
    app.stop().await;
}
on_both!(leak_reports_are_limited_per_forwarded_address_and_ipv6_per_64);
