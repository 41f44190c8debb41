//! The console's API against a running agent: recent traffic with predictions and thumbnails,
//! the label-next queue, labelling by id with the user recorded, and the refusals (wrong host,
//! no session, forged CSRF token, unknown class, duplicate, an image no longer kept) that
//! change nothing.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::daemon::{Daemon, free_port, http, write_config};
use common::{repo, wait_until};
use serde_json::Value;

fn image(class: &str, n: usize) -> PathBuf {
    let path = repo().join("target/data/fonts36/target/test").join(class).join(format!("{n}.png"));
    assert!(path.is_file(), "run tools/setup.sh first: {} is missing", path.display());
    path
}

/// A signed-in console client: the session cookie and its CSRF token.
struct Console {
    agent: ureq::Agent,
    base: String,
    cookie: String,
    csrf: String,
}

impl Console {
    fn sign_in(daemon: &Daemon) -> Console {
        let agent = http();
        let mut response = agent.get(daemon.url("/console/api/session")).call().unwrap();
        assert_eq!(response.status(), 200);
        let set_cookie = response.headers().get("set-cookie").unwrap().to_str().unwrap().to_string();
        assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"), "{set_cookie}");
        let cookie = set_cookie.split(';').next().unwrap().to_string();
        let body: Value = response.body_mut().read_json().unwrap();
        assert_eq!(body["user"], "local");
        assert_eq!(body["classes"].as_array().unwrap().len(), 36);
        let csrf = body["csrf"].as_str().unwrap().to_string();
        Console { agent, base: daemon.url(""), cookie, csrf }
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let mut response =
            self.agent.get(format!("{}{path}", self.base)).header("cookie", &self.cookie).call().unwrap();
        (response.status().as_u16(), response.body_mut().read_json().unwrap_or(Value::Null))
    }

    fn post_with(&self, path: &str, body: Value, csrf: &str) -> (u16, Value) {
        let mut response = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .header("x-csrf-token", csrf)
            .send_json(body)
            .unwrap();
        (response.status().as_u16(), response.body_mut().read_json().unwrap_or(Value::Null))
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.post_with(path, body, &self.csrf.clone())
    }
}

fn samples_in_store(data: &std::path::Path) -> Vec<(String, Option<String>)> {
    let conn = rusqlite::Connection::open(data.join("store.db")).unwrap();
    let mut statement = conn.prepare("SELECT class, labelled_by FROM samples ORDER BY id").unwrap();
    statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?))).unwrap().map(Result::unwrap).collect()
}

