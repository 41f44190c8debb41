//! The console in a real browser (Debian's Chromium through chromedriver): sign in over TLS,
//! label 20 queued traffic images with one key press each, see a forged CSRF token and an
//! expired session refused on the page, start a run and see its verdict and chart, roll back
//! to the source, then check the store and the events. It also reports
//! how long the grid of 200 thumbnails takes to load.
//!
//! Without Chromium the test skips and says why, except under CI (`CI=true`), where it fails.
//! `EDGEADAPT_SCREENSHOTS=DIR` saves a screenshot of each view there (docs/console.md uses them).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, free_port, http, write_config};
use common::{repo, skipped, wait_until};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const PASSWORD: &str = "correct horse battery";
/// Classes of the site's traffic, 50 images each.
const SITE_CLASSES: [&str; 4] = ["A", "B", "C", "D"];

/// A chromedriver process, ended when dropped.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn edgeadapt(config: &Path, args: &[&str], input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn test_image(class: &str, n: usize) -> PathBuf {
    let path = repo().join("target/data/fonts36/target/test").join(class).join(format!("{n}.png"));
    assert!(path.is_file(), "run tools/setup.sh first: {} is missing", path.display());
    path
}

/// Waits, with a deadline, for `probe` to give a value, polling the browser.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(started.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn attribute(browser: &Client, css: &str, name: &str) -> Option<String> {
    browser.find(Locator::Css(css)).await.ok()?.attr(name).await.ok()?
}

