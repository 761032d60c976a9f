//! The HTTP API, the KServe V2 endpoints and the binary protocol against the
//! real binary, including every kind of bad input.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::common::{Appliance, Options, cart_json, view_json};
use cartscore_core::{FEATURE_COUNT, TractModel};
use cartscore_protocol::client::TcpClient;
use cartscore_protocol::{self as protocol, Status};

fn env(pairs: &[(&str, &str)]) -> Options {
    Options {
        env: pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Options::default()
    }
}

#[test]
fn json_api_scores_ingests_and_explains() {
    let work = tempfile::tempdir().unwrap();
    let models = crate::common::model_dir_with_demo(work.path());
    let app = Appliance::start(work.path(), &models, &Options::default());

    // Unknown session: scored from the cart alone.
    let (status, cold) = app.post("/v1/score", cart_json("s1", 60, 11, 100.0));
    assert_eq!(status, 200, "{cold}");
    assert_eq!(cold["session_known"], false);
    assert_eq!(cold["model_version"], "demo-1");
    assert!(cold.get("features").is_none());

    // Two views (array form) and one more (JSON lines), one invalid item.
    let lines = format!(
        "[{},{}]",
        view_json("s1", 0, 11, 100.0),
        view_json("s1", 10, 12, 50.0)
    );
    let (status, body) = app.post("/v1/events", lines);
    assert_eq!((status, body["applied"].as_u64()), (200, Some(2)), "{body}");
    let jsonl = format!(
        "{}\n{{\"event_type\":\"view\"}}\n\n{}\n",
        view_json("s1", 20, 11, 100.0),
        view_json("s2", 20, 11, 100.0)
    );
    let (status, body) = app.post("/v1/events", jsonl);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["applied"].as_u64(), body["rejected"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(body["errors"][0]["index"], 1);
    assert_eq!(body["errors"][0]["code"], "missing_field");

    let (status, warm) = app.post("/v1/score?explain=true", cart_json("s1", 60, 11, 100.0));
    assert_eq!(status, 200, "{warm}");
    assert_eq!(warm["session_known"], true);
    assert_eq!(warm["features"]["session_views"], 3.0);
    assert_eq!(warm["features"]["product_views_in_session"], 2.0);
    assert_eq!(warm["features"]["session_distinct_products"], 2.0);
    assert_eq!(warm["features"].as_object().unwrap().len(), FEATURE_COUNT);
    assert_ne!(warm["probability"], cold["probability"]);

    // Scoring does not change state: the same request gives the same answer.
    let (_, again) = app.post("/v1/score?explain=true", cart_json("s1", 60, 11, 100.0));
    assert_eq!(again, warm);

    // Batch with a bad item.
    let batch = format!(
        r#"{{"events":[{},{},{}]}}"#,
        cart_json("s1", 60, 11, 100.0),
        r#"{"event_type":"cart"}"#,
        view_json("s1", 60, 11, 100.0)
    );
    let (status, body) = app.post("/v1/score", batch);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["probability"], warm["probability"]);
    assert_eq!(body["results"][1]["error"]["code"], "missing_field");
    assert_eq!(body["results"][2]["error"]["code"], "not_a_cart_event");

    // The feature service.
    let (status, session) = app.get("/v1/sessions/s1?product_id=11&price=100");
    assert_eq!(status, 200, "{session}");
    assert_eq!(session["session"]["views"], 3);
    assert_eq!(session["session"]["events"], 3);
    assert_eq!(session["user"]["sessions"], 2);
    assert_eq!(session["features"]["product_views_in_session"], 2.0);
    for id in ["nope".to_owned(), "x".repeat(600)] {
        let (status, missing) = app.get(&format!("/v1/sessions/{id}"));
        assert_eq!(
            (status, missing["error"]["code"].as_str()),
            (404, Some("session_not_found"))
        );
    }

    // Model, health, metrics.
    let (status, model) = app.get("/v1/model");
    assert_eq!(status, 200);
    assert_eq!(model["model"]["evaluator"], "compiled");
    assert_eq!(model["last_reload"]["result"], "loaded");
    assert_eq!(app.get("/healthz").0, 200);
    assert_eq!(app.get("/readyz").1["ready"], true);
    let metrics = app.get_text("/metrics");
    for name in [
        "cartscore_http_requests_total{",
        "cartscore_http_request_duration_seconds_bucket{le=\"0.00001\"",
        "cartscore_model_info{",
        "cartscore_model_reloads_total{outcome=\"loaded\"}",
        "cartscore_store_used_bytes",
        "cartscore_live_sessions 2",
        "cartscore_events_invalid_total{source=\"http\",reason=\"missing_field\"} 1",
        "cartscore_events_applied_total{source=\"http\"} 4",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
}

#[test]
fn bad_http_input_gets_json_errors_and_the_server_stays_up() {
    let work = tempfile::tempdir().unwrap();
    let models = crate::common::model_dir_with_demo(work.path());
    let app = Appliance::start(
        work.path(),
        &models,
        &env(&[
            ("CARTSCORE_HTTP__MAX_BODY_BYTES", "4096"),
            ("CARTSCORE_HTTP__MAX_BATCH", "2"),
            ("CARTSCORE_HTTP__ADMIN_TOKEN", "s3cret"),
        ]),
    );
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/score", "{not json".into(), 400, "malformed_json"),
        ("/v1/score", String::new(), 400, "malformed_json"),
        (
            "/v1/score",
            r#"{"event_type":"cart"}"#.into(),
            422,
            "missing_field",
        ),
        (
            "/v1/score",
            cart_json("s", 0, 1, 1.0).replace("\"cart\"", "\"buy\""),
            422,
            "unknown_event_type",
        ),
        (
            "/v1/score",
            cart_json("s", 0, 1, -5.0),
            422,
            "negative_price",
        ),
        (
            "/v1/score",
            view_json("s", 0, 1, 5.0),
            422,
            "not_a_cart_event",
        ),
        (
            "/v1/score?explain=maybe",
            cart_json("s", 0, 1, 1.0),
            400,
            "bad_query",
        ),
        (
            "/v1/score",
            format!("{{\"events\":[{0},{0},{0}]}}", cart_json("s", 0, 1, 1.0)),
            413,
            "batch_too_large",
        ),
        (
            "/v1/score",
            format!("{{\"pad\":\"{}\"}}", "x".repeat(5000)),
            413,
            "body_too_large",
        ),
        ("/v1/events", "[1,2".into(), 400, "malformed_json"),
        ("/nope", "{}".into(), 404, "not_found"),
        ("/admin/reload", String::new(), 401, "unauthorized"),
    ];
    for (path, body, status, code) in cases {
        let (got, response) = app.post(path, &body);
        assert_eq!(got, status, "{path} {body:.60}: {response}");
        assert_eq!(
            response["error"]["code"], code,
            "{path} {body:.60}: {response}"
        );
        assert!(
            response["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let (status, body) = app.get("/v1/score");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    let (status, body) = app.post_with("/admin/reload", "", &[("Authorization", "Bearer wrong")]);
    assert_eq!(status, 401, "{body}");
    let (status, body) = app.post_with("/admin/reload", "", &[("Authorization", "Bearer s3cret")]);
    assert_eq!(
        (status, body["report"]["result"].as_str()),
        (200, Some("unchanged")),
        "{body}"
    );
    // Invalid events are counted by reason.
    assert!(app.metric("cartscore_http_requests_total{route=\"/v1/score\",status=\"422\"}") >= 4.0);
    assert_eq!(app.get("/readyz").0, 200);
}

#[test]
fn kserve_v2_protocol_matches_tract() {
    let work = tempfile::tempdir().unwrap();
    let models = crate::common::model_dir_with_demo(work.path());
    let app = Appliance::start(work.path(), &models, &Options::default());
    assert_eq!(app.get("/v2/health/live").1["live"], true);
    assert_eq!(app.get("/v2/health/ready").1["ready"], true);
    let (status, meta) = app.get("/v2/models/cartscore");
    assert_eq!(status, 200);
    assert_eq!(meta["inputs"][0]["shape"][1], FEATURE_COUNT);
    assert_eq!(app.get("/v2/models/cartscore/ready").0, 200);
    assert_eq!(app.get("/v2/models/other").0, 404);

    let tract = TractModel::load(&crate::common::demo_model()).unwrap();
    let rows: Vec<f32> = tract
        .metadata
        .golden_vectors
        .iter()
        .take(2)
        .flat_map(|g| g.features.clone())
        .collect();
    let expected = tract.predict(&rows).unwrap();
    // Nested data, as many clients send it.
    let nested: Vec<&[f32]> = rows.chunks(FEATURE_COUNT).collect();
    let request = serde_json::json!({
        "id": "r1",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [2, FEATURE_COUNT], "data": nested}],
    });
    let (status, body) = app.post("/v2/models/cartscore/infer", request.to_string());
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], "r1");
    assert_eq!(body["outputs"][0]["shape"], serde_json::json!([2, 1]));
    for (i, want) in expected.iter().enumerate() {
        let got = body["outputs"][0]["data"][i].as_f64().unwrap();
        assert!(
            (got - f64::from(*want)).abs() <= 1e-6,
            "row {i}: {got} vs {want}"
        );
    }
    for bad in [
        serde_json::json!({"inputs": []}),
        serde_json::json!({"inputs": [{"name": "features", "datatype": "INT64", "shape": [1, FEATURE_COUNT], "data": rows[..FEATURE_COUNT]}]}),
        serde_json::json!({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}),
        serde_json::json!({"inputs": [{"name": "features", "datatype": "FP32", "shape": [2, FEATURE_COUNT], "data": rows[..FEATURE_COUNT]}]}),
        serde_json::json!({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, FEATURE_COUNT], "data": ["a"]}]}),
    ] {
        let (status, body) = app.post("/v2/models/cartscore/infer", bad.to_string());
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].as_str().is_some(), "{body}");
    }
}

