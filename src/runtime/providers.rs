//! Execution provider choice: which providers to try, in which order, and when to give up.
//!
//! The decision is pure; `session.rs` does the registration and reports what actually ran.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Tensorrt,
    Cuda,
    Cpu,
}

impl ProviderKind {
    pub fn is_gpu(self) -> bool {
        !matches!(self, ProviderKind::Cpu)
    }

    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::Tensorrt => "tensorrt",
            ProviderKind::Cuda => "cuda",
            ProviderKind::Cpu => "cpu",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The providers to try, in order, and the ones skipped with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderPlan {
    pub attempts: Vec<ProviderKind>,
    pub skipped: Vec<(ProviderKind, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    #[error("execution providers: the list is empty")]
    Empty,
    #[error("execution providers: '{0}' is listed twice")]
    Duplicate(ProviderKind),
    #[error("require_gpu = true but no GPU execution provider is usable: {0}")]
    NoGpu(String),
}

/// Orders the attempts. `available` tells whether the loaded ONNX Runtime build carries a provider.
///
/// Unless `require_gpu` is set, CPU is always the final fallback (appended if not listed), and
/// a skipped GPU provider is reported rather than fatal.
pub fn plan(
    requested: &[ProviderKind],
    available: impl Fn(ProviderKind) -> bool,
    require_gpu: bool,
) -> Result<ProviderPlan, ProviderError> {
    if requested.is_empty() {
        return Err(ProviderError::Empty);
    }
    for (index, kind) in requested.iter().enumerate() {
        if requested[..index].contains(kind) {
            return Err(ProviderError::Duplicate(*kind));
        }
    }
    let mut attempts = Vec::new();
    let mut skipped = Vec::new();
    for &kind in requested {
        if require_gpu && !kind.is_gpu() {
            skipped.push((kind, "require_gpu = true excludes the CPU".to_string()));
        } else if available(kind) {
            attempts.push(kind);
        } else {
            skipped.push((kind, "not available in this ONNX Runtime build".to_string()));
        }
    }
    if require_gpu {
        if attempts.is_empty() {
            let reasons = if requested.iter().any(|k| k.is_gpu()) {
                describe(&skipped)
            } else {
                "no GPU provider is listed".to_string()
            };
            return Err(ProviderError::NoGpu(reasons));
        }
    } else if !attempts.contains(&ProviderKind::Cpu) {
        attempts.push(ProviderKind::Cpu);
    }
    Ok(ProviderPlan { attempts, skipped })
}

pub fn describe(skipped: &[(ProviderKind, String)]) -> String {
    skipped.iter().map(|(kind, why)| format!("{kind}: {why}")).collect::<Vec<_>>().join("; ")
}

#[cfg(test)]
mod tests {
    use super::ProviderKind::*;
    use super::*;

    #[test]
    fn available_providers_are_tried_in_the_listed_order() {
        let plan = plan(&[Tensorrt, Cuda, Cpu], |_| true, false).unwrap();
        assert_eq!(plan.attempts, vec![Tensorrt, Cuda, Cpu]);
        assert!(plan.skipped.is_empty());
    }

    #[test]
    fn unavailable_gpu_providers_fall_back_to_cpu_and_say_why() {
        let plan = plan(&[Tensorrt, Cuda], |kind| kind == Cpu, false).unwrap();
        assert_eq!(plan.attempts, vec![Cpu]);
        assert_eq!(plan.skipped.len(), 2);
        assert!(plan.skipped[0].1.contains("not available"));
    }

    #[test]
    fn require_gpu_turns_a_missing_gpu_into_an_error() {
        let error = plan(&[Tensorrt, Cuda, Cpu], |kind| kind == Cpu, true).unwrap_err();
        let ProviderError::NoGpu(reasons) = &error else { panic!("{error:?}") };
        assert!(reasons.contains("tensorrt") && reasons.contains("cuda"), "{reasons}");
        assert_eq!(plan(&[Cpu], |_| true, true).unwrap_err(), ProviderError::NoGpu("no GPU provider is listed".into()));
    }

    #[test]
    fn require_gpu_never_adds_the_cpu() {
        let plan = plan(&[Cuda, Cpu], |_| true, true).unwrap();
        assert_eq!(plan.attempts, vec![Cuda]);
    }

    #[test]
    fn empty_and_duplicate_lists_are_refused() {
        assert_eq!(plan(&[], |_| true, false).unwrap_err(), ProviderError::Empty);
        assert_eq!(plan(&[Cuda, Cpu, Cuda], |_| true, false).unwrap_err(), ProviderError::Duplicate(Cuda));
    }
}
