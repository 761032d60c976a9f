//! Request payloads: a JSON template rendered into a set of variants up
//! front (so rendering costs nothing during a run), or the data set's carts.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use cartscore_core::{Event, EventType};
use clap::Args;

use crate::render::{Format, Renderer, load_events};

/// A cart of the demo's kind; `{session}` and `{seq}` are filled in.
pub const CART_TEMPLATE: &str = r#"{"event_time":"2019-10-01 09:00:00 UTC","event_type":"cart","product_id":1004856,"category_id":2053013555631882655,"category_code":"electronics.smartphone","brand":"samsung","price":130.76,"user_id":543272936,"user_session":"{session}"}"#;

#[derive(Debug, Clone, Args)]
pub struct RequestArgs {
    /// The request body: JSON text or `@FILE`. `{seq}` becomes the variant
    /// number and `{session}` a session id (`bench-N`, N < --sessions).
    /// Default: a cart event (for `/v1/score` and the TCP protocol).
    #[arg(long)]
    pub body: Option<String>,
    /// Use the cart events of this CSV (the data set) instead of a template.
    #[arg(long, conflicts_with = "body")]
    pub input: Option<PathBuf>,
    /// Distinct session ids the template cycles through.
    #[arg(long, default_value_t = 1_000)]
    pub sessions: u64,
    /// Distinct bodies rendered before the run.
    #[arg(long, default_value_t = 1_024)]
    pub variants: usize,
}

impl RequestArgs {
    /// The bodies a run cycles through.
    pub fn bodies(&self) -> Result<Vec<Vec<u8>>> {
        ensure!(self.variants > 0, "--variants must be positive");
        ensure!(self.sessions > 0, "--sessions must be positive");
        if let Some(path) = &self.input {
            let mut renderer = Renderer::new(Format::Flat);
            let carts: Vec<Vec<u8>> = load_events(path)?
                .iter()
                .filter(|e| e.event_type == EventType::Cart)
                .map(|e| renderer.render(e, &e.user_session, None))
                .collect();
            ensure!(!carts.is_empty(), "{} holds no cart events", path.display());
            return Ok(carts);
        }
        let template = match self.body.as_deref() {
            None => CART_TEMPLATE.to_owned(),
            Some(file) if file.starts_with('@') => std::fs::read_to_string(&file[1..])
                .with_context(|| format!("failed to read the body template {}", &file[1..]))?,
            Some(text) => text.to_owned(),
        };
        Ok((0..self.variants as u64)
            .map(|seq| {
                template
                    .replace("{seq}", &seq.to_string())
                    .replace("{session}", &format!("bench-{}", seq % self.sessions))
                    .into_bytes()
            })
            .collect())
    }

    /// The bodies as cart events, for the binary protocol.
    pub fn carts(&self) -> Result<Vec<Event>> {
        self.bodies()?
            .iter()
            .enumerate()
            .map(|(index, body)| {
                Event::from_json(body).with_context(|| {
                    format!(
                        "request body {index} is not a valid cart event: {}",
                        String::from_utf8_lossy(body)
                    )
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_template_renders_valid_carts_over_the_sessions() {
        let args = RequestArgs {
            body: None,
            input: None,
            sessions: 3,
            variants: 7,
        };
        let carts = args.carts().unwrap();
        assert_eq!(carts.len(), 7);
        assert_eq!(carts[4].user_session, "bench-1");
        assert!(carts.iter().all(|c| c.event_type == EventType::Cart));
    }

    #[test]
    fn a_template_that_is_not_a_cart_is_refused_for_tcp() {
        let args = RequestArgs {
            body: Some(r#"{"inputs":[]}"#.into()),
            input: None,
            sessions: 1,
            variants: 1,
        };
        assert_eq!(args.bodies().unwrap()[0], br#"{"inputs":[]}"#);
        let error = format!("{:#}", args.carts().unwrap_err());
        assert!(error.contains("not a valid cart event"), "{error}");
    }
}
