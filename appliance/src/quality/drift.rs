//! Feature drift: the serving model's scored rows, binned with its bundle's
//! data profile over a sliding window of the last `model.drift_window`
//! rows, against the training window's shares (and the scores against the
//! validation window's), as the population stability index. Fed by the
//! writer from the scored-cart records, so scoring pays nothing for it. A
//! bundle without a profile (made before profiles) reports no drift.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use cartscore_core::{DataProfile, FEATURE_COUNT};
use serde::Serialize;

use crate::model::{ModelRegistry, ServingModel};
use crate::ops::metrics::{FeatureLabels, Metrics};
use crate::store::CartRecord;

/// One row's slots: each feature's, then the score's.
type Slots = [u8; FEATURE_COUNT + 1];

/// The window of one model version.
#[derive(Debug)]
struct Window {
    model: Arc<ServingModel>,
    rows: VecDeque<Slots>,
    /// Per feature (then the score), rows per slot.
    counts: Vec<Vec<u64>>,
}

impl Window {
    fn new(model: Arc<ServingModel>, profile: &DataProfile) -> Self {
        let counts = profile
            .features
            .iter()
            .map(|f| &f.histogram)
            .chain([&profile.score])
            .map(|h| vec![0; h.slots()])
            .collect();
        Self {
            model,
            rows: VecDeque::new(),
            counts,
        }
    }
}

#[derive(Debug)]
pub struct DriftMonitor {
    capacity: usize,
    models: Arc<ModelRegistry>,
    window: Mutex<Option<Window>>,
}

/// The serving model's drift, for `GET /v1/model`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DriftReport {
    pub model_version: String,
    /// Scored rows in the window.
    pub rows: usize,
    /// Training-window rows the profile was made from.
    pub profile_rows: usize,
    /// Population stability index per feature, in contract order.
    pub features: Vec<FeatureDrift>,
    pub score_psi: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FeatureDrift {
    pub feature: String,
    pub psi: Option<f64>,
}

impl DriftMonitor {
    pub fn new(capacity: usize, models: Arc<ModelRegistry>) -> Self {
        Self {
            capacity,
            models,
            window: Mutex::default(),
        }
    }

    /// Adds the rows of the serving model's records; a new serving model
    /// starts a new window, and records of another version are left out.
    pub fn observe(&self, records: &[CartRecord]) {
        if records.is_empty() {
            return;
        }
        let mut guard = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let serving = self.models.current();
        let same = match (&*guard, &serving) {
            (Some(window), Some(model)) => Arc::ptr_eq(&window.model, model),
            _ => false,
        };
        if !same {
            *guard = serving.and_then(|model| {
                let profile = model.metadata.profile.clone()?;
                Some(Window::new(model, &profile))
            });
        }
        let Some(window) = guard.as_mut() else {
            return;
        };
        let Some(profile) = window.model.metadata.profile.as_ref() else {
            return;
        };
        let version = window.model.version();
        for record in records.iter().filter(|r| r.model_version == version) {
            let mut slots: Slots = [0; FEATURE_COUNT + 1];
            let histograms = profile.features.iter().map(|f| &f.histogram);
            let values = record.features.iter().chain([&record.probability]);
            for ((slot, histogram), &value) in slots
                .iter_mut()
                .zip(histograms.chain([&profile.score]))
                .zip(values)
            {
                // A checked profile has at most MAX_SLOTS slots.
                *slot = u8::try_from(histogram.slot(value)).unwrap_or(u8::MAX);
            }
            if window.rows.len() == self.capacity
                && let Some(oldest) = window.rows.pop_front()
            {
                for (counts, &slot) in window.counts.iter_mut().zip(&oldest) {
                    counts[usize::from(slot)] -= 1;
                }
            }
            for (counts, &slot) in window.counts.iter_mut().zip(&slots) {
                counts[usize::from(slot)] += 1;
            }
            window.rows.push_back(slots);
        }
    }

    /// The drift of the serving model's window; None before its first
    /// scored row or for a bundle without a profile.
    pub fn report(&self) -> Option<DriftReport> {
        let guard = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let window = guard.as_ref()?;
        let profile = window.model.metadata.profile.as_ref()?;
        let features = profile
            .features
            .iter()
            .zip(&window.counts)
            .map(|(feature, counts)| FeatureDrift {
                feature: feature.name.clone(),
                psi: feature.histogram.psi(counts),
            })
            .collect();
        Some(DriftReport {
            model_version: window.model.version().to_owned(),
            rows: window.rows.len(),
            profile_rows: profile.rows,
            features,
            score_psi: window
                .counts
                .last()
                .and_then(|counts| profile.score.psi(counts)),
        })
    }

    /// Sets the drift gauges from [`Self::report`]; without a report the
    /// series are removed, so no alert reads a previous model's drift.
    pub fn export(&self, metrics: &Metrics) -> Option<DriftReport> {
        let report = self.report();
        let drift = &metrics.drift;
        drift.feature_psi.clear();
        match &report {
            Some(report) => {
                drift.rows.set(report.rows as i64);
                for feature in &report.features {
                    if let Some(psi) = feature.psi {
                        drift
                            .feature_psi
                            .get_or_create(&FeatureLabels {
                                feature: feature.feature.clone(),
                            })
                            .set(psi);
                    }
                }
                drift.score_psi.set(report.score_psi.unwrap_or(f64::NAN));
            }
            None => {
                drift.rows.set(0);
                drift.score_psi.set(f64::NAN);
            }
        }
        report
    }
}
