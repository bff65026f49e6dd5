//! The chat-completions judge against a small scripted HTTP/1.1 server on 127.0.0.1.

use cnext_core::TaskId;
use cnext_datasets::errors::{ErrorType, Judge, JudgeCase, JudgeError};
use cnext_suite::judge::{parse_verdict, ChatJudge, JudgeConfig, JudgeConfigError};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// What the server does with one request.
#[derive(Clone)]
enum Reply {
    /// Status code and body.
    Http(u16, String),
    /// Sleeps (past the client's timeout), then answers HAL.
    Sleep(Duration),
}

fn ok(content: &str) -> Reply {
    let body = serde_json::json!({
        "choices": [{"message": {"role": "assistant", "content": content}}]
    });
    Reply::Http(200, body.to_string())
}

struct Request {
    head: String,
    body: String,
}

impl Request {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

struct Server {
    url: String,
    /// Connections accepted (attempts).
    attempts: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Request>>>,
}

/// Serves `replies[n]` to the n-th connection (the last one to all later ones).
fn serve(replies: Vec<Reply>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let attempts = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (a, r) = (attempts.clone(), requests.clone());
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let n = a.fetch_add(1, Ordering::SeqCst);
            let reply = replies[n.min(replies.len() - 1)].clone();
            let r = r.clone();
            thread::spawn(move || handle(stream, reply, &r));
        }
    });
    Server {
        url,
        attempts,
        requests,
    }
}

fn handle(mut stream: TcpStream, reply: Reply, requests: &Mutex<Vec<Request>>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut req = Request {
        head,
        body: String::new(),
    };
    let len: usize = req
        .header("content-length")
        .map_or(0, |v| v.parse().unwrap());
    while buf.len() < head_end + len {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    req.body = String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned();
    requests.lock().unwrap().push(req);
    let (status, body) = match reply {
        Reply::Http(s, b) => (s, b),
        Reply::Sleep(d) => {
            thread::sleep(d);
            (
                200,
                r#"{"choices":[{"message":{"content":"HAL"}}]}"#.to_string(),
            )
        }
    };
    let resp = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(resp.as_bytes());
}

fn references() -> Vec<String> {
    vec!["dark green".to_string(), "green".to_string()]
}

fn case(refs: &[String]) -> JudgeCase<'_> {
    JudgeCase {
        task: TaskId::Vqav2,
        instruction:
            "What color is the circle?\nAnswer the question using a single word or phrase.",
        prediction: "bright purple",
        references: refs,
    }
}

/// A fast config: no key unless `env` is set, short backoff.
fn config(url: &str, env: &str) -> JudgeConfig {
    JudgeConfig {
        api_key_env: env.to_string(),
        backoff: Duration::from_millis(10),
        ..JudgeConfig::new(url, "judge-model")
    }
}

#[test]
fn success_sends_the_case_and_the_key() {
    const SECRET: &str = "sk-test-secret-4711";
    let env = "CNEXT_JUDGE_TEST_KEY_SUCCESS";
    std::env::set_var(env, SECRET);
    let server = serve(vec![ok("HAL")]);
    let judge = ChatJudge::new(config(&format!("{}/v1", server.url), env)).unwrap();
    let refs = references();
    assert_eq!(judge.judge(&case(&refs)), Ok(ErrorType::Hal));
    assert_eq!(server.attempts.load(Ordering::SeqCst), 1);

    let requests = server.requests.lock().unwrap();
    let req = &requests[0];
    assert!(
        req.head
            .starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
        "{}",
        req.head
    );
    assert_eq!(
        req.header("authorization"),
        Some(format!("Bearer {SECRET}"))
    );
    let body: serde_json::Value = serde_json::from_str(&req.body).unwrap();
    assert_eq!(body["model"], "judge-model");
    assert_eq!(body["temperature"].as_f64(), Some(0.0));
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["role"], "system");
    let prompt = messages[0]["content"].as_str().unwrap();
    for word in ["IUF", "HAL", "OTH", "If both IUF and HAL apply, answer IUF"] {
        assert!(prompt.contains(word), "{word}");
    }
    assert_eq!(messages[1]["role"], "user");
    let user = messages[1]["content"].as_str().unwrap();
    for part in [
        "vqav2",
        "What color is the circle?",
        "bright purple",
        "dark green",
    ] {
        assert!(user.contains(part), "{part} not in {user}");
    }

    let name = judge.name();
    let port = server.url.rsplit(':').next().unwrap();
    assert_eq!(name, format!("judge-model @ 127.0.0.1:{port}"));
    let debug = format!("{judge:?}");
    assert!(debug.contains("<redacted>"), "{debug}");
    for shown in [&name, &debug] {
        assert!(
            !shown.contains(SECRET) && !shown.contains("4711"),
            "{shown}"
        );
    }
}

#[test]
fn no_key_no_authorization_and_endpoint_forms() {
    let server = serve(vec![ok("iuf.")]);
    let env = "CNEXT_JUDGE_TEST_KEY_NEVER_SET";
    let refs = references();
    for url in [
        format!("{}/v1/", server.url),
        format!("{}/v1/chat/completions", server.url),
    ] {
        let judge = ChatJudge::new(config(&url, env)).unwrap();
        assert!(judge.endpoint().ends_with("/v1/chat/completions"));
        assert_eq!(judge.judge(&case(&refs)), Ok(ErrorType::Iuf));
        assert!(!format!("{judge:?}").contains("<redacted>"));
    }
    let requests = server.requests.lock().unwrap();
    for req in requests.iter() {
        assert!(req.head.starts_with("POST /v1/chat/completions "));
        assert_eq!(req.header("authorization"), None);
    }
}