fn cart_event(session: &str) -> cartscore_core::Event {
    cartscore_core::Event::from_json(crate::common::cart_json(session, 30, 11, 100.0).as_bytes())
        .unwrap()
}

#[test]
fn binary_protocol_pipelines_and_survives_bad_frames() {
    let work = tempfile::tempdir().unwrap();
    let models = crate::common::model_dir_with_demo(work.path());
    let app = Appliance::start(work.path(), &models, &Options::default());
    app.post("/v1/events", crate::common::view_json("t1", 0, 11, 100.0));

    let mut client = TcpClient::connect(app.tcp).unwrap();
    client.set_timeout(Some(Duration::from_secs(10))).unwrap();
    let one = client.score(&cart_event("t1")).unwrap();
    assert_eq!(
        (one.status, one.session_known),
        (Status::Ok, true),
        "{}",
        one.message
    );
    let (_, http) = app.post("/v1/score", crate::common::cart_json("t1", 30, 11, 100.0));
    assert_eq!(
        one.probability,
        http["probability"].as_f64().unwrap() as f32
    );

    // 1000 pipelined requests, answered in order.
    let ids: Vec<u64> = (0..1000).map(|_| client.send(&cart_event("t1"))).collect();
    client.flush().unwrap();
    for id in ids {
        let response = client.recv().unwrap();
        assert_eq!((response.request_id, response.status), (id, Status::Ok));
        assert_eq!(response.probability, one.probability);
    }

    // An invalid event gets an error response; the connection stays usable.
    let mut bad = cart_event("t1");
    bad.price = f64::NAN;
    let response = client.score(&bad).unwrap();
    assert_eq!(response.status, Status::InvalidEvent);
    assert!(response.message.contains("price"), "{}", response.message);
    assert_eq!(client.score(&cart_event("t1")).unwrap().status, Status::Ok);

    // Malformed frames: an error frame, then the server closes the connection.
    let mut valid = Vec::new();
    protocol::encode_request(&mut valid, 5, &cart_event("t1"));
    let mut wrong_version = valid.clone();
    wrong_version[4] = 9;
    let mut wrong_lengths = valid.clone();
    wrong_lengths[56] = wrong_lengths[56].wrapping_add(3);
    let huge = [0xff, 0xff, 0xff, 0x7f, 1, 1];
    for (frame, status) in [
        (wrong_version.as_slice(), Status::UnsupportedVersion),
        (wrong_lengths.as_slice(), Status::MalformedFrame),
        (&huge[..], Status::MalformedFrame),
    ] {
        let mut stream = TcpStream::connect(app.tcp).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(frame).unwrap();
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).unwrap();
        let (response, used) = protocol::parse_response(&reply).unwrap().unwrap();
        assert_eq!(response.status, status, "{}", response.message);
        assert_eq!(
            used,
            reply.len(),
            "nothing after the error frame: the connection closed"
        );
    }
    assert!(app.metric("cartscore_tcp_frame_errors_total{reason=\"length_mismatch\"}") >= 1.0);
    // Still serving.
    let mut fresh = TcpClient::connect(app.tcp).unwrap();
    assert_eq!(fresh.score(&cart_event("t1")).unwrap().status, Status::Ok);
    assert!(app.metric("cartscore_tcp_requests_total{outcome=\"ok\"}") >= 1003.0);
}

#[test]
fn epoll_driver_serves_the_same() {
    let work = tempfile::tempdir().unwrap();
    let models = crate::common::model_dir_with_demo(work.path());
    let app = Appliance::start(
        work.path(),
        &models,
        &env(&[("CARTSCORE_TCP__DRIVER", "epoll")]),
    );
    assert!(
        app.log().contains("driver=\"epoll\"") || app.log().contains("epoll"),
        "{}",
        app.log()
    );
    let mut client = TcpClient::connect(app.tcp).unwrap();
    let response = client.score(&cart_event("e1")).unwrap();
    assert_eq!(response.status, Status::Ok);
    let (_, http) = app.post("/v1/score", crate::common::cart_json("e1", 30, 11, 100.0));
    assert_eq!(
        response.probability,
        http["probability"].as_f64().unwrap() as f32
    );
}
