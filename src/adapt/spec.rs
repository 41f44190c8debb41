//! A method's name, composable with `+`: a base (`source`, `ft-head`, `ft-head-seen`, `ft-tail`,
//! `adapter`, `recommended`), training modifiers (`lolsgd`, `distill-unseen`, `distill-all`,
//! `wise`) and at most one calibration (`alg`, `prior`, `prior-source`, `prior-recall`, `pcv`).
//! The types hold only legal combinations: what the parser refuses cannot be built.

use std::fmt;
use std::str::FromStr;

/// What a method does.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// No change.
    Source,
    /// The device default (see `recommended`): a tuned recipe with its rate chosen per device.
    Recommended,
    /// Train part of the network, then optionally calibrate the unseen classes' bias γ.
    Trained(Recipe),
}

/// A training kind plus at most one calibration.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    pub part: Part,
    /// Leave-out local SGD: copies trained on subsets of the seen classes, averaged.
    pub leave_out: bool,
    pub distill: Option<Distill>,
    /// Interpolate the trained weights halfway back towards the source.
    pub wise: bool,
    pub calibration: Option<Calibration>,
}

/// The part of the network a recipe trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Every head row with cross-entropy (the naive baseline).
    Head,
    /// Only the seen classes' head rows.
    HeadSeenRows,
    /// The tail with the head frozen.
    Tail,
    /// A residual adapter on the features with the head frozen.
    Adapter,
}

/// Which source predictions a training run distils from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distill {
    UnseenOnly,
    All,
}

/// How the unseen classes' logit bias γ is set after training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Calibration {
    /// Average logit gap on the labelled samples.
    Alg,
    /// Prior matching on unlabelled local traffic (falls back to ALG without such traffic).
    Prior(PriorTarget),
    /// Pseudo cross-validation: seen classes split into pseudo-seen and pseudo-unseen.
    Pcv,
}

/// The unseen share prior matching aims at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriorTarget {
    /// The estimated share (see `share::choose_share`).
    Estimated,
    /// The source model's own share of unseen predictions.
    Source,
    /// The source's share, corrected for the seen classes' improved recall (see `calibrate`).
    RecallCorrected,
}

impl Recipe {
    /// Tail training with nothing added.
    pub fn tail() -> Recipe {
        Recipe { part: Part::Tail, leave_out: false, distill: None, wise: false, calibration: None }
    }
}

impl Method {
    /// The recipe, for methods that train.
    pub fn recipe(&self) -> Option<&Recipe> {
        match self {
            Method::Trained(recipe) => Some(recipe),
            Method::Source | Method::Recommended => None,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let recipe = match self {
            Method::Source => return f.write_str("source"),
            Method::Recommended => return f.write_str("recommended"),
            Method::Trained(recipe) => recipe,
        };
        let mut parts = vec![match recipe.part {
            Part::Head => "ft-head",
            Part::HeadSeenRows => "ft-head-seen",
            Part::Tail => "ft-tail",
            Part::Adapter => "adapter",
        }];
        if recipe.leave_out {
            parts.push("lolsgd");
        }
        match recipe.distill {
            Some(Distill::UnseenOnly) => parts.push("distill-unseen"),
            Some(Distill::All) => parts.push("distill-all"),
            None => {}
        }
        if recipe.wise {
            parts.push("wise");
        }
        parts.extend(recipe.calibration.map(|calibration| match calibration {
            Calibration::Alg => "alg",
            Calibration::Prior(PriorTarget::Estimated) => "prior",
            Calibration::Prior(PriorTarget::Source) => "prior-source",
            Calibration::Prior(PriorTarget::RecallCorrected) => "prior-recall",
            Calibration::Pcv => "pcv",
        }));
        f.write_str(&parts.join("+"))
    }
}

const NAMES: &str = "bases: source, ft-head, ft-head-seen, ft-tail, adapter, recommended; modifiers: lolsgd, \
                     distill-unseen, distill-all, wise; calibrations: alg, prior, prior-source, prior-recall, pcv";

impl FromStr for Method {
    type Err = String;

