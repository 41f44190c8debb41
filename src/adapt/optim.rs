//! SGD with momentum, decoupled-free (L2) weight decay and a cosine learning-rate schedule.
//!
//! Adam-style optimisers with default rates wreck unseen classes; SGD with momentum and a small,
//! input-scale-aware rate is the robust default.

use ndarray::ArrayD;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    pub momentum: f32,
    pub weight_decay: f32,
}

/// Optimiser state for the trained slots of a parameter list.
pub struct Sgd {
    config: SgdConfig,
    velocity: Vec<Option<ArrayD<f32>>>,
}

impl Sgd {
    pub fn new(config: SgdConfig, slots: usize) -> Sgd {
        Sgd { config, velocity: vec![None; slots] }
    }

    /// One update. `rates[slot]` is the step size for that slot at this step.
    pub fn step(&mut self, params: &mut [ArrayD<f32>], grads: &[Option<ArrayD<f32>>], rates: &[f32]) {
        for (slot, grad) in grads.iter().enumerate() {
            let Some(grad) = grad else { continue };
            let param = &mut params[slot];
            let mut update = grad.clone();
            if self.config.weight_decay != 0.0 {
                update.scaled_add(self.config.weight_decay, param);
            }
            let velocity = self.velocity[slot].get_or_insert_with(|| ArrayD::zeros(param.raw_dim()));
            velocity.zip_mut_with(&update, |v, &u| *v = self.config.momentum * *v + u);
            param.scaled_add(-rates[slot], velocity);
        }
    }
}

/// Cosine decay from 1 to 0 over `total` steps.
pub fn cosine(step: usize, total: usize) -> f32 {
    if total == 0 {
        return 1.0;
    }
    0.5 * (1.0 + (std::f32::consts::PI * step as f32 / total as f32).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn momentum_accumulates_and_weight_decay_pulls_towards_zero() {
        let mut params = vec![array![1.0f32, -2.0].into_dyn()];
        let grads = vec![Some(array![0.5f32, 0.5].into_dyn())];
        let mut sgd = Sgd::new(SgdConfig { momentum: 0.9, weight_decay: 0.0 }, 1);
        sgd.step(&mut params, &grads, &[0.1]);
        assert_eq!(params[0], array![0.95f32, -2.05].into_dyn());
        sgd.step(&mut params, &grads, &[0.1]);
        // velocity = 0.9 * 0.5 + 0.5 = 0.95
        assert!((params[0][[0]] - (0.95 - 0.095)).abs() < 1e-6);

        let mut params = vec![array![1.0f32].into_dyn()];
        let mut sgd = Sgd::new(SgdConfig { momentum: 0.0, weight_decay: 0.1 }, 1);
        sgd.step(&mut params, &[Some(array![0.0f32].into_dyn())], &[1.0]);
        assert!((params[0][[0]] - 0.9).abs() < 1e-6);
    }

    #[test]
    fn slots_without_gradients_are_left_alone() {
        let mut params = vec![array![1.0f32].into_dyn(), array![2.0f32].into_dyn()];
        let mut sgd = Sgd::new(SgdConfig { momentum: 0.9, weight_decay: 0.5 }, 2);
        sgd.step(&mut params, &[None, Some(array![1.0f32].into_dyn())], &[0.1, 0.1]);
        assert_eq!(params[0], array![1.0f32].into_dyn());
    }

    #[test]
    fn the_cosine_schedule_runs_from_one_to_zero() {
        assert_eq!(cosine(0, 100), 1.0);
        assert!((cosine(50, 100) - 0.5).abs() < 1e-6);
        assert!(cosine(100, 100).abs() < 1e-6);
    }
}
