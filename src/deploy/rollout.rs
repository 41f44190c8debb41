//! `fleet deploy`'s decisions, apart from the broker: which devices get the bundle next
//! (the canaries first, alone; then the rest in waves) and when the rollout stops (a canary
//! failed, or K devices did). A device's part ends when it is in service past its probation,
//! or when it refused, failed or switched back.

use std::collections::BTreeMap;

use serde::Serialize;

/// How one device's deployment ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", content = "detail", rename_all = "snake_case")]
pub enum Outcome {
    InService,
    Failed(String),
    /// Never started: the rollout stopped first.
    Skipped,
}

#[derive(Debug, Clone)]
pub struct Rollout {
    order: Vec<String>,
    canaries: usize,
    wave: usize,
    max_failures: usize,
    started: usize,
    outcomes: BTreeMap<String, Outcome>,
    stopped: Option<String>,
}

impl Rollout {
    /// `canaries` devices first (at least one), then waves of `wave` devices; stops after
    /// `max_failures` failed devices (at least one).
    pub fn new(devices: &[String], canaries: usize, wave: usize, max_failures: usize) -> Result<Rollout, String> {
        let mut seen = std::collections::BTreeSet::new();
        if let Some(twice) = devices.iter().find(|d| !seen.insert(d.as_str())) {
            return Err(format!("device '{twice}' is listed twice"));
        }
        if devices.is_empty() {
            return Err("no devices to deploy to".into());
        }
        if wave == 0 || max_failures == 0 {
            return Err("--parallel and --max-failures must be at least 1".into());
        }
        Ok(Rollout {
            order: devices.to_vec(),
            canaries: canaries.clamp(1, devices.len()),
            wave,
            max_failures,
            started: 0,
            outcomes: BTreeMap::new(),
            stopped: None,
        })
    }

    /// The devices to start now, once the previous wave has ended; empty when the rollout is
    /// over (done or stopped).
    pub fn next_wave(&mut self) -> Vec<String> {
        if self.stopped.is_some() || self.started > self.outcomes.len() {
            return Vec::new();
        }
        let size = if self.started == 0 { self.canaries } else { self.wave };
        let end = (self.started + size).min(self.order.len());
        let wave = self.order[self.started..end].to_vec();
        self.started = end;
        wave
    }

    pub fn is_canary(&self, device: &str) -> bool {
        self.order[..self.canaries].iter().any(|d| d == device)
    }

    /// Records how `device` ended; a canary's failure, or the K-th failure, stops the rollout.
    pub fn record(&mut self, device: &str, outcome: Outcome) {
        if let Outcome::Failed(reason) = &outcome {
            if self.stopped.is_none() && self.is_canary(device) {
                self.stopped = Some(format!("canary {device} failed: {reason}"));
            }
            let failures = self.failures() + 1;
            if self.stopped.is_none() && failures >= self.max_failures {
                self.stopped = Some(format!("{failures} devices failed (--max-failures {})", self.max_failures));
            }
        }
        self.outcomes.insert(device.to_string(), outcome);
    }

    fn failures(&self) -> usize {
        self.outcomes.values().filter(|o| matches!(o, Outcome::Failed(_))).count()
    }

    /// Why the rollout stopped early, if it did.
    pub fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }

    /// Every device's outcome, those never started as skipped, in the order given.
    pub fn outcomes(&self) -> Vec<(String, Outcome)> {
        self.order.iter().map(|d| (d.clone(), self.outcomes.get(d).cloned().unwrap_or(Outcome::Skipped))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("d{i}")).collect()
    }

    /// Runs a rollout where `fails` says which devices fail; the waves it started.
    fn drive(rollout: &mut Rollout, fails: impl Fn(&str) -> bool) -> Vec<Vec<String>> {
        let mut waves = Vec::new();
        loop {
            let wave = rollout.next_wave();
            if wave.is_empty() {
                return waves;
            }
            for device in &wave {
                let outcome = if fails(device) { Outcome::Failed("x".into()) } else { Outcome::InService };
                rollout.record(device, outcome);
            }
            waves.push(wave);
        }
    }

    #[test]
    fn canaries_go_alone_then_the_rest_in_waves() {
        let mut rollout = Rollout::new(&devices(7), 2, 3, 1).unwrap();
        let waves = drive(&mut rollout, |_| false);
        assert_eq!(waves, vec![vec!["d0", "d1"], vec!["d2", "d3", "d4"], vec!["d5", "d6"]]);
        assert!(rollout.outcomes().iter().all(|(_, o)| *o == Outcome::InService));
        assert_eq!(rollout.stopped(), None);
    }

    #[test]
    fn a_failed_canary_keeps_the_bundle_from_every_other_device() {
        let mut rollout = Rollout::new(&devices(5), 2, 10, 3).unwrap();
        let waves = drive(&mut rollout, |d| d == "d1");
        assert_eq!(waves.len(), 1, "no wave after the canaries");
        assert_eq!(rollout.stopped(), Some("canary d1 failed: x"));
        let skipped: Vec<_> = rollout.outcomes().into_iter().filter(|(_, o)| *o == Outcome::Skipped).collect();
        assert_eq!(skipped.len(), 3);
    }

    #[test]
    fn the_rollout_stops_after_k_failures() {
        let mut rollout = Rollout::new(&devices(10), 1, 2, 2).unwrap();
        let waves = drive(&mut rollout, |d| d == "d2" || d == "d4");
        assert_eq!(waves.last().unwrap(), &vec!["d3", "d4"], "the wave in which the second failed is the last");
        assert_eq!(rollout.stopped(), Some("2 devices failed (--max-failures 2)"));
        assert_eq!(rollout.outcomes()[5].1, Outcome::Skipped);
    }

    #[test]
    fn a_wave_waits_for_the_one_before_it() {
        let mut rollout = Rollout::new(&devices(3), 1, 5, 1).unwrap();
        assert_eq!(rollout.next_wave(), vec!["d0"]);
        assert!(rollout.next_wave().is_empty(), "the canary has not ended");
        rollout.record("d0", Outcome::InService);
        assert_eq!(rollout.next_wave(), vec!["d1", "d2"]);
    }

    #[test]
    fn bad_lists_are_refused() {
        assert!(Rollout::new(&[], 1, 1, 1).unwrap_err().contains("no devices"));
        assert!(Rollout::new(&["a".into(), "a".into()], 1, 1, 1).unwrap_err().contains("listed twice"));
        assert!(Rollout::new(&devices(2), 1, 0, 1).is_err());
        assert!(Rollout::new(&devices(2), 0, 1, 1).unwrap().is_canary("d0"), "at least one canary");
    }
}