#[test]
fn site_staff_label_recent_traffic_by_id_and_every_refusal_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let daemon = Daemon::start(&config, port, &dir.path().join("daemon.log"));
    let client = http();
    // Traffic: twelve images classified through the HTTP API.
    let classes = ["A", "B", "C", "D"];
    for class in classes {
        for n in 0..3 {
            let bytes = std::fs::read(image(class, n)).unwrap();
            let url = daemon.url(&format!("/v1/classify?name={class}-{n}.png"));
            assert_eq!(client.post(url).send(&bytes[..]).unwrap().status(), 200);
        }
    }
    let console = Console::sign_in(&daemon);
    let images = wait_until(Duration::from_secs(30), "twelve recent images with thumbnails", || {
        let (status, body) = console.get("/console/api/traffic?limit=200");
        assert_eq!(status, 200, "{body}");
        let images = body["images"].as_array().cloned().unwrap_or_default();
        (images.len() == 12 && images.iter().all(|i| i["has_thumbnail"] == true)).then_some(images)
    });
    assert_eq!(images[0]["name"], "D-2.png", "newest first");
    assert!(images.iter().all(|i| i["top"].as_array().unwrap().len() == 5 && i["predicted"].is_string()));
    let id = |name: &str| images.iter().find(|i| i["name"] == name).unwrap()["id"].as_i64().unwrap();

    // The page and its pictures: no inline script, a policy on every answer, images by id.
    let mut page = client.get(daemon.url("/console/")).call().unwrap();
    let policy = page.headers().get("content-security-policy").unwrap().to_str().unwrap().to_string();
    assert!(policy.contains("script-src 'self'") && !policy.contains("unsafe-inline"), "{policy}");
    let html = page.body_mut().read_to_string().unwrap();
    assert!(!html.contains("<script>") && html.contains("app.js"), "scripts come from files only");
    let thumbnail = client
        .get(daemon.url(&format!("/console/api/traffic/{}/thumbnail", id("A-0.png"))))
        .header("cookie", &console.cookie)
        .call()
        .unwrap();
    assert_eq!(thumbnail.headers().get("content-type").unwrap(), "image/jpeg");

    // Nobody has labelled anything: every class is short of labels.
    let (status, queue) = console.get("/console/api/queue?limit=50");
    assert_eq!(status, 200);
    let queued = queue["queue"].as_array().unwrap();
    assert!(
        !queued.is_empty() && queued.iter().all(|q| q["reason"] == "class_short" && q["likely"].is_string()),
        "{queue}"
    );

    // Refusals, each leaving the store as it was.
    let target = format!("/console/api/traffic/{}/label", id("A-0.png"));
    let wrong_host = client
        .get(daemon.url("/console/api/traffic"))
        .header("host", "attacker.example")
        .header("cookie", &console.cookie)
        .call()
        .unwrap();
    assert_eq!(wrong_host.status(), 421, "DNS rebinding: a foreign host name is refused");
    let no_session = client.get(daemon.url("/console/api/traffic")).call().unwrap();
    assert_eq!(no_session.status(), 401);
    let (status, body) = console.post_with(&target, serde_json::json!({ "class": "A" }), "forged");
    assert_eq!(status, 403, "{body}");
    let (status, body) = console.post(&target, serde_json::json!({ "class": "a-letter" }));
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("unknown class"), "{body}");
    let (status, body) = console.post("/console/api/traffic/999999/label", serde_json::json!({ "class": "A" }));
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("no longer kept"), "{body}");
    assert!(samples_in_store(&dir.path().join("data")).is_empty());

    // A label, then the same image again.
    let (status, body) = console.post(&target, serde_json::json!({ "class": "A" }));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sample"]["class"], "A");
    let (status, body) = console.post(&target, serde_json::json!({ "class": "A" }));
    assert_eq!(status, 409, "{body}");
    let (status, _) = console.post(&format!("/console/api/traffic/{}/skip", id("B-0.png")), serde_json::json!({}));
    assert_eq!(status, 200);
    assert_eq!(samples_in_store(&dir.path().join("data")), vec![("A".to_string(), Some("local".to_string()))]);
    let (_, body) = console.get("/console/api/traffic?unlabelled=true");
    let open: Vec<&str> = body["images"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(open.len(), 10, "the labelled and the skipped image leave the open list: {open:?}");
    let (_, classes) = console.get("/console/api/classes");
    let a = classes["classes"].as_array().unwrap().iter().find(|c| c["class"] == "A").unwrap().clone();
    assert_eq!((a["train"].as_u64(), a["missing"].as_u64()), (Some(1), Some(2)));

    // The label is recorded like any other, with who made it.
    let conn = rusqlite::Connection::open(dir.path().join("data/store.db")).unwrap();
    let payload: String =
        conn.query_row("SELECT payload FROM events WHERE kind = 'sample.ingested'", [], |row| row.get(0)).unwrap();
    let payload: Value = serde_json::from_str(&payload).unwrap();
    assert_eq!((payload["origin"].as_str(), payload["user"].as_str()), (Some("console"), Some("local")));

    // Signed out, the session no longer works.
    let (status, _) = console.post("/console/api/logout", serde_json::json!({}));
    assert_eq!(status, 200);
    assert_eq!(console.get("/console/api/traffic").0, 401);
    daemon.stop();
}

/// An HTTPS client that trusts only `cert` (the console's self-signed certificate).
fn https(cert: &std::path::Path) -> ureq::Agent {
    let pem = std::fs::read(cert).unwrap();
    let cert = ureq::tls::Certificate::from_pem(&pem).unwrap();
    let tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![cert]))).build();
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .tls_config(tls)
        .build()
        .into()
}

