//! An axum gateway that serves many internal users through one Kling stack per account, with
//! a signed-callback route and `/metrics`. The example drives itself: it starts the gateway on
//! 127.0.0.1:0, sends generation requests for two teams (a Pro and a Standard account), lets
//! the mock's signed callbacks end the tasks, reads `/metrics`, drains and exits.
//!
//! Run: `cargo run -p kling-examples --example gateway_axum`

#![allow(clippy::print_stdout)] // an example reports what it does

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kling_core::error::BoxError;
use kling_core::{AccountId, Outcome};
use kling_mock::{MockConfig, MockServer, Preset};
use kling_tower::client::{HttpsClient, https_client};
use kling_tower::gateway::{Gateway, GatewayLayer};
use kling_tower::webhook::WebhookVerifier;
use kling_tower::webhook::axum::callback_route;
use kling_tower::{Credentials, Follower, KlingLayer, StackConfig, TaskRef, Tier};
use tower::{Layer, ServiceExt};

const SPEED: f64 = 30.0;
const SECRET: &str = "whsec_Z2F0ZXdheS1jYWxsYmFjay1zZWNyZXQ=";
const TEAMS: [(&str, Tier, &str); 2] = [
    ("team-a", Tier::Pro, "key-a"),
    ("team-b", Tier::Standard, "key-b"),
];

/// What the gateway's handlers share.
#[derive(Clone)]
struct App {
    kling: Gateway<HttpsClient>,
    gateway: GatewayLayer,
    /// One follower per team, fed by that team's callbacks.
    followers: Arc<HashMap<String, Follower<Gateway<HttpsClient>>>>,
    callback_base: String,
}

/// `POST /generate/{team}` with a prompt: creates the task on the team's account, waits for
/// its callback, answers with its status.
async fn generate(
    State(app): State<App>,
    Path(team): Path<String>,
    prompt: String,
) -> Result<String, (StatusCode, String)> {
    let error = |e: BoxError| (StatusCode::BAD_GATEWAY, e.to_string());
    let follower = app
        .followers
        .get(&team)
        .ok_or((StatusCode::NOT_FOUND, format!("no team {team}")))?;
    let body = serde_json::json!({
        "prompt": prompt,
        "callback_url": format!("{}/kling/callback/{team}", app.callback_base),
    });
    let mut create = http::Request::post("/v1/videos/text2video")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| error(e.into()))?;
    create
        .extensions_mut()
        .insert(AccountId::new(team.as_str()));
    let created = app.kling.clone().oneshot(create).await.map_err(error)?;
    let task = Outcome::of(&created)
        .and_then(Outcome::task)
        .cloned()
        .ok_or((StatusCode::BAD_GATEWAY, "no task".to_owned()))?;
    let done = follower
        .follow(TaskRef::from_report("/v1/videos/text2video", &task))
        .await
        .map_err(|e| error(e.into()))?;
    Ok(format!("{} {}", done.id, done.status))
}

