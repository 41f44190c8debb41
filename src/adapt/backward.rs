//! The backward pass of [`Network`]: hand-derived gradients for training. Inference needs only
//! the forward pass, which lives with the network.

use ndarray::{Array2, ArrayD, Axis};

use crate::network::{Batch, Layer, Network, Tape};

impl Network {
    /// Gradients of the loss for every parameter slot where `wanted[slot]` is true, given the
    /// loss gradient with respect to the logits.
    pub fn backward(&self, tape: &Tape, dlogits: &Array2<f32>, wanted: &[bool]) -> Vec<Option<ArrayD<f32>>> {
        let mut grads: Vec<Option<ArrayD<f32>>> = vec![None; self.params.len()];
        let (head_w, head_b) = self.head;
        if wanted[head_w] {
            grads[head_w] = Some(dlogits.t().dot(&tape.features).into_dyn());
        }
        if wanted[head_b] {
            grads[head_b] = Some(dlogits.sum_axis(Axis(0)).into_dyn());
        }
        // Walk back only as far as the earliest layer with something to train.
        let first_trained = self.layers.iter().position(|layer| self.layer_slots(layer).iter().any(|&s| wanted[s]));
        let Some(first_trained) = first_trained else { return grads };
        let mut upstream = dlogits.dot(&self.matrix(head_w));
        for index in (first_trained..self.layers.len()).rev() {
            let x = &tape.inputs[index];
            let need_input_grad = index > first_trained;
            upstream = match self.layers[index] {
                Layer::Affine { weight, bias } => {
                    if wanted[weight] {
                        grads[weight] = Some(upstream.t().dot(&x.data).into_dyn());
                    }
                    if wanted[bias] {
                        grads[bias] = Some(upstream.sum_axis(Axis(0)).into_dyn());
                    }
                    if need_input_grad { upstream.dot(&self.matrix(weight)) } else { upstream }
                }
                Layer::Act(act) => {
                    let mut dx = upstream;
                    dx.zip_mut_with(&x.data, |g, &v| *g *= act.derivative(v));
                    dx
                }
                Layer::GlobalAvgPool => unpool(&upstream, x.positions),
                Layer::Flatten => unflatten(&upstream, x.positions),
                Layer::Adapter { down, down_bias, up, act } => {
                    let pre = tape.adapter_pre[index].as_ref().expect("adapter layers record their pre-activation");
                    let hidden = pre.mapv(|v| act.apply(v));
                    if wanted[up] {
                        grads[up] = Some(upstream.t().dot(&hidden).into_dyn());
                    }
                    let mut dpre = upstream.dot(&self.matrix(up));
                    dpre.zip_mut_with(pre, |g, &v| *g *= act.derivative(v));
                    if wanted[down] {
                        grads[down] = Some(dpre.t().dot(&x.data).into_dyn());
                    }
                    if wanted[down_bias] {
                        grads[down_bias] = Some(dpre.sum_axis(Axis(0)).into_dyn());
                    }
                    if need_input_grad { upstream + dpre.dot(&self.matrix(down)) } else { upstream }
                }
            };
        }
        grads
    }

    /// For every parameter slot, the mean squared norm of the rows entering its layer on `input`.
    /// Step sizes divided by this are invariant to the scale of each layer's input.
    pub fn input_scales(&self, input: Batch) -> Vec<f32> {
        let mean_sq = |data: &Array2<f32>| {
            let rows = data.nrows().max(1) as f32;
            (data.iter().map(|v| v * v).sum::<f32>() / rows).max(1e-6)
        };
        let (_, tape) = self.forward(input);
        let mut scales = vec![1.0; self.params.len()];
        for (layer, x) in self.layers.iter().zip(&tape.inputs) {
            for slot in self.layer_slots(layer) {
                scales[slot] = mean_sq(&x.data);
            }
        }
        let features = mean_sq(&tape.features);
        scales[self.head.0] = features;
        scales[self.head.1] = features;
        scales
    }
}

fn unpool(grad: &Array2<f32>, positions: usize) -> Array2<f32> {
    let (samples, channels) = grad.dim();
    let scale = 1.0 / positions as f32;
    Array2::from_shape_fn((samples * positions, channels), |(row, c)| grad[[row / positions, c]] * scale)
}

