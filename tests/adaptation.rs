//! Adaptation methods on a synthetic problem with a known answer: a Gaussian mixture whose
//! target domain is the source domain shifted by one vector shared by all classes. Training the
//! tail on two of four classes should learn (part of) the shift and so help the unseen classes
//! too; naive head fine-tuning should sink them.

use edgeadapt::adapt::data::SplitSet;
use edgeadapt::adapt::gate::GateConfig;
use edgeadapt::adapt::method::{AdaptInput, Adapted, Hyper, Method, Traffic, adapt};
use edgeadapt::adapt::train::{AdaptError, TrainConfig, train};
use edgeadapt::network::{Layer, Network, Role};
use half::f16;
use ndarray::{Array1, Array2, ArrayD, Axis};
use rand::{Rng, SeedableRng};

const DIM: usize = 6;
const CLASSES: usize = 4;

fn means() -> Array2<f32> {
    let mut means = Array2::zeros((CLASSES, DIM));
    for c in 0..CLASSES {
        means[[c, c]] = 3.0;
    }
    means
}

/// Moves class 0 towards class 1 and class 2 towards class 3: both seen and unseen classes
/// suffer, and subtracting the shift is the right adaptation for all of them.
fn shift() -> Array1<f32> {
    Array1::from(vec![-1.5, 1.5, -1.5, 1.5, 0.0, 0.0])
}

/// Samples of `classes`, drawn around the class means plus `offset`.
fn samples(classes: &[usize], per_class: usize, offset: &Array1<f32>, seed: u64) -> SplitSet {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut normal = move || {
        let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    };
    let means = means();
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    for &class in classes {
        for _ in 0..per_class {
            for d in 0..DIM {
                rows.push(f16::from_f32(means[[class, d]] + offset[d] + 0.7 * normal()));
            }
            labels.push(class);
        }
    }
    SplitSet { data: Array2::from_shape_vec((labels.len(), DIM), rows).unwrap(), positions: 1, labels }
}

/// Tail: identity linear layer. Head: nearest-mean scoring `z_c = μ_c·x − |μ_c|²/2`.
fn source_network() -> Network {
    let means = means();
    let bias: Array1<f32> = means.axis_iter(Axis(0)).map(|m| -0.5 * m.dot(&m)).collect();
    Network {
        layers: vec![Layer::Affine { weight: 0, bias: 1 }],
        head: (2, 3),
        params: vec![
            Array2::<f32>::eye(DIM).into_dyn(),
            ArrayD::zeros(ndarray::IxDyn(&[DIM])),
            means.into_dyn(),
            bias.into_dyn(),
        ],
        roles: vec![Role::Tail, Role::Tail, Role::Head, Role::Head],
    }
}

fn accuracy(model: &Adapted, set: &SplitSet) -> f32 {
    let logits = model.logits_of(set);
    let correct = logits
        .axis_iter(Axis(0))
        .zip(&set.labels)
        .filter(|(row, label)| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 == **label)
        .count();
    correct as f32 / set.len() as f32
}

struct Problem {
    source: Network,
    seen_data: SplitSet,
    teacher: Array2<f32>,
    unlabelled: Traffic,
    test_seen: SplitSet,
    test_unseen: SplitSet,
}

fn problem() -> Problem {
    let source = source_network();
    let seen_data = samples(&[0, 1], 150, &shift(), 1);
    let as_source = Adapted { network: source.clone(), gamma: 0.0, unseen: vec![2, 3], notes: vec![] };
    let teacher = as_source.logits_of(&seen_data);
    Problem {
        unlabelled: Traffic::new(samples(&[0, 1, 2, 3], 60, &shift(), 2), &source),
        test_seen: samples(&[0, 1], 200, &shift(), 3),
        test_unseen: samples(&[2, 3], 200, &shift(), 4),
        source,
        seen_data,
        teacher,
    }
}

fn hyper() -> Hyper {
    Hyper {
        steps: 150,
        batch_size: 32,
        threads: 2,
        tail_rate: 0.5,
        recommended_rates: vec![0.25, 0.5, 1.0],
        ..Hyper::default()
    }
}

fn run(problem: &Problem, method: &str, hyper: &Hyper, seed: u64) -> Adapted {
    let input = AdaptInput {
        source: &problem.source,
        data: &problem.seen_data,
        teacher: &problem.teacher,
        classes: CLASSES,
        unlabelled: Some(&problem.unlabelled),
        reference: None,
    };
    let method: Method = method.parse().unwrap();
    adapt(&method, &input, hyper, seed, &mut |_| {}).unwrap()
}

fn source_accuracies(problem: &Problem) -> (f32, f32) {
    let source = run(problem, "source", &hyper(), 0);
    (accuracy(&source, &problem.test_seen), accuracy(&source, &problem.test_unseen))
}