/// Kling on Pro with both teams' keys, at the example's speed (its tests' negative control
/// starts the same). Each account has Pro's limits; team-b's stack keeps within Standard's.
fn mock_config() -> MockConfig {
    TEAMS.iter().fold(
        MockConfig::preset(Preset::Pro)
            .speed(SPEED)
            .task_duration(Duration::from_secs(20), Duration::from_secs(30))
            .callback_secret(SECRET),
        |config, (team, _, key)| config.api_key_for(*key, *team),
    )
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mock = MockServer::start(mock_config()).await?;
    let metrics = kling_tower::metrics::prometheus::install()?;

    // One stack per account, each with its own tier, behind one service keyed by AccountId.
    let gateway = TEAMS
        .iter()
        .try_fold(GatewayLayer::builder(), |builder, (team, tier, key)| {
            let stack = KlingLayer::builder(
                StackConfig::preset(*tier).speed(SPEED),
                Credentials::api_key(*key)?,
            )
            .base_url(&mock.base_url());
            Ok::<_, BoxError>(builder.account(*team, stack))
        })?
        .build()?;
    let kling = gateway.layer(https_client()?);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let verifier = WebhookVerifier::new(SECRET)?;
    let mut followers = HashMap::new();
    let mut router = Router::new();
    for (team, _, _) in TEAMS {
        let stack = gateway
            .get(&AccountId::new(team))
            .ok_or("configured above")?
            .clone();
        // Callbacks first: queries only every 60 s of API time, as a safety net. The tasks
        // last 20–30 s, so each follow ends by its callback before its first query is due.
        let policy = stack
            .follow_policy()
            .callbacks_first(Duration::from_secs(60));
        let follower = stack.follower(kling.clone(), policy)?;
        followers.insert(team.to_owned(), follower.clone());
        router = router.route(
            &format!("/kling/callback/{team}"),
            callback_route(verifier.clone(), move |task| {
                // Free the slot, then end the follow: whoever sees the task end finds its slot
                // free (and can create the next task at once). The follower confirms later if
                // needed. A slot not freed (Redis away) answers 503: Kling delivers it again.
                let (stack, follower) = (stack.clone(), follower.clone());
                async move {
                    stack.on_task(&task).await?;
                    follower.deliver(task);
                    Ok::<_, BoxError>(())
                }
            }),
        );
    }
    let metrics_endpoint = metrics.clone();
    let app = App {
        kling,
        gateway: gateway.clone(),
        followers: Arc::new(followers),
        callback_base: base.clone(),
    };
    let router = router
        .route("/generate/{team}", post(generate))
        .route_service("/metrics", metrics_endpoint)
        .with_state(app.clone());
    let server = tokio::spawn(async move { axum::serve(listener, router).await });

    // Internal users: six requests per team, all at once.
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let calls: Vec<_> = TEAMS
        .iter()
        .flat_map(|(team, _, _)| (0..6).map(move |i| (team, i)))
        .map(|(team, i)| {
            let client = client.clone();
            let uri = format!("{base}/generate/{team}");
            tokio::spawn(async move {
                let request =
                    http::Request::post(uri).body(Full::new(Bytes::from(format!("scene {i}"))))?;
                let response = client.request(request).await?;
                let status = response.status();
                let body = response.into_body().collect().await?.to_bytes();
                Ok::<_, BoxError>((status, String::from_utf8_lossy(&body).into_owned()))
            })
        })
        .collect();
    for call in calls {
        let (status, body) = call.await??;
        println!("{status} {body}");
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.ends_with("succeeded"), "{body}");
    }

    let text = client
        .get(format!("{base}/metrics").parse()?)
        .await?
        .into_body()
        .collect()
        .await?
        .to_bytes();
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("kling_responses_total"), "{text}");
    println!("{} lines of metrics", text.lines().count());

    let stats = mock.stats();
    println!(
        "mock: {:?}, callbacks sent {}",
        stats.responses_by_code, stats.callbacks_sent
    );
    assert_eq!(stats.tasks_created, 12);
    assert!(stats.callbacks_sent >= 12, "the callbacks were accepted");
    // Every task ended by its callback: no follower needed its safety-net query (each query
    // the mock answered would be one more code 0 beside the twelve creates).
    assert_eq!(
        stats.responses("0"),
        stats.tasks_created,
        "a task's end was found by a query, not its callback"
    );
    assert!(!stats.responses_by_code.contains_key("1303"));
    for (team, stack) in app.gateway.accounts() {
        let snapshot = stack.snapshot();
        println!("{team}: {:?}", snapshot.pools);
        assert!(snapshot.pools.iter().all(|p| p.in_use == 0));
    }

    app.gateway.drain().await;
    server.abort();
    mock.shutdown().await;
    Ok(())
}

#[cfg(test)]
#[path = "support/blind.rs"]
mod blind;

#[cfg(test)]
mod tests {
    use crate::blind::{Create, blind_creates};
    use kling_mock::Preset;
    use kling_tower::Credentials;

    #[test]
    fn runs_to_completion_against_the_mock() {
        super::main().expect("the example finishes without error");
    }

    /// The control of `main`'s "no 1303": each team's six creates sent blind, one team after
    /// the other: six creates for five slots, on each account.
    #[test]
    fn the_same_creates_sent_blind_meet_1303() {
        let creates = super::TEAMS
            .iter()
            .flat_map(|(_, _, key)| (0..6).map(move |i| (key, i)))
            .map(|(key, i)| Create {
                credentials: Credentials::api_key(*key).unwrap(),
                path: "/v1/videos/text2video",
                body: format!(r#"{{"prompt":"scene {i}"}}"#),
            })
            .collect();
        let stats =
            blind_creates(super::mock_config(), Preset::Pro, super::SPEED, creates).unwrap();
        assert!(stats.responses("1303") >= 2, "{stats:?}");
    }
}