    fn from_str(text: &str) -> Result<Method, String> {
        let tokens: Vec<&str> = text.split('+').map(str::trim).collect();
        let part = match tokens[0] {
            "source" | "recommended" if tokens.len() > 1 => {
                return Err(format!("'{text}': {} takes no modifiers", tokens[0]));
            }
            "source" => return Ok(Method::Source),
            "recommended" => return Ok(Method::Recommended),
            "ft-head" => Some(Part::Head),
            "ft-head-seen" => Some(Part::HeadSeenRows),
            "ft-tail" => Some(Part::Tail),
            "adapter" => Some(Part::Adapter),
            _ => None,
        };
        let mut recipe = Recipe { part: part.unwrap_or(Part::Tail), ..Recipe::tail() };
        let modifiers = if part.is_some() { &tokens[1..] } else { &tokens[..] };
        for &token in modifiers {
            let calibration = match token {
                "alg" => Some(Calibration::Alg),
                "prior" => Some(Calibration::Prior(PriorTarget::Estimated)),
                "prior-source" => Some(Calibration::Prior(PriorTarget::Source)),
                "prior-recall" => Some(Calibration::Prior(PriorTarget::RecallCorrected)),
                "pcv" => Some(Calibration::Pcv),
                _ => None,
            };
            if let Some(calibration) = calibration {
                if recipe.calibration.is_some() {
                    return Err(format!("'{text}': choose one calibration: alg, prior (or a variant) or pcv"));
                }
                recipe.calibration = Some(calibration);
                continue;
            }
            let distill = match token {
                "distill-unseen" => Some(Distill::UnseenOnly),
                "distill-all" => Some(Distill::All),
                _ => None,
            };
            if let Some(distill) = distill {
                if recipe.distill.is_some() {
                    return Err(format!("'{text}': choose one distillation, distill-unseen or distill-all"));
                }
                recipe.distill = Some(distill);
                continue;
            }
            match token {
                "lolsgd" => recipe.leave_out = true,
                "wise" => recipe.wise = true,
                "source" | "recommended" | "ft-head" | "ft-head-seen" | "ft-tail" | "adapter" => {
                    return Err(format!("'{text}': the base method '{token}' must come first"));
                }
                other => return Err(format!("'{text}': unknown method part '{other}' ({NAMES})")),
            }
        }
        // A lone training modifier names a tail recipe; a lone calibration names nothing.
        if part.is_none() && tokens.len() == 1 && recipe.distill.is_none() && !recipe.leave_out {
            return Err(format!("'{text}': a method needs a base"));
        }
        Ok(Method::Trained(recipe))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_parse_and_print_back() {
        for text in [
            "source",
            "ft-head",
            "ft-head+alg",
            "ft-tail+alg",
            "adapter+lolsgd+alg",
            "ft-tail+distill-unseen",
            "ft-tail+wise+pcv",
            "ft-tail+prior-source",
            "ft-tail+prior-recall",
            "ft-tail+lolsgd+distill-all+wise+prior",
            "recommended",
            "ft-head-seen",
        ] {
            let method: Method = text.parse().unwrap();
            assert_eq!(method.to_string(), text);
        }
        let distill: Method = "distill-all".parse().unwrap();
        assert_eq!(distill.to_string(), "ft-tail+distill-all", "a bare modifier trains the tail");
    }

    #[test]
    fn a_recipe_says_what_it_trains_and_how_it_calibrates() {
        let method: Method = "adapter+lolsgd+prior-recall".parse().unwrap();
        let expected = Recipe {
            part: Part::Adapter,
            leave_out: true,
            calibration: Some(Calibration::Prior(PriorTarget::RecallCorrected)),
            ..Recipe::tail()
        };
        assert_eq!(method, Method::Trained(expected));
        assert_eq!("source".parse::<Method>().unwrap().recipe(), None);
    }

    #[test]
    fn bad_method_names_say_what_is_wrong() {
        assert!("ft-tail+magic".parse::<Method>().unwrap_err().contains("magic"));
        assert!("alg+ft-tail".parse::<Method>().unwrap_err().contains("first"));
        assert!("ft-tail+alg+pcv".parse::<Method>().unwrap_err().contains("one calibration"));
        assert!("ft-tail+prior+prior-source".parse::<Method>().unwrap_err().contains("one calibration"));
        assert!("ft-tail+distill-all+distill-unseen".parse::<Method>().unwrap_err().contains("one distillation"));
        assert!("source+alg".parse::<Method>().unwrap_err().contains("no modifiers"));
        assert!("recommended+wise".parse::<Method>().unwrap_err().contains("no modifiers"));
        assert!("alg".parse::<Method>().unwrap_err().contains("base"));
    }
}
