//! The systemd integration: the units pass `systemd-analyze verify` and
//! `security`, and the binary speaks sd_notify to a socket the test holds,
//! as systemd would (READY=1 only once a model serves, watchdog pings,
//! RELOADING/READY around SIGHUP, STOPPING on SIGTERM).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{Appliance, Options, deliver, demo_model, repo_root, trainer};

/// Messages received until `until` says stop or the timeout passes.
fn collect(socket: &UnixDatagram, timeout: Duration, until: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))
            .unwrap();
        match socket.recv(&mut buf) {
            Ok(n) => {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = until(&message);
                messages.push(message);
                if done {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    messages
}

#[test]
fn notifies_systemd_when_serving_and_pings_the_watchdog_while_alive() {
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let socket_path = work.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let mut options = Options {
        expect_no_model: true,
        ..Options::default()
    };
    options
        .env
        .push(("NOTIFY_SOCKET".into(), socket_path.display().to_string()));
    options.env.push(("WATCHDOG_USEC".into(), "600000".into()));
    let app = Appliance::start(work.path(), &models, &options);

    // Up, but no model: the watchdog runs, READY=1 must not come.
    let early = collect(&socket, Duration::from_millis(800), |_| false);
    assert!(
        early.iter().all(|m| !m.contains("READY=1")),
        "READY=1 before any model serves: {early:?}"
    );
    assert!(
        early.iter().any(|m| m.contains("WATCHDOG=1")),
        "no watchdog ping: {early:?}"
    );

    deliver(&models, "model.onnx", &std::fs::read(demo_model()).unwrap());
    let ready = collect(&socket, Duration::from_secs(20), |m| m.contains("READY=1"));
    let ready_message = ready.last().cloned().unwrap_or_default();
    assert!(
        ready_message.contains("READY=1"),
        "no READY=1 after the model arrived: {ready:?}\n{}",
        app.log()
    );
    assert!(
        ready_message.contains("STATUS=serving model demo-1"),
        "{ready_message}"
    );
    // Ready for systemd means ready for clients.
    assert_eq!(app.get("/readyz").0, 200);

    // 0.6 s watchdog: a ping every 0.3 s.
    let window = collect(&socket, Duration::from_millis(1_600), |_| false);
    let pings = window.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(pings >= 4, "{pings} watchdog pings in 1.6 s: {window:?}");

    app.signal("HUP");
    let reload = collect(&socket, Duration::from_secs(20), |m| m.contains("READY=1"));
    let reloading = reload.iter().position(|m| m.contains("RELOADING=1"));
    let ready_again = reload.iter().position(|m| m.contains("READY=1"));
    assert!(
        matches!((reloading, ready_again), (Some(r), Some(a)) if r < a),
        "SIGHUP should notify RELOADING=1 then READY=1: {reload:?}"
    );
    assert!(
        reload[reloading.unwrap()].contains("MONOTONIC_USEC="),
        "{reload:?}"
    );

    app.signal("TERM");
    let stopping = collect(&socket, Duration::from_secs(10), |m| {
        m.contains("STOPPING=1")
    });
    assert!(
        stopping.iter().any(|m| m.contains("STOPPING=1")),
        "{stopping:?}"
    );
    let (status, log) = app.stop();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("systemd watchdog enabled"), "{log}");
}

/// The units with the binaries of this build in place of /usr/local/bin.
fn units_for_this_build(dir: &Path) -> Vec<PathBuf> {
    let bin = crate::common::appliance_binary();
    let bin_dir = bin.parent().unwrap().display().to_string();
    let _ = trainer();
    [
        "cartscore.service",
        "cartscore-trainer.service",
        "cartscore-trainer.timer",
    ]
    .iter()
    .map(|name| {
        let text = std::fs::read_to_string(repo_root().join("systemd").join(name)).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text.replace("/usr/local/bin", &bin_dir)).unwrap();
        path
    })
    .collect()
}

