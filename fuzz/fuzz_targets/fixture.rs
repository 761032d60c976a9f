//! One appliance in process, per fuzzing thread: the demo model, a store in
//! a temporary folder, ephemeral ports; its HTTP router and a TCP core's
//! request handling are called directly.

use cartscore_appliance::app::{Running, build};
use cartscore_appliance::config::ApplianceConfig;
use cartscore_appliance::serve::tcp::FrameHandler;

// Each target uses the part it fuzzes.
#[allow(dead_code)]
pub struct Fixture {
    pub runtime: tokio::runtime::Runtime,
    pub frames: Option<FrameHandler>,
    pub router: axum::Router,
    _running: Running,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let models = dir.path().join("models");
        std::fs::create_dir_all(&models).expect("the model folder");
        let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/demo/model.onnx");
        std::fs::copy(demo, models.join("model.onnx")).expect("the demo bundle");
        let toml = format!(
            "[store]\npath = {store:?}\nmap_size_mib = 64\nsync = false\n\
             [model]\ndir = {models:?}\nwatch = false\n\
             [http]\nlisten = \"127.0.0.1:0\"\n\
             [tcp]\nlisten = \"127.0.0.1:0\"\ncores = 1\n",
            store = dir.path().join("store"),
        );
        let config = ApplianceConfig::from_toml_str(&toml).expect("the fixture's config");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let running = runtime
            .block_on(build(config))
            .expect("the appliance starts");
        Self {
            frames: running.frame_handler(),
            router: running.router(),
            runtime,
            _running: running,
            _dir: dir,
        }
    }
}

thread_local! {
    pub static FIXTURE: Fixture = Fixture::new();
}
