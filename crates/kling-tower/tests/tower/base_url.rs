use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kling_core::{BoxError, ClassifyLayer, Outcome, SendState, TaskStatus};
use kling_mock::{MockConfig, MockServer, Preset};
use kling_tower::auth::{AuthLayer, Credentials};
use kling_tower::base_url::{BaseUrlLayer, OtherOrigin};
use kling_tower::{KlingLayer, StackConfig, Tier};
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};

use crate::support::{accepted_create, request};

/// Where `uri` goes through a base URL layer on `base`, or why it does not.
async fn sent(base: &str, uri: &str) -> Result<String, BoxError> {
    let echo =
        service_fn(
            |req: http::Request<()>| async move { Ok::<_, Infallible>(req.uri().to_string()) },
        );
    BaseUrlLayer::new(base)
        .unwrap()
        .layer(echo)
        .oneshot(http::Request::get(uri).body(()).unwrap())
        .await
}

async fn resolved(base: &str, uri: &str) -> String {
    sent(base, uri).await.unwrap()
}

#[tokio::test]
async fn relative_uris_are_resolved_and_absolute_ones_kept_at_the_base_origin() {
    let global = "https://api-singapore.klingai.com";
    assert_eq!(
        resolved(global, "/v1/videos/text2video").await,
        "https://api-singapore.klingai.com/v1/videos/text2video"
    );
    assert_eq!(
        resolved("https://proxy:8080/kling/", "/tasks?task_ids=a,b").await,
        "https://proxy:8080/kling/tasks?task_ids=a,b"
    );
    assert_eq!(
        resolved(global, "https://api-singapore.klingai.com:443/v1/x").await,
        "https://api-singapore.klingai.com:443/v1/x"
    );
    for bad in [
        "api.klingai.com",
        "ftp://host",
        "https://host/?q=1",
        "not a url",
    ] {
        let err = BaseUrlLayer::new(bad).unwrap_err();
        assert_eq!(err.field(), "base_url", "{bad}");
    }
    let _ = (BaseUrlLayer::global(), BaseUrlLayer::china());
}

/// A request to another scheme, host or port than the base's is refused before it is sent,
/// whatever it carries.
#[tokio::test]
async fn absolute_uris_to_another_origin_are_refused_before_sending() {
    let global = "https://api-singapore.klingai.com";
    for uri in [
        "http://127.0.0.1:9/v1/x",
        "https://cdn.example/a.mp4",
        "http://api-singapore.klingai.com/v1/x",
        "https://api-singapore.klingai.com:8443/v1/x",
        "https://api-beijing.klingai.com/v1/x",
    ] {
        let error = sent(global, uri).await.unwrap_err();
        let refused = error.downcast_ref::<OtherOrigin>().expect("OtherOrigin");
        assert_eq!(refused.base(), "https://api-singapore.klingai.com:443");
        assert_eq!(SendState::of(&*error), SendState::NotSent, "{uri}");
    }
    let error = sent("http://127.0.0.1:9", "http://127.0.0.1:10/x")
        .await
        .unwrap_err();
    assert_eq!(
        error.downcast_ref::<OtherOrigin>().unwrap().origin(),
        "http://127.0.0.1:10"
    );
}

/// The error the stack's builder gives for a base URL it refuses.
fn stack_refuses(base: &str) -> kling_tower::error::ConfigError {
    KlingLayer::builder(
        StackConfig::preset(Tier::Pro),
        Credentials::api_key("k").unwrap(),
    )
    .base_url(base)
    .build()
    .unwrap_err()
}

/// Plain http would carry the API key or token in cleartext: only to a loopback host (the
/// mock, a local proxy), through the layer and through the stack's builder alike.
#[test]
fn plain_http_base_urls_are_refused_except_to_loopback() {
    for base in [
        "http://api-singapore.klingai.com",
        "http://proxy.internal:8080/kling",
        "http://192.168.1.10",
    ] {
        let refused = BaseUrlLayer::new(base).unwrap_err();
        assert_eq!(refused.field(), "base_url", "{base}");
        assert!(refused.to_string().contains("https://"), "{refused}");
        let refused = stack_refuses(base);
        assert_eq!(refused.field(), "base_url", "{base}");
    }
    for base in [
        "http://127.0.0.1:9",
        "http://[::1]:9",
        "http://localhost:9/kling",
        "https://proxy.internal:8080/kling",
    ] {
        assert!(BaseUrlLayer::new(base).is_ok(), "{base}");
    }
}