async fn text(browser: &Client, css: &str) -> String {
    match browser.find(Locator::Css(css)).await {
        Ok(element) => element.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn click(browser: &Client, css: &str) {
    let element = eventually(css, Duration::from_secs(30), || async {
        let element = browser.find(Locator::Css(css)).await.ok()?;
        (element.is_displayed().await.ok()? && element.is_enabled().await.ok()?).then_some(element)
    })
    .await;
    element.click().await.unwrap();
}

/// Waits for a view to have loaded its data.
async fn ready(browser: &Client, view: &str) {
    eventually(&format!("{view} to be ready"), Duration::from_secs(30), || async {
        (attribute(browser, view, "data-state").await.as_deref() == Some("ready")).then_some(())
    })
    .await;
}

async fn screenshot(browser: &Client, name: &str) {
    let Some(dir) = std::env::var_os("EDGEADAPT_SCREENSHOTS") else { return };
    let png = browser.screenshot().await.unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(Path::new(&dir).join(format!("{name}.png")), png).unwrap();
}

/// The names of the kept traffic images by id, read over the API with a session of our own.
fn names_by_id(site: u16, cert: &Path) -> HashMap<i64, String> {
    let pem = std::fs::read(cert).unwrap();
    let cert = ureq::tls::Certificate::from_pem(&pem).unwrap();
    let roots = ureq::tls::RootCerts::Specific(std::sync::Arc::new(vec![cert]));
    let tls = ureq::tls::TlsConfig::builder().root_certs(roots).build();
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).tls_config(tls).build().into();
    let url = |path: &str| format!("https://localhost:{site}{path}");
    let mut login =
        agent.post(url("/console/api/login")).send_json(json!({ "user": "ana", "password": PASSWORD })).unwrap();
    assert_eq!(login.status(), 200, "{:?}", login.body_mut().read_to_string());
    let cookie = login.headers().get("set-cookie").unwrap().to_str().unwrap().split(';').next().unwrap().to_string();
    let mut listed = agent.get(url("/console/api/traffic?limit=1000")).header("cookie", &cookie).call().unwrap();
    let body: Value = listed.body_mut().read_json().unwrap();
    body["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["id"].as_i64().unwrap(), i["name"].as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn site_staff_sign_in_label_by_keyboard_adapt_and_roll_back_in_a_browser() {
    if !(Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists()) {
        let reason = format!("no browser: {CHROMIUM} and {CHROMEDRIVER} are needed (Debian: chromium chromium-driver)");
        assert!(std::env::var("CI").as_deref() != Ok("true"), "under CI the browser test must run: {reason}");
        return skipped(&reason);
    }
    let dir = tempfile::tempdir().unwrap();
    let (port, site, driver_port) = (free_port(), free_port(), free_port());
    let config = write_config(
        dir.path(),
        port,
        // A gate that passes anything, so the run makes a version to promote and roll back.
        &format!(
            "[console]\nlisten = \"127.0.0.1:{site}\"\n[adaptation]\nmethod = \"ft-tail+alg\"\n\
             [gate]\nmax_seen_drop = 1.0\nmax_unseen_rate_drop = 1.0\nmax_reference_drop = 1.0\n"
        ),
    );
    let added = edgeadapt(&config, &["console", "add-user", "ana"], &format!("{PASSWORD}\n"));
    assert!(added.status.success(), "{added:?}");
    let daemon = Daemon::start(&config, port, &dir.path().join("daemon.log"));

    // The site's traffic: 200 images of four classes, classified through the HTTP API.
    let client = http();
    for n in 0..50 {
        for class in SITE_CLASSES {
            let bytes = std::fs::read(test_image(class, n)).unwrap();
            let url = daemon.url(&format!("/v1/classify?name={class}-{n}.png"));
            assert_eq!(client.post(url).send(&bytes[..]).unwrap().status(), 200);
        }
    }
    let cert = dir.path().join("data/console/tls-cert.pem");
    let names = wait_until(Duration::from_secs(60), "200 kept images", || {
        let names = names_by_id(site, &cert);
        (names.len() == 200).then_some(names)
    });

    let driver = Driver(
        Command::new(CHROMEDRIVER)
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let report = runtime.block_on(async {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("acceptInsecureCerts".into(), json!(true));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,1000"],
            }),
        );
        let webdriver = format!("http://127.0.0.1:{driver_port}");
        let browser = eventually("chromedriver to start a session", Duration::from_secs(60), || async {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            ClientBuilder::new(connector).capabilities(capabilities.clone()).connect(&webdriver).await.ok()
        })
        .await;
        let outcome = drive(&browser, site, &names).await;
        let _ = browser.close().await;
        outcome
    });
    drop(driver);
    eprintln!("console: {report}");

    // The store and the events say who did what.
    let conn = rusqlite::Connection::open(dir.path().join("data/store.db")).unwrap();
    let by_ana: i64 = conn
        .query_row("SELECT COUNT(*) FROM samples WHERE origin = 'console' AND labelled_by = 'ana'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(by_ana, 20, "every key press stored one sample, by the user who pressed it");
    let wrong: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM samples s JOIN traffic_images t ON t.sample = s.id WHERE t.name NOT LIKE s.class || '-%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(wrong, 0, "each image got the class its key named");
    let events = |kind: &str| -> Vec<Value> {
        let mut statement = conn.prepare("SELECT payload FROM events WHERE kind = ?1 ORDER BY id").unwrap();
        statement
            .query_map([kind], |r| r.get::<_, String>(0))
            .unwrap()
            .map(|p| serde_json::from_str(&p.unwrap()).unwrap())
            .collect()
    };
    assert_eq!(events("sample.ingested").iter().filter(|e| e["user"] == "ana").count(), 20);
    let started = events("adaptation.started");
    assert_eq!(started.len(), 1);
    assert_eq!((started[0]["origin"].as_str(), started[0]["user"].as_str()), (Some("console"), Some("ana")));
    assert_eq!(events("version.promoted").len(), 1);
    let rollback = events("version.rollback");
    assert_eq!(rollback.len(), 1);
    assert_eq!(rollback[0]["to"], 0);
    let serving: String = conn.query_row("SELECT value FROM state WHERE key = 'promoted'", [], |r| r.get(0)).unwrap();
    assert_eq!(serving, "0", "the source model is served again");
    daemon.stop();
}

async fn sign_in(browser: &Client) {
    let user = browser.find(Locator::Css("#login-user")).await.unwrap();
    user.clear().await.unwrap();
    user.send_keys("ana").await.unwrap();
    browser.find(Locator::Css("#login-password")).await.unwrap().send_keys(PASSWORD).await.unwrap();
    click(browser, "#login-submit").await;
    eventually("signing in", Duration::from_secs(30), || async {
        (attribute(browser, "body", "data-session").await.as_deref() == Some("signed-in")).then_some(())
    })
    .await;
}

/// The queue's current image and the class its name says.
async fn current(browser: &Client, names: &HashMap<i64, String>) -> (i64, String) {
    let id: i64 = eventually("a queued image", Duration::from_secs(30), || async {
        attribute(browser, "#current-image", "data-id").await?.parse().ok()
    })
    .await;
    (id, names[&id].split('-').next().unwrap().to_string())
}

/// A forged CSRF token, then an expired session: each key press is refused with a message on
/// the page and labels nothing (the store's count is checked after the run).
async fn refusals_change_nothing(browser: &Client, names: &HashMap<i64, String>) {
    let body = browser.find(Locator::Css("body")).await.unwrap();
    let (id, class) = current(browser, names).await;
    let token = browser.execute("const t = state.session.csrf; state.session.csrf = 'forged'; return t;", vec![]);
    let token = token.await.unwrap();
    body.send_keys(&class).await.unwrap();
    let message = eventually("the CSRF refusal on the page", Duration::from_secs(30), || async {
        let message = text(browser, "#message-text").await;
        message.contains("CSRF").then_some(message)
    })
    .await;
    assert!(message.contains(&format!("image {id}")) && message.contains("nothing was changed"), "{message}");
    assert_eq!(text(browser, "#labelled-count").await, "20", "the refused press labelled nothing");
    assert_eq!(current(browser, names).await.0, id, "the refused image is still the one to label");
    browser.execute("state.session.csrf = arguments[0];", vec![token]).await.unwrap();

    // The session cookie gone, as after the idle expiry: the sign-in form says so.
    browser.delete_all_cookies().await.unwrap();
    body.send_keys(&class).await.unwrap();
    let notice = eventually("the expired-session notice", Duration::from_secs(30), || async {
        let notice = text(browser, "#message-text").await;
        (attribute(browser, "body", "data-session").await.as_deref() == Some("login") && notice.contains("expired"))
            .then_some(notice)
    })
    .await;
    assert!(notice.contains("sign in again"), "{notice}");
    sign_in(browser).await;
}

/// Everything done in the browser; a line for the report.
async fn drive(browser: &Client, site: u16, names: &HashMap<i64, String>) -> String {
    let base = format!("https://localhost:{site}/console/");
    browser.goto(&base).await.unwrap();
    eventually("the sign-in form", Duration::from_secs(30), || async {
        (attribute(browser, "body", "data-session").await.as_deref() == Some("login")).then_some(())
    })
    .await;
    screenshot(browser, "sign-in").await;
    sign_in(browser).await;

    // The grid of 200 thumbnails, as the page measures it.
    let grid_ms: f64 = eventually("the traffic grid to load", Duration::from_secs(60), || async {
        attribute(browser, "body", "data-grid-loaded-ms").await?.parse().ok()
    })
    .await;
    let figures = browser.find_all(Locator::Css("#traffic-grid figure")).await.unwrap().len();
    assert_eq!(figures, 200);
    screenshot(browser, "label").await;

    // Twenty images from the queue, one key press each: the key is the class name.
    let body = browser.find(Locator::Css("body")).await.unwrap();
    let started = Instant::now();
    for press in 0..20 {
        let (id, class) = current(browser, names).await;
        body.send_keys(&class).await.unwrap();
        eventually(&format!("press {press}: the next image"), Duration::from_secs(30), || async {
            let now = attribute(browser, "#current-image", "data-id").await;
            let count = text(browser, "#labelled-count").await;
            (now.as_deref() != Some(&id.to_string()) && count.contains(&(press + 1).to_string())).then_some(())
        })
        .await;
    }
    let labelling = started.elapsed();
    refusals_change_nothing(browser, names).await;

    // A run, its verdict and the per-class chart.
    click(browser, "#nav-classes").await;
    eventually("the classes view", Duration::from_secs(30), || async {
        (attribute(browser, "#view-classes", "data-state").await.as_deref() == Some("ready")).then_some(())
    })
    .await;
    screenshot(browser, "classes").await;
    click(browser, "#nav-adapt").await;
    ready(browser, "#view-adapt").await;
    click(browser, "#start-adapt").await;
    click(browser, "#confirm-yes").await;
    let verdict = eventually("the gate's verdict", Duration::from_secs(600), || async {
        let verdict = text(browser, "#verdict").await;
        verdict.starts_with("Promoted").then_some(verdict)
    })
    .await;
    let bars = browser.find_all(Locator::Css("#per-class-chart rect")).await.unwrap().len();
    assert!(bars >= 4, "the chart shows before and after for the seen classes ({bars} bars); verdict: {verdict}");
    let health = browser.find_all(Locator::Css("#health-chart rect")).await.unwrap().len();
    assert!(health >= 2, "the health indicators are charted ({health} bars)");
    screenshot(browser, "adapt").await;

    // Back to the source model, after a confirmation.
    click(browser, "#nav-versions").await;
    ready(browser, "#view-versions").await;
    click(browser, "#rollback-source").await;
    click(browser, "#confirm-yes").await;
    eventually("the source model served", Duration::from_secs(60), || async {
        text(browser, "#serving-line").await.contains("source").then_some(())
    })
    .await;
    screenshot(browser, "versions").await;
    click(browser, "#nav-device").await;
    eventually("the device view", Duration::from_secs(30), || async {
        (attribute(browser, "#view-device", "data-state").await.as_deref() == Some("ready")).then_some(())
    })
    .await;
    screenshot(browser, "device").await;
    format!(
        "grid of {figures} thumbnails loaded in {grid_ms:.0} ms; 20 labels by keyboard in {:.1} s; verdict: {}",
        labelling.as_secs_f64(),
        verdict.lines().next().unwrap_or("")
    )
}
