//! Real sockets: the full stack over hyper-util and over reqwest against `kling-mock` on
//! loopback, against the same clients bare, in interleaved rounds. The figure that can show
//! a difference of a microsecond on a shared machine is the client's CPU time per request
//! (its runtime's threads only, from `/proc/self/task/*/schedstat`); requests per second and
//! latency percentiles are kept beside it.
//!
//! `KLING_BENCH_CLIENTS=<text>` runs only the clients whose name holds the text, to put one of
//! them under a profiler (`perf record … kling-bench sockets`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::uri::{self, Authority, Scheme};
use http::{HeaderValue, Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kling_mock::{MockConfig, MockServer, Preset};
use kling_tower::client::ReqwestService;
use kling_tower::{Credentials, KlingLayer};
use tokio::runtime::Runtime;
use tower::{BoxError, Layer, Service, ServiceExt};

use crate::cpu;
use crate::fixtures::CREATE_BODY;

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Interleaved rounds (at least 5 for the published figures).
    pub rounds: usize,
    /// Create+query lives per client per round.
    pub lives: usize,
    /// Concurrent driver tasks.
    pub concurrency: usize,
    /// The client runtime's worker threads. With one, the client's CPU time is its work; with
    /// two (a usual deployment), it also holds the time an idle worker spins looking for work
    /// to steal before it parks, which moves with the timing of each run by more than the
    /// stack costs.
    pub workers: usize,
}

impl Options {
    /// The published configuration.
    pub fn full() -> Self {
        Options {
            rounds: 15,
            lives: 5_000,
            concurrency: 8,
            workers: 1,
        }
    }

    /// A smoke test.
    pub fn tiny() -> Self {
        Options {
            rounds: 1,
            lives: 20,
            concurrency: 2,
            workers: 1,
        }
    }
}

/// One client's figures.
#[derive(Clone, Debug, Default)]
pub struct Row {
    /// The client.
    pub name: String,
    /// Client CPU µs per request, per round.
    pub cpu_us: Vec<f64>,
    /// Requests per second, per round.
    pub rps: Vec<f64>,
    /// Latencies of every request, µs.
    pub latencies: Vec<f64>,
}

impl Row {
    /// Median client CPU µs per request.
    pub fn cpu(&self) -> f64 {
        cpu::median(&self.cpu_us)
    }

    /// The median over the rounds of this client's CPU per request less `bare`'s in the same
    /// round: a round of each runs back to back, so a change in the machine's load between
    /// rounds cancels out, where the difference of the two medians would keep it.
    pub fn cpu_over(&self, bare: &Row) -> f64 {
        let differences: Vec<f64> = self
            .cpu_us
            .iter()
            .zip(&bare.cpu_us)
            .map(|(stack, bare)| stack - bare)
            .collect();
        cpu::median(&differences)
    }

    /// Median requests per second.
    pub fn rps(&self) -> f64 {
        cpu::median(&self.rps)
    }

    /// A latency percentile, µs.
    pub fn latency(&self, q: f64) -> f64 {
        cpu::quantile(&mut self.latencies.clone(), q)
    }
}

type Call = Box<
    dyn Fn(
            Request<Full<Bytes>>,
        ) -> std::pin::Pin<Box<dyn Future<Output = Result<Bytes, BoxError>> + Send>>
        + Send
        + Sync,
>;

use std::future::Future;

/// Sends one request through `service` and reads the whole body (a bare client must read it
/// too), boxed so the four clients fit one driver (the same box for all four).
fn caller<S, B>(service: S) -> Call
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Box::new(move |request| {
        let service = service.clone();
        Box::pin(async move {
            let response = service.oneshot(request).await.map_err(Into::into)?;
            if !response.status().is_success() {
                return Err(format!("http {}", response.status()).into());
            }
            let body = response.into_body().collect().await.map_err(Into::into)?;
            Ok(body.to_bytes())
        })
    })
}

