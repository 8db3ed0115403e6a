//! `kling-mock`: the Kling API mock as a standalone server on 127.0.0.1.

use std::io::Write as _;
use std::time::Duration;

use clap::Parser;
use kling_mock::{MockConfig, MockServer, PoolScope, Preset, RetryAfterMode};

/// A real HTTP mock of the Kling AI API on 127.0.0.1.
// No `Debug`: it holds the API keys, secret key and callback secrets.
#[derive(Parser)]
#[command(name = "kling-mock", version, about)]
struct Args {
    /// Account tier: free, standard, pro or enterprise.
    #[arg(long, default_value = "pro")]
    preset: Preset,
    /// TCP port on 127.0.0.1 (0 = a free port).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Time compression: durations and windows are divided by it.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Credit budget per account.
    #[arg(long)]
    credits: Option<f64>,
    /// Seconds of API time after which the credit budget comes back in full (0 = never;
    /// default: a day on the free preset, never on the others).
    #[arg(long, value_parser = parse_secs)]
    credit_period_secs: Option<Duration>,
    /// `/account/costs` queries per second of API time per account (0 = unlimited).
    #[arg(long)]
    costs_per_second: Option<f64>,
    /// Retry-After on 1302/1303: none, seconds or date.
    #[arg(long, default_value = "none")]
    retry_after: RetryAfterMode,
    /// Share of requests answered 5000/5001/5002.
    #[arg(long, default_value_t = 0.0)]
    fault_rate: f64,
    /// Share of creates answered 5000 or 5002 (in turn) although the task was created.
    #[arg(long, default_value_t = 0.0)]
    ghost_create_rate: f64,
    /// Share of requests whose connection is dropped before they are carried out.
    #[arg(long, default_value_t = 0.0)]
    drop_rate: f64,
    /// Share of requests handled (a create makes its task, a refusal refuses) whose answer is
    /// then dropped.
    #[arg(long, default_value_t = 0.0)]
    lost_answer_rate: f64,
    /// Share of requests carried out on arrival (a create makes its task then) whose answer is
    /// sent only `--slow-delay` later.
    #[arg(long, default_value_t = 0.0)]
    slow_rate: f64,
    /// Seconds of API time a slow answer waits (default 30; at most a day).
    #[arg(long, value_parser = parse_secs)]
    slow_delay: Option<Duration>,
    /// Share of requests carried out (a create that succeeds makes its task) whose answer keeps
    /// its status and has its body cut in half (not JSON).
    #[arg(long, default_value_t = 0.0)]
    malformed_rate: f64,
    /// Share of tasks that end failed.
    #[arg(long, default_value_t = 0.0)]
    failure_rate: f64,
    /// Requests per minute per account (0 = unlimited).
    #[arg(long)]
    rate_per_minute: Option<f64>,
    /// GCRA burst.
    #[arg(long)]
    burst: Option<u32>,
    /// A refused request pushes the next allowed time further.
    #[arg(long)]
    penalty: bool,
    /// Seconds of API time every request of an account is refused 1302 after a request-rate
    /// 1302, its `Retry-After` naming the time left (0 = none, the default). Harsher than
    /// Kling documents: for testing that a client keeps `Retry-After`.
    #[arg(long, value_parser = parse_secs)]
    rate_lockout: Option<Duration>,
    /// Slots of every pool.
    #[arg(long)]
    slots: Option<u32>,
    /// Slots of one pool, `POOL=N` (repeatable): `video=20`, `image=9`, `try-on=3`,
    /// `video:kling-3.0=10`. A pool not named takes its type's, else `--slots`.
    #[arg(long, value_parser = parse_pool_slots)]
    pool_slots: Vec<(String, u32)>,
    /// Which pool a new-style create counts in: `model` (`video:{model}`) or `product`
    /// (`video`, shared by every model and the legacy endpoints).
    #[arg(long, default_value = "model")]
    pool_scope: PoolScope,
    /// Task duration range in seconds of API time, `MIN..MAX`.
    #[arg(long, value_parser = parse_range)]
    task_duration: Option<(Duration, Duration)>,
    /// Accept only this API key (repeatable).
    #[arg(long)]
    api_key: Vec<String>,
    /// Legacy access key (JWT iss; legacy endpoints only); needs --secret-key.
    #[arg(long, requires = "secret_key")]
    access_key: Option<String>,
    /// Legacy secret key (JWT HS256 key); needs --access-key.
    #[arg(long, requires = "access_key")]
    secret_key: Option<String>,
    /// Sign callbacks with this Standard-Webhooks secret; repeated, with each one (as during a
    /// key rotation: one signature per secret, the first secret's first).
    #[arg(long)]
    callback_secret: Vec<String>,
    /// Accept only these models on new-style creates (repeatable); others get 404 code 1203.
    /// Without it every model is accepted.
    #[arg(long)]
    known_model: Vec<String>,
    /// Seed of the RNG behind faults, durations and failures.
    #[arg(long)]
    seed: Option<u64>,
    /// Most accounts kept without `--api-key`/`--access-key` (each bearer its own account);
    /// beyond, the least recently seen idle one is forgotten.
    #[arg(long)]
    max_open_accounts: Option<usize>,
    /// Seconds (real time) to wait for a request's whole header, an idle keep-alive
    /// connection's next one included, and as long again for its body, before closing the
    /// connection; 0: no limit.
    #[arg(long, value_parser = parse_secs, default_value = "30")]
    header_read_timeout: Duration,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .and_then(|v| Duration::try_from_secs_f64(v).ok())
        .ok_or_else(|| format!("not a number of seconds: `{s}`"))
}