#[test]
fn the_units_verify_and_the_service_is_hardened() {
    let work = tempfile::tempdir().unwrap();
    let units = units_for_this_build(work.path());
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .expect("systemd-analyze is part of systemd (scripts/test.sh installs it)");
    let complaints = String::from_utf8_lossy(&verify.stderr).into_owned();
    // Lines about the host's own units (it may not run systemd) are not ours.
    let ours: Vec<&str> = complaints
        .lines()
        .filter(|l| l.contains("cartscore"))
        .collect();
    assert!(
        verify.status.success() && ours.is_empty(),
        "systemd-analyze verify:\n{complaints}"
    );

    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&units[0])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&security.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no exposure level:\n{text}\n{}",
                String::from_utf8_lossy(&security.stderr)
            )
        });
    println!("{line}");
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unreadable: {line}"));
    assert!(
        score <= 2.0,
        "exposure {score} (want <= 2.0, \"OK\"):\n{text}"
    );
}

/// DWARF debug info among `sections` (`.debug_gdb_scripts` is not: it
/// names gdb's pretty-printers for Rust types and stays in the binary).
fn dwarf(sections: &[String]) -> Vec<&String> {
    sections
        .iter()
        .filter(|s| s.starts_with(".debug_") && *s != ".debug_gdb_scripts")
        .collect()
}

/// The ELF section names of `path`, from binutils' readelf.
fn sections(path: &Path) -> Vec<String> {
    let output = Command::new("readelf")
        .args(["-S", "-W"])
        .arg(path)
        .output()
        .expect("readelf (binutils) runs");
    assert!(output.status.success(), "readelf {}", path.display());
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let (_, rest) = line.split_once(']')?;
            rest.split_whitespace().next().map(str::to_owned)
        })
        .collect()
}

#[test]
fn installed_binaries_are_stripped_with_their_debug_info_kept_apart() {
    let built = crate::common::appliance_binary();
    // Every binary the script installs must be built (the test command
    // builds them all first).
    for name in ["cartscore-trainer", "cartscore-bench", "cartscore-producer"] {
        crate::common::binary(name);
    }
    let target = built.parent().and_then(Path::parent).unwrap();
    let root = tempfile::tempdir().unwrap();
    let output = Command::new("bash")
        .arg(repo_root().join("scripts/install-binaries.sh"))
        .env("DESTDIR", root.path())
        .env("CARGO_TARGET_DIR", target)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "install-binaries.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let installed = root.path().join("usr/local/bin/cartscore");
    let debug = root
        .path()
        .join("usr/lib/debug/usr/local/bin/cartscore.debug");
    let (built_sections, installed_sections) = (sections(&built), sections(&installed));
    // The build carries line tables; the installed binary does not, but it
    // keeps its symbols (names in panics and profiles) and a link to them.
    assert!(
        built_sections.iter().any(|s| s == ".debug_line"),
        "{built_sections:?}"
    );
    assert!(
        dwarf(&installed_sections).is_empty(),
        "{installed_sections:?}"
    );
    assert!(
        installed_sections.iter().any(|s| s == ".symtab"),
        "{installed_sections:?}"
    );
    assert!(
        installed_sections.iter().any(|s| s == ".gnu_debuglink"),
        "{installed_sections:?}"
    );
    assert!(sections(&debug).iter().any(|s| s == ".debug_line"));
    let (built_size, installed_size) = (
        std::fs::metadata(&built).unwrap().len(),
        std::fs::metadata(&installed).unwrap().len(),
    );
    assert!(
        installed_size * 2 < built_size,
        "{installed_size} bytes installed of {built_size} built"
    );
    let version = Command::new(&installed).arg("--version").output().unwrap();
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("cartscore "));
    for name in ["cartscore-trainer", "cartscore-bench", "cartscore-producer"] {
        let path = root.path().join("usr/local/bin").join(name);
        assert!(dwarf(&sections(&path)).is_empty(), "{name} is not stripped");
    }
}