fn unflatten(grad: &Array2<f32>, positions: usize) -> Array2<f32> {
    let (samples, width) = grad.dim();
    let channels = width / positions;
    Array2::from_shape_fn((samples * positions, channels), |(row, c)| {
        grad[[row / positions, c * positions + row % positions]]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapt::loss::cross_entropy;
    use crate::network::{Activation, Role, flatten};
    use ndarray::Ix2;
    use rand::{Rng, SeedableRng};

    fn random(shape: &[usize], rng: &mut rand_chacha::ChaCha8Rng, scale: f32) -> ArrayD<f32> {
        ArrayD::from_shape_simple_fn(ndarray::IxDyn(shape), || (rng.random::<f32>() * 2.0 - 1.0) * scale)
    }

    /// conv1x1 (3 -> 5 channels, 4 positions) -> act -> pool or flatten -> linear -> act ->
    /// adapter -> head (4 classes).
    fn network(spatial: Layer, act: Activation) -> Network {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let features_in = if spatial == Layer::Flatten { 20 } else { 5 };
        let params = vec![
            random(&[5, 3], &mut rng, 0.8),
            random(&[5], &mut rng, 0.3),
            random(&[6, features_in], &mut rng, 0.6),
            random(&[6], &mut rng, 0.3),
            random(&[2, 6], &mut rng, 0.7),
            random(&[2], &mut rng, 0.3),
            random(&[6, 2], &mut rng, 0.7),
            random(&[4, 6], &mut rng, 0.7),
            random(&[4], &mut rng, 0.3),
        ];
        Network {
            layers: vec![
                Layer::Affine { weight: 0, bias: 1 },
                Layer::Act(act),
                spatial,
                Layer::Affine { weight: 2, bias: 3 },
                Layer::Act(act),
                Layer::Adapter { down: 4, down_bias: 5, up: 6, act },
            ],
            head: (7, 8),
            roles: vec![
                Role::Tail,
                Role::Tail,
                Role::Tail,
                Role::Tail,
                Role::Adapter,
                Role::Adapter,
                Role::Adapter,
                Role::Head,
                Role::Head,
            ],
            params,
        }
    }

    fn input() -> Batch {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let data = random(&[3 * 4, 3], &mut rng, 1.5).into_dimensionality::<Ix2>().unwrap();
        Batch { data, positions: 4 }
    }

    fn loss(network: &Network, labels: &[usize]) -> f64 {
        cross_entropy(&network.logits(input()), labels).0 as f64
    }

    fn check_gradients(spatial: Layer, act: Activation, step: f32) {
        let labels = [1, 3, 0];
        let network = network(spatial, act);
        let (logits, tape) = network.forward(input());
        let (_, dlogits) = cross_entropy(&logits, &labels);
        let wanted = vec![true; network.params.len()];
        let grads = network.backward(&tape, &dlogits, &wanted);
        for (slot, grad) in grads.iter().enumerate() {
            let grad = grad.as_ref().expect("every slot was wanted");
            assert_eq!(grad.shape(), network.params[slot].shape());
            for index in 0..grad.len() {
                let mut plus = network.clone();
                plus.params[slot].as_slice_mut().unwrap()[index] += step;
                let mut minus = network.clone();
                minus.params[slot].as_slice_mut().unwrap()[index] -= step;
                let numeric = (loss(&plus, &labels) - loss(&minus, &labels)) / (2.0 * step as f64);
                let analytic = grad.as_slice().unwrap()[index] as f64;
                assert!(
                    (numeric - analytic).abs() < 2e-3 + 2e-2 * numeric.abs(),
                    "{spatial:?}/{act:?} slot {slot} index {index}: analytic {analytic} numeric {numeric}"
                );
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences_with_pooling() {
        check_gradients(Layer::GlobalAvgPool, Activation::Silu, 1e-2);
        check_gradients(Layer::GlobalAvgPool, Activation::Sigmoid, 1e-2);
    }

    #[test]
    fn gradients_match_finite_differences_with_flatten() {
        check_gradients(Layer::Flatten, Activation::Silu, 1e-2);
    }

    #[test]
    fn gradients_match_finite_differences_through_relu_kinks_away_from_the_kink() {
        // Piecewise-linear activations: finite differences agree wherever no unit sits within
        // one step of a kink, which a small step ensures for these seeds.
        check_gradients(Layer::GlobalAvgPool, Activation::Relu, 1e-3);
        check_gradients(Layer::Flatten, Activation::Relu6, 1e-3);
    }

    #[test]
    fn only_wanted_slots_get_gradients() {
        let network = network(Layer::GlobalAvgPool, Activation::Silu);
        let (logits, tape) = network.forward(input());
        let (_, dlogits) = cross_entropy(&logits, &[0, 1, 2]);
        let mut wanted = vec![false; network.params.len()];
        wanted[4] = true;
        let grads = network.backward(&tape, &dlogits, &wanted);
        assert!(grads.iter().enumerate().all(|(slot, g)| g.is_some() == (slot == 4)));
    }

    #[test]
    fn flatten_and_its_inverse_are_transposes() {
        let data = Array2::from_shape_fn((6, 4), |(r, c)| (r * 10 + c) as f32);
        let flat = flatten(&data, 3);
        assert_eq!(flat.dim(), (2, 12));
        assert_eq!(flat[[1, 2 * 3 + 1]], data[[3 + 1, 2]]);
        assert_eq!(unflatten(&flat, 3), data);
    }
}