fn parse_pool_slots(s: &str) -> Result<(String, u32), String> {
    let (pool, slots) = s
        .split_once('=')
        .ok_or_else(|| format!("expected POOL=N, got `{s}`"))?;
    let pool = pool.trim();
    if pool.is_empty() {
        return Err(format!("expected POOL=N, got `{s}`"));
    }
    let slots = slots
        .trim()
        .parse::<u32>()
        .map_err(|_| format!("not a number of slots: `{slots}`"))?;
    Ok((pool.to_owned(), slots))
}

fn parse_range(s: &str) -> Result<(Duration, Duration), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("expected MIN..MAX seconds, got `{s}`"))?;
    let (min, max) = (parse_secs(a)?, parse_secs(b)?);
    if min > max {
        return Err(format!("MIN must not exceed MAX in `{s}`"));
    }
    Ok((min, max))
}

fn config(args: Args) -> MockConfig {
    let mut config = MockConfig::preset(args.preset)
        .port(args.port)
        .speed(args.speed)
        .retry_after(args.retry_after)
        .fault_rate(args.fault_rate)
        .ghost_create_rate(args.ghost_create_rate)
        .drop_rate(args.drop_rate)
        .lost_answer_rate(args.lost_answer_rate)
        .malformed_rate(args.malformed_rate)
        .failure_rate(args.failure_rate);
    let slow_delay = args.slow_delay.unwrap_or(config.faults.slow_delay);
    config = config.slow(args.slow_rate, slow_delay);
    if let Some(credits) = args.credits {
        config = config.credits(credits);
    }
    if let Some(period) = args.credit_period_secs {
        config = if period.is_zero() {
            config.lifetime_credits()
        } else {
            config.credit_period(period)
        };
    }
    if let Some(per_second) = args.costs_per_second {
        config = if per_second == 0.0 {
            config.no_costs_limit()
        } else {
            config.costs_per_second(per_second)
        };
    }
    if let Some(rate) = args.rate_per_minute {
        config = if rate == 0.0 {
            config.no_rate_limit()
        } else {
            config.rate_per_minute(rate)
        };
    }
    // Burst and penalty shape a rate limit; without one (enterprise, `--rate-per-minute 0`)
    // they have nothing to act on.
    if let Some(burst) = args.burst {
        config = config.burst(burst);
    }
    config = config.penalty(args.penalty);
    if let Some(lockout) = args.rate_lockout.filter(|lockout| !lockout.is_zero()) {
        config = config.rate_lockout(lockout);
    }
    config = config.pool_scope(args.pool_scope);
    if let Some(slots) = args.slots {
        config = config.slots(slots);
    }
    for (pool, slots) in args.pool_slots {
        config = config.pool_slots(pool, slots);
    }
    if let Some((min, max)) = args.task_duration {
        config = config.task_duration(min, max);
    }
    for key in args.api_key {
        config = config.api_key(key);
    }
    if let (Some(a), Some(s)) = (args.access_key, args.secret_key) {
        config = config.access_key(a, s);
    }
    let mut secrets = args.callback_secret.into_iter();
    if let Some(secret) = secrets.next() {
        config = config.callback_secret(secret);
    }
    for secret in secrets {
        config = config.callback_rotated_secret(secret);
    }
    for model in args.known_model {
        config = config.known_model(model);
    }
    if let Some(seed) = args.seed {
        config = config.seed(seed);
    }
    config = config
        .header_read_timeout(Some(args.header_read_timeout).filter(|timeout| !timeout.is_zero()));
    if let Some(accounts) = args.max_open_accounts {
        config = config.max_open_accounts(accounts);
    }
    config
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let server = match MockServer::start(config(args)).await {
        Ok(server) => server,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "kling-mock: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {}", server.base_url());
        let _ = out.flush();
    }
    let _ = tokio::signal::ctrl_c().await;
    server.shutdown().await;
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(args: &[&str]) -> MockConfig {
        config(
            Args::try_parse_from(std::iter::once("kling-mock").chain(args.iter().copied()))
                .unwrap(),
        )
    }

    #[test]
    fn pool_slots_set_each_packs_capacity() {
        let config = parsed(&[
            "--slots",
            "1",
            "--pool-slots",
            "video=20",
            "--pool-slots",
            "image = 9",
            "--pool-slots",
            "video:kling-3.0=4",
        ]);
        assert_eq!(config.capacity("video"), 20);
        assert_eq!(config.capacity("video:kling-2.6"), 20);
        assert_eq!(config.capacity("video:kling-3.0"), 4);
        assert_eq!(config.capacity("image"), 9);
        assert_eq!(config.capacity("try-on"), 1);
    }

    #[test]
    fn callback_secret_repeated_signs_with_each_the_first_first() {
        let config = parsed(&["--callback-secret", "new", "--callback-secret", "old"]);
        assert_eq!(config.callback_secret.as_deref(), Some("new"));
        assert_eq!(config.callback_rotated_secrets, ["old"]);
        let config = parsed(&["--callback-secret", "only"]);
        assert_eq!(config.callback_secret.as_deref(), Some("only"));
        assert!(config.callback_rotated_secrets.is_empty());
    }

    #[test]
    fn max_open_accounts_sets_the_open_mode_cap() {
        assert_eq!(
            parsed(&[]).max_open_accounts,
            kling_mock::DEFAULT_MAX_OPEN_ACCOUNTS
        );
        assert_eq!(parsed(&["--max-open-accounts", "50"]).max_open_accounts, 50);
    }

    #[test]
    fn header_read_timeout_sets_the_servers_wait_and_zero_lifts_it() {
        assert_eq!(
            parsed(&[]).header_read_timeout,
            Some(kling_mock::DEFAULT_HEADER_READ_TIMEOUT)
        );
        assert_eq!(
            parsed(&["--header-read-timeout", "2.5"]).header_read_timeout,
            Some(Duration::from_millis(2500))
        );
        assert_eq!(
            parsed(&["--header-read-timeout", "0"]).header_read_timeout,
            None
        );
    }

    #[test]
    fn rate_lockout_sets_the_lockout_and_zero_or_none_leaves_it_off() {
        assert_eq!(parsed(&[]).rate_lockout, None);
        assert_eq!(parsed(&["--rate-lockout", "0"]).rate_lockout, None);
        assert_eq!(
            parsed(&["--rate-lockout", "5"]).rate_lockout,
            Some(Duration::from_secs(5))
        );
        assert!(Args::try_parse_from(["kling-mock", "--rate-lockout", "soon"]).is_err());
    }

    #[test]
    fn slow_and_malformed_flags_set_their_faults_and_the_delay_keeps_its_default() {
        let faults = parsed(&[]).faults;
        assert_eq!((faults.slow_rate, faults.malformed_rate), (0.0, 0.0));
        assert_eq!(faults.slow_delay, Duration::from_secs(30));
        let faults = parsed(&[
            "--slow-rate",
            "0.2",
            "--slow-delay",
            "90.5",
            "--malformed-rate",
            "0.1",
        ])
        .faults;
        assert_eq!((faults.slow_rate, faults.malformed_rate), (0.2, 0.1));
        assert_eq!(faults.slow_delay, Duration::from_millis(90_500));
        let faults = parsed(&["--slow-rate", "1"]).faults;
        assert_eq!(faults.slow_rate, 1.0);
        assert_eq!(faults.slow_delay, Duration::from_secs(30));
        assert!(Args::try_parse_from(["kling-mock", "--slow-delay", "late"]).is_err());
    }

    #[test]
    fn a_pool_slots_value_without_a_pool_or_a_number_is_refused() {
        for bad in ["video", "=3", "video=many", "video=-1"] {
            let args = ["kling-mock", "--pool-slots", bad];
            assert!(Args::try_parse_from(args).is_err(), "{bad}");
        }
    }
}