struct Client_ {
    name: &'static str,
    call: Call,
    /// Whether requests must carry the absolute URI and the bearer header themselves.
    bare: bool,
}

/// The mock's scheme and authority, parsed once: a bare client's request splices them in as the
/// stack's base URL layer does, so neither side pays a parse of the whole absolute URI.
#[derive(Clone)]
struct Origin {
    scheme: Scheme,
    authority: Authority,
}

impl Origin {
    fn parse(base: &str) -> Origin {
        let uri: Uri = base.parse().expect("a valid base url");
        let parts = uri.into_parts();
        Origin {
            scheme: parts.scheme.expect("the base url has a scheme"),
            authority: parts.authority.expect("the base url has an authority"),
        }
    }
}

fn request(
    method: Method,
    base: &Origin,
    path: &str,
    body: Bytes,
    bare: bool,
) -> Request<Full<Bytes>> {
    let uri: Uri = if bare {
        let mut parts = uri::Parts::default();
        parts.scheme = Some(base.scheme.clone());
        parts.authority = Some(base.authority.clone());
        parts.path_and_query = Some(path.parse().expect("a valid path"));
        Uri::from_parts(parts).expect("a valid uri")
    } else {
        path.parse().expect("a valid path")
    };
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    request
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if bare {
        request
            .headers_mut()
            .insert(AUTHORIZATION, HeaderValue::from_static("Bearer bench-key"));
    }
    request
}

async fn life(client: &Client_, base: &Origin) -> Result<(f64, f64), BoxError> {
    let started = Instant::now();
    let create = request(
        Method::POST,
        base,
        "/v1/videos/text2video",
        Bytes::from_static(CREATE_BODY.as_bytes()),
        client.bare,
    );
    let created = (client.call)(create).await?;
    let id = task_id(&created).ok_or("a create's answer names its task")?;
    let created = Instant::now();
    // The task has ended by now (the mock's tasks last a microsecond): the query reports it,
    // and the stack frees its slot, as a client that follows its tasks does. A stack that
    // never saw its tasks end would hold every create of the run (tens of thousands), where a
    // real account holds a few dozen at most, and each create would look up a table that
    // large.
    let query = request(
        Method::GET,
        base,
        &format!("/v1/videos/text2video/{id}"),
        Bytes::new(),
        client.bare,
    );
    std::hint::black_box((client.call)(query).await?);
    Ok((
        created.duration_since(started).as_secs_f64() * 1e6,
        created.elapsed().as_secs_f64() * 1e6,
    ))
}

/// The `task_id` of a create's answer, found as text (the bare client and the stack alike:
/// only the request after it differs between them).
fn task_id(body: &[u8]) -> Option<&str> {
    const FIELD: &[u8] = br#""task_id":""#;
    let at = body.windows(FIELD.len()).position(|w| w == FIELD)? + FIELD.len();
    let len = body[at..].iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&body[at..at + len]).ok()
}

fn round(rt: &Runtime, client: &Arc<Client_>, base: &str, options: Options, row: &mut Row) {
    let base = Origin::parse(base);
    let per_task = (options.lives / options.concurrency).max(1);
    let requests = per_task * options.concurrency * 2;
    let cpu_before = cpu::named("bench-client");
    let wall = Instant::now();
    let latencies = rt.block_on(async {
        let drivers: Vec<_> = (0..options.concurrency)
            .map(|_| {
                let client = Arc::clone(client);
                let base = base.clone();
                tokio::spawn(async move {
                    let mut out = Vec::with_capacity(per_task * 2);
                    for _ in 0..per_task {
                        let (a, b) = life(&client, &base).await.expect("the mock answers");
                        out.push(a);
                        out.push(b);
                    }
                    out
                })
            })
            .collect();
        let mut all = Vec::new();
        for driver in drivers {
            all.extend(driver.await.expect("a driver finishes"));
        }
        all
    });
    let wall = wall.elapsed();
    // The kernel adds a running thread's time up when it is switched out (or at a tick): let the
    // client's workers park before reading, so their last slice is counted.
    std::thread::sleep(crate::overhead::SETTLE);
    let cpu = cpu::named("bench-client").saturating_sub(cpu_before);
    row.cpu_us.push(cpu.as_secs_f64() * 1e6 / requests as f64);
    row.rps.push(requests as f64 / wall.as_secs_f64());
    row.latencies.extend(latencies);
}

