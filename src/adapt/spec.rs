//! A method's name, composable with `+`: a base (`source`, `ft-head`, `ft-tail`, `adapter`)
//! and modifiers (`alg`, `prior`, `pcv`, `lolsgd`, `distill-unseen`, `distill-all`, `wise`).

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// No change.
    Source,
    /// Train every head row with cross-entropy (the naive baseline).
    FtHead,
    /// Train the tail with the head frozen.
    FtTail,
    /// Train a residual adapter on the features with the head frozen.
    Adapter,
    /// The device default (see [`recommended`]).
    Recommended,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Method {
    pub base: Base,
    pub alg: bool,
    /// Prior matching on unlabelled local traffic (falls back to ALG without such traffic), to
    /// the estimated unseen share (see `share::choose_share`).
    pub prior: bool,
    /// Prior matching to the source model's own share of unseen predictions.
    pub prior_source: bool,
    /// Prior matching corrected for the seen classes' improved recall (see `calibrate`).
    pub prior_recall: bool,
    pub pcv: bool,
    pub lolsgd: bool,
    pub distill_unseen: bool,
    pub distill_all: bool,
    pub wise: bool,
    pub seen_rows_only: bool,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let base = match self.base {
            Base::Source => "source",
            Base::FtHead if self.seen_rows_only => "ft-head-seen",
            Base::FtHead => "ft-head",
            Base::FtTail => "ft-tail",
            Base::Adapter => "adapter",
            Base::Recommended => "recommended",
        };
        let mut parts = vec![base.to_string()];
        for (on, name) in [
            (self.lolsgd, "lolsgd"),
            (self.distill_unseen, "distill-unseen"),
            (self.distill_all, "distill-all"),
            (self.wise, "wise"),
            (self.alg, "alg"),
            (self.prior && !self.prior_recall && !self.prior_source, "prior"),
            (self.prior_source, "prior-source"),
            (self.prior_recall, "prior-recall"),
            (self.pcv, "pcv"),
        ] {
            if on {
                parts.push(name.to_string());
            }
        }
        f.write_str(&parts.join("+"))
    }
}

impl FromStr for Method {
    type Err = String;

    fn from_str(text: &str) -> Result<Method, String> {
        let mut method = Method {
            base: Base::FtTail,
            alg: false,
            prior: false,
            prior_source: false,
            prior_recall: false,
            pcv: false,
            lolsgd: false,
            distill_unseen: false,
            distill_all: false,
            wise: false,
            seen_rows_only: false,
        };
        let mut base_given = false;
        for (index, token) in text.split('+').map(str::trim).enumerate() {
            let base = match token {
                "source" => Some(Base::Source),
                "ft-head" => Some(Base::FtHead),
                "ft-head-seen" => {
                    method.seen_rows_only = true;
                    Some(Base::FtHead)
                }
                "ft-tail" => Some(Base::FtTail),
                "adapter" => Some(Base::Adapter),
                "recommended" => Some(Base::Recommended),
                _ => None,
            };
            if let Some(base) = base {
                if index != 0 {
                    return Err(format!("'{text}': the base method '{token}' must come first"));
                }
                method.base = base;
                base_given = true;
                continue;
            }
            match token {
                "alg" => method.alg = true,
                "prior" => method.prior = true,
                "prior-source" => {
                    method.prior = true;
                    method.prior_source = true;
                }
                "prior-recall" => {
                    method.prior = true;
                    method.prior_recall = true;
                }
                "pcv" => method.pcv = true,
                "lolsgd" => method.lolsgd = true,
                "distill-unseen" => method.distill_unseen = true,
                "distill-all" => method.distill_all = true,
                "wise" => method.wise = true,
                other => {
                    return Err(format!(
                        "'{text}': unknown method part '{other}' (bases: source, ft-head, ft-head-seen, ft-tail, adapter, recommended; modifiers: alg, prior, prior-source, prior-recall, pcv, lolsgd, distill-unseen, distill-all, wise)"
                    ));
                }
            }
        }
        if !base_given
            && text.split('+').count() == 1
            && !(method.distill_unseen || method.distill_all || method.lolsgd)
        {
            return Err(format!("'{text}': a method needs a base"));
        }
        if [method.alg, method.pcv, method.prior].iter().filter(|&&on| on).count() > 1 {
            return Err(format!("'{text}': choose one calibration: alg, prior or pcv"));
        }
        if method.distill_unseen && method.distill_all {
            return Err(format!("'{text}': choose one distillation, distill-unseen or distill-all"));
        }
        if matches!(method.base, Base::Source | Base::Recommended) && text.contains('+') {
            return Err(format!(
                "'{text}': {} takes no modifiers",
                if method.base == Base::Source { "source" } else { "recommended" }
            ));
        }
        Ok(method)
    }
}
