//! Learning-rate schedules with warmup, as transformers' `get_scheduler` defines them.
//! The rate for update k (0-based) is `lr · λ(k)`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    #[default]
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    pub fn lr(&self, step: u64) -> f64 {
        let (k, w, n) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        let factor = if step < self.warmup_steps {
            k / w.max(1.0)
        } else {
            let progress = (k - w) / (n - w).max(1.0);
            match self.kind {
                ScheduleKind::Constant => 1.0,
                ScheduleKind::Linear => ((n - k) / (n - w).max(1.0)).max(0.0),
                ScheduleKind::Cosine => {
                    (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
                }
            }
        };
        self.base_lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s = |kind| Schedule {
            kind,
            base_lr: 1.0,
            warmup_steps: 2,
            total_steps: 10,
        };
        let lin = s(ScheduleKind::Linear);
        assert_eq!([lin.lr(0), lin.lr(1), lin.lr(2)], [0.0, 0.5, 1.0]);
        assert!((lin.lr(6) - 0.5).abs() < 1e-12);
        assert_eq!(lin.lr(10), 0.0);
        let cos = s(ScheduleKind::Cosine);
        assert!((cos.lr(6) - 0.5).abs() < 1e-12);
        assert!(cos.lr(10).abs() < 1e-12);
        assert_eq!(s(ScheduleKind::Constant).lr(9), 1.0);
    }
}