/// A base URL with `user:password@` is refused, and the refusal does not repeat the password:
/// the base is printed wherever the stack is (`Debug`), and reqwest would send the user info
/// as a second `Authorization`.
#[test]
fn base_urls_with_user_info_are_refused_without_echoing_it() {
    for base in [
        "https://user:s3cret@proxy.internal/kling",
        "https://s3cret@api-singapore.klingai.com",
    ] {
        let refused = BaseUrlLayer::new(base).unwrap_err();
        assert_eq!(refused.field(), "base_url", "{base}");
        assert!(refused.to_string().contains("user info"), "{refused}");
        let refused = stack_refuses(base);
        assert!(
            !format!("{refused} {refused:?}").contains("s3cret"),
            "{refused:?}"
        );
    }
}

/// A base URL with no host (`https://${HOST}:443` with `HOST` unset) or a port that is none
/// (`:84430`, `:0`) is refused when the stack is built. `http` parses both: the stack built,
/// then every request failed, and with `:84430` the origin kept the default port 443, so an
/// absolute URI to that host's port 443 was taken for the base's and sent with the
/// credentials.
#[test]
fn a_base_url_without_a_host_or_with_a_port_out_of_range_is_refused() {
    for (base, reason) in [
        ("https://:443", "needs a host"),
        ("https://:8443/kling", "needs a host"),
        ("http://:9", "needs a host"),
        ("https://proxy.internal:84430", "port `84430`"),
        ("https://proxy.internal:0/kling", "port `0`"),
        ("http://127.0.0.1:65536", "port `65536`"),
        ("https://[::1]:99999", "port `99999`"),
        // `http` and `u16::from_str` take a sign (`+443` is port 443 to hyper, an invalid port
        // to reqwest's `url`) and any text after an IPv6 literal's `]`.
        ("https://proxy.internal:+443", "port `+443`"),
        ("https://[::1]x:8443", "`[::1]x:8443`"),
        ("http://[::1]x:9", "`[::1]x:9`"),
        ("https://[]:443", "`[]`"),
        ("https://[example.com]:443", "`[example.com]`"),
        // A zone id: `http` takes it, reqwest's `url` refuses it (a builder error on every
        // request) and hyper's connector looks it up as a host name, which fails.
        ("http://[fe80::1%25eth0]:8080", "zone id"),
        ("https://[fe80::1%25eth0]/kling", "zone id"),
        ("http://[::1%25lo]:9", "zone id"),
    ] {
        let refused = BaseUrlLayer::new(base).unwrap_err();
        assert_eq!(refused.field(), "base_url", "{base}");
        assert!(refused.reason().contains(reason), "{base}: {refused}");
        assert_eq!(stack_refuses(base).field(), "base_url", "{base}");
    }
    // The control: the ports a URL may name, written or not, and an empty one (the default).
    for base in [
        "https://proxy.internal:1",
        "https://proxy.internal:65535/kling",
        "https://proxy.internal:/kling",
        "http://[::1]:9",
        "https://api-singapore.klingai.com",
        "https://api-singapore.klingai.com.:443",
        "https://[::ffff:127.0.0.1]:8443",
        "https://[2001:db8::1]/kling",
        "https://proxy.internal:0443",
    ] {
        assert!(BaseUrlLayer::new(base).is_ok(), "{base}");
    }
}

/// Composed by hand (auth, classify, base URL), a request to another host is refused below the
/// auth layer: the client never sees it nor the key.
#[tokio::test]
async fn a_hand_composed_stack_never_sends_credentials_to_another_host() {
    let seen: Arc<Mutex<Vec<http::Request<Full<Bytes>>>>> = Arc::default();
    let log = seen.clone();
    let client = service_fn(move |req: http::Request<Full<Bytes>>| {
        log.lock().unwrap().push(req);
        async {
            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                br#"{"code":0,"message":"SUCCEED","request_id":"r","data":null}"#,
            ))))
        }
    });
    let service = ServiceBuilder::new()
        .layer(AuthLayer::new(Credentials::api_key("k1").unwrap()))
        .layer(ClassifyLayer::new())
        .layer(BaseUrlLayer::new("http://127.0.0.1:9").unwrap())
        .service(client);
    let error = service
        .clone()
        .oneshot(request("GET", "http://cdn.example/a.mp4", ""))
        .await
        .unwrap_err();
    assert_eq!(SendState::of(&*error), SendState::NotSent, "{error}");
    assert!(error.to_string().contains("cdn.example"), "{error}");
    assert!(seen.lock().unwrap().is_empty(), "never sent");
    service
        .oneshot(request("GET", "/tasks?task_ids=a", ""))
        .await
        .unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].uri(), "http://127.0.0.1:9/tasks?task_ids=a");
    assert_eq!(seen[0].headers()[AUTHORIZATION], "Bearer k1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyper_client_reaches_the_mock_through_the_base_url() {
    let server = MockServer::start(MockConfig::preset(Preset::Pro).no_rate_limit())
        .await
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http();
    let service = ServiceBuilder::new()
        .layer(AuthLayer::new(Credentials::api_key("k1").unwrap()))
        .layer(ClassifyLayer::new())
        .layer(BaseUrlLayer::new(&server.base_url()).unwrap())
        .service(client);
    let created = accepted_create(service.clone()).await;
    let task = Outcome::of(&created).unwrap().task().unwrap().clone();
    assert_eq!(task.status, TaskStatus::Submitted);
    let queried = service
        .oneshot(request(
            "GET",
            &format!("/v1/videos/text2video/{}", task.id),
            "",
        ))
        .await
        .unwrap();
    assert_eq!(Outcome::of(&queried).unwrap().task().unwrap().id, task.id);
    assert_eq!(server.stats().requests_total, 2);
    assert_eq!(server.stats().tasks_created, 1);
}