/// Runs the real-socket section.
pub fn run(options: Options, log: &mut dyn FnMut(&str)) -> Vec<Row> {
    // The mock on its own runtime and thread, so the client's CPU time is the client's.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-mock")
        .enable_all()
        .build()
        .expect("a runtime");
    let server = server_rt
        .block_on(MockServer::start(
            MockConfig::preset(Preset::Enterprise)
                .slots(1_000_000)
                .no_rate_limit()
                .task_duration(Duration::from_secs(1), Duration::from_secs(1))
                .speed(1e6),
        ))
        .expect("the mock starts");
    let base = server.base_url();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.workers.max(1))
        .thread_name("bench-client")
        .enable_all()
        .build()
        .expect("a runtime");
    // A life's query finds its task ended, so the stack frees the slot; the slots are many
    // all the same, so that no create waits should a query ever come first.
    let config = crate::overhead::pro_config().slots(10_000_000);
    let (clients, kling): (Vec<Arc<Client_>>, _) = {
        let _entered = rt.enter();
        let hyper = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let reqwest = ReqwestService::new_client().expect("a reqwest client");
        let kling = KlingLayer::builder(
            config.clone(),
            Credentials::api_key("bench-key").expect("a key"),
        )
        .base_url(&base)
        .build()
        .expect("a valid stack");
        let clients = vec![
            Arc::new(Client_ {
                name: "hyper-util, bare",
                call: caller(hyper.clone()),
                bare: true,
            }),
            Arc::new(Client_ {
                name: "hyper-util + kling-tower Pro stack",
                call: caller(kling.layer(hyper)),
                bare: false,
            }),
            Arc::new(Client_ {
                name: "reqwest, bare",
                call: caller(reqwest.clone()),
                bare: true,
            }),
            Arc::new(Client_ {
                name: "reqwest + kling-tower Pro stack",
                call: caller(kling.layer(reqwest)),
                bare: false,
            }),
        ];
        (clients, kling)
    };
    // One client alone, for a profiler (see the module docs).
    let clients: Vec<Arc<Client_>> = match std::env::var("KLING_BENCH_CLIENTS") {
        Ok(only) => clients
            .into_iter()
            .filter(|c| c.name.contains(&*only))
            .collect(),
        Err(_) => clients,
    };
    let mut rows: Vec<Row> = clients
        .iter()
        .map(|c| Row {
            name: c.name.to_owned(),
            ..Row::default()
        })
        .collect();
    // Warm the connection pools.
    for (client, row) in clients.iter().zip(&mut rows) {
        let mut warm = Row::default();
        round(
            &rt,
            client,
            &base,
            Options {
                lives: 50,
                ..options
            },
            &mut warm,
        );
        let _ = row;
    }
    for r in 0..options.rounds {
        log(&format!("sockets: round {}/{}", r + 1, options.rounds));
        for (client, row) in clients.iter().zip(&mut rows) {
            round(&rt, client, &base, options, row);
        }
    }
    // Both stacks (one per client) share the layer's slots: what they still hold is what the
    // queries did not see end.
    let pools = kling.snapshot().pools;
    let held: u32 = pools.iter().map(|p| p.in_use).sum();
    log(&format!(
        "sockets: slots the stacks still hold: {held} (in {} pools)",
        pools.len()
    ));
    drop(clients);
    drop(rt);
    server_rt.block_on(async move { drop(server) });
    rows
}