#[test]
fn calibrated_tail_training_on_seen_classes_learns_the_shared_shift_and_helps_unseen_classes() {
    let problem = problem();
    let (seen_before, unseen_before) = source_accuracies(&problem);
    let adapted = run(&problem, "ft-tail+prior", &hyper(), 0);
    let (seen_after, unseen_after) = (accuracy(&adapted, &problem.test_seen), accuracy(&adapted, &problem.test_unseen));
    assert!(seen_after > seen_before + 0.15, "seen {seen_before} -> {seen_after}");
    assert!(unseen_after > unseen_before + 0.1, "unseen {unseen_before} -> {unseen_after}");
    // The head stays exactly the source head.
    assert_eq!(adapted.network.params[2], problem.source.params[2]);
    assert_eq!(adapted.network.params[3], problem.source.params[3]);
}

#[test]
fn uncalibrated_tail_training_drifts_towards_the_seen_classes_and_calibration_corrects_it() {
    // A tail that feeds the head directly can learn "always one of the seen classes" much like
    // the head itself; the unseen-logit bias undoes that drift.
    let problem = problem();
    let plain = run(&problem, "ft-tail", &hyper(), 0);
    let calibrated = run(&problem, "ft-tail+prior", &hyper(), 0);
    assert!(accuracy(&plain, &problem.test_seen) > 0.9);
    assert!(calibrated.gamma > 0.0);
    assert!(accuracy(&calibrated, &problem.test_unseen) > accuracy(&plain, &problem.test_unseen) + 0.2);
}

#[test]
fn naive_head_fine_tuning_sinks_the_unseen_classes() {
    let problem = problem();
    let (_, unseen_before) = source_accuracies(&problem);
    let hyper = Hyper { head_rate: 2.0, ..hyper() };
    let adapted = run(&problem, "ft-head", &hyper, 0);
    let unseen_after = accuracy(&adapted, &problem.test_unseen);
    assert!(unseen_after < unseen_before - 0.1, "unseen {unseen_before} -> {unseen_after}");
}

#[test]
fn calibration_restores_unseen_predictions_after_head_fine_tuning() {
    let problem = problem();
    let hyper = Hyper { head_rate: 2.0, ..hyper() };
    let naive = run(&problem, "ft-head", &hyper, 0);
    for calibrated in ["ft-head+alg", "ft-head+prior"] {
        let adapted = run(&problem, calibrated, &hyper, 0);
        assert!(adapted.gamma > 0.0, "{calibrated}: gamma {}", adapted.gamma);
        assert!(accuracy(&adapted, &problem.test_unseen) > accuracy(&naive, &problem.test_unseen), "{calibrated}");
    }
}

#[test]
fn every_method_runs_and_the_calibrated_ones_keep_the_unseen_classes() {
    let problem = problem();
    let (_, unseen_before) = source_accuracies(&problem);
    let hyper = Hyper { lolsgd_rounds: 3, lolsgd_copies: 2, lolsgd_local_steps: 20, pcv_splits: 1, ..hyper() };
    for method in [
        "ft-tail+alg",
        "adapter+alg",
        "ft-tail+lolsgd",
        "ft-tail+distill-unseen",
        "ft-tail+distill-all",
        "ft-tail+wise",
        "ft-tail+pcv",
    ] {
        let adapted = run(&problem, method, &hyper, 0);
        assert!(adapted.logits_of(&problem.test_unseen).iter().all(|v| v.is_finite()), "{method}");
    }
    for method in ["ft-tail+prior", "adapter+prior", "ft-tail+lolsgd+prior", "ft-tail+wise+prior", "recommended"] {
        let adapted = run(&problem, method, &hyper, 0);
        let unseen = accuracy(&adapted, &problem.test_unseen);
        assert!(unseen >= unseen_before - 0.02, "{method}: unseen {unseen_before} -> {unseen}");
    }
}

#[test]
fn recommended_trains_a_feature_adapter_when_the_bundle_has_no_tail() {
    let mut problem = problem();
    // Head only: the imported model's features feed the classifier directly.
    let tailless = Network {
        layers: vec![],
        head: (0, 1),
        params: problem.source.params[2..].to_vec(),
        roles: vec![Role::Head, Role::Head],
    };
    problem.unlabelled = Traffic::new(problem.unlabelled.splits.clone(), &tailless);
    problem.source = tailless;
    let (seen_before, unseen_before) = source_accuracies(&problem);
    let tail_only = AdaptInput {
        source: &problem.source,
        data: &problem.seen_data,
        teacher: &problem.teacher,
        classes: CLASSES,
        unlabelled: Some(&problem.unlabelled),
        reference: None,
    };
    let ft_tail: Method = "ft-tail+alg".parse().unwrap();
    assert_eq!(adapt(&ft_tail, &tail_only, &hyper(), 0, &mut |_| {}).unwrap_err(), AdaptError::NothingToTrain);
    let adapted = run(&problem, "recommended", &hyper(), 0);
    assert!(adapted.notes[0].contains("adapter"), "{:?}", adapted.notes);
    assert!(adapted.network.adapter_rank() > 0);
    let (seen, unseen) = (accuracy(&adapted, &problem.test_seen), accuracy(&adapted, &problem.test_unseen));
    assert!(seen > seen_before, "seen {seen_before} -> {seen}");
    assert!(unseen >= unseen_before - 0.02, "unseen {unseen_before} -> {unseen}");
}