#[cfg(feature = "hyper")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_https_client_also_speaks_plain_http_to_the_mock() {
    let server = MockServer::start(MockConfig::preset(Preset::Pro))
        .await
        .unwrap();
    let client = kling_tower::client::https_client().unwrap();
    let service = ServiceBuilder::new()
        .layer(AuthLayer::new(Credentials::api_key("k1").unwrap()))
        .layer(ClassifyLayer::new())
        .layer(BaseUrlLayer::new(&server.base_url()).unwrap())
        .service(client);
    let response = service
        .oneshot(request("GET", "/account/costs", ""))
        .await
        .unwrap();
    assert!(Outcome::of(&response).unwrap().is_success());
}

/// A base URL that may carry a secret (an `@`, `?` or `#` anywhere) is refused without quoting
/// any of it: neither by `BaseUrlLayer::new` nor by the builder's `base_url` (its error, and
/// its `Debug`, which shows that result). A `/`, `?` or `#` in a password (a base64 one) ends
/// the host there, so the parser read the rest as a port (`https://kb:s3cret/x@proxy` was
/// refused as "has port `s3cret`"), a host (`[s3cret]`, a zone id) or, with a password of
/// digits, took the user name for the host and the rest for a path, and kept it.
#[test]
fn a_base_url_that_may_carry_a_secret_is_refused_without_quoting_any_of_it() {
    for base in [
        "https://kb:s3cret/x@proxy.internal",
        "https://kb:s3cret/x+y==@proxy.internal/kling",
        "https://kb:s3cret#@proxy.internal",
        "https://kb:s3cret?@proxy.internal",
        "https://kb:443s3cret/@proxy.internal",
        "http://kb:s3cret/@127.0.0.1:9",
        "https://[::1]:s3cret/x@proxy.internal",
        "https://[s3cret]/x@proxy.internal",
        "https://[fe80::1%25s3cret]/x@proxy.internal",
        "https://[fe80::1%25s3cret]#x",
        "https://kb:s3cret#x",
        "https://proxy.internal:99999#s3cret",
        "https://proxy.internal:s3cret?x",
        // Accepted before: a user name (a token) as the host, the password in the path.
        "https://s3cret/x@proxy.internal",
        "https://kb:8443/s3cret@proxy.internal/kling",
        "https://proxy.internal/kling/s3cret@x",
        // Refused before, but through other paths of the check.
        "https://kb:s3cret@proxy.internal",
        "https://proxy.internal/kling?sig=s3cret",
    ] {
        let refused = BaseUrlLayer::new(base).unwrap_err();
        assert_eq!(refused.field(), "base_url", "{base}");
        assert!(
            !format!("{refused} {refused:?}").contains("s3cret"),
            "{base}: {refused:?}"
        );
        let builder = KlingLayer::builder(
            StackConfig::preset(Tier::Pro),
            Credentials::api_key("k").unwrap(),
        )
        .base_url(base);
        assert!(!format!("{builder:?}").contains("s3cret"), "{builder:?}");
        let refused = builder.build().unwrap_err();
        assert_eq!(refused.field(), "base_url", "{base}");
        assert!(
            !format!("{refused} {refused:?}").contains("s3cret"),
            "{base}: {refused:?}"
        );
    }
    // The control: a base URL with no `@`, `?` nor `#` is still quoted where it is wrong.
    for (base, quoted) in [
        ("https://proxy.internal:99999", "`99999`"),
        ("https://[s3cret]/kling", "`[s3cret]`"),
        ("https://[fe80::1%25eth0]/kling", "`%25eth0`"),
    ] {
        let refused = BaseUrlLayer::new(base).unwrap_err();
        assert!(refused.reason().contains(quoted), "{base}: {refused}");
    }
}

