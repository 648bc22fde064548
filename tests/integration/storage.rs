//! The storage conformance suite: one set of tests, run against both SQLite
//! and PostgreSQL through the [`Store`] trait alone (no server, no domain
//! service). Each test gets a fresh, migrated database and is instantiated
//! once per backend as `conformance::<name>::sqlite` and
//! `conformance::<name>::postgres`.
//!
//! What a backend must do to pass: keep every field exactly (times to the
//! microsecond, before the epoch too), report each uniqueness rule as its
//! [`Conflict`] (also when many tasks race for the same key), page in id
//! order, keep the first revocation time, give a token name up once its
//! token is revoked or expired, and refuse rows that point at no account
//! with an error that is not a conflict.

use std::{future::Future, sync::Arc};

use identity::{
    domain::{
        account::{Account, AccountId, AccountKind, Email, Role, Username},
        audit::{AuditEvent, AuditFilter, EventType, Origin},
        credential::{CredentialKind, Digest, Secret},
        password::PasswordHash,
        resource::Resources,
        scope::Scopes,
        time::{Clock, Timestamp},
        token::{Creator, NewToken, Session, Token, TokenId, TokenName, TokenState},
    },
    storage::{Conflict, StorageError, Store, TokenFilter, TokenUse},
};

use crate::support::{Backend, TestDatabase};

/// Runs `test` against a fresh, migrated store of `backend`, keeping the
/// database alive until it is done.
async fn with_store<F, Fut>(backend: Backend, test: F)
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()>,
{
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    test(store).await;
    drop(db);
}

/// Defines each test once and instantiates it for both backends:
/// `name::sqlite` and `name::postgres`, each running `body` with a fresh
/// store bound to the given identifier.
macro_rules! conformance {
    ($(
        $(#[$meta:meta])*
        async fn $name:ident($store:ident) $body:block
    )*) => {$(
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn run($store: Arc<dyn Store>) $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                with_store(Backend::Sqlite, run).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                with_store(Backend::Postgres, run).await;
            }
        }
    )*};
}

// ---------------------------------------------------------------------------
// Builders and assertions.

/// An instant in microseconds since the epoch.
fn t(micros: i64) -> Timestamp {
    Timestamp::from_micros(micros)
}

/// A clock stopped at one instant, for the store calls that read the time
/// themselves (once they hold their lock).
#[derive(Debug)]
struct At(Timestamp);

impl Clock for At {
    fn now(&self) -> Timestamp {
        self.0
    }
}

/// A plausible argon2id PHC string; the store keeps it as opaque text.
const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$\
                    Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4";

/// A person (user role, with a password hash and an email) created at
/// `create_micros`.
fn person(username: &str, create_micros: i64) -> Account {
    Account {
        id: AccountId::generate(),
        username: Username::parse("username", username).expect("valid username"),
        email: Email::parse("email", &format!("{username}@example.com")).expect("valid email"),
        kind: AccountKind::Person,
        role: Role::User,
        password_hash: Some(PasswordHash::from_stored(HASH.to_owned())),
        create_time: t(create_micros),
        disable_time: None,
        credentials_generation: 0,
    }
}

/// A robot (no password, no email) created at `create_micros`.
fn robot(username: &str, create_micros: i64) -> Account {
    Account {
        id: AccountId::generate(),
        username: Username::parse("username", username).expect("valid username"),
        email: Email::default(),
        kind: AccountKind::Robot,
        role: Role::User,
        password_hash: None,
        create_time: t(create_micros),
        disable_time: None,
        credentials_generation: 0,
    }
}

/// An audit event to write alongside a change (its content is checked by
/// the audit tests).
fn ev() -> AuditEvent {
    AuditEvent::new(
        EventType::AccountCreated,
        &Origin::new("127.0.0.1:1"),
        None,
        Timestamp::now(),
    )
}

/// A fresh digest of the given kind.
fn digest(kind: CredentialKind) -> Digest {
    Secret::generate(kind).digest()
}

/// A live token for `account` named `name`, full access unless `scopes`.
fn token(
    account: &AccountId,
    name: &str,
    scopes: &[&str],
    create_micros: i64,
    expire_micros: Option<i64>,
) -> NewToken {
    let id = TokenId::generate();
    NewToken {
        token: Token {
            family_id: id.clone(),
            id,
            account_id: account.clone(),
            name: TokenName::parse("name", name).expect("valid token name"),
            scopes: Scopes::parse("scopes", scopes).expect("valid scopes"),
            resources: Resources::all(),
            create_time: t(create_micros),
            expire_time: expire_micros.map(t),
            revoke_time: None,
            retire_time: None,
            max_uses: None,
            uses_remaining: None,
            last_used_time: None,
            last_used_address: String::new(),
            replaced_by: None,
            parent_family_id: None,
        },
        digest: digest(CredentialKind::PersonalAccessToken),
        creator: None,
    }
}

/// A live session for `account`.
fn session(account: &AccountId, create_micros: i64, expire_micros: i64) -> Session {
    Session {
        id: TokenId::generate(),
        account_id: account.clone(),
        create_time: t(create_micros),
        expire_time: t(expire_micros),
        revoke_time: None,
    }
}

/// Asserts that two accounts agree on every field.
#[track_caller]
fn assert_account_eq(got: &Account, want: &Account) {
    assert_eq!(got.id, want.id, "account id");
    assert_eq!(got.username, want.username, "username");
    assert_eq!(got.email, want.email, "email");
    assert_eq!(got.kind, want.kind, "kind");
    assert_eq!(got.role, want.role, "role");
    assert_eq!(
        got.password_hash.as_ref().map(PasswordHash::as_str),
        want.password_hash.as_ref().map(PasswordHash::as_str),
        "password hash"
    );
    assert_eq!(got.create_time, want.create_time, "account create_time");
    assert_eq!(got.disable_time, want.disable_time, "disable_time");
}

/// Asserts that two tokens agree on every field.
#[track_caller]
fn assert_token_eq(got: &Token, want: &Token) {
    assert_eq!(got.id, want.id, "token id");
    assert_eq!(got.account_id, want.account_id, "token account id");
    assert_eq!(got.name, want.name, "token name");
    assert_eq!(got.scopes, want.scopes, "scopes");
    assert_eq!(got.resources, want.resources, "resources");
    assert_eq!(got.create_time, want.create_time, "token create_time");
    assert_eq!(got.expire_time, want.expire_time, "token expire_time");
    assert_eq!(got.revoke_time, want.revoke_time, "token revoke_time");
    assert_eq!(got.retire_time, want.retire_time, "token retire_time");
}

/// Asserts that two sessions agree on every field.
#[track_caller]
fn assert_session_eq(got: &Session, want: &Session) {
    assert_eq!(got.id, want.id, "session id");
    assert_eq!(got.account_id, want.account_id, "session account id");
    assert_eq!(got.create_time, want.create_time, "session create_time");
    assert_eq!(got.expire_time, want.expire_time, "session expire_time");
    assert_eq!(got.revoke_time, want.revoke_time, "session revoke_time");
}