#[test]
fn the_site_network_gets_the_console_over_tls_with_sign_in_and_a_lockout() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let site = free_port();
    let config = write_config(
        dir.path(),
        port,
        &format!("[console]\nlisten = \"127.0.0.1:{site}\"\nlockout_failures = 3\nlockout_minutes = 1\n"),
    );
    let edgeadapt = |args: &[&str], input: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    // Without a user the agent refuses to open the console to the site network.
    let refused = edgeadapt(&["run"], "");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("console add-user"), "{refused:?}");
    let added = edgeadapt(&["console", "add-user", "ana"], "correct horse battery\n");
    assert!(added.status.success(), "{added:?}");

    let daemon = Daemon::start(&config, port, &dir.path().join("daemon.log"));
    let cert = dir.path().join("data/console/tls-cert.pem");
    wait_until(Duration::from_secs(30), "the console's certificate", || cert.is_file().then_some(()));
    let shown = edgeadapt(&["console", "show"], "");
    let fingerprint = String::from_utf8_lossy(&shown.stdout).to_string();
    assert!(fingerprint.contains("ana") && fingerprint.matches(':').count() >= 31, "{fingerprint}");
    let client = https(&cert);
    let url = |path: &str| format!("https://localhost:{site}{path}");
    wait_until(Duration::from_secs(30), "the site listener", || client.get(url("/console/")).call().ok());

    // Sign-in is needed, even for the page's session call.
    let mut session = client.get(url("/console/api/session")).call().unwrap();
    assert_eq!(session.status(), 401);
    assert_eq!(session.body_mut().read_json::<Value>().unwrap()["login"], true);
    let login = |password: &str| {
        client
            .post(url("/console/api/login"))
            .send_json(serde_json::json!({ "user": "ana", "password": password }))
            .unwrap()
    };
    assert_eq!(login("wrong password 1").status(), 401);
    let mut signed_in = login("correct horse battery");
    assert_eq!(signed_in.status(), 200);
    let cookie = signed_in.headers().get("set-cookie").unwrap().to_str().unwrap().to_string();
    assert!(cookie.contains("Secure") && cookie.contains("HttpOnly"), "{cookie}");
    let body: Value = signed_in.body_mut().read_json().unwrap();
    assert_eq!(body["user"], "ana");
    let cookie = cookie.split(';').next().unwrap().to_string();
    let mut classes = client.get(url("/console/api/classes")).header("cookie", &cookie).call().unwrap();
    assert_eq!(classes.status(), 200, "{:?}", classes.body_mut().read_to_string());

    // Three failures lock the name, and then even the right password is refused.
    for n in 0..3 {
        assert_eq!(login(&format!("guess {n} of many")).status(), 401);
    }
    let locked = login("correct horse battery");
    assert_eq!(locked.status(), 429);
    assert!(locked.headers().get("retry-after").is_some());
    // The loopback endpoint now asks for sign-in too, since users exist.
    let loopback = http().get(daemon.url("/console/api/session")).call().unwrap();
    assert_eq!(loopback.status(), 401);
    daemon.stop();
}

#[test]
fn the_device_view_shows_whether_the_fleet_link_is_up() {
    let link = |mqtt: &str| -> Value {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = write_config(dir.path(), port, mqtt);
        let daemon = Daemon::start(&config, port, &dir.path().join("daemon.log"));
        let console = Console::sign_in(&daemon);
        let (state, link) = wait_until(Duration::from_secs(30), "the link's first verdict", || {
            let (status, body) = console.get("/console/api/device");
            assert_eq!(status, 200, "{body}");
            let link = body["fleet"]["link"].clone();
            let state = link["state"].as_str().unwrap_or("none").to_string();
            (state != "connecting").then_some((state, link))
        });
        daemon.stop();
        assert!(link["since_ms"].as_i64().is_some_and(|t| t > 0) || state == "none", "{link}");
        link
    };
    assert_eq!(link(""), Value::Null, "no fleet link, no state");
    let up = link(&format!("[mqtt]\nenabled = true\nembedded_listen = \"127.0.0.1:{}\"\n", free_port()));
    assert_eq!(up["state"], "connected", "{up}");
    // Nothing listens on a port just found free.
    let closed = free_port();
    let down =
        link(&format!("[mqtt]\nenabled = true\nbroker = \"mqtt://127.0.0.1:{closed}\"\nreconnect_min_ms = 100\n"));
    assert_eq!(down["state"], "unreachable", "{down}");
    assert!(down["error"].as_str().is_some_and(|e| !e.is_empty()), "the reason is shown: {down}");
}
