//! A new bundle's first minutes of service. The old bundle stays loaded beside it; if the new
//! one fails to classify (errors or non-finite outputs on a tenth of the images, at least three)
//! or the agent restarts before the minutes are up (a crash, a kill, a power loss), the device
//! switches back by itself. After them, the new bundle is in service.

use serde::{Deserialize, Serialize};

/// Failed classifications that switch back, if they are also [`FAILED_SHARE`] of all.
pub const MIN_FAILED: u64 = 3;
pub const FAILED_SHARE: f64 = 0.1;

/// A deployment on probation, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probation {
    pub transfer: String,
    pub bundle: String,
    pub previous_bundle: String,
    /// The previous bundle's folder under `bundles/`; `None`: the configured bundle.
    pub previous_dir: Option<String>,
    pub until_ms: i64,
}

/// What the new bundle did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Record {
    pub classified: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Continue,
    InService,
    SwitchBack(String),
}

pub fn judge(probation: &Probation, record: Record, now_ms: i64) -> Verdict {
    let total = record.classified + record.failed;
    if record.failed >= MIN_FAILED && record.failed as f64 >= FAILED_SHARE * total as f64 {
        return Verdict::SwitchBack(format!(
            "the new bundle failed on {} of {total} images in its first minutes of service",
            record.failed
        ));
    }
    if now_ms >= probation.until_ms { Verdict::InService } else { Verdict::Continue }
}

/// At start: a probation still recorded means the agent stopped before it ended.
pub fn at_start(probation: &Probation) -> Verdict {
    Verdict::SwitchBack(format!(
        "the agent restarted during bundle {}'s first minutes of service (a crash, a kill or a power loss)",
        probation.bundle
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probation() -> Probation {
        Probation {
            transfer: "t".into(),
            bundle: "new".into(),
            previous_bundle: "old".into(),
            previous_dir: None,
            until_ms: 1000,
        }
    }

    #[test]
    fn a_quiet_probation_ends_in_service_at_its_deadline() {
        let record = Record { classified: 50, failed: 0 };
        assert_eq!(judge(&probation(), record, 999), Verdict::Continue);
        assert_eq!(judge(&probation(), record, 1000), Verdict::InService);
        assert_eq!(judge(&probation(), Record::default(), 5000), Verdict::InService, "no traffic is no failure");
    }

    #[test]
    fn failures_switch_back_when_they_are_many_and_a_tenth() {
        assert_eq!(judge(&probation(), Record { classified: 0, failed: 2 }, 0), Verdict::Continue, "two");
        assert_eq!(judge(&probation(), Record { classified: 100, failed: 5 }, 0), Verdict::Continue, "5 %");
        let verdict = judge(&probation(), Record { classified: 20, failed: 3 }, 2000);
        assert_eq!(
            verdict,
            Verdict::SwitchBack("the new bundle failed on 3 of 23 images in its first minutes of service".into())
        );
    }

    #[test]
    fn a_restart_during_probation_switches_back() {
        assert!(matches!(at_start(&probation()), Verdict::SwitchBack(reason) if reason.contains("restarted")));
    }
}