/// The conflict `result` failed with; panics on success or any other error.
#[track_caller]
fn conflict_of<T: std::fmt::Debug>(result: Result<T, StorageError>) -> Conflict {
    match result {
        Err(StorageError::Conflict(conflict)) => conflict,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

/// The ids of `items`, in order.
fn ids<'a, T: 'a>(items: impl IntoIterator<Item = &'a T>, id: fn(&T) -> &str) -> Vec<String> {
    items.into_iter().map(|x| id(x).to_owned()).collect()
}

/// A short name for a storage error's variant, for reports.
fn variant(err: &StorageError) -> &'static str {
    match err {
        StorageError::Conflict(_) => "Conflict",
        StorageError::Unavailable(_) => "Unavailable",
        StorageError::Corrupt(_) => "Corrupt",
        StorageError::Schema(_) => "Schema",
        StorageError::ParentRevoked => "ParentRevoked",
        StorageError::CreatorEnded => "CreatorEnded",
        StorageError::AccountGone => "AccountGone",
        StorageError::TooManyTokens(_) => "TooManyTokens",
        StorageError::Other(_) => "Other",
    }
}

/// How many tasks race in the concurrency tests.
const RACERS: usize = 32;

/// Runs `RACERS` copies of `op` at once (released together by a barrier)
/// and returns their results in task order.
async fn race<F, Fut>(store: &Arc<dyn Store>, op: F) -> Vec<Result<(), StorageError>>
where
    F: Fn(Arc<dyn Store>, usize) -> Fut,
    Fut: Future<Output = Result<(), StorageError>> + Send + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(RACERS));
    let tasks: Vec<_> = (0..RACERS)
        .map(|i| {
            let barrier = Arc::clone(&barrier);
            let call = op(Arc::clone(store), i);
            tokio::spawn(async move {
                barrier.wait().await;
                call.await
            })
        })
        .collect();
    let mut results = Vec::with_capacity(RACERS);
    for task in tasks {
        results.push(task.await.expect("racing task panicked"));
    }
    results
}

/// Asserts that exactly one racer won and every other one lost with
/// `expected`; returns the winner's index. Any other outcome (in particular
/// `Unavailable` from lock contention) is reported in full.
#[track_caller]
fn assert_one_winner(results: &[Result<(), StorageError>], expected: Conflict) -> usize {
    let winners: Vec<usize> = (0..results.len()).filter(|&i| results[i].is_ok()).collect();
    let unexpected: Vec<String> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            Ok(()) => None,
            Err(StorageError::Conflict(c)) if *c == expected => None,
            Err(e) => Some(format!("task {i}: {} {e:?}", variant(e))),
        })
        .collect();
    assert!(
        unexpected.is_empty() && winners.len() == 1,
        "expected exactly one Ok and {} x Conflict::{expected:?}; got {} Ok and {} unexpected \
         errors:\n{}",
        results.len() - 1,
        winners.len(),
        unexpected.len(),
        unexpected.join("\n"),
    );
    winners[0]
}

// ---------------------------------------------------------------------------
// The suite.

mod conformance {
    use super::*;