#[test]
fn verdict_parsing() {
    for (s, t) in [
        ("IUF", ErrorType::Iuf),
        (" hal\n", ErrorType::Hal),
        ("Oth.", ErrorType::Oth),
        ("\"HAL\"", ErrorType::Hal),
        ("**iuf**", ErrorType::Iuf),
    ] {
        assert_eq!(parse_verdict(s), Ok(t), "{s}");
    }
    for s in [
        "",
        "HALL",
        "IUF HAL",
        "I think it is a hallucination",
        "HAL: wrong",
    ] {
        assert!(
            matches!(parse_verdict(s), Err(JudgeError::Format(_))),
            "{s}"
        );
    }
}

#[test]
fn malformed_answers_are_format_errors_without_retry() {
    let refs = references();
    for reply in [
        ok("I think it is a hallucination"),
        Reply::Http(200, "<html>not json</html>".into()),
        Reply::Http(200, r#"{"choices":[]}"#.into()),
    ] {
        let server = serve(vec![reply]);
        let judge = ChatJudge::new(config(&server.url, "CNEXT_JUDGE_TEST_KEY_NEVER_SET")).unwrap();
        match judge.judge(&case(&refs)) {
            Err(JudgeError::Format(m)) => assert!(m.len() < 120, "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(server.attempts.load(Ordering::SeqCst), 1);
    }
}

#[test]
fn timeouts_are_retried_then_reported() {
    let server = serve(vec![Reply::Sleep(Duration::from_secs(3))]);
    let cfg = JudgeConfig {
        timeout: Duration::from_millis(300),
        retries: 2,
        ..config(&server.url, "CNEXT_JUDGE_TEST_KEY_NEVER_SET")
    };
    let judge = ChatJudge::new(cfg).unwrap();
    let refs = references();
    let start = Instant::now();
    assert_eq!(judge.judge(&case(&refs)), Err(JudgeError::Timeout));
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_eq!(server.attempts.load(Ordering::SeqCst), 3);
}

#[test]
fn server_errors_are_retried() {
    let refs = references();
    let err = |s| Reply::Http(s, r#"{"error":"busy"}"#.to_string());
    let server = serve(vec![err(500), err(429), ok("OTH")]);
    let judge = ChatJudge::new(config(&server.url, "CNEXT_JUDGE_TEST_KEY_NEVER_SET")).unwrap();
    assert_eq!(judge.judge(&case(&refs)), Ok(ErrorType::Oth));
    assert_eq!(server.attempts.load(Ordering::SeqCst), 3);

    let server = serve(vec![err(500)]);
    let judge = ChatJudge::new(config(&server.url, "CNEXT_JUDGE_TEST_KEY_NEVER_SET")).unwrap();
    assert_eq!(judge.judge(&case(&refs)), Err(JudgeError::Status(500)));
    assert_eq!(server.attempts.load(Ordering::SeqCst), 3);

    let server = serve(vec![err(400)]);
    let judge = ChatJudge::new(config(&server.url, "CNEXT_JUDGE_TEST_KEY_NEVER_SET")).unwrap();
    assert_eq!(judge.judge(&case(&refs)), Err(JudgeError::Status(400)));
    assert_eq!(server.attempts.load(Ordering::SeqCst), 1);
}

#[test]
fn unreachable_server_is_a_transport_error() {
    const SECRET: &str = "sk-test-secret-0815";
    let env = "CNEXT_JUDGE_TEST_KEY_TRANSPORT";
    std::env::set_var(env, SECRET);
    // A port that was just free: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let judge = ChatJudge::new(config(&format!("http://127.0.0.1:{port}"), env)).unwrap();
    let refs = references();
    match judge.judge(&case(&refs)) {
        Err(JudgeError::Transport(m)) => {
            assert!(!m.contains(SECRET), "{m}");
            assert!(!m.contains("127.0.0.1"), "URL in {m}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_configs_are_refused() {
    let bad = |url: &str, model: &str| ChatJudge::new(JudgeConfig::new(url, model)).unwrap_err();
    assert!(matches!(bad("not a url", "m"), JudgeConfigError::Url(_)));
    assert!(matches!(
        bad("ftp://127.0.0.1/v1", "m"),
        JudgeConfigError::Url(_)
    ));
    let e = bad("http://user:hunter2@127.0.0.1/v1", "m");
    assert!(matches!(e, JudgeConfigError::Url(_)));
    assert!(!e.to_string().contains("hunter2"));
    assert_eq!(bad("http://127.0.0.1/v1", " "), JudgeConfigError::Model);
    let cfg = JudgeConfig {
        timeout: Duration::ZERO,
        ..JudgeConfig::new("http://127.0.0.1/v1", "m")
    };
    assert_eq!(ChatJudge::new(cfg).unwrap_err(), JudgeConfigError::Timeout);
    let d = JudgeConfig::new("http://h/v1", "m");
    assert_eq!(
        (d.api_key_env.as_str(), d.timeout, d.retries),
        ("CNEXT_JUDGE_API_KEY", Duration::from_secs(30), 2)
    );
}