#[test]
fn recommended_keeps_the_source_when_the_gates_checks_refuse_every_rate() {
    let problem = problem();
    // Source-domain samples of the unseen classes, as a bundle ships them.
    let reference = samples(&[2, 3], 40, &Array1::zeros(DIM), 5);
    let input = AdaptInput {
        source: &problem.source,
        data: &problem.seen_data,
        teacher: &problem.teacher,
        classes: CLASSES,
        unlabelled: Some(&problem.unlabelled),
        reference: Some(&reference),
    };
    let recommended: Method = "recommended".parse().unwrap();
    let adapted = adapt(&recommended, &input, &hyper(), 0, &mut |_| {}).unwrap();
    assert!(adapted.notes.iter().any(|n| n.contains("(source 0.")), "{:?}", adapted.notes);
    // Tolerances no candidate can meet: each check on its own refuses every rate.
    let strict = [
        (GateConfig { max_reference_drop: -0.5, ..GateConfig::default() }, "reference accuracy"),
        (GateConfig { max_seen_drop: -0.5, ..GateConfig::default() }, "seen validation"),
    ];
    for (gate, check) in strict {
        let hyper = Hyper { gate, ..hyper() };
        match adapt(&recommended, &input, &hyper, 0, &mut |_| {}) {
            Err(AdaptError::SourceKept { rates, reasons }) => {
                assert_eq!(rates, hyper.recommended_rates, "{reasons}");
                assert_eq!(reasons.matches(check).count(), rates.len(), "{reasons}");
            }
            other => panic!("{check}: expected the source kept, got {other:?}"),
        }
    }
}

#[test]
fn training_is_deterministic_for_a_seed() {
    let problem = problem();
    let a = run(&problem, "ft-tail+alg", &hyper(), 7);
    let b = run(&problem, "ft-tail+alg", &hyper(), 7);
    assert_eq!(a.network.params, b.network.params);
    assert_eq!(a.gamma, b.gamma);
    let c = run(&problem, "ft-tail+alg", &hyper(), 8);
    assert_ne!(a.network.params, c.network.params);
}

#[test]
fn bad_training_data_is_an_error_not_a_panic() {
    let problem = problem();
    let source = &problem.source;
    let config = TrainConfig { steps: 5, ..TrainConfig::default() };
    let empty = problem.seen_data.select(&[]);
    assert!(matches!(edgeadapt::adapt::train::validate(source, &empty, CLASSES, &[]), Err(AdaptError::NoSamples)));
    let one_class = problem.seen_data.filter(|l| l == 0);
    let names: Vec<String> = (0..CLASSES).map(|c| format!("c{c}")).collect();
    assert_eq!(
        edgeadapt::adapt::train::validate(source, &one_class, CLASSES, &names),
        Err(AdaptError::SingleClass("c0".into()))
    );
    let mut unknown = problem.seen_data.clone();
    unknown.labels[0] = 9;
    assert!(matches!(
        edgeadapt::adapt::train::validate(source, &unknown, CLASSES, &names),
        Err(AdaptError::UnknownLabel { label: 9, .. })
    ));
    let wide = SplitSet { data: Array2::from_elem((2, DIM + 1), f16::ZERO), positions: 1, labels: vec![0, 1] };
    assert!(matches!(
        edgeadapt::adapt::train::validate(source, &wide, CLASSES, &names),
        Err(AdaptError::Dimension { got: 7, expected: 6 })
    ));

    let mut poisoned = problem.seen_data.clone();
    poisoned.data.fill(f16::NAN);
    let error = train(source, &poisoned, None, &[2, 3], &config, |_| {}).unwrap_err();
    assert!(matches!(error, AdaptError::NotFinite { step: 0, .. }), "{error}");
    let exploding = TrainConfig {
        learning_rate: f32::INFINITY,
        sgd: edgeadapt::adapt::optim::SgdConfig { momentum: 0.9, weight_decay: 0.0 },
        ..config
    };
    let error = train(source, &problem.seen_data, None, &[2, 3], &exploding, |_| {}).unwrap_err();
    assert!(matches!(error, AdaptError::NotFinite { .. }), "{error}");
}