    conformance! {
        async fn ping_answers(store) {
            store.ping().await.expect("ping");
        }

        async fn accounts_read_back_with_every_field_equal(store) {
            // A person before the epoch, with an odd microsecond count.
            let mut alice = person("AlIcE", -1_234_567_890_123_457);
            alice.role = Role::Operator;
            // A robot (no hash, no email), already disabled, to check the
            // optional columns in their other state.
            let mut bot = robot("ci-bot.2", 1_700_000_000_123_457);
            bot.disable_time = Some(t(1_700_000_001_000_001));
            for account in [&alice, &bot] {
                store.create_account(account, &ev()).await.expect("create account");
            }

            for want in [&alice, &bot] {
                let by_id = store
                    .account_by_id(&want.id)
                    .await
                    .expect("read by id")
                    .expect("found by id");
                assert_account_eq(&by_id, want);
                let by_key = store
                    .account_by_username(&want.username.key())
                    .await
                    .expect("read by username key")
                    .expect("found by username key");
                assert_account_eq(&by_key, want);
            }
            let by_id = store.account_by_id(&alice.id).await.expect("read").expect("found");
            assert_eq!(by_id.disable_time, None);
            assert_eq!(by_id.username.as_str(), "AlIcE", "the username keeps its case");

            // Lookups go by the key: the case-preserved username is not one.
            assert!(store.account_by_username("AlIcE").await.expect("read").is_none());
            assert!(store.account_by_username("nobody").await.expect("read").is_none());
            assert!(
                store
                    .account_by_id(&AccountId::generate())
                    .await
                    .expect("read")
                    .is_none()
            );
        }

        async fn times_keep_every_microsecond_across_the_whole_range(store) {
            let instants = [
                Timestamp::MIN.as_micros(),
                Timestamp::MIN.as_micros() + 1,
                -1_000_001,
                -1,
                0,
                1,
                999_999,
                1_700_000_000_123_457,
                Timestamp::MAX.as_micros() - 1,
                Timestamp::MAX.as_micros(),
                i64::MIN,
                i64::MAX,
            ];
            for (i, &micros) in instants.iter().enumerate() {
                let mut account = robot(&format!("robot-{i}"), micros);
                account.disable_time = Some(t(micros));
                store.create_account(&account, &ev()).await.expect("create account");
                let got = store
                    .account_by_id(&account.id)
                    .await
                    .expect("read")
                    .expect("found");
                assert_account_eq(&got, &account);

                let mut new = token(&account.id, "t", &[], micros, Some(micros));
                new.token.revoke_time = Some(t(micros));
                store.create_token(&new, &At(t(micros)), u32::MAX, &ev()).await.expect("create token");
                let got = store.token_by_id(&new.token.id).await.expect("read").expect("found");
                assert_token_eq(&got, &new.token);

                let s = session(&account.id, micros, micros);
                store
                    .create_session(&s, &digest(CredentialKind::Session), 0, &ev())
                    .await
                    .expect("create session");
            }
        }

        async fn username_conflicts_are_reported_as_such(store) {
            let alice = person("alice", 1);
            store.create_account(&alice, &ev()).await.expect("create alice");

            // Same key, different case, different id.
            let shouting = person("ALICE", 2);
            assert_eq!(conflict_of(store.create_account(&shouting, &ev()).await), Conflict::Username);
            // A robot with the same key, too.
            let bot = robot("Alice", 3);
            assert_eq!(conflict_of(store.create_account(&bot, &ev()).await), Conflict::Username);

            // The original is untouched and the losers were not stored.
            let kept = store.account_by_username("alice").await.expect("read").expect("found");
            assert_account_eq(&kept, &alice);
            assert!(store.account_by_id(&shouting.id).await.expect("read").is_none());
            assert!(store.account_by_id(&bot.id).await.expect("read").is_none());
        }

        async fn duplicate_ids_are_id_conflicts(store) {
            let alice = person("alice", 1);
            store.create_account(&alice, &ev()).await.expect("create alice");
            let mut twin = person("bob", 2);
            twin.id = alice.id.clone();
            assert_eq!(conflict_of(store.create_account(&twin, &ev()).await), Conflict::Id);

            let first = token(&alice.id, "one", &[], 10, None);
            store.create_token(&first, &At(t(10)), u32::MAX, &ev()).await.expect("create token");
            let mut same_id = token(&alice.id, "two", &[], 11, None);
            same_id.token.id = first.token.id.clone();
            assert_eq!(conflict_of(store.create_token(&same_id, &At(t(11)), u32::MAX, &ev()).await), Conflict::Id);

            let s = session(&alice.id, 20, 30);
            store
                .create_session(&s, &digest(CredentialKind::Session), 0, &ev())
                .await
                .expect("create session");
            let again = store
                .create_session(&s, &digest(CredentialKind::Session), 0, &ev())
                .await;
            assert_eq!(conflict_of(again), Conflict::Id);
        }

        async fn concurrent_creates_of_one_username_have_exactly_one_winner(store) {
            // Every racer has its own id and its own spelling of one key.
            let accounts: Vec<Account> = (0..RACERS)
                .map(|i| {
                    let spelling: String = "racer"
                        .chars()
                        .enumerate()
                        .map(|(j, c)| if (i >> j) & 1 == 1 { c.to_ascii_uppercase() } else { c })
                        .collect();
                    person(&spelling, i64::try_from(i).expect("small"))
                })
                .collect();
            let shared = Arc::new(accounts);
            let results = race(&store, |store, i| {
                let shared = Arc::clone(&shared);
                async move { store.create_account(&shared[i], &ev()).await }
            })
            .await;
            let winner = assert_one_winner(&results, Conflict::Username);
            let stored = store.account_by_username("racer").await.expect("read").expect("found");
            assert_account_eq(&stored, &shared[winner]);
            assert_eq!(store.list_accounts(None, 1000).await.expect("list").len(), 1);
        }

        async fn concurrent_creates_of_distinct_accounts_all_succeed(store) {
            // Pure write contention, no conflict: every racer must get in.
            let accounts: Arc<Vec<Account>> =
                Arc::new((0..RACERS).map(|i| person(&format!("user-{i}"), 0)).collect());
            let shared = Arc::clone(&accounts);
            let results = race(&store, move |store, i| {
                let shared = Arc::clone(&shared);
                async move { store.create_account(&shared[i], &ev()).await }
            })
            .await;
            let failures: Vec<String> = results
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    r.as_ref().err().map(|e| format!("task {i}: {} {e:?}", variant(e)))
                })
                .collect();
            assert!(
                failures.is_empty(),
                "writes failed under contention:\n{}",
                failures.join("\n")
            );
            assert_eq!(store.list_accounts(None, 1000).await.expect("list").len(), RACERS);
        }

        async fn accounts_list_in_id_order_and_page_after_a_cursor(store) {
            let mut accounts: Vec<Account> =
                (0..7).map(|i| person(&format!("member-{i}"), i)).collect();
            // Insert in an order unrelated to the ids, so that only the
            // ORDER BY can produce id order.
            accounts.reverse();
            accounts.swap(1, 4);
            for account in &accounts {
                store.create_account(account, &ev()).await.expect("create account");
            }
            let mut expected: Vec<String> = ids(&accounts, |a: &Account| a.id.as_str());
            expected.sort();

            let all = store.list_accounts(None, 100).await.expect("list all");
            assert_eq!(ids(&all, |a: &Account| a.id.as_str()), expected);
            for got in &all {
                let want = accounts.iter().find(|a| a.id == got.id).expect("known id");
                assert_account_eq(got, want);
            }

            // Pages of 3: 3 + 3 + 1, then nothing.
            let mut seen = Vec::new();
            let mut after: Option<String> = None;
            let mut sizes = Vec::new();
            loop {
                let page = store
                    .list_accounts(after.as_deref(), 3)
                    .await
                    .expect("list a page");
                sizes.push(page.len());
                let Some(last) = page.last() else { break };
                after = Some(last.id.as_str().to_owned());
                seen.extend(ids(&page, |a: &Account| a.id.as_str()));
            }
            assert_eq!(sizes, [3, 3, 1, 0]);
            assert_eq!(seen, expected);

            // The cursor is exclusive, a limit of 0 returns nothing, and a
            // cursor past the last id returns nothing.
            let after_first = store
                .list_accounts(Some(&expected[0]), 100)
                .await
                .expect("list");
            assert_eq!(ids(&after_first, |a: &Account| a.id.as_str()), expected[1..]);
            assert!(store.list_accounts(None, 0).await.expect("list").is_empty());
            assert!(
                store
                    .list_accounts(Some(&expected[6]), 100)
                    .await
                    .expect("list")
                    .is_empty()
            );
        }

        async fn sessions_are_found_by_digest_with_their_account(store) {
            let alice = person("alice", -5);
            let bob = person("bob", 6);
            for account in [&alice, &bob] {
                store.create_account(account, &ev()).await.expect("create account");
            }
            let alice_session = session(&alice.id, 1_700_000_000_000_001, 1_700_086_400_000_001);
            let alice_digest = digest(CredentialKind::Session);
            let bob_session = session(&bob.id, 7, 8);
            let bob_digest = digest(CredentialKind::Session);
            store
                .create_session(&alice_session, &alice_digest, 0, &ev())
                .await
                .expect("create alice's session");
            store
                .create_session(&bob_session, &bob_digest, 0, &ev())
                .await
                .expect("create bob's session");

            let (got, owner) = store
                .session_by_digest(&alice_digest)
                .await
                .expect("read")
                .expect("found");
            assert_session_eq(&got, &alice_session);
            assert_account_eq(&owner, &alice);
            let (got, owner) = store
                .session_by_digest(&bob_digest)
                .await
                .expect("read")
                .expect("found");
            assert_session_eq(&got, &bob_session);
            assert_account_eq(&owner, &bob);

            assert!(
                store
                    .session_by_digest(&digest(CredentialKind::Session))
                    .await
                    .expect("read")
                    .is_none()
            );
        }

        async fn revoking_a_session_keeps_the_first_time(store) {
            let alice = person("alice", 1);
            store.create_account(&alice, &ev()).await.expect("create account");
            let s = session(&alice.id, 100, 1_000);
            let other = session(&alice.id, 100, 1_000);
            let d = digest(CredentialKind::Session);
            let other_digest = digest(CredentialKind::Session);
            store.create_session(&s, &d, 0, &ev()).await.expect("create session");
            store
                .create_session(&other, &other_digest, 0, &ev())
                .await
                .expect("create other session");

            store.revoke_session(&s.id, t(200), &ev()).await.expect("revoke");
            let (got, _) = store.session_by_digest(&d).await.expect("read").expect("found");
            assert_eq!(got.revoke_time, Some(t(200)));
            assert_eq!(got.state(t(201)), TokenState::Revoked);

            // A second sign-out changes nothing.
            store.revoke_session(&s.id, t(300), &ev()).await.expect("revoke again");
            let (got, _) = store.session_by_digest(&d).await.expect("read").expect("found");
            assert_eq!(got.revoke_time, Some(t(200)));

            // The other session is untouched; an unknown id is not an error.
            let (got, _) = store
                .session_by_digest(&other_digest)
                .await
                .expect("read")
                .expect("found");
            assert_session_eq(&got, &other);
            store
                .revoke_session(&TokenId::generate(), t(400), &ev())
                .await
                .expect("revoking an unknown session is a no-op");
        }

        async fn duplicate_session_digests_are_digest_conflicts(store) {
            let alice = person("alice", 1);
            store.create_account(&alice, &ev()).await.expect("create account");
            let d = digest(CredentialKind::Session);
            store
                .create_session(&session(&alice.id, 1, 2), &d, 0, &ev())
                .await
                .expect("create session");
            let second = session(&alice.id, 3, 4);
            assert_eq!(
                conflict_of(store.create_session(&second, &d, 0, &ev()).await),
                Conflict::Digest
            );
            let (kept, _) = store.session_by_digest(&d).await.expect("read").expect("found");
            assert_ne!(kept.id, second.id);
        }

        async fn tokens_read_back_by_id_and_digest_with_every_field_equal(store) {
            let alice = person("alice", -42);
            store.create_account(&alice, &ev()).await.expect("create account");
            // Scopes are given out of order and duplicated: the set is
            // sorted and deduplicated, and must come back as such.
            let scoped = token(
                &alice.id,
                "Déploiement nocturne",
                &["tokens:read", "project:publish", "tokens:read", "accounts:read"],
                -1_000_001,
                Some(1_700_000_000_999_999),
            );
            let full = token(&alice.id, "full", &[], 5, None);
            for new in [&scoped, &full] {
                store.create_token(new, &At(t(0)), u32::MAX, &ev()).await.expect("create token");
            }
            assert_eq!(
                scoped.token.scopes.names().collect::<Vec<_>>(),
                ["accounts:read", "project:publish", "tokens:read"]
            );

            for new in [&scoped, &full] {
                let by_id = store
                    .token_by_id(&new.token.id)
                    .await
                    .expect("read by id")
                    .expect("found by id");
                assert_token_eq(&by_id, &new.token);
                let (by_digest, owner) = store
                    .token_by_digest(&new.digest)
                    .await
                    .expect("read by digest")
                    .expect("found by digest");
                assert_token_eq(&by_digest, &new.token);
                assert_account_eq(&owner, &alice);
            }
            let full_back = store.token_by_id(&full.token.id).await.expect("read").expect("found");
            assert!(full_back.scopes.is_full());

            assert!(store.token_by_id(&TokenId::generate()).await.expect("read").is_none());
            assert!(
                store
                    .token_by_digest(&digest(CredentialKind::PersonalAccessToken))
                    .await
                    .expect("read")
                    .is_none()
            );
        }

        async fn token_resources_read_back_by_id_digest_and_listing(store) {
            let alice = person("alice", 1);
            store.create_account(&alice, &ev()).await.expect("create account");
            // Out of order and duplicated: the set is sorted and
            // deduplicated, and must come back as such.
            let mut limited = token(&alice.id, "limited", &["tokens:read"], 2, None);
            limited.token.resources = Resources::parse(
                "resources",
                &["projects/a/*", "orgs/b", "projects/a/*", "orgs/B.x~_-/9"],
            )
            .expect("valid resources");
            let unlimited = token(&alice.id, "unlimited", &[], 3, None);
            for new in [&limited, &unlimited] {
                store.create_token(new, &At(t(0)), u32::MAX, &ev()).await.expect("create token");
            }
            assert_eq!(
                limited.token.resources.names().collect::<Vec<_>>(),
                ["orgs/B.x~_-/9", "orgs/b", "projects/a/*"]
            );
            for new in [&limited, &unlimited] {
                let by_id = store.token_by_id(&new.token.id).await.expect("read").expect("found");
                assert_token_eq(&by_id, &new.token);
                let (by_digest, _) = store
                    .token_by_digest(&new.digest)
                    .await
                    .expect("read by digest")
                    .expect("found by digest");
                assert_token_eq(&by_digest, &new.token);
                assert_eq!(by_digest.resources, new.token.resources);
            }
            let back = store.token_by_id(&unlimited.token.id).await.expect("read").expect("found");
            assert!(back.resources.is_all());
            let listed = store
                .list_tokens(&alice.id, &TokenFilter::all(Timestamp::from_micros(0)), None, 10)
                .await
                .expect("list");
            assert_eq!(listed.len(), 2);
            for got in &listed {
                let want = [&limited, &unlimited]
                    .into_iter()
                    .find(|n| n.token.id == got.id)
                    .expect("listed");
                assert_eq!(got.resources, want.token.resources);
            }
        }

        async fn tokens_list_per_account_in_id_order_and_page(store) {
            let alice = person("alice", 1);
            let bob = robot("bob", 2);
            let empty = robot("empty", 3);
            for account in [&alice, &bob, &empty] {
                store.create_account(account, &ev()).await.expect("create account");
            }
            // Interleave the two accounts' tokens so that their ids mix.
            let mut alices = Vec::new();
            let mut bobs = Vec::new();
            for i in 0..5 {
                let a = token(&alice.id, &format!("a{i}"), &["tokens:read"], i, None);
                store.create_token(&a, &At(t(i)), u32::MAX, &ev()).await.expect("create alice's token");
                alices.push(a.token);
                if i < 3 {
                    let b = token(&bob.id, &format!("b{i}"), &[], i, Some(i + 10));
                    store.create_token(&b, &At(t(i)), u32::MAX, &ev()).await.expect("create bob's token");
                    bobs.push(b.token);
                }
            }
            let mut alice_ids = ids(&alices, |x: &Token| x.id.as_str());
            alice_ids.sort();
            let mut bob_ids = ids(&bobs, |x: &Token| x.id.as_str());
            bob_ids.sort();

            let all = store.list_tokens(&alice.id, &TokenFilter::all(Timestamp::from_micros(0)), None, 100).await.expect("list");
            assert_eq!(ids(&all, |x: &Token| x.id.as_str()), alice_ids);
            for got in &all {
                let want = alices.iter().find(|x| x.id == got.id).expect("alice's token");
                assert_token_eq(got, want);
            }
            let all = store.list_tokens(&bob.id, &TokenFilter::all(Timestamp::from_micros(0)), None, 100).await.expect("list");
            assert_eq!(ids(&all, |x: &Token| x.id.as_str()), bob_ids);

            // Pages of 2 over alice's tokens: 2 + 2 + 1, then nothing.
            let mut seen = Vec::new();
            let mut after: Option<String> = None;
            let mut sizes = Vec::new();
            loop {
                let page = store
                    .list_tokens(&alice.id, &TokenFilter::all(Timestamp::from_micros(0)), after.as_deref(), 2)
                    .await
                    .expect("list a page");
                sizes.push(page.len());
                assert!(page.iter().all(|x| x.account_id == alice.id), "another account's token");
                let Some(last) = page.last() else { break };
                after = Some(last.id.as_str().to_owned());
                seen.extend(ids(&page, |x: &Token| x.id.as_str()));
            }
            assert_eq!(sizes, [2, 2, 1, 0]);
            assert_eq!(seen, alice_ids);

            // A cursor taken from another account's token still lists only
            // alice's tokens after it.
            let after_bob = store
                .list_tokens(&alice.id, &TokenFilter::all(Timestamp::from_micros(0)), Some(&bob_ids[0]), 100)
                .await
                .expect("list");
            let want: Vec<String> =
                alice_ids.iter().filter(|id| **id > bob_ids[0]).cloned().collect();
            assert_eq!(ids(&after_bob, |x: &Token| x.id.as_str()), want);

            assert!(store.list_tokens(&empty.id, &TokenFilter::all(Timestamp::from_micros(0)), None, 100).await.expect("list").is_empty());
            assert!(
                store
                    .list_tokens(&AccountId::generate(), &TokenFilter::all(Timestamp::from_micros(0)), None, 100)
                    .await
                    .expect("list")
                    .is_empty()
            );
            assert!(store.list_tokens(&alice.id, &TokenFilter::all(Timestamp::from_micros(0)), None, 0).await.expect("list").is_empty());
        }

        async fn token_names_are_unique_among_an_accounts_live_tokens(store) {
            let alice = person("alice", 1);
            let bob = person("bob", 2);
            for account in [&alice, &bob] {
                store.create_account(account, &ev()).await.expect("create account");
            }
            let first = token(&alice.id, "deploy", &[], 10, None);
            store.create_token(&first, &At(t(10)), u32::MAX, &ev()).await.expect("create first");

            let second = token(&alice.id, "deploy", &[], 11, None);
            assert_eq!(
                conflict_of(store.create_token(&second, &At(t(11)), u32::MAX, &ev()).await),
                Conflict::TokenName
            );
            assert!(store.token_by_id(&second.token.id).await.expect("read").is_none());

            // Names are compared exactly: another case is another name.
            let other_case = token(&alice.id, "Deploy", &[], 12, None);
            store.create_token(&other_case, &At(t(12)), u32::MAX, &ev()).await.expect("another case");

            // The same name on another account is fine.
            let bobs = token(&bob.id, "deploy", &[], 13, None);
            store.create_token(&bobs, &At(t(13)), u32::MAX, &ev()).await.expect("same name, other account");

            // Once the first is revoked the name is free again, and several
            // revoked tokens may share it.
            store.revoke_token(&first.token.id, false, t(20), &ev()).await.expect("revoke").expect("found");
            let third = token(&alice.id, "deploy", &[], 21, None);
            store.create_token(&third, &At(t(21)), u32::MAX, &ev()).await.expect("name reused after revoke");
            store.revoke_token(&third.token.id, false, t(22), &ev()).await.expect("revoke").expect("found");
            let fourth = token(&alice.id, "deploy", &[], 23, None);
            store.create_token(&fourth, &At(t(23)), u32::MAX, &ev()).await.expect("name reused again");
            let again = token(&alice.id, "deploy", &[], 24, None);
            assert_eq!(
                conflict_of(store.create_token(&again, &At(t(24)), u32::MAX, &ev()).await),
                Conflict::TokenName
            );

            // The revoked tokens keep their name.
            for old in [&first, &third] {
                let got = store.token_by_id(&old.token.id).await.expect("read").expect("found");
                assert_eq!(got.name.as_str(), "deploy");
                assert!(got.revoke_time.is_some());
            }

            // A token stored already revoked does not hold its name.
            let mut born_revoked = token(&bob.id, "deploy", &[], 30, None);
            born_revoked.token.revoke_time = Some(t(30));
            store
                .create_token(&born_revoked, &At(t(30)), u32::MAX, &ev())
                .await
                .expect("an already revoked token takes no name");
        }

        async fn an_expired_token_gives_its_name_up_but_keeps_it(store) {
            let alice = person("alice", 1);
            store.create_account(&alice, &ev()).await.expect("create account");
            let old = token(&alice.id, "nightly", &["project:publish"], 1_000, Some(2_000));
            store.create_token(&old, &At(t(1_000)), u32::MAX, &ev()).await.expect("create old");

            // One microsecond before expiry it is still live.
            let early = token(&alice.id, "nightly", &[], 1_999, None);
            assert_eq!(
                conflict_of(store.create_token(&early, &At(t(1_999)), u32::MAX, &ev()).await),
                Conflict::TokenName
            );

            // At its expire_time it is expired (as Token::state says), so
            // the name is free.
            assert_eq!(old.token.state(t(2_000)), TokenState::Expired);
            let new = token(&alice.id, "nightly", &[], 2_000, None);
            store.create_token(&new, &At(t(2_000)), u32::MAX, &ev()).await.expect("name reused after expiry");

            // The old token keeps its name, expiry and (absent) revocation.
            let got = store.token_by_id(&old.token.id).await.expect("read").expect("found");
            assert_token_eq(&got, &old.token);
            let (got, _) = store
                .token_by_digest(&old.digest)
                .await
                .expect("read")
                .expect("found");
            assert_token_eq(&got, &old.token);
            let listed = store.list_tokens(&alice.id, &TokenFilter::all(Timestamp::from_micros(0)), None, 100).await.expect("list");
            assert_eq!(listed.len(), 2);
            assert!(listed.iter().all(|x| x.name.as_str() == "nightly"));

            // The new token never expires, so it keeps the name for good.
            let later = token(&alice.id, "nightly", &[], 3_000, None);
            assert_eq!(
                conflict_of(store.create_token(&later, &At(Timestamp::MAX), u32::MAX, &ev()).await),
                Conflict::TokenName
            );

            // The expired token can still be revoked; that frees nothing new.
            let (revoked, _) = store
                .revoke_token(&old.token.id, false, t(5_000), &ev())
                .await
                .expect("revoke")
                .expect("found");
            assert_eq!(revoked.revoke_time, Some(t(5_000)));
            assert_eq!(revoked.expire_time, Some(t(2_000)));
            assert_eq!(
                conflict_of(store.create_token(&later, &At(t(5_001)), u32::MAX, &ev()).await),
                Conflict::TokenName
            );
        }

        async fn revoking_a_token_is_idempotent(store) {
            let alice = person("alice", 1);
            store.create_account(&alice, &ev()).await.expect("create account");
            let new = token(&alice.id, "ci", &["tokens:verify"], 10, Some(1_000));
            store.create_token(&new, &At(t(10)), u32::MAX, &ev()).await.expect("create token");

            let (first, revoked) = store
                .revoke_token(&new.token.id, false, t(100), &ev())
                .await
                .expect("revoke")
                .expect("found");
            let mut want = new.token.clone();
            want.revoke_time = Some(t(100));
            assert_token_eq(&first, &want);
            assert_eq!(revoked, std::slice::from_ref(&new.token.id));

            let (second, revoked) = store
                .revoke_token(&new.token.id, false, t(200), &ev())
                .await
                .expect("revoke again")
                .expect("found");
            assert_token_eq(&second, &want);
            assert!(revoked.is_empty(), "nothing new was revoked");
            let stored = store.token_by_id(&new.token.id).await.expect("read").expect("found");
            assert_token_eq(&stored, &want);

            assert!(
                store
                    .revoke_token(&TokenId::generate(), false, t(300), &ev())
                    .await
                    .expect("revoking an unknown token is not an error")
                    .is_none()
            );
        }

        async fn a_session_is_created_only_under_the_generation_it_was_checked_against(store) {
            let alice = person("alice", 1);
            store.create_account(&alice, &ev()).await.expect("create alice");
            let generation = |store: Arc<dyn Store>, id: AccountId| async move {
                store.account_by_id(&id).await.expect("read").expect("alice").credentials_generation
            };
            let mut read = generation(store.clone(), alice.id.clone()).await;
            let hash = PasswordHash::from_stored(HASH.to_owned());
            let keep = TokenId::generate();
            // Each call that ends every session moves the generation on; a
            // session checked against the generation before it is refused.
            for step in ["set_password", "revoke_sessions", "disable"] {
                match step {
                    "set_password" => {
                        store.set_password(&alice.id, &hash, &keep, t(2), &ev()).await.expect(step);
                    }
                    "revoke_sessions" => {
                        store.revoke_sessions(&alice.id, t(2), &ev()).await.expect(step);
                    }
                    _ => {
                        store.set_account_disabled(&alice.id, Some(t(2)), &ev()).await.expect(step);
                    }
                }
                let stale = digest(CredentialKind::Session);
                assert!(
                    !store.create_session(&session(&alice.id, 3, 1_000), &stale, read, &ev()).await.expect("create"),
                    "a session under the generation before {step}"
                );
                assert!(store.session_by_digest(&stale).await.expect("read").is_none(), "{step}");
                let now = generation(store.clone(), alice.id.clone()).await;
                assert!(now > read, "{step} moved the generation on");
                read = now;
            }
            // Disabled: even the current generation creates no session.
            let d = digest(CredentialKind::Session);
            assert!(!store.create_session(&session(&alice.id, 3, 1_000), &d, read, &ev()).await.expect("create"));
            store.set_account_disabled(&alice.id, None, &ev()).await.expect("enable");
            assert_eq!(generation(store.clone(), alice.id.clone()).await, read, "enabling ends nothing");
            assert!(store.create_session(&session(&alice.id, 3, 1_000), &d, read, &ev()).await.expect("create"));
            assert!(store.session_by_digest(&d).await.expect("read").is_some());
        }

        async fn credentials_of_a_missing_account_are_refused_without_a_conflict(store) {
            let ghost = AccountId::generate();
            let new = token(&ghost, "orphan", &[], 1, None);
            let err = store
                .create_token(&new, &At(t(1)), u32::MAX, &ev())
                .await
                .expect_err("a token needs its account");
            assert!(
                matches!(err, StorageError::AccountGone),
                "a missing account is reported as gone: {err:?}"
            );
            assert!(store.token_by_id(&new.token.id).await.expect("read").is_none());

            let s = session(&ghost, 1, 2);
            let d = digest(CredentialKind::Session);
            let created = store
                .create_session(&s, &d, 0, &ev())
                .await
                .expect("a session for a missing account is refused, not an error");
            assert!(!created, "a session needs its account");
            assert!(store.session_by_digest(&d).await.expect("read").is_none());

            // The store still works afterwards.
            store.ping().await.expect("ping");
        }

        async fn a_robot_with_a_password_is_refused_without_a_conflict(store) {
            let mut bot = robot("bot", 1);
            bot.password_hash = Some(PasswordHash::from_stored(HASH.to_owned()));
            let err = store
                .create_account(&bot, &ev())
                .await
                .expect_err("robots have no password");
            eprintln!("create_account of a robot with a password: {} {err:?}", variant(&err));
            assert!(
                !matches!(err, StorageError::Conflict(_)),
                "a check violation is not a conflict: {err:?}"
            );
            assert!(store.account_by_id(&bot.id).await.expect("read").is_none());
        }

        async fn duplicate_token_digests_are_digest_conflicts(store) {
            let alice = person("alice", 1);
            let bob = person("bob", 2);
            for account in [&alice, &bob] {
                store.create_account(account, &ev()).await.expect("create account");
            }
            let first = token(&alice.id, "one", &[], 1, None);
            store.create_token(&first, &At(t(1)), u32::MAX, &ev()).await.expect("create first");
            // Another account, another name, the same digest.
            let mut second = token(&bob.id, "two", &[], 2, None);
            second.digest = first.digest;
            assert_eq!(
                conflict_of(store.create_token(&second, &At(t(2)), u32::MAX, &ev()).await),
                Conflict::Digest
            );
            let (kept, owner) = store
                .token_by_digest(&first.digest)
                .await
                .expect("read")
                .expect("found");
            assert_token_eq(&kept, &first.token);
            assert_account_eq(&owner, &alice);
            assert!(store.token_by_id(&second.token.id).await.expect("read").is_none());
        }

        async fn concurrent_creates_of_one_token_name_have_exactly_one_winner(store) {
            let alice = person("alice", 1);
            store.create_account(&alice, &ev()).await.expect("create account");
            // An expired predecessor, so every racer's transaction also
            // tries to release the name first.
            let old = token(&alice.id, "shared", &[], 1, Some(2));
            store.create_token(&old, &At(t(1)), u32::MAX, &ev()).await.expect("create old");

            let tokens: Arc<Vec<NewToken>> = Arc::new(
                (0..RACERS)
                    .map(|i| {
                        let create = 10 + i64::try_from(i).expect("small");
                        token(&alice.id, "shared", &[], create, None)
                    })
                    .collect(),
            );
            let shared = Arc::clone(&tokens);
            let results = race(&store, move |store, i| {
                let shared = Arc::clone(&shared);
                async move { store.create_token(&shared[i], &At(t(10)), u32::MAX, &ev()).await }
            })
            .await;
            let winner = assert_one_winner(&results, Conflict::TokenName);
            let listed = store.list_tokens(&alice.id, &TokenFilter::all(Timestamp::from_micros(0)), None, 1000).await.expect("list");
            assert_eq!(listed.len(), 2, "the old token and the winner");
            assert!(listed.iter().any(|x| x.id == tokens[winner].token.id));
        }

        async fn concurrent_last_use_batches_in_any_order_all_succeed(store) {
            // Every replica flushes the uses it saw in one batch, in arrival
            // order; replicas that saw the same tokens must not deadlock
            // (found by the soak test: PostgreSQL aborted one flush after
            // deadlock_timeout and its uses were lost).
            let alice = person("alice", 1);
            store.create_account(&alice, &ev()).await.expect("create account");
            let mut ids = Vec::new();
            for n in 0..200 {
                let new = token(&alice.id, &format!("t{n}"), &[], 1, None);
                store.create_token(&new, &At(t(1)), u32::MAX, &ev()).await.expect("create token");
                ids.push(new.token.id);
            }
            let ids = Arc::new(ids);
            for round in 0..3i64 {
                let shared = Arc::clone(&ids);
                let results = race(&store, move |store, i| {
                    let mut order: Vec<TokenId> = shared.to_vec();
                    // Half the racers ascending, half descending, each
                    // rotated differently.
                    let len = order.len();
                    order.rotate_left(i * 7 % len);
                    if i % 2 == 1 {
                        order.reverse();
                    }
                    let uses: Vec<TokenUse> = order
                        .into_iter()
                        .map(|id| TokenUse {
                            id,
                            at: t(1_000 + round),
                            address: format!("10.0.0.{i}"),
                        })
                        .collect();
                    async move { store.record_uses(&uses, std::time::Duration::ZERO).await }
                })
                .await;
                let failed: Vec<String> = results
                    .iter()
                    .enumerate()
                    .filter_map(|(i, r)| {
                        r.as_ref().err().map(|e| format!("task {i}: {} {e:?}", variant(e)))
                    })
                    .collect();
                assert!(
                    failed.is_empty(),
                    "round {round}: {} batches failed:\n{}",
                    failed.len(),
                    failed.join("\n")
                );
                for id in ids.iter() {
                    let stored = store.token_by_id(id).await.expect("read").expect("found");
                    assert_eq!(stored.last_used_time, Some(t(1_000 + round)));
                }
            }
        }

        async fn revoking_a_live_token_revokes_every_descendant_and_nothing_else(store) {
            let alice = person("alice", 1);
            let bob = person("bob", 1);
            store.create_account(&alice, &ev()).await.expect("create alice");
            store.create_account(&bob, &ev()).await.expect("create bob");
            let parent = token(&alice.id, "parent", &[], 10, None);
            let child = child_of(&parent, &bob.id, "child");
            let grandchild = child_of(&child, &alice.id, "grandchild");
            let unrelated = token(&alice.id, "unrelated", &[], 10, None);
            for new in [&parent, &child, &grandchild, &unrelated] {
                store.create_token(new, &At(t(10)), u32::MAX, &ev()).await.expect("create token");
            }
            // Rotating the parent keeps its children under the successor.
            let mut successor = token(&alice.id, "parent", &[], 20, None);
            successor.token.family_id = parent.token.family_id.clone();
            store
                .rotate_token(&parent.token.id, &successor, t(1_000), &At(t(20)), &ev())
                .await
                .expect("rotate")
                .expect("rotated");

            // Revoking the rotated-out member revokes that member only.
            let (_, revoked) = store
                .revoke_token(&parent.token.id, false, t(30), &ev())
                .await
                .expect("revoke")
                .expect("found");
            assert_eq!(revoked, std::slice::from_ref(&parent.token.id));
            for live in [&successor, &child, &grandchild] {
                let got = store.token_by_id(&live.token.id).await.expect("read").expect("found");
                assert_eq!(got.state(t(40)), TokenState::Active, "{}", got.name.as_str());
            }

            // Revoking the family's live token revokes the descendants,
            // whoever's they are, and nothing else.
            let (_, mut revoked) = store
                .revoke_token(&successor.token.id, false, t(40), &ev())
                .await
                .expect("revoke")
                .expect("found");
            revoked.sort();
            let mut want = vec![
                successor.token.id.clone(),
                child.token.id.clone(),
                grandchild.token.id.clone(),
            ];
            want.sort();
            assert_eq!(revoked, want);
            for id in &want {
                let got = store.token_by_id(id).await.expect("read").expect("found");
                assert_eq!(got.revoke_time, Some(t(40)), "{}", got.name.as_str());
            }
            let got = store.token_by_id(&unrelated.token.id).await.expect("read").expect("found");
            assert_eq!(got.revoke_time, None);

            // Each descendant's revocation is in the audit log, with its
            // account's username.
            let events = store
                .list_events(&AuditFilter { account: Some(bob.id.clone()), types: vec![EventType::TokenRevoked], ..Default::default() }, None, 10)
                .await
                .expect("list events");
            assert_eq!(events.len(), 1, "{events:?}");
            assert_eq!(events[0].subject_credential.as_ref(), Some(&child.token.id));
            assert_eq!(events[0].subject_username, "bob");
        }

        async fn no_child_is_born_to_a_revoked_family(store) {
            let alice = person("alice", 1);
            store.create_account(&alice, &ev()).await.expect("create account");
            let parent = token(&alice.id, "parent", &[], 10, None);
            store.create_token(&parent, &At(t(10)), u32::MAX, &ev()).await.expect("create parent");
            store.create_token(&child_of(&parent, &alice.id, "before"), &At(t(15)), u32::MAX, &ev()).await.expect("a live parent may have children");
            store.revoke_token(&parent.token.id, false, t(20), &ev()).await.expect("revoke").expect("found");
            let refused = store.create_token(&child_of(&parent, &alice.id, "after"), &At(t(30)), u32::MAX, &ev()).await;
            assert!(matches!(refused, Err(StorageError::ParentRevoked)), "{refused:?}");
        }

        async fn a_token_is_created_only_while_its_creator_is_live(store) {
            let alice = person("alice", 1);
            store.create_account(&alice, &ev()).await.expect("create account");
            let signed_in = session(&alice.id, 1, 1_000);
            store.create_session(&signed_in, &digest(CredentialKind::Session), 0, &ev()).await.expect("create session");
            let by_session = |name: &str, generation: i64| {
                let mut new = token(&alice.id, name, &[], 10, None);
                new.creator = Some(Creator::Session { id: signed_in.id.clone(), credentials_generation: generation });
                new
            };
            let creator = token(&alice.id, "creator", &[], 10, None);
            store.create_token(&creator, &At(t(10)), u32::MAX, &ev()).await.expect("create the creating token");
            let by_token = |name: &str| {
                let mut new = child_of(&creator, &alice.id, name);
                new.creator = Some(Creator::Token { id: creator.token.id.clone() });
                new
            };
            store.create_token(&by_session("live", 0), &At(t(20)), u32::MAX, &ev()).await.expect("a live session creates");
            store.create_token(&by_token("child"), &At(t(20)), u32::MAX, &ev()).await.expect("a live token creates");
            let refused = store.create_token(&by_session("stale", 1), &At(t(20)), u32::MAX, &ev()).await;
            assert!(matches!(refused, Err(StorageError::CreatorEnded)), "another generation: {refused:?}");
            let refused = store.create_token(&by_session("late", 0), &At(t(1_000)), u32::MAX, &ev()).await;
            assert!(matches!(refused, Err(StorageError::CreatorEnded)), "an expired session: {refused:?}");
            store.revoke_session(&signed_in.id, t(30), &ev()).await.expect("sign out");
            let refused = store.create_token(&by_session("signed-out", 0), &At(t(40)), u32::MAX, &ev()).await;
            assert!(matches!(refused, Err(StorageError::CreatorEnded)), "a signed-out session: {refused:?}");
            store.revoke_token(&creator.token.id, false, t(50), &ev()).await.expect("revoke").expect("found");
            let mut orphan = token(&alice.id, "orphan", &[], 10, None);
            orphan.creator = Some(Creator::Token { id: creator.token.id.clone() });
            let refused = store.create_token(&orphan, &At(t(60)), u32::MAX, &ev()).await;
            assert!(matches!(refused, Err(StorageError::CreatorEnded)), "a revoked token: {refused:?}");
        }

        async fn a_token_is_renewed_only_while_the_credential_asking_is_live(store) {
            let alice = person("alice", 1);
            store.create_account(&alice, &ev()).await.expect("create account");
            let bob = person("bob", 2);
            store.create_account(&bob, &ev()).await.expect("create account");
            let renewed = token(&alice.id, "renewed", &[], 10, Some(100));
            store.create_token(&renewed, &At(t(10)), u32::MAX, &ev()).await.expect("create token");
            let signed_in = session(&alice.id, 1, 1_000);
            store.create_session(&signed_in, &digest(CredentialKind::Session), 0, &ev()).await.expect("create session");
            let creator = token(&alice.id, "creator", &[], 10, None);
            store.create_token(&creator, &At(t(10)), u32::MAX, &ev()).await.expect("create the renewing token");
            let id = &renewed.token.id;
            let by_session = |generation: i64| Creator::Session { id: signed_in.id.clone(), credentials_generation: generation };
            let by_token = Creator::Token { id: creator.token.id.clone() };
            let got = store.renew_token(id, &alice.id, Some(t(200)), Some(&by_session(0)), &At(t(20)), &ev()).await;
            assert_eq!(got.expect("a live session renews").expect("renewed").expire_time, Some(t(200)));
            let got = store.renew_token(id, &alice.id, Some(t(300)), Some(&by_token), &At(t(20)), &ev()).await;
            assert_eq!(got.expect("a live token renews").expect("renewed").expire_time, Some(t(300)));
            // Named under another account, the token is not found, and not renewed.
            let got = store.renew_token(id, &bob.id, Some(t(900)), None, &At(t(20)), &ev()).await;
            assert!(matches!(got, Ok(None)), "another account's: {got:?}");
            let refused = store.renew_token(id, &alice.id, Some(t(900)), Some(&by_session(1)), &At(t(20)), &ev()).await;
            assert!(matches!(refused, Err(StorageError::CreatorEnded)), "another generation: {refused:?}");
            store.revoke_session(&signed_in.id, t(30), &ev()).await.expect("sign out");
            let refused = store.renew_token(id, &alice.id, Some(t(900)), Some(&by_session(0)), &At(t(40)), &ev()).await;
            assert!(matches!(refused, Err(StorageError::CreatorEnded)), "a signed-out session: {refused:?}");
            store.revoke_token(&creator.token.id, false, t(50), &ev()).await.expect("revoke").expect("found");
            let refused = store.renew_token(id, &alice.id, Some(t(900)), Some(&by_token), &At(t(60)), &ev()).await;
            assert!(matches!(refused, Err(StorageError::CreatorEnded)), "a revoked token: {refused:?}");
            let kept = store.token_by_id(id).await.expect("read").expect("found");
            assert_eq!(kept.expire_time, Some(t(300)), "no refused renewal changed it");
        }

        async fn revoking_a_family_revokes_its_descendants(store) {
            let alice = person("alice", 1);
            store.create_account(&alice, &ev()).await.expect("create account");
            let parent = token(&alice.id, "parent", &[], 10, None);
            let child = child_of(&parent, &alice.id, "child");
            let grandchild = child_of(&child, &alice.id, "grandchild");
            let unrelated = token(&alice.id, "unrelated", &[], 10, None);
            for new in [&parent, &child, &grandchild, &unrelated] {
                store.create_token(new, &At(t(10)), u32::MAX, &ev()).await.expect("create token");
            }
            let mut revoked = store
                .revoke_family(&parent.token.family_id, t(20), &ev())
                .await
                .expect("revoke family");
            revoked.sort();
            let mut want = vec![parent.token.id.clone(), child.token.id.clone(), grandchild.token.id.clone()];
            want.sort();
            assert_eq!(revoked, want);
            let got = store.token_by_id(&unrelated.token.id).await.expect("read").expect("found");
            assert_eq!(got.revoke_time, None);
        }

        async fn a_leak_report_revokes_what_it_names_and_their_descendants(store) {
            let alice = person("alice", 1);
            store.create_account(&alice, &ev()).await.expect("create account");
            let parent = token(&alice.id, "parent", &[], 10, None);
            let child = child_of(&parent, &alice.id, "child");
            let other = token(&alice.id, "other", &[], 10, None);
            let unrelated = token(&alice.id, "unrelated", &[], 10, None);
            let expired = token(&alice.id, "expired", &[], 10, Some(15));
            for new in [&parent, &child, &other, &unrelated, &expired] {
                store.create_token(new, &At(t(10)), u32::MAX, &ev()).await.expect("create token");
            }
            let live = session(&alice.id, 10, 1_000);
            let live_digest = digest(CredentialKind::Session);
            store.create_session(&live, &live_digest, 0, &ev()).await.expect("create session");

            let template = AuditEvent::new(EventType::TokenLeaked, &Origin::new("127.0.0.1:1"), None, Timestamp::now());
            let tokens = [
                parent.digest,
                other.digest,
                expired.digest,
                digest(CredentialKind::PersonalAccessToken),
            ];
            let sessions = [live_digest, digest(CredentialKind::Session)];
            let mut revoked = store
                .revoke_leaked(&tokens, &sessions, t(20), &template)
                .await
                .expect("revoke leaked");
            revoked.sort();
            let mut want = vec![
                parent.token.id.clone(),
                child.token.id.clone(),
                other.token.id.clone(),
                live.id.clone(),
            ];
            want.sort();
            assert_eq!(revoked, want);
            let got = store.token_by_id(&unrelated.token.id).await.expect("read").expect("found");
            assert_eq!(got.revoke_time, None);
            let got = store.token_by_id(&expired.token.id).await.expect("read").expect("found");
            assert_eq!(got.revoke_time, None, "an expired token is not live: nothing to revoke");

            // The reported credentials are recorded as leaked, the
            // descendant as revoked.
            let events = store
                .list_events(&AuditFilter { account: Some(alice.id.clone()), types: vec![EventType::TokenLeaked, EventType::TokenRevoked], ..Default::default() }, None, 10)
                .await
                .expect("list events");
            let mut seen: Vec<(EventType, TokenId, String)> = events
                .into_iter()
                .map(|e| (e.kind, e.subject_credential.expect("subject"), e.subject_username))
                .collect();
            seen.sort_by(|a, b| a.1.cmp(&b.1));
            let mut want = vec![
                (EventType::TokenLeaked, parent.token.id.clone(), "alice".to_owned()),
                (EventType::TokenRevoked, child.token.id.clone(), "alice".to_owned()),
                (EventType::TokenLeaked, other.token.id.clone(), "alice".to_owned()),
                (EventType::TokenLeaked, live.id.clone(), "alice".to_owned()),
            ];
            want.sort_by(|a, b| a.1.cmp(&b.1));
            assert_eq!(seen, want);

            // Reporting them again revokes nothing.
            let again = store
                .revoke_leaked(&tokens, &sessions, t(30), &template)
                .await
                .expect("revoke leaked again");
            assert!(again.is_empty(), "{again:?}");
        }

        async fn a_use_is_never_spent_on_a_revoked_or_expired_token(store) {
            let alice = person("alice", 1);
            store.create_account(&alice, &ev()).await.expect("create account");
            let mut limited = token(&alice.id, "limited", &[], 10, Some(1_000));
            limited.token.max_uses = Some(5);
            limited.token.uses_remaining = Some(5);
            store.create_token(&limited, &At(t(10)), u32::MAX, &ev()).await.expect("create token");
            let id = &limited.token.id;
            assert_eq!(store.consume_use(id, t(20)).await.expect("consume"), Some(4));
            // Expired at 1000: no use at or after it.
            assert_eq!(store.consume_use(id, t(1_000)).await.expect("consume"), None);
            // A rotation moves the uses left to the successor: the old
            // token spends none, even in its grace period (before its
            // scheduled revocation), and the successor has exactly them.
            let mut successor = token(&alice.id, "limited", &[], 30, Some(1_000));
            successor.token.family_id = limited.token.family_id.clone();
            successor.token.max_uses = Some(5);
            successor.token.uses_remaining = Some(5);
            store
                .rotate_token(id, &successor, t(100), &At(t(30)), &ev())
                .await
                .expect("rotate")
                .expect("rotated");
            assert_eq!(store.consume_use(id, t(99)).await.expect("consume"), None);
            assert_eq!(store.consume_use(id, t(100)).await.expect("consume"), None);
            assert_eq!(
                store.consume_use(&successor.token.id, t(40)).await.expect("consume"),
                Some(3),
                "the successor has the four uses left, not a fresh five"
            );
            // Revoked outright.
            let mut other = token(&alice.id, "other", &[], 10, Some(1_000));
            other.token.max_uses = Some(5);
            other.token.uses_remaining = Some(5);
            store.create_token(&other, &At(t(10)), u32::MAX, &ev()).await.expect("create token");
            store.revoke_token(&other.token.id, false, t(50), &ev()).await.expect("revoke").expect("found");
            assert_eq!(store.consume_use(&other.token.id, t(60)).await.expect("consume"), None);
            let got = store.token_by_id(&other.token.id).await.expect("read").expect("found");
            assert_eq!(got.uses_remaining, Some(5), "no use was spent");
        }

        async fn a_used_up_token_is_neither_renewed_nor_rotated(store) {
            let alice = person("alice", 1);
            store.create_account(&alice, &ev()).await.expect("create account");
            let mut once = token(&alice.id, "once", &[], 10, Some(1_000));
            once.token.max_uses = Some(1);
            once.token.uses_remaining = Some(1);
            store.create_token(&once, &At(t(10)), u32::MAX, &ev()).await.expect("create token");
            let id = &once.token.id;
            assert_eq!(store.consume_use(id, t(20)).await.expect("consume"), Some(0));
            // The store decides on the row as it is when written, not as the
            // caller read it: its last use may have been spent in between.
            let renewed = store.renew_token(id, &alice.id, Some(t(5_000)), None, &At(t(30)), &ev()).await;
            assert!(matches!(renewed, Ok(None)), "renewed when used up: {renewed:?}");
            let mut successor = token(&alice.id, "once", &[], 30, Some(1_000));
            successor.token.family_id = once.token.family_id.clone();
            successor.token.max_uses = Some(1);
            successor.token.uses_remaining = Some(1);
            let rotated = store.rotate_token(id, &successor, t(500), &At(t(30)), &ev()).await;
            assert!(matches!(rotated, Ok(None)), "rotated when used up: {rotated:?}");
            assert!(store.token_by_id(&successor.token.id).await.expect("read").is_none(), "a successor was stored");
            let kept = store.token_by_id(id).await.expect("read").expect("found");
            assert_eq!((kept.expire_time, kept.replaced_by, kept.uses_remaining), (Some(t(1_000)), None, Some(0)));
        }

        async fn a_revocation_holds_whatever_time_it_names(store) {
            let alice = person("alice", 1);
            store.create_account(&alice, &ev()).await.expect("create account");
            let x = token(&alice.id, "x", &[], 10, None);
            store.create_token(&x, &At(t(10)), u32::MAX, &ev()).await.expect("create token");
            // Revoked by a replica whose clock runs ahead: the time named is
            // after the rotation's (and every reader's) "now".
            store.revoke_token(&x.token.id, false, t(1_000), &ev()).await.expect("revoke").expect("found");
            let got = store.token_by_id(&x.token.id).await.expect("read").expect("found");
            assert_eq!(got.state(t(20)), TokenState::Revoked, "revoked at once");
            let mut successor = token(&alice.id, "x", &[], 30, None);
            successor.token.family_id = x.token.family_id.clone();
            let rotated = store
                .rotate_token(&x.token.id, &successor, t(500), &At(t(30)), &ev())
                .await
                .expect("rotate");
            assert!(rotated.is_none(), "a revoked token is never rotated");
            assert!(store.token_by_id(&successor.token.id).await.expect("read").is_none());
            let listed = store
                .list_tokens(&alice.id, &TokenFilter { states: vec![TokenState::Active], ..TokenFilter::all(t(20)) }, None, 10)
                .await
                .expect("list");
            assert!(listed.is_empty(), "{listed:?}");

            // A rotation records a grace deadline, not a revocation.
            let y = token(&alice.id, "y", &[], 10, None);
            store.create_token(&y, &At(t(10)), u32::MAX, &ev()).await.expect("create token");
            let mut next = token(&alice.id, "y", &[], 30, None);
            next.token.family_id = y.token.family_id.clone();
            let old = store
                .rotate_token(&y.token.id, &next, t(500), &At(t(30)), &ev())
                .await
                .expect("rotate")
                .expect("rotated");
            assert_eq!((old.revoke_time, old.retire_time), (None, Some(t(500))));
            assert_eq!(old.state(t(499)), TokenState::Active, "in its grace period");
            assert_eq!(old.state(t(500)), TokenState::Revoked, "grace over");
            // Revoking the old token as the caller saw it before the
            // rotation (its family's live token) revokes the successor too.
            let (_, revoked) = store
                .revoke_token(&y.token.id, true, t(40), &ev())
                .await
                .expect("revoke")
                .expect("found");
            assert!(revoked.contains(&next.token.id), "{revoked:?}");
            let got = store.token_by_id(&next.token.id).await.expect("read").expect("found");
            assert_eq!(got.state(t(41)), TokenState::Revoked);
        }
    }
}

/// A live token for `account` created with `creator`: a child of the
/// creator's family.
fn child_of(creator: &NewToken, account: &AccountId, name: &str) -> NewToken {
    let mut child = token(account, name, &[], 10, None);
    child.token.parent_family_id = Some(creator.token.family_id.clone());
    child
}