/// A fragment is never sent, so a base URL with one (`https://proxy/kling#v2`) is a mistake:
/// refused saying so, without quoting it. `http` drops it when it parses the text, and the
/// base was kept without it, without a word.
#[test]
fn a_base_url_with_a_fragment_is_refused_without_quoting_it() {
    for base in [
        "https://proxy.internal/kling#s3cret",
        "https://proxy.internal#s3cret",
        "https://proxy.internal/#",
        "http://127.0.0.1:9/kling#s3cret?x",
        "https://api-singapore.klingai.com#s3cret",
    ] {
        let refused = BaseUrlLayer::new(base).unwrap_err();
        assert_eq!(refused.field(), "base_url", "{base}");
        assert!(refused.reason().contains("fragment"), "{base}: {refused}");
        assert!(
            !format!("{refused} {refused:?}").contains("s3cret"),
            "{base}: {refused:?}"
        );
        let refused = stack_refuses(base);
        assert!(refused.reason().contains("fragment"), "{base}: {refused}");
    }
    // A `?` before the `#` is a query, refused as one.
    let refused = BaseUrlLayer::new("https://proxy.internal/kling?a#b").unwrap_err();
    assert!(refused.reason().contains("query"), "{refused}");
}

/// Odd texts a user may pass: each is taken as it means, or refused saying what is wrong.
#[tokio::test(start_paused = true)]
async fn odd_base_urls_are_taken_as_meant_or_refused_clearly() {
    // Spaces around it (a `.env` file, a copied value) are dropped.
    assert_eq!(
        resolved("  https://proxy.internal/kling \n", "/v1/x").await,
        "https://proxy.internal/kling/v1/x"
    );
    // A scheme in capitals is the scheme; a host in capitals is the host.
    assert_eq!(
        resolved("HTTPS://Proxy.Internal:8443/kling", "/v1/x").await,
        "https://Proxy.Internal:8443/kling/v1/x"
    );
    assert_eq!(
        resolved("HTTP://LOCALHOST:9", "/v1/x").await,
        "http://LOCALHOST:9/v1/x"
    );
    assert!(BaseUrlLayer::new("HTTP://proxy.internal").is_err());
    // The IPv6 loopback, with a port.
    assert_eq!(
        resolved("http://[::1]:8080", "/v1/x").await,
        "http://[::1]:8080/v1/x"
    );
    // The default port written or not is one origin: an absolute URI with it or without it
    // passes, one to another port is refused.
    for (base, absolute) in [
        ("https://proxy.internal:443", "https://proxy.internal/v1/x"),
        ("https://proxy.internal", "https://proxy.internal:443/v1/x"),
        ("http://127.0.0.1:80", "http://127.0.0.1/v1/x"),
    ] {
        assert_eq!(resolved(base, absolute).await, absolute, "{base}");
    }
    let refused = sent(
        "https://proxy.internal:443",
        "https://proxy.internal:8443/v1/x",
    )
    .await
    .unwrap_err();
    assert!(refused.is::<OtherOrigin>(), "{refused}");
    // Trailing slashes are dropped from the path; an empty segment inside it (`//`, where a
    // proxy's path was joined to a host ending in `/`) is refused: servers merge or redirect
    // such paths (a redirect is an error to a POST), and a proxy's routes miss them.
    assert_eq!(
        resolved("https://proxy.internal/kling//", "/v1/x").await,
        "https://proxy.internal/kling/v1/x"
    );
    assert_eq!(
        resolved("https://proxy.internal//", "/v1/x").await,
        "https://proxy.internal/v1/x"
    );
    assert_eq!(
        resolved("http://127.0.0.1:9//", "/v1/x").await,
        "http://127.0.0.1:9/v1/x"
    );
    for base in [
        "https://proxy.internal//kling",
        "https://proxy.internal/a//b/",
    ] {
        let refused = BaseUrlLayer::new(base).unwrap_err();
        assert!(
            refused.reason().contains("empty path segment"),
            "{base}: {refused}"
        );
    }
    // A space inside, an empty text: refused as no URL.
    for base in [
        "https://proxy .internal",
        "https://proxy.internal/a b",
        "",
        "  ",
    ] {
        let refused = BaseUrlLayer::new(base).unwrap_err();
        assert_eq!(refused.field(), "base_url", "{base:?}");
    }
}
